-- release_service.lua: frees a service's slot.
--
-- KEYS[1]  leases: sorted set, member = service id, score = expiry (ms)
-- KEYS[2]  lease metadata hash: service id -> "memory cpu fence"
-- KEYS[3]  fencing counter hash {last, born, gone:<service id>}
-- ARGV[1]  clock override in microseconds, '' for the server's TIME
-- ARGV[2]  fencing counter grace beyond the last lease, milliseconds
-- ARGV[3]  service id
-- ARGV[4]  fence of the caller's lease, '' to release whatever holds it
--
-- Returns 1 when a live lease was removed, 0 when there was none, it had
-- expired, or it belongs to another fence (a newer holder keeps its slot).
--
-- Writes: removes the lease and its metadata; when the lease's fence is
-- older than the counter (a restored lease), records the release in the
-- counter as gone:<service id> = fence, so that renew_leases.lua does not
-- restore it again (it lives as long as the counter); TTLs as in
-- start_service.lua.

local svc_key, meta_key, fence_key = KEYS[1], KEYS[2], KEYS[3]
local clock = ARGV[1]
local grace_ms = tonumber(ARGV[2])
local service_id = ARGV[3]
local fence = tonumber(ARGV[4])

local now_ms = math.floor(now_us(clock) / 1000)
local removed = 0
local _, _, current = parse_meta(redis.call('HGET', meta_key, service_id))
-- A lease past its expiry no longer holds a slot: releasing it frees
-- nothing, though it is removed with the other expired ones below.
local held_until = tonumber(redis.call('ZSCORE', svc_key, service_id))
if held_until and held_until > now_ms
    and (fence == nil or fence == current) then
  redis.call('ZREM', svc_key, service_id)
  redis.call('HDEL', meta_key, service_id)
  removed = 1
  -- A lease older than its counter was restored after a loss, and a stale
  -- renewal could restore it again: the counter records its release.
  local born = tonumber(redis.call('HGET', fence_key, 'born'))
  if born and current < born then
    redis.call('HSET', fence_key, 'gone:' .. service_id, fstr(current))
  end
end
purge_leases(svc_key, meta_key, now_ms)
refresh_lease_ttl(svc_key, meta_key, fence_key, now_ms, grace_ms)
return removed
