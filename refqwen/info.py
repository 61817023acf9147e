"""What `refqwen info` reports: the config, parameter counts by module, and a memory estimate."""

from refqwen.backends.cupy_gpu import VARIANTS, bytes_needed
from refqwen.checkpoint.weights import parameter_counts


def describe(cfg, source: str, backend: str, context: int | None = None) -> dict:
    """The report of a model of config `cfg` read from `source`, for `backend` and a `context`-token cache
    (default: the model's maximum)."""
    context = context or cfg.max_position_embeddings
    params = parameter_counts(cfg)
    weight_bytes = 4 * params["total"]  # float32
    kv_bytes = 2 * cfg.num_hidden_layers * context * cfg.num_key_value_heads * cfg.head_dim * 4  # keys + values
    config = {k: v for k, v in vars(cfg).items() if k in cfg.__dataclass_fields__}
    config.update(rope_scaling=vars(cfg.rope_scaling) if cfg.rope_scaling else None, head_dim=cfg.head_dim,
                  kv_group_size=cfg.kv_group_size, sparse_layers=sorted(cfg.sparse_layers),
                  sliding_layers=sorted(cfg.sliding_layers), rope_attention_factor=cfg.rope_attention_factor)
    return dict(source=source, backend=backend, dtype="float32", config=config, parameters=params,
                memory=dict(context_tokens=context, weights_gib=weight_bytes / 2**30, kv_cache_gib=kv_bytes / 2**30,
                            total_gib=(weight_bytes + kv_bytes) / 2**30, gpu_gib=gpu_memory_gib(cfg, context)))


def gpu_memory_gib(cfg, context: int) -> dict[str, float]:
    """GPU memory each cupy backend needs for this model and context (weights, KV cache, workspace)."""
    return {name: bytes_needed(cfg, cls.storage, context) / 2**30 for name, cls in VARIANTS.items()}
