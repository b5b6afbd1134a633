"""The one exception tree of streamrl.

::

    StreamRLError
     ├── StreamError
     │    ├── EndOfStream          the sending side closed and every item was received
     │    ├── WouldBlock           a *_nowait call could not complete at once
     │    ├── ClosedStreamError    this half was closed by its owner and used afterwards
     │    └── BrokenStreamError    the other side is gone (all receivers closed)
     ├── PipelineError            the graph is invalid (unknown port, unconnected input, cycle, ...)
     ├── ConfigError              a configuration value or ``--set`` override is wrong (also a ``ValueError``)
     │    ├── PipelineFileError   a pipeline file failed to import, or its ``build()`` raised or returned no Pipeline
     │    ├── RunDirError         the run directory is another run's (locked), or a fresh start would overwrite it
     │    └── CheckpointError     a checkpoint is refused (it pickles code), damaged or of another format
     ├── NonFiniteError           a loss, a gradient or a checkpointed tensor went NaN or infinite
     ├── StageFailed              a stage raised while the pipeline ran; ``.stage`` names it
     ├── WorkerDied               a worker process ended without saying why: its group, pid and signal
     │    └── ReplicaLost         a Ray replica's actor died past its max_restarts: the replica and its node
     ├── RemoteError              an exception re-raised from a worker process (its traceback as text)
     ├── EnvError                 an environment misbehaved (wrong shapes, a worker crashed)
     │    ├── EnvWorkerDied       a subprocess env worker died or was shut down; ``.workers`` names them
     │    └── EnvStepTimeout      an env's reset or step outlived the env stage's ``step_timeout``
     ├── StoreError               a replay store cannot be opened or is inconsistent
     │    └── StoreDiskFull       no space left flushing a store (also a DiskFull); the committed rows stay
     └── DiskFull                 no space left writing a file of the run directory; ``.path`` names it

Messages say what was expected, what was got, and what to do.
"""

from __future__ import annotations

import functools
import inspect
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast


class StreamRLError(Exception):
    """Base class of every error streamrl raises on purpose."""


class StreamError(StreamRLError):
    """Base class of stream errors."""


class EndOfStream(StreamError):
    """Raised by ``receive`` when every sender closed and the buffer is drained."""


class WouldBlock(StreamError):
    """Raised by ``send_nowait``/``receive_nowait`` when the call would have to wait."""


class ClosedStreamError(StreamError):
    """Raised when a half is used after its owner closed it."""


class BrokenStreamError(StreamError):
    """Raised by ``send`` when no receiver is left to take the item."""


class PipelineError(StreamRLError):
    """The pipeline graph is invalid; raised by ``Pipeline.validate`` before anything runs."""


class ConfigError(StreamRLError, ValueError):
    """A configuration value or a constructor's argument is invalid.

    It is a ``ValueError`` too, so ``except ValueError`` keeps catching a bad argument; the CLI exits with 2.
    """


class PipelineFileError(ConfigError):
    """A pipeline file failed to import, or its ``build()`` raised or returned something else than a Pipeline.

    The message names the file and line; the original exception is ``__cause__`` (``streamrl run --debug`` prints
    its traceback).
    """


class RunDirError(ConfigError):
    """The run directory is held by another live run (its pid is named), or holds a run that a fresh start would
    overwrite (continue it with ``--resume DIR``, or pick a new ``--out``, or pass ``--overwrite``)."""


class CheckpointError(ConfigError):
    """A checkpoint cannot be used: it holds a pickled object that loading would execute (refused, never run), it
    is damaged and no older one loads, or it is not a streamrl checkpoint; or a ``state_dict`` returned something
    a checkpoint cannot hold (not saved). The message names the file or the entry; the CLI exits with 2."""


