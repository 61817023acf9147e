"""The key/value cache: every layer's rotated keys and its values for all positions seen so far."""

import numpy as np


class LayerCache:
    """Keys and values of one layer, [S, KV, D] each, grown by doubling so appends stay cheap."""

    def __init__(self, num_kv_heads: int, head_dim: int):
        self.keys = np.empty((0, num_kv_heads, head_dim), np.float32)
        self.values = np.empty((0, num_kv_heads, head_dim), np.float32)
        self.length = 0

    def append(self, k: np.ndarray, v: np.ndarray):
        """Add k, v [T, KV, D]; return all keys and values so far, [S + T, KV, D] each (views)."""
        end = self.length + k.shape[0]
        if end > self.keys.shape[0]:
            self.reserve(max(end, 2 * self.keys.shape[0], 16))
        self.keys[self.length:end] = k
        self.values[self.length:end] = v
        self.length = end
        return self.keys[:end], self.values[:end]

    def reserve(self, capacity: int):
        """Room for `capacity` positions now, so that appends up to it copy nothing."""
        if capacity > self.keys.shape[0]:
            self.keys = _grow(self.keys, capacity, self.length)
            self.values = _grow(self.values, capacity, self.length)


def _grow(buffer: np.ndarray, capacity: int, used: int) -> np.ndarray:
    bigger = np.empty((capacity, *buffer.shape[1:]), buffer.dtype)
    bigger[:used] = buffer[:used]
    return bigger


class KVCache:
    """One LayerCache per decoder layer; `length` is the number of positions already processed."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int):
        self.layers = [LayerCache(num_kv_heads, head_dim) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reserve(self, positions: int):
        """Room for `positions` in every layer at once (a generation's prompt and new tokens): without it the
        first decode step after a prompt copies every layer's keys and values into buffers twice the size."""
        for layer in self.layers:
            layer.reserve(positions)
