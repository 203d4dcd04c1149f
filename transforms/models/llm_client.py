"""An OpenAI-compatible chat-completions client: how the caption, subject and prompts stages reach their models.

vLLM serves the models through its OpenAI-compatible HTTP API, at an existing endpoint (``llm.endpoint`` or a
stage's own ``endpoint``) or at a server a worker starts for itself (:mod:`transforms.models.vllm_server`).

:class:`ChatClient` (standard library only, so it needs neither the ``openai`` package nor vLLM):

* **bounded concurrency**: requests run on the client's own pool of ``max_concurrency`` threads; one
  client serves every thread of a worker process (Beam's RunInference shares what ``load_model``
  returns), so the bound holds per process;
* **a deadline on every request**: ``request_timeout_s`` covers connect, send and the last byte of the
  answer; a watchdog shuts the socket at the deadline, so not even a server that trickles bytes can
  hold a worker;
* **retries with exponential backoff and jitter** on connection errors, timeouts, bodies that are not
  JSON or are cut short, HTTP 429 and 5xx, honouring the server's ``Retry-After`` (capped by
  ``backoff_max_s``); other 4xx answers (a bad request, an unknown model) are not retried;
* **validated output** (:meth:`ChatClient.chat_validated`): a model answer that fails the caller's
  validation is asked for again with the validation error fed back, ``validation_retries`` times.
"""

from __future__ import annotations

import base64
import collections
import email.utils
import http.client
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from transforms.common import count
from transforms.settings import STRUCTURED_OUTPUT_MODES, LLMConfig, check_base_url

LOG = logging.getLogger(__name__)

T = TypeVar("T")


# --- errors ---------------------------------------------------------------------------------------------


class LLMError(Exception):
    """A model call failed. ``retriable``: the same request may succeed later."""

    retriable = False


class TransportError(LLMError):
    """The connection failed, was reset or the answer was cut short."""

    retriable = True


class DeadlineExceeded(TransportError):
    """A request did not complete within its deadline."""


class BadResponse(LLMError):
    """The server answered 200 with a body that is not a chat completion (not JSON, no choices)."""

    retriable = True


