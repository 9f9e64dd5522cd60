#!/usr/bin/env bash
# One prepared command for a lent GPU (or by hand on any CUDA machine), from the repository root:
#
#     bash bench/gpu_check.sh                 # results under $OUT (the device tool sets it), else ./gpu_out
#
# 1. installs fastrev editable (no deps, no build isolation: the device image has torch and triton, no registry);
#    wheels carried in .whl/ (e.g. diffusers, which that image lacks) are installed into /tmp/site first;
# 2. runs the CUDA tests: python -m pytest -m cuda tests -q;
# 3. runs the full benchmark (fastrev.bench: every registered step, shape, dtype and provider; the 50-step loop with
#    and without a CUDA graph), writing <device>-<date>.json, its PNG and RESULTS.md (the table) under $OUT; it
#    exits 1 when fastrev fails or disagrees with another provider (docs/benchmarks.md). To record the figures in
#    the repository afterwards: copy $OUT/RESULTS.md's section into bench/RESULTS.md (or rerun with
#    BENCH_ARGS=--update-results in a checkout).
# Sized for < 8 minutes on an H100: the benchmark gets what is left of BUDGET_S (default 420 s) after steps 1-2
# and stops starting new cases when that runs out (the cases left are listed as skipped in the JSON; the compile
# cases run last, so they are the ones dropped).
# diffusers is not in the device image: before the call, fetch its pure-Python wheel here and name .whl in `carry`
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# (its own dependencies are in the image), or the diffusers tests and the diffusers provider are skipped.
# Environment: PYTHON (default python3), BUDGET_S, TEST_TIMEOUT_S (default 200), BENCH_ARGS (extra arguments),
# BENCH_DEVICE (default cuda; cpu to rehearse the script without a GPU), SKIP_INSTALL=1 (already installed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-400}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-200}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
SECONDS=0

{
  echo "== $(date -u +%FT%TZ) gpu_check on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || true
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")' 2>&1
} >"$OUT/env.txt"
cat "$OUT/env.txt"

# -- 1. install
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$OUT/env.txt" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  echo "install skipped (SKIP_INSTALL=1)"
elif ! "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >>"$OUT/env.txt" 2>&1; then
  echo "editable install FAILED (see env.txt)"; tail -5 "$OUT/env.txt"
fi
"$PY" -c 'import fastrev, fastrev.kernels.reverse_step; print("fastrev", fastrev.__version__, "from", fastrev.__file__)' \
  2>&1 | tee -a "$OUT/env.txt"
"$PY" -c 'import diffusers; print("diffusers", diffusers.__version__)' >>"$OUT/env.txt" 2>&1 \
  || echo "diffusers missing: the diffusers provider is skipped (carry a wheel in .whl/ to include it)" | tee -a "$OUT/env.txt"
echo "[install done at ${SECONDS}s]"

# -- 2. CUDA tests: the GPU-only ones, then the kernel's CPU-interpreter suite on compiled code (same log file)
timeout -s INT "$TEST_TIMEOUT_S" "$PY" -m pytest -m cuda tests -v --durations=15 -p no:cacheprovider \
  >"$OUT/pytest_cuda.log" 2>&1
rc_cuda=$?
echo "pytest -m cuda: exit $rc_cuda (log: pytest_cuda.log) at ${SECONDS}s"
timeout -s INT "$TEST_TIMEOUT_S" "$PY" -m pytest tests/test_kernel.py -m "not cuda" -q --durations=5 \
  -p no:cacheprovider >>"$OUT/pytest_cuda.log" 2>&1
rc_kernel=$?
echo "pytest tests/test_kernel.py (compiled kernel vs float64 reference): exit $rc_kernel at ${SECONDS}s"
SUMMARY=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|(passed|failed).* in [0-9.]+s" "$OUT/pytest_cuda.log" | tail -2)
echo "$SUMMARY"

# -- 3. the benchmark, within what is left of the budget (20 s kept for a case in flight, the plot and the files)
LEFT=$(( BUDGET_S - SECONDS - 20 ))
[ "$LEFT" -lt 60 ] && LEFT=60
timeout -s INT $(( LEFT + 60 )) "$PY" -m fastrev.bench --device "${BENCH_DEVICE:-cuda}" --out "$OUT" \
  --budget-s "$LEFT" --kernel-report "$OUT/kernel_report.txt" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
rc=$?
echo "fastrev bench: exit $rc at ${SECONDS}s (log: bench.log)"
# the table last, so that the tail of this command's output carries it
if [ -s "$OUT/RESULTS.md" ]; then cat "$OUT/RESULTS.md"; else tail -40 "$OUT/bench.log"; fi
ls -la "$OUT"
echo "tests: cuda exit $rc_cuda, compiled-kernel suite exit $rc_kernel"; echo "$SUMMARY"
exit $(( rc | rc_cuda | rc_kernel ))
