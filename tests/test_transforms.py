"""Transforms: each against a computation written out here, specs that match the data, CatFrames/StepCounter/
RewardSum across (partial) resets and chunk boundaries, the full pixel stack on CartPole, the chunk stage, GIFs."""

import anyio
import numpy as np
import pytest
import torch
from PIL import Image
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

import streamrl
from streamrl import (
    CatFrames,
    CatTensors,
    Compose,
    DoubleToFloat,
    Evaluate,
    EventBus,
    FrameSkip,
    GrayScale,
    GymEnv,
    NoopResetEnv,
    ObservationNorm,
    Pipeline,
    Resize,
    RewardScaling,
    RewardSum,
    StepCounter,
    ToTensorImage,
    TransformedEnv,
    TransformStage,
    VideoRecorder,
)
from streamrl.envs.base import EnvBase
from streamrl.envs.check import check_env_specs
from streamrl.envs.specs import Bounded, Categorical, Composite, Unbounded
from streamrl.envs.wrappers import NoopReset, SkipFrames, StepLimit
from streamrl.errors import EnvError
from streamrl.execution.context import RunContext
from streamrl.summary import RunRecorder
from streamrl.testing import Collect, ListSource


class Frames(EnvBase):
    """``num_envs`` envs whose ``pixels`` (uint8 [H, W, 3]) are filled with ``50 * env + 10 * episode + t`` and
    whose ``observation`` (float64 [2]) is ``[env, t]``; reward ``t``; an episode ends at t == length.
    ``_reset(mask)`` really resets only the masked envs."""

    def __init__(self, num_envs=2, length=3, H=4, W=5):
        self.num_envs, self.batch_size, self.seed = num_envs, torch.Size([num_envs]), 0
        self.device = torch.device("cpu")
        self.length, self.H, self.W = length, H, W
        self.t = torch.zeros(num_envs, dtype=torch.int64)
        self.episode = torch.full((num_envs,), -1, dtype=torch.int64)

    @property
    def observation_spec(self):
        return Composite(pixels=Bounded(shape=(self.H, self.W, 3), dtype=torch.uint8, low=0, high=255),
                         observation=Unbounded(shape=(2,), dtype=torch.float64))

    @property
    def action_spec(self):
        return Categorical(shape=(), dtype=torch.int64, n=2)

    def value(self):
        return 50 * torch.arange(self.num_envs) + 10 * (self.episode % 5) + self.t

    def _obs(self):
        v = self.value().to(torch.uint8)
        pixels = v[:, None, None, None].expand(self.num_envs, self.H, self.W, 3).clone()
        obs = torch.stack([torch.arange(self.num_envs), self.t], -1).double()
        return TensorDict({"pixels": pixels, "observation": obs}, batch_size=self.batch_size)

    def _reset(self, mask):
        rows = torch.ones(self.num_envs, dtype=torch.bool) if mask is None else mask
        self.t[rows] = 0
        self.episode[rows] += 1
        return self._obs()

    def _step(self, td):
        self.t += 1
        out = self._obs()
        out["reward"] = self.t.float()[:, None]
        out["terminated"] = (self.t >= self.length)[:, None]
        out["truncated"] = torch.zeros(self.num_envs, 1, dtype=torch.bool)
        out["done"] = out["terminated"].clone()
        return out


def assert_specs_hold(env, td):
    """Every observation entry (root and next) and the reward are in their specs, shapes and dtypes exactly."""
    spec = env.observation_spec
    for key in spec.keys():
        for value in (td[key], td["next", key]):
            assert spec[key].is_in(value), (key, spec[key], value.shape, value.dtype)
            assert tuple(value.shape[td.batch_dims:]) == tuple(spec[key].shape)
    assert env.reward_spec.is_in(td["next", "reward"])


