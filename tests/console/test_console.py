"""The console's rules without a browser: its app served by uvicorn on loopback (in a thread)
over a real PostgreSQL store, spoken to over HTTP."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from sqlalchemy import func, insert, select

from dokstamp_sync import held
from dokstamp_sync.console.app import Console, build_app
from dokstamp_sync.console.auth import Logins
from dokstamp_sync.db import session_scope
from dokstamp_sync.demo.embedded import free_port
from dokstamp_sync.models import DeadLetter, InboxEvent, LetterHistory, Mapping, utcnow
from dokstamp_sync.testing import STREAM
from test_worker import EXE
from testenv import TEST_ENGINE_REDIS_URL


@pytest.fixture
def app(sessions, redis_client):
    """The console on a free loopback port; a factory of HTTP clients (each its own session)."""
    logins = Logins(SecretStr("ops:ops-pw"), SecretStr("viewer:viewer-pw"))
    config = uvicorn.Config(build_app(Console(logins, sessions, redis_client, STREAM)),
                            host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    clients: list[httpx.Client] = []

    def client() -> httpx.Client:
        clients.append(httpx.Client(base_url=f"http://127.0.0.1:{config.port}", timeout=30))
        return clients[-1]

    yield client
    for c in clients:
        c.close()
    server.should_exit = True
    thread.join(timeout=10)


def login(client: httpx.Client, user: str, password: str):
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"user": user, "password": password, "csrf": token})


def csrf_of(page) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def letters(sessions, n: int, entity: str = "student") -> None:
    now = utcnow()
    with session_scope(sessions) as s:
        s.execute(insert(DeadLetter), [
            {"entity": entity, "erp_key": f"{entity}-{i}", "event_id": f"ev-{entity}-{i}",
             "reason": "DokStamp refused POST /students (422)", "http_status": 422,
             "attempts": 1, "status": "open", "first_failed_at": now, "last_failed_at": now}
            for i in range(n)])


def dead_events(sessions, *keys: str, entity: str = "student") -> list[int]:
    """A dead event and its open letter per key; the letters' ids."""
    now = utcnow()
    out = []
    with session_scope(sessions) as s:
        for key in keys:
            ev = InboxEvent(event_id=f"ev-{key}", entity=entity, op="upsert", erp_key=key,
                            occurred_at=now, payload={"key": key}, state="dead")
            s.add(ev)
            s.flush()
            letter = DeadLetter(event_pk=ev.id, event_id=ev.event_id, entity=entity,
                                erp_key=key, reason="DokStamp refused POST /students (422)",
                                http_status=422, attempts=1, status="open",
                                first_failed_at=now, last_failed_at=now)
            s.add(letter)
            s.flush()
            out.append(letter.id)
    return out


def history_rows(page: str) -> list[tuple[str, str]]:
    table = re.search(r'<table id="history">(.*?)</table>', page, re.S).group(1)
    return re.findall(r"<tr><td>[^<]*</td><td>([^<]+)</td><td>([^<]+)</td></tr>", table)


