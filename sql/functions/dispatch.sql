-- Internal helpers for the dispatcher (not part of the public SQL API).

-- The rows carry turn and run_at: Redis keeps each queue in that order.
DROP FUNCTION IF EXISTS ledgerq.task_queued_stale(interval, integer, timestamptz);
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
-- turn handed out, where a newcomer joins the line once Redis has nothing of
-- the queue left waiting (flow_turn).
CREATE OR REPLACE FUNCTION ledgerq.task_take_due(
    batch_size integer DEFAULT 100,
    as_of timestamptz DEFAULT NULL
) RETURNS TABLE(id bigint, queue text, priority integer, turn bigint, run_at timestamptz)
-- Scans off (and JIT with them), as in task_claim (claim.sql): the dispatcher
-- runs this statement many times in one session, and PL/pgSQL settles on a
-- generic plan after five. Settled while the table was small, that plan was a
-- sequential scan and a sort, and stayed one behind 60,000 waiting tasks:
-- the dispatcher, busy sorting, handed out fewer tasks than workers drained.
-- Without them the only plan left is the index's order: no sort, no scan.
LANGUAGE plpgsql SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
#variable_conflict use_column
DECLARE
    candidate_ids bigint[];
    candidate_queues text[];
    candidate_retries bigint;
    candidate_keyed bigint;
BEGIN
    SELECT array_agg(d.id), array_agg(DISTINCT d.queue),
           count(*) FILTER (WHERE d.is_retry), count(*) FILTER (WHERE d.concurrency_key IS NOT NULL)
    INTO candidate_ids, candidate_queues, candidate_retries, candidate_keyed
    FROM (
        SELECT t.id, t.queue, t.concurrency_key, t.attempts > t.budget_start AS is_retry
        FROM ledgerq.tasks t
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
        -- A batch of one queue without keys, far from its limits (the common
        -- case): admitted whole, without reading the candidates again.
        IF cardinality(candidate_queues) > 1 OR candidate_keyed > 0
           OR NOT ledgerq.flow_admit_all(candidate_queues[1], cardinality(candidate_ids),
                                         candidate_retries) THEN
            candidate_ids := ledgerq.flow_admit(candidate_ids);
        END IF;
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
-- for the dispatcher to check against Redis, by queued_at then id, after the
-- given (queued_at, id) so a sweep pages through them all; with their turn and
-- run_at, so a task pushed again gets the same place in line. A queue whose
-- tasks the sweep saw in Redis less than older_than ago (queued_seen) is left
-- out whole: a queue is checked all at once or not at all, so task_queued_seen
-- may then vouch for every task of it handed out before the cutoff.
CREATE OR REPLACE FUNCTION ledgerq.task_queued_stale(
    older_than interval,
    batch_size integer DEFAULT 1000,
    as_of timestamptz DEFAULT NULL,
    after_queued_at timestamptz DEFAULT NULL,
    after_id bigint DEFAULT NULL
) RETURNS TABLE(id bigint, queue text, priority integer, turn bigint, run_at timestamptz,
                queued_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT t.id, t.queue, t.priority, t.turn, t.run_at, t.queued_at FROM ledgerq.tasks t
    WHERE t.status = 'QUEUED' AND t.queued_at < coalesce(as_of, now()) - older_than
      AND (after_queued_at IS NULL OR (t.queued_at, t.id) > (after_queued_at, coalesce(after_id, 0)))
      AND NOT EXISTS (
          SELECT 1 FROM ledgerq.queued_seen s
          WHERE s.queue = t.queue AND s.seen_at >= coalesce(as_of, now()) - older_than)
    ORDER BY t.queued_at, t.id
    LIMIT batch_size;
$$;

-- task_queued_seen: the sweep checked every task of these queues that
-- task_queued_stale(older_than, as_of) listed, and each was in Redis or is
-- there again: those handed out before as_of - older_than need no check again
-- until older_than has passed, and reap_stuck leaves them alone meanwhile.
CREATE OR REPLACE FUNCTION ledgerq.task_queued_seen(
    queues text[],
    older_than interval,
    as_of timestamptz
) RETURNS integer
LANGUAGE sql AS $$
    WITH seen AS (
        INSERT INTO ledgerq.queued_seen AS s (queue, queued_before, seen_at)
        SELECT DISTINCT q, as_of - older_than, as_of FROM unnest(queues) q
        ON CONFLICT (queue) DO UPDATE
            SET queued_before = greatest(s.queued_before, excluded.queued_before),
                seen_at = greatest(s.seen_at, excluded.seen_at)
        RETURNING 1
    )
    SELECT count(*)::integer FROM seen;
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
-- enqueue does not wake the dispatcher for tasks it hands off; enqueue_task
-- then inserts the tasks it may hand off QUEUED already (by the same rule),
-- and only enqueue_tasks' are marked here. The ids are looked up one by one
-- by primary key, whatever the statistics say: the plan is kept for the
-- session, and one made while the table looked empty (after a TRUNCATE) would
-- otherwise scan it whole, or walk a status index over a backlog; OFFSET 0
-- keeps the lookup a parameterised one and the status tests out of it.
CREATE OR REPLACE FUNCTION ledgerq.task_hand_off(task_ids bigint[])
RETURNS TABLE(id bigint, queue text, priority integer, run_at timestamptz)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    pending_ids bigint[];
BEGIN
    RETURN QUERY
        SELECT s.id, s.queue, s.priority, s.run_at
        FROM unnest(task_ids) AS i(id)
        CROSS JOIN LATERAL (SELECT t.id, t.queue, t.priority, t.run_at, t.status
                            FROM ledgerq.tasks t WHERE t.id = i.id OFFSET 0) s
        WHERE s.status = 'QUEUED';
    SELECT array_agg(s.id) INTO pending_ids
    FROM unnest(task_ids) AS i(id)
    CROSS JOIN LATERAL (SELECT t.id, t.status, t.run_at
                        FROM ledgerq.tasks t WHERE t.id = i.id OFFSET 0) s
    WHERE s.status = 'PENDING' AND s.run_at <= now();
    IF pending_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
        UPDATE ledgerq.tasks t
        SET status = 'QUEUED', queued_at = now()
        WHERE t.id = ANY (pending_ids) AND t.status = 'PENDING' AND t.run_at <= now()
          AND t.concurrency_key IS NULL
          -- Any row for the queue (paused, limited, or only configured) sends its
          -- claims through flow control: the dispatcher hands those out.
          AND NOT EXISTS (SELECT 1 FROM ledgerq.queues q WHERE q.queue = t.queue)
        RETURNING t.id, t.queue, t.priority, t.run_at;
    IF EXISTS (
        SELECT 1 FROM ledgerq.tasks t
        WHERE t.id = ANY (pending_ids) AND t.status = 'PENDING' AND t.run_at <= now()
    ) THEN
        PERFORM pg_notify('ledgerq_tasks', '');
    END IF;
END;
$$;
