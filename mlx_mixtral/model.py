"""The Mixtral decoder (Jiang et al., 2024, "Mixtral of Experts") in MLX.

Each of the `num_hidden_layers` blocks is

    h = x + Attention(RMSNorm(x))            grouped-query attention with RoPE
    y = h + SparseMoE(RMSNorm(h))            top-k of E SwiGLU experts, chosen per token

Parameter names follow mlx-lm's Mixtral exactly (`block_sparse_moe.switch_mlp.{gate,up,down}_proj`
with experts stacked as `[experts, out, in]`), so models converted by either tool load in both.

Everything that is not the mathematics is applied from outside through three small hooks, so this
file stays the model: `Parts` (the linear and expert classes a model is built from; the CPU
row split in `row_split` swaps in parallel ones), `SparseMoE.replace_experts` (expert streaming,
the routing log) and `DecoderLayer.combine` (tensor parallelism's sum over processes). What a
loaded model carries besides its weights is declared in `runtime.Runtime`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .runtime import Runtime


class Attention(nn.Module):
    """Multi-head attention with `num_key_value_heads` shared key/value heads (GQA) and RoPE."""

    def __init__(self, config: ModelConfig, parts: Parts):
        super().__init__()
        Linear = parts.linear  # noqa: N806 (a class)
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, hidden, bias=False)
        # Hugging Face layout: rotate the two halves of each head (not interleaved pairs).
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=config.rope_theta)

    def __call__(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        B, L, _ = x.shape
        # [B, L, heads * D] -> [B, heads, L, D]
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is None:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:  # the cache stores k, v (in its format: float or quantized) and attends over all it holds
            out = cache.attend(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class SwitchLinear(nn.Module):
    """`num_experts` bias-free linear layers stored as one `[experts, out, in]` weight.

    `mx.gather_mm` multiplies each row by the weight of the expert its index names, without
    materialising per-token weight copies or looping over experts on the host.
    """

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / max(1, input_dims))  # (0, 0, 0): an empty shell for from_weight
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    @classmethod
    def from_weight(cls, weight: mx.array) -> SwitchLinear:
        """A SwitchLinear holding `weight` ([experts, out, in]) as it is (no initialisation)."""
        layer = cls(0, 0, 0)
        layer.weight = weight
        return layer

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(
            x, self["weight"].swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedSwitchLinear":
        """Called by `nn.quantize`: the same experts, quantized in groups along the input."""
        weight, scales, *biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        return QuantizedSwitchLinear(weight, scales, biases[0] if biases else None, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """Quantized `SwitchLinear`: packed `weight` plus per-group `scales` and `biases` (mlx-lm's names)."""

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array | None,
                 group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales = weight, scales
        if biases is not None:
            self.biases = biases
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices,
            transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
            sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    """The experts: SwiGLU feed-forwards `down(silu(gate(x)) * up(x))`, evaluated only where routed."""

    # Below this many (token, expert) pairs sorting costs more than the locality it buys.
    SORT_THRESHOLD = 64

    def __init__(self, hidden: int, intermediate: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden, intermediate, num_experts)
        self.up_proj = SwitchLinear(hidden, intermediate, num_experts)
        self.down_proj = SwitchLinear(intermediate, hidden, num_experts)

    @classmethod
    def from_projections(cls, gate: nn.Module, up: nn.Module, down: nn.Module) -> SwitchGLU:
        """Experts made of given projections (e.g. one expert read from disk, `streamed_moe`)."""
        glu = cls(0, 0, 0)
        glu.gate_proj, glu.up_proj, glu.down_proj = gate, up, down
        return glu

    def glu(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """Rows `x` through the experts `indices` names, one expert per row."""
        g = self.gate_proj(x, indices, sorted_indices=sorted_indices)
        u = self.up_proj(x, indices, sorted_indices=sorted_indices)
        return self.down_proj(nn.silu(g) * u, indices, sorted_indices=sorted_indices)

    def pairs(self, run: Callable[[int, int], mx.array], n: int, axis: int) -> mx.array:
        """`run(0, n)`: the n (token, expert) pairs. They are independent, so a device-specific
        subclass may cut [0, n) into parts that run side by side, joined along `axis` (`row_split`)."""
        return run(0, n)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # x: [..., hidden], indices: [..., k] -> [..., k, hidden]
        k = indices.shape[-1]
        lead = indices.shape[:-1]
        if indices.size < self.SORT_THRESHOLD:  # decoding: the k expert slots of each token
            xs = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, hidden]
            return self.pairs(lambda a, b: self.glu(xs, indices[..., a:b], False), k, axis=-3).squeeze(-2)
        # Prompt processing: group the (token, expert) pairs by expert so each expert's weights
        # are streamed once, then restore the original order.
        flat = indices.flatten()
        order = mx.argsort(flat)
        inv_order = mx.argsort(order)
        xs = x.reshape(-1, 1, x.shape[-1])[order // k]  # [N*k, 1, hidden]
        idx = flat[order]
        y = self.pairs(lambda a, b: self.glu(xs[a:b], idx[a:b], True), idx.size, axis=0)
        return y[inv_order].reshape(*lead, k, -1)


class SparseMoE(nn.Module):
    """Router + experts. Softmax over the k selected logits equals HF's softmax -> top-k -> renormalise."""

    def __init__(self, config: ModelConfig, parts: Parts):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.switch_mlp = parts.experts(config.hidden_size, config.intermediate_size, config.num_local_experts)
        # Opt-in: leave out a token's experts weighted at most this fraction of its first (0: never).
        self.skip = 0.0

    def replace_experts(self, experts: nn.Module) -> nn.Module:
        """Put `experts` (called as `experts(x, indices)` -> `[..., k, hidden]`) in place of this
        layer's experts and return the previous ones: the hook that streaming and the routing
        log use."""
        previous, self.switch_mlp = self.switch_mlp, experts
        return previous

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.gate(x)  # [B, L, experts]
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])
        weights = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True)
        if self.skip > 0:
            indices, weights = skip_experts(indices, weights, self.skip)
        y = self.switch_mlp(x, indices)  # [B, L, k, hidden]
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


