"""The sandbox's HTTP face: a Starlette (ASGI) app with DokStamp's routes and an admin API.

Every API route goes through :meth:`Sandbox.handle`, which answers 503 during an outage, applies
the injected faults, checks the Bearer token and ``X-Tenant``, runs the operation on
:mod:`.store` and counts the request. Admin routes (:mod:`.admin`) live under ``/_sandbox/``
(no auth: the sandbox binds to loopback).

:class:`SandboxConfig` chooses which docs the sandbox follows (``generation``, see
:mod:`.generations`) and how strictly (``strict``: only the documented ``where[...]`` filters of
:data:`.schema.DOCUMENTED_FILTERS` apply, others are dropped silently as a lenient query builder
does; certificates show their file only as ``files: [{"type", "uuid"}]``, as in every mode).
"""

from __future__ import annotations

import asyncio
import json
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from dokstamp_sync.sandbox.accounts import Account, Authority
from dokstamp_sync.sandbox.admin import admin_routes
from dokstamp_sync.sandbox.faults import (
    DEEP_BODY_LEVELS,
    HUGE_BODY_BYTES,
    Decision,
    FaultInjector,
    Faults,
    MalformedBody,
    Stats,
)
from dokstamp_sync.sandbox.generations import Docs, Generation, check_login_route, docs_for
from dokstamp_sync.sandbox.store import DEFAULT_PER_PAGE, ApiError, Tenant, UniqueViolation

Handler = Callable[[Request, Tenant | None, Account | None], Awaitable[Any]]
COLLECTIONS = ("institutions", "modules", "courses", "cohorts", "students", "enrollments",
               "certificates")
# What a proxy or captive portal answers in place of the API (``body: "html"``).
HTML_PAGE = ("<!DOCTYPE html><html><head><title>Sign in</title></head><body><h1>Sign in to "
             "continue</h1><form method=\"post\"></form></body></html>")


@dataclass
class SandboxConfig:
    """How a sandbox behaves; every field has a command-line flag (``sandbox --help``).

    ``generation``: which docs it follows (:mod:`.generations`). ``strict``: only documented
    ``where[...]`` filters apply. ``error_style``: None follows the generation; ``"v-a"`` or
    ``"v-b"`` forces error bodies without or with ``"success": false``.
    """

    accounts: list[Account] = field(default_factory=lambda: [Account()])
    token_ttl: float = 3600.0
    generation: Generation = "a"
    strict: bool = False
    error_style: Literal["v-a", "v-b"] | None = None
    max_file_bytes: int = 10 * 1024 * 1024
    faults: Faults = field(default_factory=Faults)


