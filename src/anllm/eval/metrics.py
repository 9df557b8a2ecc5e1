"""Translation metrics: BLEU and chrF (sacrebleu, with signatures) and COMET-DA (unbabel-comet).

Why a module of its own: the same scoring path serves our generated outputs, external systems'
outputs (``translation.hypotheses=FILE``) and the test that reproduces WMT23's official scores, so
a number in our table means exactly what the official table means.

COMET runs in its own environment (``.venv-comet``, made by ``make install``): unbabel-comet 2.2.7
pins numpy<2, transformers<5 and huggingface-hub<1, which this environment (numpy 2, kvpress) does
not take. :func:`comet_score_systems` writes the segments to a file, runs
``anllm/eval/comet_worker.py`` with that environment's Python (:func:`find_comet_python`) and reads
the scores back; the numbers equal the in-process ones of before the switch
(``tests/data/comet_tiny_fixture.json``). Two failures differ: a COMET *model* that cannot be loaded
(offline without a cache, a bad path) raises :class:`CometUnavailable`, reported as a note beside
the other metrics; a missing or broken COMET *environment* raises :class:`CometEnvError`, which
``evaluate.py`` reports, after saving the other metrics, as a one-line error naming ``make install``
(exit code 2).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

DEFAULT_COMET_MODEL = "Unbabel/wmt22-comet-da"


@dataclass
class SacreBleuScores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "bleu": self.bleu,
            "chrf": self.chrf,
            "bleu_signature": self.bleu_signature,
            "chrf_signature": self.chrf_signature,
            "n": self.n,
        }


def _check_aligned(hyps: Sequence[str], refs: Sequence[str], srcs: Sequence[str] | None = None) -> None:
    if len(hyps) != len(refs):
        raise ValueError(
            f"{len(hyps)} hypotheses but {len(refs)} references: they must be line-aligned "
            "(one segment per line; check for a missing trailing segment or an extra blank line)."
        )
    if srcs is not None and len(srcs) != len(refs):
        raise ValueError(f"{len(srcs)} sources but {len(refs)} references: they must be line-aligned.")
    if not refs:
        raise ValueError("No segments to score.")


def sacrebleu_scores(hyps: Sequence[str], refs: Sequence[str]) -> SacreBleuScores:
    """Corpus BLEU (13a, exp smoothing) and chrF2 with sacrebleu's defaults, as WMT reports them."""
    from sacrebleu.metrics import BLEU, CHRF

    _check_aligned(hyps, refs)
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(list(hyps), [list(refs)])
    c = chrf.corpus_score(list(hyps), [list(refs)])
    return SacreBleuScores(
        bleu=float(b.score),
        chrf=float(c.score),
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        n=len(refs),
    )


# ---- COMET -----------------------------------------------------------------------------------

COMET_PYTHON_ENV = "ANLLM_COMET_PYTHON"
WORKER = Path(__file__).with_name("comet_worker.py")
REPO = Path(__file__).resolve().parents[3]  # src/anllm/eval/metrics.py -> the repository (editable install)
DEFAULT_COMET_PYTHON = REPO / ".venv-comet" / "bin" / "python"
INSTALL_HINT = (
    "COMET (unbabel-comet 2.2.7, which pins numpy<2) runs in its own environment: create it with "
    "`make install` (or only it: `make install-comet`), or point translation.comet_python or "
    f"${COMET_PYTHON_ENV} at the Python of an environment with comet/requirements.txt; "
    "translation.comet_model=null skips COMET"
)


class CometUnavailable(RuntimeError):
    """No COMET model could be loaded (offline without a local checkpoint, bad path, ...)."""


