-- write_profile.lua: stores a user's profile, whole or in part.
--
-- KEYS[1]  profile hash
-- ARGV[1]  comma-separated fields to patch, '' to replace the whole profile
-- ARGV[2..] field, value pairs of a complete profile
--
-- With a patch list, an existing profile gets only the listed fields; a
-- missing one is created from all the pairs (the default tier with the
-- patch applied), so a patch never leaves a partial profile behind.
--
-- Returns 1. Writes the profile hash, which has no TTL: a profile is
-- configuration and persists until deleted.

local key = KEYS[1]
local patch = ARGV[1]

local pairs_all = {}
for i = 2, #ARGV, 2 do
  pairs_all[#pairs_all + 1] = ARGV[i]
  pairs_all[#pairs_all + 1] = ARGV[i + 1]
end

if patch == '' or redis.call('EXISTS', key) == 0 then
  redis.call('DEL', key)
  redis.call('HSET', key, unpack(pairs_all))
  return 1
end

local wanted = {}
for name in string.gmatch(patch, '[^,]+') do
  wanted[name] = true
end
local subset = {}
for i = 1, #pairs_all, 2 do
  if wanted[pairs_all[i]] then
    subset[#subset + 1] = pairs_all[i]
    subset[#subset + 1] = pairs_all[i + 1]
  end
end
redis.call('HSET', key, unpack(subset))
return 1
