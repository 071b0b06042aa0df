"""The sandbox enforces DokStamp's documented rules, seen through plain HTTP."""

from __future__ import annotations

import time

import pytest

import graph
from dokstamp_sync.dokstamp import errors
from dokstamp_sync.sandbox import Faults, ScriptedFault
from testenv import MAIN, OTHER


def _login(raw, account=MAIN) -> dict[str, str]:
    r = raw.post("/auth/login", json={"email": account.email, "password": account.password})
    assert r.status_code == 200
    return {"Authorization": f"Bearer {r.json()['access_token']}", "X-Tenant": account.tenant,
            "Accept": "application/json"}


def test_login_answers_the_documented_shape(raw):
    """POST /auth/login returns access and refresh tokens, Bearer, expires_in seconds."""
    body = raw.post("/auth/login", json={"email": MAIN.email,
                                         "password": MAIN.password}).json()
    assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600


def test_login_errors(raw):
    """Missing fields are a 422 with field errors; wrong ones a 401 with the docs' message."""
    r = raw.post("/auth/login", json={})
    assert r.status_code == 422
    assert set(r.json()["errors"]) == {"email", "password"}
    r = raw.post("/auth/login", json={"email": MAIN.email, "password": "nope"})
    assert (r.status_code, r.json()["message"]) == (
        401, "These credentials do not match our records.")


def test_oauth_token_is_form_encoded_without_refresh(sandbox_b, raw):
    """POST /oauth/token (generation b) takes client credentials as a form and gives no
    refresh token."""
    r = raw.post("/oauth/token", data={"grant_type": "client_credentials",
                                       "client_id": MAIN.client_id,
                                       "client_secret": MAIN.client_secret})
    assert r.status_code == 200
    assert "refresh_token" not in r.json()
    bad = raw.post("/oauth/token", data={"grant_type": "client_credentials",
                                         "client_id": MAIN.client_id, "client_secret": "x"})
    assert (bad.status_code, bad.json()["error"]) == (401, "invalid_client")
    grant = raw.post("/oauth/token", data={"grant_type": "password"})
    assert grant.status_code == 400


def test_tokens_expire_after_their_ttl(raw, sandbox):
    """An access token stops working once its TTL has passed."""
    sandbox.sandbox.authority.token_ttl = 1
    headers = _login(raw)
    assert raw.get("/institutions", headers=headers).status_code == 200
    time.sleep(1.1)
    r = raw.get("/institutions", headers=headers)
    assert (r.status_code, r.json()["message"]) == (401, "Unauthenticated.")


def test_logout_revokes_the_token(raw):
    """After POST /auth/logout the same token is refused."""
    headers = _login(raw)
    assert raw.post("/auth/logout", headers=headers).status_code == 200
    assert raw.get("/institutions", headers=headers).status_code == 401


def test_x_tenant_is_required_and_checked(raw):
    """No X-Tenant: 401; unknown tenant: 404; another tenant's domain: 403."""
    headers = _login(raw)
    no_tenant = {k: v for k, v in headers.items() if k != "X-Tenant"}
    assert raw.get("/institutions", headers=no_tenant).status_code == 401
    assert raw.get("/institutions", headers=headers | {"X-Tenant": "nope"}).status_code == 404
    assert raw.get("/institutions",
                   headers=headers | {"X-Tenant": OTHER.tenant}).status_code == 403


def test_tenants_are_isolated(make_client):
    """Another tenant's entity is invisible in lists, 404 on GET, 422 as a reference."""
    mine, theirs = make_client(), make_client(account=OTHER)
    inst = graph.institution(mine)
    assert theirs.institutions.find() == []
    with pytest.raises(errors.NotFound):
        theirs.institutions.get(inst["uuid"])
    with pytest.raises(errors.ValidationFailed) as info:
        theirs.courses.create({"name": "X", "institution_uuid": inst["uuid"]})
    assert info.value.errors == {"institution_uuid": [
        "The selected institution uuid is invalid."]}


def test_create_answers_201_in_a_data_envelope_and_delete_204(raw):
    """Creates are 201 {data: {...}}; deletes are 204 with no body."""
    headers = _login(raw)
    r = raw.post("/institutions", json={"name": "U", "country": "Brazil"}, headers=headers)
    assert r.status_code == 201
    inst = r.json()["data"]
    assert inst["status"] == "active"  # documented default
    d = raw.delete(f"/institutions/{inst['uuid']}", headers=headers)
    assert (d.status_code, d.content) == (204, b"")


