"""What every other room uses: bundled text and token batches (``data``), text sampled from the
model itself (``generated``), the bundled real model (``models``), perplexity and model size
(``evaluate``) and atomic directory writes (``files``).

Nothing here imports another room of the package; transformers is imported only inside the
functions that load a model.
"""

from .data import generated_text, text_batches, tokenize_text
from .evaluate import model_size_bytes, perplexity
from .files import atomic_directory
from .models import load_gguf, load_smollm2

__all__ = ["text_batches", "tokenize_text", "generated_text", "perplexity", "model_size_bytes",
           "atomic_directory", "load_smollm2", "load_gguf"]
