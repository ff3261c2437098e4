"""What Ponder keeps in Redis: the key layout and the Lua scripts that change it atomically.

Every key carries a hash tag so the keys one operation touches live in one Redis Cluster slot:
  {ns}:{events}:stream / :feedback             events and feedback streams (XADD MAXLEN ~)
  {ns}:{events}:batch:<digest>                 mark: that batch of events is written (applied once)
  {ns}:{meta}:policies                         set of policy names seen
  {ns}:{policy:<p>}:arms                       set of "bucket|arm" members of policy p
  {ns}:{policy:<p>}:agg:<bucket>|<arm>         aggregate hash (fields: see aggregates.py)
  {ns}:{policy:<p>}:alive                      marker: its absence means Redis lost its data
  {ns}:{req:<request_id>}:meta / :fb           what feedback needs about a request; the feedback claim
  {ns}:{policy:<p>}:fb:<request_id>            mark: that feedback is in the aggregates (applied once)
  {ns}:{budget:<key_id>}:<period>:<period_id>  spend counter per key and period
  {ns}:{budget:<key_id>}:hold:<id>             a reservation not settled yet (its amount)
  {ns}:{budget:<key_id>}:<period>:<period_id>:push:<id>  mark of a pushed ledger change
  {ns}:{spend}:h:<YYYYMMDDHH> / d:<YYYYMMDD>   spend rollups for the dashboard

The scripts are the one place where several keys change together; everything else is single commands
(redis_store.py and redis_budgets.py do the I/O).
"""

from __future__ import annotations

import hashlib
import uuid

# How long Redis keeps a reservation's hold and a push's mark. A hold gone unsettled this long (its
# replica died) is dropped, charged at its full amount; a change retried later than this (saved over a
# longer shutdown) could be applied twice.
ONCE_TTL_S = 7 * 86400
# How long a written batch of events is remembered. A batch is retried as soon as Redis answers again,
# so an hour covers any retry after a lost reply; marks are one per batch, not per event.
BATCH_MARK_TTL_S = 3600

# Add a delta to one aggregate hash (with exponential decay when a half-life is set) and record the
# hash's member in its policy's set. `deltas` is a flat list: field, delta, field, delta...
AGG_FUNCTION_LUA = """
local function agg_update(key, arms_key, member, t, hl, deltas)
  t = tonumber(t)
  hl = tonumber(hl)
  local scale = 1.0
  if redis.call('HEXISTS', key, 'spent_usd') == 0 and redis.call('HEXISTS', key, 'count') == 1 then
    -- a record from before spent_usd was kept: its cost so far is the best start there is
    redis.call('HSET', key, 'spent_usd', redis.call('HGET', key, 'cost_usd') or '0')
  end
  if redis.call('HEXISTS', key, 'errors_total') == 0 and redis.call('HEXISTS', key, 'errors') == 1 then
    -- a record from before errors_total was kept: its errors so far are the best start there is
    redis.call('HSET', key, 'errors_total', redis.call('HGET', key, 'errors'))
  end
  if redis.call('HEXISTS', key, 'est_choices') == 0 and redis.call('HEXISTS', key, 'est_prompt_count') == 1 then
    -- a record from before the client's n was kept: its requests asked for one answer, the default
    redis.call('HSET', key, 'est_choices', redis.call('HGET', key, 'est_prompt_count'))
  end
  if hl > 0 then
    local t0 = tonumber(redis.call('HGET', key, 't'))
    if t0 == nil then
      redis.call('HSET', key, 't', string.format('%.17g', t))
    elseif t > t0 then
      local f = 0.5 ^ ((t - t0) / hl)
      local cur = redis.call('HGETALL', key)
      local upd = {'t', string.format('%.17g', t)}
      for i = 1, #cur, 2 do
        if cur[i] ~= 't' and cur[i] ~= 'total' and cur[i] ~= 'errors_total' and cur[i] ~= 'spent_usd' then
          upd[#upd + 1] = cur[i]
          upd[#upd + 1] = string.format('%.17g', tonumber(cur[i + 1]) * f)
        end
      end
      redis.call('HSET', key, unpack(upd))
    elseif t < t0 then
      scale = 0.5 ^ ((t0 - t) / hl)  -- a late event: age it to the stored reference time
    end
  end
  for i = 1, #deltas, 2 do
    local v = tonumber(deltas[i + 1])
    if deltas[i] ~= 'total' and deltas[i] ~= 'errors_total' and deltas[i] ~= 'spent_usd' then v = v * scale end
    redis.call('HINCRBYFLOAT', key, deltas[i], string.format('%.17g', v))
  end
  redis.call('SADD', arms_key, member)
end
"""

