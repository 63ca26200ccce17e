#!/usr/bin/env bash
# slurm_test.sh -- end-to-end tests of the launchers with a tiny 2-rank training run.
#
#   bash tests/slurm_test.sh BMOE_BIN [slurm]   # launch/bmoe.sbatch on a local Slurm cluster
#                                               # (tools/local-slurm.sh; 2 tasks on 1 node)
#   bash tests/slurm_test.sh BMOE_BIN run_local  # launch/run_local.sh -n 2
#   bash tests/slurm_test.sh BMOE_BIN run_local_error   # a bad flag under run_local.sh -n 2 must
#                                               # fail (non-zero, no hang) and say "error"
# A successful run must print "parallel: world 2" exactly once (only rank 0 prints) and
# "trained 3 steps". The slurm mode starts the cluster (installing Slurm with apt if missing) and
# stops it at the end only if it started it; it exits 77 (ctest: skipped) when Slurm cannot run
# here for a reason outside the project (not root, packages not installable, ports taken).
set -uo pipefail

bin="${1:?usage: slurm_test.sh BMOE_BIN [slurm|run_local|run_local_error]}"
mode="${2:-slurm}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d /tmp/bmoe-launch-test.XXXXXX)"
chmod 755 "$tmp"  # the job's output is written by slurmd (root here, but keep it readable)
tiny=(--model.d_model=32 --model.num_layers=1 --model.num_experts=4 --data.train_tokens=20000
      --data.batch_size=4 --data.seq_len=32 --train.steps=3 --train.eval_batches=1 --train.plot=false
      --train.out_dir="$tmp/run")

