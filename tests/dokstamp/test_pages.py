"""Listings trust meta over page length, always end, and say whether they were complete."""

from __future__ import annotations

import httpx

import graph
from dokstamp_sync.dokstamp import Listing, Page


def _server(rows: int, *, cap: int, meta: str = "total+last_page", vanish_after: int = 0):
    """A list endpoint of ``rows`` items that serves at most ``cap`` per page but echoes the
    ``per_page`` it was asked (``last_page`` computed from that echo). ``meta`` picks which
    counts it sends; ``vanish_after`` > 0 answers empty pages from that page on."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        asked = int(request.url.params["per_page"])
        calls.append(page)
        start = (page - 1) * cap
        items = [] if vanish_after and page >= vanish_after else \
            [{"uuid": f"u{i}"} for i in range(start, min(start + cap, rows))]
        counts = {"current_page": page, "per_page": asked, "total": rows,
                  "last_page": max(1, -(-rows // asked))}
        keep = {"total+last_page": ("current_page", "per_page", "total", "last_page"),
                "total": ("current_page", "per_page", "total"),
                "last_page": ("current_page", "per_page", "last_page")}.get(meta, ())
        body = {"data": items} | ({"meta": {k: counts[k] for k in keep}} if keep else {})
        return httpx.Response(200, json=body)

    return handler, calls


def test_a_capped_page_does_not_end_the_listing(mock_api):
    """250 rows served 100 a page while meta echoes per_page 200 and last_page 2: all 250
    come (the short first page and the too-small last_page do not stop it), complete."""
    handler, calls = _server(250, cap=100)
    listing = mock_api(handler).students.listing(per_page=200)
    assert [s["uuid"] for s in listing] == [f"u{i}" for i in range(250)]
    assert calls == [1, 2, 3]
    assert listing.complete
    assert (listing.total, listing.seen, listing.pages) == (250, 250, 3)


def test_iterate_and_find_read_every_capped_page_too(mock_api):
    """find() (search-before-create) gets every match across capped pages."""
    handler, _ = _server(250, cap=100, meta="total")
    assert len(mock_api(handler).students.find(email="x")) == 250


def test_with_last_page_only_reads_up_to_last_page(mock_api):
    """Without total, last_page decides: 3 short pages of 2 are read, then it stops."""
    handler, calls = _server(6, cap=2, meta="last_page")
    listing = mock_api(handler).students.listing(per_page=2)
    assert len(list(listing)) == 6
    assert calls == [1, 2, 3]
    assert listing.complete


def test_without_meta_reads_until_an_empty_page(mock_api):
    """With no meta at all, short pages do not end the listing; the empty page does."""
    handler, calls = _server(5, cap=2, meta="none")
    listing = mock_api(handler).students.listing(per_page=200)
    assert len(list(listing)) == 5
    assert calls == [1, 2, 3, 4]
    assert listing.complete


def test_rows_missing_before_total_make_an_incomplete_listing(mock_api):
    """meta.total says 10 but page 2 is already empty: the listing ends, incomplete."""
    handler, calls = _server(10, cap=3, vanish_after=2)
    listing = mock_api(handler).students.listing(per_page=3)
    assert len(list(listing)) == 3
    assert calls == [1, 2]
    assert not listing.complete


def test_page_cap_ends_an_endless_listing():
    """A listing that never ends on its own stops after max_pages, incomplete."""
    fetched: list[int] = []

    def fetch(number: int) -> Page:
        fetched.append(number)
        return Page(items=[{"uuid": str(number)}], current_page=number, per_page=1, total=1,
                    last_page=None)

    listing = Listing(fetch, max_pages=5)
    assert len(list(listing)) == 5
    assert fetched == [1, 2, 3, 4, 5]
    assert not listing.complete


def test_sandbox_listing_is_complete(client, sandbox):
    """Against the sandbox (meta with total and last_page), 20 students over pages of 15 come
    in 2 requests and the listing is complete."""
    for _ in range(20):
        graph.student(client)
    sandbox.sandbox.stats.reset()
    listing = client.students.listing(per_page=15)
    assert len({s["uuid"] for s in listing}) == 20
    assert listing.complete
    assert sandbox.sandbox.stats.by_route["GET /students"] == 2
