"""The listing shortcut: one paged listing per scope instead of one search per entity.

A scope is what one listing reads: a whole entity kind (``student``: every student), or, for a
kind the docs let us search only by a wider filter (``Spec.scope``: enrollments by course), that
filter's rows (``enrollment:course_uuid=...``). Once a listing of a scope provably read every
row (``Listing.complete`` with a ``meta.total``: that many rows read), the natural keys of its
rows are in the database's natural-key table and a marker in Redis says the scope is trusted,
for :data:`~.marks.LISTING_TRUSTED_FOR` seconds counted from the listing's start. While it is,
a natural key that is not in the table is absent from DokStamp: the create is sent without a
search. The table stays current because every create of ours is recorded in it under the
natural-key lock before that lock is let go.

The listing is not trusted for one natural key, which is searched instead, when:
- a create of it may still land (the in-flight mark: the search waits for the window first);
- a create of it was sent and its outcome never recorded (the unresolved mark, set before the
  POST and cleared once the outcome is recorded or refused; it lives the create window plus
  :data:`~.marks.LISTING_TRUSTED_FOR`, so every listing trusted after it is gone was read after
  that create could land). This covers a lost response, a killed worker and a retried event.

It is not trusted for the whole scope, which is read again, when:
- its marker has expired (the listing grew old);
- a create sent on its word was refused as a duplicate (409, or 422) or DokStamp answered with an
  entity other than the table's: the marker is dropped;
- the last listing could not be read completely (no marker is set; events keep searching).

Whole-kind listings are taken once the backlog of open upserts of that kind makes them cheaper
than one search each. A scoped kind needs no decision: its search must page through the whole
scope anyway (an enrollment is found only by reading its course's enrollments), so every such
search records each row it read and marks the scope when it saw them all.

What another system creates in DokStamp while a scope is trusted is the accepted risk, bounded
by the trust period; a create it makes refused as a duplicate falls back to a search.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dokstamp_sync.dokstamp import Entity
from dokstamp_sync.dokstamp.client import MAX_PER_PAGE, Resource
from dokstamp_sync.dokstamp.pages import Listing
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.entities import Spec, natural_key, remote_value
from dokstamp_sync.sync.marks import LISTING_TRUSTED_FOR
from dokstamp_sync.sync.outcomes import Busy

log = logging.getLogger("dokstamp_sync.sync")
MIN_BACKLOG = 50  # below this, searching one by one is cheaper than listing the whole kind
FRESH_FOR = LISTING_TRUSTED_FOR  # seconds a listing is trusted, from its start


def scope_of(spec: Spec, payload: dict[str, Any]) -> str:
    """The scope whose listing answers for ``payload``'s natural key."""
    if spec.scope is None:
        return spec.entity
    return spec.entity + ":" + "|".join(f"{f}={payload.get(f)}" for f in spec.scope)


def listing_trusted(ctx: SyncContext, spec: Spec, payload: dict[str, Any],
                    resource: Resource, *, marked: bool | None = None,
                    untrusted: bool | None = None) -> bool:
    """Whether a trusted complete listing of ``payload``'s scope is in the natural-key table;
    a whole kind is listed now (once, fleet-wide) when its backlog makes that cheaper.
    ``marked``, ``untrusted``: whether the scope's marker and the kind's untrusted marker were
    there, when the caller has just asked Redis."""
    if not spec.natural_key:
        return False
    scope = scope_of(spec, payload)
    if marked if marked is not None else ctx.listings.fresh(scope):
        return True
    if spec.scope is not None:
        return False  # read (and marked) by the next search of the scope, see read_scope
    return _list_whole_kind(ctx, spec, resource, untrusted)


def read_scope(ctx: SyncContext, spec: Spec, payload: dict[str, Any],
               where: dict[str, Any]) -> tuple[list[Entity], Listing]:
    """A search of a scoped kind: every row of the scope, each recorded under its natural key,
    and the scope marked trusted when the listing provably saw them all."""
    start = time.monotonic()
    listing = ctx.resource(spec.resource).listing(where)
    rows = list(listing)
    ctx.store.remember_natural_keys(spec.entity, _pairs(spec, rows))
    if listing.complete and listing.total is not None:
        ctx.listings.mark_fresh(scope_of(spec, payload), FRESH_FOR - (time.monotonic() - start))
    return rows, listing


def distrust(ctx: SyncContext, spec: Spec, payload: dict[str, Any]) -> None:
    """A conflict showed the scope's listing wrong: read it again before trusting it."""
    ctx.listings.drop(scope_of(spec, payload))


def _pairs(spec: Spec, rows: list[Entity]) -> list[tuple[str, str]]:
    return [(natural_key(spec, {f: remote_value(row, f) for f in spec.natural_key}),
             str(row["uuid"])) for row in rows]


def _list_whole_kind(ctx: SyncContext, spec: Spec, resource: Resource,
                     untrusted: bool | None) -> bool:
    marks = ctx.listings
    if untrusted is None:
        untrusted = marks.untrusted(spec.entity)
    if untrusted or ctx.store.backlog(spec.entity) < MIN_BACKLOG:
        return False
    try:
        with ctx.locks.take(f"listing:{spec.entity}", wait=30):
            if marks.fresh(spec.entity):
                return True  # another worker listed while we waited
            start = time.monotonic()
            first = resource.page(per_page=1)
            if first.meta_total is None:  # no meta.total: no listing can prove it saw all
                marks.mark_untrusted(spec.entity, FRESH_FOR)
                return False
            total = first.meta_total
            ctx.count("listing_calls")
            if total / MAX_PER_PAGE > ctx.store.backlog(spec.entity) / 2:
                return False  # too many existing entities: listing costs more than searching
            # Read every page first: no transaction stays open across the listing's calls.
            listing = resource.listing(per_page=MAX_PER_PAGE)
            ctx.store.remember_natural_keys(spec.entity, _pairs(spec, list(listing)))
            ctx.count("listing_calls", listing.pages)
            # "Not listed" means "absent" only when the listing saw meta.total rows: a server
            # sending no total proves nothing (a last page or an empty page may be a cap).
            if not listing.complete or listing.total is None:
                log.warning("listing of %s incomplete (%d of %s rows in %d pages): not trusted",
                            spec.entity, listing.seen, listing.total, listing.pages)
                marks.mark_untrusted(spec.entity, FRESH_FOR)
                return False
            marks.mark_fresh(spec.entity, FRESH_FOR - (time.monotonic() - start))
            return True
    except Busy:
        return False
