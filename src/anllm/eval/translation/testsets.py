"""The translation test sets (WMT De→En under ``data_dir``, or sacrebleu's copy) and line files:
external systems' hypotheses (``translation.hypotheses``) read in, ours written out, one segment a line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

# task -> (source file, reference file) relative to data_dir; sacrebleu test set name when online.
TASKS: dict[str, tuple[str, str, str]] = {
    "wmt23_de_en": (
        "wmt23_de_en/generaltest2023.de-en.src.de",
        "wmt23_de_en/generaltest2023.de-en.ref.refA.en",
        "wmt23",
    ),
    "wmt22_de_en": ("wmt22_de_en/wmttest2022.de-en.de", "wmt22_de_en/wmttest2022.de-en.en", "wmt22"),
}


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n")


def load_test_set(task: str, data_dir: str | Path | None, limit: int | None = None) -> tuple[list[str], list[str]]:
    """Sources and references of ``task``, from ``data_dir`` (or sacrebleu's copy when it is None)."""
    if task not in TASKS:
        raise ValueError(f"Unknown translation task {task!r}: choose one of {sorted(TASKS)}.")
    src_rel, ref_rel, sacrebleu_name = TASKS[task]
    if data_dir is None:
        try:
            from sacrebleu.utils import get_reference_files, get_source_file

            src_path = Path(get_source_file(sacrebleu_name, "de-en"))
            ref_path = Path(get_reference_files(sacrebleu_name, "de-en")[0])
        except Exception as e:
            raise FileNotFoundError(
                f"No data_dir given and sacrebleu could not fetch {sacrebleu_name} de-en ({type(e).__name__}: "
                f"{e}). Pass data_dir=../shared/data (it holds {src_rel})."
            ) from e
    else:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"data_dir {root} does not exist. Pass data_dir=../shared/data (relative to the repo) or the "
                "absolute path of the shared data directory."
            )
        src_path, ref_path = root / src_rel, root / ref_rel
        for p in (src_path, ref_path):
            if not p.is_file():
                raise FileNotFoundError(f"{task}: {p} not found under data_dir {root} (expected {src_rel} and {ref_rel}).")
    srcs, refs = read_lines(src_path), read_lines(ref_path)
    if len(srcs) != len(refs):
        raise ValueError(f"{task}: {src_path} has {len(srcs)} lines but {ref_path} has {len(refs)}.")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of segments, got {limit}.")
        srcs, refs = srcs[:limit], refs[:limit]
    return srcs, refs


def hypothesis_files(spec: Any) -> list[Path]:
    """``translation.hypotheses``: one path or a list (or a comma-separated string)."""
    if spec is None or spec == "":
        return []
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[Path] = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                p = Path(part.strip()).expanduser()
                if not p.is_file():
                    raise FileNotFoundError(f"translation.hypotheses: {p} does not exist (one hypothesis per line).")
                paths.append(p)
    return paths


def system_name(path: Path) -> str:
    """A table label for an external system file: WMT's ``*.hyp.<SYSTEM>.<lang>`` gives SYSTEM."""
    name = path.name
    if ".hyp." in name:
        return name.split(".hyp.", 1)[1].rsplit(".", 1)[0]
    return path.stem


def load_hypotheses(path: Path, n_expected: int, n_total: int | None = None) -> list[str]:
    """Lines of ``path``: exactly the test set's length, cut to ``limit`` when one is set."""
    lines = read_lines(path)
    if len(lines) < n_expected or (n_total is not None and len(lines) not in (n_total, n_expected)):
        raise ValueError(
            f"{path} has {len(lines)} lines but the test set has {n_total or n_expected} segments: a "
            "hypothesis file needs one line per source segment, in order."
        )
    return lines[:n_expected]


def write_lines(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")
