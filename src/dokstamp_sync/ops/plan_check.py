"""``plan --check-dokstamp``: the read-only searches that sharpen a plan.

A create whose natural key DokStamp already holds is an adoption; an entity a mapping points
at that DokStamp no longer has would be recreated by an upsert, and needs no delete or revoke.
Only GETs are sent, through the fleet's rate limiter and shared token; the client refuses any
write before it leaves (:func:`refuse_writes`, the client's fence). The one request that is no
GET is the login (let through), and only when no worker has left a valid token in Redis.
"""

from __future__ import annotations

from dokstamp_sync.dokstamp.client import DokStampClient, Resource
from dokstamp_sync.dokstamp.errors import DokStampError, NotFound
from dokstamp_sync.ops.plan import CALLS, NEW, Plan, Step
from dokstamp_sync.sync.entities import SPECS, matches

UPSERTS = ("update", "unchanged", "attach", "issue")


class WriteRefused(RuntimeError):
    """The plan tried to write to DokStamp: a bug, never sent."""


LOGIN = ("/auth/login", "/auth/refresh", "/oauth/token")  # a token is read, nothing written


def refuse_writes(method: str, path: str) -> None:
    """The client's fence: any request but a GET or a login is a bug of the plan."""
    if path.rstrip("/").endswith(LOGIN):
        return
    raise WriteRefused(f"plan never writes to DokStamp (refused {method} {path})")


def check(plan: Plan, client: DokStampClient) -> None:
    """Refine each step of ``plan`` with what DokStamp holds (GET only)."""
    for step in plan.steps:
        if step.entity not in SPECS or step.actions in (["invalid"], ["superseded"]):
            continue
        resource: Resource = getattr(client, SPECS[step.entity].resource)
        try:
            if step.actions[0] == "create" and step.entity != "file" and step.body:
                _found(step, resource)
            elif step.uuid is not None and step.uuid != NEW and \
                    step.actions[0] in (*UPSERTS, "delete", "archive", "revoke"):
                _gone(step, resource)
        except DokStampError as exc:
            step.detail = _join(step.detail, f"DokStamp could not be asked: {exc}")


def _found(step: Step, resource: Resource) -> None:
    spec = SPECS[str(step.entity)]
    body = step.body or {}
    if any(body.get(f) in (None, NEW) for f in spec.search_filters):
        return  # it refers to an entity an earlier line creates: nothing to find yet
    for remote in resource.listing({f: body.get(f) for f in spec.search_filters}):
        if matches(spec, body, remote):
            step.actions[0] = "adopt"
            step.detail = _join(step.detail, f"exists in DokStamp as {remote.get('uuid')}")
            step.calls -= CALLS["create"] - CALLS["adopt"]
            return


def _gone(step: Step, resource: Resource) -> None:
    try:
        resource.get(str(step.uuid))
    except NotFound:
        if step.actions[0] in UPSERTS:
            step.actions = ["create"]
            step.detail = _join(step.detail, f"{step.uuid} is gone from DokStamp: recreated")
            step.calls = CALLS["create"]
        else:
            step.actions = ["unchanged"]
            step.detail = f"{step.uuid} is gone from DokStamp already"
            step.calls = 0


def _join(first: str, second: str) -> str:
    return f"{first}; {second}" if first else second
