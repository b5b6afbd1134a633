"""The fault table: inject each fault a user meets in the first week into a real `streamrl run`, and measure.

    python tools/faults.py [--out DIR] [--only NAME ...]

Each case runs the real CLI in a subprocess (tiny DQN CartPole runs, or a small pipeline file written for the case)
and reports what happened: the exit code, the seconds it took, what the case checks (rows lost, a marker file a
crafted checkpoint would create, ...) and the first error line on stderr. `tools/kill_resume.py` measures the
kill -9 durability bound over 20 kills; this table kills once. The last line is JSON with every row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STREAMRL = str(Path(sys.executable).parent / "streamrl")  # the command users run (not python -m: see README)
DQN = str(ROOT / "pipelines" / "dqn_cartpole.py")
TINY = ["--set", "total_frames=3000", "--set", "min_fill=200", "--set", "eval_every=100000",
        "--set", "checkpoint_every=1000"]
CASES: dict[str, Callable[[Path], dict[str, Any]]] = {}


def case(fn: Callable[[Path], dict[str, Any]]) -> Callable[[Path], dict[str, Any]]:
    CASES[fn.__name__] = fn
    return fn


def streamrl(*args: str, cwd: Path, timeout: float = 300) -> tuple[int, float, str]:
    start = time.perf_counter()
    proc = subprocess.run([STREAMRL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, round(time.perf_counter() - start, 1), proc.stdout + proc.stderr


def first_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error" in line.lower() or "Error" in line]
    return (lines[0] if lines else (stderr.strip().splitlines() or [""])[-1])[:240]


def row(code: int, seconds: float, stderr: str, **checks: Any) -> dict[str, Any]:
    return {"exit": code, "seconds": seconds, **checks, "message": first_error(stderr),
            "traceback": "Traceback (most recent call last)" in stderr}


def committed(store: Path) -> int:
    return int(json.loads((store / "zarr.json").read_text())["attributes"]["committed"]["rows"])


def write_pipeline(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


CONFIG = """
    from dataclasses import dataclass
    from streamrl import Pipeline

    @dataclass
    class Config:
        seed: int = 0
        device: str = "cpu"
        total_frames: int = 1000
        num_envs: int = 1
