"""What ``evaluate.py`` does: validate the request, load the model once, run tasks, report.

Every task's rows are saved as soon as the task finishes (``<output_dir>/tasks/<suite>/<task>.json``);
a task that raises is recorded as an error and the others go on; a re-run with the same
``output_dir`` reuses saved tasks whose settings fingerprint matches and retries only failed or
changed ones. The model is not even loaded when everything is already saved.
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..errors import InputError
from . import report
from .suites import ModelBundle, Suite, TaskInputError, load_suite, selected_suites

log = logging.getLogger(__name__)

# Settings that change a task's results (besides the suite's own section).
FINGERPRINT_KEYS = ("checkpoint", "anchors", "num_fewshot", "limit", "modes", "data_dir", "batch_size", "dtype", "seed")
# Keys of a suite's section that say where something runs, not what it computes: not fingerprinted.
RUN_ONLY_KEYS = {"translation": ("comet_python", "comet_cache_dir")}


def register_resolvers() -> None:
    """``${basename:path}`` for default output directories (stable per checkpoint, so re-runs resume)."""
    if not OmegaConf.has_resolver("basename"):
        OmegaConf.register_new_resolver(
            "basename", lambda p: "external-systems" if p is None else (Path(str(p)).expanduser().resolve().name or "model"))


def plan_tasks(cfg: DictConfig) -> tuple[list[tuple[Suite, str]], list[str]]:
    """``[(suite, task)]`` to run, validated before anything heavy happens; plus notes."""
    names = selected_suites(cfg.get("suite", "qa"))
    explicit = cfg.get("suite") != "all"
    suites: list[Suite] = []
    notes: list[str] = []
    for n in names:
        try:
            suites.append(load_suite(n))
        except ImportError as e:
            if explicit:
                raise ImportError(f"Suite {n!r} is not available: {e}") from e
            notes.append(f"suite {n} not available ({e}); skipped")
    for s in suites:
        if s.check is not None:
            s.check(cfg)
    requested = cfg.get("tasks")
    if requested is None:
        return [(s, t) for s in suites for t in s.default_tasks], notes
    requested = [requested] if isinstance(requested, str) else list(requested)
    plan = []
    for t in requested:
        owners = [s for s in suites if t in s.tasks]
        if not owners:
            known = {s.name: list(s.tasks) for s in suites}
            raise ValueError(f"Unknown task {t!r} for suite={cfg.get('suite')}: known tasks are {known}.")
        plan += [(s, t) for s in owners]
    return plan, notes


def check_paths(cfg: DictConfig) -> None:
    """Fail fast on a missing checkpoint or data_dir, naming the fix; make data_dir absolute."""
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.get("checkpoint"):
        if not scores_files_only(cfg):
            raise ValueError("checkpoint=DIR is required (a Hugging Face causal-LM directory); only "
                             "`suite=translation translation.hypotheses=[FILE,...]` runs without one.")
        OmegaConf.update(cfg, "checkpoint", None, force_add=True)
        data_dir = cfg.get("data_dir")
        if data_dir:
            OmegaConf.update(cfg, "data_dir", str(Path(str(data_dir)).expanduser().resolve()), force_add=True)
        return
    ckpt = str(cfg.checkpoint)
    if not Path(ckpt).expanduser().is_dir() and (
        os.environ.get("HF_HUB_OFFLINE") == "1" or ckpt.startswith((".", "/", "~"))
    ):
        raise FileNotFoundError(f"checkpoint={ckpt!r} is not a directory. Pass the directory of a saved model.")
    data_dir = cfg.get("data_dir")
    if data_dir:
        path = Path(str(data_dir)).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"data_dir={data_dir!r} does not exist (cwd {os.getcwd()}). From the repository root the staged "
                "data is data_dir=../shared/data."
            )
        OmegaConf.update(cfg, "data_dir", str(path.resolve()), force_add=True)


def scores_files_only(cfg: DictConfig) -> bool:
    """Only external translation outputs are scored: no model is needed."""
    t = cfg.get("translation") or {}
    return cfg.get("suite") == "translation" and bool(t.get("hypotheses")) and not t.get("generate")


def _settings(cfg: DictConfig, suite: str) -> dict[str, Any]:
    s = {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg.get(k)) else cfg.get(k) for k in FINGERPRINT_KEYS}
    if s["checkpoint"] is not None:
        ckpt = Path(str(s["checkpoint"])).expanduser()
        s["checkpoint"] = str(ckpt.resolve()) if ckpt.exists() else str(s["checkpoint"])
    section = cfg.get(suite)
    s[suite] = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else section
    if isinstance(s[suite], dict):
        s[suite] = {k: v for k, v in s[suite].items() if k not in RUN_ONLY_KEYS.get(suite, ())}
    if str(cfg.get("position_mode") or "true") != "true":  # only a non-default value changes the fingerprint
        s["position_mode"] = str(cfg.position_mode)
    return s


def load_bundle(cfg: DictConfig) -> ModelBundle:
    """Load the checkpoint once, with its saved anchor settings (or ``anchors=ep|ac|none``)."""
    import torch

    from ..modeling import from_pretrained, get_anchor_config, prepare_model

    ckpt = str(cfg.checkpoint)
    path = Path(ckpt).expanduser()
    if cfg.get("num_threads"):
        # On a shared CPU, OpenMP threads that outnumber free cores spin against each other (we measured
        # 2 threads 12x slower than 1 under load): let the user pin the count.
        torch.set_num_threads(int(cfg.num_threads))
    device = str(cfg.get("device") or "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = str(cfg.get("dtype") or "auto")
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype_name)
    if dtype is None:
        raise ValueError(f"dtype={dtype_name!r}: choose auto, float32, bfloat16 or float16.")
    model, tok = from_pretrained(str(path) if path.is_dir() else ckpt, dtype=dtype)
    model.to(device).eval()
    saved = get_anchor_config(model)
    override = cfg.get("anchors")
    notes: list[str] = []
    source = "checkpoint" if saved is not None and saved.enabled else None
    if override not in (None, "none", "ep", "ac"):
        raise ValueError(f"anchors={override!r}: choose null (use the checkpoint's), ep, ac or none.")
    if override in ("ep", "ac"):
        if saved is not None and saved.enabled and saved.mode != override:
            raise ValueError(f"The checkpoint was trained with anchors={saved.mode!r}; anchors={override!r} contradicts it.")
        if saved is None or not saved.enabled:
            model, tok = prepare_model(model, tok, mode=override)
            model.to(device)
            source = "override"
            notes.append(
                f"anchors={override} applied to a model not trained with them: ansan/anchor rows are a mechanics "
                "check (anchor must equal ansan), not a quality result"
            )
    elif override == "none" and saved is not None and saved.enabled:
        model, tok = prepare_model(model, tok, mode="none")
        source = None
        notes.append("anchors=none: the checkpoint's anchor settings were ignored (full attention only)")
    cfg_now = get_anchor_config(model)
    anchor = cfg_now.to_dict() if cfg_now is not None and cfg_now.enabled else None
    if anchor is None:
        notes.append(f"{ckpt}: no anchor settings — evaluated as a full-attention model")
    return ModelBundle(model=model, tokenizer=tok, checkpoint=ckpt, device=device, anchor=anchor,
                       anchor_source=source, notes=notes)


def describe(bundle: ModelBundle | None, cfg: DictConfig) -> str:
    if bundle is None:
        return f"{cfg.checkpoint} (all tasks resumed from saved results; model not loaded)"
    if bundle.model is None:
        return "no model: external outputs scored with the suite's metrics"
    m = bundle.model
    n = sum(p.numel() for p in m.parameters())
    anchors = "none (full attention)" if not bundle.has_anchors else f"{bundle.anchor_mode.upper()} ({bundle.anchor_source})"
    return f"{type(m).__name__}, {n / 1e6:.1f}M parameters, {m.dtype}, {bundle.device}; anchors: {anchors}"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation described by ``cfg`` (see conf/evaluate.yaml); returns the run record.

    Everything up to the first task (config, paths, the output directory, loading the model) is the
    user's input: a problem there raises :class:`anllm.cli.InputError` naming it. Failures inside a
    task are recorded with that task and the others go on."""
    try:
        return _run(cfg)
    except _Preflight as e:
        raise InputError(str(e.__cause__ or e)) from e.__cause__


