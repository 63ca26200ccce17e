#!/usr/bin/env bash
# gpu-check.sh -- the GPU machine's checks in one run: build with CUDA, run the gpu-labelled tests
# (CUDA vs CPU parity of every op, a CUDA training run vs the CPU one), the whole CPU/MPI suite,
# compute-sanitizer on training steps, and CUDA vs CPU training throughput.
#   bash tools/gpu-check.sh            # writes logs to $OUT (or /tmp/bmoe-gpu-check)
# On a machine without Debian's packages, carry the bundle from device-bundle.sh as .device/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/bmoe-gpu-check}"
mkdir -p "$out"
if [[ -f .device/env.sh ]]; then source .device/env.sh >/dev/null; fi
nvidia-smi -L
jobs=$(nproc)
cmake -S . -B build-gpu -G Ninja -DBMOE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 >"$out/configure.log" 2>&1 \
  || { tail -40 "$out/configure.log"; exit 1; }
cmake --build build-gpu -j "$jobs" >"$out/build.log" 2>&1 || { grep -B2 -A8 error "$out/build.log" | head -80; exit 1; }
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
echo "== compute-sanitizer (memcheck, 2 training steps on cuda)"
compute-sanitizer --tool memcheck --error-exitcode 9 ./build-gpu/launch/bmoe train --train.backend=cuda \
  --train.steps=2 $small --train.out_dir="$out/sanitize" >"$out/sanitizer.log" 2>&1
echo "sanitizer exit $? ; $(grep -E 'ERROR SUMMARY' "$out/sanitizer.log")"
bench="--model.d_model=256 --model.num_layers=4 --model.num_heads=4 --model.num_kv_heads=4 --model.num_experts=8 \
  --model.top_k=2 --model.expert_hidden=512 --data.batch_size=8 --data.seq_len=256 --train.eval_batches=1 \
  --train.plot=false --train.log_every=10"
echo "== grouped expert GEMM vs dense GEMM, permute/unpermute bandwidth (bench/bench_cuda.cpp)"
./build-gpu/bench/bench_cuda | tee "$out/bench_cuda.log"
echo "== throughput: bench config (vocab 256, seq 256, batch 8, d 256, 4 layers, 8 experts top-2, F 512), fp32"
for be in cuda cpu; do
  steps=40; [[ $be == cpu ]] && steps=10
  ./build-gpu/launch/bmoe train --train.backend=$be --train.steps=$steps $bench --train.out_dir="$out/bench_$be" \
    2>&1 | grep -E "^trained" | sed "s/^/$be: /"
done
