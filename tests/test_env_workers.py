"""Subprocess env workers that die or raise: clear errors naming the env and the worker, no hang, no orphans."""

import asyncio
import os
import re
import signal
import threading
import time

import numpy as np
import psutil
import pytest

import streamrl
from streamrl import MLP, EnvStage, GymEnv, Pipeline, PolicyStage, QValueActor, StageFailed
from streamrl.envs.workers import async_vector_env, describe_dead_workers
from streamrl.errors import EnvError, EnvWorkerDied
from streamrl.testing import CountFrames

FAILING = "streamrl.testing:streamrl/FailingCartPole-v0"


def children():
    """Descendant processes, except multiprocessing's resource tracker and fork server (see test_placement)."""
    from multiprocessing import forkserver, resource_tracker

    helpers = {forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid}
    return [c for c in psutil.Process().children(recursive=True) if c.pid not in helpers]


def env_workers(expected, stop, timeout=10.0):
    """The pids of the ``expected`` env worker processes once they run (``expected`` childless siblings); [] if
    ``stop`` is set first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        by_parent = {}
        for c in children():
            try:
                if not c.children():
                    by_parent.setdefault(c.ppid(), []).append(c.pid)
            except psutil.NoSuchProcess:
                pass
        for pids in by_parent.values():
            if len(pids) == expected:
                return sorted(pids)
        time.sleep(0.02)
    return []


def collector(p, env, *, frames_per_chunk=64, total_frames=None):
    p.add(EnvStage("env", env, frames_per_chunk=frames_per_chunk, total_frames=total_frames),
          PolicyStage("policy", QValueActor(MLP(2, in_features=4, num_cells=(8,)))), group="collect")
    p.connect("env.policy", "policy.requests", capacity=0)
    p.add(CountFrames("sink"))
    p.connect("env.chunks", "sink.chunks")


@pytest.fixture
def opened():
    """Makes reset subprocess envs; closes them after the test, even a failed one (no workers left for the next)."""
    made = []

    def make(num_envs=3, name="CartPole-v1", **kwargs):
        env = GymEnv(name, num_envs=num_envs, backend="subprocess", **kwargs)
        made.append(env)
        env.reset_arrays(seed=0)
        return env

    yield make
    for env in made:
        env.close()


def pids_of(env):
    return [p.pid for p in async_vector_env(env.vector_env).processes]


def actions(env):
    return np.zeros(env.num_envs, dtype=np.int64)


def step(env):
    """One step the way the env stage does it: step_async, await the workers, step_wait."""
    env.step_async(actions(env))
    asyncio.run(asyncio.wait_for(env.wait_ready(), 5))
    return env.step_wait()


def closes_fast(env, within=1.5):
    started = time.perf_counter()
    env.close()
    assert time.perf_counter() - started < within
    assert not children()


# -- the bar: a SIGKILLed worker ends the pipeline within 5 s, naming it ------------------------------------------
def test_a_subprocess_worker_killed_mid_run_ends_the_pipeline_within_5s_naming_it(tmp_path):
    p = Pipeline("killed")
    collector(p, GymEnv("CartPole-v1", num_envs=4, backend="subprocess"))  # no frame budget: only the kill ends it
    killed = {}
    run_ended = threading.Event()

    def kill():
        pids = env_workers(4, run_ended)
        if pids and not run_ended.wait(1.0):  # mid-run
            killed["pid"], killed["at"] = pids[1], time.perf_counter()
            os.kill(pids[1], signal.SIGKILL)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        with pytest.raises(StageFailed) as info:
            streamrl.run(p, tmp_path, handle_signals=False)
    finally:
        ended = time.perf_counter()
        run_ended.set()  # a killer still waiting must not kill another test's workers
        killer.join()
    assert ended - killed["at"] < 5
    message = str(info.value)
    assert info.value.stage == "env"
    assert isinstance(info.value.error, EnvWorkerDied)
    pattern = rf"subprocess worker \d \(pid {killed['pid']}\) died \(killed by signal SIGKILL\)"
    assert re.search(rf"stage 'env' failed: EnvWorkerDied: env 'CartPole-v1': {pattern}", message), message
    assert not children()


def test_an_env_that_raises_in_a_subprocess_worker_ends_the_pipeline_naming_the_worker(tmp_path):
    p = Pipeline("raises")
    stamp = tmp_path / "failed_at"
    collector(p, GymEnv(FAILING, num_envs=2, backend="subprocess", fail_at=300, stamp=str(stamp)))
    with pytest.raises(StageFailed, match=r"stage 'env' failed: EnvError: env 'streamrl\.testing:streamrl/"
                       r"FailingCartPole-v0': subprocess workers? 0 \(pid \d+\).* raised.*: "
                       r"RuntimeError: env exploded at step 300") as info:
        streamrl.run(p, tmp_path, handle_signals=False)
    assert time.time() - float(stamp.read_text()) < 2
    assert isinstance(info.value.error.__cause__, RuntimeError)  # the original, as gymnasium re-raised it
    assert not children()


def test_a_subprocess_pipeline_that_completes_leaves_no_worker_behind(tmp_path):
    p = Pipeline("completes")
    collector(p, GymEnv("CartPole-v1", num_envs=2, backend="subprocess"), total_frames=2_000)
    result = streamrl.run(p, tmp_path, handle_signals=False)
    assert result.exit_reason == "completed" and result.summary["frames"] >= 2_000
    assert not children()


# -- direct use ----------------------------------------------------------------------------------------------
def test_a_worker_killed_mid_step_raises_env_worker_died_at_step_wait_and_close_is_quick(opened):
    env = opened(3)
    assert describe_dead_workers(env.vector_env) is None
    pids = pids_of(env)
    os.kill(pids[1], signal.SIGSTOP)  # it cannot answer: the kill lands mid-step
    env.step_async(actions(env))
    os.kill(pids[1], signal.SIGKILL)
    started = time.perf_counter()
    asyncio.run(asyncio.wait_for(env.wait_ready(), 5))  # the dead worker's pipe ends the wait
    with pytest.raises(EnvWorkerDied, match=rf"env 'CartPole-v1': subprocess worker 1 \(pid {pids[1]}\) died "
                       r"\(killed by signal SIGKILL\); SIGKILL comes from outside the env") as info:
        env.step_wait()
    assert time.perf_counter() - started < 2
    assert info.value.env == "CartPole-v1" and info.value.workers == (1,)
    assert "subprocess worker 1" in describe_dead_workers(env.vector_env)
    closes_fast(env)


def test_a_worker_killed_between_steps_makes_step_and_reset_raise_env_worker_died(opened):
    env = opened(3)
    step(env)
    pid = pids_of(env)[2]
    os.kill(pid, signal.SIGKILL)
    pattern = rf"subprocess worker 2 \(pid {pid}\) died \(killed by signal SIGKILL\)"
    with pytest.raises(EnvWorkerDied, match=pattern):
        step(env)  # step_async finds the pipe broken
    with pytest.raises(EnvWorkerDied, match=pattern):
        env.step_arrays(actions(env))
    with pytest.raises(EnvWorkerDied, match=pattern):
        env.reset_arrays()
    closes_fast(env)


def test_an_env_that_raises_in_a_worker_names_the_worker_and_keeps_the_message(opened):
    env = opened(1, FAILING, fail_at=3)
    pid = pids_of(env)[0]
    step(env)
    step(env)
    with pytest.raises(EnvError, match=rf"env '{FAILING}': subprocess worker 0 \(pid {pid}\) raised: "
                       r"RuntimeError: env exploded at step 3\. gymnasium logged") as info:
        step(env)
    assert not isinstance(info.value, EnvWorkerDied)
    with pytest.raises(EnvWorkerDied, match=r"subprocess worker 0 \(pid \d+\) was shut down after its env raised"):
        step(env)  # a later step says so, instead of gymnasium's AttributeError on the closed pipe
    closes_fast(env)


def test_close_terminates_a_stuck_worker_instead_of_waiting_for_it(opened):
    env = opened(2)
    step(env)
    os.kill(pids_of(env)[0], signal.SIGSTOP)  # alive but never answers (SIGTERM waits too): close must kill it
    closes_fast(env, within=5)


def test_close_after_a_failed_step_left_a_call_pending_does_not_hang(opened):
    env = opened(2)
    pids = pids_of(env)
    env.step_async(actions(env))
    asyncio.run(asyncio.wait_for(env.wait_ready(), 5))
    os.kill(pids[0], signal.SIGKILL)  # its answer is in the pipe; gymnasium still waits on a step
    closes_fast(env)


def test_a_script_that_never_closes_a_pixel_env_still_exits():
    # SDL (pygame) catches SIGTERM in each rendering worker unless told not to; then the interpreter's exit, which
    # terminates and joins daemonic workers, waits forever.
    import subprocess
    import sys

    script = ("from streamrl import GymEnv\n"
              "env = GymEnv('CartPole-v1', num_envs=2, from_pixels=True, backend='subprocess')\n"
              "env.reset()\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDL_")}
    done = subprocess.run([sys.executable, "-c", script], env=clean, timeout=30, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "XDG_RUNTIME_DIR" not in done.stderr  # no display or sound card looked for
