"""One optimizer update as tensor work only, run eagerly or replayed from static buffers (a CUDA graph on CUDA).

::

    update = Update(loss, optimizer, max_grad_norm=1.0, check_finite=True, target_update=SoftUpdate(loss))
    runner = Captured(update, device)      # or call update.run(batch) eagerly
    runner.run(batch)                      # batch: a TensorDict of rows, or a RingBatch (indices into a device ring)
    report = update.read()                 # every K updates: the one device-to-host read (figures, guard)

An update is: the loss's forward, backward, the global gradient norm, clipping, the optimizer step and a soft
target update. None of it reads a device value on the host, so a whole update can be captured in a CUDA graph
and replayed with one launch (small-net learners are launch-bound: an H200 runs a hand-written DQN update 435
times a second eagerly and 4,245 times captured). What the learner reports accumulates on the device in
persistent tensors (allocated once, outside any graph) and is read by :meth:`Update.read` every K updates.

**The non-finite guard on the device.** With a fused optimizer (``torch.optim.Adam(..., fused=True)``, also
``AdamW`` and ``SGD``) the guard costs no host read: each update computes ``found = loss or gradient norm is not
finite`` on the device, keeps it sticky, and hands it to the optimizer as ``found_inf`` (the hook
``torch.amp.GradScaler`` uses), so the fused kernel skips the step, this one and every later one, until
:meth:`Update.read` sees it and the learner stops the run naming the first bad step: the weights stay those before
it. At that step it also keeps, on the device, every loss term, every parameter's gradient norm and every float
batch entry's largest magnitude, from which :func:`diagnose` names what went non-finite first. With any other
optimizer, or with ``guard_on_device=False`` (the learner's choice on the CPU, where a host read costs nothing and
the snapshot would), the verdict is read after each backward instead, the snapshot is taken only for a bad update,
and the caller skips the step (``bad`` is set before :meth:`Update.finish`).

**Captured.** :class:`Captured` copies each batch into static buffers (one set per input signature: keys,
shapes, dtypes, and the ring read from) and runs the update on them. On CUDA, after ``warmup`` eager updates of a
signature on a side stream, it captures the update in a ``torch.cuda.CUDAGraph`` and replays it from then on.
Elsewhere it runs the same static-buffer path eagerly (what the CPU tests compare with the eager path). A
``RingBatch`` is replayed from its indices: the gather from the device ring happens inside the graph. A loss whose
update depends on host state (TD3 adds its actor term every ``policy_delay`` calls) says which update comes next
(``capture_key()``: one graph each) and counts a replayed call (``replayed()``), since a replay runs no Python.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from streamrl.replay.device_ring import DeviceRing, RingBatch

Batch = TensorDictBase | RingBatch
FUSED_GUARD = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)  # take found_inf when fused


def fused_guard_possible(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a step on a device flag (``found_inf``): a fused Adam, AdamW or SGD."""
    return isinstance(optimizer, FUSED_GUARD) and bool(optimizer.defaults.get("fused"))


@dataclass
class Report:
    """What :meth:`Update.read` returns: means over the updates since the last read, and the guard's verdict."""

    updates: int
    figures: dict[str, float]
    first_bad: int | None = None  # the 0-based index of the first update whose loss or gradient norm was not finite
    diagnosis: str = ""


@dataclass
class _Layout:
    """Names of what the guard snapshots: loss terms, parameters with a gradient, float batch entries."""

    terms: list[str]
    params: list[str]
    entries: list[str]
    figures: list[str] = field(default_factory=list)