class HTTPStatusError(LLMError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after
        self.retriable = status == 429 or status >= 500


class RetriesExhausted(LLMError):
    """Every attempt of a request failed with a retriable error; ``last`` is the last one."""

    def __init__(self, message: str, last: LLMError) -> None:
        super().__init__(message)
        self.last = last


class OutputInvalid(LLMError):
    """A model answer failed validation (also after the retries with feedback)."""


# --- the client -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatResponse:
    """One chat completion: the first choice's text and why generation stopped."""

    content: str
    finish_reason: str | None
    model: str | None
    usage: Mapping[str, Any]

    @property
    def truncated(self) -> bool:
        """Generation stopped at ``max_tokens``: the text is cut short."""
        return self.finish_reason == "length"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; ``None`` if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def image_data_url(data: bytes) -> str:
    """A ``data:`` URL of encoded image bytes, with the media type read from the bytes' signature."""
    if data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        mime = "image/png"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    else:
        raise ValueError("image bytes are neither JPEG, PNG, WebP nor GIF")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the start of the body."""
    try:
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(error, dict):
            return str(error.get("message") or error)[:500]
        return str(error)[:500]
    except ValueError:
        return body[:300].decode("utf-8", "replace")


class ChatClient:
    """A thread-safe client of one OpenAI-compatible server (see the module docstring).

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        api_key: sent as ``Authorization: Bearer``; ``None`` sends none.
        timeout_s: deadline of one HTTP request, connect to last byte.
        connect_timeout_s: deadline of opening the connection.
        max_retries: retries after a retriable failure.
        backoff_s, backoff_max_s: the first retry delay (doubling, with jitter) and the longest one.
        max_concurrency: threads of :meth:`submit`, i.e. requests in flight at once.
        sleep: how to wait between retries (tests pass a recorder).
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 connect_timeout_s: float = 10.0, max_retries: int = 4, backoff_s: float = 1.0,
                 backoff_max_s: float = 60.0, max_concurrency: int = 16,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        parts = urlsplit(check_base_url(base_url))
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path.rstrip("/")
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_concurrency = max_concurrency
        self._sleep = sleep
        self._random = random.Random()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._events: collections.Counter[str] = collections.Counter()
        self.server: Any = None
        """The server this client talks to when a worker started it (kept alive by this reference)."""

    @classmethod
    def from_config(cls, base_url: str, config: LLMConfig) -> ChatClient:
        """A client with the ``llm`` section's settings; the API key comes from ``config.api_key_env``."""
        api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        return cls(base_url, api_key=api_key or None, timeout_s=config.request_timeout_s,
                   connect_timeout_s=config.connect_timeout_s, max_retries=config.max_retries,
                   backoff_s=config.backoff_s, backoff_max_s=config.backoff_max_s,
                   max_concurrency=config.max_concurrency)

    # -- pickling: a client is rebuilt empty on the other side (threads and locks do not travel) --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pool=None, _lock=None, _events=collections.Counter(), server=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- events: counted here (any thread), turned into Beam counters by the caller's DoFn thread --

    def _event(self, name: str) -> None:
        with self._lock:
            self._events[name] += 1

    def pop_events(self) -> dict[str, int]:
        """What happened since the last call (``retries``, ``http_429``, ``timeouts``, ...), then reset."""
        with self._lock:
            events, self._events = dict(self._events), collections.Counter()
        return events

    # -- concurrency --

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the client's pool (at most ``max_concurrency`` at a time)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="llm-client")
            pool = self._pool
        return pool.submit(fn, *args, **kwargs)

    def map_settled(self, fn: Callable[[Any], T], items: Iterable[Any]) -> list[T | BaseException]:
        """``fn`` over ``items`` concurrently; each result, or the exception it raised, in input order."""
        futures = [self.submit(fn, item) for item in items]
        results: list[T | BaseException] = []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as error:  # noqa: BLE001 -- returned to the caller, who decides per item
                results.append(error)
        return results

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- HTTP --

    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.connect_timeout_s,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout_s)

    def _attempt(self, method: str, path: str, payload: Any | None) -> tuple[int, dict[str, str], bytes]:
        """One HTTP exchange under a hard deadline: (status, lower-cased headers, body)."""
        started = time.monotonic()
        conn = self._connection()
        expired = threading.Event()
        # The socket itself, not conn.sock: http.client hands the socket over to the response (and sets
        # conn.sock to None) when the server will close the connection after answering.
        sockets: list[socket.socket] = []

        def expire() -> None:
            # Wakes a thread blocked in recv() however slowly the server sends: the deadline is hard.
            expired.set()
            for sock in sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.timeout_s, expire)
        watchdog.daemon = True
        watchdog.start()
        headers = {"Accept": "application/json", "User-Agent": "icl-cluster-pipeline"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            conn.connect()
            sockets.append(conn.sock)
            if expired.is_set():
                raise DeadlineExceeded(f"{method} {path}: no connection within {self.timeout_s:g}s")
            conn.sock.settimeout(max(self.timeout_s - (time.monotonic() - started), 0.001))
            conn.request(method, self._path + path, body=data, headers=headers)
            response = conn.getresponse()
            body = response.read()
            if expired.is_set():
                raise DeadlineExceeded(f"{method} {path}: no complete answer within {self.timeout_s:g}s")
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body
        except LLMError:
            raise
        except (OSError, http.client.HTTPException) as error:
            elapsed = time.monotonic() - started
            if expired.is_set() or isinstance(error, TimeoutError) and elapsed >= self.timeout_s * 0.99:
                raise DeadlineExceeded(f"{method} {path}: no complete answer within {self.timeout_s:g}s") from error
            raise TransportError(f"{method} {path}: {type(error).__name__}: {error}") from error
        finally:
            watchdog.cancel()
            conn.close()

    def _backoff(self, retry: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** retry) * self._random.uniform(0.5, 1.0)

    def request_json(self, method: str, path: str, payload: Any | None = None) -> Any:
        """``method path`` with retries; the decoded JSON answer of a 2xx. Raises :class:`LLMError`."""
        last: LLMError | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self._backoff(attempt - 1)
                if isinstance(last, HTTPStatusError) and last.retry_after is not None:
                    delay = min(max(last.retry_after, 0.0), self.backoff_max_s)
                LOG.debug("%s %s: retry %d in %.2fs after %s", method, path, attempt, delay, last)
                self._event("retries")
                self._sleep(delay)
            try:
                status, headers, body = self._attempt(method, path, payload)
                if not 200 <= status < 300:
                    raise HTTPStatusError(status, _error_message(body), parse_retry_after(headers.get("retry-after")))
                try:
                    return json.loads(body)
                except ValueError as error:
                    raise BadResponse(f"{method} {path}: answer is not JSON ({error}): {body[:120]!r}") from error
            except LLMError as error:
                self._event(_event_name(error))
                if not error.retriable:
                    raise
                last = error
        assert last is not None
        raise RetriesExhausted(f"{method} {self.base_url}{path}: gave up after {self.max_retries + 1} attempts; "
                               f"last error: {last}", last) from last

    def list_models(self) -> list[str]:
        """Ids of the models the server serves (``GET /models``)."""
        data = self.request_json("GET", "/models")
        try:
            return [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError) as error:
            raise BadResponse(f"GET /models: unexpected answer {str(data)[:200]}") from error

    def chat(self, model: str, messages: Sequence[Mapping[str, Any]], **params: Any) -> ChatResponse:
        """One chat completion (``POST /chat/completions``) with retries; ``params`` go into the request."""
        payload = {"model": model, "messages": list(messages), **params}
        data = self.request_json("POST", "/chat/completions", payload)
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            self._event("bad_response")
            raise BadResponse(f"POST /chat/completions: not a chat completion: {str(data)[:200]}") from error
        return ChatResponse(content=str(content), finish_reason=choice.get("finish_reason"),
                            model=data.get("model"), usage=data.get("usage") or {})

    def chat_validated(self, model: str, messages: Sequence[Mapping[str, Any]], validate: Callable[[ChatResponse], T],
                       validation_retries: int = 2, **params: Any) -> T:
        """A chat completion that ``validate`` accepts (it raises :class:`OutputInvalid` otherwise).

        An invalid answer is sent back with the validation error and a request to answer again, up to
        ``validation_retries`` times; then the last :class:`OutputInvalid` is raised.
        """
        conversation = list(messages)
        error: OutputInvalid | None = None
        for attempt in range(validation_retries + 1):
            response = self.chat(model, conversation, **params)
            try:
                return validate(response)
            except OutputInvalid as invalid:
                error = invalid
                self._event("invalid_output")
                LOG.debug("invalid model output (attempt %d): %s", attempt + 1, invalid)
                conversation = [*list(messages),
                                {"role": "assistant", "content": response.content},
                                {"role": "user", "content": feedback_message(invalid, response)}]
        assert error is not None
        raise OutputInvalid(f"invalid after {validation_retries + 1} attempts: {error}") from error


def feedback_message(error: OutputInvalid, response: ChatResponse) -> str:
    """What the model is told after an invalid answer."""
    cut = (" Your answer was cut off because it was too long; make it shorter." if response.truncated else "")
    return (f"Your answer is not valid: {error}.{cut} Answer again, following every instruction, "
            f"with only the answer itself and no other text.")


def _event_name(error: LLMError) -> str:
    if isinstance(error, DeadlineExceeded):
        return "timeouts"
    if isinstance(error, HTTPStatusError):
        return f"http_{error.status}"
    if isinstance(error, BadResponse):
        return "bad_response"
    return "connection_errors"


def report_events(client: ChatClient, stage: str) -> None:
    """Turn a client's events into Beam counters ``stage/llm_<event>`` (call from a DoFn thread)."""
    for name, n in client.pop_events().items():
        count(stage, f"llm_{name}", n)


# --- JSON answers ------------------------------------------------------------------------------------------


def parse_json_object(response: ChatResponse) -> dict[str, Any]:
    """The JSON object a model answered, tolerating a Markdown code fence; :class:`OutputInvalid` otherwise."""
    text = response.content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    try:
        data = json.loads(text)
    except ValueError as error:
        where = " (the answer was cut off at max_tokens)" if response.truncated else ""
        raise OutputInvalid(f"the answer is not valid JSON{where}: {error}") from error
    if not isinstance(data, dict):
        raise OutputInvalid(f"expected a JSON object, got {type(data).__name__}")
    return data


def json_schema_params(schema: Mapping[str, Any], name: str, mode: str) -> dict[str, Any]:
    """Request parameters that constrain the answer to ``schema``.

    ``response_format``: the OpenAI ``json_schema`` response format (vLLM >= 0.6 and most servers);
    ``structured_outputs``: vLLM >= 0.10's ``structured_outputs.json``; ``guided_json``: vLLM < 0.12's
    extra parameter; ``none``: the schema is only in the prompt (the answer is validated all the same).
    """
    if mode == "response_format":
        return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": dict(schema),
                                                                            "strict": True}}}
    if mode == "structured_outputs":
        return {"structured_outputs": {"json": dict(schema)}}
    if mode == "guided_json":
        return {"guided_json": dict(schema)}
    if mode == "none":
        return {}
    raise ValueError(f"structured output mode must be one of {', '.join(STRUCTURED_OUTPUT_MODES)}, got {mode!r}")
