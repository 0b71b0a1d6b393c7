-- epoch_get: this Redis's dispatch epoch, created if missing. A new epoch
-- means Redis lost its data (FLUSHALL, a restart without persistence, a
-- failover to an empty replica): the dispatcher then re-checks every QUEUED
-- task against Redis instead of waiting for the redelivery timeout.
--
-- KEYS[1]  {prefix}:epoch
-- ARGV[1]  a fresh random epoch, used only if none exists
-- returns  the epoch now stored
-- touches  KEYS[1] (SET NX, GET)
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
