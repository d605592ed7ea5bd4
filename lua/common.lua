-- common.lua: helpers prepended to every pactown-redis script.
--
-- The loader places this file in front of each script, so every script
-- sees these locals. It writes nothing and reads only what its callers
-- pass in.
--
-- Clock: now_us() reads the server's TIME. A non-empty override (used only
-- by tests and simulations that must control time) replaces it; production
-- callers always send an empty string.

local function now_us(override)
  if override ~= '' then
    return tonumber(override)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Redis turns a Lua number into an integer reply, so fractions travel as
-- strings with enough digits to round-trip a double.
local function fstr(x)
  return string.format('%.17g', x)
end

-- The grammar of a stored profile. pactown_redis._core.hash_to_profile
-- reads profiles by the same rules, so a hash is either usable on both
-- sides or reported corrupt on both: numbers are ASCII digits only (no
-- sign, exponent, point or space) within the bounds of UserProfile, ports
-- are '*' or ',p1,p2,...,' with at most MAX_PORTS ports of 1-65535,
-- blocked is '0' or '1', and the tier is one of UserTier's values.
local PROFILE_NUMBERS = {'conc', 'mem', 'cpu', 'rpm', 'sph'}
local PROFILE_BOUNDS = {
  conc = {0, 1000000},
  mem = {0, 1073741824},
  cpu = {0, 1000000},
  rpm = {1, 100000000},
  sph = {0, 1000000},
}
local MAX_PORTS = 1024
local KNOWN_TIERS = {free = true, basic = true, pro = true,
                     enterprise = true, admin = true}

local function valid_ports(ports)
  if ports == '*' then
    return true
  end
  if type(ports) ~= 'string' or not string.match(ports, '^,[%d,]*$')
      or string.find(ports, ',,', 1, true)
      or string.sub(ports, -1) ~= ',' then
    return false
  end
  local count = 0
  for port in string.gmatch(ports, '%d+') do
    local n = tonumber(port)
    count = count + 1
    if n < 1 or n > 65535 or count > MAX_PORTS then
      return false
    end
  end
  return true
end

-- Reads a user's profile hash. A missing profile yields the defaults the
-- caller passed (the default tier). Returns nil and the name of the first
-- bad field when the stored profile is not one this library wrote.
local function read_profile(key, defaults)
  local raw = redis.call('HGETALL', key)
  local p = {}
  if #raw == 0 then
    for i, name in ipairs(PROFILE_NUMBERS) do
      p[name] = defaults[i]
    end
    p.tier = defaults.tier
    p.ports = '*'
    p.blocked = '0'
    p.reason = ''
    return p
  end
  for i = 1, #raw, 2 do
    p[raw[i]] = raw[i + 1]
  end
  for _, name in ipairs(PROFILE_NUMBERS) do
    local bounds = PROFILE_BOUNDS[name]
    local n = type(p[name]) == 'string' and string.match(p[name], '^%d+$')
              and tonumber(p[name])
    if not n or n < bounds[1] or n > bounds[2] then
      return nil, name
    end
    p[name] = n
  end
  if not valid_ports(p.ports) then
    return nil, 'ports'
  end
  if p.blocked ~= '0' and p.blocked ~= '1' then
    return nil, 'blocked'
  end
  if not KNOWN_TIERS[p.tier] then
    return nil, 'tier'
  end
  p.reason = p.reason or ''
  return p
end

