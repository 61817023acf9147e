"""The Qwen2 model itself: everything a reader needs to follow token ids to logits, in NumPy.

    config.py     Config: the hyperparameters, and every value derived from them
    model.py      Model.forward and DecoderLayer: embed -> N x (attention, MLP or MoE) -> norm -> logits
    attention.py  grouped-query attention with rotary positions over the KV cache (cache.py)
    rope.py       rotary frequencies, YaRN          norm.py   RMSNorm
    mlp.py        SwiGLU                            moe.py    routed experts + gated shared expert
    linear.py     embed, x Wᵀ + b                   ops.py    the reference operations (the "numpy" backend)
    hooks.py      the one-line trace points every module reports through

Nothing here imports the accelerated backends (refqwen/backends), the checkpoint readers or the tools.
"""

from refqwen.model.cache import KVCache
from refqwen.model.config import Config
from refqwen.model.model import Model

__all__ = ["Config", "KVCache", "Model"]
