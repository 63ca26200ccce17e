#!/usr/bin/env bash
# plot_eval_test.sh [PYTHON] -- tools/plot_eval.py draws all four figures from the committed sample
# tests/data/eval_sample.json (each a PNG > 1 kB), and skips the sections a report leaves out.
# Exit 77 (skipped) when matplotlib is missing, unless BMOE_REQUIRE_TORCH is set (then a failure).
set -euo pipefail
python=${1:-/usr/bin/python3}
here=$(cd "$(dirname "$0")" && pwd)
script=$here/../tools/plot_eval.py
sample=$here/data/eval_sample.json

if ! "$python" -c "import matplotlib, json" 2>/dev/null; then
    if [[ -n "${BMOE_REQUIRE_TORCH:-}" ]]; then
        echo "FAIL: $python cannot import matplotlib (BMOE_REQUIRE_TORCH is set): run bash tools/install-deps.sh --tests"
        exit 1
    fi
    echo "SKIP: $python cannot import matplotlib"
    exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" "$script" "$sample" "$work/all"
for png in reliability roc stability expert_usage; do
    file=$work/all/$png.png
    test -f "$file" || { echo "FAIL: $png.png was not written"; exit 1; }
    size=$(stat -c %s "$file")
    ((size > 1024)) || { echo "FAIL: $png.png is only $size bytes"; exit 1; }
    echo "ok: $png.png ($size bytes)"
done

# A report with only the MCQA section: only reliability.png, and no error.
"$python" - "$sample" "$work/mcqa_only.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
json.dump({"config": report["config"], "mcqa": report["mcqa"]}, open(sys.argv[2], "w"))
PY
"$python" "$script" "$work/mcqa_only.json" "$work/partial"
test -f "$work/partial/reliability.png" || { echo "FAIL: reliability.png missing for an MCQA-only report"; exit 1; }
for png in roc stability expert_usage; do
    if test -e "$work/partial/$png.png"; then echo "FAIL: $png.png drawn without its section"; exit 1; fi
done
echo "plot_eval OK"
