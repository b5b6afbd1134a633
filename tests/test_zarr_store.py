"""The zarr store: block commits, the slack block, recovery after SIGKILL, memory-mapped reads, plain-zarr access."""

import multiprocessing
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
import zarr
from tensordict import TensorDict

from streamrl import ZarrStorage
from streamrl.errors import StoreError
from streamrl.replay.store_tools import check_store
from streamrl.replay.zarr_store import disk_rows_for


def rows(start, n):
    """Rows that carry their own write index: every column is a function of it."""
    idx = torch.arange(start, start + n)
    return TensorDict({
        "write_index": idx,
        "obs": (idx[:, None] * 10 + torch.arange(6)).to(torch.float32),
        "pixels": (idx[:, None, None] % 251).to(torch.uint8).expand(n, 4, 4).clone(),
        "next": {"done": (idx % 7 == 0)[:, None], "reward": idx[:, None].to(torch.float64) / 3},
    }, batch_size=[n])


def assert_rows_are_their_write_index(td):
    expected = rows(0, 0)  # the column functions, applied to the indices the rows claim
    idx = td["write_index"]
    expected = rows(0, int(idx.max()) + 1)[idx] if len(idx) else expected
    for key in ("obs", "pixels", ("next", "done"), ("next", "reward")):
        assert torch.equal(td[key], expected[key]), key


def held_rows(store):
    got = store.get(store.slots_in_order())
    assert got["write_index"].tolist() == list(range(store.total_written - len(store), store.total_written))
    return got


def test_rows_reopen_in_ram_and_memory_mapped_and_wrap(tmp_path):
    path = tmp_path / "s.zarr"
    s = ZarrStorage(40, path=path, block_rows=8)
    for start in range(0, 130, 13):
        s.extend(rows(start, 13))
        s.flush()
    assert s.committed_rows == 128 and len(s) == 40
    assert_rows_are_their_write_index(held_rows(s))
    s.close()  # the partial block too
    for in_ram in (True, False):
        again = ZarrStorage.open(path, in_ram=in_ram)
        assert again.total_written == 130 and len(again) == 40
        assert_rows_are_their_write_index(held_rows(again))
        shuffled = again.slots_in_order()[torch.randperm(40)]
        assert_rows_are_their_write_index(again.get(shuffled))


def test_memory_mapped_reads_see_pending_rows_and_rewritten_chunks(tmp_path):
    s = ZarrStorage(16, path=tmp_path / "m.zarr", block_rows=4, in_ram=False)
    s.extend(rows(0, 10))
    s.flush()  # 8 rows on disk, 2 pending in RAM
    assert s.committed_rows == 8
    assert_rows_are_their_write_index(held_rows(s))
    for start in range(10, 60, 5):  # wrap three times: every chunk file is replaced, maps must follow
        s.extend(rows(start, 5))
        assert_rows_are_their_write_index(held_rows(s))
        s.flush()
        assert_rows_are_their_write_index(held_rows(s))


def test_plain_zarr_and_numpy_read_the_committed_rows(tmp_path):
    path = tmp_path / "p.zarr"
    s = ZarrStorage(20, path=path, block_rows=5)
    s.extend(rows(0, 47))
    s.flush()
    g = zarr.open_group(str(path), mode="r")
    c = g.attrs["committed"]
    assert {k: c[k] for k in ("rows", "size", "disk_rows")} == {"rows": 45, "size": 20, "disk_rows": 25}
    order = np.arange(c["rows"] - c["size"], c["rows"]) % c["disk_rows"]
    assert np.array_equal(g["write_index"][:][order], np.arange(25, 45))
    assert g["next/reward"].dtype == np.float64 and g["pixels"].shape == (25, 4, 4)


def test_one_block_of_slack_keeps_the_newest_committed_rows_whole():
    assert disk_rows_for(100, 10) == 110 and disk_rows_for(101, 10) == 120 and disk_rows_for(8, 8) == 16


def test_an_interrupted_creation_is_named_and_leftovers_are_removed(tmp_path):
    g = zarr.open_group(str(tmp_path / "half.zarr"), mode="w")
    g.create_array("x", shape=(4,), dtype="int64")
    with pytest.raises(StoreError, match="creation was interrupted"):
        ZarrStorage.open(tmp_path / "half.zarr")
    s = ZarrStorage(8, path=tmp_path / "ok.zarr", block_rows=4)
    s.extend(rows(0, 4))
    s.close()
    leftover = tmp_path / "ok.zarr" / "obs" / "c" / "0" / "0.1234.partial"
    leftover.write_bytes(b"torn")
    assert len(ZarrStorage.open(tmp_path / "ok.zarr", writable=False)) == 4 and leftover.exists()
    assert len(ZarrStorage.open(tmp_path / "ok.zarr")) == 4 and not leftover.exists()


def _write_forever(path, ready, partial_share):
    """The writer a test kills: reopen the store, then append rows in random-sized chunks and flush, forever;
    ``partial_share`` of the flushes commit the incomplete block too (as the writer stage's timed commits do)."""
    store = ZarrStorage.open(path)
    rng = random.Random(os.getpid())
    ready.set()
    while True:
        store.extend(rows(store.total_written, rng.randint(1, 23)))
        store.flush(partial=rng.random() < partial_share)


@pytest.mark.parametrize(("fsync", "capacity", "block_rows", "partial_share", "min_kills"), [
    (False, 96, 16, 0.2, 20),
    (True, 96, 16, 0.2, 5),  # fsync is slow
    (False, 120, 100, 1.0, 10),  # a large block, committed partially again and again: killed mid-rewrite
])
def test_a_writer_killed_at_random_instants_leaves_a_store_whose_committed_rows_are_all_intact(
        tmp_path, fsync, capacity, block_rows, partial_share, min_kills):
    path = tmp_path / "crash.zarr"
    store = ZarrStorage(capacity, path=path, block_rows=block_rows, fsync=fsync)
    store.extend(rows(0, 5))
    store.close()
    ctx = multiprocessing.get_context("fork")  # no re-import: each kill costs milliseconds, not seconds
    rng = random.Random(0)
    committed = [5]
    kills = 0
    while kills < min_kills or committed[-1] <= capacity * 3:  # and on until the ring wrapped three times
        assert kills < 200, f"the writer barely wrote: {committed}"
        ready = ctx.Event()
        writer = ctx.Process(target=_write_forever, args=(path, ready, partial_share))
        writer.start()
        assert ready.wait(30), "the writer did not start"
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        kills += 1
        assert [p for p in check_store(path) if not p.warning] == []  # `store check` passes (exit 0)
        again = ZarrStorage.open(path)
        assert again.total_written >= committed[-1]  # a commit is never lost
        committed.append(again.total_written)
        assert_rows_are_their_write_index(held_rows(again))
        assert len(again) == min(again.total_written, capacity)
    if partial_share == 1.0:  # the kills fell inside blocks, not only between them
        assert any(c % block_rows for c in committed[1:])
