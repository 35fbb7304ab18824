#!/usr/bin/env bash
# The GPU checks for the GPT step, in one call of at most about 8.5 minutes on one H100/H200: the GPU tests,
# a profile of the 1B step (jdist straight-line and scan, and the plain step, kernels by kind), then the
# ablation (the cross-entropy, the scan remat with and without its CSE barrier, and straight-line twice
# to settle the jdist / plain ratio). Each part has its own time limit, so a slow one cannot starve the
# rest. Results go under $OUT (the device tool's output folder) or bench_results/: at most 8 files.
#
# Run from the repository root: bash benchmarks/gpu_session.sh
set -u
out=${OUT:-bench_results}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 JDIST_BENCH_OUT=$out
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import jax, optax, flax; print('jax', jax.__version__, 'optax', optax.__version__, 'flax', flax.__version__, jax.devices())"

echo "== GPU tests"
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log"

echo "== profile (1B)"
timeout 120 python3 benchmarks/gpu_profile.py --only 1b --variants straight scan1_dots_saveable --steps 5 \
  --keep-traces

echo "== ablation"
timeout 220 python3 benchmarks/gpu_gpt_ablate.py --rounds 5 --deadline 190 \
  --variants straight optax_ce scan1_dots_saveable scan1_dots_saveable_nocse straight \
  --variants-1b scan1_dots_saveable scan1_dots_saveable_nocse straight
