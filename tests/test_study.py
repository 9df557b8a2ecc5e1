"""The anchor-learning study end to end at toy scale (tiny model, 2 arms, 2 checkpoints, seconds):
report + summary written with every key, a second run skips finished work, evaluation reads only
held-out documents. Runtime: ~30 s."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from anllm.schema import compose
from anllm.study import Study

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("study")
    docs = tmp / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": " ".join(
        f"Sentence number {i} of document {d} is here and it is plain." for i in range(40))}) for d in range(8)))
    overrides = ["study=tiny", f"study.data.paths=[{docs}]", f"work_dir={tmp / 'work'}",
                 f"report_dir={tmp / 'report'}", f"data_dir={shared_data}"]
    results = Study(compose("study", overrides)).run()
    return tmp, overrides, results


def test_report_and_summary_have_every_key(study_run):
    tmp, _, _ = study_run
    s = json.loads((tmp / "report" / "summary.json").read_text())
    assert set(s["arms"]) == {"baseline", "ac"}
    for name, arm in s["arms"].items():
        assert arm["tokens"][0] == 0 and arm["tokens"] == sorted(arm["tokens"]) and len(arm["tokens"]) == 3
        methods = {"full", "streamingllm", "knorm"} | ({"anchor", "sentence"} if name == "ac" else set())
        assert set(arm["ppl"]) == methods
        assert all(len(v) == len(arm["tokens"]) for v in arm["ppl"].values())
    assert 0 < s["arms"]["ac"]["c_red"] < 1 and s["arms"]["ac"]["budget"] > 0
    assert set(s["recall"]["ac"]) == {"full", "anchor", "streamingllm"} and set(s["recall"]["baseline"]) == {"full", "streamingllm"}
    assert s["recall"]["ac"]["anchor"]["k"] == [0, 2]
    assert set(s["qa"]["ac"]["arc_easy"]) == {"anchor", "streamingllm"} and set(s["qa"]["baseline"]["arc_easy"]) == {"full"}
    assert s["chosen"] in s["sweep"] and set(s["sweep"]) == {"a", "b"}
    readme = (tmp / "report" / "README.md").read_text()
    for needle in ("learning_curves.png", "recall.png", "Sweep", "Long-range recall", "QA (0-shot)", s["command"]):
        assert needle in readme
    assert (tmp / "report" / "learning_curves.png").stat().st_size > 1000


def test_second_run_skips_finished_work(study_run, monkeypatch):
    tmp, overrides, first = study_run
    import anllm.train

    def no_training(cfg):  # noqa: ARG001
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(anllm.train, "run", no_training)
    before = json.loads((tmp / "report" / "timings.json").read_text())
    again = Study(compose("study", overrides)).run()
    assert json.loads((tmp / "report" / "timings.json").read_text()) == before  # nothing recomputed
    assert again.arms["ac"]["ppl"] == first.arms["ac"]["ppl"] and again.chosen == first.chosen


def test_recall_on_a_subset_of_arms(study_run):
    tmp, overrides, _ = study_run
    work = tmp / "subset"
    shutil.copytree(tmp / "work", work)  # the checkpoints, not the record: recall is measured again
    shutil.rmtree(work / "baseline" / "eval" / "recall")
    part = Study(compose("study", overrides + [f"work_dir={work}", f"report_dir={tmp / 'report-subset'}",
                                              "study.recall.arms=[ac]", "stages=[recall]"])).run()
    assert set(part.recall) == {"ac"} and not (work / "baseline" / "eval" / "recall").exists()


def test_a_resumed_study_reports_stages_it_has_not_reached_again(study_run):
    tmp, overrides, first = study_run
    Study(compose("study", overrides + ["stages=[sweep]"])).run()  # the report is rewritten after the sweep
    s = json.loads((tmp / "report" / "summary.json").read_text())
    assert s["arms"]["ac"]["ppl"] == first.arms["ac"]["ppl"] and set(s["recall"]) == set(first.recall)


def test_configured_arms_not_yet_run_keep_the_summary_shape(study_run):
    tmp, overrides, _ = study_run
    work = tmp / "pending"
    shutil.copytree(tmp / "work", work)
    shutil.copytree(tmp / "report", tmp / "report-pending")
    Study(compose("study", overrides + [f"work_dir={work}", f"report_dir={tmp / 'report-pending'}",
                                        "study.arms=[baseline,ac,ep,plain]", "+study.arm_specs.plain={exp:baseline,overrides:[]}",
                                        "stages=[qa]"])).run()
    s = json.loads((tmp / "report-pending" / "summary.json").read_text())
    assert s["arms"]["ep"]["status"] == "pending" and s["arms"]["ep"]["tokens"] == []
    assert set(s["arms"]["ep"]["ppl"]) >= {"full", "anchor", "sentence", "streamingllm"}
    # an arm without anchors (decided by its config, whatever its name) has no anchor readings
    assert s["arms"]["plain"]["status"] == "pending"
    assert "full" in s["arms"]["plain"]["ppl"] and not {"anchor", "sentence"} & set(s["arms"]["plain"]["ppl"])
    assert s["arms"]["ac"]["status"] == "done"
    assert "Not trained yet: AnLLM-EP" in (tmp / "report-pending" / "README.md").read_text()


def test_a_fresh_machine_resumes_from_the_committed_record(study_run, monkeypatch):
    """The record beside the report is enough: with every checkpoint lost, nothing is trained or evaluated again."""
    tmp, overrides, first = study_run
    import anllm.train
    from anllm.study.runner import Study as Runner

    def refuse(*args, **kwargs):  # noqa: ARG001
        raise AssertionError("a recorded stage was computed again")

    monkeypatch.setattr(anllm.train, "run", refuse)
    monkeypatch.setattr(Runner, "evaluate", refuse)
    shutil.copytree(tmp / "report", tmp / "report-fresh")
    again = Study(compose("study", overrides + [f"work_dir={tmp / 'fresh-machine'}", f"report_dir={tmp / 'report-fresh'}"])).run()
    assert again.arms == first.arms and again.recall == first.recall and again.qa == first.qa
    assert not (tmp / "fresh-machine").exists()


def test_a_lost_checkpoint_is_retrained_for_missing_stages_arm_by_arm(study_run, monkeypatch):
    """Recall missing for both arms on a fresh machine: each arm is retrained and probed before the next
    arm trains (a lost machine costs one arm's checkpoint), and the retrained arm reproduces its numbers."""
    tmp, overrides, first = study_run
    import anllm.train
    from anllm.study.runner import Study as Runner

    events: list[str] = []
    train_run, evaluate = anllm.train.run, Runner.evaluate

    def train(cfg):
        events.append(f"train {__import__('pathlib').Path(cfg.output_dir).name}")
        return train_run(cfg)

    def evaluate_logged(self, checkpoint, out_dir, ov, updates):
        events.append(f"eval {out_dir.parent.name}/{out_dir.name}")
        return evaluate(self, checkpoint, out_dir, ov, updates)

    monkeypatch.setattr(anllm.train, "run", train)
    monkeypatch.setattr(Runner, "evaluate", evaluate_logged)
    report = tmp / "report-lost"
    shutil.copytree(tmp / "report", report)
    record = json.loads((report / "results.json").read_text())
    for arm in ("baseline", "ac"):
        del record["recall"][arm]
        record["done"] = {k: v for k, v in record["done"].items() if not k.startswith(f"recall/{arm}/")}
    (report / "results.json").write_text(json.dumps(record))
    again = Study(compose("study", overrides + [f"work_dir={tmp / 'lost'}", f"report_dir={report}"])).run()
    assert events == ["train baseline", "eval recall/full", "eval recall/streamingllm",
                      "train ac", "eval recall/full", "eval recall/anchor", "eval recall/streamingllm"]
    for arm in ("baseline", "ac"):
        assert [(r["method"], r["distance"], r["acc"]) for r in again.recall[arm]] == \
            [(r["method"], r["distance"], r["acc"]) for r in first.recall[arm]]
    assert again.arms == first.arms and again.qa == first.qa


def test_a_machine_lost_inside_a_stage_keeps_its_finished_parts(study_run, monkeypatch):
    tmp, overrides, first = study_run
    import anllm.train
    from anllm.study.runner import Study as Runner

    events: list[str] = []
    train_run, evaluate = anllm.train.run, Runner.evaluate
    monkeypatch.setattr(anllm.train, "run", lambda cfg: (events.append("train"), train_run(cfg))[1])
    monkeypatch.setattr(Runner, "evaluate", lambda self, c, out_dir, ov, u: (events.append(out_dir.name), evaluate(self, c, out_dir, ov, u))[1])
    report = tmp / "report-half"
    shutil.copytree(tmp / "report", report)
    record = json.loads((report / "results.json").read_text())
    record["recall"]["ac"] = [r for r in record["recall"]["ac"] if r["method"] != "anchor"]  # the part that was running
    del record["done"]["recall/ac/anchor"]
    (report / "results.json").write_text(json.dumps(record))
    again = Study(compose("study", overrides + [f"work_dir={tmp / 'half'}", f"report_dir={report}"])).run()
    assert events == ["train", "anchor"]
    def untimed(rows):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]

    assert untimed(again.recall["ac"]) == untimed(first.recall["ac"])  # same rows, same order