# -- image transforms ---------------------------------------------------------------------------------------------
def test_to_tensor_image_moves_channels_first_and_divides_by_255():
    img = torch.tensor([[[0, 128, 255], [1, 2, 3]]], dtype=torch.uint8)  # [H=1, W=2, C=3]
    out = ToTensorImage()._apply_transform(img[None])  # a batch dim
    assert out.shape == (1, 3, 1, 2) and out.dtype == torch.float32
    expected = np.array([[[0, 1]], [[128, 2]], [[255, 3]]], dtype=np.float32) / 255
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=0, atol=1e-7)
    spec = ToTensorImage()._transform_spec(Bounded(shape=(1, 2, 3), dtype=torch.uint8, low=0, high=255))
    assert spec.shape == (3, 1, 2) and spec.dtype == torch.float32
    assert (spec.low == 0).all() and (spec.high == 1).all() and spec.is_in(out)


def test_grayscale_uses_itu_601_weights():
    rgb = torch.tensor([[[[0.2, 0.5]]], [[[0.4, 1.0]]], [[[0.6, 0.0]]]])  # [3, 1, 1, 2]: channels, H, W...
    rgb = rgb.reshape(3, 1, 2)
    out = GrayScale()._apply_transform(rgb)
    expected = [0.2989 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6, 0.2989 * 0.5 + 0.587 * 1.0 + 0.114 * 0.0]
    assert out.shape == (1, 1, 2)
    np.testing.assert_allclose(out.flatten().numpy(), expected, rtol=1e-6)
    spec = GrayScale()._transform_spec(Bounded(shape=(3, 1, 2), dtype=torch.float32, low=0.0, high=1.0))
    assert spec.shape == (1, 1, 2) and spec.is_in(out)
    assert torch.allclose(spec.high, torch.tensor(0.2989 + 0.587 + 0.114))
    with pytest.raises(ValueError, match="channels first"):
        GrayScale()._apply_transform(torch.zeros(4, 4, 3))


def bilinear_reference(img, out_h, out_w):
    """Bilinear resampling with half-pixel centres (align_corners=False), no antialiasing, written out in numpy."""
    c, h, w = img.shape
    out = np.zeros((c, out_h, out_w), dtype=np.float64)

    def taps(dst, n_in, n_out):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    for y in range(out_h):
        y0, y1, ly = taps(y, h, out_h)
        for x in range(out_w):
            x0, x1, lx = taps(x, w, out_w)
            top = (1 - lx) * img[:, y0, x0] + lx * img[:, y0, x1]
            bottom = (1 - lx) * img[:, y1, x0] + lx * img[:, y1, x1]
            out[:, y, x] = (1 - ly) * top + ly * bottom
    return out


@pytest.mark.parametrize(("h", "w"), [(3, 4), (7, 9)])
def test_resize_matches_a_hand_written_bilinear_interpolation(h, w):
    img = np.random.default_rng(0).random((2, 5, 6))
    out = Resize(w, h)._apply_transform(torch.from_numpy(img).float()[None])[0]
    assert out.shape == (2, h, w)
    np.testing.assert_allclose(out.numpy(), bilinear_reference(img, h, w), atol=1e-5)
    spec = Resize(w, h)._transform_spec(Bounded(shape=(2, 5, 6), dtype=torch.float32, low=0.0, high=1.0))
    assert spec.shape == (2, h, w) and spec.is_in(out)
    u8 = Resize(w, h)._apply_transform((torch.from_numpy(img) * 255).to(torch.uint8))
    assert u8.dtype == torch.uint8 and u8.shape == (2, h, w)


