#!/usr/bin/env bash
# Downloads, here where PyPI is reachable, the wheels that bench/device.sh needs on a machine that cannot fetch
# anything and lacks some of this project's dependencies (the lent H200's image has jax, flax, optax, chex, orbax,
# absl, numpy, pillow, tensorstore and etils, but not ml_collections, grain, array_record or portpicker).
# The versions are the ones installed here (what the tests ran with); the platform is CPython 3.12 on x86-64 Linux
# (the device image's Python). Usage, from anywhere:
#   bash bench/device_wheels.sh [DEST]        # DEST defaults to .whl/ in the repository root (ignored by git)
# Override the target with PY_VERSION (e.g. 3.11) when the machine's Python differs.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
packages=(ml_collections grain array_record portpicker)
pins=()
for p in "${packages[@]}"; do
  if ! v="$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null)"; then
    echo "error: $p is not installed here: install the project first (pip install -e .)" >&2
    exit 2
  fi
  pins+=("$p==$v")
done
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "${pins[@]}"
echo "wheels for ${pins[*]} in $dest"
