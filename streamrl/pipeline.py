"""The pipeline graph: named stages, bounded edges, stage groups with a placement, hooks.

The graph is plain data; :mod:`streamrl.execution` runs it. Build one in a pipeline file::

    p = Pipeline("dqn")
    p.add(EnvStage("env", env), PolicyStage("policy", actor), group="collect")
    p.add(WriterStage("writer", replay), SamplerStage("sampler", replay), LearnerStage("learner", ...))
    p.connect("env.policy", "policy.requests", capacity=0)   # a request/answer exchange (streamrl.exchange)
    p.connect("env.chunks", "writer.chunks")
    ...
    p.place("collect", "worker_process")    # run env + policy in their own process
    p.add_hook(ProgressBar(), MetricsCSV())
    p.validate()                            # the runtime calls it too

Ports are addressed ``"stage.port"``. Several outputs may feed one input (fan-in); an output feeds exactly one
input. An edge that crosses from one process to another needs capacity >= 1 (the buffer is what lets both sides
run at once). Ports a stage declares in ``exchanges`` are request/answer exchanges (:mod:`streamrl.exchange`), one
edge per asker: they join exchange ports, in one process. A cycle of stages needs something to start it: a source
stage in it or an edge into it from outside; one with neither never starts, and ``validate`` refuses it, as it
refuses a cycle of capacity-0 edges (a deadlock).

Stages are grouped; a group's placement says where its stages run: ``"in_process"`` (the main event loop),
``"worker_process"`` (a child process exchanging chunks and weights through shared memory) or ``"ray_actor"`` (a
Ray actor anywhere in a Ray cluster, exchanging them through Ray's object store; :mod:`streamrl.execution.ray_actor`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

from streamrl.errors import ConfigError, PipelineError, torchrl_names
from streamrl.events import FunctionHook, Hook
from streamrl.graph_checks import check_links, shared_links
from streamrl.stages.base import Stage

Placement = Literal["in_process", "worker_process", "ray_actor"]
PLACEMENTS: tuple[str, ...] = ("in_process", "worker_process", "ray_actor")
OWN_PROCESS = ("worker_process", "ray_actor")  # placements that give a group (each replica) a process of its own
MAIN = "main"
RAY_INSTALL = "pip install 'streamrl[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """How a ``ray_actor`` group's replicas are started: Ray resources per replica and how often a dead replica is
    restarted before the run fails (see :mod:`streamrl.execution.ray_actor`)."""

    resources: tuple[tuple[str, float], ...] = (("CPU", 1.0),)
    max_restarts: int = 3


@dataclass(frozen=True)
class Edge:
    """A bounded stream from ``src`` (stage.port) to ``dst`` (stage.port)."""

    src_stage: str
    src_port: str
    dst_stage: str
    dst_port: str
    capacity: int = 2
    overflow: Literal["block", "drop_oldest"] = "block"
    join: Literal["arrival", "rounds"] = "arrival"  # out of a replicated group: how the replicas' items meet

    @property
    def name(self) -> str:
        return f"{self.src_stage}.{self.src_port}->{self.dst_stage}.{self.dst_port}"

    @property
    def stream_name(self) -> str:
        """Fan-in edges into one input share a stream, named after the input."""
        return f"{self.dst_stage}.{self.dst_port}"


@dataclass(frozen=True)
class CollectorGroup:
    """What :meth:`Pipeline.add_collector` built: the group, its two stages, and where its chunks come out."""

    group: str
    env: str  # the env stage's name
    policy: str  # the policy stage's name
    replicas: int

    @property
    def chunks(self) -> str:
        """The output to connect downstream: ``p.connect(collector.chunks, "writer.chunks")``."""
        return f"{self.env}.chunks"


def _split(address: str, role: str) -> tuple[str, str]:
    stage, sep, port = address.partition(".")
    if not sep or not stage or not port:
        raise PipelineError(f"{role} must be written 'stage.port', got {address!r}")
    return stage, port


class Pipeline:
    """A graph of stages joined by bounded streams, plus the hooks subscribed to its events."""

    def __init__(self, name: str = "pipeline", *, config: Any = None) -> None:
        self.name = name
        self.config = config
        self.stages: dict[str, Stage] = {}
        self.stage_group: dict[str, str] = {}
        self.groups: dict[str, Placement] = {MAIN: "in_process"}
        self.replicas: dict[str, int] = {}  # groups run as several replicas (worker processes), and how many
        self.ray_options: dict[str, RayOptions] = {}  # ray_actor groups: resources and restarts
        self.edges: list[Edge] = []
        self.hooks: list[tuple[Hook, str]] = []
        self._duplicates: list[str] = []

    # -- building ------------------------------------------------------------------------------------------
    def add(self, *stages: Stage, group: str = MAIN) -> Pipeline:
        for stage in stages:
            if not isinstance(stage, Stage):
                raise PipelineError(f"Pipeline.add takes Stage objects, got {type(stage).__name__}: {stage!r}")
            if stage.name in self.stages:
                self._duplicates.append(stage.name)
            self.stages[stage.name] = stage
            self.stage_group[stage.name] = group
            self.groups.setdefault(group, "in_process")
        return self

    def place(self, group: str, placement: Placement, *, replicas: int = 1,
              resources: dict[str, float] | None = None, max_restarts: int = 3) -> Pipeline:
        """Say where a stage group runs: ``"in_process"``, ``"worker_process"`` or ``"ray_actor"``; ``replicas=N``
        runs N copies of the group, each in a process of its own (see :mod:`streamrl.execution.wiring` for how their
        edges meet). For ``"ray_actor"``: ``resources`` each replica asks of Ray (``{"CPU": 1}`` by default; ``"GPU"``
        and custom resources such as ``{"node:10.0.0.5": 0.01}`` too) and ``max_restarts``, how many times a replica
        whose actor died is started again before the run fails."""
        if placement not in PLACEMENTS:
            raise PipelineError(f"placement of group {group!r} must be one of {PLACEMENTS}, got {placement!r}")
        if group == MAIN and placement != "in_process":
            raise PipelineError("group 'main' is the main process; put stages in another group to move them")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise PipelineError(f"group {group!r}: replicas must be an int >= 1, got {replicas!r}")
        if replicas > 1 and placement not in OWN_PROCESS:
            raise PipelineError(f"group {group!r}: {replicas} replicas need placement 'worker_process' or 'ray_actor' "
                                f"(one process each), got {placement!r}; use p.place({group!r}, 'worker_process', "
                                f"replicas={replicas})")
        if placement == "ray_actor":
            self.ray_options[group] = _ray_options(group, replicas, resources, max_restarts)
        elif resources is not None:
            raise PipelineError(f"group {group!r}: resources= is for placement 'ray_actor', got {placement!r}")
        self.groups[group] = placement
        self.replicas[group] = replicas
        return self

    def connect(
        self,
        src: str,
        dst: str,
        *,
        capacity: int = 2,
        overflow: Literal["block", "drop_oldest"] = "block",
        join: Literal["arrival", "rounds"] = "arrival",
    ) -> Pipeline:
        """Join output ``src`` ("stage.port") to input ``dst`` with a stream of ``capacity`` items.

        ``join`` matters for an output of a replicated group: ``"arrival"`` (items of all replicas in the order
        they arrive) or ``"rounds"`` (one item of each replica in turn, concatenated along dim 0)."""
        s_stage, s_port = _split(src, "the source of a connection")
        d_stage, d_port = _split(dst, "the destination of a connection")
        if not isinstance(capacity, int) or capacity < 0:
            raise PipelineError(f"connect({src!r}, {dst!r}): capacity must be an int >= 0, got {capacity!r}")
        if join not in ("arrival", "rounds"):
            raise PipelineError(f"connect({src!r}, {dst!r}): join must be 'arrival' or 'rounds', got {join!r}")
        self.edges.append(Edge(s_stage, s_port, d_stage, d_port, capacity, overflow, join))
        return self

    @torchrl_names("add_collector", accept={"frames_per_batch": "frames_per_chunk"})
    def add_collector(
        self,
        name: str,
        env: Any,
        policy: Any,
        *,
        frames_per_chunk: int,
        total_frames: int | None = None,
        replicas: int = 1,
        placement: Placement = "worker_process",
        weights_from: str | None = "learner",
        weights_module: Any = None,
        max_policy_lag: int | None = None,
        record: tuple[str, ...] = ("action",),
        rounds: bool = False,
        resources: dict[str, float] | None = None,
        max_restarts: int = 3,
    ) -> CollectorGroup:
        """Add a collector: group ``name`` holding an env stage (``{name}_env``) that steps ``env`` and a policy stage
        (``{name}_policy``) that runs ``policy``, joined by a rendezvous exchange (in one process a request reaches
        the policy without a trip through the scheduler), placed in a worker process by default::

            collector = p.add_collector("collect", env, explore_policy, frames_per_chunk=64, total_frames=100_000,
                                        weights_module=actor, replicas=4)
            p.connect(collector.chunks, "writer.chunks", capacity=1)
            p.add_hook(EpsilonAnnealing(explore), group=collector.group)

        ``weights_from``: the stage whose ``weights`` output feeds the policy (a lossy latest-value edge, made here;
        None: the policy keeps its weights). ``weights_module``: the part of ``policy`` those weights load into
        (default: all of it). ``replicas``: copies of the group, each in its own worker process, with their own env
        seeds and ``traj_id``s; ``total_frames`` is the budget of all of them together (split evenly, each replica's
        share rounded up; each replica stops at its first chunk that reaches its share, so the run collects at most
        one chunk per replica more than ``total_frames``; see :mod:`streamrl.stages.env`). On-policy
        learning (``max_policy_lag``) with replicas takes one chunk of every replica per update: connect the chunks
        with ``join="rounds"``, and pass ``rounds=True``: ``frames_per_chunk`` is then one learner batch of all
        replicas together, each replica collecting ``frames_per_chunk / replicas`` frames a chunk (which must split
        evenly over the replicas' envs). ``record``: policy outputs stored in the chunks besides ``action``.
        ``placement="ray_actor"`` runs the replicas as Ray actors; ``resources`` and ``max_restarts`` are then those
        of :meth:`place`.
        """
        from streamrl.stages.env import EnvStage
        from streamrl.stages.policy import PolicyStage

        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise PipelineError(f"add_collector({name!r}): replicas must be an int >= 1, got {replicas!r}")
        if rounds:
            if frames_per_chunk % (replicas * env.num_envs):
                raise ConfigError(f"frames_per_chunk={frames_per_chunk} must split evenly over replicas={replicas} x "
                                  f"num_envs={env.num_envs}: each replica collects an equal share of every batch")
            frames_per_chunk //= replicas
        budget = None if total_frames is None else -(-total_frames // replicas)  # each replica's share, rounded up
        env_stage = EnvStage(f"{name}_env", env, frames_per_chunk=frames_per_chunk, total_frames=budget,
                             record=record)
        policy_stage = PolicyStage(f"{name}_policy", policy, weights_module=weights_module,
                                   max_policy_lag=max_policy_lag)
        self.add(env_stage, policy_stage, group=name)
        self.connect(f"{env_stage.name}.policy", f"{policy_stage.name}.requests", capacity=0)
        if weights_from is not None:
            self.connect(f"{weights_from}.weights", f"{policy_stage.name}.weights", capacity=1, overflow="drop_oldest")
        self.place(name, placement, replicas=replicas, resources=resources, max_restarts=max_restarts)
        return CollectorGroup(name, env_stage.name, policy_stage.name, replicas)

    def add_hook(self, *hooks: Hook, group: str = MAIN) -> Pipeline:
        """Subscribe hooks; ``group`` runs them in that group's process (next to the stages they act on)."""
        for hook in hooks:
            if not isinstance(hook, Hook):
                raise PipelineError(f"add_hook takes Hook objects, got {type(hook).__name__}: {hook!r}")
            self.hooks.append((hook, group))
        return self

    def on(self, kinds: str | tuple[str, ...], handler: Any, *, mode: Literal["lockstep", "lossy"] = "lockstep",
           group: str = MAIN, name: str | None = None) -> Pipeline:
        """Subscribe a plain callable (sync or async) to event kinds, like TorchRL's ``register_op``::

            pipeline.on("optim_step", lambda event: print(event.data["loss"]))
        """
        self.add_hook(FunctionHook(handler, kinds, mode=mode, name=name), group=group)
        return self

    # -- queries -------------------------------------------------------------------------------------------
    def process_of(self, stage: str) -> str:
        """The process a stage runs in: ``"main"`` or the name of its worker group."""
        return self.process_of_group(self.stage_group[stage])

    def process_of_group(self, group: str) -> str:
        """The process a group runs in: its own (``worker_process``, ``ray_actor``) or the main one (``"main"``)."""
        return group if self.groups.get(group) in OWN_PROCESS else MAIN

    def replicas_of(self, process: str) -> int:
        """How many processes run ``process`` ("main" or a worker group): its replicas."""
        return self.replicas.get(process, 1) if process != MAIN else 1

    def replica_label(self, name: str, replica: int) -> str:
        """What events, statistics and errors call stage or group ``name`` in replica ``replica`` of its group:
        ``env[2]`` when the group is replicated, ``env`` otherwise."""
        group = self.stage_group.get(name, name)
        return f"{name}[{replica}]" if self.replicas_of(self.process_of_group(group)) > 1 else name

    def hooks_in(self, process: str) -> list[Hook]:
        return [h for h, g in self.hooks if self.process_of_group(g) == process]

    def worker_groups(self) -> list[str]:
        """Groups that run in processes of their own (worker processes or Ray actors) and have stages."""
        return [g for g, p in self.groups.items() if p in OWN_PROCESS and g in self.stage_group.values()]

    def ray_groups(self) -> list[str]:
        return [g for g in self.worker_groups() if self.groups[g] == "ray_actor"]

    def describe(self) -> str:
        """A text drawing of the graph: groups, stages, edges."""
        lines = [f"pipeline {self.name!r}"]
        for group, placement in self.groups.items():
            members = [n for n, g in self.stage_group.items() if g == group]
            if members:
                copies = f" x {self.replicas[group]} replicas" if self.replicas.get(group, 1) > 1 else ""
                lines.append(f"  group {group} ({placement}{copies}): {', '.join(members)}")
        for e in self.edges:
            lines.append(f"  {e.src_stage}.{e.src_port} --[{e.capacity}{' lossy' if e.overflow != 'block' else ''}]--> "
                         f"{e.dst_stage}.{e.dst_port}")
        lines.extend(f"  {link}" for link in shared_links(self))  # stages sharing an object: writer ==[..]== sampler
        for hook, group in self.hooks:
            lines.append(f"  hook {hook.name} on {', '.join(hook.events) or '-'} ({hook.mode}, group {group})")
        return "\n".join(lines)

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the graph before anything runs; raise :class:`PipelineError` saying what to fix."""
        if self._duplicates:
            raise PipelineError(f"two stages are named {self._duplicates[0]!r}; give each stage a unique name")
        if not self.stages:
            raise PipelineError(f"pipeline {self.name!r} has no stages; add some with Pipeline.add(...)")
        used_outputs: dict[tuple[str, str], Edge] = {}
        inputs: dict[tuple[str, str], list[Edge]] = {}
        for e in self.edges:
            self._check_port(e.src_stage, e.src_port, "output", e)
            self._check_port(e.dst_stage, e.dst_port, "input", e)
            key = (e.src_stage, e.src_port)
            if key in used_outputs:
                raise PipelineError(
                    f"output {e.src_stage}.{e.src_port} is connected twice ({used_outputs[key].name} and {e.name}); "
                    "an output feeds one input: add a stage that copies items to several outputs"
                )
            used_outputs[key] = e
            inputs.setdefault((e.dst_stage, e.dst_port), []).append(e)
            src_process, dst_process = self.process_of(e.src_stage), self.process_of(e.dst_stage)
            self._check_exchange(e, src_process, dst_process)
            if src_process != dst_process and e.capacity < 1:
                raise PipelineError(
                    f"edge {e.name} crosses processes with capacity 0; give it capacity >= 1 so both sides can run"
                )
            if src_process != dst_process and MAIN not in (src_process, dst_process):
                raise PipelineError(
                    f"edge {e.name} joins two worker groups ({src_process!r} and {dst_process!r}); edges between "
                    "worker processes are not bridged: put one side in the main process or in the same group"
                )
            if src_process != dst_process and self.replicas_of(dst_process) > 1 and e.overflow != "drop_oldest":
                raise PipelineError(
                    f"edge {e.name} feeds group {dst_process!r}, which runs {self.replicas_of(dst_process)} replicas: "
                    "an edge into replicas fans out as a latest value (each replica takes the newest item), so it "
                    "must be lossy; connect it with overflow='drop_oldest' (as the learner's weights are)"
                )
        for (dst, port), edges in inputs.items():
            if len({(e.capacity, e.overflow) for e in edges}) > 1:
                raise PipelineError(
                    f"input {dst}.{port} is fed by {len(edges)} edges with different capacity/overflow; "
                    "fan-in edges share one stream, give them the same settings"
                )
        for name, stage in self.stages.items():
            for port in stage.inputs:
                if (name, port) not in inputs and port not in stage.optional:
                    raise PipelineError(
                        f"input {name}.{port} is not connected; connect an output to it with "
                        f"pipeline.connect('<stage>.<port>', '{name}.{port}')"
                    )
            for port in stage.outputs:
                if (name, port) not in used_outputs and port not in stage.optional:
                    raise PipelineError(
                        f"output {name}.{port} is not connected; connect it with "
                        f"pipeline.connect('{name}.{port}', '<stage>.<port>')"
                    )
        for hook, group in self.hooks:
            if group not in self.groups:
                raise PipelineError(
                    f"hook {hook.name!r} is placed in unknown group {group!r}; known: {list(self.groups)}"
                )
        self._check_replicas()
        self._check_unbuffered_cycles()
        self._check_cycles_have_a_start()
        check_links(self)  # shared objects, weights, hook placement: streamrl.graph_checks

    def _check_port(self, stage: str, port: str, kind: str, edge: Edge) -> None:
        if stage not in self.stages:
            raise PipelineError(
                f"connection {edge.name} names stage {stage!r}, which is not in the pipeline; "
                f"stages: {sorted(self.stages)}"
            )
        declared = self.stages[stage].outputs if kind == "output" else self.stages[stage].inputs
        if port not in declared:
            raise PipelineError(
                f"connection {edge.name}: stage {stage!r} ({type(self.stages[stage]).__name__}) has no {kind} "
                f"{port!r}; its {kind}s are {list(declared)}"
            )

    def _check_replicas(self) -> None:
        """On-policy replicas: ``max_policy_lag`` bounds each replica's lag only if the learner takes one chunk of
        every replica per update (versions then count rounds), so their outputs must be joined in rounds."""
        for group in self.worker_groups():
            if self.replicas_of(group) == 1:
                continue
            members = [n for n, g in self.stage_group.items() if g == group]
            if not any(getattr(self.stages[n], "max_policy_lag", None) is not None for n in members):
                continue
            for e in self.edges:
                if e.src_stage in members and self.process_of(e.dst_stage) != group and e.join != "rounds":
                    raise PipelineError(
                        f"group {group!r} runs {self.replicas_of(group)} replicas with a max_policy_lag, but edge "
                        f"{e.name} takes their items in arrival order: the lag then holds for no replica; connect it "
                        f"with join='rounds' (one chunk of every replica per update), e.g. "
                        f"p.connect('{e.src_stage}.{e.src_port}', '{e.dst_stage}.{e.dst_port}', join='rounds')"
                    )

    def _check_exchange(self, e: Edge, src_process: str, dst_process: str) -> None:
        """An exchange port (``Stage.exchanges``: env.policy, policy.requests) joins an exchange port, in one
        process, with blocking overflow (see :mod:`streamrl.exchange`)."""
        src_exchange = e.src_port in self.stages[e.src_stage].exchanges
        dst_exchange = e.dst_port in self.stages[e.dst_stage].exchanges
        if not src_exchange and not dst_exchange:
            return
        if src_exchange != dst_exchange:
            src, dst = f"{e.src_stage}.{e.src_port}", f"{e.dst_stage}.{e.dst_port}"
            exchange, stream = (src, dst) if src_exchange else (dst, src)
            raise PipelineError(
                f"edge {e.name} joins {exchange}, a request/answer exchange port, to {stream}, a stream port; an "
                f"exchange port connects to an exchange port (e.g. p.connect('env.policy', 'policy.requests', "
                f"capacity=0))"
            )
        if src_process != dst_process:
            raise PipelineError(
                f"edge {e.name} is a request/answer exchange between processes {src_process!r} and {dst_process!r}; "
                f"an exchange does not cross processes yet: put {e.src_stage!r} and {e.dst_stage!r} in one group "
                f"(put env and policy in one group)"
            )
        if e.overflow != "block":
            raise PipelineError(f"edge {e.name} is a request/answer exchange: every request is answered, none is "
                                f"dropped; connect it without overflow={e.overflow!r}")

    def _check_unbuffered_cycles(self) -> None:
        """A cycle made only of capacity-0 (rendezvous) edges deadlocks: each stage waits for the next."""
        graph: dict[str, list[str]] = {}
        for e in self.edges:
            if e.capacity == 0:
                graph.setdefault(e.src_stage, []).append(e.dst_stage)
        state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done

        def visit(node: str, path: list[str]) -> None:
            state[node] = 1
            for nxt in graph.get(node, []):
                if state.get(nxt) == 1:
                    cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                    raise PipelineError(
                        f"stages {' -> '.join(cycle)} form a cycle with no buffering (every edge has capacity 0), "
                        f"which deadlocks; give one edge of the cycle capacity >= 1, e.g. stage {cycle[0]!r}'s output"
                    )
                if state.get(nxt) is None:
                    visit(nxt, path + [nxt])
            state[node] = 2

        for node in list(graph):
            if state.get(node) is None:
                visit(node, [node])

    def _check_cycles_have_a_start(self) -> None:
        """A cycle that holds no source stage and that no stage outside feeds never starts: each stage in it waits
        for the one before, forever (buffering does not help: the buffers stay empty)."""
        graph: dict[str, list[str]] = {name: [] for name in self.stages}
        for e in self.edges:
            graph[e.src_stage].append(e.dst_stage)
        for members in _strongly_connected(graph):
            first = next(iter(members))
            if len(members) == 1 and first not in graph[first]:
                continue  # a single stage outside any cycle
            if any(self.stages[name].source for name in members):
                continue
            if any(e.dst_stage in members and e.src_stage not in members for e in self.edges):
                continue
            cycle = _cycle_within(graph, members)
            raise PipelineError(
                f"stages {' -> '.join(cycle)} form a cycle that nothing starts: none of them is a source stage "
                "and no stage outside the cycle feeds it, so each waits for the one before it forever; every cycle "
                "needs a source stage feeding it (connect one to a stage of the cycle), or a stage in it must be a "
                "source (source = True, like EnvStage)"
            )

    def stages_in(self, process: str) -> list[Stage]:
        return [s for n, s in self.stages.items() if self.process_of(n) == process]


def _strongly_connected(graph: dict[str, list[str]]) -> list[set[str]]:
    """The strongly connected components of a directed graph (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return components


def _cycle_within(graph: dict[str, list[str]], members: set[str]) -> list[str]:
    """A cycle through the stages of one strongly connected component, as a path that returns to its start."""
    start = min(members)
    path, seen = [start], {start}
    while True:
        nxt = min(n for n in graph[path[-1]] if n in members)
        if nxt in seen:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def _ray_options(group: str, replicas: int, resources: dict[str, float] | None, max_restarts: int) -> RayOptions:
    if importlib.util.find_spec("ray") is None:
        raise PipelineError(f"group {group!r} is placed on 'ray_actor', but Ray is not installed: {RAY_INSTALL}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise PipelineError(f"group {group!r}: max_restarts must be an int >= 0, got {max_restarts!r}")
    if replicas * (max_restarts + 1) > 256:
        raise PipelineError(f"group {group!r}: {replicas} replicas x (max_restarts={max_restarts} + 1) actors need "
                            f"{replicas * (max_restarts + 1)} replica ids; traj_ids hold 256: lower one of them")
    if resources is None:
        return RayOptions(max_restarts=max_restarts)
    if not isinstance(resources, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
            for k, v in resources.items()):
        raise PipelineError(f"group {group!r}: resources must map resource names to amounts >= 0, e.g. "
                            f"{{'CPU': 1, 'GPU': 0.25}}, got {resources!r}")
    return RayOptions(tuple(sorted((k, float(v)) for k, v in resources.items())), max_restarts)
