"""The TensorDict env API (reset, step, step_and_maybe_reset, rollout, step_mdp, fake_tensordict), pixels, frame
skip, wrapping an existing gymnasium env, check_env_specs, and the env stage running such envs."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase

import streamrl
from streamrl import EnvStage, GymEnv, Pipeline, PolicyStage
from streamrl.envs.base import EnvBase, step_mdp
from streamrl.envs.check import SpecMismatch, check_env_specs
from streamrl.envs.gym import GymWrapper
from streamrl.envs.specs import Categorical, Composite, Unbounded
from streamrl.errors import EnvError
from streamrl.testing import Collect

ANGLE_LIMIT = 12 * 2 * np.pi / 360  # CartPole ends past this pole angle or |x| > 2.4


def test_reset_step_and_step_mdp_give_the_keys_users_know():
    env = GymEnv("CartPole-v1", num_envs=3, seed=0)
    td = env.reset()
    assert td.batch_size == (3,) and td["observation"].shape == (3, 4)
    assert not td["done"].any() and td["terminated"].shape == (3, 1)
    td = env.rand_step(td)
    assert td["action"].shape == (3,) and env.action_spec.is_in(td["action"])
    assert set(td["next"].keys()) == {"observation", "reward", "done", "terminated", "truncated"}
    assert td["next", "reward"].shape == (3, 1) and (td["next", "reward"] == 1).all()
    root = step_mdp(td)
    assert set(root.keys()) == {"observation", "done", "terminated", "truncated"}  # action and reward dropped
    assert torch.equal(root["observation"], td["next", "observation"])
    env.close()


def test_step_and_maybe_reset_keeps_the_terminal_observation_in_next_and_resets_the_root():
    torch.manual_seed(0)
    env = GymEnv("CartPole-v1", num_envs=4, seed=1)
    td = env.reset()
    ends = 0
    for _ in range(200):
        td.set("action", torch.ones(4, dtype=torch.int64))  # always push right: episodes end fast
        td, root = env.step_and_maybe_reset(td)
        done = td["next", "done"].squeeze(-1)
        for i in torch.nonzero(done).flatten().tolist():
            ends += 1
            x, _, theta, _ = td["next", "observation"][i].tolist()
            assert abs(x) > 2.4 or abs(theta) > ANGLE_LIMIT  # the terminal observation, not a reset one
            assert td["next", "terminated"][i] and not td["next", "truncated"][i]
            assert (root["observation"][i].abs() <= 0.05).all()  # the root starts the next episode
            assert not root["done"][i]
        assert torch.equal(root["observation"][~done], td["next", "observation"][~done])
        td = root
    assert ends >= 8
    env.close()


def test_rollout_stops_at_the_first_done_or_auto_resets():
    env = GymEnv("CartPole-v1", num_envs=2, seed=0)
    short = env.rollout(1000)
    assert short.batch_size[0] == 2 and short.batch_size[1] < 1000
    assert short["next", "done"][:, -1].any() and not short["next", "done"][:, :-1].any()
    long = env.rollout(300, break_when_any_done=False)
    assert long.batch_size == (2, 300) and long["next", "done"].sum() >= 2
    with pytest.raises(ValueError, match="needs tensordict"):
        env.rollout(5, auto_reset=False)
    resumed = env.rollout(5, auto_reset=False, tensordict=env.reset())
    assert resumed.batch_size == (2, 5)
    env.close()


def test_rollout_with_a_policy_and_a_seed_is_reproducible():
    class Left(TensorDictModuleBase):
        in_keys, out_keys = ["observation"], ["action"]

        def forward(self, td):
            return td.set("action", torch.zeros(td.batch_size, dtype=torch.int64))

    env = GymEnv("CartPole-v1", num_envs=2)
    env.set_seed(3)
    first = env.rollout(20, Left(), break_when_any_done=False)
    env.set_seed(3)
    second = env.rollout(20, Left(), break_when_any_done=False)
    assert (first["action"] == 0).all()
    assert torch.equal(first["next", "observation"], second["next", "observation"])
    env.close()


def test_fake_tensordict_has_the_keys_shapes_and_dtypes_of_a_step():
    env = GymEnv("Pendulum-v1", num_envs=2)
    fake = env.fake_tensordict()
    real = env.rand_step(env.reset())
    assert set(fake.keys(True, True)) == set(real.keys(True, True))
    for key in fake.keys(True, True):
        assert fake[key].shape == real[key].shape and fake[key].dtype == real[key].dtype, key
    env.close()


def test_pixels_frame_skip_and_pixels_with_state():
    env = GymEnv("CartPole-v1", num_envs=2, from_pixels=True, frame_skip=2, backend="sync", seed=0)
    assert list(env.observation_spec.keys()) == ["pixels"]
    td = env.rollout(3)
    assert td["pixels"].shape == (2, td.batch_size[1], 400, 600, 3) and td["pixels"].dtype == torch.uint8
    assert (td["next", "reward"][:, 0] == 2).all()  # two frames per step, one point each
    env.close()
    both = GymEnv("CartPole-v1", from_pixels=True, pixels_only=False, seed=0)
    td = both.reset()
    assert set(both.observation_spec.keys()) == {"observation", "pixels"} and td["observation"].shape == (1, 4)
    both.close()


def test_wrapping_an_existing_gymnasium_env():
    env = GymWrapper(gym.make("Pendulum-v1", g=9.81))
    assert env.num_envs == 1 and env.name == "Pendulum-v1"
    td = env.rollout(5)
    assert td.batch_size == (1, 5) and td["action"].shape == (1, 5, 1)
    env.close()


def test_the_native_vector_env_is_kept_for_the_env_stage_and_the_tensordict_api_says_what_to_do():
    env = GymEnv("CartPole-v1", num_envs=2, backend="native")
    env.open()
    with pytest.raises(EnvError, match="backend='sync'"):
        env.reset()
    env.close()
    auto = GymEnv("CartPole-v1", num_envs=2)
    auto.reset()  # the TensorDict API picks a same-step backend when the choice is left to it
    assert auto.resolved_backend == "sync"
    auto.close()


@pytest.mark.parametrize("name", ["CartPole-v1", "Pendulum-v1", "InvertedDoublePendulum-v5"])
def test_check_env_specs_passes_for_gymnasium_envs(name):
    env = GymEnv(name, num_envs=2)
    rollout = check_env_specs(env)
    assert rollout.batch_size == (2, 8)
    env.close()


class WrongDtypeEnv(EnvBase):
    """Declares float32 observations and returns float64 ones from step (reset is right)."""

    def __init__(self):
        self.num_envs, self.batch_size, self.device, self.seed = 2, torch.Size([2]), torch.device("cpu"), None

    @property
    def observation_spec(self):
        return Composite(observation=Unbounded(shape=(3,), dtype=torch.float32))

    @property
    def action_spec(self):
        return Categorical(shape=(), dtype=torch.int64, n=2)

    def _reset(self, mask):
        return TensorDict({"observation": torch.zeros(2, 3)}, [2])

    def _step(self, td):
        flags = torch.zeros(2, 1, dtype=torch.bool)
        return TensorDict({"observation": torch.zeros(2, 3, dtype=torch.float64), "reward": torch.zeros(2, 1),
                           "done": flags, "terminated": flags, "truncated": flags}, [2])


def test_check_env_specs_names_the_key_with_the_wrong_dtype():
    with pytest.raises(SpecMismatch, match=r"key 'next.observation': dtype torch.float64, but the spec says"):
        check_env_specs(WrongDtypeEnv())


class RandomPolicy(TensorDictModuleBase):
    in_keys, out_keys = ["pixels"], ["action"]

    def forward(self, td):
        return td.set("action", torch.randint(0, 2, td.batch_size))


def test_env_stage_runs_an_env_with_the_tensordict_api(tmp_path):
    env = GymEnv("CartPole-v1", num_envs=2, from_pixels=True, backend="sync")
    sink = Collect("sink")
    p = Pipeline("pixels")
    p.add(EnvStage("env", env, frames_per_chunk=8, total_frames=32), PolicyStage("policy", RandomPolicy()), sink)
    p.connect("env.policy", "policy.requests", capacity=0)
    p.connect("env.chunks", "sink.items", capacity=2)
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.summary["frames"] == 32 and len(sink.items) == 4
    chunk = sink.items[0]
    assert chunk.batch_size == (2, 4) and chunk["pixels"].shape == (2, 4, 400, 600, 3)
    assert chunk["next", "pixels"].dtype == torch.uint8
    assert chunk["traj_id"].tolist()[0][0] == 0 and (chunk["policy_version"] == 0).all()
    steps = torch.cat([c["step_count"] for c in sink.items], dim=1)
    assert steps[:, :4].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_one_hot_actions_step_a_discrete_env():
    class AlwaysRight(TensorDictModuleBase):
        in_keys, out_keys = ["observation"], ["action"]

        def forward(self, td):
            return td.set("action", torch.tensor([0, 1]).expand(*td.batch_size, 2))

    env = GymEnv("CartPole-v1", num_envs=2, seed=0)
    one_hot = env.rollout(200, AlwaysRight())
    env.set_seed(0)
    index = env.rollout(200, lambda td: td.set("action", torch.ones(td.batch_size, dtype=torch.int64)))
    assert torch.equal(one_hot["next", "observation"], index["next", "observation"])  # the same pushes right
    env.close()