# One aggregate update. KEYS[1] aggregate hash, KEYS[2] the policy's member set, KEYS[3] (optional) a
# mark that makes it apply at most once (a feedback whose reply was lost may be sent again): kept
# ARGV[4] seconds. ARGV[1] time the delta is expressed at, ARGV[2] half-life s (0: none), ARGV[3]
# member, ARGV[5..] deltas. Returns 1, or 0 when the mark says it was applied before.
AGG_UPDATE_LUA = AGG_FUNCTION_LUA + """
if KEYS[3] and not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[4]) then return 0 end
agg_update(KEYS[1], KEYS[2], ARGV[3], ARGV[1], ARGV[2], {unpack(ARGV, 5)})
return 1
"""

# A whole batch in one atomic call (single-server Redis only: it touches keys of many slots, so the
# Cluster path uses a pipeline instead). One command instead of thousands keeps the gateway's CPU for
# requests. A batch applies at most once: its mark (its bodies' digest) is set once it is written, and
# the batch sent again after a lost reply finds it and changes nothing (returns 0). ARGV[1] JSON: {mark, mark_ttl,
#   stream, maxlen, ttl, hl, policies_key, policies: [...],
#   meta: [[key, json], ...], aggs: [[key, arms_key, member, t, [field, delta, ...]], ...],
#   spend: [[key, ttl, [field, value, ...]], ...]};  ARGV[2..] event bodies, appended in order.
BATCH_LUA = AGG_FUNCTION_LUA + """
local c = cjson.decode(ARGV[1])
if redis.call('EXISTS', c.mark) == 1 then return 0 end
for i = 2, #ARGV do
  redis.call('XADD', c.stream, 'MAXLEN', '~', c.maxlen, '*', 'e', ARGV[i])
end
for _, m in ipairs(c.meta) do
  redis.call('SET', m[1], m[2], 'EX', c.ttl)
end
for _, a in ipairs(c.aggs) do
  agg_update(a[1], a[2], a[3], a[4], c.hl, a[5])
end
if #c.policies > 0 then
  redis.call('SADD', c.policies_key, unpack(c.policies))
end
for _, sp in ipairs(c.spend) do
  for i = 1, #sp[3], 2 do
    redis.call('HINCRBYFLOAT', sp[1], sp[3][i], string.format('%.17g', sp[3][i + 1]))
  end
  redis.call('EXPIRE', sp[1], sp[2])
end
redis.call('SET', c.mark, '1', 'EX', c.mark_ttl)  -- last: a batch that failed half way is not marked
return #ARGV - 1
"""

# Check every period's cap, then charge all of them and leave a hold (its settle consumes it), or charge
# none (and name every period that does not fit: {0, i, spent, i, spent...}; the caller picks the one
# the client must wait for).
# KEYS one counter per period, then the hold; ARGV[1] amount, ARGV[2..n+1] caps, ARGV[n+2..2n+1] TTLs
# (0: none), ARGV[2n+2] the hold's TTL
RESERVE_LUA = """
local n = #KEYS - 1
local amount = tonumber(ARGV[1])
local over = {0}
for i = 1, n do
  local spent = tonumber(redis.call('GET', KEYS[i]) or '0')
  if spent + amount > tonumber(ARGV[1 + i]) + 1e-9 then
    over[#over + 1] = i
    over[#over + 1] = string.format('%.17g', spent)
  end
end
if #over > 1 then return over end
local out = {1}
for i = 1, n do
  out[#out + 1] = redis.call('INCRBYFLOAT', KEYS[i], ARGV[1])
  local ttl = tonumber(ARGV[1 + n + i])
  if ttl > 0 and redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
redis.call('SET', KEYS[n + 1], ARGV[1], 'EX', ARGV[2 + 2 * n])
return out
"""

