"""Saving and loading compactified models: a Hugging Face config, one safetensors file and
``tensornet.json``, the structure that rebuilds every replaced module.

It rebuilds what ``compress`` and ``train`` make from the layer classes alone, so it sits
below both (and ``compress`` may write checkpoints through it). Importing it registers the
transformers plugin (``transformers_plugin``) that lets ``from_pretrained`` load such folders.
"""

from .serialization import STRUCTURE_FILE, WEIGHTS_FILE, load_compactified, save_compactified

try:  # the plugin needs transformers; the layers alone do not
    import transformers  # noqa: F401
except ImportError:
    transformers = None
__all__ = ["save_compactified", "load_compactified", "attach", "STRUCTURE_FILE", "WEIGHTS_FILE"]
if transformers is not None:  # importing the plugin registers the "tensornet" method
    from .transformers_plugin import TensorNetworkConfig, TensorNetworkQuantizer, attach

    __all__ += ["TensorNetworkConfig", "TensorNetworkQuantizer"]
else:
    def attach(model):
        """Without transformers there is no ``save_pretrained`` to prepare: ``model`` as it is."""
        return model
