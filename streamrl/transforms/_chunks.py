"""Episode bookkeeping on chunks ``[*lead, T]`` shared by the stateful transforms.

::

    starts = episode_starts(chunk, carry=has_carry)     # [B, T] bool: row t begins an episode
    running = segment_cumsum(values, starts, carry_value)  # sums that restart at every episode start
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase


def episode_starts(td: TensorDictBase, carry: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` (lead batch dims flattened): True where a row starts an episode.

    Row 0 starts one unless ``carry`` (bool ``[B]``) says the previous chunk's episode goes on; row t > 0 starts
    one after a done row (``("next", "done")``) or after an invalid row (``valid`` False: the reset-only rows of
    next-step auto-reset envs).
    """
    batch = td.batch_size
    if len(batch) < 1:
        raise ValueError(f"chunk transforms need a time dim (batch [..., T]), got batch_size={tuple(batch)}")
    T = batch[-1]
    B = batch.numel() // max(T, 1)
    starts = torch.zeros((B, T), dtype=torch.bool, device=td.device)
    starts[:, 0] = True if carry is None else ~carry
    if ("next", "done") in td.keys(include_nested=True):
        boundary = td.get(("next", "done")).reshape(B, T).clone()
        if "valid" in td.keys():
            boundary |= ~td.get("valid").reshape(B, T).bool()
        starts[:, 1:] |= boundary[:, :-1]
    return starts


def ends_open(td: TensorDictBase) -> torch.Tensor:
    """``[B]``: True where the chunk's last row did not end its episode (the next chunk continues it)."""
    batch = td.batch_size
    T = batch[-1]
    B = batch.numel() // max(T, 1)
    if ("next", "done") not in td.keys(include_nested=True):
        return torch.ones(B, dtype=torch.bool, device=td.device)
    return ~td.get(("next", "done")).reshape(B, T)[:, -1]


def last_start(starts: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: the index of the latest episode start at or before each row (-1: none in the chunk)."""
    T = starts.shape[1]
    idx = torch.arange(T, device=starts.device).expand_as(starts)
    return torch.where(starts, idx, torch.full_like(idx, -1)).cummax(dim=1).values


def segment_cumsum(values: torch.Tensor, starts: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """Running sums of ``values`` ``[B, T]`` from each episode's start; rows before the chunk's first start add
    ``carry`` ``[B]`` (what the previous chunk's episode had summed)."""
    cum = values.cumsum(dim=1)
    start = last_start(starts)
    before = torch.gather(cum - values, 1, start.clamp(min=0))
    return torch.where(start >= 0, cum - before, carry[:, None] + cum)
