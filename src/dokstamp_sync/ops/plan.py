"""``dokstamp-sync plan FILE|-``: what a batch of events would do, without doing any of it
(docs/guard.md).

Events are read as ``enqueue`` reads them (one JSON event per line) and judged against the
current mappings, in the file's order, as if each earlier line had been applied (a student
created on line 3 is there for the enrollment on line 9). Each gets one or more actions::

    invalid     the reason (it would be a dead letter)
    superseded  a newer event of the same entity in the file takes its place
    waits       for a dependency neither mapped nor created earlier in the file
    behind      a held event of the same entity: waits until an operator decides on it
    held        the guard would hold it (its kind's deletes/revokes pass the threshold)
    unchanged   no call (the data is what was last sent)
    create / adopt (data.uuid, or an existing entity found with --check-dokstamp)
    update      the fields that differ from what was last sent
    attach      a course's modules     issue    a certificate     revoke
    delete / archive (DokStamp refuses the delete while dependents exist)

then a summary per entity and action, the API calls that takes (an estimate per action, see
``CALLS``) and the time at the configured rate limit. Nothing is written: the database is only
read (the session is rolled back), Redis only read (the guard's window), DokStamp only asked
GETs (``--check-dokstamp``, see :mod:`.plan_check`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from dokstamp_sync.events import Event, InvalidEvent, parse_event
from dokstamp_sync.guard import GuardPolicy
from dokstamp_sync.held import destructive
from dokstamp_sync.models import InboxEvent, Mapping
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.states import EXISTING, EventState, MappingStatus
from dokstamp_sync.sync.entities import REFERENCES, SPECS
from dokstamp_sync.sync.references import MODULE_PIVOT, payload
from dokstamp_sync.sync.statements import data_hash

# DokStamp calls per action, as the engine usually makes them (a search before a create, a GET
# before a certificate changes, the dependents counted before a delete): an estimate.
CALLS = {"create": 2, "adopt": 1, "update": 1, "attach": 1, "issue": 2, "revoke": 2,
         "delete": 1, "archive": 1}
FILE_CREATE_CALLS = 1  # an upload; DokStamp deduplicates by content, no search
NEW = "(new)"  # the UUID of an entity an earlier line would create


@dataclass
class Step:
    """What one line would do."""

    line: int
    event_id: str | None
    entity: str | None
    key: str | None
    op: str | None
    actions: list[str]
    detail: str = ""
    calls: int = 0
    # For --check-dokstamp: what would be sent, and the UUID the mapping holds.
    body: dict[str, Any] | None = field(default=None, repr=False)
    uuid: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "event_id": self.event_id, "entity": self.entity,
                "key": self.key, "op": self.op, "actions": self.actions,
                "detail": self.detail, "api_calls": self.calls}


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    rate_limit: float = 10.0

    @property
    def api_calls(self) -> int:
        return sum(s.calls for s in self.steps)

    @property
    def seconds(self) -> float:
        return round(self.api_calls / self.rate_limit, 1)

    def summary(self) -> dict[str, dict[str, int]]:
        """Events per entity and action ("invalid" under "-" when no entity is known)."""
        out: dict[str, Counter[str]] = defaultdict(Counter)
        for step in self.steps:
            out[step.entity or "-"].update(step.actions)
        return {entity: dict(sorted(c.items())) for entity, c in sorted(out.items())}

    def as_dict(self) -> dict[str, Any]:
        return {"events": [s.as_dict() for s in self.steps], "summary": self.summary(),
                "api_calls": self.api_calls, "rate_limit": self.rate_limit,
                "seconds": self.seconds}


@dataclass
class _Known:
    """A mapping as the plan sees it after the lines before: real, or one a line creates."""

    uuid: str
    status: str
    sent: dict[str, Any]
    digest: str | None


def read_events(lines: Iterable[str]) -> list[tuple[int, Event | InvalidEvent]]:
    """(line number, event or why it is none) for every non-blank line."""
    out: list[tuple[int, Event | InvalidEvent]] = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append((number, parse_event(line.strip())))
            except InvalidEvent as exc:
                out.append((number, exc))
    return out


class Planner:
    """Judges events against the mapping store (read only) and the guard's window."""

    def __init__(self, session: Session, client: redis.Redis | None, policy: GuardPolicy,
                 rate_limit: float, keys: RedisKeys = RedisKeys()) -> None:
        self.session, self.redis, self.policy = session, client, policy
        self.guard_prefix = keys.guard
        self.plan = Plan(rate_limit=rate_limit)
        self.known: dict[tuple[str, str], _Known | None] = {}

    def mapping(self, entity: str, key: str) -> _Known | None:
        if (entity, key) not in self.known:
            m = self.session.scalar(select(Mapping).where(Mapping.entity == entity,
                                                          Mapping.erp_key == key))
            self.known[(entity, key)] = None if m is None else _Known(
                m.dokstamp_uuid, m.status, dict(m.sent or {}), m.data_hash)
        return self.known[(entity, key)]

    def run(self, events: list[tuple[int, Event | InvalidEvent]]) -> Plan:
        valid = [(n, e) for n, e in events if isinstance(e, Event)]
        newest = _newest(valid)
        held_kinds = self._guarded(valid)
        for number, item in events:
            if isinstance(item, InvalidEvent):
                self.plan.steps.append(Step(number, item.event_id, item.entity, item.key, None,
                                            ["invalid"], item.reason))
            else:
                self.plan.steps.append(self._judge(number, item, newest, held_kinds))
        return self.plan

    def _judge(self, number: int, event: Event, newest: dict[Any, int],
               held_kinds: dict[str, str]) -> Step:
        step = Step(number, event.event_id, event.entity, event.key, event.op, [])
        if self.session.scalar(select(InboxEvent.id).where(
                InboxEvent.event_id == event.event_id)) is not None:
            step.actions, step.detail = ["unchanged"], "event_id already received"
            return step
        later = newest.get(_slot(event))
        if later is not None and later != number:
            step.actions, step.detail = ["superseded"], f"by line {later}"
            return step
        blocker = self._held_before(event)
        if blocker:
            step.actions, step.detail = ["behind"], blocker
            return step
        if destructive(event.op) and event.entity in held_kinds:
            step.actions, step.detail = ["held"], held_kinds[event.entity]
            return step
        if event.op == "upsert":
            self._upsert(step, event)
        elif event.op == "revoke" or event.entity == "certificate":
            self._revoke(step, event)
        else:
            self._delete(step, event)
        step.calls = sum(FILE_CREATE_CALLS if a == "create" and event.entity == "file"
                         else CALLS.get(a, 0) for a in step.actions)
        return step

    def _held_before(self, event: Event) -> str:
        row = self.session.execute(
            select(InboxEvent.id, InboxEvent.op).where(
                InboxEvent.entity == event.entity, InboxEvent.erp_key == event.key,
                InboxEvent.state == EventState.HELD, InboxEvent.occurred_at <= event.occurred_at)
            .limit(1)).one_or_none()
        return f"held {row[1]} #{row[0]} of this entity" if row else ""

    def _refs(self, event: Event) -> tuple[dict[str, Any], list[str]]:
        """The references as UUIDs (as the engine resolves them), and what it would wait for."""
        data = event.data or {}
        refs: dict[str, Any] = {}
        missing: list[str] = []

        def uuid_of(entity: str, key: str) -> str:
            known = self.mapping(entity, key)
            if known is None or known.status not in EXISTING:
                missing.append(f"{entity} {key}")
                return NEW
            return known.uuid

        for name, entity in REFERENCES.items():
            if isinstance(data.get(name), str) and data[name]:
                refs[name.removesuffix("_key") + "_uuid"] = uuid_of(entity, data[name])
        if event.entity == "course" and data.get("modules"):
            refs["modules"] = [{"uuid": uuid_of("module", m["module_key"])}
                               | {k: m[k] for k in MODULE_PIVOT if k in m}
                               for m in data["modules"]]
        if event.entity == "certificate" and "institution_uuid" not in refs:
            course = self.mapping("course", str(data.get("course_key")))
            if course is not None and course.sent.get("institution_uuid"):
                refs["institution_uuid"] = course.sent["institution_uuid"]
        return refs, missing

    def _upsert(self, step: Step, event: Event) -> None:
        refs, missing = self._refs(event)
        if missing:
            step.actions, step.detail = ["waits"], ", ".join(missing)
            return
        data = event.data or {}
        body = payload(event, refs)
        digest = data_hash({"data": event.data, "refs": refs})
        known = self.mapping(event.entity, event.key)
        issue = event.entity == "certificate" and bool(data.get("issue"))
        step.body, step.uuid = body, known.uuid if known is not None else None
        if known is None or known.status == MappingStatus.DELETED:
            step.actions = ["adopt" if data.get("uuid") else "create"]
            step.actions += ["issue"] if issue else []
            step.actions += ["attach"] if refs.get("modules") else []
            self.known[(event.entity, event.key)] = _Known(NEW, MappingStatus.ACTIVE, body,
                                                           digest)
            return
        if known.status == MappingStatus.ACTIVE and known.digest == digest:
            step.actions = ["unchanged"]
            return
        changed = sorted(k for k, v in body.items() if known.sent.get(k) != v
                         and k not in ("issued_at", "status", "finish"))
        step.actions = ["update"] if changed or known.status != MappingStatus.ACTIVE else []
        step.detail = ", ".join(changed) if changed else ""
        if issue and not known.sent.get("issue"):
            step.actions.append("issue")
        if refs.get("modules") and refs["modules"] != known.sent.get("modules"):
            step.actions.append("attach")
        step.actions = step.actions or ["unchanged"]
        self.known[(event.entity, event.key)] = _Known(known.uuid, MappingStatus.ACTIVE,
                                                       body | {"issue": issue}, digest)

    def _revoke(self, step: Step, event: Event) -> None:
        known = self.mapping(event.entity, event.key)
        if known is not None and known.status in (MappingStatus.REVOKED, MappingStatus.DELETED):
            step.actions, step.detail = ["unchanged"], f"already {known.status}"
            return
        step.actions, step.uuid = ["revoke"], known.uuid if known is not None else None
        if known is None:
            step.detail = "not mapped: searched for by its newest upsert first"
        else:
            self.known[(event.entity, event.key)] = _Known(
                known.uuid, MappingStatus.REVOKED, known.sent, None)

    def _delete(self, step: Step, event: Event) -> None:
        known = self.mapping(event.entity, event.key)
        if known is not None and known.status == MappingStatus.DELETED:
            step.actions, step.detail = ["unchanged"], "already deleted"
            return
        spec = SPECS[event.entity]
        step.uuid = known.uuid if known is not None else None
        blockers = self._dependents(event.entity, known.uuid) if known else 0
        if blockers and spec.archive_status is not None:
            step.actions, step.detail = ["archive"], f"{blockers} dependents in the mappings"
        else:
            step.actions = ["delete"]
            step.detail = (f"DokStamp refuses it: {blockers} dependents in the mappings"
                           if blockers else "" if known else
                           "not mapped: searched for by natural key first")
        if known is not None:
            self.known[(event.entity, event.key)] = None if not blockers else _Known(
                known.uuid, MappingStatus.ARCHIVED, known.sent, None)

    def _dependents(self, entity: str, uuid: str) -> int:
        """Mapped entities whose last payload refers to ``uuid`` where DokStamp's deletion
        rules count them (``Spec.dependents``)."""
        by_resource = {s.resource: e for e, s in SPECS.items()}
        count = 0
        for resource, name in SPECS[entity].dependents:
            rows = self.session.execute(select(Mapping.sent).where(
                Mapping.entity == by_resource[resource], Mapping.status.in_(EXISTING)))
            count += sum(1 for sent in rows.scalars()
                         if isinstance(sent, dict) and sent.get(name) == uuid)
        return count

    def _guarded(self, valid: list[tuple[int, Event]]) -> dict[str, str]:
        """The kinds whose destructive events the guard would hold, with the reason."""
        if self.policy.off:
            return {}
        counts = Counter(e.entity for _, e in valid if destructive(e.op))
        out: dict[str, str] = {}
        for entity, n in counts.items():
            active = len(list(self.session.execute(select(Mapping.id).where(
                Mapping.entity == entity, Mapping.status == MappingStatus.ACTIVE))))
            window = self._window(entity)
            if n + window > self.policy.limit(active):
                out[entity] = self.policy.describe(entity, n + window, active).replace(
                    "held by the change guard", "the change guard would hold it")
        return out

    def _window(self, entity: str) -> int:
        """Destructive events of the kind already in the guard's window (read only)."""
        if self.redis is None:
            return 0
        start = datetime.now().timestamp() - self.policy.window
        return int(self.redis.zcount(f"{self.guard_prefix}{entity}", start, "+inf"))


def _slot(event: Event) -> tuple[str, str, bool]:
    # Newer events supersede older ones of the same entity; a certificate's upserts and its
    # revokes/deletes only their own kind (docs/erp-guide.md).
    kind = event.op == "upsert" if event.entity == "certificate" else True
    return event.entity, event.key, kind


def _newest(valid: list[tuple[int, Event]]) -> dict[Any, int]:
    """Per entity (and, for certificates, kind): the line of its newest event in the file."""
    best: dict[Any, tuple[datetime, int]] = {}
    for number, event in valid:
        slot = _slot(event)
        if slot not in best or (event.occurred_at, number) >= best[slot]:
            best[slot] = (event.occurred_at, number)
    return {slot: number for slot, (_, number) in best.items()}

