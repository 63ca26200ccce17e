#!/usr/bin/env bash
# gpu-check.sh -- the GPU machine's checks and benchmarks in one run, most important first, each
# stage skipped when the time budget would not cover it:
#   build (CUDA, NCCL), the gpu-labelled tests (CUDA vs CPU parity of every op and router family in
#   fp32 and bf16, CUDA training runs vs the CPU one, NCCL collectives on device buffers), the
#   multi-rank tests with ranks sharing the GPU (MPI communicator, host-staged), bmoe vs PyTorch
#   training throughput / MFU / peak memory on the GPT-2-small-sized MoE, grouped-GEMM and
#   permute benchmarks, the flash attention kernel, the router families' GPU cost, compute-sanitizer on a training step, the
#   card-filling model, fp32, torch.compile, NCCL comm-bench.
#   bash tools/gpu-check.sh [all|check|bench|profile]
#     check: build, tests, compute-sanitizer, comm-bench      bench: build, benchmarks only
#     profile: build bench_train only, then its per-op GPU time tables (--profile) for the presets
#   BMOE_GPU_CHECK_BUDGET: seconds the whole run may take (default 540)
#   BMOE_GPU_CHECK_OTHER : ctest -R regex of the CPU/MPI tests to run too (default: the multi-rank
#                          tests that put several ranks on one GPU)
# Summary lines go to stdout; every log goes to $OUT/gpu-check-logs.tgz (refreshed after each stage,
# so a run cut short still returns what it did). On a machine without Debian's packages, put Open
# MPI and HDF5 under .device/ with a .device/env.sh that adds them to PATH and LD_LIBRARY_PATH: the
# script sources it first. On a machine without a GPU every stage runs and fails or skips quickly,
# which checks the script itself (build, summary lines, logs) before a GPU session spends time on it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
phase="${1:-all}"
[[ $phase =~ ^(all|check|bench|profile)$ ]] || { echo "usage: gpu-check.sh [all|check|bench|profile]"; exit 2; }
out="${OUT:-/tmp/bmoe-gpu-check}"
logs="$(mktemp -d)/gpu-check-logs"
mkdir -p "$out" "$logs"
started=$SECONDS
export GTEST_COLOR=no  # plain "[  SKIPPED ]" lines for the counts below
budget="${BMOE_GPU_CHECK_BUDGET:-540}"
left() { echo $((budget - (SECONDS - started))); }
pack() { tar -czf "$out/gpu-check-logs.tgz" -C "$(dirname "$logs")" gpu-check-logs 2>/dev/null; }
# stage NAME NEEDED_SECONDS: false (and a line saying so) when less than NEEDED is left
stage() {
  pack
  if (($(left) < $2)); then echo "== $1: skipped ($(left) s left, needs ~$2 s)"; return 1; fi
  echo "== $1 ($(left) s left)"
}
# capped SECONDS LOG CMD...: runs CMD with a time cap, output to $logs/LOG; prints the exit status
capped() {
  local cap=$1 log=$2; shift 2
  ((cap > $(left) - 5)) && cap=$(($(left) - 5))
  timeout --kill-after=10 "$cap" "$@" >"$logs/$log" 2>&1
  local rc=$?
  ((rc == 124)) && echo "   (stopped after $cap s)"
  return $rc
}

if [[ -f .device/env.sh ]]; then source .device/env.sh >"$logs/env.log" 2>&1; fi
{ nvidia-smi; nvcc --version; g++ --version; cmake --version; uname -a; } >"$logs/machine.log" 2>&1
nvidia-smi -L
jobs=$(nproc)

# NCCL: the CUDA toolkit's copy, else the one in Python's nvidia-nccl wheel (PyTorch images)
nccl_args=()
if ! ls /usr/local/cuda/lib64/libnccl.so* /usr/local/cuda/lib/libnccl.so* >/dev/null 2>&1; then
  nccl_dir="$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)"
  if [[ -n $nccl_dir && -f $nccl_dir/include/nccl.h ]]; then
    nccl_lib="$(ls "$nccl_dir"/lib/libnccl.so* | head -1)"
    nccl_args=(-DBMOE_NCCL_LIBRARY="$nccl_lib" -DBMOE_NCCL_INCLUDE_DIR="$nccl_dir/include")
    export LD_LIBRARY_PATH="$nccl_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi

