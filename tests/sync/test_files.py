"""File sources: url (allow-listed hosts), path (under the root, no escapes), base64; sizes."""

from __future__ import annotations

import base64
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo.samples import diploma_pdf, event
from dokstamp_sync.models import InboxEvent
from dokstamp_sync.testing import Harness, calls, live

PDF = diploma_pdf("Maria", "BSc")
OTHER = diploma_pdf("João", "MSc")
SLOW_S = 1.5  # /slow.pdf answers after this long


class _Docs(BaseHTTPRequestHandler):
    def do_GET(self):  # the stdlib's handler method name
        if self.path in ("/diploma.pdf", "/other.pdf", "/slow.pdf"):
            if self.path == "/slow.pdf":
                time.sleep(SLOW_S)
            body = OTHER if self.path == "/other.pdf" else PDF
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/down.pdf":
            self.send_response(503)
            self.end_headers()
        elif self.path == "/busy.pdf":
            self.send_response(429)
            self.send_header("Retry-After", "120")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def doc_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Docs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fh(make_ctx, tmp_path):
    return Harness(make_ctx(file_root=tmp_path, hosts=["127.0.0.1"]))


def test_file_from_an_allowed_url_is_uploaded(fh, doc_server, sandbox):
    """A url on an allow-listed host is fetched and uploaded as multipart."""
    e = event("file", "F-1", {"url": f"{doc_server}/diploma.pdf", "filename": "d.pdf"})
    assert fh.sync(e) == ["synced"]
    (f,) = sandbox.sandbox.tenants["demo-university"].dump()["files"]
    assert f["size"] == len(PDF)
    assert f["mime_type"] == "application/pdf"


def test_url_on_a_host_not_allowed_is_dead_lettered(fh, sandbox):
    """Only hosts in DOKSTAMP_SYNC_FILE_HOSTS may be fetched."""
    e = event("file", "F-1", {"url": "http://localhost:9/x.pdf", "filename": "d.pdf"})
    assert fh.sync(e) == ["dead"]
    assert "not in DOKSTAMP_SYNC_FILE_HOSTS" in fh.letters()[0].reason


def test_document_server_down_is_retried_not_dead(fh, doc_server):
    """A 503 from the ERP's document server is transient: the event waits."""
    e = event("file", "F-1", {"url": f"{doc_server}/down.pdf", "filename": "d.pdf"})
    assert fh.sync(e) == ["waiting"]


def test_document_missing_is_dead(fh, doc_server):
    """A 404 from the document server will not change by retrying: dead letter."""
    e = event("file", "F-1", {"url": f"{doc_server}/nope.pdf", "filename": "d.pdf"})
    assert fh.sync(e) == ["dead"]
    assert "404" in fh.letters()[0].reason


def test_path_under_the_root_is_read(fh, tmp_path, sandbox):
    """A path under DOKSTAMP_SYNC_FILE_ROOT is read and uploaded."""
    (tmp_path / "diplomas").mkdir()
    (tmp_path / "diplomas" / "d.pdf").write_bytes(PDF)
    assert fh.sync(event("file", "F-1", {"path": "diplomas/d.pdf", "filename": "d.pdf"})) == [
        "synced"]


@pytest.mark.parametrize("path", ["../secret.pdf", "/etc/passwd", "diplomas/../../x.pdf"])
def test_path_escaping_the_root_is_refused(fh, path):
    """No .. or absolute path may leave the configured folder."""
    assert fh.sync(event("file", "F-1", {"path": path, "filename": "d.pdf"})) == ["dead"]
    assert "escapes" in fh.letters()[0].reason


def test_base64_content_and_size_limit(fh, sandbox):
    """content_base64 is decoded; more than the size limit is refused; bad base64 too."""
    ok = event("file", "F-1", {"content_base64": base64.b64encode(PDF).decode(),
                               "filename": "d.pdf"})
    big = event("file", "F-2", {"content_base64": base64.b64encode(b"x" * 1_000_001).decode(),
                                "filename": "big.pdf"})
    bad = event("file", "F-3", {"content_base64": "***", "filename": "d.pdf"})
    assert fh.sync(ok, big, bad) == ["synced", "dead", "dead"]
    reasons = [d.reason for d in fh.letters()]
    assert "larger than the limit" in reasons[0]
    assert "not valid base64" in reasons[1]


