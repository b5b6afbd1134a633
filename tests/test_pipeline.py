"""Pipeline validation: every error names the stage or port and says what to do."""

import pytest

from streamrl import Pipeline, PipelineError
from streamrl.testing import Collect, ListSource


def two_stage() -> Pipeline:
    p = Pipeline("t")
    p.add(ListSource("src", [1]), Collect("sink"))
    return p


def test_a_valid_pipeline_passes_and_describes_itself():
    p = two_stage().connect("src.items", "sink.items")
    p.validate()
    assert "src.items --[2]--> sink.items" in p.describe()


def test_unconnected_input_is_named():
    p = Pipeline("t").add(Collect("sink"))
    with pytest.raises(PipelineError, match=r"input sink.items is not connected; connect an output to it"):
        p.validate()


def test_unconnected_output_is_named():
    p = Pipeline("t").add(ListSource("src", [1]))
    with pytest.raises(PipelineError, match=r"output src.items is not connected"):
        p.validate()


def test_duplicate_stage_names_are_rejected():
    p = two_stage().add(Collect("sink")).connect("src.items", "sink.items")
    with pytest.raises(PipelineError, match="two stages are named 'sink'; give each stage a unique name"):
        p.validate()


def test_unknown_stage_and_port_are_named_with_the_alternatives():
    p = two_stage().connect("src.items", "nowhere.items")
    with pytest.raises(PipelineError, match=r"names stage 'nowhere'.*stages: \['sink', 'src'\]"):
        p.validate()
    p = two_stage().connect("src.things", "sink.items")
    with pytest.raises(PipelineError, match=r"has no output 'things'; its outputs are \['items'\]"):
        p.validate()


def test_malformed_address_is_rejected_at_connect():
    with pytest.raises(PipelineError, match="must be written 'stage.port'"):
        two_stage().connect("src", "sink.items")


def test_output_connected_twice_is_rejected():
    p = two_stage().add(Collect("sink2"))
    p.connect("src.items", "sink.items").connect("src.items", "sink2.items")
    with pytest.raises(PipelineError, match="connected twice"):
        p.validate()


class Relay(Collect):
    outputs = ("items",)


def test_cycle_without_buffering_is_rejected_and_named():
    p = Pipeline("cyc").add(Relay("a"), Relay("b"))
    p.connect("a.items", "b.items", capacity=0).connect("b.items", "a.items", capacity=0)
    with pytest.raises(PipelineError, match=r"stages a -> b -> a form a cycle with no buffering.*capacity >= 1"):
        p.validate()
    buffered = Pipeline("cyc").add(Relay("a"), Relay("b"), ListSource("src", [1]))  # a source feeds the cycle
    buffered.connect("a.items", "b.items", capacity=0).connect("b.items", "a.items", capacity=1)
    buffered.connect("src.items", "a.items", capacity=1)
    buffered.validate()


def test_cross_process_edge_needs_a_buffer():
    p = two_stage().connect("src.items", "sink.items", capacity=0)
    p.stage_group["src"] = "w"
    p.place("w", "worker_process")
    with pytest.raises(PipelineError, match="crosses processes with capacity 0"):
        p.validate()


def test_bad_placement_and_stage_names():
    with pytest.raises(PipelineError, match="placement of group 'g' must be one of"):
        Pipeline().place("g", "cloud")
    with pytest.raises(PipelineError, match="without '.'"):
        Collect("a.b")


def test_edges_between_two_worker_groups_are_rejected():
    p = two_stage().connect("src.items", "sink.items")
    p.stage_group["src"], p.stage_group["sink"] = "a", "b"
    p.place("a", "worker_process").place("b", "worker_process")
    with pytest.raises(PipelineError, match="joins two worker groups .* put one side in the main process"):
        p.validate()


def test_an_on_policy_collector_splits_each_batch_over_its_replicas_or_says_why_it_cannot():
    from streamrl import MLP, ConfigError, GymEnv, QValueActor

    p = Pipeline("p")
    group = p.add_collector("collect", GymEnv("CartPole-v1", num_envs=2), QValueActor(MLP(2, in_features=4)),
                            frames_per_chunk=64, rounds=True, replicas=2, weights_from=None)
    assert p.stages[group.env].steps_per_chunk == 16  # 64 frames a round: 32 per replica, 16 steps of 2 envs
    with pytest.raises(ConfigError, match="frames_per_chunk=60 must split evenly over replicas=4 x num_envs=2"):
        Pipeline("q").add_collector("collect", GymEnv("CartPole-v1", num_envs=2), QValueActor(MLP(2, in_features=4)),
                                    frames_per_chunk=60, rounds=True, replicas=4, weights_from=None)