# -- CatFrames ----------------------------------------------------------------------------------------------------
def test_catframes_on_an_env_refills_only_the_envs_that_reset():
    env = TransformedEnv(Frames(num_envs=2, length=3), Compose(ToTensorImage(), CatFrames(3, dim=-3)))
    td = env.reset()
    assert td["pixels"].shape == (2, 9, 4, 5)
    values = lambda px: (px[:, ::3, 0, 0] * 255).round().long().tolist()  # noqa: E731 (one channel per frame)
    assert values(td["pixels"]) == [[0, 0, 0], [50, 50, 50]]
    td = env.rand_action(td)
    td, root = env.step_and_maybe_reset(td)
    assert values(td["next", "pixels"]) == [[0, 0, 1], [50, 50, 51]]
    env.base_env.t[0] = 2  # env 0 ends at the next step, env 1 goes on
    td, root = env.step_and_maybe_reset(env.rand_action(root))
    assert td["next", "done"].squeeze(-1).tolist() == [True, False]
    assert values(td["next", "pixels"]) == [[0, 1, 3], [50, 51, 52]]  # the terminal stack
    assert values(root["pixels"]) == [[10, 10, 10], [50, 51, 52]]  # env 0 restarts; env 1 untouched
    td, root = env.step_and_maybe_reset(env.rand_action(root))
    assert values(td["next", "pixels"]) == [[10, 10, 11], [51, 52, 53]]
    assert_specs_hold(env, td)


def chunk_of(obs, next_obs, done):
    """A chunk [B, T] of scalar 'observation' frames (shape [1]) with done flags."""
    obs, next_obs, done = (torch.tensor(x) for x in (obs, next_obs, done))
    return TensorDict({"observation": obs[..., None].float(), "next": {
        "observation": next_obs[..., None].float(), "done": done[..., None], "reward": torch.ones(*done.shape, 1)}},
        batch_size=list(done.shape))


def test_catframes_on_a_chunk_never_crosses_an_episode_start():
    # env 0: episode 1,2,3 ends (next 4 is terminal), then 10, 11, 12; env 1: one episode
    chunk = chunk_of([[1, 2, 3, 10, 11, 12], [5, 6, 7, 8, 9, 10]], [[2, 3, 4, 11, 12, 13], [6, 7, 8, 9, 10, 11]],
                     [[False, False, True, False, False, False], [False] * 6])
    out = CatFrames(3, dim=-1, in_keys=["observation"])(chunk.clone())
    assert out["observation"][0].tolist() == [[1, 1, 1], [1, 1, 2], [1, 2, 3], [10, 10, 10], [10, 10, 11],
                                              [10, 11, 12]]
    assert out["next", "observation"][0].tolist() == [[1, 1, 2], [1, 2, 3], [2, 3, 4], [10, 10, 11], [10, 11, 12],
                                                      [11, 12, 13]]
    assert out["observation"][1, :3].tolist() == [[5, 5, 5], [5, 5, 6], [5, 6, 7]]


def test_catframes_forward_chunk_continues_open_episodes_across_chunks():
    obs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 10, 11, 12]]
    nxt = [[2, 3, 4, 5, 6, 7], [2, 3, 9, 11, 12, 13]]
    done = [[False] * 6, [False, False, True, False, False, False]]
    whole = CatFrames(3, dim=-1, in_keys=["observation"])(chunk_of(obs, nxt, done))
    stream = CatFrames(3, dim=-1, in_keys=["observation"])
    parts = [stream.forward_chunk(chunk_of([o[:3] for o in obs], [n[:3] for n in nxt], [d[:3] for d in done])),
             stream.forward_chunk(chunk_of([o[3:] for o in obs], [n[3:] for n in nxt], [d[3:] for d in done]))]
    joined = torch.cat(parts, dim=1)
    assert torch.equal(joined["observation"], whole["observation"])
    assert torch.equal(joined["next", "observation"], whole["next", "observation"])
    assert joined["observation"][0, 3].tolist() == [2, 3, 4]  # the history came from the first chunk


