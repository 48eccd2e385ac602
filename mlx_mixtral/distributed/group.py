"""The processes of a run under `mlx.launch`: joining them, agreeing, and ending together.

`world()` joins (a size-1 group when not launched). A peer that never comes would block the join
forever, so a forked watcher bounds it (MLX joins holding the GIL: no thread or signal handler of
ours could run meanwhile). The front doors then call `end_with_peers(group)`: when the launcher
stops this process because another one ended, it says so in one line and exits, even while the
main thread is blocked inside MLX waiting for the dead peer (a Python signal handler cannot run
then; a watcher process that the signal reaches through `signal.set_wakeup_fd` can).
"""

from __future__ import annotations

import os
import select
import signal
from typing import Any

import mlx.core as mx

from ..errors import MixtralError

CONNECT_TIMEOUT = float(os.environ.get("MLX_MIXTRAL_CONNECT_TIMEOUT", "60"))  # seconds to find every peer
_group = None


def world() -> Any:
    """This process's group: size 1 unless started by `mlx.launch` (or another MLX launcher).

    Joining waits for every peer; one that never comes (a wrong host, a firewall, a process that
    died at start) ends this process with a one-line error after CONNECT_TIMEOUT, not a hang.
    """
    global _group
    if _group is None:
        watcher = _watch_connect(CONNECT_TIMEOUT) if launched() else None
        _group = mx.distributed.init()
        if watcher is not None:
            fd, pid = watcher
            os.write(fd, b"1")
            os.close(fd)
            os.waitpid(pid, 0)
    return _group


def _watch_connect(timeout: float) -> tuple[int, int]:
    """A forked watcher that ends this process with a one-line error unless told, through a pipe,
    within `timeout` s that every peer connected. (MLX joins holding the GIL, so no Python thread
    or signal handler of ours could run meanwhile; the watcher only sleeps and writes.)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        ready, _, _ = select.select([r], [], [], timeout)
        if not ready:
            os.write(2, (f"error: could not reach every process of this run within {timeout:.0f} s (check the "
                         "hosts, that each one started, and the network; MLX_MIXTRAL_CONNECT_TIMEOUT sets the "
                         "wait)\n").encode())
            os.kill(os.getppid(), signal.SIGKILL)
        os._exit(0)
    os.close(r)
    return w, pid


# Starts with a newline: MLX's own stderr lines ("[ring] ...") may be half written when this one
# comes from the watcher process, and the error must stand on a line of its own.
STOPPED = ("\nerror: process {rank} stopped: another process of this run ended (its error is above); "
           "any reply is incomplete\n")


def launched() -> bool:
    """Whether a launcher (mlx.launch, mpirun) started this process as one of several."""
    return any(k in os.environ for k in ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_RANK"))


def end_with_peers() -> None:
    """When the launcher stops this process (SIGTERM: another process of the run ended), print
    one line and end at once, whatever the main thread is doing: joining the others, computing,
    or waiting for input. Call it before `world()`, so a peer that dies during the join is
    covered too.

    A blocked MLX call (the join, or a collective waiting on a dead peer) never returns to
    Python, so no Python handler could act. The signal's C-level handler still writes its number
    to the wakeup fd; a forked watcher reading that pipe prints the line and kills this process.
    The watcher ends when this process does (end of file on the pipe). No-op when not launched.
    """
    if not launched():
        return
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the watcher: only reads, writes and signals
        os.close(w)
        parent = os.getppid()
        while True:
            data = os.read(r, 64)
            if not data:
                os._exit(0)
            if signal.SIGTERM in data:
                os.write(2, STOPPED.format(rank=rank).encode())
                os.kill(parent, signal.SIGKILL)
                os._exit(0)
    os.close(r)
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    # A Python-level handler must be set for the C handler (and so the wakeup fd) to see SIGTERM;
    # the watcher does the work, this one only keeps Python from acting on its own.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def single_process(what: str) -> None:
    """Refuse, in one line, a front door that cannot run split over processes."""
    if world().size() > 1:
        raise MixtralError(f"{what} runs in one process, not under mlx.launch; start it on its own")


def peer_lost(e: BaseException) -> bool:
    """Whether `e` is MLX's report of a peer that died or dropped off the network mid-run."""
    message = str(e)
    return isinstance(e, RuntimeError) and ("[ring]" in message or "peer" in message.lower())


def agreed_seed(model: Any, seed: int | None) -> int | None:
    """The sampling seed to use: `seed` as given for a model in one process; split over
    processes, one seed for all of them (`seed`, or rank 0's random pick), so that processes
    sampling the same logits pick the same tokens."""
    if model.runtime.split is None or seed is not None:
        return seed
    group = world()
    mine = int.from_bytes(os.urandom(4), "little") >> 1 if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array([mine], mx.int32), group=group).item())
