"""Learning curves of run directories, as a PNG.

    streamrl plot runs/dqn_cartpole            # writes runs/dqn_cartpole/curves.png

:func:`plot_run` reads ``metrics.csv``: episode return (training episodes, mean per row) and evaluation return
against frames, and the loss on a second panel. :func:`plot_runs` draws any scalars by name (from
``scalars.csv``, which ``Logger(CSVSink())`` writes) of several runs on one figure, seeds of one pipeline as
their mean ± standard deviation::

    plot_runs(["runs/dqn_s0", "runs/dqn_s1"], scalars=("eval/return", "train/loss"), out="dqn.png")

A run directory may hold more than one run: its CSV files are appended to, by a resumed run (``--resume``, which
goes on from its last checkpoint) and by a run started afresh in it (``--resume`` before the first checkpoint, or
``streamrl.run`` given the directory again). :func:`split_runs` tells them apart by the ``wall_s`` column, which
goes back where a later process started writing (a fresh run's clock starts at 0; a resumed run's goes on from
its checkpoint's, earlier than the last rows the interrupted run wrote):

* a part that starts further in frames than the run before it did is that run **resumed**: it continues the
  same curve, and the rows the interrupted run wrote from there on (frames the resumed run collected again) are
  dropped, so the line does not double back;
* a part that starts over (at or before the frames where the run before it started) is **another run**: it is
  drawn as a curve of its own (``plot_run``: "run 2"; ``plot_runs``: ``<dir> (run 2 of 2)``), never joined to
  the first.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from streamrl.errors import ConfigError


def _column(rows: list[dict[str, str]], key: str, x: str = "frames") -> tuple[list[float], list[float]]:
    """``(x values, values)`` of the rows that have ``key``."""
    xs, ys = [], []
    for row in rows:
        if row.get(key):
            xs.append(float(row[x]))
            ys.append(float(row[key]))
    return xs, ys


Rows = list[dict[str, str]]
Series = dict[str, tuple[list[float], list[float]]]


def _float(row: dict[str, str], key: str) -> float | None:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return None


def split_runs(rows: Rows) -> list[Rows]:
    """The runs that wrote ``rows`` (a ``metrics.csv`` or ``scalars.csv`` of one directory), oldest first.

    A new part starts where ``wall_s`` goes back. A part that starts at more frames than the current run's first
    row continues that run (a resume: the run's rows at or beyond the part's first frames are dropped, the resumed
    run wrote them again); one that does not is a new run. See the module docstring.
    """
    runs: list[Rows] = []
    first = last_wall = None  # frames of the current run's first row; wall_s of the previous row
    for row in rows:
        wall, frames = _float(row, "wall_s"), _float(row, "frames")
        back = wall is not None and last_wall is not None and wall < last_wall
        if back and frames is not None and first is not None and frames > first:
            # the run resumed: what it wrote from these frames on was collected again
            runs[-1] = [r for r in runs[-1] if (f := _float(r, "frames")) is None or f < frames]
            runs[-1].append(row)
        elif not runs or back:
            runs.append([row])  # the first run, or one that starts over
            first = frames
        else:
            runs[-1].append(row)
        last_wall = wall if wall is not None else last_wall
    return runs


def _resumes(run_dir: Path) -> list[int]:
    """Frames at which ``streamrl run --resume`` continued this run (from its ``config.json``)."""
    config = run_dir / "config.json"
    if not config.exists():
        return []
    return [int(r["frames"]) for r in json.loads(config.read_text()).get("resumes", [])]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of ``run_dir/metrics.csv`` into ``out`` (default ``run_dir/curves.png``); each run the file
    holds (see :func:`split_runs`) is a curve of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not metrics.exists():
        raise ConfigError(f"{str(metrics)!r} does not exist; give the directory of a run (streamrl run --out DIR)")
    with open(metrics, newline="") as f:
        runs = split_runs(list(csv.DictReader(f)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    for i, rows in enumerate(runs):
        which = f" (run {i + 1})" if len(runs) > 1 else ""
        shade = 1.0 if i == len(runs) - 1 else 0.5  # the last run in front
        x, y = _column(rows, "episode_return")
        top.plot(x, y, color="tab:blue", alpha=0.6 * shade, linestyle="-" if shade == 1.0 else "--",
                 label=f"training episodes (mean per row){which}")
        x, y = _column(rows, "eval_return")
        top.plot(x, y, "o-" if shade == 1.0 else "o--", color="tab:orange", alpha=shade,
                 label=f"evaluation (deterministic){which}")
        x, y = _column(rows, "loss")
        bottom.plot(x, y, color="tab:gray", alpha=shade, linestyle="-" if shade == 1.0 else "--",
                    label=f"run {i + 1}" if which else None)
    top.set_ylabel("return")
    bottom.set_ylabel("loss")
    bottom.set_xlabel("frames")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    for i, frames in enumerate(_resumes(run_dir)):  # where a resumed run took over from a checkpoint
        for ax in (top, bottom):
            ax.axvline(frames, color="tab:red", linestyle=":", label="resumed" if i == 0 and ax is top else None)
    top.legend(loc="best", fontsize="small" if len(runs) > 1 else None)
    if len(runs) > 1:
        bottom.legend(loc="best", fontsize="small")
    top.set_title(run_dir.name if len(runs) == 1 else f"{run_dir.name}: {len(runs)} runs")
    fig.tight_layout()
    target = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


#: Older runs (``metrics.csv`` only): the column each scalar name was written under.
METRICS_COLUMNS = {"eval/return": "eval_return", "collect/episode_return": "episode_return",
                   "collect/episode_length": "episode_length", "collect/frames_per_s": "frames_per_s",
                   "collect/episodes": "episodes", "train/loss": "loss", "train/step": "optim_steps",
                   "train/age_mean": "batch_age_mean"}


def read_runs(run_dir: str | Path, x: str = "frames") -> list[Series]:
    """The scalars of each run ``run_dir`` holds (one, unless it was reused: see :func:`split_runs`), oldest
    first: name -> (x values, values), from ``scalars.csv`` (written by ``Logger(CSVSink())``), else from the
    columns of ``metrics.csv`` under the names ``Logger`` uses (``eval/return``, ``train/loss``...; see
    :data:`METRICS_COLUMNS`) and their own column names."""
    run_dir = Path(run_dir)
    if x not in ("frames", "wall_s"):
        raise ConfigError(f"x must be 'frames' or 'wall_s', got {x!r}")
    scalars_csv, metrics = run_dir / "scalars.csv", run_dir / "metrics.csv"
    if scalars_csv.exists():
        with open(scalars_csv, newline="") as f:
            runs = split_runs(list(csv.DictReader(f)))
        out = []
        for rows in runs:
            series: Series = {}
            for row in rows:
                xs, ys = series.setdefault(row["name"], ([], []))
                xs.append(float(row[x]))
                ys.append(float(row["value"]))
            out.append(series)
        return out or [{}]
    if not metrics.exists():
        raise ConfigError(f"{str(run_dir)!r} has neither scalars.csv nor metrics.csv; give the directory of a run "
                          "(streamrl run --out DIR) that logged with Logger(CSVSink()) or MetricsCSV")
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in (rows[0] if rows else {}) if c not in ("frames", "wall_s")]
    names = {**{c: c for c in columns}, **{n: c for n, c in METRICS_COLUMNS.items() if c in columns}}
    out = []
    for part in split_runs(rows) if rows else [[]]:
        series = {}
        for name, column in names.items():
            xs, ys = _column(part, column, x)
            if xs:
                series[name] = (xs, ys)
        out.append(series)
    return out


def read_scalars(run_dir: str | Path, x: str = "frames") -> Series:
    """The scalars of the last run in ``run_dir`` (see :func:`read_runs`; a directory holds one run unless it was
    reused): name -> (x values, values)."""
    runs = read_runs(run_dir, x)
    return runs[-1] if runs else {}


def _sorted(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """The points in order of x (a run resumed from an earlier checkpoint logs some frames twice)."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return [xs[i] for i in order], [ys[i] for i in order]


