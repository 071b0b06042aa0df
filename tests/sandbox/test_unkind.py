"""Unkind but documented-compatible behaviours the sandbox can be switched into, seen over HTTP:
upload order, short pages, 409 conflicts, malformed answers, Retry-After on 5xx, slow writes
and outages."""

from __future__ import annotations

import threading
import time

import pytest

import graph
from dokstamp_sync.dokstamp import errors
from dokstamp_sync.sandbox import Faults, ScriptedFault
from testenv import MAIN


def _headers(raw) -> dict[str, str]:
    r = raw.post("/auth/login", json={"email": MAIN.email, "password": MAIN.password})
    assert r.status_code == 200
    return {"Authorization": f"Bearer {r.json()['access_token']}", "X-Tenant": MAIN.tenant,
            "Accept": "application/json"}


def _student(i: int | None = None) -> dict[str, str]:
    i = graph.n() if i is None else i
    return {"name": f"S{i}", "email": f"u{i}@example.edu", "date_of_birth": "2000-01-01"}


def test_reorder_uploads_answers_files_in_reverse(client, sandbox):
    """With reorder_uploads, POST /files returns its records in reverse order of the parts;
    without it, in order."""
    uploads = [graph.pdf() for _ in range(3)]
    names = [u.filename for u in uploads]

    def answered(batch):  # the raw answer: the client itself puts records back in order
        parts = [("files[]", (u.filename, u.content, u.content_type)) for u in batch]
        return [f["original_name"] for f in client.call("POST", "/files", files=parts)[1]["data"]]

    assert answered(uploads[:2]) == names[:2]
    sandbox.sandbox.faults.configure(Faults(reorder_uploads=True))
    assert answered(uploads) == names[::-1]


def test_page_cap_gives_short_pages_with_a_truthful_total(sandbox, raw):
    """With page_cap 2, a page asked for 4 holds 2 rows while meta says per_page 4, total 5,
    last_page 2: a client paging by per_page misses rows 3 and 4."""
    headers = _headers(raw)
    for _ in range(5):
        assert raw.post("/students", json=_student(), headers=headers).status_code == 201
    sandbox.sandbox.faults.configure(Faults(page_cap=2))
    first = raw.get("/students", params={"per_page": 4}, headers=headers).json()
    assert len(first["data"]) == 2
    assert first["meta"] == {"current_page": 1, "per_page": 4, "total": 5, "last_page": 2}
    second = raw.get("/students", params={"per_page": 4, "page": 2}, headers=headers).json()
    assert len(second["data"]) == 1
    assert len({s["uuid"] for s in first["data"] + second["data"]}) == 3


def test_conflict_409_answers_a_broken_uniqueness_rule_with_409(client, sandbox):
    """With conflict_409, a taken student email (create and PATCH) and a used file answer 409
    with the field errors; other validation failures stay 422."""
    sandbox.sandbox.faults.configure(Faults(conflict_409=True))
    first = graph.student(client, email="taken@example.edu")
    with pytest.raises(errors.Conflict) as info:
        graph.student(client, email="taken@example.edu")
    assert (info.value.status, list(info.value.body["errors"])) == (409, ["email"])
    other = graph.student(client)
    with pytest.raises(errors.Conflict) as info:
        client.students.update(other["uuid"], {"email": first["email"]})
    assert info.value.status == 409
    g = graph.certificate_graph(client)
    client.certificates.create(graph.certificate_fields(g), issue=True)
    with pytest.raises(errors.Conflict) as info:
        client.certificates.create(graph.certificate_fields(g), issue=True)
    assert (info.value.status, list(info.value.body["errors"])) == (409, ["file_uuid"])
    with pytest.raises(errors.ValidationFailed):
        client.students.create({"name": "no email"})


def test_scripted_empty_body_applies_the_create(sandbox, raw):
    """body "empty": POST /students answers 201 with no body at all, yet the student exists."""
    headers = _headers(raw)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", body="empty")]))
    payload = _student()
    r = raw.post("/students", json=payload, headers=headers)
    assert (r.status_code, r.content) == (201, b"")
    found = raw.get("/students", params={"where[email]": payload["email"]}, headers=headers)
    assert found.json()["meta"]["total"] == 1
    assert sandbox.sandbox.stats.malformed_bodies == 1


def test_scripted_wrong_shape_swaps_object_and_list(sandbox, raw):
    """body "wrong_shape": a create's data becomes a one-item list, a listing's data an object
    (its first row); both requests are otherwise answered as usual."""
    headers = _headers(raw)
    raw.post("/students", json=_student(), headers=headers)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", body="wrong_shape"),
        ScriptedFault("GET", "/students", body="wrong_shape")]))
    created = raw.post("/students", json=_student(), headers=headers)
    assert created.status_code == 201
    assert isinstance(created.json()["data"], list)
    assert created.json()["data"][0]["uuid"]
    listed = raw.get("/students", headers=headers).json()
    assert isinstance(listed["data"], dict)
    assert listed["meta"]["total"] == 2


