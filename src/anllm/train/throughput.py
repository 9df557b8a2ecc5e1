"""Tokens per second and model FLOPs utilisation (MFU): the numbers :class:`anllm.train.trainer.AnllmTrainer` logs.

Tokens are the Trainer's own count of non-padding input tokens over all ranks
(``include_num_input_tokens_seen="non_padding"``). MFU follows the PaLM appendix: training FLOPs per
token = 6 N + 12 L d T (N parameters without the input embedding, L layers, d hidden size, T the
block size), against the GPU's dense bf16 peak. Recomputation from gradient checkpointing is not
counted (that would be hardware FLOPs utilisation), and the AnSAN mask does not reduce FLOPs: the
attention is still computed densely and masked.
"""

from __future__ import annotations

from typing import Any


# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets); override with metrics.peak_tflops.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A6000": 155.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "4090": 165.0,
    "3090": 71.0,
}


def gpu_peak_tflops(override: float | None = None) -> float | None:
    """Per-device peak for MFU: ``override``, else looked up from the CUDA device name (None on CPU)."""
    if override:
        return float(override)
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def count_parameters(model: Any) -> int:
    """Parameters without the input embedding (ZeRO-3 partitions report their full size as ds_numel)."""
    emb = model.get_input_embeddings()
    skip = {id(p) for p in emb.parameters()} if emb is not None else set()
    total = 0
    for p in model.parameters():
        if id(p) in skip:
            continue
        total += int(getattr(p, "ds_numel", p.numel()))
    return total


def flops_per_token(model: Any, block_size: int) -> float:
    cfg = model.config
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    return 6.0 * count_parameters(model) + 12.0 * layers * hidden * block_size
