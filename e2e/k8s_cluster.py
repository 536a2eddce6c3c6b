"""A real Kubernetes control plane on 127.0.0.1 for tests: etcd, kube-apiserver and
kube-controller-manager (v1.20.2, built by ``scripts/k8s/build-control-plane.sh``). Without a node
pods are scheduled objects that never run; DaemonSets, garbage collection, CRD validation and
admission webhooks are real. ``ControlPlane(dir, for_node=True)`` adds what a real kubelet needs
(kube-scheduler, service-account tokens with the CA, a token for the node); ``e2e/k8s_node.py``
runs the node.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from e2e.agent import free_port

CACHE = Path(os.environ.get("KVFABRIC_K8S_CACHE", Path.home() / ".cache" / "kvfabric" / "k8s"))
BIN = CACHE / "bin"
TOKEN = "kvfabric-admin-token"
NODE_TOKEN = "kvfabric-node-token"


def node_name() -> str:
    """The node's name: this machine's hostname (the kubelet's default; it must resolve to a
    loopback address, see KNOWN-FACTS)."""
    return socket.gethostname()


def helm_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for helm with its cache, config and data kept under ``home``."""
    env = dict(os.environ, **extra)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    return env


def available(binaries: tuple[str, ...] = ("kube-apiserver", "kube-controller-manager")) -> str:
    """Empty if the control plane (and ``binaries``) can run here, else why not."""
    missing = [b for b in binaries if not (BIN / b).exists()]
    if missing:
        return f"{', '.join(missing)} not built: run scripts/k8s/build-control-plane.sh"
    if shutil.which("etcd") is None:
        return "etcd not installed (Debian package etcd-server)"
    return ""


class ControlPlane:
    def __init__(self, workdir: Path, for_node: bool = False) -> None:
        self.dir = workdir
        self.for_node = for_node
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()
        self.kubeconfig = workdir / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "ab")
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=log))
        log.close()

    def start(self, timeout: float = 90.0) -> ControlPlane:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port = free_port(), free_port()
        self._spawn(
            "etcd",
            [
                "etcd",
                "--data-dir",
                str(d / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
            ],
        )
        tokens = f'{TOKEN},admin,admin,"system:masters"\n'
        if self.for_node:  # v1.20 has no Node authorizer binding for system:nodes under RBAC alone
            tokens += f'{NODE_TOKEN},system:node:{node_name()},{node_name()},"system:nodes,system:masters"\n'
        (d / "tokens.csv").write_text(tokens)
        subprocess.run(
            ["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
            check=True,
            capture_output=True,
        )
        self._spawn(
            "kube-apiserver",
            [
                str(BIN / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={d / 'certs'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                # pods that run need their service-account tokens; API-only tests do not
                *([] if self.for_node else ["--disable-admission-plugins=ServiceAccount"]),
                # the node is the machine's hostname (mapped to 127.0.0.1), never a routable address
                "--kubelet-preferred-address-types=Hostname,InternalIP",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.96.0.0/16",
            ],
        )
        self._wait_ready(timeout)
        self.kubeconfig.write_text(self.kubeconfig_text(TOKEN))
        self._spawn(
            "kube-controller-manager",
            [
                str(BIN / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--controllers=*,-csrsigning,-nodeipam",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                f"--service-account-private-key-file={d / 'sa.key'}",
                # the CA in every service-account token secret (in-cluster clients verify with it)
                f"--root-ca-file={self.ca_file}",
            ],
        )
        if self.for_node:
            self._spawn(
                "kube-scheduler",
                [
                    str(BIN / "kube-scheduler"),
                    f"--kubeconfig={self.kubeconfig}",
                    "--leader-elect=false",
                    "--port=0",
                    "--secure-port=0",
                ],
            )
        return self

    @property
    def ca_file(self) -> Path:
        """The apiserver's self-signed serving certificate (from --cert-dir): the CA clients trust."""
        return self.dir / "certs" / "apiserver.crt"

    def kubeconfig_text(self, token: str) -> str:
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: local\n  cluster:\n    server: {self.url}\n"
            f"    certificate-authority: {self.ca_file}\n"
            f"users:\n- name: user\n  user:\n    token: {token}\n"
            "contexts:\n- name: local\n  context:\n    cluster: local\n    user: user\n"
            "current-context: local\n"
        )

    def _wait_ready(self, timeout: float) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited; see logs in {self.dir}")
            try:
                req = urllib.request.Request(
                    self.url + "/readyz", headers={"Authorization": f"Bearer {TOKEN}"}
                )
                with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"kube-apiserver not ready after {timeout}s; see {self.dir}")

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = helm_env(self.dir / "helm", KUBECONFIG=str(self.kubeconfig))
        return subprocess.run(
            [str(BIN / "helm"), *args], capture_output=True, text=True, check=check, timeout=300, env=env
        )

    def stop(self) -> None:
        for p in reversed(self.procs):
            terminate(p, 20)
        self.procs.clear()


def terminate(p: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; waits for the exit."""
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
