"""The polite fetcher (transforms/web/fetcher.py) against the loopback site: every fault, and politeness as the
server saw it. Real HTTP over real sockets on 127.0.0.1; every request loop is bounded."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hashlib
import itertools
import time

import pytest

from tests.web_site import WebSite, sample_photos
from transforms.fetch import FetchConfig
from transforms.web.fetcher import (
    FETCH_HTTP_4XX,
    FETCH_HTTP_5XX,
    FETCH_INVALID_URL,
    FETCH_PRIVATE_ADDRESS,
    FETCH_RATE_LIMITED,
    FETCH_TIMEOUT,
    FETCH_TOO_LARGE,
    FETCH_TOO_MANY_REDIRECTS,
    NOT_AN_IMAGE,
    OK,
    OPTED_OUT,
    ROBOTS_DISALLOWED,
    Fetcher,
    FetchPolicy,
    GuardedResolver,
    PrivateAddressError,
    is_public_address,
    parse_retry_after,
    x_robots_opt_out,
)

PHOTOS = sample_photos(6)
NAMES = list(PHOTOS)


def policy(**changes: object) -> FetchPolicy:
    config = FetchConfig(allow_private_addresses=True, timeout_s=0.4, connect_timeout_s=0.4, max_retries=1,
                         backoff_s=0.05, max_bytes=1_000_000, max_redirects=3, per_host_concurrency=4,
                         per_host_rate=100.0)
    return dataclasses.replace(config.policy(), **changes)


def fetch_all(p: FetchPolicy, urls: list[str]) -> tuple[list, Fetcher]:
    async def go() -> tuple[list, Fetcher]:
        async with Fetcher(p) as fetcher:
            return await asyncio.wait_for(fetcher.fetch_all(urls), 30), fetcher
    return asyncio.run(go())


@pytest.fixture
def site():
    with WebSite(PHOTOS, slow_s=1.0) as web_site:
        yield web_site


def test_every_fault_has_its_reason(site: WebSite) -> None:
    cases = {
        f"/img/{NAMES[0]}": OK,
        f"/redirect/{NAMES[1]}": OK,
        f"/busy/{NAMES[2]}": OK,  # 429 once, then the photo
        f"/private/{NAMES[0]}": ROBOTS_DISALLOWED,
        "/missing.jpg": FETCH_HTTP_4XX,
        "/always-busy.jpg": FETCH_RATE_LIMITED,
        "/error.jpg": FETCH_HTTP_5XX,
        "/slow.jpg": FETCH_TIMEOUT,
        "/loop.jpg": FETCH_TOO_MANY_REDIRECTS,
        "/huge.jpg": FETCH_TOO_LARGE,
        "/huge-chunked.jpg": FETCH_TOO_LARGE,
        "/page.jpg": NOT_AN_IMAGE,
        "/disguised.jpg": NOT_AN_IMAGE,
        "/noai.jpg": OPTED_OUT,
    }
    results, _ = fetch_all(policy(), [site.url(path) for path in cases])
    assert {path: r.reason for path, r in zip(cases, results, strict=True)} == cases
    by_path = dict(zip(cases, results, strict=True))
    # the bytes are the photo's, byte for byte
    assert by_path[f"/img/{NAMES[0]}"].body == PHOTOS[NAMES[0]]
    assert by_path[f"/redirect/{NAMES[1]}"].body == PHOTOS[NAMES[1]]
    assert by_path[f"/redirect/{NAMES[1]}"].final_url == site.url(f"/img/{NAMES[1]}")
    assert hashlib.sha256(by_path[f"/busy/{NAMES[2]}"].body).digest() == hashlib.sha256(PHOTOS[NAMES[2]]).digest()
    assert all(r.body is None for r in results if r.reason != OK)
    assert by_path["/missing.jpg"].detail == "HTTP 404 Not Found"
    assert by_path["/noai.jpg"].detail == "X-Robots-Tag: noai"
    assert by_path["/huge.jpg"].detail.startswith("Content-Length ")
    assert "while streaming" in by_path["/huge-chunked.jpg"].detail
    assert by_path["/page.jpg"].detail == "Content-Type text/html"
    assert "body is not an image (declared image/jpeg" in by_path["/disguised.jpg"].detail
    # a polite client never asks for what robots.txt disallows
    assert site.count(f"/private/{NAMES[0]}") == 0


def test_retries_are_bounded_and_honour_retry_after(site: WebSite) -> None:
    results, _ = fetch_all(policy(max_retries=2), [site.url("/always-busy.jpg"), site.url("/error.jpg"),
                                                   site.url(f"/busy/{NAMES[3]}")])
    assert [r.reason for r in results] == [FETCH_RATE_LIMITED, FETCH_HTTP_5XX, OK]
    assert [r.attempts for r in results] == [3, 3, 2]
    assert results[0].detail == "HTTP 429, Retry-After 1 (after 3 attempts)"
    assert site.count("/always-busy.jpg") == 3 and site.count("/error.jpg") == 3
    # the host was paused for Retry-After: 1 s after each 429, whichever request it was
    starts = site.starts(f"/busy/{NAMES[3]}")
    assert len(starts) == 2 and starts[1] - starts[0] >= 0.95


def test_a_retry_after_beyond_the_limit_ends_the_attempts(site: WebSite) -> None:
    results, _ = fetch_all(policy(max_retries=3, max_retry_after_s=0.5), [site.url("/always-busy.jpg")])
    assert results[0].reason == FETCH_RATE_LIMITED and results[0].attempts == 1
    assert "longer than fetch.max_retry_after_s=0.5" in results[0].detail
    assert site.count("/always-busy.jpg") == 1


def test_per_host_concurrency_and_rate_hold_as_the_server_sees_them() -> None:
    with WebSite(PHOTOS, latency=0.05) as site:
        urls = [site.url(f"/img/{NAMES[i % len(NAMES)]}?n={i}") for i in range(12)]
        results, fetcher = fetch_all(policy(per_host_concurrency=2, per_host_rate=20.0), urls)
        assert all(r.ok for r in results)
        assert site.max_in_flight <= 2
        starts = site.starts("/img/")
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert len(starts) == 12 and min(gaps) >= 1 / 20 - 0.01  # 20 starts/s at most
        # robots.txt: once for the host, although 12 requests wanted it at the same moment
        assert site.count("/robots.txt") == 1 and fetcher.robots_requests == 1


def test_total_concurrency_caps_all_hosts_together() -> None:
    with WebSite(PHOTOS, latency=0.1) as a, WebSite(PHOTOS, latency=0.1) as b:
        urls = [s.url(f"/img/{NAMES[i % 3]}?n={i}") for i in range(6) for s in (a, b)]
        results, _ = fetch_all(policy(total_concurrency=3, per_host_concurrency=3), urls)
        assert all(r.ok for r in results)
        a.settle()
        b.settle()
        # The server stamps a request's end after writing its response: on a busy machine the client may already
        # have started the next one. Every answer takes 0.1 s, so a real fourth request would overlap the others
        # for most of that; the last 0.05 s of each request is not counted.
        images = [r for s in (a, b) for r in s.requests if r.path.startswith("/img/")]
        events = sorted([(r.start, 1) for r in images] + [(r.end - 0.05, -1) for r in images])
        level = peak = 0
        for _, step in events:
            level += step
            peak = max(peak, level)
        assert 2 <= peak <= 3
        assert a.count("/robots.txt") == 1 and b.count("/robots.txt") == 1


def test_the_user_agent_names_the_project(site: WebSite) -> None:
    fetch_all(policy(), [site.url(f"/img/{NAMES[0]}")])
    site.settle()
    agents = {r.user_agent for r in site.requests}
    assert agents == {FetchConfig().user_agent} and "icl-cluster-pipeline" in FetchConfig().user_agent


def test_robots_txt_answers_follow_rfc_9309() -> None:
    with WebSite(PHOTOS, robots_status=503) as down, WebSite(PHOTOS, robots_status=404) as none, \
            WebSite(PHOTOS, robots_txt="User-agent: icl-cluster-pipeline\nDisallow: /img/\n\nUser-agent: *\n"
                                       "Disallow:\n") as named, \
            WebSite(PHOTOS, robots_txt="User-agent: *\nCrawl-delay: 30\n") as slow:
        results, _ = fetch_all(policy(max_crawl_delay_s=10), [
            down.url(f"/img/{NAMES[0]}"), none.url(f"/img/{NAMES[0]}"), named.url(f"/img/{NAMES[0]}"),
            slow.url(f"/img/{NAMES[0]}")])
        assert [r.reason for r in results] == [ROBOTS_DISALLOWED, OK, ROBOTS_DISALLOWED, ROBOTS_DISALLOWED]
        assert "answered HTTP 503: treated as disallow all" in results[0].detail
        assert "crawl delay of 30 s" in results[3].detail
        assert down.count(f"/img/{NAMES[0]}") == named.count(f"/img/{NAMES[0]}") == slow.count(f"/img/{NAMES[0]}") == 0


def test_a_crawl_delay_within_the_limit_spaces_the_requests() -> None:
    with WebSite(PHOTOS, robots_txt="User-agent: *\nCrawl-delay: 0.3\n") as site:
        results, _ = fetch_all(policy(), [site.url(f"/img/{name}") for name in NAMES[:3]])
        assert all(r.ok for r in results)
        starts = site.starts("/img/")
        assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.29


def test_private_addresses_are_refused_by_default(site: WebSite) -> None:
    guarded = policy(allow_private_addresses=False)
    results, _ = fetch_all(guarded, [site.url(f"/img/{NAMES[0]}"), f"http://localhost:{site.port}/img/x.jpg",
                                     f"http://[::1]:{site.port}/img/x.jpg", "http://169.254.169.254/latest/meta-data",
                                     "ftp://example.org/a.jpg", "not a url"])
    assert [r.reason for r in results] == [FETCH_PRIVATE_ADDRESS] * 4 + [FETCH_INVALID_URL] * 2
    site.settle()
    assert site.requests == []  # nothing reached the server, not even robots.txt

    async def resolve() -> None:
        resolver = GuardedResolver()
        try:
            with pytest.raises(PrivateAddressError, match="resolves only to non-public addresses"):
                await resolver.resolve("localhost", 80)
        finally:
            await resolver.close()
    asyncio.run(resolve())


def test_address_classes() -> None:
    assert is_public_address("93.184.216.34") and is_public_address("2606:2800:220:1:248:1893:25c8:1946")
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "224.0.0.1", "not-an-ip"):
        assert not is_public_address(address), address


def test_x_robots_tag_values_apply_as_img2dataset_reads_them() -> None:
    directives = ("noai", "noimageai", "noindex", "noimageindex")
    token = "icl-cluster-pipeline"
    assert x_robots_opt_out(["noai"], token, directives) == "noai"
    assert x_robots_opt_out(["nofollow, NoImageAI"], token, directives) == "noimageai"
    assert x_robots_opt_out(["otherbot: noai"], token, directives) is None
    assert x_robots_opt_out(["icl-cluster-pipeline: noindex"], token, directives) == "noindex"
    assert x_robots_opt_out(["unavailable_after: 25 Jun 2010 15:00:00 PST"], token, directives) is None
    assert x_robots_opt_out(["nofollow", "noarchive"], token, directives) is None


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120") == 120.0
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now) <= 31
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
