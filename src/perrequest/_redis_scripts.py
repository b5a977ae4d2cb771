"""The Redis tier's scripts, each one atomic step on a value's key and its lock's.

A miss CLAIMs the value or the lock, EXTENDs its lock once it has the reply, and
STOREs its value as it releases the lock. A delete (``cache_delete``, ``cache_clear``)
DROPs the value and marks the lock ``DELETED``: a computation in flight anywhere, maybe
from the old data, no longer holds the lock and stores nothing, and the next miss takes
the mark over at once.
"""

from __future__ import annotations

LOCK = ":lock"  # a value's lock key is its key plus this

# What a delete leaves in a value's lock key for ``lock_timeout``: a computation still in
# flight anywhere (maybe from old data) stores nothing; the next miss takes it over.
DELETED = "perrequest:deleted"

# The value (unless its SHA-1 is ARGV[3]: one that did not decode), or the lock (taken
# when free, for ARGV[2] ms), in one atomic step: {1, value} | {2} | {0}; {3}: the lock
# was taken over a bad one, which no miss would get past (another type, or a string
# without expiry, written by others). A delete's mark is taken over as
# ``DELETED:token:T``, keeping the mark's time: a lease until its PTTL falls under T
# (ARGV[2] ms), after which, not extended, it is taken over again, still a mark.
CLAIM = f"""
local value = redis.call('GET', KEYS[1])
if value and (ARGV[3] == '' or redis.sha1hex(value) ~= ARGV[3]) then return {{1, value}} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {{2}} end
local left = redis.call('PTTL', KEYS[2])
if redis.call('TYPE', KEYS[2]).ok == 'string' and left >= 0 then
  local lock = redis.call('GET', KEYS[2])
  local lease = tonumber(string.match(lock, '^{DELETED}:%x+:(%d+)$') or -1)
  if lock ~= '{DELETED}' and left >= lease then return {{0}} end
  local px = math.max(left, tonumber(ARGV[2]))
  redis.call('SET', KEYS[2], '{DELETED}:' .. ARGV[1] .. ':' .. (px - ARGV[2]), 'PX', px)
  return {{2}}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {{3}}
"""
# Our lock (if still ours) lives ARGV[2] ms from now (one taken over a mark: at least
# the mark's time, and no more a lease).
EXTEND = f"""
local lock = redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1])
local mark = '{DELETED}:' .. ARGV[1]
if lock == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif lock and (lock == mark or string.sub(lock, 1, #mark + 1) == mark .. ':') then
  local px = math.max(redis.call('PTTL', KEYS[1]), tonumber(ARGV[2]))
  redis.call('SET', KEYS[1], mark, 'PX', px)
end
return 1
"""
# Store the value (if any), then release the lock if it is still ours (a lock key
# turned into another type is left for the next CLAIM to take over). A holder that
# lost its lock stores only where no lock and no value are: it expired, and nobody
# wanted the key since. Without a lock (ARGV[3] empty: a key of another type, to
# replace) the value is overwritten unless a delete came (its mark, or a lock taken
# over it, is there). A lock taken over a mark is released into the mark again, for
# what is left of it: a computation older than the delete still stores nothing, after
# this holder's value as after its failure. 2: a delete took our lock.
STORE = f"""
local kind = redis.call('TYPE', KEYS[2]).ok
local lock = kind == 'string' and redis.call('GET', KEYS[2])
local mark = '{DELETED}:' .. ARGV[3]
local ours = ARGV[3] ~= '' and lock and (lock == ARGV[3] or lock == mark
    or string.sub(lock, 1, #mark + 1) == mark .. ':')
local marked = lock and string.sub(lock, 1, {len(DELETED)}) == '{DELETED}'
if ARGV[1] ~= '' then
  if ours or (ARGV[3] == '' and not marked) then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  elseif ARGV[3] ~= '' and kind == 'none' then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
  end
end
if ours and lock == ARGV[3] then redis.call('DEL', KEYS[2])
elseif ours then
  redis.call('SET', KEYS[2], '{DELETED}', 'PX', math.max(1, redis.call('PTTL', KEYS[2])))
elseif marked and ARGV[3] ~= '' then return 2
end
return 1
"""
# A delete, at once: unlink the values (KEYS after the first ARGV[2]), and mark the
# locks (those first ARGV[2]) ``DELETED`` for ARGV[1] ms, or what is left of the lock
# there if longer (its holder's lock_timeout may be longer than ours); how many values
# were there. Each lock is unlinked before its mark is written: a full server (maxmemory,
# noeviction) refuses a script's first write if it needs memory, and only the first.
DROP = f"""
local n, dropped = tonumber(ARGV[2]), 0
for i = n + 1, #KEYS do dropped = dropped + redis.call('UNLINK', KEYS[i]) end
for i = 1, n do
  local left = redis.call('PTTL', KEYS[i])
  redis.call('UNLINK', KEYS[i])
  redis.call('SET', KEYS[i], '{DELETED}', 'PX', math.max(tonumber(ARGV[1]), left))
end
return dropped
"""
