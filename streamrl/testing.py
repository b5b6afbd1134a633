"""Test helpers: sources, sinks and misbehaving envs, for tests and benchmarks of pipelines.

::

    p = Pipeline()
    p.add(ListSource("src", [1, 2, 3]), Collect("sink"))
    p.connect("src.items", "sink.items")
    streamrl.run(p, tmp_path)
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import gymnasium as gym
import numpy as np

from streamrl.events import Event, Hook
from streamrl.stages.base import Stage, StageContext

if TYPE_CHECKING:
    from streamrl.execution.context import RunContext


class ListSource(Stage):
    """Sends the given items, then ends its stream; ``delay`` seconds between items."""

    outputs = ("items",)
    source = True

    def __init__(self, name: str, items: list[Any], *, delay: float = 0.0) -> None:
        super().__init__(name)
        self.items = list(items)
        self.delay = delay
        self.sent = 0

    async def run(self, ctx: StageContext) -> None:
        out = ctx.output("items")
        for item in self.items:
            if ctx.stopping:
                return
            await out.send(item)
            self.sent += 1
            if self.delay:
                await anyio.sleep(self.delay)


class Collect(Stage):
    """Receives every item into ``self.items``; ``delay`` seconds of (sleeping) work per item."""

    inputs = ("items",)

    def __init__(self, name: str, *, delay: float = 0.0, keep: bool = True) -> None:
        super().__init__(name)
        self.items: list[Any] = []
        self.count = 0
        self.delay = delay
        self.keep = keep

    async def run(self, ctx: StageContext) -> None:
        async for item in ctx.input("items"):
            self.count += 1
            if self.keep:
                self.items.append(item)
            if self.delay:
                await anyio.sleep(self.delay)


class CountFrames(Stage):
    """A sink for chunks: counts their rows (env steps x envs, reset-only rows included) and chunks."""

    inputs = ("chunks",)

    def __init__(self, name: str = "sink") -> None:
        super().__init__(name)
        self.frames = 0
        self.chunks = 0
        self.first_at: float | None = None

    async def run(self, ctx: StageContext) -> None:
        async for chunk in ctx.input("chunks"):
            if self.first_at is None:
                self.first_at = time.perf_counter()
            self.frames += chunk.numel()
            self.chunks += 1


class Fail(Stage):
    """Raises ``error`` after receiving ``after`` items."""

    inputs = ("items",)

    def __init__(self, name: str, error: Exception, *, after: int = 0) -> None:
        super().__init__(name)
        self.error = error
        self.after = after

    async def run(self, ctx: StageContext) -> None:
        seen = 0
        async for _ in ctx.input("items"):
            seen += 1
            if seen > self.after:
                raise self.error


class WeightsPublisher(Stage):
    """A learner's part, for tests of weights fan-out: after every ``every``-th count received on ``seen``, sends
    the weights of ``module`` as the next version (1, 2, ...)."""

    inputs = ("seen",)
    outputs = ("weights",)

    def __init__(self, name: str, module: Any, every: int = 2) -> None:
        super().__init__(name)
        self.module = module
        self.every = every
        self.version = 0

    async def run(self, ctx: StageContext) -> None:
        from streamrl.stages.policy import weights_message

        async for count in ctx.input("seen"):
            if count % self.every == 0:
                self.version += 1
                await ctx.output("weights").send(weights_message(self.module, self.version))


class StopAfterFrames(Hook):
    """Asks the run to stop once the env stage's ``chunk`` events report ``frames`` or more."""

    events = ("chunk",)

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames
        self.run: RunContext | None = None

    async def start(self, run: RunContext) -> None:
        self.run = run

    def on_event(self, event: Event) -> None:
        if event.data["frames"] >= self.frames and self.run is not None:
            self.run.request_stop(f"{self.frames} frames seen by {self.name}")


def collection_fps(env: Any, policy: Any, *, frames: int, frames_per_chunk: int) -> float:
    """Frames per second of an env stage + policy stage + a :class:`CountFrames` sink, timed from
    ``streamrl.run`` to its return (start-up and shutdown included); for the collection benchmarks."""
    import tempfile

    from streamrl.execution.main import run
    from streamrl.pipeline import Pipeline
    from streamrl.stages.env import EnvStage
    from streamrl.stages.policy import PolicyStage

    p = Pipeline("collection")
    sink = CountFrames("sink")  # env steps x envs (chunk.numel())
    p.add(EnvStage("env", env, frames_per_chunk=frames_per_chunk, total_frames=frames), PolicyStage("policy", policy),
          sink)
    p.connect("env.policy", "policy.requests", capacity=0)
    p.connect("env.chunks", "sink.chunks", capacity=4)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        run(p, run_dir, handle_signals=False)
        elapsed = time.perf_counter() - start
    return sink.frames / elapsed


