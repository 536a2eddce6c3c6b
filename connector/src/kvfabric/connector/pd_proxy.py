"""A small prefill/decode proxy: each completion request goes to a prefill engine first (one
token, ``kv_transfer_params.do_remote_decode``), then to a decode engine with the prefill
response's ``kv_transfer_params`` (the connector's promise of the saved blocks), whose answer is
returned. vLLM's own disaggregation proxies and llm-d's routing sidecar speak the same
convention; this one exists because neither ships in a package installable here.

If the prefill engine fails or times out, the request goes to the decode engine without a
promise: it computes the prompt itself, and the request still succeeds.

    python -m kvfabric.connector.pd_proxy --prefill http://p:8000 --decode http://d:8000 --port 8100

Several ``--prefill``/``--decode`` URLs are used round-robin. Streaming responses are passed
through from the decode engine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("kvfabric.pd_proxy")

ROUTES = ("/v1/completions", "/v1/chat/completions")


class Proxy:
    def __init__(self, prefill: list[str], decode: list[str], prefill_timeout_s: float = 60.0) -> None:
        self._prefill: Iterator[str] = itertools.cycle(prefill)
        self._decode: Iterator[str] = itertools.cycle(decode)
        self.prefill_timeout_s = prefill_timeout_s
        self.stats = {"requests": 0, "prefill_failures": 0, "handoffs": 0}
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for route in ROUTES:
            app.router.add_post(route, self.handle)
        app.router.add_get("/stats", self.get_stats)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _: web.Application) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def _close(self, _: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def get_stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        self.stats["requests"] += 1
        params = await self._prefill_phase(request.path, body)
        decode_body = dict(body)
        if params is not None:
            decode_body["kv_transfer_params"] = params
            self.stats["handoffs"] += 1
        return await self._relay(request, next(self._decode) + request.path, decode_body)

    async def _prefill_phase(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The prefill engine computes (and saves) the prompt; its kv_transfer_params, or None."""
        assert self._session is not None
        prefill_body = {
            **body,
            "max_tokens": 1,
            "stream": False,
            "kv_transfer_params": {"do_remote_decode": True},
        }
        prefill_body.pop("max_completion_tokens", None)
        prefill_body.pop("stream_options", None)
        url = next(self._prefill) + path
        try:
            async with self._session.post(
                url, json=prefill_body, timeout=aiohttp.ClientTimeout(total=self.prefill_timeout_s)
            ) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
                reply = await r.json()
        except Exception as exc:  # the decode engine computes the prompt itself
            self.stats["prefill_failures"] += 1
            log.warning("prefill failed; decoding without a handoff", extra={"url": url, "error": str(exc)})
            return None
        params = reply.get("kv_transfer_params")
        return params if isinstance(params, dict) else None

    async def _relay(self, request: web.Request, url: str, body: dict[str, Any]) -> web.StreamResponse:
        assert self._session is not None
        async with self._session.post(url, json=body) as r:
            if not body.get("stream"):
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
            out = web.StreamResponse(status=r.status, headers={"Content-Type": r.content_type})
            await out.prepare(request)
            async for chunk in _chunks(r):
                await out.write(chunk)
            await out.write_eof()
            return out


async def _chunks(r: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in r.content.iter_any():
        yield chunk


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--prefill", action="append", required=True, help="a prefill engine's base URL")
    parser.add_argument("--decode", action="append", required=True, help="a decode engine's base URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--prefill-timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    proxy = Proxy(args.prefill, args.decode, args.prefill_timeout_s)
    log.info("pd proxy: %s", json.dumps({"prefill": args.prefill, "decode": args.decode, "port": args.port}))
    web.run_app(proxy.app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
