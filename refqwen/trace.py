"""Named trace points: capture any intermediate of the forward pass, replace it, save it.

Every intermediate the reference computes passes through one line like
`q = self.hook("q", q)`. Nobody listens by default (`model.trace_points.tracer` is None),
and the line returns its argument unchanged. `trace(model, ids, names=[...])` runs one
forward pass with a `Tracer` listening: it copies the values whose names match the globs
(nothing else is kept) and lets hook callbacks replace values on their way through.

Names (TransformerLens-style; T new tokens, S cached + new tokens, C hidden, H query heads,
KV key/value heads, D head size, I MLP width, E experts, k experts per token, V vocabulary):

| name | shape | what |
|---|---|---|
| `embed` | [T, C] | token embeddings |
| `layers.{i}.resid_pre` | [T, C] | residual stream entering layer i |
| `layers.{i}.attn_norm` | [T, C] | rms_norm(resid_pre), the attention's input |
| `layers.{i}.attn.q` | [T, H, D] | query projection (with bias), before rotary |
| `layers.{i}.attn.k` | [T, KV, D] | key projection (with bias), before rotary |
| `layers.{i}.attn.v` | [T, KV, D] | value projection (with bias) |
| `layers.{i}.attn.q_rot` | [T, H, D] | queries after rotary |
| `layers.{i}.attn.k_rot` | [T, KV, D] | keys after rotary (what the cache stores) |
| `layers.{i}.attn.pattern` | [H, T, S] | attention weights; opt-in, read-only (see below) |
| `layers.{i}.attn.dca_intra`, `.dca_previous`, `.dca_earlier` | [T, H, D] | Dual Chunk Attention only: \
each group's output before the log-sum-exp merge (refqwen/model/dca.py) |
| `layers.{i}.attn.z` | [T, H, D] | per-head attention output, before o_proj |
| `layers.{i}.attn.out` | [T, C] | o_proj output |
| `layers.{i}.resid_mid` | [T, C] | resid_pre + attn.out |
| `layers.{i}.mlp_norm` | [T, C] | rms_norm(resid_mid), the MLP's input |
| `layers.{i}.mlp.gate` | [T, I] | gate projection (dense layers) |
| `layers.{i}.mlp.up` | [T, I] | up projection (dense layers) |
| `layers.{i}.mlp.act` | [T, I] | silu(gate) * up (dense layers) |
| `layers.{i}.mlp.down` | [T, C] | down projection, the MLP's output (dense layers) |
| `layers.{i}.moe.router_logits` | [T, E] | router scores (sparse layers) |
| `layers.{i}.moe.router_probs` | [T, E] | softmax of the router scores |
| `layers.{i}.moe.chosen` | [T, k] int | chosen experts, most probable first |
| `layers.{i}.moe.weights` | [T, k] | their weights (renormalised if norm_topk_prob) |
| `layers.{i}.moe.routed` | [T, C] | weighted sum of the chosen experts' outputs |
| `layers.{i}.moe.shared_gate` | [T, 1] | sigmoid(shared_expert_gate(x)) |
| `layers.{i}.moe.shared_expert.gate` | [T, I'] | the shared expert's gate projection; also `.up`, `.act`, `.down` |
| `layers.{i}.moe.shared` | [T, C] | shared_gate * shared expert output |
| `layers.{i}.moe.out` | [T, C] | routed + shared, the block's output |
| `layers.{i}.resid_post` | [T, C] | resid_mid + MLP output, the layer's output |
| `final_norm` | [T, C] | rms_norm of the last residual stream ([1, C] with last_only) |
| `logits` | [T, V] | next-token logits ([1, V] with last_only) |

The routed experts themselves are not traced: each runs on a different subset of tokens.
`attn.pattern` is the only point that costs something to trace: the blocked attention
never forms the T x S matrix, so it is computed (from q_rot and the cached keys) only when
a glob that spells out "pattern" selects it; "*" or "layers.3.*" leave it out. Replacing it
changes nothing downstream, so a hook may only observe it.
"""

import json
import os
import re
import tempfile
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

from refqwen.arrays import array_module, to_host
from refqwen.errors import RefqwenError

