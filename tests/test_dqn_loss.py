"""The DQN loss against values computed by hand on a tiny batch."""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from streamrl import DQNLoss, HardUpdate, SoftUpdate


class Table(nn.Module):
    """Q-values read from a table: observation i (one-hot) -> row i."""

    def __init__(self, values):
        super().__init__()
        self.values = nn.Parameter(torch.tensor(values, dtype=torch.float32))

    def forward(self, obs):
        return obs @ self.values


def batch():
    # three transitions over states 0, 1, 2 (one-hot observations)
    eye = torch.eye(3)
    return TensorDict({
        "observation": eye[[0, 1, 2]],
        "action": torch.tensor([1, 0, 1]),
        "next": {
            "observation": eye[[1, 2, 0]],
            "reward": torch.tensor([[1.0], [0.5], [-1.0]]),
            "terminated": torch.tensor([[False], [True], [False]]),
            "truncated": torch.tensor([[False], [False], [True]]),
        },
    }, batch_size=[3])


Q_ONLINE = [[1.0, 2.0], [3.0, 0.5], [0.0, -1.0]]
Q_TARGET = [[10.0, 20.0], [0.3, 0.7], [-5.0, 4.0]]


def make_loss(**kwargs):
    loss = DQNLoss(Table(Q_ONLINE), gamma=0.9, **kwargs)
    with torch.no_grad():
        loss.target_value_net.values.copy_(torch.tensor(Q_TARGET))
    return loss


def test_double_dqn_targets_and_huber_loss_by_hand():
    out = make_loss(double_dqn=True, loss="smooth_l1")(batch())
    # chosen Q: s0,a1 -> 2.0 ; s1,a0 -> 3.0 ; s2,a1 -> -1.0
    # double DQN: a* = argmax online at s' ; value from the target
    #  t0: s'=1, online argmax = 0 -> target[1,0]=0.3 ; 1 + 0.9*0.3 = 1.27
    #  t1: terminated -> 0.5
    #  t2: truncated (bootstraps): s'=0, online argmax = 1 -> target[0,1]=20 ; -1 + 0.9*20 = 17.0
    q = torch.tensor([2.0, 3.0, -1.0])
    target = torch.tensor([1.27, 0.5, 17.0])
    diff = (q - target).abs()
    huber = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    assert out["loss"].item() == pytest.approx(huber.item(), rel=1e-6)
    assert torch.allclose(out["td_error"], diff)
    assert out["target_value"].item() == pytest.approx(target.mean().item())


def test_plain_dqn_uses_the_target_max_and_mse():
    out = make_loss(double_dqn=False, loss="l2")(batch())
    #  t0: max target[1] = 0.7 -> 1.63 ; t1: 0.5 ; t2: max target[0] = 20 -> 17.0
    q = torch.tensor([2.0, 3.0, -1.0])
    target = torch.tensor([1.63, 0.5, 17.0])
    assert out["loss"].item() == pytest.approx(((q - target) ** 2).mean().item(), rel=1e-6)


def test_one_hot_actions_and_n_step_discounts():
    one_hot = batch()
    one_hot.set("action", torch.nn.functional.one_hot(one_hot["action"], 2))
    assert make_loss()(one_hot)["loss"].item() == make_loss()(batch())["loss"].item()
    n_step = batch()
    n_step.set(("next", "gamma"), torch.tensor([[0.5], [0.9], [0.25]]))
    out = make_loss(double_dqn=True, loss="l2")(n_step)
    #  t0: 1 + 0.5*0.3 = 1.15 ; t1: terminated -> 0.5 ; t2: -1 + 0.25*20 = 4.0
    q = torch.tensor([2.0, 3.0, -1.0])
    target = torch.tensor([1.15, 0.5, 4.0])
    assert out["loss"].item() == pytest.approx(((q - target) ** 2).mean().item(), rel=1e-6)


def test_gradients_flow_to_the_online_network_only():
    loss = make_loss()
    loss(batch())["loss"].backward()
    assert loss.value_net.values.grad is not None
    assert loss.target_value_net.values.grad is None


def test_soft_and_hard_target_updates():
    loss = make_loss()
    SoftUpdate(loss, tau=0.25).step()
    expected = 0.75 * torch.tensor(Q_TARGET) + 0.25 * torch.tensor(Q_ONLINE)
    assert torch.allclose(loss.target_value_net.values, expected)
    hard = HardUpdate(loss, every=2)
    hard.step()
    assert torch.allclose(loss.target_value_net.values, expected)
    hard.step()
    assert torch.equal(loss.target_value_net.values, loss.value_net.values)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="loss must be"):
        DQNLoss(Table(Q_ONLINE), loss="huber")
    with pytest.raises(ValueError, match="tau must be in"):
        SoftUpdate(make_loss(), tau=0)