-- A token bucket is one integer: the nanosecond at which it is full again
-- (GCRA's "theoretical arrival time"). Redis keeps an integer value inside
-- the key's own object, the least memory a tracked user can cost. Lua
-- numbers hold 53 bits, too few for nanoseconds since 1970, so the value
-- is read and written as microseconds followed by three more digits.
--
-- A bucket's "debt" is how many nanoseconds it is from full; a missing
-- bucket owes nothing. It never owes more than a whole refill, unless the
-- server's clock stepped back: see debt_for_decision.
local function read_debt(key, now)
  -- pcall: a key of another type is read as a full bucket and replaced by
  -- the next write, never an error; so is a value of another form.
  local state = redis.pcall('GET', key)
  if type(state) ~= 'string' then
    return 0
  end
  local us, ns = string.match(state, '^(%d+)(%d%d%d)$')
  if us == nil then
    return 0
  end
  return math.max(0, (tonumber(us) - now) * 1000 + tonumber(ns))
end

-- Stores a bucket `debt` nanoseconds from full, rounded down to a whole
-- nanosecond (in the user's favour by less than one), or deletes it when
-- full: an idle user leaves nothing behind. The TTL is the debt.
local function write_debt(key, debt, now)
  debt = math.floor(debt)
  if debt <= 0 then
    redis.call('DEL', key)
    return
  end
  local full = fstr(now + math.floor(debt / 1000))
  redis.call('SET', key, full .. string.format('%03d', debt % 1000),
             'PX', math.ceil(debt / 1e6) + 1)
end

-- The debt a decision starts from. A debt beyond `refill_ns` (the time an
-- empty bucket takes to fill) means the server's clock stepped back since
-- the bucket was written; the bucket is then stored as empty from now. So
-- a step creates no tokens, and costs at most one refill however long it
-- was; a shorter step is owed as it is, and paid back as the clock runs.
local function debt_for_decision(key, now, refill_ns)
  local debt = read_debt(key, now)
  if debt > refill_ns then
    debt = refill_ns
    write_debt(key, debt, now)
  end
  return debt
end

-- The tokens of a bucket of `capacity` that is `debt` nanoseconds from full.
local function bucket_tokens(debt, capacity, ns_per_token)
  return math.max(0, capacity - debt / ns_per_token)
end

-- Nanoseconds until `cost` tokens fit in that bucket (> 0 when they do not).
local function bucket_wait(debt, capacity, ns_per_token, cost)
  return debt - (capacity - cost) * ns_per_token
end

-- Drops leases whose expiry (milliseconds) has passed, with their metadata.
local function purge_leases(svc_key, meta_key, now_ms)
  local expired = redis.call('ZRANGEBYSCORE', svc_key, '-inf', fstr(now_ms))
  if #expired > 0 then
    redis.call('ZREM', svc_key, unpack(expired))
    redis.call('HDEL', meta_key, unpack(expired))
  end
  return expired
end

-- Keeps the lease set, its metadata and the fencing counter alive exactly
-- as long as the latest lease (the counter for a grace period beyond it),
-- and removes them when no lease is left.
local function refresh_lease_ttl(svc_key, meta_key, fence_key, now_ms,
                                 grace_ms)
  local last = redis.call('ZRANGE', svc_key, -1, -1, 'WITHSCORES')
  if #last == 0 then
    redis.call('DEL', svc_key, meta_key)
    return
  end
  local ttl_ms = math.max(1, math.ceil(tonumber(last[2]) - now_ms))
  redis.call('PEXPIRE', svc_key, ttl_ms)
  redis.call('PEXPIRE', meta_key, ttl_ms)
  if redis.call('EXISTS', fence_key) == 1 then
    redis.call('PEXPIRE', fence_key, ttl_ms + grace_ms)
  end
end

-- Hands out the next fencing token. Tokens come from the clock, so they
-- keep growing after the counter has expired, and from the counter, so
-- they keep growing if the clock steps back. The counter remembers when it
-- was created ('born'): a lease older than its counter was lost with the
-- rest of the user's state, not released.
local function next_fence(fence_key, now)
  local state = redis.call('HMGET', fence_key, 'last', 'born')
  local last = tonumber(state[1]) or 0
  local fence = math.max(now, last + 1)
  if state[2] then
    redis.call('HSET', fence_key, 'last', fstr(fence))
  else
    redis.call('HSET', fence_key, 'last', fstr(fence), 'born', fstr(now))
  end
  return fence
end

-- Lease metadata is "memory cpu fence" in one hash field per service.
local function parse_meta(raw)
  if not raw then
    return 0, 0, 0
  end
  local mem, cpu, fence = string.match(raw, '^(%S+) (%S+) (%S+)$')
  return tonumber(mem) or 0, tonumber(cpu) or 0, tonumber(fence) or 0
end
