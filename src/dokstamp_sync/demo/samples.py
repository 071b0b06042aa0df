"""Realistic ERP events for a graduating class: used by the tests, the demo and the benchmark.

:func:`graduating_class` returns the whole graph as docs/erp-guide.md events: one institution, its
modules, courses with modules attached, cohorts, and per student a student, an enrollment, a
diploma PDF (``content_base64``) and an issued certificate.
"""

from __future__ import annotations

import base64
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

_ids = itertools.count(1)


def diploma_pdf(name: str, course: str) -> bytes:
    """A small, valid, unique PDF naming the graduate."""
    text = f"Diploma: {name}, {course}".replace("(", "[").replace(")", "]")
    stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def event(entity: str, key: str, data: dict[str, Any] | None = None, *, op: str = "upsert",
          at: datetime | None = None, event_id: str | None = None) -> dict[str, Any]:
    """One docs/erp-guide.md event."""
    when = at or datetime.now(UTC)
    out: dict[str, Any] = {"event_id": event_id or f"erp-{next(_ids):08d}-{entity}-{key}",
                           "entity": entity, "op": op, "key": key,
                           "occurred_at": when.isoformat().replace("+00:00", "Z")}
    if data is not None:
        out["data"] = data
    return out


def graduating_class(students: int = 50, *, prefix: str = "", courses: int = 2,
                     modules_per_course: int = 3, issue: bool = True) -> list[dict[str, Any]]:
    """The whole graph for ``students`` graduates, parents before children."""
    t0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    p = prefix
    out = [event("institution", f"{p}INST", {"name": f"Federal University of Technology{p}",
                                             "country": "Brazil", "status": "active"}, at=t0)]
    course_keys = []
    for c in range(1, courses + 1):
        module_keys = []
        for m in range(1, modules_per_course + 1):
            key = f"{p}MOD-{c}{m:02d}"
            module_keys.append(key)
            out.append(event("module", key, {
                "name": f"Module {c}.{m}", "code": f"{p}M{c}{m:02d}"[:20],
                "institution_key": f"{p}INST", "workload": 60, "credits": 4,
                "modality": "hybrid", "level": "undergraduate"}, at=t0))
        key = f"{p}CRS-{c}"
        course_keys.append(key)
        out.append(event("course", key, {
            "name": f"Bachelor Programme {c}", "code": f"{p}BSC-{c}", "status": "active",
            "institution_key": f"{p}INST", "workload_hours": 3200,
            "modules": [{"module_key": mk, "order": i, "is_required": True, "workload": 60}
                        for i, mk in enumerate(module_keys, 1)]}, at=t0))
        out.append(event("cohort", f"{p}COH-{c}", {
            "code": f"{p}BSC-{c}-2026", "course_key": key, "modality": "hybrid",
            "start_date": "2022-02-01T00:00:00Z", "end_date": "2026-12-15T00:00:00Z"}, at=t0))
    for s in range(1, students + 1):
        c = (s - 1) % courses + 1
        name = f"Graduate {p}{s:05d}"
        skey, email = f"{p}S-{s:05d}", f"graduate{p.lower()}{s:05d}@example.edu"
        course, cohort = course_keys[c - 1], f"{p}COH-{c}"
        out.append(event("student", skey, {"name": name, "email": email,
                                           "date_of_birth": "2001-05-20"}, at=t0))
        out.append(event("enrollment", f"{p}ENR-{s:05d}", {
            "student_key": skey, "course_key": course, "cohort_key": cohort,
            "enrolled_at": "2022-02-01", "completion_status": "completed", "grade": 8.5},
            at=t0))
        pdf = diploma_pdf(name, f"Bachelor Programme {c}")
        out.append(event("file", f"{p}DIP-{s:05d}", {
            "filename": f"diploma-{skey}.pdf",
            "content_base64": base64.b64encode(pdf).decode()}, at=t0))
        out.append(event("certificate", f"{p}CERT-{s:05d}", {
            "student_key": skey, "course_key": course, "cohort_key": cohort,
            "enrollment_key": f"{p}ENR-{s:05d}", "file_key": f"{p}DIP-{s:05d}",
            "issue": issue, "issued_at": "2026-12-20T00:00:00Z"},
            at=t0 + timedelta(seconds=1)))
    return out
