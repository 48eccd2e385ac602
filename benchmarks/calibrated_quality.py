"""Bits per byte on the trained yardstick: round-to-nearest vs calibrated quantization, mlx-lm's
recipes at the same bytes, the low-bit miss copy, and the expert-skip rule.

All on the small Mixtral `benchmarks/train_small.py` trains (real text, real routing), scored on
its held-out windows against its float32 self: held-out perplexity, KL(float || quantized) of
the next-token distributions (nats, mean over positions) and top-1 agreement (`quant_quality`'s
measures). Calibration uses the text the package ships (`convert/calibration.txt`), not the
yardstick's corpus, as a user converting with `--calibration` would.

- RTN vs calibrated, 2/3/4 bits, group sizes 32 and 64 (our defaults: router float, embeddings
  and lm_head 8-bit; bfloat16 scales).
- The miss copy: every expert at 2 or 3 bits with attention at 4, against the resident 4-bit
  model, RTN and calibrated (the worst case of `--miss-bits`: every expert read is a miss).
- mlx-lm: `mlx_lm convert -q --q-bits 2/3` and `--quant-predicate mixed_2_6 / mixed_3_4`, loaded
  by us, with their bits per weight beside ours.
- `--expert-skip`: KL against the same model without skipping, and the share of second experts
  left out (each one an expert not read).

    python -m benchmarks.calibrated_quality [--windows 16]      # ~10 min on 2 cores
    python -m benchmarks.calibrated_quality --converter-cost    # weighted quantization's cost
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks import train_small
from benchmarks.quant_quality import CHUNK, compare, perplexity, run_model
from convert.convert import convert, parameter_count
from convert.weighted_quant import weighted_quantize
from mlx_mixtral.config import ModelConfig
from mlx_mixtral.loading import load_model

SKIPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
MLX_LM = (("mlx-lm 2-bit", ["--q-bits", "2"]), ("mlx-lm 3-bit", ["--q-bits", "3"]),
          ("mlx-lm mixed_2_6", ["--q-bits", "2", "--quant-predicate", "mixed_2_6"]),
          ("mlx-lm mixed_3_4", ["--q-bits", "3", "--quant-predicate", "mixed_3_4"]))


def score(model, windows: np.ndarray, ref: list | None = None, ref4: list | None = None) -> tuple[dict, dict | None, list]:
    """One forward pass over `windows`: held-out perplexity and, against each reference's chunks
    (the float model's, the resident 4-bit model's), KL, top-1 agreement and expert sets changed;
    and this model's own chunks, to be a reference in turn."""
    chunks = [run_model(model, mx.array(windows[i:i + CHUNK, :-1])) for i in range(0, len(windows), CHUNK)]
    ppl = {"perplexity": perplexity([c[0] for c in chunks], windows)}

    def against(reference: list | None) -> dict | None:
        if reference is None:
            return None
        return {**ppl, **dict(zip(("kl", "top1", "changed"), np.mean([compare(r, c) for r, c in zip(reference, chunks)],
                                                                      axis=0)))}

    return against(ref) or ppl, against(ref4), chunks


def bits_per_weight(folder: Path, config: ModelConfig) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) * 8 / parameter_count(config)


def left_out_share(model, windows: np.ndarray) -> float:
    """The share of (token, layer) second experts the model's skip rule leaves out on `windows`
    (a left-out slot names the token's first expert again)."""
    left, total = 0, 0
    for i in range(0, len(windows), 8):
        x = mx.array(windows[i:i + 8, :-1])
        seen: list[mx.array] = []
        inner = [layer.block_sparse_moe.switch_mlp for layer in model.layers]
        for layer, experts in zip(model.layers, inner):
            layer.block_sparse_moe.switch_mlp = lambda h, idx, experts=experts, seen=seen: (seen.append(idx), experts(h, idx))[1]
        try:
            mx.eval(model(x))
        finally:
            for layer, experts in zip(model.layers, inner):
                layer.block_sparse_moe.switch_mlp = experts
        for idx in seen:
            a = np.array(idx).reshape(-1, idx.shape[-1])
            left += int((a[:, 0] == a[:, 1]).sum())
            total += a.shape[0]
    return left / total


