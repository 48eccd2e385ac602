"""Expert streaming on a model larger than this machine's RAM, side by side with mlx-lm.

    python -m benchmarks.streaming                                  # 6/10/14 GB, LRU and LFU
    python -m benchmarks.streaming --budgets 10GB --policies lru --pp 8 --tg 6

Writes (once) a random Mixtral-8x7B at 4 bits in mlx-lm's layout (26.3 GB, bf16 scales, under
~/.cache/mlx-mixtral/synthetic), then for every budget x policy (and the first budget without
prefetch) runs `benchmarks/bench.py --max-memory` on it in a fresh process: tok/s for pp and tg,
hit rate, bytes read per token, the disk bandwidth measured in that run and the share of it
streaming reached; meanwhile it samples how much of the model files the page cache holds, and
the child reports its own peak RSS. Then it runs mlx-lm on the same folder in a process
of its own whose address space is capped below the available RAM (so it fails cleanly instead
of meeting the OOM killer) and reports how it ends. Last, from the measured bytes per token, the
tok/s to expect on a Mac whose SSD reads 3, 7 or 17 GB/s, with the arithmetic.

Hit rates come from random weights, whose routing repeats less from token to token than a
trained model's: read them as a floor for the real Mixtral.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import disk
from mlx_mixtral.experts.budget import machine_memory

HERE = Path(__file__).resolve().parent
SSDS = (3.0, 7.0, 17.0)  # GB/s: base M-series to M4 Pro/Max class internal SSDs
MAC_MEMORY_GBS = 120.0  # unified memory bandwidth of a base/Pro M-series chip, for compute time


def run_bench(args: argparse.Namespace, budget: str, policy: str, prefetch: bool) -> dict:
    """One bench.py run in a fresh process; adds its peak RSS and the page cache's peak."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, str(HERE / "bench.py"), "--synthetic", args.shape, "--bits", "4",
           "--max-memory", budget, "--cache-policy", policy, "--pp", str(args.pp), "--tg", str(args.tg),
           "--depth", "0", "--trials", str(args.trials), "--json", str(out)]
    if not prefetch:
        cmd.append("--no-prefetch")
    print(f"[streaming] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    folder = args.synthetic_dir / f"{args.shape}-4bit-seed0"
    files = sorted(folder.glob("*.safetensors"))
    child = subprocess.Popen(cmd, stdout=sys.stderr)
    page_peak = 0
    while child.poll() is None:
        held = disk.page_cache(files) or 0
        page_peak = max(page_peak, held)
        time.sleep(2)
    if child.returncode:
        raise SystemExit(f"bench.py failed ({child.returncode})")
    result = json.loads(out.read_text())
    out.unlink()
    result["page_cache_peak_gb"] = page_peak / 1e9
    return result


def try_mlx_lm(folder: Path, seconds: int) -> str:
    """How mlx-lm fares on the folder, its address space capped 2 GB below the memory available
    now: without a cap it grows to the whole RAM and meets the OOM killer (measured: 23.5 GB RSS,
    95% of RAM, after 5 minutes, stopped by hand), which could take other processes with it."""
    ram = machine_memory()[0] - 2 * 10**9
    code = ("import mlx.core as mx; from mlx_lm.utils import load_model; from pathlib import Path; "
            f"m, _ = load_model(Path({str(folder)!r})); mx.eval(m.parameters()); "
            "print('loaded', flush=True); mx.eval(m(mx.array([[1, 2, 3]]))); print('generated')")

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ram, ram))

    start = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds,
                           preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return f"still running after {seconds} s (stopped)"
    lines = [line for line in (p.stdout + p.stderr).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return (f"exit {p.returncode} after {time.perf_counter() - start:.0f} s with its address space capped at "
            f"{ram / 1e9:.1f} GB (available RAM - 2 GB): {last[:300]}")


def projection(result: dict, tg_test: str) -> list[str]:
    """tok/s to expect on a Mac: the measured bytes read per token over the SSD's bandwidth, plus
    the compute of a resident token (bytes touched per token / unified memory bandwidth)."""
    st = result["streaming"]["tests"][tg_test]
    per_token = st["bytes_read_per_token"]
    touched = result["roofline"][0]["weight_bytes_per_token"]
    compute_s = touched / (MAC_MEMORY_GBS * 1e9)
    rows = []
    for ssd in SSDS:
        read_s = per_token / (ssd * 1e9)
        rows.append(f"{ssd:.0f} GB/s: {per_token / 1e9:.2f} GB / {ssd:.0f} GB/s = {read_s * 1000:.0f} ms read + "
                    f"{compute_s * 1000:.0f} ms compute -> {1 / (read_s + compute_s):.1f} tok/s serial, "
                    f"{1 / max(read_s, compute_s):.1f} tok/s fully overlapped")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="mixtral-8x7b")
    p.add_argument("--budgets", nargs="+", default=["6GB", "10GB", "14GB"])
    p.add_argument("--policies", nargs="+", default=["lru", "lfu"])
    p.add_argument("--pp", type=int, default=8)
    p.add_argument("--tg", type=int, default=6)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--mlx-lm-seconds", type=int, default=600)
    p.add_argument("--synthetic-dir", type=Path, default=Path("~/.cache/mlx-mixtral/synthetic").expanduser())
    p.add_argument("--json", type=Path)
    p.add_argument("--mlx-lm-only", action="store_true", help="only try mlx-lm on the folder")
    args = p.parse_args(argv)
    if args.mlx_lm_only:
        print(f"mlx-lm on the same folder: {try_mlx_lm(args.synthetic_dir / f'{args.shape}-4bit-seed0', args.mlx_lm_seconds)}")
        return 0
    have, source = machine_memory()
    runs = []
    for budget in args.budgets:
        for policy in args.policies:
            runs.append(run_bench(args, budget, policy, prefetch=True))
    runs.append(run_bench(args, args.budgets[0], args.policies[0], prefetch=False))
    folder = args.synthetic_dir / f"{args.shape}-4bit-seed0"
    peer = try_mlx_lm(folder, args.mlx_lm_seconds)
    tg_test, pp_test = f"tg{args.tg}@d0", f"pp{args.pp}"

    from rich.console import Console
    from rich.table import Table

    console = Console()
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
    table = Table(title=f"{args.shape} 4-bit ({size:.1f} GB on disk) streamed; {have / 1e9:.1f} GB {source}")
    for col in ("budget", "policy", "prefetch", "experts cached", f"{pp_test} tok/s", f"{tg_test} tok/s",
                "hit rate (tg)", "recall", "GB read/token (tg)", "read GB/s", "disk GB/s", "% of disk",
                "peak RSS GB", "page cache peak GB"):
        table.add_column(col, justify="right")
    for r in runs:
        st = r["streaming"]
        fig = {f["test"]: f for f in r["figures"]}
        t = st["tests"][tg_test]
        table.add_row(f"{st['budget_gb']:.0f} GB", st["policy"], "on" if st["prefetch"] else "off",
                      f"{st['cached_experts']}/{st['total_experts']}", f"{fig[pp_test]['median']:.3f}",
                      f"{fig[tg_test]['median']:.3f}", f"{100 * t['hit_rate']:.1f}%",
                      f"{100 * t['prefetch_recall']:.1f}%", f"{t['bytes_read_per_token'] / 1e9:.2f}",
                      f"{t['read_gbs']:.2f}", f"{st['disk_gbs']:.2f}", f"{100 * t['read_gbs'] / st['disk_gbs']:.0f}%",
                      f"{r['peak_rss_gb']:.2f}", f"{r['page_cache_peak_gb']:.2f}")
    console.print(table)
    console.print(f"mlx-lm on the same folder: {peer}")
    for r in runs[:-1]:
        st = r["streaming"]
        console.print(f"expected on a Mac, {st['budget_gb']:.0f} GB {st['policy']}:")
        for line in projection(r, tg_test):
            console.print(f"  {line}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "mlx_lm": peer}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
