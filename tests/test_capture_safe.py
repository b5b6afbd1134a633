"""The learner's update can be replayed from a CUDA graph: no loss reads a device value on the host.

``forbid_host_sync`` turns every such read into an ``AssertionError`` on CPU; each loss runs its forward,
backward, gradient clipping, fused Adam step and target update inside it, on a realistic random batch.
"""

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn

from streamrl import (
    MLP,
    A2CLoss,
    Actor,
    Bounded,
    ClipPPOLoss,
    DDPGLoss,
    DQNLoss,
    ProbabilisticActor,
    QValueActor,
    SACLoss,
    SoftUpdate,
    TD3Loss,
    ValueOperator,
)
from streamrl.modules.distributions import IndependentNormal, TanhNormal
from streamrl.testing import forbid_host_sync

B = 64


# ---------------------------------------------------------------------------------------------- the tool itself

def test_forbid_host_sync_catches_every_host_read():
    x = torch.arange(6.0)
    mask = x > 2
    reads = {
        "item": lambda: x.sum().item(),
        "tolist": lambda: x.tolist(),
        "__bool__": lambda: bool(x.sum()),
        "if": lambda: 1 if (x > 1).any() else 0,
        "__float__": lambda: float(x.sum()),
        "__int__": lambda: int(x.sum()),
        "__index__": lambda: range(torch.tensor(3)),
        "cpu": lambda: x.cpu(),
        "numpy": lambda: x.numpy(),
        "torch.nonzero": lambda: torch.nonzero(x),
        "Tensor.nonzero": lambda: x.nonzero(),
        "mask get": lambda: x[mask],
        "mask get in a tuple": lambda: x.reshape(2, 3)[:, mask[:3]],
        "mask set": lambda: x.clone().__setitem__(mask, 0.0),
        "masked_select (aten)": lambda: torch.masked_select(x, mask),
        "unique (aten)": lambda: torch.unique(x),
        "repeat_interleave (aten)": lambda: x.repeat_interleave(torch.ones(6, dtype=torch.long)),
        "print": lambda: str(x.sum()),
    }
    with forbid_host_sync():
        for what, read in reads.items():
            with pytest.raises(AssertionError, match="host sync inside a captured region"):
                read()
                pytest.fail(f"{what} did not raise")
        # what stays allowed: shapes, integer and slice indexing, static-size ops, arithmetic
        assert x.shape[0] == 6 and x.numel() == 6 and x.dim() == 1
        assert x[2:4].shape == (2,) and x[torch.tensor([0, 2])].shape == (2,)
        masked = torch.where(mask, x, 0.0).sum()
        y = x.repeat_interleave(torch.full((6,), 2), output_size=12)
    assert masked.item() == 12.0 and y.shape == (12,)


def test_forbid_host_sync_restores_torch_on_exit_and_on_error():
    x = torch.arange(4.0)
    with pytest.raises(AssertionError, match="host sync"), forbid_host_sync():
        x.sum().item()
    with pytest.raises(KeyError), forbid_host_sync():
        raise KeyError("unrelated")
    assert x.sum().item() == 6.0 and bool(x.any()) and float(x[1]) == 1.0 and int(x[2]) == 2
    assert x[x > 1].tolist() == [2.0, 3.0] and torch.nonzero(x).shape == (3, 1) and x.nonzero().shape == (3, 1)
    assert torch.unique(x).shape == (4,) and x.cpu().numpy().sum() == 6.0
    assert not any(name in torch.Tensor.__dict__ for name in ("item", "__bool__", "__getitem__", "cpu"))


# ---------------------------------------------------------------------------------------------- the update

def update(loss_fn: nn.Module, batch: TensorDict, *, calls: int = 1) -> TensorDict:
    """What the learner replays: forward, backward, norm, clipping, fused Adam, target update."""
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-3, fused=True)
    updater = SoftUpdate(loss_fn, tau=0.01) if hasattr(loss_fn, "target_pairs") else None
    params = [p for p in loss_fn.parameters() if p.requires_grad]

    def step() -> TensorDict:
        optimizer.zero_grad(set_to_none=False)  # a graph keeps its gradient buffers
        out = loss_fn(batch)
        out["loss"].backward()
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm, foreach=True)
        optimizer.step()
        if updater is not None:
            updater.step()
        return out

    step()  # warm-up outside, as before a capture: optimizer state, lazy caches
    before = [p.detach().clone() for p in params]
    with forbid_host_sync():
        for _ in range(calls):
            out = step()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))  # the update did change the weights
    return out


def transitions(obs_dim: int, action: torch.Tensor, *, weight: bool = False) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    data = {
        "observation": torch.randn(B, obs_dim, generator=g),
        "action": action,
        "next": {
            "observation": torch.randn(B, obs_dim, generator=g),
            "reward": torch.randn(B, 1, generator=g),
            "terminated": torch.rand(B, 1, generator=g) < 0.1,
            "truncated": torch.rand(B, 1, generator=g) < 0.05,
        },
    }
    if weight:
        data["weight"] = torch.rand(B, generator=g) + 0.5
    return TensorDict(data, batch_size=[B])


@pytest.mark.parametrize("double_dqn", [True, False])
@pytest.mark.parametrize("weight", [False, True])
def test_dqn_update_is_capture_safe(double_dqn, weight):
    torch.manual_seed(0)
    loss_fn = DQNLoss(QValueActor(MLP(2, in_features=4, num_cells=(64, 64))), double_dqn=double_dqn)
    out = update(loss_fn, transitions(4, torch.randint(0, 2, (B,)), weight=weight))
    assert out["td_error"].shape == (B,)


SPEC = Bounded(shape=(1,), dtype=torch.float32, low=-2.0, high=2.0)


