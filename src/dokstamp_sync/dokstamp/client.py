"""A typed DokStamp API client over an injected :class:`httpx.Client`.

Every resource call carries ``Accept: application/json``, ``X-Tenant`` and a Bearer token (see
:mod:`.auth`); every failure surfaces as one of :mod:`.errors`. The client does not retry: the
caller decides, from the exception's class, whether to retry or dead-letter.

Entities are the plain JSON objects DokStamp returns (``Entity``): the sync engine sends and
reads fields in DokStamp's own names, so a typed wrapper per field would only restate the docs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from dokstamp_sync.dokstamp import errors
from dokstamp_sync.dokstamp.auth import BearerAuth, TokenManager

log = logging.getLogger(__name__)

Entity = dict[str, Any]
IssueStyle = Literal["status", "finish"]
MAX_PER_PAGE = 200  # the largest page the docs' bulk example asks for


def build_http_client(base_url: str, *, timeout: float = 30.0, connect_timeout: float = 5.0,
                      max_connections: int = 20) -> httpx.Client:
    """An ``httpx.Client`` with explicit timeouts and a keep-alive pool, for DokStamp."""
    return httpx.Client(
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=max_connections,
                            max_keepalive_connections=max_connections),
        headers={"User-Agent": "dokstamp-sync"},
    )


@dataclass(frozen=True)
class Page:
    """One page of a list answer and its ``meta``."""

    items: list[Entity]
    current_page: int
    per_page: int
    total: int
    last_page: int | None


@dataclass(frozen=True)
class Upload:
    """One file for ``POST /files``."""

    filename: str
    content: bytes
    content_type: str = "application/pdf"


def _where(filters: Mapping[str, Any] | None) -> dict[str, str]:
    """``{"email": x}`` -> ``{"where[email]": x}``; ``None`` is DokStamp's ``null``."""
    params: dict[str, str] = {}
    for field, value in (filters or {}).items():
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        params[f"where[{field}]"] = text
    return params


