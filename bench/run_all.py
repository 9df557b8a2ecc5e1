"""Run the three engine benchmarks (mask, training step, generation) and summarise their goals.

Each benchmark runs in its own process and writes ``bench/results/<name>.json``. Default sizes
finish in under ~10 minutes on a quiet 2-core CPU; ``--big`` runs the larger sizes.

    .venv/bin/python bench/run_all.py                 # what `make bench` runs
    .venv/bin/python bench/run_all.py --big           # longer contexts, more repeats
    .venv/bin/python bench/run_all.py --quick         # smoke run (~1 min, numbers meaningless)
    .venv/bin/python bench/run_all.py --only mask generate --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name: (script, default args, --big args, --quick args)
BENCHES = {
    "mask": (
        "bench_mask.py",
        "",
        "--lengths 1024 4096 8192 16384 --repeat 9",
        "--lengths 256 512 --repeat 2",
    ),
    "train": (
        "bench_train_step.py",
        "",
        "--repeat 5 --adamw --reference-models tiny smollm2",
        "--models tiny --lengths 256 --repeat 2",
    ),
    "generate": (
        "bench_generate.py",
        "--grid 1x2048 1x4096 8x2048 --prompts equal --new-tokens 64",
        "",  # the script's own default: the full grid, equal and ragged prompts, 128 new tokens
        "--grid 1x256 --prompts equal --new-tokens 8",
    ),
}


def summary() -> None:
    """The goals of the issue, read back from the JSON results."""
    print("\n=== Summary (ratios measured side by side in one process) ===")
    mask = _load("bench_mask")
    if mask:
        L = max(r["length"] for r in mask["results"])
        for r in mask["results"]:
            if r["length"] == L and not r["candidate"].startswith(("authors", "ref:")):
                keys = [k for k in r if k.startswith("speedup_vs_authors_")]
                ratios = ", ".join(
                    f"{r[k]:.1f}x vs {k.removeprefix('speedup_vs_authors_')}" for k in keys
                )
                print(f"mask L={L}: {r['candidate']}: {ratios}  (goal >= 50x)")
    train = _load("bench_train_step")
    if train:
        for r in train["results"]:
            if r["mode"] == "ansan":
                print(
                    f"train {r['model']} ({r['attn_implementation']}) L={r['length']}: mask "
                    f"{r['mask_build_ms']:.0f} ms = {100 * r['mask_share_of_step']:.1f}% of the AnSAN step; AnSAN "
                    f"{r['tokens_per_s']:.0f} tok/s = {r['ratio_vs_causal']:.2f}x causal"
                )
        print(f"train flex_attention: {train['flex_attention']}")
    gen = _load("bench_generate")
    if gen:
        for r in gen["results"]:
            print(
                f"generate {r['model']} {r['prompts']} B={r['batch']} prompt={r['prompt_tokens']}: vs the best plain "
                f"full cache: prefill {r['prefill_speedup_vs_best_full']:.2f}x, decode {r['decode_speedup_vs_best_full']:.2f}x, "
                f"end-to-end {r['end_to_end_speedup_vs_best_full']:.2f}x, identical tokens: {r['identical_tokens']}"
            )
            if not r["identical_tokens"]:
                print(f"GENERATION MISMATCH: {r['prompts']} B={r['batch']} prompt={r['prompt_tokens']}")


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--big", action="store_true", help="larger sizes, more repeats (tens of minutes)"
    )
    size.add_argument(
        "--quick", action="store_true", help="tiny sizes, tiny model only: a smoke run"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args()
    t_all = time.perf_counter()
    failed = []
    for key in args.only:
        script, default, big, quick = BENCHES[key]
        extra = big if args.big else quick if args.quick else default
        cmd = [sys.executable, str(HERE / script), *extra.split()]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"\n### {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"### {script}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(script)
    summary()
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
