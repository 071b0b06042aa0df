"""Small builders of DokStamp entities for tests (valid payloads with unique natural keys)."""

from __future__ import annotations

import itertools
from typing import Any

from dokstamp_sync.dokstamp import DokStampClient, Entity, Upload

_seq = itertools.count(1)


def n() -> int:
    return next(_seq)


def institution(c: DokStampClient, **kw: Any) -> Entity:
    return c.institutions.create({"name": f"University {n()}", "country": "Brazil"} | kw)


def module(c: DokStampClient, inst: Entity, **kw: Any) -> Entity:
    return c.modules.create({"name": "Module", "code": f"M{n()}",
                             "institution_uuid": inst["uuid"]} | kw)


def course(c: DokStampClient, inst: Entity, **kw: Any) -> Entity:
    return c.courses.create({"name": "Course", "code": f"C-{n()}",
                             "institution_uuid": inst["uuid"], "status": "active"} | kw)


def student(c: DokStampClient, **kw: Any) -> Entity:
    i = n()
    return c.students.create({"name": f"Student {i}", "email": f"s{i}@example.edu",
                              "date_of_birth": "2000-01-01"} | kw)


def pdf(i: int | None = None) -> Upload:
    i = n() if i is None else i
    return Upload(f"diploma-{i}.pdf", b"%PDF-1.4\n% diploma " + str(i).encode() + b"\n%%EOF\n")


def certificate_graph(c: DokStampClient) -> dict[str, Entity]:
    """An institution, course, student and an unused file: what a certificate needs."""
    inst = institution(c)
    crs = course(c, inst)
    stu = student(c)
    file = c.files.upload([pdf()])[0]
    return {"institution": inst, "course": crs, "student": stu, "file": file}


def certificate_fields(g: dict[str, Entity]) -> dict[str, str]:
    return {"institution_uuid": g["institution"]["uuid"], "course_uuid": g["course"]["uuid"],
            "student_uuid": g["student"]["uuid"], "file_uuid": g["file"]["uuid"]}