"""


class _Crafted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@case
def crafted_checkpoint(tmp: Path) -> dict[str, Any]:
    code, _, err = streamrl("run", DQN, *TINY, "--out", "run", cwd=tmp)
    marker = tmp / "pwned"
    (tmp / "run" / "checkpoint.pt").write_bytes(pickle.dumps({"format": _Crafted(str(marker))}))
    (tmp / "run" / "checkpoint.prev.pt").unlink(missing_ok=True)
    code, seconds, err = streamrl("run", DQN, "--resume", "run", cwd=tmp)
    return row(code, seconds, err, code_ran=marker.exists())


@case
def kill_9_mid_run(tmp: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tools"))
    import kill_resume  # the traced DQN pipeline

    run_dir = tmp / "run"
    cmd = kill_resume.command(run_dir, 0, ["total_frames=1_000_000", "target_return=1e9", "checkpoint_every=1000"],
                              resume=False)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(14)  # start-up takes about 9 s on 2 cores: this kills a few seconds into collection
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)
    stored, held, counted = (kill_resume.traced_rows(run_dir), kill_resume.committed_rows(run_dir),
                             kill_resume.counted_rows(run_dir))
    code, seconds, err = streamrl("run", f"{ROOT / 'tools' / 'kill_resume.py'}:build", "--resume", str(run_dir),
                                  "--set", f"total_frames={(counted or 0) + 2000}", cwd=tmp)
    return row(code, seconds, err, rows_stored_before_kill=stored, rows_committed=held, checkpoint_counts=counted,
               rows_lost=max(0, stored - held), store_holds_checkpoint_rows=counted is None or held >= counted)


@case
def killed_before_first_checkpoint(tmp: Path) -> dict[str, Any]:
    proc = subprocess.Popen([STREAMRL, "run", DQN, "--out", "run",
                             "--set", "checkpoint_every=1000000"], cwd=tmp, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(12)  # rows are flowing, the only checkpoint would come at the end
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)
    rows = committed(tmp / "run" / "replay.zarr") if (tmp / "run" / "replay.zarr" / "zarr.json").exists() else 0
    code, seconds, err = streamrl("run", DQN, "--resume", "run", *TINY, cwd=tmp)
    return row(code, seconds, err, rows_committed_at_kill=rows)


@case
def relative_out_resumed_twice(tmp: Path) -> dict[str, Any]:
    codes = [streamrl("run", DQN, *TINY, "--set", "total_frames=1500", "--out", "runs/x", cwd=tmp)[0]]
    seconds, err = 0.0, ""
    for frames in (2500, 3500):
        code, seconds, err = streamrl("run", DQN, "--resume", "runs/x", "--set", f"total_frames={frames}", cwd=tmp)
        codes.append(code)
    return row(codes[-1], seconds, err, exit_codes=codes, rows=committed(tmp / "runs/x/replay.zarr"))


@case
def copied_run_dir_resumes_into_its_own_store(tmp: Path) -> dict[str, Any]:
    streamrl("run", DQN, *TINY, "--set", "total_frames=1500", "--out", "a", cwd=tmp)
    shutil.copytree(tmp / "a", tmp / "b")
    before = committed(tmp / "a" / "replay.zarr")
    code, seconds, err = streamrl("run", DQN, "--resume", "b", "--set", "total_frames=3000", cwd=tmp)
    return row(code, seconds, err, original_rows_before=before, original_rows_after=committed(tmp / "a/replay.zarr"),
               copy_rows_after=committed(tmp / "b" / "replay.zarr"))


@case
def run_into_existing_run_dir(tmp: Path) -> dict[str, Any]:
    streamrl("run", DQN, *TINY, "--set", "total_frames=1500", "--out", "run", cwd=tmp)
    before = committed(tmp / "run" / "replay.zarr")
    code, seconds, err = streamrl("run", DQN, *TINY, "--out", "run", cwd=tmp)
    return row(code, seconds, err, rows_before=before, rows_after=committed(tmp / "run" / "replay.zarr"))


@case
def two_runs_on_one_dir_at_once(tmp: Path) -> dict[str, Any]:
    first = subprocess.Popen([STREAMRL, "run", DQN, "--out", "run"], cwd=tmp,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4)
    code, seconds, err = streamrl("run", DQN, "--resume", "run", cwd=tmp)
    first.send_signal(signal.SIGINT)
    first.wait(60)
    return row(code, seconds, err, names_pid=str(first.pid) in err)


@case
def lr_1e30(tmp: Path) -> dict[str, Any]:
    import torch

    code, seconds, err = streamrl("run", DQN, *TINY, "--set", "lr=1e30", "--out", "run", cwd=tmp)
    finite = True
    for path in (tmp / "run").glob("checkpoint*.pt"):
        for tensor in _tensors(torch.load(path, weights_only=True)):
            finite &= bool(torch.isfinite(tensor).all()) if tensor.is_floating_point() else True
    return row(code, seconds, err, checkpoints=sorted(p.name for p in (tmp / "run").glob("checkpoint*.pt")),
               checkpoints_finite=finite)


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@case
def env_step_never_returns(tmp: Path) -> dict[str, Any]:
    write_pipeline(tmp / "hang.py", CONFIG + """
    from streamrl import MLP, EnvStage, GymEnv, PolicyStage, QValueActor
    from streamrl.testing import CountFrames

    def build(cfg: Config) -> Pipeline:
        env = GymEnv("streamrl.testing:streamrl/HangingCartPole-v0", num_envs=2, backend="subprocess", hang_at=30)
        p = Pipeline("hang", config=cfg)
        p.add(EnvStage("env", env, frames_per_chunk=16, total_frames=cfg.total_frames, step_timeout=5.0),
              PolicyStage("policy", QValueActor(MLP(2, in_features=4, num_cells=(8,)))), CountFrames("sink"))
        p.connect("env.policy", "policy.requests", capacity=0)
        p.connect("env.chunks", "sink.chunks")
        return p
    """)
    code, seconds, err = streamrl("run", "hang.py", "--out", "run", cwd=tmp)
    return row(code, seconds, err, step_timeout_s=5.0)


@case
def collector_worker_killed(tmp: Path) -> dict[str, Any]:
    proc = subprocess.Popen([STREAMRL, "run", DQN, "--out", "run"], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    worker = None
    deadline = time.time() + 60
    while worker is None and time.time() < deadline:
        time.sleep(0.5)
        events = tmp / "run" / "events.jsonl"
        for line in events.read_text().splitlines() if events.exists() else []:
            if '"worker_started"' in line:
                worker = json.loads(line)["pid"]
    time.sleep(2)
    killed_at = time.perf_counter()
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    return row(proc.returncode, round(time.perf_counter() - killed_at, 1), err, worker_pid=worker)


@case
def store_missing_chunk_file(tmp: Path) -> dict[str, Any]:
    streamrl("run", DQN, *TINY, "--out", "run", cwd=tmp)
    chunk = next(p for p in (tmp / "run" / "replay.zarr" / "observation" / "c").rglob("*") if p.is_file())
    chunk.unlink()
    code, seconds, err = streamrl("run", DQN, "--resume", "run", "--set", "total_frames=4000", cwd=tmp)
    check = streamrl("store", "check", "run/replay.zarr", cwd=tmp)
    return row(code, seconds, err, store_check_exit=check[0])


@case
def store_cursor_beyond_data(tmp: Path) -> dict[str, Any]:
    streamrl("run", DQN, *TINY, "--out", "run", cwd=tmp)
    meta = tmp / "run" / "replay.zarr" / "zarr.json"
    record = json.loads(meta.read_text())
    record["attributes"]["committed"]["rows"] += 50_000
    record["attributes"]["committed"]["size"] = min(record["attributes"]["committed"]["rows"], 100_000)
    meta.write_text(json.dumps(record))
    code, seconds, err = streamrl("store", "check", "run/replay.zarr", cwd=tmp)
    return row(code, seconds, err)


@case
def store_garbage_zarr_json(tmp: Path) -> dict[str, Any]:
    streamrl("run", DQN, *TINY, "--out", "run", cwd=tmp)
    (tmp / "run" / "replay.zarr" / "zarr.json").write_text("{ not json")
    code, seconds, err = streamrl("store", "check", "run/replay.zarr", cwd=tmp)
    return row(code, seconds, err)


@case
def run_from_a_folder_holding_streamrl(tmp: Path) -> dict[str, Any]:
    (tmp / "streamrl").mkdir()
    code, seconds, err = streamrl("run", DQN, *TINY, "--out", "run", cwd=tmp)
    return row(code, seconds, err)


BAD_VALUES = {
    "device=gpu": ["--set", "device=gpu"],
    "num_envs=0": ["--set", "num_envs=0"],
    "lr=nan": ["--set", "lr=nan"],
    "total_frames=0": ["--set", "total_frames=0"],
    "buffer_size<batch_size": ["--set", "buffer_size=64"],
}


@case
def bad_config_values(tmp: Path) -> dict[str, Any]:
    results = {}
    for name, args in BAD_VALUES.items():
        code, seconds, err = streamrl("run", DQN, *args, "--out", f"run_{len(results)}", cwd=tmp)
        results[name] = row(code, seconds, err)
    return {"exit": sorted({r["exit"] for r in results.values()}), "cases": results,
            "traceback": any(r["traceback"] for r in results.values())}


BAD_FILES = {
    "syntax error": "def build(cfg: Config) -> Pipeline\n    return None\n",
    "build() raises": "def build(cfg: Config) -> Pipeline:\n    raise RuntimeError('no such env')\n",
    "build() returns None": "def build(cfg: Config) -> Pipeline:\n    return None\n",
}


@case
def bad_pipeline_files(tmp: Path) -> dict[str, Any]:
    results = {}
    for i, (name, body) in enumerate(BAD_FILES.items()):
        write_pipeline(tmp / f"bad{i}.py", CONFIG + textwrap.indent(body, "    "))
        code, seconds, err = streamrl("run", f"bad{i}.py", "--out", f"run{i}", cwd=tmp)
        results[name] = row(code, seconds, err)
    write_pipeline(tmp / "noseed.py", """
        from dataclasses import dataclass
        from streamrl import Pipeline

        @dataclass
        class Config:
            total_frames: int = 1000

        def build(cfg: Config) -> Pipeline:
            return Pipeline("noseed", config=cfg)
    """)
    code, seconds, err = streamrl("run", "noseed.py", "--out", "run_noseed", cwd=tmp)
    results["config without seed"] = row(code, seconds, err)
    write_pipeline(tmp / "cycle.py", CONFIG + """
    from streamrl.testing import Collect
    from streamrl.stages.base import Stage

    class Echo(Stage):
        inputs = ("items",)
        outputs = ("items_out",)

        async def run(self, ctx):
            async for item in ctx.input("items"):
                await ctx.output("items_out").send(item)

    def build(cfg: Config) -> Pipeline:
        p = Pipeline("cycle", config=cfg)
        p.add(Echo("a"), Echo("b"))
        p.connect("a.items_out", "b.items", capacity=2)
        p.connect("b.items_out", "a.items", capacity=2)
        return p
    """)
    code, seconds, err = streamrl("run", "cycle.py", "--out", "run_cycle", cwd=tmp, timeout=60)
    results["buffered cycle without a source"] = row(code, seconds, err)
    return {"exit": sorted({r["exit"] for r in results.values()}), "cases": results,
            "traceback": any(r["traceback"] for r in results.values())}


@case
def disk_full(tmp: Path) -> dict[str, Any]:
    from streamrl.testing import small_disk

    with contextlib.ExitStack() as mounted:
        try:
            disk = mounted.enter_context(small_disk(tmp / "disk", "3m"))
        except OSError as exc:
            return {"exit": None, "skipped": str(exc)}
        code, seconds, err = streamrl("run", DQN, "--set", "total_frames=200000", "--set", "buffer_size=100000",
                                      "--set", "eval_every=100000", "--set", "target_return=1e9",
                                      "--set", "placement=in_process", "--out", str(disk / "run"), cwd=tmp)
        litter = sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.suffix in (".tmp", ".partial"))
        summary = (disk / "run" / "summary.json").exists()
        store_ok = streamrl("store", "check", str(disk / "run" / "replay.zarr"), cwd=tmp)[0] == 0
        return row(code, seconds, err, litter=litter, summary_written=summary, store_checks_clean=store_ok)


@case
def second_ctrl_c_with_slow_hooks(tmp: Path) -> dict[str, Any]:
    write_pipeline(tmp / "slow.py", CONFIG + """
    import time
    from streamrl import Hook
    from streamrl.testing import Collect, ListSource

    class Slow(Hook):
        events = ("*",)
        mode = "lossy"

        def on_event(self, event):
            time.sleep(10)

        async def close(self, run):
            time.sleep(10)

    def build(cfg: Config) -> Pipeline:
        p = Pipeline("slow", config=cfg)
        p.add(ListSource("src", list(range(10**6)), delay=0.01), Collect("sink", keep=False))
        p.connect("src.items", "sink.items")
        p.add_hook(Slow())
        return p
    """)
    proc = subprocess.Popen([STREAMRL, "run", "slow.py", "--out", "run"], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(12)  # past start-up (about 9 s on 2 cores): a Ctrl-C while streamrl imports is another case
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    second = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    while proc.poll() is None:  # the process's own exit (the fork server may hold stderr open a little longer)
        time.sleep(0.01)
    exited = time.perf_counter() - second
    _, err = proc.communicate(timeout=120)
    return row(proc.returncode, round(exited, 2), err,
               summary_written=(tmp / "run" / "summary.json").exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="keep the cases' directories here (default: a temporary directory)")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="run these cases only")
    args = parser.parse_args()
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="faults_"))
    table = {}
    for name in args.only or CASES:
        tmp = base / name
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            table[name] = CASES[name](tmp)
        except Exception as exc:  # noqa: BLE001 - a case that breaks is a row of the table too
            table[name] = {"exit": None, "case_failed": f"{type(exc).__name__}: {exc}"}
        print(f"{name}: {json.dumps(table[name])}", flush=True)
    print(json.dumps(table))


if __name__ == "__main__":
    main()
