#!/usr/bin/python3
"""bmoe_ckpt.py -- read bmoe HDF5 checkpoints (checkpoints/FORMAT.md) into PyTorch.

    from bmoe_ckpt import load_checkpoint
    info, groups = load_checkpoint("runs/x/step_00000100.h5")
    w1 = groups["model"]["model.layers.0.block_sparse_moe.experts.w1"]   # torch.Tensor, global shape

Every dataset's crc32 attribute is verified the way the C++ reader does (zlib CRC-32 of the
little-endian float32 bytes); a mismatch raises CheckpointError ("corrupt").
CLI: /usr/bin/python3 tools/bmoe_ckpt.py CHECKPOINT  prints a summary (Debian's h5py/torch import
only with /usr/bin/python3).
"""
import sys
import zlib

import h5py
import numpy as np
import torch

FORMAT_VERSION = 1
CHECKSUM_ATTR = "crc32"


class CheckpointError(Exception):
    pass


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_info(f):
    """Root attributes as a dict: format_version, bmoe_version, step, config_toml, parent, extra."""
    attrs = f.attrs
    if "format_version" not in attrs:
        raise CheckpointError(f"{f.filename} is not a bmoe checkpoint (no format_version attribute)")
    info = {
        "format_version": int(attrs["format_version"]),
        "bmoe_version": _text(attrs.get("bmoe_version", "")),
        "step": int(attrs.get("step", 0)),
        "config_toml": _text(attrs.get("config_toml", "")),
        "parent": _text(attrs.get("parent", "")),
        "extra": {k[len("extra."):]: _text(v) for k, v in attrs.items() if k.startswith("extra.")},
    }
    return info


def _datasets(f):
    """(group, name, dataset) for every dataset; group = parent path without the leading '/'."""
    found = []

    def visit(path, obj):
        if isinstance(obj, h5py.Dataset):
            group, _, name = path.rpartition("/")
            found.append((group, name, obj))

    f.visititems(visit)
    return found


def load_checkpoint(path, verify=True):
    """Returns (info dict, {group: {name: torch.Tensor}}) with full (global-shape) tensors."""
    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise CheckpointError(f"cannot open checkpoint {path}: {e}") from e
    with f:
        info = read_info(f)
        if info["format_version"] != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format_version {info['format_version']}, this reader knows "
                f"{FORMAT_VERSION}: HINT: use the bmoe version that wrote it ({info['bmoe_version']})")
        groups = {}
        for group, name, ds in _datasets(f):
            array = np.ascontiguousarray(ds[()], dtype="<f4")
            if verify:
                stored = int(ds.attrs[CHECKSUM_ATTR])
                actual = zlib.crc32(array.tobytes())
                if stored != actual:
                    raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch in dataset "
                                          f"/{group}/{name} (stored crc32 {stored}, computed {actual})")
            groups.setdefault(group, {})[name] = torch.from_numpy(array.reshape(ds.shape).copy())
    return info, groups


def summary(path):
    info, groups = load_checkpoint(path)
    lines = [f"checkpoint {path}: format_version {info['format_version']}, bmoe {info['bmoe_version']}, "
             f"step {info['step']}, parent {info['parent'] or '(none)'}"]
    lines += [f"  extra.{k}: {v}" for k, v in sorted(info["extra"].items())]
    lines.append(f"  config_toml: {len(info['config_toml'])} bytes")
    total = 0
    for group in sorted(groups):
        for name, t in sorted(groups[group].items()):
            total += t.numel()
            lines.append(f"  /{group}/{name}  {tuple(t.shape)}  sum={t.double().sum().item():.6g}")
    lines.append(f"  {total} elements, all checksums ok")
    return "\n".join(lines)


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} CHECKPOINT.h5", file=sys.stderr)
        return 2
    try:
        print(summary(argv[1]))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
