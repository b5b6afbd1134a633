"""kill -9 a DQN run at random instants and resume it after each kill: the durability bound, measured.

    python tools/kill_resume.py [--kills 20] [--seed 0] [--min-s 9] [--max-s 16] [--set key=value ...] [--out DIR]

One run directory, one run: `streamrl run` of DQN on CartPole (``pipelines/dqn_cartpole.py``, a checkpoint every
1,000 frames, a replay store with the default 4,096-row blocks) is killed with SIGKILL at a random instant, between
``--min-s`` and ``--max-s`` seconds after its process started (start-up and resume included), then checked and
resumed with ``--resume``; ``--kills`` times, then the last resume runs 3,000 more frames to a clean end. After each
kill it reads, without the run's help:

* the rows the replay store had received, traced by a lockstep hook on ``stored`` events (this file's ``build``
  adds it to the DQN pipeline) that writes the storage's row count and the time into a small ring file at every
  event (the event's ``size``: rows held, which is every row written, the store being set to hold 1,000,000);
  from it, the rows stored in the last second before the kill: the bound on what may be lost;
* the rows the store holds committed (its ``committed`` attribute) and ``store check``'s problems;
* the rows the checkpoint counts (the replay storage's ``total_written`` in the newest loadable checkpoint).

A kill passes when the store holds every row its checkpoint counts, ``store check`` finds no error, the rows lost
are within the bound (at most the rows stored in the last second before the kill, or a chunk of 64, whichever is
more), and the resumed run stores rows past the store's committed count (it trained on). Rows lost per kill = rows
stored before the kill minus rows committed after it (chunks still on their way to the writer come on top).
The last line is JSON: per kill and the median and maximum rows lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from streamrl.events import Event, Hook
from streamrl.execution.context import RunContext
from streamrl.loader import load_module
from streamrl.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
TRACE = "stored_rows.trace"
RECORD = 47  # bytes per trace record: "%20d %25.6f\n" (rows, time)
RING = 256  # records kept
CHUNK = 64  # frames per chunk of the DQN pipeline
_dqn = load_module(ROOT / "pipelines" / "dqn_cartpole.py")
Config = _dqn.Config


class StoredRowsTrace(Hook):
    """Writes the replay storage's row count and the time into a ring of records in ``<run dir>/stored_rows.trace``
    at every ``stored`` event (``os.pwrite``: in the page cache at once, so it survives SIGKILL)."""

    events = ("stored",)
    mode = "lockstep"

    def __init__(self) -> None:
        super().__init__()
        self.fd: int | None = None
        self.n = 0

    async def start(self, run: RunContext) -> None:
        self.fd = os.open(Path(run.run_dir) / TRACE, os.O_WRONLY | os.O_CREAT, 0o644)

    def on_event(self, event: Event) -> None:
        assert self.fd is not None
        record = b"%20d %25.6f\n" % (event.data["size"], time.time())
        os.pwrite(self.fd, record, (self.n % RING) * RECORD)
        self.n += 1

    async def close(self, run: RunContext) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def build(cfg: Config) -> Pipeline:  # type: ignore[valid-type]
    pipeline: Pipeline = _dqn.build(cfg)
    pipeline.add_hook(StoredRowsTrace())
    return pipeline


def trace(run_dir: Path) -> list[tuple[int, float]]:
    """The trace's records, oldest first: (rows stored, time)."""
    path = run_dir / TRACE
    records = [line.split() for line in path.read_text().replace("\0", "").splitlines()] if path.exists() else []
    return sorted((int(rows), float(t)) for rows, t in records if rows)


def traced_rows(run_dir: Path) -> int:
    return max((rows for rows, _ in trace(run_dir)), default=0)


def rows_in_last_second(run_dir: Path) -> int:
    """Rows stored in the second before the last trace record (the kill came after it)."""
    records = trace(run_dir)
    if not records:
        return 0
    rows, t = records[-1]
    before = [r for r, u in records if u <= t - 1.0]
    return rows - (max(before) if before else min(r for r, _ in records))


def committed_rows(run_dir: Path) -> int:
    path = run_dir / "replay.zarr" / "zarr.json"
    if not path.exists():
        return 0
    return int(json.loads(path.read_text())["attributes"]["committed"]["rows"])


def counted_rows(run_dir: Path) -> int | None:
    """Rows the newest loadable checkpoint counts in the replay storage (None: no checkpoint yet)."""
    from streamrl.errors import ConfigError
    from streamrl.resume import load_checkpoint

    try:
        checkpoint = load_checkpoint(run_dir)
    except ConfigError:
        return None
    return int(checkpoint["stages"]["writer"]["buffer"]["storage"]["total_written"])


