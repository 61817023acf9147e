"""refqwen: a readable NumPy reference of the Qwen2 model family, checked against transformers."""

from refqwen.cache import KVCache
from refqwen.config import Config
from refqwen.errors import ConfigError, DemoModelError, RefqwenError, WeightsError
from refqwen.loading import load
from refqwen.model import Model
from refqwen.perplexity import perplexity

__version__ = "0.1.0"
__all__ = ["load", "perplexity", "Model", "Config", "KVCache", "RefqwenError", "ConfigError", "WeightsError",
           "DemoModelError"]
