-- rate_limit.lua: debits a user's request bucket, or says how long to wait.
--
-- A token bucket whose capacity is the profile's max_requests_per_minute,
-- refilled continuously at that many tokens per minute.
--
-- KEYS[1]  profile hash (read only)
-- KEYS[2]  request bucket, the string "tokens microseconds"
-- KEYS[3]  this debit's request marker (a string; unused without an id)
-- ARGV[1]  clock override in microseconds, '' for the server's TIME
-- ARGV[2]  cost in tokens (> 0, may be fractional)
-- ARGV[3]  request id, '' for none; a debit with an id already seen within
--          the window is not applied again
-- ARGV[4]  request id window in milliseconds
-- ARGV[5..9]  default profile: concurrent, memory MB, CPU %,
--             requests/minute, starts/hour (used when no profile exists)
-- ARGV[10] default tier name
-- (ARGV[4..10] are the same on every call of a policy, so the client
-- encodes them once.)
--
-- Returns {status, limit, remaining, retry_after, reset_after}:
--   status       'ok', 'deny', 'dup' (already applied) or 'corrupt'
--   limit        bucket capacity (integer)
--   remaining    whole tokens left after this call (integer)
--   retry_after  seconds until this cost would fit, as a string; '0' when
--                allowed, '-1' when the cost exceeds the capacity
--   reset_after  seconds until the bucket is full again, as a string
-- For 'corrupt', slot 2 names the profile field that failed to parse.
--
-- Writes: the bucket (TTL = time to refill; deleted when full) and, with a
-- request id, its marker (TTL = the window).
-- Nothing is written on denial, so a server out of memory refuses the
-- first write and nothing is half-done.

local profile_key, bucket_key, marker_key = KEYS[1], KEYS[2], KEYS[3]
local clock = ARGV[1]
local cost = tonumber(ARGV[2])
local request_id = ARGV[3]
local window_ms = tonumber(ARGV[4])
local defaults = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]),
                  tonumber(ARGV[8]), tonumber(ARGV[9]), tier = ARGV[10]}

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

-- A marker per debit, not a set of ids per user: one key that expires on
-- its own costs two cheap commands, where a set would need pruning.
if request_id ~= '' and redis.call('EXISTS', marker_key) == 1 then
  return reply('dup', 0)
end

if cost > capacity then
  return reply('deny', -1)
end
if tokens < cost then
  return reply('deny', (cost - tokens) / per_us)
end

tokens = tokens - cost
write_bucket(bucket_key, tokens, ts, capacity, per_us)
if request_id ~= '' then
  redis.call('SET', marker_key, '1', 'PX', window_ms)
end
return reply('ok', 0)
