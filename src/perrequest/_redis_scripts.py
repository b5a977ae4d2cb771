"""The Redis tier's scripts, each one atomic step on a value's key and its lock's.

A miss CLAIMs the value or the lock, EXTENDs its lock once it has the reply, and
STOREs its value as it releases the lock. Each CLAIM that takes the lock reads the
key's and the function's generations (``GEN``: a nonce that each ``cache_delete`` of
the key, and each ``cache_clear`` of the function, writes anew); STORE stores only
under the generations it claimed under. A delete also removes the lock: the next miss
takes it at once, and a computation in flight anywhere, maybe from the old data,
stores nothing when it ends. Each CLAIM that takes the lock also names its holder the
key's latest (``LAST``), which outlives the lock: a holder whose lock expired stores
only if no later one took it since.
"""

from __future__ import annotations

LOCK = ":lock"  # a value's lock key is its key plus this
GEN = ":gen"  # a value's generation key is its key plus this; a function's, its base plus
LAST = ":last"  # who took the value's lock last, until it stores or ARGV[4] ms pass

# KEYS: value, lock, the value's generation, the function's, the latest holder. The
# value (unless its SHA-1 is ARGV[3]: one that did not decode), or the lock (taken when
# free, for ARGV[2] ms; its holder the latest for ARGV[4] ms), in one atomic step. A
# value key of another type (others') is removed: a miss, computed once under the lock:
# {1, value} | {2, generations} | {0}; {3, generations}: the lock was taken over a bad
# one, which no miss would get past (another type, or a string without expiry, written
# by others). A generation key of another type (others' again) reads as '?': a
# generation all the same, not an error that would turn the function's tier off.
CLAIM = """
local value = redis.pcall('GET', KEYS[1])
if type(value) == 'table' then redis.call('UNLINK', KEYS[1]) value = false end
if value and (ARGV[3] == '' or redis.sha1hex(value) ~= ARGV[3]) then return {1, value} end
local g1, g2 = redis.pcall('GET', KEYS[3]), redis.pcall('GET', KEYS[4])
g1, g2 = type(g1) == 'table' and '?' or g1 or '', type(g2) == 'table' and '?' or g2 or ''
local gen = g1 .. '/' .. g2
local kind = 2
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('TYPE', KEYS[2]).ok == 'string' and redis.call('PTTL', KEYS[2]) >= 0 then
    return {0}
  end
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  kind = 3
end
redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[4])
return {kind, gen}
"""
# Our lock (if still ours) lives ARGV[2] ms from now.
EXTEND = """
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""
# KEYS as CLAIM's. Store the value (if any), then release the lock if it is still ours
# (ARGV[3]; a lock key of another type is left for the next CLAIM to take over), only
# under the generations ARGV[4] (what CLAIM gave). A holder that lost its lock stores
# only where no lock and no value are and no later holder is known: its lock expired,
# and nobody took it since (a later holder's value, from later data, is the one to
# keep). 2: a delete or a clear came since the CLAIM.
STORE = """
local kind = redis.call('TYPE', KEYS[2]).ok
local lock = kind == 'string' and redis.call('GET', KEYS[2])
local g1, g2 = redis.pcall('GET', KEYS[3]), redis.pcall('GET', KEYS[4])
g1, g2 = type(g1) == 'table' and '?' or g1 or '', type(g2) == 'table' and '?' or g2 or ''
local gen = g1 .. '/' .. g2
local ours = lock == ARGV[3]
if ours then redis.call('DEL', KEYS[2]) end
local last = redis.pcall('GET', KEYS[5])
local latest = type(last) ~= 'string' or last == ARGV[3]
if last == ARGV[3] then redis.call('DEL', KEYS[5]) end
if gen ~= ARGV[4] then return 2 end
if ARGV[1] ~= '' then
  if ours then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  elseif kind == 'none' and latest then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
  end
end
return 1
"""
# A delete: unlink the value (KEYS[3]) and its lock (KEYS[2]), then write its generation
# (KEYS[1]) ARGV[2] for ARGV[1] ms, or what was left of the lock if longer (its holder's
# lock_timeout may be longer than ours); whether the value was there. Unlinks come
# first: a full server (maxmemory, noeviction) refuses a script's first write if it
# needs memory, and only the first.
DROP = """
local left = redis.call('PTTL', KEYS[2])
redis.call('UNLINK', KEYS[2])
local dropped = redis.call('UNLINK', KEYS[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', math.max(tonumber(ARGV[1]), left))
return dropped
"""
# A function's generation (KEYS[1]) written anew (ARGV[1]), for good: one key per
# function. Unlinked first, so that a full server (maxmemory, noeviction) lets it.
RENEW = """
redis.call('UNLINK', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""
