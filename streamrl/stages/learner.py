"""The learner stage: optimizer updates on the batches it receives, weights published as the schedule says.

::

    learner = LearnerStage("learner", loss_fn, torch.optim.Adam(loss_fn.parameters(), lr=1e-3, fused=True),
                           schedule=EveryBatch(publish_every=4), publish=actor, max_grad_norm=10.0,
                           target_update=SoftUpdate(loss_fn, tau=0.005))
    pipeline.connect("sampler.batches", "learner.batches", capacity=4)
    pipeline.connect("learner.weights", "policy.weights", capacity=1, overflow="drop_oldest")

The **schedule** says what a batch is for. :class:`EveryBatch` (off-policy): one update per batch the sampler sends,
weights published every ``publish_every`` updates. :class:`Epochs` (on-policy: PPO, A2C): each batch is a whole
chunk of fresh frames with advantages; ``epochs`` passes over its rows in shuffled minibatches of
``minibatch_size`` (every row once per epoch), then the new weights go out once::

    learner = LearnerStage("learner", ppo_loss, optimizer, schedule=Epochs(epochs=10, minibatch_size=64),
                           publish=actor, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, updates))

**No per-update machinery.** An update (loss, backward, gradient norm and clipping, optimizer step, a soft target
update) reads nothing back to the host (:mod:`streamrl.stages.update`). Every ``report_every`` updates the learner
reads its figures in one device-to-host copy and publishes one ``optim_step`` event: ``step``, ``version``,
``updates`` (since the last one), the means over them of ``loss``, every scalar the loss returns (its ``loss_*``
terms and diagnostics such as ``entropy``, ``kl_approx``, ``clip_fraction``) and ``grad_norm``, the age of the last
batch's rows (``age_min``/``age_mean``/``age_max``: learner version minus each row's ``policy_version``) and
``lr``. The end of the run reports the last partial window. ``weights`` is published after each publish. Hooks on
``batch`` (lockstep hooks may edit the batch: TorchRL's ``process_optim_batch``) or ``loss`` (``post_loss``, e.g.
``PriorityUpdate``) get an event per update, and so a host read per update.

**Target networks** are updated by the learner, after each optimizer step: ``target_update=SoftUpdate(loss,
tau=...)`` (inside a captured update) or ``HardUpdate(loss, every=N)`` (a copy every N steps).

**Captured updates** (``capture``): ``"auto"`` (the default) replays each update from a CUDA graph on CUDA when it
can (a fused optimizer, or ``check_finite=False``; no hook on ``batch``/``loss``; a loss that does not branch on
the host, which TD3's delayed actor updates do) and runs eagerly otherwise, saying why in the ``learner`` event and
``summary.json``; ``"graph"`` insists (an error says what prevents it; off CUDA it runs the same static-buffer path
without a graph, which is what the CPU tests compare with the eager path); ``"compile"`` runs the loss's forward
and backward through ``torch.compile`` (inductor: fused kernels; on CUDA ``mode="reduce-overhead"``, its own CUDA
graphs) around an eager optimizer step, for long runs of big networks (its start-up takes tens of seconds; on 2 CPU
cores it made the 3x256 PPO update of tutorial 002 1.3x faster); ``"off"`` runs eagerly, for debugging.
Batches the sampler sends as indices into a device ring (:class:`~streamrl.replay.device_ring.RingBatch`) are
gathered inside the graph. On CUDA, batches of rows arrive pinned and are copied with ``non_blocking=True``.

**Non-finite guard** (``check_finite=True``, the default). If the loss or the total gradient norm of an update is
NaN or infinite, that step is not taken (the weights stay finite) and the run stops with
:class:`~streamrl.errors.NonFiniteError` naming the learner, the optimizer step, the first ``loss_*`` term that is
non-finite (or the first parameter whose gradient is, when the loss is finite) and the first float batch entry
holding a non-finite value (or that none does), and which check found it. With a fused optimizer
(``fused=True``) the check runs on the device (the step and every later one are skipped there) and is read at the
next report, at most ``report_every`` updates later; with any other optimizer it costs one host read per update.
With hooks on the ``loss`` event the loss is checked before they see it. The ``Checkpoint`` hook then saves
nothing at the end of the run, so the last good checkpoint stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import torch
from tensordict import TensorDictBase
from torch import nn

from streamrl.errors import ConfigError, NonFiniteError
from streamrl.execution.context import resolve_device
from streamrl.replay.buffer import transitions
from streamrl.replay.device_ring import DeviceRing, RingBatch
from streamrl.stages.base import Stage, StageContext
from streamrl.stages.policy import weights_message
from streamrl.stages.update import Batch, Captured, Update, fused_guard_possible

Capture = Literal["auto", "graph", "compile", "off"]


@dataclass(frozen=True)
class EveryBatch:
    """Off-policy: one update per batch received; the weights go out every ``publish_every`` updates."""

    publish_every: int = 1

    def __post_init__(self) -> None:
        if self.publish_every < 1:
            raise ConfigError(f"EveryBatch: publish_every must be >= 1, got {self.publish_every}")


@dataclass(frozen=True)
class Epochs:
    """On-policy: ``epochs`` passes over each chunk's rows in shuffled minibatches of ``minibatch_size`` (every
    row once per epoch; the last minibatch of a pass takes the rest), then one publish."""

    epochs: int
    minibatch_size: int

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.minibatch_size < 1:
            raise ConfigError(f"Epochs: takes epochs >= 1 and minibatch_size >= 1, got epochs={self.epochs}, "
                              f"minibatch_size={self.minibatch_size}")

    def minibatches(self, ring: DeviceRing, rows: int) -> list[RingBatch]:
        """Every row once per epoch, shuffled on the ring's device: index minibatches into the chunk's ring."""
        return [RingBatch(ring, idx, {}) for _ in range(self.epochs)
                for idx in torch.randperm(rows, device=ring.device).split(self.minibatch_size)]


class LearnerStage(Stage):
    """Optimizes ``loss`` on the batches it receives, as ``schedule`` says; see the module docstring."""

    inputs = ("batches",)
    outputs = ("weights",)
    optional = frozenset({"weights"})
    needs_grad = True

    def __init__(
        self,
        name: str,
        loss: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        schedule: EveryBatch | Epochs = EveryBatch(),
        publish: nn.Module | None = None,
        max_grad_norm: float | None = None,
        target_update: Any = None,
        scheduler: Any = None,
        device: str | torch.device = "auto",
        capture: Capture = "auto",
        report_every: int = 50,
        check_finite: bool = True,
    ) -> None:
        super().__init__(name)
        if not isinstance(schedule, EveryBatch | Epochs):
            raise ConfigError(f"LearnerStage {name!r}: schedule must be EveryBatch(publish_every=...) or "
                              f"Epochs(epochs=..., minibatch_size=...), got {schedule!r}")
        if capture not in ("auto", "graph", "compile", "off"):
            raise ConfigError(f"LearnerStage {name!r}: capture must be 'auto', 'graph', 'compile' or 'off', got "
                              f"{capture!r}")
        if report_every < 1:
            raise ConfigError(f"LearnerStage {name!r}: report_every must be >= 1, got {report_every}")
        for i, group in enumerate(optimizer.param_groups):
            if "lr" in group and not math.isfinite(float(group["lr"])):
                raise ConfigError(f"LearnerStage {name!r}: the optimizer's learning rate (param group {i}) is "
                                  f"{float(group['lr'])}; give it a finite lr > 0, e.g. 3e-4")
        self.loss = loss
        self.optimizer = optimizer
        self.schedule = schedule
        self.publish = publish
        self.max_grad_norm = max_grad_norm
        self.target_update = target_update
        self.scheduler = scheduler
        self.device = device
        self.capture = capture
        self.report_every = report_every
        self.check_finite = check_finite
        self.steps = 0
        self.version = 0
        self.captured: bool | None = None  # decided at run: whether updates replay from static buffers
        self.capture_reason = ""
        self._reported = 0  # self.steps at the last report

    def trains(self) -> tuple[torch.Tensor, ...]:
        return tuple(p for group in self.optimizer.param_groups for p in group["params"])

    def publishes(self) -> nn.Module | None:
        return self.publish

    def _capture_blockers(self, ctx: StageContext) -> list[str]:
        """What keeps updates from replaying captured (empty: nothing)."""
        blockers = []
        if self.check_finite and not fused_guard_possible(self.optimizer):
            blockers.append(f"the optimizer ({type(self.optimizer).__name__}) is not fused: its non-finite guard "
                            "needs a host read per update (pass fused=True, or check_finite=False)")
        hooked = [kind for kind in ("batch", "loss") if ctx.wants(kind)]
        if hooked:
            blockers.append(f"hooks subscribe to {' and '.join(repr(k) for k in hooked)}, which needs every batch "
                            "on the host")
        if not getattr(self.loss, "capturable", True):
            blockers.append(f"{type(self.loss).__name__} decides on the host what each update does "
                            "(e.g. TD3's delayed actor updates)")
        return blockers

    def _choose_capture(self, ctx: StageContext, device: torch.device) -> None:
        blockers = self._capture_blockers(ctx)
        if self.capture == "graph" and blockers:
            raise ConfigError(f"LearnerStage {self.name!r}: capture='graph' cannot be honoured: "
                              f"{'; '.join(blockers)}. Remove that, or pass capture='auto' (eager when it cannot)")
        if self.capture in ("off", "compile"):
            self.captured = False
            self.capture_reason = "capture='off'" if self.capture == "off" else (
                f"torch.compile ({'reduce-overhead' if device.type == 'cuda' else 'default'} mode)")
        elif self.capture == "graph":
            self.captured = True
            self.capture_reason = "CUDA graphs" if device.type == "cuda" else f"static buffers (no graphs on {device})"
        elif device.type != "cuda":
            self.captured, self.capture_reason = False, f"eager on {device} (graphs need CUDA)"
        elif blockers:
            self.captured, self.capture_reason = False, "eager: " + "; ".join(blockers)
        else:
            self.captured, self.capture_reason = True, "CUDA graphs"
        if self.captured:  # a captured step reads lr from a tensor the scheduler fills in place
            for group in self.optimizer.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), device=device)
                if device.type == "cuda":
                    group["capturable"] = True
            if self.optimizer.state:  # restored state: place its step counters as a capturable optimizer wants
                self.optimizer.load_state_dict(self.optimizer.state_dict())

    async def run(self, ctx: StageContext) -> None:
        device = resolve_device(self.device)
        self.loss.to(device)
        if self.optimizer.state:  # restored from a checkpoint before the move: loading it again casts it to the
            self.optimizer.load_state_dict(self.optimizer.state_dict())  # parameters' device (a no-op on the CPU)
        self._choose_capture(ctx, device)
        on_cuda = device.type == "cuda"
        await ctx.publish("learner", device=str(device), captured=self.captured, reason=self.capture_reason)
        self._update = update = Update(self.loss, self.optimizer, max_grad_norm=self.max_grad_norm,
                                       check_finite=self.check_finite, target_update=self.target_update,
                                       device=device, guard_on_device=bool(self.captured) or on_cuda,
                                       compile_loss=self.capture == "compile")
        update.version.fill_(self.version)
        self._runner = Captured(update, device) if self.captured else None
        weights_out = ctx.output("weights") if ctx.has_output("weights") else None
        chunk_ring: DeviceRing | None = None
        chunk_keys: set[Any] = set()
        async for batch in ctx.input("batches"):
            if isinstance(batch, TensorDictBase) and batch.device != device and (on_cuda or batch.device is not None):
                batch = batch.to(device, non_blocking=on_cuda)
            if isinstance(self.schedule, EveryBatch):
                every = self.schedule.publish_every
                await self._step(ctx, batch)
                if self.steps % every == 0:
                    await self._publish(ctx, weights_out)
                continue
            assert isinstance(batch, TensorDictBase), "an on-policy learner takes chunks, not ring batches"
            rows = transitions(batch)
            keys = set(rows.keys(include_nested=True, leaves_only=True))
            if chunk_ring is None or chunk_ring.capacity < batch.numel() or keys != chunk_keys:
                chunk_ring, chunk_keys = DeviceRing(batch.numel(), device), keys  # what captured updates read
                if self._runner is not None:
                    self._runner.entries.clear()  # their graphs read the old ring
            n = rows.shape[0]
            if n:
                chunk_ring.write(torch.arange(n, device=device), rows)
            for minibatch in self.schedule.minibatches(chunk_ring, n) if n else []:
                await self._step(ctx, minibatch)
            await self._publish(ctx, weights_out)  # also after a chunk without a row: a lag-bound policy waits
        await self._report(ctx)

    async def _step(self, ctx: StageContext, batch: Batch) -> None:
        """One update (captured, or eager with the events hooks asked for); a report every ``report_every``."""
        update = self._update
        if self._runner is not None:
            self._runner.run(batch)
        else:
            rows = batch.rows() if isinstance(batch, RingBatch) else batch
            self.optimizer.zero_grad(set_to_none=True)
            if ctx.wants("batch"):
                await ctx.publish("batch", batch=rows, step=self.steps)
            out, norms, total = update.forward_backward(rows)
            # before the step, and before loss hooks; with the guard on the device, a read only for those hooks
            bad = update.bad_on_host if not update.device_guard else ctx.wants("loss") and bool(update.bad)
            if self.check_finite and bad:
                await self._report(ctx)
            if ctx.wants("loss"):
                await ctx.publish("loss", loss=out, batch=rows, step=self.steps)
            update.finish(out, norms, total)
        if self.target_update is not None:
            if getattr(self.target_update, "captured", False):
                self.target_update.steps += 1  # its tensor work ran inside the update
            else:
                self.target_update.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        if self.steps - self._reported >= self.report_every:
            await self._report(ctx)
        await anyio.lowlevel.checkpoint()  # other stages run between optimizer steps

    async def _report(self, ctx: StageContext) -> None:
        """Read the figures since the last report (one host read); stop the run if an update was non-finite."""
        report = self._update.read(self.steps - self._reported)
        self._reported = self.steps
        if report.first_bad is not None:
            self.steps = report.first_bad  # the steps taken: the bad one and every later one were skipped
            raise NonFiniteError(
                f"learner {self.name!r}, optimizer step {report.first_bad + 1}: {report.diagnosis}. The step was "
                f"not taken: the weights are those after step {report.first_bad}. Lower the learning rate, clip "
                "gradients (max_grad_norm), or look for inf/NaN in the rewards and observations")
        if report.updates:
            lr = self.optimizer.param_groups[0]["lr"]
            await ctx.publish("optim_step", step=self.steps, version=self.version, updates=report.updates,
                              lr=float(lr), **report.figures)

    async def _publish(self, ctx: StageContext, weights_out: Any) -> None:
        if weights_out is not None and self.publish is not None:
            self.version += 1
            self._update.version.fill_(self.version)
            await weights_out.send(weights_message(self.publish, self.version))
            await ctx.publish("weights", version=self.version, step=self.steps)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "target_update": None if self.target_update is None else self.target_update.state_dict(),
                "steps": self.steps, "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.target_update is not None and state.get("target_update") is not None:
            self.target_update.load_state_dict(state["target_update"])
        self.steps, self.version = state["steps"], state["version"]
