"""Modules: networks, actors and critics, action distributions and exploration, with TorchRL's names.

::

    from streamrl.modules import MLP, EGreedyModule, QValueActor
    actor = QValueActor(MLP(out_features=2), spec=env.action_spec)    # writes action, action_value
    policy = TensorDictSequential(actor, EGreedyModule(spec=env.action_spec, annealing_frames=10_000))

    from streamrl.modules import MLP, NormalParamExtractor, ProbabilisticActor, ValueOperator
    net = TensorDictModule(nn.Sequential(MLP(2 * n_act), NormalParamExtractor()),
                           in_keys=["observation"], out_keys=["loc", "scale"])
    actor = ProbabilisticActor(net, spec=env.action_spec)             # a TanhNormal over the spec's bounds
    critic = ValueOperator(MLP(1))                                    # writes state_value

``NormalParamExtractor`` is tensordict's own (``tensordict.nn``), re-exported because every continuous-action
recipe needs it. Names are imported lazily (PEP 562): ``import streamrl.modules`` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamrl._lazy import lazy_namespace

_EXPORTS: dict[str, str] = {
    "Actor": "streamrl.modules.actors",
    "AdditiveGaussianModule": "streamrl.modules.exploration",
    "ConvNet": "streamrl.modules.nets",
    "DuelingCnnDQNet": "streamrl.modules.nets",
    "EGreedyModule": "streamrl.modules.exploration",
    "FrameNorm": "streamrl.modules.nets",
    "IndependentNormal": "streamrl.modules.distributions",
    "MLP": "streamrl.modules.nets",
    "NormalParamExtractor": "tensordict.nn",
    "OrnsteinUhlenbeckModule": "streamrl.modules.exploration",
    "ProbabilisticActor": "streamrl.modules.actors",
    "QValueActor": "streamrl.modules.actors",
    "TanhNormal": "streamrl.modules.distributions",
    "ValueOperator": "streamrl.modules.actors",
}

# For type checkers only: they read the names from these imports (at run time ``__getattr__`` imports each
# on first use), so ruff, which cannot evaluate ``__all__ = sorted(_EXPORTS)``, would call them unused.
# ruff: noqa: F401
if TYPE_CHECKING:
    from tensordict.nn import NormalParamExtractor

    from streamrl.modules.actors import Actor, ProbabilisticActor, QValueActor, ValueOperator
    from streamrl.modules.distributions import IndependentNormal, TanhNormal
    from streamrl.modules.exploration import AdditiveGaussianModule, EGreedyModule, OrnsteinUhlenbeckModule
    from streamrl.modules.nets import MLP, ConvNet, DuelingCnnDQNet, FrameNorm


__getattr__, __dir__, __all__ = lazy_namespace(__name__, _EXPORTS)