def test_course_status_defaults_to_draft(client):
    """A course created without status is a draft, as documented."""
    crs = client.courses.create({"name": "C", "institution_uuid": graph.institution(client)[
        "uuid"]})
    assert crs["status"] == "draft"


def test_field_validation_messages(client):
    """Types, enums and lengths are checked with Laravel's wording."""
    inst = graph.institution(client)
    with pytest.raises(errors.ValidationFailed) as info:
        client.modules.create({"name": "x" * 151, "institution_uuid": inst["uuid"],
                               "code": "C1", "workload": "lots", "modality": "remote"})
    assert info.value.errors == {
        "name": ["The name may not be greater than 150 characters."],
        "workload": ["The workload must be an integer."],
        "modality": ["The selected modality is invalid."]}
    with pytest.raises(errors.ValidationFailed) as info:
        client.students.create({"name": "S", "email": "not-an-email",
                                "date_of_birth": "20-05-1998"})
    assert set(info.value.errors) == {"email", "date_of_birth"}


def test_module_code_is_unique_per_institution(client):
    """Two modules may share a code in different institutions, not in the same one."""
    a, b = graph.institution(client), graph.institution(client)
    graph.module(client, a, code="CS101")
    graph.module(client, b, code="CS101")
    with pytest.raises(errors.ValidationFailed) as info:
        graph.module(client, a, code="CS101")
    assert info.value.errors == {"code": ["The code has already been taken."]}


def test_cohort_code_and_student_email_are_unique(client):
    """Cohort codes and student emails are unique in a tenant."""
    crs = graph.course(client, graph.institution(client))
    client.cohorts.create({"course_uuid": crs["uuid"], "code": "K-1"})
    with pytest.raises(errors.ValidationFailed):
        client.cohorts.create({"course_uuid": crs["uuid"], "code": "K-1"})
    graph.student(client, email="dup@example.edu")
    with pytest.raises(errors.ValidationFailed) as info:
        graph.student(client, email="dup@example.edu")
    assert "email" in info.value.errors


def test_an_email_is_free_again_after_a_change_or_a_delete(client):
    """Uniqueness follows updates and soft deletes: an email given up can be taken again, one
    in use cannot (the sandbox keeps an index, not a scan)."""
    first = graph.student(client, email="a@example.edu")
    client.students.update(first["uuid"], {"email": "b@example.edu"})
    second = graph.student(client, email="a@example.edu")  # given up by the first
    with pytest.raises(errors.ValidationFailed):
        graph.student(client, email="b@example.edu")  # the first holds it now
    with pytest.raises(errors.ValidationFailed):
        client.students.update(second["uuid"], {"email": "b@example.edu"})
    client.students.update(first["uuid"], {"email": "b@example.edu"})  # its own: fine
    client.students.delete(first["uuid"])
    assert graph.student(client, email="b@example.edu")["uuid"] != first["uuid"]


def test_the_same_content_uploaded_again_is_the_same_file(client):
    """DokStamp deduplicates files by content: a second upload returns the first record."""
    pdf = graph.pdf()
    first = client.files.upload([pdf])[0]
    again, other = client.files.upload([pdf, graph.pdf()])
    assert again["uuid"] == first["uuid"]
    assert other["uuid"] != first["uuid"]


def test_a_file_is_used_by_one_certificate_only(client):
    """A second certificate on a used file is a 422 on file_uuid."""
    g = graph.certificate_graph(client)
    client.certificates.create(graph.certificate_fields(g), issue=True)
    other = graph.student(client)
    with pytest.raises(errors.ValidationFailed) as info:
        client.certificates.create(graph.certificate_fields(g) | {
            "student_uuid": other["uuid"]}, issue=True)
    assert list(info.value.errors) == ["file_uuid"]


def test_soft_deleted_entities_are_hidden_and_unreferenceable(client, sandbox):
    """A deleted course leaves lists, answers 404, is an invalid reference, keeps its data."""
    inst = graph.institution(client)
    crs = graph.course(client, inst)
    client.courses.delete(crs["uuid"])
    assert client.courses.find(code=crs["code"]) == []
    with pytest.raises(errors.NotFound):
        client.courses.get(crs["uuid"])
    with pytest.raises(errors.ValidationFailed) as info:
        client.cohorts.create({"course_uuid": crs["uuid"], "code": "K"})
    assert info.value.errors == {"course_uuid": ["The selected course uuid is invalid."]}
    dumped = sandbox.sandbox.tenants[client.tenant].dump()["courses"]
    assert dumped[0]["deleted_at"] is not None
    assert dumped[0]["code"] == crs["code"]


