-- start_service.lua: decides whether a user may start a service and, when
-- every check passes, reserves its slot in the same step.
--
-- Checks run in this order and the first failure decides: blocked,
-- automatically blocked, start rate, concurrent services, starts in the
-- last hour, port, memory quota, CPU quota, server overload (for the
-- default tier only). A service id that already holds a live lease is
-- renewed and reserves nothing twice.
--
-- KEYS[1]  profile hash (read only)
-- KEYS[2]  start-rate bucket: the nanosecond it is full again
-- KEYS[3]  leases: sorted set, member = service id, score = expiry (ms)
-- KEYS[4]  lease metadata hash: service id -> "memory cpu fence"
-- KEYS[5]  start history: sorted set, member = fence, score = start (us)
-- KEYS[6]  fencing counter hash {last = last fence, born = microseconds}
-- KEYS[7]  automatic block: string, the block's end in microseconds
--          (read only; written by strike.lua)
-- ARGV[1]  clock override in microseconds, '' for the server's TIME
-- ARGV[2..6]  default profile: concurrent, memory MB, CPU %,
--             requests/minute, starts/hour
-- ARGV[7]  default tier name (also the tier denied while overloaded)
-- ARGV[8]  service id
-- ARGV[9]  port, '' for none
-- ARGV[10] memory in MB asked for the service (>= 0)
-- ARGV[11] CPU percent asked for the service (>= 0)
-- ARGV[12] lease length in milliseconds
-- ARGV[13] start bucket capacity (starts at once)
-- ARGV[14] start bucket refill, starts per minute
-- ARGV[15] '1' when this replica is overloaded, else '0'
-- ARGV[16] history window in milliseconds (one hour)
-- ARGV[17] rapid-restart window in milliseconds
-- ARGV[18] fencing counter grace beyond the last lease, milliseconds
--
-- Returns {status, fence, retry_after, used, limit, asked, detail}:
--   status       'ok', 'running' (lease already held, renewed), 'blocked',
--                'autoblocked', 'rate', 'concurrent', 'hourly', 'port',
--                'memory', 'cpu', 'overloaded' or 'corrupt'
--   fence        fencing token of the lease for 'ok' and 'running', else 0
--   retry_after  seconds, as a string, for 'autoblocked', 'rate' and
--                'hourly'; else '0'
--   used         current count or usage the failed check compared
--   limit        the profile's limit for that check
--   asked        what this start asked for (port, memory or CPU)
--   detail       'blocked': the reason; 'ok'/'running': lease expiry in
--                ms, then starts within the rapid-restart window;
--                'corrupt': the bad field; else ''
-- Numbers in used/limit/asked are strings, since CPU may be fractional.
--
-- Writes only on 'ok' and 'running': the lease, its metadata and the
-- fencing counter (TTL = the latest lease, the counter plus the grace), the
-- start bucket (TTL = time to refill) and the history (TTL = the window);
-- and, before any check that follows it, a start bucket emptied after the
-- server's clock stepped back (see common).

local profile_key, bucket_key, svc_key, meta_key, starts_key, fence_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local auto_block_key = KEYS[7]
local clock = ARGV[1]
local defaults = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
                  tonumber(ARGV[5]), tonumber(ARGV[6]), tier = ARGV[7]}
local service_id = ARGV[8]
local port = ARGV[9]
local memory = tonumber(ARGV[10])
local cpu = tonumber(ARGV[11])
local lease_ms = tonumber(ARGV[12])
local burst = tonumber(ARGV[13])
local ns_per_start = 60e9 / tonumber(ARGV[14])
local overloaded = ARGV[15] == '1'
local history_ms = tonumber(ARGV[16])
local rapid_ms = tonumber(ARGV[17])
local grace_ms = tonumber(ARGV[18])

local function deny(status, retry_s, used, limit, asked, detail)
  return {status, 0, retry_s or '0', tostring(used or ''),
          tostring(limit or ''), tostring(asked or ''), detail or ''}
end

local profile, bad_field = read_profile(profile_key, defaults)
if not profile then
  return deny('corrupt', nil, nil, nil, nil, bad_field)
end
if profile.blocked == '1' then
  return deny('blocked', nil, nil, nil, nil, profile.reason)
end

