-- What the dispatcher's redelivery sweep saw in Redis, per queue instead of
-- per task. A QUEUED task waiting in a long Redis backlog must not be handed
-- out again by reap_stuck after the redelivery timeout; the sweep used to
-- prove each such task alive by rewriting its queued_at, so a backlog of
-- 100,000 in Redis cost 10,000 row updates a second, competing with the claims
-- of the very tasks it rewrote. Now one row per queue says: every QUEUED task
-- of the queue handed out before queued_before was found in Redis (or pushed
-- to it again) at seen_at. reap_stuck counts a task's wait from the later of
-- its queued_at and the seen_at that covers it.
CREATE TABLE ledgerq.queued_seen (
    queue         text        PRIMARY KEY,
    queued_before timestamptz NOT NULL,
    seen_at       timestamptz NOT NULL
);
