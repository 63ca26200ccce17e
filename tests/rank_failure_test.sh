#!/usr/bin/env bash
# rank_failure_test.sh -- one rank failing mid-training ends the whole job quickly, non-zero,
# with a message naming the failing rank (no hang in the next collective).
#   tests/rank_failure_test.sh BMOE_BINARY MPIEXEC [MPIEXEC_FLAGS...]
set -u
bmoe="$1"; shift
out="$(mktemp -d)"
start=$(date +%s)
BMOE_FAIL_AT=1:2 timeout 60 "$@" -n 2 "$bmoe" train --model.d_model=32 --model.num_layers=1 \
  --model.num_experts=4 --data.train_tokens=20000 --data.batch_size=4 --data.seq_len=16 --train.steps=50 \
  --train.plot=false --train.out_dir="$out/run" >"$out/stdout" 2>"$out/stderr"
rc=$?
elapsed=$(( $(date +%s) - start ))
fail() { echo "FAIL: $*"; echo "--- stderr"; cat "$out/stderr"; exit 1; }
[[ $rc -ne 0 ]] || fail "job exited 0 although rank 1 failed"
[[ $rc -ne 124 ]] || fail "job hung until the 60 s timeout"
grep -q "bmoe\[rank 1@" "$out/stderr" || fail "no error line naming rank 1"
grep -q "injected failure in step 2" "$out/stderr" || fail "the rank's error message is missing"
echo "ok: job ended with exit $rc after ${elapsed}s; $(grep 'bmoe\[rank 1@' "$out/stderr" | head -1)"
echo "1 passed, 0 failed"
