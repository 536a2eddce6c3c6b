"""The operator's settings (--help) and the webhook certificate's rotation, with a real TLS server."""

from __future__ import annotations

import datetime
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from e2e.agent import free_port
from kvfabric.operator import webhook
from kvfabric.operator.certs import ServingCert
from kvfabric.operator.settings import OperatorSettings, load


def test_help_lists_every_setting_and_does_not_touch_a_cluster() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kvfabric.operator.main", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "KUBECONFIG": "/nonexistent"},
    )
    assert r.returncode == 0, r.stderr
    for name in OperatorSettings.model_fields:
        assert "--" + name.replace("_", "-") in r.stdout
    assert "KVFABRIC_" in r.stdout


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFABRIC_RESYNC_SECONDS", "5")
    monkeypatch.setenv("POD_NAMESPACE", "ops")
    s = load(["--agent-image", "me/agent:2"])
    assert (s.resync_seconds, s.agent_image, s.pod_namespace) == (5.0, "me/agent:2", "ops")
    assert s.webhook_hosts() == ["kvfabric-webhook.ops.svc", "kvfabric-webhook"]
    with pytest.raises(SystemExit):
        load(["--no-such-flag"])


def served_cert(port: int) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_rotation_publishes_old_and_new_then_serves_the_new_one() -> None:
    cert = ServingCert(["127.0.0.1"], days=1.0)
    port = free_port()
    server = webhook.server(
        port, str(cert.certfile), str(cert.keyfile), host="127.0.0.1", lookup=lambda ns, n: None
    )
    cert.context = server.config.ssl
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        first = served_cert(port)
        assert not cert.due() and cert.rotate_if_due() is False and cert.reload() is False
        # two thirds of the lifetime pass
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=17)
        assert cert.due(later)
        assert cert.rotate_if_due(later) is True
        bundle = cert.ca_bundle()
        assert bundle is not None
        pems = [p for p in bundle.split(b"-----END CERTIFICATE-----") if p.strip()]
        assert len(pems) == 2  # old and new, published before the new one is served
        assert served_cert(port).serial_number == first.serial_number  # not yet reloaded
        assert cert.reload() is True
        second = served_cert(port)
        assert second.serial_number != first.serial_number
        assert second.public_bytes(Encoding.PEM) in bundle
    finally:
        server.should_exit = True
        thread.join(10)
        cert.close()
    assert not Path(cert.certfile).exists()  # the private key does not outlive the operator


def test_files_from_cert_manager_are_reloaded_when_they_change(tmp_path: Path) -> None:
    from kvfabric.operator.certs import self_signed

    for i in range(2):
        crt, key = self_signed(["127.0.0.1"], 30)
        (tmp_path / "tls.crt").write_bytes(crt)
        (tmp_path / "tls.key").write_bytes(key)
        if i == 0:
            cert = ServingCert(["ignored"], cert_dir=str(tmp_path))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            cert.context = ctx
            assert cert.reload() is False and cert.ca_bundle() is None and cert.rotate_if_due() is False
            time.sleep(0.01)
    assert cert.reload() is True
    cert.close()
    assert (tmp_path / "tls.crt").exists()  # someone else's files are left alone
