"""Child processes with a timeout: one job per fresh process (fork server or spawn).

Part of the benchmark harness; the protocol is described in :mod:`benchmarks._harness`.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .memory import MMAP_THRESHOLD_BYTES, set_malloc_mmap_threshold

@dataclass
class IsolatedResult:
    """Outcome of a job run in a child process.

    Attributes:
        status: ``"ok"``, ``"timeout"`` (killed at the deadline) or ``"error"``.
        value: What the job returned (``status == "ok"``).
        error: Traceback text or exit description otherwise.
        seconds: Wall time from start to result, kill or exit.
    """

    status: str
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


def resolve(target: str) -> Callable[..., Any]:
    """Returns the function named by ``"package.module:function"``."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"target must look like 'package.module:function'; received {target!r}.")
    return getattr(importlib.import_module(module), name)


def _child_main(conn: multiprocessing.connection.Connection, target: str, kwargs: dict,
                memory: bool) -> None:
    try:
        if memory:
            set_malloc_mmap_threshold()
        conn.send(("ok", resolve(target)(**kwargs)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc(limit=8)))
    finally:
        conn.close()


class IsolatedRunner:
    """Runs one job per fresh child process, with a timeout.

    Args:
        preload: Modules the fork server imports once, before forking any child (forkserver
            only). Name the framework and the benchmark module so children start in milliseconds.
        start_method: ``"forkserver"`` (default) or ``"spawn"`` (a fresh interpreter per child).

    Example:
        >>> runner = IsolatedRunner(start_method="spawn")
        >>> runner.run("builtins:dict", {"a": 1}, timeout=60).value
        {'a': 1}
    """

    def __init__(self, *, preload: Iterable[str] = (), start_method: str = "forkserver") -> None:
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn'; received {start_method!r}.")
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(list(preload))
        self.start_method = start_method

    def _start(self, proc: multiprocessing.process.BaseProcess, memory: bool) -> None:
        if not (memory and self.start_method == "spawn"):
            proc.start()
            return
        saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)
        try:
            proc.start()
        finally:
            if saved is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved

    def run(self, target: str, kwargs: dict | None = None, *, timeout: float,
            memory: bool = False) -> IsolatedResult:
        """Runs ``target(**kwargs)`` in a child and waits at most ``timeout`` seconds.

        Args:
            target: ``"package.module:function"``, importable in the child; it must return a
                picklable value.
            kwargs: Picklable keyword arguments.
            timeout: Seconds before the child is killed and ``status`` is ``"timeout"``.
            memory: Set the malloc mmap threshold in the child (for :func:`step_memory`).

        Returns:
            The outcome; the child is always gone when this returns.
        """
        t0 = time.perf_counter()
        for attempt in (1, 2):
            recv, send = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(target=_child_main, daemon=True,
                                     args=(send, target, dict(kwargs or {}), memory))
            try:
                self._start(proc, memory)
                break
            except (EOFError, OSError):
                # a fork server that died (killed from outside) is relaunched on the next start
                recv.close()
                send.close()
                if attempt == 2:
                    raise
        send.close()
        try:
            if not recv.poll(timeout):
                proc.kill()
                proc.join()
                return IsolatedResult("timeout", error=f"killed after {timeout:.0f} s",
                                      seconds=time.perf_counter() - t0)
            try:
                status, payload = recv.recv()
            except EOFError:
                proc.join()
                why = " (the fork server is gone)" if proc.exitcode == 255 else ""
                return IsolatedResult("error", error=f"child exited with code {proc.exitcode} "
                                      f"without a result{why}", seconds=time.perf_counter() - t0)
            proc.join()
            seconds = time.perf_counter() - t0
            if status == "ok":
                return IsolatedResult("ok", value=payload, seconds=seconds)
            return IsolatedResult("error", error=payload, seconds=seconds)
        finally:
            recv.close()
            if proc.is_alive():
                proc.kill()
                proc.join()