class _Preflight(Exception):
    """Wraps an error raised before any task ran (see :func:`run`)."""


def _preflight(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (ValueError, OSError, ImportError, KeyError) as e:
        raise _Preflight() from e


def _make_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".anllm_write_test").touch()
        (out / ".anllm_write_test").unlink()
    except OSError as e:
        raise OSError(f"output_dir={out} cannot be written ({e.strerror or e}); choose a writable directory "
                      "with output_dir=...") from None


def _load_model(cfg: DictConfig) -> ModelBundle:
    try:
        return load_bundle(cfg)
    except OSError as e:
        raise OSError(f"checkpoint={cfg.checkpoint} cannot be loaded as a Hugging Face model ({e}). Pass the "
                      "directory of a complete saved model (config.json + weights + tokenizer).") from None


def check_config(cfg: DictConfig) -> None:
    """Types, unknown keys and allowed values of the whole config (:mod:`anllm.schema.evaluate`)."""
    from ..schema import check_evaluate

    check_evaluate(cfg)


def preflight(cfg: DictConfig) -> tuple[list[tuple[Suite, str]], list[str]]:
    """Everything checked before anything is written or loaded (the config, the checkpoint and data
    paths, the suites' own checks); returns :func:`plan_tasks`. A problem raises :class:`InputError`."""
    try:
        return _preflight_all(cfg)
    except _Preflight as e:
        raise InputError(str(e.__cause__ or e)) from e.__cause__


