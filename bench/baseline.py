"""The baseline: the DokStamp docs' integration pattern, done synchronously by a plain script.

Search then create every entity, one upload per file, one certificate at a time: what a first
integration written from the docs does. Run by bench/run.py on the same sandbox, side by side.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

from dokstamp_sync.dokstamp import DokStampClient, Upload
from dokstamp_sync.dokstamp.client import Resource
from dokstamp_sync.dokstamp.errors import RateLimited


def _call(fn: Callable[[], Any]) -> Any:
    """The docs' advice: retry on 429 after Retry-After."""
    while True:
        try:
            return fn()
        except RateLimited as exc:
            time.sleep(exc.retry_after or 1.0)


def _ensure(resource: Resource, where: dict[str, Any], fields: dict[str, Any]) -> str:
    found = _call(lambda: resource.find_one(**where))
    if found is not None:
        return str(found["uuid"])
    return str(_call(lambda: resource.create(fields))["uuid"])


def run(client: DokStampClient, events: list[dict[str, Any]]) -> None:
    """Sync a graduating class (samples.graduating_class events) the naive way."""
    by = {(e["entity"], e["key"]): e["data"] for e in events if e["op"] == "upsert"}
    uuid: dict[tuple[str, str], str] = {}

    def ref(entity: str, key: str) -> str:
        return uuid[(entity, key)]

    for (entity, key), d in by.items():
        if entity == "institution":
            uuid[(entity, key)] = _ensure(client.institutions, {"name": d["name"]}, dict(d))
        elif entity == "module":
            inst = ref("institution", d["institution_key"])
            fields = {k: v for k, v in d.items() if k != "institution_key"}
            uuid[(entity, key)] = _ensure(client.modules, {"code": d["code"],
                                                           "institution_uuid": inst},
                                          fields | {"institution_uuid": inst})
        elif entity == "course":
            inst = ref("institution", d["institution_key"])
            fields = {k: v for k, v in d.items() if k not in ("institution_key", "modules")}
            course = _ensure(client.courses, {"code": d["code"]},
                             fields | {"institution_uuid": inst})
            uuid[(entity, key)] = course
            _call(lambda c=course, mods=d["modules"]: client.courses.attach_modules(c, [
                {"uuid": ref("module", m["module_key"]), "order": m["order"]} for m in mods]))
        elif entity == "cohort":
            fields = {k: v for k, v in d.items() if k != "course_key"}
            uuid[(entity, key)] = _ensure(client.cohorts, {"code": d["code"]}, fields | {
                "course_uuid": ref("course", d["course_key"])})
        elif entity == "student":
            uuid[(entity, key)] = _ensure(client.students, {"email": d["email"]}, dict(d))
        elif entity == "enrollment":
            stu, crs = ref("student", d["student_key"]), ref("course", d["course_key"])
            fields = {k: v for k, v in d.items() if not k.endswith("_key")}
            uuid[(entity, key)] = _ensure(
                client.enrollments, {"student_uuid": stu, "course_uuid": crs},
                fields | {"student_uuid": stu, "course_uuid": crs,
                          "cohort_uuid": ref("cohort", d["cohort_key"])})
        elif entity == "file":
            content = base64.b64decode(d["content_base64"])
            uuid[(entity, key)] = str(_call(lambda n=d["filename"], c=content:
                                            client.files.upload([Upload(n, c)]))[0]["uuid"])
        elif entity == "certificate":
            course = ref("course", d["course_key"])
            fields = {"institution_uuid": by_inst(by, uuid, d), "course_uuid": course,
                      "student_uuid": ref("student", d["student_key"]),
                      "file_uuid": ref("file", d["file_key"]),
                      "cohort_uuid": ref("cohort", d["cohort_key"]),
                      "enrollment_uuid": ref("enrollment", d["enrollment_key"])}
            found = _call(lambda f=fields: client.certificates.find_one(
                file_uuid=f["file_uuid"]))
            issued_at = d.get("issued_at")
            if found is None:
                _call(lambda f=fields, at=issued_at: client.certificates.create(
                    f, issue=True, issued_at=at))


def by_inst(by: dict[tuple[str, str], Any], uuid: dict[tuple[str, str], str],
            d: dict[str, Any]) -> str:
    """A certificate's institution: its course's."""
    return uuid[("institution", by[("course", d["course_key"])]["institution_key"])]
