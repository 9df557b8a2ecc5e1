"""The lossless anchor KV cache (:class:`AnchorCache`) and the layout tracking it shares with full caches.

* :mod:`.anchor_cache`: the ``transformers.Cache`` that keeps only what the AnSAN rule can still use;
* :mod:`.layer`: one layer's growable, in-place compacted key/value buffers;
* :mod:`.tracker`: :class:`LayoutTracker`, the token layout of a cache's contents.

(The dataset cache on disk is another thing: :mod:`anllm.data.store`.)
"""

from .anchor_cache import AnchorCache, PositionMode
from .layer import AnchorLayer
from .tracker import LayoutTracker

__all__ = ["AnchorCache", "AnchorLayer", "LayoutTracker", "PositionMode"]
