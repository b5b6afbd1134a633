"""The namespaces TorchRL users import from: ``streamrl.envs``, ``.transforms``, ``.modules``, ``.objectives`` and
``.replay`` export their public API, lazily, and ``streamrl`` exports the union with the pipeline's own names."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import streamrl

SUBPACKAGES = ("envs", "transforms", "modules", "objectives", "replay")
NAMESPACES = ("streamrl", *(f"streamrl.{name}" for name in SUBPACKAGES))
#: Exported from here but defined elsewhere, on purpose (every continuous-action recipe needs it).
REEXPORTED = {"NormalParamExtractor": "tensordict.nn"}


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_name_in_all_resolves_and_all_is_sorted_without_duplicates(namespace):
    module = importlib.import_module(namespace)
    assert module.__all__ == sorted(set(module.__all__))
    assert dir(module) == module.__all__
    for name in module.__all__:
        value = getattr(module, name)
        assert value is getattr(importlib.import_module(module._EXPORTS[name]), name), f"{namespace}.{name}"


def test_streamrl_all_is_what_the_package_defines():
    """Every exported object is defined in streamrl, under its own name, in the module ``_EXPORTS`` names;
    tensordict's ``NormalParamExtractor`` is the one deliberate re-export."""
    foreign = {}
    for name in streamrl.__all__:
        value = getattr(streamrl, name)
        assert value.__name__ == name
        if value.__module__.split(".")[0] != "streamrl":
            foreign[name] = streamrl._EXPORTS[name]
        else:
            assert value.__module__ == streamrl._EXPORTS[name], name
    assert foreign == REEXPORTED


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_each_subpackage_name_is_the_same_object_at_the_top_level(subpackage):
    module = importlib.import_module(f"streamrl.{subpackage}")
    assert set(module.__all__) <= set(streamrl.__all__)
    for name in module.__all__:
        assert getattr(module, name) is getattr(streamrl, name), f"streamrl.{subpackage}.{name}"


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_type_checkers_see_every_exported_name(namespace):
    """The ``if TYPE_CHECKING:`` imports (what mypy and IDEs read) name exactly ``__all__``: a name added to
    ``_EXPORTS`` but not there would type-check as ``Any``."""
    module = importlib.import_module(namespace)
    tree = ast.parse(Path(module.__file__).read_text())
    guarded = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    assert len(guarded) == 1
    imported = [alias.asname or alias.name for statement in guarded[0].body for alias in statement.names]
    assert sorted(imported) == module.__all__


def test_the_imports_torchrl_tutorials_write():
    # 000 (pixels) and 003 (DDPG): transforms from the transforms namespace and from envs, as TorchRL allows
    from streamrl.envs import (
        Bounded,
        Categorical,
        CatFrames,
        Compose,
        Composite,
        GrayScale,
        GymEnv,
        GymWrapper,
        NoopResetEnv,
        ObservationNorm,
        OneHot,
        Resize,
        RewardScaling,
        StepCounter,
        ToTensorImage,
        TransformedEnv,
        Unbounded,
        check_env_specs,
        step_mdp,
    )
    from streamrl.modules import (
        MLP,
        Actor,
        ConvNet,
        DuelingCnnDQNet,
        EGreedyModule,
        NormalParamExtractor,
        ProbabilisticActor,
        QValueActor,
        TanhNormal,
        ValueOperator,
    )
    from streamrl.objectives import GAE, ClipPPOLoss, DDPGLoss, DQNLoss, HardUpdate, SoftUpdate, ValueEstimators
    from streamrl.replay import (
        MultiStep,
        PrioritizedSampler,
        RamStorage,
        RateLimiter,
        ReplayBuffer,
        SamplerWithoutReplacement,
        ZarrStorage,
    )
    from streamrl.transforms import CatTensors, DoubleToFloat
    from streamrl.transforms import Compose as TransformsCompose

    assert TransformsCompose is Compose and GymWrapper.__mro__[1] is GymEnv
    imported = [CatFrames, Compose, GrayScale, GymEnv, GymWrapper, NoopResetEnv, ObservationNorm, Resize, RewardScaling,
                StepCounter, ToTensorImage, TransformedEnv, check_env_specs, step_mdp, Bounded, Categorical, Composite,
                OneHot, Unbounded, MLP, Actor, ConvNet, DuelingCnnDQNet, EGreedyModule, NormalParamExtractor,
                ProbabilisticActor, QValueActor, TanhNormal, ValueOperator, GAE, ClipPPOLoss, DDPGLoss, DQNLoss,
                HardUpdate, SoftUpdate, ValueEstimators, MultiStep, PrioritizedSampler, RamStorage, RateLimiter,
                ReplayBuffer, SamplerWithoutReplacement, ZarrStorage, CatTensors, DoubleToFloat]
    assert [value for value in imported if getattr(streamrl, value.__name__) is not value] == []

    # 002's first lines: a transformed env built from ``streamrl.envs`` names whose specs hold
    env = TransformedEnv(GymEnv("CartPole-v1", backend="sync"), Compose(ObservationNorm(in_keys=["observation"],
                                                                                        loc=0.0, scale=1.0),
                                                                        StepCounter()))
    try:
        rollout = check_env_specs(env)
        assert "step_count" in rollout.keys() and "step_count" in step_mdp(rollout[..., 0]).keys()
    finally:
        env.close()


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_an_unknown_name_says_where_the_public_names_are(namespace):
    module = importlib.import_module(namespace)
    with pytest.raises(AttributeError, match=rf"module '{namespace}' has no attribute 'GymEnvv'; its public names "
                                             rf"are listed in {namespace}.__all__") as caught:
        module.GymEnvv  # noqa: B018
    assert caught.value.name == "GymEnvv" and caught.value.obj is module   # what "Did you mean" is computed from
    assert not hasattr(module, "SyncDataCollector")


def test_submodules_stay_importable_through_the_lazy_namespaces():
    from streamrl.envs import specs
    from streamrl.replay import samplers

    assert specs.Bounded is streamrl.envs.Bounded and samplers.UniformSampler is streamrl.replay.UniformSampler


def test_importing_the_namespaces_loads_neither_torch_nor_the_transforms_layer():
    """``import streamrl`` and every subpackage import stay cheap; ``streamrl.envs`` imports the transforms layer
    (which sits above it) only when one of the transform names is first used."""
    script = (
        "import sys\n"
        "import streamrl, streamrl.envs, streamrl.transforms, streamrl.modules, streamrl.objectives, "
        "streamrl.replay\n"
        "heavy = sorted(m for m in ('torch', 'tensordict', 'gymnasium', 'numpy') if m in sys.modules)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('streamrl.') and m.count('.') > 1)\n"
        "print(heavy, loaded)\n"
        "from streamrl.envs import GymEnv\n"
        "print('streamrl.transforms.base' in sys.modules, 'torch' in sys.modules)\n"
        "from streamrl.envs import TransformedEnv\n"
        "print('streamrl.transforms.base' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[] []", "False True", "True"]
