"""The listing shortcut: one paged listing instead of one search per entity.

When many events of one kind wait (a large backlog), one worker lists every DokStamp entity of
that kind in pages of 200 and records their natural keys; a marker in Redis says the listing is
fresh. While it is, the FIRST attempt of an event's FIRST delivery, run at the top level (never
as another event's dependency) and with no other open event for its ERP key, may create without
searching when its natural key is not in the table. A retried or redelivered event, a dependency
and an event sharing its key with another open one always search (a lost response or a killed
delivery may have created it), and so does any event when there is no fresh listing. Entities
we create are recorded under the natural-key lock, so our own workers never miss each other's;
what another system creates in DokStamp during the freshness window is the accepted risk,
bounded by the window (and a create refused as a duplicate falls back to a search). A listing
is trusted only when it provably saw every row (``Listing.complete`` with a ``meta.total``: that
many rows read, past pages a server capped below the size asked); otherwise no marker is set
and events keep searching.
"""

from __future__ import annotations

import logging

from dokstamp_sync.dokstamp.client import MAX_PER_PAGE, Resource
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.entities import Spec, natural_key, remote_value
from dokstamp_sync.sync.outcomes import Busy

log = logging.getLogger("dokstamp_sync.sync")
MIN_BACKLOG = 50  # below this, searching one by one is cheaper than listing
FRESH_FOR = 900  # seconds a listing is trusted


def listing_is_fresh(ctx: SyncContext, spec: Spec, resource: Resource) -> bool:
    """Whether a fresh full listing of ``spec.entity`` is in the natural-key table, listing it
    now (once, fleet-wide) when the backlog makes that cheaper than searching."""
    marks = ctx.listings
    if marks.fresh(spec.entity):
        return True
    if not spec.natural_key or marks.untrusted(spec.entity) \
            or ctx.store.backlog(spec.entity) < MIN_BACKLOG:
        return False
    try:
        with ctx.locks.take(f"listing:{spec.entity}", wait=30):
            if marks.fresh(spec.entity):
                return True  # another worker listed while we waited
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
            pairs = [(natural_key(spec, {f: remote_value(remote, f) for f in spec.natural_key}),
                      str(remote["uuid"])) for remote in listing]
            ctx.store.remember_natural_keys(spec.entity, pairs)
            ctx.count("listing_calls", listing.pages)
            # "Not listed" means "absent" only when the listing saw meta.total rows: a server
            # sending no total proves nothing (a last page or an empty page may be a cap).
            if not listing.complete or listing.total is None:
                log.warning("listing of %s incomplete (%d of %s rows in %d pages): not trusted",
                            spec.entity, listing.seen, listing.total, listing.pages)
                marks.mark_untrusted(spec.entity, FRESH_FOR)
                return False
            marks.mark_fresh(spec.entity, FRESH_FOR)
            return True
    except Busy:
        return False