# -- ObservationNorm ----------------------------------------------------------------------------------------------
def test_observation_norm_both_conventions_specs_and_state_dict():
    x = torch.tensor([[1.0, 3.0], [5.0, -1.0]])
    affine = ObservationNorm(loc=torch.tensor([1.0, 2.0]), scale=torch.tensor([2.0, 0.5]))
    assert affine._apply_transform(x).tolist() == [[3.0, 3.5], [11.0, 1.5]]  # x * scale + loc
    standard = ObservationNorm(loc=torch.tensor([1.0, 2.0]), scale=torch.tensor([2.0, 0.5]), standard_normal=True)
    assert standard._apply_transform(x).tolist() == [[0.0, 2.0], [2.0, -6.0]]  # (x - loc) / scale
    spec = standard._transform_spec(Bounded(shape=(2,), dtype=torch.float32, low=-1.0, high=3.0))
    assert spec.low.tolist() == [-1.0, -6.0] and spec.high.tolist() == [1.0, 2.0]
    saved = standard.state_dict()
    assert set(saved) == {"loc", "scale", "standard_normal"}
    assert torch.equal(ObservationNorm(**saved)._apply_transform(x), standard._apply_transform(x))
    empty = ObservationNorm()
    empty.load_state_dict(saved)
    assert torch.equal(empty._apply_transform(x), standard._apply_transform(x))
    with pytest.raises(RuntimeError, match="init_stats"):
        ObservationNorm()._apply_transform(x)


def test_init_stats_equals_the_mean_and_std_of_the_frames_it_saw():
    norm = ObservationNorm(in_keys=["observation"])
    env = TransformedEnv(Frames(num_envs=2, length=4), Compose(DoubleToFloat(), norm))
    norm.init_stats(num_iter=7, reduce_dim=0)
    seen = norm.parent.rollout(7, break_when_any_done=False)["observation"].reshape(-1, 2)  # deterministic env
    assert seen.shape == (14, 2)
    mean, std = seen.mean(0), seen.std(0)
    torch.testing.assert_close(norm.loc, -mean / std)  # standard_normal=False: x * (1/std) - mean/std
    torch.testing.assert_close(norm.scale, 1 / std)
    out = env.rollout(7, break_when_any_done=False)["observation"].reshape(-1, 2)
    torch.testing.assert_close(out.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(0), torch.ones(2))


# -- episode transforms -------------------------------------------------------------------------------------------
def test_step_counter_and_reward_sum_follow_partial_resets():
    env = TransformedEnv(Frames(num_envs=2, length=3), Compose(StepCounter(max_steps=2), RewardSum()))
    td = env.reset()
    assert td["step_count"].tolist() == [[0], [0]] and td["episode_reward"].tolist() == [[0.0], [0.0]]
    env.base_env.t[1] = 5  # env 1's rewards: 6, 7 ...
    td, root = env.step_and_maybe_reset(env.rand_action(td))
    assert td["next", "step_count"].tolist() == [[1], [1]]
    assert td["next", "episode_reward"].tolist() == [[1.0], [6.0]]
    assert td["next", "done"].squeeze(-1).tolist() == [False, True]  # env 1 reached length 3 at t=6
    assert root["step_count"].tolist() == [[1], [0]] and root["episode_reward"].tolist() == [[1.0], [0.0]]
    td, root = env.step_and_maybe_reset(env.rand_action(root))
    assert td["next", "step_count"].tolist() == [[2], [1]]
    assert td["next", "truncated"].squeeze(-1).tolist() == [True, False]  # max_steps=2 reached by env 0
    assert td["next", "done"].squeeze(-1).tolist() == [True, False]
    assert td["next", "episode_reward"].tolist() == [[3.0], [1.0]]
    assert_specs_hold(env, td)
    assert env.observation_spec["step_count"].high.item() == 2


def test_step_counter_and_reward_sum_on_chunks():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    done = torch.tensor([[False, True, False, False], [False] * 4])
    chunk = TensorDict({"next": {"reward": rewards[..., None], "done": done[..., None]}}, batch_size=[2, 4])
    out = RewardSum()(StepCounter()(chunk))
    assert out["step_count"].squeeze(-1).tolist() == [[0, 1, 0, 1], [0, 1, 2, 3]]
    assert out["next", "step_count"].squeeze(-1).tolist() == [[1, 2, 1, 2], [1, 2, 3, 4]]
    assert out["next", "episode_reward"].squeeze(-1).tolist() == [[1, 3, 3, 7], [1, 2, 3, 4]]
    assert out["episode_reward"].squeeze(-1).tolist() == [[0, 1, 0, 3], [0, 1, 2, 3]]
    stream = RewardSum()
    stream.forward_chunk(chunk[:, :2].clone())
    second = stream.forward_chunk(chunk[:, 2:].clone())
    assert second["next", "episode_reward"].squeeze(-1).tolist() == [[3, 7], [3, 4]]  # env 1 carried over


