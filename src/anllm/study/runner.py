"""The anchor-learning study as stages over the ordinary train.py / evaluate.py machinery.

Every stage composes the same Hydra configs the two CLIs use (``conf/train.yaml``,
``conf/evaluate.yaml``) and calls :func:`anllm.train.run` / :func:`anllm.eval.runner.run` in this
process, so a study run *is* a sequence of training and evaluation runs, with their resume logic:

* a training run whose summary says it reached ``max_steps`` is skipped; an unfinished one resumes
  from its newest complete checkpoint (``trainer.resume=auto``);
* an evaluation whose per-task results are saved with the same settings is read back, not re-run;
* a stage whose result is recorded (``results.json`` in the report directory, committed with the
  report) with the same settings is not run again, even on a fresh machine that has lost the
  checkpoints: only what is missing is recomputed, and an arm is retrained only when one of its
  stages still needs its final checkpoint.

Stages run arm by arm (curve, final sets, recall, long-range tasks for one arm, then the next arm), and
the long probes in recorded parts (one reading, or one task and reading, each), so a lost machine costs
at most one arm's checkpoint and one part. So ``python study.py`` can be killed at any point and
started again, here or on another machine. After every stage the report (:mod:`anllm.study.report`)
is rewritten from what exists so far.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from ..eval.methods import runnable_methods
from ..schema import compose
from .config import REPO, STAGES, check, validate  # noqa: F401 - STAGES: the stage names (the schema keeps a copy)
from .results import Results, complete_checkpoints, finished, tokens_seen

log = logging.getLogger("anllm.study")


class Study:
    """Runs the stages of ``cfg`` (``conf/study.yaml`` composed with a ``study=...`` option)."""

    def __init__(self, cfg: DictConfig):
        validate(cfg)  # types, keys, cross-references (a ConfigError, which is a ValueError)
        self.cfg = cfg
        self.settings = cfg.study  # the ``study`` section: model, arms, sweeps, budgets, evaluations
        self.work = (REPO / str(cfg.work_dir)).resolve() if not Path(str(cfg.work_dir)).is_absolute() else Path(str(cfg.work_dir))
        self.report_dir = Path(str(cfg.get("report_dir") or cfg.study.report_dir))
        if not self.report_dir.is_absolute():
            self.report_dir = REPO / self.report_dir
        self.data_dir = Path(str(cfg.data_dir)).expanduser()
        if not self.data_dir.is_absolute():
            self.data_dir = (REPO / self.data_dir).resolve()
        # What is measured lives beside the report (committed), not with the checkpoints (lost with a machine).
        self.results_file = self.report_dir / "results.json"
        self.timings_file = self.report_dir / "timings.json"
        self.results = Results(**json.loads(self.results_file.read_text())) if self.results_file.is_file() else Results()
        self._steps: dict[tuple[int, str, tuple[str, ...]], int] = {}  # steps_for composes the training config

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def data(self) -> dict[str, Any]:
        """The training data config (relative paths start at the repository root)."""
        d = OmegaConf.to_container(self.settings.data, resolve=True)
        d["base_dir"] = str(REPO)
        return d

    def _timed(self, key: str, seconds: float, restart: bool = False) -> None:
        """Add ``seconds`` to ``key`` (a resumed run's parts add up); ``restart``: a run that started
        from scratch (its earlier checkpoints lost) counts only this time."""
        t = json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}
        t[key] = (0.0 if restart else t.get(key, 0.0)) + seconds
        self.timings_file.parent.mkdir(parents=True, exist_ok=True)
        self.timings_file.write_text(json.dumps(t, indent=1))

    def publish(self) -> None:
        """Save what is measured so far and rewrite the report from it. The results are reloaded on the
        next run, so a resumed study's report never loses a stage it has not reached again yet."""
        from .report import write_report

        self.results_file.parent.mkdir(parents=True, exist_ok=True)
        self.results_file.write_text(json.dumps(asdict(self.results), indent=1))
        write_report(self)

    def timings(self) -> dict[str, float]:
        return json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}

    def rows_per_step(self, exp: str, overrides: Sequence[str]) -> int:
        """Rows one optimiser step trains on (batch x accumulation), read from the run's composed config."""
        trainer = self.train_config("rows-per-step", exp, overrides, 1, 1).trainer
        return int(trainer.get("per_device_train_batch_size") or 1) * int(trainer.get("gradient_accumulation_steps") or 1)

    def steps_for(self, tokens: int, exp: str, overrides: Sequence[str]) -> int:
        """Optimizer steps that train on ``tokens`` with the run ``exp`` + ``overrides`` (a Hydra compose,
        so remembered: every stage and part asks it through :meth:`arm_spec`)."""
        key = (int(tokens), str(exp), tuple(overrides))
        if key not in self._steps:
            self._steps[key] = max(1, int(tokens) // (int(self.settings.block_size) * self.rows_per_step(exp, overrides)))
        return self._steps[key]

    def anchored(self, arm: str) -> bool:
        """Whether ``arm`` trains with anchors (its composed config's ``anchor.mode``), before it has run."""
        spec = self.settings.arm_specs[arm]
        cfg = compose("train", [f"+exp={spec.exp}", *self.settings.train_overrides, *spec.overrides])
        return str(cfg.anchor.mode) != "none"

    def train_config(self, run: str, exp: str, overrides: Sequence[str], steps: int, save_steps: int) -> DictConfig:
        ov = [
            f"+exp={exp}", f"model={self.settings.model}", "data=jsonl", f"block_size={self.settings.block_size}",
            f"output_dir={self.work / run}", f"trainer.max_steps={steps}", f"trainer.save_steps={save_steps}",
            "trainer.save_total_limit=null", "trainer.report_to=[]", "trainer.disable_tqdm=true",
            f"trainer.logging_steps={max(1, steps // 20)}", "trainer.warmup_steps=0",
            f"trainer.warmup_ratio={self.settings.sweep.warmup_ratio}", "heldout.enabled=false",  # the study evaluates itself
            *self.settings.train_overrides, *overrides,
        ]
        cfg = compose("train", ov)
        with open_dict(cfg):
            cfg.data = OmegaConf.merge(cfg.data, self.data)
        return cfg

    def train(self, run: str, exp: str, overrides: Sequence[str], tokens: int, checkpoints: int) -> Path:
        """Train (or resume, or skip a finished) run; returns its output dir."""
        from ..train import run as train_run

        steps = self.steps_for(tokens, exp, overrides)
        save_steps = max(1, steps // max(1, checkpoints))
        out = self.work / run
        if finished(out, steps):
            return out
        cfg = self.train_config(run, exp, overrides, steps, save_steps)
        log.info("training %s: %d steps (%s)", run, steps, " ".join(overrides))
        fresh = not complete_checkpoints(out)
        t0 = time.perf_counter()
        train_run(cfg)
        self._timed(f"train/{run}", time.perf_counter() - t0, restart=fresh)
        for ckpt in out.glob("checkpoint-*"):  # finished: optimizer states are never needed again
            for name in ("optimizer.pt", "scheduler.pt"):
                (ckpt / name).unlink(missing_ok=True)
        return out

    def step0(self, run: str, exp: str, overrides: Sequence[str]) -> Path:
        """The starting model with this arm's anchors (untrained ``<AC>``), saved once."""
        from ..schema import plain_dict
        from ..train.model import build_model_and_tokenizer

        out = self.work / run / "step-0"
        if (out / "config.json").is_file():
            return out
        cfg = self.train_config(run, exp, overrides, 1, 1)
        model, tok = build_model_and_tokenizer(plain_dict(cfg))
        tmp = out.with_name("step-0.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
        return out

    def evaluate(self, checkpoint: Path, out_dir: Path, overrides: Sequence[str], updates: dict[str, Any]) -> list[dict[str, Any]]:
        """``evaluate.py checkpoint=... <overrides>`` in this process (resumes saved tasks)."""
        from ..eval.runner import register_resolvers, run

        register_resolvers()
        ov = [f"checkpoint={checkpoint}", f"output_dir={out_dir}", f"data_dir={self.data_dir}", *overrides]
        if self.cfg.num_threads:
            ov.append(f"num_threads={self.cfg.num_threads}")
        cfg = compose("evaluate", ov)
        for key, value in {"progress": False, **updates}.items():
            OmegaConf.update(cfg, key, value, force_add=True)
        fresh = not out_dir.exists()
        t0 = time.perf_counter()
        record = run(cfg)
        if record.get("failed"):
            raise RuntimeError(f"evaluation of {checkpoint} failed: {record['failed']} (see {out_dir}/tasks)")
        planned = {f"{r['suite']}/{r['task']}" for r in record["rows"]}
        if len(set(record.get("resumed") or [])) < len(planned):  # something was computed: count its time
            self._timed(f"eval/{out_dir.relative_to(self.work)}", time.perf_counter() - t0, restart=fresh)
        return record["rows"]

    def ppl(self, checkpoint: Path, out_dir: Path, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
        p = self.settings.ppl
        rows = self.evaluate(
            checkpoint, out_dir, ["suite=ppl", "tasks=[holdout]", f"limit={p.num_documents}"],
            {"ppl.data": self.data, "ppl.methods": list(methods), "ppl.max_tokens": p.max_tokens,
             "ppl.min_chars": p.min_chars, "ppl.select": p.select, "ppl.chunk_size": p.chunk_size},
        )
        return {r["method"]: r for r in rows}

    # ---- what is recorded ---------------------------------------------------------------------
    def train_spec(self, exp: str, overrides: Sequence[str], tokens: int) -> dict[str, Any]:
        """What determines a training run's weights (machine-independent: no absolute paths)."""
        return {"exp": str(exp), "overrides": list(overrides), "steps": self.steps_for(tokens, exp, overrides),
                "model": str(self.settings.model), "block_size": int(self.settings.block_size),
                "train_overrides": list(self.settings.train_overrides),
                "data": OmegaConf.to_container(self.settings.data, resolve=True)}

    def arm_spec(self, arm: str) -> dict[str, Any]:
        spec = self.settings.arm_specs[arm]
        return self.train_spec(spec.exp, self.arm_overrides(arm), int(self.settings.tokens))

    def recorded(self, key: str, spec: dict[str, Any]) -> bool:
        """Whether stage ``key`` (e.g. ``recall/ac_sink``) was measured with exactly ``spec``."""
        return self.results.done.get(key) == _plain(spec)

    def record(self, key: str, spec: dict[str, Any]) -> None:
        self.results.done[key] = _plain(spec)
        self.publish()

    def trained(self, arm: str) -> Path:
        """The arm's finished training run (trained, resumed or retrained here when it is missing)."""
        spec = self.settings.arm_specs[arm]
        return self.train(arm, spec.exp, self.arm_overrides(arm), int(self.settings.tokens), int(self.settings.checkpoints))

    # ---- stages -------------------------------------------------------------------------------
    def run(self) -> Results:
        if self.cfg.num_threads:
            import torch

            torch.set_num_threads(int(self.cfg.num_threads))
        stages = list(self.cfg.stages)
        if "sweep" in stages:
            self.sweep()
        if "sweeps" in stages:
            self.option_sweeps()
        per_arm = [("arms", self.curve), ("final", self.final), ("recall", self.recall), ("longrange", self.longrange)]
        for arm in self.settings.arms:  # arm by arm: its checkpoint is needed only until its stages are done
            for name, fn in per_arm:
                if name in stages and arm in self.stage_arms(name):
                    fn(arm)
        # then the best arm's stages (``best`` in recall.arms / longrange.arms / qa.arms), one checkpoint for all
        best = best_arm(self.results.final)
        for name, fn in per_arm[2:]:
            if name in stages and best is not None and "best" in self.stage_arms(name) and best not in self.stage_arms(name):
                fn(best)
        if "qa" in stages:
            self.qa()
        self.publish()
        return self.results

    def stage_arms(self, stage: str) -> list[str]:
        """The arms a per-arm stage measures: every arm, or the stage's ``arms`` list (which may name
        ``best``: the anchor arm with the lowest margin over a window, known once every final set is in)."""
        section = {"recall": self.settings.recall, "longrange": self.settings.get("longrange")}.get(stage, {})
        if section is None:  # no long-range tasks configured
            return []
        return list(section.get("arms") or self.settings.arms)

    def sweep(self) -> None:
        """Short AC runs with each optimiser candidate; the lowest held-out anchor PPL wins (nothing to do
        when ``study.hp`` fixes the optimiser settings)."""
        if self.settings.get("hp") is not None or not self.settings.sweep.run:
            return
        for name in self.settings.sweep.run:
            overrides = list(self.settings.sweep.candidates[name])
            run = f"sweep/{name}"
            spec = {"train": self.train_spec("anllm_ac", overrides, int(self.settings.sweep.tokens)),
                    "ppl": OmegaConf.to_container(self.settings.ppl, resolve=True)}
            if name in self.results.sweep and self.recorded(run, spec):
                continue
            out = self.train(run, "anllm_ac", overrides, int(self.settings.sweep.tokens), 1)
            r = self.ppl(out, self.work / run / "eval", ["full", "anchor"])
            self.results.sweep[name] = {"overrides": overrides, "steps": spec["train"]["steps"],
                                        "tokens": tokens_seen(out), "ppl_full": r["full"]["ppl"],
                                        "ppl_anchor": r["anchor"]["ppl"]}
            log.info("sweep %s: full %.2f anchor %.2f", name, r["full"]["ppl"], r["anchor"]["ppl"])
            self.record(run, spec)
        self.results.chosen = min(self.results.sweep, key=lambda n: self.results.sweep[n]["ppl_anchor"])
        self.publish()

    def chosen_overrides(self) -> list[str]:
        """The optimiser settings every arm uses: ``study.hp`` when fixed (Evidence II reuses the first
        study's winner), else the optimiser sweep's winner."""
        if self.settings.get("hp") is not None:
            return list(self.settings.hp)
        if self.results.chosen is None:
            self.sweep()
        return list(self.settings.sweep.candidates[self.results.chosen])

    def sweep_spec(self, name: str, cand: str) -> dict[str, Any]:
        """What determines an option-sweep candidate's result (its training run and the PPL reading)."""
        sw = self.settings.sweeps[name]
        base = self.settings.arm_specs[sw.arm]
        extra = {**sw.candidates, **(sw.get("controls") or {})}[cand]
        overrides = [*self.chosen_overrides(), *base.overrides, *extra]
        return {"train": self.train_spec(base.exp, overrides, int(sw.tokens)),
                "ppl": OmegaConf.to_container(self.settings.ppl, resolve=True)}

    def option_sweeps(self) -> None:
        """Short runs of one arm with each candidate option set (``study.sweeps.<name>``, e.g. the window
        W or the distillation weight λ); the winner has the best anchor reading *against StreamingLLM at
        equal keys per query* (lowest log PPL(anchor) − log PPL(streamingllm_q)): the quantity the
        study is about, not anchor PPL alone (a bigger window always lowers that)."""
        for name, sw in (self.settings.get("sweeps") or {}).items():
            base = self.settings.arm_specs[sw.arm]
            done = self.results.sweeps.setdefault(name, {})
            controls = dict(sw.get("controls") or {})
            for cand, extra in [*sw.candidates.items(), *controls.items()]:
                run = f"sweep-{name}/{cand}"
                spec = self.sweep_spec(name, cand)
                if cand in done and self.recorded(run, spec):
                    continue
                overrides = spec["train"]["overrides"]
                # 4 checkpoints: a killed candidate resumes near where it stopped (only the last is evaluated)
                out = self.train(run, base.exp, overrides, int(sw.tokens), 4)
                r = self.ppl(out, self.work / run / "eval", ["full", "anchor", "streamingllm_q"])
                done[cand] = {"overrides": list(extra), "steps": spec["train"]["steps"],
                              "tokens": tokens_seen(out), **{f"ppl_{m}": r[m]["ppl"] for m in r},
                              "mean_kv": r["anchor"].get("mean_kv"), "max_kv": r["anchor"].get("peak_kv"),
                              "margin": math.log(r["anchor"]["ppl"]) - math.log(r["streamingllm_q"]["ppl"]),
                              "train_s": self.timings().get(f"train/{run}"),
                              **({"control": True} if cand in controls else {})}
                log.info("sweep %s/%s: anchor %.2f streamingllm_q %.2f", name, cand, r["anchor"]["ppl"],
                         r["streamingllm_q"]["ppl"])
                self.record(run, spec)
            self.results.choices[name] = choose(done, sw.candidates)
            self.publish()

    def arm_overrides(self, arm: str) -> list[str]:
        """An arm's overrides: the optimiser settings, its own, then the winners of the sweeps it uses."""
        spec = self.settings.arm_specs[arm]
        out = [*self.chosen_overrides(), *spec.overrides]
        for name in spec.get("uses") or []:
            if name not in self.results.choices:
                self.option_sweeps()
            out += list(self.settings.sweeps[name].candidates[self.results.choices[name]])
        return out

    def curve(self, arm: str) -> None:
        """One arm's learning curve: step 0, training, held-out PPL at every saved checkpoint."""
        key = f"arms/{arm}"
        spec = {"train": self.arm_spec(arm), "checkpoints": int(self.settings.checkpoints),
                "ppl": OmegaConf.to_container(self.settings.ppl, resolve=True)}
        if arm in self.results.arms and self.recorded(key, spec):
            return
        arm_spec = self.settings.arm_specs[arm]
        overrides = spec["train"]["overrides"]
        points = [(0, self.step0(arm, arm_spec.exp, overrides))]
        out = self.trained(arm)
        points += [(step, path) for step, path in complete_checkpoints(out)]
        curve: dict[str, Any] = {"steps": [], "tokens": [], "ppl": {}, "rows": []}
        for step, path in points:
            rows = self.ppl(path, out / "eval" / f"step-{step}", list(self.settings.ppl.methods))
            curve["steps"].append(step)
            curve["tokens"].append(0 if step == 0 else tokens_seen(path))
            curve["rows"].append(rows)
            for m, r in rows.items():
                curve["ppl"].setdefault(m, []).append(r["ppl"])
        final = curve["rows"][-1]
        run_summary = out / "anllm_train_summary.json"
        distill = json.loads(run_summary.read_text()).get("distill") if run_summary.is_file() else None
        curve.update(exp=arm_spec.exp, overrides=overrides, final_dir=str(out), distill=distill,
                     c_red=(final.get("anchor") or {}).get("c_red"), budget=equal_cache_budget(final),
                     train_s=self.timings().get(f"train/{arm}"))
        self.results.arms[arm] = curve
        self.record(key, spec)

    def final(self, arm: str) -> None:
        """The arm's final checkpoint on the larger equal-cache sets (``study.final``: e.g. 32 documents
        of 1,024 and of 4,096 tokens, the tail after 2,048), all methods, per-document scores."""
        for name, f in (self.settings.get("final") or {}).items():
            key = f"final/{arm}/{name}"
            spec = {"train": self.arm_spec(arm), "set": OmegaConf.to_container(f, resolve=True)}
            if name in self.results.final.get(arm, {}) and self.recorded(key, spec):
                continue
            out = self.trained(arm)
            rows = self.evaluate(
                out, out / "eval" / f"final-{name}", ["suite=ppl", "tasks=[holdout]", f"limit={f.num_documents}"],
                {"ppl.data": self.data, "ppl.methods": list(f.methods), "ppl.max_tokens": f.max_tokens,
                 "ppl.min_chars": f.min_chars, "ppl.select": f.select, "ppl.chunk_size": f.chunk_size,
                 "ppl.tail_from": f.get("tail_from"), "ppl.offset_bins": f.get("offset_bins")},
            )
            docs = out / "eval" / f"final-{name}" / "tasks" / "ppl" / "holdout" / "documents.json"
            per_doc = json.loads(docs.read_text()) if docs.is_file() else {}
            self.results.final.setdefault(arm, {})[name] = [
                {**r, "per_doc_nll": [d["nll"] / d["tokens"] for d in per_doc.get(r["method"], [])],
                 "per_doc_nll_tail": [d["nll_tail"] / d["tokens_tail"] if d.get("tokens_tail") else None
                                      for d in per_doc.get(r["method"], [])]}
                for r in rows]
            self.record(key, spec)

    def parts(self, stage: str, arm: str, spec: dict[str, Any], parts: Sequence[tuple[str, dict[str, Any]]],
              store: dict[str, list[dict[str, Any]]], run: Any) -> None:
        """A long stage in recorded parts (one reading each: a method, or a task and a method), so a machine
        lost halfway keeps what it finished. ``run(checkpoint, part_dir, updates)`` evaluates one part; its rows
        replace the part's earlier rows in ``store[arm]`` (kept in the order of ``parts``)."""
        for name, updates in parts:
            key = f"{stage}/{arm}/{name}"
            part_spec = {**spec, "part": updates}
            if self.recorded(key, part_spec) and any(_part_of(r) == name for r in store.get(arm, [])):
                continue
            out = self.trained(arm)
            rows = [{**r, "part": name} for r in run(out, out / "eval" / stage / name.replace("/", "-"), updates)]
            order = [n for n, _ in parts]
            kept = [r for r in store.get(arm, []) if _part_of(r) != name]
            store[arm] = sorted(kept + rows, key=lambda r: order.index(_part_of(r)) if _part_of(r) in order else len(order))
            self.record(key, part_spec)

    def longrange(self, arm: str) -> None:
        """Passkey, multi-key needle and variable tracking (``evaluate.py suite=longrange``) on the arm's
        final checkpoint, one recorded part per task and reading."""
        lr = self.settings.longrange
        opts = self.longrange_options()
        methods, _ = runnable_methods(list(lr.methods), self.anchored(arm))
        parts = [(f"{task}/{m}", {"task": task, "method": m}) for task in lr.tasks for m in methods]
        self.parts("longrange", arm, {"train": self.arm_spec(arm), "longrange": opts}, parts, self.results.longrange,
                   lambda out, part_dir, p: self.evaluate(out, part_dir, *self.longrange_evaluation(p["task"], [p["method"]])))

    def longrange_options(self) -> dict[str, Any]:
        """``study.longrange`` as ``evaluate.py``'s ``longrange.*`` options (without tasks and methods)."""
        return {k: (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
                for k, v in self.settings.longrange.items() if k not in ("arms", "tasks", "methods")}

    def longrange_evaluation(self, task: str, methods: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
        """The ``evaluate.py`` overrides and updates that read ``task`` with ``methods`` (one part's, or
        every reading at once: the same items and budgets either way)."""
        return (["suite=longrange", f"tasks=[{task}]"],
                {"longrange.data": self.data, "longrange.methods": list(methods),
                 **{f"longrange.{k}": v for k, v in self.longrange_options().items()}})

    def recall(self, arm: str) -> None:
        """The recall probe on the arm's final checkpoint, one recorded part per reading (the same items
        for every reading: they depend on the data, the seed, the item count and the distances only)."""
        r = self.settings.recall
        opts = {k: v for k, v in OmegaConf.to_container(r, resolve=True).items() if k not in ("arms", "methods")}
        methods, _ = runnable_methods(list(r.methods), self.anchored(arm))
        self.parts("recall", arm, {"train": self.arm_spec(arm), "recall": opts}, [(m, {"method": m}) for m in methods],
                   self.results.recall,
                   lambda out, part_dir, p: self.evaluate(out, part_dir, *self.recall_evaluation([p["method"]])))

    def recall_evaluation(self, methods: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
        """The ``evaluate.py`` overrides and updates that read the recall items with ``methods`` (one
        part's reading, or all of them at once)."""
        r = self.settings.recall
        return (["suite=recall"],
                {"recall.data": self.data, "recall.num_items": r.num_items, "recall.distances": list(r.distances),
                 "recall.methods": list(methods), "recall.batch_size": r.batch_size,
                 **({"recall.num_choices": r.num_choices} if "num_choices" in r else {})})

    def qa(self) -> None:
        """QA on final checkpoints; ``best`` in ``study.qa.arms`` is the anchor arm closest to (or furthest
        ahead of) StreamingLLM at equal keys per query on the first final set (:func:`best_arm`)."""
        q = self.settings.qa
        for name in q.arms:
            spec = q.modes[name]
            arm = best_arm(self.results.final) if name == "best" else name
            if arm is None:
                log.warning("qa: no arm has final-set results yet, so the best arm is unknown; skipped")
                continue
            key = f"qa/{arm}"
            done = {"train": self.arm_spec(arm), "tasks": list(q.tasks), "limit": q.limit, "num_fewshot": int(q.num_fewshot),
                    "modes": OmegaConf.to_container(spec, resolve=True)}
            if arm in self.results.qa and self.recorded(key, done):
                continue
            out = self.trained(arm)
            modes = "[" + ",".join(spec.modes) + "]"
            tasks = "[" + ",".join(q.tasks) + "]"
            rows = self.evaluate(out, out / "eval" / "qa", ["suite=qa", f"tasks={tasks}", f"modes={modes}",
                                                              f"num_fewshot={q.num_fewshot}",
                                                              f"limit={'null' if q.limit is None else q.limit}"],
                                 {"qa.baselines": list(spec.baselines), "qa.stock": False})
            self.results.qa[arm] = rows
            self.record(key, done)


def main(argv: Sequence[str]) -> Results:
    """``python study.py [overrides]``: compose conf/study.yaml, validate it, run it."""
    from ..cli import InputError, fail

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = check(argv)
    except InputError as e:  # bad input: one line, exit code 2, nothing written
        fail("study.py", str(e), kind="config error")
    return Study(cfg).run()


def _part_of(row: dict[str, Any]) -> str:
    """The recorded part a row belongs to (rows recorded before stages had parts: their method)."""
    return row.get("part") or (f"{row['task']}/{row['method']}" if row.get("suite") == "longrange" else row["method"])


def _plain(spec: dict[str, Any]) -> Any:
    """``spec`` as JSON reads it back (tuples as lists), so a recorded spec compares equal after a reload."""
    return json.loads(json.dumps(spec))


def choose(done: dict[str, dict[str, Any]], candidates: Any) -> str:
    """The option sweep's winner: the candidate (never a control) with the lowest margin
    log PPL(anchor) − log PPL(StreamingLLM at equal keys per query)."""
    return min((c for c in candidates if c in done), key=lambda c: done[c]["margin"])


def best_arm(final: dict[str, dict[str, list[dict[str, Any]]]]) -> str | None:
    """The arm with the lowest log PPL(anchor) − log PPL(StreamingLLM at equal keys per query) on its
    first final set (the quantity the study is about); None when no arm has both readings yet."""
    margins = {}
    for arm, sets in final.items():
        rows = {r["method"]: r for r in next(iter(sets.values()), [])}
        if "anchor" in rows and "streamingllm_q" in rows:
            margins[arm] = math.log(rows["anchor"]["ppl"]) - math.log(rows["streamingllm_q"]["ppl"])
    return min(margins, key=margins.get) if margins else None


def equal_cache_budget(rows: dict[str, dict[str, Any]]) -> float | None:
    """Keys per token of the equal-peak-cache baselines (the registry's ``budget="peak"`` methods, in
    registry order), from the first of them that the checkpoint's rows measured."""
    from ..eval.methods import METHODS, names

    for m in names("ppl"):
        if METHODS[m].budget == "peak" and m in rows and rows[m].get("budget") is not None:
            return rows[m]["budget"]
    return None
