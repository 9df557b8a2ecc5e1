"""Sentence splitting for AnLLM-AC: blingfire vs pysbd on real English text, single process.

`<AC>` goes after every sentence of the pretraining/SFT text, so the splitter runs over the whole
corpus once per data preparation. This measures, on ~2 MB of the shared ``pretrain_text`` (a mix of
Gutenberg books, Wikipedia, ABC and Lee news, presidential speeches; whole documents):

* throughput (sentences/s, chars/s) of blingfire's C splitter alone (``text_to_sentences``), with
  offsets (``text_to_sentences_and_offsets``: its byte-to-character offset mapping is a Python loop),
  and ``anllm.sentence_spans`` (per line) for blingfire and pysbd; then ``anllm.insert_anchor_token``
  end to end, and, for scale, the SmolLM2 tokenizer on the marked text;
* agreement of the two splitters (sentence ends found by both / by one only) on a subset;
* heuristic error candidates of each splitter (a "sentence" starting in lower case = likely false
  split; ". Capitalised" inside a sentence after a non-abbreviation = likely missed split), with
  examples;
* that blingfire's offsets are character offsets (not UTF-8 byte offsets) on every non-ASCII line of
  the corpus and of the German WMT sources (umlauts, „curly“ quotes);
* that `<AC>` never falls inside a SmolLM2 token (tokens of the text are unchanged around it).

pysbd is run on a subset (``--pysbd-chars``) because it is much slower.

    .venv/bin/python bench/bench_splitter.py                   # 2 MB, pysbd on 300 kB
    .venv/bin/python bench/bench_splitter.py --chars 500000 --pysbd-chars 100000 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, machine_info, median, print_table, time_side_by_side, write_results  # noqa: E402

import blingfire  # noqa: E402

from anllm.anchors import AC_TOKEN, insert_anchor_token, sentence_spans  # noqa: E402

SOURCES = [
    "gutenberg_books.jsonl",
    "wikipedia_enwiki_sample.jsonl",
    "abc_news_nltk.jsonl",
    "us_presidential_speeches_nltk.jsonl",
    "lee_background_news.jsonl",
]
GERMAN = ["wmt23_de_en/generaltest2023.de-en.src.de", "newstest_de_en/newstest2020.de-en.de"]
ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "col", "capt", "lt", "sgt", "gov", "rev",
    "hon", "vs", "etc", "no", "co", "inc", "ltd", "corp", "mt", "ft", "jan", "feb", "mar", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "e.g", "i.e", "a.m", "p.m", "fig", "vol",
}
_MISSED = re.compile(r"(\S+)([.!?][\"'”’)\]]*)\s+[\"“'‘(]?[A-Z][a-z]")


def load_corpus(chars: int) -> tuple[list[str], dict[str, int]]:
    """Whole documents, round-robin over the sources, until ``chars`` characters."""
    readers = {name: open(SHARED_DATA / "pretrain_text" / name, encoding="utf-8") for name in SOURCES}
    docs: list[str] = []
    per_source = {name: 0 for name in SOURCES}
    total = 0
    try:
        while total < chars and readers:
            for name in list(readers):
                line = readers[name].readline()
                if not line:
                    readers.pop(name).close()
                    continue
                text = json.loads(line)["text"]
                docs.append(text)
                per_source[name] += len(text)
                total += len(text)
                if total >= chars:
                    break
    finally:
        for fh in readers.values():
            fh.close()
    return docs, per_source


def prefix(docs: list[str], chars: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if total >= chars:
            break
        out.append(d)
        total += len(d)
    return out


def count_sentences(docs: list[str], splitter: str) -> int:
    return sum(len(sentence_spans(d, splitter)) for d in docs)  # type: ignore[arg-type]


# --- quality checks --------------------------------------------------------------------------------


def suspicious(docs: list[str], splitter: str, limit: int = 8) -> dict[str, Any]:
    """Heuristic error candidates (not ground truth): false splits and missed splits."""
    false_splits, missed = [], []
    n_false = n_missed = n_sent = 0
    for d in docs:
        spans = sentence_spans(d, splitter)  # type: ignore[arg-type]
        n_sent += len(spans)
        for (ps, pe), (s, e) in zip(spans, spans[1:]):
            same_line = "\n" not in d[pe:s]
            if same_line and d[s].islower():
                n_false += 1
                if len(false_splits) < limit:
                    false_splits.append(d[max(ps, pe - 90):pe] + " ‖ " + d[s:min(e, s + 60)])
        for s, e in spans:
            for m in _MISSED.finditer(d, s, e):
                word = m.group(1).lower().strip("\"'“‘(").rstrip(".")
                if word in ABBREVIATIONS or len(word) <= 1 or "." in word:
                    continue  # initials, abbreviations, dotted names
                if m.end(2) >= e:
                    continue
                n_missed += 1
                if len(missed) < limit:
                    missed.append(d[max(s, m.start() - 60):min(e, m.end() + 40)])
    per_k = (lambda n: round(1000 * n / max(n_sent, 1), 1))
    return {
        "sentences": n_sent,
        "false_split_candidates": n_false,
        "false_split_per_1k_sentences": per_k(n_false),
        "missed_split_candidates": n_missed,
        "missed_split_per_1k_sentences": per_k(n_missed),
        "false_split_examples": false_splits,
        "missed_split_examples": missed,
    }


def agreement(docs: list[str]) -> dict[str, int]:
    """Sentence ends (character positions) found by both splitters or by one only."""
    both = only_b = only_p = 0
    for d in docs:
        b = {e for _, e in sentence_spans(d, "blingfire")}
        p = {e for _, e in sentence_spans(d, "pysbd")}
        both += len(b & p)
        only_b += len(b - p)
        only_p += len(p - b)
    return {"both": both, "blingfire_only": only_b, "pysbd_only": only_p}


def offsets_are_characters() -> dict[str, Any]:
    """Every blingfire span, sliced from the str, must equal the sentence blingfire printed."""
    lines: list[str] = []
    for name in SOURCES:
        with open(SHARED_DATA / "pretrain_text" / name, encoding="utf-8") as fh:
            for row in fh:
                lines += [ln for ln in json.loads(row)["text"].splitlines() if ln.strip() and not ln.isascii()]
    for name in GERMAN:
        path = SHARED_DATA / name
        if path.is_file():
            lines += [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.isascii()]
    bad, examples = 0, []
    for ln in lines:
        out, offsets = blingfire.text_to_sentences_and_offsets(ln)
        sents = out.split("\n") if out else []
        got = [ln[s:e] for s, e in offsets]
        if got != sents:
            bad += 1
            if len(examples) < 3:
                examples.append({"line": ln[:200], "blingfire": sents[:3], "sliced": got[:3]})
    multibyte = sum(len(ln.encode()) != len(ln) for ln in lines)
    return {"non_ascii_lines": len(lines), "multibyte_lines": multibyte, "mismatches": bad, "examples": examples}


def ac_inside_token(docs: list[str], tokenizer: Any, splitter: str) -> int:
    """Documents where inserting `<AC>` changes the text's own tokens (it cut a merged token)."""
    ac = tokenizer.convert_tokens_to_ids(AC_TOKEN)
    bad = 0
    for d in docs:
        marked = tokenizer.encode(insert_anchor_token(d, splitter=splitter), add_special_tokens=False)
        bad += [i for i in marked if i != ac] != tokenizer.encode(d, add_special_tokens=False)
    return bad