_MLP = ("gate", "up", "act", "down")
# (name relative to layer i, kind of layer it exists on), in the order the reference computes them
LAYER_POINTS = (
    [(n, "all") for n in ("resid_pre", "attn_norm", "attn.q", "attn.k", "attn.v", "attn.q_rot", "attn.k_rot",
                          "attn.pattern")]
    + [(f"attn.dca_{n}", "dca") for n in ("intra", "previous", "earlier")]  # with Dual Chunk Attention
    + [(n, "all") for n in ("attn.z", "attn.out", "resid_mid", "mlp_norm")]
    + [(f"mlp.{n}", "dense") for n in _MLP]
    + [(f"moe.{n}", "sparse") for n in ("router_logits", "router_probs", "chosen", "weights", "routed",
                                        "shared_gate")]
    + [(f"moe.shared_expert.{n}", "sparse") for n in _MLP]
    + [(n, "sparse") for n in ("moe.shared", "moe.out")]
    + [("resid_post", "all")]
)
BEFORE_LAYERS, AFTER_LAYERS = ("embed",), ("final_norm", "logits")
OPT_IN = ("attn.pattern",)  # selected only by a glob that spells out "pattern"
READ_ONLY = ("attn.pattern",)  # computed beside the forward pass, not part of it
_LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)")
_LAYER_INDEX = {name: n for n, (name, _) in enumerate(LAYER_POINTS)}


def point_names(config) -> list[str]:
    """Every trace point of a model with this config, in forward order."""
    def layer_points(i):
        kind = "sparse" if i in config.sparse_layers else "dense"
        kinds = ("all", kind, "dca") if config.dual_chunk_attention else ("all", kind)
        return [f"layers.{i}.{name}" for name, where in LAYER_POINTS if where in kinds]

    return [*BEFORE_LAYERS, *(n for i in range(config.num_hidden_layers) for n in layer_points(i)), *AFTER_LAYERS]


def forward_order(name: str) -> tuple:
    """Sort key that puts trace point names in the order the reference computes them
    (unknown names last)."""
    if name in BEFORE_LAYERS:
        return (0, 0, BEFORE_LAYERS.index(name))
    if name in AFTER_LAYERS:
        return (2, 0, AFTER_LAYERS.index(name))
    m = _LAYER_NAME.fullmatch(name)
    if m and m.group(2) in _LAYER_INDEX:
        return (1, int(m.group(1)), _LAYER_INDEX[m.group(2)])
    return (3, 0, 0)


def token_axis(name: str) -> int:
    """Which axis of the named array runs over token positions."""
    return 1 if name.endswith(".attn.pattern") else 0


def matches(name: str, glob: str) -> bool:
    """fnmatch, except that opt-in points need a glob that names them."""
    opt_in = any(name.endswith("." + p) for p in OPT_IN)
    return fnmatchcase(name, glob) and (not opt_in or "pattern" in glob)


# ---- listening ----------------------------------------------------------------------------

class Tracer:
    """Keeps copies of the values whose names match `names`; runs `hooks` ({glob: fn}) on the
    values whose names match their glob. fn(name, value) returns a replacement or None."""

    def __init__(self, names=("*",), hooks: dict | None = None):
        self.names = list(names)
        self.hooks = list((hooks or {}).items())
        self.arrays = {}  # name -> copy, in the order visited
        self._wanted = {}  # name -> (kept, hook functions), worked out once per name

    def _plan(self, name):
        if name not in self._wanted:
            kept = any(matches(name, glob) for glob in self.names)
            self._wanted[name] = kept, [fn for glob, fn in self.hooks if matches(name, glob)]
        return self._wanted[name]

    def wants(self, name: str) -> bool:
        kept, fns = self._plan(name)
        return kept or bool(fns)

    def visit(self, name: str, value):
        kept, fns = self._plan(name)
        for fn in fns:
            replacement = fn(name, value)
            if replacement is not None:
                value = _checked_replacement(name, value, replacement)
        if kept:
            if name in self.arrays:
                raise RefqwenError(f"trace point {name} was reached twice in one forward pass")
            self.arrays[name] = np.array(to_host(value), copy=True)  # a copy: the run may reuse or view its buffers
        return value


def _checked_replacement(name, value, replacement):
    if any(name.endswith("." + p) for p in READ_ONLY):
        raise RefqwenError(f"hook for {name} returned a replacement, but {name} is read-only: it is computed "
                           f"beside the forward pass; replace attn.q_rot / attn.k_rot or attn.z instead")
    replacement = array_module(value).asarray(replacement, dtype=value.dtype)  # where the run keeps value
    if replacement.shape != value.shape:
        raise RefqwenError(f"hook for {name} returned shape {list(replacement.shape)}, expected "
                           f"{list(value.shape)}")
    return replacement


