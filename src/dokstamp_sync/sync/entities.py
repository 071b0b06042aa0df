"""Per-entity rules of the graph walk (docs/erp-guide.md's table, in DokStamp's field names).

For each entity: the client resource, the natural key that identifies it, the ``where[...]``
filters the DokStamp docs show for that search (``search``: a server may ignore any other filter
and answer with every row, so the rest of the natural key is matched here, on each hit), the
references a search hit must agree on (else it is a conflict, never adopted), the fields never
PATCHed, the event fields that are ours and never sent, and the dependents that block a delete
and can be counted with a documented filter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# data field -> the entity it references
REFERENCES: dict[str, str] = {
    "institution_key": "institution", "course_key": "course", "cohort_key": "cohort",
    "student_key": "student", "enrollment_key": "enrollment", "file_key": "file",
}


@dataclass(frozen=True)
class Spec:
    entity: str
    resource: str  # attribute of DokStampClient
    natural_key: tuple[str, ...]  # payload fields every adopted search hit must match
    identity: tuple[str, ...] = ()  # payload fields a search hit must match
    fixed: tuple[str, ...] = ()  # never PATCHed
    local: tuple[str, ...] = ()  # event data that is not a DokStamp field
    archive_status: str | None = None  # status to set when a delete is refused
    # The natural-key fields the docs show as where[...] filters (None: all of them); the
    # others are matched on each hit, paging through every answer.
    search: tuple[str, ...] | None = None
    # The filters of a scope listing (see :mod:`.listing`): a search that must page through
    # a wider set than the natural key (every enrollment of a course) records each row it read
    # and, once it saw them all, stands in for the scope's other searches a while. None: the
    # whole kind is the scope (listed only for a large backlog).
    scope: tuple[str, ...] | None = None
    # (client resource, where[field]) of dependents that block a delete, as the docs' deletion
    # rules count them (per_page=1, meta.total), with documented filters only.
    dependents: tuple[tuple[str, str], ...] = ()

    @property
    def search_filters(self) -> tuple[str, ...]:
        return self.natural_key if self.search is None else self.search


SPECS: dict[str, Spec] = {s.entity: s for s in (
    # The docs show no filter for institutions: list them all, match the name here.
    Spec("institution", "institutions", ("name",), archive_status="inactive", search=(),
         dependents=(("certificates", "institution_uuid"), ("modules", "institution_uuid"))),
    Spec("module", "modules", ("code", "institution_uuid"), fixed=("institution_uuid",),
         search=("code", "institution_uuid")),
    Spec("course", "courses", ("code",), identity=("institution_uuid",),
         fixed=("institution_uuid",), local=("modules",), archive_status="archived",
         search=("code",), dependents=(("certificates", "course_uuid"),
                                       ("cohorts", "course_uuid"),
                                       ("enrollments", "course_uuid"))),
    Spec("cohort", "cohorts", ("code",), identity=("course_uuid",), fixed=("course_uuid",),
         search=("code",), dependents=(("certificates", "cohort_uuid"),)),
    Spec("student", "students", ("email",), search=("email",),
         dependents=(("certificates", "student_uuid"),)),
    # Enrollments are filterable by course only: the course's enrollments are paged through.
    Spec("enrollment", "enrollments", ("student_uuid", "course_uuid"),
         fixed=("student_uuid", "course_uuid"), search=("course_uuid",),
         scope=("course_uuid",)),
    Spec("file", "files", (), local=("url", "path", "content_base64", "filename",
                                     "content_type")),
    # The docs show no file filter for certificates: search by student and course, then find
    # our file among each hit's files[] (see `matches`).
    Spec("certificate", "certificates", ("file_uuid",),
         identity=("student_uuid", "course_uuid"), local=("issue",),
         search=("student_uuid", "course_uuid")),
)}


def natural_key(spec: Spec, payload: dict[str, Any]) -> str:
    """The natural key as one string, e.g. ``code=CS101|institution_uuid=...``."""
    parts = []
    for name in spec.natural_key:
        value = str(payload.get(name, ""))
        parts.append(f"{name}={value.strip().lower() if name == 'email' else value}")
    return "|".join(parts)


def same_key_value(field: str, ours: Any, theirs: Any) -> bool:
    """One natural-key field of a search hit equals the event's (emails case-insensitively, as
    DokStamp's uniqueness treats them; values compared as text, so ``12`` matches ``"12"``)."""
    if ours is None or theirs is None:
        return ours is None and theirs is None
    if field == "email":
        return str(ours).strip().lower() == str(theirs).strip().lower()
    return str(ours) == str(theirs)


def remote_value(entity: dict[str, Any], field: str) -> Any:
    """A payload field as DokStamp shows it: ``course_uuid`` is ``course.uuid`` there."""
    if field in entity:
        return entity[field]
    if field == "file_uuid" and entity.get("files"):  # a certificate shows files[], not file
        return entity["files"][0].get("uuid")
    if field.endswith("_uuid"):
        nested = entity.get(field.removesuffix("_uuid"))
        return nested.get("uuid") if isinstance(nested, dict) else None
    return None


def matches(spec: Spec, payload: dict[str, Any], remote: dict[str, Any]) -> bool:
    """Whether a search hit is the entity ``payload`` describes, on every natural-key and
    search field (a server may ignore a filter and answer every row). A certificate's file
    is any of its ``files[].uuid`` (or a ``file_uuid`` where a server sends one)."""
    for field in dict.fromkeys((*spec.natural_key, *spec.search_filters)):
        ours = payload.get(field)
        if field == "file_uuid":
            theirs = {f.get("uuid") for f in remote.get("files") or [] if isinstance(f, dict)}
            theirs |= {remote["file_uuid"]} if remote.get("file_uuid") else set()
            if ours not in theirs:
                return False
        elif not same_key_value(field, ours, remote_value(remote, field)):
            return False
    return True


# An ISO 8601 date, or date and time (DokStamp answers dates as ``2024-02-01T00:00:00.000000Z``).
_WHEN = re.compile(r"\d{4}-\d{2}-\d{2}"
                   r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|z|[+-]\d{2}:?\d{2})?)?")


def _when(value: str) -> datetime | None:
    """``value`` as an aware datetime (a date is its midnight UTC), or None if it is none."""
    if not _WHEN.fullmatch(value):
        return None
    text = value.replace("z", "Z")
    if "." in text:  # fromisoformat takes at most 6 fractional digits
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def same_value(sent: Any, remote: Any) -> bool:
    """Exactly equal; or two dates/timestamps that parse to the same instant (DokStamp
    reformats ``2024-02-01`` as ``2024-02-01T00:00:00.000000Z``). Any other pair of different
    strings differs, however long their common start."""
    if sent == remote:
        return True
    if isinstance(sent, str) and isinstance(remote, str):
        ours, theirs = _when(sent), _when(remote)
        return ours is not None and ours == theirs
    return False