def skip_experts(indices: mx.array, weights: mx.array, fraction: float) -> tuple[mx.array, mx.array]:
    """Leave out each token's experts that the router weighs at most `fraction` of its first (the
    rule ik_llama.cpp ships as -ser; "Not All Experts are Equal", Lu et al. 2024): the others'
    weights are renormalised, and a left-out slot names the first expert with weight 0, so it
    costs no read (1: top-1 routing)."""
    first = mx.argmax(weights, axis=-1, keepdims=True)
    keep = (mx.arange(weights.shape[-1]) == first) | (weights > fraction * mx.take_along_axis(weights, first, axis=-1))
    kept = mx.where(keep, weights, 0.0)
    return mx.where(keep, indices, mx.take_along_axis(indices, first, axis=-1)), kept / kept.sum(axis=-1, keepdims=True)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, parts: Parts):
        super().__init__()
        self.self_attn = Attention(config, parts)
        self.block_sparse_moe = SparseMoE(config, parts)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Completes each sublayer's output before the residual add; set by tensor parallelism,
        # whose processes each compute a share of the sum (`distributed.sharding`).
        self.combine: Callable[[mx.array], mx.array] | None = None

    def attend(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        """The residual stream after attention (which also leaves this layer's keys and values in `cache`)."""
        combine = self.combine or (lambda y: y)
        return x + combine(self.self_attn(self.input_layernorm(x), mask, cache))

    def __call__(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        combine = self.combine or (lambda y: y)
        h = self.attend(x, mask, cache)
        return h + combine(self.block_sparse_moe(self.post_attention_layernorm(h)))


class MixtralModel(nn.Module):
    def __init__(self, config: ModelConfig, parts: Parts):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, parts) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.window = config.sliding_window

    def __call__(self, tokens: mx.array, cache: list[Any] | None, cache_only: bool = False) -> mx.array | None:
        """The final hidden states; with `cache_only` (a prefill), only what `cache` keeps: every
        layer's keys and values, so the last layer's experts, which feed nothing but the output,
        are skipped (None is returned)."""
        h = self.embed_tokens(tokens)  # [B, L, hidden]
        L = tokens.shape[1]
        if cache is None:
            cache = [None] * len(self.layers)
            mask = causal_mask(L, self.window) if L > 1 else None
        else:
            mask = cache[0].mask(L)  # every layer's cache has the same geometry
        *layers, last = zip(self.layers, cache, strict=True)
        for layer, c in layers:
            h = layer(h, mask, c)
        if cache_only:
            last[0].attend(h, mask, last[1])
            return None
        return self.norm(last[0](h, mask, last[1]))


class Mixtral(nn.Module):
    """Token ids `[batch, length]` (+ optional per-layer caches) -> logits `[batch, length, vocab]`."""

    def __init__(self, config: ModelConfig, parts: Parts | None = None):
        super().__init__()
        parts = parts or Parts()
        self.config = config
        self.model = MixtralModel(config, parts)
        if not config.tie_word_embeddings:
            self.lm_head = parts.linear(config.hidden_size, config.vocab_size, bias=False)
        self.runtime = Runtime()  # filled in by `loading` (fingerprint, expert cache, split, ...)

    def __call__(self, tokens: mx.array, cache: list[Any] | None = None, last_only: bool = False) -> mx.array:
        """`last_only=True` computes logits for the final position only (prefill needs no more)."""
        h = self.model(tokens, cache)
        if last_only:
            h = h[:, -1:, :]
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers


@dataclass(frozen=True)
class Parts:
    """The classes a Mixtral is built from. The defaults are plain MLX; a device may bring its own
    (same parameters, same results, e.g. `row_split.CPU_PARTS` computes in parallel parts)."""

    linear: type[nn.Linear] = nn.Linear
    experts: type[SwitchGLU] = SwitchGLU


def causal_mask(length: int, window: int | None) -> mx.array | str:
    """Causal mask for a whole sequence seen at once, restricted to the sliding window if any."""
    if not window or window >= length:
        return "causal"
    pos = mx.arange(length)
    return (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
