"""An OpenAI-compatible chat-completions API as judge (the paper uses gpt-4o-2024-08-06).

The request is the paper's: the judge prompt as the single user message, ``max_tokens=1``,
``temperature=0``, ``logprobs=true``, ``top_logprobs=20``, ``seed=0``; the score comes from the
returned top logprobs (:mod:`em.eval.judge.scoring`).

The API key is read from the environment variable ``api_key_env`` when needed and is never kept
on the object, so it cannot leak through ``repr``, configs, pickles, logs or the cache.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

import httpx

from em.errors import ConfigError
from em.eval.judge.base import CacheSpec, Judge, JudgeRequest, OnResult, RawAnswer, ScoringConfig

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-2024-08-06"

DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    # USD per 1M (prompt, completion) tokens, OpenAI list prices; estimates only.
    "gpt-4o-2024-08-06": (2.50, 10.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o-mini-2024-07-18": (0.15, 0.60),
}

# Statuses worth retrying: rate limit, server errors, and (as the official SDK does) 408/409.
_RETRY_STATUS = {408, 409, 429}


def is_loopback_url(url: str) -> bool:
    """True for http(s) URLs on localhost / 127.0.0.0/8 / ::1."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after_s(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Retryable(Exception):
    """An attempt failed in a way that may succeed on retry."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    """An attempt failed in a way that retrying will not fix."""


def parse_top_logprobs(data: Any) -> list[tuple[str, float]]:
    """``choices[0].logprobs.content[0].top_logprobs`` of a chat completion as (token, logprob)."""
    try:
        content = data["choices"][0]["logprobs"]["content"]
        top = content[0]["top_logprobs"]
        pairs = [(str(el["token"]), float(el["logprob"])) for el in top]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise _Retryable(f"response has no logprobs ({type(e).__name__}: {e})") from None
    if not pairs:
        raise _Retryable("response has an empty top_logprobs list")
    return pairs


class OpenAIJudge(Judge):
    """Judge through any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, ...).

    Args:
        model: the judge model name (also its identity in the cache).
        base_url: API root; loopback URLs (local test servers) may run without a key.
        api_key_env: name of the environment variable holding the key.
        top_logprobs: number of top logprobs requested (the paper: 20).
        max_concurrency: most requests in flight at once.
        timeout_s: limit for one HTTP request, end to end.
        max_retries: retries after the first attempt on 429/408/409/5xx, timeouts, connection
            errors, malformed JSON and missing logprobs; other 4xx fail at once.
        backoff_base, backoff_max: exponential backoff ``base * 2**k`` (times a jitter factor in
            [0.5, 1.5), at most ``backoff_max``); a server's Retry-After is waited at least.
        seed: sent as ``seed`` (the paper: 0).
        cache: see :class:`~em.eval.judge.base.Judge`.
        cache_namespace: extra cache identity, for when one model name serves different weights
            at different endpoints (the endpoint URL is not part of the cache key).
        price_prompt_per_1m, price_completion_per_1m: USD per 1M tokens for the cost estimate
            (default: :data:`DEFAULT_PRICES` for known models, else 0).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str = "OPENAI_API_KEY",
        top_logprobs: int = 20,
        max_concurrency: int = 16,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        seed: int | None = 0,
        cache: CacheSpec = True,
        cache_namespace: str | None = None,
        scoring: ScoringConfig | None = None,
        price_prompt_per_1m: float | None = None,
        price_completion_per_1m: float | None = None,
    ):
        if max_concurrency < 1:
            raise ConfigError(f"judge max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ConfigError(f"judge max_retries must be >= 0, got {max_retries}")
        if not 1 <= top_logprobs <= 20:
            raise ConfigError(f"judge top_logprobs must be in 1..20 (OpenAI's limit), got {top_logprobs}")
        if timeout_s <= 0:
            raise ConfigError(f"judge timeout_s must be > 0, got {timeout_s}")
        default_prices = DEFAULT_PRICES.get(model, (0.0, 0.0))
        super().__init__(
            cache=cache,
            scoring=scoring,
            price_prompt_per_1m=default_prices[0] if price_prompt_per_1m is None else price_prompt_per_1m,
            price_completion_per_1m=default_prices[1] if price_completion_per_1m is None else price_completion_per_1m,
        )
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.top_logprobs = top_logprobs
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.seed = seed
        self.cache_namespace = cache_namespace
        self._api_key()  # fail early, with a clear message, if the key is needed and unset

    # ---- identity ----------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.model

    @property
    def query_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"api": "chat.completions", "max_tokens": 1, "temperature": 0,
                                  "top_logprobs": self.top_logprobs, "seed": self.seed}
        if self.cache_namespace:
            params["namespace"] = self.cache_namespace
        return params

    def describe(self) -> dict[str, Any]:
        """Secret-free description for run metadata."""
        return {"backend": "openai", "model": self.model, "base_url": self.base_url,
                "api_key_env": self.api_key_env, **self.query_params,
                "max_concurrency": self.max_concurrency, "timeout_s": self.timeout_s,
                "max_retries": self.max_retries, "scoring": asdict(self.scoring)}

    def __repr__(self) -> str:
        return (f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, "
                f"api_key_env={self.api_key_env!r})")

    def request_body(self, prompt: str) -> dict[str, Any]:
        """The chat-completions request for one judge prompt."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    # ---- transport ---------------------------------------------------------------------------
    def _api_key(self) -> str | None:
        key = os.environ.get(self.api_key_env) or None
        if key is None and not is_loopback_url(self.base_url):
            raise ConfigError(
                f"The judge API key is not set: export {self.api_key_env}=<your key> "
                f"(needed to call {self.base_url}), or set api_key_env to the variable that holds it.")
        return key

    def _backoff_s(self, retry_index: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** retry_index) * (0.5 + random.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, 600.0))
        return delay

    async def _query(self, requests: Sequence[JudgeRequest], on_result: OnResult) -> None:
        key = self._api_key()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        sem = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=self.timeout_s, limits=limits) as client:

            async def one(j: int, req: JudgeRequest) -> None:
                on_result(j, await self._query_one(client, sem, req.prompt, key))

            await asyncio.gather(*(one(j, r) for j, r in enumerate(requests)))

    async def _query_one(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, prompt: str,
                         key: str | None) -> RawAnswer:
        body = self.request_body(prompt)
        url = f"{self.base_url}/chat/completions"
        attempts = 0
        last_error = ""
        for retry_index in range(self.max_retries + 1):
            attempts += 1
            try:
                async with sem:
                    self.stats.sent += 1
                    pairs = await self._attempt(client, url, body)
                return RawAnswer(pairs, attempts=attempts)
            except _Fatal as e:
                return RawAnswer(None, error=_redact(str(e), key), attempts=attempts)
            except _Retryable as e:
                last_error = _redact(str(e), key)
                if retry_index < self.max_retries:
                    self.stats.retries += 1
                    await asyncio.sleep(self._backoff_s(retry_index, e.retry_after))
        return RawAnswer(None, error=f"gave up after {attempts} attempts; last error: {last_error}",
                         attempts=attempts)

    async def _attempt(self, client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[tuple[str, float]]:
        try:
            resp = await asyncio.wait_for(client.post(url, json=body), timeout=self.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException) as e:
            raise _Retryable(f"timeout after {self.timeout_s:g} s ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection error ({type(e).__name__}: {e})") from None
        if resp.status_code != 200:
            snippet = resp.text[:300].replace("\n", " ")
            msg = f"HTTP {resp.status_code} from {url}: {snippet}"
            if resp.status_code in _RETRY_STATUS or resp.status_code >= 500:
                raise _Retryable(msg, retry_after=_retry_after_s(resp.headers))
            raise _Fatal(msg)
        try:
            data = resp.json()
        except ValueError as e:
            raise _Retryable(f"malformed JSON in the response ({e})") from None
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        return parse_top_logprobs(data)


def _redact(text: str, key: str | None) -> str:
    """Remove the API key from an error text (servers may echo it back)."""
    return text.replace(key, "<redacted>") if key else text
