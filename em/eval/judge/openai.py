"""An OpenAI-compatible chat-completions API as judge (the paper uses gpt-4o-2024-08-06).

The request is the paper's: the judge prompt as the single user message, ``max_tokens=1``,
``temperature=0``, ``logprobs=true``, ``top_logprobs=20``, ``seed=0``; the score comes from the
returned top logprobs (:mod:`em.eval.judge.scoring`).

Transport is the official ``openai`` SDK: its own retries (429, 408, 409, 5xx, timeouts, dropped
connections, with exponential backoff and the server's Retry-After honoured) and timeouts. em adds only
what the SDK cannot know: a 200 answer whose body is malformed JSON or carries no logprobs is asked again
within the same attempt budget (``max_retries``), and every attempt is counted per judgment (the SDK's own
``x-stainless-retry-count`` is per HTTP call). em's cache, de-duplication, failure accounting and statistics
live in :class:`~em.eval.judge.base.Judge`.

The API key is read from the environment variable ``api_key_env`` when needed and is never kept
on the object, so it cannot leak through ``repr``, configs, pickles, logs or the cache.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
from openai import AsyncOpenAI
from openai._types import Omit

from em.errors import ConfigError, EMError
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

_REQUEST_ID_HEADER = "X-Em-Judgment"
_CONTENT_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # before re-asking after an unusable 200 answer


class JudgeUnavailableError(EMError):
    """The judge endpoint cannot be used (unreachable, key rejected, unknown model)."""


def is_loopback_url(url: str) -> bool:
    """True for http(s) URLs on localhost / 127.0.0.0/8 / ::1."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_base_url(base_url: Any) -> str:
    """The base URL without trailing slash, or a :class:`ConfigError` saying what is wrong with it."""
    example = "e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1"
    if not isinstance(base_url, str) or not base_url.strip():
        raise ConfigError(f"judge.base_url={base_url!r}: expected an http(s) URL ({example})")
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https"):
        why = "has no scheme" if not parts.scheme or "://" not in base_url else f"has scheme {parts.scheme!r}"
        raise ConfigError(f"judge.base_url={base_url!r} {why}: the judge speaks HTTP; use an http:// or https:// "
                          f"URL ({example})")
    if not parts.hostname:
        raise ConfigError(f"judge.base_url={base_url!r} names no host ({example})")
    try:
        _ = parts.port  # raises on an out-of-range or non-numeric port
    except ValueError as e:
        raise ConfigError(f"judge.base_url={base_url!r}: invalid port ({e}); ports are 1-65535") from None
    return base_url.strip().rstrip("/")


class _Unusable(Exception):
    """A 200 answer without usable top logprobs (malformed JSON, no logprobs): worth asking again."""


def parse_top_logprobs(data: Any) -> list[tuple[str, float]]:
    """``choices[0].logprobs.content[0].top_logprobs`` of a chat completion (SDK object or dict) as
    (token, logprob) pairs; raises :class:`_Unusable` when absent or empty."""
    if hasattr(data, "model_dump"):
        data = data.model_dump()
    try:
        content = data["choices"][0]["logprobs"]["content"]
        top = content[0]["top_logprobs"]
        pairs = [(str(el["token"]), float(el["logprob"])) for el in top]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise _Unusable(f"response has no logprobs ({type(e).__name__}: {e})") from None
    if not pairs:
        raise _Unusable("response has an empty top_logprobs list")
    return pairs


