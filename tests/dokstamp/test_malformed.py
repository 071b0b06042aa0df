"""Success answers with unusable bodies are classified (MalformedResponse), never a crash, and
never show a secret."""

from __future__ import annotations

import httpx
import pytest

from dokstamp_sync.dokstamp import Upload, errors

HTML = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


def _answer(status: int, **kw):
    return lambda request: httpx.Response(status, **kw)


def test_html_200_is_malformed_with_an_excerpt(mock_api):
    """An HTML page with a 200 (a proxy's) is MalformedResponse: transient, with status, method,
    path and the page's first characters."""
    c = mock_api(_answer(200, text=HTML, headers={"Content-Type": "text/html"}))
    with pytest.raises(errors.MalformedResponse) as info:
        c.students.get("u-1")
    exc = info.value
    assert isinstance(exc, errors.TransientError)
    assert (exc.status, exc.method, exc.path) == (200, "GET", "/students/u-1")
    assert exc.excerpt.startswith("<html><head><title>502 Bad Gateway")
    assert "502 Bad Gateway" in str(exc)


def test_excerpt_is_at_most_200_characters():
    """A long body is cut to 200 characters in the excerpt."""
    response = httpx.Response(200, text="x" * 5000, request=httpx.Request("GET", "https://a/b"))
    assert errors.malformed(response, "bad").excerpt == "x" * 200


@pytest.mark.parametrize(("status", "kw"), [
    (201, {}), (200, {"text": ""}), (201, {"json": {"data": [{"uuid": "u"}]}}),
    (201, {"json": {"data": {"name": "no uuid"}}}), (201, {"json": ["a", "list"]}),
    (201, {"json": {"uuid": "u-unwrapped"}})])
def test_create_without_an_entity_is_malformed(mock_api, status, kw):
    """A create answered by an empty body, a list, an object without uuid or an unwrapped
    object is MalformedResponse (the write may have happened: the caller searches first)."""
    c = mock_api(_answer(status, **kw))
    with pytest.raises(errors.MalformedResponse) as info:
        c.students.create({"name": "x"})
    assert (info.value.status, info.value.method, info.value.path) == (status, "POST",
                                                                      "/students")


@pytest.mark.parametrize("body", [
    {"data": {"uuid": "an object"}}, {"data": ["not", "objects"]}, {"meta": {"total": 1}},
    {"data": [], "meta": {"total": "many"}}, {"data": [], "meta": {"last_page": -1}},
    {"data": [], "meta": ["x"]}, "just text"])
def test_list_of_the_wrong_shape_is_malformed(mock_api, body):
    """A list answer whose data is not a list of objects, or whose meta is not counts, is
    MalformedResponse, for one page and for a whole listing."""
    c = mock_api(_answer(200, json=body))
    with pytest.raises(errors.MalformedResponse):
        c.students.page()
    with pytest.raises(errors.MalformedResponse):
        c.students.find(email="a@b.c")


def test_upload_answer_that_is_not_a_list_is_malformed(mock_api):
    """POST /files answered with data as one object (not a list) is MalformedResponse."""
    c = mock_api(_answer(201, json={"data": {"uuid": "f", "size": 3}}))
    with pytest.raises(errors.MalformedResponse):
        c.files.upload([Upload("a.pdf", b"abc")])


def test_count_without_meta_total_is_malformed(mock_api):
    """count() needs meta.total: guessing 0 from an empty page could allow a forbidden delete."""
    c = mock_api(_answer(200, json={"data": []}))
    with pytest.raises(errors.MalformedResponse):
        c.certificates.count(course_uuid="c")


def test_me_without_a_tenant_is_malformed(mock_api):
    """/auth/me answered without the tenant object is MalformedResponse."""
    c = mock_api(_answer(200, json={"data": {"id": 1, "name": "x"}}))
    with pytest.raises(errors.MalformedResponse):
        c.me()


def test_token_endpoint_html_is_malformed_with_an_excerpt(mock_api):
    """An HTML 200 from /auth/login is MalformedResponse (transient), excerpted: no token in it."""
    c = mock_api(_answer(200, text=HTML), login=False)
    with pytest.raises(errors.MalformedResponse) as info:
        c.students.page()
    assert info.value.path == "/auth/login"
    assert info.value.excerpt.startswith("<html>")


@pytest.mark.parametrize("body", [
    {"access_token": "tok-SECRET", "expires_in": "soon"},
    {"access_token": "tok-SECRET", "expires_in": 3600, "refresh_token": 12},
    {"refresh_token": "ref-SECRET", "expires_in": 3600}, {"access_token": ""},
    ["tok-SECRET"]])
def test_token_endpoint_json_without_a_usable_token_never_shows_it(mock_api, body):
    """A token answer that is unusable (bad expires_in, no token, not an object) is
    MalformedResponse, with no excerpt at all: nothing of the body may leak."""
    c = mock_api(_answer(200, json=body), login=False)
    with pytest.raises(errors.MalformedResponse) as info:
        c.students.page()
    exc = info.value
    assert exc.excerpt == ""
    assert "SECRET" not in f"{exc} {exc!r} {exc.args}"


def test_excerpt_skips_any_json_holding_a_secret_key():
    """On any endpoint, a JSON body with a token-like key anywhere is not excerpted."""
    request = httpx.Request("GET", "https://a/students")
    leaky = httpx.Response(200, json={"data": [{"uuid": "u", "access_token": "tok-SECRET"}]},
                           request=request)
    plain = httpx.Response(200, json={"data": [{"uuid": "u"}]}, request=request)
    assert errors.malformed(leaky, "bad").excerpt == ""
    assert errors.malformed(plain, "bad").excerpt == '{"data":[{"uuid":"u"}]}'
