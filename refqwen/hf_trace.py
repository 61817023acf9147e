"""Traces of Hugging Face transformers models, under refqwen's trace point names.

`trace_transformers(hf_model, ids, names)` runs a `Qwen2ForCausalLM` or
`Qwen2MoeForCausalLM` (batch of one, no cache) with forward hooks on its modules and
returns a `Trace` that `refqwen.compare` lines up with refqwen's own. torch and
transformers are imported only here, only when called.

What each name is read from (the module's output unless "input" is said):

    embed                    model.embed_tokens
    layers.{i}.resid_pre     the input of decoder layer i
    layers.{i}.attn_norm     input_layernorm
    attn.q / .k / .v         q_proj / k_proj / v_proj, reshaped [T, heads, D]
    attn.q_rot / .k_rot      the same, rotated by transformers' own apply_rotary_pos_emb with
                             the cos/sin the attention module receives
    attn.pattern             the attention module's weights: only when the model runs eager
                             attention (attn_implementation="eager"); other kernels return none
    attn.z                   the input of o_proj, [T, H, D]
    attn.out                 o_proj
    resid_mid                the input of post_attention_layernorm
    mlp_norm                 post_attention_layernorm
    mlp.gate / .up / .down   gate_proj / up_proj / down_proj;  mlp.act: the input of down_proj
    moe.router_logits        the router's logits; router_probs is their float32 softmax;
    moe.chosen / .weights    its top-k indices and weights
    moe.routed               the experts module
    moe.shared_expert.*      the shared expert's projections, as for mlp.*
    moe.shared_gate          sigmoid(shared_expert_gate);  moe.shared: that times the shared expert
    moe.out                  the sparse block
    resid_post               decoder layer i
    final_norm, logits       model.norm, lm_head

Every name of refqwen's table is provided (attn.pattern only under eager attention).
"""

import numpy as np

from refqwen.errors import RefqwenError
from refqwen.trace import Trace, Tracer, forward_order


