"""Turn a pipeline's edges into streams for the stages of one process.

Each input port gets one stream (fan-in edges share it through cloned send halves); an exchange input (a port in
``Stage.exchanges``: the policy's ``requests``) gets one :mod:`~streamrl.exchange` instead, each asker (an env
stage's ``policy`` port) holding a clone of its asker half. An edge whose other end
lives in another process gets *bridge ends* instead of a stage port, one per process at the other end (a
replicated group has one process per replica): ``bridge_in[edge][r]`` is where the process bridge delivers items
arriving from replica ``r``, ``bridge_out[edge][r]`` is where it picks up items to ship to replica ``r``.

Replicated groups (``Pipeline.place(group, "worker_process", replicas=N)``), seen from the main process:

* an edge *out of* the group fans in: the replicas' items share the input's stream in arrival order; or, for an
  edge joined in rounds (``connect(..., join="rounds")``), one item of every replica in turn, concatenated along
  the first dimension into one item (:func:`_join_rounds`): on-policy learning takes one chunk per replica per
  update, so that ``max_policy_lag`` holds for each replica;
* an edge *into* the group (the learner's weights) fans out as a latest value: each replica has its own lossy
  stream, to which every item is copied without waiting (:func:`_fan_out`); a replica that is slow to take it
  only ever finds the newest item, and never holds up the learner or the other replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import torch

from streamrl.errors import BrokenStreamError, EndOfStream
from streamrl.exchange import Asker, Server, open_exchange
from streamrl.pipeline import Edge, Pipeline
from streamrl.streams import ReceiveStream, SendStream, StreamStatistics, open_stream


@dataclass
class Wiring:
    inputs: dict[str, dict[str, ReceiveStream[Any] | Server[Any, Any]]] = field(default_factory=dict)
    outputs: dict[str, dict[str, SendStream[Any] | Asker[Any, Any]]] = field(default_factory=dict)
    bridge_in: dict[str, list[SendStream[Any]]] = field(default_factory=dict)
    bridge_out: dict[str, list[ReceiveStream[Any]]] = field(default_factory=dict)
    tasks: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)  # fan-outs and joins to run
    _streams: list[SendStream[Any] | Asker[Any, Any]] = field(default_factory=list)  # exchanges too

    def statistics(self) -> dict[str, StreamStatistics]:
        return {s.name: s.statistics() for s in self._streams}

    def _open(self, capacity: int, name: str, overflow: Any = "block") -> tuple[SendStream[Any], ReceiveStream[Any]]:
        send, receive = open_stream(capacity, name=name, overflow=overflow)
        self._streams.append(send)
        return send, receive


def wire(pipeline: Pipeline, process: str) -> Wiring:
    """Create the streams that ``process`` ("main" or a worker group) needs."""
    w = Wiring()
    for name in pipeline.stages:
        if pipeline.process_of(name) == process:
            w.inputs[name] = {}
            w.outputs[name] = {}
    by_input: dict[tuple[str, str], list[Edge]] = {}
    for e in pipeline.edges:
        by_input.setdefault((e.dst_stage, e.dst_port), []).append(e)
    for (dst, port), edges in by_input.items():
        src_here = [e for e in edges if pipeline.process_of(e.src_stage) == process]
        if port in pipeline.stages[dst].exchanges:  # env -> policy: one exchange, every asker a clone (fan-in)
            if pipeline.process_of(dst) == process:  # validate() keeps both ends of an exchange in one process
                asker: Asker[Any, Any]
                asker, w.inputs[dst][port] = open_exchange(edges[0].capacity, name=edges[0].stream_name, server=dst)
                w._streams.append(asker)
                for e in edges:
                    w.outputs[e.src_stage][e.src_port] = asker.clone()
                asker.close()  # only the clones keep the exchange open
            continue
        if pipeline.process_of(dst) == process:
            first = edges[0]
            send, receive = w._open(first.capacity, first.stream_name, first.overflow)
            w.inputs[dst][port] = receive
            for e in edges:
                if e in src_here:
                    w.outputs[e.src_stage][e.src_port] = send.clone()
                else:
                    w.bridge_in[e.name] = _arrivals(w, e, send, pipeline.replicas_of(pipeline.process_of(e.src_stage)))
            send.close()  # only the clones keep the stream open
        else:
            for e in src_here:
                send, receive = w._open(e.capacity, f"{e.name} (outbound)", e.overflow)
                w.outputs[e.src_stage][e.src_port] = send
                w.bridge_out[e.name] = _departures(w, e, receive, pipeline.replicas_of(pipeline.process_of(dst)))
    return w


def _arrivals(w: Wiring, e: Edge, send: SendStream[Any], replicas: int) -> list[SendStream[Any]]:
    """Where the bridges of the ``replicas`` processes at the far end of ``e`` deliver: the input's stream itself
    (fan-in in arrival order), or per-replica streams that :func:`_join_rounds` reads in turn."""
    if e.join != "rounds" or replicas == 1:
        return [send.clone() for _ in range(replicas)]
    pairs = [w._open(e.capacity, f"{e.name} [{r}] (round)") for r in range(replicas)]
    joined = send.clone()
    w.tasks.append(lambda: _join_rounds([receive for _, receive in pairs], joined))
    return [send for send, _ in pairs]


def _departures(w: Wiring, e: Edge, receive: ReceiveStream[Any], replicas: int) -> list[ReceiveStream[Any]]:
    """Where the bridges to the ``replicas`` processes at the far end of ``e`` pick up: the edge's stream itself,
    or per-replica latest-value streams that :func:`_fan_out` copies every item to."""
    if replicas == 1:
        return [receive]
    pairs = [w._open(max(1, e.capacity), f"{e.name} [{r}] (latest)", "drop_oldest") for r in range(replicas)]
    w.tasks.append(lambda: _fan_out(receive, [send for send, _ in pairs]))
    return [receive for _, receive in pairs]


async def _fan_out(source: ReceiveStream[Any], replicas: list[SendStream[Any]]) -> None:
    """Copy every item of ``source`` to each replica's lossy stream (never waits); close them at its end."""
    try:
        async for item in source:
            for send in replicas:
                send.send_nowait(item)
    finally:
        for send in replicas:
            send.close()


async def _join_rounds(replicas: list[ReceiveStream[Any]], out: SendStream[Any]) -> None:
    """One item of each replica in turn, concatenated along dim 0 (a chunk of every replica's envs), until one
    replica's stream ends (a round that cannot be completed is dropped: its replicas stopped at a stop request)."""
    try:
        while True:
            try:
                items = [await receive.receive() for receive in replicas]
            except EndOfStream:
                return
            try:
                await out.send(torch.cat(items, dim=0) if len(items) > 1 else items[0])
            except BrokenStreamError:
                return
    finally:
        out.close()
        for receive in replicas:
            receive.close()
