"""Every error class, provoked over real HTTP against the sandbox, is classified right."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

import graph
from dokstamp_sync.dokstamp import MemoryTokenStore, PasswordLogin, TokenManager, errors
from dokstamp_sync.dokstamp.client import DokStampClient, build_http_client
from dokstamp_sync.sandbox import Faults, ScriptedFault
from testenv import OTHER


def script(sandbox, *faults: ScriptedFault) -> None:
    sandbox.sandbox.faults.configure(Faults(script=list(faults)))


def test_429_is_transient_and_carries_retry_after(client, sandbox):
    """A 429 is RateLimited (transient) with the Retry-After seconds the server sent."""
    client.institutions.page()
    script(sandbox, ScriptedFault("GET", "/institutions", status=429, retry_after=7))
    with pytest.raises(errors.RateLimited) as info:
        client.institutions.page()
    assert isinstance(info.value, errors.TransientError)
    assert info.value.retry_after == 7
    assert isinstance(info.value, errors.TooManyRequests)
    assert info.value.status == 429


def test_rate_limit_bucket_answers_429_with_retry_after(client, sandbox):
    """Past the sandbox's token bucket, calls fail with RateLimited and a Retry-After >= 1."""
    sandbox.sandbox.faults.configure(Faults(rate_limit=2, burst=3))
    caught = []
    for _ in range(6):
        try:
            client.students.page()
        except errors.RateLimited as exc:
            caught.append(exc)
    assert caught
    assert all(e.retry_after is not None and e.retry_after >= 1 for e in caught)
    assert sandbox.sandbox.stats.http_429 == len(caught)


def test_5xx_before_write_is_transient_and_nothing_is_created(client, sandbox):
    """A 5xx that fails before the write: ServerError, and the entity does not exist."""
    client.students.page()
    script(sandbox, ScriptedFault("POST", "/students", status=503))
    with pytest.raises(errors.ServerError) as info:
        graph.student(client, email="before@example.edu")
    assert isinstance(info.value, errors.TransientError)
    assert info.value.status == 503
    assert client.students.find(email="before@example.edu") == []


def test_5xx_after_write_is_transient_but_the_entity_exists(client, sandbox):
    """A lost response: ServerError, yet the write was applied, so a search finds it."""
    client.students.page()
    script(sandbox, ScriptedFault("POST", "/students", status=500, after_commit=True))
    with pytest.raises(errors.ServerError):
        graph.student(client, email="lost@example.edu")
    assert len(client.students.find(email="lost@example.edu")) == 1
    assert sandbox.sandbox.stats.lost_responses == 1


def test_timeout_is_transient_and_the_write_may_still_happen(make_client, sandbox):
    """An answer slower than the client's timeout raises Timeout; the write lands later."""
    c = make_client(timeout=0.3)
    c.students.page()
    script(sandbox, ScriptedFault("POST", "/students", status=200, delay_s=0.8))
    with pytest.raises(errors.Timeout) as info:
        graph.student(c, email="slow@example.edu")
    assert isinstance(info.value, errors.TransportError)
    assert isinstance(info.value, errors.TransientError)
    time.sleep(1.0)
    assert len(c.students.find(email="slow@example.edu")) == 1


