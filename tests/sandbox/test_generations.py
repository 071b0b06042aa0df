"""The sandbox follows one generation of the docs: its login, its way to issue, its errors."""

from __future__ import annotations

import pytest

import graph
from testenv import MAIN, OTHER

_CLIENT_FORM = {"grant_type": "client_credentials", "client_id": MAIN.client_id,
                "client_secret": MAIN.client_secret}
_PASSWORD = {"email": MAIN.email, "password": MAIN.password}


def _headers(raw, account=MAIN) -> dict[str, str]:
    """Log in the way the running generation has, and give the API headers."""
    r = raw.post("/auth/login", json={"email": account.email, "password": account.password})
    if r.status_code == 404:  # generation b
        r = raw.post("/oauth/token", data={"grant_type": "client_credentials",
                                           "client_id": account.client_id,
                                           "client_secret": account.client_secret})
    assert r.status_code == 200
    return {"Authorization": f"Bearer {r.json()['access_token']}", "X-Tenant": account.tenant,
            "Accept": "application/json"}


def _cert_fields(raw, headers) -> dict[str, str]:
    """Institution, course, student and a fresh file: the fields a certificate needs."""
    def post(path: str, body: dict) -> dict:
        r = raw.post(path, json=body, headers=headers)
        assert r.status_code == 201, r.text
        return r.json()["data"]

    i = graph.n()
    inst = post("/institutions", {"name": f"U{i}", "country": "Brazil"})
    crs = post("/courses", {"name": "C", "code": f"C{i}", "institution_uuid": inst["uuid"]})
    stu = post("/students", {"name": "S", "email": f"g{i}@example.edu",
                             "date_of_birth": "2000-01-01"})
    pdf = graph.pdf()
    up = raw.post("/files", files=[("files[]", (pdf.filename, pdf.content, "application/pdf"))],
                  headers=headers)
    return {"institution_uuid": inst["uuid"], "course_uuid": crs["uuid"],
            "student_uuid": stu["uuid"], "file_uuid": up.json()["data"][0]["uuid"]}


def test_generation_a_has_no_oauth_route(sandbox, raw):
    """Generation a (the default) knows only password login: /oauth/token is a 404, as on a
    server without that route, and no token is handed out."""
    r = raw.post("/oauth/token", data=_CLIENT_FORM)
    assert r.status_code == 404
    assert r.json() == {"message": "The route oauth/token could not be found."}
    assert sandbox.sandbox.authority.issued == 0
    assert raw.post("/auth/login", json=_PASSWORD).status_code == 200


def test_generation_b_has_no_password_login(sandbox_b, raw):
    """Generation b knows only client credentials: /auth/login and /auth/refresh are 404s in
    its error style, and /oauth/token works."""
    for path, body in (("/auth/login", _PASSWORD), ("/auth/refresh", {"refresh_token": "x"})):
        r = raw.post(path, json=body)
        assert r.status_code == 404
        assert r.json() == {"success": False, "message": "Resource not found."}
    assert sandbox_b.sandbox.authority.issued == 0
    assert raw.post("/oauth/token", data=_CLIENT_FORM).status_code == 200


def test_generation_a_issues_by_status_and_ignores_finish(sandbox, raw):
    """In generation a, "finish": true leaves a draft (on create and on PATCH); "status":
    "issued" issues with the given issued_at."""
    headers = _headers(raw)
    r = raw.post("/certificates", json=_cert_fields(raw, headers) | {"finish": True},
                 headers=headers)
    draft = r.json()["data"]
    assert (r.status_code, draft["status"], draft["public_verification_url"]) == (
        201, "draft", None)
    patched = raw.patch(f"/certificates/{draft['uuid']}", json={"finish": True},
                        headers=headers).json()["data"]
    assert patched["status"] == "draft"
    issued = raw.post("/certificates", json=_cert_fields(raw, headers) | {
        "status": "issued", "issued_at": "2024-12-01T00:00:00Z"}, headers=headers).json()["data"]
    assert (issued["status"], issued["issued_at"]) == ("issued", "2024-12-01T00:00:00Z")
    assert issued["public_verification_url"]


