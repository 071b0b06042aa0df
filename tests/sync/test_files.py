"""File sources: url (allow-listed hosts), path (under the root, no escapes), base64; sizes."""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dokstamp_sync.demo.samples import diploma_pdf, event
from dokstamp_sync.testing import Harness

PDF = diploma_pdf("Maria", "BSc")


class _Docs(BaseHTTPRequestHandler):
    def do_GET(self):  # the stdlib's handler method name
        if self.path == "/diploma.pdf":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PDF)))
            self.end_headers()
            self.wfile.write(PDF)
        elif self.path == "/down.pdf":
            self.send_response(503)
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
