"""Store faults (issue 10): the durability bound, checkpoints that commit the store first, resuming on a store with
fewer rows than counted, relative store paths, no store written over, integrity checks and repair, no unpickling,
and a full disk. Each test injects the fault: kill -9, a deleted, truncated or edited file, a crafted .npz, ENOSPC
from a patched write and from a real 2 MiB tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch
import zarr
from tensordict import TensorDict

import streamrl.execution.main as runtime
from streamrl import Checkpoint, Pipeline, ReplayBuffer, ZarrStorage
from streamrl.cli import main
from streamrl.errors import StageFailed, StoreDiskFull, StoreError
from streamrl.events import Event, Hook
from streamrl.replay.ratelimit import RateLimiter
from streamrl.replay.samplers import FifoSampler, UniformSampler
from streamrl.replay.store_tools import check_store, import_store, repair_store
from streamrl.stages.base import Stage, StageContext
from streamrl.stages.replay import WriterStage

ROOT = Path(__file__).resolve().parents[1]
DQN = str(ROOT / "pipelines" / "dqn_cartpole.py")


def numbered(start: int, n: int, width: int = 3) -> TensorDict:
    """Rows that carry their row number: every column is a function of it."""
    row = torch.arange(start, start + n)
    return TensorDict({"row": row, "obs": row[:, None].float() + torch.arange(width) / 10,
                       "next": {"done": (row % 5 == 4)[:, None]}}, batch_size=[n])


def assert_rows_are_numbered(store: ZarrStorage) -> None:
    """The store holds rows ``total_written - len .. total_written - 1``, each whole."""
    got = store.get(store.slots_in_order())
    first = store.total_written - len(store)
    expected = numbered(first, len(store), got["obs"].shape[-1])
    for key in ("row", "obs", ("next", "done")):
        assert torch.equal(got[key], expected[key]), key


def committed_on_disk(path: Path) -> int:
    return zarr.open_group(str(path), mode="r").attrs["committed"]["rows"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


class RowSource(Stage):
    """Sends ``chunks`` chunks of ``rows`` numbered rows, ``delay`` s apart, publishing ``chunk`` events; with
    ``log``, appends ``<time> <rows sent>`` to that file after each send."""

    outputs = ("chunks",)
    source = True

    def __init__(self, name: str, *, chunks: int, rows: int = 8, delay: float = 0.0, log: Path | None = None):
        super().__init__(name)
        self.chunks, self.rows, self.delay, self.log = chunks, rows, delay, log
        self.frames = 0

    async def run(self, ctx: StageContext) -> None:
        out = ctx.output("chunks")
        for _ in range(self.chunks):
            if ctx.stopping:
                return
            await out.send(numbered(self.frames, self.rows))
            self.frames += self.rows
            if self.log is not None:
                with self.log.open("a") as f:
                    f.write(f"{time.time()} {self.frames}\n")
            await ctx.publish("chunk", frames=self.frames)
            if self.delay:
                await anyio.sleep(self.delay)

    def state_dict(self) -> dict:
        return {"frames": self.frames}

    def load_state_dict(self, state: dict) -> None:
        self.frames = state["frames"]


def writer_pipeline(source: RowSource, storage: ZarrStorage, *hooks: Hook) -> Pipeline:
    p = Pipeline("rows")
    p.add(source, WriterStage("writer", ReplayBuffer(storage, batch_size=4)))
    p.connect("src.chunks", "writer.chunks")
    for hook in hooks:
        p.add_hook(hook)
    return p


# -- 1. durability bound -----------------------------------------------------------------------------------------
def test_pending_rows_fall_due_after_commit_every_s_and_a_partial_commit_keeps_them(tmp_path):
    store = ZarrStorage(1000, path=tmp_path / "s.zarr", block_rows=512, commit_every_s=0.05)
    assert store.seconds_to_commit() == 0.05 and not store.commit_due()  # nothing pending
    store.extend(numbered(0, 10))
    assert not store.commit_due() and store.flush() == 0  # a whole-block flush leaves the partial block
    time.sleep(0.06)
    assert store.commit_due() and store.flush(partial=True) == 10 and not store.commit_due()
    assert committed_on_disk(tmp_path / "s.zarr") == 10
    store.extend(numbered(10, 5))
    time.sleep(0.06)
    store.flush(partial=store.commit_due())  # the same block again: its committed rows are rewritten unchanged
    reopened = ZarrStorage.open(tmp_path / "s.zarr")
    assert reopened.total_written == 15
    assert_rows_are_numbered(reopened)


def test_after_a_whole_block_flush_the_commit_clock_starts_with_the_oldest_row_left_pending(tmp_path):
    """Rows a whole-block flush committed no longer age the rows left after them (an early partial commit is a
    rewrite of the block's files for nothing)."""
    store = ZarrStorage(1000, path=tmp_path / "s.zarr", block_rows=16, commit_every_s=0.3)
    store.extend(numbered(0, 10))
    time.sleep(0.2)
    store.extend(numbered(10, 10))  # 20 rows: one whole block of 16, 4 pending that came just now
    assert store.flush() == 16
    assert store.seconds_to_commit() > 0.25 and not store.commit_due()


def test_a_chunk_mapped_while_its_files_are_being_replaced_is_read_but_never_kept(tmp_path):
    """in_ram=False: maps of chunk files that a flush thread replaced meanwhile would serve stale rows later."""
    store = ZarrStorage(64, path=tmp_path / "s.zarr", block_rows=16, in_ram=False, commit_every_s=60)
    store.extend(numbered(0, 10))
    store.flush(partial=True)
    store._rewrites[0] = store._rewrites.get(0, 0) + 1  # as _write_block does while it replaces chunk 0's files
    assert store.get(torch.arange(10)).get("row").tolist() == list(range(10)) and 0 not in store._maps
    store._rewrites[0] += 1  # the rewrite ended
    store.get(torch.arange(10))
    assert 0 in store._maps


def test_an_idle_writer_commits_its_partial_block_on_time(tmp_path):
    """A block of 4096 rows never fills here: before timed commits nothing was on disk until the end."""
    path = tmp_path / "run" / "replay.zarr"
    seen = []

    class Probe(Stage):
        source = True

        async def run(self, ctx: StageContext) -> None:
            await anyio.sleep(0.6)  # the source sent 2 chunks and waits: only a timed commit puts them on disk
            seen.append(committed_on_disk(path))

    p = writer_pipeline(RowSource("src", chunks=3, rows=8, delay=0.4),
                        ZarrStorage(10_000, block_rows=4096, commit_every_s=0.1))
    p.add(Probe("probe"))
    runtime.run(p, tmp_path / "run", handle_signals=False)
    assert seen == [16]


def _run_writer_until_killed(run_dir: Path, log: Path) -> None:
    p = writer_pipeline(RowSource("src", chunks=10**6, rows=50, delay=0.02, log=log),
                        ZarrStorage(100_000, block_rows=8192, commit_every_s=0.2))
    runtime.run(p, run_dir, handle_signals=False)


def test_kill_9_loses_at_most_the_rows_of_the_last_commit_interval(tmp_path):
    """A writer process killed at random instants: every row sent more than commit_every_s (plus slack for the
    flush and the stream hop) before the kill is committed and whole; with whole blocks only it lost them all."""
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for kill in range(3):
        run_dir, log = tmp_path / f"run{kill}", tmp_path / f"sent{kill}.log"
        proc = ctx.Process(target=_run_writer_until_killed, args=(run_dir, log))
        proc.start()
        deadline = time.time() + 30
        while not log.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.8, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.join()
        sent = [(float(t), int(n)) for t, n in (line.split() for line in log.read_text().split("\n") if line)]
        store = ZarrStorage.open(run_dir / "replay.zarr")  # the integrity checks pass
        due = max((n for t, n in sent if t < killed_at - 0.2 - 0.5), default=0)
        assert due > 0 and store.total_written >= due, (store.total_written, due, sent[-1])
        assert store.total_written <= sent[-1][1]
        assert_rows_are_numbered(store)


# -- 2. a checkpoint commits the store first ---------------------------------------------------------------------
def test_a_checkpoint_taken_mid_run_counts_only_rows_the_store_holds(tmp_path):
    """Blocks of 4096 rows and commits every 60 s: only the checkpoint's hold commits the rows it counts."""
    run_dir = tmp_path / "run"
    snapshots = []

    class Snapshot(Hook):
        events = ("checkpoint",)

        def on_event(self, event: Event) -> None:  # lockstep: right after the file was written
            state = torch.load(event.data["path"], weights_only=True)["stages"]["writer"]["buffer"]["storage"]
            snapshots.append((state["total_written"], committed_on_disk(run_dir / "replay.zarr")))

    p = writer_pipeline(RowSource("src", chunks=40, rows=10, delay=0.005),
                        ZarrStorage(10_000, block_rows=4096, commit_every_s=60), Checkpoint(every_frames=100),
                        Snapshot())
    runtime.run(p, run_dir, handle_signals=False)
    mid_run = [(counted, held) for counted, held in snapshots if counted < 400]
    assert mid_run, snapshots
    for counted, held in mid_run:
        assert 0 < counted <= held  # the store held every row the checkpoint counts when it was written
    store = ZarrStorage.open(run_dir / "replay.zarr")
    assert store.total_written == 400
    assert_rows_are_numbered(store)  # rows 0 .. 399: the first N of them are those written


# -- 3. a store with fewer rows than the checkpoint counts -------------------------------------------------------
def test_a_buffer_follows_a_store_that_lost_rows_instead_of_failing_to_sample(tmp_path):
    run_dir = tmp_path / "run"
    limiter = RateLimiter(samples_per_insert=2.0, min_fill=20, batch_size=4, tolerance=16)
    buffer = ReplayBuffer(ZarrStorage(1000, block_rows=64), batch_size=4, limiter=limiter)
    buffer.attach(run_dir)
    buffer.extend(numbered(0, 100))
    limiter.inserted(100)
    limiter.sampled(180)
    buffer.storage.flush(partial=True)
    state = buffer.state_dict()
    state["storage"]["total_written"] = state["limiter"]["inserts"] = 130  # an older streamrl counted 30 rows it
    # had not committed
    again = ReplayBuffer(ZarrStorage(1000, block_rows=64), batch_size=4,
                         limiter=RateLimiter(samples_per_insert=2.0, min_fill=20, batch_size=4, tolerance=16))
    again.load_state_dict(state)  # waits for the run directory
    assert again.state_dict() is state
    with pytest.warns(UserWarning, match="holds 100 rows, 30 fewer than the checkpoint counts"):
        again.attach(run_dir)
    assert again.limiter.inserts == 100 and again.limiter.samples == 180 - 60  # the same diff as before
    assert again.limiter.can_sample(4)
    assert again.sample()["row"].max() < 100

    # a queue forgets the unsampled rows that are gone, its FifoSampler with it
    queue = ReplayBuffer(ZarrStorage(1000, block_rows=64), sampler=FifoSampler(), batch_size=4,
                         limiter=RateLimiter.queue(200, batch_size=4))
    state["limiter"], state["sampler"] = {"inserts": 130, "samples": 120}, {"next_row": 120}
    queue.load_state_dict(state)
    with pytest.warns(UserWarning):
        queue.attach(run_dir)
    assert (queue.limiter.inserts, queue.limiter.samples, queue.sampler.next_row) == (100, 100, 100)


def test_a_checkpoint_before_the_first_row_resumes_without_a_store(tmp_path):
    buffer = ReplayBuffer(ZarrStorage(100, block_rows=16), batch_size=4)
    buffer.attach(tmp_path / "a")
    state = buffer.state_dict()
    assert state["storage"]["path"] == "replay.zarr" and state["storage"]["total_written"] == 0
    fresh = ReplayBuffer(ZarrStorage(100, block_rows=16), batch_size=4)
    fresh.load_state_dict(state)
    fresh.attach(tmp_path / "b")  # no store there yet: none is needed
    fresh.extend(numbered(0, 20))
    assert fresh.storage.path == tmp_path / "b" / "replay.zarr" and len(fresh) == 20
    state["storage"]["total_written"] = 20
    with pytest.raises(StoreError, match="no replay store at .* where the checkpoint counts 20 rows"):
        gone = ReplayBuffer(ZarrStorage(100, block_rows=16), batch_size=4)
        gone.load_state_dict(state)
        gone.attach(tmp_path / "c")


# -- 4. relative paths, resumed twice, a copied run directory; 6 + 3 end to end through the CLI ------------------
TINY_DQN = ["--set", "placement=in_process", "--set", "num_envs=2", "--set", "min_fill=64", "--set", "batch_size=16",
            "--set", "hidden=16", "--set", "buffer_size=256", "--set", "checkpoint_every=128",
            "--set", "eval_every=100000", "--set", "eval_episodes=1", "--set", "device=cpu"]


def resume(capsys, run_dir: str, total_frames: int) -> tuple[int, str, str]:
    return cli(capsys, "run", DQN, "--resume", run_dir, "--set", f"total_frames={total_frames}")


def test_a_relative_run_dir_resumes_twice_and_a_copy_resumes_into_its_own_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "run", DQN, "--out", "runs/x", *TINY_DQN, "--set", "total_frames=256")
    assert code == 0, err
    checkpoint = torch.load("runs/x/checkpoint.pt", weights_only=True)
    assert checkpoint["stages"]["writer"]["buffer"]["storage"]["path"] == "replay.zarr"  # relative to the run dir
    for total in (384, 512):  # the second resume used to look for runs/x/runs/x/replay.zarr
        code, _, err = resume(capsys, "runs/x", total)
        assert code == 0, err
    assert ZarrStorage.open("runs/x/replay.zarr", writable=False).total_written >= 512 - 64

    shutil.copytree("runs/x", "runs/copy", ignore=shutil.ignore_patterns(".lock"))
    original = Path("runs/x/replay.zarr/zarr.json")
    before = (original.stat().st_mtime_ns, committed_on_disk(original.parent))
    copied = committed_on_disk(Path("runs/copy/replay.zarr"))
    code, _, err = resume(capsys, "runs/copy", 768)
    assert code == 0, err
    assert (original.stat().st_mtime_ns, committed_on_disk(original.parent)) == before  # untouched
    assert committed_on_disk(Path("runs/copy/replay.zarr")) > copied  # the copy's own store grew

    # a damaged store: the resume refuses it naming the problem; repair; the resume goes on with fewer rows
    store = Path("runs/copy/replay.zarr")
    counted = torch.load("runs/copy/checkpoint.pt", weights_only=True)["stages"]["writer"]["buffer"]["storage"]
    attrs = zarr.open_group(str(store), mode="r").attrs
    committed, block = attrs["committed"], attrs["block_rows"]  # a ring of 256 rows in one block, wrapped
    newest = committed["rows"] - 1
    chunk = newest % committed["disk_rows"] // block
    first = max(newest // block * block, committed["rows"] - committed["size"])  # the newest chunk's oldest row
    (store / "observation" / "c" / str(chunk) / "0").unlink()
    code, _, err = resume(capsys, "runs/copy", 1024)
    assert code == 1 and "stage 'writer' failed: StoreError: " in err and "is damaged" in err, err
    assert f"chunk file observation/c/{chunk}/0 is missing" in err
    assert f"streamrl store repair {store}" in err
    code, out, _ = cli(capsys, "store", "repair", str(store))
    assert code == 0 and f"committed rows {newest + 1} -> {first}" in out, out
    with pytest.warns(UserWarning, match="fewer than the checkpoint counts"):
        code, _, err = resume(capsys, "runs/copy", 1024)
    assert code == 0 and counted["total_written"] > first, err
    assert [p for p in check_store(store) if not p.warning] == []


# -- 5. a store is never written over -----------------------------------------------------------------------------
def test_a_new_store_is_never_created_over_an_existing_one_or_any_file(tmp_path):
    old = ZarrStorage(100, path=tmp_path / "old.zarr", block_rows=16)
    old.extend(numbered(0, 40))
    old.close()
    with pytest.raises(StoreError, match=r"already holds a replay store: .*--resume RUN_DIR.*--overwrite"):
        ZarrStorage(100, path=tmp_path / "old.zarr", block_rows=16).extend(numbered(0, 8))
    assert ZarrStorage.open(tmp_path / "old.zarr").total_written == 40  # intact
    (tmp_path / "file").write_text("mine")
    with pytest.raises(StoreError, match="already holds something that is not empty"):
        ZarrStorage(100, path=tmp_path / "file").extend(numbered(0, 8))
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    ZarrStorage(100, path=tmp_path / "empty", block_rows=16).extend(numbered(0, 8))  # an empty directory is fine


# -- 6. integrity: open refuses, check reports, repair moves the cursor back ------------------------------------
def store_of(path: Path, *, capacity: int = 200, block_rows: int = 16, rows: int = 100) -> Path:
    store = ZarrStorage(capacity, path=path, block_rows=block_rows)
    for start in range(0, rows, 7):
        store.extend(numbered(start, min(7, rows - start)))
        store.flush(partial=True)
    store.close()
    return path


def _set_committed(path: Path, **fields: int) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["committed"].update(fields)
    (path / "zarr.json").write_text(json.dumps(meta))


def _missing(path: Path) -> None:
    (path / "obs" / "c" / "3" / "0").unlink()  # rows 48 .. 63


def _truncated(path: Path) -> None:
    chunk = path / "row" / "c" / "5"  # rows 80 .. 95
    chunk.write_bytes(chunk.read_bytes()[:40])


def _cursor_ahead_inside_a_chunk(path: Path) -> None:
    _set_committed(path, rows=104, size=104)  # chunk 6 exists (rows 96 .. 99 written), 100 .. 103 never were


def _size_beyond_capacity(path: Path) -> None:
    _set_committed(path, size=250)


def _disk_rows(path: Path) -> None:
    _set_committed(path, disk_rows=17)


REPAIRABLE = [  # damage, the problem named, committed rows after repair, rows held after repair
    (_missing, "chunk file obs/c/3/0 is missing", 48, 48),
    (_truncated, "chunk file row/c/5 has 40 bytes, expected 128", 80, 80),
    (_cursor_ahead_inside_a_chunk, "differ from the checksum their commit recorded", 96, 96),
    (_size_beyond_capacity, "expected size <= min(rows, capacity)", 100, 100),
    (_disk_rows, "expected disk_rows == 224", 100, 100),
]


@pytest.mark.parametrize(("damage", "problem", "rows_after", "held_after"), REPAIRABLE,
                         ids=[d[0].__name__ for d in REPAIRABLE])
def test_a_damaged_store_is_refused_on_open_named_by_check_and_repaired(tmp_path, capsys, damage, problem,
                                                                         rows_after, held_after):
    path = store_of(tmp_path / "s.zarr")
    damage(path)
    with pytest.raises(StoreError, match="is damaged") as refused:
        ZarrStorage.open(path)
    assert problem in str(refused.value) and f"streamrl store repair {path}" in str(refused.value)
    code, out, _ = cli(capsys, "store", "check", str(path))
    assert code == 1 and problem in out and "streamrl store repair" in out
    code, out, _ = cli(capsys, "store", "repair", str(path))
    before = 104 if damage is _cursor_ahead_inside_a_chunk else 100
    assert code == 0 and f"committed rows {before} -> {rows_after}" in out, out
    assert check_store(path) == []
    store = ZarrStorage.open(path)
    assert (store.total_written, len(store)) == (rows_after, held_after)
    assert_rows_are_numbered(store)
    store.extend(numbered(rows_after, 150))  # a writer goes on after the repaired cursor, over the dropped rows
    store.close()
    again = ZarrStorage.open(path)
    assert again.total_written == rows_after + 150 and len(again) == min(rows_after + 150, 200)
    assert_rows_are_numbered(again)
    code, out, _ = cli(capsys, "store", "repair", str(path))
    assert code == 0 and "intact, nothing to repair" in out


def test_repair_of_a_wrapped_ring_keeps_the_rows_before_the_damage_and_sampling_stays_among_them(tmp_path):
    path = store_of(tmp_path / "w.zarr", capacity=50, block_rows=8, rows=137)  # rows 87 .. 136 held
    (path / "obs" / "c" / "6" / "0").unlink()  # disk slots 48 .. 55 of 64: rows 112 .. 119
    repair = repair_store(path)
    assert (repair.rows_before, repair.rows_after, repair.size_after) == (137, 112, 25)
    store = ZarrStorage.open(path)
    assert len(store) == 25 and store.total_written == 112  # rows 87 .. 111: fewer than min(rows, capacity)
    assert_rows_are_numbered(store)
    sampler = UniformSampler(torch.Generator().manual_seed(0))
    rows = store.get(sampler.sample(store, 512)[0])["row"]
    assert rows.min() >= 87 and rows.max() <= 111 and len(rows.unique()) == 25
    store.extend(numbered(112, 40))  # the ring fills up again
    assert len(store) == 50
    assert_rows_are_numbered(store)


GARBAGE = [  # what is damaged, the problem named
    (lambda p: (p / "zarr.json").write_text("garbage{"), "zarr.json: the group metadata does not read"),
    (lambda p: (p / "obs" / "zarr.json").write_text("[1, 2]"), "obs: the array metadata does not read"),
    (lambda p: (p / "zarr.json").unlink(), "not a replay store (no zarr.json"),
]


@pytest.mark.parametrize(("damage", "problem"), GARBAGE, ids=["group", "array", "missing"])
def test_garbage_metadata_is_a_named_problem_never_a_traceback(tmp_path, capsys, damage, problem):
    path = store_of(tmp_path / "g.zarr")
    damage(path)
    with pytest.raises(StoreError, match="damaged|not a replay store|no replay store"):
        ZarrStorage.open(path)
    code, out, err = cli(capsys, "store", "check", str(path))
    assert code in (1, 2) and problem in out + err and "Traceback" not in out + err
    code, out, err = cli(capsys, "store", "repair", str(path))
    assert code == 2 and "Traceback" not in err and ("cannot repair" in err or "not a replay store" in err)


# -- 7. nothing is unpickled -------------------------------------------------------------------------------------
class _Marker:
    """Unpickling this creates ``path``: proof that a loader ran code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_an_npz_holding_pickled_objects_is_refused_and_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "executed"
    objects = np.array([_Marker(marker)], dtype=object)
    with zipfile_of(tmp_path / "attrs.npz") as add:  # the attrs entry, crafted
        add("row", np.arange(4))
        add("attrs.json", objects)
    with zipfile_of(tmp_path / "column.npz") as add:  # a column, crafted
        add("row", objects)
    code, _, err = cli(capsys, "store", "import", str(tmp_path / "attrs.npz"), "--to", str(tmp_path / "a.zarr"))
    assert code == 2 and "must be a JSON string" in err and "Nothing in an .npz is unpickled" in err
    with pytest.raises(StoreError, match="must be a C-ordered array of plain values"):
        import_store(tmp_path / "column.npz", tmp_path / "b.zarr")
    assert not marker.exists()
    with pytest.raises(StoreError, match="is not an .npz file"):
        import_store(Path(pickle.__file__), tmp_path / "c.zarr")


@contextlib.contextmanager
def zipfile_of(path: Path):
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        def add(name: str, array: np.ndarray) -> None:
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=True)
            archive.writestr(f"{name}.npy", buffer.getvalue())
        yield add


# -- 8. disk full -------------------------------------------------------------------------------------------------
def test_enospc_while_flushing_stops_the_writer_with_one_error_naming_the_store(tmp_path, monkeypatch, capsys):
    import zarr.storage._local as local

    real_put = local._put
    writes = []

    def put(path, value, exclusive=False):  # chunk writes fail after 10: half a file, then ENOSPC
        if "/c/" in str(path):
            writes.append(path)
            if len(writes) > 10:
                path.parent.mkdir(parents=True, exist_ok=True)
                with local._atomic_write(path, "wb") as f:
                    f.write(value.as_buffer_like()[:10])
                    raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    run_dir = tmp_path / "run"
    p = writer_pipeline(RowSource("src", chunks=50, rows=8), ZarrStorage(10_000, block_rows=16, commit_every_s=60),
                        Checkpoint())
    with pytest.raises(StageFailed) as failed:
        runtime.run(p, run_dir, handle_signals=False)
    assert "hook close failed" not in capsys.readouterr().out  # the checkpoint does not try again: one error
    error = failed.value.error
    store = run_dir / "replay.zarr"
    assert failed.value.stage == "writer" and isinstance(error, StoreDiskFull) and error.path == store
    assert str(error).startswith(f"disk full writing {store}: ") and "rows not committed" in str(error)
    monkeypatch.undo()
    assert list(store.rglob("*.partial")) == []
    reopened = ZarrStorage.open(store)
    assert reopened.total_written > 0 and reopened.total_written % 16 == 0
    assert_rows_are_numbered(reopened)


def test_a_store_on_a_full_tmpfs_raises_disk_full_and_keeps_every_committed_row(tmpfs):
    path = tmpfs("2m", "tiny") / "replay.zarr"
    store = ZarrStorage(4_000, path=path, block_rows=64)
    with pytest.raises(StoreDiskFull, match=f"disk full writing {path}: .* rows not committed") as full:
        for start in range(0, 4_000, 50):
            store.extend(numbered(start, 50, width=256))  # about 1 KiB a row: 2 MiB fill in ~2,000 rows
            store.flush(partial=True)
    committed = store.committed_rows
    assert 0 < committed < store.total_written and f"{store.pending_rows} rows not committed" in str(full.value)
    store.close()  # after a failure, close does not try again (and raises nothing)
    assert list(path.rglob("*.partial")) == [] and list(path.rglob("*.tmp")) == []
    assert [p for p in check_store(path) if not p.warning] == []
    reopened = ZarrStorage.open(path)
    assert reopened.total_written == committed
    assert_rows_are_numbered(reopened)
