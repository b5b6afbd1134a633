"""Deadlines for env calls that may never return.

An env's ``reset`` or ``step`` can hang: a simulator that deadlocks, a remote env whose server went away, a worker
stuck in native code. The env stage bounds each such call by its ``step_timeout``; how depends on where the call
runs:

* **Subprocess workers**: the wait for their answers has the timeout (an await with a deadline on the stage's
  fast path, gymnasium's ``step_wait(timeout=)`` elsewhere, see :class:`~streamrl.envs.workers.WatchWorkers`);
  the workers that owe an answer are then killed, so nothing is left running.
* **A thread of this process** (the TensorDict path, which steps transforms and envs off the event loop):
  :class:`CallThread` runs the calls in a daemon thread and stops waiting at the deadline. A Python thread cannot
  be killed, so a hung call is left behind in it, but a daemon thread does not keep the process from exiting
  (anyio's and ``concurrent.futures``' worker threads would: the interpreter joins them at exit).
* **The event loop's own thread** (the fast array path of in-process vector envs, where a thread hop per step
  would cost more than the step): :class:`LoopDeadline` stamps the start of each call; a watchdog thread notices a
  call past its deadline and interrupts it with ``SIGURG`` (handled while a deadline is armed), whose handler
  raises :class:`CallInterrupted` inside the hung call. That stops Python code and blocking system calls (sleeps,
  socket reads, lock waits) of the main thread, where ``streamrl run`` runs its event loop. Elsewhere, and in
  native code that holds the GIL, the call cannot be interrupted: the watchdog logs the hang at once, and the
  stage raises when the call returns.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

import anyio
import structlog

log = structlog.get_logger("streamrl.envs.deadlines")
INTERRUPT = signal.SIGURG  # ignored by default: a late one, after the handler is gone, does nothing


class CallTimedOut(TimeoutError):
    """A :class:`CallThread` call gave no answer within its timeout (the call goes on in the thread)."""


class CallInterrupted(BaseException):
    """Raised inside a call on the event loop's thread that outlived its :class:`LoopDeadline`.

    A ``BaseException``, like ``KeyboardInterrupt``: an env's ``except Exception`` does not swallow it.
    """


class CallThread:
    """One daemon thread that runs blocking calls for a coroutine, each bounded by a timeout::

        thread = CallThread("env stepping")
        out = await thread.call(1.0, env.step, td)   # CallTimedOut after 1 s; the call stays in the thread

    After a timeout the thread is :attr:`stuck` and takes no more calls. A call whose caller is cancelled (the run
    ends) is still awaited, up to its timeout, so that the env is never used by two threads at once.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.stuck = False
        self._calls: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def call(self, timeout: float | None, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the thread: its result or its exception, or :class:`CallTimedOut` after ``timeout``
        seconds (None: no limit)."""
        if self.stuck:
            raise RuntimeError(f"{self.name}: the thread is stuck in an earlier call")
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        done = anyio.Event()
        outcome: list[tuple[bool, Any]] = []
        self._calls.put((fn, args, outcome, asyncio.get_running_loop(), done.set))
        try:
            with anyio.move_on_after(timeout):
                await done.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                await done.wait()
            self.stuck = not done.is_set()
            raise
        if not done.is_set():
            self.stuck = True
            raise CallTimedOut(f"{self.name}: no answer within {timeout:g} s")
        ok, value = outcome[0]
        if ok:
            return value
        raise value

    def _serve(self) -> None:
        while (work := self._calls.get()) is not None:
            fn, args, outcome, loop, wake = work
            try:
                outcome.append((True, fn(*args)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome.append((False, exc))
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:
                pass  # the event loop closed meanwhile: nobody waits any more

    def close(self) -> None:
        """Let the thread end (a stuck one ends if its call ever returns)."""
        if self._thread is not None:
            self._calls.put(None)
            self._thread = None


class LoopDeadline:
    """Bounds calls made on the event loop's own thread; see the module docstring. The hot loop pays two
    attribute writes per call::

        with LoopDeadline(60.0) as deadline:
            while ...:
                deadline.started = time.monotonic()
                result = vector_env.step(actions)     # CallInterrupted if it hangs (main thread)
                deadline.started = 0.0
                if deadline.expired: ...              # it returned late (elsewhere): fail now
    """

    __slots__ = ("expired", "main", "started", "thread", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout  # None: no limit (nothing watches the calls)
        self.started = 0.0  # time.monotonic() when the call in progress started; 0.0: none in progress
        self.expired = False  # set by the watchdog once the call in progress outlived the timeout
        self.thread = threading.get_ident()
        self.main = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> LoopDeadline:
        if self.timeout is not None:
            _watchdog.add(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.timeout is not None:
            _watchdog.remove(self)


class _Watchdog:
    """The one thread that checks every armed :class:`LoopDeadline` a few times per timeout."""

    def __init__(self) -> None:
        self.deadlines: set[LoopDeadline] = set()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.previous_handler: Any = None  # the INTERRUPT handler to restore, while ours is installed

    def add(self, deadline: LoopDeadline) -> None:
        with self.lock:
            if deadline.main and not any(d.main for d in self.deadlines):
                self.previous_handler = signal.signal(INTERRUPT, _interrupt)
            self.deadlines.add(deadline)
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, name="streamrl env watchdog", daemon=True)
                self.thread.start()
        self.wake.set()

    def remove(self, deadline: LoopDeadline) -> None:
        with self.lock:
            self.deadlines.discard(deadline)
            if deadline.main and not any(d.main for d in self.deadlines):
                previous, self.previous_handler = self.previous_handler, None
                signal.signal(INTERRUPT, signal.SIG_DFL if previous is None else previous)

    def _watch(self) -> None:
        while True:
            with self.lock:
                deadlines = list(self.deadlines)
            if not deadlines:
                self.wake.wait()
                self.wake.clear()
                continue
            time.sleep(min(0.25, min(d.timeout for d in deadlines if d.timeout is not None) / 4))
            now = time.monotonic()
            for deadline in deadlines:
                started, limit = deadline.started, deadline.timeout
                if started and limit is not None and not deadline.expired and now - started > limit:
                    deadline.expired = True
                    log.error("an env call outlived its step_timeout; interrupting it", timeout_s=deadline.timeout,
                              interruptible=deadline.main)
                    if deadline.main:
                        signal.pthread_kill(deadline.thread, INTERRUPT)


_watchdog = _Watchdog()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """The INTERRUPT handler (main thread): raise in the call that outlived its deadline, if one is in progress."""
    for deadline in tuple(_watchdog.deadlines):
        if deadline.main and deadline.expired and deadline.started:
            raise CallInterrupted()