class NonFiniteError(StreamRLError):
    """A value the run must keep finite went NaN or infinite: a loss term or a gradient in a learner (the optimizer
    step was not taken), or a tensor a checkpoint would hold (nothing was saved; the previous checkpoint stays).

    The message names where (learner, optimizer step, loss term or parameter, first non-finite batch key, or the
    checkpoint entry) and which check found it."""


class StageFailed(StreamRLError):
    """A stage raised while the pipeline ran. The original exception is ``__cause__``."""

    def __init__(self, stage: str, error: BaseException) -> None:
        self.stage = stage
        self.error = error
        super().__init__(f"stage {stage!r} failed: {type(error).__name__}: {error}")


class WorkerDied(StreamRLError):
    """A worker process ended without reporting an error (killed, crashed, out of memory).

    ``.group`` names its stage group, ``.pid`` the process, ``.exitcode`` how it ended (``-9``: SIGKILL)."""

    def __init__(self, group: str, exitcode: int | None, pid: int | None = None) -> None:
        self.group = group
        self.exitcode = exitcode
        self.pid = pid
        how = "closed its connection; its exit status is unknown" if exitcode is None else exit_status(exitcode)
        if exitcode is None:
            advice = "its stderr may say why"
        elif exitcode == -signal.SIGKILL:
            advice = ("SIGKILL comes from outside the process: the kernel's out-of-memory killer (see `dmesg`), a "
                      "job scheduler's limit or a user")
        elif exitcode < 0:
            advice = "a crash in native code it runs (an env, a simulator, torch) or a signal from outside"
        else:
            how += " without reporting an error"
            advice = ("its traceback, if any, is on stderr above; a script that runs a pipeline with worker processes "
                      "needs an `if __name__ == '__main__':` guard (workers import the main module)")
        if exitcode is not None and exitcode < 0:
            how += f" (exit code {exitcode})"
        super().__init__(f"worker process of stage group {group!r} (pid {pid}) died: {how}; {advice}")


class ReplicaLost(WorkerDied):
    """The Ray actor of a replica died (its node was removed, its process killed) once more than its group's
    ``max_restarts`` allow. ``.group`` names the replica (``collect[1]``), ``.node`` the node it ran on (its IP),
    ``.cause`` what Ray said."""

    def __init__(self, replica: str, node: str | None, node_id: str | None, restarts: int, max_restarts: int,
                 cause: str) -> None:
        self.group = replica
        self.exitcode = None
        self.pid = None
        self.node = node
        self.node_id = node_id
        self.cause = cause
        where = f"node {node} ({(node_id or '?')[:12]})" if node else "no node yet"
        StreamRLError.__init__(
            self, f"replica {replica} (a Ray actor on {where}) died after {restarts} restart(s) of max_restarts="
                  f"{max_restarts}: {cause.strip().splitlines()[0] if cause.strip() else cause}; raise the group's "
                  "max_restarts to ride out more deaths, or see why its actors die (`ray status`, the node's logs)")



def exit_status(exitcode: int) -> str:
    """How a child process ended, from its exit code: ``"killed by SIGKILL"`` (-9), ``"crashed with SIGSEGV"``
    (-11), ``"exited with code 1"``."""
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    crash = name in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE")
    return f"crashed with {name}" if crash else f"killed by {name}"


class RemoteError(StreamRLError):
    """An exception raised in a worker process, carried back with its formatted traceback."""

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        self.type_name = type_name
        self.traceback_text = traceback_text
        super().__init__(f"{type_name}: {message}\n--- worker traceback ---\n{traceback_text}")


class EnvError(StreamRLError):
    """An environment misbehaved."""


