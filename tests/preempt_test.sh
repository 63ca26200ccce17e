#!/usr/bin/env bash
# preempt_test.sh -- SIGTERM mid-training (what Slurm sends before preempting or at the time
# limit): the run saves a checkpoint after the current step and exits 0; the next run with
# --checkpoint.resume=auto finishes with bitwise the same final loss as an uninterrupted run.
#   tests/preempt_test.sh BMOE_BINARY
set -u
bmoe="$1"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
args=(--model.d_model=32 --model.num_layers=2 --model.num_experts=4 --model.expert_hidden=32
      --data.train_tokens=20000 --data.batch_size=4 --data.seq_len=32 --train.steps=300 --train.log_every=50
      --train.eval_batches=1 --train.plot=false)
fail() { echo "FAIL: $*"; for f in "$out"/*.log; do echo "--- $f"; tail -5 "$f"; done; exit 1; }
last_loss() { grep '"loss"' "$1/metrics.jsonl" | tail -1 | sed 's/.*"loss":\([^,]*\).*/\1/'; }

"$bmoe" train "${args[@]}" --train.out_dir="$out/full" >"$out/full.log" 2>&1 || fail "uninterrupted run failed"

"$bmoe" train "${args[@]}" --train.out_dir="$out/split" >"$out/split1.log" 2>&1 &
pid=$!
for _ in $(seq 1 200); do  # wait until a few steps are done, then send the signal
  [[ -f "$out/split/metrics.jsonl" && $(wc -l <"$out/split/metrics.jsonl") -ge 5 ]] && break
  sleep 0.05
done
kill -TERM "$pid"
wait "$pid"; rc=$?
[[ $rc -eq 0 ]] || fail "SIGTERM'd run exited $rc, expected 0"
grep -q "stop signal received: checkpoint saved at step" "$out/split1.log" || fail "no checkpoint on SIGTERM"
grep -q "^trained 300 steps" "$out/split1.log" && fail "the run finished before the signal; make it longer"

"$bmoe" train "${args[@]}" --train.out_dir="$out/split" --checkpoint.resume=auto >"$out/split2.log" 2>&1 \
  || fail "resumed run failed"
grep -q "^resume: " "$out/split2.log" || fail "the second run did not resume"
grep -q "^trained 300 steps" "$out/split2.log" || fail "the resumed run did not finish"
a="$(last_loss "$out/full")"; b="$(last_loss "$out/split")"
[[ "$a" == "$b" ]] || fail "final loss differs: uninterrupted $a, resumed $b"
echo "ok: $(grep -o 'checkpoint saved at step [0-9]*' "$out/split1.log"); final loss $b in both runs"
echo "1 passed, 0 failed"