stage build 60 || exit 1
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBMOE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  "${nccl_args[@]}" >"$logs/configure.log" 2>&1 || { tail -40 "$logs/configure.log"; pack; exit 1; }
grep -E "bmoe: (NCCL|CUDA)" "$logs/configure.log"
targets=(); [[ $phase == profile ]] && targets=(--target bench_train)
cmake --build build-gpu -j "$jobs" "${targets[@]}" >"$logs/build.log" 2>&1 \
  || { grep -B2 -A12 -E "error|Error" "$logs/build.log" | head -80; pack; exit 1; }
echo "built in $((SECONDS - started)) s"

if [[ $phase == profile ]]; then
  for run in "gpt2-moe bf16" "large bf16" "gpt2-moe fp32"; do
    set -- $run
    stage "op profile: $1 $2" 40 || continue
    capped 120 "profile_$1_$2.log" ./build-gpu/bench/bench_train --backend cuda --model "$1" --precision "$2" \
      --steps 5 --warmup 2 --profile 3
    echo "exit $?"; grep -A45 -E "^(bmoe cuda:|profiled steps)" "$logs/profile_$1_$2.log" | grep -v '^JSON' \
      || tail -3 "$logs/profile_$1_$2.log"
  done
  pack; exit 0
fi

small="--model.d_model=64 --model.num_layers=2 --model.num_experts=4 --model.expert_hidden=96 --data.batch_size=4 \
  --data.seq_len=32 --data.train_tokens=20000 --train.eval_batches=1 --train.plot=false"

if [[ $phase != bench ]] && stage "gpu tests" 60; then
  capped 240 gpu_tests.log ctest --test-dir build-gpu -L gpu -j 4 -V
  grep -E "tests passed|\(Failed\)|\(Subprocess|Timeout|Not Run" "$logs/gpu_tests.log" | tail -25
  echo "   gtest cases: $(grep -cE '\[ +OK +\]' "$logs/gpu_tests.log") ok, $(grep -cE '\[ +SKIPPED +\]' \
    "$logs/gpu_tests.log") skipped, $(grep -cE '\[ +FAILED +\]' "$logs/gpu_tests.log") failed lines"
fi
if [[ $phase != bench ]] && stage "multi-rank tests, ranks sharing the GPU (MPI) + NCCL one rank" 40; then
  capped 180 mpi_tests.log ctest --test-dir build-gpu -LE gpu -j 4 -V \
    -R "${BMOE_GPU_CHECK_OTHER:-ep_equivalence|dispatcher|comm_bench|nccl}"
  grep -E "tests passed|\(Failed\)|\(Subprocess|Timeout" "$logs/mpi_tests.log" | tail -15
  grep -oE "\[ *(OK|SKIPPED|FAILED) *\] [A-Za-z]+\.[A-Za-z]*(Cuda|Nccl)[A-Za-z]*" "$logs/mpi_tests.log" | sort | uniq -c
fi

