#!/usr/bin/env bash
# The first measurements on a GPU box, in one command:
#
#     bench/gpu.sh [OUT_DIR]        # OUT_DIR defaults to ./gpu-bench-<date>
#
# runs `python -m asyncrl bench` with the learner on CUDA for DQN on Pong-v5, PPO on Pong-v5 and
# SAC on HalfCheetah-v5 (their configs/*.toml), then DQN on Pong with local against central
# inference (a sweep) and bench/forward_time.py (the acting step per batch size), writes each
# one's JSON (raw figures, medians, ratios) and table into OUT_DIR, with the machine's description (GPU, driver, torch, commit)
# in OUT_DIR/machine.txt. On a box without CUDA it says so in one line and exits 0.
#
# Time, measured on one H200 with 16 cores (2026-12-04, BENCHMARKS.md): the three benches took
# 199 s (DQN Pong ~75 s, PPO Pong and SAC ~60 s each: 45 s of measuring, 5 modes x 3 repeats x
# (1 s warm-up + 2 s), and the set-up: imports, CUDA's start, EnvPool pools, the learner mode's
# synthetic replay, the end-to-end trainer's fill to min_size_to_sample and its final
# evaluation). The inference sweep measures two benches with 4 worker processes (~130 s at 2
# repeats, ~180 s at 3) and forward_time ~20 s: ~6-7 minutes in all. GPU_SH_CORE=1 runs the three
# benches only (under the 5 minutes they were asked to fit). Each bench is capped at CAP_S (a
# sweep at twice that) so that a hang cannot hold the box; a capped bench leaves no JSON and is
# named at the end. The lowered min_size_to_sample (and SAC's random_steps) change when learning
# starts, not the steady-state rates measured.
#
# GPU_SH_DRY_RUN=1 runs the same commands on the CPU for a fraction of a second per mode: a
# check, on a box without a GPU, that the commands and overrides still work.
set -uo pipefail
OUT=${1:-./gpu-bench-$(date +%Y-%m-%d)}
case $OUT in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where it was called from
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}

if [ "${GPU_SH_DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu SECONDS_PER_MODE=0.5 REPEATS=1 CAP_S=600
else
    if [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != True ]; then
        echo "bench/gpu.sh: no GPU here (torch.cuda.is_available() is not True): nothing to measure"
        exit 0
    fi
    DEVICE=cuda SECONDS_PER_MODE=2 REPEATS=3 CAP_S=100
fi

mkdir -p "$OUT" || exit 1
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
    nproc | sed 's/^/cpu cores /'
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version()); [print(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} > "$OUT/machine.txt" 2>&1

# name | bench arguments (after the common ones)
BENCHES=(
    "dqn_pong|--config configs/dqn_pong.toml --set replay.min_size_to_sample=5000"
    "ppo_pong|--config configs/ppo_pong.toml"
    "sac_halfcheetah|--config configs/sac_halfcheetah.toml --set replay.min_size_to_sample=2000 --set algo.random_steps=2000"
    # four process actors, each worker's CPU forward (local) against one batched forward on the
    # GPU (central); a sweep is two benches, so it gets twice the cap
    "dqn_pong_inference|--config configs/dqn_pong.toml --set replay.min_size_to_sample=5000 --set actors.placement='process' --set actors.num_actors=4 --sweep actors.inference=local,central"
)
failed=()
start=$(date +%s)
[ "${GPU_SH_CORE:-0}" = 1 ] && BENCHES=("${BENCHES[@]:0:3}")
for entry in "${BENCHES[@]}"; do
    name=${entry%%|*}
    args=${entry#*|}
    t0=$(date +%s)
    echo "== $name: python -m asyncrl bench $args --set learner.device='$DEVICE' --seconds $SECONDS_PER_MODE --repeats $REPEATS"
    # shellcheck disable=SC2086  # $args is a list of words
    cap=$CAP_S; [[ $args == *--sweep* ]] && cap=$((2 * CAP_S))
    if ! timeout --signal=INT --kill-after=15 "$cap" "$PY" -m asyncrl bench $args \
            --set "learner.device='$DEVICE'" --seconds "$SECONDS_PER_MODE" --repeats "$REPEATS" \
            --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"; then
        failed+=("$name")
    fi
    [ -s "$OUT/$name.json" ] || [[ " ${failed[*]} " == *" $name "* ]] || failed+=("$name")
    echo "== $name: $(( $(date +%s) - t0 )) s"
done
# the acting step's cost per batch, CPU (one thread) and GPU: what central inference trades
if [ "${GPU_SH_CORE:-0}" != 1 ]; then
    echo "== forward_time: python bench/forward_time.py --config configs/dqn_pong.toml"
    timeout 120 "$PY" bench/forward_time.py --config configs/dqn_pong.toml --json "$OUT/forward_time.json" \
        2>&1 | tee "$OUT/forward_time.txt" || failed+=("forward_time")
fi
echo "bench/gpu.sh: $(( $(date +%s) - start )) s; results in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
    echo "bench/gpu.sh: no result for: ${failed[*]} (see $OUT/<name>.txt)"
    exit 1
fi
