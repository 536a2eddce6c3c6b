from pathlib import Path

import pytest

from kvfabric.connector.config import ConnectorConfig
from kvfabric.connector.errors import ConfigError


def test_defaults() -> None:
    c = ConnectorConfig.from_sources({}, environ={})
    assert c.socket_path == "/run/kvfabric/agent.sock"
    assert c.load_failure_policy == "recompute"


def test_extra_config_beats_environment() -> None:
    env = {"KVFABRIC_SOCKET_PATH": "/env.sock", "KVFABRIC_TIMEOUT_MS": "50"}
    c = ConnectorConfig.from_sources({"socket_path": "/x.sock"}, environ=env)
    assert c.socket_path == "/x.sock" and c.timeout_ms == 50


@pytest.mark.parametrize(
    ("extra", "key"),
    [({"timeout_ms": 0}, "timeout_ms"), ({"socket_pth": "/x"}, "socket_pth"), ({"load": "maybe"}, "load")],
)
def test_errors_name_the_key(extra: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"kv_connector_extra_config.{key}"):
        ConnectorConfig.from_sources(extra, environ={})


def test_readme_lists_every_connector_setting() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Connector settings", 1)[1].split("\n### ", 1)[0]
    missing = [name for name in ConnectorConfig.model_fields if f"`{name}`" not in section]
    assert not missing, f"README's connector settings table lacks {missing}"
