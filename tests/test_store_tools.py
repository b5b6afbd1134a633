"""Store tools: inspect, check, sample, export/import and plot a replay store, as functions and through the CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from tensordict import TensorDict

from streamrl import GymEnv, ZarrStorage
from streamrl.cli import main
from streamrl.envs.chunks import ChunkBuilder
from streamrl.errors import ConfigError, StoreError
from streamrl.replay.store_tools import (
    check_store,
    episode_stats,
    export_store,
    import_store,
    inspect_store,
    plot_store,
    sample_store,
)

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (3, 7, 5, 11, 4)  # episode lengths, repeating every 30 rows
STARTS = np.cumsum((0, *LENGTHS[:-1]))
PERIOD = sum(LENGTHS)


def reward_of(row):
    return ((row * 37) % 11) / 4 - 1  # quarters: exact in float32


def episodic_rows(start, n):
    """Rows ``start .. start + n - 1`` as functions of their row number: episodes of LENGTHS one after another."""
    r = np.arange(start, start + n)
    period, offset = np.divmod(r, PERIOD)
    k = np.searchsorted(STARTS, offset, side="right") - 1
    step = offset - STARTS[k]
    done = step == np.array(LENGTHS)[k] - 1
    t = torch.from_numpy
    return TensorDict({
        "observation": t(np.stack([r, -r, r / 7], axis=1).astype(np.float32)),
        "action": t(r % 2),
        "step_count": t(step),
        "traj_id": t(period * len(LENGTHS) + k),
        "policy_version": t(r // 50),
        "next": {"observation": t(np.stack([r + 1, -r - 1, (r + 1) / 7], axis=1).astype(np.float32)),
                 "reward": t(np.array([reward_of(x) for x in r], dtype=np.float32)[:, None]),
                 "done": t(done[:, None]), "terminated": t((done & (k % 2 == 0))[:, None]),
                 "truncated": t((done & (k % 2 == 1))[:, None])},
    }, batch_size=[n])


def hand_episodes(lo, hi):
    """Returns of the episodes wholly inside rows lo .. hi - 1, and the count of those it cuts, one by one."""
    returns, cut = [], 0
    for period in range(hi // PERIOD + 1):
        for first, length in zip(STARTS + period * PERIOD, LENGTHS, strict=True):
            last = first + length - 1
            if lo <= first and last < hi:
                returns.append(sum(reward_of(r) for r in range(first, last + 1)))
            elif first < hi and last >= lo:
                cut += 1
    return returns, cut


def make_store(path, *, capacity, block_rows, total, piece=13):
    store = ZarrStorage(capacity, path=path, block_rows=block_rows)
    for start in range(0, total, piece):
        store.extend(episodic_rows(start, min(piece, total - start)))
        store.flush()
    store.close()
    return path


@pytest.fixture
def wrapped(tmp_path):
    """137 rows written into a ring of 50 in blocks of 8: rows 87 .. 136 held, the ring wrapped twice."""
    return make_store(tmp_path / "wrapped.zarr", capacity=50, block_rows=8, total=137)


def plain_rows(path):
    """The committed rows, oldest first, read with zarr and numpy only (as the zarr_store docstring shows)."""
    g = zarr.open_group(str(path), mode="r")
    c = g.attrs["committed"]
    slots = np.arange(c["rows"] - c["size"], c["rows"]) % c["disk_rows"]
    return {key: g[key][:][slots] for key in g.attrs["keys"]}


def cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_inspect_of_a_cartpole_store_counts_the_episodes_the_chunk_builder_reported(tmp_path):
    env = GymEnv("CartPole-v1", num_envs=2, backend="native", max_episode_steps=40)
    builder = ChunkBuilder(env.num_envs, 16, env.reset_arrays(seed=0), drops_rows=env.autoreset == "next_step")
    store = ZarrStorage(4096, path=tmp_path / "cartpole.zarr", block_rows=64)
    rng = np.random.default_rng(0)
    returns, lengths, written = [], [], 0
    while written < 600:
        builder.add_step(rng.integers(0, 2, env.num_envs), env.step_arrays(rng.integers(0, 2, env.num_envs)))
        if builder.ready:
            chunk, episodes = builder.emit()
            rows = chunk.reshape(-1)
            rows = rows.exclude("valid")[rows["valid"]]  # what ReplayBuffer.extend stores
            written += len(store.extend(rows))
            store.flush()
            returns += episodes["episode_returns"]
            lengths += episodes["episode_lengths"]
    env.close()
    store.close()
    info = inspect_store(tmp_path / "cartpole.zarr")
    assert info["rows_written"] == info["rows_held"] == written and info["oldest_row"] == 0
    episodes = info["episodes"]
    assert episodes["complete"] == len(returns) > 10
    assert episodes["return"]["mean"] == pytest.approx(np.mean(returns))
    assert episodes["length"]["max"] == max(lengths) and episodes["length"]["min"] == min(lengths)
    assert episodes["incomplete"] <= env.num_envs  # the episodes still running
    assert check_store(tmp_path / "cartpole.zarr") == []


def test_inspect_of_a_wrapped_ring_matches_a_hand_computation(wrapped):
    info = inspect_store(wrapped)
    assert (info["capacity"], info["block_rows"], info["disk_rows"]) == (50, 8, 64)
    assert (info["rows_written"], info["rows_held"], info["oldest_row"]) == (137, 50, 87)
    returns, cut = hand_episodes(87, 137)
    assert info["episodes"]["complete"] == len(returns) and info["episodes"]["incomplete"] == cut == 2
    assert info["episodes"]["return"]["mean"] == pytest.approx(np.mean(returns))
    assert info["episodes"]["return"]["max"] == pytest.approx(max(returns))
    keys = {k["key"]: k for k in info["keys"]}
    assert sorted(keys) == sorted(zarr.open_group(str(wrapped), mode="r").attrs["keys"])
    obs = keys["observation"]
    assert obs["shape"] == [64, 3] and obs["chunks"] == [8, 3] and obs["dtype"] == "float32"
    assert obs["codec"] == "bytes(endian=little)"
    chunk_files = list((wrapped / "observation" / "c").rglob("*"))
    chunk_bytes = sum(f.stat().st_size for f in chunk_files if f.is_file())
    assert chunk_bytes == 8 * 8 * 3 * 4  # all 8 blocks written, 8 rows of 3 float32 each
    assert obs["bytes_on_disk"] == chunk_bytes + (wrapped / "observation" / "zarr.json").stat().st_size
    assert info["bytes_on_disk"] > sum(k["bytes_on_disk"] for k in info["keys"])  # plus the group's zarr.json


def test_episode_stats_count_only_episodes_that_start_at_step_0_and_end_done():
    traj_id = np.array([7, 7, 8, 8, 8, 9, 7, 9])
    step_count = np.array([4, 5, 0, 1, 2, 0, 0, 1])  # traj 7 cut by the ring, then restarted at 0 (a resume)
    done = np.array([0, 0, 0, 0, 1, 0, 0, 1], dtype=bool)
    reward = np.array([1.0, 1.0, 0.5, 0.5, 2.0, 1.0, 3.0, -1.0])
    stats = episode_stats(traj_id, step_count, done, reward)
    assert stats.returns.tolist() == [3.0, 0.0] and stats.lengths.tolist() == [3, 2]
    assert stats.incomplete == 2  # traj 7 cut by the ring, and traj 7 again, still running


def test_check_passes_a_clean_store_and_exits_0(wrapped, capsys):
    assert check_store(wrapped) == []
    code, out, _ = cli(capsys, "store", "check", str(wrapped))
    assert code == 0 and out.strip() == f"{wrapped}: ok"


def test_check_accepts_a_resumed_writer_that_numbers_trajectories_from_0_again(tmp_path):
    path = tmp_path / "resumed.zarr"
    store = ZarrStorage(100, path=path, block_rows=8)
    store.extend(episodic_rows(0, 37))  # killed in the middle of the episode of rows 33 .. 39
    store.extend(episodic_rows(0, 30))  # the resumed run: traj_id and step_count from 0 again
    store.close()
    assert check_store(path) == []
    info = inspect_store(path)["episodes"]
    assert info["complete"] == len(hand_episodes(0, 37)[0]) + len(hand_episodes(0, 30)[0]) == 11
    assert info["incomplete"] == 1


def _set(path, key, row, value):
    """Write ``value`` into the committed row ``row`` of ``key`` behind the store's back."""
    g = zarr.open_group(str(path), mode="r+")
    g[key][row % g.attrs["committed"]["disk_rows"]] = value


