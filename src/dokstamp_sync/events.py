"""The ERP change event (CONTRACT §2) and its validation.

:func:`parse_event` turns raw stream text into an :class:`Event` or raises :class:`InvalidEvent`
with one clear reason ("not JSON: ...", "data.email is required for a student", ...). Bad input
never raises anything else, so the consumer can dead-letter it and go on.
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

Entity = Literal["institution", "module", "course", "cohort", "student", "enrollment", "file",
                 "certificate"]
ENTITIES: tuple[str, ...] = Entity.__args__  # type: ignore[attr-defined]

# CONTRACT §2: the fields an upsert's data must carry, per entity.
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


class InvalidEvent(ValueError):
    """An event that cannot be processed; ``reason`` says why, ``event_id`` if it had one."""

    def __init__(self, reason: str, event_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event_id = event_id


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


def parse_event(raw: str | bytes | dict[str, Any]) -> Event:
    """Validate one event (JSON text or an already-decoded dict)."""
    if isinstance(raw, dict):
        body: Any = raw
    else:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidEvent(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidEvent(f"an event must be a JSON object, not {type(body).__name__}")
    event_id = body.get("event_id") if isinstance(body.get("event_id"), str) else None
    try:
        event = Event.model_validate(body)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc), event_id) from None
    _check_data(event)
    return event


def to_json(event: Event) -> str:
    """The event as JSON text (what the stream carries)."""
    return event.model_dump_json()


def utc(dt: datetime) -> datetime:
    """An aware datetime, in UTC (naive ones are taken as UTC)."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
