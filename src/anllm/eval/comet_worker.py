"""COMET scoring inside COMET's own environment: run by path with ``.venv-comet/bin/python``.

Why a separate process: unbabel-comet 2.2.7 pins numpy<2, transformers<5 and huggingface-hub<1, so it
lives in its own environment (``make install`` makes it from ``comet/requirements.txt``), where anllm
is not installed. anllm (:mod:`anllm.eval.metrics`) writes the segments to a file, runs this script
and reads the scores back. It imports only the standard library and comet (with what comet brings).

    .venv-comet/bin/python src/anllm/eval/comet_worker.py --model MODEL --input segments.jsonl \\
        --output scores.json [--batch-size 8] [--device cpu|cuda|cuda:N|mps] [--cache-dir DIR] \\
        [--local-files-only] [--num-threads N]

MODEL: a COMET checkpoint (``DIR/checkpoints/model.ckpt``), its model directory (``DIR/hparams.yaml``
+ ``DIR/checkpoints/``) or a hub id such as ``Unbabel/wmt22-comet-da`` (downloaded into ``--cache-dir``,
or the Hugging Face cache). Input: JSON Lines, one ``{"src", "mt", "ref"}`` object per segment with an
optional ``"system"`` name (several systems are scored in one pass, the model loaded once), or one
JSON list of such objects. Output (JSON)::

    {"systems": {NAME: {"scores": [per segment, 0..1], "system_score": their mean, "n": ...}},
     "model": CHECKPOINT, "device": ..., "batch_size": ..., "versions": {...}, "seconds": ...}

On failure the output holds ``{"error": ONE LINE, "kind": KIND}`` and the exit code says which:
3 = ``env`` (comet cannot be imported, or the device asked for is not in this environment's torch:
the environment must be (re)made), 4 = ``model`` (the model cannot be found or loaded), 5 = ``input``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

EXIT_ENV, EXIT_MODEL, EXIT_INPUT = 3, 4, 5
KINDS = {EXIT_ENV: "env", EXIT_MODEL: "model", EXIT_INPUT: "input"}


class WorkerError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_segments(path: Path) -> list[dict[str, str]]:
    """JSON Lines (one object per segment) or one JSON list; every segment has src, mt and ref."""
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise WorkerError(EXIT_INPUT, f"{path}: not JSON Lines nor a JSON list ({e})") from None
    if not rows:
        raise WorkerError(EXIT_INPUT, f"{path}: no segments to score")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in ("src", "mt", "ref")):
            raise WorkerError(EXIT_INPUT, f"{path}: segment {i} needs string fields src, mt and ref")
    return rows


def resolve_checkpoint(spec: str, cache_dir: str | None, local_files_only: bool) -> Path:
    """A checkpoint file from a checkpoint path, a model directory or a hub id."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        ckpt = path / "checkpoints" / "model.ckpt"
        if ckpt.is_file():
            return ckpt
        raise WorkerError(EXIT_MODEL, f"{path} is not a COMET model directory (no checkpoints/model.ckpt)")
    if spec.startswith((".", "/", "~")) or spec.endswith(".ckpt"):
        raise WorkerError(EXIT_MODEL, f"COMET checkpoint path {spec!r} does not exist")
    from comet import download_model

    try:
        return Path(download_model(spec, saving_directory=cache_dir, local_files_only=local_files_only))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, no cache: one line for the parent
        raise WorkerError(EXIT_MODEL, f"COMET model {spec!r} could not be downloaded or found in the cache "
                                      f"({type(e).__name__}: {e})") from None


def predict_args(device: str) -> dict[str, Any]:
    """COMET's ``predict`` arguments for a torch device string (cuda:N runs on GPU N, not on GPU 0)."""
    import torch

    if device == "cpu":
        return {"gpus": 0}
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise WorkerError(EXIT_ENV, "device=mps, but this environment's torch has no MPS")
        return {"gpus": 1, "accelerator": "mps"}
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise WorkerError(EXIT_INPUT, f"device={device!r}: use cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        raise WorkerError(EXIT_ENV, f"device={device}, but this environment's torch ({torch.__version__}) sees no "
                                    "CUDA GPU: install the same CUDA build of torch as the main environment")
    n = int(index or 0)
    if n >= torch.cuda.device_count():
        raise WorkerError(EXIT_INPUT, f"device={device}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return {"gpus": 1, "devices": [n], "accelerator": "gpu"}


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("unbabel-comet", "torch", "transformers", "numpy", "pytorch-lightning"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def score(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    rows = read_segments(Path(args.input))
    if args.cache_dir:  # the encoder named in the checkpoint's hparams is read through the hub cache too
        os.environ["HF_HUB_CACHE"] = str(Path(args.cache_dir).expanduser())
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):  # "GPU available: ..." chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import comet  # noqa: F401 - the environment's health check
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means this environment is broken
        raise WorkerError(EXIT_ENV, f"cannot import comet in {sys.executable} ({type(e).__name__}: {e})") from None
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    how = predict_args(args.device)
    ckpt = resolve_checkpoint(args.model, args.cache_dir, args.local_files_only)
    try:
        from comet import load_from_checkpoint

        model = load_from_checkpoint(str(ckpt), local_files_only=args.local_files_only)
    except Exception as e:  # noqa: BLE001
        raise WorkerError(EXIT_MODEL, f"COMET checkpoint {ckpt} could not be loaded ({type(e).__name__}: {e}); its "
                                      "encoder (hparams.yaml `pretrained_model`) must be cached or a local directory") from None
    data = [{"src": r["src"], "mt": r["mt"], "ref": r["ref"]} for r in rows]
    pred = model.predict(data, batch_size=args.batch_size, progress_bar=False, **how)
    scores = [float(x) for x in pred["scores"]]
    systems: dict[str, list[float]] = {}
    for row, s in zip(rows, scores):
        systems.setdefault(str(row.get("system", "")), []).append(s)
    return {
        "systems": {name: {"scores": segs, "system_score": sum(segs) / len(segs), "n": len(segs)}
                    for name, segs in systems.items()},
        "model": str(ckpt),
        "device": args.device,
        "batch_size": args.batch_size,
        "versions": versions(),
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Score src/mt/ref segments with COMET (run in COMET's own environment).")
    p.add_argument("--model", required=True, help="COMET checkpoint, model directory or hub id")
    p.add_argument("--input", required=True, help="JSON Lines (or a JSON list) of {src, mt, ref[, system]}")
    p.add_argument("--output", required=True, help="where the JSON result (or error) is written")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--cache-dir", default=None, help="Hugging Face hub cache (default: HF_HUB_CACHE / HF_HOME)")
    p.add_argument("--local-files-only", action="store_true", help="never reach the hub (offline)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    out = Path(args.output)
    try:
        result, code = score(args), 0
    except WorkerError as e:
        message = " ".join(str(e).split())  # one line
        result, code = {"error": message, "kind": KINDS[e.code], "versions": versions()}, e.code
        print(f"comet_worker: error: {message}", file=sys.stderr)
    out.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
