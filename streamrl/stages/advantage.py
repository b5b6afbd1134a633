"""``AdvantageStage``: advantages for on-policy learning, computed on each chunk with the current value network.

::

    gae = GAE(gamma=0.99, lmbda=0.95, value_network=critic)       # streamrl.objectives.value
    p.add(AdvantageStage("gae", gae), LearnerStage("learner", ppo_loss, optimizer, publish=actor,
                                                   schedule=Epochs(epochs=10, minibatch_size=64)))
    p.connect("env.chunks", "gae.chunks", capacity=1)
    p.connect("gae.chunks", "learner.batches", capacity=1)

The stage shares the value network with the learner (same process), so each chunk is valued with the weights of
the moment it arrives, on the learner's device: the chunk moves to the device of the estimator's parameters. The
estimator sees the chunk's time structure ``[num_envs, T]``; rows a chunk marks not ``valid`` (the reset step of
envs that auto-reset on the next step) are cut off from their neighbours by the ``done`` before them and dropped by
the learner.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDictBase
from torch import nn

from streamrl.stages.base import Stage, StageContext


class AdvantageStage(Stage):
    """Receives chunks, writes ``estimator``'s outputs (``advantage``, ``value_target``, ...) into them."""

    inputs = ("chunks",)
    outputs = ("chunks",)

    def __init__(self, name: str, estimator: Callable[[TensorDictBase], TensorDictBase]) -> None:
        super().__init__(name)
        self.estimator = estimator

    async def run(self, ctx: StageContext) -> None:
        out = ctx.output("chunks")
        async for chunk in ctx.input("chunks"):
            chunk = chunk.clone(recurse=False)
            device = _parameter_device(self.estimator)
            if device is not None and chunk.device != device:  # the learner moved the shared critic there
                chunk = chunk.to(device)
            with torch.no_grad():
                chunk = self.estimator(chunk)
            await out.send(chunk)

    def __repr__(self) -> str:
        return f"AdvantageStage({self.name!r}, {self.estimator!r})"


def _parameter_device(estimator: Callable[[TensorDictBase], TensorDictBase]) -> torch.device | None:
    """The device of the estimator's (value network's) parameters, ``None`` without any."""
    if isinstance(estimator, nn.Module):
        for parameter in estimator.parameters():
            return parameter.device
    return None
