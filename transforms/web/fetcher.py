"""A polite asynchronous image fetcher (aiohttp): the one place where the pipeline talks to web servers.

Politeness, per host (``host:port`` of the URL; robots.txt is per origin, RFC 9309):

* at most ``per_host_concurrency`` requests in flight and at most ``per_host_rate`` request starts per second
  (the interval also stretches to robots.txt's ``Crawl-delay``); at most ``total_concurrency`` in flight in all;
* robots.txt fetched once per origin (concurrent callers wait for the one request), parsed with protego, and
  obeyed for our robots token; 4xx means "no rules", 5xx, 429 and network failures mean "disallow all"
  (RFC 9309 section 2.3.1.4); a ``Crawl-delay`` above ``max_crawl_delay_s`` is honoured by not fetching;
* a 429 or 5xx answer pauses the whole host for its ``Retry-After`` (seconds or an HTTP date) or an exponential
  backoff, and the request is retried at most ``max_retries`` times; a ``Retry-After`` longer than
  ``max_retry_after_s`` ends the attempts at once;
* redirects are followed by hand (at most ``max_redirects``), each hop checked against robots.txt and the
  address guard;
* the ``X-Robots-Tag`` opt-outs that img2dataset honours (``noai``, ``noimageai``, ``noindex``,
  ``noimageindex``; a ``BOT: directives`` value counts when BOT is our robots token);
* a user agent naming the project.

Safety: the body is read in chunks and abandoned past ``max_bytes``; a declared ``Content-Type`` that is not an
image, or a body that is HTML, is refused; by default every address a host name resolves to (and every IP
literal) must be global -- private, loopback, link-local, multicast and reserved addresses are refused
(server-side request forgery), checked on the address actually connected to, so DNS rebinding cannot slip past.

Every outcome is a :class:`FetchResult` with a reason code (``ok`` or one of the ``FETCH_*``/``ROBOTS_*``
constants below); nothing raises for a bad URL or a bad server.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import random
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from protego import Protego

from transforms.web.warc import image_magic, looks_like_html

# Reason codes (documented in docs/reasons.md, stage `fetch`).
OK = "ok"
FETCH_INVALID_URL = "fetch_invalid_url"
FETCH_PRIVATE_ADDRESS = "fetch_private_address"
ROBOTS_DISALLOWED = "robots_disallowed"
OPTED_OUT = "opted_out"
FETCH_HTTP_4XX = "fetch_http_4xx"
FETCH_HTTP_5XX = "fetch_http_5xx"
FETCH_HTTP_OTHER = "fetch_http_other"
FETCH_RATE_LIMITED = "fetch_rate_limited"
FETCH_TIMEOUT = "fetch_timeout"
FETCH_TOO_LARGE = "fetch_too_large"
FETCH_DNS_ERROR = "fetch_dns_error"
FETCH_CONNECTION_ERROR = "fetch_connection_error"
FETCH_TOO_MANY_REDIRECTS = "fetch_too_many_redirects"
NOT_AN_IMAGE = "not_an_image"

RETRY_STATUSES = frozenset((429, 500, 502, 503, 504))
ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309 2.5: parse at least 500 KiB
ROBOTS_MAX_REDIRECTS = 5  # RFC 9309 2.3.1.2


@dataclass(frozen=True)
class FetchPolicy:
    """How the fetcher behaves; ``transforms.settings.FetchConfig`` holds the documented defaults."""

    user_agent: str
    robots_token: str
    total_concurrency: int
    per_host_concurrency: int
    per_host_rate: float
    timeout_s: float
    connect_timeout_s: float
    max_retries: int
    backoff_s: float
    max_retry_after_s: float
    max_bytes: int
    max_redirects: int
    respect_robots: bool
    max_crawl_delay_s: float
    opt_out_directives: tuple[str, ...]
    allow_private_addresses: bool


class FetchResult(NamedTuple):
    """The outcome of one URL."""

    url: str
    reason: str
    """:data:`OK` or a reason code."""
    detail: str
    body: bytes | None = None
    status: int | None = None
    content_type: str | None = None
    final_url: str | None = None
    attempts: int = 0
    """HTTP requests made for this URL (redirect hops and retries; robots.txt not counted)."""

    @property
    def ok(self) -> bool:
        return self.reason == OK


# --- addresses ------------------------------------------------------------------------------------------


def is_public_address(address: str) -> bool:
    """Whether an IP address is globally routable unicast (not private, loopback, link-local, shared, reserved,
    multicast or unspecified); IPv4-mapped IPv6 addresses are judged by their IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class PrivateAddressError(OSError):
    """A host name resolved only to addresses the guard refuses."""


