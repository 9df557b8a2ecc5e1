"""Anchor density on the shared prose: tokens per anchor for each way of marking anchors.

AC: ``<AC>`` inserted by each splitter (ours: blingfire / pysbd, glued after every sentence; the
authors: Punkt, ``" <AC> ".join(sentences)``); EP: our rule (every punctuation-only token ending in
``.!?``) vs the authors' ``"."`` only. Tokens = SmolLM2 tokens of the marked text (anchors included),
so "tokens per anchor" is the mean segment length and bounds the anchor cache's reduction:
C⇓ ≈ 1 − 1 / (tokens per anchor) over a long text.

    .venv/bin/python bench/anchor_density.py [--chars 2000000] [--pysbd-chars 300000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_results  # noqa: E402
from bench_splitter import load_corpus, prefix  # noqa: E402

from anllm.anchors import AC_TOKEN, Marking, ep_anchor_ids, ep_token_ids  # noqa: E402

MARKINGS = {
    "AC ours (blingfire, <AC> glued, also after the last)": Marking(AC_TOKEN, "blingfire"),
    "AC ours with pysbd": Marking(AC_TOKEN, "pysbd"),
    "AC ours with punkt": Marking(AC_TOKEN, "punkt"),
    "AC paper (punkt, ' <AC> '.join, none after the last)": Marking(AC_TOKEN, "punkt", False, " <AC> "),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=2_000_000)
    ap.add_argument("--pysbd-chars", type=int, default=300_000)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from anllm.models.smollm2 import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path(), model_max_length=10**9)
    tok.add_special_tokens({"additional_special_tokens": [AC_TOKEN]}, replace_additional_special_tokens=False)
    ac_id = tok.convert_tokens_to_ids(AC_TOKEN)
    docs, per_source = load_corpus(args.chars)
    sub = prefix(docs, args.pysbd_chars)
    rows, results = [], []
    for name, marking in MARKINGS.items():
        corpus = sub if marking.splitter == "pysbd" else docs
        ids = [tok(marking.apply(d), add_special_tokens=False)["input_ids"] for d in corpus]
        tokens, anchors = sum(map(len, ids)), sum(x.count(ac_id) for x in ids)
        results.append({"marking": name, "chars": sum(map(len, corpus)), "tokens": tokens, "anchors": anchors,
                        "tokens_per_anchor": tokens / anchors})
    for name, anchor_ids in (("EP ours (punctuation-only tokens ending in .!?)", ep_anchor_ids(tok)),
                             ("EP paper ('.' only)", ep_token_ids(tok, ["."]))):
        ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
        s = set(anchor_ids)
        tokens, anchors = sum(map(len, ids)), sum(1 for x in ids for t in x if t in s)
        results.append({"marking": name, "anchor_ids": len(anchor_ids), "chars": sum(map(len, docs)), "tokens": tokens,
                        "anchors": anchors, "tokens_per_anchor": tokens / anchors})
    for r in results:
        rows.append([r["marking"], r["chars"], r["tokens"], r["anchors"], r["tokens_per_anchor"], 1 - 1 / r["tokens_per_anchor"]])
    print_table("Anchor density on the shared prose (SmolLM2 tokens)",
                ["marking", "chars", "tokens", "anchors", "tokens/anchor", "C⇓ bound"], rows)
    write_results("anchor_density", machine_info(), {"settings": vars(args), "corpus_chars_per_source": per_source,
                                                     "results": results})


if __name__ == "__main__":
    main()
