#!/usr/bin/env bash
# The speed issue's accelerator checks in one run (GPU or TPU), within 8 minutes:
#   1. the sampler in bf16 against fp32 on the tiny config (exit 1 if bf16 sampling is broken);
#   2. the Table 4 protocol for the 821M config in bf16: batch 100, T_draft 8 / 32 / 64, T_revise 2, M 2 (s/sample
#      of the codes), and decoding them to pixels with the ImageNet RQ-VAE (the official protocol's total adds it);
#   3. one 821M training step (forward + backward + AdamW) at the largest of 512 / 256 / ... / 32 that fits: time and
#      MFU (run last: T_draft 8, 64, 32 and the decode come first; a batch that does not fit costs a compile).
# A check that fails is logged with its traceback and the others still run (exit 1 at the end).
# Usage: bash bench/device.sh [extra bench flags, which override the defaults below]
#   e.g. on a CPU: JAX_PLATFORMS=cpu bash bench/device.sh --config=configs/imagenet.py:tiny --batch_size=4 \
#                    --t_draft=2,4 --train_batches=8,4 --rqvae_config=configs/rqvae_mnist.py
# TIMEOUT_S (default 480) bounds the whole run; --deadline_s (default 400, from the start) is when checks stop
# starting, and one starts only if the time left is 1.2x what the previous one of its kind took; a check still
# running at TIMEOUT_S - 15 s is cut, and the tables of the others are printed (exit status 3).
# PYTHON (default python3) is the interpreter. On a machine without some dependencies, carry their wheels:
# bench/device_wheels.sh (docs/speed.md, "Accelerator checks").
set -euo pipefail
cd "$(dirname "$0")/.."
# A rerun on the same machine reuses the compiled programs.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/ctxrq_jax_xla_cache}"
# The 821M config unless the caller names one (absl's config flag may be given once when overrides follow it).
config=(--config=configs/imagenet.py:821m)
for arg in "$@"; do
  case "$arg" in --config=*) config=() ;; esac
done
timeout_s="${TIMEOUT_S:-480}"
# At TIMEOUT_S - 15 s a check still running is cut and the tables of the others are printed (exit status 3).
exec timeout "$timeout_s" "${PYTHON:-python3}" -m ctxrq_jax.bench device "${config[@]}" \
  --batch_size=100 --t_draft=8,32,64 --t_revise=2 --num_revisions=2 --deadline_s=400 \
  --exit_by_s="$((timeout_s > 30 ? timeout_s - 15 : timeout_s))" "$@"
