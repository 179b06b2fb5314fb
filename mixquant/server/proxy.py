"""`mixquant proxy`: one OpenAI endpoint in front of prefill and decode instances (vLLM's disaggregated proxy protocol).

Per request, the next prefill instance (round-robin) gets a copy with `kv_transfer_params: {"do_remote_decode":
true}`, `max_tokens: 1` and `stream: false`; the `kv_transfer_params` of its answer go into the original request,
which the next decode instance answers, streamed or not, passed through as it comes. Any server that speaks this
protocol fits behind it (mixquant's, vLLM's), and the Mix-Quant release's proxy can front mixquant instances.

A prefill instance that cannot be reached or fails (5xx) is logged and counted, and the decode instance then
computes the prompt itself; one that refuses the request (4xx) answers the client. A client that leaves closes the
connections to both instances, which abort the request. With no prefill instances, requests go round-robin to the
decode instances as they are (co-located instances behind the same front, for comparisons).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from mixquant.server.errors import error_response
from mixquant.server.metrics import E2E_BUCKETS

logger = logging.getLogger(__name__)

FORWARDED_HEADERS = ("authorization", "x-request-id")
# what vLLM's toy proxy sends a prefill instance in kv_transfer_params
PREFILL_KV_TRANSFER_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                              "remote_block_ids": None, "remote_host": None, "remote_port": None}


@dataclass
class ProxyConfig:
    prefill_urls: list[str]
    decode_urls: list[str]
    connect_timeout: float = 10.0

    def __post_init__(self):
        if not self.decode_urls:
            raise ValueError("at least one decode instance is needed")
        for role, urls in (("prefill", self.prefill_urls), ("decode", self.decode_urls)):
            bad = [url for url in urls if not url.startswith(("http://", "https://"))]
            if bad:
                raise ValueError(f"{role} instances must be http:// or https:// URLs, got {', '.join(bad)}")
        self.prefill_urls = [url.rstrip("/") for url in self.prefill_urls]
        self.decode_urls = [url.rstrip("/") for url in self.decode_urls]


class ProxyMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("mixquant:proxy_requests", "Requests answered, by route and status.",
                                ["route", "status"], registry=self.registry)
        self.prefill_fallbacks = Counter(
            "mixquant:proxy_prefill_fallbacks", "Requests sent to a decode instance without prefilled KV because "
                                                "no prefill instance answered, by reason.", ["reason"],
            registry=self.registry)
        self.prefill_time = Histogram("mixquant:proxy_prefill_seconds", "Time a prefill instance took to answer.",
                                      buckets=E2E_BUCKETS, registry=self.registry)


class Proxy:
    def __init__(self, config: ProxyConfig):
        self.config = config
        self.metrics = ProxyMetrics()
        self.client: httpx.AsyncClient | None = None
        self._prefill = itertools.cycle(config.prefill_urls) if config.prefill_urls else None
        self._decode = itertools.cycle(range(len(config.decode_urls)))

    async def forward(self, request: Request, route: str) -> Response:
        try:
            body = await request.json()
        except ValueError as e:
            return error_response(400, f"the request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object")
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        headers.setdefault("x-request-id", uuid.uuid4().hex)  # the same id on both instances, as vLLM's proxy
        response = await cancel_on_disconnect(request, self._serve(route, body, headers))
        self.metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    async def _serve(self, route: str, body: dict, headers: dict[str, str]) -> Response:
        if self._prefill is None:
            return await self._decode_request(route, body, headers)
        kv_transfer_params, refusal = await self._prefill_request(route, body, headers)
        if refusal is not None:
            return refusal
        decode_body = {key: value for key, value in body.items() if key != "kv_transfer_params"}
        if kv_transfer_params is not None:
            decode_body["kv_transfer_params"] = kv_transfer_params
        return await self._decode_request(route, decode_body, headers)

    async def _prefill_request(self, route: str, body: dict,
                               headers: dict[str, str]) -> tuple[dict | None, Response | None]:
        """(kv_transfer_params for the decode instance, or None to have it compute the prompt; a refusal to pass
        on to the client)."""
        url = next(self._prefill)
        prefill_body = {**body, "kv_transfer_params": PREFILL_KV_TRANSFER_PARAMS, "stream": False, "max_tokens": 1}
        if "max_completion_tokens" in body:
            prefill_body["max_completion_tokens"] = 1
        for key in ("stream_options", "min_tokens"):
            prefill_body.pop(key, None)
        start = time.monotonic()
        try:
            response = await self.client.post(f"{url}{route}", json=prefill_body, headers=headers)
        except httpx.HTTPError as e:
            self._fall_back(url, "unreachable", f"{type(e).__name__}: {e}")
            return None, None
        self.metrics.prefill_time.observe(time.monotonic() - start)
        if response.status_code >= 500:
            self._fall_back(url, "error", f"status {response.status_code}: {response.text[:200]}")
            return None, None
        if response.status_code != 200:
            return None, Response(response.content, response.status_code, media_type="application/json")
        params = response.json().get("kv_transfer_params")
        if params is None:  # e.g. a vLLM prefill instance whose one token was EOS: nothing is held for us
            self._fall_back(url, "no_kv_transfer_params", "its answer has no kv_transfer_params")
        return params, None

    def _fall_back(self, url: str, reason: str, detail: str):
        self.metrics.prefill_fallbacks.labels(reason).inc()
        logger.warning("prefill instance %s: %s; the decode instance computes the prompt", url, detail)

    async def _decode_request(self, route: str, body: dict, headers: dict[str, str]) -> Response:
        first = next(self._decode)
        urls = self.config.decode_urls[first:] + self.config.decode_urls[:first]
        for url in urls:  # the next instance, or the one after it if it cannot be reached
            request = self.client.build_request("POST", f"{url}{route}", json=body, headers=headers)
            try:
                response = await self.client.send(request, stream=True)
                break
            except httpx.ConnectError as e:
                logger.warning("decode instance %s cannot be reached: %s", url, e)
        else:
            return error_response(502, f"no decode instance can be reached ({', '.join(urls)})")
        media_type = response.headers.get("content-type")
        if not body.get("stream") or response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            return Response(content, response.status_code, media_type=media_type)
        return StreamingResponse(passthrough(response), response.status_code, media_type=media_type)

    async def get_from_decode(self, route: str, request: Request) -> Response:
        url = self.config.decode_urls[next(self._decode)]
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        try:
            response = await self.client.get(f"{url}{route}", headers=headers)
        except httpx.HTTPError as e:
            return error_response(502, f"decode instance {url} cannot be reached: {e}")
        return Response(response.content, response.status_code, media_type=response.headers.get("content-type"))

    async def health(self) -> Response:
        """200 when every instance answers its /health with 200; else 503 naming those that do not."""
        urls = self.config.prefill_urls + self.config.decode_urls
        down = [url for url, ok in zip(urls, await asyncio.gather(*(self._healthy(url) for url in urls))) if not ok]
        if down:
            return error_response(503, f"instances not healthy: {', '.join(down)}")
        return Response(status_code=200)

    async def _healthy(self, url: str) -> bool:
        try:
            return (await self.client.get(f"{url}/health", timeout=5)).status_code == 200
        except httpx.HTTPError:
            return False


async def passthrough(response: httpx.Response) -> AsyncIterator[bytes]:
    """The decode instance's stream as it comes; closing it (the client left) makes the instance abort."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Runs `work`, cancelled (closing its connections to the instances) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    finally:
        watcher.cancel()


def build_proxy_app(config: ProxyConfig) -> FastAPI:
    proxy = Proxy(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        timeout = httpx.Timeout(None, connect=config.connect_timeout)  # generations take as long as they take
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            proxy.client = client
            yield

    app = FastAPI(title="mixquant proxy", lifespan=lifespan)
    app.state.proxy = proxy

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy.forward(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await proxy.forward(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await proxy.get_from_decode("/v1/models", request)

    @app.get("/health")
    async def health() -> Response:
        return await proxy.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_proxy(args) -> int:
    import uvicorn

    try:
        config = ProxyConfig(args.prefill, args.decode)
    except ValueError as e:
        print(f"mixquant proxy: {e}", file=sys.stderr)
        return 2
    prefill = ", ".join(config.prefill_urls) or "none (round-robin over the decode instances)"
    print(f"mixquant proxy: prefill {prefill} | decode {', '.join(config.decode_urls)} | "
          f"http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(build_proxy_app(config), host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    return 0
