"""Instruments for tests and benchmarks: tiny random models and tokenizers (CPU, seconds), and a
counter of host reads (how often code waits for the device)."""

from __future__ import annotations

import collections
import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .models.tiny import tiny_llama  # noqa: F401 - re-exported: tests build tiny models from here


SPECIAL_WORDS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer whose ids tests can write by hand: 0-3 are
    ``<pad> <s> </s> <unk>``, then ``words`` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL_WORDS + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def bpe_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE trained in memory on ``texts`` (pad=0, bos=1, eos=2, like ``tiny_llama``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# --- host reads ------------------------------------------------------------------------------------

# Python-level reads of a tensor's value (torch.nonzero is wrapped too)
_PY_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "cpu", "numpy")
# ATen ops that read a value from the device inside C++ (an output size, a scalar, a comparison)
_SYNC_OPS = {"aten::nonzero", "aten::masked_select", "aten::_local_scalar_dense", "aten::unique_dim",
             "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::equal", "aten::is_nonzero",
             "aten::allclose"}
_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def _on(t: Any, device_type: str | None) -> bool:
    return isinstance(t, torch.Tensor) and (device_type is None or t.device.type == device_type)


def _implicit_read(func: Any, args: tuple, kwargs: dict | None, device_type: str | None) -> bool:
    name = func._schema.name
    if not (args and _on(args[0], device_type)):
        return False
    if name in _SYNC_OPS:
        return True
    if name in _INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):  # x[mask]: nonzero inside
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if name == "aten::repeat_interleave":  # without output_size the result's size is read
        return (kwargs or {}).get("output_size") is None
    return False


@contextlib.contextmanager
def count_host_reads(device_type: str | None = None) -> Iterator[collections.Counter]:
    """Count the host reads made inside the block, by kind: Python-level reads (``int(t)``, ``t.item()``,
    ``tolist``, ``bool(t)``, ``nonzero``, ``.cpu()``...) by wrapping the ``Tensor`` methods, and reads
    made inside ATen (``nonzero`` behind ``x[mask]``, ``masked_select``, ``repeat_interleave`` without
    ``output_size``...) by a dispatch mode. Nested reads count once (``tolist`` calling ``item``).

    ``device_type``: count only reads of tensors on that device (on a GPU, reading a CPU tensor does
    not wait for the device); ``None`` counts every read (a CPU test, where every tensor stands for a
    device tensor). On ``"cuda"`` the synchronizing CUDA calls torch's sync-debug mode reports are
    added as ``cuda_sync_events``. Everything is restored on exit.
    """
    counts: collections.Counter = collections.Counter()
    depth = [0]
    saved: list[tuple[Any, str, Any, bool]] = []

    class Implicit(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if not depth[0] and _implicit_read(func, args, kwargs, device_type):
                counts[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    def wrap(owner: Any, name: str) -> None:
        orig = getattr(owner, name)
        saved.append((owner, name, orig, name in vars(owner)))

        def counting(*a: Any, **k: Any) -> Any:
            if not depth[0] and _on(a[0] if a else k.get("input"), device_type):
                counts[name] += 1
            depth[0] += 1
            try:
                return orig(*a, **k)
            finally:
                depth[0] -= 1

        setattr(owner, name, counting)

    cuda = device_type == "cuda" and torch.cuda.is_available()
    debug_before = torch.cuda.get_sync_debug_mode() if cuda else None
    for name in _PY_READS:
        wrap(torch.Tensor, name)
    wrap(torch, "nonzero")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with Implicit():
                    yield counts
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(debug_before)
        if cuda:
            counts["cuda_sync_events"] = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        for owner, name, orig, own in reversed(saved):
            if own or owner is torch:
                setattr(owner, name, orig)
            else:
                delattr(owner, name)