def test_step_counter_max_steps_sets_gymnasiums_own_time_limit():
    env = TransformedEnv(GymEnv("CartPole-v1", backend="sync", seed=0), StepCounter(max_steps=5))
    assert env.base_env.wrappers == (StepLimit(5),)
    td = env.reset()
    for step in range(1, 6):  # CartPole cannot fall within 5 steps
        td, root = env.step_and_maybe_reset(env.rand_action(td))
        assert td["next", "step_count"].item() == step
        td = root
    assert td["step_count"].item() == 0 and (td["observation"].abs() <= 0.05).all()  # gymnasium really reset
    flags = env.rollout(5, break_when_any_done=False)["next", "truncated"].squeeze().tolist()
    assert flags == [False, False, False, False, True]
    env.close()


def test_reward_scaling_double_to_float_and_cat_tensors():
    env = TransformedEnv(Frames(num_envs=2), Compose(
        RewardScaling(loc=1.0, scale=0.5), DoubleToFloat(),
        CatTensors(["observation", "episode_len"], out_key="vector"),
    ))
    env.insert_transform(2, StepCounter(step_count_key="episode_len"))
    assert isinstance(env.transform[2], StepCounter) and isinstance(env.transform[-1], CatTensors)
    td = env.rollout(2)
    assert td["next", "reward"].squeeze(-1).tolist() == [[1.5, 2.0], [1.5, 2.0]]  # t * 0.5 + 1
    assert td["vector"].dtype == torch.float32 and "observation" not in td.keys()
    assert td["next", "vector"][1, 1].tolist() == [1.0, 2.0, 2.0]  # [env, t] and the step count
    assert env.observation_spec["vector"].shape == (3,)
    assert env.observation_spec["vector"].dtype == torch.float32 and env.reward_spec.is_in(td["next", "reward"])
    assert_specs_hold(env, td)


def test_frame_skip_and_noop_reset_configure_the_gym_envs():
    env = TransformedEnv(GymEnv("CartPole-v1", num_envs=2, backend="sync", seed=3), Compose(NoopResetEnv(5),
                                                                                           FrameSkip(2)))
    assert env.base_env.wrappers == (NoopReset(5), SkipFrames(2))  # innermost first, in the order they joined
    plain = GymEnv("CartPole-v1", num_envs=2, backend="sync", seed=3)
    assert not torch.equal(env.reset()["observation"], plain.reset()["observation"])  # no-ops moved the cart
    td = env.rand_step(env.reset())
    assert td["next", "reward"].squeeze(-1).tolist() == [2.0, 2.0]  # two frames per step
    plain.close()
    env.close()
    opened = GymEnv("CartPole-v1", backend="sync")
    opened.reset()
    with pytest.raises(EnvError, match="already open"):
        TransformedEnv(opened, FrameSkip(2))
    opened.close()
    with pytest.raises(EnvError, match="inside a GymEnv"):
        TransformedEnv(Frames(), NoopResetEnv(3))


