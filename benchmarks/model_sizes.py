"""Sizes of Mixtral-8x7B and 8x22B at each precision, and the memory budgets that follow from them.

Computed from the shapes with the converter's own arithmetic (`convert.output_model` under the
converter's quantization policy, bfloat16 scales and floats, as a conversion of the bf16 releases
gives), so nothing is downloaded. For each size: the smallest Mac that holds it resident (macOS
lets the GPU use about 75% of memory by default, see README) and `--max-memory` for streaming on
the Macs that cannot, with the resident part (everything but the experts) and one expert's size.

    python -m benchmarks.model_sizes            # markdown tables for README / RESULTS
"""

from __future__ import annotations

import mlx.core as mx

from benchmarks.synthetic import SHAPES
from convert.convert import nbytes, output_model
from convert.quant_policy import QuantPolicy, quantizable_modules

RECIPES = [  # (label, converter flags, policy; None = bf16 as published)
    ("bf16 as published", "(no flag)", None),
    ("8-bit", "-q --q-bits 8", dict(bits=8)),
    ("4-bit", "-q --q-bits 4", dict(bits=4)),
    ("3-bit, attention 6-bit", "-q --q-bits 3 --attention-bits 6", dict(bits=3, attention_bits=6)),
    ("2-bit, attention 4-bit", "-q --q-bits 2 --attention-bits 4", dict(bits=2, attention_bits=4)),
]
MACS_GB = (8, 16, 24, 32, 36, 48, 64, 96, 128, 192)
GPU_SHARE = 0.75  # what Metal lets the GPU wire by default on most Macs
BUDGET_SHARE = 0.6  # --max-memory suggested for a Mac: room left for macOS, apps and the KV cache
STAGING = 0.12e9  # read buffers beside the cached experts (README, expert streaming)
STREAMING = {"mixtral-8x7b": (8, 16, 24, 32), "mixtral-8x22b": (32, 48, 64, 96, 128)}


def sizes(shape: str, policy: dict | None) -> tuple[int, int, int]:
    """(total bytes, bytes outside the experts, bytes of one expert) of `shape` under `policy`."""
    config = SHAPES[shape]
    plan = None
    if policy is not None:
        plan = QuantPolicy(group_size=64, **policy).plan(quantizable_modules(output_model(config)))
    model = output_model(config, plan)
    total = nbytes(model, mx.bfloat16)
    experts = sum(nbytes(layer.block_sparse_moe.switch_mlp, mx.bfloat16) for layer in model.layers)
    per_expert = experts // (config.num_hidden_layers * config.num_local_experts)
    return total, total - experts, per_expert


def smallest_mac(total: int) -> str:
    for mac in MACS_GB:
        if total <= mac * 1e9 * GPU_SHARE:
            return f"{mac} GB"
    return "none (stream, or several Macs)"


def main() -> None:
    for shape in ("mixtral-8x7b", "mixtral-8x22b"):
        config = SHAPES[shape]
        print(f"\n### {shape} ({config.num_hidden_layers} layers x {config.num_local_experts} experts)\n")
        print("| precision | convert flags | size | resident part | one expert | smallest Mac resident |")
        print("|---|---|---:|---:|---:|---|")
        for label, flags, policy in RECIPES:
            total, resident, expert = sizes(shape, policy)
            print(f"| {label} | `{flags}` | {total / 1e9:.1f} GB | {resident / 1e9:.2f} GB | "
                  f"{expert / 1e6:.0f} MB | {smallest_mac(total)} |")
        total, resident, expert = sizes(shape, dict(bits=4))
        experts = config.num_hidden_layers * config.num_local_experts
        print(f"\n4-bit ({total / 1e9:.1f} GB) on smaller Macs, streaming the experts:\n")
        print("| Mac | `--max-memory` | experts cached |")
        print("|---|---|---:|")
        for mac in STREAMING[shape]:
            if total <= mac * 1e9 * GPU_SHARE:
                print(f"| {mac} GB | none: fits resident | {experts}/{experts} |")
                continue
            budget = int(mac * BUDGET_SHARE)
            cached = min(experts, max(0, int((budget * 1e9 - resident - STAGING) // expert)))
            print(f"| {mac} GB | `{budget}GB` | {cached}/{experts} ({cached / experts:.0%}) |")


if __name__ == "__main__":
    main()