def trace_transformers(hf_model, ids, names=("*",)) -> Trace:
    """Run hf_model on one sequence of token ids and return the trace points matching `names`."""
    import torch

    names = [names] if isinstance(names, str) else list(names)
    tracer = Tracer(names)
    handles = []
    try:
        _hook_model(hf_model, tracer, handles)
        with torch.no_grad():
            hf_model(torch.tensor([[int(i) for i in ids]]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    arrays = dict(sorted(tracer.arrays.items(), key=lambda item: forward_order(item[0])))
    meta = {"model": getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__,
            "backend": "transformers", "ids": [int(i) for i in ids], "start": 0}
    return Trace(arrays, meta)


def _numpy(t) -> np.ndarray:
    """A torch tensor of the run (batch of one) -> its NumPy array without the batch axis."""
    return t.detach().cpu().numpy()[0]


def _flat(t) -> np.ndarray:
    """A tensor the sparse block computes on its flattened input, [T, ...]: nothing to drop."""
    return t.detach().cpu().numpy()


def _hook_model(hf_model, tracer, handles):
    def on_output(module, name, convert=_numpy):
        """Record the module's output under `name`."""
        handles.append(module.register_forward_hook(lambda m, args, out: _record(tracer, name, out, convert)))

    def on_input(module, name, convert=_numpy):
        """Record the module's first input under `name`."""
        def hook(m, args, kwargs):
            _record(tracer, name, args[0] if args else kwargs["hidden_states"], convert)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    base = hf_model.model
    on_output(base.embed_tokens, "embed")
    for i, layer in enumerate(base.layers):
        p = f"layers.{i}."
        on_input(layer, p + "resid_pre")
        on_output(layer.input_layernorm, p + "attn_norm")
        _hook_attention(layer.self_attn, p + "attn.", tracer, handles, on_input, on_output)
        on_input(layer.post_attention_layernorm, p + "resid_mid")
        on_output(layer.post_attention_layernorm, p + "mlp_norm")
        if hasattr(layer.mlp, "experts"):
            _hook_sparse_block(layer.mlp, p + "moe.", tracer, handles, on_input, on_output)
        else:
            _hook_mlp(layer.mlp, p + "mlp.", on_input, on_output, _numpy)
        on_output(layer, p + "resid_post")
    on_output(base.norm, "final_norm")
    on_output(hf_model.lm_head, "logits")


def _record(tracer, name, value, convert):
    if tracer.wants(name):  # convert (a copy out of torch) only what was asked for
        tracer.visit(name, convert(value[0] if isinstance(value, tuple) else value))


def _hook_attention(attn, prefix, tracer, handles, on_input, on_output):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    head_dim = attn.head_dim
    rotary = {}  # the cos, sin the module is called with, kept for q_proj and k_proj's hooks

    def heads(t):  # [1, T, heads*D] -> [T, heads, D]
        return _numpy(t).reshape(t.shape[1], -1, head_dim)

    def rotated(t):  # [1, T, heads*D] -> rotated as transformers rotates it -> [T, heads, D]
        x = t.view(*t.shape[:2], -1, head_dim).transpose(1, 2)  # [1, heads, T, D]
        cos, sin = rotary["cos_sin"]
        return _numpy(apply_rotary_pos_emb(x, x, cos, sin)[0].transpose(1, 2))

    def keep_rotary(module, args, kwargs):
        rotary["cos_sin"] = kwargs["position_embeddings"]

    handles.append(attn.register_forward_pre_hook(keep_rotary, with_kwargs=True))
    for proj, name in ((attn.q_proj, "q"), (attn.k_proj, "k"), (attn.v_proj, "v")):
        on_output(proj, prefix + name, heads)
    on_output(attn.q_proj, prefix + "q_rot", rotated)
    on_output(attn.k_proj, prefix + "k_rot", rotated)
    def weights(module, args, out):  # (output, weights); weights is None unless attention runs eager
        if out[1] is not None:
            _record(tracer, prefix + "pattern", out[1], _numpy)

    handles.append(attn.register_forward_hook(weights))
    on_input(attn.o_proj, prefix + "z", heads)
    on_output(attn.o_proj, prefix + "out")


def _hook_mlp(mlp, prefix, on_input, on_output, convert):
    on_output(mlp.gate_proj, prefix + "gate", convert)
    on_output(mlp.up_proj, prefix + "up", convert)
    on_input(mlp.down_proj, prefix + "act", convert)
    on_output(mlp.down_proj, prefix + "down", convert)


def _hook_sparse_block(block, prefix, tracer, handles, on_input, on_output):
    """Qwen2MoeSparseMoeBlock of transformers 5: gate (top-k router), experts, shared expert."""
    import torch

    shared_out = {}  # the shared expert's output, for the shared_gate hook that runs after it

    def router(module, args, out):
        logits, weights, chosen = out if isinstance(out, tuple) else (out, None, None)
        _record(tracer, prefix + "router_logits", logits, _flat)
        _record(tracer, prefix + "router_probs", torch.softmax(logits.float(), dim=-1), _flat)
        if chosen is not None:
            _record(tracer, prefix + "chosen", chosen, _flat)
            _record(tracer, prefix + "weights", weights, _flat)

    def shared_gate(module, args, out):
        gate = torch.sigmoid(out)  # [T, 1]
        _record(tracer, prefix + "shared_gate", gate, _flat)
        _record(tracer, prefix + "shared", gate * shared_out["value"], _flat)

    def keep_shared(module, args, out):
        shared_out["value"] = out

    handles.append(block.gate.register_forward_hook(router))
    on_output(block.experts, prefix + "routed", _flat)
    _hook_mlp(block.shared_expert, prefix + "shared_expert.", on_input, on_output, _flat)
    handles.append(block.shared_expert.register_forward_hook(keep_shared))
    handles.append(block.shared_expert_gate.register_forward_hook(shared_gate))
    on_output(block, prefix + "out")


def load_transformers(path):
    """The transformers model of a refqwen model's source: a Hugging Face folder or a .gguf file
    (dequantized), in float32 eval mode."""
    from pathlib import Path

    try:
        import torch
        from transformers import AutoModelForCausalLM, GgufConfig
    except ImportError as e:
        raise RefqwenError(f"comparing against transformers needs torch and transformers ({e}); "
                           f"pip install -e '.[test]'") from None
    path = Path(path)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()
