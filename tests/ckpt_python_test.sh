#!/usr/bin/env bash
# ckpt_python_test.sh CHECKPOINT_TEST_BIN PYTHON BMOE_CKPT_PY -- the C++ writer and tools/bmoe_ckpt.py agree:
# checkpoint_test (CheckpointExport.WriteForPython) writes export.h5 + expected.json into a temp dir;
# Python loads the checkpoint (verifying crc32s), compares shapes and sums, and must reject a corrupted
# copy. Exit 77 (skipped) when h5py or torch is missing.
set -euo pipefail
test_bin=$1
python=${2:-/usr/bin/python3}
module=$3

if ! "$python" -c "import h5py, torch, numpy" 2>/dev/null; then
    echo "SKIP: $python cannot import h5py/torch/numpy"
    exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

BMOE_CKPT_EXPORT_DIR=$work "$test_bin" --gtest_filter=CheckpointExport.WriteForPython
test -f "$work/export.h5"

"$python" - "$module" "$work" <<'PY'
import importlib.util, json, shutil, sys
spec = importlib.util.spec_from_file_location("bmoe_ckpt", sys.argv[1])
bmoe_ckpt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bmoe_ckpt)
work = sys.argv[2]
expected = json.load(open(f"{work}/expected.json"))
info, groups = bmoe_ckpt.load_checkpoint(f"{work}/export.h5")
assert info["step"] == expected["step"], info
assert info["extra"] == {"world_size": "1"}, info
assert info["config_toml"] == "[model]\nhidden = 4\n", info
seen = 0
for key, want in expected["tensors"].items():
    group, _, name = key.rpartition("/")
    t = groups[group][name]
    assert list(t.shape) == want["shape"], (key, t.shape, want["shape"])
    flat = t.reshape(-1)
    assert abs(flat.double().sum().item() - want["sum"]) <= 1e-6 * max(1.0, abs(want["sum"])), key
    assert flat[0].item() == want["first"] and flat[-1].item() == want["last"], key
    seen += 1
assert seen == sum(len(g) for g in groups.values()), "unexpected extra datasets"
print(bmoe_ckpt.summary(f"{work}/export.h5"))

# A flipped element must be reported as corrupt.
import h5py, numpy as np
shutil.copy(f"{work}/export.h5", f"{work}/bad.h5")
with h5py.File(f"{work}/bad.h5", "r+") as f:
    ds = f["model/model.embed"]
    data = ds[()]
    data[0, 0] += 1.0
    ds[...] = data
try:
    bmoe_ckpt.load_checkpoint(f"{work}/bad.h5")
    raise SystemExit("corrupted checkpoint was accepted")
except bmoe_ckpt.CheckpointError as e:
    assert "corrupt" in str(e), e
print("python reader OK")
PY
