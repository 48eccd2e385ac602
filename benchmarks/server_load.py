"""`mlx-mixtral serve` under load, and what its prompt cache saves, on a real server over loopback.

    python -m benchmarks.server_load                         # the trained yardstick model
    python -m benchmarks.server_load --model PATH --clients 8 --requests 4 --turns 10

Two parts, each against `mlx-mixtral serve` started here on a free loopback port:

1. Time to first token per turn of a scripted `--turns`-turn chat (the client re-sends the whole
   conversation each turn, as chat clients do), with the prompt cache and with
   `--prompt-cache-size 0` (two servers, turn by turn in turn); median over `--repeats`
   conversations.
2. `--clients` concurrent clients x `--requests` requests each (streamed and not, in turn),
   against a queue of `--max-queue`: every response must be complete and exactly the greedy
   answer to its own prompt (measured alone beforehand), so answers cannot cross between
   clients; 429s are retried after their Retry-After and counted. Throughput, p50/p95 latency,
   and the server's RSS sampled through the run (flat or not).

Plain stdlib HTTP (http.client), so it measures the server, not a client library.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_MODEL = Path("~/.cache/mlx-mixtral/trained/stdlib-mixtral-h256-l4/float32").expanduser()
NAME = "bench"


class Server:
    """`mlx-mixtral serve` in a subprocess, its port read from its first line."""

    def __init__(self, model: Path, *flags: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_mixtral.cli", "serve", "--model", str(model),
                                      "--model-name", NAME, "--port", "0", "--temp", "0", *flags],
                                     stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if m := re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line):
                self.port = int(m.group(1))
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()
                return
            print(line, end="", file=sys.stderr)
        raise SystemExit("the server did not start")

    def rss(self) -> int:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(self.proc.pid)], capture_output=True, text=True)
        return int(out.stdout.strip() or 0) * 1024

    def request(self, path: str, body: dict, timeout: float = 600) -> tuple[int, dict, str, float | None]:
        """(status, headers, body text, seconds to the first content) of one request; streamed
        bodies are returned as their concatenated content, or raise if incomplete."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        start = time.perf_counter()
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            headers = {k.lower(): v for k, v in r.getheaders()}
            if r.status != 200 or not body.get("stream"):
                text = r.read().decode()
                return r.status, headers, text, time.perf_counter() - start
            first, parts, done, finish = None, [], False, None
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"stream failed: {event['error']['message']}")
                for choice in event["choices"]:
                    piece = choice.get("delta", {}).get("content") or choice.get("text") or ""
                    if piece and first is None:
                        first = time.perf_counter() - start
                    parts.append(piece)
                    finish = choice.get("finish_reason") or finish
            if not done or finish is None:
                raise RuntimeError("a stream ended without its finish_reason and [DONE]")
            return 200, headers, "".join(parts), first
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def chat(messages: list[dict], max_tokens: int, stream: bool = True) -> dict:
    return {"model": NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def conversation_ttft(servers: dict[str, Server], turns: int, max_tokens: int, seed: int) -> dict[str, list[float]]:
    """Seconds to the first token of each turn of one scripted conversation, held with each
    server turn by turn (interleaved, so drift in the machine's load hits both alike)."""
    messages = {label: [] for label in servers}
    ttft: dict[str, list[float]] = {label: [] for label in servers}
    for turn in range(turns):
        for label, server in servers.items():
            history = messages[label]
            history.append({"role": "user", "content": f"Conversation {seed}, question {turn}: show me more code."})
            status, _, text, first = server.request("/v1/chat/completions", chat(history, max_tokens))
            assert status == 200, text
            ttft[label].append(first)
            history.append({"role": "assistant", "content": text})
    return ttft


def load_test(server: Server, clients: int, requests: int, max_tokens: int, deadline_s: float) -> dict:
    prompts = [[{"role": "user", "content": f"Client {c}, request {r}: write a function."}]
               for c in range(clients) for r in range(requests)]
    expected = {}
    for i, messages in enumerate(prompts):  # each answer alone first, for the checks below
        status, _, text, _ = server.request("/v1/chat/completions", chat(messages, max_tokens, stream=False))
        assert status == 200, text
        expected[i] = json.loads(text)["choices"][0]["message"]["content"]
    latencies, wrong, failures, retries = [], [], [], [0]
    rss: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss.append((time.perf_counter(), server.rss()))
            time.sleep(0.5)

    def client(c: int) -> None:
        for r in range(requests):
            i = c * requests + r
            stream = (c + r) % 2 == 0
            start = time.perf_counter()
            while time.perf_counter() - start < deadline_s:
                try:
                    status, headers, text, _ = server.request("/v1/chat/completions",
                                                              chat(prompts[i], max_tokens, stream))
                except Exception as e:  # noqa: BLE001 - counted and reported
                    failures.append(f"request {i}: {e}")
                    break
                if status == 429:
                    retries[0] += 1
                    time.sleep(float(headers.get("retry-after", 1)))
                    continue
                if status != 200:
                    failures.append(f"request {i}: HTTP {status} {text[:200]}")
                    break
                content = text if stream else json.loads(text)["choices"][0]["message"]["content"]
                if content != expected[i]:
                    wrong.append(i)
                latencies.append(time.perf_counter() - start)
                break
            else:
                failures.append(f"request {i}: no answer within {deadline_s} s")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    memory = [m for _, m in rss]
    return {"clients": clients, "requests_each": requests, "completed": len(latencies), "wrong": wrong,
            "failures": failures, "retried_429": retries[0], "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "tokens_per_s": len(latencies) * max_tokens / elapsed,
            "latency_p50_s": statistics.median(latencies) if latencies else None,
            "latency_p95_s": q[18] if latencies else None,
            "rss_start_gb": memory[0] / 1e9, "rss_end_gb": memory[-1] / 1e9, "rss_max_gb": max(memory) / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="model folder (default: the one benchmarks/train_small.py trains)")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="conversations per setting")
    p.add_argument("--turn-tokens", type=int, default=48, help="tokens per reply in the conversation")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--tokens", type=int, default=32, help="tokens per load-test reply")
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--deadline", type=float, default=300, help="seconds a load-test request may take, retries included")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no model at {args.model}: run benchmarks/train_small.py, or pass --model")
    result: dict = {"model": str(args.model), "ttft": {}}
    servers = {"prompt cache": Server(args.model), "no prompt cache": Server(args.model, "--prompt-cache-size", "0")}
    try:
        runs = [conversation_ttft(servers, args.turns, args.turn_tokens, seed) for seed in range(args.repeats)]
    finally:
        for server in servers.values():
            server.stop()
    for label in servers:
        result["ttft"][label] = [statistics.median(r[label][t] for r in runs) for t in range(args.turns)]
    server = Server(args.model, "--max-queue", str(args.max_queue))
    try:
        result["load"] = load_test(server, args.clients, args.requests, args.tokens, args.deadline)
    finally:
        server.stop()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"time to first token per turn (ms, median of {args.repeats} conversations), {args.model.name}")
    t.add_column("turn")
    for label in result["ttft"]:
        t.add_column(label, justify="right")
    t.add_column("ratio", justify="right")
    cached, fresh = result["ttft"]["prompt cache"], result["ttft"]["no prompt cache"]
    for turn in range(args.turns):
        t.add_row(str(turn + 1), f"{1000 * cached[turn]:.1f}", f"{1000 * fresh[turn]:.1f}",
                  f"{fresh[turn] / cached[turn]:.2f}x")
    console.print(t)
    load = result["load"]
    lt = Table(title=f"load: {load['clients']} clients x {load['requests_each']} requests, queue {args.max_queue}")
    lt.add_column("")
    lt.add_column("", justify="right")
    for key, value in (
        ("completed (exactly their own answer)", f"{load['completed'] - len(load['wrong'])} of "
                                                 f"{load['clients'] * load['requests_each']}"),
        ("failed", str(len(load["failures"]))), ("429s retried", str(load["retried_429"])),
        ("requests/s", f"{load['requests_per_s']:.2f}"), ("generated tok/s", f"{load['tokens_per_s']:.1f}"),
        ("latency p50 / p95", f"{load['latency_p50_s']:.2f} s / {load['latency_p95_s']:.2f} s"),
        ("server RSS start / end / max", f"{load['rss_start_gb']:.2f} / {load['rss_end_gb']:.2f} / "
                                         f"{load['rss_max_gb']:.2f} GB"),
    ):
        lt.add_row(key, value)
    console.print(lt)
    for f in load["failures"]:
        console.print(f"[red]{f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not load["wrong"] and not load["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
