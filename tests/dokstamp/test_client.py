"""The client's resource methods against the sandbox over real HTTP."""

from __future__ import annotations

import httpx
import pytest

import graph
from dokstamp_sync.demo.walkthrough import walk
from dokstamp_sync.dokstamp import (
    MemoryTokenStore,
    PasswordLogin,
    TokenManager,
    Upload,
    tenant_domain,
)
from dokstamp_sync.dokstamp.client import DokStampClient


def test_every_resource_call_sends_accept_tenant_and_bearer(client, sandbox):
    """Accept: application/json, X-Tenant and Authorization go on every resource request."""
    seen: list[httpx.Request] = []
    client.http.event_hooks["request"].append(seen.append)
    inst = graph.institution(client)
    client.institutions.get(inst["uuid"])
    client.files.upload([graph.pdf()])
    resource_calls = [r for r in seen if not r.url.path.startswith(("/auth/", "/oauth/"))]
    assert len(resource_calls) == 3
    for r in resource_calls:
        assert r.headers["Accept"] == "application/json"
        assert r.headers["X-Tenant"] == client.tenant
        assert r.headers["Authorization"].startswith("Bearer ")


def test_pagination_walks_every_page_and_stops_at_last_page(client, sandbox):
    """400 students come back over 2 full pages of 200, with no 3rd request."""
    for i in range(400):
        client.students.create({"name": f"S{i}", "email": f"p{i}@example.edu",
                                "date_of_birth": "2000-01-01"})
    sandbox.sandbox.stats.reset()
    emails = [s["email"] for s in client.students.iterate()]
    assert len(emails) == 400
    assert len(set(emails)) == 400
    assert sandbox.sandbox.stats.by_route["GET /students"] == 2


def test_default_page_is_15_with_meta(client, sandbox):
    """A page without per_page has 15 items and meta current_page/per_page/total/last_page."""
    for _ in range(20):
        graph.student(client)
    body = client.request("GET", "/students")
    assert len(body["data"]) == 15
    assert body["meta"] == {"current_page": 1, "per_page": 15, "total": 20, "last_page": 2}
    page = client.students.page(page=2)
    assert (len(page.items), page.total, page.last_page) == (5, 20, 2)