def mlx_lm_folder(src: Path, work: Path, name: str, flags: list[str]) -> Path:
    out = work / name.replace(" ", "-")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out),
                          "-q", "--q-group-size", "64", "--dtype", "bfloat16", *flags],
                         capture_output=True, text=True, env=env, timeout=1200)
    if run.returncode != 0:
        raise SystemExit(f"mlx_lm convert failed: {run.stderr[-800:]}")
    return out


def with_tokenizer_config(src: Path, work: Path) -> Path:
    """The float32 yardstick with the tokenizer_config.json mlx-lm needs to load it offline."""
    out = work / "source"
    shutil.copytree(src, out)
    if not (out / "tokenizer_config.json").is_file():
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    return out


def main_quality(out: Path, count: int, length: int) -> None:
    src = out / "float32"
    if not (src / "model.safetensors").is_file():
        raise SystemExit(f"error: {src} has no trained model; run python -m benchmarks.train_small first")
    windows = train_small.eval_windows(np.load(out / "corpus" / "heldout.npy"), length, count)
    config = ModelConfig.from_file(src / "config.json")
    work = Path(tempfile.mkdtemp(prefix="calibrated_quality-"))
    rows: list[tuple[str, str, float, dict, dict | None]] = []  # section, label, bpw, vs float, vs 4-bit

    def measure(folder: Path, ref: list, ref4: list | None = None, **load) -> tuple[dict, dict | None, list]:
        return score(load_model(folder, progress=False, **load), windows, ref, ref4)

    try:
        source = with_tokenizer_config(src, work)
        base, _, ref = score(load_model(source, progress=False), windows)
        print(f"float32 held-out perplexity {base['perplexity']:.3f}", file=sys.stderr)
        four = {}
        for group in (32, 64):
            for cal in (False, True):
                dst = work / f"q4-g{group}-{cal}"
                convert(source, dst, quantize=True, bits=4, group_size=group, dtype="bfloat16", progress=False,
                        calibration=cal or None)
                _, _, four[group, cal] = measure(dst, ref)
        for bits in (2, 3, 4):
            for group in (32, 64):
                for cal in (False, True):
                    dst = work / f"q{bits}-g{group}-{cal}"
                    if not dst.exists():
                        convert(source, dst, quantize=True, bits=bits, group_size=group, dtype="bfloat16",
                                progress=False, calibration=cal or None)
                    r, _, _ = measure(dst, ref)
                    label = f"{bits}-bit, group {group}, {'calibrated' if cal else 'round-to-nearest'}"
                    rows.append(("main", label, bits_per_weight(dst, config), r, None))
                    print(label, r, file=sys.stderr)
        for bits in (2, 3):
            for cal in (False, True):
                dst = work / f"miss{bits}-{cal}"
                convert(source, dst, quantize=True, bits=bits, attention_bits=4, group_size=32, dtype="bfloat16",
                        progress=False, calibration=cal or None)
                r, vs4, _ = measure(dst, ref, four[32, cal])
                label = f"every expert {bits}-bit (attention 4), group 32, {'calibrated' if cal else 'round-to-nearest'}"
                rows.append(("miss", label, bits_per_weight(dst, config), r, vs4))
                print(label, r, vs4, file=sys.stderr)
        for label, flags in MLX_LM:
            dst = mlx_lm_folder(source, work, label, flags)
            r, _, _ = measure(dst, ref)
            rows.append(("mlx-lm", label, bits_per_weight(dst, config), r, None))
            print(label, r, file=sys.stderr)
        for bits in (2, 3):  # every layer at the same bits, as mlx-lm's plain -q: the same bytes
            for cal in (False, True):
                dst = work / f"all{bits}-{cal}"
                convert(source, dst, quantize=True, bits=bits, router_bits=bits, embed_bits=bits, lm_head_bits=bits,
                        group_size=64, dtype="bfloat16", progress=False, calibration=cal or None)
                r, _, _ = measure(dst, ref)
                label = f"ours: all {bits}-bit, group 64, {'calibrated' if cal else 'round-to-nearest'}"
                rows.append(("mlx-lm", label, bits_per_weight(dst, config), r, None))
        for cal in (False, True):
            dst = work / f"q3a4-{cal}"
            convert(source, dst, quantize=True, bits=3, attention_bits=4, group_size=64, dtype="bfloat16",
                    progress=False, calibration=cal or None)
            r, _, _ = measure(dst, ref)
            label = f"ours: experts 3-bit, attention 4-bit, group 64, {'calibrated' if cal else 'round-to-nearest'}"
            rows.append(("mlx-lm", label, bits_per_weight(dst, config), r, None))
        skips = []
        folder = work / "q4-g64-True"
        for fraction in SKIPS:
            model = load_model(folder, progress=False, expert_skip=fraction)
            share = left_out_share(model, windows)
            vs_float, r, _ = score(model, windows, ref, four[64, True])
            skips.append((fraction, share, r, vs_float))
            print(fraction, share, r, vs_float, file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tokens = windows.size - len(windows)
    print(f"Trained yardstick {src}: {tokens} held-out tokens ({count} windows of {length}); float32 perplexity "
          f"{base['perplexity']:.3f}. Calibration: convert/calibration.txt (the shipped text).\n")
    print("| quantization | bits/weight (this model) | held-out ppl | KL vs float | top-1 agree | KL vs 4-bit resident |")
    print("|---|---:|---:|---:|---:|---:|")
    for _, label, bpw, r, vs4 in rows:
        extra = f"{vs4['kl']:.4f}" if vs4 else ""
        print(f"| {label} | {bpw:.2f} | {r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1']:.1%} | {extra} |")
    print("\n| --expert-skip (4-bit calibrated, group 64) | second experts left out | KL vs no skip | KL vs float "
          "| held-out ppl |")
    print("|---:|---:|---:|---:|---:|")
    for fraction, share, r, vs_float in skips:
        print(f"| {fraction} | {share:.1%} | {r['kl']:.4f} | {vs_float['kl']:.4f} | {r['perplexity']:.3f} |")


def main_cost() -> None:
    """Weighted quantization's cost on one Mixtral-8x7B expert projection (14336 x 4096), against
    round-to-nearest, and the matmul rate that models the calibration forward pass."""
    w = mx.random.normal((14336, 4096)).astype(mx.bfloat16)
    a = mx.random.uniform(0.1, 10.0, (4096,))
    mx.eval(w, a)
    for bits in (2, 4):
        start = time.perf_counter()
        mx.eval(*mx.quantize(w, 64, bits))
        rtn = time.perf_counter() - start
        start = time.perf_counter()
        mx.eval(*weighted_quantize(w, a, 64, bits, mx.bfloat16))
        weighted = time.perf_counter() - start
        print(f"{bits}-bit, group 64: round-to-nearest {rtn:.2f} s, weighted {weighted:.1f} s for {w.size / 1e6:.1f}M "
              f"weights ({w.size / weighted / 1e6:.2f}M weights/s)")
    x = mx.random.normal((2048, 4096))
    wf = w.astype(mx.float32)
    mx.eval(x, wf)
    start = time.perf_counter()
    mx.eval(x @ wf.T)
    seconds = time.perf_counter() - start
    print(f"matmul 2048x4096 @ 4096x14336 (float32): {seconds:.2f} s, {2 * 2048 * 4096 * 14336 / seconds / 1e9:.0f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", type=Path, default=train_small.DEFAULT_OUT, metavar="DIR")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--converter-cost", action="store_true")
    args = parser.parse_args()
    if args.converter_cost:
        main_cost()
    else:
        main_quality(args.trained, args.windows, args.length)


if __name__ == "__main__":
    main()
