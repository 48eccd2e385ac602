"""Tensor parallelism under `mlx.launch`: 2 processes on loopback (ring backend, CPU) against 1.

The same logits within float32 summation-order tolerance and the same greedy tokens, for GQA,
MQA and top-1/2/3 routing, float and quantized, through the Python API and `generate`; splits
that cannot work refused in one line; a peer that dies or never comes ends the run in one line.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
LAUNCH, CLI = BIN / "mlx.launch", BIN / "mlx-mixtral"
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
TOLERANCE = 1e-4  # float32, summed in another order across 2 processes: measured 8.8e-6 to 1.04e-5

SCRIPT = r'''
import sys
import mlx.core as mx
import numpy as np
import mlx_mixtral
from mlx_mixtral.sampling import SamplingParams

folder, out = sys.argv[1], sys.argv[2]
model, tokenizer = mlx_mixtral.load(folder, progress=False)
ids = tokenizer.encode(sys.argv[3])
whole = model(mx.array([ids]))[0]                                   # no cache, all positions
cache = mlx_mixtral.make_cache(model)
chunked = mx.concatenate([model(mx.array([ids[i:i + 5]]), cache=cache)[0] for i in range(0, len(ids), 5)])
mx.eval(whole, chunked)  # on every rank: each evaluation runs all_sums every rank must join
tokens = [r.token for r in mlx_mixtral.stream_generate(model, tokenizer, ids, max_tokens=24,
                                                       sampling=SamplingParams(), stop_on_eos=False)]
if mx.distributed.init().rank() == 0:
    np.savez(out, whole=np.array(whole), chunked=np.array(chunked), tokens=np.array(tokens))
'''


def error_lines(stderr: str) -> list[str]:
    """Our `error:` lines. Several processes share one stderr, and MLX writes its own "[ring] ..."
    lines in pieces, so one of ours may follow such a piece on the same line."""
    return [line[line.index("error:"):] for line in stderr.splitlines() if "error:" in line]


def launch(n: int, *command: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH), "--backend", "ring", "-n", str(n), "--", *command],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module", autouse=True)
def ring():
    """Skip (saying why) where mx.distributed cannot start 2 ring processes on loopback."""
    probe = "import mlx.core as mx; print(mx.distributed.all_sum(mx.array([1.0])).item())"
    if not LAUNCH.exists():
        pytest.skip(f"no mlx.launch beside {sys.executable}")
    try:
        out = launch(2, sys.executable, "-c", probe, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("mx.distributed: 2 ring processes on loopback did not connect within 60 s")
    if out.returncode != 0 or out.stdout.split() != ["2.0", "2.0"]:
        pytest.skip(f"mx.distributed cannot run 2 ring processes here: {out.stderr.strip()[:200]}")


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("distributed") / "logits.py"
    path.write_text(SCRIPT)
    return path


def run_both(folder: Path, script: Path, tmp_path: Path) -> tuple[dict, dict]:
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    single = subprocess.run([sys.executable, str(script), str(folder), str(one), PROMPT],
                            capture_output=True, text=True, timeout=180)
    assert single.returncode == 0, single.stderr
    pair = launch(2, sys.executable, str(script), str(folder), str(two), PROMPT)
    assert pair.returncode == 0, pair.stderr
    return dict(np.load(one)), dict(np.load(two))


@pytest.fixture(scope="module")
def quantized(hf_checkpoint_factory, tmp_path_factory):
    """The gqa fixture converted to 4 bits in groups of 32 (so each rank's o_proj half, 32 wide,
    is one group) and in groups of 64 (which a 2-way split would cut)."""
    made = {}
    for group in (32, 64):
        out = tmp_path_factory.mktemp(f"q4g{group}") / "model"
        done = subprocess.run([sys.executable, "-m", "convert", "--hf-path", str(hf_checkpoint_factory("gqa")),
                               "--mlx-path", str(out), "-q", "--q-bits", "4", "--q-group-size", str(group)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        made[group] = out
    return made


@pytest.mark.parametrize("name", ["gqa", "mqa", "experts4_top1", "experts6_top3"])
def test_two_processes_give_one_processs_logits_and_tokens(name, hf_checkpoint_factory, script, tmp_path):
    one, two = run_both(hf_checkpoint_factory(name), script, tmp_path)
    for key in ("whole", "chunked"):
        diff = np.abs(one[key] - two[key]).max()
        print(f"{name} {key}: max |logit difference| {diff:.2e}")
        assert diff < TOLERANCE, (key, diff)
    assert one["tokens"].tolist() == two["tokens"].tolist()


def test_a_quantized_folder_splits_on_group_boundaries(quantized, script, tmp_path):
    one, two = run_both(quantized[32], script, tmp_path)
    diff = np.abs(one["whole"] - two["whole"]).max()
    print(f"4-bit g32 whole: max |logit difference| {diff:.2e}")
    assert diff < TOLERANCE
    assert one["tokens"].tolist() == two["tokens"].tolist()


@pytest.mark.parametrize("name", ["gqa", "mqa", "experts4_top1", "experts6_top3"])
def test_generate_under_mlx_launch_prints_the_same_answer_once(name, hf_checkpoint_factory):
    folder = hf_checkpoint_factory(name)
    args = ["generate", "--model", str(folder), "--raw", "--prompt", PROMPT, "--max-tokens", "24"]
    single = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=120)
    pair = launch(2, str(CLI), *args)
    assert single.returncode == 0 and pair.returncode == 0, pair.stderr
    assert pair.stdout == single.stdout  # rank 0 alone writes it
    assert pair.stderr.count("tensor parallel over 2 processes") == 1


@pytest.mark.parametrize("n,which,needle", [
    (3, "gqa", "cannot split 8 attention heads over 3 processes: use a process count that divides 8"),
    (2, "q64", "would cut a quantization group of model.layers.0.self_attn.o_proj"),
])
def test_splits_that_cannot_work_are_refused_in_one_line(n, which, needle, hf_checkpoint_factory, quantized):
    folder = quantized[64] if which == "q64" else hf_checkpoint_factory(which)
    out = launch(n, str(CLI), "generate", "--model", str(folder), "--raw", "--prompt", "hi")
    assert "exited with code 1" in out.stderr  # (mlx.launch itself exits 0 whatever its processes do)
    errors = error_lines(out.stderr)
    # Each process finds the bad split by itself; one the launcher stops first, or whose peer
    # ended while it was still joining the ring, says that instead.
    assert any(needle in line for line in errors), out.stderr
    assert all(needle in line or "another process of this run" in line for line in errors), out.stderr
    assert "Traceback" not in out.stderr


SAMPLED = r'''
import sys
import mlx_mixtral
from mlx_mixtral.distributed.group import agreed_seed, world
from mlx_mixtral.sampling import SamplingParams
model, tokenizer = mlx_mixtral.load(sys.argv[1], progress=False)
tokens = [r.token for r in mlx_mixtral.stream_generate(
    model, tokenizer, [1, 415, 2936, 9060], max_tokens=24, stop_on_eos=False,
    sampling=SamplingParams(temp=1.5, top_p=0.95, repetition_penalty=1.2), seed=agreed_seed(model, None))]
print(f"rank {world().rank()}:", *tokens, flush=True)
'''


def test_sampling_without_a_seed_picks_the_same_tokens_in_every_process(hf_checkpoint_factory, tmp_path):
    """Each process samples from the same logits: without --seed they must still agree (one seed
    for all, chosen by rank 0), or each would feed a different token and the split model's sums
    would mix two conversations. Hot sampling, so a disagreement shows within a few tokens."""
    script = tmp_path / "sampled.py"
    script.write_text(SAMPLED)
    seen = set()
    for _ in range(2):  # two runs: two different random seeds
        out = launch(2, sys.executable, str(script), str(hf_checkpoint_factory("gqa")), timeout=120)
        lines = sorted(line for line in out.stdout.splitlines() if line.startswith("rank "))
        assert len(lines) == 2, out.stderr
        assert lines[0].split(":")[1] == lines[1].split(":")[1], lines
        seen.add(lines[0].split(":")[1])
    assert len(seen) == 2  # really sampled: another seed, other tokens


def test_stdin_prompts_are_refused_under_mlx_launch(hf_checkpoint_factory):
    out = launch(2, str(CLI), "generate", "--model", str(hf_checkpoint_factory("gqa")), "--raw")
    assert "exited with code 1" in out.stderr and "stdin never ends" in out.stderr and "Traceback" not in out.stderr


def test_a_peer_that_dies_mid_reply_ends_the_run_in_one_line(hf_checkpoint_factory, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(hf_checkpoint_factory("gqa"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    generate = f"{CLI} generate --model {folder} --raw --prompt hi --max-tokens 16000"
    # Rank 1 is killed 4 s in (loaded, generating); rank 0 must not hang waiting for it.
    killer = f'if [ "$MLX_RANK" = 1 ]; then (sleep 4; kill -9 $$) & fi; exec {generate}'
    out = launch(2, "bash", "-c", killer, timeout=90)
    assert "Node with rank 1 was killed" in out.stderr or "rank 1 exited" in out.stderr, out.stderr
    errors = error_lines(out.stderr)
    assert errors and any("another process of this run" in line for line in errors), out.stderr
    assert "Traceback" not in out.stderr


# (phase, victim rank, seconds after start): loading, the prompt, decoding, and a chat idle at
# its prompt; drawn once from a seeded generator so a failure names its kill point.
_KILLS = [(phase, rank, round(random.Random(f"{phase}{rank}").uniform(*window), 2))
          for phase, window in (("loading", (0.3, 1.5)), ("decoding", (3.0, 6.0)), ("idle chat", (4.0, 7.0)))
          for rank in (0, 1)]


@pytest.mark.parametrize("phase, victim, after", _KILLS)
def test_a_peer_killed_at_any_point_never_hangs_the_others(hf_checkpoint_factory, tmp_path, phase, victim, after):
    """SIGKILL one process at a random point of a phase: every other one ends within a bound
    (the launcher stops it, and a watcher outside the blocked thread acts even while MLX waits
    on the dead peer), with one line, never a traceback."""
    folder = tmp_path / "model"
    shutil.copytree(hf_checkpoint_factory("gqa"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    if phase == "idle chat":  # waits at its prompt (stdin open) when the peer dies
        command = f"(printf 'hi\\n'; sleep 15) | {LAUNCH} --backend ring -n 2 -- bash -c '{{kill}}'"
        run = f"exec {CLI} chat --model {folder} --max-tokens 4"
    else:
        command = f"{LAUNCH} --backend ring -n 2 -- bash -c '{{kill}}'"
        run = f"exec {CLI} generate --model {folder} --raw --prompt hi --max-tokens 16000"
    kill = f'if [ "$MLX_RANK" = {victim} ]; then (sleep {after}; kill -9 $$) & fi; {run}'
    start = time.monotonic()
    out = subprocess.run(["bash", "-c", command.format(kill=kill)], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 90, f"{phase}: took {time.monotonic() - start:.0f} s"
    assert "Traceback" not in out.stderr, out.stderr
    errors = error_lines(out.stderr)
    # Every survivor that got as far as running our code says why it ended. A kill point is a time,
    # and on a loaded machine a "decoding" one may come while the other is still starting Python,
    # before any handler of ours exists: then it has printed nothing at all, output included.
    assert errors or not out.stdout.strip(), out.stderr


def test_a_peer_that_never_comes_is_a_one_line_timeout(hf_checkpoint_factory, tmp_path):
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hosts), "MLX_MIXTRAL_CONNECT_TIMEOUT": "3"}
    out = subprocess.run([str(CLI), "generate", "--model", str(hf_checkpoint_factory("gqa")), "--raw",
                          "--prompt", "hi"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "error: could not reach every process of this run within 3 s (check the hosts, that each one started, "
        "and the network; MLX_MIXTRAL_CONNECT_TIMEOUT sets the wait)"]


def test_chat_under_mlx_launch_is_the_same_conversation(hf_checkpoint_factory):
    """Every process reads the lines mlx.launch forwards; rank 0 alone draws the screen. Sampled
    replies (seeded) and the experts heatmap match a single-process chat's."""
    folder = hf_checkpoint_factory("gqa")
    lines = "hello there\n/set temp 0.9\nwhat now\n/experts\n"
    args = ["chat", "--model", str(folder), "--max-tokens", "10", "--temp", "0", "--seed", "3"]
    env = {**os.environ, "COLUMNS": "1000"}  # no line wraps: the screen must not depend on widths
    single = subprocess.run([str(CLI), *args], input=lines + "/exit\n", capture_output=True, text=True, timeout=120,
                            env=env)
    # mlx.launch forwards stdin but never its end: /exit comes after the replies.
    script = f"(printf '{lines}'; sleep 10; printf '/exit\\n') | {LAUNCH} --backend ring -n 2 -- {CLI} {' '.join(args)}"
    pair = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env)

    def screen(text: str) -> list[str]:
        """The replies and command output, without speed figures, the launcher's own lines and the
        bare prompts (how many of those show depends on how the forwarded lines were chunked)."""
        noise = ("prompt:", "context:", "tensor parallel", "every expert", "[ring]", "\x1b[33m[WARN]")
        lines = [line.rstrip().removeprefix(">>>").strip() for line in text.splitlines()]
        timing = ("tok/s", "peak memory", " GB")  # speed figures differ run to run, wherever they wrap
        return [line for line in lines
                if line and not line.startswith(noise) and not any(t in line for t in timing)]

    assert "error" not in pair.stdout + pair.stderr, pair.stderr
    assert screen(pair.stdout + pair.stderr) == screen(single.stdout + single.stderr)
    assert "experts used over the last reply" in pair.stdout


def test_single_process_front_doors_refuse_mlx_launch(hf_checkpoint_factory, tmp_path):
    folder = str(hf_checkpoint_factory("gqa"))
    text = tmp_path / "doc.txt"
    text.write_text("some text")
    for args, needle in ((["serve", "--model", folder, "--port", "0"], "serve runs in one process"),
                         (["cache-prompt", "--model", folder, "--prompt-file", str(text), "--out", str(tmp_path / "c")],
                          "cache-prompt runs in one process")):
        out = launch(2, str(CLI), *args, timeout=120)
        errors = error_lines(out.stderr)
        assert errors and all(needle in line for line in errors), out.stderr
