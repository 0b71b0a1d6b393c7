-- task_pop: take up to COUNT members with the lowest (score, member) across
-- several queues at once, so a worker serving queues a,b honours the order
-- across them: the score is minus the priority, and members of equal score
-- compare byte by byte (fixed-width hex: turn, run_at, id), as Redis orders
-- them inside one sorted set.
--
-- KEYS[1..n]  queue sorted sets ({prefix}:queue:NAME), all in one hash slot
-- ARGV[1]     COUNT, the most ids to take
-- returns     the members taken, best first (lowest score, then lowest
--             member; ties by KEYS order)
-- touches     KEYS[1..n] (ZRANGE, ZREM)
local count = tonumber(ARGV[1])
local candidates = {}
for k, key in ipairs(KEYS) do
    local items = redis.call('ZRANGE', key, 0, count - 1, 'WITHSCORES')
    for j = 1, #items, 2 do
        candidates[#candidates + 1] = {tonumber(items[j + 1]), k, items[j]}
    end
end
table.sort(candidates, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    if a[3] ~= b[3] then return a[3] < b[3] end
    return a[2] < b[2]
end)
local taken = {}
for n = 1, math.min(count, #candidates) do
    local c = candidates[n]
    redis.call('ZREM', KEYS[c[2]], c[3])
    taken[#taken + 1] = c[3]
end
return taken