class GuardedResolver(AbstractResolver):
    """aiohttp's default resolver, keeping only public addresses (see :func:`is_public_address`).

    The connector connects to what this returns, so the check is on the address actually used.
    """

    def __init__(self) -> None:
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        public = [r for r in results if is_public_address(r["host"])]
        if not public:
            refused = ", ".join(sorted({r["host"] for r in results}))
            raise PrivateAddressError(f"{host} resolves only to non-public addresses ({refused})")
        return public

    async def close(self) -> None:
        await self._inner.close()


# --- headers ---------------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or an HTTP date), ``None`` if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def x_robots_opt_out(values: Iterable[str], robots_token: str, directives: Iterable[str]) -> str | None:
    """The first opt-out directive among ``X-Robots-Tag`` values that applies to us, or ``None``.

    A value is ``directives`` or ``BOT: directives``; the latter applies when BOT is our robots token (the
    rule img2dataset's ``is_disallowed`` uses).
    """
    wanted = {d.lower() for d in directives}
    token = robots_token.lower()
    for value in values:
        head, sep, rest = value.partition(":")
        bot = head.strip().lower() if sep else None
        listed = rest if sep else value
        # "unavailable_after: <date>" is a directive with a value, not a bot name
        if bot is not None and (" " in bot or bot in ("unavailable_after", "max-snippet", "max-image-preview",
                                                      "max-video-preview")):
            bot, listed = None, value
        if bot is not None and bot != token:
            continue
        for directive in listed.split(","):
            directive = directive.strip().lower()
            if directive in wanted:
                return directive
    return None


def origin_of(url: str) -> str:
    """``scheme://host:port`` (what robots.txt applies to)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


def host_key(url: str) -> str:
    """The politeness unit: ``host:port`` (lower case)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


# --- per-host state ------------------------------------------------------------------------------------


@dataclass
class RobotsRules:
    """robots.txt of one origin: parsed rules, or a blanket answer with why."""

    parser: Any = None
    allow_all: bool = False
    disallow_reason: str | None = None
    """Set when everything is disallowed (robots.txt unreachable); the detail of the rejects."""
    private: str | None = None
    """Set when the origin is refused by the address guard."""

    def allows(self, url: str, token: str) -> bool:
        if self.disallow_reason is not None:
            return False
        if self.allow_all or self.parser is None:
            return True
        return self.parser.can_fetch(url, token)

    def crawl_delay(self, token: str) -> float | None:
        if self.parser is None:
            return None
        delay = self.parser.crawl_delay(token)
        rate = self.parser.request_rate(token)
        if rate is not None and rate.requests:
            delay = max(delay or 0.0, rate.seconds / rate.requests)
        return float(delay) if delay else None


@dataclass
class HostGate:
    """Per-host concurrency, start-rate and pause (Retry-After / backoff) control."""

    concurrency: int
    interval: float
    semaphore: asyncio.Semaphore = field(init=False)
    next_start: float = 0.0
    paused_until: float = 0.0

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.concurrency)

    async def wait_turn(self) -> None:
        """Sleep until this host may see the next request start (call while holding :attr:`semaphore`)."""
        while True:
            now = time.monotonic()
            start = max(self.next_start, self.paused_until)
            if start <= now:
                break
            await asyncio.sleep(start - now)
        self.next_start = now + self.interval

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


class _Slot:
    """A request slot: the host's concurrency, then the total concurrency, then the host's start rate -- in this
    order, so that the rate is measured where requests really start."""

    def __init__(self, gate: HostGate, total: asyncio.Semaphore) -> None:
        self._gate = gate
        self._total = total

    async def __aenter__(self) -> None:
        await self._gate.semaphore.acquire()
        try:
            await self._total.acquire()
            try:
                await self._gate.wait_turn()
            except BaseException:
                self._total.release()
                raise
        except BaseException:
            self._gate.semaphore.release()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        self._total.release()
        self._gate.semaphore.release()


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) >= limit:
            return bytes(body[:limit])
    return bytes(body)