class Update:
    """The tensor work of one update, with device-side figures and guard; see the module docstring."""

    def __init__(self, loss: nn.Module, optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None,
                 check_finite: bool, target_update: Any, device: torch.device, guard_on_device: bool = True,
                 compile_loss: bool = False) -> None:
        self.loss = loss
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.forward: Any = torch.compile(loss, mode=mode) if compile_loss else loss  # backward compiled with it
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.check_finite = check_finite
        self.target_update = target_update
        self.device = device
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        names = {id(p): name for name, p in loss.named_parameters()}
        self.param_names = [names.get(id(p), "<not in the loss module>") for p in self.params]
        # on the device: no host read, a snapshot per update (free inside a graph); else a host read per update
        # (free on the CPU) and a snapshot only for a bad one
        self.device_guard = check_finite and guard_on_device and fused_guard_possible(optimizer)
        # persistent device state: written inside captured graphs, read every K updates
        zeros = torch.zeros((), device=device)
        self.bad = zeros.clone()  # 1.0 once an update was non-finite (sticky: later steps are skipped too)
        self.bad_on_host = False  # the same, known on the host (the guard off the device reads it per update)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.index = torch.zeros((), dtype=torch.int64, device=device)  # updates run so far
        self.version = zeros.clone()  # the learner's weights version (rows' age = version - policy_version)
        self.sums: torch.Tensor | None = None  # per-figure sums since the last read
        self.age = torch.full((3,), float("nan"), device=device)  # min, mean, max age of the last batch's rows
        self.snapshot: torch.Tensor | None = None  # the guard's values at the first bad update
        self.layout: _Layout | None = None
        if self.device_guard:
            optimizer.found_inf = self.bad  # type: ignore[attr-defined]  # the fused kernel skips the step when set

    # -- one update ------------------------------------------------------------------------------------------
    def run(self, batch: TensorDictBase) -> TensorDictBase:
        """Forward, backward, guard, clip, step, soft target update: no host read with a fused optimizer."""
        out, norms, total = self.forward_backward(batch)
        self.finish(out, norms, total)
        return out

    def forward_backward(self, batch: TensorDictBase) -> tuple[TensorDictBase, list[torch.Tensor], torch.Tensor]:
        """The loss, its gradients (into ``p.grad``: zero them before) and the guard's bookkeeping."""
        leaves = _float_leaves(batch) if self.check_finite else []  # the batch as given (losses may add entries)
        if self.forward is not self.loss and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last one's outputs may be overwritten
        out = self.forward(batch)
        out["loss"].backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        norms = list(torch._foreach_norm(grads)) if grads else []
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.device)
        if self.layout is None:
            self.layout = self._layout(leaves, out)
        layout = self.layout
        if len(leaves) != len(layout.entries):  # batches changed keys (a resumed store): snapshot the new ones
            layout.entries = [key for key, _ in leaves]
            self.snapshot = None
        figures = torch.stack([out[key].detach().float().reshape(()) for key in layout.figures[:-1]] + [total.float()])
        if self.sums is None:
            self.sums = torch.zeros(len(layout.figures), device=self.device)
        self.sums.add_(figures)
        if self.check_finite:
            found = (~torch.isfinite(torch.stack([out["loss"].detach().float(), total.float()]))).any().float()
            if self.device_guard:
                newly = found * (1.0 - self.bad)
                snapshot = self._snapshot(leaves, out, norms, layout)
                if self.snapshot is None:
                    self.snapshot = torch.zeros_like(snapshot)
                self.snapshot.copy_(torch.where(newly > 0, snapshot, self.snapshot))
                self.first_bad.copy_(torch.where(newly > 0, self.index, self.first_bad))
                self.bad.copy_(torch.maximum(self.bad, found))
            elif not self.bad_on_host and bool(found):  # the one host read; the caller skips the step
                self.bad_on_host = True
                self.snapshot = self._snapshot(leaves, out, norms, layout)
                self.first_bad.copy_(self.index)
                self.bad.fill_(1.0)
        versions = batch.get("policy_version", None)
        if versions is not None:
            lag = (self.version - versions.float()).reshape(-1)
            self.age.copy_(torch.stack([lag.min(), lag.mean(), lag.max()]))
        return out, norms, total

    def finish(self, out: TensorDictBase, norms: list[torch.Tensor], total: torch.Tensor) -> None:
        """Clip, step (skipped on the device after a bad update, with a fused optimizer), soft target update."""
        if self.max_grad_norm is not None and norms:
            nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, total, foreach=True)
        self.optimizer.step()
        if self.target_update is not None and getattr(self.target_update, "captured", False):
            self.target_update.apply()
        self.index.add_(1)

    def _layout(self, leaves: list[tuple[str, torch.Tensor]], out: TensorDictBase) -> _Layout:
        scalars = [key for key, value in out.items() if isinstance(key, str) and isinstance(value, torch.Tensor)
                   and value.numel() == 1 and value.is_floating_point()]
        terms = [key for key in scalars if key.startswith("loss_")] + ["loss"]
        entries = [key for key, _ in leaves]
        return _Layout(terms=terms, params=self.param_names, entries=entries, figures=[*scalars, "grad_norm"])

    def _snapshot(self, leaves: list[tuple[str, torch.Tensor]], out: TensorDictBase, norms: list[torch.Tensor],
                  layout: _Layout) -> torch.Tensor:
        """What :func:`diagnose` reads: the loss terms, every parameter's gradient norm, every entry's magnitude."""
        remaining = iter(norms)  # gradients of the parameters that have one, in order; the others count as 0
        zero = out["loss"].new_zeros((), dtype=torch.float32)
        per_param = [next(remaining).float() if p.grad is not None else zero for p in self.params]
        terms = [out[key].detach().float().reshape(()) for key in layout.terms]
        columns = [value for _, value in leaves]
        entries = list(torch._foreach_norm(columns, float("inf"))) if columns else []  # largest magnitude: NaN stays
        return torch.stack([*terms, *per_param, *(e.float() for e in entries)])

    # -- every K updates -------------------------------------------------------------------------------------
    def read(self, updates: int) -> Report:
        """The one host read: means of the figures over the last ``updates`` updates, age, the guard's verdict."""
        layout = self.layout
        if layout is None or self.sums is None:
            return Report(updates=0, figures={})
        parts = [self.sums, self.age, self.bad.reshape(1), self.first_bad.reshape(1)]
        if self.snapshot is not None:
            parts.append(self.snapshot)
        values = torch.cat([part.double() for part in parts]).tolist()
        self.sums.zero_()
        n = len(layout.figures)
        figures = {key: value / max(1, updates) for key, value in zip(layout.figures, values[:n], strict=True)}
        age = values[n: n + 3]
        if age[0] == age[0]:  # not NaN: the batches carry policy_version
            figures.update(age_min=age[0], age_mean=age[1], age_max=age[2])
        bad, first_bad = values[n + 3], values[n + 4]
        if not bad:
            return Report(updates=updates, figures=figures)
        return Report(updates=updates, figures=figures, first_bad=int(first_bad),
                      diagnosis=diagnose(layout, values[n + 5:]))