def pendulum_critic() -> ValueOperator:
    return ValueOperator(MLP(1, in_features=4, num_cells=(64, 64)), in_keys=["observation", "action"])


def pendulum_action() -> torch.Tensor:
    return torch.rand(B, 1, generator=torch.Generator().manual_seed(1)) * 4 - 2


def test_ddpg_update_is_capture_safe():
    torch.manual_seed(0)
    loss_fn = DDPGLoss(Actor(MLP(1, in_features=3, num_cells=(64, 64)), spec=SPEC), pendulum_critic())
    update(loss_fn, transitions(3, pendulum_action(), weight=True))


def test_td3_update_is_capture_safe_on_actor_and_critic_only_steps():
    torch.manual_seed(0)
    loss_fn = TD3Loss(Actor(MLP(1, in_features=3, num_cells=(64, 64)), spec=SPEC),
                      [pendulum_critic(), pendulum_critic()], action_spec=SPEC, policy_delay=2)
    update(loss_fn, transitions(3, pendulum_action()), calls=2)  # both branches of the delay


@pytest.mark.parametrize("fixed_alpha", [False, True])
def test_sac_update_is_capture_safe(fixed_alpha):
    torch.manual_seed(0)
    net = nn.Sequential(MLP(2, in_features=3, num_cells=(64, 64)), NormalParamExtractor())
    actor = ProbabilisticActor(TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]), spec=SPEC)
    loss_fn = SACLoss(actor, [pendulum_critic(), pendulum_critic()], fixed_alpha=fixed_alpha)
    out = update(loss_fn, transitions(3, pendulum_action(), weight=True))
    assert out["alpha"] > 0


def on_policy_batch(actor: ProbabilisticActor, obs_dim: int) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    batch = TensorDict({"observation": torch.randn(B, obs_dim, generator=g)}, batch_size=[B])
    with torch.no_grad():
        actor(batch)
    batch.set("advantage", torch.randn(B, 1, generator=g))
    batch.set("value_target", torch.randn(B, 1, generator=g))
    return batch.select("observation", "action", "sample_log_prob", "advantage", "value_target")


def idp_actor() -> ProbabilisticActor:
    """pipelines/ppo_inverted_double_pendulum.py: 3x256 tanh MLPs, a TanhNormal over the action spec."""
    torch.manual_seed(0)
    net = nn.Sequential(MLP(2, in_features=9, num_cells=(256,) * 3, activation=nn.Tanh), NormalParamExtractor())
    spec = Bounded(shape=(1,), dtype=torch.float32, low=-1.0, high=1.0)
    return ProbabilisticActor(TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]), spec=spec)


def cartpole_actor() -> ProbabilisticActor:
    """pipelines/ppo_cartpole.py: logits of a categorical policy."""
    torch.manual_seed(0)
    logits = TensorDictModule(MLP(2, in_features=4, num_cells=(64, 64), activation=nn.Tanh),
                              in_keys=["observation"], out_keys=["logits"])
    return ProbabilisticActor(logits, in_keys=("logits",), distribution_class=torch.distributions.Categorical)


@pytest.mark.parametrize("loss_class", [ClipPPOLoss, A2CLoss])
@pytest.mark.parametrize("policy", ["tanh_normal", "categorical"])
def test_policy_gradient_update_is_capture_safe(loss_class, policy):
    actor, obs_dim = (idp_actor(), 9) if policy == "tanh_normal" else (cartpole_actor(), 4)
    critic = ValueOperator(MLP(1, in_features=obs_dim, num_cells=(256,) * 3, activation=nn.Tanh))
    loss_fn = loss_class(actor, critic, entropy_coef=1e-4, normalize_advantage=True)
    out = update(loss_fn, on_policy_batch(actor, obs_dim))
    assert {"loss_objective", "loss_critic", "loss_entropy", "entropy"} <= set(out.keys())


def test_distributions_build_and_score_without_host_reads():
    loc, scale = torch.randn(B, 2, requires_grad=True), torch.rand(B, 2) + 0.1
    low, high = torch.tensor([-2.0, -1.0]), torch.tensor([2.0, 3.0])
    with forbid_host_sync():
        dist = TanhNormal(loc, scale, low, high)
        action, log_prob = dist.rsample_and_log_prob()
        total = log_prob.sum() + dist.log_prob(action.detach().clone()).sum() + dist.mean.sum()
        normal = IndependentNormal(loc, scale)
        total = total + normal.log_prob(normal.rsample()).sum() + normal.entropy().sum()
        total.backward()
    assert loc.grad is not None and log_prob.shape == (B,)


def test_bounds_are_checked_once_at_construction_and_seen_when_they_change():
    with pytest.raises(ValueError, match="finite bounds with low < high"):
        ProbabilisticActor(idp_actor().module[0], spec=Bounded(shape=(1,), dtype=torch.float32, low=1.0, high=1.0))
    with pytest.raises(ValueError, match="finite bounds with low < high"):  # tensors: checked when asked to
        TanhNormal(torch.zeros(2), torch.ones(2), torch.tensor(1.0), torch.tensor(1.0), validate_args=True)
    low, high = torch.tensor([-1.0]), torch.tensor([3.0])
    loc, scale = torch.zeros(4, 1), torch.ones(4, 1)
    assert torch.equal(TanhNormal(loc, scale, low, high).mode, torch.ones(4, 1))
    high.fill_(5.0)  # an in-place change (a version bump) is seen by the next distribution
    torch.testing.assert_close(TanhNormal(loc, scale, low, high).mode, torch.full((4, 1), 2.0))
    assert TanhNormal(loc.double(), scale.double(), low, high).mode.dtype == torch.float64