def smollm2_tokenizer_with_ac() -> Any | None:
    try:
        from transformers import AutoTokenizer

        from anllm.models.smollm2 import smollm2_path

        tok = AutoTokenizer.from_pretrained(smollm2_path())
    except Exception as err:  # the bench still runs without the model
        print(f"(SmolLM2 tokenizer unavailable, skipping tokenizer rows: {err})")
        return None
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(AC_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.model_max_length = 10**9  # whole documents; we only count tokens
    return tok


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=2_000_000, help="corpus size for the fast candidates")
    ap.add_argument("--pysbd-chars", type=int, default=300_000, help="subset for pysbd (slow)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    machine = machine_info()
    docs, per_source = load_corpus(args.chars)
    sub = prefix(docs, args.pysbd_chars)
    n_chars, sub_chars = sum(map(len, docs)), sum(map(len, sub))
    print(f"corpus: {len(docs)} documents, {n_chars:,} chars; pysbd subset: {len(sub)} documents, {sub_chars:,} chars")

    tok = smollm2_tokenizer_with_ac()
    marked = [insert_anchor_token(d) for d in docs]

    fast: dict[str, Callable[[], Any]] = {
        "blingfire text_to_sentences (C only)": lambda: [blingfire.text_to_sentences(d) for d in docs],
        "blingfire text_to_sentences_and_offsets": lambda: [blingfire.text_to_sentences_and_offsets(d) for d in docs],
        "anllm.sentence_spans blingfire": lambda: [sentence_spans(d, "blingfire") for d in docs],
        "anllm.insert_anchor_token blingfire": lambda: [insert_anchor_token(d, splitter="blingfire") for d in docs],
    }
    if tok is not None:
        fast["SmolLM2 tokenizer on marked text"] = lambda: tok(marked, add_special_tokens=False)
    times = time_side_by_side(fast, warmup=1, repeat=args.repeat)

    slow: dict[str, Callable[[], Any]] = {
        "anllm.sentence_spans blingfire": lambda: [sentence_spans(d, "blingfire") for d in sub],
        "anllm.sentence_spans pysbd": lambda: [sentence_spans(d, "pysbd") for d in sub],
        "anllm.insert_anchor_token pysbd": lambda: [insert_anchor_token(d, splitter="pysbd") for d in sub],
    }
    sub_times = time_side_by_side(slow, warmup=0, repeat=1)

    n_sent = {"blingfire": count_sentences(docs, "blingfire")}
    n_sent_sub = {"blingfire": count_sentences(sub, "blingfire"), "pysbd": count_sentences(sub, "pysbd")}
    rows, results = [], []
    for name, ts in [*times.items(), *((k + " [subset]", v) for k, v in sub_times.items())]:
        on_sub = name.endswith("[subset]")
        splitter = "pysbd" if "pysbd" in name else "blingfire"
        sents = (n_sent_sub if on_sub else n_sent)[splitter]
        chars = sub_chars if on_sub else n_chars
        sec = median(ts)
        row = {
            "candidate": name,
            "chars": chars,
            "sentences": sents,
            "seconds": sec,
            "sentences_per_s": sents / sec,
            "chars_per_s": chars / sec,
            "mb_per_s": chars / sec / 1e6,
        }
        if "tokenizer" in name:
            row["tokens"] = sum(len(x) for x in tok(marked, add_special_tokens=False)["input_ids"])
            row["tokens_per_s"] = row["tokens"] / sec
        results.append(row)
        rows.append([name, chars, sents, sec, row["sentences_per_s"], row["chars_per_s"] / 1e3])
    print_table(
        "Sentence splitting, single process (median of repeats; subset rows are one run)",
        ["candidate", "chars", "sentences", "s", "sentences/s", "kchars/s"],
        rows,
    )
    bf = median(sub_times["anllm.sentence_spans blingfire"])
    ps = median(sub_times["anllm.sentence_spans pysbd"])
    print(f"\npysbd is {ps / bf:.0f}x slower than blingfire (anllm.sentence_spans, same subset)")

    agree = agreement(sub)
    print(f"\nagreement on the subset (sentence ends): {agree}")
    quality = {sp: suspicious(sub, sp) for sp in ("blingfire", "pysbd")}
    for sp, q in quality.items():
        print(f"\n{sp}: {q['false_split_candidates']} false-split and {q['missed_split_candidates']} "
              f"missed-split candidates in {q['sentences']} sentences (heuristic)")
        for ex in q["false_split_examples"][:3]:
            print(f"   false split?  {ex!r}")
        for ex in q["missed_split_examples"][:3]:
            print(f"   missed split? {ex!r}")

    offsets = offsets_are_characters()
    print(f"\nblingfire offsets on {offsets['non_ascii_lines']:,} non-ASCII lines "
          f"({offsets['multibyte_lines']:,} with multi-byte UTF-8): {offsets['mismatches']} mismatches "
          "-> character offsets" if offsets["mismatches"] == 0 else f"\nOFFSET MISMATCHES: {offsets}")

    inside = None
    if tok is not None:
        inside = {sp: ac_inside_token(sub, tok, sp) for sp in ("blingfire", "pysbd")}
        print(f"\ndocuments where <AC> cut a SmolLM2 token (of {len(sub)}): {inside}")

    write_results(
        "splitter",
        machine,
        {
            "corpus": {"documents": len(docs), "chars": n_chars, "chars_per_source": per_source,
                       "pysbd_subset_documents": len(sub), "pysbd_subset_chars": sub_chars},
            "results": results,
            "pysbd_slowdown_vs_blingfire": ps / bf,
            "agreement_on_subset": agree,
            "heuristic_errors_on_subset": quality,
            "blingfire_offsets": offsets,
            "ac_cuts_a_token_documents": inside,
            "versions": {"blingfire": _version("blingfire"), "pysbd": _version("pysbd")},
        },
    )


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
