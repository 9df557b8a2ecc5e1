"""anllm: Anchor-based LLMs (AnSAN attention, a lossless anchor KV cache, training and evaluation)."""

from .anchors import AC_TOKEN, AnchorConfig, anchor_mask, insert_anchor_token, sentence_spans
from .cache import AnchorCache
from .masks import AnsanOptions, ansan_mask
from .modeling import anchor_attention, from_pretrained, get_anchor_config, is_anchor_aware, prepare_model

__version__ = "0.1.0"

__all__ = [
    "AC_TOKEN",
    "AnchorCache",
    "AnchorConfig",
    "AnsanOptions",
    "anchor_attention",
    "anchor_mask",
    "ansan_mask",
    "from_pretrained",
    "get_anchor_config",
    "insert_anchor_token",
    "is_anchor_aware",
    "prepare_model",
    "sentence_spans",
]

from . import schema as _schema  # noqa: E402,F401 - registers the config schemas with Hydra's ConfigStore
