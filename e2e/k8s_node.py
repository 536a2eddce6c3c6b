"""A real Kubernetes node on this machine for tests: containerd + runc (Debian), the kubelet
(v1.20.2, built by ``scripts/k8s/build-control-plane.sh``) and the project's images (built by
``scripts/k8s/build-images.sh``, imported into containerd; no registry anywhere).

It leaves the machine as it found it (KNOWN-FACTS, "A real kubelet", has why each setting is
needed):

- no host sysctl changed: the kubelet is built to warn about kernel tunables, the CNI bridge is
  created here with ``isGateway: false`` (so the bridge plugin never turns on ``ip_forward``) and
  no masquerading;
- no iptables rule: ``makeIPTablesUtilChains: false``, no kube-proxy (pods are reached by their
  IPs on the bridge, or run on the host network);
- nothing leaves the machine: the bridge has no uplink and no forwarding, images are never pulled;
- every process, mount, network namespace (under containerd's state directory, not /run/netns),
  cgroup and directory it made is removed by :meth:`Node.stop`; :func:`machine_state` is what
  the tests compare before and after.

Only one node can run on a machine at a time (the node is named after the hostname and owns the
``kubepods`` cgroups): a lock file makes a second one wait. Whoever takes the lock
(:meth:`Node.claim`) first removes what a node that was killed before its stop left behind: its
processes, mounts, pod veths and bridge, and what it made (from its ``node-state.json``), so a
killed run never changes what the next one measures.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from e2e.k8s_cluster import CACHE, NODE_TOKEN, ControlPlane, available, node_name, terminate
from e2e.netns import mount_points

IMAGE_CACHE = Path(os.environ.get("KVFABRIC_IMAGE_CACHE", Path.home() / ".cache" / "kvfabric" / "images"))
# containerd's content and snapshots survive between runs (images are imported once per change)
CONTAINERD_ROOT = CACHE.parent / "node" / "containerd"
LOCK = CACHE.parent / "node" / "lock"
BRIDGE = "kvfabric0"
SUBNET = "10.88.0.0/16"
GATEWAY = "10.88.0.1/16"
KUBELET_HEALTHZ = "http://127.0.0.1:20248/healthz"
SYSCTLS = ("net/ipv4/ip_forward", "vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
IMAGES = ("pause", "agent", "operator", "vllm-cpu")
# Directories made at fixed places (by the runtime, and by the kubelet for the agents' and engines'
# hostPath volumes); removed at stop only if they did not exist before.
RUNTIME_DIRS = (
    Path("/run/containerd"),
    Path("/var/lib/cni"),
    Path("/run/kvfabric"),
    Path("/dev/shm/kvfabric"),
)
CGROUP_NAMES = ("kubepods",)
# In a node's directory: what it made on the host, for whoever reclaims it if it is killed.
STATE_FILE = "node-state.json"
# Mount points only a node of ours makes (containerd's state and the kubelet's root in its dir).
NODE_MOUNT_MARKS = ("/containerd-state/", "/kubelet/root")


def node_available() -> str:
    """Empty if a node can run here, else why not."""
    why = available(("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"))
    if why:
        return why
    if os.geteuid() != 0:
        return "a kubelet needs root (containerd, cgroups, mounts)"
    for tool in ("containerd", "ctr", "runc", "ip", "iptables-save"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/k8s/build-control-plane.sh installs it)"
    if not Path("/usr/lib/cni/bridge").exists():
        return "CNI plugins not installed (Debian package containernetworking-plugins)"
    if shutil.which("debootstrap") is None and not (IMAGE_CACHE / "base").exists():
        return "debootstrap not installed (scripts/k8s/build-control-plane.sh installs it)"
    try:
        import socket

        if not socket.gethostbyname(node_name()).startswith("127."):
            return f"the hostname {node_name()} does not resolve to a loopback address"
    except OSError:
        return f"the hostname {node_name()} does not resolve"
    return ""


def build_images() -> None:
    """Builds (or finds current) every image from the repository's sources: quick when nothing
    changed, about 5 minutes the first time (the engine image's vLLM)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "k8s" / "build-images.sh"
    r = subprocess.run([str(script)], capture_output=True, text=True, timeout=1800, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"build-images.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _iptables() -> str:
    """The host's iptables rules, without counters (they change with traffic)."""
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False).stdout
    return "\n".join(
        line.split(" [")[0] if line.startswith(":") else line
        for line in out.splitlines()
        if line and not line.startswith("#")
    )


def machine_state() -> dict[str, Any]:
    """What a node could change on the host: sysctls, iptables rules, mounts, network links and
    namespaces, cgroups. Compared before and after a test session."""
    sysctls = {s: Path("/proc/sys", s).read_text().strip() for s in SYSCTLS}
    shm = sorted(os.listdir("/dev/shm"))
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    return {
        "sysctls": sysctls,
        "iptables": _iptables(),
        "mounts": mount_points(),
        "links": sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()),
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [],
        "cgroups": sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_NAMES[0]}")),
        "dev_shm": shm,
        "dirs": sorted(str(p) for p in RUNTIME_DIRS if p.exists()),
    }


