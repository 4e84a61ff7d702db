#!/usr/bin/env bash
# One-command check on one NVIDIA GPU (H100/H200 class; under 8 minutes there):
#   1. install the package with the CUDA build of jax, the test and the PyTorch reference extras;
#   2. run the parity and kernel tests on the GPU with float32 matmuls pinned to "highest" (not TF32);
#   3. train minimind3 (bf16), minimind3-moe and a ~1B shape a few steps each (tok/s, MFU, peak HBM, compile
#      time), then the KV-cache decode benchmark; every figure goes to one JSON.
# Usage: bash scripts/gpu_check.sh [OUT.json]   (default gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"

python -m pip install -q -e ".[cuda,dev,torch]"
python - <<'PY'
import jax
devices = jax.devices()
assert devices[0].platform == "gpu", f"no GPU visible to jax: {devices}"
print("jax", jax.__version__, "on", devices[0].device_kind, f"({len(devices)} device(s))")
PY

# Parity / kernel tests on the GPU; JAX_DEFAULT_MATMUL_PRECISION pins the tests' own float32 dots too.
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
    python -m pytest -q -x -p no:randomly tests/test_parity_torch.py tests/test_kernels.py tests/test_precision.py

JAX_PLATFORMS=cuda python scripts/bench.py gpu --steps 10 --json "$out"
echo "gpu check: all figures in $out"