def test_scripted_html_page_from_the_token_endpoint(sandbox_b, raw):
    """body "html": POST /oauth/token answers a 200 HTML page and no token is issued; the next
    request gets a real token."""
    sandbox_b.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/oauth/token", body="html")]))
    form = {"grant_type": "client_credentials", "client_id": MAIN.client_id,
            "client_secret": MAIN.client_secret}
    r = raw.post("/oauth/token", data=form)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.text.startswith("<!DOCTYPE html>")
    assert sandbox_b.sandbox.authority.issued == 0
    assert raw.post("/oauth/token", data=form).json()["access_token"]


def test_malformed_body_names_are_checked(raw):
    """PUT /_sandbox/faults refuses an unknown body kind or page_cap < 1 with a 422, and echoes
    the new switches."""
    bad = raw.put("/_sandbox/faults", json={"script": [
        {"method": "POST", "route": "/students", "body": "xml"}]})
    assert bad.status_code == 422
    assert raw.put("/_sandbox/faults", json={"page_cap": 0}).status_code == 422
    good = raw.put("/_sandbox/faults", json={"reorder_uploads": True, "page_cap": 3,
                                             "conflict_409": True}).json()
    assert (good["reorder_uploads"], good["page_cap"], good["conflict_409"]) == (True, 3, True)


def test_scripted_503_carries_retry_after(sandbox, raw):
    """A scripted 503 with retry_after sends Retry-After (not only a 429 does); one without
    sends none."""
    headers = _headers(raw)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=503, retry_after=7),
        ScriptedFault("GET", "/courses", status=503)]))
    r = raw.get("/students", headers=headers)
    assert (r.status_code, r.headers.get("retry-after")) == (503, "7")
    r = raw.get("/courses", headers=headers)
    assert (r.status_code, r.headers.get("retry-after")) == (503, None)


def test_slow_write_lands_after_the_client_gave_up(sandbox, make_client):
    """A scripted delay_s holds the write: the client times out, a search right after finds
    nothing, and the student appears once the delay has passed."""
    impatient, other = make_client(timeout=0.3), make_client()
    impatient.students.page()
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", status=201, delay_s=1.5)]))
    payload = _student()
    with pytest.raises(errors.TransportError):
        impatient.students.create(payload)
    assert other.students.find(email=payload["email"]) == []
    deadline = time.monotonic() + 5
    while not other.students.find(email=payload["email"]):
        assert time.monotonic() < deadline, "the slow write never landed"
        time.sleep(0.1)


def test_outage_answers_every_request_503_and_counts_them(sandbox, raw):
    """During an outage (POST /_sandbox/outage) logins and API calls answer 503 with the asked
    Retry-After, each counted; after it ends the API answers again."""
    headers = _headers(raw)
    r = raw.post("/_sandbox/outage", json={"seconds": 0.6, "retry_after": 2})
    assert r.json()["active"] is True
    for call in (lambda: raw.get("/students", headers=headers),
                 lambda: raw.post("/auth/login", json={"email": MAIN.email,
                                                       "password": MAIN.password}),
                 lambda: raw.get("/auth/me", headers=headers)):
        answer = call()
        assert (answer.status_code, answer.headers.get("retry-after")) == (503, "2")
    state = raw.get("/_sandbox/outage").json()
    assert (state["active"], state["requests"]) == (True, 3)
    assert raw.get("/_sandbox/stats").json()["outage_requests"] == 3
    time.sleep(0.7)
    assert raw.get("/students", headers=headers).status_code == 200
    assert raw.get("/_sandbox/outage").json() == {"active": False, "requests": 3,
                                                  "retry_after": 2, "remaining_s": 0.0}


def test_outage_until_turned_off(sandbox, raw):
    """An outage without seconds lasts until DELETE /_sandbox/outage, and a reset ends it too."""
    headers = _headers(raw)
    raw.post("/_sandbox/outage", json={})
    time.sleep(0.2)
    r = raw.get("/students", headers=headers)
    assert (r.status_code, r.headers.get("retry-after")) == (503, None)
    assert raw.get("/_sandbox/outage").json()["remaining_s"] is None
    assert raw.delete("/_sandbox/outage").json()["active"] is False
    assert raw.get("/students", headers=headers).status_code == 200
    sandbox.sandbox.faults.start_outage()
    assert raw.post("/_sandbox/reset").status_code == 204
    assert raw.post("/auth/login", json={"email": MAIN.email,
                                         "password": MAIN.password}).status_code == 200


def test_outage_stops_concurrent_clients_alike(sandbox, make_client):
    """Clients in several threads all get transient 5xx errors during an outage, and the
    sandbox counts every request they sent."""
    clients = [make_client() for _ in range(4)]
    for c in clients:
        c.students.page()
    sandbox.sandbox.faults.start_outage(seconds=30)
    failures: list[Exception] = []

    def call(c) -> None:
        try:
            c.students.page()
        except errors.ServerError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=call, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(failures) == 4
    assert sandbox.sandbox.stats.outage_requests == 4
    assert {getattr(f, "status", None) for f in failures} == {503}