def test_each_reading_of_a_part_is_what_it_is_beside_the_others(study_run):
    """Recall in parts (one reading each) equals one run of every reading: same items, same budgets."""
    tmp, overrides, first = study_run
    st = Study(compose("study", overrides))
    r = st.settings.recall
    rows = st.evaluate(tmp / "work" / "ac", tmp / "work" / "ac" / "eval" / "recall-joint", *st.recall_evaluation(list(r.methods)))
    def key(rs):
        return sorted((x["method"], x["distance"], x["acc"], x["c_red"], x["budget"]) for x in rs)

    assert key(rows) == key(first.recall["ac"])


def test_evaluation_reads_only_held_out_documents(study_run):
    from anllm.data import held_out_documents

    tmp, _, _ = study_run
    train_cfg = (tmp / "work" / "ac" / "anllm_train_config.yaml").read_text()
    assert "holdout_fraction: 0.25" in train_cfg
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(tmp / "work" / "ac" / "anllm_train_config.yaml").data)
    held = {d for d, _ in held_out_documents(data)}
    scored = json.loads((tmp / "work" / "ac" / "eval" / "step-4" / "tasks" / "ppl" / "holdout" / "documents.json").read_text())
    assert scored["full"] and {d["doc"] for d in scored["full"]} <= held