def _preflight_all(cfg: DictConfig) -> tuple[list[tuple[Suite, str]], list[str]]:
    _preflight(check_config, cfg)
    _preflight(check_paths, cfg)
    return _preflight(plan_tasks, cfg)


def _run(cfg: DictConfig) -> dict[str, Any]:
    plan, notes = _preflight_all(cfg)
    out = Path(str(cfg.output_dir)).expanduser()
    _preflight(_make_output_dir, out)
    resume = bool(cfg.get("resume", True))
    saved: dict[tuple[str, str], dict[str, Any]] = {}
    for suite, task in plan:
        fp = report.fingerprint(_settings(cfg, suite.name))
        rec = report.load_task(report.task_file(out, suite.name, task))
        if resume and rec and rec.get("status") == "ok" and rec.get("fingerprint") == fp:
            saved[(suite.name, task)] = rec
    todo = [(s, t) for s, t in plan if (s.name, t) not in saved]
    if saved:
        log.info("resuming %d saved task(s): %s", len(saved), ", ".join(f"{s}/{t}" for s, t in saved))
    if todo and cfg.get("checkpoint") is None:  # external outputs only (translation.hypotheses)
        bundle = ModelBundle(model=None, tokenizer=None, checkpoint="(no model: external outputs)",
                             notes=["no checkpoint: only the given translation outputs were scored"])
    else:
        bundle = _preflight(_load_model, cfg) if todo else None
    records: dict[tuple[str, str], dict[str, Any]] = dict(saved)
    input_errors: list[str] = []
    for suite, task in tqdm(todo, desc="tasks", unit="task", disable=not todo):
        assert bundle is not None
        task_dir = out / "tasks" / suite.name / task
        task_dir.mkdir(parents=True, exist_ok=True)
        rec: dict[str, Any] = {"suite": suite.name, "task": task, "fingerprint": report.fingerprint(_settings(cfg, suite.name))}
        try:
            rows = suite.run_task(bundle, cfg, task, task_dir)
            rec.update(status="ok", rows=rows)
        except TaskInputError as e:  # partial rows kept and reported; the run then exits 2 (see below)
            log.error("task %s/%s incomplete: %s", suite.name, task, e)
            rec.update(status="incomplete", error=str(e), rows=e.rows)
            input_errors.append(f"{suite.name}/{task}: {e}")
        except Exception as e:  # one task's failure must not lose the others
            log.error("task %s/%s failed: %s", suite.name, task, e)
            rec.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                       rows=[{"suite": suite.name, "task": task, "method": "error", "error": f"{type(e).__name__}: {e}"}])
        rec["notes"] = list(bundle.notes)
        report.save_task(report.task_file(out, suite.name, task), rec)
        records[(suite.name, task)] = rec
    for rec in records.values():
        notes += rec.get("notes", [])
    rows = [r for s, t in plan for r in records[(s.name, t)]["rows"]]
    info = {
        "checkpoint": None if cfg.get("checkpoint") is None else str(cfg.checkpoint),
        "model_desc": describe(bundle, cfg),
        "anchor": None if bundle is None else bundle.anchor,
        "anchor_source": None if bundle is None else bundle.anchor_source,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "resumed": [f"{s}/{t}" for s, t in saved],
        "failed": [f"{s}/{t}" for (s, t), r in records.items() if r.get("status") != "ok"],
    }
    suites = list(dict.fromkeys(s.name for s, _ in plan))
    text = report.write_report(out, info, rows, suites, list(dict.fromkeys(notes)))
    print(text)
    print(f"Results: {out / 'results.md'} (JSON: results.json, CSV: results_*.csv)")
    if input_errors:  # after the other results are saved and reported
        raise InputError(f"{input_errors[0]} The other results are in {out / 'results.md'}; a re-run with the "
                         "same output_dir retries only what is missing.")
    return {**info, "rows": rows, "markdown": text}