@pytest.mark.parametrize("blocker", ["cohort", "enrollment", "certificate"])
def test_course_delete_is_blocked_by_dependents(client, blocker):
    """A course with a cohort, enrollment or certificate cannot be deleted (4xx with a reason);
    archiving it instead works."""
    g = graph.certificate_graph(client)
    crs = g["course"]
    if blocker == "cohort":
        client.cohorts.create({"course_uuid": crs["uuid"], "code": f"K-{graph.n()}"})
    elif blocker == "enrollment":
        client.enrollments.create({"student_uuid": g["student"]["uuid"],
                                   "course_uuid": crs["uuid"], "enrolled_at": "2024-01-01"})
    else:
        client.certificates.create(graph.certificate_fields(g), issue=True)
    with pytest.raises(errors.PermanentError) as info:
        client.courses.delete(crs["uuid"])
    assert 400 <= info.value.status < 500
    assert "cannot be deleted" in info.value.message
    assert client.courses.update(crs["uuid"], {"status": "archived"})["status"] == "archived"


def test_deletion_rules_for_institution_module_student(client):
    """Institution blocked by its courses; module while attached; student by enrollments."""
    inst = graph.institution(client)
    mod = graph.module(client, inst)
    crs = graph.course(client, inst)
    client.courses.attach_modules(crs["uuid"], [{"uuid": mod["uuid"]}])
    with pytest.raises(errors.PermanentError):
        client.institutions.delete(inst["uuid"])
    assert client.institutions.update(inst["uuid"], {"status": "inactive"})["status"] == \
        "inactive"
    with pytest.raises(errors.PermanentError):
        client.modules.delete(mod["uuid"])
    client.courses.detach_modules(crs["uuid"], [mod["uuid"]])
    client.modules.delete(mod["uuid"])
    stu = graph.student(client)
    enr = client.enrollments.create({"student_uuid": stu["uuid"], "course_uuid": crs["uuid"],
                                     "enrolled_at": "2024-01-01"})
    with pytest.raises(errors.PermanentError):
        client.students.delete(stu["uuid"])
    client.enrollments.delete(enr["uuid"])
    client.students.delete(stu["uuid"])


def test_attach_rules(client):
    """Attaching twice, or a module of another institution, is a 422; detach wants strings."""
    inst, other = graph.institution(client), graph.institution(client)
    mod, foreign = graph.module(client, inst), graph.module(client, other)
    crs = graph.course(client, inst)
    client.courses.attach_modules(crs["uuid"], [{"uuid": mod["uuid"]}])
    with pytest.raises(errors.ValidationFailed) as info:
        client.courses.attach_modules(crs["uuid"], [{"uuid": mod["uuid"]}])
    assert "already attached" in info.value.errors["modules.0.uuid"][0]
    with pytest.raises(errors.ValidationFailed):
        client.courses.attach_modules(crs["uuid"], [{"uuid": foreign["uuid"]}])
    with pytest.raises(errors.ValidationFailed) as info:
        client.request("DELETE", f"/courses/{crs['uuid']}/detach/modules",
                       json={"modules": [{"uuid": mod["uuid"]}]})
    assert info.value.errors == {"modules.0": ["The modules.0 must be a string."]}


def test_certificate_lifecycle_is_one_way(client):
    """draft -> issued -> revoked; a draft cannot be revoked, a revoked one not re-issued."""
    g = graph.certificate_graph(client)
    cert = client.certificates.create(graph.certificate_fields(g))
    with pytest.raises(errors.ValidationFailed):
        client.certificates.revoke(cert["uuid"])
    client.certificates.update(cert["uuid"], {"status": "issued"})
    client.certificates.revoke(cert["uuid"], "error")
    with pytest.raises(errors.ValidationFailed):
        client.certificates.revoke(cert["uuid"])
    with pytest.raises(errors.ValidationFailed):
        client.certificates.update(cert["uuid"], {"finish": True})


def test_file_download_is_public(client, raw):
    """GET /files/{uuid}/download needs no token and returns the uploaded bytes."""
    upload = graph.pdf()
    f = client.files.upload([upload])[0]
    r = raw.get(f"/files/{f['uuid']}/download")
    assert (r.status_code, r.content) == (200, upload.content)


def test_batch_destroy(client):
    """DELETE /cohorts/batch/destroy soft-deletes all the given UUIDs."""
    crs = graph.course(client, graph.institution(client))
    a = client.cohorts.create({"course_uuid": crs["uuid"], "code": f"B-{graph.n()}"})
    b = client.cohorts.create({"course_uuid": crs["uuid"], "code": f"B-{graph.n()}"})
    client.request("DELETE", "/cohorts/batch/destroy", json={"uuids": [a["uuid"], b["uuid"]]})
    assert client.cohorts.find(course_uuid=crs["uuid"]) == []


