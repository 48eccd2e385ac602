"""Train a small Mixtral on real text: the yardstick for quality, routing and caching figures.

Random weights rank choices but mislead on magnitudes: random experts are unrelated functions and
random routing has no token-to-token locality. This trains a model with Mixtral's architecture
(8 experts, top-2, grouped-query attention, RoPE) and Mixtral's own 32000-piece tokenizer on the
Python standard library's source (present offline wherever Python is), with a held-out split of
whole files, and saves it as an ordinary Hugging Face checkpoint in float32 and bfloat16.

It trains with transformers' `MixtralForCausalLM` on CPU torch: measured here (`--compare-mlx`,
figures in RESULTS.md) torch runs forward+backward ~10x faster than MLX's CPU backend, whose
kernels are single-threaded. The run is deterministic (seeded batches drawn per step), resumable
(a checkpoint every `--save-every` steps and on Ctrl-C; run the same command again to go on), and
cached: later benchmarks find the model under `--out` and do not retrain.

    python -m benchmarks.train_small                    # ~25 min on 2 cores, then reuses it
    python -m benchmarks.train_small --report           # held-out perplexity, expert specialisation
    python -m benchmarks.train_small --compare-mlx      # tokens/s of one training step, torch vs MLX

The cache folder holds `float32/` and `bfloat16/` (save_pretrained + tokenizer.model), the
tokenized corpus, `train_state.pt` while training, and `report.json`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import sysconfig
import time
from pathlib import Path

import mistral_common
import numpy as np

from mlx_mixtral.progress import stderr_console

TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
DEFAULT_OUT = Path.home() / ".cache" / "mlx-mixtral" / "trained" / "stdlib-mixtral-h256-l4"
# Mixtral-8x7B's architecture at 1/16 of its width: 8 experts top-2, 4 query heads sharing 2
# key/value heads (Mixtral: 32 and 8), untied lm_head, the real vocabulary.
ARCH = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8,
            num_experts_per_tok=2, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, router_aux_loss_coef=0.02)
HELD_OUT_EVERY = 40  # one file in ~40, chosen by a hash of its path, is never trained on
EVAL_WINDOWS = 48  # held-out windows of --length tokens scored by --report


# -- the corpus ------------------------------------------------------------------------------------
def corpus_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts)
    return root, files


def is_held_out(relative: str) -> bool:
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def tokenized_corpus(out: Path) -> dict[str, np.ndarray]:
    """Train and held-out token streams (`<s>` file `</s>` ...), tokenized once and cached."""
    folder = out / "corpus"
    if (folder / "corpus.json").exists():
        return {split: np.load(folder / f"{split}.npy") for split in ("train", "heldout")}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    root, files = corpus_files()
    streams: dict[str, list[int]] = {"train": [], "heldout": []}
    counts = {"train": 0, "heldout": 0}
    digest = hashlib.sha256()
    with stderr_console.status(f"tokenizing {len(files)} files of {root}"):
        for f in files:
            rel = f.relative_to(root).as_posix()
            text = f.read_text(encoding="utf-8", errors="replace")
            digest.update(rel.encode() + b"\0" + text.encode())
            split = "heldout" if is_held_out(rel) else "train"
            streams[split] += [sp.bos_id(), *sp.encode(text), sp.eos_id()]
            counts[split] += 1
    tmp = folder.with_name("corpus.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = {split: np.asarray(ids, dtype=np.uint16) for split, ids in streams.items()}
    for split, a in arrays.items():
        np.save(tmp / f"{split}.npy", a)
    (tmp / "corpus.json").write_text(json.dumps({
        "source": str(root), "python": sys.version.split()[0], "files": counts,
        "tokens": {s: int(a.size) for s, a in arrays.items()}, "sha256": digest.hexdigest(),
        "held_out_rule": f"sha256(relative path) % {HELD_OUT_EVERY} == 0"}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # whole or absent
    return arrays


def batch(stream: np.ndarray, seed: int, step: int, size: int, length: int):
    """The step's batch: `size` random windows of `length + 1` tokens, fixed by (seed, step)."""
    import torch

    starts = np.random.default_rng((seed, step)).integers(0, stream.size - length - 1, size)
    return torch.from_numpy(np.stack([stream[s:s + length + 1] for s in starts]).astype(np.int64))


def eval_windows(stream: np.ndarray, length: int, count: int = EVAL_WINDOWS) -> np.ndarray:
    """`count` non-overlapping held-out windows of `length + 1` tokens, evenly spread."""
    starts = np.linspace(0, stream.size - length - 2, count).astype(np.int64)
    return np.stack([stream[s:s + length + 1] for s in starts]).astype(np.int64)