def trace(model, ids, names=("*",), hooks: dict | None = None, cache=None, last_only: bool = False) -> "Trace":
    """Run model.forward(ids, cache, last_only) and return the trace points matching `names`.

    names: globs (fnmatch) over the names in this module's table; "*" is every point except
    the opt-in attn.pattern. hooks: {glob: fn(name, value) -> replacement or None}; a
    replacement flows into the rest of the pass and is what the trace records.
    """
    names = [names] if isinstance(names, str) else list(names)
    hooks = dict(hooks or {})
    _check_globs(model, names, "names")
    _check_globs(model, hooks, "hooks")
    for glob, fn in hooks.items():
        if not callable(fn):
            raise RefqwenError(f"hooks[{glob!r}]: expected a function fn(name, value) -> replacement or None, "
                               f"got {type(fn).__name__}")
    points = model.trace_points
    if points.tracer is not None:
        raise RefqwenError("this model is already being traced; traces do not nest")
    start = 0 if cache is None else cache.length
    tracer = points.tracer = Tracer(names, hooks)
    try:
        model.forward(ids, cache, last_only)
    finally:
        points.tracer = None
    meta = {"model": model.source, "backend": model.backend, "ids": [int(i) for i in np.asarray(ids)], "start": start}
    return Trace(tracer.arrays, meta)


def _check_globs(model, globs, argument):
    known = point_names(model.config)
    for glob in globs:
        if not isinstance(glob, str):
            raise RefqwenError(f"{argument}: expected glob strings over trace point names, got {glob!r}")
        if not any(matches(name, glob) for name in known):
            raise RefqwenError(f"{argument}: {glob!r} matches no trace point of this "
                               f"{model.config.num_hidden_layers}-layer model; names look like "
                               f"'embed', 'layers.0.attn.q', 'layers.*.resid_post', 'logits' "
                               f"(the table is in refqwen/trace.py and docs/numerics.md)")


# ---- the result ---------------------------------------------------------------------------

class Trace(Mapping):
    """name -> array, in forward order, plus `meta` (model, backend, ids, start position)."""

    def __init__(self, arrays: dict, meta: dict | None = None):
        self.arrays = dict(arrays)
        self.meta = dict(meta or {})

    @classmethod
    def from_dict(cls, arrays: Mapping, meta: dict | None = None) -> "Trace":
        """A trace from any framework: {name: array-like}, named as in the table, without a batch axis."""
        converted = {}
        for name, value in arrays.items():
            if not isinstance(name, str):
                raise RefqwenError(f"trace names must be strings, got {name!r}")
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            converted[name] = np.asarray(value)
        return cls(dict(sorted(converted.items(), key=lambda item: forward_order(item[0]))), meta)

    def __getitem__(self, name):
        return self.arrays[name]

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self):
        return len(self.arrays)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __repr__(self):
        return f"Trace({len(self)} points, {self.nbytes / 2**20:.1f} MiB, {self.meta})"

    def save(self, path) -> None:
        """Write to a .npz or .safetensors file, with meta; replaced whole, never half-written."""
        path = Path(path)
        write = {".npz": _write_npz, ".safetensors": _write_safetensors}.get(path.suffix)
        if write is None:
            raise RefqwenError(f"{path}: a trace is saved as .npz or .safetensors, not {path.suffix or 'no suffix'!r}")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp, self)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path) -> "Trace":
        path = Path(path)
        if not path.is_file():
            raise RefqwenError(f"{path}: no such trace file")
        if path.suffix not in (".npz", ".safetensors"):
            raise RefqwenError(f"{path}: expected a trace saved as .npz or .safetensors")
        try:
            arrays, meta = _read_npz(path) if path.suffix == ".npz" else _read_safetensors(path)
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise RefqwenError(f"{path}: not a readable refqwen trace ({e})") from None
        return cls.from_dict(arrays, meta)


_META_KEY = "__refqwen_meta__"


def _write_npz(tmp, trace):
    with open(tmp, "wb") as f:
        np.savez(f, **trace.arrays, **{_META_KEY: np.array(json.dumps(trace.meta))})


def _read_npz(path):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files if name != _META_KEY}
        meta = json.loads(str(npz[_META_KEY])) if _META_KEY in npz.files else {}
    return arrays, meta


def _write_safetensors(tmp, trace):
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(a) for name, a in trace.arrays.items()}, tmp,
              metadata={_META_KEY: json.dumps(trace.meta)})


def _read_safetensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    return arrays, meta


def load_trace(path) -> Trace:
    """A trace saved by Trace.save (.npz or .safetensors)."""
    return Trace.load(path)