class _Retry(Exception):
    def __init__(self, delay: float | None, result: FetchResult) -> None:
        self.delay = delay
        self.result = result


# --- the fetcher --------------------------------------------------------------------------------------


class Fetcher:
    """Fetches image URLs politely; use as ``async with Fetcher(policy) as fetcher: await fetcher.fetch(url)``.

    One instance per event loop; it keeps its robots.txt cache and host gates for its lifetime.
    ``host_limits`` lets a caller that splits a host over several workers give each a share of the host's
    concurrency and rate (see ``transforms.fetch``).
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._session: aiohttp.ClientSession | None = None
        self._total: asyncio.Semaphore | None = None
        self._robots: dict[str, asyncio.Future[RobotsRules]] = {}
        self._gates: dict[str, HostGate] = {}
        self._limits: dict[str, tuple[int, float]] = {}
        self.robots_requests = 0

    async def __aenter__(self) -> Fetcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        policy = self.policy
        resolver = aiohttp.DefaultResolver() if policy.allow_private_addresses else GuardedResolver()
        connector = aiohttp.TCPConnector(limit=policy.total_concurrency, limit_per_host=0, resolver=resolver,
                                         ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": policy.user_agent, "Accept": "image/*,*/*;q=0.8"},
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=policy.timeout_s, connect=policy.connect_timeout_s))
        self._total = asyncio.Semaphore(policy.total_concurrency)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- gates and robots

    def limit_host(self, url: str, concurrency: int, rate: float) -> None:
        """Give ``url``'s host lower limits than the policy's (a share, when a host is split over workers);
        limits only ever go down."""
        key = host_key(url)
        current = self._limits.get(key)
        if current is not None:
            concurrency, rate = min(concurrency, current[0]), min(rate, current[1])
        self._limits[key] = (concurrency, rate)
        gate = self._gates.get(key)
        if gate is not None:
            gate.interval = max(gate.interval, 1.0 / rate)
            # a semaphore cannot shrink in place; a narrower share takes effect for gates made after this

    def gate(self, url: str) -> HostGate:
        """The host's gate, made on first use with the policy's limits or the share given to :meth:`limit_host`."""
        key = host_key(url)
        gate = self._gates.get(key)
        if gate is None:
            concurrency, rate = self._limits.get(key, (self.policy.per_host_concurrency, self.policy.per_host_rate))
            gate = self._gates[key] = HostGate(concurrency, 1.0 / rate)
        return gate

    async def robots(self, url: str) -> RobotsRules:
        """The robots.txt rules of ``url``'s origin, fetched once (concurrent callers share the request)."""
        origin = origin_of(url)
        future = self._robots.get(origin)
        if future is None:
            future = self._robots[origin] = asyncio.get_running_loop().create_future()
            try:
                rules = await self._fetch_robots(origin)
            except Exception as error:  # noqa: BLE001 -- any failure means "unreachable": disallow all
                rules = RobotsRules(disallow_reason=f"robots.txt of {origin} failed: {type(error).__name__}: {error}")
            future.set_result(rules)
            token = self.policy.robots_token
            delay = rules.crawl_delay(token)
            if delay:
                gate = self.gate(url)
                gate.interval = max(gate.interval, delay)
            return rules
        return await asyncio.shield(future)

    async def _fetch_robots(self, origin: str) -> RobotsRules:
        url = f"{origin}/robots.txt"
        self.robots_requests += 1
        for _ in range(ROBOTS_MAX_REDIRECTS + 1):
            guard = self._literal_guard(url)
            if guard is not None:
                return RobotsRules(private=guard)
            try:
                async with self._slot(url), self._get(url) as response:
                    status = response.status
                    if status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                        url = urljoin(url, response.headers["Location"])
                        continue
                    body = await _read_limited(response, ROBOTS_MAX_BYTES) if 200 <= status < 300 else b""
            except aiohttp.ClientConnectorDNSError as error:
                if isinstance(error.os_error, PrivateAddressError):
                    return RobotsRules(private=str(error.os_error))
                raise
            if 200 <= status < 300:
                return RobotsRules(parser=Protego.parse(body.decode("utf-8", errors="replace")))
            if status == 429 or status >= 500:
                return RobotsRules(disallow_reason=f"robots.txt of {origin} answered HTTP {status}: treated as "
                                                   "disallow all (RFC 9309 2.3.1.4)")
            return RobotsRules(allow_all=True)  # 4xx: no rules (RFC 9309 2.3.1.3)
        return RobotsRules(allow_all=True)  # too many redirects: unavailable (RFC 9309 2.3.1.2)

    # -- requests

    def _literal_guard(self, url: str) -> str | None:
        """Why an IP-literal URL is refused (aiohttp does not resolve literals, so the resolver never sees them)."""
        if self.policy.allow_private_addresses:
            return None
        host = urlsplit(url).hostname or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host == "localhost" or host.endswith(".localhost"):
                return f"{host} is a loopback name"
            return None
        return None if is_public_address(host) else f"{host} is not a public address"

    def _slot(self, url: str) -> _Slot:
        assert self._total is not None, "Fetcher used outside `async with`"
        return _Slot(self.gate(url), self._total)

    def _get(self, url: str) -> Any:
        assert self._session is not None, "Fetcher used outside `async with`"
        return self._session.get(url, allow_redirects=False)

    async def fetch(self, url: str) -> FetchResult:
        """Fetch one image URL; never raises for a bad URL, server or network."""
        policy = self.policy
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            return FetchResult(str(url), FETCH_INVALID_URL, f"not an absolute http(s) URL: {str(url)[:200]!r}")
        current, attempts = url, 0
        for _hop in range(policy.max_redirects + 1):
            guard = self._literal_guard(current)
            if guard is not None:
                return FetchResult(url, FETCH_PRIVATE_ADDRESS, guard, final_url=current, attempts=attempts)
            if policy.respect_robots:
                rules = await self.robots(current)
                if rules.private is not None:
                    return FetchResult(url, FETCH_PRIVATE_ADDRESS, rules.private, final_url=current,
                                       attempts=attempts)
                if not rules.allows(current, policy.robots_token):
                    detail = rules.disallow_reason or f"robots.txt of {origin_of(current)} disallows {current}"
                    return FetchResult(url, ROBOTS_DISALLOWED, detail, final_url=current, attempts=attempts)
                delay = rules.crawl_delay(policy.robots_token)
                if delay and delay > policy.max_crawl_delay_s:
                    return FetchResult(url, ROBOTS_DISALLOWED,
                                       f"robots.txt asks for a crawl delay of {delay:g} s, more than "
                                       f"fetch.max_crawl_delay_s={policy.max_crawl_delay_s:g}",
                                       final_url=current, attempts=attempts)
            result, location = await self._fetch_with_retries(url, current, attempts)
            if location is None:
                return result
            current, attempts = location, result.attempts
        return FetchResult(url, FETCH_TOO_MANY_REDIRECTS, f"more than {policy.max_redirects} redirects",
                           final_url=current, attempts=attempts)

    async def _fetch_with_retries(self, url: str, current: str, attempts: int) -> tuple[FetchResult, str | None]:
        policy = self.policy
        gate = self.gate(current)
        result = FetchResult(url, FETCH_CONNECTION_ERROR, "not attempted")
        for retry in range(policy.max_retries + 1):
            attempts += 1
            try:
                async with self._slot(current):
                    return await self._attempt(url, current, attempts)
            except _Retry as signal:
                result = signal.result
                if retry == policy.max_retries:
                    break
                delay = signal.delay
                if delay is not None and delay > policy.max_retry_after_s:
                    result = result._replace(detail=f"{result.detail}; Retry-After {delay:g} s is longer than "
                                                    f"fetch.max_retry_after_s={policy.max_retry_after_s:g}")
                    break
                if delay is None:
                    delay = min(policy.backoff_s * 2 ** retry, policy.max_retry_after_s)
                    delay *= 1 + 0.25 * random.random()  # jitter: do not retry in lockstep with other workers
                gate.pause(delay)
        return result._replace(detail=f"{result.detail} (after {attempts} attempts)"), None

    async def _attempt(self, url: str, current: str, attempts: int) -> tuple[FetchResult, str | None]:
        policy = self.policy

        def result(reason: str, detail: str, **kwargs: Any) -> FetchResult:
            return FetchResult(url, reason, detail, final_url=current, attempts=attempts, **kwargs)

        try:
            async with self._get(current) as response:
                status = response.status
                content_type = response.headers.get("Content-Type")
                if status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location")
                    if location:
                        return result(OK, f"redirect {status}", status=status), urljoin(current, location)
                    return result(FETCH_HTTP_OTHER, f"HTTP {status} without Location", status=status), None
                if status in RETRY_STATUSES:
                    reason = FETCH_RATE_LIMITED if status == 429 else FETCH_HTTP_5XX
                    retry_after = response.headers.get("Retry-After")
                    raise _Retry(parse_retry_after(retry_after),
                                 result(reason, f"HTTP {status}" + (f", Retry-After {retry_after}"
                                                                   if retry_after else ""), status=status))
                if 400 <= status < 500:
                    return result(FETCH_HTTP_4XX, f"HTTP {status} {response.reason or ''}".strip(), status=status), None
                if status >= 500:
                    return result(FETCH_HTTP_5XX, f"HTTP {status} {response.reason or ''}".strip(), status=status), None
                if not 200 <= status < 300:
                    return result(FETCH_HTTP_OTHER, f"HTTP {status}", status=status), None
                opt_out = x_robots_opt_out(response.headers.getall("X-Robots-Tag", []), policy.robots_token,
                                           policy.opt_out_directives)
                if opt_out is not None:
                    return result(OPTED_OUT, f"X-Robots-Tag: {opt_out}", status=status), None
                declared = (content_type or "").split(";", 1)[0].strip().lower()
                if declared and not declared.startswith("image/") and declared not in (
                        "application/octet-stream", "binary/octet-stream"):
                    return result(NOT_AN_IMAGE, f"Content-Type {declared}", status=status,
                                  content_type=content_type), None
                length = response.content_length
                if length is not None and length > policy.max_bytes:
                    return result(FETCH_TOO_LARGE, f"Content-Length {length} > fetch.max_bytes={policy.max_bytes}",
                                  status=status), None
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > policy.max_bytes:
                        return result(FETCH_TOO_LARGE, f"body passed fetch.max_bytes={policy.max_bytes} "
                                                       "while streaming", status=status), None
                head = bytes(body[:512])
                if looks_like_html(head) or (not declared.startswith("image/") and image_magic(head) is None):
                    return result(NOT_AN_IMAGE, f"body is not an image (declared {declared or 'nothing'}, "
                                                f"starts {head[:24]!r})", status=status,
                                  content_type=content_type), None
                return result(OK, f"HTTP {status}", body=bytes(body), status=status,
                              content_type=content_type), None
        except _Retry:
            raise
        except asyncio.TimeoutError:
            return result(FETCH_TIMEOUT, f"no complete answer within fetch.timeout_s={policy.timeout_s:g}"), None
        except aiohttp.ClientConnectorDNSError as error:
            if isinstance(error.os_error, PrivateAddressError):
                return result(FETCH_PRIVATE_ADDRESS, str(error.os_error)), None
            return result(FETCH_DNS_ERROR, f"{type(error).__name__}: {error}"), None
        except aiohttp.TooManyRedirects as error:  # not raised with allow_redirects=False; kept for safety
            return result(FETCH_TOO_MANY_REDIRECTS, str(error)), None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            raise _Retry(None, result(FETCH_CONNECTION_ERROR, f"{type(error).__name__}: {error}")) from error
        except (aiohttp.ClientResponseError, aiohttp.InvalidURL, ValueError) as error:
            return result(FETCH_HTTP_OTHER, f"{type(error).__name__}: {error}"), None

    async def fetch_all(self, urls: Iterable[str]) -> list[FetchResult]:
        """Fetch many URLs concurrently (limits apply); results in the order of ``urls``."""
        return list(await asyncio.gather(*(self.fetch(url) for url in urls)))


__all__ = [name for name in dir() if name.isupper() and not name.startswith("_")] + [
    "FetchPolicy", "FetchResult", "Fetcher", "GuardedResolver", "HostGate", "PrivateAddressError", "RobotsRules",
    "host_key", "is_public_address", "origin_of", "parse_retry_after", "x_robots_opt_out",
]
