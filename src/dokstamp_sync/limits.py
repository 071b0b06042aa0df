"""The limits of one ERP event (docs/erp-guide.md, "Limits"): size, nesting, strings, time range.

:func:`dokstamp_sync.events.parse_event` applies them, the size and the nesting before the JSON
is decoded (so no entry can exhaust the parser), the rest after. Each check returns ``None`` or
one reason naming the field; the caller turns a reason into an ``InvalidEvent``. Anything beyond
a limit is a dead letter, never a stuck consumer or a value the database cannot store.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

MAX_JSON_BYTES = 1024 * 1024  # one stream entry's JSON, a file's content_base64 aside
FILE_MAX_BYTES = 10 * 1024 * 1024  # the default of DOKSTAMP_SYNC_FILE_MAX_BYTES
# The default of DOKSTAMP_SYNC_INGEST_BATCH_BYTES: four of the largest valid entries (~14 MiB).
INGEST_BATCH_BYTES = 64 * 1024 * 1024
RESPONSE_MAX_BYTES = 8 * 1024 * 1024  # the default of DOKSTAMP_MAX_RESPONSE_BYTES
MAX_DEPTH = 32  # objects and arrays, the event itself being level 1
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
FUTURE_SLACK = timedelta(days=1)  # clocks differ; a day ahead of ours is a wrong date

# NUL (PostgreSQL text cannot hold it) and surrogates: in a decoded str any surrogate is a lone
# one (JSON pairs become one code point), and no UTF-8 encoder can write it.
UNSAFE = re.compile("[\x00\ud800-\udfff]")
IDENTITY = ("event_id", "entity", "key")  # the fields a dead letter is found by
_STRUCTURE = re.compile(r'["\\\[\]{}]')


def base64_length(size: int) -> int:
    """The length of ``size`` bytes in base64 (4 characters per 3 bytes, padded)."""
    return 4 * ((size + 2) // 3)


def largest_entry(max_file_bytes: int) -> int:
    """Bytes of the largest valid stream entry: its ``event`` field name and JSON, 1 MiB
    besides a file's ``content_base64`` of up to ``max_file_bytes``."""
    return len("event") + MAX_JSON_BYTES + base64_length(max_file_bytes)


def size_problem(size: int, max_file_bytes: int) -> str | None:
    """Before decoding: an entry larger than the largest valid one (any entity)."""
    most = MAX_JSON_BYTES + base64_length(max_file_bytes)
    if size > most:
        return (f"the event is {size} bytes, more than the limit of {most} (1 MiB of JSON "
                f"plus a file's content_base64 of up to {max_file_bytes} bytes)")
    return None


def content_problem(body: dict[str, Any], size: int | None, max_file_bytes: int) -> str | None:
    """After decoding: 1 MiB of JSON, plus (for a file) its content_base64 up to the file
    size limit. ``size`` is the entry's length in bytes (None: not known, a dict was given)."""
    data = body.get("data")
    content = data.get("content_base64") if isinstance(data, dict) else None
    encoded = len(content) if isinstance(content, str) and body.get("entity") == "file" else 0
    allowed = base64_length(max_file_bytes)
    if encoded > allowed:
        return (f"data.content_base64 is {encoded} characters, more than a file of "
                f"{max_file_bytes} bytes (the file size limit) takes in base64 ({allowed})")
    if size is not None and size - encoded > MAX_JSON_BYTES:
        return (f"the event is {size - encoded} bytes of JSON"
                f"{' besides data.content_base64' if encoded else ''}, more than the limit "
                f"of 1 MiB ({MAX_JSON_BYTES} bytes)")
    return None


def scan(text: str) -> tuple[str | None, dict[str, str]]:
    """Before decoding: (the nesting problem or None, the event's own string fields named in
    ``IDENTITY``). The brackets are counted outside strings, so nesting deeper than
    :data:`MAX_DEPTH` is refused before ``json.loads`` recurses once per level; the fields let
    even an entry that never decodes keep its ``event_id``, ``entity`` and ``key``."""
    depth, in_string, escaped_at, start = 0, False, -1, -1
    problem: str | None = None
    fields: dict[str, str] = {}
    last: tuple[int, str] = (-1, "")  # the previous string of the event's own level
    for match in _STRUCTURE.finditer(text):
        at, char = match.start(), match.group()
        if in_string:
            if at == escaped_at:
                continue
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
                if depth == 1:
                    last = _pair(text, last, start, at, fields)
            continue
        if char == '"':
            in_string, start = True, at
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH and problem is None:
                problem = f"{_name(last[1])} is nested deeper than {MAX_DEPTH} levels"
        elif char in "]}":
            depth -= 1
    return problem, fields


def _pair(text: str, last: tuple[int, str], start: int, end: int,
          fields: dict[str, str]) -> tuple[int, str]:
    """Note ``"name": "value"`` at the event's own level when ``name`` is in IDENTITY."""
    literal = text[start:end + 1]
    if last[0] >= 0 and text[last[0] + 1:start].strip() == ":" and len(literal) < 4096:
        name, value = _string(last[1]), _string(literal)
        if name in IDENTITY and value is not None:
            fields.setdefault(name, value)
    return end, literal


def _string(literal: str) -> str | None:
    try:
        value = json.loads(literal)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _name(literal: str) -> str:
    name = _string(literal) if literal else None
    return safe_text(name)[:60] if name else "the event"


def walk_problem(body: Any) -> str | None:
    """After decoding: nesting, and strings (keys included) with a NUL or a lone surrogate."""
    stack: list[tuple[str, int, Any]] = [("", 1, body)]
    while stack:
        path, depth, value = stack.pop()
        if isinstance(value, str):
            problem = string_problem(value)
            if problem:
                return f"{path or 'the event'} {problem}"
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                return f"{path.partition('.')[0] or 'the event'} is nested deeper than " \
                       f"{MAX_DEPTH} levels"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for name, item in items:
                if isinstance(name, str):
                    problem = string_problem(name)
                    if problem:
                        return f'a key in {path or "the event"} ("{safe_text(name)[:60]}") ' \
                               f"{problem}"
                where = f"{path}.{name}" if isinstance(name, str) else f"{path}[{name}]"
                stack.append((where.removeprefix("."), depth + 1, item))
    return None


def string_problem(text: str) -> str | None:
    """``contains a NUL character`` or ``contains an invalid code point ...``, else None."""
    found = UNSAFE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character"
    return f"contains an invalid code point (a lone surrogate U+{ord(found.group()):04X})"


def time_problem(at: datetime, now: datetime | None = None) -> str | None:
    """``occurred_at`` between 1970-01-01 and one day after the worker's clock."""
    latest = (now or datetime.now(UTC)) + FUTURE_SLACK
    try:
        within = EARLIEST <= at <= latest
    except OverflowError:  # comparing aware datetimes near year 1 or 9999
        within = False
    if within:
        return None
    return (f"occurred_at {at.isoformat()} is out of range: it must be between 1970-01-01 and "
            f"one day after the worker's clock ({latest.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ})")


def safe_text(text: str) -> str:
    """``text`` with NUL and lone surrogates written as ``\\u0000``/``\\ud800`` (storable)."""
    return UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