def test_bad_stage_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Unknown study stage"):
        Study(compose("study", ["study=tiny", "study.data.paths=[x.jsonl]", "stages=[sweep,train]",
                                f"work_dir={tmp_path}"]))


def test_an_arm_s_training_spec_composes_its_config_once(tmp_path, monkeypatch):
    """Every stage and part checks the record against the arm's training spec; the steps in it come
    from a Hydra compose of the training config, done once per run and reused."""
    from anllm.study.runner import Study as Runner

    st = Study(compose("study", ["study=tiny2", f"study.data.paths=[{tmp_path / 'docs.jsonl'}]",
                                 f"work_dir={tmp_path / 'work'}", f"report_dir={tmp_path / 'report'}"]))
    composed = []
    rows_per_step = Runner.rows_per_step
    monkeypatch.setattr(Runner, "rows_per_step", lambda self, exp, ov: (composed.append(exp), rows_per_step(self, exp, ov))[1])
    first = st.arm_spec("ac_sink")
    assert [st.arm_spec("ac_sink") for _ in range(3)] == [first] * 3 and len(composed) == 1
    other = st.arm_spec("baseline")
    assert len(composed) == 2 and other["exp"] == "baseline" and other["steps"] >= 1


def test_recall_verdict_needs_two_standard_errors():
    from anllm.study.findings import accuracy_verdict

    assert accuracy_verdict(0.27, 0.25, 200).startswith("no clear difference")  # EP's k >= 10 gap: noise at chance
    assert accuracy_verdict(0.60, 0.30, 200) == "anchors win"
    assert accuracy_verdict(0.30, 0.60, 200) == "anchors lose"
    assert accuracy_verdict(0.60, 0.30, 4).startswith("no clear difference")  # the same gap over 4 items proves nothing


@pytest.fixture(scope="module")
def evidence_run(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("study2")
    docs = tmp / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": " ".join(
        f"Sentence number {i} of document {d} is here and it is plain." for i in range(60))}) for d in range(8)))
    overrides = ["study=tiny2", f"study.data.paths=[{docs}]", f"work_dir={tmp / 'work'}",
                 f"report_dir={tmp / 'report'}", f"data_dir={shared_data}", "stages=[sweep,sweeps,arms,final,longrange]"]
    return tmp, Study(compose("study", overrides)).run()


