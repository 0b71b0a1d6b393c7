-- Internal helpers for the dispatcher (not part of the public SQL API).

DROP FUNCTION IF EXISTS ledgerq.task_take_due(integer, timestamptz);

-- task_take_due: the dispatcher's hot query. Takes up to batch_size ready
-- PENDING tasks (due, not parked) in priority, turn, run_at, creation order
-- and marks them QUEUED; returns each with its turn and run_at, so Redis can
-- keep that order. Commits before the push (see dispatcher.py): a failed push
-- leaves them QUEUED, and the dispatcher's redelivery sweep pushes them.
-- SKIP LOCKED lets several dispatchers take disjoint batches without waiting.
--
-- Tasks of configured queues (a row in ledgerq.queues) are admitted by
-- flow_admit (limits.sql): those that could not start now (a paused queue, a
-- limit reached) are parked instead of handed out. A task's turn makes
-- concurrency keys take turns; the queue's frontier moves up to the highest
-- turn handed out, so a newcomer joins the line there (flow_turn).
CREATE OR REPLACE FUNCTION ledgerq.task_take_due(
    batch_size integer DEFAULT 100,
    as_of timestamptz DEFAULT NULL
) RETURNS TABLE(id bigint, queue text, priority integer, turn bigint, run_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    candidate_ids bigint[];
    candidate_queues text[];
BEGIN
    SELECT array_agg(d.id), array_agg(DISTINCT d.queue) INTO candidate_ids, candidate_queues
    FROM (
        SELECT t.id, t.queue FROM ledgerq.tasks t
        WHERE t.status = 'PENDING' AND t.waiting_on IS NULL AND t.run_at <= coalesce(as_of, now())
        ORDER BY t.priority DESC, t.turn, t.run_at, t.id
        LIMIT batch_size
        -- NO KEY UPDATE: see reap.sql (a stale attempt's effect transaction).
        FOR NO KEY UPDATE SKIP LOCKED
    ) d;
    IF candidate_ids IS NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM ledgerq.queues q WHERE q.queue = ANY (candidate_queues)) THEN
        candidate_ids := ledgerq.flow_admit(candidate_ids);
    END IF;
    RETURN QUERY
    WITH taken AS (
        UPDATE ledgerq.tasks t
        SET status = 'QUEUED', queued_at = now()
        WHERE t.id = ANY (candidate_ids)
        RETURNING t.id, t.queue, t.priority, t.turn, t.run_at
    ), frontier AS (
        -- Only queues whose tasks carry keys have turns above 0.
        INSERT INTO ledgerq.flow_turns AS f (queue, frontier)
        SELECT k.queue, max(k.turn) FROM taken k WHERE k.turn > 0 GROUP BY k.queue
        ON CONFLICT (queue) DO UPDATE SET frontier = greatest(f.frontier, excluded.frontier)
        WHERE f.frontier < excluded.frontier
    )
    -- In line order (a sort of one batch, in memory), as Redis will pop them.
    SELECT k.id, k.queue, k.priority, k.turn, k.run_at FROM taken k
    ORDER BY k.priority DESC, k.turn, k.run_at, k.id;
END;
$$;

-- task_next_run_at: when the dispatcher has something to do next: the next
-- ready PENDING task falls due, or a rate bucket wakes tasks parked on it.
-- An idle dispatcher sleeps exactly until then.
CREATE OR REPLACE FUNCTION ledgerq.task_next_run_at() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(
        (SELECT min(t.run_at) FROM ledgerq.tasks t WHERE t.status = 'PENDING' AND t.waiting_on IS NULL),
        ledgerq.flow_next_wake());
$$;

-- task_queued_stale: QUEUED tasks handed to Redis longer than older_than ago,
-- oldest first, for the dispatcher to check against Redis.
CREATE OR REPLACE FUNCTION ledgerq.task_queued_stale(
    older_than interval,
    batch_size integer DEFAULT 1000,
    as_of timestamptz DEFAULT NULL
) RETURNS TABLE(id bigint, queue text, priority integer)
LANGUAGE sql STABLE AS $$
    SELECT t.id, t.queue, t.priority FROM ledgerq.tasks t
    WHERE t.status = 'QUEUED' AND t.queued_at < coalesce(as_of, now()) - older_than
    ORDER BY t.queued_at
    LIMIT batch_size;
$$;

-- task_queued_confirm: the dispatcher saw these ids waiting in Redis (or has
-- just pushed them again), so their delivery is not lost: restart the clock
-- reap_stuck measures the redelivery timeout with.
CREATE OR REPLACE FUNCTION ledgerq.task_queued_confirm(task_ids bigint[]) RETURNS integer
LANGUAGE sql AS $$
    WITH confirmed AS (
        UPDATE ledgerq.tasks t SET queued_at = now()
        WHERE t.id = ANY (task_ids) AND t.status = 'QUEUED'
        RETURNING 1
    )
    SELECT count(*)::integer FROM confirmed;
$$;
