"""The TensorDict env API: a batch of envs you reset, step and roll out, as in TorchRL's tutorials.

::

    env = GymEnv("Pendulum-v1", num_envs=4)
    td = env.reset()                          # TensorDict [4]: observation, done, terminated, truncated
    td = env.rand_step(td)                    # td["next"]: observation, reward, done, terminated, truncated
    rollout = env.rollout(200, policy)        # TensorDict [4, T] (stops at the first done by default)
    td, td = env.step_and_maybe_reset(td)     # the loop a collector runs: step, then reset finished envs

    td = env.step(td)                         # the usual loop, written out:
    td = step_mdp(td)                         # "next" entries become the root (the action is dropped)

Auto-reset: after a step, ``td["next"]`` holds what the action led to, the *terminal* observation at an episode
end. :meth:`EnvBase.step_and_maybe_reset` returns it together with the root of the following step, in which
finished envs show their reset observation and ``done`` False. ``terminated`` (the MDP ended: no bootstrap) and
``truncated`` (a time limit: bootstrap from the next value) are kept apart; ``done`` is their union.

Specs describe *one* env (no batch dim): ``observation_spec`` (a :class:`Composite`), ``action_spec``,
``reward_spec`` (shape ``(1,)``), ``done_spec`` (``done``/``terminated``/``truncated``, bool ``(1,)``).

A subclass implements two methods: ``_reset(mask)`` (observations after resetting the envs in ``mask``, or all of
them) and ``_step(td)`` (the ``next`` entries for ``td["action"]``). Everything else is written here once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from streamrl.envs.specs import Bounded, Composite, Spec

DONE_KEYS = ("done", "terminated", "truncated")

Policy = Callable[[TensorDictBase], TensorDictBase]


def done_spec() -> Composite:
    """The spec of the three done flags every env writes."""
    return Composite({k: Bounded(shape=(1,), dtype=torch.bool, low=False, high=True) for k in DONE_KEYS})


def step_mdp(td: TensorDictBase, *, keep_other: bool = True, exclude_action: bool = True,
             exclude_reward: bool = True) -> TensorDictBase:
    """The root of the next step: ``td["next"]``'s entries moved to the top.

    ``keep_other`` keeps root entries that ``next`` does not hold (recurrent states, step counters written by
    transforms...); the action and the reward are dropped unless ``exclude_action``/``exclude_reward`` is False.
    """
    out = td.get("next").clone(recurse=False)
    if exclude_reward and "reward" in out.keys():
        out = out.exclude("reward")
    if keep_other:
        for key in td.keys():
            if key == "next" or key in out.keys():
                continue
            if key == "action" and exclude_action:
                continue
            out.set(key, td.get(key))
    elif not exclude_action and "action" in td.keys():
        out.set("action", td.get("action"))
    return out


class EnvBase(ABC):
    """A batch of ``num_envs`` envs with TensorDict inputs and outputs; see the module docstring.

    Subclasses set ``num_envs``, ``batch_size`` (``(num_envs,)``), ``device`` and ``seed``.
    """

    num_envs: int
    batch_size: torch.Size
    device: torch.device
    seed: int | None

    # -- what a subclass provides --------------------------------------------------------------------------
    @property
    @abstractmethod
    def observation_spec(self) -> Composite:
        """The observation entries of one env (``observation``, ``pixels``, ...)."""

    @property
    @abstractmethod
    def action_spec(self) -> Spec:
        """The action of one env."""

    @property
    def reward_spec(self) -> Spec:
        from streamrl.envs.specs import Unbounded

        return Unbounded(shape=(1,), dtype=torch.float32)

    @property
    def done_spec(self) -> Composite:
        return done_spec()

    @abstractmethod
    def _reset(self, mask: torch.Tensor | None) -> TensorDictBase:
        """Observations (batch ``batch_size``) after resetting the envs where ``mask`` is True (all if None).

        Rows outside ``mask`` may hold anything; callers take only the masked rows.
        """

    @abstractmethod
    def _step(self, td: TensorDictBase) -> TensorDictBase:
        """Step every env with ``td["action"]``; return the ``next`` entries: observations, ``reward``
        ``[..., 1]`` and the done flags ``[..., 1]``. An env that finished is reset by the next ``_reset(mask)``."""

    def set_seed(self, seed: int | None) -> int | None:
        """Seed the next :meth:`reset`; returns the seed."""
        self.seed = seed
        return seed

    def close(self) -> None:
        """Release the envs (worker processes, windows)."""

    # -- the API built on them -----------------------------------------------------------------------------
    def reset(self, td: TensorDictBase | None = None) -> TensorDictBase:
        """Reset every env; the result holds the observations and the done flags (all False)."""
        out = self._reset(None)
        for key in DONE_KEYS:
            out.set(key, torch.zeros((*self.batch_size, 1), dtype=torch.bool, device=self.device))
        if td is not None:
            td.update(out)
            return td
        return out

    def step(self, td: TensorDictBase) -> TensorDictBase:
        """Step with ``td["action"]``; writes ``td["next"]`` and returns ``td``."""
        if "action" not in td.keys():
            raise KeyError("env.step(td) needs td['action']; run a policy on td first, or use env.rand_step(td)")
        td.set("next", self._step(td))
        return td

    def step_and_maybe_reset(self, td: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        """Step, then start the next step: returns ``(td with "next", root of the next step)``.

        In the root, envs that just finished show their reset observation and ``done`` False.
        """
        td = self.step(td)
        root = step_mdp(td)
        done = root.get("done").reshape(self.batch_size)
        if bool(done.any()):
            reset = self._reset(done)
            for key in reset.keys():
                value = root.get(key).clone()
                value[done] = reset.get(key)[done]
                root.set(key, value)
            for key in DONE_KEYS:
                root.set(key, torch.zeros_like(root.get(key)))
        return td, root

    def rand_action(self, td: TensorDictBase | None = None) -> TensorDictBase:
        """Write a random ``action`` (uniform over the action spec) into ``td`` (a fresh reset if None)."""
        td = self.reset() if td is None else td
        td.set("action", self.action_spec.rand(self.batch_size).to(self.device))
        return td

    def rand_step(self, td: TensorDictBase | None = None) -> TensorDictBase:
        """One step with a random action; returns ``td`` with ``next``."""
        return self.step(self.rand_action(td))

    def rollout(
        self,
        max_steps: int,
        policy: Policy | None = None,
        *,
        auto_reset: bool = True,
        break_when_any_done: bool = True,
        tensordict: TensorDictBase | None = None,
    ) -> TensorDictBase:
        """Run ``max_steps`` steps (fewer if ``break_when_any_done`` and an env finished) and stack them.

        Returns a TensorDict of batch ``[*batch_size, steps]``. Without ``policy`` actions are random.
        ``auto_reset=False`` starts from ``tensordict`` (a root you got from an earlier rollout or reset).
        With ``break_when_any_done=False`` finished envs are reset and the rollout goes on.
        """
        if auto_reset:
            td = self.reset()
        elif tensordict is None:
            raise ValueError("rollout(auto_reset=False) needs tensordict=, the root to start from (e.g. env.reset())")
        else:
            td = tensordict
        steps = []
        for _ in range(max_steps):
            td = policy(td) if policy is not None else self.rand_action(td)
            td, root = self.step_and_maybe_reset(td)
            steps.append(td)
            if break_when_any_done and bool(td.get(("next", "done")).any()):
                break
            td = root
        if not steps:
            raise ValueError(f"rollout(max_steps={max_steps}) made no step; max_steps must be >= 1")
        return torch.stack(steps, dim=len(self.batch_size))  # type: ignore[arg-type, return-value]

    def fake_tensordict(self) -> TensorDictBase:
        """A zero-filled TensorDict with every entry a step holds (root, action and ``next``), from the specs."""
        batch = self.batch_size
        root = self.observation_spec.zero(batch)
        done = self.done_spec.zero(batch)
        root.update(done)
        next_td = root.clone()
        next_td.set("reward", self.reward_spec.zero(batch))
        root.set("action", self.action_spec.zero(batch))
        root.set("next", next_td)
        return root.to(self.device)

    def __enter__(self) -> EnvBase:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def as_tensordict(values: dict[str, Any], batch_size: torch.Size, device: torch.device) -> TensorDict:
    """A TensorDict of numpy arrays or tensors (not copied when already tensors on ``device``)."""
    out = TensorDict({}, batch_size=batch_size, device=device)
    for key, value in values.items():
        tensor = torch.as_tensor(value)
        out.set(key, tensor.to(device) if tensor.device != device else tensor)
    return out
