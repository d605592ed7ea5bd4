-- rate_limit.lua: debits a user's request bucket, or says how long to wait.
--
-- A token bucket whose capacity is the profile's max_requests_per_minute,
-- refilled continuously at that many tokens per minute.
--
-- KEYS[1]  profile hash (read only)
-- KEYS[2]  request bucket: the nanosecond it is full again (see common)
-- ARGV[1]  clock override in microseconds, '' for the server's TIME
-- ARGV[2]  cost in tokens (> 0, may be fractional)
-- ARGV[3..7]  default profile: concurrent, memory MB, CPU %,
--             requests/minute, starts/hour (used when no profile exists)
-- ARGV[8]  default tier name
-- (ARGV[3..8] are the same on every call of a policy, so the client
-- encodes them once.)
--
-- Returns {status, limit, remaining, retry_after, reset_after}:
--   status       'ok', 'deny' or 'corrupt'
--   limit        bucket capacity (integer)
--   remaining    whole tokens left after this call (integer)
--   retry_after  seconds until this cost would fit, as a string; '0' when
--                allowed, '-1' when the cost exceeds the capacity
--   reset_after  seconds until the bucket is full again, as a string
-- For 'corrupt', slot 2 names the profile field that failed to parse.
--
-- Writes: the bucket (TTL = time to refill; deleted when full). Nothing
-- is written on denial, except a bucket emptied after the server's clock
-- stepped back (see common); either way the one write is the first, so
-- a server out of memory refuses it and nothing is half-done.

local profile_key, bucket_key = KEYS[1], KEYS[2]
local clock = ARGV[1]
local cost = tonumber(ARGV[2])
local defaults = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
                  tonumber(ARGV[6]), tonumber(ARGV[7]), tier = ARGV[8]}

local profile, bad_field = read_profile(profile_key, defaults)
if not profile then
  return {'corrupt', bad_field, 0, '0', '0'}
end

local now = now_us(clock)
local capacity = profile.rpm
local ns_per_token = 60e9 / capacity
local debt = debt_for_decision(bucket_key, now, capacity * ns_per_token)

local function reply(status, retry_ns)
  local tokens = bucket_tokens(debt, capacity, ns_per_token)
  local retry = retry_ns < 0 and '-1' or fstr(retry_ns / 1e9)
  return {status, capacity, math.floor(tokens), retry, fstr(debt / 1e9)}
end

if cost > capacity then
  return reply('deny', -1)
end
local wait = bucket_wait(debt, capacity, ns_per_token, cost)
if wait > 0 then
  return reply('deny', wait)
end

debt = math.floor(debt + cost * ns_per_token)
write_debt(bucket_key, debt, now)
return reply('ok', 0)
