"""Reading stream entries in batches bounded by bytes as well as by count.

``XREADGROUP COUNT n`` hands over n entries whatever their size: 200 entries of 14 MiB are
gigabytes in the worker's main process, and after a crash the same pending batch comes first
again. Here a Lua script measures the entries on the Redis side, one at a time, before any is
sent: it takes them in stream order while they fit in ``max_bytes`` (fields and values counted),
so a read never hands over more. An entry larger than ``max_bytes`` alone is never sent: when it
comes first, it is delivered to this consumer (pending) and only its id and size come back, for
the caller to dead-letter and acknowledge; the entries after it come with the next read.

Three ways to name the candidates: ``>`` the group's new entries (taken with ``XREADGROUP``, so
the group's cursor moves), ``0`` this consumer's own pending entries, or a list of ids already
claimed by this consumer (``XAUTOCLAIM ... JUSTID``, which sends no data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from dokstamp_sync.pipeline.inbox import StreamEntry

# KEYS[1] stream; ARGV: group, consumer, mode (">", "0" or "ids"), count, max_bytes, ids...
# Answers {entries, gone ids, {big id, size} or {}}; entries as XREADGROUP's {id, fields}.
_READ = """
local stream, group, consumer, mode = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local count, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('EXISTS', stream) == 0 then
  return redis.error_reply('NOGROUP no such key ' .. stream)
end
local function size_of(fields)
  local n = 0
  for i = 1, #fields do n = n + #fields[i] end
  return n
end
-- One entry at a time (XRANGE COUNT 1), so the script never holds more than one unsent.
local function at(id)
  local found = redis.call('XRANGE', stream, id, id)
  return found[1]
end
local ids, cursor = {}, nil
if mode == '>' then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] end
      if g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == group then cursor = last end
  end
  if not cursor then return redis.error_reply('NOGROUP no such consumer group ' .. group) end
elseif mode == '0' then
  for _, p in ipairs(redis.call('XPENDING', stream, group, '-', '+', count, consumer)) do
    ids[#ids + 1] = p[1]
  end
else
  for i = 6, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local entries, gone, big, total, taken = {}, {}, {}, 0, 0
local index = 0
while taken < count do
  local entry
  if mode == '>' then
    local found = redis.call('XRANGE', stream, '(' .. cursor, '+', 'COUNT', 1)
    entry = found[1]
    if not entry then break end
    cursor = entry[1]
  else
    index = index + 1
    if index > #ids then break end
    entry = at(ids[index])
    if not entry then
      gone[#gone + 1] = ids[index]
    end
  end
  if entry then
    local size = size_of(entry[2])
    if size > budget then
      if taken == 0 and #entries == 0 then
        big = {entry[1], size}
        taken = 1
      end
      break
    end
    if total + size > budget then break end
    total = total + size
    taken = taken + 1
    if mode ~= '>' then entries[#entries + 1] = entry end
  end
end
if mode == '>' and taken > 0 then
  local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', taken,
                          'STREAMS', stream, '>')
  if #big == 0 and read then entries = read[1][2] end
end
return {entries, gone, big}
"""

# XAUTOCLAIM ... JUSTID claims idle entries without sending them (nor counting a delivery);
# through a script because redis-py's parser of JUSTID answers drops the cursor.
_CLAIM = """
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5],
                  'JUSTID')
"""


@dataclass
class Batch:
    """One bounded read: the entries (with their fields), ids of entries deleted meanwhile
    (nothing to record: acknowledge them), and an entry too large to read, as (id, bytes)."""

    entries: list[StreamEntry] = field(default_factory=list)
    gone: list[bytes] = field(default_factory=list)
    oversized: tuple[bytes, int] | None = None

    def __bool__(self) -> bool:
        return bool(self.entries or self.gone or self.oversized)


class BoundedReader:
    """Reads a consumer group's entries ``count`` and ``max_bytes`` at a time (module doc)."""

    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str, *,
                 count: int, max_bytes: int) -> None:
        self.redis, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.count, self.max_bytes = count, max_bytes
        self._read = client.register_script(_READ)
        self._claim = client.register_script(_CLAIM)

    def new(self) -> Batch:
        """The group's next entries, delivered to this consumer."""
        return self._call(">", ())

    def own_pending(self) -> Batch:
        """This consumer's entries delivered but not acknowledged, oldest first."""
        return self._call("0", ())

    def claimed(self, ids: Sequence[bytes]) -> Batch:
        """Entries this consumer holds (claimed by id), as many as fit, in the given order."""
        return self._call("ids", ids)

    def claim(self, min_idle_ms: int, cursor: str, count: int) -> tuple[str, list[bytes]]:
        """Claim up to ``count`` entries idle for ``min_idle_ms`` from ``cursor`` on, ids only:
        (the next cursor, "0-0" at the end; the ids, now this consumer's)."""
        answer: Any = self._claim(keys=[self.stream], args=[
            self.group, self.consumer, min_idle_ms, cursor, count])
        nxt = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
        return nxt, list(answer[1])

    def _call(self, mode: str, ids: Sequence[bytes]) -> Batch:
        answer: Any = self._read(keys=[self.stream], args=[
            self.group, self.consumer, mode, self.count, self.max_bytes, *ids])
        entries, gone, big = answer
        batch = Batch(gone=list(gone))
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream while pending: nothing left to record
                batch.gone.append(entry_id)
                continue
            flat = list(fields)
            batch.entries.append((entry_id, dict(zip(flat[::2], flat[1::2], strict=True))))
        if big:
            batch.oversized = (big[0], int(big[1]))
        return batch
