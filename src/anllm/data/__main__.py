"""Build training data from the command line.

Build the cache entry a training run will load, ahead of it (e.g. in a CPU job; see
:mod:`anllm.train.prebuild`), with the same Hydra overrides as ``train.py``::

    ANLLM_CACHE=/scratch/$USER/anllm python -m anllm.data build +exp=anllm_ac model=llama2_7b \\
        data=redpajama_local preprocessing.num_proc=32

Or build (or load) a dataset from flags and print its DataStats as JSON, handy for checking a data
config and for measuring preprocessing throughput, e.g.::

    python -m anllm.data --kind jsonl --paths '../shared/data/pretrain_text/*.jsonl' \\
        --tokenizer "$(python -m anllm.models.smollm2)" --mode ac --block-size 2048 --num-proc 2 --fresh
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from ..anchors import AC_TOKEN, AnchorConfig, ep_anchor_ids


def anchor_for_tokenizer(tokenizer, mode: str) -> AnchorConfig | None:
    """The anchor config ``prepare_model`` would make, without a model (adds ``<AC>`` to the tokenizer)."""
    if mode == "ac":
        from tokenizers import AddedToken

        if AC_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(AC_TOKEN, special=True, normalized=False)], special_tokens=True)
        return AnchorConfig(mode="ac", anchor_token=AC_TOKEN, anchor_token_ids=[tokenizer.convert_tokens_to_ids(AC_TOKEN)])
    if mode == "ep":
        return AnchorConfig(mode="ep", anchor_token_ids=ep_anchor_ids(tokenizer))
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv and argv[0] == "build":
        from ..train import prebuild

        if any(a in ("-h", "--help") for a in argv[1:]):
            print(prebuild.__doc__)
            return
        from ..cli import InputError, check_group_choices, fail
        from ..train import ConfigError

        program = "python -m anllm.data build"
        try:
            check_group_choices(argv[1:], ("exp", "scale", "model", "data", "deepspeed", "launcher", "protocol"))
            code = prebuild.main(argv[1:])
        except (ConfigError, InputError) as e:  # a config mistake: one clear line, exit code 2 (as train.py)
            fail(program, str(e), kind="config error")
        raise SystemExit(code)

    from . import build_train_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="demo", choices=["jsonl", "demo", "sft"])
    p.add_argument("--paths", nargs="*", default=[], help="jsonl files or globs")
    p.add_argument("--alpaca-path")
    p.add_argument("--parallel-path")
    p.add_argument("--max-documents", type=int)
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or name")
    p.add_argument("--mode", default="ac", choices=["ac", "ep", "none"])
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="default: a temporary directory (always rebuilds)")
    p.add_argument("--fresh", action="store_true", help="build in a temporary cache (measures a full build)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    anchor = anchor_for_tokenizer(tok, args.mode)
    cfg = {"kind": args.kind, "packing": not args.no_packing}
    if args.kind == "jsonl":
        cfg["paths"] = args.paths
    if args.kind == "sft":
        cfg.update({k: v for k, v in (("alpaca_path", args.alpaca_path), ("parallel_path", args.parallel_path)) if v})
    if args.max_documents is not None:
        cfg["max_documents" if args.kind != "sft" else "max_examples"] = args.max_documents
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) if args.fresh or args.cache_dir is None else Path(args.cache_dir)
        _, stats = build_train_dataset(cfg, tok, anchor, args.block_size, cache, num_proc=args.num_proc)
        print(json.dumps(stats.to_dict(), indent=2))


if __name__ == "__main__":
    main()
