import pytest

from kvfabric.agent.settings import AgentSettings, SettingsError, load_settings, parse_bytes


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2GiB", 2 << 30),
        ("512MiB", 512 << 20),
        ("1GB", 10**9),
        ("4096", 4096),
        (123, 123),
        ("1.5Gi", 3 << 29),
    ],
)
def test_parse_bytes(text: object, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "2 GiBs", "-1", "lots", True])
def test_parse_bytes_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_flags_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFABRIC_POOL_SIZE", "64MiB")
    monkeypatch.setenv("KVFABRIC_HTTP_PORT", "1234")
    s = load_settings(["--pool-size", "128MiB", "--huge-pages"])
    assert s.pool_size == 128 << 20 and s.http_port == 1234 and s.huge_pages


def test_errors_name_key_flag_and_variable() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(["--pool-size", "1KiB", "--http-port", "70000"])
    text = str(err.value)
    assert "pool_size" in text and "--pool-size" in text and "KVFABRIC_POOL_SIZE" in text
    assert "http_port" in text


def test_to_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(["--pool-size", "64MiB", "--huge-pages", "--log-format", "json"])
    for key, value in s.to_env().items():
        monkeypatch.setenv(key, value)
    assert AgentSettings() == s


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--fabric-valkey", "valkey://10.0.0.1:6379/0"], "fabric_valkey and fabric_listen"),
        (["--fabric-listen", "10.0.0.2:7450"], "fabric_valkey and fabric_listen"),
        (
            [
                "--fabric-valkey",
                "valkey://v:6379",
                "--fabric-listen",
                "10.0.0.2:7450",
                "--fabric-tls-cert",
                "/c",
            ],
            "fabric_tls_cert, fabric_tls_key and fabric_tls_ca",
        ),
        (
            [
                "--fabric-valkey",
                "valkey://v:6379",
                "--fabric-listen",
                "10.0.0.2:7450",
                "--tenancy",
                "isolated",
            ],
            "shared tenancy only",
        ),
        (["--fabric-valkey", "valkey://v:6379", "--fabric-listen", "no-port"], "fabric_listen"),
    ],
)
def test_fabric_settings_come_whole_or_are_refused_with_the_reason(argv: list[str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        load_settings(argv)


def test_fabric_settings_accept_a_complete_set() -> None:
    s = load_settings(["--fabric-valkey", "valkeys://u:p@v:6380/0", "--fabric-listen", "0.0.0.0:7450"])
    assert (
        s.fabric_listen == "0.0.0.0:7450" and s.fabric_ucx_tls == "tcp" and s.fabric_pull_deadline_ms == 1000
    )


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--kv-events-replay-endpoint", "tcp://*:5558"], "needs kv_events_endpoint"),
        (["--kv-events-endpoint", "tcp://*:5557", "--tenancy", "isolated"], "shared tenancy only"),
        (["--kv-events-endpoint", "http://x"], "kv_events_endpoint"),
    ],
)
def test_kv_event_settings_that_cannot_work_are_refused(argv: list[str], why: str) -> None:
    with pytest.raises(SettingsError, match=why):
        load_settings(argv)
