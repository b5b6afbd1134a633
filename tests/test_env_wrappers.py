"""Per-env wrappers set on a GymEnv before it opens, observation transforms run where the envs step
(``GymEnv(worker_transform=...)``), uint8 frames scaled in the network, and the pixel DQN pipeline storing them."""

import ast
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from streamrl import (
    CatFrames,
    Compose,
    FrameNorm,
    GrayScale,
    GymEnv,
    ObservationNorm,
    Resize,
    StepCounter,
    ToTensorImage,
    TransformedEnv,
    run,
)
from streamrl.envs.wrappers import NoopReset, SkipFrames, StepLimit
from streamrl.errors import ConfigError, EnvError
from streamrl.loader import load_module

ROOT = Path(__file__).resolve().parents[1]


def frames(dtype: torch.dtype = torch.float32, size: int = 32) -> Compose:
    return Compose(ToTensorImage(dtype=dtype), GrayScale(), Resize(size, size), CatFrames(4, dim=-3))


# -- wrappers -----------------------------------------------------------------------------------------------------
def test_wrappers_run_inside_each_env_and_only_before_it_opens():
    env = GymEnv("CartPole-v1", num_envs=2, backend="sync", seed=0, wrappers=[NoopReset(3), SkipFrames(2)])
    env.add_wrapper(StepLimit(3))  # above the frame skip: it counts agent steps
    assert env.wrappers == (NoopReset(3), SkipFrames(2), StepLimit(3)) and not env.is_open
    td = env.rollout(3, break_when_any_done=False)
    assert td["next", "reward"].squeeze(-1).tolist() == [[2.0] * 3] * 2  # two frames a step
    assert td["next", "truncated"].squeeze(-1).tolist() == [[False, False, True]] * 2
    assert env.is_open
    with pytest.raises(EnvError, match="open already.*before the first reset"):
        env.add_wrapper(SkipFrames(2))
    env.close()
    auto = GymEnv("CartPole-v1", num_envs=2, wrappers=[SkipFrames(2)])  # native vector envs take no wrappers
    assert auto.open().resolved_backend == "sync"
    auto.close()
    with pytest.raises(EnvError, match="backend='native'.*'sync' or 'subprocess'"):
        GymEnv("CartPole-v1", backend="native").add_wrapper(StepLimit(10))
    with pytest.raises(ConfigError, match="skip must be >= 1"):
        SkipFrames(0)


def test_envs_never_import_transforms():
    """At run time: ``streamrl.envs`` re-exports the transforms lazily (by name), and its ``if TYPE_CHECKING:``
    block, which only type checkers run, is left out."""
    for path in (ROOT / "streamrl" / "envs").glob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                       for inner in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("streamrl.transforms") for n in names), f"{path.name} imports {names}"


# -- transforms in the env workers --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, dtype", [("subprocess", torch.float32), ("sync", torch.uint8)])
def test_the_stack_in_the_workers_gives_the_observations_of_the_stack_in_this_process(backend, dtype):
    here = TransformedEnv(GymEnv("CartPole-v1", num_envs=2, from_pixels=True, backend=backend, seed=0),
                          Compose(frames(dtype), StepCounter()))
    there = TransformedEnv(GymEnv("CartPole-v1", num_envs=2, from_pixels=True, backend=backend, seed=0,
                                  worker_transform=frames(dtype)), StepCounter())
    assert there.base_env.observation_spec["pixels"].shape == (4, 32, 32)  # what the workers hand over
    assert repr(there.observation_spec) == repr(here.observation_spec)
    torch.manual_seed(1)
    a = here.rollout(40, break_when_any_done=False)
    torch.manual_seed(1)
    b = there.rollout(40, break_when_any_done=False)
    here.close()
    there.close()
    assert a["next", "done"].any(), "the rollout should cross an episode end (CatFrames restarts its stack)"
    assert a["pixels"].dtype == b["pixels"].dtype == dtype
    for key in ("pixels", ("next", "pixels"), ("next", "done"), "step_count"):
        assert torch.equal(a[key], b[key]), key


