"""One model, many clients: requests wait in a bounded first-come-first-served queue for the one
worker thread that owns the model.

MLX streams belong to the thread that made them, so a single worker thread loads the model and
runs every generation; the HTTP side only queues `Job`s and reads the `Event`s each job sends
back. Requests are served one at a time, in arrival order (fair: nobody overtakes). With one
chip and one set of weights, a second concurrent generation would only share the same memory
bandwidth. When the queue is full, `submit` raises `Busy` (HTTP 429) at once, rather than
letting waits grow without bound. A job is cancelled (its client went away) at the next token:
its slot is freed and the queue moves on.
"""

from __future__ import annotations

import math
import queue
import secrets
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..constrain import Grammar
from ..errors import MixtralError
from ..generate import stream_generate
from ..sampling import SamplingParams


@dataclass
class Piece:
    """Text the reply grew by, and the tokens it came from (id, log-probability, alternatives)
    when the request asked for logprobs."""

    text: str
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass
class Started:
    """The job left the queue: `cached_tokens` of its prompt are reused from the prompt cache."""

    cached_tokens: int


@dataclass
class Done:
    """The reply is complete."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    stop_sequence: str | None = None  # the stop string that ended it, if one did


def incident(error: BaseException) -> str:
    """Log an unexpected error's traceback under a fresh request id; return what the client is
    told: that id, never the error's text (which may carry paths and internals)."""
    request_id = f"req_{secrets.token_hex(6)}"
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    print(f"error {request_id}: unexpected {type(error).__name__}\n{''.join(lines).rstrip()}",
          file=sys.stderr, flush=True)
    return f"internal error (request id {request_id}); the server's log has the details"


@dataclass
class Failed:
    """Generation stopped with an error; the reply so far is not a complete answer."""

    message: str
    status: int = 500  # 503: the server is going down


Event = Started | Piece | Done | Failed


@dataclass
class Job:
    """One request's generation. `send` is called from the worker thread with each event."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: list[str]
    send: Callable[[Event], None]
    grammar: Grammar | None = None
    logprobs: int | None = None
    shown: tuple[int, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


SHUTDOWN = "the server is shutting down; the reply is incomplete"


class Busy(Exception):
    """The queue is full; `retry_after` seconds is a fair guess at when a slot frees up."""

    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"the server is busy: {queued} requests are already waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class Scheduler:
    """The worker thread and its queue. `load()` runs on the worker and returns
    `(model, tokenizer, pool)`; `start` waits for it, so a load error surfaces to the caller."""

    def __init__(self, load: Callable[[], tuple[Any, Any, Any]], max_queue: int) -> None:
        self._load = load
        self._waiting: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="mlx-mixtral-worker", daemon=True)
        self.model = self.tokenizer = self.pool = None
        self.active: Job | None = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self._durations: deque[float] = deque(maxlen=16)

    def start(self) -> None:
        """Start the worker; return once the model is loaded (or raise what loading raised)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self, wait: float = 0) -> None:
        """End the worker: the running job and every waiting one fail with SHUTDOWN (their
        clients see an error, not a reply cut short that looks complete). `wait`: seconds to
        wait for the worker to finish its current token (0 from a signal handler)."""
        self._stopping = True
        if self.active is not None:
            self.active.cancel()
        try:
            self._waiting.put_nowait(None)  # wakes a worker waiting for work
        except queue.Full:
            pass  # a busy worker sees _stopping when it takes the next job
        if wait and self._thread.is_alive():
            self._thread.join(wait)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise Busy if the queue is full."""
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            queued = self._waiting.qsize()
            typical = statistics.median(self._durations) if self._durations else 1.0
            raise Busy(queued, max(1, math.ceil(typical * (queued + 1)))) from None

    @property
    def queued(self) -> int:
        return self._waiting.qsize()

    # -- on the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        try:
            self.model, self.tokenizer, self.pool = self._load()
        except BaseException as e:  # noqa: BLE001 - handed to start(), which raises it
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._waiting.get()
            if job is None or self._stopping:
                self._fail_waiting(job)
                return
            if job.cancelled.is_set():  # its client left while it waited
                self.counts["cancelled"] += 1
                continue
            self.active = job
            start = time.perf_counter()
            try:
                self._serve(job)
            finally:
                self.active = None
                self._durations.append(time.perf_counter() - start)

    def _fail_waiting(self, job: Job | None) -> None:
        while job is not None or not self._waiting.empty():
            if job is not None:
                job.send(Failed(SHUTDOWN, 503))
            try:
                job = self._waiting.get_nowait()
            except queue.Empty:
                return

    def _serve(self, job: Job) -> None:
        entry = self.pool.take(job.prompt)
        fed = entry.prepare(job.prompt)
        cached = len(entry.ids)
        job.send(Started(cached))
        last = None
        try:
            for last in stream_generate(self.model, self.tokenizer, fed, max_tokens=job.max_tokens,
                                        sampling=job.sampling, seed=job.seed, stop=job.stop,
                                        cache=entry.cache, history=entry.ids, grammar=job.grammar,
                                        logprobs=job.logprobs, shown=job.shown):
                if job.cancelled.is_set():
                    break
                ended = last.finish_reason == "stop" and last.token in self.tokenizer.eos_token_ids
                if last.logprob is not None and not ended:  # (the end-of-sequence token is not reported)
                    job.send(Piece(last.text, [(last.token, last.logprob, last.top_logprobs)]))
                elif last.text:
                    job.send(Piece(last.text))
        except MixtralError as e:
            self.counts["failed"] += 1
            job.send(Failed(str(e)))
            return  # the cache may hold half a chunk: it is not put back
        except Exception as e:  # a bug: this request fails, the server goes on
            self.counts["failed"] += 1
            job.send(Failed(incident(e)))
            return
        entry.record(fed, last.tokens if last is not None else [])
        self.pool.put(entry)
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            if self._stopping:
                job.send(Failed(SHUTDOWN, 503))
            return
        self.counts["completed"] += 1
        job.send(Done(finish_reason=last.finish_reason, prompt_tokens=len(job.prompt),
                      completion_tokens=last.generation_tokens, cached_tokens=cached, stop_sequence=last.stop_string))