def diagnose(layout: _Layout, snapshot: list[float]) -> str:
    """Name what went non-finite first at the bad update: a loss term, else a parameter's gradient; and the first
    float batch entry that held a non-finite value (or that none did)."""
    terms = snapshot[: len(layout.terms)]
    finite = [value == value and abs(value) != float("inf") for value in snapshot]
    term = next((name for name, value, ok in zip(layout.terms, terms, finite, strict=False) if not ok), None)
    if term is not None:
        what, check = f"the loss term {term!r} is {terms[layout.terms.index(term)]}", "loss check"
    else:
        check = "gradient check"
        offset = len(layout.terms)
        bad = next((name for i, name in enumerate(layout.params) if not finite[offset + i]), None)
        if bad is not None:
            what = f"the gradient of parameter {bad!r} is non-finite (the loss is finite)"
        else:
            what = "the gradient norm is not finite although every gradient entry is finite (their norm overflowed)"
    offset = len(layout.terms) + len(layout.params)
    entry = next((name for i, name in enumerate(layout.entries) if not finite[offset + i]), None)
    found = "no batch entry is non-finite" if entry is None else f"the first non-finite batch entry is {entry!r}"
    return f"{what} (found by the {check}); {found}"


def _float_leaves(batch: TensorDictBase) -> list[tuple[str, torch.Tensor]]:
    return [("/".join(key) if isinstance(key, tuple) else key, value)
            for key, value in batch.items(include_nested=True, leaves_only=True)
            if isinstance(value, torch.Tensor) and value.is_floating_point()]


class Captured:
    """Runs :class:`Update` from static buffers, one set per input signature; on CUDA from a captured graph."""

    def __init__(self, update: Update, device: torch.device, *, warmup: int = 3) -> None:
        self.update = update
        self.device = device
        self.graphs = device.type == "cuda"
        self.warmup = warmup
        self.entries: dict[tuple[Any, ...], _Entry] = {}

    def run(self, batch: Batch) -> None:
        ring, inputs = _inputs(batch)
        loss: Any = self.update.loss
        branch = loss.capture_key() if hasattr(loss, "capture_key") else None  # TD3: with the actor term or not
        key = (id(ring), branch, *((k, tuple(v.shape), v.dtype) for k, v in inputs.items()))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry(inputs.clone(), _step_of(self.update, ring))
        else:
            entry.static.update_(inputs)
        if not self.graphs:
            self.update.optimizer.zero_grad(set_to_none=True)
            entry.step(entry.static)
            return
        if entry.graph is None and entry.seen < self.warmup:  # eager on a side stream: cuBLAS, optimizer state
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.update.optimizer.zero_grad(set_to_none=True)
                entry.step(entry.static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            entry.seen += 1
            return
        if entry.graph is None:
            self.update.optimizer.zero_grad(set_to_none=True)  # the graph allocates its own gradients
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                entry.step(entry.static)
            entry.graph = graph  # capturing ran nothing: the replay below performs this update
            entry.graph.replay()
            return  # the capture ran the loss's Python (its host state counted this update)
        entry.graph.replay()
        if hasattr(loss, "replayed"):
            loss.replayed()  # the host state the loss's forward would have advanced


@dataclass
class _Entry:
    static: TensorDict
    step: Callable[[TensorDict], None]
    seen: int = 0
    graph: Any = None


def _inputs(batch: Batch) -> tuple[DeviceRing | None, TensorDict]:
    """What is copied into static buffers: a ring batch's indices and sampler info, or a batch's rows."""
    if isinstance(batch, RingBatch):
        return batch.ring, TensorDict({"index": batch.index, **batch.info}, batch_size=batch.index.shape[:1])
    return None, batch if isinstance(batch, TensorDict) else batch.to_tensordict()


def _step_of(update: Update, ring: DeviceRing | None) -> Callable[[TensorDict], None]:
    """The captured function: gather from the ring (when the batch is indices), then the update."""

    def step(static: TensorDict) -> None:
        if ring is None:
            update.run(static)
        else:
            info = {key: value for key, value in static.items() if key != "index" and isinstance(value, torch.Tensor)}
            update.run(RingBatch(ring, static["index"], info).rows())

    return step