cleanup_steps=("rm -rf '$tmp'")
cleanup() {
  local i
  for ((i = ${#cleanup_steps[@]} - 1; i >= 0; i--)); do eval "${cleanup_steps[i]}" || true; done
}
trap cleanup EXIT

fail() { echo "FAIL: $*"; exit 1; }
skip() { echo "SKIP: $*"; exit 77; }

# The output of a successful 2-rank run: the rank-0-only lines, once each.
check_run_output() {
  local out="$1" n
  n="$(grep -c '^parallel: world 2 ' "$out" || true)"
  [[ "$n" == 1 ]] || fail "expected one 'parallel: world 2' line (rank 0 only), found $n"
  n="$(grep -c '^trained 3 steps' "$out" || true)"
  [[ "$n" == 1 ]] || fail "expected one 'trained 3 steps' line (rank 0 only), found $n"
  grep -q '^eval step 3 ' "$out" || fail "no 'eval step 3' line"
}

[[ -x "$bin" ]] || fail "$bin is not an executable"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

case "$mode" in
# ---------------------------------------------------------------------------------- run_local --
run_local)
  echo "== launch/run_local.sh -n 2 (tiny run)"
  BMOE_BIN="$bin" timeout 120 bash "$root/launch/run_local.sh" -n 2 "${tiny[@]}" >"$tmp/out.txt" 2>&1
  rc=$?
  cat "$tmp/out.txt"
  [[ $rc == 0 ]] || fail "run_local.sh exited with $rc$([[ $rc == 124 ]] && echo ' (timed out: hang?)')"
  check_run_output "$tmp/out.txt"
  echo "PASS"
  ;;
run_local_error)
  echo "== launch/run_local.sh -n 2 with a bad flag"
  start=$SECONDS
  BMOE_BIN="$bin" timeout 60 bash "$root/launch/run_local.sh" -n 2 "${tiny[@]}" --no.such_flag=1 >"$tmp/out.txt" 2>&1
  rc=$?
  cat "$tmp/out.txt"
  [[ $rc != 124 && $rc != 137 ]] || fail "no exit within 60 s (a rank hangs after the error)"
  [[ $rc != 0 ]] || fail "exit status 0 for a bad flag"
  grep -q 'error' "$tmp/out.txt" || fail "no 'error' in the output"
  echo "PASS (exit $rc after $(( SECONDS - start )) s)"
  ;;
# -------------------------------------------------------------------------------------- slurm --
slurm)
  slurm="$root/tools/local-slurm.sh"
  slurm_dir="${LOCAL_SLURM_DIR:-/tmp/local-slurm}"
  eval "$(bash "$slurm" env)"  # talk to the local cluster even if /etc/slurm/slurm.conf is foreign
  if bash "$slurm" status >/dev/null 2>&1; then
    echo "== local Slurm cluster already running: using it (will not stop it)"
  else
    [[ $EUID -eq 0 ]] || skip "the local Slurm cluster needs root (its daemons run as root)"
    echo "== starting the local Slurm cluster"
    bash "$slurm" start
    rc=$?
    if [[ $rc != 0 ]]; then
      bash "$slurm" stop || true  # whatever did start
      [[ $rc != 3 ]] || skip "Slurm is not installed and could not be installed with apt (offline?)"
      if grep -qs 'Address already in use' "$slurm_dir"/log/slurm*.log; then
        skip "the Slurm ports (LOCAL_SLURM_PORTS, default 6817 6818) are taken by another program"
      fi
      fail "tools/local-slurm.sh start failed (see the messages above)"
    fi
    cleanup_steps+=("bash '$slurm' stop")
  fi

  echo "== sbatch launch/bmoe.sbatch, 2 tasks on 1 node"
  # Command-line options override the template's #SBATCH defaults (sized for a real cluster).
  job="$(cd "$tmp" && sbatch --parsable --job-name=bmoe-test --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \
           --time=00:05:00 --output="$tmp/job.out" --export=ALL,BMOE_BIN="$bin" \
           "$root/launch/bmoe.sbatch" "${tiny[@]}")" || fail "sbatch refused the job"
  job="${job%%;*}"
  cleanup_steps+=("scancel '$job' 2>/dev/null")
  echo "job $job submitted"
  bash "$slurm" wait "$job" 180
  rc=$?
  echo "---- job output"
  cat "$tmp/job.out" 2>/dev/null || echo "(no output file $tmp/job.out)"
  echo "----"
  if [[ $rc != 0 ]]; then
    scontrol show job "$job" 2>/dev/null
    tail -n 20 "$slurm_dir/log/slurmd.log" 2>/dev/null
    fail "job $job did not complete with 0:0"
  fi
  check_run_output "$tmp/job.out"

  # Preemption: the notice (scancel --signal=USR1 --batch, as Slurm's --signal=B:USR1 sends it)
  # makes every rank checkpoint and exit 0; the same submission again resumes and finishes.
  echo "== preemption: SIGUSR1 to the batch shell, then resubmit"
  long=("${tiny[@]}" --train.steps=1500 --train.log_every=10 --train.out_dir="$tmp/preempt")
  submit() {
    (cd "$tmp" && sbatch --parsable --job-name=bmoe-preempt --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \
       --time=00:05:00 --output="$1" --export=ALL,BMOE_BIN="$bin" "$root/launch/bmoe.sbatch" "${long[@]}")
  }
  job="$(submit "$tmp/preempt1.out")" || fail "sbatch refused the preemption job"
  job="${job%%;*}"
  cleanup_steps+=("scancel '$job' 2>/dev/null")
  for _ in $(seq 1 600); do grep -qs '^step ' "$tmp/preempt1.out" && break; sleep 0.1; done
  grep -qs '^step ' "$tmp/preempt1.out" || fail "the preemption job never started training"
  scancel --signal=USR1 --batch "$job" || fail "scancel --signal=USR1 failed"
  bash "$slurm" wait "$job" 180 || { cat "$tmp/preempt1.out"; fail "signalled job $job did not end 0:0"; }
  grep -q 'stop signal received: checkpoint saved at step' "$tmp/preempt1.out" \
    || { cat "$tmp/preempt1.out"; fail "no checkpoint after SIGUSR1"; }
  grep -q '^trained 1500 steps' "$tmp/preempt1.out" && fail "the job finished before the signal"
  job="$(submit "$tmp/preempt2.out")" || fail "sbatch refused the resubmission"
  job="${job%%;*}"
  bash "$slurm" wait "$job" 240 || { cat "$tmp/preempt2.out"; fail "resubmitted job $job did not end 0:0"; }
  grep -q '^resume: .*at step' "$tmp/preempt2.out" || { cat "$tmp/preempt2.out"; fail "resubmission did not resume"; }
  grep -q '^trained 1500 steps' "$tmp/preempt2.out" || fail "the resumed job did not finish"
  echo "$(grep -o 'checkpoint saved at step [0-9]*' "$tmp/preempt1.out"), then $(grep -o '^resume: .*' "$tmp/preempt2.out")"
  echo "PASS"
  ;;
*) fail "unknown mode '$mode' (slurm, run_local or run_local_error)" ;;
esac