def state_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The parts of two :func:`machine_state` readings that differ, as ``(before, after)``."""
    return {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def assert_machine_unchanged(before: dict[str, Any], what: str) -> None:
    """Fails naming ``what`` and each difference if the machine is not as ``before`` says."""
    changed = state_changes(before, machine_state())
    assert not changed, f"{what} left the machine changed: {changed}"


def stop_all(*parts: Node | ControlPlane | None) -> None:
    """Stops each part in order (None: never started), the later ones also when an earlier stop
    raises; the first error is raised once all were stopped."""
    errors: list[BaseException] = []
    for part in parts:
        if part is not None:
            try:
                part.stop()
            except BaseException as exc:
                errors.append(exc)
    if errors:
        raise errors[0]


class Node:
    """containerd + kubelet registered with ``cp`` (which must be ``ControlPlane(for_node=True)``)."""

    def __init__(self, workdir: Path, cp: ControlPlane) -> None:
        self.dir = workdir
        self.cp = cp
        self.name = node_name()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.socket = workdir / "containerd.sock"
        self._lock: IO[str] | None = None
        self._existed: dict[Path, bool] = {}
        self._cgroups_existed = True

    # -- start -------------------------------------------------------------------------------

    def claim(self) -> Node:
        """Takes the machine's node lock (one node per machine, see the module doc), then removes
        what a killed earlier node left. Measure :func:`machine_state` after this, not before."""
        if self._lock is not None:
            return self
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        reclaim_killed_nodes(self.dir)
        self._existed = {p: p.exists() for p in RUNTIME_DIRS}
        self._cgroups_existed = bool(_kubepods_cgroups())
        self.dir.mkdir(parents=True, exist_ok=True)
        made = {
            "dirs": [str(p) for p, e in self._existed.items() if not e],
            "cgroups": not self._cgroups_existed,
        }
        (self.dir / STATE_FILE).write_text(json.dumps(made))
        return self

    def start(self, timeout: float = 180.0) -> Node:
        self.claim()
        self._bridge()
        self._containerd()
        self._import_images()
        self._kubelet()
        self._wait_ready(timeout)
        return self

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=600)

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)

    def _bridge(self) -> None:
        """The pod network's bridge, made here so the CNI bridge plugin never acts as a gateway
        (which would turn on the host's ip_forward); no uplink, so pods reach only this machine."""
        self._run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._run("ip", "addr", "add", GATEWAY, "dev", BRIDGE)
        self._run("ip", "link", "set", BRIDGE, "up")
        conf = self.dir / "cni" / "net.d"
        conf.mkdir(parents=True, exist_ok=True)
        network = {
            "cniVersion": "0.4.0",
            "name": "kvfabric-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": False,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.dir / "cni" / "ipam"),
                        "ranges": [[{"subnet": SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "loopback"},
            ],
        }
        (conf / "10-kvfabric.conflist").write_text(json.dumps(network))

    def _containerd(self) -> None:
        CONTAINERD_ROOT.mkdir(parents=True, exist_ok=True)
        (self.dir / "containerd.toml").write_text(
            f"""version = 2
root = "{CONTAINERD_ROOT}"
state = "{self.dir / "containerd-state"}"
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "kvfabric/pause:3.2"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # no CAP_SYS_RESOURCE here: lowering oom_score_adj fails every sandbox
  restrict_oom_score_adj = true
  # pod netns under the state dir: another job's bind mount of /run/netns cannot pin them
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{self.dir / "cni" / "net.d"}"
    max_conf_num = 1
"""
        )
        self._spawn("containerd", ["containerd", "--config", str(self.dir / "containerd.toml")])
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False).returncode != 0:
            if self.procs["containerd"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start; see {self.dir / 'containerd.log'}")
            time.sleep(0.2)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run("ctr", "-a", str(self.socket), "-n", "k8s.io", *args, check=check)

    def _import_images(self) -> None:
        """Imports each image tarball whose build key changed since it was last imported."""
        stamp = CONTAINERD_ROOT / "imported.json"
        done: dict[str, str] = json.loads(stamp.read_text()) if stamp.exists() else {}
        listed = self.ctr("images", "ls", "-q").stdout.split()
        for image in IMAGES:
            key = (IMAGE_CACHE / f"{image}.key").read_text()
            tag = self._tag(image)
            if done.get(image) == key and any(r == tag or r.endswith("/" + tag) for r in listed):
                continue
            self.ctr("images", "import", str(IMAGE_CACHE / f"{image}.tar"))
            done[image] = key
            stamp.write_text(json.dumps(done))

    @staticmethod
    def _tag(image: str) -> str:
        """The reference an image tarball carries (containerd lists it with its default domain)."""
        with tarfile.open(IMAGE_CACHE / f"{image}.tar") as tar:
            member = tar.extractfile("manifest.json")
            assert member is not None
            return str(json.load(member)[0]["RepoTags"][0])

    def _kubelet(self) -> None:
        k = self.dir / "kubelet"
        k.mkdir(parents=True, exist_ok=True)
        (k / "kubeconfig").write_text(self.cp.kubeconfig_text(NODE_TOKEN))
        (k / "config.yaml").write_text(
            """apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 20250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 20248
cgroupDriver: cgroupfs
failSwapOn: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
podPidsLimit: -1
maxPods: 50
# pods resolve through 127.0.0.1 in their own network namespace: no query leaves the machine
clusterDNS: ["127.0.0.1"]
clusterDomain: cluster.local
resolvConf: ""
containerLogMaxSize: 10Mi
makeIPTablesUtilChains: false
"""
        )
        self._spawn(
            "kubelet",
            [
                str(CACHE / "bin" / "kubelet"),
                f"--config={k / 'config.yaml'}",
                f"--kubeconfig={k / 'kubeconfig'}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{self.socket}",
                "--runtime-request-timeout=5m",
                f"--root-dir={k / 'root'}",
                f"--cert-dir={k / 'pki'}",
                "--v=1",
            ],
        )

    def _wait_ready(self, timeout: float) -> None:
        """The kubelet's own health first (a Ready node object may be left from before), then Ready."""
        deadline = time.monotonic() + timeout
        while True:
            if self.procs["kubelet"].poll() is not None:
                raise RuntimeError(f"kubelet exited; see {self.dir / 'kubelet.log'}")
            try:
                with urllib.request.urlopen(KUBELET_HEALTHZ, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("kubelet not healthy")
            time.sleep(0.5)
        while True:
            out = self.cp.kubectl(
                "get",
                "node",
                self.name,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                check=False,
            )
            if out.stdout.strip() == "True":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.name} not Ready; see {self.dir / 'kubelet.log'}")
            time.sleep(0.5)

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Removes every pod, then everything the node made on the host."""
        try:
            self._drain()
        finally:
            self._stop_processes()
            _unmount_under(str(self.dir) + "/", str(CONTAINERD_ROOT) + "/", "/run/containerd/")
            self._run("ip", "link", "del", BRIDGE, check=False)
            if not self._cgroups_existed:
                _remove_kubepods_cgroups()
            for path, existed in self._existed.items():
                if not existed:
                    shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(self.dir / "containerd-state", ignore_errors=True)
            (self.dir / STATE_FILE).unlink(missing_ok=True)
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _drain(self, timeout: float = 90.0) -> None:
        """Deletes every pod through the API (so the kubelet tears sandboxes down and CNI removes
        their veths), then waits until containerd runs no task."""
        if "kubelet" not in self.procs or self.procs["kubelet"].poll() is not None:
            return
        self.cp.kubectl(
            "delete", "daemonsets,deployments,replicasets", "--all", "-A", "--wait=false", check=False
        )
        self.cp.kubectl("delete", "pods", "--all", "-A", "--grace-period=1", "--wait=false", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
            pods = self.cp.kubectl("get", "pods", "-A", "-o", "name", check=False).stdout.split()
            if not tasks and not pods:
                return
            time.sleep(0.5)

    def _stop_processes(self) -> None:
        for name in ("kubelet", "containerd"):
            p = self.procs.get(name)
            if p is not None:
                terminate(p, 15)
        # shims (and the containers under them) outlive containerd: kill those of our socket
        for pid, argv in _processes():
            if str(self.socket) in argv:
                _kill_tree(pid)
        self.procs.clear()

    def kill(self) -> None:
        """What a killed test run leaves: the kubelet and containerd SIGKILLed, the lock released;
        shims, containers, mounts, veths, the bridge and cgroups stay (for the reclaim test)."""
        for p in self.procs.values():
            p.kill()
            p.wait()
        self.procs.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def reclaim_killed_nodes(mine: Path) -> None:
    """Removes what nodes killed before their stop left on the host. Called with the lock held, so
    every node directory other than ``mine`` that still has a process or a mount is a dead one's:
    its processes (kubelet, containerd, shims and their containers), its mounts, the pods' veths
    and the bridge, and the directories and cgroups its ``node-state.json`` says it made."""
    stale = _node_dirs() - {mine}
    for pid in processes_under(*stale):
        _kill_tree(pid)
    veths = _links_on(BRIDGE)
    # nothing of ours is mounted under the shared containerd root while we hold the lock
    _unmount_under(str(CONTAINERD_ROOT) + "/", *(str(d) + "/" for d in stale))
    for link in [*veths, BRIDGE]:  # a veth whose netns is gone is gone with it
        subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
    for d in stale:
        try:
            made = json.loads((d / STATE_FILE).read_text())
        except (OSError, ValueError):  # a node from before the state file: nothing more is known
            made = {}
        if made.get("cgroups"):
            _remove_kubepods_cgroups()
        for path in made.get("dirs", []):
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(d / "containerd-state", ignore_errors=True)
        (d / STATE_FILE).unlink(missing_ok=True)


def _node_dirs() -> set[Path]:
    """The directories of nodes of ours with something alive on the host: a mount at one of the
    places only a node makes, or a process whose arguments name a ``containerd.toml`` or
    ``containerd.sock`` beside a containerd config that uses our containerd root."""
    dirs = set()
    for m in mount_points():
        for mark in NODE_MOUNT_MARKS:
            if (i := m.find(mark)) > 0:
                dirs.add(Path(m[:i]))
    ours = f'root = "{CONTAINERD_ROOT}"'
    for _, argv in _processes():
        for a in argv:
            if a.endswith(("/containerd.sock", "/containerd.toml")) and "/" in a:
                d = Path(a[a.index("/") :]).parent
                with contextlib.suppress(OSError):
                    if ours in (d / "containerd.toml").read_text():
                        dirs.add(d)
    return dirs


def processes_under(*dirs: Path) -> list[int]:
    """The processes whose arguments name a path under one of ``dirs``."""
    marks = [str(d) + "/" for d in dirs]
    return [pid for pid, argv in _processes() if any(m in a for m in marks for a in argv)]


def _links_on(bridge: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True, check=False
    ).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def _unmount_under(*prefixes: str) -> None:
    """Every mount under ``prefixes``, deepest first (overlay rootfs, pod volumes, netns files,
    the kubelet's bind mount of its root dir)."""
    for _ in range(3):
        mounted = [m for m in mount_points() if m.startswith(prefixes)]
        if not mounted:
            return
        for m in sorted(mounted, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, check=False)


def _kubepods_cgroups() -> list[Path]:
    return list(Path("/sys/fs/cgroup").glob(f"*/{CGROUP_NAMES[0]}"))


def _remove_kubepods_cgroups() -> None:
    for top in _kubepods_cgroups():
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            _rmdir(d)
        _rmdir(top)


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):  # busy or not empty: a process of someone else's
        path.rmdir()


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, argv) of every process whose command line can be read."""
    procs = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        procs.append((int(proc.name), argv))
    return procs


def _kill_tree(pid: int) -> None:
    """SIGKILLs ``pid`` and its descendants (a shim and its containers)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children.get(p, [])
    for p in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
