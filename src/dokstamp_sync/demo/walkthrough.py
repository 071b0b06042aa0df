"""One certificate through the whole DokStamp graph, by hand, with the client.

institution -> module -> course -> attach -> cohort -> student -> enrollment -> file ->
certificate, each created only after a search on its natural key found nothing (DokStamp has no
idempotency keys), so running it twice creates nothing new. It is what ``dokstamp-sync
walkthrough`` shows, and a smoke test of the client against any DokStamp (or the sandbox).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dokstamp_sync.dokstamp import DokStampClient, Entity, Upload
from dokstamp_sync.dokstamp.client import Resource

SAMPLE_PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
              b"2 0 obj<</Type/Pages/Count 0/Kids[]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def _ensure(resource: Resource, where: dict[str, Any], fields: dict[str, Any],
            say: Callable[[str], None], label: str) -> Entity:
    found = resource.find_one(**where)
    if found is not None:
        say(f"found    {label:<12} {found['uuid']}")
        return found
    created = resource.create(fields)
    say(f"created  {label:<12} {created['uuid']}")
    return created


def walk(client: DokStampClient, say: Callable[[str], None] = print, *,
         suffix: str = "") -> dict[str, Entity]:
    """Sync one sample certificate; return every entity by kind. ``suffix`` varies the keys."""
    out: dict[str, Entity] = {}
    out["institution"] = inst = _ensure(
        client.institutions, {"name": f"Federal University of Technology{suffix}"},
        {"name": f"Federal University of Technology{suffix}", "country": "Brazil",
         "status": "active"}, say, "institution")
    out["module"] = module = _ensure(
        client.modules, {"code": f"CS101{suffix}", "institution_uuid": inst["uuid"]},
        {"name": "Introduction to Programming", "code": f"CS101{suffix}",
         "institution_uuid": inst["uuid"], "workload": 60, "credits": 3, "modality": "hybrid",
         "level": "undergraduate"}, say, "module")
    out["course"] = course = _ensure(
        client.courses, {"code": f"BCS-2024{suffix}"},
        {"name": "Bachelor of Computer Science", "code": f"BCS-2024{suffix}",
         "institution_uuid": inst["uuid"], "workload_hours": 3200, "status": "active"},
        say, "course")
    if any(m["uuid"] == module["uuid"] for m in client.courses.attachable_modules(course["uuid"])):
        client.courses.attach_modules(course["uuid"], [
            {"uuid": module["uuid"], "order": 1, "is_required": True, "workload": 60}])
        say(f"attached module      {module['uuid']} to the course")
    else:
        say("attached module      (already attached)")
    out["cohort"] = cohort = _ensure(
        client.cohorts, {"code": f"BCS-2024-EVE{suffix}"},
        {"course_uuid": course["uuid"], "code": f"BCS-2024-EVE{suffix}", "modality": "hybrid",
         "start_date": "2024-02-01T00:00:00Z", "end_date": "2027-12-31T00:00:00Z"},
        say, "cohort")
    email = f"maria{suffix}@example.edu".lower()
    out["student"] = student = _ensure(
        client.students, {"email": email},
        {"name": "Maria Fernanda Silva", "email": email, "date_of_birth": "1998-05-20"},
        say, "student")
    out["enrollment"] = enrollment = _ensure(
        client.enrollments, {"student_uuid": student["uuid"], "course_uuid": course["uuid"]},
        {"student_uuid": student["uuid"], "course_uuid": course["uuid"],
         "cohort_uuid": cohort["uuid"], "enrolled_at": "2024-02-01",
         "completion_status": "completed", "grade": 8.75}, say, "enrollment")
    # Uploads are deduplicated by content: re-uploading returns the same file record.
    pdf = SAMPLE_PDF + f"% diploma of {email}\n".encode()
    out["file"] = file = client.files.upload([Upload("diploma-maria-silva.pdf", pdf)])[0]
    say(f"uploaded file        {file['uuid']}")
    existing = client.certificates.find_one(file_uuid=file["uuid"])
    if existing is not None:
        say(f"found    certificate  {existing['uuid']} ({existing['status']})")
        out["certificate"] = existing
        return out
    out["certificate"] = cert = client.certificates.create(
        {"institution_uuid": inst["uuid"], "course_uuid": course["uuid"],
         "student_uuid": student["uuid"], "file_uuid": file["uuid"],
         "cohort_uuid": cohort["uuid"], "enrollment_uuid": enrollment["uuid"]}, issue=True)
    say(f"issued   certificate  {cert['uuid']} -> {cert['public_verification_url']}")
    return out
