"""The learner stage: one optimizer step per batch, weights published every k steps.

::

    learner = LearnerStage("learner", loss_fn, torch.optim.Adam(loss_fn.parameters(), lr=1e-3),
                           publish=actor, publish_every=4, max_grad_norm=10.0, device="auto")
    pipeline.connect("sampler.batches", "learner.batches", capacity=4)
    pipeline.connect("learner.weights", "policy.weights", capacity=1, overflow="drop_oldest")

On-policy (PPO, A2C): each batch is a whole chunk of fresh frames with advantages; the learner makes ``epochs``
passes over it in shuffled minibatches of ``minibatch_size`` rows (every row once per epoch), then publishes
the new weights once::

    learner = LearnerStage("learner", ppo_loss, optimizer, publish=actor, epochs=10, minibatch_size=64,
                           scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_updates))

Per batch it publishes, in order, the events hooks subscribe to: ``batch`` (lockstep hooks may edit the batch,
TorchRL's ``process_optim_batch``), ``loss`` (``post_loss``), ``optim_step`` (``post_optim``: target updates,
schedulers) with the loss, gradient norm and the age of the batch (learner version minus each row's
``policy_version``), and ``weights`` after each publish. On CUDA, batches arrive in pinned memory and are copied
with ``non_blocking=True``; scalars are read back to the CPU only every ``log_every`` steps.

**Non-finite guard** (``check_finite=True``, the default). Before each ``optimizer.step()`` the learner checks that
the loss and the total gradient norm are finite: one fused device-to-host read per update (the norm is the one
gradient clipping uses anyway). If either is NaN or infinite, the step is not taken (the weights stay finite) and
the run stops with :class:`~streamrl.errors.NonFiniteError` naming the learner, the optimizer step, the first
``loss_*`` term that is non-finite (or the first parameter whose gradient is, when the loss is finite) and the first
batch entry holding a non-finite value (or that none does), and which check found it. With hooks on the ``loss``
event (e.g. ``PriorityUpdate``) the loss is checked before they see it. The ``Checkpoint`` hook then saves nothing
at the end of the run, so the last good checkpoint stays.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import torch
from torch import nn

from streamrl.errors import ConfigError, NonFiniteError
from streamrl.execution.context import resolve_device
from streamrl.replay.buffer import transitions
from streamrl.stages.base import Stage, StageContext
from streamrl.stages.policy import weights_message


class LearnerStage(Stage):
    """Optimizes ``loss`` on every batch it receives; see the module docstring."""

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
        publish: nn.Module | None = None,
        publish_every: int = 1,
        max_grad_norm: float | None = None,
        device: str | torch.device = "auto",
        log_every: int = 10,
        epochs: int | None = None,
        minibatch_size: int | None = None,
        scheduler: Any = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(name)
        if publish_every < 1:
            raise ConfigError(f"LearnerStage {name!r}: publish_every must be >= 1, got {publish_every}")
        too_small = epochs is not None and minibatch_size is not None and min(epochs, minibatch_size) < 1
        if (epochs is None) != (minibatch_size is None) or too_small:
            raise ConfigError(f"LearnerStage {name!r}: on-policy mode takes both epochs >= 1 and minibatch_size >= 1, "
                              f"got epochs={epochs}, minibatch_size={minibatch_size}")
        for i, group in enumerate(optimizer.param_groups):
            if "lr" in group and not math.isfinite(float(group["lr"])):
                raise ConfigError(f"LearnerStage {name!r}: the optimizer's learning rate (param group {i}) is "
                                  f"{float(group['lr'])}; give it a finite lr > 0, e.g. 3e-4")
        self.epochs = epochs
        self.minibatch_size = minibatch_size
        self.scheduler = scheduler
        self.loss = loss
        self.optimizer = optimizer
        self.publish = publish
        self.publish_every = publish_every
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.log_every = log_every
        self.check_finite = check_finite
        self.steps = 0
        self.version = 0

    def trains(self) -> tuple[torch.Tensor, ...]:
        return tuple(p for group in self.optimizer.param_groups for p in group["params"])

    def publishes(self) -> nn.Module | None:
        return self.publish

    async def run(self, ctx: StageContext) -> None:
        device = resolve_device(self.device)
        self.loss.to(device)
        if self.optimizer.state:  # restored from a checkpoint before the move: loading it again casts it to the
            self.optimizer.load_state_dict(self.optimizer.state_dict())  # parameters' device (a no-op on the CPU)
        weights_out = ctx.output("weights") if ctx.has_output("weights") else None
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        on_cuda = device.type == "cuda"
        async for batch in ctx.input("batches"):
            if batch.device != device:
                batch = batch.to(device, non_blocking=on_cuda)
            if self.epochs is None:
                await self._update(ctx, batch, weights_out, publish=self.steps % self.publish_every
                                   == self.publish_every - 1)
                continue
            rows = transitions(batch)
            minibatches = [idx for _ in range(self.epochs) if rows.shape[0]
                           for idx in torch.randperm(rows.shape[0], device=device).split(self.minibatch_size)]
            for i, idx in enumerate(minibatches):
                await self._update(ctx, rows[idx], weights_out, publish=i == len(minibatches) - 1)
            if not minibatches:  # no row to learn from (all resets): publish anyway, a lag-bound policy waits for it
                await self._publish(ctx, weights_out)

    async def _update(self, ctx: StageContext, batch: Any, weights_out: Any, *, publish: bool) -> None:
        """One optimizer step on ``batch``; with ``publish``, the new weights go out after it."""
        acting_version = self.version
        if ctx.wants("batch"):
            await ctx.publish("batch", batch=batch, step=self.steps)
        out = self.loss(batch)
        if ctx.wants("loss"):
            if self.check_finite:  # hooks act on the loss (priorities from TD errors): they see a finite one
                self._check_finite(batch, out, None)
            await ctx.publish("loss", loss=out, batch=batch, step=self.steps)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = None
        if self.check_finite or self.max_grad_norm is not None:
            grad_norm = nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None], foreach=True)
        if self.check_finite:  # before the step: non-finite gradients never reach the weights
            self._check_finite(batch, out, grad_norm)
        if self.max_grad_norm is not None:
            assert grad_norm is not None  # computed above whenever max_grad_norm is set
            nn.utils.clip_grads_with_norm_(self._params, self.max_grad_norm, grad_norm, foreach=True)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        if publish:
            await self._publish(ctx, weights_out)
        await ctx.publish("optim_step", **self._figures(batch, out, grad_norm, acting_version))
        await anyio.lowlevel.checkpoint()  # other stages run between optimizer steps

    def _check_finite(self, batch: Any, out: Any, grad_norm: torch.Tensor | None) -> None:
        """One device-to-host read: are the loss (and the gradient norm) finite? If not, raise a diagnosis."""
        loss = out["loss"].detach().reshape(())
        values = loss.reshape(1) if grad_norm is None else torch.stack([loss.float(), grad_norm.float()])
        if not bool(torch.isfinite(values).all()):
            raise self._non_finite(batch, out, grad_norm)

    def _non_finite(self, batch: Any, out: Any, grad_norm: torch.Tensor | None) -> NonFiniteError:
        """Name what went non-finite first: a loss term, else a parameter's gradient; and the first batch entry."""
        terms = [key for key in out.keys() if isinstance(key, str) and key.startswith("loss_")] + ["loss"]
        term = next((key for key in terms if not bool(torch.isfinite(out[key].detach()).all())), None)
        if term is not None:
            what, check = f"the loss term {term!r} is {_show(out[term])}", "loss check"
        else:
            names = {id(p): name for name, p in self.loss.named_parameters()}
            bad = next((p for p in self._params if p.grad is not None and not bool(torch.isfinite(p.grad).all())),
                       None)
            check = "gradient check"
            if bad is not None:
                name = names.get(id(bad), "<not in the loss module>")
                what = f"the gradient of parameter {name!r} is non-finite (the loss is finite)"
            else:
                what = (f"the gradient norm is {float(grad_norm) if grad_norm is not None else 'unknown'} although "
                        "every gradient entry is finite (their norm overflowed)")
        entries = batch.items(include_nested=True, leaves_only=True) if hasattr(batch, "items") else []
        key = next(("/".join(k) if isinstance(k, tuple) else k for k, value in entries
                    if isinstance(value, torch.Tensor) and value.is_floating_point()
                    and not bool(torch.isfinite(value).all())), None)
        found = "no batch entry is non-finite" if key is None else f"the first non-finite batch entry is {key!r}"
        return NonFiniteError(
            f"learner {self.name!r}, optimizer step {self.steps + 1}: {what} (found by the {check}); {found}. "
            f"The step was not taken: the weights are those after step {self.steps}. Lower the learning rate, clip "
            "gradients (max_grad_norm), or look for inf/NaN in the rewards and observations"
        )

    async def _publish(self, ctx: StageContext, weights_out: Any) -> None:
        if weights_out is not None and self.publish is not None:
            self.version += 1
            await weights_out.send(weights_message(self.publish, self.version))
            await ctx.publish("weights", version=self.version, step=self.steps)

    def _figures(self, batch: Any, out: Any, grad_norm: torch.Tensor | None, version: int) -> dict[str, Any]:
        figures: dict[str, Any] = {"step": self.steps, "version": self.version}
        if self.steps % self.log_every:
            return figures
        figures["loss"] = float(out["loss"].detach())
        if grad_norm is not None:
            figures["grad_norm"] = float(grad_norm)
        versions = batch.get("policy_version", None)
        if versions is not None:
            lag = (version - versions).float()  # how many publishes old the rows' acting weights were
            figures.update(age_min=float(lag.min()), age_mean=float(lag.mean()), age_max=float(lag.max()))
        figures["lr"] = self.optimizer.param_groups[0]["lr"]
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "steps": self.steps, "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps, self.version = state["steps"], state["version"]


def _show(value: torch.Tensor) -> str:
    """``nan``, ``inf`` or ``-inf`` for a scalar; "non-finite" for a tensor of several values."""
    return str(float(value.detach())) if value.numel() == 1 else "non-finite"
