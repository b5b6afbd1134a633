"""Subprocess env workers: name the one that failed, never hang, leave no process behind.

The ``"subprocess"`` backend of :class:`~streamrl.envs.gym.GymEnv` is gymnasium's ``AsyncVectorEnv``: one worker
process per env, answering over a pipe, observations in shared memory. Left to itself, gymnasium reports a
failing worker poorly (gymnasium 1.x):

* **The env raises in a worker.** The worker queues ``(index, type, value, traceback)``, answers ``(None, False)``,
  closes its env and exits with code 0. The parent's next ``step_wait``/``reset_wait`` logs the traceback as a
  warning, closes that worker's pipe (``parent_pipes[index] = None``) and raises ``type(value)``: the original
  message, but neither the env nor the worker is named. Any later call on the vector env fails with
  ``AttributeError: 'NoneType' object has no attribute 'send'``.
* **A worker is killed** (SIGKILL, the out-of-memory killer, a segfault in native code). Its pipe reads
  end-of-file: a pending ``step_wait`` raises a bare ``EOFError``, the next ``step_async`` a ``BrokenPipeError``
  (a kill while the worker idles between steps, the common case). ``close()`` then raises as well (``EOFError``
  from the pending call it first waits for, or ``BrokenPipeError`` from its ``close`` command, or
  ``BlockingIOError`` once uvloop has made the pipes non-blocking) and leaves the other workers running.

Nothing hangs (a dead worker's pipe is readable at end-of-file), but the errors say nothing useful. This module
turns them into :class:`~streamrl.errors.EnvError` messages that name the env, the worker, its pid and how it
ended, and closes a vector env without waiting on dead or stuck workers:

* :func:`describe_dead_workers` / :func:`raise_if_workers_died` — check the workers now;
* :func:`raise_for_worker_failure` — in an ``except`` block around a gymnasium call: re-raise a worker failure as
  :class:`~streamrl.errors.EnvError` (the worker's env raised) or :class:`~streamrl.errors.EnvWorkerDied`;
* :class:`WatchWorkers` — a vector-env wrapper doing that around ``reset``, ``step``, ``step_async`` and
  ``step_wait``, so that code which holds the gymnasium object (the env stage's hot loop) gets the same errors;
  with a ``timeout``, a ``reset`` or ``step`` whose answers do not all come within it kills the workers that owe
  one and raises :class:`~streamrl.errors.EnvStepTimeout` naming them (:func:`kill_unanswered`);
* :func:`close_vector_env` — close gracefully within a timeout, else terminate, then kill; always reap.

Every function takes the vector env or any gymnasium wrapper around it; for an env without subprocess workers
(sync, native) the checks find nothing and :func:`close_vector_env` is a plain ``close()``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
from typing import Any

from gymnasium.vector import AsyncVectorEnv, VectorWrapper
from gymnasium.vector.async_vector_env import AsyncState

from streamrl.errors import EnvError, EnvStepTimeout, EnvWorkerDied

CLOSE_TIMEOUT = 2.0  # seconds the workers get to close their envs before they are terminated
KILL_AFTER = 1.0  # seconds a terminated worker gets before SIGKILL
EXIT_GRACE = 0.5  # seconds to wait for the exit code of a worker whose pipe closed (it is still exiting)

_CRASH_SIGNALS = {"SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE"}


def async_vector_env(vector_env: Any) -> AsyncVectorEnv | None:
    """The ``AsyncVectorEnv`` inside ``vector_env`` (itself, or under gymnasium wrappers), or None."""
    inner = getattr(vector_env, "unwrapped", vector_env)
    return inner if isinstance(inner, AsyncVectorEnv) else None


# -- finding dead workers -------------------------------------------------------------------------------------
def _pipe_at_eof(pipe: Any) -> bool:
    """Whether the worker's end of ``pipe`` is closed (peeks: nothing is consumed). False where it cannot tell."""
    if pipe.closed:
        return True
    try:
        fd = os.dup(pipe.fileno())
    except OSError:
        return True
    try:
        sock = socket.socket(fileno=fd)  # multiprocessing's duplex pipes are socket pairs on POSIX
    except OSError:
        os.close(fd)
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # alive, no answer yet
    except OSError:
        return True  # ECONNRESET and the like: the other end is gone
    finally:
        sock.close()