class EnvWorkerDied(EnvError):
    """A subprocess env worker died (killed, crashed) or was shut down; ``.env`` names the env, ``.workers`` them."""

    def __init__(self, message: str, env: str = "", workers: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.env = env
        self.workers = workers


class EnvStepTimeout(EnvError):
    """An env's ``reset`` or ``step`` did not return within the env stage's ``step_timeout``.

    ``.env`` names the env, ``.call`` the call (``"reset"``/``"step"``), ``.frames`` the env stage's frame count
    when it hung (None when raised by the env itself), ``.workers`` the ``(index, pid)`` of the subprocess workers
    that did not answer (they were killed).
    """

    def __init__(self, message: str, *, env: str, call: str, frames: int | None = None,
                 workers: tuple[tuple[int, int | None], ...] = ()) -> None:
        super().__init__(message)
        self.env = env
        self.call = call
        self.frames = frames
        self.workers = workers


class StoreError(StreamRLError):
    """A replay store cannot be opened or is inconsistent."""


class DiskFull(StreamRLError):
    """The disk holding a run-directory file is full (``ENOSPC``); ``.path`` names the file being written."""

    def __init__(self, path: str | Path, advice: str = "free space and run again") -> None:
        self.path = Path(path)
        self.advice = advice
        super().__init__(f"disk full writing {self.path}: {advice}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # pickles across processes with its fields
        return type(self), (self.path, self.advice)


class StoreDiskFull(StoreError, DiskFull):
    """A replay store's flush ran out of space (``ENOSPC``): ``.path`` names the store; the message says how many
    rows were not committed. The committed rows stay intact; free space and resume."""


_Init = TypeVar("_Init", bound=Callable[..., Any])


def torchrl_names(owner: str, *, accept: Mapping[str, str] | None = None,
                  convert: Mapping[str, Callable[[Any], str | None]] | None = None) -> Callable[[_Init], _Init]:
    """Decorate a constructor so that TorchRL's argument names work, or fail saying what ours is.

    ``accept`` maps a TorchRL name to ours where the meaning is the same: the keyword is renamed before the call
    (given together with ours, it is a ``TypeError``). ``convert`` maps a TorchRL name to a function of its value
    that returns the message of a ``TypeError`` (naming our argument and the conversion), or ``None`` where the
    value means what ours does anyway (the keyword is then dropped); it may raise a ``ConfigError`` for a value we
    cannot honour. Any other unknown keyword fails as Python would. The signature (and what mypy checks) is ours::

        @torchrl_names("MultiStep", accept={"n_steps": "n"})
        def __init__(self, gamma: float, n: int) -> None: ...

        MultiStep(gamma=0.99, n_steps=3)      # the same as MultiStep(gamma=0.99, n=3)
    """
    accepted = dict(accept or {})
    converted = dict(convert or {})

    def decorate(init: _Init) -> _Init:
        signature = inspect.signature(init)

        @functools.wraps(init)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            for name in [key for key in kwargs if key in converted]:
                message = converted[name](kwargs[name])
                if message is not None:
                    raise TypeError(message)
                del kwargs[name]
            aliases = {key: kwargs.pop(key) for key in list(kwargs) if key in accepted}
            if aliases:
                try:
                    given: Mapping[str, Any] = signature.bind_partial(self, *args, **kwargs).arguments
                except TypeError:  # an unknown keyword or too many arguments: the call below says which
                    given = kwargs
                for theirs, value in aliases.items():
                    ours = accepted[theirs]
                    if ours in given:
                        raise TypeError(f"{owner}: {theirs}= is TorchRL's name for {ours}=; pass one of them, got "
                                        f"both")
                    kwargs[ours] = value
            return init(self, *args, **kwargs)

        return cast(_Init, wrapper)

    return decorate


def keeps_targets(what: str, flags: str) -> Callable[[Any], None]:
    """A :func:`torchrl_names` ``convert`` for TorchRL's ``delay_*`` flags (whether a loss keeps target networks):
    True is what ours does anyway (dropped), False is refused with what to do instead."""

    def convert(value: Any) -> None:
        if not value:
            raise ConfigError(f"{what} (TorchRL's {flags}), got {value!r}; drop the argument, and for targets that "
                              "follow the online networks at once step HardUpdate(loss, every=1) after each "
                              "optimizer step")

    return convert
