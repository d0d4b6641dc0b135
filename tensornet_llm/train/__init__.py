"""After compression: healing, a short fine-tune of the compressed model (optionally distilled
from the dense one, through accelerate), and model-level int8 / int4 quantization of what is
left. Both change a model that ``compress`` made; neither decides what to compress.
"""

from .heal import HealConfig, HealResult, heal
from .quantize import QuantizeReport, quantize
from .quantize_selection import QuantizeConfig

__all__ = ["heal", "HealConfig", "HealResult", "quantize", "QuantizeConfig", "QuantizeReport"]
