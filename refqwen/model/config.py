"""Model hyper-parameters, read from a Hugging Face config.json or a GGUF header.

`Config` holds what the checkpoint states. Everything computed from it (head size,
KV group size, which layers are sparse MoE, which layers use a sliding window, the
rotary frequencies and YaRN attention factor) lives in the "Derived values" section
below and nowhere else, so there is one place to read and one place to check.
"""

import math
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from refqwen.errors import ConfigError, RefqwenError
from refqwen.files import read_json
from refqwen.model import rope

# Hugging Face class name -> our model_type; GGUF general.architecture -> our model_type.
HF_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2_moe"}
GGUF_ARCHITECTURES = {"qwen2": "qwen2", "qwen2moe": "qwen2_moe"}
LAYER_TYPES = ("full_attention", "sliding_attention")
# Upper bounds on what a config may declare, checked before anything is allocated or looped over
# (docs/security.md). Each is far above every released Qwen2/Qwen3 model (the largest: 80 layers,
# hidden 8192, MLP 29568, 151936 tokens, 128 experts, 131072 positions with YaRN).
LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
          "num_attention_heads": 1024, "num_key_value_heads": 1024, "num_experts": 1024,
          "moe_intermediate_size": 1 << 20, "shared_expert_intermediate_size": 1 << 20,
          "max_position_embeddings": 1 << 24, "sliding_window": 1 << 24}
MAX_EXPERT_LAYERS = 1 << 16  # num_hidden_layers x num_experts: the expert tensors a checkpoint may list


@dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension, the only rotary scaling Qwen2 ships."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: 0.1 ln(factor) + 1
    truncate: bool = True

    def __post_init__(self):
        for name in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and value > 0):
                raise ConfigError(f"invalid YaRN rope_scaling: {name} must be a positive number, got {value!r}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ConfigError(f"invalid YaRN rope_scaling: attention_factor must be positive, "
                              f"got {self.attention_factor!r}")


@dataclass(frozen=True)
class DualChunkAttention:
    """Dual Chunk Attention (Qwen2.5-1M's `dual_chunk_attention_config`; refqwen/model/dca.py)."""

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0  # 0: no length temperature

    def __post_init__(self):
        for name in ("chunk_size", "local_size", "original_max_position_embeddings"):
            value = getattr(self, name)
            least = 0 if name == "original_max_position_embeddings" else 1
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
                raise ConfigError(f"invalid dual_chunk_attention_config: {name} must be an integer >= {least}, "
                                  f"got {value!r}")
        if self.local_size >= self.chunk_size:
            raise ConfigError(f"invalid dual_chunk_attention_config: local_size ({self.local_size}) must be "
                              f"smaller than chunk_size ({self.chunk_size})")


def dual_chunk_attention(block, source: str) -> DualChunkAttention | None:
    """A `dual_chunk_attention_config` dict checked, or None."""
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: dual_chunk_attention_config must be a dict with chunk_size and local_size")
    try:
        return DualChunkAttention(chunk_size=block.get("chunk_size"), local_size=block.get("local_size"),
                                  original_max_position_embeddings=block.get("original_max_position_embeddings", 0))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