def _dead(env: AsyncVectorEnv, grace: float) -> list[tuple[int, int | None, int | None]]:
    """``(index, pid, exitcode)`` of each worker that ended or whose pipe reads end-of-file.

    Workers that gymnasium shut down after their env raised (pipe ``None``) are not counted: see :func:`_shut`.
    """
    dead = []
    for index, (process, pipe) in enumerate(zip(env.processes, env.parent_pipes, strict=True)):
        if pipe is None:
            continue
        if process.exitcode is None and not _pipe_at_eof(pipe):
            continue
        if process.exitcode is None and grace > 0:
            process.join(grace)  # the pipe closes a moment before the process becomes reapable
        dead.append((index, process.pid, process.exitcode))
    return dead


def _shut(env: AsyncVectorEnv) -> list[tuple[int, int | None]]:
    """``(index, pid)`` of each worker gymnasium shut down after its env raised."""
    return [(i, p.pid) for i, (p, pipe) in enumerate(zip(env.processes, env.parent_pipes, strict=True)) if pipe is None]


def _how(exitcode: int | None) -> tuple[str, str]:
    """How a worker ended, and what to do about it."""
    debug = "run the env with backend='sync' to debug it in this process"
    if exitcode is None:
        return "closed its pipe", f"its stderr may say why; {debug}"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        if name == "SIGKILL":
            return ("killed by signal SIGKILL", "SIGKILL comes from outside the env: the kernel's out-of-memory "
                    "killer (see `dmesg`), a job scheduler's limit or a user; give the run more memory or fewer envs")
        if name in _CRASH_SIGNALS:
            return f"crashed with signal {name}", f"a fault in the env's native code; {debug}"
        return f"killed by signal {name}", "something outside the env stopped it"
    return f"exited with code {exitcode} without reporting an error", f"the env or a library it uses exited; {debug}"


def _worker(index: int, pid: int | None) -> str:
    return f"subprocess worker {index} (pid {pid})"


def describe_dead_workers(vector_env: Any, *, grace: float = EXIT_GRACE) -> str | None:
    """What is wrong with the workers of ``vector_env`` now, or None when every one is alive (or it has none).

    A worker counts as dead when its process ended or its pipe reads end-of-file (``grace`` seconds are allowed for
    its exit code to appear), and as shut down when gymnasium closed its pipe after its env raised. Example::

        subprocess worker 3 (pid 1234) died (killed by signal SIGKILL); SIGKILL comes from outside the env: ...
    """
    env = async_vector_env(vector_env)
    if env is None or env.closed:
        return None
    parts = []
    for index, pid, exitcode in _dead(env, grace):
        how, advice = _how(exitcode)
        parts.append(f"{_worker(index, pid)} died ({how}); {advice}")
    for index, pid in _shut(env):
        parts.append(f"{_worker(index, pid)} was shut down after its env raised (that error was raised before)")
    return "; ".join(parts) or None


def _died_error(vector_env: Any, env_name: str, grace: float) -> EnvWorkerDied | None:
    env = async_vector_env(vector_env)
    text = describe_dead_workers(vector_env, grace=grace)
    if env is None or text is None:
        return None
    workers = tuple(sorted([i for i, _, _ in _dead(env, 0.0)] + [i for i, _ in _shut(env)]))
    return EnvWorkerDied(f"env {env_name!r}: {text}. Close the env to stop its other workers",
                         env=env_name, workers=workers)


def raise_if_workers_died(vector_env: Any, env_name: str, *, grace: float = EXIT_GRACE) -> None:
    """Raise :class:`EnvWorkerDied` naming ``env_name`` and the dead workers, if any.

    See :func:`describe_dead_workers` for what counts as dead.
    """
    error = _died_error(vector_env, env_name, grace)
    if error is not None:
        raise error


