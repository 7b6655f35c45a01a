#!/usr/bin/env bash
# One pass of every check that needs an NVIDIA GPU, sized to finish in under 8 minutes on an H100/H200:
# builds the extension against the CUDA torch (with the CUDA kernels), runs the GPU-marked tests (engines,
# then the Triton and CUDA attention / layer-norm / GELU kernels against the reference, in 4 pytest processes
# because Triton's cold JIT dominates that step), compute-sanitizer memcheck on the CUDA kernels, the kernel
# benchmark, then the sampled-diagonal benchmarks. Logs and results go to the folder
# given as the argument. Every step is fail-soft: it has its own time limit, its log OUTDIR/NAME.log and a
# line "NAME rc=.. seconds=.." in OUTDIR/summary.txt; a step that would start after the overall budget
# (BUDGET seconds, default 470) is recorded as skipped.
# It ends by packing OUTDIR into OUTDIR.tgz.
#   usage: bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FASTHESS_NINJA=${FASTHESS_NINJA:-1}
export PATH=$PATH:/usr/local/cuda/bin
py=${PYTHON:-python3}
budget=${BUDGET:-470}
start=$SECONDS
step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUTDIR/NAME.log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 20 ]; then
    echo "$name skipped (overall budget of ${budget}s spent)" | tee -a "$out/summary.txt"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "+ $*" >"$out/$name.log"
  timeout "$limit" "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))$([ $rc -eq 124 ] && echo " (timed out at ${limit}s)")" | tee -a "$out/summary.txt"
}
{ nvidia-smi; $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'triton', triton.__version__)"; which nvcc compute-sanitizer; nvcc --version; } >"$out/env.txt" 2>&1
# Step times of the last H200 run (benchmarks/results/gpu_check/summary.txt): build 27 s, tests 33, memchecks
# 10-11 each, bench-kernels 33, bench-encoder 89, bench-seq2seq 85; tests-kernels hit its limit at 150 s cold
# (44.7 s once Triton's cache was warm). Since then the GPU tests tripled (Triton/CUDA cross-entropy, linear and
# Hutchinson kernels, the CUDA attention HVP, absent-tangent variants), hence 8 processes (the machine has 16
# cores; Triton's cold JIT is CPU-bound). Kernel checks and benchmarks come first; the end-to-end benchmarks
# run in what is left of the budget (their earlier figures are in benchmarks/results/gpu_check/).
step build 200 $py setup.py build_ext --inplace
step backends 30 $py -c "from fasthess.kernels.attention import family, cuda_ext_available, triton_available; print('available:', family.available()); assert cuda_ext_available() and triton_available()"
step tests 120 $py -m pytest -q -m gpu tests/test_gpu.py tests/test_distributed.py
step tests-kernels 240 $py benchmarks/pytest_shards.py 8 -q -m gpu tests/test_gpu_kernels.py
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck-cuda 120 compute-sanitizer --tool memcheck --error-exitcode 9 $py benchmarks/attention_sanitize.py cuda
  step memcheck-cuda-rowwise 90 env FASTHESS_CUDA_ATTENTION_ROWWISE=1 \
    compute-sanitizer --tool memcheck --error-exitcode 9 $py benchmarks/attention_sanitize.py cuda
  step memcheck-cuda-pointwise 90 compute-sanitizer --tool memcheck --error-exitcode 9 $py benchmarks/pointwise_sanitize.py
else
  echo "memcheck-cuda skipped (no compute-sanitizer)" | tee -a "$out/summary.txt"
fi
step bench-kernels 180 $py benchmarks/kernels.py --device cuda --T 128,512,2048 --repeats 5 --out "$out"
step bench-hvp 60 $py benchmarks/kernels.py --device cuda --ops attention_hvp --T 128,512,2048 --repeats 5 --out "$out/hvp"
step bench-encoder 180 $py benchmarks/sampled_diag.py --device cuda --model encoder --preset paper --slow-samples 25 \
  --repeats 3 --methods gradient,naive,fasthess,fasthess-unfused,fasthess-fwd_rev --out "$out"
step bench-seq2seq 100 $py benchmarks/sampled_diag.py --device cuda --model seq2seq --preset paper --slow-samples 25 \
  --repeats 3 --methods gradient,naive,fasthess,fasthess-wide --out "$out"
echo "total seconds=$((SECONDS - start))" | tee -a "$out/summary.txt"
# one archive of everything beside the folder (for transports that bring back only a few files)
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && echo "archive: $out.tgz"
