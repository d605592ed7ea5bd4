-- strike.lua: counts an offence against a user and, at the threshold,
-- blocks the user's service starts for a while.
--
-- Strikes older than the window no longer count. The strike that reaches
-- the threshold sets the automatic block and clears the strikes, so the
-- next block takes a full threshold of new offences. A user already
-- blocked collects no strikes: the block does not grow while it lasts.
--
-- KEYS[1]  strikes: sorted set, member = strike id, score = time (us)
-- KEYS[2]  automatic block: string, the block's end in microseconds
-- ARGV[1]  clock override in microseconds, '' for the server's TIME
-- ARGV[2]  strike id, unique per offence (a retried call counts once)
-- ARGV[3]  threshold: strikes within the window that block (>= 1)
-- ARGV[4]  window in milliseconds
-- ARGV[5]  block length in milliseconds
--
-- Returns {blocked, strikes, blocked_for}:
--   blocked      1 when this strike set the block, else 0
--   strikes      strikes within the window after this call (integer)
--   blocked_for  seconds the block still lasts, as a string ('0' if none)
--
-- Writes: the strike (TTL = the window) or, at the threshold, the block
-- (TTL = its length) while deleting the strikes.

local strikes_key, block_key = KEYS[1], KEYS[2]
local clock = ARGV[1]
local strike_id = ARGV[2]
local threshold = tonumber(ARGV[3])
local window_ms = tonumber(ARGV[4])
local block_ms = tonumber(ARGV[5])

local now = now_us(clock)

local blocked_until = tonumber(redis.call('GET', block_key))
if blocked_until and blocked_until > now then
  return {0, 0, fstr((blocked_until - now) / 1e6)}
end

redis.call('ZREMRANGEBYSCORE', strikes_key, '-inf',
           fstr(now - window_ms * 1000))
redis.call('ZADD', strikes_key, fstr(now), strike_id)
local strikes = redis.call('ZCARD', strikes_key)

if strikes >= threshold then
  redis.call('DEL', strikes_key)
  redis.call('SET', block_key, fstr(now + block_ms * 1000), 'PX', block_ms)
  return {1, strikes, fstr(block_ms / 1000)}
end

redis.call('PEXPIRE', strikes_key, window_ms)
return {0, strikes, '0'}