class FailingCartPole(gym.Wrapper):  # type: ignore[type-arg]
    """CartPole that raises ``RuntimeError`` at its ``fail_at``-th step (for crash tests).

    ``stamp`` names a file that receives ``time.time()`` of the failure, so a test can time the shutdown.
    """

    def __init__(self, fail_at: int = 100, stamp: str | None = None, **kwargs: Any) -> None:
        super().__init__(gym.make("CartPole-v1", **kwargs))
        self.fail_at = fail_at
        self.stamp = stamp
        self.steps = 0

    def step(self, action: Any) -> Any:
        self.steps += 1
        if self.steps >= self.fail_at:
            if self.stamp:
                with open(self.stamp, "w") as f:
                    f.write(repr(time.time()))
            raise RuntimeError(f"env exploded at step {self.steps}")
        return self.env.step(action)


if "streamrl/FailingCartPole-v0" not in gym.registry:  # make it as "streamrl.testing:streamrl/FailingCartPole-v0"
    gym.register("streamrl/FailingCartPole-v0", entry_point="streamrl.testing:FailingCartPole")


class HangingCartPole(gym.Wrapper):  # type: ignore[type-arg]
    """CartPole whose ``hang_at``-th step (0: its first reset) does not return, for step-timeout tests.

    It blocks in one call (``threading.Event.wait``) for ``hang_s`` seconds (None: for good) or until
    :attr:`release` is set, like an env waiting on a simulator that went away; a test sets it to free a thread
    that was left behind. ``stamp`` names a file that receives ``time.time()`` when it starts hanging.
    """

    release = threading.Event()

    def __init__(self, hang_at: int = 1, stamp: str | None = None, hang_s: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(gym.make("CartPole-v1", **kwargs))
        self.hang_at = hang_at
        self.stamp = stamp
        self.hang_s = hang_s
        self.steps = 0

    def reset(self, **kwargs: Any) -> Any:
        if self.hang_at == 0:
            self._hang()
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> Any:
        self.steps += 1
        if self.steps == self.hang_at:
            self._hang()
        return self.env.step(action)

    def _hang(self) -> None:
        if self.stamp:
            with open(self.stamp, "w") as f:
                f.write(repr(time.time()))
        self.release.wait(self.hang_s)


if "streamrl/HangingCartPole-v0" not in gym.registry:  # make it as "streamrl.testing:streamrl/HangingCartPole-v0"
    gym.register("streamrl/HangingCartPole-v0", entry_point="streamrl.testing:HangingCartPole")


def random_chunks(n: int, num_envs: int = 2, steps: int = 4, obs_dim: int = 4, seed: int = 0) -> list[Any]:
    """``n`` chunks shaped like CartPole chunks with random content, for replay tests."""
    import torch
    from tensordict import TensorDict

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = (num_envs, steps)
        done = rng.random(shape) < 0.1
        out.append(TensorDict({
            "observation": torch.from_numpy(rng.standard_normal((*shape, obs_dim)).astype(np.float32)),
            "action": torch.from_numpy(rng.integers(0, 2, shape)),
            "policy_version": torch.full(shape, i, dtype=torch.int64),
            "next": {
                "observation": torch.from_numpy(rng.standard_normal((*shape, obs_dim)).astype(np.float32)),
                "reward": torch.ones((*shape, 1)),
                "done": torch.from_numpy(done[..., None]),
                "terminated": torch.from_numpy(done[..., None]),
                "truncated": torch.zeros((*shape, 1), dtype=torch.bool),
            },
        }, batch_size=list(shape)))
    return out


@contextlib.contextmanager
def small_disk(path: str | Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``"2m"``) mounted at ``path`` while the block runs, for disk-full tests and tools.

    Mounting needs root: ``OSError`` says so where it cannot mount. Unmounted lazily on the way out, so files left
    open by the code under test do not keep it mounted.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:
        raise OSError(f"cannot mount a tmpfs at {path} (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _host_sync_error(what: str) -> AssertionError:
    return AssertionError(f"host sync inside a captured region: {what}")


def _has_bool_index(index: Any) -> bool:
    import torch

    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class _ForbidSyncOps:
    """Aten ops whose result the host must read (``_local_scalar_dense`` is ``item()``; ``nonzero`` and friends
    have data-dependent shapes), caught below autograd so that the backward pass and torch's own calls count."""

    def __init__(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        forbidden = {
            aten._local_scalar_dense.default: "Tensor.item() / bool() / float() / int() of a tensor",
            aten.nonzero.default: "torch.nonzero (data-dependent shape)",
            aten.masked_select.default: "boolean-mask selection (data-dependent shape)",
            aten._unique2.default: "torch.unique (data-dependent shape)",
            aten.unique_dim.default: "torch.unique (data-dependent shape)",
            aten.unique_consecutive.default: "torch.unique_consecutive (data-dependent shape)",
        }

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                what = forbidden.get(func)
                if what is not None:
                    raise _host_sync_error(f"aten op {func} ({what})")
                if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor) and (
                        kwargs or {}).get("output_size") is None:
                    raise _host_sync_error(f"aten op {func} without output_size (data-dependent shape)")
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@contextlib.contextmanager
def forbid_host_sync(*, aten: bool = True) -> Iterator[None]:
    """Make every host read of a device value raise, so CPU tests can tell whether code could be CUDA-graph captured.

    Inside a captured region (``torch.cuda.graph``) nothing may read a tensor's value on the host: the value does
    not exist yet when the graph is recorded, and a replay never returns to Python. This context manager turns
    those reads into ``AssertionError("host sync inside a captured region: <what>")`` on any device, CPU included:

    * ``Tensor.item``, ``tolist``, ``cpu``, ``numpy``, and ``__bool__`` / ``__float__`` / ``__int__`` /
      ``__index__`` (``if t:``, ``float(t)``, ``range(t)``...: shapes are ints and stay allowed);
    * ``torch.nonzero`` / ``Tensor.nonzero`` and ``t[mask]`` / ``t[mask] = v`` with a bool tensor index
      (data-dependent shapes);
    * with ``aten=True`` (default), also the same reads made below Python, by torch itself or in the backward pass:
      ``aten._local_scalar_dense`` (what ``item()`` runs), ``nonzero``, ``masked_select``, ``unique``,
      ``repeat_interleave`` without ``output_size``. This runs the block under a ``TorchDispatchMode``.

    The patched attributes are restored on exit, also when the block raises. Not thread-safe: it patches
    ``torch.Tensor`` for every thread. Usage::

        from streamrl.testing import forbid_host_sync

        out = loss_fn(batch)                 # once outside: lazy modules, caches
        with forbid_host_sync():
            out = loss_fn(batch)
            out["loss"].backward()
            optimizer.step()                 # e.g. torch.optim.Adam(..., fused=True)
    """
    import torch

    def forbid(name: str, what: str) -> Any:
        def raiser(*args: Any, **kwargs: Any) -> Any:
            raise _host_sync_error(what)

        raiser.__name__ = name
        return raiser

    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero",
             "__getitem__", "__setitem__")
    originals = {name: torch.Tensor.__dict__[name] for name in names if name in torch.Tensor.__dict__}
    get_item, set_item = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def getitem(self: torch.Tensor, index: Any) -> Any:
        if _has_bool_index(index):
            raise _host_sync_error("Tensor.__getitem__ with a bool tensor index (data-dependent shape); use "
                                   "torch.where or a multiplication by the mask")
        return get_item(self, index)

    def setitem(self: torch.Tensor, index: Any, value: Any) -> None:
        if _has_bool_index(index):
            raise _host_sync_error("Tensor.__setitem__ with a bool tensor index; use torch.where or masked_fill_")
        set_item(self, index, value)

    patches: dict[str, Any] = {name: forbid(name, f"Tensor.{name}") for name in names}
    patches["__getitem__"], patches["__setitem__"] = getitem, setitem
    original_nonzero = torch.nonzero
    mode = _ForbidSyncOps().mode if aten else contextlib.nullcontext()
    try:
        for name, patch in patches.items():
            setattr(torch.Tensor, name, patch)
        torch.nonzero = forbid("nonzero", "torch.nonzero (data-dependent shape)")
        with mode:
            yield
    finally:
        for name in names:  # put back what torch.Tensor defined itself; the rest it inherits again
            if name in originals:
                setattr(torch.Tensor, name, originals[name])
            elif name in torch.Tensor.__dict__:
                delattr(torch.Tensor, name)
        torch.nonzero = original_nonzero