def _nan(path):
    _set(path, "observation", 100, [0.0, np.nan, 1.0])


def _step_count(path):
    _set(path, "step_count", 102, 9)  # row 102 is step 2 of the episode of rows 100 .. 104


def _done(path):
    _set(path, "next/done", 100, [True])


def _missing_chunk(path):
    (path / "next" / "reward" / "c" / "3" / "0").unlink()  # disk slots 24 .. 31: rows 88 .. 95


@pytest.mark.parametrize(("damage", "where", "message", "rows"), [
    (_nan, "observation", "NaN or inf in a committed row (1 row)", "at row 100"),
    (_step_count, "step_count", "expected step_count to grow by 1", "at rows 102, 103"),
    (_done, "next/done", "done on a row that is not the last of its episode", "at row 100"),
    (_missing_chunk, "next/reward", "chunk file next/reward/c/3/0 is missing", "at rows 88, 89, 90"),
])
def test_check_names_the_problem_key_and_rows_and_exits_1(wrapped, capsys, damage, where, message, rows):
    damage(wrapped)
    problems = check_store(wrapped)
    matching = [p for p in problems if p.where == where and message in p.message]
    assert matching and not matching[0].warning, problems
    assert rows in str(matching[0])
    code, out, _ = cli(capsys, "store", "check", str(wrapped))
    assert code == 1 and f"error: {where}: " in out and rows in out


