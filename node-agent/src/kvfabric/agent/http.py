"""Admin HTTP: ``/healthz`` (process alive), ``/readyz`` (serving), ``/stats``, ``/metrics``, and
``POST /v1/lookup`` (how much of a prompt this node and the pool hold: :mod:`prefix_lookup`).

Handlers are ``async`` on purpose: they then run on the agent's loop thread, the only thread
that touches the index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvfabric.agent import prefix_lookup

if TYPE_CHECKING:
    from kvfabric.agent.server import Agent


def build_app(agent: Agent) -> FastAPI:
    app = FastAPI(title="kvfabric-agent", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> Response:
        if agent.fatal is not None:  # e.g. a lost CUDA context: restart me
            return PlainTextResponse(f"fatal: {agent.fatal}", status_code=503)
        return PlainTextResponse("ok")

    @app.get("/readyz")
    async def readyz() -> Response:
        if agent.serving:
            return PlainTextResponse("ready")
        return PlainTextResponse("not ready", status_code=503)

    @app.get("/stats")
    async def stats() -> JSONResponse:
        return JSONResponse(agent.stats())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(agent.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/lookup")
    async def lookup(query: prefix_lookup.PrefixQuery) -> JSONResponse:
        if agent.isolated:  # it would tell one tenant which prompts another's engines served
            return JSONResponse({"error": "prefix lookups serve shared tenancy only"}, status_code=403)
        try:
            return JSONResponse(await prefix_lookup.lookup(agent, query))
        except prefix_lookup.LookupRefused as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

    return app
