"""Learning-curve plots of a run directory that holds more than one run: a run started afresh in it is a curve of
its own, a resumed run continues its curve (``streamrl.plots.split_runs``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest

from streamrl.plots import plot_run, plot_runs, read_runs, read_scalars, split_runs

METRICS = ("frames,wall_s,frames_per_s,episodes,episode_return,episode_length,optim_steps,loss,policy_version,"
           "batch_age_mean,eval_return\n")


def metrics_row(frames: int, wall_s: float, episode_return: float, loss: float = 0.5) -> str:
    return f"{frames},{wall_s},100.0,4,{episode_return},20.0,10,{loss},1,2.0,\n"


def rows(*points: tuple[int, float]) -> list[dict[str, str]]:
    return [{"frames": str(frames), "wall_s": str(wall)} for frames, wall in points]


def frames_of(runs: list[list[dict[str, str]]]) -> list[list[int]]:
    return [[int(r["frames"]) for r in run] for run in runs]


def test_a_run_started_afresh_in_the_directory_is_a_run_of_its_own():
    first, second = ((100, 1.0), (200, 2.0), (300, 3.0)), ((100, 0.9), (200, 1.8))
    assert frames_of(split_runs(rows(*first, *second))) == [[100, 200, 300], [100, 200]]
    assert frames_of(split_runs(rows(*first))) == [[100, 200, 300]]
    assert split_runs([]) == []


def test_a_resumed_run_continues_its_curve_without_the_rows_it_collected_again():
    # checkpoint at 200 frames (2.0 s); the run wrote up to 400 frames before it was killed; the resumed run's
    # clock goes on from the checkpoint's, so wall_s goes back while frames go on from 200
    killed, resumed = ((100, 1.0), (200, 2.0), (300, 3.0), (400, 4.0)), ((300, 3.1), (400, 4.2), (500, 5.0))
    assert frames_of(split_runs(rows(*killed, *resumed))) == [[100, 200, 300, 400, 500]]
    (run,) = split_runs(rows(*killed, *resumed))
    assert [r["wall_s"] for r in run] == ["1.0", "2.0", "3.1", "4.2", "5.0"]  # the resumed run's rows
    # resumed, then the directory reused by a fresh run: two runs, the first one line
    fresh = ((100, 0.8), (200, 1.5))
    assert frames_of(split_runs(rows(*killed, *resumed, *fresh))) == [[100, 200, 300, 400, 500], [100, 200]]


def caught_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure the plot function closes
    return figures


def test_plot_run_draws_two_runs_of_one_metrics_csv_apart(tmp_path, monkeypatch):
    (tmp_path / "metrics.csv").write_text(
        METRICS + "".join(metrics_row(f, f / 100, f / 10) for f in (100, 200, 300))  # the first run
        + "".join(metrics_row(f, f / 110, f / 20, loss=0.25) for f in (100, 200)))  # started again in the dir
    figures = caught_figures(monkeypatch)
    assert plot_run(tmp_path).exists()
    top, bottom = figures[0].axes
    lines = {line.get_label(): list(line.get_xdata()) for line in top.get_lines()}
    assert lines["training episodes (mean per row) (run 1)"] == [100, 200, 300]
    assert lines["training episodes (mean per row) (run 2)"] == [100, 200]
    losses = [list(line.get_ydata()) for line in bottom.get_lines()]
    assert losses == [[0.5, 0.5, 0.5], [0.25, 0.25]]
    assert top.get_title() == f"{tmp_path.name}: 2 runs"


def write_scalars(path: Path, points: list[tuple[int, float, str, float]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("frames", "wall_s", "name", "value"))
        writer.writerows(points)


def test_plot_runs_counts_a_reused_directory_as_two_runs_and_a_resumed_one_as_one(tmp_path, monkeypatch):
    reused, resumed = tmp_path / "reused", tmp_path / "resumed"
    reused.mkdir()
    resumed.mkdir()
    write_scalars(reused / "scalars.csv", [(64, 0.5, "eval/return", 10.0), (128, 1.0, "eval/return", 20.0),
                                          (64, 0.4, "eval/return", 12.0), (128, 0.9, "eval/return", 30.0)])
    write_scalars(resumed / "scalars.csv", [(64, 0.5, "eval/return", 10.0), (128, 1.0, "eval/return", 20.0),
                                            (192, 1.5, "eval/return", 25.0),  # killed; checkpoint at 128 frames
                                            (192, 1.4, "eval/return", 26.0), (256, 2.0, "eval/return", 40.0)])
    assert read_runs(reused) == [{"eval/return": ([64.0, 128.0], [10.0, 20.0])},
                                 {"eval/return": ([64.0, 128.0], [12.0, 30.0])}]
    assert read_scalars(reused) == {"eval/return": ([64.0, 128.0], [12.0, 30.0])}  # the last run
    assert read_runs(resumed) == [{"eval/return": ([64.0, 128.0, 192.0, 256.0], [10.0, 20.0, 26.0, 40.0])}]

    figures = caught_figures(monkeypatch)
    plot_runs([reused, resumed], out=tmp_path / "runs.png", group="run")
    (ax,) = figures[0].axes
    lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert lines == {"reused (run 1 of 2)": [64, 128], "reused (run 2 of 2)": [64, 128],
                     "resumed": [64, 128, 192, 256]}
    plot_runs([reused], out=tmp_path / "seeds.png")  # grouped by pipeline: the two runs' mean and spread
    (ax,) = figures[1].axes
    assert "reused (mean of 2)" in [line.get_label() for line in ax.get_lines()]
