"""The one exception tree of streamrl.

::

    StreamRLError
     ├── StreamError
     │    ├── EndOfStream          the sending side closed and every item was received
     │    ├── WouldBlock           a *_nowait call could not complete at once
     │    ├── ClosedStreamError    this half was closed by its owner and used afterwards
     │    └── BrokenStreamError    the other side is gone (all receivers closed)
     ├── PipelineError            the graph is invalid (unknown port, unconnected input, cycle, ...)
     ├── ConfigError              a configuration value or ``--set`` override is wrong
     ├── StageFailed              a stage raised while the pipeline ran; ``.stage`` names it
     ├── WorkerDied               a worker process ended without saying why; ``.group`` names it
     ├── RemoteError              an exception re-raised from a worker process (its traceback as text)
     ├── EnvError                 an environment misbehaved (wrong shapes, a worker crashed)
     └── StoreError               a replay store cannot be opened or is inconsistent

Messages say what was expected, what was got, and what to do.
"""

from __future__ import annotations


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


class ConfigError(StreamRLError):
    """A configuration value is invalid."""


class StageFailed(StreamRLError):
    """A stage raised while the pipeline ran. The original exception is ``__cause__``."""

    def __init__(self, stage: str, error: BaseException) -> None:
        self.stage = stage
        self.error = error
        super().__init__(f"stage {stage!r} failed: {type(error).__name__}: {error}")


class WorkerDied(StreamRLError):
    """A worker process ended without reporting an error (killed, segfault, out of memory)."""

    def __init__(self, group: str, exitcode: int | None) -> None:
        self.group = group
        self.exitcode = exitcode
        super().__init__(
            f"worker process of stage group {group!r} died (exit code {exitcode}); its stderr holds any traceback. "
            "Look for an out-of-memory kill or a crash in the env or policy it runs; a script that runs a pipeline "
            "with worker processes needs an `if __name__ == '__main__':` guard (workers import the main module)"
        )


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


class StoreError(StreamRLError):
    """A replay store cannot be opened or is inconsistent."""
