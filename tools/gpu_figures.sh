#!/usr/bin/env bash
# Issue 12's GPU figures in one command on the GPU machine (H200, 16 cores), with the wheels carried:
#
#   here:    bash ../shared/device/fetch-wheels.sh
#   device:  run(command="bash tools/gpu_figures.sh", carry=[".whl"], timeout_s=560)
#
# Writes under $OUT: tests.txt (the CUDA-graph tests), learner.txt (tools/bench_learner.py: streamrl vs a
# hand-written eager loop and the same loop captured in a CUDA graph), dqn.txt (DQN CartPole solved with the
# captured learner, seeds 0-2) and ppo_idp.txt (PPO InvertedDoublePendulum, 8 collector replicas, learner on
# CUDA). Each step has its own time limit so one slow step cannot eat the others' time.
set -u
OUT=${OUT:-/tmp/gpu_figures}
mkdir -p "$OUT"
. .whl/gpu-env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/machine.txt" 2>&1; nproc >> "$OUT/machine.txt"
timeout 90 python3 -m pytest -q tests/test_learner_update.py tests/test_device_replay.py tests/test_capture_safe.py \
  > "$OUT/tests.txt" 2>&1
timeout 120 python3 tools/bench_learner.py --seconds 2 --rounds 2 > "$OUT/learner.txt" 2>&1
timeout 200 python3 tools/bench_dqn.py --set device=cuda --set capture=graph > "$OUT/dqn.txt" 2>&1
timeout 130 streamrl run pipelines/ppo_inverted_double_pendulum.py --out /tmp/ppo_idp --set device=cuda \
  --set replicas=8 --set num_envs=5 --set total_frames=400000 > "$OUT/ppo_idp.txt" 2>&1
cp /tmp/ppo_idp/summary.json "$OUT/ppo_idp_summary.json" 2>/dev/null
tail -n 3 "$OUT"/*.txt