# -- training --------------------------------------------------------------------------------------
def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def save_atomically(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> None:
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import MixtralConfig, MixtralForCausalLM

    out: Path = args.out
    if (out / "float32" / "config.json").exists():
        stderr_console.print(f"trained model already at {out} (delete the folder to retrain)")
        return
    out.mkdir(parents=True, exist_ok=True)
    data = tokenized_corpus(out)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    config = MixtralConfig(**ARCH, output_router_logits=True)
    model = MixtralForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    state_file = out / "train_state.pt"
    start, history, seconds = 0, [], 0.0
    recipe = {k: getattr(args, k) for k in ("steps", "batch", "length", "lr", "seed")}
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        if state["recipe"] != recipe:
            raise SystemExit(f"error: {state_file} was trained with {state['recipe']}, not {recipe}; "
                             "run with those flags or delete it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history, seconds = state["step"], state["history"], state["seconds"]
        stderr_console.print(f"resuming at step {start}/{args.steps}")

    def checkpoint(step: int) -> None:
        save_atomically({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "history": history, "seconds": seconds, "recipe": recipe}, state_file)

    columns = [TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    # Ctrl-C ends the run at the next step boundary, so the saved state is exactly that of a step
    # (a second Ctrl-C stops at once, keeping the last periodic checkpoint).
    stop: list[bool] = []

    def on_interrupt(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)

    signal.signal(signal.SIGINT, on_interrupt)
    model.train()
    with Progress(*columns, console=stderr_console) as bar:
        task = bar.add_task("train", total=args.steps, completed=start, info="")
        for step in range(start, args.steps):
            if stop:
                checkpoint(step)
                bar.stop()
                stderr_console.print(f"stopped at step {step}: saved; run the same command to resume")
                raise SystemExit(130)
            t = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args.steps, args.lr)
            x = batch(data["train"], args.seed, step, args.batch, args.length)
            result = model(input_ids=x, labels=x)  # transformers shifts the labels itself
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t
            seconds += dt
            aux = float(result.aux_loss.detach())
            history.append({"step": step, "loss": float(result.loss.detach()) - ARCH["router_aux_loss_coef"] * aux,
                            "aux": aux, "tokens_per_s": args.batch * args.length / dt})
            recent = history[-20:]
            info = (f"loss {np.mean([h['loss'] for h in recent]):.3f} · "
                    f"{np.median([h['tokens_per_s'] for h in recent]):.0f} tok/s")
            bar.update(task, advance=1, info=info)
            if not stderr_console.is_terminal and (step + 1) % 25 == 0:  # a log file gets plain lines
                print(f"step {step + 1}/{args.steps}: {info}", file=sys.stderr, flush=True)
            if (step + 1) % args.save_every == 0:
                checkpoint(step + 1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    checkpoint(args.steps)
    export(model, out, {**recipe, "seconds": seconds, "tokens": args.steps * args.batch * args.length,
                        "final_loss": float(np.mean([h["loss"] for h in history[-20:]]))})
    (out / "history.json").write_text(json.dumps(history))
    state_file.unlink()


def export(model, out: Path, training: dict) -> None:
    """float32/ and bfloat16/ Hugging Face folders, each written whole or not at all.

    Each is saved from a copy: `Module.to` casts in place, and a float32 export taken after the
    bfloat16 one would hold bfloat16-rounded weights.
    """
    import torch

    model.config.output_router_logits = False
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):  # float32 last: it marks done
        tmp = out / f"{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        copy.deepcopy(model).to(dtype).save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(TOKENIZER, tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
             "unk_token": "<unk>"}))
        (tmp / "training.json").write_text(json.dumps(training, indent=1))
        shutil.rmtree(out / name, ignore_errors=True)
        tmp.rename(out / name)


