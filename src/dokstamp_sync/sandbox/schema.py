"""What each sandbox resource accepts, as the DokStamp docs describe it.

One :class:`Resource` per collection: its fields (required, type, enum, max length, which
``*_uuid`` references which collection), its uniqueness rules and which dependents block a delete.
:func:`validate` turns a payload into Laravel-style field errors, with Laravel's wording, e.g.
``{"course_uuid": ["The selected course uuid is invalid."]}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class Field:
    """One accepted input field."""

    type: str = "string"  # string | integer | number | boolean | date | datetime | email | uuid
    required: bool = False
    ref: str | None = None  # for uuid fields: the referenced collection
    choices: tuple[str, ...] = ()
    max_length: int | None = None
    minimum: float | None = None
    maximum: float | None = None
    default: Any = None


@dataclass(frozen=True)
class Resource:
    """A collection's rules."""

    name: str  # "courses"
    singular: str  # "course": the nested key other resources show it under
    fields: Mapping[str, Field]
    unique: tuple[tuple[str, ...], ...] = ()  # field groups unique among live records
    blockers: tuple[tuple[str, str], ...] = ()  # (collection, its field) whose live rows block
    summary: tuple[str, ...] = ("uuid", "name")  # fields shown when nested in another


def _uuid_ref(collection: str, required: bool = False) -> Field:
    return Field(type="uuid", ref=collection, required=required)


RESOURCES: dict[str, Resource] = {r.name: r for r in (
    Resource("institutions", "institution", {
        "name": Field(required=True, max_length=255),
        "country": Field(required=True),
        "legal_name": Field(), "tax_id": Field(), "website": Field(),
        "linkedin_organization": Field(),
        "status": Field(choices=("active", "inactive", "suspended"), default="active"),
        "is_badges_enabled": Field(type="boolean", default=False),
        "badge_image_uuid": _uuid_ref("files"),
    }, blockers=(("courses", "institution_uuid"), ("modules", "institution_uuid"),
                 ("certificates", "institution_uuid"))),
    Resource("modules", "module", {
        "name": Field(required=True, max_length=150),
        "institution_uuid": _uuid_ref("institutions", required=True),
        "code": Field(max_length=20), "description": Field(), "syllabus": Field(),
        "workload": Field(type="integer", minimum=0), "credits": Field(type="integer", minimum=0),
        "modality": Field(choices=("in_person", "online", "hybrid")),
        "level": Field(choices=("undergraduate", "graduate", "technical", "open")),
        "is_active": Field(type="boolean", default=True),
        "is_required": Field(type="boolean", default=False),
    }, unique=(("code", "institution_uuid"),), summary=("uuid", "code", "name")),
    Resource("courses", "course", {
        "name": Field(required=True, max_length=255),
        "institution_uuid": _uuid_ref("institutions", required=True),
        "code": Field(), "description": Field(), "workload_hours": Field(type="integer", minimum=0),
        "area": Field(), "version": Field(),
        "status": Field(choices=("draft", "active", "archived"), default="draft"),
    }, blockers=(("cohorts", "course_uuid"), ("enrollments", "course_uuid"),
                 ("certificates", "course_uuid"))),
    Resource("cohorts", "cohort", {
        "course_uuid": _uuid_ref("courses", required=True),
        "code": Field(required=True),
        "modality": Field(choices=("presential", "remote", "hybrid")),
        "start_date": Field(type="datetime"), "end_date": Field(type="datetime"),
    }, unique=(("code",),), blockers=(("enrollments", "cohort_uuid"),
                                      ("certificates", "cohort_uuid")),
        summary=("uuid", "code")),
    Resource("students", "student", {
        "name": Field(required=True, max_length=255),
        "email": Field(type="email", required=True),
        "date_of_birth": Field(type="date", required=True),
        "gender": Field(), "social_name": Field(),
    }, unique=(("email",),), blockers=(("certificates", "student_uuid"),
                                       ("enrollments", "student_uuid"))),
    Resource("enrollments", "enrollment", {
        "student_uuid": _uuid_ref("students", required=True),
        "course_uuid": _uuid_ref("courses", required=True),
        "enrolled_at": Field(type="date", required=True),
        "cohort_uuid": _uuid_ref("cohorts"),
        "completion_status": Field(choices=("enrolled", "completed", "dropped"),
                                   default="enrolled"),
        "grade": Field(type="number", minimum=0, maximum=10),
        "completed_at": Field(type="date"),
    }, blockers=(("certificates", "enrollment_uuid"),), summary=("uuid",)),
    Resource("files", "file", {}, summary=("uuid",)),
    Resource("certificates", "certificate", {
        "institution_uuid": _uuid_ref("institutions", required=True),
        "course_uuid": _uuid_ref("courses", required=True),
        "student_uuid": _uuid_ref("students", required=True),
        "file_uuid": _uuid_ref("files", required=True),
        "cohort_uuid": _uuid_ref("cohorts"),
        "enrollment_uuid": _uuid_ref("enrollments"),
        "status": Field(choices=("draft", "issued")),
        "issued_at": Field(type="datetime"),
        "finish": Field(type="boolean"),
        "revocation_reason": Field(),
    }, summary=("uuid", "status")),
)}

