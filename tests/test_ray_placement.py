"""The Ray placement's parts that need no cluster: TensorDicts as arrays, message order, validation."""

from __future__ import annotations

import anyio
import pytest
import torch
from tensordict import TensorDict

import streamrl
from streamrl import Pipeline, PipelineError
from streamrl.execution.ray_actor import _ActorChannel, from_arrays, to_arrays
from streamrl.testing import CountFrames


def _actor():
    torch.manual_seed(0)
    return streamrl.QValueActor(streamrl.MLP(2, in_features=4, num_cells=(8,)))


def test_a_tensordict_travels_as_arrays_and_comes_back_equal_and_writable():
    td = TensorDict({"observation": torch.randn(4, 3, 2), "next": {"done": torch.zeros(4, 3, 1, dtype=torch.bool)},
                     "half": torch.ones(4, 3, dtype=torch.bfloat16), "traj_id": torch.arange(12).view(4, 3)}, [4, 3])
    payload = to_arrays(td)
    for _, leaf in payload["leaves"]:
        if hasattr(leaf, "setflags"):
            leaf.setflags(write=False)  # as Ray's object store hands them back
    back = from_arrays(payload)
    assert back.batch_size == td.batch_size and (back == td).all()
    assert back["next", "done"].dtype == torch.bool and back["half"].dtype == torch.bfloat16
    back["observation"] += 1  # copied out: writable


def test_an_actor_takes_the_main_processes_messages_in_the_order_they_were_numbered():
    async def main():
        channel = _ActorChannel(traffic=None)  # type: ignore[arg-type]
        channel.deliver(2, [("b",), ("c",)])  # Ray started the second call first
        channel.deliver(1, [("a",)])
        channel.deliver(2, [])  # a take that carried nothing repeats the last number
        channel.deliver(3, [("d",)])
        return [(await channel.receive())[0] for _ in range(4)]

    assert anyio.run(main) == [("a",), ("b",), ("c",), ("d",)]


def test_without_ray_the_placement_fails_validation_with_the_install_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    p = Pipeline("x")
    with pytest.raises(PipelineError, match=r"Ray is not installed: pip install 'streamrl\[ray\]'"):
        p.add_collector("collect", streamrl.GymEnv("CartPole-v1"), _actor(), frames_per_chunk=8, placement="ray_actor",
                        weights_from=None)


def test_placement_options_are_checked():
    p = Pipeline("x")
    p.add(CountFrames("sink"), group="g")
    with pytest.raises(PipelineError, match="max_restarts must be an int >= 0"):
        p.place("g", "ray_actor", max_restarts=-1)
    with pytest.raises(PipelineError, match="resources must map resource names to amounts"):
        p.place("g", "ray_actor", resources={"CPU": "one"})  # type: ignore[dict-item]
    with pytest.raises(PipelineError, match="resources= is for placement 'ray_actor'"):
        p.place("g", "worker_process", resources={"CPU": 1})

    with pytest.raises(PipelineError, match="traj_ids hold 256"):
        p.place("g", "ray_actor", replicas=65, max_restarts=3)
