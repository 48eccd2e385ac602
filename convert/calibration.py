"""Calibration: how much each input channel of each linear layer carries, measured on real text.

`--calibration FILE` (or the text the package ships, `calibration.txt`) is tokenized with the
model's own tokenizer and cut into windows of WINDOW tokens. The converter then runs them through
the float model one layer at a time, as it converts (`Calibration.layer`): the layer is built
from model.py's `DecoderLayer` with that piece's float weights, and recording modules put in
front of its linear layers and experts (from outside, as streaming does) sum the squares of what
enters each input channel. Memory stays what the converter's is: one layer's weights, plus the
calibration activations (tokens x hidden size x 4 bytes; 2048 tokens of 8x7B: 32 MB).

Each expert counts only the tokens routed to it (and its down projection the SwiGLU activations
of those tokens). An expert that few or no calibration tokens reach gets its importance pulled
towards what every token of the layer carries (for its down projection, towards equal weights),
by PRIOR_TOKENS tokens' worth: never a degenerate, all-zero weighting.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_mixtral.config import ModelConfig
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.files import reason, regular_file
from mlx_mixtral.model import DecoderLayer, Parts, causal_mask
from mlx_mixtral.tokenizer import Tokenizer

SHIPPED = Path(__file__).with_name("calibration.txt")
WINDOW = 512  # tokens per calibration sequence
MAX_TOKENS = 2048  # calibration tokens used at most (the first ones of the text)
PRIOR_TOKENS = 16  # how many tokens' worth of the layer-wide importance an expert starts from
BATCH = 4  # sequences through a layer at once
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ("gate_proj", "up_proj", "down_proj")


def minimum_tokens(config: ModelConfig) -> int:
    """Fewer tokens than this cannot say much about every expert: 64 per expert on average."""
    return max(WINDOW // 2, 64 * config.num_local_experts // config.num_experts_per_tok)


def calibration_tokens(path: str | Path | None, tokenizer: Tokenizer, config: ModelConfig,
                       limit: int = MAX_TOKENS) -> mx.array:
    """The calibration text (`path`, or the shipped one) as [sequences, length] ids (windows of
    WINDOW tokens, or one shorter window), each starting with BOS; one-line errors for a file
    that is unreadable, empty, binary or too short."""
    path = SHIPPED if path is None else regular_file(path, "calibration text")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MixtralError(f"cannot read the calibration text {path}: {reason(e)}") from None
    if not raw.strip():
        raise MixtralError(f"the calibration text {path} is empty: give a text file of the kind the model will read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise MixtralError(f"the calibration text {path} is not text (binary data): give a UTF-8 text file")
    ids = tokenizer.encode_text(text)
    need = minimum_tokens(config)
    if len(ids) < need:
        raise MixtralError(f"the calibration text {path} has {len(ids)} tokens; this model needs at least {need} "
                           f"(about {need * 4 // 1000 + 1} KB of text) to see every expert")
    used = min(len(ids), limit)
    body = min(WINDOW, used + 1) - 1  # (a text shorter than a window is one window)
    return mx.array([[tokenizer.bos_id, *ids[i * body:(i + 1) * body]] for i in range(used // body)])


class _Inputs(nn.Module):
    """A linear layer that also sums the squares of its inputs, per input channel."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.squares, self.count = 0.0, 0

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.squares = self.squares + mx.square(flat).sum(axis=0)
        self.count += flat.shape[0]
        return self.inner(x)


class _Experts(nn.Module):
    """The experts, which also sum per expert the squares of the inputs routed to each (and of
    the SwiGLU activations that enter its down projection)."""

    def __init__(self, inner: nn.Module, experts: int) -> None:
        super().__init__()
        self.inner = inner
        self.inputs = [0.0] * experts
        self.hidden = [0.0] * experts
        self.counts = [0] * experts

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        chosen = indices.reshape(flat.shape[0], -1)
        for e in range(len(self.counts)):
            rows = mx.array([i for i, hit in enumerate((chosen == e).any(axis=-1).tolist()) if hit])
            if rows.size == 0:
                continue
            xe = flat[rows]
            gate, up = (getattr(self.inner, p).weight[e].astype(mx.float32) for p in ("gate_proj", "up_proj"))
            act = nn.silu(xe @ gate.T) * (xe @ up.T)
            self.inputs[e] = self.inputs[e] + mx.square(xe).sum(axis=0)
            self.hidden[e] = self.hidden[e] + mx.square(act).sum(axis=0)
            self.counts[e] += int(rows.size)
        return self.inner(x, indices)


