#!/usr/bin/env bash
# install-deps.sh -- install the Debian 12 packages bmoe needs (idempotent; < 1 s when all present).
#
#   bash tools/install-deps.sh            # build + run: compilers, CMake, Ninja, Open MPI, HDF5,
#                                         # OpenBLAS, GoogleTest, CLI11, nlohmann-json, matplotlib
#   bash tools/install-deps.sh --tests    # + PyTorch/NumPy/h5py (reference tests) and the text
#                                         # corpora (fortunes in en/de/es/ru)
# CUDA is optional and not installed here: the CUDA backend is built whenever nvcc is found.
set -euo pipefail

want_tests=0
for arg in "$@"; do
  case "$arg" in
    --tests) want_tests=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install-deps.sh: unknown argument '$arg' (use --tests or nothing)" >&2; exit 2 ;;
  esac
done

pkgs=(
  g++ make cmake ninja-build pkg-config git
  openmpi-bin libopenmpi-dev
  libhdf5-dev libhdf5-openmpi-dev hdf5-tools
  libopenblas-openmp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libcli11-dev nlohmann-json3-dev
  python3 python3-numpy python3-matplotlib
)
if [[ "$want_tests" == 1 ]]; then
  pkgs+=(python3-torch python3-h5py fortunes fortunes-de fortunes-es fortunes-ru)
fi

missing=()
for p in "${pkgs[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == "install ok installed" ]] || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#pkgs[@]} packages present"
  exit 0
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
  SUDO="sudo"
fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -q >/dev/null
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
echo "install-deps: done"
