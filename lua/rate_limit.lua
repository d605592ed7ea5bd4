-- rate_limit.lua: debits a user's request bucket, or says how long to wait.
--
-- A token bucket whose capacity is the profile's max_requests_per_minute,
-- refilled continuously at that many tokens per minute.
--
-- KEYS[1]  profile hash (read only)
-- KEYS[2]  request bucket, the string "tokens microseconds"
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
-- Writes: the bucket (TTL = time to refill; deleted when full).
-- Nothing is written on denial, so a server out of memory refuses the
-- first write and nothing is half-done.

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
local per_us = capacity / 60e6

local tokens, ts = read_bucket(bucket_key, capacity, now)
tokens, ts = refill(tokens, ts, capacity, per_us, now)

local function reply(status, retry_us)
  local reset_us = (capacity - tokens) / per_us
  local retry = retry_us < 0 and '-1' or fstr(retry_us / 1e6)
  return {status, capacity, math.floor(tokens), retry, fstr(reset_us / 1e6)}
end

if cost > capacity then
  return reply('deny', -1)
end
if tokens < cost then
  return reply('deny', (cost - tokens) / per_us)
end

tokens = tokens - cost
write_bucket(bucket_key, tokens, ts, capacity, per_us)
return reply('ok', 0)
