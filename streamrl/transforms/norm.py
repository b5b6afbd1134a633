"""Value transforms: ``ObservationNorm``, ``RewardScaling``, ``DoubleToFloat``, ``CatTensors``.

::

    norm = ObservationNorm(in_keys=["pixels"], standard_normal=True)
    env = TransformedEnv(base_env, Compose(ToTensorImage(), CatFrames(4, dim=-3), norm))
    norm.init_stats(num_iter=100, reduce_dim=[-1, -2, -4], keep_dims=(-1, -2))  # loc/scale [4, 1, 1]
    saved = norm.state_dict()                 # {"loc", "scale", "standard_normal"}
    ObservationNorm(in_keys=["pixels"], **saved)          # the same normalization, elsewhere

    RewardScaling(loc=0.0, scale=0.1)         # reward * 0.1 + 0.0
    CatTensors(["position", "velocity"], out_key="observation")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tensordict import TensorDictBase

from streamrl.envs.specs import Bounded, Composite, Spec, Unbounded
from streamrl.errors import ConfigError
from streamrl.transforms.base import Transform


def _as_buffer(value: Any) -> torch.Tensor | None:
    return None if value is None else torch.as_tensor(value, dtype=torch.float32).clone()


class ObservationNorm(Transform):
    """An affine map of observations with fixed ``loc`` and ``scale`` (buffers: ``state_dict`` round-trips).

    ``standard_normal=True``: ``out = (x - loc) / scale``; otherwise ``out = x * scale + loc``. ``init_stats``
    measures the mean and std of the observations the env produces and picks ``loc``/``scale`` so that the output
    is standardized under either convention.

    In the env workers (``GymEnv(worker_transform=...)``) it needs its ``loc``/``scale`` when the env opens (given,
    or loaded from a ``state_dict``): ``init_stats`` measures through a ``TransformedEnv``.
    """

    observation_only = True

    def __init__(self, loc: Any = None, scale: Any = None, in_keys: Sequence[str] = ("observation",),
                 out_keys: Sequence[str] | None = None, standard_normal: bool | torch.Tensor = False,
                 eps: float = 1e-6) -> None:
        super().__init__(in_keys, out_keys)
        if (loc is None) != (scale is None):
            raise ConfigError(f"ObservationNorm: give both loc and scale, or neither (then call init_stats); "
                              f"got {loc=}, {scale=}")
        self.register_buffer("loc", _as_buffer(loc))
        self.register_buffer("scale", _as_buffer(scale))
        self.register_buffer("standard_normal", torch.tensor(bool(standard_normal)))
        self.eps = eps

    @property
    def initialized(self) -> bool:
        return self.loc is not None and self.scale is not None

    def _apply_transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.loc is None or self.scale is None:
            raise RuntimeError("ObservationNorm has no loc/scale yet: pass loc= and scale=, call "
                               "init_stats(num_iter) once the env is built, or load a state_dict")
        loc, scale = self.loc.to(x.device), self.scale.to(x.device)
        if bool(self.standard_normal):
            return (x - loc) / scale
        return x * scale + loc

    def init_stats(self, num_iter: int, reduce_dim: int | Sequence[int] = 0, cat_dim: int = 0,
                   keep_dims: Sequence[int] | None = None, key: str | None = None) -> None:
        """Set ``loc``/``scale`` from the mean and std of ``key`` (the first in_key) over ``num_iter`` env steps.

        Rolls the env out as this transform sees it (``self.parent``: the transforms before it), with random
        actions, resets included. The rollout's batch dims ``[num_envs, T]`` are flattened into one leading dim,
        so the data is ``[num_envs * T, *entry]`` (``cat_dim`` must be 0: the frames are joined there). The mean
        and the std (unbiased, clamped at ``eps``) are taken over ``reduce_dim``; ``keep_dims`` lists the reduced
        dims that stay in ``loc``'s shape as size 1 (e.g. ``reduce_dim=[-1, -2, -4], keep_dims=(-1, -2)`` gives
        ``[C, 1, 1]`` for pixels ``[C, H, W]``); the other reduced dims are dropped.
        """
        parent = self.parent
        if parent is None:
            raise RuntimeError("ObservationNorm.init_stats needs the transform inside a TransformedEnv "
                               "(TransformedEnv(env, Compose(..., norm)) or env.append_transform(norm))")
        key = self.in_keys[0] if key is None else key
        if num_iter < 1:
            raise ConfigError(f"init_stats: num_iter must be >= 1, got {num_iter}")
        if cat_dim != 0:
            raise ConfigError(f"init_stats: the rollout's frames are joined along dim 0; got {cat_dim=}")
        data = parent.rollout(num_iter, break_when_any_done=False).get(key)
        data = data.reshape(-1, *data.shape[2:]).to(torch.float32)
        dims = [reduce_dim] if isinstance(reduce_dim, int) else list(reduce_dim)
        dims = sorted(d % data.ndim for d in dims)
        keep = set() if keep_dims is None else {d % data.ndim for d in keep_dims}
        mean = data.mean(dim=dims, keepdim=True)
        std = data.std(dim=dims, keepdim=True).clamp_min(self.eps)
        drop = [d for d in dims if d not in keep]
        for d in reversed(drop):
            mean, std = mean.squeeze(d), std.squeeze(d)
        if bool(self.standard_normal):
            loc, scale = mean, std
        else:
            loc, scale = -mean / std, 1.0 / std
        self.loc, self.scale = loc.contiguous(), scale.contiguous()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("loc", "scale"):  # shapes are set by init_stats: take the saved ones
            value = state_dict.get(prefix + name)
            if value is not None:
                self._buffers[name] = torch.empty_like(value, dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _transform_spec(self, spec: Spec) -> Spec:
        if isinstance(spec, Bounded) and not spec.dtype.is_floating_point:
            spec = Bounded(shape=spec.shape, dtype=torch.float32, device=spec.device, low=spec.low.float(),
                           high=spec.high.float())
        return super()._transform_spec(spec)

    def __repr__(self) -> str:
        stats = "uninitialized" if not self.initialized else f"loc shape {tuple(self.loc.shape)}"  # type: ignore[union-attr]
        return f"ObservationNorm({stats}, standard_normal={bool(self.standard_normal)}, in_keys={self.in_keys})"


class RewardScaling(Transform):
    """``reward * scale + loc``."""

    def __init__(self, loc: float = 0.0, scale: float = 1.0, in_keys: Sequence[str] = ("reward",)) -> None:
        super().__init__(in_keys)
        self.loc = float(loc)
        self.scale = float(scale)

    def _apply_transform(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.loc

    def transform_reward_spec(self, spec: Spec) -> Spec:
        return self._transform_spec(spec) if "reward" in self.in_keys else spec

    def __repr__(self) -> str:
        return f"RewardScaling(loc={self.loc}, scale={self.scale})"


class DoubleToFloat(Transform):
    """float64 entries to float32: ``in_keys``, or (default) every float64 observation and the reward."""

    observation_only = True  # in the env workers it converts the observations; the GymEnv makes rewards float32

    def __init__(self, in_keys: Sequence[str] | None = None, out_keys: Sequence[str] | None = None) -> None:
        super().__init__(in_keys or (), out_keys)
        self.all_keys = in_keys is None

    def _apply_transform(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) if x.dtype == torch.float64 else x

    def _call(self, td: TensorDictBase) -> TensorDictBase:
        if not self.all_keys:
            return super()._call(td)
        for key in list(td.keys()):
            value = td.get(key)
            if key != "action" and isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                td.set(key, value.to(torch.float32))
        return td

    def _convert(self, spec: Spec) -> Spec:
        return self._transform_spec(spec) if spec.dtype == torch.float64 else spec

    def transform_observation_spec(self, spec: Composite) -> Composite:
        if not self.all_keys:
            return super().transform_observation_spec(spec)
        return Composite({k: self._convert(s) if isinstance(s, Spec) else s for k, s in spec.items()})

    def transform_reward_spec(self, spec: Spec) -> Spec:
        return self._convert(spec) if self.all_keys or "reward" in self.in_keys else spec


class CatTensors(Transform):
    """Concatenate ``in_keys`` along ``dim`` into ``out_key`` (and delete them if ``del_keys``)."""

    observation_only = True

    def __init__(self, in_keys: Sequence[str], out_key: str = "observation_vector", *, dim: int = -1,
                 del_keys: bool = True) -> None:
        super().__init__(in_keys, [out_key] * len(in_keys))
        if not self.in_keys:
            raise ConfigError("CatTensors needs at least one in_key")
        if dim >= 0:
            raise ConfigError(f"CatTensors: dim must be negative (a dim of the entries), got {dim}")
        self.out_key = out_key
        self.dim = dim
        self.del_keys = del_keys

    def _call(self, td: TensorDictBase) -> TensorDictBase:
        keys = set(td.keys())
        if not all(k in keys for k in self.in_keys):
            return td
        out = torch.cat([td.get(k) for k in self.in_keys], dim=self.dim)
        if self.del_keys:
            for k in self.in_keys:
                if k != self.out_key:
                    td.del_(k)
        td.set(self.out_key, out)
        return td

    def transform_observation_spec(self, spec: Composite) -> Composite:
        if not all(k in spec for k in self.in_keys):
            return spec
        leaves = [spec[k] for k in self.in_keys]
        out = Composite({k: s for k, s in spec.items() if not (self.del_keys and k in self.in_keys)})
        if all(isinstance(s, Bounded) for s in leaves):
            low = torch.cat([s.low for s in leaves], dim=self.dim)  # type: ignore[union-attr]
            high = torch.cat([s.high for s in leaves], dim=self.dim)  # type: ignore[union-attr]
            out[self.out_key] = Bounded(shape=low.shape, dtype=low.dtype, low=low, high=high)
        elif all(isinstance(s, Spec) for s in leaves):
            zero = torch.cat([s.zero() for s in leaves], dim=self.dim)  # type: ignore[union-attr]
            out[self.out_key] = Unbounded(shape=zero.shape, dtype=zero.dtype)
        else:
            raise TypeError(f"CatTensors: {self.in_keys} must be leaf entries, not Composites")
        return out

    def __repr__(self) -> str:
        return f"CatTensors(in_keys={self.in_keys}, out_key={self.out_key!r})"
