"""refqwen: a readable NumPy reference of the Qwen2 model family, checked against transformers."""

from refqwen.compare import Report, compare
from refqwen.errors import ConfigError, DemoModelError, RefqwenError, WeightsError
from refqwen.loading import load
from refqwen.model import Config, KVCache, Model
from refqwen.perplexity import perplexity
from refqwen.tiny import tiny_config, tiny_model
from refqwen.trace import Trace, load_trace, trace

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "DemoModelError", "KVCache", "Model", "RefqwenError", "Report", "Trace",
           "WeightsError", "compare", "load", "load_trace", "perplexity", "tiny_config", "tiny_model", "trace"]
