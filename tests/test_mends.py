"""Small mends of issue 14: a closed pipe, Ctrl-C at start-up, a cheap ``import streamrl.cli``, the frame budget,
and a standalone replay store that keeps its rows without a writer stage."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase

import streamrl
from streamrl import GymEnv, Pipeline, ZarrStorage
from streamrl.testing import Collect

# a config of many fields and no torch: --help-config prints ~150 KB (more than a pipe buffer) in about a second
MANY_FIELDS = """
import dataclasses

Config = dataclasses.make_dataclass(
    "Config", [(f"field_{i}", int, dataclasses.field(default=i)) for i in range(8000)] + [("seed", int, 0)])


def build(cfg: Config):
    raise AssertionError("--help-config does not build")
"""

SLOW_IMPORT = """
import dataclasses
import time

# Ctrl-C comes while the pipeline file is imported (or torch loads before it). Short sleeps: a signal the kernel
# hands to another thread (torch starts some) does not cut a long sleep of the main thread short
for _ in range(1200):
    time.sleep(0.05)


@dataclasses.dataclass
class Config:
    seed: int = 0
    device: str = "cpu"


def build(cfg: Config):
    raise AssertionError("never built")
"""


def test_help_config_into_a_reader_that_stops_early_exits_quietly(tmp_path):
    (tmp_path / "many.py").write_text(MANY_FIELDS)
    proc = subprocess.Popen([sys.executable, "-m", "streamrl.cli", "run", "many.py", "--help-config"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(100).startswith(b"Config fields")  # `| head -c 100`: read a little, then close
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE, stderr  # as `cat` reports a closed pipe
    assert stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit


def test_ctrl_c_during_start_up_exits_130_with_one_line(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_IMPORT)
    proc = subprocess.Popen([sys.executable, "-m", "streamrl.cli", "run", "slow.py", "--out", "run"], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(1.0)  # importing torch, or the pipeline file; the fork server imports streamrl meanwhile
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: to the whole process group, the fork server included
    _, stderr = proc.communicate(timeout=60)  # until every process holding stderr ended
    assert proc.returncode == 130, stderr
    assert stderr == "streamrl: interrupted (Ctrl-C)\n"  # the message tests/test_faults_cli.py pins


def test_usage_errors_do_not_import_torch(tmp_path):
    script = textwrap.dedent("""
        import sys
        import streamrl.cli

        for argv in ([], ["bogus"], ["run", "missing.py"], ["graph", "missing.py"], ["run", "--bogus", "x.py"]):
            try:
                streamrl.cli.main(argv)
            except SystemExit as exc:
                assert exc.code == 2, (argv, exc.code)
            else:
                raise AssertionError(f"{argv} did not exit")
        heavy = sorted({"torch", "numpy", "tensordict"} & set(sys.modules))
        assert not heavy, f"a usage error imported {heavy}"
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pipeline file 'missing.py' does not exist; give the path of a .py file" in proc.stderr


class RandomPolicy(TensorDictModuleBase):
    in_keys, out_keys = ["observation"], ["action"]

    def forward(self, td: TensorDict) -> TensorDict:
        return td.set("action", torch.randint(0, 2, td.batch_size))


@pytest.mark.parametrize("backend", ["native", "sync"])
def test_total_frames_is_met_within_one_chunk(tmp_path, backend):
    """``total_frames=200`` in chunks of 64 frames: at least 200 frames, and the run stops at the first chunk that
    reaches them. Envs that reset on the same step fill every chunk (exactly 4 chunks, 256 frames); gymnasium's
    native vector env leaves the step after each episode's end out of its chunk (fewer frames per chunk)."""
    p = Pipeline("budget")
    sink = Collect("sink")
    collector = p.add_collector("collect", GymEnv("CartPole-v1", num_envs=2, backend=backend), RandomPolicy(),
                                frames_per_chunk=64, total_frames=200, placement="in_process", weights_from=None)
    p.add(sink)
    p.connect(collector.chunks, "sink.items", capacity=2)
    frames = streamrl.run(p, tmp_path, handle_signals=False).summary["frames"]
    per_chunk = [int(c["valid"].sum()) if "valid" in c.keys() else c.numel() for c in sink.items]
    assert sum(per_chunk) == frames and 200 <= frames < 200 + 64
    assert frames - per_chunk[-1] < 200  # no chunk more than needed
    if backend == "sync":
        assert frames == 256 and len(sink.items) == 4


WRITE_AND_EXIT = """
import gc
import sys

import torch
from tensordict import TensorDict

from streamrl import ZarrStorage

def rows(n):
    return TensorDict({"x": torch.arange(float(n)), "next": {"reward": torch.ones(n)}}, batch_size=[n])

kept = ZarrStorage(100, path=sys.argv[1], block_rows=16)
kept.extend(rows(37))  # two whole blocks and 5 rows: none committed yet, no flush, no close
dropped = ZarrStorage(100, path=sys.argv[2], block_rows=16)
dropped.extend(rows(10))
del dropped  # collected: the exit leaves it alone (its 10 rows were never committed)
gc.collect()
"""


def test_a_store_left_open_is_flushed_and_committed_at_exit(tmp_path):
    kept, dropped = tmp_path / "kept.zarr", tmp_path / "dropped.zarr"
    proc = subprocess.run([sys.executable, "-c", WRITE_AND_EXIT, str(kept), str(dropped)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    store = ZarrStorage.open(kept)
    assert store.committed_rows == len(store) == 37
    assert store.get(store.slots_in_order())["x"].tolist() == list(range(37))
    assert ZarrStorage.open(dropped).committed_rows == 0


def test_a_store_is_a_context_manager_that_commits_on_close(tmp_path):
    path = tmp_path / "replay.zarr"
    with ZarrStorage(100, path=path, block_rows=16) as store:
        store.extend(TensorDict({"x": torch.arange(5.0)}, batch_size=[5]))
        assert ZarrStorage.open(path, writable=False).committed_rows == 0  # in RAM until the block fills
    assert store.committed_rows == 5
    assert ZarrStorage.open(path).get(torch.arange(5))["x"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
