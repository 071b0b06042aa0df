"""The sandbox's data: per-tenant records and the rules DokStamp applies to them.

Framework-free: every operation takes plain values and returns JSON-ready dicts or raises
:class:`ApiError` (status + Laravel-style body). The HTTP layer (:mod:`.app`) only translates.
Behaviour the docs leave open is chosen here and listed in the README ("The sandbox").
"""

from __future__ import annotations

import hashlib
import json
import uuid as uuidlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from dokstamp_sync.sandbox.schema import (
    DOCUMENTED_FILTERS,
    EXTRA_FILTERS,
    RESOURCES,
    Record,
    Resource,
    validate,
)

MAX_PER_PAGE = 200
DEFAULT_PER_PAGE = 15
INVALID = "The given data was invalid."

# How a certificate is issued: ``"status": "issued"`` (older docs) or ``"finish": true`` (newer).
IssueBy = Literal["status", "finish"]


class ApiError(Exception):
    """An error answer: HTTP ``status`` and its JSON ``body``."""

    def __init__(self, status: int, message: str,
                 errors: Mapping[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"message": message}
        if errors is not None:
            self.body["errors"] = dict(errors)


class UniqueViolation(ApiError):
    """A 422 for a broken uniqueness rule (a taken email/code, a file already used); the HTTP
    layer may answer it 409 instead (``Faults.conflict_409``)."""

    def __init__(self, errors: Mapping[str, list[str]]) -> None:
        super().__init__(422, INVALID, errors)


def invalid(errors: Mapping[str, list[str]]) -> ApiError:
    return ApiError(422, INVALID, errors)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _new_uuid() -> str:
    return str(uuidlib.uuid4())


@dataclass
class Tenant:
    """One tenant's isolated data."""

    domain: str
    name: str
    uuid: str = field(default_factory=_new_uuid)
    records: dict[str, dict[str, Record]] = field(
        default_factory=lambda: {name: {} for name in RESOURCES})
    # course uuid -> module uuid -> pivot {order, is_required, workload, ...}
    course_modules: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # file uuid -> content
    # (collection, unique field group) -> values -> uuid of the record that last took them.
    # An entry may be stale (that record was deleted or changed since); lookups check it.
    # It stands for a scan of every live record, which made a large tenant slow to write to.
    taken: dict[tuple[str, tuple[str, ...]], dict[tuple[Any, ...], str]] = field(
        default_factory=dict)
    by_hash: dict[str, str] = field(default_factory=dict)  # file sha256 -> uuid, same rule
    # The docs say neither way whether an expired certificate may be revoked: refused by
    # default (the unkind reading); True lets :meth:`revoke` revoke one, the other reading.
    revoke_expired: bool = False

    def live(self, collection: str) -> Iterable[Record]:
        return (r for r in self.records[collection].values() if r.deleted_at is None)

    def find(self, collection: str, uuid: str) -> Record:
        record = self.records[collection].get(uuid)
        if record is None or record.deleted_at is not None:
            raise ApiError(404, f"No query results for model [App\\Models\\"
                                f"{RESOURCES[collection].singular.title()}] {uuid}")
        return record

    def exists(self, collection: str, uuid: str) -> bool:
        record = self.records[collection].get(uuid)
        return record is not None and record.deleted_at is None

    # -- representation -------------------------------------------------------------------

    def show(self, record: Record) -> dict[str, Any]:
        """A record as DokStamp shows it: ``*_uuid`` references become nested summaries."""
        out: dict[str, Any] = {"uuid": record.uuid}
        for name, value in record.fields.items():
            spec = RESOURCES[record.collection].fields.get(name)
            if name in ("finish", "hash") or (record.collection == "certificates"
                                              and name == "file_uuid"):
                continue
            if spec is not None and spec.ref and name.endswith("_uuid") \
                    and name != "badge_image_uuid":
                out[name.removesuffix("_uuid")] = self._summary(spec.ref, value)
            else:
                out[name] = value
        if record.collection == "certificates":
            out["files"] = [{"type": "certificate", "uuid": record.fields["file_uuid"]}]
        out["created_at"] = record.created_at
        out["updated_at"] = record.updated_at
        return out

    def _summary(self, collection: str, uuid: str | None) -> dict[str, Any] | None:
        if uuid is None:
            return None
        record = self.records[collection].get(uuid)
        if record is None:
            return {"uuid": uuid}
        keys = RESOURCES[collection].summary
        return {k: record.uuid if k == "uuid" else record.fields.get(k) for k in keys}

    # -- listing --------------------------------------------------------------------------

    def listing(self, collection: str, where: Mapping[str, str], *, page: int, per_page: int,
                sort: str | None = None, order: str = "asc",
                records: Iterable[Record] | None = None, strict: bool = False,
                page_cap: int | None = None) -> dict[str, Any]:
        """``{data, meta}`` for ``where[field]=value`` filters (``null`` matches None).

        Lenient (default): any field of the resource may be filtered on, an unknown one is a
        400. ``strict``: only :data:`DOCUMENTED_FILTERS` apply, every other filter is dropped
        silently. ``page_cap``: a page holds at most that many rows although ``meta`` still
        tells the asked ``per_page`` (and the true ``total`` and ``last_page``).
        """
        if strict:
            where = {k: v for k, v in where.items() if k in DOCUMENTED_FILTERS[collection]}
        allowed = set(RESOURCES[collection].fields) | set(EXTRA_FILTERS.get(collection, ()))
        allowed |= {"uuid", "status"}
        unknown = sorted(set(where) - allowed)
        if unknown:
            raise ApiError(400, f"Unknown filter field: {unknown[0]}")
        rows = [r for r in (self.live(collection) if records is None else records)
                if all(_matches(r.uuid if k == "uuid" else r.fields.get(k), v)
                       for k, v in where.items())]
        if sort:
            rows.sort(key=lambda r: _sort_key(r.fields.get(sort)), reverse=order == "desc")
        per_page = max(1, min(per_page, MAX_PER_PAGE))
        page = max(1, page)
        total = len(rows)
        last_page = max(1, -(-total // per_page))
        start = (page - 1) * per_page
        chunk = rows[start: start + min(per_page, page_cap or per_page)]
        return {"data": [self.show(r) for r in chunk],
                "meta": {"current_page": page, "per_page": per_page, "total": total,
                         "last_page": last_page}}

    # -- writes ---------------------------------------------------------------------------

    def _holder(self, collection: str, group: tuple[str, ...],
                values: tuple[Any, ...]) -> str | None:
        """The live record whose ``group`` fields hold ``values``, if any."""
        uuid = self.taken.get((collection, group), {}).get(_hashable(values))
        if uuid is None or not self.exists(collection, uuid):
            return None
        record = self.records[collection][uuid]
        return uuid if tuple(record.fields.get(k) for k in group) == values else None

    def _check_unique(self, resource: Resource, fields: Mapping[str, Any],
                      skip: str | None = None) -> None:
        found: dict[str, list[str]] = {}
        for group in resource.unique:
            if fields.get(group[0]) in (None, ""):
                continue
            holder = self._holder(resource.name, group, tuple(fields.get(k) for k in group))
            if holder is not None and holder != skip:
                found[group[0]] = [f"The {group[0].replace('_', ' ')} has already been "
                                   "taken."]
        if found:
            raise UniqueViolation(found)

    def _take(self, resource: Resource, record: Record) -> None:
        for group in resource.unique:
            values = _hashable(tuple(record.fields.get(k) for k in group))
            self.taken.setdefault((resource.name, group), {})[values] = record.uuid

    def create(self, collection: str, payload: Mapping[str, Any]) -> Record:
        resource = RESOURCES[collection]
        errors = validate(resource, payload, partial=False, exists=self.exists)
        if errors:
            raise invalid(errors)
        fields = {name: payload.get(name, spec.default)
                  for name, spec in resource.fields.items()}
        self._check_unique(resource, fields)
        stamp = now_iso()
        record = Record(collection, _new_uuid(), fields, stamp, stamp)
        self.records[collection][record.uuid] = record
        self._take(resource, record)
        return record

    def update(self, collection: str, uuid: str, payload: Mapping[str, Any]) -> Record:
        resource = RESOURCES[collection]
        record = self.find(collection, uuid)
        errors = validate(resource, payload, partial=True, exists=self.exists)
        if errors:
            raise invalid(errors)
        changes = {k: v for k, v in payload.items() if k in resource.fields}
        self._check_unique(resource, record.fields | changes, skip=uuid)
        record.fields.update(changes)
        record.updated_at = now_iso()
        self._take(resource, record)
        return record

    def blockers(self, collection: str, uuid: str) -> list[str]:
        """Names of the live dependents that forbid deleting this record."""
        names = [dep for dep, column in RESOURCES[collection].blockers
                 if any(r.fields.get(column) == uuid for r in self.live(dep))]
        if collection == "modules" and any(uuid in mods for mods in self.course_modules.values()):
            names.append("courses (attached)")
        if collection == "files" and self.find("files", uuid).fields.get("used_at"):
            names.append("certificates")
        return names

    def delete(self, collection: str, uuids: Iterable[str]) -> None:
        """Soft-delete every one of ``uuids``, or none when one is missing or protected."""
        records = [self.find(collection, u) for u in uuids]
        for record in records:
            blocked = self.blockers(collection, record.uuid)
            if blocked:
                singular = RESOURCES[collection].singular
                raise ApiError(422, f"This {singular} cannot be deleted: it is referenced by "
                                    f"{', '.join(blocked)}.")
        stamp = now_iso()
        for record in records:
            record.deleted_at = stamp

    # -- files ----------------------------------------------------------------------------

    def upload(self, files: list[tuple[str, str, bytes]], *, base_url: str,
               max_bytes: int) -> list[Record]:
        """Store ``(filename, mime, content)`` items; identical content returns the record."""
        if not files:
            raise invalid({"files": ["The files field is required."]})
        errors = {f"files.{i}": [f"The files.{i} may not be greater than "
                                 f"{max_bytes // 1024} kilobytes."]
                  for i, (_, _, content) in enumerate(files) if len(content) > max_bytes}
        errors |= {f"files.{i}": [f"The files.{i} must be a file."]
                   for i, (_, _, content) in enumerate(files) if not content}
        if errors:
            raise invalid(errors)
        out = []
        for filename, mime, content in files:
            digest = hashlib.sha256(content).hexdigest()
            known = self.by_hash.get(digest)
            existing = self.records["files"][known] if known is not None and \
                self.exists("files", known) else None
            if existing is None:
                stamp = now_iso()
                new_uuid = _new_uuid()
                existing = Record("files", new_uuid, {
                    "original_name": filename, "mime_type": mime,
                    "extension": filename.rsplit(".", 1)[-1].lower() if "." in filename else "",
                    "size": len(content), "used_at": None, "hash": digest,
                    "file": f"{base_url}/files/{new_uuid}/download"}, stamp, stamp)
                self.records["files"][new_uuid] = existing
                self.blobs[new_uuid] = content
                self.by_hash[digest] = new_uuid
            out.append(existing)
        return out

    # -- certificates ---------------------------------------------------------------------

    def _check_file_unused(self, file_uuid: Any) -> None:
        if isinstance(file_uuid, str) and self.exists("files", file_uuid) \
                and self.records["files"][file_uuid].fields["used_at"]:
            raise UniqueViolation({"file_uuid": ["The file uuid has already been used by "
                                                 "another certificate."]})

    def create_certificate(self, payload: Mapping[str, Any], *, base_url: str,
                           issue_by: IssueBy = "status") -> Record:
        """A draft, or an issued certificate when the payload asks it the ``issue_by`` way
        (the other way's field is accepted and ignored)."""
        self._check_file_unused(payload.get("file_uuid"))
        record = self.create("certificates", payload)
        record.fields.update(revoked_at=None, revocation_reason=None,
                             public_verification_url=None)
        self.records["files"][record.fields["file_uuid"]].fields["used_at"] = now_iso()
        record.fields.pop("finish", None)
        if _asks_issue(payload, issue_by):
            self._issue(record, payload, issue_by, base_url)
        else:
            record.fields.update(status="draft", issued_at=None)
        return record

    def _issue(self, record: Record, payload: Mapping[str, Any], issue_by: IssueBy,
               base_url: str) -> None:
        # ``issued_at`` is documented only with ``status``; ``finish`` lets the platform stamp.
        issued_at = payload.get("issued_at") if issue_by == "status" else None
        record.fields.update(status="issued", issued_at=issued_at or now_iso(),
                             public_verification_url=f"{base_url}/verify/{record.uuid[:8]}")

    def update_certificate(self, uuid: str, payload: Mapping[str, Any], *, base_url: str,
                           issue_by: IssueBy = "status") -> Record:
        """A draft may be changed, and issued the ``issue_by`` way (``status: issued`` or
        ``finish: true``; the other way's field is ignored)."""
        record = self.find("certificates", uuid)
        if record.fields["status"] != "draft":
            raise invalid({"status": ["Only draft certificates can be changed."]})
        issue = _asks_issue(payload, issue_by)
        rest = {k: v for k, v in payload.items() if k not in ("finish", "status", "issued_at")}
        old_file = record.fields["file_uuid"]
        if rest.get("file_uuid", old_file) != old_file:
            self._check_file_unused(rest["file_uuid"])
        self.update("certificates", uuid, rest)
        if record.fields["file_uuid"] != old_file:
            self.records["files"][old_file].fields["used_at"] = None
            self.records["files"][record.fields["file_uuid"]].fields["used_at"] = now_iso()
        if issue:
            self._issue(record, payload, issue_by, base_url)
        return record

    def expire(self, uuid: str) -> Record:
        """What DokStamp does by itself once a validity period ends: issued -> expired (the
        docs: "happens automatically when a validity period is configured"). Expired is not
        issued, so :meth:`revoke` refuses it (the docs do not say it may be revoked), unless
        :attr:`revoke_expired` says this DokStamp allows it."""
        record = self.find("certificates", uuid)
        if record.fields["status"] != "issued":
            raise invalid({"status": ["Only issued certificates expire."]})
        record.fields.update(status="expired")
        record.updated_at = now_iso()
        return record

    def revoke(self, uuid: str, reason: Any) -> Record:
        record = self.find("certificates", uuid)
        revocable = ("issued", "expired") if self.revoke_expired else ("issued",)
        if record.fields["status"] not in revocable:
            raise invalid({"status": [f"A {record.fields['status']} certificate cannot be "
                                      "revoked."]})
        if reason is not None and not isinstance(reason, str):
            raise invalid({"revocation_reason": ["The revocation reason must be a string."]})
        record.fields.update(status="revoked", revoked_at=now_iso(), revocation_reason=reason)
        record.updated_at = now_iso()
        return record

    # -- course modules -------------------------------------------------------------------

    def attachable(self, course_uuid: str) -> list[Record]:
        course = self.find("courses", course_uuid)
        attached = self.course_modules.get(course_uuid, {})
        return [m for m in self.live("modules")
                if m.fields["institution_uuid"] == course.fields["institution_uuid"]
                and m.uuid not in attached]

    def attach(self, course_uuid: str, modules: Any) -> list[dict[str, Any]]:
        course = self.find("courses", course_uuid)
        if not isinstance(modules, list) or not modules:
            raise invalid({"modules": ["The modules field is required."]})
        attached = self.course_modules.setdefault(course_uuid, {})
        errors: dict[str, list[str]] = {}
        pivots: dict[str, dict[str, Any]] = {}
        for i, item in enumerate(modules):
            uuid = item.get("uuid") if isinstance(item, dict) else None
            if not uuid:
                errors[f"modules.{i}.uuid"] = [f"The modules.{i}.uuid field is required."]
            elif not (self.exists("modules", uuid) and self.records["modules"][uuid].fields[
                    "institution_uuid"] == course.fields["institution_uuid"]):
                errors[f"modules.{i}.uuid"] = [f"The selected modules.{i}.uuid is invalid."]
            elif uuid in attached or uuid in pivots:
                errors[f"modules.{i}.uuid"] = ["The module is already attached to this course."]
            else:
                pivots[uuid] = {k: item.get(k) for k in
                                ("order", "is_required", "workload", "course_module_group_uuid")}
        if errors:
            raise invalid(errors)
        attached.update(pivots)
        return self.course_module_list(course_uuid)

    def detach(self, course_uuid: str, modules: Any) -> None:
        self.find("courses", course_uuid)
        if not isinstance(modules, list) or not modules:
            raise invalid({"modules": ["The modules field is required."]})
        bad = {f"modules.{i}": [f"The modules.{i} must be a string."]
               for i, m in enumerate(modules) if not isinstance(m, str)}
        if bad:
            raise invalid(bad)
        attached = self.course_modules.get(course_uuid, {})
        for module_uuid in modules:
            attached.pop(module_uuid, None)

    def course_module_list(self, course_uuid: str) -> list[dict[str, Any]]:
        return [self.show(self.records["modules"][m]) | {"pivot": pivot}
                for m, pivot in self.course_modules.get(course_uuid, {}).items()]

    def dump(self) -> dict[str, Any]:
        """Everything, deleted records included (``deleted_at`` set), for tests and benches."""
        out: dict[str, Any] = {}
        for collection, records in self.records.items():
            out[collection] = [self.show(r) | {"deleted_at": r.deleted_at} | (
                {"hash": r.fields["hash"]} if collection == "files" else {})
                for r in records.values()]
        out["course_modules"] = {c: dict(m) for c, m in self.course_modules.items()}
        return out


def _asks_issue(payload: Mapping[str, Any], issue_by: IssueBy) -> bool:
    if issue_by == "finish":
        return payload.get("finish") is True
    return payload.get("status") == "issued"


def _hashable(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """An index key for field values (a list or dict value becomes its JSON text)."""
    return tuple(v if isinstance(v, str | int | float | bool | None) else json.dumps(
        v, sort_keys=True, default=str) for v in values)


def _sort_key(value: Any) -> tuple[bool, float, str]:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else 0
    return (value is None, float(number), "" if value is None else str(value))


def _matches(actual: Any, wanted: str) -> bool:
    if wanted == "null":
        return actual is None
    if isinstance(actual, bool):
        return wanted.lower() in (("1", "true") if actual else ("0", "false"))
    return actual is not None and str(actual) == wanted
