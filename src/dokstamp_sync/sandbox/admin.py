"""The sandbox's admin API under ``/_sandbox/`` (no auth: the sandbox binds to loopback).

==============================  ============================================================
``GET|DELETE /_sandbox/stats``  request counters (DELETE resets them), see :class:`.Stats`
``GET|PUT /_sandbox/faults``    the :class:`.Faults` (PUT replaces them all; 422 if invalid)
``GET|PUT /_sandbox/config``    ``generation``, ``strict``, ``error_style``, ``token_ttl``
                                (PUT changes the fields given; 422 if invalid)
``GET|POST|DELETE               an outage: POST ``{"seconds": N | null, "retry_after": S |
/_sandbox/outage``              null}`` makes every API request, auth included, answer 503
                                (with ``Retry-After: S`` when given) for N seconds, or until
                                DELETE; all three answer ``{active, remaining_s, retry_after,
                                requests}`` (``requests``: answered by the last outage)
``GET /_sandbox/state``         every entity of every tenant, deleted ones included
``POST /_sandbox/reset``        forget data, tokens, faults, stats; end an outage
``GET /_sandbox/tokens``        ``{"issued": n}``: tokens handed out
``POST /_sandbox/tokens/        expire every access token now
expire``
==============================  ============================================================
"""

from __future__ import annotations

import json
from typing import Any, Literal, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dokstamp_sync.sandbox.accounts import Authority
from dokstamp_sync.sandbox.faults import FaultInjector, Faults, Stats
from dokstamp_sync.sandbox.generations import Generation, docs_for
from dokstamp_sync.sandbox.store import Tenant


class SwitchableConfig(Protocol):
    """The sandbox's settings the admin API may change at runtime."""

    generation: Generation
    strict: bool
    error_style: Literal["v-a", "v-b"] | None
    token_ttl: float


class Sandbox(Protocol):
    """What the admin API needs of a sandbox (:class:`.app.Sandbox` is one): described here, so
    this module never imports the app that mounts its routes (no circle, not even type-only)."""

    @property
    def config(self) -> SwitchableConfig: ...
    @property
    def faults(self) -> FaultInjector: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def tenants(self) -> dict[str, Tenant]: ...
    @property
    def authority(self) -> Authority: ...

    def reset(self) -> None: ...


def configure(sb: Sandbox, changes: dict[str, Any]) -> None:
    """Apply ``changes`` to ``sb.config`` (only the runtime-switchable fields); a ValueError
    names the first bad one and leaves the config unchanged."""
    unknown = set(changes) - {"generation", "strict", "error_style", "token_ttl"}
    if unknown:
        raise ValueError(f"unknown config field: {sorted(unknown)[0]}")
    if "generation" in changes:
        docs_for(changes["generation"])
    if not isinstance(changes.get("strict", False), bool):
        raise ValueError("strict must be true or false")
    if changes.get("error_style") not in (None, "v-a", "v-b"):
        raise ValueError("error_style must be null, 'v-a' or 'v-b'")
    ttl = changes.get("token_ttl", 1.0)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
        raise ValueError("token_ttl must be a positive number of seconds")
    for name, value in changes.items():
        setattr(sb.config, name, value)
    sb.authority.token_ttl = sb.config.token_ttl


def config_json(sb: Sandbox) -> dict[str, Any]:
    c = sb.config
    return {"generation": c.generation, "strict": c.strict, "error_style": c.error_style,
            "token_ttl": c.token_ttl}


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    body = json.loads(raw) if raw else {}
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def admin_routes(sb: Sandbox) -> list[Route]:
    """The admin routes of ``sb`` (see the module docstring)."""

    async def stats(request: Request) -> Response:
        if request.method == "DELETE":
            sb.stats.reset()
        return JSONResponse(sb.stats.to_json())

    async def faults(request: Request) -> Response:
        if request.method == "PUT":
            try:
                sb.faults.configure(Faults.from_json(await _body(request)))
            except (TypeError, ValueError) as exc:
                return JSONResponse({"message": str(exc)}, status_code=422)
        return JSONResponse(sb.faults.faults.to_json())

    async def config(request: Request) -> Response:
        if request.method == "PUT":
            try:
                configure(sb, await _body(request))
            except ValueError as exc:
                return JSONResponse({"message": str(exc)}, status_code=422)
        return JSONResponse(config_json(sb))

    async def outage(request: Request) -> Response:
        if request.method == "POST":
            try:
                body = await _body(request)
                seconds, retry_after = body.get("seconds"), body.get("retry_after")
                if seconds is not None and (not isinstance(seconds, int | float)
                                            or seconds <= 0):
                    raise ValueError("seconds must be a positive number or null")
                if retry_after is not None and not isinstance(retry_after, int):
                    raise ValueError("retry_after must be an integer or null")
            except ValueError as exc:
                return JSONResponse({"message": str(exc)}, status_code=422)
            sb.faults.start_outage(seconds, retry_after)
        elif request.method == "DELETE":
            sb.faults.end_outage()
        current = sb.faults.outage
        return JSONResponse(current.to_json() if current else {
            "active": False, "remaining_s": 0.0, "retry_after": None, "requests": 0})

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
            Route("/_sandbox/config", config, methods=["GET", "PUT"]),
            Route("/_sandbox/outage", outage, methods=["GET", "POST", "DELETE"]),
            Route("/_sandbox/state", state, methods=["GET"]),
            Route("/_sandbox/reset", reset, methods=["POST"]),
            Route("/_sandbox/tokens", tokens, methods=["GET"]),
            Route("/_sandbox/tokens/expire", expire, methods=["POST"])]
