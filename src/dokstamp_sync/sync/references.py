"""Turning an event's ERP references (``*_key``) into DokStamp UUIDs, syncing a known but
unsynced dependency first, and building the payload DokStamp receives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dokstamp_sync.events import Event
from dokstamp_sync.models import utcnow
from dokstamp_sync.states import EXISTING, EventState, RunState
from dokstamp_sync.sync.context import Run, SyncContext
from dokstamp_sync.sync.entities import REFERENCES, SPECS
from dokstamp_sync.sync.outcomes import Dead, Waiting
from dokstamp_sync.sync.statements import Snapshot

# process(ctx, run, event_pk, depth) -> resulting state; injected by the engine (avoids a cycle)
Process = Callable[[SyncContext, Run, int, int], str]
MAX_DEPTH = 6
MODULE_PIVOT = ("order", "is_required", "workload", "course_module_group_uuid")


def dependency(ctx: SyncContext, run: Run, entity: str, key: str, depth: int,
               process: Process) -> str:
    """The DokStamp UUID of (entity, key), syncing its latest known event first if needed."""
    found, mapping = ctx.store.latest(entity, key)
    if mapping is not None and mapping.status in EXISTING:
        return mapping.uuid
    status = mapping.status if mapping is not None else None
    tag = f"{entity}:{key}"
    if found is None:
        if status is not None:
            raise Dead(f"dependency {entity} {key} is {status} in DokStamp")
        raise Waiting(f"dependency {entity} {key} has not arrived", waiting_for=tag,
                      never_arrived=True)
    pk, state, op = found.pk, found.state, found.op
    if op != "upsert":  # the newest word on it is a delete
        raise Dead(f"dependency {entity} {key} was deleted in the ERP")
    if state == EventState.DEAD:
        raise Waiting(f"dependency {entity} {key} is dead-lettered: fix and replay it",
                      waiting_for=tag, never_arrived=True)
    if (entity, key) in run.walk:  # it waits, directly or not, for the event we came from
        chain = " -> ".join(f"{e} {k}" for e, k in [*run.walk, (entity, key)])
        raise Dead(f"reference cycle: {chain}")
    if depth >= MAX_DEPTH:
        raise Dead(f"dependency chain too deep at {entity} {key} "
                   f"({' -> '.join(f'{e} {k}' for e, k in run.walk)})")
    if state == EventState.SYNCED:  # its newest upsert is synced, yet it is not active in DokStamp
        raise Dead(f"dependency {entity} {key} is {status} in DokStamp")
    backoff = (found.next_attempt_at - utcnow()).total_seconds() \
        if state == EventState.WAITING and found.next_attempt_at else 0.0
    if backoff > 0:  # parked with a backoff: wait for its next attempt, never run it sooner
        raise Waiting(f"dependency {entity} {key} is waiting for its next attempt",
                      waiting_for=tag, delay=backoff, never_arrived=True)
    result = process(ctx, run, pk, depth + 1)
    if result == EventState.SYNCED:
        mapping = ctx.store.mapping(entity, key)
        if mapping is not None and mapping.status in EXISTING:
            return mapping.uuid
    delay = 2.0 if result in (RunState.BUSY, EventState.WAITING) else 60.0
    raise Waiting(f"dependency {entity} {key} is {result}", waiting_for=tag, delay=delay)


def wanted(event: Event) -> list[tuple[str, str]]:
    """The (entity, ERP key) of every entity the event refers to."""
    data = event.data or {}
    out = [(entity, data[field]) for field, entity in REFERENCES.items()
           if isinstance(data.get(field), str) and data[field]]
    if event.entity == "course":
        out += [("module", m["module_key"]) for m in data.get("modules") or []]
    return out


def resolve(ctx: SyncContext, run: Run, event: Event, depth: int, process: Process,
            mappings: dict[tuple[str, str], Snapshot]) -> dict[str, Any]:
    """``{"course_uuid": ..., "modules": [...]}`` for every reference in the event's data.

    ``mappings``: the referenced mappings, read by the caller in one query (see
    :func:`wanted`); only a reference not active in DokStamp goes the slow way
    (:func:`dependency`: sync its event first, or wait).
    """
    data = event.data or {}
    known = {k: (m.uuid, m.sent) for k, m in mappings.items() if m.status in EXISTING}

    def uuid_of(entity: str, key: str) -> str:
        hit = known.get((entity, key))
        return hit[0] if hit else dependency(ctx, run, entity, key, depth, process)

    refs: dict[str, Any] = {}
    for field, entity in REFERENCES.items():
        key = data.get(field)
        if isinstance(key, str) and key:
            refs[field.removesuffix("_key") + "_uuid"] = uuid_of(entity, key)
    if event.entity == "course" and data.get("modules"):
        refs["modules"] = [{"uuid": uuid_of("module", m["module_key"])}
                           | {k: m[k] for k in MODULE_PIVOT if k in m}
                           for m in data["modules"]]
    if event.entity == "certificate" and "institution_uuid" not in refs:
        # docs/erp-guide.md: the certificate's institution is its course's, unless given.
        course = known.get(("course", str(data["course_key"])))
        if course is None:
            found = ctx.store.mapping("course", str(data["course_key"]))
            course = (found.uuid, found.sent) if found else None
        sent = course[1] if course else {}
        if not sent.get("institution_uuid"):
            raise Waiting(f"course {data['course_key']} has no known institution",
                          waiting_for=f"course:{data['course_key']}")
        refs["institution_uuid"] = sent["institution_uuid"]
    return refs


def payload(event: Event, refs: dict[str, Any]) -> dict[str, Any]:
    """The DokStamp fields: the event's data without ours, references as UUIDs."""
    spec = SPECS[event.entity]
    data = event.data or {}
    out = {k: v for k, v in data.items()
           if k != "uuid" and not k.endswith("_key") and k not in spec.local}
    out |= {k: v for k, v in refs.items() if k != "modules"}
    return out