def store_errors(run_dir: Path) -> list[str]:
    from streamrl.replay.store_tools import check_store

    if not (run_dir / "replay.zarr").exists():
        return []
    return [str(p) for p in check_store(run_dir / "replay.zarr") if not p.warning]


def command(run_dir: Path, seed: int, overrides: list[str], *, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "streamrl.cli", "run", f"{Path(__file__).resolve()}:build"]
    cmd += ["--resume", str(run_dir)] if resume else ["--out", str(run_dir), "--seed", str(seed)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-s", type=float, default=9.0, help="earliest kill, seconds after the process started")
    parser.add_argument("--max-s", type=float, default=16.0, help="latest kill, seconds after the process started")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="the run directory (default: a new temporary one)")
    args = parser.parse_args()
    run_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kill_resume_")) / "run"
    # never solve (the run must still be going at each kill), a checkpoint every 1,000 frames, a store larger than
    # every row written (the trace counts rows held)
    overrides = ["total_frames=10_000_000", "target_return=1e9", "checkpoint_every=1000", "buffer_size=1_000_000",
                 *args.set]
    chooser = random.Random(args.seed)
    kills: list[dict[str, Any]] = []
    for k in range(args.kills):
        delay = chooser.uniform(args.min_s, args.max_s)
        before = committed_rows(run_dir)
        process = subprocess.Popen(command(run_dir, args.seed, overrides, resume=k > 0), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        alive = process.poll() is None
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
        time.sleep(0.2)  # the worker process notices its parent is gone and exits
        stored, committed, counted = traced_rows(run_dir), committed_rows(run_dir), counted_rows(run_dir)
        bound = max(rows_in_last_second(run_dir), CHUNK)
        errors = store_errors(run_dir)
        kill = {"kill": k, "at_s": round(delay, 2), "alive_at_kill": alive, "committed_before": before,
                "stored": stored, "committed": committed, "checkpoint_counts": counted,
                "rows_lost": max(0, stored - committed), "bound": bound,
                "within_bound": stored - committed <= bound, "store_errors": errors,
                "store_holds_checkpoint_rows": counted is None or committed >= counted}
        if not alive:
            kill["stderr"] = stderr.decode(errors="replace")[-2000:]
        if k:
            kills[-1]["resumed_and_stored_more"] = stored > kills[-1]["committed"]
        kills.append(kill)
        print(f"kill {k:2d} at {delay:4.1f} s: stored {stored:7d}, committed {committed:7d} (lost "
              f"{kill['rows_lost']:4d}; last second {bound:4d}), checkpoint counts {counted}, "
              f"store errors {len(errors)}"
              + ("" if alive else " -- the run had already ended: " + kill.get("stderr", "")[-300:]), flush=True)
    final_frames = None
    checkpoint_frames = _checkpoint_frames(run_dir)
    finish = subprocess.run(command(run_dir, args.seed,
                                    [*overrides, f"total_frames={(checkpoint_frames or 0) + 3000}"], resume=True),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kills:
        kills[-1]["resumed_and_stored_more"] = traced_rows(run_dir) > kills[-1]["committed"]
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        final_frames = json.loads(summary_path.read_text())["frames"]
    lost = [k["rows_lost"] for k in kills]
    ok = all(k["store_holds_checkpoint_rows"] and not k["store_errors"] and k.get("resumed_and_stored_more")
             and k["within_bound"] for k in kills) and finish.returncode == 0
    print(f"{len(kills)} kills: rows lost median {statistics.median(lost) if lost else 0}, max {max(lost, default=0)}; "
          f"every store held its checkpoint's rows and checked clean, every loss within the bound, every resume "
          f"stored more: {ok}; "
          f"last resume exit {finish.returncode} at {final_frames} frames; run in {run_dir}")
    print(json.dumps({"ok": ok, "kills": kills, "rows_lost_median": statistics.median(lost) if lost else 0,
                      "rows_lost_max": max(lost, default=0), "final_exit_code": finish.returncode,
                      "final_frames": final_frames}))


def _checkpoint_frames(run_dir: Path) -> int | None:
    from streamrl.errors import ConfigError
    from streamrl.resume import load_checkpoint

    try:
        return int(load_checkpoint(run_dir)["frames"])
    except ConfigError:
        return None


if __name__ == "__main__":
    main()
