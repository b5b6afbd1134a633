"""Env adapter + chunk builder: auto-reset semantics, terminated vs truncated, episode bookkeeping."""

import numpy as np
import pytest
import torch

from streamrl import GymEnv
from streamrl.envs.chunks import ChunkBuilder

X_LIMIT, THETA_LIMIT = 2.4, 12 * 2 * np.pi / 360


def collect(env: GymEnv, chunks: int, steps: int = 16, seed: int = 0):
    first = env.reset_arrays(seed=seed)
    builder = ChunkBuilder(env.num_envs, steps, first, drops_rows=env.autoreset == "next_step")
    out, episodes = [], []
    t = 0
    while len(out) < chunks:
        # alternate pushes: the pole stays up long enough to be truncated at max_episode_steps
        action = np.full(env.num_envs, t % 2, dtype=np.int64)
        builder.version = len(out)
        builder.add_step(action, env.step_arrays(action))
        t += 1
        if builder.ready:
            chunk, eps = builder.emit()
            out.append(chunk)
            episodes.append(eps)
    env.close()
    return torch.cat(out, dim=1), episodes


@pytest.mark.parametrize("backend", ["native", "sync"])
def test_terminal_observation_is_in_next_and_reset_observation_starts_the_next_row(backend):
    env = GymEnv("CartPole-v1", num_envs=4, backend=backend, max_episode_steps=30)
    data, _ = collect(env, chunks=12)
    valid = data.get("valid", torch.ones(data.shape, dtype=torch.bool))
    obs, nxt = data["observation"], data["next", "observation"]
    term, trunc = data["next", "terminated"].squeeze(-1), data["next", "truncated"].squeeze(-1)
    assert term.any() and trunc.any(), "the test needs both kinds of episode end"
    assert (trunc & ~term).any()  # kept apart: time-limit ends that are not failures exist
    for e in range(data.shape[0]):
        rows = torch.nonzero(valid[e]).squeeze(-1).tolist()
        for a, b in zip(rows, rows[1:], strict=False):
            if term[e, a] or trunc[e, a]:
                # the next real row starts from a reset observation, not from the terminal one
                assert obs[e, b].abs().max() <= 0.05
                assert not torch.equal(obs[e, b], nxt[e, a])
            else:
                assert torch.equal(obs[e, b], nxt[e, a])  # consecutive transitions chain
        for a in rows:
            out_of_bounds = bool(nxt[e, a, 0].abs() > X_LIMIT or nxt[e, a, 2].abs() > THETA_LIMIT)
            assert out_of_bounds == bool(term[e, a]), "next.observation at a terminated row is the terminal one"
    if backend == "native":  # next-step auto-reset: exactly one dropped row follows each episode end
        ends = (term | trunc) & valid
        assert (~valid).sum() == ends[:, :-1].sum()
    else:
        assert "valid" not in data.keys()


@pytest.mark.parametrize("backend", ["native", "sync"])
def test_episode_bookkeeping_matches_the_rows(backend):
    env = GymEnv("CartPole-v1", num_envs=3, backend=backend, max_episode_steps=25)
    data, episodes = collect(env, chunks=10, steps=8)
    valid = data.get("valid", torch.ones(data.shape, dtype=torch.bool))
    rows = data[valid]
    returns = [r for eps in episodes for r in eps["episode_returns"]]
    lengths = [n for eps in episodes for n in eps["episode_lengths"]]
    done = rows["next", "done"].squeeze(-1)
    ended_ids = rows["traj_id"][done].tolist()
    assert len(ended_ids) == len(returns) == len(lengths) > 0
    assert len(set(ended_ids)) == len(ended_ids)  # one id per episode
    for traj in ended_ids:
        mask = rows["traj_id"] == traj
        steps = rows["step_count"][mask]
        assert steps.tolist() == list(range(int(mask.sum())))
        total = float(rows["next", "reward"][mask].sum())
        assert total in returns
    assert sorted(lengths) == sorted(int((rows["traj_id"] == t).sum()) for t in ended_ids)


def test_specs_come_from_the_gymnasium_spaces():
    env = GymEnv("CartPole-v1", num_envs=2)
    obs = env.observation_spec["observation"]
    assert obs.shape == (4,) and obs.dtype == torch.float32
    action = env.action_spec
    assert action.n == 2 and action.is_in(action.rand((5,)))
    env.close()


def test_step_before_reset_says_what_to_do():
    env = GymEnv("CartPole-v1", num_envs=2)
    env.open()
    with pytest.raises(Exception, match="call env.reset"):
        env.step_arrays(np.zeros(2, dtype=np.int64))
    env.close()
