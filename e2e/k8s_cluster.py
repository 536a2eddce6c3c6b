"""A real Kubernetes control plane on 127.0.0.1 for tests: etcd, kube-apiserver and
kube-controller-manager (v1.20.2, built by ``scripts/k8s/build-control-plane.sh``). No kubelet:
pods are scheduled objects that never run; DaemonSets, garbage collection, CRD validation and
admission webhooks are real.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from e2e.agent import free_port

CACHE = Path(os.environ.get("KVFABRIC_K8S_CACHE", Path.home() / ".cache" / "kvfabric" / "k8s"))
BIN = CACHE / "bin"
TOKEN = "kvfabric-admin-token"


def helm_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for helm with its cache, config and data kept under ``home``."""
    env = dict(os.environ, **extra)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    return env


def available() -> str:
    """Empty if the control plane can run here, else why not."""
    missing = [b for b in ("kube-apiserver", "kube-controller-manager") if not (BIN / b).exists()]
    if missing:
        return f"{', '.join(missing)} not built: run scripts/k8s/build-control-plane.sh"
    if shutil.which("etcd") is None:
        return "etcd not installed (Debian package etcd-server)"
    return ""


class ControlPlane:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
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
        (d / "tokens.csv").write_text(f'{TOKEN},admin,admin,"system:masters"\n')
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
                "--disable-admission-plugins=ServiceAccount",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.96.0.0/16",
            ],
        )
        self._wait_ready(timeout)
        # The apiserver's self-signed serving certificate (from --cert-dir) is the CA clients trust.
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: local\n  cluster:\n    server: {self.url}\n"
            f"    certificate-authority: {d / 'certs' / 'apiserver.crt'}\n"
            f"users:\n- name: admin\n  user:\n    token: {TOKEN}\n"
            "contexts:\n- name: local\n  context:\n    cluster: local\n    user: admin\n"
            "current-context: local\n"
        )
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
            ],
        )
        return self

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
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
