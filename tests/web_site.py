"""A loopback web site for the fetcher's tests, its benchmark and ``make demo-web``: real photos and every fault.

:class:`WebSite` is a threaded HTTP/1.1 server bound to 127.0.0.1 only (an ephemeral port), serving the bundled
sample's real DreamBench photos (``sample/crawl.parquet``) and these paths:

=========================  ======================================================================
``/robots.txt``            ``User-agent: *`` / ``Disallow: /private/`` (or the text given)
``/img/NAME``              a photo (``image/jpeg``) after ``latency`` seconds
``/private/NAME``          a photo, but robots.txt disallows it (a polite client never asks)
``/missing.jpg``           404
``/busy/NAME``             429 with ``Retry-After: 1`` the first time each path is asked, then the photo
``/always-busy.jpg``       429 with ``Retry-After: 1``, always
``/error.jpg``             503, always
``/slow.jpg``              the photo after ``slow_s`` seconds (past a short client timeout)
``/redirect/NAME``         302 to ``/img/NAME``
``/loop.jpg``              302 to itself
``/huge.jpg``              a body of ``huge_bytes`` with its Content-Length
``/huge-chunked.jpg``      the same, chunked, without a Content-Length
``/page.jpg``              an HTML page (``text/html``)
``/disguised.jpg``         an HTML page sent as ``image/jpeg``
``/noai.jpg``              a photo with ``X-Robots-Tag: noai``
``/pages/NAME``            HTML given in ``pages``
=========================  ======================================================================

It records every request (path, start and end times, user agent) and the most requests it had in flight at
once, so tests can check politeness from the server's side. Use it as a context manager; it stops its thread.
"""

from __future__ import annotations

import gzip
import io
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample" / "crawl.parquet"

DEFAULT_ROBOTS = "User-agent: *\nDisallow: /private/\n"
HTML_PAGE = (b"<!DOCTYPE html><html><head><title>Not found</title></head>"
             b"<body><h1>Sorry, this product is no longer available.</h1></body></html>")


def sample_photos(limit: int | None = None) -> dict[str, bytes]:
    """Real JPEG photos from the bundled sample: ``{"backpack-00.jpg": bytes, ...}`` (DreamBench product photos,
    see sample/ATTRIBUTION.md)."""
    photos: dict[str, bytes] = {}
    for row in pq.read_table(SAMPLE, columns=["image_url", "image", "expected", "note"]).to_pylist():
        photo = row["image"] or b""
        if row["expected"] == "kept" and row["note"].startswith("product photo") and photo[:3] == b"\xff\xd8\xff":
            name = row["image_url"].rsplit("/", 1)[-1]
            photos.setdefault(name, row["image"])
            if limit is not None and len(photos) >= limit:
                break
    return photos


