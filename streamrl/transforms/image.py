"""Image transforms: ``ToTensorImage``, ``GrayScale``, ``Resize``, ``CatFrames``.

::

    env = TransformedEnv(GymEnv("CartPole-v1", from_pixels=True, backend="sync"), Compose(
        ToTensorImage(),          # uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]
        GrayScale(),              # [3, H, W] -> [1, H, W], ITU-R 601 luma (torchvision's weights)
        Resize(64, 64),           # [1, 64, 64], bilinear, no antialiasing
        CatFrames(4, dim=-3),     # [4, 64, 64]: the last 4 frames, the oldest first
    ))

Every transform works on any leading batch dims, and maps the spec's bounds through the same computation as the
data, so the transformed specs hold exactly what the env writes.

Frames kept as uint8 (a quarter of the float32 bytes in replay and between processes), the scaling left to the
network's first layer (:class:`~streamrl.modules.nets.FrameNorm`), and the stack run where each env steps::

    frames = Compose(ToTensorImage(dtype=torch.uint8), GrayScale(), Resize(64, 64), CatFrames(4, dim=-3))
    env = GymEnv("CartPole-v1", num_envs=8, from_pixels=True, backend="subprocess", worker_transform=frames)
    env.observation_spec["pixels"]          # Bounded uint8 (4, 64, 64) in [0, 255]

On integer images ``GrayScale`` and ``Resize`` compute in float32 and round back to the integer dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase

from streamrl.envs.specs import Bounded, Spec, Unbounded
from streamrl.errors import ConfigError
from streamrl.transforms._chunks import ends_open, episode_starts, last_start
from streamrl.transforms.base import Transform

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision.transforms.functional.rgb_to_grayscale


class ToTensorImage(Transform):
    """Channels-last images ``[..., H, W, C]`` to channels-first ``[..., C, H, W]`` of ``dtype``.

    A floating ``dtype`` (float32, the default) divides integer images by 255 (uint8 0..255 becomes 0..1). An
    integer ``dtype`` (``torch.uint8``) keeps the values and only moves the channels (a view, no copy): the
    division is then the network's (:class:`~streamrl.modules.nets.FrameNorm`).
    """

    observation_only = True

    def __init__(self, in_keys: Sequence[str] = ("pixels",), out_keys: Sequence[str] | None = None, *,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_keys, out_keys)
        self.dtype = dtype

    def _apply_transform(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise ValueError(f"ToTensorImage expects images [..., H, W, C], got shape {tuple(x.shape)}")
        if not self.dtype.is_floating_point:
            if x.dtype.is_floating_point:
                raise ValueError(f"ToTensorImage(dtype={self.dtype}) keeps integer images as they are, got a "
                                 f"{x.dtype} image; use a floating dtype for float images")
            return x.to(self.dtype).movedim(-1, -3)
        out = x.to(self.dtype)  # converted in the source's (channels-last) layout: one pass, no transposing copy
        if not x.dtype.is_floating_point:
            out = out.mul_(1 / 255.0) if out is not x else out / 255.0
        return out.movedim(-1, -3)

    def __repr__(self) -> str:
        extra = "" if self.dtype == torch.float32 else f", dtype={self.dtype}"
        return f"ToTensorImage(in_keys={self.in_keys}{extra})"


class GrayScale(Transform):
    """RGB ``[..., 3, H, W]`` to luma ``[..., 1, H, W]``: ``0.2989 R + 0.587 G + 0.114 B`` (rounded for integer
    images)."""

    observation_only = True

    def __init__(self, in_keys: Sequence[str] = ("pixels",), out_keys: Sequence[str] | None = None) -> None:
        super().__init__(in_keys, out_keys)

    def _apply_transform(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3 or x.shape[-3] not in (1, 3):
            raise ValueError(f"GrayScale expects images [..., 3, H, W] (channels first: put ToTensorImage "
                             f"before it), got shape {tuple(x.shape)}")
        if x.shape[-3] == 1:
            return x
        weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float32 if not x.is_floating_point() else x.dtype,
                               device=x.device)
        gray = x.movedim(-3, -1).to(weights.dtype) @ weights  # a dot product over channels, in one pass
        if not x.is_floating_point():
            info = torch.iinfo(x.dtype)
            gray = gray.round_().clamp_(info.min, info.max)
        return gray.unsqueeze(-3).to(x.dtype)


class Resize(Transform):
    """Resize images ``[..., C, H, W]`` to ``[..., C, h, w]``.

    ``interpolation``: ``"bilinear"`` (``align_corners=False``, no antialiasing, as ``F.interpolate``) or
    ``"nearest"``. Integer images are interpolated in float32 and rounded back.
    """

    observation_only = True

    def __init__(self, w: int, h: int | None = None, *, interpolation: str = "bilinear",
                 in_keys: Sequence[str] = ("pixels",), out_keys: Sequence[str] | None = None) -> None:
        super().__init__(in_keys, out_keys)
        if interpolation not in ("bilinear", "nearest"):
            raise ConfigError(f"Resize: interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        self.w = int(w)
        self.h = int(w if h is None else h)
        if self.w < 1 or self.h < 1:
            raise ConfigError(f"Resize: sizes must be >= 1, got w={self.w}, h={self.h}")
        self.interpolation = interpolation

    def _apply_transform(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise ValueError(f"Resize expects images [..., C, H, W], got shape {tuple(x.shape)}")
        lead, (c, height, width) = x.shape[:-3], x.shape[-3:]
        flat = x.reshape(-1, c, height, width)
        y = flat if flat.dtype.is_floating_point else flat.to(torch.float32)
        if self.interpolation == "bilinear":
            y = F.interpolate(y, size=(self.h, self.w), mode="bilinear", align_corners=False, antialias=False)
        else:
            y = F.interpolate(y, size=(self.h, self.w), mode="nearest")
        if not x.dtype.is_floating_point:
            info = torch.iinfo(x.dtype)
            y = y.round().clamp(info.min, info.max)
        return y.to(x.dtype).reshape(*lead, c, self.h, self.w)

    def __repr__(self) -> str:
        return f"Resize(w={self.w}, h={self.h}, interpolation={self.interpolation!r}, in_keys={self.in_keys})"


class CatFrames(Transform):
    """The last ``N`` frames concatenated along ``dim`` (negative: a dim of the frame), the oldest first.

    On an env, each env keeps its last ``N`` frames; a reset fills the buffer of the reset envs with their
    first frame (``padding="same"``) and leaves the others untouched. On chunks ``[..., T]`` (``forward``), frames
    are stacked along time without crossing an episode start (a row after ``("next", "done")``, or after an
    invalid row): a stack that would reach before its episode's first frame repeats that frame; the root entries
    get the stacks of ``observation`` rows, the ``next`` entries the stack that ends with ``next``'s frame. Each
    chunk's first row is taken as an episode start; ``forward_chunk`` instead continues the episodes that the
    previous chunk of the same stream left open.
    """

    observation_only = True

    def __init__(self, N: int, dim: int = -3, in_keys: Sequence[str] = ("pixels",),
                 out_keys: Sequence[str] | None = None, padding: str = "same") -> None:
        super().__init__(in_keys, out_keys)
        if N < 1:
            raise ConfigError(f"CatFrames: N must be >= 1, got {N}")
        if dim >= 0:
            raise ConfigError(f"CatFrames: dim must be negative (a dim of one frame, counted from the end), got {dim}")
        if padding != "same":
            raise ConfigError(f"CatFrames: only padding='same' (repeat the episode's first frame) is supported, "
                              f"got {padding!r}")
        self.N = N
        self.dim = dim
        self.padding = padding
        self._frames: dict[str, torch.Tensor] = {}  # env path: out_key -> [num_envs, ..., N * size, ...]
        self._carry: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # forward_chunk: (history, open)

    def _repeat(self, frame: torch.Tensor) -> torch.Tensor:
        return torch.cat([frame] * self.N, dim=self.dim)

    def _transform_spec(self, spec: Spec) -> Spec:
        if isinstance(spec, Bounded):
            return Bounded(shape=self._repeat(spec.low).shape, dtype=spec.dtype, device=spec.device,
                           low=self._repeat(spec.low), high=self._repeat(spec.high))
        if isinstance(spec, Unbounded):
            return Unbounded(shape=self._repeat(spec.zero()).shape, dtype=spec.dtype, device=spec.device)
        raise TypeError(f"CatFrames cannot stack a {type(spec).__name__} spec")

    def _apply_transform(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CatFrames is stateful: use it on an env (TransformedEnv) or on chunks (forward)")

    # -- env path ------------------------------------------------------------------------------------------
    def _reset(self, td: TensorDictBase, mask: torch.Tensor | None) -> TensorDictBase:
        keys = set(td.keys())
        for in_key, out_key in zip(self.in_keys, self.out_keys, strict=True):
            if in_key not in keys:
                continue
            full = self._repeat(td.get(in_key))
            buf = self._frames.get(out_key)
            if mask is None or buf is None or buf.shape != full.shape:
                buf = full
            else:
                buf = buf.clone()
                rows = mask.reshape(td.batch_size).to(buf.device)
                buf[rows] = full[rows]
            self._frames[out_key] = buf
            td.set(out_key, buf)
        return td

    def _step(self, td: TensorDictBase, next_td: TensorDictBase) -> TensorDictBase:
        keys = set(next_td.keys())
        for in_key, out_key in zip(self.in_keys, self.out_keys, strict=True):
            if in_key not in keys:
                continue
            frame = next_td.get(in_key)
            buf = self._frames.get(out_key)
            if buf is None:
                raise RuntimeError("CatFrames: the env was stepped before a reset; call env.reset() first")
            size = frame.shape[self.dim]
            buf = torch.cat([buf.narrow(self.dim, size, (self.N - 1) * size), frame], dim=self.dim)
            self._frames[out_key] = buf
            next_td.set(out_key, buf)
        return next_td

    # -- chunk path ----------------------------------------------------------------------------------------
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        return self._chunk(td, carry=False)

    def forward_chunk(self, td: TensorDictBase) -> TensorDictBase:
        return self._chunk(td, carry=True)

    def _chunk(self, td: TensorDictBase, *, carry: bool) -> TensorDictBase:
        batch = td.batch_size
        if len(batch) < 1:
            raise ValueError("CatFrames on data needs a time dim: batch [..., T]")
        T = batch[-1]
        B = batch.numel() // max(T, 1)
        has_next = "next" in td.keys()
        open_end = ends_open(td)
        keys = set(td.keys())
        for in_key, out_key in zip(self.in_keys, self.out_keys, strict=True):
            if in_key not in keys:
                continue
            obs = td.get(in_key)
            frame_shape = obs.shape[len(batch):]
            obs = obs.reshape(B, T, *frame_shape)
            hist = obs[:, :1].expand(B, self.N - 1, *frame_shape)
            state = self._carry.get(out_key) if carry else None
            cont = torch.zeros(B, dtype=torch.bool, device=obs.device)
            if state is not None and state[0].shape == hist.shape:
                cont = state[1]
                hist = torch.where(cont.reshape(B, *[1] * (hist.ndim - 1)), state[0], hist)
            starts = episode_starts(td, cont)
            seq = torch.cat([hist, obs], dim=1)  # obs[t] sits at t + N - 1
            t = torch.arange(T, device=obs.device).expand(B, T)
            first = last_start(starts)
            floor = torch.where(first >= 0, first + self.N - 1, torch.zeros_like(first))
            rows = torch.arange(B, device=obs.device)[:, None]
            frames = [seq[rows, torch.maximum(t + k, floor)] for k in range(self.N)]  # oldest first
            out_shape = (*batch, *self._repeat(obs[0, 0]).shape)
            td.set(out_key, torch.cat(frames, dim=self.dim).reshape(out_shape))
            if has_next and in_key in td.get("next").keys():
                nxt = td.get(("next", in_key)).reshape(B, T, *frame_shape)
                td.set(("next", out_key), torch.cat([*frames[1:], nxt], dim=self.dim).reshape(out_shape))
            if carry:
                history = torch.stack([f[:, -1] for f in frames[1:]], dim=1) if self.N > 1 else hist
                self._carry[out_key] = (history, open_end.to(obs.device))
        return td

    def __repr__(self) -> str:
        return f"CatFrames(N={self.N}, dim={self.dim}, in_keys={self.in_keys})"