# GEMM kinds this cuBLAS refused (batched/grouped), each then run one GEMM per problem: slower
fallbacks() {
  local lines
  lines=$(grep -h "bmoe: this cuBLAS has no" "$logs"/*.log 2>/dev/null | sort | uniq -c)
  [[ -n $lines ]] && { echo "   cuBLAS fallbacks (one GEMM per problem):"; echo "$lines" | sed 's/^/   /'; }
  return 0
}
# result LOG REGEX: the log's last line matching REGEX, else its last error, else its last line
result() {
  grep -E "$2" "$logs/$1" | tail -1 | grep . || grep -iE "error|what\(\)" "$logs/$1" | tail -1 | grep . \
    || tail -1 "$logs/$1"
}
# bmoe vs PyTorch (same model, same batch, bf16 autocast vs bmoe bf16) on the GPT-2-small-sized MoE
bench_pair() {  # MODEL PRECISION [STEPS]
  local m=$1 p=$2 steps=${3:-10}
  capped 240 "bmoe_${m}_${p}.log" ./build-gpu/bench/bench_train --backend cuda --model "$m" --precision "$p" \
    --steps "$steps" --warmup 3 --profile 2
  echo "bmoe  $m $p (exit $?): $(result "bmoe_${m}_${p}.log" '^bmoe cuda: ')"
  grep -A12 -E "^profile \(per step" "$logs/bmoe_${m}_${p}.log" | sed 's/^/   /' 
  capped 150 "torch_${m}_${p}.log" env PYTHONUNBUFFERED=1 python3 bench/torch_bench.py --device cuda --model "$m" \
    --precision "$p" --steps "$steps" --warmup 3
  echo "torch $m $p (exit $?): $(result "torch_${m}_${p}.log" '^torch eager best')"
}
if [[ $phase != check ]] && stage "bmoe vs PyTorch eager: gpt2-moe bf16" 90; then bench_pair gpt2-moe bf16; fallbacks; fi
if [[ $phase != check ]] && stage "A/B: the same run with the earlier FAST_16BF GEMM inputs" 30; then
  capped 90 bmoe_gpt2-moe_fast16bf.log env BMOE_CUDA_BF16_GEMM=fast16bf BMOE_BF16_MLP_ACTIVATIONS=0 BMOE_BF16_LOGITS=0 \
    BMOE_BF16_WEIGHTS=0 BMOE_BF16_GEMM_INPUTS=0 ./build-gpu/bench/bench_train --backend cuda --model gpt2-moe --precision bf16 --steps 10 \
    --warmup 3
  echo "bmoe gpt2-moe bf16 fast16bf (exit $?): $(result bmoe_gpt2-moe_fast16bf.log '^bmoe cuda: ')"
fi
if [[ $phase != check ]] && stage "A/B: the same run with the MLP tensors stored in fp32" 30; then
  capped 90 bmoe_gpt2-moe_fp32act.log env BMOE_BF16_MLP_ACTIVATIONS=0 ./build-gpu/bench/bench_train --backend cuda \
    --model gpt2-moe --precision bf16 --steps 10 --warmup 3
  echo "bmoe gpt2-moe bf16 fp32 MLP tensors (exit $?): $(result bmoe_gpt2-moe_fp32act.log '^bmoe cuda: ')"
fi
if [[ $phase != check ]] && stage "A/B: the same run with fp32 logits, weights and dense inputs rounded per op" 30; then
  capped 90 bmoe_gpt2-moe_fp32logits.log env BMOE_BF16_LOGITS=0 BMOE_BF16_WEIGHTS=0 BMOE_BF16_GEMM_INPUTS=0 \
    ./build-gpu/bench/bench_train --backend cuda --model gpt2-moe --precision bf16 --steps 10 --warmup 3
  echo "bmoe gpt2-moe bf16 fp32 logits, per-op weight and input copies (exit $?): $(result bmoe_gpt2-moe_fp32logits.log '^bmoe cuda: ')"
fi
if [[ $phase != check ]] && stage "A/B: the same run with the routing plan built on the host" 30; then
  capped 90 bmoe_gpt2-moe_hostplan.log env BMOE_DEVICE_ROUTING_PLAN=0 ./build-gpu/bench/bench_train --backend cuda \
    --model gpt2-moe --precision bf16 --steps 10 --warmup 3
  echo "bmoe gpt2-moe bf16 host routing plan (exit $?): $(result bmoe_gpt2-moe_hostplan.log '^bmoe cuda: ')"
fi
if [[ $phase != check ]] && stage "grouped expert GEMM vs dense, permute bandwidth" 30; then
  capped 60 bench_cuda.log ./build-gpu/bench/bench_cuda
  grep -vE "^\s*$" "$logs/bench_cuda.log" | tail -20
fi
if [[ $phase != check ]] && stage "flash attention kernel: gpt2-moe bf16 (same model as above)" 50; then
  capped 120 bmoe_gpt2-moe_flash.log ./build-gpu/bench/bench_train --backend cuda --model gpt2-moe --precision bf16 \
    --attention flash --steps 10 --warmup 3 --profile 2
  echo "bmoe gpt2-moe bf16 flash (exit $?): $(result bmoe_gpt2-moe_flash.log '^bmoe cuda: ')"
  grep -A12 -E "^profile \(per step" "$logs/bmoe_gpt2-moe_flash.log" | sed 's/^/   /'
fi
if [[ $phase != check ]] && stage "bmoe (flash) vs PyTorch eager: gpt2-moe bf16, 8 micro-batches per optimizer step" 80; then
  capped 100 bmoe_gpt2-moe_accum8.log ./build-gpu/bench/bench_train --backend cuda --model gpt2-moe --precision bf16 \
    --attention flash --accumulate 8 --steps 3 --warmup 1
  echo "bmoe  gpt2-moe bf16 flash, accumulate 8 (exit $?): $(result bmoe_gpt2-moe_accum8.log '^bmoe cuda: ')"
  capped 120 torch_gpt2-moe_accum8.log env PYTHONUNBUFFERED=1 python3 bench/torch_bench.py --device cuda \
    --model gpt2-moe --precision bf16 --accumulate 8 --steps 3 --warmup 1
  echo "torch gpt2-moe bf16, accumulate 8 (exit $?): $(result torch_gpt2-moe_accum8.log '^torch eager best')"
fi
if [[ $phase != check ]] && stage "least memory: gpt2-moe bf16, flash attention + mlp recompute" 40; then
  capped 90 bmoe_gpt2-moe_lowmem.log ./build-gpu/bench/bench_train --backend cuda --model gpt2-moe --precision bf16 \
    --attention flash --recompute mlp --steps 5 --warmup 2
  echo "bmoe gpt2-moe bf16 flash + mlp recompute (exit $?): $(result bmoe_gpt2-moe_lowmem.log '^bmoe cuda: ')"
fi
if [[ $phase != check ]] && stage "router families on the GPU: step time vs topk; gpt2-moe bf16 with logit_mf" 60; then
  capped 90 bench_routers.log ./build-gpu/bench/bench_routers --backend cuda --steps 5 --warmup 1
  grep -E "^(router|topk|temp_sampling|mc_dropout|swag|ensemble|weight_mfvi|logit_mf|logit_fc|vtsr) " \
    "$logs/bench_routers.log" || tail -3 "$logs/bench_routers.log"
  capped 120 bmoe_gpt2-moe_logit_mf.log ./build-gpu/bench/bench_train --backend cuda --model gpt2-moe \
    --precision bf16 --router logit_mf --steps 10 --warmup 3 --profile 2
  echo "bmoe gpt2-moe bf16 logit_mf (exit $?): $(result bmoe_gpt2-moe_logit_mf.log '^bmoe cuda: ')"
  grep -A14 -E "^profile \(per step" "$logs/bmoe_gpt2-moe_logit_mf.log" | sed 's/^/   /'
  grep -E "^ *(router_|add_input_noise|dropout_mask)" "$logs/bmoe_gpt2-moe_logit_mf.log" | sed 's/^/   /'  # the router kernels
fi
if [[ $phase != bench ]] && stage "compute-sanitizer memcheck: 1 training step (bf16 topk flash learned positions, fp32 logit_fc)" 60; then
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo compute-sanitizer)
  for run in "topk bf16 flash learned" "logit_fc fp32 gemm rope"; do  # router precision attention position
    set -- $run  # (learned positions: the bf16 q, k, v path of the flash kernel)
    capped 90 "sanitizer_$1.log" "$sanitizer" --tool memcheck --error-exitcode 9 ./build-gpu/launch/bmoe train \
      --train.backend=cuda --train.precision=$2 --train.attention=$3 --model.position=$4 --router.type=$1 \
      --train.steps=1 $small --train.out_dir="$logs/sanitize_$1"
    echo "sanitizer $1 $2 $3 $4: exit $? ; $(result "sanitizer_$1.log" 'ERROR SUMMARY')"
  done
fi
if [[ $phase != check ]] && stage "bmoe vs PyTorch eager: large bf16" 150; then bench_pair large bf16 6; fi
if [[ $phase != check ]] && stage "bmoe vs PyTorch eager: gpt2-moe fp32" 90; then bench_pair gpt2-moe fp32 5; fi
if [[ $phase != check ]] && stage "bmoe with attention recompute: gpt2-moe bf16" 40; then
  capped 90 bmoe_recompute.log ./build-gpu/bench/bench_train --backend cuda --model gpt2-moe --precision bf16 \
    --recompute attention --steps 10 --warmup 3
  echo "bmoe gpt2-moe bf16 recompute=attention (exit $?): $(result bmoe_recompute.log '^bmoe cuda: ')"
fi
if [[ $phase != bench ]] && stage "comm-bench: NCCL collectives on device buffers, checked" 30; then
  capped 60 comm_bench.log ./build-gpu/launch/bmoe comm-bench --backend=cuda --comm=nccl --max-bytes 67108864 \
    --iters 10
  echo "comm-bench exit $?: $(grep -cE ' ok$' "$logs/comm_bench.log") sizes checked; $(tail -1 "$logs/comm_bench.log")"
fi
if [[ $phase != check ]] && stage "torch.compile: gpt2-moe bf16" 150; then
  capped 200 torch_compile.log env PYTHONUNBUFFERED=1 python3 bench/torch_bench.py --device cuda --model gpt2-moe \
    --precision bf16 --steps 10 --warmup 3 --compile
  echo "torch.compile gpt2-moe bf16 (exit $?): $(result torch_compile.log '^torch compile best')"
fi
fallbacks
pack
echo "gpu-check: done in $((SECONDS - started)) s; logs in $out/gpu-check-logs.tgz"