class Calibration:
    """The calibration activations, carried through the model one converted piece at a time."""

    def __init__(self, tokens: mx.array, config: ModelConfig) -> None:
        self.tokens, self.config = tokens, config
        self.hidden: mx.array | None = None  # [sequences, WINDOW, hidden], float32
        self.counts: list[int] = []  # calibration tokens routed to each expert of the last layer

    @property
    def size(self) -> int:
        return self.tokens.size

    def embeddings(self, weights: dict[str, mx.array]) -> None:
        self.hidden = weights["model.embed_tokens.weight"][self.tokens].astype(mx.float32)
        mx.eval(self.hidden)

    def layer(self, index: int, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Importance (mean square input, per channel) of every linear layer of layer `index`,
        by module path ([in], or [experts, 1, in] for the experts); moves the activations on."""
        prefix = f"model.layers.{index}."
        layer = DecoderLayer(self.config, Parts())  # (its random initial weights are never evaluated)
        layer.update(tree_unflatten([(k.removeprefix(prefix), v.astype(mx.float32))
                                     for k, v in weights.items() if k.startswith(prefix)]))
        attention, moe = layer.self_attn, layer.block_sparse_moe
        for name in ATTENTION:
            setattr(attention, name, _Inputs(getattr(attention, name)))
        moe.gate = _Inputs(moe.gate)
        experts = _Experts(moe.switch_mlp, self.config.num_local_experts)
        moe.replace_experts(experts)
        mask = causal_mask(self.tokens.shape[1], self.config.sliding_window)
        out = []
        for b in range(0, self.hidden.shape[0], BATCH):
            out.append(layer(self.hidden[b:b + BATCH], mask, None))
            mx.eval(out[-1], *[getattr(attention, n).squares for n in ATTENTION], moe.gate.squares)
        self.hidden = mx.concatenate(out, axis=0)
        mx.eval(self.hidden)
        found = {f"{prefix}self_attn.{n}": _mean(getattr(attention, n)) for n in ATTENTION}
        found[f"{prefix}block_sparse_moe.gate"] = _mean(moe.gate)
        everyone = found[f"{prefix}block_sparse_moe.gate"]  # what every token brings to the experts
        ones = mx.ones((self.config.intermediate_size,), mx.float32)
        inputs = mx.stack([_blend(experts.inputs[e], experts.counts[e], everyone) for e in range(len(experts.counts))])
        level = _level(experts.hidden, experts.counts, self.config.intermediate_size)
        hidden = mx.stack([_blend(experts.hidden[e], experts.counts[e], ones * level) for e in range(len(experts.counts))])
        moe_path = f"{prefix}block_sparse_moe.switch_mlp."
        found[moe_path + "gate_proj"] = found[moe_path + "up_proj"] = inputs[:, None, :]
        found[moe_path + "down_proj"] = hidden[:, None, :]
        self.counts = list(experts.counts)
        return found

    def final(self, norm_weight: mx.array, eps: float) -> mx.array:
        """The importance of the lm_head's input: the final norm's output."""
        h = mx.fast.rms_norm(self.hidden, norm_weight.astype(mx.float32), eps)
        return mx.square(h.reshape(-1, h.shape[-1])).mean(axis=0)


def _mean(recorded: _Inputs) -> mx.array:
    return recorded.squares / max(recorded.count, 1)


def _blend(squares, count: int, prior: mx.array) -> mx.array:
    """An expert's mean square input, pulled towards `prior` by PRIOR_TOKENS tokens."""
    return (squares + PRIOR_TOKENS * prior) / (count + PRIOR_TOKENS) if count else prior


def _level(squares: list, counts: list[int], width: int) -> mx.array:
    """The mean square of the experts' SwiGLU activations over every routed token and channel
    (1 where no token was routed anywhere): the scale of an unreached expert's equal weights."""
    total = sum(counts)
    return sum(s.sum() for s, c in zip(squares, counts) if c) / (total * width) if total else mx.array(1.0)
