"""The Mixtral decoder (Jiang et al., 2024, "Mixtral of Experts") in MLX.

Each of the `num_hidden_layers` blocks is

    h = x + Attention(RMSNorm(x))            grouped-query attention with RoPE
    y = h + SparseMoE(RMSNorm(h))            top-k of E SwiGLU experts, chosen per token

Parameter names follow mlx-lm's Mixtral exactly (`block_sparse_moe.switch_mlp.{gate,up,down}_proj`
with experts stacked as `[experts, out, in]`), so models converted by either tool load in both.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .device import in_parallel, parallel_ways, spans


class _RowParallel:
    """Mixed into MLX's linear layers: on a multi-core CPU the output features are computed in
    parallel parts (see device.in_parallel), each from a contiguous row block of the weight (and
    of the scales and biases: all are row-major in the output feature), a view, not a copy. The
    results are bitwise those of one call. On a GPU the layer runs as MLX's own."""

    def __call__(self, x: mx.array) -> mx.array:
        ways = parallel_ways()
        if ways == 1 or "bias" in self:  # our projections are bias-free
            return super().__call__(x)
        return in_parallel([lambda a=a, b=b: self._rows(x, a, b)
                            for a, b in spans(self["weight"].shape[0], ways)], axis=-1)


class Linear(_RowParallel, nn.Linear):
    def _rows(self, x: mx.array, a: int, b: int) -> mx.array:
        return x @ self["weight"][a:b].T

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> nn.Module:
        """Called by `nn.quantize`: our `QuantizedLinear`, so the split survives quantization."""
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(_RowParallel, nn.QuantizedLinear):
    def _rows(self, x: mx.array, a: int, b: int) -> mx.array:
        biases = self.get("biases")
        return mx.quantized_matmul(
            x, self["weight"][a:b], self["scales"][a:b], None if biases is None else biases[a:b],
            transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode)


class Attention(nn.Module):
    """Multi-head attention with `num_key_value_heads` shared key/value heads (GQA) and RoPE."""

    def __init__(self, config: ModelConfig):
        super().__init__()
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
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

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

    def _glu(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        g = self.gate_proj(x, indices, sorted_indices=sorted_indices)
        u = self.up_proj(x, indices, sorted_indices=sorted_indices)
        return self.down_proj(nn.silu(g) * u, indices, sorted_indices=sorted_indices)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # x: [..., hidden], indices: [..., k] -> [..., k, hidden]
        # The (token, expert) pairs are independent, so on a multi-core CPU they are cut into
        # parts that run side by side (see device.in_parallel); on a GPU there is one part.
        k = indices.shape[-1]
        lead = indices.shape[:-1]
        ways = parallel_ways()
        if indices.size < self.SORT_THRESHOLD:  # decoding: split the k expert slots
            xs = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, hidden]
            y = in_parallel([lambda a=a, b=b: self._glu(xs, indices[..., a:b], False)
                             for a, b in spans(k, ways)], axis=-3)
            return y.squeeze(-2)
        # Prompt processing: group the (token, expert) pairs by expert so each expert's weights
        # are streamed once, then restore the original order.
        flat = indices.flatten()
        order = mx.argsort(flat)
        inv_order = mx.argsort(order)
        xs = x.reshape(-1, 1, x.shape[-1])[order // k]  # [N*k, 1, hidden]
        idx = flat[order]
        y = in_parallel([lambda a=a, b=b: self._glu(xs[a:b], idx[a:b], True)
                         for a, b in spans(idx.size, ways)], axis=0)
        return y[inv_order].reshape(*lead, k, -1)


class SparseMoE(nn.Module):
    """Router + experts. Softmax over the k selected logits equals HF's softmax -> top-k -> renormalise."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.switch_mlp = SwitchGLU(config.hidden_size, config.intermediate_size, config.num_local_experts)

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.gate(x)  # [B, L, experts]
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])
        weights = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True)
        y = self.switch_mlp(x, indices)  # [B, L, k, hidden]
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.block_sparse_moe = SparseMoE(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class MixtralModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.window = config.sliding_window

    def __call__(self, tokens: mx.array, cache: list[Any] | None) -> mx.array:
        h = self.embed_tokens(tokens)  # [B, L, hidden]
        L = tokens.shape[1]
        if cache is None:
            cache = [None] * len(self.layers)
            mask = _uncached_mask(L, self.window) if L > 1 else None
        else:
            mask = cache[0].mask(L)  # every layer's cache has the same geometry
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Mixtral(nn.Module):
    """Token ids `[batch, length]` (+ optional per-layer caches) -> logits `[batch, length, vocab]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MixtralModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

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


def _uncached_mask(length: int, window: int | None) -> mx.array | str:
    """Causal mask for a whole sequence seen at once, restricted to the sliding window if any."""
    if not window or window >= length:
        return "causal"
    pos = mx.arange(length)
    return (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