# Filterable fields beyond a collection's input fields.
EXTRA_FILTERS: dict[str, tuple[str, ...]] = {
    "files": ("used_at", "original_name", "mime_type"),
    "certificates": ("revoked_at",),
}

# The ``where[...]`` filters the docs show, per collection, and nothing else: a strict sandbox
# (``SandboxConfig.strict``) silently drops every other filter, as a lenient query builder does.
# Sources (docs reference notes): §5 (list examples on each reference page and the sync guide),
# §8 (search before create: cohorts by ``code``), §19 (deletion rules: certificates by
# ``<entity>_uuid`` for the entities a certificate can block: institution, course, cohort,
# student). Institutions show no filter at all.
DOCUMENTED_FILTERS: dict[str, frozenset[str]] = {
    "institutions": frozenset(),
    "modules": frozenset({"level", "code", "institution_uuid"}),
    "courses": frozenset({"status", "code"}),
    "cohorts": frozenset({"course_uuid", "code"}),
    "students": frozenset({"email"}),
    "enrollments": frozenset({"completion_status", "course_uuid"}),
    "files": frozenset({"used_at"}),
    "certificates": frozenset({"status", "course_uuid", "institution_uuid", "cohort_uuid",
                               "student_uuid"}),
}


def _label(name: str) -> str:
    return name.replace("_", " ")


def _is_date(value: Any, with_time: bool) -> bool:
    if not isinstance(value, str):
        return False
    try:
        if with_time:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        else:
            date.fromisoformat(value[:10])
    except ValueError:
        return False
    return True


def _type_error(name: str, spec: Field, value: Any) -> str | None:
    label = _label(name)
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "string": (lambda v: isinstance(v, str), f"The {label} must be a string."),
        "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool),
                    f"The {label} must be an integer."),
        "number": (lambda v: isinstance(v, int | float) and not isinstance(v, bool),
                   f"The {label} must be a number."),
        "boolean": (lambda v: isinstance(v, bool) or v in (0, 1, "0", "1"),
                    f"The {label} field must be true or false."),
        "date": (lambda v: _is_date(v, False), f"The {label} is not a valid date."),
        "datetime": (lambda v: _is_date(v, True), f"The {label} is not a valid date."),
        "email": (lambda v: isinstance(v, str) and bool(_EMAIL.match(v)),
                  f"The {label} must be a valid email address."),
        "uuid": (lambda v: isinstance(v, str) and bool(_UUID.match(v)),
                 f"The {label} must be a valid UUID."),
    }
    ok, message = checks[spec.type]
    if not ok(value):
        return message
    if spec.choices and value not in spec.choices:
        return f"The selected {label} is invalid."
    if spec.max_length is not None and isinstance(value, str) and len(value) > spec.max_length:
        return f"The {label} may not be greater than {spec.max_length} characters."
    if spec.minimum is not None and isinstance(value, int | float) and value < spec.minimum:
        return f"The {label} must be at least {spec.minimum:g}."
    if spec.maximum is not None and isinstance(value, int | float) and value > spec.maximum:
        return f"The {label} may not be greater than {spec.maximum:g}."
    return None


def validate(resource: Resource, payload: Mapping[str, Any], *, partial: bool,
             exists: Callable[[str, str], bool]) -> dict[str, list[str]]:
    """Field errors for ``payload`` (an empty dict when valid).

    ``partial`` is a PATCH: required fields may be absent. ``exists(collection, uuid)`` says
    whether a live record of this tenant has that UUID (deleted or foreign ones do not).
    """
    found: dict[str, list[str]] = {}
    for name, spec in resource.fields.items():
        value = payload.get(name)
        if value is None or value == "":
            if spec.required and (not partial or name in payload):
                found.setdefault(name, []).append(f"The {_label(name)} field is required.")
            continue
        problem = _type_error(name, spec, value)
        if problem is None and spec.ref and not exists(spec.ref, value):
            problem = f"The selected {_label(name)} is invalid."
        if problem:
            found.setdefault(name, []).append(problem)
    return found


@dataclass
class Record:
    """One stored entity: its input fields plus server-managed ones (status, used_at...)."""

    collection: str
    uuid: str
    fields: dict[str, Any]
    created_at: str
    updated_at: str
    deleted_at: str | None = None