class OpenAIJudge(Judge):
    """Judge through any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, ...).

    Args:
        model: the judge model name (with the endpoint, its identity in the cache).
        base_url: API root (http or https); loopback URLs (local test servers) may run without a key.
        api_key_env: name of the environment variable holding the key.
        top_logprobs: number of top logprobs requested (the paper: 20).
        max_concurrency: most judgments in flight at once (workers; memory does not grow with the queue).
        timeout_s: the SDK's timeout for one HTTP request.
        max_retries: retries after the first attempt (the SDK's for 429/408/409/5xx, timeouts and connection
            errors; em's for malformed JSON and missing logprobs); other 4xx fail at once.
        seed: sent as ``seed`` (the paper: 0).
        cache: see :class:`~em.eval.judge.base.Judge` (True, a path, ``"refresh"``, False).
        cache_namespace: extra cache identity, for when one model name at one endpoint serves different
            weights over time.
        price_prompt_per_1m, price_completion_per_1m: USD per 1M tokens for the cost estimate
            (default: :data:`DEFAULT_PRICES` for known models, else 0).
        probe: check the endpoint once (:meth:`probe`) before an evaluation starts sampling.
        name: label of this judge in samples and summaries.
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
        seed: int | None = 0,
        cache: CacheSpec = True,
        cache_namespace: str | None = None,
        scoring: ScoringConfig | Mapping[str, Any] | None = None,
        price_prompt_per_1m: float | None = None,
        price_completion_per_1m: float | None = None,
        probe: bool = True,
        name: str | None = None,
    ):
        if not isinstance(model, str) or not model:
            raise ConfigError(f"judge.model must be a model name, got {model!r}")
        base_url = validate_base_url(base_url)
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
            name=name,
        )
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.top_logprobs = top_logprobs
        self.max_concurrency = max_concurrency
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.seed = seed
        self.cache_namespace = cache_namespace
        self.probe_enabled = bool(probe)
        self._ids = itertools.count()
        self._api_key()  # fail early, with a clear message, if the key is needed and unset

    # ---- identity ----------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.model

    @property
    def query_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"api": "chat.completions", "endpoint": self.base_url, "max_tokens": 1,
                                  "temperature": 0, "top_logprobs": self.top_logprobs, "seed": self.seed}
        if self.cache_namespace:
            params["namespace"] = self.cache_namespace
        return params

    def describe(self) -> dict[str, Any]:
        """Secret-free description for run metadata."""
        return {**super().describe(), "backend": "openai", "model": self.model, "base_url": self.base_url,
                "api_key_env": self.api_key_env, "max_concurrency": self.max_concurrency,
                "timeout_s": self.timeout_s, "max_retries": self.max_retries,
                "sdk": f"openai {openai.__version__}"}

    def __repr__(self) -> str:
        return (f"OpenAIJudge(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r}, "
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
                f"(needed to call {self.base_url}), or set judge.api_key_env to the variable that holds it.")
        return key

    def _client(self, key: str | None, attempts: Counter | None = None, max_retries: int | None = None,
                timeout_s: float | None = None, count: bool = True) -> AsyncOpenAI:
        """An SDK client whose HTTP layer counts every request (retries included) into ``stats.sent`` (unless
        ``count`` is off: the start-up probe is not a judgment) and ``attempts[<judgment id>]``."""

        async def on_request(request: httpx.Request) -> None:
            self.stats.sent += count
            if attempts is not None and (rid := request.headers.get(_REQUEST_ID_HEADER)) is not None:
                attempts[rid] += 1

        http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency),
            event_hooks={"request": [on_request]})
        return AsyncOpenAI(api_key=key or "em-no-key", base_url=self.base_url, http_client=http,
                           timeout=httpx.Timeout(timeout_s or self.timeout_s),
                           max_retries=self.max_retries if max_retries is None else max_retries)

    async def _query(self, requests: Sequence[JudgeRequest], on_result: OnResult) -> None:
        key = self._api_key()
        attempts: Counter = Counter()
        queue = iter(enumerate(requests))  # workers pull from one iterator: O(concurrency) tasks for any N

        async with self._client(key, attempts) as client:

            async def worker() -> None:
                for j, req in queue:
                    on_result(j, await self._query_one(client, req.prompt, key, attempts))

            await asyncio.gather(*(worker() for _ in range(min(self.max_concurrency, len(requests)))))

    async def _query_one(self, client: AsyncOpenAI, prompt: str, key: str | None, attempts: Counter) -> RawAnswer:
        rid = str(next(self._ids))
        ans = await self._ask(client, rid, prompt, key, attempts)
        self.stats.retries += max(0, attempts[rid] - 1)  # every HTTP attempt after the first, SDK's or em's
        ans.attempts = attempts.pop(rid, 0)
        return ans

    async def _ask(self, client: AsyncOpenAI, rid: str, prompt: str, key: str | None, attempts: Counter) -> RawAnswer:
        body = self.request_body(prompt)
        last_error = ""
        for k in itertools.count():
            left = self.max_retries + 1 - attempts[rid]
            if left <= 0:
                break
            if k:  # em's own re-ask after an unusable 200 answer (the SDK does not retry those)
                await asyncio.sleep(_CONTENT_BACKOFF_S[min(k - 1, len(_CONTENT_BACKOFF_S) - 1)]
                                    * (0.5 + random.random()))
            try:
                raw = await client.with_options(max_retries=left - 1).chat.completions.with_raw_response.create(
                    **body, extra_headers={_REQUEST_ID_HEADER: rid, **_auth_headers(key)})
                completion = raw.parse()
                pairs = parse_top_logprobs(completion)
            except _Unusable as e:
                last_error = str(e)
                continue
            except openai.APIStatusError as e:
                snippet = _redact(e.response.text[:300].replace("\n", " "), key)
                msg = f"HTTP {e.status_code} from {self.base_url}/chat/completions: {snippet}"
                if attempts[rid] > 1:
                    msg = f"gave up after {attempts[rid]} attempts; last error: {msg}"
                return RawAnswer(None, error=msg)
            except openai.APITimeoutError:
                return RawAnswer(None, error=f"gave up after {attempts[rid]} attempts; last error: timeout after "
                                              f"{self.timeout_s:g} s")
            except openai.APIConnectionError as e:
                cause = e.__cause__ or e
                return RawAnswer(None, error=f"gave up after {attempts[rid]} attempts; last error: connection error "
                                              f"({type(cause).__name__}: {_redact(str(cause), key)})")
            except (ValueError, openai.APIResponseValidationError) as e:  # a 200 body that is not JSON
                last_error = f"malformed JSON in the response ({type(e).__name__})"
                continue
            usage = getattr(completion, "usage", None)
            if usage is not None:
                self.stats.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
                self.stats.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
            return RawAnswer(pairs)
        return RawAnswer(None, error=f"gave up after {attempts[rid]} attempts; last error: {_redact(last_error, key)}")

    # ---- fail fast ---------------------------------------------------------------------------
    def probe(self) -> None:
        """One cheap request before sampling: ``GET {base_url}/models`` (OpenAI, vLLM); a server without it
        (404/405) gets one judge-shaped completion instead. Raises :class:`JudgeUnavailableError` saying what
        to do when the endpoint is unreachable, rejects the key or does not know the model."""
        if not self.probe_enabled:
            return

        async def run() -> None:
            key = self._api_key()
            async with self._client(key, max_retries=1, timeout_s=min(self.timeout_s, 15.0), count=False) as client:
                try:
                    await client.models.list(extra_headers=_auth_headers(key))
                    return
                except openai.NotFoundError:
                    pass
                except openai.APIStatusError as e:
                    if e.status_code not in (404, 405):
                        raise
                await client.chat.completions.create(**self.request_body("Reply with the number 0."),
                                                     extra_headers=_auth_headers(key))

        where = f"the judge at {self.base_url} (model {self.model})"
        try:
            asyncio.run(run()) if not _in_loop() else _run_in_thread(run)
        except openai.AuthenticationError as e:
            raise JudgeUnavailableError(f"{where} rejected the API key from ${self.api_key_env} "
                                        f"(HTTP {e.status_code}); export a valid key") from None
        except openai.APIStatusError as e:
            raise JudgeUnavailableError(f"{where} answered HTTP {e.status_code} to a probe request: "
                                        f"{_redact(e.response.text[:200], os.environ.get(self.api_key_env))}; check "
                                        "judge.model and judge.base_url (or set judge.probe=false)") from None
        except openai.APITimeoutError:
            raise JudgeUnavailableError(f"{where} did not answer a probe request within "
                                        f"{min(self.timeout_s, 15.0):g} s; is the server up?") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise JudgeUnavailableError(f"cannot reach {where}: {type(cause).__name__}: {cause}; check "
                                        "judge.base_url and that the server is running") from None


def _auth_headers(key: str | None) -> dict[str, Any]:
    """Per-request headers: a keyless (loopback) judge sends no Authorization header at all."""
    return {} if key else {"Authorization": Omit()}


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_in_thread(fn) -> None:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as ex:
        ex.submit(lambda: asyncio.run(fn())).result()


def _redact(text: str, key: str | None) -> str:
    """Remove the API key from an error text (servers may echo it back)."""
    return text.replace(key, "<redacted>") if key else text
