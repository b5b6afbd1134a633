"""What the graph must know beyond its edges: objects stages share, weights that must flow, hooks that must sit next
to what they change. ``Pipeline.validate`` ends with :func:`check_links`; ``Pipeline.describe`` draws
:func:`shared_links`.

Every link is found by object identity in the process that builds the pipeline, before anything is pickled (a
worker process gets copies, and a copy is not the object). Where a group runs decides the process: a group placed
``"worker_process"`` is a process of its own, every ``"in_process"`` group shares the main process.

* **Shared objects.** :meth:`Stage.shares() <streamrl.stages.base.Stage.shares>` names what a stage uses by
  reference together with other stages: a ``WriterStage`` and its ``SamplerStage`` meet only through their replay
  buffer's rate limiter, so they must run in one process. ``describe`` draws ``writer ==[ReplayBuffer]== sampler``.
* **Weights.** A learner's updates reach another process only as published weights. A stage that acts with a
  module (``Stage.acts_with()``: a policy) whose parameters a learner trains (``Stage.trains()``, or its
  ``Stage.publishes()`` module) needs its ``weights`` input connected, or it acts with its first weights for the
  whole run; a ``weights`` input fed by a learner that publishes nothing never receives any; and any other stage
  holding trained parameters (an advantage stage's critic) must run in its learner's process.
* **Hooks.** A hook changes the objects it holds (found in its attributes, a few levels deep: torch modules and
  objects stages share). It must run in a process where a stage holds them: ``EpsilonAnnealing(explore)`` in the
  main process while only the collector's worker acts with ``explore`` would anneal a copy nobody uses. A hook
  with ``main_only = True`` (it reads the run's recorder or pipeline) may not be placed in a worker group.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tensordict import TensorDictBase

from streamrl.errors import PipelineError
from streamrl.events import Hook
from streamrl.stages.base import Stage

if TYPE_CHECKING:
    from streamrl.pipeline import Pipeline

MAIN_PROCESS = "main"  # pipeline.MAIN (not imported: pipeline imports this module)
SCAN_DEPTH = 3  # attribute levels searched for the modules a hook or stage holds: hook.updater.loss is level 2


@dataclass(frozen=True)
class SharedLink:
    """Stages (and hooks) that use one object by reference; drawn ``writer ==[ReplayBuffer]== sampler``."""

    label: str
    stages: tuple[str, ...]
    hooks: tuple[str, ...] = ()
    shared: object = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        hooks = f" (hooks: {', '.join(self.hooks)})" if self.hooks else ""
        return f" ==[{self.label}]== ".join(self.stages) + hooks


def check_links(pipeline: Pipeline) -> None:
    """Raise :class:`PipelineError` naming the stages (or hook), their groups and the fix, when stages sharing an
    object would run in different processes, a policy would never receive its learner's weights, or a hook is
    placed away from the objects it acts on (see the module docstring)."""
    for link in shared_links(pipeline):
        _check_one_process(pipeline, link)
    trainer_of = _trained_parameters(pipeline)
    _check_weights(pipeline, trainer_of)
    _check_trained_copies(pipeline, trainer_of)
    _check_hooks(pipeline)


def shared_links(pipeline: Pipeline) -> list[SharedLink]:
    """The objects two or more stages share (``Stage.shares()``), with the stages and the hooks holding each."""
    by_object: dict[int, tuple[object, list[str]]] = {}
    for name, stage in pipeline.stages.items():
        for shared in stage.shares():
            by_object.setdefault(id(shared), (shared, []))[1].append(name)
    shared_ids = set(by_object)
    hooks_by_object: dict[int, list[str]] = {}
    for hook, _ in pipeline.hooks:
        for held in _holds(hook, shared_ids):
            hooks_by_object.setdefault(id(held), []).append(hook.name)
    links = [(key, shared, stages) for key, (shared, stages) in by_object.items() if len(stages) > 1]
    labels = _labels([shared for _, shared, _ in links])
    return [SharedLink(labels[key], tuple(stages), tuple(hooks_by_object.get(key, ())), shared)
            for key, shared, stages in links]


# -- the three checks ------------------------------------------------------------------------------------------
def _check_one_process(pipeline: Pipeline, link: SharedLink) -> None:
    if len({_process_of(pipeline, name) for name in link.stages}) == 1:
        return
    home = next((name for name in link.stages if _process_of(pipeline, name) == MAIN_PROCESS), link.stages[0])
    group = pipeline.stage_group[home]
    movers = [name for name in link.stages if _process_of(pipeline, name) != _process_of(pipeline, home)]
    raise PipelineError(
        f"stages {_and(_where(pipeline, name) for name in link.stages)} share one {link.label} by reference, so "
        f"they must run in one process (a copy in another process is a different {link.label}: the two would "
        f"never meet); add {_and(repr(name) for name in movers)} with group={group!r} (where {home!r} runs), or "
        f"run {_and(repr(pipeline.stage_group[name]) for name in movers)} in the main process: "
        f"p.place({pipeline.stage_group[movers[0]]!r}, 'in_process')"
    )


def _trained_parameters(pipeline: Pipeline) -> dict[int, str]:
    """id(parameter) -> the learner training it (its optimizer's parameters and those of its published module)."""
    trainer_of: dict[int, str] = {}
    for name, stage in pipeline.stages.items():
        published = stage.publishes()
        for parameter in (*stage.trains(), *(published.parameters() if published is not None else ())):
            trainer_of.setdefault(id(parameter), name)
    return trainer_of


def _check_weights(pipeline: Pipeline, trainer_of: dict[int, str]) -> None:
    """A policy acting with trained parameters has its weights input connected, to a learner that publishes."""
    for name, stage in pipeline.stages.items():
        feeds = [e for e in pipeline.edges if e.dst_stage == name and e.dst_port == "weights"]
        for edge in feeds:
            source = pipeline.stages[edge.src_stage]
            if source.trains() and source.publishes() is None:
                raise PipelineError(
                    f"stage {_where(pipeline, name)} takes weights from learner {edge.src_stage!r}, which publishes "
                    f"none, so it never receives any: give the learner the module to send, "
                    f"LearnerStage({edge.src_stage!r}, loss, optimizer, publish=actor), actor being the module "
                    f"{name!r} acts with"
                )
        acting = stage.acts_with()
        trained = _first_trained(acting, trainer_of) if acting is not None and not feeds else None
        if trained is not None:
            _stale_policy(pipeline, name, *trained)


def _stale_policy(pipeline: Pipeline, name: str, parameter: str, learner: str) -> None:
    fix = f"p.connect('{learner}.weights', '{name}.weights', capacity=1, overflow='drop_oldest')"
    if pipeline.stages[learner].publishes() is None:
        fix += f", and give the learner the module to send: LearnerStage({learner!r}, ..., publish=actor)"
    raise PipelineError(
        f"stage {_where(pipeline, name)} acts with parameter {parameter!r}, which learner {learner!r} trains, but its "
        f"weights input is not connected: it would act with its first weights for the whole run (and the learner "
        f"would train on stale data). Connect the learner's weights to it: {fix}"
    )


def _check_trained_copies(pipeline: Pipeline, trainer_of: dict[int, str]) -> None:
    """A stage that uses trained parameters without taking weights (an advantage stage's critic) runs in the
    process of the learner training them."""
    for name, stage in pipeline.stages.items():
        if stage.acts_with() is not None or stage.trains():
            continue  # a policy (the weights check) or a learner
        trained = _first_trained_held(stage, trainer_of)
        if trained is not None and _process_of(pipeline, name) != _process_of(pipeline, trained[1]):
            raise PipelineError(
                f"stage {_where(pipeline, name)} uses parameter {trained[0]!r}, which learner "
                f"{_where(pipeline, trained[1])} trains, in another process: there it would use a copy that never "
                f"learns; add {name!r} with group={pipeline.stage_group[trained[1]]!r}, next to its learner"
            )


def _check_hooks(pipeline: Pipeline) -> None:
    shared_ids = {id(shared) for stage in pipeline.stages.values() for shared in stage.shares()}
    held_by: dict[int, list[str]] = {}  # id(object) -> stages holding it
    for name, stage in pipeline.stages.items():
        for held in _held_by_stage(stage, shared_ids):
            held_by.setdefault(id(held), []).append(name)
    for hook, group in pipeline.hooks:
        process = _process(pipeline, group)
        if hook.main_only and process != MAIN_PROCESS:
            raise PipelineError(
                f"hook {hook.name!r} needs the main process (it reads the run's recorder, pipeline or files, which "
                f"only the main process has) but is placed in group {group!r}, a worker process; add it without "
                "group= (the default is 'main')"
            )
        for root in _holds(hook, shared_ids):
            owners = held_by.get(id(root), [])
            if owners and all(_process_of(pipeline, owner) != process for owner in owners):
                groups = sorted({pipeline.stage_group[owner] for owner in owners})
                holders = (f"only stage {_where(pipeline, owners[0])} holds" if len(owners) == 1 else
                           f"only stages {_and(_where(pipeline, o) for o in owners)} hold")
                fix = (f"add it where that stage runs: p.add_hook({type(hook).__name__}(...), group={groups[0]!r})"
                       if len(groups) == 1 else f"add one such hook to each of groups {_and(map(repr, groups))} "
                       f"(p.add_hook({type(hook).__name__}(...), group={groups[0]!r}), ...)")
                raise PipelineError(
                    f"hook {hook.name!r} (group {group!r}, {_placement(pipeline, group)}) acts on "
                    f"{type(root).__name__}, which {holders}: in its own process it would change a copy that no "
                    f"stage uses; {fix}"
                )


# -- what objects hold -----------------------------------------------------------------------------------------
def _holds(owner: object, shared_ids: set[int]) -> list[object]:
    """The torch modules and shared objects ``owner`` holds in its attributes (and in the closures of the functions
    it holds), ``SCAN_DEPTH`` levels deep; not looking inside what it finds, nor into stages, hooks or tensors."""
    found: list[object] = []
    seen: set[int] = set()

    def visit(value: object, level: int) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, torch.nn.Module) or id(value) in shared_ids:
            found.append(value)
        elif level < SCAN_DEPTH:
            for child in _children(value):
                visit(child, level + 1)

    for child in _attributes(owner):
        visit(child, 1)
    return found