class CometEnvError(RuntimeError):
    """COMET's own environment is missing or broken: the user's setup, fixed by ``make install``.

    ``rows``/``result`` carry what was computed without COMET, so that it is still saved and reported."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.result: dict[str, Any] | None = None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def find_comet_python(configured: str | os.PathLike[str] | None = None) -> Path:
    """The COMET environment's interpreter: ``configured`` (``translation.comet_python``), else
    ``$ANLLM_COMET_PYTHON``, else ``<repo>/.venv-comet/bin/python``; raises :class:`CometEnvError`
    naming ``make install`` when it is not there."""
    if configured:
        where, path = "translation.comet_python", Path(str(configured)).expanduser()
    elif os.environ.get(COMET_PYTHON_ENV):
        where, path = f"${COMET_PYTHON_ENV}", Path(os.environ[COMET_PYTHON_ENV]).expanduser()
    else:
        where, path = "the default", DEFAULT_COMET_PYTHON
    if not path.is_file() or not os.access(path, os.X_OK):
        raise CometEnvError(f"COMET environment not found: {path} ({where}) is not an executable Python. {INSTALL_HINT}.")
    return path.absolute()  # not resolve(): a venv's python is a symlink whose target ignores the venv


def comet_device(device: str | None = None) -> str:
    """Where COMET runs: the run's ``device`` (``cuda:N`` is GPU N, not GPU 0); ``auto``/None is the
    first GPU when this process has one, else the CPU."""
    device = str(device or "auto")
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_comet_checkpoint(spec: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A COMET ``model.ckpt`` from a local path (the file or its model directory) or a hub id.

    A model directory is what ``comet`` downloads: ``DIR/hparams.yaml`` + ``DIR/checkpoints/model.ckpt``.
    A hub id is looked up in ``cache_dir`` (default: the Hugging Face cache) and downloaded unless
    ``HF_HUB_OFFLINE=1``. Checked here, before COMET's environment starts, so a bad path costs nothing.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if not (path.parents[1] / "hparams.yaml").is_file():
                raise CometUnavailable(
                    f"COMET checkpoint {path} has no hparams.yaml two levels up ({path.parents[1]}); "
                    "COMET expects DIR/hparams.yaml and DIR/checkpoints/model.ckpt."
                )
            return path.absolute()
        ckpt = path / "checkpoints" / "model.ckpt"
        if ckpt.is_file() and (path / "hparams.yaml").is_file():
            return ckpt.absolute()
        raise CometUnavailable(
            f"{path} is not a COMET model directory: expected {path}/hparams.yaml and "
            f"{path}/checkpoints/model.ckpt (the layout `comet` downloads)."
        )
    if spec.startswith((".", "/", "~")) or spec.endswith(".ckpt"):
        raise CometUnavailable(f"COMET checkpoint path {spec!r} does not exist.")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=spec, cache_dir=cache_dir, local_files_only=_hub_offline())
    except Exception as e:  # offline, unknown id, no cache, ...
        raise CometUnavailable(
            f"COMET model {spec!r} could not be loaded from the Hugging Face hub or its local cache "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Run online once to cache it, "
            "or pass translation.comet_model=PATH to a local COMET model directory "
            "(DIR/hparams.yaml + DIR/checkpoints/model.ckpt)."
        ) from e
    ckpt = Path(local) / "checkpoints" / "model.ckpt"
    if not ckpt.is_file():
        raise CometUnavailable(f"The hub snapshot of {spec!r} at {local} has no checkpoints/model.ckpt.")
    return ckpt


@dataclass
class CometScores:
    system: float  # x100, as the paper and WMT report it
    segments: list[float] = field(default_factory=list)  # raw (0..1 scale) per segment
    model: str = ""


Segments = tuple[Sequence[str], Sequence[str], Sequence[str]]  # (sources, hypotheses, references)


def comet_score_systems(
    systems: Mapping[str, Segments],
    model: str,
    *,
    batch_size: int = 8,
    device: str | None = None,
    python: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    num_threads: int | None = None,
    model_name: str = "",
) -> dict[str, CometScores]:
    """COMET-DA for several systems in one run of COMET's environment (the model is loaded once).

    ``model``: a hub id or local path (checked first, :func:`resolve_comet_checkpoint`); ``python``:
    see :func:`find_comet_python`; ``device``: see :func:`comet_device`. Raises
    :class:`CometUnavailable` (the model) or :class:`CometEnvError` (the environment)."""
    for srcs, hyps, refs in systems.values():
        _check_aligned(hyps, refs, srcs)
    interpreter = find_comet_python(python)
    ckpt = resolve_comet_checkpoint(model, cache_dir)
    local_only = _hub_offline() or Path(model).expanduser().exists()
    with tempfile.TemporaryDirectory(prefix="anllm-comet-") as tmp:
        seg_file, out_file = Path(tmp) / "segments.jsonl", Path(tmp) / "scores.json"
        with open(seg_file, "w", encoding="utf-8") as f:
            for name, (srcs, hyps, refs) in systems.items():
                for s, h, r in zip(srcs, hyps, refs):
                    f.write(json.dumps({"system": name, "src": s, "mt": h, "ref": r}, ensure_ascii=False) + "\n")
        cmd = [str(interpreter), "-I", str(WORKER), "--model", str(ckpt), "--input", str(seg_file),
               "--output", str(out_file), "--batch-size", str(batch_size), "--device", comet_device(device)]
        if cache_dir:
            cmd += ["--cache-dir", str(Path(cache_dir).expanduser())]
        if local_only:
            cmd.append("--local-files-only")
        if num_threads:
            cmd += ["--num-threads", str(num_threads)]
        log.info("COMET: %d segments of %d system(s) through %s", sum(len(v[0]) for v in systems.values()),
                 len(systems), interpreter)
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        except OSError as e:
            raise CometEnvError(f"COMET environment broken: {interpreter} cannot run ({e.strerror or e}). "
                                f"{INSTALL_HINT}.") from None
        out = json.loads(out_file.read_text(encoding="utf-8")) if out_file.is_file() else None
    tail = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "")
    if out is None or proc.returncode != 0:
        error = (out or {}).get("error") or f"exit code {proc.returncode}: {tail or 'no message'}"
        kind = (out or {}).get("kind")
        if kind == "model":
            raise CometUnavailable(f"{error}.")
        if kind == "env" or (out is None and proc.returncode > 0):
            raise CometEnvError(f"COMET environment broken ({interpreter}): {error}. {INSTALL_HINT}.")
        raise RuntimeError(f"COMET worker failed ({interpreter}): {error}")
    scores = {}
    for name in systems:
        segs = [float(x) for x in out["systems"][name]["scores"]]
        scores[name] = CometScores(system=100.0 * sum(segs) / len(segs), segments=segs, model=model_name or model)
    return scores


def score_translations(
    srcs: Sequence[str],
    hyps: Sequence[str],
    refs: Sequence[str],
    *,
    comet_model: str | None = DEFAULT_COMET_MODEL,
    comet_batch_size: int = 8,
    comet_python: str | os.PathLike[str] | None = None,
    device: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """All translation metrics for one system: BLEU, chrF (+ signatures) and COMET when available.

    ``comet_model=None`` skips COMET. The returned dict has ``comet=None`` and a ``comet_note`` saying
    why when the COMET model could not be loaded. A missing or broken COMET environment raises
    :class:`CometEnvError` with the other metrics in its ``result``.
    """
    result = sacrebleu_scores(hyps, refs).as_dict()
    result.update(comet=None, comet_model=comet_model, comet_note=None)
    if not comet_model:
        result["comet_note"] = "COMET not computed: no COMET model configured."
        return result
    try:
        cs = comet_score_systems({"": (srcs, hyps, refs)}, comet_model, batch_size=comet_batch_size,
                                 device=device, python=comet_python, cache_dir=cache_dir)[""]
    except CometUnavailable as e:
        result["comet_note"] = f"COMET not computed: {e}"
        log.warning(result["comet_note"])
        return result
    except CometEnvError as e:
        result["comet_note"] = f"COMET not computed: {e}"
        e.result = result
        raise
    result["comet"] = cs.system
    result["comet_segments"] = cs.segments
    return result