def _pipeline_of(run_dir: Path) -> str:
    """The pipeline a run ran: ``summary.json``'s ``pipeline`` name, else ``config.json``'s pipeline file, else
    the directory's name."""
    for filename, read in (("summary.json", lambda r: r.get("pipeline")),
                           ("config.json", lambda r: r.get("pipeline") and Path(r["pipeline"]).stem)):
        try:
            name = read(json.loads((run_dir / filename).read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if name:
            return str(name)
    return run_dir.name


def plot_runs(
    run_dirs: Sequence[str | Path],
    scalars: Sequence[str] = ("eval/return",),
    out: str | Path | None = None,
    *,
    group: Literal["pipeline", "run"] | Callable[[Path], str] = "pipeline",
    x: Literal["frames", "wall_s"] = "frames",
) -> Path:
    """Draw several runs on one figure: one panel per scalar, against env frames (or seconds, ``x="wall_s"``).

    ::

        plot_runs(["runs/dqn_s0", "runs/dqn_s1", "runs/dqn_s2", "runs/ppo_s0"], ("eval/return", "train/loss"))

    Each scalar is read by name from the run's ``scalars.csv`` (``Logger(CSVSink())``: ``eval/return``,
    ``collect/episode_return``, ``train/loss``, ``train/grad_norm``, ...); a run with only ``metrics.csv`` (older
    runs) gives its columns, under the same names where one matches (see :func:`read_scalars`).

    ``group="pipeline"`` (the default) treats runs of the same pipeline (``summary.json``'s name) as seeds of one
    experiment: a group of several runs is drawn as its mean (a line) and its mean ± standard deviation (a band),
    over the frames every run of the group reached (each run's curve interpolated there), with each run faintly
    behind; a lone run is one line. ``group="run"`` draws every run alone; a callable maps a run directory to its
    group's label (e.g. to separate two configurations of one pipeline). A directory that holds two runs (it was
    reused: see :func:`split_runs`) counts as two runs, ``<dir> (run 1 of 2)`` and ``<dir> (run 2 of 2)``, never
    one line that goes back to the start; a resumed run is one.

    ``out`` defaults to ``<run dir>/scalars.png`` for one run, ``runs.png`` in the runs' common parent directory
    for several. Returns the path written. A scalar no run has raises :class:`~streamrl.errors.ConfigError`
    listing the names the runs have.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ConfigError("plot_runs needs at least one run directory, got none")
    if isinstance(scalars, str):
        scalars = (scalars,)
    if not scalars:
        raise ConfigError("plot_runs needs at least one scalar name, got none (e.g. scalars=('eval/return',))")
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"{str(d)!r} is not a directory; give the directories of runs (streamrl run --out DIR)")
    if group == "pipeline":
        label_of: Callable[[Path], str] = _pipeline_of
    elif group == "run" or callable(group):
        label_of = group if callable(group) else lambda d: d.name
    else:
        raise ConfigError(f"group must be 'pipeline', 'run' or a callable (run dir -> label), got {group!r}")
    # (run directory, run name, scalars): a directory holding two runs (reused, see split_runs) gives two
    runs: list[tuple[Path, str, Series]] = []
    for d in dirs:
        parts = read_runs(d, x)
        runs += [(d, d.name if len(parts) == 1 else f"{d.name} (run {i + 1} of {len(parts)})", series)
                 for i, series in enumerate(parts)]
    known = sorted({name for _, _, series in runs for name in series})
    missing = [s for s in scalars if not any(s in series for _, _, series in runs)]
    if missing:
        raise ConfigError(f"no run has the scalar(s) {', '.join(map(repr, missing))}; the runs have: "
                          f"{', '.join(known) or 'none (their CSV files are empty)'}")
    groups: dict[str, list[Series]] = {}
    for d, name, series in runs:
        label = name if group == "run" else label_of(d)
        groups.setdefault(label, []).append(series)

    fig, axes = plt.subplots(len(scalars), 1, figsize=(8, 3 * len(scalars) + 1), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, scalar in zip(axes[:, 0], scalars, strict=True):
        for i, (label, members) in enumerate(groups.items()):
            color = colors[i % len(colors)]
            curves = [series[scalar] for series in members if series.get(scalar, ((), ()))[0]]
            if not curves:
                continue
            marker = "o" if max(len(xs) for xs, _ in curves) < 3 else None  # a point or two: make them visible
            if len(curves) == 1:
                ax.plot(*curves[0], color=color, label=label, marker=marker)
                continue
            for xs, ys in curves:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            lo, hi = max(min(xs) for xs, _ in curves), min(max(xs) for xs, _ in curves)
            grid = np.linspace(lo, hi, 200) if hi > lo else np.array([hi])
            stacked = np.stack([np.interp(grid, *_sorted(xs, ys)) for xs, ys in curves])
            mean, std = stacked.mean(axis=0), stacked.std(axis=0)
            ax.plot(grid, mean, color=color, label=f"{label} (mean of {len(curves)})",
                    marker="o" if len(grid) == 1 else None)
            ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2)
            if len(grid) == 1:
                ax.errorbar(grid, mean, yerr=std, color=color, capsize=4)
        ax.set_ylabel(scalar)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("env frames" if x == "frames" else "seconds")
    fig.tight_layout()
    if out is not None:
        target = Path(out)
    elif len(dirs) == 1:
        target = dirs[0] / "scalars.png"
    else:
        target = Path(os.path.commonpath([d.resolve() for d in dirs])) / "runs.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target