def test_a_control_is_never_chosen_even_with_the_lowest_margin():
    from anllm.study.runner import choose

    done = {"l0.5": {"margin": 0.05}, "l0.25": {"margin": 0.02}, "l0": {"margin": -0.10, "control": True}}
    assert choose(done, {"l0.5": [], "l0.25": []}) == "l0.25"
    assert choose({**done, "stale": {"margin": -1.0}}, {"l0.5": [], "l0.25": []}) == "l0.25"  # not a candidate now


def test_the_best_arm_for_qa_has_the_lowest_margin_over_a_window_on_the_first_final_set():
    from anllm.study.runner import best_arm

    def rows(anchor, window):
        return [{"method": "full", "ppl": 10.0}, {"method": "anchor", "ppl": anchor},
                {"method": "streamingllm_q", "ppl": window}]

    final = {"a": {"l1024": rows(12.0, 11.0), "l4096": rows(30.0, 10.0)},  # margin +0.087 on the first set
             "b": {"l1024": rows(14.0, 14.5), "l4096": rows(9.0, 20.0)},  # -0.035: ahead of the window
             "baseline": {"l1024": [{"method": "full", "ppl": 9.0}, {"method": "streamingllm_q", "ppl": 9.5}]}}
    assert best_arm(final) == "b"
    assert best_arm({"baseline": final["baseline"]}) is None and best_arm({}) is None


def test_evidence_sweeps_pick_by_margin_and_arms_use_the_winners(evidence_run):
    """The option sweeps pick the lowest anchor − StreamingLLM(same keys per query) margin, and an arm
    that names a sweep trains with its winner (visible in the run's own saved config)."""
    tmp, results = evidence_run
    win = results.sweeps["window"]
    assert set(win) == {"w4", "w8"} and results.choices["window"] == min(win, key=lambda c: win[c]["margin"])
    for r in win.values():
        assert r["margin"] == pytest.approx(__import__("math").log(r["ppl_anchor"] / r["ppl_streamingllm_q"]))
    assert results.choices["distill"] == "l0.5"
    control = results.sweeps["distill"]["l0"]  # run and reported like a candidate, never chosen
    assert control["control"] is True and control["overrides"] == ["trainer.distill.weight=0"]
    assert "| l0 (control) |" in (tmp / "report" / "README.md").read_text()
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(tmp / "work" / "ac_sink_window_distill" / "anllm_train_config.yaml")
    assert cfg.anchor.window == int(results.choices["window"][1:]) and cfg.trainer.distill.weight == 0.5
    assert cfg.anchor.num_sink_tokens == 2
    base = OmegaConf.load(tmp / "work" / "baseline" / "anllm_train_config.yaml")
    assert base.anchor.window == 0 and base.trainer.distill.weight == 0
    s = json.loads((tmp / "report" / "summary.json").read_text())
    assert s["arms"]["ac_sink_window_distill"]["distill"]["weight"] == 0.5


def test_best_in_a_stage_s_arms_is_the_arm_with_the_lowest_margin_measured_after_every_final_set(evidence_run, monkeypatch):
    from anllm.study.runner import Study as Runner, best_arm

    tmp, results = evidence_run
    probed: list[str] = []
    evaluate = Runner.evaluate

    def evaluate_logged(self, checkpoint, out_dir, ov, updates):
        probed.append(out_dir.parent.parent.parent.name)
        return evaluate(self, checkpoint, out_dir, ov, updates)

    monkeypatch.setattr(Runner, "evaluate", evaluate_logged)
    shutil.copytree(tmp / "report", tmp / "report-best")
    overrides = ["study=tiny2", f"study.data.paths=[{tmp / 'docs.jsonl'}]", f"work_dir={tmp / 'work'}",
                 f"report_dir={tmp / 'report-best'}", "stages=[sweeps,arms,final,recall]", "study.recall.arms=[best]",
                 "study.recall.num_items=2", "study.recall.methods=[anchor,full]"]
    again = Study(compose("study", overrides)).run()
    assert best_arm(results.final) == "ac_sink_window_distill"  # the only arm with anchor readings
    assert set(probed) == {"ac_sink_window_distill"} and set(again.recall) == {"ac_sink_window_distill"}
    # parts run (and are recorded) in the configured order; the report lists methods in its own order
    assert [r["method"] for r in again.recall["ac_sink_window_distill"]][::2] == ["anchor", "full"]
    s = json.loads((tmp / "report-best" / "summary.json").read_text())
    assert list(s["recall"]["ac_sink_window_distill"]) == ["full", "anchor"]


