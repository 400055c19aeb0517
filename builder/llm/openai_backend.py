"""The OpenAI-compatible transport: one attempt of one chat completion, errors typed.

Works with OpenAI, Azure OpenAI's v1 endpoint, vLLM, Ollama and `transformers serve`:
the endpoint and key come from `OPENAI_BASE_URL` / `OPENAI_API_KEY`. The SDK's own retries
are off (`max_retries=0`): the call layer retries, so the policy is ours.

The SDK runs over its aiohttp HTTP client (`openai[aiohttp]`): at 32 requests in flight
its default httpx client alone costs ~4 % of the latency-bound rate on loopback, aiohttp
~1.5 % (`benchmarks/explain.py --http` compares them). aiohttp does not read proxy
settings from the environment, so where `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` is set
the httpx client (which honours them, and `NO_PROXY`) is used instead.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

from builder.errors import BuilderError
from builder.llm.limits import parse_retry_after
from builder.llm.types import FailureKind, LLMFailure, Request, Response, TransientError, Usage

RETRYABLE_STATUS = frozenset({408, 409, 429})
"""Plus every 5xx."""
CONTENT_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})


class EndpointError(BuilderError):
    """The LLM endpoint is not configured."""


class OpenAITransport:
    """`openai.AsyncOpenAI` with retries off; maps the SDK's outcomes onto the call layer's types."""

    def __init__(self, timeout: float, base_url: str | None = None, api_key: str | None = None,
                 http: str = "auto"):
        from openai import AsyncOpenAI, DefaultAioHttpClient, DefaultAsyncHttpxClient

        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        if api_key is None:
            if base_url is None:
                raise EndpointError(
                    "explain.backend=openai needs OPENAI_API_KEY (or OPENAI_BASE_URL for a local OpenAI-compatible "
                    "server); set them in the environment, or use --set explain.backend=offline"
                )
            api_key = "unused"  # local servers (vLLM, Ollama, transformers serve) accept any key
        self.base_url = base_url
        self.http = http_client_kind(http)
        http_client = {"aiohttp": DefaultAioHttpClient, "httpx": DefaultAsyncHttpxClient}[self.http](timeout=timeout)
        self._client = AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout,
                                   http_client=http_client)

    async def aclose(self) -> None:
        await self._client.close()

    async def send(self, request: Request) -> Response:
        import openai

        try:
            # The SDK's generic `post` sends our canonical JSON as is (serialised once, for the
            # cache key too) and hands back the parsed JSON; `chat.completions.create` would walk
            # every message part through its TypedDict transform, re-serialise, and build
            # pydantic models of the answer (~5 ms a request with images, which caps throughput).
            completion = await self._client.post(
                "/chat/completions",
                content=request.payload,
                options={"headers": {"Content-Type": "application/json"}},
                cast_to=object,  # the parsed JSON as is: no per-field model building
            )
        except openai.APITimeoutError as e:
            raise TransientError(f"timeout: {e}") from e
        except openai.APIConnectionError as e:
            raise TransientError(f"connection error: {e}") from e
        except openai.APIStatusError as e:
            status = e.status_code
            detail = f"HTTP {status}: {_error_message(e)}"
            if status in RETRYABLE_STATUS or status >= 500:
                raise TransientError(detail, parse_retry_after(e.response.headers)) from e
            if _error_code(e) in CONTENT_FILTER_CODES:
                raise LLMFailure(FailureKind.CONTENT_FILTER, detail) from e
            raise LLMFailure(FailureKind.HTTP_ERROR, detail) from e
        except (json.JSONDecodeError, openai.APIResponseValidationError) as e:
            # A torn or garbled body (proxy hiccup): a resend usually gets a good one.
            raise TransientError(f"malformed response body: {str(e)[:200]}") from e
        return response_from_completion(completion)


def http_client_kind(http: str) -> str:
    """`aiohttp` or `httpx` for `http` (`auto`: aiohttp unless the environment names a proxy)."""
    if http == "auto":
        proxies = urllib.request.getproxies_environment()
        return "httpx" if any(proxies.get(scheme) for scheme in ("http", "https", "all")) else "aiohttp"
    if http not in ("aiohttp", "httpx"):
        raise ValueError(f"http must be auto, aiohttp or httpx, not {http!r}")
    return http


def response_from_completion(completion: Any) -> Response:
    """A Response from a chat completion's JSON, or the typed failure it amounts to."""
    if not isinstance(completion, dict):
        raise TransientError(f"malformed response body: expected a JSON object, got {type(completion).__name__}")
    raw_usage = completion.get("usage") or {}
    usage = Usage(int(raw_usage.get("prompt_tokens") or 0), int(raw_usage.get("completion_tokens") or 0))
    choices = completion.get("choices") or []
    if not choices:
        raise LLMFailure(FailureKind.EMPTY, "the answer has no choices", usage)
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    finish = str(choice.get("finish_reason") or "")
    refusal = message.get("refusal")
    if refusal:
        raise LLMFailure(FailureKind.REFUSAL, str(refusal)[:200], usage)
    if finish == "content_filter":
        raise LLMFailure(FailureKind.CONTENT_FILTER, "finish_reason=content_filter", usage)
    text = message.get("content") or ""
    if not isinstance(text, str) or not text.strip():
        raise LLMFailure(FailureKind.EMPTY, f"empty message content (finish_reason={finish or 'none'})", usage)
    return Response(text=text, usage=usage, model=str(completion.get("model") or ""), finish_reason=finish)


def _error_body(e: Any) -> dict[str, Any]:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        return inner if isinstance(inner, dict) else {}
    return {}


def _error_message(e: Any) -> str:
    return str(_error_body(e).get("message") or getattr(e, "message", "") or "")[:200]


def _error_code(e: Any) -> str:
    return str(_error_body(e).get("code") or getattr(e, "code", "") or "")