def test_subprocess_workers_transform_frames_after_this_process_ran_torch_on_threads():
    """A worker forked from a process whose OpenMP pool ran would hang in its first parallel torch call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    done = threading.Event()
    env = GymEnv("CartPole-v1", num_envs=2, from_pixels=True, backend="subprocess", seed=0,
                 worker_transform=frames(torch.uint8))
    try:
        F.interpolate(torch.rand(8, 3, 256, 256), size=(64, 64), mode="bilinear")  # the pool runs here

        def open_and_reset():
            env.reset()
            done.set()

        threading.Thread(target=open_and_reset, daemon=True).start()
        assert done.wait(30), "the subprocess workers hung while transforming their first frames"
    finally:
        torch.set_num_threads(threads)
        if done.is_set():
            env.close()


def test_only_observation_transforms_run_in_the_workers():
    with pytest.raises(ConfigError, match="only observation transforms.*TransformedEnv"):
        GymEnv("CartPole-v1", from_pixels=True, worker_transform=Compose(ToTensorImage(), StepCounter()))
    owned = ToTensorImage()
    TransformedEnv(GymEnv("CartPole-v1", backend="sync"), owned)
    with pytest.raises(ConfigError, match="belongs to a Compose or a TransformedEnv"):
        GymEnv("CartPole-v1", worker_transform=owned)
    cold = GymEnv("Pendulum-v1", backend="sync", worker_transform=ObservationNorm(standard_normal=True))
    with pytest.raises(ConfigError, match="cannot transform the observation spec.*init_stats"):
        cold.open()
    norm = ObservationNorm(loc=torch.tensor([0.0, 0.0, 1.0]), scale=torch.tensor([1.0, 1.0, 2.0]),
                           standard_normal=True)
    warm = GymEnv("Pendulum-v1", backend="sync", seed=0, worker_transform=norm)
    raw = GymEnv("Pendulum-v1", backend="sync", seed=0)
    obs, expected = warm.reset()["observation"], raw.reset()["observation"]
    torch.testing.assert_close(obs, (expected - norm.loc) / norm.scale)
    warm.close()
    raw.close()


# -- uint8 frames -------------------------------------------------------------------------------------------------
def test_uint8_frames_keep_their_dtype_and_the_network_scales_them():
    img = torch.tensor([[[0, 0, 5], [255, 255, 255]]], dtype=torch.uint8)  # [H=1, W=2, C=3]
    chw = ToTensorImage(dtype=torch.uint8)._apply_transform(img)
    assert chw.dtype == torch.uint8 and chw.shape == (3, 1, 2)
    gray = GrayScale()._apply_transform(chw)
    assert gray.dtype == torch.uint8 and gray.flatten().tolist() == [1, 255]  # 0.57 and 254.97, rounded
    with pytest.raises(ValueError, match="keeps integer images"):
        ToTensorImage(dtype=torch.uint8)._apply_transform(img.float())
    norm = FrameNorm()
    assert norm(torch.tensor([0, 51, 255], dtype=torch.uint8)).tolist() == pytest.approx([0.0, 0.2, 1.0])
    standard = FrameNorm(loc=100.0, scale=50.0)
    assert set(standard.state_dict()) == {"loc", "scale"}  # they travel with the weights
    assert standard(torch.tensor([150], dtype=torch.uint8)).item() == 1.0


def test_the_pixel_dqn_pipeline_stores_uint8_stacks(tmp_path):
    module = load_module(ROOT / "pipelines" / "dqn_cartpole_pixels.py")
    cfg = module.Config(total_frames=64, num_envs=2, frames_per_chunk=32, min_fill=32, batch_size=4,
                        init_stats_steps=4, image_size=36, buffer_size=64, eval_every=100_000, eval_episodes=1,
                        device="cpu")
    pipeline = module.build(cfg)
    assert pipeline.stages["collect_env"].env.base_env.worker_transform is not None  # frames made in workers
    pipeline.place("collect", "in_process")
    run(pipeline, tmp_path, seed=0, device="cpu", handle_signals=False)
    stored = pipeline.stages["writer"].buffer.storage.data
    for key in ("pixels", ("next", "pixels")):
        assert stored[key].dtype == torch.uint8 and stored[key].shape[1:] == (4, 36, 36), key
    assert stored["pixels"].float().std() > 0  # real frames, not zeros
