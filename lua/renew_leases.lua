-- renew_leases.lua: extends the leases a replica holds for one user, and
-- restores those that Redis lost.
--
-- A lease is renewed when it is live and carries the holder's fence. A
-- lease missing from Redis is restored when, by this server's clock, the
-- holder's copy has not run out, the user's fencing counter (as it was
-- when this call began) is younger than the lease, and the counter holds
-- no record of that lease's release (Redis lost the user's state: a
-- restart without persistence or a failover that dropped writes). Any
-- other case is lost: the lease expired, was released, or now belongs to
-- a newer fence.
-- Restoring ignores limits on purpose: the service is running, and the
-- count must say so.
--
-- KEYS[1]  leases: sorted set, member = service id, score = expiry (ms)
-- KEYS[2]  lease metadata hash: service id -> "memory cpu fence"
-- KEYS[3]  fencing counter hash {last, born, gone:<service id>}
-- ARGV[1]  clock override in microseconds, '' for the server's TIME
-- ARGV[2]  lease length in milliseconds
-- ARGV[3]  fencing counter grace beyond the last lease, milliseconds
-- ARGV[4..] five values per lease: service id, fence ('' if unknown),
--           the holder's expiry in ms ('' if unknown), memory MB, CPU %
--
-- Returns, per lease in order, three values: status ('ok', 'restored' or
-- 'lost'), the fence (0 when lost) and the new expiry in ms as a string.
--
-- Writes: the renewed or restored leases with their metadata, the counter
-- (raised to a restored fence), and TTLs as in start_service.lua.

local svc_key, meta_key, fence_key = KEYS[1], KEYS[2], KEYS[3]
local clock = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local grace_ms = tonumber(ARGV[3])

local now = now_us(clock)
local now_ms = math.floor(now / 1000)
local expiry_ms = now_ms + lease_ms
local born = tonumber(redis.call('HGET', fence_key, 'born'))

local function renew(service_id, fence, held_until, memory, cpu)
  local score = tonumber(redis.call('ZSCORE', svc_key, service_id))
  if score then
    local _, _, current = parse_meta(redis.call('HGET', meta_key, service_id))
    if score <= now_ms or (fence and fence ~= current) then
      return 'lost', 0
    end
    redis.call('ZADD', svc_key, fstr(expiry_ms), service_id)
    return 'ok', current
  end

  if not (fence and held_until and held_until > now_ms) then
    return 'lost', 0
  end
  if born and born <= fence then
    return 'lost', 0
  end
  if tonumber(redis.call('HGET', fence_key, 'gone:' .. service_id))
      == fence then
    return 'lost', 0
  end
  redis.call('ZADD', svc_key, fstr(expiry_ms), service_id)
  redis.call('HSET', meta_key, service_id,
             memory .. ' ' .. cpu .. ' ' .. fstr(fence))
  local last = tonumber(redis.call('HGET', fence_key, 'last')) or 0
  if fence > last then
    redis.call('HSET', fence_key, 'last', fstr(fence))
  end
  -- 'born' keeps the value read before any restore: every lease of this
  -- call is judged against the counter as the loss left it.
  if redis.call('HEXISTS', fence_key, 'born') == 0 then
    redis.call('HSET', fence_key, 'born', fstr(now))
  end
  return 'restored', fence
end

purge_leases(svc_key, meta_key, now_ms)

local out = {}
for i = 4, #ARGV, 5 do
  local status, fence = renew(ARGV[i], tonumber(ARGV[i + 1]),
                              tonumber(ARGV[i + 2]), ARGV[i + 3],
                              ARGV[i + 4])
  out[#out + 1] = status
  out[#out + 1] = fence
  out[#out + 1] = status == 'lost' and '0' or fstr(expiry_ms)
end
refresh_lease_ttl(svc_key, meta_key, fence_key, now_ms, grace_ms)
return out
