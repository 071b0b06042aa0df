"""List answers: one :class:`Page`, and a :class:`Listing` that reads every page it must.

The docs show ``{"data": [...], "meta": {"current_page", "per_page", "total"}}`` and nothing
more about pagination (no ``last_page``, no maximum ``per_page``), so a listing trusts ``meta``
over the page's length: a server may cap pages below the ``per_page`` asked (and even echo the
asked value), so a short page proves nothing. A :class:`Listing` reads

* until ``meta.total`` items came, when the server sends ``total`` (past ``meta.last_page`` if
  need be: a ``last_page`` computed from an echoed ``per_page`` the server did not honour is too
  small, and the page after the real end is empty);
* else until ``meta.last_page``;
* else (no ``meta``) until an empty page;

and always stops on an empty page, on a page repeating the previous one (a server ignoring
``page``), and after ``max_pages`` pages. ``complete`` then says whether it provably saw
everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from dokstamp_sync.dokstamp import errors

Entity = dict[str, Any]
MAX_PAGES = 10_000  # a defensive ceiling: 2 million rows at 200 a page, 150,000 at 15


@dataclass(frozen=True)
class Page:
    """One page of a list answer and its ``meta``.

    ``total`` is ``meta.total``, or the number of items when the server sent none;
    ``meta_total`` is ``meta.total`` or ``None`` (use it to tell the two apart).
    """

    items: list[Entity]
    current_page: int
    per_page: int
    total: int
    last_page: int | None
    meta_total: int | None = None


def parse_page(response: httpx.Response, body: Any, *, page: int, per_page: int) -> Page:
    """The :class:`Page` in a list answer's ``body``; :class:`~.errors.MalformedResponse` when
    it is not ``{"data": [objects...], "meta": {integers...}}`` (``meta`` may be absent)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(i, dict) for i in data):
        raise errors.malformed(response, "a list answer needs data: [objects]")
    meta = body.get("meta", {})
    if meta is None:
        meta = {}
    numbers = {k: _count(meta.get(k)) if isinstance(meta, dict) else -1
               for k in ("current_page", "per_page", "total", "last_page")}
    if not isinstance(meta, dict) or -1 in numbers.values():
        raise errors.malformed(response, "a list answer's meta is not a set of counts")
    total = numbers["total"]
    return Page(items=[dict(i) for i in data],
                current_page=page if numbers["current_page"] is None
                else numbers["current_page"],
                per_page=per_page if numbers["per_page"] is None else numbers["per_page"],
                total=len(data) if total is None else total,
                last_page=numbers["last_page"] or None, meta_total=total)


def _count(value: Any) -> int | None:
    """A meta count: ``None`` when absent, -1 when not a non-negative integer."""
    if value is None:
        return None
    if isinstance(value, bool):
        return -1
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and value >= 0 else -1


class Listing:
    """Every item of a list endpoint, read lazily page by page (see the module docstring).

    Iterate it once. Afterwards ``complete`` is true when the listing provably saw everything:
    ``meta.total`` items (the last page's ``total``) or, without a total, every page up to
    ``meta.last_page`` or, with no ``meta`` at all, up to an empty page; and it was not cut by
    a repeated page or ``max_pages``. An incomplete listing must not be taken as "absent from
    DokStamp".
    """

    def __init__(self, fetch: Callable[[int], Page], *, max_pages: int = MAX_PAGES) -> None:
        self._fetch = fetch
        self.max_pages = max_pages
        self.pages = 0  # requests made
        self.seen = 0  # items yielded
        self.total: int | None = None  # the latest meta.total
        self.last_page: int | None = None  # the latest meta.last_page
        self.complete = False

    def __iter__(self) -> Iterator[Entity]:
        previous: list[Entity] | None = None
        for number in range(1, self.max_pages + 1):
            page = self._fetch(number)
            self.pages = number
            self.total, self.last_page = page.meta_total, page.last_page
            if not page.items:  # past the end (or nothing at all)
                self.complete = self._saw_all(number - 1, ended=True)
                return
            if page.items == previous:  # the server ignores `page`: more would be repeats
                return
            previous = page.items
            self.seen += len(page.items)
            yield from page.items
            if self._saw_all(number, ended=False):
                self.complete = True
                return

    def _saw_all(self, number: int, *, ended: bool) -> bool:
        if self.total is not None:
            return self.seen >= self.total
        if self.last_page is not None:
            return number >= self.last_page
        return ended
