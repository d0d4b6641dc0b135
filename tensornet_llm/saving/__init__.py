"""Saving and loading compactified models: a Hugging Face config, one safetensors file and
``tensornet.json``, the structure that rebuilds every replaced module.

It rebuilds what ``compress`` and ``train`` make from the layer classes alone, so it sits
below both (and ``compress`` may write checkpoints through it).
"""

from .serialization import STRUCTURE_FILE, WEIGHTS_FILE, load_compactified, save_compactified

__all__ = ["save_compactified", "load_compactified", "STRUCTURE_FILE", "WEIGHTS_FILE"]
