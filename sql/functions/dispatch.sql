-- Internal helpers for the dispatcher (not part of the public SQL API).

-- The rows now carry run_at: Redis orders a queue by priority, then run_at, then id.
DROP FUNCTION IF EXISTS ledgerq.task_take_due(integer, timestamptz);
DROP FUNCTION IF EXISTS ledgerq.task_queued_stale(interval, integer, timestamptz);

-- task_take_due: the dispatcher's hot query. Takes up to batch_size due PENDING
-- tasks in priority, run_at, creation order and marks them QUEUED. The caller
-- pushes the ids to Redis before committing, so a failed push rolls the batch
-- back to PENDING and a crash after the push leaves ids that claim_task accepts.
-- SKIP LOCKED lets several dispatchers take disjoint batches without waiting.
CREATE OR REPLACE FUNCTION ledgerq.task_take_due(
    batch_size integer DEFAULT 100,
    as_of timestamptz DEFAULT NULL
) RETURNS TABLE(id bigint, queue text, priority integer, run_at timestamptz)
LANGUAGE sql AS $$
    WITH due AS (
        SELECT t.id FROM ledgerq.tasks t
        WHERE t.status = 'PENDING' AND t.run_at <= coalesce(as_of, now())
        ORDER BY t.priority DESC, t.run_at, t.id
        LIMIT batch_size
        -- NO KEY UPDATE: see reap.sql (a stale attempt's effect transaction).
        FOR NO KEY UPDATE SKIP LOCKED
    )
    UPDATE ledgerq.tasks t
    SET status = 'QUEUED', queued_at = now()
    FROM due
    WHERE t.id = due.id
    RETURNING t.id, t.queue, t.priority, t.run_at;
$$;

-- task_next_run_at: when the next PENDING task falls due, so an idle
-- dispatcher can sleep exactly until then.
CREATE OR REPLACE FUNCTION ledgerq.task_next_run_at() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(t.run_at) FROM ledgerq.tasks t WHERE t.status = 'PENDING';
$$;

-- task_queued_stale: QUEUED tasks handed to Redis longer than older_than ago,
-- oldest first, for the dispatcher to check against Redis.
CREATE OR REPLACE FUNCTION ledgerq.task_queued_stale(
    older_than interval,
    batch_size integer DEFAULT 1000,
    as_of timestamptz DEFAULT NULL
) RETURNS TABLE(id bigint, queue text, priority integer, run_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT t.id, t.queue, t.priority, t.run_at FROM ledgerq.tasks t
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

-- task_handing_off: whether this transaction hands its new tasks to Redis
-- itself (the enqueuing client's hand-off, see task_hand_off); enqueue_task(s)
-- then leave waking the dispatcher to task_hand_off.
CREATE OR REPLACE FUNCTION ledgerq.task_handing_off() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('ledgerq.hand_off', true), '') = 'on';
$$;

-- task_hand_off: the enqueuing process's shortcut past the dispatcher. Called in
-- the statement that created the tasks, it marks those that are due at once
-- QUEUED (so no dispatcher takes them again) and returns them for the caller
-- to push to Redis right after its commit. A push that never happens (the
-- caller died, Redis was down) is what the dispatcher's redelivery sweep finds:
-- QUEUED and missing from Redis, pushed again. A task whose queue has a row in
-- ledgerq.queues (paused, limited or configured), or that has a concurrency
-- key (its turn orders it among its queue's keys), is left PENDING, and the
-- dispatcher is woken for it: it decides when such a task may run.
-- The caller sets ledgerq.hand_off to 'on' for its transaction first, so the
-- enqueue does not wake the dispatcher for tasks it hands off.
CREATE OR REPLACE FUNCTION ledgerq.task_hand_off(task_ids bigint[])
RETURNS TABLE(id bigint, queue text, priority integer, run_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        UPDATE ledgerq.tasks t
        SET status = 'QUEUED', queued_at = now()
        WHERE t.id = ANY (task_ids) AND t.status = 'PENDING' AND t.run_at <= now()
          AND t.concurrency_key IS NULL
          -- Any row for the queue (paused, limited, or only configured) sends its
          -- claims through flow control: the dispatcher hands those out.
          AND NOT EXISTS (SELECT 1 FROM ledgerq.queues q WHERE q.queue = t.queue)
        RETURNING t.id, t.queue, t.priority, t.run_at;
    IF EXISTS (
        SELECT 1 FROM ledgerq.tasks t
        WHERE t.id = ANY (task_ids) AND t.status = 'PENDING' AND t.run_at <= now()
    ) THEN
        PERFORM pg_notify('ledgerq_tasks', '');
    END IF;
END;
$$;