local now = now_us(clock)
local now_ms = math.floor(now / 1000)
local expiry_ms = now_ms + lease_ms

-- The end is kept in the value, not only in the TTL, so that the block
-- follows the same clock as every other decision.
local blocked_until = tonumber(redis.call('GET', auto_block_key))
if blocked_until and blocked_until > now then
  return deny('autoblocked', fstr((blocked_until - now) / 1e6))
end

-- Only live leases count, so a dead replica's services stop counting as
-- soon as their leases run out. Expired ones are removed when this script
-- writes anyway: every check comes before the first write.
local live_min = '(' .. fstr(now_ms)
local history_min = '(' .. fstr(now - history_ms * 1000)

local function rapid_count()
  return redis.call('ZCOUNT', starts_key, fstr(now - rapid_ms * 1000),
                    '+inf')
end

local held_until = tonumber(redis.call('ZSCORE', svc_key, service_id))
if held_until and held_until > now_ms then
  local _, _, fence = parse_meta(redis.call('HGET', meta_key, service_id))
  redis.call('ZADD', svc_key, fstr(expiry_ms), service_id)
  refresh_lease_ttl(svc_key, meta_key, fence_key, now_ms, grace_ms)
  return {'running', fence, '0', '', '', '',
          fstr(expiry_ms) .. ' ' .. rapid_count()}
end

local start_debt = debt_for_decision(bucket_key, now, burst * ns_per_start)
local start_wait = bucket_wait(start_debt, burst, ns_per_start, 1)
if start_wait > 0 then
  return deny('rate', fstr(start_wait / 1e9))
end

local running = redis.call('ZCOUNT', svc_key, live_min, '+inf')
if running >= profile.conc then
  return deny('concurrent', nil, running, profile.conc)
end

local started = redis.call('ZCOUNT', starts_key, history_min, '+inf')
if started >= profile.sph then
  local retry = '0'
  local oldest = redis.call('ZRANGEBYSCORE', starts_key, history_min, '+inf',
                            'WITHSCORES', 'LIMIT', 0, 1)
  if #oldest > 0 then
    local wait_us = tonumber(oldest[2]) + history_ms * 1000 - now
    retry = fstr(math.max(0, wait_us) / 1e6)
  end
  return deny('hourly', retry, started, profile.sph)
end

if port ~= '' and profile.ports ~= '*'
    and not string.find(profile.ports, ',' .. port .. ',', 1, true) then
  return deny('port', nil, nil, nil, port)
end

if memory > 0 or cpu > 0 then
  local used_mem, used_cpu = 0, 0
  local live = redis.call('ZRANGEBYSCORE', svc_key, live_min, '+inf')
  local metas = #live > 0 and redis.call('HMGET', meta_key, unpack(live))
                or {}
  for i = 1, #live do
    local m, c = parse_meta(metas[i])
    used_mem = used_mem + m
    used_cpu = used_cpu + c
  end
  if used_mem + memory > profile.mem then
    return deny('memory', nil, fstr(used_mem), profile.mem, fstr(memory))
  end
  if used_cpu + cpu > profile.cpu then
    return deny('cpu', nil, fstr(used_cpu), profile.cpu, fstr(cpu))
  end
end

if overloaded and profile.tier == defaults.tier then
  return deny('overloaded')
end

-- Every check passed: reserve.
-- The first write grows memory (HSET), so a server out of memory
-- refuses it while nothing has changed; after a first write Redis lets a
-- script finish, so trims must not come first.
local fence = next_fence(fence_key, now)
purge_leases(svc_key, meta_key, now_ms)
redis.call('ZREMRANGEBYSCORE', starts_key, '-inf',
           fstr(now - history_ms * 1000))
write_debt(bucket_key, start_debt + ns_per_start, now)
redis.call('ZADD', svc_key, fstr(expiry_ms), service_id)
redis.call('HSET', meta_key, service_id,
           fstr(memory) .. ' ' .. fstr(cpu) .. ' ' .. fstr(fence))
refresh_lease_ttl(svc_key, meta_key, fence_key, now_ms, grace_ms)

redis.call('ZADD', starts_key, fstr(now), fstr(fence))
redis.call('PEXPIRE', starts_key, history_ms)

return {'ok', fence, '0', '', '', '', fstr(expiry_ms) .. ' ' .. rapid_count()}
