#!/usr/bin/env bash
# The GPU checks as one run on a GPU machine that has torch and transformers but no network:
# install flexorch without its dependencies, run the CUDA tests, then benchmark 5 (bench_gpu.py).
# Logs and the benchmark's results go to $OUT (default benchmarks/results/gpu-run).
#
#     [TESTS="pytest -k expression"] bash benchmarks/gpu_checks.sh [bench_gpu.py arguments...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-benchmarks/results/gpu-run}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . 2>&1 | tail -3
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "from flexorch.orchestrator.cli import main; raise SystemExit(main(['probe']))" 2>&1 | tee "$out/probe.txt"

start=$SECONDS
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py ${TESTS:+-k "$TESTS"} 2>&1 \
    | grep -v "Loading weights" | tee "$out/test_gpu.log" | grep -v "^$" | tail -40
echo "tests: $((SECONDS - start)) s"

start=$SECONDS
# Without arguments: the run the committed results came from (about 4 minutes on an H100).
[ $# -gt 0 ] || set -- --accelerate-prompts 1 --loop-prompts 20 --grid-batch-tokens 2048,4096,8192,16384
(cd benchmarks && timeout "${BENCH_TIMEOUT:-300}" python3 bench_gpu.py "$@" 2>&1 | tee "$out/bench_gpu.log" \
    | grep -v "^generated ")
echo "bench_gpu: $((SECONDS - start)) s"
# auto's batch now against the grid just measured (no GPU needed: it re-plans on the run's figures)
for results in benchmarks/results/gpu-nvidia-*.json; do
    (cd benchmarks && python3 replan_gpu.py "../$results") 2>&1 | tail -12
done
cp benchmarks/results/gpu-*.json "$out/" 2>/dev/null
ls "$out"