# -- the report ------------------------------------------------------------------------------------
def unigram_perplexity(train_ids: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    """Perplexity of the held-out targets under train-set token frequencies (add-one smoothed)."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[heldout].mean()))


def report(out: Path, length: int) -> dict:
    """Held-out perplexity (transformers), unigram baseline, and how the experts specialise."""
    import torch
    from transformers import MixtralForCausalLM

    data = tokenized_corpus(out)
    windows = torch.from_numpy(eval_windows(data["heldout"], length))
    model = MixtralForCausalLM.from_pretrained(out / "float32", dtype=torch.float32).eval()
    nll, chosen = [], []
    with torch.no_grad():
        for i in range(0, len(windows), 8):
            x = windows[i:i + 8]
            res = model(input_ids=x[:, :-1], output_router_logits=True)
            logp = torch.log_softmax(res.logits.float(), -1)
            nll.append(-logp.gather(-1, x[:, 1:, None]).squeeze(-1))
            k = model.config.num_experts_per_tok
            chosen.append(torch.stack([r.reshape(x.shape[0], -1, r.shape[-1]).topk(k, -1).indices
                                       for r in res.router_logits], 0))  # [layers, B, L, k]
    nll_all = torch.cat(nll).double()
    experts = torch.cat(chosen, 1).numpy()  # [layers, windows, L, k]
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    share = np.stack([np.bincount(experts[layer].ravel(), minlength=E) / experts[layer].size
                      for layer in range(experts.shape[0])])
    # consecutive tokens: how many of token t+1's k experts token t also used, as a fraction of k
    same = (experts[:, :, 1:, :, None] == experts[:, :, :-1, None, :]).any(-1).mean((1, 2, 3))
    targets = windows[:, 1:].numpy().ravel()
    result = {
        "model": str(out / "float32"), "heldout_tokens": int(targets.size),
        "heldout_perplexity": float(torch.exp(nll_all.mean())),
        "unigram_perplexity": unigram_perplexity(data["train"], targets, model.config.vocab_size),
        "expert_share": share.round(4).tolist(),
        "consecutive_reuse": same.round(4).tolist(), "consecutive_reuse_if_random": k / E,
        "corpus": json.loads((out / "corpus" / "corpus.json").read_text()),
        "training": json.loads((out / "float32" / "training.json").read_text()),
    }
    (out / "report.json").write_text(json.dumps(result, indent=1))
    return result


def show(result: dict) -> None:
    from rich.table import Table

    stderr_console.print(f"held-out perplexity {result['heldout_perplexity']:.2f} over "
                         f"{result['heldout_tokens']} tokens; unigram baseline {result['unigram_perplexity']:.1f}")
    table = Table(title="share of routed tokens per expert (uniform = 12.5%)")
    table.add_column("layer")
    E = len(result["expert_share"][0])
    for e in range(E):
        table.add_column(f"e{e}", justify="right")
    table.add_column("consecutive reuse", justify="right")
    for layer, (row, reuse) in enumerate(zip(result["expert_share"], result["consecutive_reuse"])):
        cells = [f"[reverse]{s:.0%}[/]" if s > 2 / E else f"{s:.0%}" for s in row]
        table.add_row(str(layer), *cells, f"{reuse:.0%} (random {result['consecutive_reuse_if_random']:.0%})")
    stderr_console.print(table)
    print(json.dumps({k: v for k, v in result.items() if k not in ("expert_share",)}, indent=1))


# -- torch against MLX -----------------------------------------------------------------------------
def compare_frameworks(args: argparse.Namespace) -> None:
    """Median tokens/s of a training step (forward, backward, AdamW) in torch and in MLX."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from mlx_mixtral.config import ModelConfig
    from mlx_mixtral.model import Mixtral

    tokens = args.batch * args.length
    x = np.random.default_rng(0).integers(3, ARCH["vocab_size"], (args.batch, args.length + 1))
    torch.set_num_threads(args.threads)
    model = MixtralForCausalLM(MixtralConfig(**ARCH, output_router_logits=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tx = torch.from_numpy(x)
    rates = []
    for _ in range(4):
        t = time.perf_counter()
        model(input_ids=tx[:, :-1], labels=tx[:, :-1]).loss.backward()
        opt.step()
        opt.zero_grad()
        rates.append(tokens / (time.perf_counter() - t))
    torch_rate = float(np.median(rates[1:]))
    fields = {k: ARCH[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "num_local_experts", "num_experts_per_tok", "rope_theta", "rms_norm_eps")}
    mlx_model = Mixtral(ModelConfig(**fields))
    mlx_opt = optim.AdamW(1e-3)
    mxx = mx.array(x)

    def loss_fn(m, batch_):
        return nn.losses.cross_entropy(m(batch_[:, :-1]), batch_[:, 1:]).mean()

    step = nn.value_and_grad(mlx_model, loss_fn)
    rates = []
    for _ in range(4):
        t = time.perf_counter()
        loss, grads = step(mlx_model, mxx)
        mlx_opt.update(mlx_model, grads)
        mx.eval(mlx_model.parameters(), mlx_opt.state, loss)
        rates.append(tokens / (time.perf_counter() - t))
    mlx_rate = float(np.median(rates[1:]))
    print(f"training step, batch {args.batch} x {args.length}, {args.threads} threads: "
          f"torch {torch_rate:.0f} tok/s, MLX {mlx_rate:.0f} tok/s (torch {torch_rate / mlx_rate:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache folder (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--report", action="store_true", help="score the trained model (trains it first if needed)")
    parser.add_argument("--compare-mlx", action="store_true", help="time one training step in torch and MLX")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.compare_mlx:
        return compare_frameworks(args)
    train(args)
    show(report(args.out, args.length))


if __name__ == "__main__":
    main()