# Add a delta to some counters at most once, however often it is sent (a reply lost to a timeout after
# Redis applied it must not make a retry apply it again). KEYS[1] names the change: ARGV[1] 'hold' (a
# settle) applies it only if deleting the reservation's hold does; 'mark' (a push) only if the mark is
# not there, and leaves it for ARGV[3] seconds. KEYS[2..] counters; ARGV[2] delta, ARGV[4..] their TTLs
# (0: none). Returns {1, value or refusal per counter} (a refused counter, e.g. WRONGTYPE or OOM, never
# got it), or {0, value per counter} when it was applied before.
APPLY_ONCE_LUA = """
local first
if ARGV[1] == 'hold' then
  first = redis.call('DEL', KEYS[1]) == 1
else
  first = redis.call('EXISTS', KEYS[1]) == 0
end
local out, took = {first and 1 or 0}, false
for i = 2, #KEYS do
  if first then
    out[i] = redis.pcall('INCRBYFLOAT', KEYS[i], ARGV[2])
    if type(out[i]) == 'string' then
      took = true
      local ttl = tonumber(ARGV[2 + i])
      if ttl > 0 and redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl) end
    end
  else
    out[i] = redis.pcall('GET', KEYS[i])
  end
end
-- No mark where no counter took it: that push goes back to the ledger and is sent anew.
if took and ARGV[1] == 'mark' then redis.call('SET', KEYS[1], '1', 'EX', ARGV[3]) end
return out
"""


def _tag(name: str) -> str:
    # A brace inside a name would end the hash tag early and scatter a policy's keys over slots.
    return name.replace("{", "(").replace("}", ")")


class RedisKeys:
    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.stream = f"{ns}:{{events}}:stream"
        self.feedback_stream = f"{ns}:{{events}}:feedback"
        self.policies = f"{ns}:{{meta}}:policies"
        # Never holds a value: an LPUSHX to it (which changes nothing) tells whether the server takes writes.
        self.write_probe = f"{ns}:{{meta}}:write-probe"

    def arms(self, policy: str) -> str:
        return f"{self.ns}:{{policy:{_tag(policy)}}}:arms"

    def agg(self, policy: str, bucket: str, arm: str) -> str:
        return f"{self.ns}:{{policy:{_tag(policy)}}}:agg:{bucket}|{arm}"

    def alive(self, policy: str) -> str:
        return f"{self.ns}:{{policy:{_tag(policy)}}}:alive"

    def batch_mark(self, bodies: list[bytes]) -> str:
        """The mark of a batch of events: its bodies' digest, the same however often it is sent."""
        digest = hashlib.blake2b(b"\n".join(bodies), digest_size=16).hexdigest()
        return f"{self.ns}:{{events}}:batch:{digest}"

    def meta(self, request_id: str) -> str:
        return f"{self.ns}:{{req:{_tag(request_id)}}}:meta"

    def feedback_applied(self, policy: str, request_id: str) -> str:
        """In the policy's slot, so the aggregate script can check and set it in one step."""
        return f"{self.ns}:{{policy:{_tag(policy)}}}:fb:{_tag(request_id)}"

    def claim(self, request_id: str) -> str:
        return f"{self.ns}:{{req:{_tag(request_id)}}}:fb"

    def budget(self, key_id: str, period: str, pid: str) -> str:
        return f"{self.ns}:{{budget:{_tag(key_id)}}}:{period}:{pid}"

    def hold(self, key_id: str) -> str:
        return f"{self.ns}:{{budget:{_tag(key_id)}}}:hold:{uuid.uuid4().hex}"

    @staticmethod
    def push_mark(counter: str) -> str:
        return f"{counter}:push:{uuid.uuid4().hex}"  # the counter's hash tag: one slot

    def spend(self, period: str) -> str:
        return f"{self.ns}:{{spend}}:{period}"