def test_iterate_stops_at_total_when_meta_has_no_last_page():
    """Against an API whose meta lacks last_page, meta.total items end the iteration."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/login":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 3600})
        calls.append(request.url.params["page"])
        page = int(request.url.params["page"])
        items = [{"uuid": f"{page}-{i}"} for i in range(2 if page < 3 else 1)]
        return httpx.Response(200, json={"data": items, "meta": {
            "current_page": page, "per_page": 2, "total": 5}})

    http = httpx.Client(base_url="https://api.example", transport=httpx.MockTransport(handler))
    c = DokStampClient(http, tenant="t", tokens=TokenManager(
        http, PasswordLogin("a@b.c", "pw"), MemoryTokenStore()))
    assert [s["uuid"] for s in c.students.iterate(per_page=2)] == [
        "1-0", "1-1", "2-0", "2-1", "3-0"]
    assert calls == ["1", "2", "3"]


def test_where_filters_including_null(client, sandbox):
    """where[used_at]=null lists unused files only; where[email] finds one student."""
    g = graph.certificate_graph(client)
    spare = client.files.upload([graph.pdf()])[0]
    client.certificates.create(graph.certificate_fields(g), issue=True)
    unused = client.files.find(used_at=None)
    assert [f["uuid"] for f in unused] == [spare["uuid"]]
    assert client.students.find_one(email=g["student"]["email"])["uuid"] == \
        g["student"]["uuid"]
    assert client.students.find_one(email="nobody@example.edu") is None
    assert client.certificates.count(course_uuid=g["course"]["uuid"]) == 1


def test_several_files_in_one_upload_and_dedup_by_content(client, sandbox):
    """One POST /files carries three files; re-uploading the same bytes returns the same record."""
    uploads = [graph.pdf(1001), graph.pdf(1002), graph.pdf(1003)]
    first = client.files.upload(uploads)
    assert [f["original_name"] for f in first] == [u.filename for u in uploads]
    assert len({f["uuid"] for f in first}) == 3
    assert sandbox.sandbox.stats.by_route["POST /files"] == 1
    again = client.files.upload([Upload("renamed.pdf", uploads[1].content)])
    assert again[0]["uuid"] == first[1]["uuid"]
    assert len(client.files.find()) == 3
    assert first[0]["used_at"] is None
    assert first[0]["size"] == len(uploads[0].content)


def test_issue_with_status_style(make_client, sandbox):
    """The older style sends status=issued + issued_at; the certificate is issued as asked."""
    c = make_client(issue_style="status")
    seen: list[httpx.Request] = []
    c.http.event_hooks["request"].append(seen.append)
    g = graph.certificate_graph(c)
    cert = c.certificates.create(graph.certificate_fields(g), issue=True,
                                 issued_at="2024-12-01T00:00:00Z")
    body = [r for r in seen if r.url.path == "/certificates"][-1].read()
    assert b'"status":"issued"' in body.replace(b" ", b"")
    assert cert["status"] == "issued"
    assert cert["issued_at"] == "2024-12-01T00:00:00Z"
    assert cert["public_verification_url"]
    assert c.files.get(g["file"]["uuid"])["used_at"] is not None


def test_issue_with_finish_style(sandbox_b, make_client):
    """The newer style sends finish: true and no status; the certificate is issued."""
    c = make_client(issue_style="finish")
    seen: list[httpx.Request] = []
    c.http.event_hooks["request"].append(seen.append)
    g = graph.certificate_graph(c)
    cert = c.certificates.create(graph.certificate_fields(g), issue=True)
    body = [r for r in seen if r.url.path == "/certificates"][-1].read().replace(b" ", b"")
    assert b'"finish":true' in body
    assert b'"status"' not in body
    assert cert["status"] == "issued"


@pytest.mark.parametrize(("style", "server"), [("status", "sandbox"), ("finish", "sandbox_b")])
def test_draft_then_issue_then_revoke(make_client, request, style, server):
    """A draft is issued by PATCH with the style's fields, then revoked with a reason (on a
    sandbox of the generation that documents the style)."""
    request.getfixturevalue(server)
    c = make_client(issue_style=style)
    g = graph.certificate_graph(c)
    draft = c.certificates.create(graph.certificate_fields(g))
    assert draft["status"] == "draft"
    assert draft["public_verification_url"] is None
    issued = c.certificates.update(draft["uuid"], c.certificates.issue_fields())
    assert issued["status"] == "issued"
    revoked = c.certificates.revoke(draft["uuid"], "Issued in error")
    assert (revoked["status"], revoked["revocation_reason"]) == ("revoked", "Issued in error")
    assert revoked["revoked_at"]


def test_attach_and_detach_modules_with_their_different_bodies(client, sandbox):
    """Attach sends objects with uuid/order; detach sends plain UUID strings."""
    inst = graph.institution(client)
    m1, m2 = graph.module(client, inst), graph.module(client, inst)
    crs = graph.course(client, inst)
    assert {m["uuid"] for m in client.courses.attachable_modules(crs["uuid"])} == \
        {m1["uuid"], m2["uuid"]}
    client.courses.attach_modules(crs["uuid"], [
        {"uuid": m1["uuid"], "order": 1, "is_required": True, "workload": 80},
        {"uuid": m2["uuid"], "order": 2}])
    assert client.courses.attachable_modules(crs["uuid"]) == []
    pivots = sandbox.sandbox.tenants[client.tenant].course_modules[crs["uuid"]]
    assert pivots[m1["uuid"]]["workload"] == 80
    client.courses.detach_modules(crs["uuid"], [m1["uuid"]])
    assert [m["uuid"] for m in client.courses.attachable_modules(crs["uuid"])] == [m1["uuid"]]


def test_update_get_and_delete(client, sandbox):
    """PATCH changes fields, GET reads them back, DELETE (204) hides the entity."""
    inst = graph.institution(client)
    crs = graph.course(client, inst)
    client.courses.update(crs["uuid"], {"status": "archived", "workload_hours": 100})
    got = client.courses.get(crs["uuid"])
    assert (got["status"], got["workload_hours"]) == ("archived", 100)
    assert got["institution"] == {"uuid": inst["uuid"], "name": inst["name"]}
    client.courses.delete(crs["uuid"])
    assert client.courses.find(code=crs["code"]) == []


def test_walkthrough_syncs_one_certificate_and_is_idempotent(client, sandbox):
    """The whole graph is created once; a second walk creates nothing new."""
    first = walk(client, say=lambda _: None)
    assert first["certificate"]["status"] == "issued"
    second = walk(client, say=lambda _: None)
    assert {k: v["uuid"] for k, v in first.items()} == {k: v["uuid"] for k, v in second.items()}
    state = sandbox.sandbox.tenants[client.tenant].dump()
    for kind in ("institutions", "modules", "courses", "cohorts", "students", "enrollments",
                 "files", "certificates"):
        assert len(state[kind]) == 1, kind
    assert state["course_modules"] == {first["course"]["uuid"]: {
        first["module"]["uuid"]: {"order": 1, "is_required": True, "workload": 60,
                                  "course_module_group_uuid": None}}}
    cert = state["certificates"][0]
    assert cert["student"]["uuid"] == first["student"]["uuid"]
    assert cert["enrollment"]["uuid"] == first["enrollment"]["uuid"]


def test_iterate_stops_when_the_api_ignores_page():
    """An API that ignores `page` (same items every time) cannot make iteration loop or
    repeat items: the repeated page ends it, and the listing says it is incomplete."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/login":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 3600})
        calls.append(request.url.params["page"])
        items = [{"uuid": str(i)} for i in range(15)]
        return httpx.Response(200, json={"data": items, "meta": {
            "current_page": 1, "per_page": 15, "total": 42}})

    http = httpx.Client(base_url="https://api.example", transport=httpx.MockTransport(handler))
    c = DokStampClient(http, tenant="t", tokens=TokenManager(
        http, PasswordLogin("a@b.c", "pw"), MemoryTokenStore()))
    listing = c.students.listing(per_page=15)
    assert len(list(listing)) == 15
    assert calls == ["1", "2"]
    assert listing.complete is False