def raise_for_worker_failure(vector_env: Any, env_name: str, error: BaseException) -> None:
    """Re-raise ``error``, just raised by a call on ``vector_env``, as an error naming the env and the worker.

    Call it in an ``except`` block and re-raise when it returns (``error`` was no worker failure)::

        try:
            result = vector_env.step_wait()
        except Exception as exc:
            raise_for_worker_failure(vector_env, "CartPole-v1", exc)
            raise

    * a worker died (``EOFError``, ``BrokenPipeError``, ...): :class:`EnvWorkerDied` saying how it ended;
    * a worker's env raised (gymnasium re-raised its error and shut the worker down): :class:`EnvError` with the
      original type and message; the worker's traceback was logged by gymnasium as a warning;
    * a call on a worker shut down earlier (``AttributeError`` on its closed pipe): :class:`EnvWorkerDied`.

    The original exception is the new one's ``__cause__``.
    """
    env = async_vector_env(vector_env)
    if env is None or isinstance(error, EnvError):
        return
    shut = _shut(env)
    if _dead(env, 0.0) or (shut and isinstance(error, (EOFError, OSError, AttributeError))):
        died = _died_error(env, env_name, EXIT_GRACE)
        if died is not None:
            raise died from error
    if not shut:
        return
    if len(shut) == 1:
        who, what = _worker(*shut[0]), "raised"
    else:
        who = "subprocess workers " + ", ".join(f"{i} (pid {pid})" for i, pid in shut)
        what = "raised; the last error"
    raise EnvError(
        f"env {env_name!r}: {who} {what}: {type(error).__name__}: {error}. gymnasium logged the worker's traceback "
        "as a warning ('Received the following error from Worker-...'); to debug the env in this process, run it "
        "with backend='sync'"
    ) from error


# -- hung workers ---------------------------------------------------------------------------------------------
def kill_unanswered(vector_env: Any) -> tuple[tuple[int, int | None], ...]:
    """Kill (SIGKILL) and reap the subprocess workers that owe an answer to the pending call; their ``(index,
    pid)``.

    A worker owes one when its pipe holds nothing to read: call this after a wait for the answers timed out and
    before any was taken (gymnasium's ``step_wait(timeout=)`` polls every pipe before it reads one). The pipes of
    the killed workers read end-of-file, so a thread blocked on one of them wakes up with an error.
    """
    env = async_vector_env(vector_env)
    if env is None:
        return ()
    hung = [(i, process) for i, (process, pipe) in enumerate(zip(env.processes, env.parent_pipes, strict=True))
            if pipe is not None and not pipe.closed and not pipe.poll()]
    for _, process in hung:
        process.kill()
    for _, process in hung:
        process.join(KILL_AFTER)
    return tuple((i, process.pid) for i, process in hung)


def describe_workers(workers: tuple[tuple[int, int | None], ...]) -> str:
    """``"subprocess worker 1 (pid 1234)"``, or ``"subprocess workers 0 (pid 1233), 1 (pid 1234)"``."""
    if len(workers) == 1:
        return _worker(*workers[0])
    return "subprocess workers " + ", ".join(f"{i} (pid {pid})" for i, pid in workers)