def test_same_content_twice_uploads_once(fh, sandbox):
    """Two file events with identical bytes: one upload, both mapped to the same file."""
    data = {"content_base64": base64.b64encode(PDF).decode(), "filename": "d.pdf"}
    fh.sync(event("file", "F-1", data), event("file", "F-2", data))
    assert sandbox.sandbox.stats.by_route["POST /files"] == 1
    assert fh.mapping("file", "F-1").dokstamp_uuid == fh.mapping("file", "F-2").dokstamp_uuid


def _inbox(h: Harness, pk: int) -> InboxEvent:
    with session_scope(h.ctx.sessions) as s:
        row = s.get(InboxEvent, pk)
        assert row is not None
        s.expunge(row)
        return row


def test_one_failing_document_never_fails_the_others_of_its_upload(fh, doc_server, sandbox):
    """One upload batch: the event's own file and a healthy companion are uploaded in one
    POST /files and synced; companions whose source fails (a 503, a 404, a URL that does not
    parse) are left to their own tasks, which classify them per file: the 503 waits to be
    retried, the 404 and the malformed URL are dead letters. DokStamp holds the two files."""
    pks = fh.send(
        event("file", "F-own", {"url": f"{doc_server}/diploma.pdf", "filename": "own.pdf"}),
        event("file", "F-down", {"url": f"{doc_server}/down.pdf", "filename": "down.pdf"}),
        event("file", "F-bad", {"url": "http://[::1/x.pdf", "filename": "bad.pdf"}),
        event("file", "F-gone", {"url": f"{doc_server}/nope.pdf", "filename": "gone.pdf"}),
        event("file", "F-ok", {"url": f"{doc_server}/other.pdf", "filename": "ok.pdf"}))
    assert fh.run(pks[:1]) == ["synced"]
    assert calls(sandbox)["POST /files"] == 1
    states = {e.split("-")[-1]: s for e, s in fh.states().items()}
    assert states == {"own": "synced", "ok": "synced", "down": "pending", "bad": "pending",
                      "gone": "pending"}
    assert sorted(f["size"] for f in live(sandbox, "files")) == sorted([len(PDF), len(OTHER)])
    assert fh.run(pks[1:]) == ["waiting", "dead", "dead", "synced"]
    assert "document server" in (_inbox(fh, pks[1]).last_error or "")
    bad, gone = (d.reason for d in fh.letters())
    assert "not a valid URL" in bad
    assert "404" in gone
    assert calls(sandbox)["POST /files"] == 1  # nothing else was uploaded
    assert len(live(sandbox, "files")) == 2


def test_document_server_rate_limit_waits_for_its_retry_after(fh, doc_server):
    """A 429 from the document server is transient and its Retry-After is honoured: the event
    waits at least that long, then is retried."""
    pk, = fh.send(event("file", "F-1", {"url": f"{doc_server}/busy.pdf", "filename": "d.pdf"}))
    assert fh.run([pk]) == ["waiting"]
    row = _inbox(fh, pk)
    assert (row.next_attempt_at - datetime.now(UTC)).total_seconds() > 100
    assert "document server" in (row.last_error or "")


def test_document_server_timeout_is_retried_not_dead(make_ctx, doc_server, tmp_path):
    """A document server that does not answer in time is transient: the event waits."""
    slow = Harness(make_ctx(file_root=tmp_path, hosts=["127.0.0.1"], timeout=SLOW_S / 3))
    pk, = slow.send(event("file", "F-1", {"url": f"{doc_server}/slow.pdf", "filename": "d.pdf"}))
    assert slow.run([pk]) == ["waiting"]
    assert "document server" in (_inbox(slow, pk).last_error or "")
