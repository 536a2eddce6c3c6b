#!/usr/bin/env bash
# Packs vLLM 0.26 (CUDA 13, sm_90) and the wheels it needs beyond what the GPU host already has
# into one xz archive split in parts of PART_MB (default 56) MiB, with their checksums, so they
# can travel to a GPU machine that has no package registry. The list is scripts/gpu/vllm-0.26-wheels.txt (see ../shared/KNOWN-FACTS.md).
# Usage: scripts/gpu/pack-vllm.sh OUT_DIR   (downloads are cached in ~/.cache/kvfabric/vllm-0.26)
set -euo pipefail
out=${1:?usage: pack-vllm.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
cache=${KVFABRIC_VLLM_CACHE:-$HOME/.cache/kvfabric/vllm-0.26}
part_mb=${PART_MB:-56}
# shellcheck source=platforms.sh
source "$(dirname "$0")/platforms.sh"
py=${PYTHON:-python3}

mkdir -p "$out"
"$here/fetch-wheels.sh" "$cache/wheels" "$here/vllm-0.26-wheels.txt"

site="$cache/site"
rm -rf "$site"
"$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" --python-version 3.12 \
  --implementation cp --only-binary=:all: "${platforms[@]}" "$cache"/wheels/*.whl
# What a dense model on sm_90 never loads (FlashAttention 3 is used; no MoE, no Blackwell).
rm -rf "$site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$site/vllm/third_party/fmha_sm100" \
  "$site/vllm/_moe_C_stable_libtorch.abi3.so" "$site"/vllm-rs* "$site/vllm/vllm-rs" "$site/bin"
find "$site" -path '*deep_gemm*' -name '_C.cpython-3*' ! -name '*cpython-312*' -delete

# One archive cut into parts that each fit a device call's carry limit (64 MiB with the tree);
# the parts stay on a warm machine between calls and unpack with `cat part* | xz -d | tar -x`.
rm -f "$out"/vllm26.tar.xz.part* "$out"/SHA256SUMS
tar -C "$site" -cf - . | xz -9 -T0 | split -b "${part_mb}M" -d - "$out/vllm26.tar.xz.part"
# The device side unpacks only once every part listed here has arrived intact.
(cd "$out" && sha256sum vllm26.tar.xz.part* >SHA256SUMS)
ls -l "$out"
