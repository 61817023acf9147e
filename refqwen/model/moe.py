"""The Qwen2-MoE feed-forward block: top-k routed SwiGLU experts plus a gated shared expert.

    p = softmax(router(x))                      over all experts, in float32
    chosen = top-k of p (renormalised to sum 1 if norm_topk_prob)
    y = sum_j p_j * expert_j(x)  +  sigmoid(shared_gate(x)) * shared_expert(x)
"""

import numpy as np

from refqwen.model.hooks import UNTRACED
from refqwen.model.linear import linear
from refqwen.model.mlp import MLP


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the row maximum so exp never overflows."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.float32(1) / (np.float32(1) + np.exp(-x))


def top_k_experts(probs, top_k, norm_topk_prob):
    """The k most probable experts per token and their weights.  probs [T, E] -> ([T, k] int, [T, k])"""
    # top-k by descending probability; a stable sort keeps the lower index first on ties, as torch.topk does
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # [T, k]
    weights = np.take_along_axis(probs, experts, axis=-1)  # [T, k]
    if norm_topk_prob:
        weights = weights / np.sum(weights, axis=-1, keepdims=True)
    return experts, weights


def dispatch_experts(x, experts, chosen, weights):
    """`sum_j weights[:, j] * experts[chosen[:, j]](x)`, each expert run only on the tokens that chose it.
    x [T, C], chosen and weights [T, k] -> [T, C]"""
    out = np.zeros_like(x)
    for e in np.unique(chosen):
        tokens, slot = np.nonzero(chosen == e)  # which tokens picked e, and in which of their k slots
        out[tokens] += weights[tokens, slot, None] * experts[e](x[tokens])
    return out


class SparseMoE:
    hook = UNTRACED  # trace points router_logits ... out (refqwen/trace.py)

    def __init__(self, ops, router, experts: list[MLP], shared_expert: MLP, shared_expert_gate, top_k,
                 norm_topk_prob):
        self.ops = ops
        self.router = router  # [E, C], kept in float32: it decides which experts run
        self.experts = experts  # E SwiGLU MLPs of width moe_intermediate_size
        self.shared_expert = shared_expert  # one SwiGLU MLP of width shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate  # [1, C], float32
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    @classmethod
    def from_weights(cls, w: dict, prefix: str, cfg, ops) -> "SparseMoE":
        experts = [MLP.from_weights(w, f"{prefix}.experts.{e}", ops) for e in range(cfg.num_experts)]
        router, shared_gate = (ops.prepare_float(f"{prefix}.{n}.weight", w[f"{prefix}.{n}.weight"])
                               for n in ("gate", "shared_expert_gate"))
        return cls(ops, router, experts, MLP.from_weights(w, f"{prefix}.shared_expert", ops), shared_gate,
                   cfg.num_experts_per_tok, cfg.norm_topk_prob)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [T, C] -> [T, C]"""
        hook = self.hook
        router_logits = hook("router_logits", linear(x, self.router))  # [T, E]
        probs = hook("router_probs", softmax(router_logits))  # [T, E]
        chosen, weights = top_k_experts(probs, self.top_k, self.norm_topk_prob)  # [T, k] each
        chosen = hook("chosen", chosen)  # [T, k] expert indices, most probable first
        weights = hook("weights", weights)  # [T, k]
        routed = hook("routed", self.ops.moe_dispatch(x, self.experts, chosen, weights))  # [T, C]
        shared_gate = hook("shared_gate", sigmoid(linear(x, self.shared_expert_gate)))  # [T, 1]
        shared = hook("shared", shared_gate * self.shared_expert(x))  # [T, C]
        return hook("out", routed + shared)