def test_evidence_final_sets_and_longrange_reach_the_report(evidence_run):
    tmp, results = evidence_run
    s = json.loads((tmp / "report" / "summary.json").read_text())
    rows = s["final"]["ac_sink_window_distill"]["l64"]
    assert s["final_sets"] == {"l64": {"max_tokens": 64, "num_documents": 2, "tail_from": 32}}
    assert set(rows) == {"full", "anchor", "sentence", "streamingllm", "streamingllm_q"}
    assert len(rows["anchor"]["per_doc_nll"]) == 2 and rows["anchor"]["ppl_tail"] is not None
    assert rows["streamingllm_q"]["mean_kv"] == pytest.approx(rows["anchor"]["mean_kv"])
    assert rows["streamingllm"]["peak_kv"] == pytest.approx(rows["anchor"]["peak_kv"])  # equal peak
    assert rows["streamingllm"]["mean_kv"] > rows["anchor"]["mean_kv"]
    assert set(s["final"]["baseline"]["l64"]) == {"full", "streamingllm", "streamingllm_q"}  # no anchor readings
    # the set's offset bins: every method's NLL by tokens after the last anchor, adding up to its PPL
    for m, r in rows.items():
        assert r["offset_bins"] == [1, 2, 5], m
        nll = sum(x * n for x, n in zip(r["offset_nll"], r["offset_tokens"]) if n) / sum(r["offset_tokens"])
        assert nll == pytest.approx(math.log(r["ppl"]), abs=1e-6), m
    assert rows["anchor"].get("offset_dnll_vs_anchor") is None and len(rows["full"]["offset_dnll_se"]) == 3
    lr = s["longrange"]["ac_sink_window_distill"]["passkey"]
    assert set(lr) == {"full", "anchor", "streamingllm", "streamingllm_q"} and lr["anchor"][0]["n"] == 2
    readme = (tmp / "report" / "README.md").read_text()
    for needle in ("# Evidence II (toy)", "Sweep: window", "(chosen)", "equal cache (final checkpoints)",
                   "Long-range tasks", "log-PPL(StreamingLLM, same keys per query) − log-PPL(anchor)",
                   "Where in a sentence the readings part", "offset 2–4"):
        assert needle in readme, needle


def test_paired_difference_and_its_standard_error_by_hand():
    from anllm.study.findings import paired_difference

    rows = {"anchor": {"per_doc_nll": [1.0, 2.0, 3.0]}, "streamingllm_q": {"per_doc_nll": [1.2, 2.1, 3.3]}}
    m, se = paired_difference(rows, "streamingllm_q")
    assert m == pytest.approx(0.2) and se == pytest.approx((((0.0) ** 2 + 0.1 ** 2 + 0.1 ** 2) / 2 / 3) ** 0.5)


