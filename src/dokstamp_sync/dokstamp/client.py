"""A typed DokStamp API client over an injected :class:`httpx.Client`.

Every resource call carries ``Accept: application/json``, ``X-Tenant`` and a Bearer token (see
:mod:`.auth`); every failure surfaces as one of :mod:`.errors`. The client does not retry: the
caller decides, from the exception's class, whether to retry or dead-letter.

Entities are the plain JSON objects DokStamp returns (``Entity``): the sync engine sends and
reads fields in DokStamp's own names, so a typed wrapper per field would only restate the docs.
Their envelope is checked, though: a success answer that is not JSON, is empty where an entity is
due, or has ``data`` of the wrong shape (or an entity without ``uuid``) raises
:class:`~.errors.MalformedResponse` instead of failing later with a ``KeyError``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from dokstamp_sync.dokstamp import errors
from dokstamp_sync.dokstamp.auth import BearerAuth, TokenManager
from dokstamp_sync.dokstamp.breaker import BreakerTransport, CircuitBreaker
from dokstamp_sync.dokstamp.fence import Fence, FencedTransport, Riding, writes_only
from dokstamp_sync.dokstamp.pages import MAX_PAGES, Listing, Page, parse_page
from dokstamp_sync.dokstamp.ratelimit import RateLimitedTransport, RateLimiter
from dokstamp_sync.dokstamp.uploads import Upload, check_upload
from dokstamp_sync.limits import RESPONSE_MAX_BYTES
from dokstamp_sync.states import CertificateStatus

log = logging.getLogger(__name__)

Entity = dict[str, Any]
IssueStyle = Literal["status", "finish"]
MAX_PER_PAGE = 200  # the largest page the docs' bulk example asks for


def build_http_client(base_url: str, *, timeout: float = 10.0, connect_timeout: float = 5.0,
                      max_connections: int = 20, limiter: RateLimiter | None = None,
                      breaker: CircuitBreaker | None = None,
                      transport: httpx.BaseTransport | None = None,
                      fence: Fence | None = None,
                      riding: Riding | None = None) -> httpx.Client:
    """An ``httpx.Client`` with explicit timeouts and a keep-alive pool, for DokStamp.

    ``transport`` replaces the network (an ``httpx.MockTransport`` in tests); ``limiter`` wraps
    it in a :class:`~.ratelimit.RateLimitedTransport`, so every request the client sends waits
    for the fleet-wide bucket; ``breaker`` wraps that in a :class:`~.breaker.BreakerTransport`
    (outermost: an open breaker spends no token). ``fence`` is called just before each write
    leaves, under both, after every wait (a :class:`~.fence.FencedTransport`, innermost: the
    sync engine checks there that its locks are still its own); ``riding``, the same check as a
    rider of the limiter's round trip (see :mod:`.fence`). The transport is always
    explicit, so httpx
    reads no proxy from the environment (``HTTPS_PROXY``): to go through one, pass
    ``transport=httpx.HTTPTransport(proxy=...)``.
    """
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections)
    inner = transport or httpx.HTTPTransport(limits=limits)
    if fence:
        inner = FencedTransport(inner, fence)
    if limiter:
        inner = RateLimitedTransport(inner, limiter,
                                     writes_only(riding) if fence and riding else None)
    if breaker:
        inner = BreakerTransport(inner, breaker, merged=limiter is not None)
    return httpx.Client(
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        transport=inner,
        headers={"User-Agent": "dokstamp-sync"},
    )


def tenant_domain(me: Entity) -> str | None:
    """The tenant's ``domain`` in a :meth:`DokStampClient.me` answer (``{..., "tenant":
    {"uuid" or "id", "name", "domain"}}``): the value the docs say to send as ``X-Tenant``.
    ``None`` when the answer has no such string."""
    tenant = me.get("tenant")
    domain = tenant.get("domain") if isinstance(tenant, dict) else None
    return domain if isinstance(domain, str) and domain else None


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
        # The largest answer read (DOKSTAMP_MAX_RESPONSE_BYTES): past it, a malformed answer.
        self.max_response_bytes = RESPONSE_MAX_BYTES
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
        return self.call(method, path, params=params, json=json, files=files)[1]

    def call(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
             json: Any = None, files: Sequence[tuple[str, tuple[str, bytes, str]]] | None
             = None) -> tuple[httpx.Response, Any]:
        """:meth:`request`, also returning the response (for classifying its body)."""
        request = self.http.build_request(
            method, path, params=params, json=json, files=files,
            headers={"Accept": "application/json", "X-Tenant": self.tenant})
        with errors.exchange(self.http, request, auth=self._auth,
                             max_bytes=self.max_response_bytes) as response:
            log.debug("%s %s -> %s", method, request.url.path, response.status_code)
            if response.status_code == 204 or not response.content:
                return response, None
            try:
                return response, response.json()
            except ValueError:
                raise errors.malformed(response, "the answer is not JSON") from None

    def entity(self, method: str, path: str, **kw: Any) -> Entity:
        """A call answered by one entity, ``{"data": {"uuid": ..., ...}}``; anything else (an
        empty body, a list, an object without ``uuid``) is :class:`~.errors.MalformedResponse`."""
        response, body = self.call(method, path, **kw)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not data.get("uuid"):
            raise errors.malformed(response, "expected data: an object with a uuid")
        return dict(data)

    def listing(self, path: str, where: Mapping[str, Any] | None = None, *,
                per_page: int = MAX_PER_PAGE, max_pages: int = MAX_PAGES) -> Listing:
        """Every item of a list endpoint, read lazily; after iterating, ``complete`` says
        whether it provably saw them all (see :mod:`.pages` for when it stops)."""
        return Listing(lambda n: self.page(path, where, page=n, per_page=per_page),
                       max_pages=max_pages)

    def paginate(self, path: str, where: Mapping[str, Any] | None = None, *,
                 per_page: int = MAX_PER_PAGE) -> Iterator[Entity]:
        """Every item of a list endpoint, page by page: :meth:`listing` without the verdict."""
        return iter(self.listing(path, where, per_page=per_page))

    def page(self, path: str, where: Mapping[str, Any] | None = None, *, page: int = 1,
             per_page: int = 15) -> Page:
        """One page of ``GET {path}?where[...]``."""
        return self._page(path, where, page=page, per_page=per_page)[1]

    def _page(self, path: str, where: Mapping[str, Any] | None, *, page: int,
              per_page: int) -> tuple[httpx.Response, Page]:
        params = _where(where) | {"page": str(page), "per_page": str(per_page)}
        response, body = self.call("GET", path, params=params)
        return response, parse_page(response, body, page=page, per_page=per_page)

    def me(self) -> Entity:
        """``GET /auth/me``: the current user and its tenant, ``{"uuid" (or "id"), "name",
        "email", "tenant": {"uuid" (or "id"), "name", "domain"}}`` (see :func:`tenant_domain`).
        An answer without a ``tenant`` object is :class:`~.errors.MalformedResponse`."""
        response, body = self.call("GET", "/auth/me")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("tenant"), dict):
            raise errors.malformed(response, "expected data: a user with a tenant object")
        return dict(data)


class Resource:
    """A DokStamp collection: create, get, update (PATCH), delete, and filtered listing."""

    def __init__(self, client: DokStampClient, path: str) -> None:
        self._client = client
        self.path = path

    def create(self, fields: Mapping[str, Any]) -> Entity:
        return self._client.entity("POST", self.path, json=dict(fields))

    def get(self, uuid: str) -> Entity:
        return self._client.entity("GET", f"{self.path}/{uuid}")

    def update(self, uuid: str, fields: Mapping[str, Any]) -> Entity:
        return self._client.entity("PATCH", f"{self.path}/{uuid}", json=dict(fields))

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

    def listing(self, where: Mapping[str, Any] | None = None, *,
                per_page: int = MAX_PER_PAGE) -> Listing:
        """Every match, lazily, with a ``complete`` verdict once iterated (see
        :meth:`DokStampClient.listing`): use it where "not listed" must mean "absent"."""
        return self._client.listing(self.path, where, per_page=per_page)

    def find(self, **where: Any) -> list[Entity]:
        """All matches of the filters (the search half of search-before-create)."""
        return list(self.iterate(where))

    def find_one(self, **where: Any) -> Entity | None:
        """The first match, or ``None``."""
        items = self.page(where, per_page=1).items
        return items[0] if items else None

    def count(self, **where: Any) -> int:
        """``meta.total`` of a one-item page, as the deletion-rules guide does; an answer
        without ``meta.total`` is :class:`~.errors.MalformedResponse` (guessing would let a
        delete through that the rules forbid)."""
        response, page = self._client._page(self.path, where, page=1, per_page=1)
        if page.meta_total is None:
            raise errors.malformed(response, "a count needs meta.total")
        return page.meta_total


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
        """``POST /files`` with one ``files[]`` part per upload; one record per upload, in the
        same order, each checked by :func:`~.uploads.check_upload` (its name and size): a
        mismatch raises :class:`~.errors.UploadMismatch` (then upload one file per request)."""
        if not uploads:
            return []
        parts = [("files[]", (u.filename, u.content, u.content_type)) for u in uploads]
        response, body = self._client.call("POST", self.path, files=parts)
        records = body.get("data") if isinstance(body, dict) else None
        if not isinstance(records, list):
            raise errors.malformed(response, "expected data: a list of file records")
        return check_upload(response, uploads, records)


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
        return {"status": CertificateStatus.ISSUED.value, "issued_at": when}

    def create(self, fields: Mapping[str, Any], *, issue: bool = False,
               issued_at: str | None = None) -> Entity:
        """Create a draft, or an issued certificate when ``issue`` (style per the setting)."""
        payload = {k: v for k, v in fields.items()
                   if k not in ("status", "finish", "issued_at")}
        if issue:
            payload |= self.issue_fields(issued_at or fields.get("issued_at"))
        elif self.issue_style == "status":
            payload["status"] = CertificateStatus.DRAFT.value
        return super().create(payload)

    def revoke(self, uuid: str, reason: str | None = None) -> Entity:
        """``PUT /certificates/{uuid}/revoke``, optionally with ``revocation_reason``."""
        body = {"revocation_reason": reason} if reason else None
        return self._client.entity("PUT", f"{self.path}/{uuid}/revoke", json=body)