@dataclass(frozen=True)
class Config:
    model_type: str  # "qwen2" (dense) or "qwen2_moe"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int  # dense MLP width (MoE models use it on their non-sparse layers)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    # Sliding-window attention: `sliding_window` is None when it is switched off.
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: tuple[str, ...] | None = None  # explicit per-layer choice, as transformers 5 writes it
    # Mixture of experts (qwen2_moe only).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    dual_chunk_attention: DualChunkAttention | None = None

    def __post_init__(self):
        def need(ok, message):
            if not ok:
                raise ConfigError(f"invalid Qwen2 config: {message}")

        need(self.model_type in ("qwen2", "qwen2_moe"), f"model_type {self.model_type!r} is not qwen2 or qwen2_moe")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            need(_is_int(getattr(self, name)) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        _check_fields(self, need)
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads {self.num_attention_heads} is not a multiple of "
             f"num_key_value_heads {self.num_key_value_heads}")
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.layer_types is not None:
            need(len(self.layer_types) == self.num_hidden_layers and set(self.layer_types) <= set(LAYER_TYPES),
                 f"layer_types must list {self.num_hidden_layers} entries from {LAYER_TYPES}")
        if self.sliding_layers:
            need(self.sliding_window is not None and self.sliding_window > 0,
                 "sliding-window layers need a positive sliding_window")
        if self.model_type == "qwen2_moe" and self.num_experts > 0:
            need(0 < self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts ({self.num_experts})")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
            need(self.decoder_sparse_step > 0, "decoder_sparse_step must be positive")

    # ---- Derived values: the one place where they are computed -------------------------

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_group_size(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @cached_property
    def sparse_layers(self) -> frozenset[int]:
        """Layers whose MLP is the sparse MoE block (transformers' Qwen2MoeDecoderLayer rule)."""
        if self.model_type != "qwen2_moe" or self.num_experts == 0:
            return frozenset()
        return frozenset(i for i in range(self.num_hidden_layers)
                         if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0)

    @cached_property
    def sliding_layers(self) -> frozenset[int]:
        """Layers that attend only to the last `sliding_window` positions."""
        if self.layer_types is not None:
            return frozenset(i for i, t in enumerate(self.layer_types) if t == "sliding_attention")
        if self.sliding_window is None:
            return frozenset()
        if self.model_type == "qwen2":  # the upper layers slide
            return frozenset(range(self.max_window_layers, self.num_hidden_layers))
        # qwen2_moe: even-numbered layers below max_window_layers slide
        return frozenset(i for i in range(min(self.max_window_layers, self.num_hidden_layers)) if i % 2 == 0)

    def window(self, layer: int) -> int | None:
        """The attention window of a layer, or None for full causal attention."""
        return self.sliding_window if layer in self.sliding_layers else None

    @property
    def context_window(self) -> int:
        """Positions a prompt plus its answer may use: max_position_embeddings, or YaRN's extended
        window original x factor when that is larger (Qwen2-7B's config says 32,768 and its model
        card adds the YaRN block for 131,072)."""
        if self.dual_chunk_attention is not None:
            return 2**62  # every query-key distance DCA forms stays inside one chunk: no window
        if self.rope_scaling is None:
            return self.max_position_embeddings
        s = self.rope_scaling
        return max(self.max_position_embeddings, int(s.original_max_position_embeddings * s.factor))

    def too_long(self, length: int, what: str) -> str:
        """The error for `length` positions that do not fit: both numbers, and how to extend the window."""
        how = ("turn on YaRN, as the Qwen2 model cards instruct: refqwen.load(path, rope_scaling={'type': 'yarn', "
               f"'factor': 4.0, 'original_max_position_embeddings': {self.max_position_embeddings}}}) or "
               "--yarn 4 on the command line" if self.rope_scaling is None
               else "a larger YaRN factor (rope_scaling / --yarn) extends it further")
        return f"{what} need {length} positions; the context window holds {self.context_window}: {how}"

    @cached_property
    def rope_inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies.  -> [head_dim / 2] float32"""
        if self.rope_scaling is None:
            return rope.default_inv_freq(self.rope_theta, self.head_dim)
        s = self.rope_scaling
        return rope.yarn_inv_freq(self.rope_theta, self.head_dim, s.factor, s.original_max_position_embeddings,
                                  s.beta_fast, s.beta_slow, s.truncate)

    @property
    def rope_attention_factor(self) -> float:
        """The factor YaRN applies to cos and sin (so attention logits scale by its square)."""
        if self.rope_scaling is None:
            return 1.0
        if self.rope_scaling.attention_factor is not None:
            return self.rope_scaling.attention_factor
        return rope.yarn_attention_factor(self.rope_scaling.factor)

    # ---- Construction -------------------------------------------------------------------

    def to_hf_dict(self) -> dict:
        """A config.json that from_hf_dict (and transformers) reads back as this config."""
        arch = {v: k for k, v in HF_ARCHITECTURES.items()}[self.model_type]
        raw = {k: v for k, v in vars(self).items() if k in self.__dataclass_fields__
               and k not in ("rope_theta", "rope_scaling", "sliding_window", "eos_token_ids", "layer_types",
                             "dual_chunk_attention")}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = dict(vars(self.rope_scaling), rope_type="yarn", rope_theta=self.rope_theta)
        if self.dual_chunk_attention:
            raw["dual_chunk_attention_config"] = dict(vars(self.dual_chunk_attention))
        raw.update(architectures=[arch], rope_parameters=rope, use_sliding_window=self.sliding_window is not None,
                   sliding_window=self.sliding_window, mlp_only_layers=list(self.mlp_only_layers),
                   layer_types=list(self.layer_types) if self.layer_types else None,
                   eos_token_id=list(self.eos_token_ids) or None)
        return raw

    @classmethod
    def from_hf_file(cls, path) -> "Config":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: no config.json (a Hugging Face model folder needs one)")
        try:
            raw = read_json(path, "config.json")
        except RefqwenError as e:
            raise ConfigError(str(e)) from None
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> "Config":
        """Build from the keys of a Hugging Face config.json (transformers 4.x or 5.x)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        model_type = _hf_model_type(raw, source)

        def key(name, default=_REQUIRED):
            if name in raw and raw[name] is not None:
                return raw[name]
            if default is _REQUIRED:
                raise ConfigError(f"{source}: missing key {name!r}, required for {model_type}")
            return default

        try:
            theta, scaling = _hf_rope(raw, source)
        except (TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: invalid rope_theta / rope_scaling / rope_parameters ({e})") from None
        fields = dict(
            model_type=model_type,
            vocab_size=key("vocab_size"),
            hidden_size=key("hidden_size"),
            num_hidden_layers=key("num_hidden_layers"),
            num_attention_heads=key("num_attention_heads"),
            num_key_value_heads=key("num_key_value_heads", key("num_attention_heads")),
            intermediate_size=key("intermediate_size"),
            rms_norm_eps=_hf_number(key("rms_norm_eps", 1e-6), "rms_norm_eps", source),
            rope_theta=_hf_number(theta, "rope_theta", source),
            rope_scaling=scaling,
            dual_chunk_attention=dual_chunk_attention(raw.get("dual_chunk_attention_config"), source),
            max_position_embeddings=key("max_position_embeddings", 32768),
            tie_word_embeddings=_hf_bool(key("tie_word_embeddings", False), "tie_word_embeddings", source),
            sliding_window=key("sliding_window", None)
            if _hf_bool(key("use_sliding_window", False), "use_sliding_window", source) else None,
            max_window_layers=key("max_window_layers", 28),
            layer_types=_hf_list(raw["layer_types"], "layer_types", source) if raw.get("layer_types") else None,
            eos_token_ids=_hf_list(key("eos_token_id", None), "eos_token_id", source),
        )
        if model_type == "qwen2_moe":
            fields.update(
                qkv_bias=_hf_bool(key("qkv_bias", True), "qkv_bias", source),
                num_experts=key("num_experts"),
                num_experts_per_tok=key("num_experts_per_tok"),
                moe_intermediate_size=key("moe_intermediate_size"),
                shared_expert_intermediate_size=key("shared_expert_intermediate_size"),
                norm_topk_prob=_hf_bool(key("norm_topk_prob", False), "norm_topk_prob", source),
                decoder_sparse_step=key("decoder_sparse_step", 1),
                mlp_only_layers=_hf_list(key("mlp_only_layers", None), "mlp_only_layers", source),
            )
        return _build(cls, fields, source)

    @classmethod
    def from_gguf_metadata(cls, meta: dict, vocab_size: int, has_output: bool, dense_layers: tuple[int, ...],
                           source: str) -> "Config":
        """Build from GGUF key/values (`meta`: key -> Python value) and three facts about its tensors:
        the embedding's vocabulary size, whether it stores an output matrix (else tied), and which
        layers of an MoE model have no router (GGUF has no key for decoder_sparse_step)."""
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
            raise ConfigError(f"{source}: GGUF architecture {arch!r} is not supported; "
                              f"refqwen runs {sorted(GGUF_ARCHITECTURES)}")

        def key(name, default=_REQUIRED):
            full = f"{arch}.{name}"
            if full in meta:
                return meta[full]
            if default is _REQUIRED:
                raise ConfigError(f"{source}: missing GGUF key {full!r}")
            return default

        heads = key("attention.head_count")
        scaling = None
        if key("rope.scaling.type", "none") == "yarn":
            scaling = YarnScaling(factor=_hf_number(key("rope.scaling.factor"), "rope.scaling.factor", source),
                                  original_max_position_embeddings=key("rope.scaling.original_context_length"))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        fields = dict(
            model_type=GGUF_ARCHITECTURES[arch],
            vocab_size=vocab_size,
            hidden_size=key("embedding_length"),
            num_hidden_layers=key("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=key("attention.head_count_kv", heads),
            intermediate_size=key("feed_forward_length"),
            rms_norm_eps=_hf_number(key("attention.layer_norm_rms_epsilon"), "layer_norm_rms_epsilon", source),
            rope_theta=_hf_number(key("rope.freq_base", 10000.0), "rope.freq_base", source),
            rope_scaling=scaling,
            max_position_embeddings=key("context_length"),
            tie_word_embeddings=not has_output,
            eos_token_ids=_hf_list(eos, "tokenizer.ggml.eos_token_id", source),
        )
        if fields["model_type"] == "qwen2_moe":
            fields.update(
                num_experts=key("expert_count"),
                num_experts_per_tok=key("expert_used_count"),
                moe_intermediate_size=key("expert_feed_forward_length"),
                shared_expert_intermediate_size=key("expert_shared_feed_forward_length"),
                mlp_only_layers=tuple(dense_layers),
            )
        return _build(cls, fields, source)


_REQUIRED = object()


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _check_fields(cfg: "Config", need) -> None:
    """Types, signs and the LIMITS of the fields every loader fills in (the rope_scaling details are
    checked where they are read, in _hf_rope)."""
    for name, limit in LIMITS.items():
        value = getattr(cfg, name)
        if name == "sliding_window" and value is None:
            continue
        need(_is_int(value) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
        need(value <= limit, f"{name} = {value} is above refqwen's limit of {limit} (docs/security.md)")
    need(cfg.intermediate_size > 0, "intermediate_size must be positive")
    need(cfg.max_position_embeddings > 0, "max_position_embeddings must be positive")
    need(_is_number(cfg.rms_norm_eps) and cfg.rms_norm_eps > 0,
         f"rms_norm_eps must be a positive number (a zero or negative one divides by zero or takes the root of a "
         f"negative number), got {cfg.rms_norm_eps!r}")
    need(_is_number(cfg.rope_theta) and cfg.rope_theta > 0, f"rope_theta must be a positive number, "
                                                            f"got {cfg.rope_theta!r}")
    for name in ("tie_word_embeddings", "qkv_bias", "norm_topk_prob"):
        need(isinstance(getattr(cfg, name), (bool, np.bool_)), f"{name} must be true or false, "
                                                               f"got {getattr(cfg, name)!r}")
    for name in ("max_window_layers", "num_experts_per_tok", "decoder_sparse_step"):
        need(_is_int(getattr(cfg, name)) and getattr(cfg, name) >= 0,
             f"{name} must be a non-negative integer, got {getattr(cfg, name)!r}")
    need(cfg.num_hidden_layers * cfg.num_experts <= MAX_EXPERT_LAYERS,
         f"num_hidden_layers x num_experts = {cfg.num_hidden_layers * cfg.num_experts} is above refqwen's limit "
         f"of {MAX_EXPERT_LAYERS} (docs/security.md)")
    need(isinstance(cfg.mlp_only_layers, tuple) and all(_is_int(i) and 0 <= i < cfg.num_hidden_layers
                                                        for i in cfg.mlp_only_layers),
         f"mlp_only_layers must list layer indices in 0..{cfg.num_hidden_layers - 1}, got {cfg.mlp_only_layers!r}")
    need(isinstance(cfg.eos_token_ids, tuple) and all(_is_int(i) and i >= 0 for i in cfg.eos_token_ids),
         f"eos_token_id must be a token id or a list of them, got {cfg.eos_token_ids!r}")
    need(cfg.layer_types is None or isinstance(cfg.layer_types, tuple),
         f"layer_types must be a list, got {cfg.layer_types!r}")


def _hf_list(value, name: str, source: str) -> tuple:
    """A config.json list (or a single integer, as eos_token_id may be) as a tuple."""
    if value is None:
        return ()
    if _is_int(value):
        return (value,)
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
    return tuple(value)


def _hf_number(value, name: str, source: str) -> float:
    if not _is_number(value):
        raise ConfigError(f"{source}: {name} must be a finite number, got {value!r}")
    return float(value)


def _hf_bool(value, name: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    return value


def _build(cls, fields: dict, source: str) -> "Config":
    try:
        return cls(**fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:  # a comparison in a check met a value of the wrong type
        raise ConfigError(f"{source}: invalid Qwen2 config: {e}") from None


def with_rope_scaling(cfg: Config, block, source: str = "rope_scaling override") -> Config:
    """cfg with its rotary scaling replaced by `block`, a YaRN dict as in config.json
    ({"type" or "rope_type": "yarn", "factor", "original_max_position_embeddings"}; the original
    defaults to cfg.max_position_embeddings), or None / {"type": "default"} for plain rotary."""
    if block is None:
        return replace(cfg, rope_scaling=None)
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: expected a dict like {{'type': 'yarn', 'factor': 4.0}}, got {block!r}")
    kind = block.get("rope_type", block.get("type", "yarn"))
    if kind == "default":
        return replace(cfg, rope_scaling=None)
    if kind != "yarn":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported; Qwen2 uses 'default' or 'yarn'")
    return replace(cfg, rope_scaling=yarn_scaling(block, cfg.max_position_embeddings, source))


def _hf_model_type(raw: dict, source: str) -> str:
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"{source}: architectures must be a list, got {archs!r}")
    for arch in archs:
        if arch in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[arch]
    if not archs and raw.get("model_type") in ("qwen2", "qwen2_moe"):
        return raw["model_type"]
    found = archs or raw.get("model_type")
    raise ConfigError(f"{source}: architecture {found!r} is not supported; "
                      f"refqwen runs {sorted(HF_ARCHITECTURES)}")


def _hf_rope(raw: dict, source: str) -> tuple[float, YarnScaling | None]:
    """(rope_theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{source}: per-layer-type rope_parameters are not used by Qwen2")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported; Qwen2 uses 'default' or 'yarn'")
    if params.get("mscale") and params.get("mscale_all_dim"):
        raise ConfigError(f"{source}: YaRN with mscale/mscale_all_dim (DeepSeek style) is not a Qwen2 setting")
    if params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = raw.get("original_max_position_embeddings")
    return theta, yarn_scaling(params, raw.get("max_position_embeddings", 32768), source)


def _first_given(*values):
    """The first value that is not None (0 is a value, to be refused, not a missing key)."""
    return next((v for v in values if v is not None), None)


def yarn_scaling(params: dict, max_position_embeddings: int, source: str) -> YarnScaling:
    """A YaRN block ({"type"/"rope_type": "yarn", "factor", "original_max_position_embeddings", ...}) checked."""
    original = _first_given(params.get("original_max_position_embeddings"), max_position_embeddings)
    factor = params.get("factor")
    if factor is None and isinstance(original, (int, float)) and original > 0:
        factor = max_position_embeddings / original  # transformers' rule when the block omits the factor
    try:
        number = (int, float)
        return YarnScaling(
            factor=float(factor) if isinstance(factor, number) else factor,
            original_max_position_embeddings=int(original) if isinstance(original, number) else original,
            beta_fast=_first_given(params.get("beta_fast"), 32.0),
            beta_slow=_first_given(params.get("beta_slow"), 1.0),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
