"""Turn a pipeline's edges into streams for the stages of one process.

Each input port gets one stream (fan-in edges share it through cloned send halves). An edge whose other end
lives in another process gets a *bridge end* instead of a stage port: ``bridge_in[edge]`` is where the process
bridge delivers items that arrive from the other process, ``bridge_out[edge]`` is where it picks up items to ship.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamrl.pipeline import Edge, Pipeline
from streamrl.streams import ReceiveStream, SendStream, StreamStatistics, open_stream


@dataclass
class Wiring:
    inputs: dict[str, dict[str, ReceiveStream[Any]]] = field(default_factory=dict)
    outputs: dict[str, dict[str, SendStream[Any]]] = field(default_factory=dict)
    bridge_in: dict[str, SendStream[Any]] = field(default_factory=dict)
    bridge_out: dict[str, ReceiveStream[Any]] = field(default_factory=dict)
    _streams: list[SendStream[Any]] = field(default_factory=list)

    def statistics(self) -> dict[str, StreamStatistics]:
        return {s.name: s.statistics() for s in self._streams}


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
        if pipeline.process_of(dst) == process:
            first = edges[0]
            send, receive = open_stream(first.capacity, name=first.stream_name, overflow=first.overflow)
            w._streams.append(send)
            w.inputs[dst][port] = receive
            for e in edges:
                clone = send.clone()
                if e in src_here:
                    w.outputs[e.src_stage][e.src_port] = clone
                else:
                    w.bridge_in[e.name] = clone
            send.close()  # only the clones keep the stream open
        else:
            for e in src_here:
                send, receive = open_stream(e.capacity, name=f"{e.name} (outbound)", overflow=e.overflow)
                w._streams.append(send)
                w.outputs[e.src_stage][e.src_port] = send
                w.bridge_out[e.name] = receive
    return w
