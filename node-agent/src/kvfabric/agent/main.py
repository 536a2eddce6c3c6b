"""``kvfabric-agent`` entry point: parse settings, start the pool, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

import uvicorn

from kvfabric.agent import logs
from kvfabric.agent.http import build_app
from kvfabric.agent.server import Agent, AgentStartError
from kvfabric.agent.settings import AgentSettings, SettingsError, load_settings

log = logging.getLogger(__name__)


def _bind_http(settings: AgentSettings) -> socket.socket:
    """Binds the admin port before anything else, so a taken port is a clean start error."""
    sock = socket.socket(socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.http_host, settings.http_port))
    except OSError as exc:
        sock.close()
        raise AgentStartError(
            f"cannot bind admin HTTP on {settings.http_host}:{settings.http_port}: {exc.strerror}"
        ) from exc
    return sock


async def run(settings: AgentSettings) -> None:
    http_sock = _bind_http(settings)
    agent = Agent(settings)
    try:
        await agent.start()
    except BaseException:
        http_sock.close()
        await agent.stop()
        raise
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(agent),
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http = asyncio.create_task(server.serve(sockets=[http_sock]))
    waits = [http, asyncio.create_task(stop.wait()), asyncio.create_task(agent.fatal_event.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        await agent.stop()
        await http
        for w in waits[1:]:
            w.cancel()
    if agent.fatal is not None:
        raise AgentFatal(agent.fatal)


class AgentFatal(RuntimeError):
    """The agent stopped because it could not go on (its supervisor restarts it)."""


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)
    try:
        asyncio.run(run(settings))
    except AgentStartError as exc:
        log.error("agent failed to start: %s", exc)
        return 1
    except AgentFatal as exc:
        log.error("agent stopped after a fatal error: %s", exc)
        return 70  # EX_SOFTWARE
    return 0


if __name__ == "__main__":
    sys.exit(main())