def test_per_page_is_capped_at_200(client):
    """Asking for 500 per page gives pages of 200."""
    for _ in range(3):
        graph.student(client)
    assert client.students.page(per_page=500).per_page == 200


# -- fault injection and the admin API ----------------------------------------------------

def test_admin_faults_stats_and_state(raw):
    """PUT /_sandbox/faults configures; stats count per route; state dumps entities."""
    headers = _login(raw)
    r = raw.put("/_sandbox/faults", json={"error_rate": 1.0, "lost_response_share": 1.0,
                                          "seed": 1})
    assert r.status_code == 200
    post = raw.post("/institutions", json={"name": "Lost", "country": "BR"}, headers=headers)
    assert post.status_code in (500, 502, 503)
    raw.put("/_sandbox/faults", json={})
    stats = raw.get("/_sandbox/stats").json()
    assert stats["by_route"]["POST /institutions"] == 1
    assert (stats["injected_5xx"], stats["lost_responses"]) == (1, 1)
    state = raw.get("/_sandbox/state").json()
    assert [i["name"] for i in state[MAIN.tenant]["institutions"]] == ["Lost"]
    assert raw.put("/_sandbox/faults", json={"error_rate": 2}).status_code == 422


def test_error_rate_with_seed_fails_about_that_share(client, sandbox):
    """With error_rate 0.3, roughly 30 % of 200 calls fail with 5xx (seeded, repeatable)."""
    client.students.page()
    sandbox.sandbox.faults.configure(Faults(error_rate=0.3, seed=42))
    failures = 0
    for _ in range(200):
        try:
            client.students.page()
        except errors.ServerError:
            failures += 1
    assert 40 <= failures <= 80
    assert sandbox.sandbox.stats.injected_5xx == failures


def test_rate_limit_paces_requests(client, sandbox):
    """At 20 req/s with a burst of 5, 40 calls that retry on 429 take about 1.75 s or more."""
    client.students.page()
    sandbox.sandbox.faults.configure(Faults(rate_limit=20, burst=5))
    start = time.monotonic()
    done = 0
    while done < 40:
        try:
            client.students.page()
            done += 1
        except errors.RateLimited:
            time.sleep(0.01)
    assert time.monotonic() - start >= (40 - 5) / 20 * 0.95


def test_added_latency(client, sandbox):
    """latency_ms delays every answer by at least that much."""
    client.students.page()
    sandbox.sandbox.faults.configure(Faults(latency_ms=50))
    start = time.monotonic()
    for _ in range(5):
        client.students.page()
    assert time.monotonic() - start >= 0.25


def test_a_draft_cannot_be_moved_onto_a_used_file(client):
    """PATCHing a draft onto a file another certificate uses is a 422; a free file is fine and
    the draft's old file is released."""
    g = graph.certificate_graph(client)
    client.certificates.create(graph.certificate_fields(g), issue=True)
    other = graph.certificate_graph(client)
    draft = client.certificates.create(graph.certificate_fields(other))
    with pytest.raises(errors.ValidationFailed):
        client.certificates.update(draft["uuid"], {"file_uuid": g["file"]["uuid"]})
    spare = client.files.upload([graph.pdf()])[0]
    client.certificates.update(draft["uuid"], {"file_uuid": spare["uuid"]})
    assert client.files.get(other["file"]["uuid"])["used_at"] is None
    assert client.files.get(spare["uuid"])["used_at"] is not None


def test_a_deleted_certificates_file_stays_used(client):
    """Files are single use: deleting the certificate does not free its file."""
    g = graph.certificate_graph(client)
    cert = client.certificates.create(graph.certificate_fields(g), issue=True)
    client.certificates.delete(cert["uuid"])
    with pytest.raises(errors.ValidationFailed):
        client.certificates.create(graph.certificate_fields(g), issue=True)


def test_lost_responses_count_only_applied_writes(client, sandbox):
    """A failed GET, or a write that was refused anyway, is not counted as a lost response."""
    client.students.page()
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=500, after_commit=True),
        ScriptedFault("POST", "/students", status=500, after_commit=True, times=2)]))
    for call in (lambda: client.students.page(),
                 lambda: client.students.create({"name": "no email"}),
                 lambda: graph.student(client)):
        with pytest.raises(errors.ServerError):
            call()
    assert sandbox.sandbox.stats.lost_responses == 1
