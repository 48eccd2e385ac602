"""`/load` of a very long saved conversation, then the next message: how long until it is encoded.

A conversation of 2000 exchanges of ~50 KB each (100 MB of JSON) is saved and loaded into a chat
session whose context holds only its end; `start` must drop the old exchanges and encode what is
left. Times: loading the JSON, and `start` (dropping + encoding). Before the linear trimming, the
whole conversation was re-encoded once per dropped exchange (minutes at this size).

    python -m benchmarks.long_history --model FOLDER [--exchanges 2000] [--size 50000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx_mixtral
from mlx_mixtral.chat.conversation import ChatSession, Conversation, Exchange, Settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a model folder (any Mixtral; weights are not run)")
    p.add_argument("--exchanges", type=int, default=2000)
    p.add_argument("--size", type=int, default=50_000, help="characters per exchange")
    args = p.parse_args()
    model, tokenizer = mlx_mixtral.load(args.model, progress=False)
    words = "the quick brown fox jumps over the lazy dog and keeps running across the field "
    text = (words * (args.size // 2 // len(words) + 1))[: args.size // 2]
    history = Conversation("Be kind.", [Exchange(f"{i} {text}", f"{i} {text}") for i in range(args.exchanges)])
    with tempfile.TemporaryDirectory() as tmp:
        path = history.save(Path(tmp) / "long.json")
        size = path.stat().st_size
        session = ChatSession(model, tokenizer, Settings(max_tokens=64))
        t0 = time.perf_counter()
        session.load(path)
        t1 = time.perf_counter()
        turn = session.start("What was the first thing I said?")
        t2 = time.perf_counter()
    print(f"{args.exchanges} exchanges, {size / 1e6:.0f} MB of JSON, context {session.limit}: "
          f"load {t1 - t0:.2f} s, next message encoded in {t2 - t1:.2f} s "
          f"({turn.dropped} oldest exchanges dropped, prompt {len(turn.prompt)} tokens)")


if __name__ == "__main__":
    main()
