"""A small client for any OpenAI-compatible chat endpoint: retries with backoff, reasoning kept apart from the answer.

It speaks plain HTTP (httpx) rather than going through the openai package so that the fields servers add beside
the standard ones (`reasoning_content`, `top_k`, `chat_template_kwargs`, a mixquant server's precisions) pass both
ways as they are.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass
from typing import Any

import httpx

# Overload and server-side failures are worth another try; any other 4xx means the request itself is wrong.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Errors no request in the run can get past: stop at once instead of recording them sample after sample.
FATAL_STATUSES = frozenset({401, 403, 404})


def normalize_base_url(url: str) -> str:
    """The OpenAI base URL (`http://host:port/v1`); a bare `http://host:port` gets the `/v1` it implies."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


class EndpointError(Exception):
    """A request that did not succeed; `retryable` says whether asking again later might."""

    def __init__(self, message: str, status: int | None, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after  # seconds the server asked us to wait (Retry-After), if it said

    @property
    def fatal(self) -> bool:
        return self.status in FATAL_STATUSES


@dataclass
class SamplingConfig:
    temperature: float | None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    # Qwen3-style chat templates read `enable_thinking`; None leaves the template's default and sends nothing.
    enable_thinking: bool | None = None

    def request_fields(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if v is not None and k != "enable_thinking"}
        if self.enable_thinking is not None:
            fields["chat_template_kwargs"] = {"enable_thinking": self.enable_thinking}
        return fields


@dataclass
class ChatResult:
    content: str  # the answer, reasoning removed
    reasoning: str | None
    completion_tokens: int | None
    prompt_tokens: int | None
    finish_reason: str | None


def split_reasoning(content: str, reasoning: str | None) -> tuple[str, str | None]:
    """Separate `<think>...</think>` from the answer when the server left the reasoning inside the content."""
    if "</think>" in content:
        thought, _, content = content.rpartition("</think>")
        reasoning = (reasoning or "") + thought.replace("<think>", "", 1)
    elif "<think>" in content:  # never closed: the response ran out of tokens while thinking, so there is no answer
        reasoning = (reasoning or "") + content.split("<think>", 1)[1]
        content = ""
    return content.strip(), reasoning


def parse_chat_response(payload: dict[str, Any]) -> ChatResult:
    choice = payload["choices"][0]
    message = choice.get("message") or {}
    # vLLM and SGLang call it reasoning_content, newer vLLM and OpenRouter reasoning.
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    content, reasoning = split_reasoning(message.get("content") or "", reasoning)
    usage = payload.get("usage") or {}
    return ChatResult(
        content=content,
        reasoning=reasoning,
        completion_tokens=usage.get("completion_tokens"),
        prompt_tokens=usage.get("prompt_tokens"),
        finish_reason=choice.get("finish_reason"),
    )


class ChatClient:
    """Chat completions against one endpoint, with at most `max_connections` requests in flight."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        max_connections: int = 64,
        timeout_s: float = 3600.0,
        max_retries: int = 8,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ):
        self.base_url = normalize_base_url(base_url)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def chat(self, body: dict[str, Any]) -> ChatResult:
        attempt = 0
        while True:
            try:
                return await self._post_chat(body)
            except EndpointError as error:
                if not error.retryable or attempt == self.max_retries:
                    raise
                await asyncio.sleep(error.retry_after if error.retry_after is not None else self._backoff(attempt))
                attempt += 1

    async def _post_chat(self, body: dict[str, Any]) -> ChatResult:
        try:
            response = await self._http.post("/chat/completions", json=body)
        except httpx.TransportError as error:  # refused, reset, timed out: the server may be restarting or overloaded
            raise EndpointError(f"{type(error).__name__}: {error}", status=None, retryable=True) from error
        if response.status_code != 200:
            raise EndpointError(
                f"HTTP {response.status_code}: {response.text[:500]}",
                status=response.status_code,
                retryable=response.status_code in RETRYABLE_STATUSES,
                retry_after=_seconds(response.headers.get("retry-after")),
            )
        try:
            return parse_chat_response(response.json())
        except (ValueError, KeyError, IndexError, TypeError) as error:  # a 200 without a completion in it
            raise EndpointError(f"malformed response: {response.text[:500]}", status=200, retryable=True) from error

    def _backoff(self, attempt: int) -> float:
        # Exponential with jitter, so that many requests failing together do not come back together.
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    async def server_info(self, model: str) -> dict[str, Any]:
        """What the server says about itself: its models, version and, for a mixquant server, the precisions it runs.

        Everything here is optional: a server without these endpoints is still evaluated, with nulls recorded.
        """
        info: dict[str, Any] = {"models": None, "version": None, "mixquant": None}
        models = await self._get_json("/models")
        if isinstance(models, dict) and isinstance(models.get("data"), list):
            entries = [entry for entry in models["data"] if isinstance(entry, dict)]
            info["models"] = [entry.get("id") for entry in entries]
            served = [entry for entry in entries if entry.get("id") == model] or entries[:1]
            if served and isinstance(served[0].get("mixquant"), dict):
                info["mixquant"] = served[0]["mixquant"]
        # /version lives at the server root, beside /v1.
        version = await self._get_json(self.base_url.removesuffix("/v1") + "/version")
        if isinstance(version, dict):
            info["version"] = version.get("version")
            if info["mixquant"] is None and isinstance(version.get("mixquant"), dict):
                info["mixquant"] = version["mixquant"]
        return info

    async def _get_json(self, url: str) -> Any:
        try:
            response = await self._http.get(url, timeout=10.0)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None


def _seconds(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:  # the HTTP-date form of Retry-After: fall back to our own backoff
        return None


@dataclass
class ModelClient:
    """One model on one endpoint with fixed sampling: what a benchmark asks its questions through."""

    client: ChatClient
    model: str
    sampling: SamplingConfig
    seed: int | None = None

    async def ask(self, prompt: str) -> ChatResult:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            **self.sampling.request_fields(),
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return await self.client.chat(body)