class Sandbox:
    """All sandbox state: accounts, tenants' data, faults and stats."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.faults = FaultInjector(self.config.faults)
        self.stats = Stats()
        self._late: set[asyncio.Task[None]] = set()  # requests applied after their answer
        self.reset()

    @property
    def docs(self) -> Docs:
        """What the configured generation of the docs promises."""
        return docs_for(self.config.generation)

    def reset(self) -> None:
        """Forget all data and tokens and end any outage (faults and stats are reset
        separately)."""
        self.authority = Authority(self.config.accounts, token_ttl=self.config.token_ttl)
        self.tenants = {a.tenant: Tenant(a.tenant, a.tenant_name) for a in self.config.accounts}
        self.faults.end_outage()

    def error(self, status: int, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> JSONResponse:
        """An error answer in the configured generation's body style."""
        docs, style = self.docs, self.config.error_style
        if status == 404 and docs.not_found is not None:
            body = body | {"message": docs.not_found}
        if docs.success_false if style is None else style == "v-b":
            body = {"success": False} | body
        return JSONResponse(body, status_code=status, headers=headers)

    def _api_error(self, exc: ApiError) -> JSONResponse:
        conflict = isinstance(exc, UniqueViolation) and self.faults.faults.conflict_409
        return self.error(409 if conflict else exc.status, exc.body)

    def _tenant(self, request: Request, account: Account) -> Tenant:
        domain = request.headers.get("x-tenant")
        if not domain:
            raise ApiError(401, "The X-Tenant header is required.")
        tenant = self.tenants.get(domain)
        if tenant is None:
            raise ApiError(404, "Tenant not found.")
        if account.tenant != domain:
            raise ApiError(403, "This action is unauthorized.")
        return tenant

    async def handle(self, request: Request, route: str, handler: Handler, *,
                     auth: bool, tenant: bool) -> Response:
        method = request.method
        key = f"{method} {route}"
        outage = self.faults.in_outage()
        if outage is not None:
            self.stats.record(key, 503, outage=True)
            headers = {"Retry-After": str(outage.retry_after)} if outage.retry_after else None
            return self.error(503, {"message": "Service Unavailable"}, headers)
        # Read the whole request first, as a real server has it before processing: a slow
        # answer must still apply the write after the client gave up waiting.
        await request.body()
        decision = self.faults.decide(method, route, request.headers.get("x-tenant", "-"))
        latency = self.faults.faults.latency_ms / 1000.0
        if latency:
            await asyncio.sleep(latency)
        if decision.status is not None and decision.land_after_s:
            # A gateway gave up waiting (after ``delay_s``) and answered; the API still
            # applies the request, ``land_after_s`` after that answer.
            if decision.delay_s:
                await asyncio.sleep(decision.delay_s)
            self.stats.record(key, decision.status, injected=True)
            task = asyncio.get_running_loop().create_task(self._land_later(
                request, handler, auth=auth, tenant=tenant, after=decision.land_after_s))
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            return self._fault(decision)
        if decision.status is not None and not decision.after_commit:
            self.stats.record(key, decision.status, injected=True)
            return self._fault(decision)
        if decision.body == "html":  # something in front of the API answered
            self.stats.record(key, 200, malformed=True)
            return HTMLResponse(HTML_PAGE)
        if decision.delay_s:
            await asyncio.sleep(decision.delay_s)
        response = await self._apply(request, handler, auth=auth, tenant=tenant)
        if decision.status is not None:  # the request was applied; its answer is lost
            lost = method != "GET" and response.status_code < 400
            self.stats.record(key, decision.status, injected=True, lost=lost)
            return self._fault(decision)
        malformed = decision.body is not None and response.status_code < 400
        if malformed:
            assert decision.body is not None
            response = _malformed(response, decision.body)
        self.stats.record(key, response.status_code, malformed=malformed)
        return response

    async def _apply(self, request: Request, handler: Handler, *, auth: bool,
                     tenant: bool) -> Response:
        try:
            account = token = None
            if auth:
                token, account = self.authority.check(request.headers.get("authorization"))
            space = self._tenant(request, account) if tenant and account else None
            request.state.token = token
            result = await handler(request, space, account)
            return result if isinstance(result, Response) else JSONResponse(result)
        except ApiError as exc:
            return self._api_error(exc)

    async def _land_later(self, request: Request, handler: Handler, *, auth: bool,
                          tenant: bool, after: float) -> None:
        await asyncio.sleep(after)
        await self._apply(request, handler, auth=auth, tenant=tenant)

    def _fault(self, decision: Decision) -> Response:
        assert decision.status is not None
        retry_after = decision.retry_after or (1 if decision.status == 429 else None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        if decision.html and decision.status >= 500:  # a proxy's page, not the API's JSON
            return HTMLResponse(HTML_PAGE.replace("Sign in to continue", "Bad Gateway"),
                                status_code=decision.status, headers=headers)
        if decision.status == 429:
            return self.error(429, {"message": "Too Many Attempts."}, headers)
        return self.error(decision.status, {"message": "Server Error"}, headers)


def _malformed(response: Response, body: MalformedBody) -> Response:
    """``response`` (a success) with its body emptied or its ``data`` of the wrong shape."""
    if body == "empty":
        return Response(b"", status_code=response.status_code, media_type="application/json")
    raw = bytes(response.body) or b"null"
    if body in ("huge", "deep"):  # the real answer, with one more top-level field
        extra = (b'"' + b"x" * HUGE_BODY_BYTES + b'"' if body == "huge"
                 else b"[" * DEEP_BODY_LEVELS + b"]" * DEEP_BODY_LEVELS)
        inner = raw.strip()[1:-1] if raw.strip().startswith(b"{") else b'"data": ' + raw
        joined = b"{" + inner + (b", " if inner.strip() else b"") + b'"padding": ' + extra + b"}"
        return Response(joined, status_code=response.status_code, media_type="application/json")
    content = json.loads(raw)
    data = content.get("data", content) if isinstance(content, dict) else content
    # An object becomes a one-item list; a list becomes its first item (or an empty object).
    wrong = [data] if isinstance(data, dict) else (data[0] if data else {})
    rest = content if isinstance(content, dict) and "data" in content else {}
    return JSONResponse(rest | {"data": wrong}, status_code=response.status_code)


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "Malformed JSON body.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _listing_args(request: Request) -> dict[str, Any]:
    q = request.query_params
    try:
        page = int(q.get("page", "1"))
        per_page = int(q.get("per_page", str(DEFAULT_PER_PAGE)))
    except ValueError:
        raise ApiError(400, "page and per_page must be integers.") from None
    where = {k[6:-1]: v for k, v in q.items() if k.startswith("where[") and k.endswith("]")}
    return {"where": where, "page": page, "per_page": per_page,
            "sort": q.get("sort[column]"), "order": q.get("sort[order]", "asc")}


def _listing_mode(sb: Sandbox) -> dict[str, Any]:
    return {"strict": sb.config.strict, "page_cap": sb.faults.faults.page_cap}


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _routes(sb: Sandbox) -> list[Route]:
    routes: list[Route] = []

    def api(method: str, path: str, handler: Handler, *, auth: bool = True,
            tenant: bool = True) -> None:
        async def endpoint(request: Request) -> Response:
            return await sb.handle(request, path, handler, auth=auth, tenant=tenant)
        routes.append(Route(path, endpoint, methods=[method]))

    # -- auth -----------------------------------------------------------------------------
    async def login(r: Request, _t: Tenant | None, _a: Account | None) -> Any:
        check_login_route(sb.docs, "/auth/login")
        body = await _json(r)
        return sb.authority.login(body.get("email"), body.get("password"))

    async def refresh(r: Request, _t: Tenant | None, _a: Account | None) -> Any:
        check_login_route(sb.docs, "/auth/refresh")
        return sb.authority.refresh_token((await _json(r)).get("refresh_token"))

    async def oauth(r: Request, _t: Tenant | None, _a: Account | None) -> Any:
        check_login_route(sb.docs, "/oauth/token")
        async with r.form() as form:
            return sb.authority.client_credentials(form.get("grant_type"),
                                                   form.get("client_id"),
                                                   form.get("client_secret"))

    async def logout(r: Request, _t: Tenant | None, _a: Account | None) -> Any:
        sb.authority.logout(r.state.token)
        return {"message": "Successfully logged out"}

    async def me(r: Request, _t: Tenant | None, a: Account | None) -> Any:
        """The user and its tenant, with integer ``id``s (generation a) or ``uuid``s (b)."""
        assert a is not None
        space = sb.tenants[a.tenant]
        if sb.docs.id_key == "id":
            user_id: object = sb.config.accounts.index(a) + 1
            tenant_id: object = list(sb.tenants).index(a.tenant) + 1
        else:
            user_id, tenant_id = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, a.email)), space.uuid
        key = sb.docs.id_key
        return {"data": {key: user_id, "name": a.name, "email": a.email,
                         "tenant": {key: tenant_id, "name": space.name,
                                    "domain": space.domain}}}

    api("POST", "/auth/login", login, auth=False, tenant=False)
    api("POST", "/auth/refresh", refresh, auth=False, tenant=False)
    api("POST", "/oauth/token", oauth, auth=False, tenant=False)
    api("POST", "/auth/logout", logout, tenant=False)
    api("GET", "/auth/me", me, tenant=False)

    # -- collections ----------------------------------------------------------------------
    def crud(c: str) -> None:
        async def listing(r: Request, t: Tenant | None, _a: Account | None) -> Any:
            assert t is not None
            return t.listing(c, **_listing_args(r), **_listing_mode(sb))

        async def create(r: Request, t: Tenant | None, _a: Account | None) -> Any:
            assert t is not None
            body = await _json(r)
            record = t.create_certificate(body, base_url=_base(r), issue_by=sb.docs.issue_by) \
                if c == "certificates" else t.create(c, body)
            return JSONResponse({"data": t.show(record)}, status_code=201)

        async def show(r: Request, t: Tenant | None, _a: Account | None) -> Any:
            assert t is not None
            return {"data": t.show(t.find(c, r.path_params["uuid"]))}

        async def update(r: Request, t: Tenant | None, _a: Account | None) -> Any:
            assert t is not None
            uuid, body = r.path_params["uuid"], await _json(r)
            record = t.update_certificate(uuid, body, base_url=_base(r),
                                          issue_by=sb.docs.issue_by) \
                if c == "certificates" else t.update(c, uuid, body)
            return {"data": t.show(record)}

        async def delete(r: Request, t: Tenant | None, _a: Account | None) -> Any:
            assert t is not None
            t.delete(c, [r.path_params["uuid"]])
            return Response(status_code=204)

        async def batch_delete(r: Request, t: Tenant | None, _a: Account | None) -> Any:
            assert t is not None
            uuids = (await _json(r)).get("uuids")
            if not isinstance(uuids, list) or not uuids:
                raise ApiError(422, "The given data was invalid.",
                               {"uuids": ["The uuids field is required."]})
            t.delete(c, [str(u) for u in uuids])
            return Response(status_code=204)

        api("GET", f"/{c}", listing)
        api("DELETE", f"/{c}/batch/destroy", batch_delete)
        api("GET", f"/{c}/{{uuid}}", show)
        api("DELETE", f"/{c}/{{uuid}}", delete)
        if c != "files":  # files are created by upload and never changed
            api("POST", f"/{c}", create)
            api("PATCH", f"/{c}/{{uuid}}", update)
            api("PUT", f"/{c}/{{uuid}}", update)

    for collection in (*COLLECTIONS, "files"):
        crud(collection)

    # -- files ----------------------------------------------------------------------------
    async def upload(r: Request, t: Tenant | None, _a: Account | None) -> Any:
        assert t is not None
        items = []
        async with r.form(max_files=10_000) as form:  # closes the parts' temporary files
            for part in form.getlist("files[]"):
                if not isinstance(part, UploadFile):
                    raise ApiError(422, "The given data was invalid.",
                                   {"files": ["The files must be files."]})
                items.append((part.filename or "upload", part.content_type or
                               "application/octet-stream", await part.read()))
        records = t.upload(items, base_url=_base(r), max_bytes=sb.config.max_file_bytes)
        if sb.faults.faults.reorder_uploads:  # the docs never promise the order
            records.reverse()
        return JSONResponse({"data": [t.show(f) for f in records]}, status_code=201)

    async def download(r: Request, _t: Tenant | None, _a: Account | None) -> Any:
        uuid = r.path_params["uuid"]
        for space in sb.tenants.values():  # UUIDs are global; the download is public
            if space.exists("files", uuid):
                record = space.records["files"][uuid]
                return Response(space.blobs[uuid], media_type=record.fields["mime_type"])
        raise ApiError(404, "Resource not found.")

    api("POST", "/files", upload)
    api("GET", "/files/{uuid}/download", download, auth=False, tenant=False)

    # -- course modules and certificate revocation ----------------------------------------
    async def attachable(r: Request, t: Tenant | None, _a: Account | None) -> Any:
        assert t is not None
        args = _listing_args(r)
        modules = t.attachable(r.path_params["uuid"])
        return t.listing("modules", **args, records=modules, **_listing_mode(sb))

    async def attach(r: Request, t: Tenant | None, _a: Account | None) -> Any:
        assert t is not None
        body = await _json(r)
        return {"data": t.attach(r.path_params["uuid"], body.get("modules"))}

    async def detach(r: Request, t: Tenant | None, _a: Account | None) -> Any:
        assert t is not None
        t.detach(r.path_params["uuid"], (await _json(r)).get("modules"))
        return Response(status_code=204)

    async def revoke(r: Request, t: Tenant | None, _a: Account | None) -> Any:
        assert t is not None
        reason = (await _json(r)).get("revocation_reason")
        return {"data": t.show(t.revoke(r.path_params["uuid"], reason))}

    api("GET", "/courses/{uuid}/attach/modules", attachable)
    api("POST", "/courses/{uuid}/attach/modules", attach)
    api("DELETE", "/courses/{uuid}/detach/modules", detach)
    api("PUT", "/certificates/{uuid}/revoke", revoke)
    return routes


def create_app(sandbox: Sandbox | None = None) -> Starlette:
    """The ASGI app; ``app.state.sandbox`` is its :class:`Sandbox`."""
    sb = sandbox or Sandbox()
    app = Starlette(routes=_routes(sb) + admin_routes(sb))
    app.state.sandbox = sb
    return app