@dataclass(frozen=True)
class Request:
    path: str
    start: float
    end: float
    user_agent: str


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the benchmark opens many connections at once
    site: WebSite

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that stops reading an oversize body or gives up on a slow one resets the connection: that is
        # the behaviour under test, not a server error.
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body leave in two writes: without TCP_NODELAY, Nagle and the client's delayed ACK add ~40 ms to
    # every keep-alive response
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 -- the base class's name
        site = self.server.site
        start = time.monotonic()
        site._enter()
        try:
            self._route(site)
        finally:
            site._leave(Request(self.path, start, time.monotonic(), self.headers.get("User-Agent", "")))

    def _send(self, status: int, body: bytes = b"", content_type: str = "image/jpeg",
              headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _photo(self, site: WebSite, name: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        photo = site.photos.get(name)
        if photo is None:
            self._send(404, b"no such photo", "text/plain")
            return
        if site.latency:
            time.sleep(site.latency)
        self._send(200, photo, "image/jpeg", headers)

    def _route(self, site: WebSite) -> None:
        path = self.path.split("?", 1)[0]
        first = next(iter(site.photos))
        if path == "/robots.txt":
            if site.robots_status != 200:
                self._send(site.robots_status, b"", "text/plain")
            else:
                self._send(200, site.robots_txt.encode(), "text/plain")
        elif path.startswith("/img/"):
            self._photo(site, path[len("/img/"):])
        elif path.startswith("/private/"):
            self._photo(site, path[len("/private/"):])
        elif path == "/missing.jpg":
            self._send(404, b"not found", "text/plain")
        elif path.startswith("/busy/"):
            with site._lock:
                first_time = path not in site._busy_seen
                site._busy_seen.add(path)
            if first_time:
                self._send(429, b"slow down", "text/plain", [("Retry-After", "1")])
            else:
                self._photo(site, path[len("/busy/"):])
        elif path == "/always-busy.jpg":
            self._send(429, b"slow down", "text/plain", [("Retry-After", "1")])
        elif path == "/error.jpg":
            self._send(503, b"unavailable", "text/plain")
        elif path == "/slow.jpg":
            time.sleep(site.slow_s)
            self._photo(site, first)
        elif path.startswith("/redirect/"):
            self._send(302, b"", "text/plain", [("Location", "/img/" + path[len("/redirect/"):])])
        elif path == "/loop.jpg":
            self._send(302, b"", "text/plain", [("Location", "/loop.jpg")])
        elif path == "/huge.jpg":
            self._send(200, site.photos[first] + b"\0" * site.huge_bytes, "image/jpeg")
        elif path == "/huge-chunked.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = site.photos[first]
            sent = 0
            try:
                while sent < site.huge_bytes:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    sent += len(chunk)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client stopped reading: what it should do
        elif path == "/page.jpg":
            self._send(200, HTML_PAGE, "text/html; charset=utf-8")
        elif path == "/disguised.jpg":
            self._send(200, HTML_PAGE, "image/jpeg")
        elif path == "/noai.jpg":
            self._photo(site, first, [("X-Robots-Tag", "noai")])
        elif path.startswith("/pages/") and path[len("/pages/"):] in site.pages:
            body = site.pages[path[len("/pages/"):]].encode("utf-8")
            self._send(200, gzip.compress(body, mtime=0), "text/html; charset=utf-8", [("Content-Encoding", "gzip")])
        else:
            self._send(404, b"not found", "text/plain")


class WebSite:
    """The loopback site (see the module docstring); ``with WebSite(photos) as site: site.url("/img/x.jpg")``."""

    def __init__(self, photos: dict[str, bytes] | None = None, *, latency: float = 0.0, slow_s: float = 2.0,
                 huge_bytes: int = 3 * 1024 * 1024, robots_txt: str = DEFAULT_ROBOTS, robots_status: int = 200,
                 pages: dict[str, str] | None = None) -> None:
        self.photos = photos if photos is not None else sample_photos()
        self.latency = latency
        self.slow_s = slow_s
        self.huge_bytes = huge_bytes
        self.robots_txt = robots_txt
        self.robots_status = robots_status
        self.pages = pages or {}
        self.requests: list[Request] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._busy_seen: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> WebSite:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.site = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> WebSite:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- addresses and observations

    @property
    def port(self) -> int:
        assert self._server is not None, "site not started"
        return self._server.server_address[1]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def settle(self, timeout: float = 3.0) -> None:
        """Wait until no request is being answered (a client has the last byte of a response a moment before the
        server thread that sent it records the request)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())

    def count(self, path: str) -> int:
        """How many requests asked for ``path``."""
        self.settle()
        with self._lock:
            return sum(1 for r in self.requests if r.path.split("?", 1)[0] == path)

    def starts(self, prefix: str = "/") -> list[float]:
        """Start times of the requests whose path starts with ``prefix``, sorted."""
        self.settle()
        with self._lock:
            return sorted(r.start for r in self.requests if r.path.startswith(prefix))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = 0
            self._busy_seen.clear()

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self, request: Request) -> None:
        with self._lock:
            self._in_flight -= 1
            self.requests.append(request)
            if not self._in_flight:
                self._idle.notify_all()


# --- WARC files ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capture:
    """One HTTP response to store in a WARC file."""

    url: str
    body: bytes
    content_type: str
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()


def write_warc(path: str | Path, captures: Iterable[Capture]) -> str:
    """A WARC file (gzipped per record when ``path`` ends in ``.gz``) of ``response`` records, with warcio,
    each preceded by its ``request`` record as crawlers write them."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = str(path)
    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=path.endswith(".gz"))
        for capture in captures:
            reasons = {200: "OK", 404: "Not Found", 302: "Found", 500: "Internal Server Error"}
            http_headers = StatusAndHeaders(
                f"{capture.status} {reasons.get(capture.status, 'Status')}",
                [("Content-Type", capture.content_type), ("Content-Length", str(len(capture.body))),
                 *capture.headers],
                protocol="HTTP/1.1")
            request = writer.create_warc_record(
                capture.url, "request", payload=io.BytesIO(b""),
                http_headers=StatusAndHeaders(f"GET {capture.url} HTTP/1.1", [("User-Agent", "test")],
                                              is_http_request=True))
            writer.write_record(request)
            record = writer.create_warc_record(capture.url, "response", payload=io.BytesIO(capture.body),
                                               http_headers=http_headers)
            writer.write_record(record)
    return path


def serve(argv: list[str] | None = None) -> None:
    """``python -m tests.web_site --hosts 4 --latency 0.05``: start sites in this process, print their base URLs
    as one JSON line, serve until stdin closes or ``--max-seconds`` pass (the benchmark runs the server in its
    own process so that it does not share the client's interpreter)."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=serve.__doc__)
    parser.add_argument("--hosts", type=int, default=1)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    photos = sample_photos()
    sites = [WebSite(photos, latency=args.latency).start() for _ in range(args.hosts)]
    try:
        print(json.dumps([site.base for site in sites]), flush=True)
        done = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        done.wait(args.max_seconds)
    finally:
        for site in sites:
            site.stop()


if __name__ == "__main__":
    serve()
