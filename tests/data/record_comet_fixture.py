"""Record ``comet_tiny_fixture.json``: the tiny COMET model's scores computed IN-PROCESS (no subprocess).

Why: COMET moved to its own environment and is now scored through a subprocess
(``anllm.eval.comet_worker``); the test ``tests/test_comet_env.py`` checks that path against these
numbers, taken before the switch, to <= 1e-4. Run with a Python that has unbabel-comet 2.2.7 (it was
run in the pre-switch main environment, where anllm still scored COMET in-process, and then also
checks anllm's own in-process path gave the same numbers):

    .venv/bin/python tests/data/record_comet_fixture.py tests/data/comet_tiny_fixture.json
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BATCH_SIZE = 2  # 5 segments in 3 batches: batching and COMET's length sorting are part of the check


def _builder():
    spec = importlib.util.spec_from_file_location("comet_tiny_model", REPO / "tests" / "comet_tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main(out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    tiny = _builder()
    with tempfile.TemporaryDirectory() as tmp:
        root = tiny.build(Path(tmp) / "comet")
        from comet import load_from_checkpoint

        model = load_from_checkpoint(str(root / "checkpoints" / "model.ckpt"), local_files_only=True)
        pred = model.predict(tiny.SEGMENTS, batch_size=BATCH_SIZE, gpus=0, progress_bar=False)
        segments = [float(x) for x in pred["scores"]]
        via_anllm = None
        try:  # the pre-switch anllm path (in-process load_comet + comet_scores)
            from anllm.eval.metrics import score_translations

            res = score_translations([s["src"] for s in tiny.SEGMENTS], [s["mt"] for s in tiny.SEGMENTS],
                                     [s["ref"] for s in tiny.SEGMENTS], comet_model=str(root), comet_batch_size=BATCH_SIZE)
            via_anllm = {"system": res["comet"], "segments": res["comet_segments"]}
        except Exception as e:  # noqa: BLE001 - recorded, not fatal: the direct numbers are the fixture
            via_anllm = {"error": f"{type(e).__name__}: {e}"}
    versions = {p: metadata.version(p) for p in ("unbabel-comet", "torch", "transformers", "tokenizers",
                                                 "pytorch-lightning", "numpy", "huggingface-hub")}
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    record = {
        "segments_in": tiny.SEGMENTS,
        "batch_size": BATCH_SIZE,
        "segments": segments,
        "system": 100.0 * sum(segments) / len(segments),  # x100, as anllm reports COMET
        "via_anllm_in_process": via_anllm,
        "provenance": {
            "what": "in-process COMET (comet.load_from_checkpoint + model.predict, gpus=0) on the tiny model "
                    "built by tests/comet_tiny_model.py, before COMET moved to its own environment",
            "command": f"{sys.executable} {' '.join(sys.argv)}",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit,
            "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.system()}",
            "torch_threads": 1,
            "versions": versions,
        },
    }
    out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: record[k] for k in ("segments", "system", "via_anllm_in_process")}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "comet_tiny_fixture.json")