def test_connection_refused_is_a_transient_transport_error():
    """No server listening: TransportError, which is transient, and not a Timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = build_http_client(f"http://127.0.0.1:{port}", timeout=2)
    c = DokStampClient(http, tenant="t", tokens=TokenManager(
        http, PasswordLogin("a@b.c", "pw"), MemoryTokenStore()))
    with pytest.raises(errors.TransportError) as info:
        c.institutions.page()
    assert not isinstance(info.value, errors.Timeout)
    assert isinstance(info.value, errors.TransientError)
    assert info.value.sent is False  # nothing left: nothing can land later
    assert not errors.may_land_later(info.value)
    http.close()


def test_a_gateway_timeout_is_answered_at_once_and_its_write_lands_later(client, sandbox):
    """A 504 while the API still works on the request (the sandbox's ``land_after_s``): the
    client sees the 504 at once, the student appears later. The one 5xx that may land late."""
    client.students.page()
    script(sandbox, ScriptedFault("POST", "/students", status=504, land_after_s=0.6))
    with pytest.raises(errors.ServerError) as info:
        graph.student(client, email="gateway@example.edu")
    assert info.value.status == 504
    assert errors.may_land_later(info.value)
    assert client.students.find(email="gateway@example.edu") == []
    time.sleep(1.0)
    assert len(client.students.find(email="gateway@example.edu")) == 1


@pytest.mark.parametrize(("exc", "later"), [
    (httpx.ConnectError("refused"), False),  # no connection: nothing sent
    (httpx.ConnectTimeout("slow connect"), False),
    (httpx.PoolTimeout("no free connection"), False),
    (httpx.ReadTimeout("no answer"), True),  # sent, no answer: may land later
    (httpx.WriteTimeout("half sent"), True),
    (httpx.RemoteProtocolError("dropped"), True),
    (httpx.ReadError("reset"), True),
])
def test_whether_a_transport_failure_may_land_later(exc, later):
    request = httpx.Request("POST", "http://127.0.0.1/students")
    translated = errors.from_httpx_error(exc, request)
    assert translated.sent is later
    assert errors.may_land_later(translated) is later


@pytest.mark.parametrize(("status", "later"), [
    (500, False), (502, False), (503, False), (501, False),  # answered: the request is over
    (504, True), (524, True), (598, True), (599, True),  # a gateway gave up waiting
])
def test_whether_a_5xx_may_land_later(status, later):
    err = errors.ServerError("x", status=status, method="POST", path="/courses")
    assert errors.may_land_later(err, took=0.1) is later
    # a slow one may be a gateway that gave up waiting (a PaaS router's 503), and so may one
    # whose time is unknown
    assert errors.may_land_later(err, took=errors.ANSWERED_WITHIN + 0.1)
    assert errors.may_land_later(err)


def test_an_unusable_success_answer_is_over():
    """A 2xx whose body is unusable was answered once the server was done: what it wrote is
    there for a search to find, nothing lands after it."""
    assert not errors.may_land_later(errors.MalformedResponse("html", status=200))


def test_422_is_validation_failed_with_field_errors(client, sandbox):
    """A 422 is ValidationFailed: permanent, with DokStamp's message and field errors."""
    with pytest.raises(errors.ValidationFailed) as info:
        client.courses.create({"name": "No institution"})
    exc = info.value
    assert isinstance(exc, errors.PermanentError)
    assert not isinstance(exc, errors.TransientError)
    assert exc.status == 422
    assert exc.message == "The given data was invalid."
    assert exc.errors == {"institution_uuid": ["The institution uuid field is required."]}
    assert (exc.method, exc.path) == ("POST", "/courses")


def test_unknown_reference_is_422_the_selected_uuid_is_invalid(client, sandbox):
    """A reference to a UUID that does not exist: 'The selected course uuid is invalid.'"""
    with pytest.raises(errors.ValidationFailed) as info:
        client.cohorts.create({"code": "X", "course_uuid": "7d4b1e8e-3a50-4c1e-9d0b-6f1e2a3b4c5d"})
    assert info.value.errors["course_uuid"] == ["The selected course uuid is invalid."]


def test_another_tenants_resource_is_not_found(make_client, sandbox):
    """Reading another tenant's entity answers 404 (NotFound), not 403."""
    mine = graph.institution(make_client())
    theirs = make_client(account=OTHER)
    with pytest.raises(errors.NotFound) as info:
        theirs.institutions.get(mine["uuid"])
    assert info.value.status == 404
    assert info.value.path == f"/institutions/{mine['uuid']}"


def test_wrong_tenant_header_is_permission_denied(make_client, sandbox):
    """A token of one tenant used with another tenant's X-Tenant is PermissionDenied (403)."""
    c = make_client(tenant=OTHER.tenant)
    with pytest.raises(errors.PermissionDenied):
        c.institutions.page()


def test_other_4xx_is_a_permanent_client_error(client, sandbox):
    """A 400 (here an unknown filter field) is ClientError, permanent; the query is not shown."""
    with pytest.raises(errors.ClientError) as info:
        client.students.find(emial="typo@example.edu")
    assert info.value.status == 400
    assert "typo@example.edu" not in str(info.value)


def test_newer_error_bodies_with_success_false_parse_the_same(sandbox_b, make_client):
    """The newer docs add success:false to error bodies; classification is unchanged."""
    client = make_client()
    with pytest.raises(errors.ValidationFailed) as info:
        client.students.create({"name": "x"})
    assert info.value.body["success"] is False
    assert "email" in info.value.errors


def _response(status: int, headers: dict[str, str] | None = None, **body) -> httpx.Response:
    request = httpx.Request("POST", "https://api.example/students?where[email]=a@b.c",
                            headers={"Authorization": "Bearer SECRET-TOKEN"})
    return httpx.Response(status, json=body, headers=headers, request=request)


@pytest.mark.parametrize(("status", "cls"), [
    (400, errors.ClientError), (401, errors.AuthenticationError),
    (403, errors.PermissionDenied), (404, errors.NotFound), (405, errors.ClientError),
    (409, errors.Conflict), (422, errors.ValidationFailed), (429, errors.TooManyRequests),
    (500, errors.ServerError), (502, errors.ServerError), (503, errors.ServerError)])
def test_status_to_class_table(status, cls):
    """from_response maps each status to its class; none of them shows the token or query."""
    exc = errors.from_response(_response(status, message="boom"))
    assert type(exc) is cls
    assert isinstance(exc, errors.TransientError) == (status == 429 or status >= 500)
    assert isinstance(exc, errors.PermanentError) == (400 <= status < 500 and status != 429)
    assert isinstance(exc, errors.RateLimited) == (status == 429)
    assert exc.status == status
    assert "SECRET-TOKEN" not in f"{exc} {exc!r} {exc.body}"
    assert "a@b.c" not in str(exc)


def test_retry_after_absent_or_as_http_date():
    """A 429 without Retry-After has retry_after None; an HTTP-date is turned into seconds."""
    too_many = errors.from_response(_response(429))
    assert isinstance(too_many, errors.TooManyRequests)
    assert too_many.retry_after is None
    assert errors.parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert errors.parse_retry_after("garbage") is None
    assert errors.parse_retry_after("-3") == 0.0


@pytest.mark.parametrize(("status", "header", "seconds"), [
    (503, "30", 30.0), (500, "Wed, 21 Oct 2015 07:28:40 GMT", None), (502, None, None)])
def test_server_error_keeps_retry_after(mock_api, status, header, seconds):
    """A 5xx's Retry-After (seconds, or an HTTP date) is kept on the ServerError, like a 429's;
    without one, retry_after is None."""
    headers = {"Retry-After": header} if header else {}
    c = mock_api(lambda r: httpx.Response(status, json={"message": "down"}, headers=headers))
    with pytest.raises(errors.ServerError) as info:
        c.students.page()
    exc = info.value
    assert isinstance(exc, errors.TransientError)
    if header and seconds is None:  # a date in the past: wait nothing more
        assert exc.retry_after == 0.0
    else:
        assert exc.retry_after == seconds


def test_every_transient_error_has_retry_after():
    """retry_after exists on every transient class (None unless a server or the limiter said)."""
    request = httpx.Request("GET", "https://a/b")
    assert errors.from_httpx_error(httpx.ReadTimeout("x"), request).retry_after is None
    assert errors.from_httpx_error(httpx.ConnectError("x"), request).retry_after is None
    assert errors.Paused("held", retry_after=40.0).retry_after == 40.0
    assert errors.malformed(httpx.Response(200, text="", request=request),
                            "empty").retry_after is None


def test_409_on_create_is_a_permanent_conflict(mock_api):
    """A 409 (undocumented) is Conflict: permanent, not a generic ClientError, with the body."""
    c = mock_api(lambda r: httpx.Response(409, json={"message": "Duplicate entry."}))
    with pytest.raises(errors.Conflict) as info:
        c.students.create({"name": "x", "email": "dup@example.edu"})
    exc = info.value
    assert isinstance(exc, errors.PermanentError)
    assert not isinstance(exc, errors.ClientError)
    assert (exc.status, exc.message, exc.method, exc.path) == (409, "Duplicate entry.", "POST",
                                                              "/students")


class _BrokenStream(httpx.SyncByteStream):
    """A body that breaks after its first chunk (the connection dropped mid-download)."""

    def __iter__(self):
        yield b"%PDF-1.4 "
        raise httpx.ReadError("connection reset")


def _http(handler) -> httpx.Client:
    return httpx.Client(base_url="https://docs.example", transport=httpx.MockTransport(handler))


def test_exchange_translates_a_streamed_5xx_with_its_body():
    """A streamed 503 is read and classified: ServerError with DokStamp-style body and
    Retry-After (the old code called from_response on an unread stream and crashed)."""
    with _http(lambda r: httpx.Response(503, json={"message": "busy"},
                                        headers={"Retry-After": "12"})) as http:
        request = http.build_request("GET", "/diploma.pdf")
        with pytest.raises(errors.ServerError) as info, \
                errors.exchange(http, request, stream=True):
            pytest.fail("the block must not run for a failed status")
    assert (info.value.message, info.value.retry_after) == ("busy", 12.0)


def test_exchange_translates_a_read_error_inside_the_block():
    """A transport error while the block reads a streamed body becomes TransportError."""
    with _http(lambda r: httpx.Response(200, stream=_BrokenStream())) as http:
        request = http.build_request("GET", "/diploma.pdf")
        with pytest.raises(errors.TransportError) as info, \
                errors.exchange(http, request, stream=True) as response:
            b"".join(response.iter_bytes())
    assert info.value.path == "/diploma.pdf"
    assert "ReadError" in str(info.value)


def test_exchange_passes_statuses_the_caller_handles_and_its_own_errors():
    """With a custom ``failed``, a 404 reaches the block; the block's own exception passes
    through untouched and the response is closed."""
    seen: list[httpx.Response] = []

    def fetch(http: httpx.Client) -> None:
        request = http.build_request("GET", "/gone.pdf")
        with errors.exchange(http, request, stream=True,
                             failed=lambda s: s >= 500) as response:
            seen.append(response)
            raise LookupError("the caller's own verdict")

    with _http(lambda r: httpx.Response(404, text="nope")) as http, \
            pytest.raises(LookupError):
        fetch(http)
    assert seen[0].status_code == 404
    assert seen[0].is_closed
