#!/usr/bin/env bash
# Runs KVFabric's GPU tests and benchmarks on a lent GPU machine, from the repository root.
# Each call stages what it carried (parts of `make gpu-bundle`, the agent's wheels in .whl/,
# PegaFlow's in .whl-peg/) under /tmp, where they stay while the machine is warm; vLLM is
# unpacked once every part listed in .vllm26-all/SHA256SUMS has arrived.
#
#   scripts/gpu/device-run.sh stage                 # only stage (a call carrying one part)
#   scripts/gpu/device-run.sh tests [paths] [args]  # python -m pytest -m gpu (default: tests/gpu)
#   scripts/gpu/device-run.sh copy [args]           # benchmarks/gpu_copy.py
#   scripts/gpu/device-run.sh ours|peers [args]     # benchmarks/gpu_vllm.py (needs vLLM)
#   scripts/gpu/device-run.sh nvme [args]           # benchmarks/gpu_nvme.py
#   scripts/gpu/device-run.sh vllm-nvme [args]      # benchmarks/gpu_vllm.py nvme (needs vLLM)
#   scripts/gpu/device-run.sh cold [args]           # benchmarks/gpu_vllm.py cold (needs vLLM)
#   scripts/gpu/device-run.sh agent-start [args]    # benchmarks/gpu_agent_start.py
#   scripts/gpu/device-run.sh contexts              # benchmarks/gpu_contexts.py
#   scripts/gpu/device-run.sh sharing VARIANT [args] # benchmarks/gpu_sharing.py (needs vLLM)
set -euo pipefail
parts=/tmp/kvfabric/vllm-parts
vllm=/tmp/kvfabric/vllm26
mkdir -p "$parts"
pip_target() {  # DIR WHEEL...
  local dir=$1; shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dir" "$@"
}

# -- stage -----------------------------------------------------------------------------------------
if [ -d .vllm26-all ]; then
  cp .vllm26-all/SHA256SUMS .vllm26-all/vllm26.tar.xz.part* "$parts"/ 2>/dev/null || true
fi
if compgen -G ".whl/*.whl" >/dev/null; then pip_target /tmp/kvfabric/site .whl/*.whl; fi
if compgen -G ".whl-peg/*.whl" >/dev/null; then pip_target /tmp/kvfabric/peg .whl-peg/*.whl; fi
if [ ! -d "$vllm/vllm" ] && [ -f "$parts/SHA256SUMS" ] && (cd "$parts" && sha256sum --quiet -c SHA256SUMS >/dev/null 2>&1); then
  mkdir -p "$vllm"
  cat "$parts"/vllm26.tar.xz.part* | xz -d -T0 | tar -x -C "$vllm"
  echo "vLLM unpacked into $vllm"
fi

# -- run -------------------------------------------------------------------------------------------
what=${1:-stage}
shift || true
export PYTHONPATH="$vllm:/tmp/kvfabric/site:$PWD/node-agent/src:$PWD/connector/src:$PWD"
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
unset PYTORCH_CUDA_ALLOC_CONF  # vLLM refuses expandable_segments with a KV connector
case "$what" in
  stage) ls "$parts"; [ -d "$vllm/vllm" ] && echo "vLLM ready" || echo "vLLM not complete yet" ;;
  tests)  # test paths given: only those (else all of tests/gpu); other arguments go to pytest
    paths=(); opts=()
    for a in "$@"; do if [ -e "${a%%::*}" ]; then paths+=("$a"); else opts+=("$a"); fi; done
    [ ${#paths[@]} -gt 0 ] || paths=(tests/gpu)
    exec python3 -m pytest -p no:cacheprovider -q -m gpu "${opts[@]}" "${paths[@]}" ;;
  copy) exec python3 benchmarks/gpu_copy.py "$@" ;;
  nvme) exec python3 benchmarks/gpu_nvme.py "$@" ;;
  agent-start) exec python3 benchmarks/gpu_agent_start.py "$@" ;;
  contexts) exec python3 benchmarks/gpu_contexts.py "$@" ;;
  sharing) PYTHONPATH="$PYTHONPATH:/tmp/kvfabric/peg" exec python3 benchmarks/gpu_sharing.py "$@" ;;
  ours) exec python3 benchmarks/gpu_vllm.py ours "$@" ;;
  cold) exec python3 benchmarks/gpu_vllm.py cold "$@" ;;
  vllm-nvme) exec python3 benchmarks/gpu_vllm.py nvme "$@" ;;
  peers) PYTHONPATH="$PYTHONPATH:/tmp/kvfabric/peg" exec python3 benchmarks/gpu_vllm.py peers "$@" ;;
  *) echo "unknown command $what (stage, tests, copy, nvme, vllm-nvme, agent-start, contexts, sharing, ours, cold, peers)" >&2; exit 2 ;;
esac
