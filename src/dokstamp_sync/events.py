"""The ERP change event (docs/erp-guide.md) and its validation.

:func:`parse_event` turns raw stream text into an :class:`Event` or raises :class:`InvalidEvent`
with one clear reason ("not JSON: ...", "data.email is required for a student", ...). Bad input
never raises anything else, so the consumer can dead-letter it and go on. The limits of
docs/erp-guide.md (size, nesting, strings, the range of ``occurred_at``) are checked here too
(:mod:`dokstamp_sync.limits`), before the JSON is decoded where they must be.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    StrictStr,
    StringConstraints,
    ValidationError,
)

from dokstamp_sync import limits

Entity = Literal["institution", "module", "course", "cohort", "student", "enrollment", "file",
                 "certificate"]
# docs/erp-guide.md: the fields an upsert's data must carry, per entity.
REQUIRED: dict[str, tuple[str, ...]] = {
    "institution": ("name", "country"),
    "module": ("name", "code", "institution_key"),
    "course": ("name", "code", "institution_key"),
    "cohort": ("code", "course_key"),
    "student": ("name", "email"),
    "enrollment": ("student_key", "course_key", "enrolled_at"),
    "file": ("filename",),
    "certificate": ("student_key", "course_key", "file_key"),
}
FILE_SOURCES = ("url", "path", "content_base64")


OPS = ("upsert", "delete", "revoke")


def entry_op(raw: str | None) -> str | None:
    """The ``op`` a stream entry's raw text names, when it can be read (a JSON object whose
    ``op`` is one of :data:`OPS`); else None, unknown: it may be a revoke or a delete."""
    if not raw:
        return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    op = body.get("op") if isinstance(body, dict) else None
    return op if isinstance(op, str) and op in OPS else None


class InvalidEvent(ValueError):
    """An event that cannot be processed; ``reason`` says why. ``event_id``, ``entity`` and
    ``key`` are what the entry said, as far as they are strings (as sent: they may hold what
    the event is refused for), so that a dead letter can still be found by them."""

    def __init__(self, reason: str, event_id: str | None = None, *, entity: str | None = None,
                 key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event_id, self.entity, self.key = event_id, entity, key


class Event(BaseModel):
    """One validated change event. Unknown top-level fields are ignored (forward compatible)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: Annotated[StrictStr, StringConstraints(min_length=1, max_length=255)]
    entity: Entity
    op: Literal["upsert", "delete", "revoke"]
    key: Annotated[StrictStr, StringConstraints(min_length=1, max_length=255)]
    occurred_at: AwareDatetime
    data: dict[str, Any] | None = None

    def reference_keys(self) -> dict[str, str]:
        """``{"student_key": "S-1", ...}``: the ERP keys this event's data refers to."""
        return {k: v for k, v in (self.data or {}).items()
                if k.endswith("_key") and isinstance(v, str)}


def _check_data(event: Event) -> None:
    data = event.data
    what = f"a {event.entity}"
    if event.op == "revoke" and event.entity != "certificate":
        raise InvalidEvent(f"op 'revoke' is only for certificates, not {what}", event.event_id)
    if event.op != "upsert":
        return
    if data is None:
        raise InvalidEvent(f"data is required for an upsert of {what}", event.event_id)
    for name in REQUIRED[event.entity]:
        if data.get(name) in (None, ""):
            raise InvalidEvent(f"data.{name} is required for {what}", event.event_id)
    for name, value in data.items():
        if name.endswith("_key") and value is not None and not isinstance(value, str):
            raise InvalidEvent(f"data.{name} must be a string (an ERP key)", event.event_id)
    if "uuid" in data and not isinstance(data["uuid"], str):
        raise InvalidEvent("data.uuid must be a string (a DokStamp UUID)", event.event_id)
    if event.entity == "file":
        given = [s for s in FILE_SOURCES if data.get(s)]
        if len(given) != 1:
            raise InvalidEvent("a file needs exactly one of data.url, data.path, "
                               "data.content_base64", event.event_id)
    if event.entity == "course" and data.get("modules") is not None:
        modules = data["modules"]
        if not isinstance(modules, list) or not all(
                isinstance(m, dict) and isinstance(m.get("module_key"), str) for m in modules):
            raise InvalidEvent("data.modules must be a list of objects with a string "
                               "module_key", event.event_id)
    if event.entity == "certificate" and not isinstance(data.get("issue", False), bool):
        raise InvalidEvent("data.issue must be true or false", event.event_id)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "event"
    if first["type"] == "missing":
        return f"missing field {field}"
    if first["type"] == "literal_error":
        return f"{field}: {first['msg'].lower()}, got {first.get('input')!r}"
    return f"wrong value for {field}: {first['msg']}"


def _refuse_nan(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def _decode(raw: str | bytes, max_file_bytes: int) -> tuple[Any, int]:
    """The decoded JSON and its size in bytes; the limits that protect the parser first."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"not JSON: not UTF-8 text ({exc.reason} at byte "
                           f"{exc.start})") from None
    problem = limits.size_problem(size, max_file_bytes)
    if problem:  # what it says of itself, from its first MiB only
        raise InvalidEvent(problem, **_scanned(text[:limits.MAX_JSON_BYTES]))
    problem, fields = limits.scan(text)
    if problem:
        raise InvalidEvent(problem, **fields)
    try:
        return json.loads(text, parse_constant=_refuse_nan), size
    except RecursionError:  # the scan makes this unreachable; a guard all the same
        raise InvalidEvent(f"nested deeper than {limits.MAX_DEPTH} levels", **fields) from None
    except ValueError as exc:
        raise InvalidEvent(f"not JSON: {exc}", **fields) from None


def _scanned(text: str) -> dict[str, str]:
    return limits.scan(text)[1]


def _identity(body: dict[str, Any]) -> dict[str, str | None]:
    return {name: value if isinstance(value := body.get(name), str) else None
            for name in ("event_id", "entity", "key")}


def parse_event(raw: str | bytes | dict[str, Any], *,
                max_file_bytes: int = limits.FILE_MAX_BYTES,
                now: datetime | None = None) -> Event:
    """Validate one event (JSON text or an already-decoded dict) within the limits of
    docs/erp-guide.md: ``max_file_bytes`` is the file size limit (``DOKSTAMP_SYNC_FILE_MAX_BYTES``),
    ``now`` the worker's clock (the current time if not given)."""
    body, size = (raw, None) if isinstance(raw, dict) else _decode(raw, max_file_bytes)
    if not isinstance(body, dict):
        raise InvalidEvent(f"an event must be a JSON object, not {type(body).__name__}")
    identity = _identity(body)
    try:
        problem = (limits.walk_problem(body)
                   or limits.content_problem(body, size, max_file_bytes))
        if problem:
            raise InvalidEvent(problem)
        try:
            event = Event.model_validate(body)
        except ValidationError as exc:
            raise InvalidEvent(_describe(exc)) from None
        problem = limits.time_problem(event.occurred_at, now)
        if problem:
            raise InvalidEvent(problem)
        _check_data(event)
    except InvalidEvent as exc:
        raise InvalidEvent(exc.reason, identity["event_id"], entity=identity["entity"],
                           key=identity["key"]) from None
    return event


def utc(dt: datetime) -> datetime:
    """An aware datetime, in UTC (naive ones are taken as UTC)."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