# -- the pixel stack, the stage, the video -------------------------------------------------------------------------
def test_full_pixel_stack_on_cartpole_matches_its_specs_and_its_stats():
    norm = ObservationNorm(in_keys=["pixels"], standard_normal=True)
    env = TransformedEnv(GymEnv("CartPole-v1", num_envs=2, from_pixels=True, backend="sync", seed=0), Compose(
        ToTensorImage(), GrayScale(), Resize(64, 64), CatFrames(4, dim=-3), norm))
    env.append_transform(StepCounter())
    env.append_transform(RewardScaling(loc=0.0, scale=0.1))
    torch.manual_seed(0)
    env.transform[4].init_stats(num_iter=6, reduce_dim=[-1, -2, -4], keep_dims=(-1, -2))
    assert norm.loc.shape == (4, 1, 1)
    torch.manual_seed(0)
    seen = norm.parent.rollout(6, break_when_any_done=False)["pixels"]  # the same seeds: the same frames
    assert seen.shape == (2, 6, 4, 64, 64)
    flat = seen.reshape(-1, 4, 64, 64)
    torch.testing.assert_close(norm.loc, flat.mean(dim=(0, 2, 3), keepdim=True)[0])
    torch.testing.assert_close(norm.scale, flat.std(dim=(0, 2, 3), keepdim=True)[0])
    td = env.rollout(4, break_when_any_done=False)
    assert td["pixels"].shape == (2, 4, 4, 64, 64) and td["next", "reward"].max() == 0.1
    assert_specs_hold(env, td)
    check_env_specs(env)
    env.close()


def test_transform_stage_transforms_a_stream_of_chunks(tmp_path):
    done = torch.zeros(2, 3, 1, dtype=torch.bool)
    done[0, 1] = True
    chunks = [TensorDict({"observation": torch.full((2, 3, 1), float(3 * i)) + torch.arange(3.0)[:, None],
                          "next": {"observation": torch.full((2, 3, 1), float(3 * i + 1)) + torch.arange(3.0)[:, None],
                                   "reward": torch.ones(2, 3, 1), "done": done}}, batch_size=[2, 3])
              for i in range(2)]
    p = Pipeline("frames")
    sink = Collect("sink")
    stage = TransformStage("frames", Compose(CatFrames(2, dim=-1, in_keys=["observation"]), RewardSum()))
    p.add(ListSource("src", chunks), stage, sink)
    p.connect("src.items", "frames.chunks").connect("frames.chunks", "sink.items")
    streamrl.run(p, tmp_path, handle_signals=False)
    assert len(sink.items) == 2 and "observation" in chunks[0].keys() and chunks[0]["observation"].shape[-1] == 1
    second = sink.items[1]
    assert second["observation"][1, 0].tolist() == [2.0, 3.0]  # env 1's episode continued from chunk 0
    assert sink.items[0]["observation"][0, 2].tolist() == [2.0, 2.0]  # env 0 restarted after its done row
    assert second["observation"][0].tolist() == [[2.0, 3.0], [3.0, 4.0], [5.0, 5.0]]
    assert second["next", "episode_reward"][1].squeeze(-1).tolist() == [4.0, 5.0, 6.0]


def test_video_recorder_writes_a_gif_of_env_0(tmp_path):
    recorder = VideoRecorder(in_key="pixels", path=tmp_path / "clip.gif", fps=10)
    env = TransformedEnv(Frames(num_envs=2, length=10), recorder)
    env.rollout(5)
    assert len(recorder.frames) == 6  # the reset frame and five steps
    env.close()  # dumps
    with Image.open(tmp_path / "clip.gif") as gif:
        assert gif.n_frames == 6 and gif.size == (5, 4)
        assert gif.info["duration"] == 100
    assert recorder.frames == []
    with pytest.raises(ValueError, match=".gif"):
        recorder.dump(tmp_path / "clip.mp4")


def test_evaluate_hook_writes_the_recorded_rollout_into_the_run_dir(tmp_path):
    policy = TensorDictModule(lambda obs: torch.zeros(obs.shape[0], dtype=torch.int64), ["observation"], ["action"])
    env = TransformedEnv(Frames(num_envs=2, length=4), Compose(ToTensorImage(), VideoRecorder(episodes=1)))
    hook = Evaluate(env, policy, every_frames=10, episodes=2)
    hook.run = RunContext(tmp_path, bus=EventBus(), device=torch.device("cpu"), seed=0, pipeline=streamrl.Pipeline(),
                          recorder=RunRecorder())
    data = anyio.run(hook.evaluate_now, 40)
    assert data["videos"] == [str(tmp_path / "eval_40.gif")]
    with Image.open(tmp_path / "eval_40.gif") as gif:
        assert gif.n_frames == 5  # env 0's first episode: the reset frame and its four steps
