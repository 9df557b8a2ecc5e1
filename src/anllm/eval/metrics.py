"""Translation metrics: BLEU and chrF (sacrebleu, with signatures) and COMET-DA (unbabel-comet).

Why a module of its own: the same scoring path serves our generated outputs, external systems'
outputs (``translation.hypotheses=FILE``) and the test that reproduces WMT23's official scores, so
a number in our table means exactly what the official table means.

COMET is optional at run time: ``Unbabel/wmt22-comet-da`` needs the Hugging Face hub (or its local
cache), and a local checkpoint can be given instead. When neither loads, :func:`load_comet` raises
:class:`CometUnavailable` with a message that says why and how to fix it; callers report the other
metrics and that message.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

DEFAULT_COMET_MODEL = "Unbabel/wmt22-comet-da"


class CometUnavailable(RuntimeError):
    """No COMET model could be loaded (offline without a local checkpoint, bad path, ...)."""


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


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_comet_checkpoint(spec: str) -> Path:
    """A COMET ``model.ckpt`` from a local path (the file or its model directory) or a hub id.

    A model directory is what ``comet`` downloads: ``DIR/hparams.yaml`` + ``DIR/checkpoints/model.ckpt``.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if not (path.parents[1] / "hparams.yaml").is_file():
                raise CometUnavailable(
                    f"COMET checkpoint {path} has no hparams.yaml two levels up ({path.parents[1]}); "
                    "COMET expects DIR/hparams.yaml and DIR/checkpoints/model.ckpt."
                )
            return path
        ckpt = path / "checkpoints" / "model.ckpt"
        if ckpt.is_file() and (path / "hparams.yaml").is_file():
            return ckpt
        raise CometUnavailable(
            f"{path} is not a COMET model directory: expected {path}/hparams.yaml and "
            f"{path}/checkpoints/model.ckpt (the layout `comet` downloads)."
        )
    if spec.startswith((".", "/", "~")) or spec.endswith(".ckpt"):
        raise CometUnavailable(f"COMET checkpoint path {spec!r} does not exist.")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=spec, local_files_only=_hub_offline())
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


def load_comet(spec: str = DEFAULT_COMET_MODEL) -> Any:
    """Load a COMET model (hub id or local path); raises :class:`CometUnavailable` with the reason.

    The encoder named in the checkpoint's hparams (``pretrained_model``: a hub id such as
    ``xlm-roberta-large`` or a local directory) is read with ``local_files_only`` when the hub is
    offline, so an offline run never waits on the network.
    """
    ckpt = resolve_comet_checkpoint(spec)
    try:
        from comet import load_from_checkpoint

        return load_from_checkpoint(str(ckpt), local_files_only=_hub_offline() or Path(spec).exists())
    except Exception as e:
        raise CometUnavailable(
            f"COMET checkpoint {ckpt} could not be loaded ({type(e).__name__}: {e}). Its encoder "
            "(hparams.yaml `pretrained_model`) must be cached locally or be a local directory."
        ) from e


@dataclass
class CometScores:
    system: float  # x100, as the paper and WMT report it
    segments: list[float] = field(default_factory=list)  # raw (0..1 scale) per segment
    model: str = ""


def comet_scores(
    model: Any,
    srcs: Sequence[str],
    hyps: Sequence[str],
    refs: Sequence[str],
    *,
    batch_size: int = 8,
    gpus: int | None = None,
    progress_bar: bool = False,
    model_name: str = "",
) -> CometScores:
    """COMET-DA on aligned segments with a loaded model (see :func:`load_comet`)."""
    import torch

    _check_aligned(hyps, refs, srcs)
    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(srcs, hyps, refs)]
    out = model.predict(data, batch_size=batch_size, gpus=gpus, progress_bar=progress_bar)
    segs = [float(x) for x in out["scores"]]
    return CometScores(system=100.0 * sum(segs) / len(segs), segments=segs, model=model_name)


def score_translations(
    srcs: Sequence[str],
    hyps: Sequence[str],
    refs: Sequence[str],
    *,
    comet_model: str | None = DEFAULT_COMET_MODEL,
    comet: Any = None,
    comet_batch_size: int = 8,
) -> dict[str, Any]:
    """All translation metrics for one system: BLEU, chrF (+ signatures) and COMET when available.

    ``comet`` is an already loaded COMET model (load once, score many systems); otherwise
    ``comet_model`` is loaded here. ``comet_model=None`` skips COMET. The returned dict has
    ``comet=None`` and a ``comet_note`` saying why when COMET could not be computed.
    """
    result = sacrebleu_scores(hyps, refs).as_dict()
    result.update(comet=None, comet_model=comet_model, comet_note=None)
    if comet is None and comet_model:
        try:
            comet = load_comet(comet_model)
        except CometUnavailable as e:
            result["comet_note"] = f"COMET not computed: {e}"
            log.warning(result["comet_note"])
            return result
    if comet is None:
        result["comet_note"] = "COMET not computed: no COMET model configured."
        return result
    cs = comet_scores(comet, srcs, hyps, refs, batch_size=comet_batch_size, model_name=comet_model or "")
    result["comet"] = cs.system
    result["comet_segments"] = cs.segments
    return result
