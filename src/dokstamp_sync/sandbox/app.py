"""The sandbox's HTTP face: a Starlette (ASGI) app with DokStamp's routes and an admin API.

Every API route goes through :meth:`Sandbox.handle`, which applies the injected faults, checks
the Bearer token and ``X-Tenant``, runs the operation on :mod:`.store` and counts the request.
Admin routes live under ``/_sandbox/`` (no auth: the sandbox binds to loopback).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dokstamp_sync.sandbox.accounts import Account, Authority
from dokstamp_sync.sandbox.faults import Decision, FaultInjector, Faults, Stats
from dokstamp_sync.sandbox.store import DEFAULT_PER_PAGE, ApiError, Tenant

Handler = Callable[[Request, Tenant | None, Account | None], Awaitable[Any]]
COLLECTIONS = ("institutions", "modules", "courses", "cohorts", "students", "enrollments",
               "certificates")


@dataclass
class SandboxConfig:
    """How a sandbox behaves; every field has a command-line flag (``sandbox --help``)."""

    accounts: list[Account] = field(default_factory=lambda: [Account()])
    token_ttl: float = 3600.0
    error_style: str = "v-a"  # "v-b" adds "success": false to error bodies (newer docs)
    max_file_bytes: int = 10 * 1024 * 1024
    faults: Faults = field(default_factory=Faults)


class Sandbox:
    """All sandbox state: accounts, tenants' data, faults and stats."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.faults = FaultInjector(self.config.faults)
        self.stats = Stats()
        self.reset()

    def reset(self) -> None:
        """Forget all data and tokens (faults and stats are reset separately)."""
        self.authority = Authority(self.config.accounts, token_ttl=self.config.token_ttl)
        self.tenants = {a.tenant: Tenant(a.tenant, a.tenant_name) for a in self.config.accounts}

    def error(self, status: int, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> JSONResponse:
        if self.config.error_style == "v-b":
            body = {"success": False} | body
        return JSONResponse(body, status_code=status, headers=headers)

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
        # Read the whole request first, as a real server has it before processing: a slow
        # answer must still apply the write after the client gave up waiting.
        await request.body()
        decision = self.faults.decide(method, route, request.headers.get("x-tenant", "-"))
        key = f"{method} {route}"
        latency = self.faults.faults.latency_ms / 1000.0
        if latency:
            await asyncio.sleep(latency)
        if decision.status is not None and not decision.after_commit:
            self.stats.record(key, decision.status, injected=True)
            return self._fault(decision)
        if decision.delay_s:
            await asyncio.sleep(decision.delay_s)
        try:
            account = token = None
            if auth:
                token, account = self.authority.check(request.headers.get("authorization"))
            space = self._tenant(request, account) if tenant and account else None
            request.state.token = token
            result = await handler(request, space, account)
            response = result if isinstance(result, Response) else JSONResponse(result)
        except ApiError as exc:
            response = self.error(exc.status, exc.body)
        if decision.status is not None:  # the request was applied; its answer is lost
            lost = method != "GET" and response.status_code < 400
            self.stats.record(key, decision.status, injected=True, lost=lost)
            return self._fault(decision)
        self.stats.record(key, response.status_code)
        return response

    def _fault(self, decision: Decision) -> JSONResponse:
        assert decision.status is not None
        if decision.status == 429:
            return self.error(429, {"message": "Too Many Attempts."},
                              {"Retry-After": str(decision.retry_after or 1)})
        return self.error(decision.status, {"message": "Server Error"})


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
        body = await _json(r)
        return sb.authority.login(body.get("email"), body.get("password"))

    async def refresh(r: Request, _t: Tenant | None, _a: Account | None) -> Any:
        return sb.authority.refresh_token((await _json(r)).get("refresh_token"))

    async def oauth(r: Request, _t: Tenant | None, _a: Account | None) -> Any:
        form = await r.form()
        return sb.authority.client_credentials(form.get("grant_type"), form.get("client_id"),
                                               form.get("client_secret"))

    async def logout(r: Request, _t: Tenant | None, _a: Account | None) -> Any:
        sb.authority.logout(r.state.token)
        return {"message": "Successfully logged out"}

    async def me(r: Request, _t: Tenant | None, a: Account | None) -> Any:
        assert a is not None
        space = sb.tenants[a.tenant]
        return {"data": {"uuid": a.email, "name": a.name, "email": a.email,
                         "tenant": {"uuid": space.uuid, "name": space.name,
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
            return t.listing(c, **_listing_args(r))

        async def create(r: Request, t: Tenant | None, _a: Account | None) -> Any:
            assert t is not None
            body = await _json(r)
            record = t.create_certificate(body, base_url=_base(r)) if c == "certificates" \
                else t.create(c, body)
            return JSONResponse({"data": t.show(record)}, status_code=201)

        async def show(r: Request, t: Tenant | None, _a: Account | None) -> Any:
            assert t is not None
            return {"data": t.show(t.find(c, r.path_params["uuid"]))}

        async def update(r: Request, t: Tenant | None, _a: Account | None) -> Any:
            assert t is not None
            uuid, body = r.path_params["uuid"], await _json(r)
            record = t.update_certificate(uuid, body, base_url=_base(r)) \
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
        form = await r.form(max_files=10_000)
        items = []
        for part in form.getlist("files[]"):
            if not isinstance(part, UploadFile):
                raise ApiError(422, "The given data was invalid.",
                               {"files": ["The files must be files."]})
            items.append((part.filename or "upload", part.content_type or
                          "application/octet-stream", await part.read()))
        records = t.upload(items, base_url=_base(r), max_bytes=sb.config.max_file_bytes)
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
        return t.listing("modules", **args, records=modules)

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
    return routes + _admin_routes(sb)


def _admin_routes(sb: Sandbox) -> list[Route]:
    async def stats(request: Request) -> Response:
        if request.method == "DELETE":
            sb.stats.reset()
        return JSONResponse(sb.stats.to_json())

    async def faults(request: Request) -> Response:
        if request.method == "PUT":
            try:
                sb.faults.configure(Faults.from_json(await request.json()))
            except (TypeError, ValueError) as exc:
                return JSONResponse({"message": str(exc)}, status_code=422)
        return JSONResponse(sb.faults.faults.to_json())

    async def state(request: Request) -> Response:
        return JSONResponse({d: t.dump() for d, t in sb.tenants.items()})

    async def reset(request: Request) -> Response:
        sb.reset()
        sb.stats.reset()
        sb.faults.configure(Faults())
        return Response(status_code=204)

    async def expire(request: Request) -> Response:
        return JSONResponse({"expired": sb.authority.expire_all()})

    async def tokens(request: Request) -> Response:
        return JSONResponse({"issued": sb.authority.issued})

    return [Route("/_sandbox/stats", stats, methods=["GET", "DELETE"]),
            Route("/_sandbox/faults", faults, methods=["GET", "PUT"]),
            Route("/_sandbox/state", state, methods=["GET"]),
            Route("/_sandbox/reset", reset, methods=["POST"]),
            Route("/_sandbox/tokens", tokens, methods=["GET"]),
            Route("/_sandbox/tokens/expire", expire, methods=["POST"])]


def create_app(sandbox: Sandbox | None = None) -> Starlette:
    """The ASGI app; ``app.state.sandbox`` is its :class:`Sandbox`."""
    sb = sandbox or Sandbox()
    app = Starlette(routes=_routes(sb))
    app.state.sandbox = sb
    return app