def test_a_done_that_disagrees_with_terminated_and_truncated_is_named(wrapped):
    _set(wrapped, "next/terminated", 101, [True])  # step 1 of the episode of rows 100 .. 104, not done
    [problem] = check_store(wrapped)
    assert problem.where == "next/done" and problem.rows == (101,)
    assert problem.message == "expected done == terminated | truncated (1 row)"


def test_check_names_a_committed_cursor_ahead_of_the_chunk_files(tmp_path, capsys):
    path = make_store(tmp_path / "short.zarr", capacity=200, block_rows=8, total=100)  # blocks 0 .. 12 on disk
    g = zarr.open_group(str(path), mode="r+")
    g.attrs["committed"] = {**g.attrs["committed"], "rows": 120, "size": 120}
    problems = check_store(path)
    assert {p.where for p in problems} == set(g.attrs["keys"])
    assert all("is missing: the committed cursor is ahead of the data" in p.message for p in problems)
    assert {p.rows[0] for p in problems} == {104, 112}  # blocks 13 and 14
    with pytest.raises(StoreError, match="cannot read .* the committed cursor is ahead"):
        inspect_store(path)
    code, out, _ = cli(capsys, "store", "check", str(path))
    assert code == 1 and "error: traj_id: chunk file traj_id/c/13 is missing" in out


def test_check_names_attrs_that_disagree_with_the_arrays(wrapped, tmp_path):
    g = zarr.open_group(str(wrapped), mode="r+")
    g.attrs["committed"] = {**g.attrs["committed"], "size": 51}  # 49 would be a repaired store's: fine
    [problem] = check_store(wrapped)
    assert problem.where == "committed" and "size <= min(rows, capacity)" in problem.message
    other = make_store(tmp_path / "other.zarr", capacity=50, block_rows=8, total=60)
    shutil.rmtree(other / "action")
    zarr.open_group(str(other), mode="r+").create_array("extra", shape=(4,), dtype="int64")
    problems = {p.where: p for p in check_store(other)}
    assert problems.keys() == {"action", "extra"}
    assert not problems["action"].warning and "listed in attrs['keys'] but no array" in problems["action"].message
    assert problems["extra"].warning and "not listed in attrs['keys']" in problems["extra"].message


def test_partial_leftovers_are_warnings_and_exit_0(wrapped, capsys):
    (wrapped / "observation" / "c" / "2" / "0.4242.partial").write_bytes(b"torn")
    [problem] = check_store(wrapped)
    assert problem.warning and problem.where == "observation/c/2/0.4242.partial"
    code, out, _ = cli(capsys, "store", "check", str(wrapped))
    assert code == 0 and "warning: observation/c/2/0.4242.partial" in out and "0 error(s), 1 warning(s)" in out


def test_a_path_that_is_not_a_store_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(StoreError, match="is not a replay store .* give the directory of a store"):
        check_store(tmp_path)
    code, _, err = cli(capsys, "store", "inspect", str(tmp_path / "nowhere.zarr"))
    assert code == 2 and "is not a replay store" in err


def test_sample_prints_k_distinct_rows_of_the_store(wrapped, capsys):
    rows, columns = sample_store(wrapped, 4, seed=3)
    assert len(set(rows.tolist())) == 4 and all(87 <= r < 137 for r in rows)
    plain = plain_rows(wrapped)
    for key, column in columns.items():
        assert np.array_equal(column, plain[key][rows - 87]), key
    assert len(sample_store(wrapped, 500)[0]) == 50  # at most the rows held
    code, out, _ = cli(capsys, "store", "sample", str(wrapped), "-n", "3", "--seed", "1")
    headers = [line for line in out.splitlines() if line.startswith("row ")]
    assert code == 0 and len(headers) == 3
    lines = out.splitlines()
    first = int(lines[0].split()[1])
    printed = dict(line.split(maxsplit=1) for line in lines[1:lines.index(headers[1])])
    assert sorted(printed) == sorted(plain)
    assert printed["step_count"] == str(plain["step_count"][first - 87])
    assert printed["next/reward"] == f"[{plain['next/reward'][first - 87][0]}]"
    assert cli(capsys, "store", "sample", str(wrapped), "-n", "3", "--seed", "1")[1] == out  # the seed fixes them
    with pytest.raises(ConfigError, match="n >= 1"):
        sample_store(wrapped, 0)


