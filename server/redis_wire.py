"""What goes over the wire to Redis: the Lua scripts, the state tensors as one value, commands in RESP.

Kept apart from the store (server/redis_store.py) so that each reads in one sitting; no I/O here.
"""
from __future__ import annotations

import functools
import json
import struct
from urllib.parse import urlsplit, urlunsplit

import numpy as np

State = dict[str, np.ndarray]

# KEYS: sequence key, live set, incarnation counter.
# ARGV: start (1/0), end (1/0), expected incarnation, expected version, state, request id, ttl ms, max live, step,
# owner (the certificate identity of the step's client, '' without mutual TLS), the client's share (0: none), the
# client's key (clients.Client.key: its identity, else its address), the prefix of the per-client sets.
# Returns {'ok', incarnation, version} or a refusal: {'full', live}, {'share', held}, {'gone'}, {'moved', step,
# request}, {'broken', reason}, {'owner'}. Atomic: a step is written whole or not at all. A sequence started by an
# identity belongs to it: a step of another identity (a restart too) is refused, on every replica. Each client's
# live sequences are a sorted set of their own (score: expiry), so its share holds over all replicas; a sequence
# counts against the client that started it. The script ends by reading the key it wrote, so that the calling
# connection tracks it (CLIENT TRACKING): another replica's write to it then invalidates this process's copy.
COMMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HMGET', KEYS[1], 'inc', 'v', 'step', 'last', 'broken', 'owner', 'client')
local inc, v
if cur[6] and cur[6] ~= '' and cur[6] ~= ARGV[10] then return {'owner'} end
local client = cur[7] or ARGV[12]
if ARGV[1] == '1' then
  -- Only a start needs the counts: expired entries leave the live sets here, not at every step.
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if not cur[1] and redis.call('ZSCORE', KEYS[2], KEYS[1]) == false then
    local live = redis.call('ZCARD', KEYS[2])
    if live >= tonumber(ARGV[8]) then return {'full', tostring(live)} end
  end
  if cur[7] ~= ARGV[12] then
    -- A new sequence, or one restarted by another client: it counts against the starter from now on.
    local mine = ARGV[13] .. ARGV[12]
    redis.call('ZREMRANGEBYSCORE', mine, '-inf', now)
    local share = tonumber(ARGV[11])
    if share > 0 then
      local held = redis.call('ZCARD', mine)
      if held >= share then return {'share', tostring(held)} end
    end
    if cur[7] then redis.call('ZREM', ARGV[13] .. cur[7], KEYS[1]) end
    client = ARGV[12]
  end
  inc = tostring(redis.call('INCR', KEYS[3]))
  v = 1
else
  if not cur[1] then return {'gone'} end
  if cur[1] ~= ARGV[3] or cur[2] ~= ARGV[4] then return {'moved', cur[3] or '', cur[4] or ''} end
  if cur[5] and cur[5] ~= '' then return {'broken', cur[5]} end
  inc = cur[1]
  v = tonumber(cur[2]) + 1
end
local clients = ARGV[13] .. client
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], KEYS[1])
  redis.call('ZREM', clients, KEYS[1])
  return {'ok', inc, tostring(v)}
end
redis.call('HSET', KEYS[1], 'inc', inc, 'v', tostring(v), 'step', ARGV[9], 'last', ARGV[6], 'state', ARGV[5],
           'broken', '', 'owner', ARGV[10], 'client', client)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), KEYS[1])
redis.call('ZADD', clients, now + tonumber(ARGV[7]), KEYS[1])
if redis.call('PTTL', clients) < tonumber(ARGV[7]) then redis.call('PEXPIRE', clients, ARGV[7]) end
redis.call('HGET', KEYS[1], 'v')
return {'ok', inc, tostring(v)}
"""

# KEYS: sequence key. ARGV: expected incarnation ('' for a sequence_start: any), expected version, reason.
# Marks the sequence aborted and moves its version on, so that no replica's step on the old state commits.
ABANDON = """
local cur = redis.call('HMGET', KEYS[1], 'inc', 'v')
if not cur[1] then return 0 end
if ARGV[1] ~= '' and (cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'broken', ARGV[3], 'v', tostring(tonumber(cur[2]) + 1))
return 1
"""

FIELDS = ("inc", "v", "step", "last", "broken", "state", "owner")


@functools.lru_cache(maxsize=256)
def _header(layout: tuple) -> bytes:
    header = json.dumps([[n, dtype, list(shape)] for n, dtype, shape in layout]).encode()
    return struct.pack("<I", len(header)) + header


@functools.lru_cache(maxsize=256)
def _layout(header: bytes) -> list:
    return json.loads(header)


def encode_state(state: State) -> bytes:
    """State tensors as one value: a little-endian u32 header length, a JSON header [name, dtype, shape], raw bytes.
    Headers are cached per layout: a model's state has one."""
    header = _header(tuple((n, a.dtype.str, a.shape) for n, a in state.items()))
    return header + b"".join(np.ascontiguousarray(a).tobytes() for a in state.values())


def decode_state(blob: bytes) -> State:
    """The inverse of encode_state; bounds checked so a damaged value fails naming the tensor."""
    (length,) = struct.unpack_from("<I", blob)
    offset = 4 + length
    state: State = {}
    for name, dtype, shape in _layout(bytes(blob[4:offset])):
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset + size > len(blob):
            raise ValueError(f"state '{name}': value holds {len(blob) - offset} bytes, expected {size}")
        state[name] = np.frombuffer(blob, dtype=dtype, count=size // np.dtype(dtype).itemsize,
                                    offset=offset).reshape(shape)
        offset += size
    return state


def redact(url: str) -> str:
    """The URL without its password, for errors, logs and health."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
