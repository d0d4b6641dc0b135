"""The module paths of tensornet-llm 0.1, before the package was split into rooms.

``tensornet_llm.fit``, ``tensornet_llm.data``, ``tensornet_llm.compactify`` and the other flat
module paths keep working: each is registered in ``sys.modules`` as the moved module itself (the
same object, so patching either name patches both). ``tensornet_llm.quantize`` was one module
that is now two (the layers and the model-level function); its old path is a module that
re-exports both.
"""

from __future__ import annotations

import importlib
import sys
import types

#: old module name -> its home now (under ``tensornet_llm``).
MOVED = {
    "factorize": "layers.factorize", "tree": "layers.tree", "decompose": "layers.decompose",
    "contract": "layers.contract", "base": "layers.base", "mpo": "layers.mpo",
    "ttns": "layers.ttns", "layout": "layers.layout", "autotune": "layers.autotune",
    "data": "helpers.data", "models": "helpers.models", "evaluate": "helpers.evaluate",
    "_io": "helpers.files",
    "targets": "compress.targets", "compactify": "compress.compactify",
    "budget": "compress.budget", "calibrate": "compress.calibrate", "fit": "compress.fit",
    "sensitivity": "compress.sensitivity", "entanglement": "compress.entanglement",
    "profiling": "compress.profiling", "plots": "compress.plots", "report": "compress.report",
    "heal": "train.heal", "serialization": "saving.serialization",
}
#: old module name -> the modules whose public names it re-exports.
SPLIT = {"quantize": ("train.quantize", "layers.quantized")}


def register(package: types.ModuleType) -> None:
    """Make every old module path importable; set it as an attribute of ``package`` unless the
    package already exports a function of that name. As before the split,
    ``tensornet_llm.compactify`` is the function while ``from tensornet_llm.compactify import
    CompactifyConfig`` and ``importlib.import_module("tensornet_llm.compactify")`` reach the
    module."""
    root = package.__name__
    modules = {old: importlib.import_module(f"{root}.{new}") for old, new in MOVED.items()}
    for old, parts in SPLIT.items():
        merged = types.ModuleType(f"{root}.{old}", f"Re-exports {', '.join(parts)}.")
        for part in parts:
            source = importlib.import_module(f"{root}.{part}")
            merged.__dict__.update({n: getattr(source, n) for n in source.__all__})
        merged.__all__ = [n for part in parts
                          for n in importlib.import_module(f"{root}.{part}").__all__]
        modules[old] = merged
    for old, module in modules.items():
        sys.modules.setdefault(f"{root}.{old}", module)
        if not hasattr(package, old):
            setattr(package, old, module)
