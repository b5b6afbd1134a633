"""Time to solve CartPole-v1 with DQN: `streamrl run pipelines/dqn_cartpole.py --seed S` for each seed.

    python tools/bench_dqn.py [--seeds 0 1 2] [--set key=value ...] [--pipeline ppo_cartpole]

(``--pipeline`` times another pipeline of ``pipelines/`` the same way: PPO CartPole, PPO InvertedDoublePendulum.)

Runs one seed after the other (each run uses both cores: collection in a worker process, learning in the main
one), reads each run's summary.json and prints frames and wall seconds to solve (deterministic evaluation over
20 episodes >= 475), then the median. The last line is JSON with every summary's key figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("solved", "frames_to_solve", "wall_s_to_solve", "frames", "wall_s", "frames_per_s", "eval_return_best",
        "eval_return_last", "optim_steps", "policy_lag", "exit_reason")


def run_seed(seed: int, overrides: list[str], out: Path, pipeline: str = "dqn_cartpole") -> dict:
    cmd = [sys.executable, "-m", "streamrl.cli", "run", str(ROOT / "pipelines" / f"{pipeline}.py"),
           "--seed", str(seed), "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    subprocess.run(cmd, check=False, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    summary["bottleneck"] = summary["stages"]["bottleneck"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="keep the run directories here (default: a temporary directory)")
    parser.add_argument("--pipeline", default="dqn_cartpole", help="a pipeline of pipelines/, without .py")
    args = parser.parse_args()
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_dqn_"))
    results = {}
    for seed in args.seeds:
        summary = run_seed(seed, args.set, base / f"seed{seed}", args.pipeline)
        results[f"seed{seed}"] = {k: summary.get(k) for k in (*KEYS, "bottleneck", "replicas")}
        r = results[f"seed{seed}"]
        print(f"seed {seed}: solved={r['solved']} frames_to_solve={r['frames_to_solve']} "
              f"wall_s_to_solve={r['wall_s_to_solve']} eval_best={r['eval_return_best']} frames={r['frames']} "
              f"wall_s={r['wall_s']} bottleneck={r['bottleneck']}", flush=True)
    walls = [r["wall_s_to_solve"] for r in results.values()]
    solved = all(r["solved"] for r in results.values())
    median = statistics.median(w if w is not None else float("inf") for w in walls)
    print(f"all solved: {solved}; median wall_s_to_solve: {median}; runs in {base}")
    print(json.dumps({"solved_all": solved, "median_wall_s_to_solve": median, "runs": results}))


if __name__ == "__main__":
    main()
