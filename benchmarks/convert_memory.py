"""Peak memory of converting a Mixtral-shaped checkpoint: our converter against `mlx_lm convert`.

Generates a checkpoint with Mixtral-8x7B's real widths (hidden 4096, intermediate 14336, 8
experts, vocabulary 32000) but only `--layers` layers, in bfloat16, saved the way Hugging Face
does (classic per-expert tensors, 5 GB shards plus an index), then converts it with
`python -m convert` and `python -m mlx_lm convert`, float and 4-bit, each in its own process.
The peak resident memory of each process comes from `os.wait4` (its own ru_maxrss) and is shown
against the input's size and its largest shard.

The generator streams every tensor to disk from a small pool of random values, so it needs a few
hundred MB whatever the checkpoint's size. Data goes under --work (default /tmp/convert_memory),
removed at the end unless --keep.

    python -m benchmarks.convert_memory [--layers 2] [--work /tmp/convert_memory] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import mistral_common
import numpy as np

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, EXPERTS, VOCAB, HEADS, KV_HEADS = 4096, 14336, 8, 32000, 32, 8
SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size, as in Mixtral's own repo
POOL = 1 << 24  # random bfloat16 values every tensor is cut from


def tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every tensor, in the order transformers saves them."""
    kv = KV_HEADS * HIDDEN // HEADS
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,)),
                (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
                (p + "self_attn.v_proj.weight", (kv, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                (p + "block_sparse_moe.gate.weight", (EXPERTS, HIDDEN))]
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            out += [(q + "w1.weight", (INTERMEDIATE, HIDDEN)), (q + "w2.weight", (HIDDEN, INTERMEDIATE)),
                    (q + "w3.weight", (INTERMEDIATE, HIDDEN))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_shard(path: Path, shard: list[tuple[str, tuple[int, ...]]], pool: np.ndarray, rng) -> None:
    """A safetensors file written tensor by tensor: header first, then bytes cut from `pool`."""
    header, offset = {}, 0
    for name, shape in shard:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, shape in shard:
            left = int(np.prod(shape))
            while left:
                start = int(rng.integers(0, POOL // 2))
                n = min(left, POOL - start)
                f.write(pool[start:start + n].tobytes())
                left -= n


def generate(folder: Path, layers: int) -> None:
    """A Hugging Face-style bfloat16 Mixtral checkpoint with `layers` layers, plus its tokenizer."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(POOL, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    pool = pool.astype(np.uint16)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in tensors(layers):
        size = int(np.prod(shape)) * 2
        if shards[-1] and filled + size > SHARD_BYTES:
            shards.append([])
            filled = 0
        shards[-1].append((name, shape))
        filled += size
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / name, shard, pool, rng)
        weight_map.update(dict.fromkeys((n for n, _ in shard), name))
    total = sum(int(np.prod(s)) * 2 for _, s in tensors(layers))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=VOCAB,
                  hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_local_experts=EXPERTS,
                  num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
                  sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16",
                  bos_token_id=1, eos_token_id=2)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))


def measure(cmd: list[str]) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of one command, from the kernel's accounting for that child."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return rss, time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/convert_memory"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = parser.parse_args()

    src = args.work / f"mixtral-shaped-{args.layers}l"
    if not src.exists():
        start = time.perf_counter()
        generate(src, args.layers)
        print(f"generated {src} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    files = sorted(src.glob("*.safetensors"))
    size, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)

    ours = [sys.executable, "-m", "convert"]
    theirs = [sys.executable, "-m", "mlx_lm", "convert"]
    runs = [("mlx-mixtral", "bf16", ours, []), ("mlx-lm", "bf16", theirs, []),
            ("mlx-mixtral", "bf16, --max-shard-size 1GB", ours, ["--max-shard-size", "1GB"]),
            ("mlx-mixtral", "4-bit", ours, ["-q", "--q-bits", "4"]), ("mlx-lm", "4-bit", theirs, ["-q", "--q-bits", "4"]),
            ("mlx-mixtral", "4-bit, --max-shard-size 1GB", ours, ["-q", "--q-bits", "4", "--max-shard-size", "1GB"])]
    print(f"Input: {src.name}, {args.layers} layers, {size / 1e9:.2f} GB in {len(files)} shards "
          f"(largest {largest / 1e9:.2f} GB); {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM\n")
    print("| converter | output | peak RSS | / input | / largest shard | time | output size |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for tool, label, cmd, flags in runs:
        out = args.work / "out"
        shutil.rmtree(out, ignore_errors=True)
        rss, seconds = measure([*cmd, "--hf-path", str(src), "--mlx-path", str(out), *flags])
        print(f"| {tool} | {label} | {rss / 1e9:.2f} GB | {rss / size:.2f} | {rss / largest:.2f} "
              f"| {seconds:.0f} s | {folder_bytes(out) / 1e9:.2f} GB |", flush=True)
        shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(src)


if __name__ == "__main__":
    main()
