#!/usr/bin/env bash
# One pass of every check that needs an NVIDIA GPU, sized to finish in under 8 minutes on an H100/H200:
# builds the extension against the CUDA torch, runs the GPU-marked tests, then the sampled-diagonal
# benchmarks on the GPU. Logs and results go to the folder given as the argument.
#   usage: bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUTDIR/NAME.log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$out/summary.txt"
}
{ nvidia-smi; $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } >"$out/env.txt" 2>&1
step build 120 $py setup.py build_ext --inplace
step tests 120 $py -m pytest -q -m gpu tests/test_gpu.py tests/test_distributed.py
step bench-encoder 180 $py benchmarks/sampled_diag.py --device cuda --model encoder --preset paper --slow-samples 25 \
  --repeats 3 --methods gradient,naive,torch_func,fasthess,fasthess-wide,fasthess-fwd_rev --out "$out"
step bench-seq2seq 100 $py benchmarks/sampled_diag.py --device cuda --model seq2seq --preset paper --slow-samples 25 \
  --repeats 3 --methods gradient,naive,fasthess,fasthess-wide --out "$out"