def _lever_summary():
    """Four AC arms (no lever, window, distillation, both), the baseline, and an AC arm with other overrides."""
    def arm(exp, uses, own=("anchor.num_sink_tokens=4",)):
        return {"exp": exp, "uses": list(uses), "own_overrides": list(own)}

    def rows(anchor, window_q, window_peak):
        return {"anchor": {"per_doc_nll": anchor}, "streamingllm_q": {"per_doc_nll": window_q},
                "streamingllm": {"per_doc_nll": window_peak}}

    arms = {"ac_sink": arm("anllm_ac", []), "ac_sink_window": arm("anllm_ac", ["window"]),
            "ac_sink_distill": arm("anllm_ac", ["distill"]), "ac_sink_window_distill": arm("anllm_ac", ["window", "distill"]),
            "baseline": arm("baseline", [], ()), "ac": arm("anllm_ac", ["window"], ("anchor.num_sink_tokens=2",)),
            "ac_sink_distill_self": arm("anllm_ac", ["distill"], ("anchor.num_sink_tokens=4", "trainer.distill.teacher=self"))}
    final = {
        "ac_sink": {"l1024": rows([3.0, 3.2, 3.4], [2.9, 3.0, 3.3], [2.8, 3.0, 3.2]), "l4096": rows([3.0, 3.0], [2.9, 2.9], [2.8, 2.8])},
        "ac_sink_window": {"l1024": rows([2.9, 3.0, 3.3], [2.88, 3.0, 3.26], [2.85, 2.95, 3.25])},
        "ac_sink_distill": {"l1024": rows([2.95, 3.1, 3.4], [2.9, 3.0, 3.3], [2.8, 3.0, 3.2])},
        "ac_sink_window_distill": {"l1024": rows([2.9, 3.0, 3.3], [2.9, 3.0, 3.3], [2.9, 3.0, 3.3])},
        "baseline": {"l1024": rows([2.5, 2.6, 2.7], [2.6, 2.7, 2.8], [2.6, 2.7, 2.8])},
        "ac": {"l1024": rows([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0])},
        "ac_sink_distill_self": {"l1024": rows([2.9, 3.0, 3.2], [2.9, 3.0, 3.3], [2.8, 3.0, 3.2])},
    }
    return {"arms": arms, "final": final}


def test_lever_effects_pair_arms_that_differ_by_one_lever_over_the_same_documents():
    from anllm.study.findings import lever_effects

    effects = {(e["lever"], e["without"], e["with"], e["set"]): e for e in lever_effects(_lever_summary())}
    # one arm adds levers (sweeps it uses, overrides of its own) to the other, same exp; l4096 only where both
    # arms have it (ac_sink alone: no pair); not the baseline (another exp), not `ac` (an override with another
    # value), not distill -> window (one lever swapped for another), not self-distillation -> window + distill
    assert set(effects) == {("window", "ac_sink", "ac_sink_window", "l1024"), ("distill", "ac_sink", "ac_sink_distill", "l1024"),
                            ("distill", "ac_sink_window", "ac_sink_window_distill", "l1024"),
                            ("window", "ac_sink_distill", "ac_sink_window_distill", "l1024"),
                            ("window + distill", "ac_sink", "ac_sink_window_distill", "l1024"),
                            ("distill + trainer.distill.teacher=self", "ac_sink", "ac_sink_distill_self", "l1024"),
                            ("trainer.distill.teacher=self", "ac_sink_distill", "ac_sink_distill_self", "l1024")}
    teacher = effects[("trainer.distill.teacher=self", "ac_sink_distill", "ac_sink_distill_self", "l1024")]
    assert teacher["anchor"][0] == pytest.approx((-0.05 - 0.1 - 0.2) / 3)
    both = effects[("window + distill", "ac_sink", "ac_sink_window_distill", "l1024")]
    assert both["anchor"][0] == pytest.approx((-0.1 - 0.2 - 0.1) / 3)
    w = effects[("window", "ac_sink", "ac_sink_window", "l1024")]
    anchor = [2.9 - 3.0, 3.0 - 3.2, 3.3 - 3.4]  # with - without, per document
    margin_q = [(2.88 - 2.9) - (2.9 - 3.0), (3.0 - 3.0) - (3.0 - 3.2), (3.26 - 3.3) - (3.3 - 3.4)]
    margin_peak = [(2.85 - 2.9) - (2.8 - 3.0), (2.95 - 3.0) - (3.0 - 3.2), (3.25 - 3.3) - (3.2 - 3.4)]
    window_q = [2.88 - 2.9, 3.0 - 3.0, 3.26 - 3.3]  # the window reading itself: a margin moves when either side does
    for got, diffs in ((w["anchor"], anchor), (w["streamingllm_q"], window_q), (w["margin_streamingllm_q"], margin_q),
                       (w["margin_streamingllm"], margin_peak)):
        mean = sum(diffs) / 3
        se = (sum((d - mean) ** 2 for d in diffs) / 2 / 3) ** 0.5
        assert got == pytest.approx((mean, se))
    # a set whose document counts differ cannot be paired: no number rather than a wrong one
    s = _lever_summary()
    s["final"]["ac_sink_distill"]["l1024"]["streamingllm_q"]["per_doc_nll"] = [2.9, 3.0]
    d = {(e["lever"], e["with"]): e for e in lever_effects(s)}[("distill", "ac_sink_distill")]
    assert d["margin_streamingllm_q"] is None and d["streamingllm_q"] is None and d["anchor"] is not None
    assert "full" not in d  # a reading one arm lacks: no entry