# -- the wrapper ----------------------------------------------------------------------------------------------
class WatchWorkers(VectorWrapper):  # type: ignore[type-arg]
    """An ``AsyncVectorEnv`` whose worker failures come out as errors naming ``env_name`` and the worker.

    ``reset``, ``step``, ``step_async`` and ``step_wait`` go through :func:`raise_for_worker_failure`; ``close``
    is :func:`close_vector_env`; anything else is the wrapped env's. The cost is one Python call per method call.

    ``timeout`` (seconds, None: no limit; the env stage sets it to its ``step_timeout``) bounds ``reset``, ``step``
    and ``step_wait``: when the workers' answers do not all come in time, the workers that owe one are killed and
    :class:`~streamrl.errors.EnvStepTimeout` names them.
    """

    def __init__(self, env: Any, env_name: str, timeout: float | None = None) -> None:
        super().__init__(env)
        self.env_name = env_name
        self.timeout = timeout

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.env, method)(*args, **kwargs)
        except multiprocessing.TimeoutError as exc:
            call = method.removesuffix("_wait")
            hung = kill_unanswered(self.env)
            raise EnvStepTimeout(
                f"env {self.env_name!r}: {call} did not return within {kwargs.get('timeout', self.timeout):g} s; "
                f"{describe_workers(hung) if hung else 'no worker'} owed an answer and was killed",
                env=self.env_name, call=call, workers=hung,
            ) from exc
        except Exception as exc:
            raise_for_worker_failure(self.env, self.env_name, exc)
            raise

    def reset(self, **kwargs: Any) -> Any:
        if self.timeout is None:
            return self._call("reset", **kwargs)
        self._call("reset_async", **kwargs)
        return self._call("reset_wait", timeout=self.timeout)

    def step(self, actions: Any) -> Any:
        if self.timeout is None:
            return self._call("step", actions)
        self._call("step_async", actions)
        return self._call("step_wait", timeout=self.timeout)

    def step_async(self, actions: Any) -> None:
        self._call("step_async", actions)

    def step_wait(self, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.timeout)
        return self._call("step_wait", **kwargs)

    def close(self, **kwargs: Any) -> None:
        close_vector_env(self.env, **kwargs)

    def __getattr__(self, name: str) -> Any:  # parent_pipes, processes, call, get_attr, ...
        if name == "env":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.env, name)


def watch_workers(vector_env: Any, env_name: str, timeout: float | None = None) -> Any:
    """``vector_env`` wrapped in :class:`WatchWorkers` if it runs subprocess workers, else ``vector_env`` itself."""
    if async_vector_env(vector_env) is None or isinstance(vector_env, WatchWorkers):
        return vector_env
    return WatchWorkers(vector_env, env_name, timeout)


# -- closing --------------------------------------------------------------------------------------------------
def close_vector_env(vector_env: Any, *, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close ``vector_env``; with subprocess workers, within about ``timeout`` + ``KILL_AFTER`` seconds, always.

    When every worker is alive, each gets its ``close`` command (after answering a call left pending, as when a
    run is cancelled mid-step) and ``timeout`` seconds to close its env and exit. Otherwise (a worker died, was
    shut down, did not answer in time) the workers are terminated, and killed if they outlive ``KILL_AFTER``.
    Every worker process is reaped: none is left behind. Never raises for a dead worker.
    """
    env = async_vector_env(vector_env)
    if env is None:
        vector_env.close()
        return
    if not env.closed:
        deadline = time.monotonic() + timeout
        graceful = _close_gracefully(env, deadline)
        _stop(env.processes, deadline if graceful else None)
        for pipe in env.parent_pipes:
            if pipe is not None:
                pipe.close()
        env.closed = True  # gymnasium's own close (and its __del__) now does nothing
    if vector_env is not env and not isinstance(vector_env, WatchWorkers):
        vector_env.close()  # other wrappers' own clean-up; the inner env is closed already


def _close_gracefully(env: AsyncVectorEnv, deadline: float) -> bool:
    """Send every worker ``close`` and take its answers by ``deadline``; False if that cannot be done."""
    pipes = env.parent_pipes
    if any(p is None for p in pipes) or _dead(env, 0.0):
        return False
    try:
        for pipe in pipes:
            os.set_blocking(pipe.fileno(), True)  # uvloop's add_reader leaves a pipe non-blocking
        if getattr(env, "_state", AsyncState.DEFAULT) != AsyncState.DEFAULT:
            for pipe in pipes:  # answers to a call left pending
                if not pipe.poll(max(0.0, deadline - time.monotonic())):
                    return False
                pipe.recv()
        for pipe in pipes:
            pipe.send(("close", None))
        for pipe in pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                return False
            pipe.recv()
    except (OSError, EOFError):
        return False
    return True


def _stop(processes: list[Any], deadline: float | None) -> None:
    """Join ``processes`` until ``deadline`` (None: not at all), then terminate, then kill what is left."""
    if deadline is not None:
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.terminate()
    kill_at = time.monotonic() + KILL_AFTER
    for process in alive:
        process.join(max(0.0, kill_at - time.monotonic()))
    for process in alive:
        if process.is_alive():
            process.kill()  # a stopped (SIGSTOP) or SIGTERM-ignoring worker
            process.join()
