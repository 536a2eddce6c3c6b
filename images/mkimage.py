#!/usr/bin/env python3
"""Packs a root filesystem directory into a one-layer ``docker save`` tarball, without any
container engine or registry; ``ctr images import`` (containerd) and ``docker load`` read it.

    mkimage.py ROOTFS OUT.tar REF [--entrypoint JSON] [--cmd JSON] [--env K=V ...] [--user UID:GID]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
import tempfile


def _layer(rootfs: str, path: str) -> str:
    """Writes the layer tar (owners and modes as on disk, no timestamps that vary); its sha256."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(os.listdir(rootfs)):
            tar.add(os.path.join(rootfs, entry), arcname=entry, recursive=True, filter=_stable)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _stable(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0  # the same rootfs gives the same layer digest
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rootfs")
    p.add_argument("out")
    p.add_argument("ref", help="image reference, e.g. kvfabric/agent:0.1.0")
    p.add_argument("--entrypoint", type=json.loads, default=None)
    p.add_argument("--cmd", type=json.loads, default=None)
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--user", default="")
    p.add_argument("--workdir", default="/")
    a = p.parse_args()
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *a.env]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(a.out))) as tmp:
        layer_path = os.path.join(tmp, "layer.tar")
        diff_id = _layer(a.rootfs, layer_path)
        config: dict[str, object] = {"Env": env, "WorkingDir": a.workdir}
        if a.entrypoint is not None:
            config["Entrypoint"] = a.entrypoint
        if a.cmd is not None:
            config["Cmd"] = a.cmd
        if a.user:
            config["User"] = a.user
        cfg = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created_by": "images/mkimage.py"}],
            },
            sort_keys=True,
        ).encode()
        cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
        layer_name = diff_id.split(":")[1] + "/layer.tar"
        manifest = json.dumps([{"Config": cfg_name, "RepoTags": [a.ref], "Layers": [layer_name]}]).encode()
        partial = a.out + ".partial"
        with tarfile.open(partial, "w") as tar:
            tar.add(layer_path, arcname=layer_name)
            for name, data in ((cfg_name, cfg), ("manifest.json", manifest)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        os.replace(partial, a.out)  # never a half-written image under the final name
    print(f"{a.out}: {a.ref} {diff_id}")


if __name__ == "__main__":
    main()
