"""Learning curves of a run directory, as a PNG.

    streamrl plot runs/dqn_cartpole            # writes runs/dqn_cartpole/curves.png

Reads ``metrics.csv``: episode return (training episodes, mean per row) and evaluation return against frames,
and the loss on a second panel.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from streamrl.errors import ConfigError


def _column(rows: list[dict[str, str]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        if row.get(key):
            xs.append(float(row["frames"]))
            ys.append(float(row[key]))
    return xs, ys


def _resumes(run_dir: Path) -> list[int]:
    """Frames at which ``streamrl run --resume`` continued this run (from its ``config.json``)."""
    config = run_dir / "config.json"
    if not config.exists():
        return []
    return [int(r["frames"]) for r in json.loads(config.read_text()).get("resumes", [])]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of ``run_dir/metrics.csv`` into ``out`` (default ``run_dir/curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not metrics.exists():
        raise ConfigError(f"{str(metrics)!r} does not exist; give the directory of a run (streamrl run --out DIR)")
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    x, y = _column(rows, "episode_return")
    top.plot(x, y, color="tab:blue", alpha=0.6, label="training episodes (mean per row)")
    x, y = _column(rows, "eval_return")
    top.plot(x, y, "o-", color="tab:orange", label="evaluation (deterministic)")
    top.set_ylabel("return")
    top.legend(loc="best")
    top.grid(alpha=0.3)
    x, y = _column(rows, "loss")
    bottom.plot(x, y, color="tab:gray")
    bottom.set_ylabel("loss")
    bottom.set_xlabel("frames")
    bottom.grid(alpha=0.3)
    for i, frames in enumerate(_resumes(run_dir)):  # where a resumed run took over from a checkpoint
        for ax in (top, bottom):
            ax.axvline(frames, color="tab:red", linestyle=":", label="resumed" if i == 0 and ax is top else None)
    if _resumes(run_dir):
        top.legend(loc="best")
    top.set_title(run_dir.name)
    fig.tight_layout()
    target = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target
