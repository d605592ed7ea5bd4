-- inspect_user.lua: reads a user's live state without changing it.
--
-- KEYS[1]  profile hash
-- KEYS[2]  request bucket: the nanosecond it is full again (see common)
-- KEYS[3]  start-rate bucket, likewise
-- KEYS[4]  leases: sorted set, member = service id, score = expiry (ms)
-- KEYS[5]  lease metadata hash: service id -> "memory cpu fence"
-- KEYS[6]  start history: sorted set, score = start (us)
-- ARGV[1]  clock override in microseconds, '' for the server's TIME
-- ARGV[2..6]  default profile: concurrent, memory MB, CPU %,
--             requests/minute, starts/hour
-- ARGV[7]  default tier name
-- ARGV[8]  start bucket capacity
-- ARGV[9]  start bucket refill, starts per minute
-- ARGV[10] history window in milliseconds (one hour)
--
-- Returns {status, tokens, start_tokens, started, now_ms, leases...}:
--   status        'ok' or 'corrupt' (then slot 2 names the bad field)
--   tokens        request tokens available now, as a string
--   start_tokens  start tokens available now, as a string
--   started       starts within the history window (integer)
--   now_ms        the clock this answer was read at, as a string
--   leases        five values per live lease: service id, expiry (ms),
--                 fence, memory MB, CPU % (numbers as strings)
--
-- Writes nothing.

local clock = ARGV[1]
local defaults = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
                  tonumber(ARGV[5]), tonumber(ARGV[6]), tier = ARGV[7]}
local burst = tonumber(ARGV[8])
local ns_per_start = 60e9 / tonumber(ARGV[9])
local history_ms = tonumber(ARGV[10])

local profile, bad_field = read_profile(KEYS[1], defaults)
if not profile then
  return {'corrupt', bad_field}
end

local now = now_us(clock)
local now_ms = math.floor(now / 1000)

local function level(key, capacity, ns_per_token)
  -- As debt_for_decision reads it, without storing anything.
  local debt = math.min(read_debt(key, now), capacity * ns_per_token)
  return fstr(bucket_tokens(debt, capacity, ns_per_token))
end

local out = {'ok', level(KEYS[2], profile.rpm, 60e9 / profile.rpm),
             level(KEYS[3], burst, ns_per_start),
             redis.call('ZCOUNT', KEYS[6],
                        '(' .. fstr(now - history_ms * 1000), '+inf'),
             fstr(now_ms)}
local live = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. fstr(now_ms),
                        '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
  local mem, cpu, fence = parse_meta(redis.call('HGET', KEYS[5], live[i]))
  out[#out + 1] = live[i]
  out[#out + 1] = live[i + 1]
  out[#out + 1] = fstr(fence)
  out[#out + 1] = fstr(mem)
  out[#out + 1] = fstr(cpu)
end
return out
