#!/usr/bin/env bash
# gpu-check.sh -- the GPU machine's checks in one run: build with CUDA, run the gpu-labelled tests
# (CUDA vs CPU parity of every op in fp32 and bf16, CUDA training runs vs the CPU one, the NCCL
# communicator on device buffers), the whole CPU/MPI suite (incl. several ranks sharing the GPU),
# compute-sanitizer on training steps (bf16, several router families), CUDA vs CPU throughput and
# MFU of a GPT-2-small-sized MoE (bench/bench_train.cpp presets).
#   bash tools/gpu-check.sh [all|check|bench]   # logs to $OUT (or /tmp/bmoe-gpu-check)
#     check: build, gpu tests, the CPU/MPI suite, compute-sanitizer, comm-bench (correctness)
#     bench: build (kept from a previous call on a warm machine), then the benchmarks only
#     all (default): both -- may exceed one 10-minute device call; split it into check + bench
# On a machine without Debian's packages, carry the bundle from device-bundle.sh as .device/.
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:-all}"
[[ $phase == all || $phase == check || $phase == bench ]] || { echo "usage: gpu-check.sh [all|check|bench]"; exit 2; }
out="${OUT:-/tmp/bmoe-gpu-check}"
mkdir -p "$out"
if [[ -f .device/env.sh ]]; then source .device/env.sh >/dev/null; fi
nvidia-smi -L
jobs=$(nproc)
cmake -S . -B build-gpu -G Ninja -DBMOE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 >"$out/configure.log" 2>&1 \
  || { tail -40 "$out/configure.log"; exit 1; }
cmake --build build-gpu -j "$jobs" >"$out/build.log" 2>&1 || { grep -B2 -A8 error "$out/build.log" | head -80; exit 1; }
if [[ $phase != bench ]]; then
  echo "== gpu tests"
  ctest --test-dir build-gpu -L gpu --output-on-failure >"$out/gpu_tests.log" 2>&1
  grep -E "tests passed|Failed|FAILED|Skipped" "$out/gpu_tests.log" | tail -15
  echo "== ${BMOE_GPU_CHECK_OTHER:-all other} tests"
  # BMOE_GPU_CHECK_OTHER: a ctest -R regex to run only some of the CPU/MPI tests (default: all)
  ctest --test-dir build-gpu -LE gpu -j 8 --output-on-failure ${BMOE_GPU_CHECK_OTHER:+-R "$BMOE_GPU_CHECK_OTHER"} \
    >"$out/cpu_tests.log" 2>&1
  grep -E "tests passed|\(Failed\)|Timeout" "$out/cpu_tests.log" | tail -15
  small="--model.d_model=64 --model.num_layers=2 --model.num_experts=4 --model.expert_hidden=96 --data.batch_size=4 \
    --data.seq_len=32 --data.train_tokens=20000 --train.eval_batches=1 --train.plot=false"
  echo "== compute-sanitizer (memcheck, 2 training steps on cuda: bf16 topk, fp32 logit_fc)"
  for router in "topk bf16" "logit_fc fp32"; do
    set -- $router
    compute-sanitizer --tool memcheck --error-exitcode 9 ./build-gpu/launch/bmoe train --train.backend=cuda \
      --train.precision=$2 --router.type=$1 --train.steps=2 $small --train.out_dir="$out/sanitize_$1" \
      >"$out/sanitizer_$1.log" 2>&1
    echo "sanitizer $1 $2: exit $? ; $(grep -E 'ERROR SUMMARY' "$out/sanitizer_$1.log")"
  done
  echo "== comm-bench: NCCL collectives on device buffers, checked (1 rank per GPU)"
  ./build-gpu/launch/bmoe comm-bench --backend=cuda --comm=nccl --max-bytes 67108864 --iters 10 \
    >"$out/comm_bench.log" 2>&1
  echo "comm-bench exit $?: $(grep -cE ' ok$' "$out/comm_bench.log") sizes checked; $(tail -1 "$out/comm_bench.log")"
fi
[[ $phase == check ]] && exit 0
bench="--model.d_model=256 --model.num_layers=4 --model.num_heads=4 --model.num_kv_heads=4 --model.num_experts=8 \
  --model.top_k=2 --model.expert_hidden=512 --data.batch_size=8 --data.seq_len=256 --train.eval_batches=1 \
  --train.plot=false --train.log_every=10"
echo "== grouped expert GEMM vs dense GEMM, permute/unpermute bandwidth (bench/bench_cuda.cpp)"
./build-gpu/bench/bench_cuda | tee "$out/bench_cuda.log"
echo "== throughput: bench config (vocab 256, seq 256, batch 8, d 256, 4 layers, 8 experts top-2, F 512)"
for run in "cuda fp32" "cuda bf16" "cpu fp32"; do
  set -- $run
  steps=40; [[ $1 == cpu ]] && steps=10
  ./build-gpu/launch/bmoe train --train.backend=$1 --train.precision=$2 --train.steps=$steps $bench \
    --train.out_dir="$out/bench_$1_$2" 2>&1 | grep -E "^trained" | sed "s/^/$1 $2: /"
done
echo "== MFU: GPT-2-small-sized MoE and a card-filling one (bench/bench_train.cpp presets)"
for run in "gpt2-moe bf16 none" "gpt2-moe fp32 none" "gpt2-moe bf16 attention" "large bf16 attention"; do
  set -- $run
  timeout 240 ./build-gpu/bench/bench_train --backend cuda --model $1 --precision $2 --recompute $3 --steps 10 \
    --warmup 3 >"$out/bench_train_$1_$2_$3.log" 2>&1
  echo "$1 $2 recompute=$3 (exit $?): $(grep -E '^bmoe cuda: ' "$out/bench_train_$1_$2_$3.log" | tail -1)"
done