def test_a_curve_finding_names_both_equal_cache_definitions():
    from anllm.study.findings import findings

    arm = {"tokens": [0, 10], "ppl": {"full": [30.0, 30.0], "anchor": [40.0, 38.3], "streamingllm": [35.0, 34.1],
                                      "streamingllm_q": [45.0, 38.8]}}
    facts = findings({"arms": {"ac_sink_distill": arm}, "recall": {}, "final": {}, "longrange": {}})
    line = next(f for f in facts if "anchor PPL 38.30" in f)
    assert "worse than StreamingLLM at the same cache (34.10)" in line and "better than" in line and "(38.80;" in line


def test_the_report_names_which_lever_moved_what():
    from anllm.study.findings import lever_findings
    from anllm.study.markdown import levers_md
    from anllm.study.titles import arm_title

    s = _lever_summary()
    table = "\n".join(levers_md(s))
    assert "### Which lever moved what" in table
    # window, ac_sink -> ac_sink_window: anchor -0.1/-0.2/-0.1 nats (better past 2 s.e.); margin +0.08/+0.2/+0.06
    row = next(line for line in table.splitlines() if line.startswith(f"| window | {arm_title('ac_sink')} → "))
    assert "-13.3% ± 3.3 (better)" in row and "+11.3% ± 4.4 (towards the anchors)" in row
    assert row.split(" | ")[4] == "-2.0% ± 1.2 (no clear change)"  # the window reading, same documents
    facts = [f for f in lever_findings(s) if f.startswith("distill (")]
    assert len(facts) == 2 and all("margin over" in f for f in facts)


def test_the_report_says_which_final_sets_read_past_the_training_block():
    from anllm.study.findings import evidence_findings, lever_findings
    from anllm.study.markdown import final_md

    s = _lever_summary()
    s["block_size"] = 1024
    s["final_sets"] = {"l1024": {"max_tokens": 1024, "num_documents": 3, "tail_from": None},
                       "l4096": {"max_tokens": 4096, "num_documents": 2, "tail_from": 3000}}
    s["final"]["ac_sink_distill"]["l4096"] = s["final"]["ac_sink"]["l4096"]
    for sets in s["final"].values():
        for rows in sets.values():
            for r in rows.values():
                r.update(ppl=10.0, per_doc_nll_tail=r["per_doc_nll"])
    text = "\n".join(final_md(s))
    assert "so l4096 (4,096 tokens) measures how the trained cache extrapolates" in text and "l1024 (" not in text
    assert "| PPL after position 3,000 |" in text  # the configured tail start, not a fixed 2,048
    facts = evidence_findings(s) + lever_findings(s)
    assert any(f.startswith("AC + sinks + distillation, l4096 (4× the 1,024-token training block) after position 3,000:")
               for f in facts)
    assert any("(AnLLM-AC + 4 sinks → AC + sinks + distillation), l4096 (4× the 1,024-token training block):" in f for f in facts)
    assert not any("l1024 (" in f for f in facts)
    # a summary without the sets' lengths (written before they were recorded) keeps the plain names
    del s["final_sets"]
    assert "extrapolates" not in "\n".join(final_md(s)) and "| PPL of the tail |" in "\n".join(final_md(s))


def test_long_range_parts_equal_one_run_of_every_reading(evidence_run):
    tmp, results = evidence_run
    overrides = ["study=tiny2", f"study.data.paths=[{tmp / 'docs.jsonl'}]", f"work_dir={tmp / 'work'}",
                 f"report_dir={tmp / 'report'}"]
    st = Study(compose("study", overrides))
    lr = st.settings.longrange
    out = tmp / "work" / "ac_sink_window_distill"
    rows = st.evaluate(out, out / "eval" / "longrange-joint", *st.longrange_evaluation("passkey", list(lr.methods)))

    def key(rs):
        return sorted((x["task"], x["method"], x["length"], x.get("depth"), x["acc"], x.get("budget")) for x in rs)

    assert {r["part"] for r in results.longrange["ac_sink_window_distill"]} == {f"passkey/{m}" for m in lr.methods}
    assert key(rows) == key(results.longrange["ac_sink_window_distill"])