def test_generation_b_issues_by_finish_and_ignores_status(sandbox_b, raw):
    """In generation b, "status": "issued" (with issued_at) leaves a draft with no issued_at;
    "finish": true issues, the server stamping issued_at; a draft is issued by PATCH finish."""
    headers = _headers(raw)
    draft = raw.post("/certificates", json=_cert_fields(raw, headers) | {
        "status": "issued", "issued_at": "2024-12-01T00:00:00Z"}, headers=headers).json()["data"]
    assert (draft["status"], draft["issued_at"]) == ("draft", None)
    assert raw.patch(f"/certificates/{draft['uuid']}", json={"status": "issued"},
                     headers=headers).json()["data"]["status"] == "draft"
    patched = raw.patch(f"/certificates/{draft['uuid']}", json={"finish": True},
                        headers=headers).json()["data"]
    assert patched["status"] == "issued"
    issued = raw.post("/certificates", json=_cert_fields(raw, headers) | {
        "finish": True, "issued_at": "2024-12-01T00:00:00Z"}, headers=headers).json()["data"]
    assert issued["status"] == "issued"
    assert issued["issued_at"] != "2024-12-01T00:00:00Z"
    assert issued["public_verification_url"]


def test_generation_b_error_bodies(sandbox_b, raw):
    """Generation b adds "success": false to every error body and answers 404 with the newer
    docs' "Resource not found."; generation a's bodies have no "success" key."""
    headers = _headers(raw)
    invalid = raw.post("/students", json={}, headers=headers).json()
    assert invalid["success"] is False
    assert invalid["message"] == "The given data was invalid."
    missing = raw.get(f"/students/{'0' * 8}-0000-4000-8000-{'0' * 12}", headers=headers)
    assert (missing.status_code, missing.json()) == (
        404, {"success": False, "message": "Resource not found."})
    assert raw.get("/students").json() == {"success": False, "message": "Unauthenticated."}
    sandbox_b.sandbox.config.generation = "a"
    assert "success" not in raw.get("/students").json()


def test_error_style_still_forces_success_false(sandbox, raw):
    """error_style "v-b" adds success:false in generation a too (the older switch still
    works); None follows the generation."""
    sandbox.sandbox.config.error_style = "v-b"
    assert raw.get("/students").json() == {"success": False, "message": "Unauthenticated."}


@pytest.mark.parametrize(("generation", "key"), [("a", "id"), ("b", "uuid")])
def test_auth_me_shows_the_tenant_domain(sandbox, raw, generation, key):
    """GET /auth/me names the tenant's domain, so a worker can check whom it talks to; the
    identifiers are integer ids (generation a) or uuids (b), as each generation shows."""
    sandbox.sandbox.config.generation = generation
    for account in (MAIN, OTHER):
        me = raw.get("/auth/me", headers=_headers(raw, account)).json()["data"]
        assert me["tenant"]["domain"] == account.tenant
        assert (me["email"], me["tenant"]["name"]) == (account.email, account.tenant_name)
        assert set(me) == {key, "name", "email", "tenant"}
        assert set(me["tenant"]) == {key, "name", "domain"}
        expected = int if generation == "a" else str
        assert isinstance(me[key], expected)
        assert isinstance(me["tenant"][key], expected)


def test_admin_config_switches_generation_and_strictness(sandbox, raw):
    """PUT /_sandbox/config changes generation, strict, error_style and token_ttl at run time
    (and only valid values)."""
    r = raw.put("/_sandbox/config", json={"generation": "b", "strict": True, "token_ttl": 60})
    assert r.json() == {"generation": "b", "strict": True, "error_style": None,
                        "token_ttl": 60}
    token = raw.post("/oauth/token", data=_CLIENT_FORM).json()
    assert token["expires_in"] == 60
    for bad in ({"generation": "c"}, {"strict": "yes"}, {"error_style": "v-c"},
                {"token_ttl": 0}, {"accounts": []}):
        assert raw.put("/_sandbox/config", json=bad).status_code == 422
    assert raw.get("/_sandbox/config").json()["generation"] == "b"