def test_export_then_import_gives_the_same_rows(wrapped, tmp_path, capsys):
    npz = export_store(wrapped, tmp_path / "rows.npz")
    plain = plain_rows(wrapped)
    with np.load(npz) as data:
        assert sorted(data.files) == sorted([*plain, "attrs.json"])
        for key, column in plain.items():
            assert np.array_equal(data[key], column), key
        assert json.loads(str(data["attrs.json"])) == dict(zarr.open_group(str(wrapped), mode="r").attrs)
    code, out, _ = cli(capsys, "store", "import", str(npz), "--to", str(tmp_path / "copy.zarr"), "--block-rows", "16")
    assert code == 0 and "50 rows written, 50 held (capacity 50, blocks of 16)" in out
    copy = ZarrStorage.open(tmp_path / "copy.zarr", in_ram=False, writable=False)
    assert copy.block_rows == 16
    for key, column in plain_rows(tmp_path / "copy.zarr").items():
        assert np.array_equal(column, plain[key]), key
    assert check_store(tmp_path / "copy.zarr") == []
    small = import_store(npz, tmp_path / "small.zarr", capacity=20)
    assert len(small) == 20 and np.array_equal(plain_rows(tmp_path / "small.zarr")["traj_id"], plain["traj_id"][-20:])
    with pytest.raises(ConfigError, match="already exists"):
        import_store(npz, tmp_path / "copy.zarr")


def test_import_takes_any_npz_of_equal_length_arrays_and_names_one_that_is_not(tmp_path):
    np.savez(tmp_path / "plain.npz", **{"obs": np.ones((30, 2), np.float32), "next/reward": np.arange(30.0)})
    store = import_store(tmp_path / "plain.npz", tmp_path / "plain.zarr")
    assert (store.capacity, len(store)) == (30, 30)  # without attrs: capacity = the rows
    assert np.array_equal(plain_rows(tmp_path / "plain.zarr")["next/reward"], np.arange(30.0))
    np.savez(tmp_path / "ragged.npz", a=np.ones(3), b=np.ones(4))
    with pytest.raises(StoreError, match="expected arrays with the same number of rows"):
        import_store(tmp_path / "ragged.npz", tmp_path / "ragged.zarr")


def test_a_store_killed_before_its_first_commit_holds_no_rows_and_is_clean(tmp_path, capsys):
    store = ZarrStorage(50, path=tmp_path / "empty.zarr", block_rows=8)
    store.extend(episodic_rows(0, 5))  # the group exists, no block was ever flushed
    info = inspect_store(tmp_path / "empty.zarr")
    assert info["rows_held"] == 0 and info["episodes"] == {"complete": 0, "incomplete": 0, "return": {},
                                                           "length": {}}
    assert check_store(tmp_path / "empty.zarr") == []
    with pytest.raises(StoreError, match="holds no committed rows yet"):
        sample_store(tmp_path / "empty.zarr", 3)
    code, out, _ = cli(capsys, "store", "inspect", str(tmp_path / "empty.zarr"))
    assert code == 0 and "committed  0 rows written, 0 held\n" in out and "return     -" in out


def test_plot_draws_returns_lengths_and_reward_into_a_png(wrapped, tmp_path, capsys):
    target = plot_store(wrapped)
    assert target == wrapped.with_suffix(".png") and target.stat().st_size > 10_000
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = cli(capsys, "store", "plot", str(wrapped), "--out", str(tmp_path / "s.png"))
    assert code == 0 and out.strip() == str(tmp_path / "s.png") and (tmp_path / "s.png").stat().st_size > 10_000


def test_inspect_and_check_in_a_subprocess_and_through_the_tools_script(wrapped):
    proc = subprocess.run([sys.executable, "-m", "streamrl.cli", "store", "inspect", str(wrapped)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "committed  137 rows written, 50 held (rows 87..136)" in proc.stdout
    assert "next/reward" in proc.stdout and "bytes(endian=little)" in proc.stdout
    returns, cut = hand_episodes(87, 137)
    assert f"episodes   {len(returns)} complete, {cut} incomplete" in proc.stdout
    proc = subprocess.run([sys.executable, "tools/store.py", "check", str(wrapped)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{wrapped}: ok", proc.stderr
