"""n-step returns on chunks, before they are stored::

    multistep = MultiStep(gamma=0.99, n=3)
    chunk = multistep(chunk)          # [num_envs, T]: next.reward is the 3-step return, next.gamma = 0.99**k

In a pipeline it runs on the env stage's chunks (``TransformStage("nstep", MultiStep(0.99, 3))`` between the env
stage and the replay writer). For each row ``t`` the return sums ``k <= n`` discounted rewards, stopping after
the row that ends the episode and at the end of the chunk (rows near the end get shorter returns rather than
waiting for the next chunk); ``next`` (observations and done flags) is taken from row ``t + k - 1`` and
``("next", "gamma")`` holds ``gamma ** k``, which :class:`~streamrl.objectives.dqn.DQNLoss` uses as the
discount of its bootstrap term.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from streamrl.errors import ConfigError, torchrl_names
from streamrl.transforms.base import Transform


class MultiStep(Transform):
    """``n``-step discounted returns within each chunk ``[num_envs, T]``; see the module docstring.

    A chunk transform only: on an env (``TransformedEnv``) it does nothing, a step has no future to sum.
    TorchRL's ``n_steps`` is accepted for ``n``: ``MultiStep(gamma=0.99, n_steps=3)``.
    """

    @torchrl_names("MultiStep", accept={"n_steps": "n"})
    def __init__(self, gamma: float, n: int) -> None:
        super().__init__()
        if n < 1:
            raise ConfigError(f"MultiStep: n must be >= 1, got {n}")
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"MultiStep: gamma must be in [0, 1], got {gamma}")
        self.gamma = gamma
        self.n = n

    def forward(self, chunk: TensorDictBase) -> TensorDictBase:
        if chunk.batch_dims != 2:
            raise ValueError(f"MultiStep works on chunks [num_envs, T]; got batch size {tuple(chunk.batch_size)}")
        num_envs, T = chunk.batch_size
        next_td = chunk.get("next")
        reward = next_td.get("reward").reshape(num_envs, T)
        done = next_td.get("done").reshape(num_envs, T)
        t = torch.arange(T)
        returns = torch.zeros(num_envs, T, dtype=reward.dtype)
        last = t.expand(num_envs, T).clone()
        alive = torch.ones(num_envs, T, dtype=torch.bool)
        for j in range(self.n):
            idx = t + j
            inside = idx < T
            clipped = idx.clamp(max=T - 1)
            take = alive & inside
            returns += torch.where(take, reward[:, clipped] * self.gamma**j, torch.zeros(()))
            last = torch.where(take, clipped.expand(num_envs, T), last)
            alive = take & ~done[:, clipped]
        steps = last - t + 1
        rows = torch.arange(num_envs).unsqueeze(-1).expand(num_envs, T)
        shifted = next_td[rows, last]
        shifted.set("reward", returns.reshape(next_td.get("reward").shape))
        shifted.set("gamma", (self.gamma ** steps.to(torch.float64)).to(reward.dtype).unsqueeze(-1))
        shifted.set("steps_to_next_obs", steps.unsqueeze(-1))
        chunk.set("next", shifted)
        return chunk