def test_a_cli_replay_and_discard_show_in_the_letters_history(app, sessions, database_url,
                                                              tmp_path):
    """`dlq replay` and `dlq discard` keep who (cli:<os user>), when and what in each letter's
    history, shown on its console page, and log one line per batch naming who did what."""
    import getpass

    replayed, discarded = dead_events(sessions, "S-1", "S-2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "DATABASE_URL": database_url, "REDIS_URL": TEST_ENGINE_REDIS_URL}
    runs = [subprocess.run([EXE, "dlq", action, str(ident)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60, check=False)
            for action, ident in (("replay", replayed), ("discard", discarded))]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    who = f"cli:{getpass.getuser()}"
    assert f"{who} replay letters [{replayed}]" in runs[0].stderr
    assert f"{who} discard letters [{discarded}]" in runs[1].stderr
    with app() as client:
        login(client, "viewer", "viewer-pw")
        assert history_rows(client.get(f"/letters/{replayed}").text) == [
            ("dead-lettered", "dokstamp-sync"), ("replayed", who)]
        assert history_rows(client.get(f"/letters/{discarded}").text) == [
            ("dead-lettered", "dokstamp-sync"), ("discarded", who)]


def test_the_console_refuses_to_start_without_a_password(tmp_path):
    """No DOKSTAMP_SYNC_CONSOLE_AUTH: exit 2 with the reason, nothing served."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")}
    out = subprocess.run([EXE, "console", "--port", "1"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2
    assert "refusing to start the console without a password" in out.stderr
    assert "http://" not in out.stdout + out.stderr  # no URL of a console that never ran


def test_pages_need_a_login_and_a_wrong_password_is_refused(app):
    """Every page sends an anonymous visitor to the login; a wrong password answers 401 and
    gives no session; the right one does."""
    with app() as client:
        for path in ("/", "/letters", "/letters/1", "/waiting", "/mapping"):
            answer = client.get(path)
            assert (answer.status_code, answer.headers["location"]) == (303, "/login")
        assert login(client, "ops", "wrong").status_code == 401
        assert "dokstamp_console" not in client.cookies
        assert login(client, "ops", "ops-pw").status_code == 303
        assert client.get("/").status_code == 200


def test_a_read_only_login_sees_no_actions_and_its_posts_are_refused(app, sessions):
    """The read-only login sees the letters but no replay/discard button, and a POST with
    its valid CSRF token is still refused (403): the letter stays open."""
    letters(sessions, 1)
    with app() as client:
        login(client, "viewer", "viewer-pw")
        page = client.get("/letters")
        assert "student-0" in page.text
        assert "Replay selected" not in page.text
        answer = client.post("/letters/action", data={
            "csrf": csrf_of(page), "action": "discard", "ids": "1", "confirmed": "yes"})
        assert answer.status_code == 403
    with session_scope(sessions) as s:
        assert s.scalar(select(DeadLetter.status)) == "open"


def test_a_post_without_the_csrf_token_or_with_another_sessions_is_refused(app, sessions):
    """An operator's POST without a token, or with a token of another session, is 403."""
    letters(sessions, 1)
    with app() as other:
        login(other, "ops", "ops-pw")
        foreign = csrf_of(other.get("/letters"))
    with app() as client:
        login(client, "ops", "ops-pw")
        for data in ({}, {"csrf": foreign}):
            answer = client.post("/letters/action", data=data | {
                "action": "discard", "ids": "1", "confirmed": "yes"})
            assert answer.status_code == 403
    with session_scope(sessions) as s:
        assert s.scalar(select(DeadLetter.status)) == "open"


def test_discarding_everything_a_filter_matches_confirms_the_count_and_works_in_batches(
        app, sessions, caplog):
    """Discard all open student letters: the confirmation says 250; they are discarded in
    three batches (100, 100, 50), each letter's history names the operator; the course
    letters stay open."""
    letters(sessions, 250)
    letters(sessions, 3, entity="course")
    with app() as client:
        login(client, "ops", "ops-pw")
        token = csrf_of(client.get("/letters"))
        form = {"csrf": token, "action": "discard", "scope": "filter", "entity": "student",
                "status": "open"}
        confirm = client.post("/letters/action", data=form)
        assert "Discard 250 dead letters?" in confirm.text
        with caplog.at_level(logging.INFO, logger="dokstamp_sync.console"):
            done = client.post("/letters/action", data=form | {"confirmed": "yes"})
        assert "250 letters discarded" in done.text
    batches = [r for r in caplog.records if "ops discard letters" in r.getMessage()]
    assert len(batches) == 3
    with session_scope(sessions) as s:
        by = dict(s.execute(select(DeadLetter.entity, func.count()).where(
            DeadLetter.status == "open").group_by(DeadLetter.entity)).all())
        history = s.execute(select(LetterHistory.action, LetterHistory.actor,
                                   func.count()).group_by(LetterHistory.action,
                                                          LetterHistory.actor)).all()
    assert by == {"course": 3}
    assert history == [("discarded", "ops", 250)]


def test_letters_are_paged_newest_first_by_keyset(app, sessions):
    """120 letters: pages of 50, newest first, each 'Older' link continuing below the last
    id shown, the last page without one."""
    letters(sessions, 120)
    shown: list[int] = []
    with app() as client:
        login(client, "ops", "ops-pw")
        url = "/letters"
        while url:
            page = client.get(url).text
            shown += [int(i) for i in re.findall(r'class="letter">(\d+)<', page)]
            more = re.search(r'id="next" href="([^"]+)"', page)
            url = more.group(1).replace("&amp;", "&") if more else ""
    assert shown == list(range(120, 0, -1))


def test_letters_filter_by_http_status_reason_text_and_day(app, sessions):
    """The list keeps to the HTTP status, the text in the reason (any case) and the days of
    the last failure asked for."""
    from datetime import timedelta

    now = utcnow()
    rows = [("A-403", 403, "credentials refused", now),
            ("B-422", 422, "Invalid date_of_birth", now),
            ("C-422-old", 422, "invalid date_of_birth", now - timedelta(days=3))]
    with session_scope(sessions) as s:
        s.execute(insert(DeadLetter), [
            {"entity": "student", "erp_key": key, "reason": reason, "http_status": code,
             "attempts": 1, "status": "open", "first_failed_at": at, "last_failed_at": at}
            for key, code, reason, at in rows])
    today = now.date().isoformat()
    with app() as client:
        login(client, "ops", "ops-pw")

        def keys(query: str) -> list[str]:
            return re.findall(r'class="key">([^<]+)<', client.get(f"/letters?{query}").text)

        assert keys("http_status=422") == ["C-422-old", "B-422"]
        assert keys("reason=INVALID") == ["C-422-old", "B-422"]
        assert keys(f"http_status=422&since={today}") == ["B-422"]
        assert keys(f"until={(now - timedelta(days=1)).date().isoformat()}") == ["C-422-old"]


def held_box(page: str) -> str:
    return re.search(r'<div class="box" id="held">(.*?)</div>', page, re.S).group(1)


def test_the_overview_shows_the_changes_held_by_the_guard_per_kind(app, sessions):
    """Two student deletes and a certificate revoke held by the guard (its own UPDATE), and a
    pending student delete: the overview counts the held ones per kind (2 and 1), links each
    kind to its `dokstamp-sync held list` command; once they are released it says none."""
    now = utcnow()
    with session_scope(sessions) as s:
        s.execute(insert(InboxEvent), [
            {"event_id": f"ev-{entity}-{key}", "entity": entity, "op": op, "erp_key": key,
             "occurred_at": now, "payload": {}, "state": "pending"}
            for entity, op, key in (("student", "delete", "S-1"), ("student", "delete", "S-2"),
                                    ("certificate", "revoke", "C-1"))])
        held.hold_kind(s, "student", "held by the change guard: test burst")
        held.hold_kind(s, "certificate", "held by the change guard: test burst")
        s.execute(insert(InboxEvent), [{
            "event_id": "ev-student-S-3", "entity": "student", "op": "delete",
            "erp_key": "S-3", "occurred_at": now, "payload": {}, "state": "pending"}])
    with app() as client:
        login(client, "viewer", "viewer-pw")
        box = held_box(client.get("/").text)
        assert re.findall(r'class="held-kind">([^<]+)</td><td>(\d+)<', box) == [
            ("certificate", "1"), ("student", "2")]
        assert "dokstamp-sync held list --entity student" in box
        assert "dokstamp-sync held list --entity certificate" in box
        with session_scope(sessions) as s:
            held.release(s, held.Selection(everything=True))
        box = held_box(client.get("/").text)
        assert "held-kind" not in box
        assert '<td class="ok">none</td>' in box


def test_the_overviews_malformed_link_lists_the_letters_with_no_entity(app, sessions):
    """A malformed stream entry's letter has no entity: the overview counts it as
    "malformed", and that row's link lists it (and only it)."""
    letters(sessions, 2)
    now = utcnow()
    with session_scope(sessions) as s:
        s.add(DeadLetter(entity=None, raw="not json", stream_id="1-0", reason="invalid event",
                         attempts=1, status="open", first_failed_at=now, last_failed_at=now))
    with app() as client:
        login(client, "viewer", "viewer-pw")
        links = dict(re.findall(r'<a href="(/letters\?entity=[^"]*)">([^<]+)</a>',
                                client.get("/").text))
        assert sorted(links.values()) == ["malformed", "student"]
        url = next(u for u, name in links.items() if name == "malformed")
        page = client.get(url).text
        ids = re.findall(r'class="letter">(\d+)<', page)
        assert ids == ["3"]
        assert "<td>malformed</td>" in page


def test_no_secret_is_shown_on_a_letters_page(app, sessions):
    """A letter whose event, DokStamp response and (malformed) raw text hold secret-named
    keys at any depth shows `***` for each, never the value; other fields are shown; no page
    holds the console's passwords."""
    (ident,) = dead_events(sessions, "S-SECRET")
    now = utcnow()
    with session_scope(sessions) as s:
        letter = s.get(DeadLetter, ident)
        s.get(InboxEvent, letter.event_pk).payload = {
            "key": "S-SECRET", "name": "Ana", "password": "hunter2",
            "login": {"api_key": "ak-123", "Client-Secret": "cs-456"}}
        letter.response_body = {"errors": {"name": ["too short"]}, "access_token": "tok-789",
                                "headers": [{"Authorization": "Bearer zz-000"}]}
        s.add(DeadLetter(entity=None, raw='{"entity": "student", "db_password": "raw-pw-1",'
                         ' "token": "raw-tok-2", broken', stream_id="9-0",
                         reason="invalid event", attempts=1, status="open",
                         first_failed_at=now, last_failed_at=now))
    secrets = ["hunter2", "ak-123", "cs-456", "tok-789", "zz-000", "raw-pw-1", "raw-tok-2",
               "ops-pw", "viewer-pw"]
    with app() as client:
        login(client, "ops", "ops-pw")
        page = client.get(f"/letters/{ident}").text
        event = re.search(r'<pre id="event">(.*?)</pre>', page, re.S).group(1)
        response = re.search(r'<pre id="response">(.*?)</pre>', page, re.S).group(1)
        assert "&#34;password&#34;: &#34;***&#34;" in event
        assert "&#34;api_key&#34;: &#34;***&#34;" in event
        assert "&#34;name&#34;: &#34;Ana&#34;" in event
        assert "&#34;access_token&#34;: &#34;***&#34;" in response
        assert "too short" in response
        raw = client.get(f"/letters/{ident + 1}").text
        assert "&#34;db_password&#34;: &#34;***&#34;" in re.search(
            r'<pre id="raw">(.*?)</pre>', raw, re.S).group(1)
        pages = [page, raw] + [client.get(p).text for p in (
            "/", "/letters", "/letters?status=", "/mapping?entity=student&key=S-SECRET")]
        for text in pages:
            assert not [s for s in secrets if s in text]


def test_out_of_range_numbers_and_odd_text_give_400_or_404_never_500(app, sessions):
    """Numbers past PostgreSQL's bigint (ids, before=, http_status=, POSTed ids) and a NUL in
    a text field answer 404 (a letter that cannot exist), 400 (a POST) or the page without
    that filter: never a 500."""
    letters(sessions, 2)
    huge = "9" * 20
    with app() as client:
        login(client, "ops", "ops-pw")
        for path in (f"/letters?before={huge}", f"/letters?http_status={huge}",
                     "/letters?http_status=99999999999", f"/waiting?before={huge}",
                     "/letters?reason=a%00b", "/letters?entity=%00",
                     "/mapping?entity=student&key=a%00b"):
            answer = client.get(path)
            assert answer.status_code == 200, path
        assert client.get(f"/letters?before={huge}").text.count('class="letter"') == 2
        assert client.get(f"/letters/{huge}").status_code == 404
        assert client.get(f"/letters/{2**63}").status_code == 404
        token = csrf_of(client.get("/letters"))
        for confirmed in ("", "yes"):
            answer = client.post("/letters/action", data={
                "csrf": token, "action": "discard", "ids": ["1", huge], "confirmed": confirmed})
            assert answer.status_code == 400
    with session_scope(sessions) as s:
        assert s.scalars(select(DeadLetter.status)).all() == ["open", "open"]


def test_the_reason_filter_takes_percent_and_underscore_literally(app, sessions):
    """`reason=%` or `_` are no wildcards: they match only reasons holding that character,
    so "Replay all matching" for them never means every letter."""
    now = utcnow()
    with session_scope(sessions) as s:
        s.execute(insert(DeadLetter), [
            {"entity": "student", "erp_key": key, "reason": reason, "attempts": 1,
             "status": "open", "first_failed_at": now, "last_failed_at": now}
            for key, reason in (("P", "quota at 100% used"), ("U", "bad date_of_birth"),
                                ("N", "plain refusal"), ("B", r"path C:\tmp refused"))])
    with app() as client:
        login(client, "ops", "ops-pw")

        def keys(reason: str) -> list[str]:
            return re.findall(r'class="key">([^<]+)<',
                              client.get("/letters", params={"reason": reason}).text)

        assert keys("%") == ["P"]
        assert keys("_") == ["U"]
        assert keys("100%") == ["P"]
        assert keys("\\") == ["B"]
        token = csrf_of(client.get("/letters"))
        confirm = client.post("/letters/action", data={
            "csrf": token, "action": "replay", "scope": "filter", "reason": "%",
            "status": "open"})
        assert "Replay 1 dead letter" in confirm.text


def test_logging_out_ends_the_session_a_copied_cookie_included(app):
    """After a logout, the session's cookie copied beforehand no longer opens a page nor
    passes a form (this console process keeps the ended session's nonce until it expires);
    another session of the same user goes on."""
    with app() as client, app() as other:
        login(client, "ops", "ops-pw")
        login(other, "ops", "ops-pw")
        copied = client.cookies["dokstamp_console"]
        token = csrf_of(client.get("/letters"))
        assert client.post("/logout", data={"csrf": token}).status_code == 303
        with app() as thief:
            thief.cookies.set("dokstamp_console", copied)
            answer = thief.get("/")
            assert (answer.status_code, answer.headers["location"]) == (303, "/login")
            answer = thief.post("/letters/action", data={
                "csrf": token, "action": "discard", "ids": "1", "confirmed": "yes"})
            assert answer.status_code == 303
        assert other.get("/").status_code == 200


def cells(page: str, table_id: str) -> list[list[str]]:
    """The text of each data row's cells in the table ``table_id`` (tags dropped)."""
    table = re.search(rf'<table[^>]*id="{table_id}"[^>]*>(.*?)</table>', page, re.S).group(1)
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>",
                                                                    row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", table, re.S) if "<td" in row]


def test_the_waiting_page_says_why_until_when_and_which_dependency(app, sessions):
    """A certificate parked for its course shows its key, what it waits for, the next attempt's
    time and the reason; a pending event is not listed; with nothing waiting it says so."""
    from datetime import timedelta

    now = utcnow()
    with session_scope(sessions) as s:
        s.add_all([
            InboxEvent(event_id="ev-cert-1", entity="certificate", op="upsert", erp_key="CERT-1",
                       occurred_at=now, payload={}, state="waiting", attempts=2,
                       waiting_for="course:CRS-9", next_attempt_at=now + timedelta(minutes=5),
                       last_error="waiting for course CRS-9 (not synced yet)"),
            InboxEvent(event_id="ev-pending", entity="student", op="upsert", erp_key="S-P",
                       occurred_at=now, payload={}, state="pending")])
    with session_scope(sessions) as s:
        until = str(s.scalar(select(InboxEvent.next_attempt_at).where(
            InboxEvent.event_id == "ev-cert-1")))
    with app() as client:
        login(client, "viewer", "viewer-pw")
        page = client.get("/waiting").text
        (row,) = cells(page, "waiting")
        assert row[1:] == ["certificate", "CERT-1", "ev-cert-1", "course:CRS-9", until, "2",
                           "waiting for course CRS-9 (not synced yet)"]
        assert '/mapping?entity=certificate&amp;key=CERT-1' in page
        with session_scope(sessions) as s:
            s.get(InboxEvent, int(row[0])).state = "synced"
        assert "Nothing waits." in client.get("/waiting").text


def test_the_mapping_lookup_shows_the_uuid_status_url_and_the_keys_events(app, sessions):
    """entity + ERP key: the DokStamp UUID, our status and DokStamp's, the verification URL,
    the key's events (newest first, with their outcome) and its dead letters; an unknown key
    says there is no mapping."""
    from datetime import timedelta

    now = utcnow()
    (letter_id,) = dead_events(sessions, "CERT-7", entity="certificate")
    with session_scope(sessions) as s:
        s.add(InboxEvent(event_id="ev-CERT-7-new", entity="certificate", op="upsert",
                         erp_key="CERT-7", occurred_at=now + timedelta(hours=1), payload={},
                         state="synced"))
        s.add(Mapping(entity="certificate", erp_key="CERT-7",
                      dokstamp_uuid="6f1c9a52-0000-4000-8000-00000000c007", status="active",
                      remote_status="issued", event_id="ev-CERT-7-new",
                      verification_url="https://verify.example.edu/c/6f1c9a52"))
    with app() as client:
        login(client, "viewer", "viewer-pw")
        page = client.get("/mapping", params={"entity": "certificate", "key": "CERT-7"}).text
        mapping = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)", page))
        assert mapping["DokStamp UUID"] == "6f1c9a52-0000-4000-8000-00000000c007"
        assert mapping["status"].startswith("active (DokStamp: issued)")
        assert mapping["verification URL"] == "https://verify.example.edu/c/6f1c9a52"
        events = [(r[1], r[2], r[4]) for r in cells(page, "events")]
        assert events == [("ev-CERT-7-new", "upsert", "synced"),
                          ("ev-CERT-7", "upsert", "dead")]
        assert f'<a href="/letters/{letter_id}">{letter_id}</a></td><td>open</td>' in page
        other = client.get("/mapping", params={"entity": "certificate", "key": "NOPE"}).text
        assert "No mapping for certificate NOPE." in other


def test_a_letters_page_shows_the_request_response_attempts_event_and_mapping(app, sessions):
    """A letter's page: DokStamp's request (method and path), HTTP status, attempts, first and
    last failure, DokStamp's response, the event's JSON, the key's events and its mapping."""
    from datetime import timedelta

    (ident,) = dead_events(sessions, "S-42")
    with session_scope(sessions) as s:
        letter = s.get(DeadLetter, ident)
        letter.request_method, letter.request_path = "POST", "/students"
        letter.attempts = 3
        letter.first_failed_at = letter.last_failed_at - timedelta(hours=2)
        letter.response_body = {"message": "The given data was invalid.",
                                "errors": {"date_of_birth": ["is required"]}}
        s.get(InboxEvent, letter.event_pk).payload = {"key": "S-42", "name": "Ana Lima"}
        s.add(Mapping(entity="student", erp_key="S-42", status="active",
                      dokstamp_uuid="0b7e0000-0000-4000-8000-000000000042"))
    with session_scope(sessions) as s:
        letter = s.get(DeadLetter, ident)
        failures = f"{letter.first_failed_at} / {letter.last_failed_at}"
    with app() as client:
        login(client, "viewer", "viewer-pw")
        page = client.get(f"/letters/{ident}").text

        def cell(name: str) -> str:
            return re.search(rf'<td id="{name}">([^<]*)</td>', page).group(1).strip()

        assert (cell("request"), cell("http-status"), cell("attempts")) == (
            "POST /students", "422", "3")
        assert cell("failures") == failures
        response = re.search(r'<pre id="response">(.*?)</pre>', page, re.S).group(1)
        assert "The given data was invalid." in response
        assert "is required" in response
        assert "Ana Lima" in re.search(r'<pre id="event">(.*?)</pre>', page, re.S).group(1)
        assert [(r[1], r[4]) for r in cells(page, "events")] == [("ev-S-42", "dead")]
        assert "0b7e0000-0000-4000-8000-000000000042" in re.search(
            r'<table id="mapping">(.*?)</table>', page, re.S).group(1)
        assert '<span id="event-state">dead</span>' in page


def event_states(sessions) -> dict[str, str]:
    with session_scope(sessions) as s:
        return dict(s.execute(select(InboxEvent.erp_key, InboxEvent.state)).all())


def test_replaying_the_ticked_letters_confirms_their_count_and_replays_only_them(app,
                                                                                sessions):
    """Tick two of three letters, Replay selected: the confirmation names the two, then both
    are replayed (their events pending again, the operator in their history), the third
    stays open."""
    first, second, third = dead_events(sessions, "S-1", "S-2", "S-3")
    with app() as client:
        login(client, "ops", "ops-pw")
        token = csrf_of(client.get("/letters"))
        form = {"csrf": token, "action": "replay", "ids": [str(first), str(third)]}
        confirm = client.post("/letters/action", data=form).text
        assert "Replay 2 dead letters?" in confirm
        assert f"Letters {first}, {third}." in confirm
        assert event_states(sessions) == {"S-1": "dead", "S-2": "dead", "S-3": "dead"}
        done = client.post("/letters/action", data=form | {"confirmed": "yes"}).text
        assert "2 letters replayed" in done
    assert event_states(sessions) == {"S-1": "pending", "S-2": "dead", "S-3": "pending"}
    with session_scope(sessions) as s:
        assert dict(s.execute(select(DeadLetter.id, DeadLetter.status)).all()) == {
            first: "replayed", second: "open", third: "replayed"}
        assert sorted(s.execute(select(LetterHistory.letter_id, LetterHistory.action,
                                       LetterHistory.actor)).all()) == [
            (first, "replayed", "ops"), (third, "replayed", "ops")]


def test_replaying_everything_a_filter_matches(app, sessions):
    """Replay all matching, filter entity=student: the confirmation counts the open student
    letters (3), then they are all replayed; the course letter and the already discarded
    student letter are left as they were."""
    students = dead_events(sessions, "S-1", "S-2", "S-3", "S-4")
    (course,) = dead_events(sessions, "CRS-1", entity="course")
    with session_scope(sessions) as s:
        s.get(DeadLetter, students[-1]).status = "discarded"
    with app() as client:
        login(client, "ops", "ops-pw")
        token = csrf_of(client.get("/letters?entity=student"))
        form = {"csrf": token, "action": "replay", "scope": "filter", "entity": "student",
                "status": "open"}
        assert "Replay 3 dead letters?" in client.post("/letters/action", data=form).text
        done = client.post("/letters/action", data=form | {"confirmed": "yes"}).text
        assert "3 letters replayed" in done
    assert event_states(sessions) == {"S-1": "pending", "S-2": "pending", "S-3": "pending",
                                      "S-4": "dead", "CRS-1": "dead"}
    with session_scope(sessions) as s:
        assert s.scalar(select(DeadLetter.status).where(DeadLetter.id == course)) == "open"