def _held_by_stage(stage: Stage, shared_ids: set[int]) -> Iterator[object]:
    """Every object a stage holds: what it shares, the modules it holds and all their submodules."""
    yield from stage.shares()
    for held in _holds(stage, shared_ids):
        yield from held.modules() if isinstance(held, torch.nn.Module) else (held,)


def _children(value: object) -> Iterable[object]:
    if isinstance(value, dict):
        return value.values()
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    if isinstance(value, types.MethodType):
        return (value.__self__,)
    if isinstance(value, types.FunctionType):  # a lambda's closure: pipeline.on("chunk", lambda e: explore.step())
        return [cell.cell_contents for cell in value.__closure__ or () if _filled(cell)]
    if isinstance(value, (Stage, Hook, type, types.ModuleType, torch.Tensor, TensorDictBase, str, bytes)):
        return ()
    return _attributes(value)


def _attributes(value: object) -> Iterable[object]:
    try:
        return list(vars(value).values())
    except TypeError:  # no __dict__ (slots, builtins)
        return ()


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def _first_trained(module: torch.nn.Module, trainer_of: dict[int, str]) -> tuple[str, str] | None:
    """(parameter name, learner) of the first parameter of ``module`` that a learner trains."""
    return next(((n, trainer_of[id(p)]) for n, p in module.named_parameters() if id(p) in trainer_of), None)