def test_multipart_upload_is_replayed_after_a_401(client, sandbox):
    """An upload refused for an expired token is renewed and re-sent whole."""
    client.institutions.page()
    sandbox.sandbox.authority.expire_all()
    up = graph.pdf()
    f = client.files.upload([up])[0]
    assert f["size"] == len(up.content)
    assert sandbox.sandbox.stats.by_route["POST /files"] == 2


def test_me_returns_the_user_with_its_tenant_and_its_domain(client, sandbox):
    """/auth/me gives the user with its tenant; tenant_domain reads the X-Tenant value."""
    me = client.me()
    assert {"name", "email", "tenant"} <= set(me)
    assert set(me["tenant"]) >= {"name", "domain"}
    assert tenant_domain(me) == client.tenant


@pytest.mark.parametrize(("me", "domain"), [
    ({"id": 1, "name": "João Silva", "tenant": {"id": 42, "name": "UFE",
                                                "domain": "universidade-federal-example"}},
     "universidade-federal-example"),
    ({"uuid": "u", "tenant": {"uuid": "t", "name": "UFE"}}, None),
    ({"uuid": "u", "tenant": {"domain": ""}}, None), ({"uuid": "u", "tenant": "x"}, None),
    ({"uuid": "u"}, None)])
def test_tenant_domain_of_either_docs_generation(me, domain):
    """The older (id) and newer (uuid) /auth/me shapes give tenant.domain; no domain: None."""
    assert tenant_domain(me) == domain
