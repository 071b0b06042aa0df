"""Strict mode: only the filters the docs show apply; the rest are dropped as a lenient query
builder drops them, so a search on an undocumented field matches everything."""

from __future__ import annotations

import pytest

import graph
from dokstamp_sync.dokstamp import errors
from dokstamp_sync.sandbox.schema import DOCUMENTED_FILTERS, RESOURCES


@pytest.fixture
def strict(sandbox):
    """The sandbox in strict mode."""
    sandbox.sandbox.config.strict = True
    return sandbox


def test_strict_mode_drops_undocumented_filters(strict, client):
    """Institutions by name, enrollments by student, certificates by file, and a typo all
    return every row in strict mode (no 400, no filtering)."""
    a, b = graph.certificate_graph(client), graph.certificate_graph(client)
    for g in (a, b):
        client.enrollments.create({"student_uuid": g["student"]["uuid"],
                                   "course_uuid": g["course"]["uuid"],
                                   "enrolled_at": "2024-01-01"})
        client.certificates.create(graph.certificate_fields(g), issue=True)
    assert len(client.institutions.find(name=a["institution"]["name"])) == 2
    assert len(client.enrollments.find(student_uuid=a["student"]["uuid"])) == 2
    assert len(client.certificates.find(file_uuid=a["file"]["uuid"])) == 2
    assert len(client.students.find(emial="typo@example.edu")) == 2


def test_lenient_mode_filters_on_any_field(sandbox, client):
    """Without strict mode the same undocumented filters do filter, and a typo is a 400: the
    contrast that makes strict mode worth testing against."""
    a, _b = graph.institution(client), graph.institution(client)
    assert len(client.institutions.find(name=a["name"])) == 1
    with pytest.raises(errors.ClientError) as info:
        client.students.find(emial="typo@example.edu")
    assert info.value.status == 400


def test_strict_mode_keeps_the_documented_filters(strict, client):
    """Every filter the docs show still filters in strict mode (students by email, modules by
    code and institution, certificates by student, files by used_at...)."""
    a, b = graph.certificate_graph(client), graph.certificate_graph(client)
    client.certificates.create(graph.certificate_fields(a), issue=True)
    mod = graph.module(client, a["institution"])
    graph.module(client, b["institution"])
    assert [s["uuid"] for s in client.students.find(email=a["student"]["email"])] == [
        a["student"]["uuid"]]
    assert [m["uuid"] for m in client.modules.find(
        code=mod["code"], institution_uuid=a["institution"]["uuid"])] == [mod["uuid"]]
    assert len(client.certificates.find(student_uuid=a["student"]["uuid"])) == 1
    assert len(client.certificates.find(student_uuid=b["student"]["uuid"])) == 0
    assert [f["uuid"] for f in client.files.find(used_at=None)] == [b["file"]["uuid"]]
    assert len(client.courses.find(code=a["course"]["code"])) == 1


def test_documented_filters_are_fields_the_sandbox_knows():
    """The one table of documented filters names only collections and fields that exist."""
    for collection, names in DOCUMENTED_FILTERS.items():
        known = set(RESOURCES[collection].fields) | {"status", "used_at"}
        assert names <= known, collection
    assert set(DOCUMENTED_FILTERS) == set(RESOURCES)


def test_strict_certificates_show_files_never_file_uuid(strict, client):
    """In strict mode a certificate (create answer, GET, list) shows its file only as
    files: [{type, uuid}], as the documented certificate object does."""
    g = graph.certificate_graph(client)
    created = client.certificates.create(graph.certificate_fields(g), issue=True)
    shown = [created, client.certificates.get(created["uuid"]), *client.certificates.find()]
    for cert in shown:
        assert "file_uuid" not in cert
        assert cert["files"] == [{"type": "certificate", "uuid": g["file"]["uuid"]}]