class DokStampClient:
    """The DokStamp API, one attribute per resource (``client.students.create(...)``)."""

    def __init__(self, http: httpx.Client, *, tenant: str, tokens: TokenManager,
                 issue_style: IssueStyle = "status") -> None:
        self.http = http
        self.tenant = tenant
        self.tokens = tokens
        self._auth = BearerAuth(tokens)
        self.institutions = Resource(self, "/institutions")
        self.modules = Resource(self, "/modules")
        self.courses = Courses(self, "/courses")
        self.cohorts = Resource(self, "/cohorts")
        self.students = Resource(self, "/students")
        self.enrollments = Resource(self, "/enrollments")
        self.files = Files(self, "/files")
        self.certificates = Certificates(self, "/certificates", issue_style=issue_style)

    def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                json: Any = None, files: Sequence[tuple[str, tuple[str, bytes, str]]] | None
                = None) -> Any:
        """Send one authenticated request; return its decoded JSON (``None`` for 204)."""
        request = self.http.build_request(
            method, path, params=params, json=json, files=files,
            headers={"Accept": "application/json", "X-Tenant": self.tenant})
        try:
            response = self.http.send(request, auth=self._auth)
        except httpx.HTTPError as exc:
            raise errors.from_httpx_error(exc, request) from None
        log.debug("%s %s -> %s", method, request.url.path, response.status_code)
        if response.status_code >= 400:
            raise errors.from_response(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise errors.ServerError("answer is not JSON", status=response.status_code,
                                     method=method, path=request.url.path) from None

    def paginate(self, path: str, where: Mapping[str, Any] | None = None, *,
                 per_page: int = MAX_PER_PAGE) -> Iterator[Entity]:
        """Every item of a list endpoint, page by page. Stops at ``meta.last_page``, on a short
        or empty page, or once ``meta.total`` items came (an API ignoring ``page`` cannot make
        it loop forever)."""
        number, seen = 1, 0
        while True:
            page = self.page(path, where, page=number, per_page=per_page)
            yield from page.items
            seen += len(page.items)
            if (page.last_page is not None and number >= page.last_page) \
                    or len(page.items) < page.per_page or not page.items or seen >= page.total:
                return
            number += 1

    def page(self, path: str, where: Mapping[str, Any] | None = None, *, page: int = 1,
             per_page: int = 15) -> Page:
        """One page of ``GET {path}?where[...]``."""
        params = _where(where) | {"page": str(page), "per_page": str(per_page)}
        body = self.request("GET", path, params=params)
        meta = body.get("meta") or {}
        items = [dict(i) for i in body.get("data") or []]
        return Page(items=items, current_page=int(meta.get("current_page", page)),
                    per_page=int(meta.get("per_page", per_page)),
                    total=int(meta.get("total", len(items))),
                    last_page=int(meta["last_page"]) if meta.get("last_page") else None)

    def me(self) -> Entity:
        """``GET /auth/me``: the current user and its tenant."""
        return dict(_data(self.request("GET", "/auth/me")))


def _data(body: Any) -> Any:
    return body["data"] if isinstance(body, dict) and "data" in body else body


class Resource:
    """A DokStamp collection: create, get, update (PATCH), delete, and filtered listing."""

    def __init__(self, client: DokStampClient, path: str) -> None:
        self._client = client
        self.path = path

    def create(self, fields: Mapping[str, Any]) -> Entity:
        return dict(_data(self._client.request("POST", self.path, json=dict(fields))))

    def get(self, uuid: str) -> Entity:
        return dict(_data(self._client.request("GET", f"{self.path}/{uuid}")))

    def update(self, uuid: str, fields: Mapping[str, Any]) -> Entity:
        return dict(_data(self._client.request("PATCH", f"{self.path}/{uuid}",
                                               json=dict(fields))))

    def delete(self, uuid: str) -> None:
        self._client.request("DELETE", f"{self.path}/{uuid}")

    def page(self, where: Mapping[str, Any] | None = None, *, page: int = 1,
             per_page: int = 15) -> Page:
        """One page of ``GET {path}?where[...]``."""
        return self._client.page(self.path, where, page=page, per_page=per_page)

    def iterate(self, where: Mapping[str, Any] | None = None, *,
                per_page: int = MAX_PER_PAGE) -> Iterator[Entity]:
        """Every match, page by page (see :meth:`DokStampClient.paginate`)."""
        return self._client.paginate(self.path, where, per_page=per_page)

    def find(self, **where: Any) -> list[Entity]:
        """All matches of the filters (the search half of search-before-create)."""
        return list(self.iterate(where))

    def find_one(self, **where: Any) -> Entity | None:
        """The first match, or ``None``."""
        items = self.page(where, per_page=1).items
        return items[0] if items else None

    def count(self, **where: Any) -> int:
        """``meta.total`` of a one-item page, as the deletion-rules guide does."""
        return self.page(where, per_page=1).total


class Courses(Resource):
    """Courses, plus attaching and detaching modules (their bodies differ, see the docs)."""

    def attach_modules(self, course_uuid: str,
                       modules: Sequence[Mapping[str, Any]]) -> Any:
        """``POST /courses/{uuid}/attach/modules`` with ``[{"uuid", "order", ...}, ...]``."""
        return self._client.request("POST", f"{self.path}/{course_uuid}/attach/modules",
                                    json={"modules": [dict(m) for m in modules]})

    def detach_modules(self, course_uuid: str, module_uuids: Sequence[str]) -> Any:
        """``DELETE /courses/{uuid}/detach/modules`` with a plain list of UUID strings."""
        return self._client.request("DELETE", f"{self.path}/{course_uuid}/detach/modules",
                                    json={"modules": list(module_uuids)})

    def attachable_modules(self, course_uuid: str) -> list[Entity]:
        """Modules of the course's institution not yet attached to it (every page)."""
        return list(self._client.paginate(f"{self.path}/{course_uuid}/attach/modules"))


class Files(Resource):
    """Files: multipart upload (several per request), deduplicated by content."""

    def upload(self, uploads: Sequence[Upload]) -> list[Entity]:
        """``POST /files`` with one ``files[]`` part per upload; records in the same order."""
        if not uploads:
            return []
        parts = [("files[]", (u.filename, u.content, u.content_type)) for u in uploads]
        return [dict(f) for f in _data(self._client.request("POST", self.path, files=parts))]


class Certificates(Resource):
    """Certificates: create as draft or issued (either documented style), and revoke."""

    def __init__(self, client: DokStampClient, path: str, *, issue_style: IssueStyle) -> None:
        super().__init__(client, path)
        self.issue_style = issue_style

    def issue_fields(self, issued_at: str | None = None) -> dict[str, Any]:
        """The fields that make a create (or a draft's PATCH) issue the certificate."""
        if self.issue_style == "finish":
            return {"finish": True}
        when = issued_at or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"status": "issued", "issued_at": when}

    def create(self, fields: Mapping[str, Any], *, issue: bool = False,
               issued_at: str | None = None) -> Entity:
        """Create a draft, or an issued certificate when ``issue`` (style per the setting)."""
        payload = {k: v for k, v in fields.items()
                   if k not in ("status", "finish", "issued_at")}
        if issue:
            payload |= self.issue_fields(issued_at or fields.get("issued_at"))
        elif self.issue_style == "status":
            payload["status"] = "draft"
        return super().create(payload)

    def revoke(self, uuid: str, reason: str | None = None) -> Entity:
        """``PUT /certificates/{uuid}/revoke``, optionally with ``revocation_reason``."""
        body = {"revocation_reason": reason} if reason else None
        return dict(_data(self._client.request("PUT", f"{self.path}/{uuid}/revoke",
                                               json=body)))