def _first_trained_held(stage: Stage, trainer_of: dict[int, str]) -> tuple[str, str] | None:
    for held in _holds(stage, set()):
        if isinstance(held, torch.nn.Module) and (trained := _first_trained(held, trainer_of)) is not None:
            return trained
    return None


# -- names and places ------------------------------------------------------------------------------------------
def _process(pipeline: Pipeline, group: str) -> str:
    return pipeline.process_of_group(group)


def _process_of(pipeline: Pipeline, stage: str) -> str:
    return pipeline.process_of(stage)


def _placement(pipeline: Pipeline, group: str) -> str:
    return "a worker process" if _process(pipeline, group) != MAIN_PROCESS else "the main process"


def _where(pipeline: Pipeline, stage: str) -> str:
    group = pipeline.stage_group[stage]
    return f"{stage!r} (group {group!r}, {_placement(pipeline, group)})"


def _and(items: Iterable[str]) -> str:
    names = list(items)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _labels(objects: list[object]) -> dict[int, str]:
    """Each object's type name, numbered when several objects share one (``ReplayBuffer 2``)."""
    counts: dict[str, int] = {}
    labels: dict[int, str] = {}
    for obj in objects:
        kind = type(obj).__name__
        counts[kind] = counts.get(kind, 0) + 1
        labels[id(obj)] = kind if counts[kind] == 1 else f"{kind} {counts[kind]}"
    return labels

