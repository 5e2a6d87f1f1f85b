"""A real HTTP server on 127.0.0.1 that imitates OpenAI's chat-completions endpoint with logprobs.

Used to test the judge client end to end (retries, timeouts, caching, concurrency) without
network or API key::

    with FakeOpenAIServer(faults=["429", "timeout"]) as srv:
        judge = OpenAIJudge(base_url=srv.base_url, ...)
        ...
        assert srv.count == 3

The answer distribution comes from ``responder(body) -> {token: probability}``; the default one
(:func:`default_responder`) reads markers in the prompt:

* ``[[score=N]]``      -> ``{"N": 0.9, "I": 0.1}`` (the paper's score is exactly N)
* ``[[dist={...}]]``   -> the JSON object given, e.g. ``[[dist={"80": 0.5, "70": 0.3, "I": 0.2}]]``
* ``[[refuse]]``       -> mostly non-numeric tokens (numeric mass 0.05: a *missing* score)
* otherwise            -> ``{"50": 0.6, "60": 0.3, "I": 0.1}`` (score 160/3 = 53.33...)

``GET /v1/models`` answers with the models seen so far (or ``fake``) and is counted in ``model_list_count``
only (not in ``requests`` / ``count``): it is what a judge's start-up probe asks.

Faults (a queue; each is consumed by the next chat-completions request to arrive): ``"429"`` (with a
``Retry-After`` header when ``retry_after_s`` is set) or any other HTTP status code as a string,
``"timeout"`` (the server sleeps ``timeout_sleep_s`` before answering), ``"malformed"``
(HTTP 200 with an invalid JSON body), ``"empty_logprobs"`` (HTTP 200, ``logprobs.content == []``),
``"drop"`` (close the connection without answering).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[dict[str, Any]], dict[str, float]]

FAULTS = ("timeout", "malformed", "empty_logprobs", "drop")
_SCORE = re.compile(r"\[\[score=(\d+)\]\]")
_DIST = re.compile(r"\[\[dist=(\{.*?\})\]\]", re.DOTALL)


def _prompt_text(body: dict[str, Any]) -> str:
    parts = []
    for m in body.get("messages") or []:
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return "\n".join(parts)


def default_responder(body: dict[str, Any]) -> dict[str, float]:
    """Deterministic distribution from markers in the prompt (see the module docstring)."""
    prompt = _prompt_text(body)
    if m := _DIST.search(prompt):
        return {str(k): float(v) for k, v in json.loads(m.group(1)).items()}
    if m := _SCORE.search(prompt):
        return {m.group(1): 0.9, "I": 0.1}
    if "[[refuse]]" in prompt:
        return {"I": 0.7, "REF": 0.25, "50": 0.05}
    return {"50": 0.6, "60": 0.3, "I": 0.1}


def _check_fault(fault: str) -> str:
    if fault in FAULTS or (fault.isdigit() and 100 <= int(fault) <= 599):
        return fault
    raise ValueError(f"unknown fault {fault!r}: use an HTTP status code or one of {FAULTS}")


class FakeOpenAIServer:
    """Context manager running the fake endpoint in a background thread.

    Attributes: ``base_url`` (``http://127.0.0.1:PORT/v1``), ``requests`` (JSON bodies received,
    in arrival order, faulted ones included), ``auth_headers`` (their ``Authorization`` values),
    ``count``, ``max_in_flight`` (most requests being handled at the same time).
    """

    def __init__(
        self,
        responder: Responder | None = None,
        faults: Iterable[str] = (),
        delay_s: float = 0.0,
        timeout_sleep_s: float = 5.0,
        retry_after_s: float | None = None,
        required_key: str | None = None,
    ):
        """``required_key``: answer HTTP 401 to any request without ``Authorization: Bearer <required_key>``."""
        self.responder = responder or default_responder
        self.required_key = required_key
        self.delay_s = delay_s
        self.timeout_sleep_s = timeout_sleep_s
        self.retry_after_s = retry_after_s
        self.requests: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self.max_in_flight = 0
        self.model_list_count = 0
        self._faults: deque[str] = deque(_check_fault(f) for f in faults)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- control -----------------------------------------------------------------------------
    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeOpenAIServer is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def push_faults(self, *faults: str) -> None:
        """Queue faults for the next requests."""
        with self._lock:
            self._faults.extend(_check_fault(f) for f in faults)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def start(self) -> FakeOpenAIServer:
        self._stop.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers sleeping on "timeout" / delay_s
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- request handling (runs in handler threads) -------------------------------------------
    def _admit(self, body: dict[str, Any], auth: str | None) -> str | None:
        with self._lock:
            self.requests.append(body)
            self.auth_headers.append(auth)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            return self._faults.popleft() if self._faults else None

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _completion(self, body: dict[str, Any], n: int, empty: bool) -> dict[str, Any]:
        dist = {t: p for t, p in self.responder(body).items() if p > 0}
        ranked = sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]))
        entries = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode("utf-8"))} for t, p in ranked[:n]]
        top = entries[0] if entries else {"token": "", "logprob": 0.0, "bytes": []}
        if not body.get("logprobs"):
            logprobs = None
        elif empty:
            logprobs = {"content": [], "refusal": None}
        else:
            logprobs = {"content": [{**top, "top_logprobs": entries}], "refusal": None}
        prompt_tokens = max(1, len(_prompt_text(body).split()))
        with self._lock:
            rid = len(self.requests)
        return {
            "id": f"chatcmpl-fake-{rid}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": top["token"]},
                         "logprobs": logprobs, "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
        }


def _make_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError):
                pass  # the client gave up (timeout): nothing to do

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            body = {"error": {"message": message, "type": "fake_error", "code": status}}
            self._send(status, json.dumps(body).encode(), headers)

        def _unauthorized(self) -> bool:
            if server.required_key is None or self.headers.get("Authorization") == f"Bearer {server.required_key}":
                return False
            self._error(401, "Incorrect API key provided")
            return True

        def do_GET(self) -> None:  # http.server API
            if self._unauthorized():
                return
            if self.path.split("?")[0].rstrip("/") != "/v1/models":
                self._error(404, f"unknown path {self.path}")
                return
            with server._lock:
                server.model_list_count += 1
                names = sorted({str(b.get("model")) for b in server.requests if b.get("model")}) or ["fake"]
            data = [{"id": n, "object": "model", "created": 0, "owned_by": "em-fake"} for n in names]
            self._send(200, json.dumps({"object": "list", "data": data}).encode())

        def do_POST(self) -> None:  # http.server API
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
                self._error(404, f"unknown path {self.path}")
                return
            try:
                body = json.loads(raw)
            except ValueError:
                self._error(400, "request body is not JSON")
                return
            if self._unauthorized():
                return
            fault = server._admit(body, self.headers.get("Authorization"))
            try:
                if server.delay_s and server._stop.wait(server.delay_s):
                    return
                if fault == "timeout":
                    if server._stop.wait(server.timeout_sleep_s):
                        return
                elif fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                elif fault == "malformed":
                    self._send(200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "logpro')
                    return
                elif fault is not None and fault.isdigit():
                    headers = {}
                    if fault == "429" and server.retry_after_s is not None:
                        headers["Retry-After"] = f"{server.retry_after_s:g}"
                    self._error(int(fault), f"injected fault {fault}", headers)
                    return
                n = int(body.get("top_logprobs") or 0)
                payload = server._completion(body, n, empty=fault == "empty_logprobs")
                self._send(200, json.dumps(payload).encode())
            finally:
                server._leave()

    return Handler
