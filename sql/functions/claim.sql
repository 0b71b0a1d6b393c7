-- claim_task / claim_tasks: a claimable task (QUEUED, or PENDING and due)
-- becomes RUNNING under a lease, with its attempt number bumped and an attempt
-- row opened. No SKIP LOCKED here: a worker that pops an id while the
-- dispatcher's transaction still holds the row must wait for it, not drop it.
-- Two claims of one task serialise on the row lock; the loser re-checks the
-- status under READ COMMITTED, finds RUNNING, and gets no row.
--
-- The batch functions run with plan_cache_mode = force_generic_plan. Left to
-- itself, PL/pgSQL plans their statement afresh on every call with a small
-- array (a plan costed for one id looks cheaper than the generic one), and
-- planning it cost more than running it: about half of a single claim's
-- backend CPU. The generic plan looks the ids up by primary key whatever
-- their number. The single-task forms are PL/pgSQL for the same reason: a
-- SQL function is planned again on every call.
--
-- task_claim also runs with sequential and bitmap scans off. A generic plan is
-- kept for the session's life (until the table is analyzed), and one made
-- while the table was empty (a fresh deploy, a worker started before the first
-- burst) read whole partial status indexes on every claim, or the table
-- itself: 17 ms per claim behind 20,000 queued tasks instead of 1. Its
-- statements find their tasks by id, and so do those of flow_claim, which runs
-- with these settings too: the primary key is always the right path. JIT is
-- off with them: a scan that must stay a sequential one (the small queues
-- table) costs 10^10 when disabled, and the planner would compile the statement
-- (100 ms) for it. heartbeat_tasks and complete_tasks run the same way.

-- task_claim: the claim with its refusals. Rows with status RUNNING are
-- claimed; rows with status PENDING and waiting_on set were refused by a
-- flow-control limit or a pause (waiting_on says which) and wait, parked, with
-- their attempt budget untouched. The worker calls this, to count refusals;
-- claim_tasks is the same without them.
--
-- Tasks of queues without a row in ledgerq.queues (no settings, never paused:
-- the common case) take the fast path: their rows are locked, then the shared
-- flow lock of each of their queues, then one statement claims them, probing
-- ledgerq.queues per task again. That statement's snapshot is taken after the
-- shared lock, so a pause_queue (or configure_queue) that committed the
-- queue's first row while we waited for the lock is seen and the task goes to
-- flow_claim; a pause that had to wait for our shared lock returns only after
-- we commit. Either way no task of the queue starts after pause_queue returns.
-- The rest go through flow_claim (limits.sql), which decides under the
-- queue's flow lock, shared too, and the claim locks of the scopes it may
-- spend (flow_lock_claims). A task whose queue got its first row between
-- our two probes goes there too, while we hold the shared lock: two claims in
-- that window can deadlock (PostgreSQL aborts one; its ids stay QUEUED and
-- are handed out again), only around a queue's first configure or pause.
CREATE OR REPLACE FUNCTION ledgerq.task_claim(
    task_ids bigint[],
    worker_id text,
    lease_seconds integer DEFAULT 30
) RETURNS SETOF ledgerq.tasks
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
#variable_conflict use_column
DECLARE
    claimed_count integer := 0;
    unconfigured_ids bigint[];
    unconfigured_queues text[];
BEGIN
    IF worker_id IS NULL OR worker_id = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = 'worker_id must be a non-empty string';
    END IF;
    IF lease_seconds IS NULL OR lease_seconds < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422',
            MESSAGE = format('lease_seconds must be >= 1, got %s', coalesce(lease_seconds::text, 'NULL'));
    END IF;
    SELECT array_agg(l.id ORDER BY l.id), array_agg(DISTINCT l.queue)
    INTO unconfigured_ids, unconfigured_queues
    FROM (
        -- Lock in id order, so two workers claiming overlapping batches (a
        -- duplicate delivery) cannot deadlock.
        SELECT t.id, t.queue FROM ledgerq.tasks t
        WHERE t.id = ANY (task_ids)
          AND (t.status = 'QUEUED' OR (t.status = 'PENDING' AND t.run_at <= now()))
          AND t.waiting_on IS NULL
          AND NOT EXISTS (SELECT 1 FROM ledgerq.queues q WHERE q.queue = t.queue)
        ORDER BY t.id
        -- NO KEY UPDATE: not blocked by the KEY SHARE lock a stale attempt's
        -- once_in_transaction may still hold on the row (see reap.sql).
        FOR NO KEY UPDATE
    ) l;
    IF unconfigured_ids IS NOT NULL THEN
        -- Row locks first, then flow locks in ascending order, as everywhere
        -- (flow_lock_queues). Shared: fast-path claims never wait for each other.
        -- Lock order everywhere: rows, flow locks, claim locks
        -- (flow_lock_claims), dispatch locks, parking locks (limits.sql).
        PERFORM ledgerq.flow_take_locks(
            ARRAY(SELECT ledgerq.flow_lock_key(q) FROM unnest(unconfigured_queues) q), shared => true);
        RETURN QUERY
        WITH claimed AS (
            UPDATE ledgerq.tasks t
            SET status = 'RUNNING',
                attempts = t.attempts + 1,
                worker_id = task_claim.worker_id,
                lease_expires_at = now() + make_interval(secs => lease_seconds),
                queued_at = NULL,
                started_at = now()
            WHERE t.id = ANY (unconfigured_ids)
              -- Re-checked with this statement's snapshot: a pause parks
              -- QUEUED tasks and gives the queue its row.
              AND (t.status = 'QUEUED' OR (t.status = 'PENDING' AND t.run_at <= now()))
              AND t.waiting_on IS NULL
              AND NOT EXISTS (SELECT 1 FROM ledgerq.queues q WHERE q.queue = t.queue)
            RETURNING t.*
        ), opened AS (
            INSERT INTO ledgerq.attempts (task_id, attempt, worker_id, started_at)
            SELECT c.id, c.attempts, c.worker_id, c.started_at FROM claimed c
        )
        SELECT * FROM claimed;
        GET DIAGNOSTICS claimed_count = ROW_COUNT;
    END IF;
    -- Fewer claimed than asked: the rest were not claimable (a duplicate
    -- delivery, a finished task) or belong to configured queues.
    IF claimed_count < coalesce(cardinality(task_ids), 0) THEN
        RETURN QUERY SELECT * FROM ledgerq.flow_claim(task_ids, worker_id, lease_seconds);
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION ledgerq.claim_tasks(
    task_ids bigint[],
    worker_id text,
    lease_seconds integer DEFAULT 30
) RETURNS SETOF ledgerq.tasks
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM ledgerq.task_claim(claim_tasks.task_ids, claim_tasks.worker_id,
                                                  claim_tasks.lease_seconds) c
                 WHERE c.status = 'RUNNING';
END;
$$;

CREATE OR REPLACE FUNCTION ledgerq.claim_task(
    task_id bigint,
    worker_id text,
    lease_seconds integer DEFAULT 30
) RETURNS SETOF ledgerq.tasks
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM ledgerq.claim_tasks(ARRAY[claim_task.task_id], claim_task.worker_id,
                                                   claim_task.lease_seconds);
END;
$$;

-- heartbeat_tasks: the batch form of heartbeat, one row per input pair, so a
-- worker renews every lease it holds in one round trip.
CREATE OR REPLACE FUNCTION ledgerq.heartbeat_tasks(
    task_ids bigint[],
    attempts integer[],
    lease_seconds integer DEFAULT 30
) RETURNS TABLE(task_id bigint, attempt integer, state text)
-- Scans off: the tasks are found by id (see task_claim above).
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
#variable_conflict use_column
BEGIN
    IF lease_seconds IS NULL OR lease_seconds < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422',
            MESSAGE = format('lease_seconds must be >= 1, got %s', coalesce(lease_seconds::text, 'NULL'));
    END IF;
    IF coalesce(cardinality(task_ids), 0) <> coalesce(cardinality(attempts), 0) THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = 'task_ids and attempts must have the same length';
    END IF;
    RETURN QUERY
    WITH input AS (
        SELECT i.task_id, i.attempt, i.ord
        FROM unnest(task_ids, attempts) WITH ORDINALITY AS i(task_id, attempt, ord)
    ), renewed AS (
        -- An expired lease that the reaper has not yet taken is still this
        -- attempt's: renewing it is correct, the attempt number fences the rest.
        -- "lease_expires_at IS NOT NULL" is "RUNNING" (see complete_tasks).
        UPDATE ledgerq.tasks t
        SET lease_expires_at = now() + make_interval(secs => lease_seconds)
        FROM input i
        WHERE t.id = i.task_id AND t.attempts = i.attempt AND t.lease_expires_at IS NOT NULL
        RETURNING t.id, t.attempts, t.cancel_requested
    )
    SELECT i.task_id, i.attempt,
           CASE WHEN r.id IS NULL THEN 'lost' WHEN r.cancel_requested THEN 'cancel' ELSE 'ok' END
    -- Join on the attempt too: a stale attempt listed beside the current one
    -- must still hear 'lost'.
    FROM input i LEFT JOIN renewed r ON r.id = i.task_id AND r.attempts = i.attempt
    ORDER BY i.ord;
END;
$$;

CREATE OR REPLACE FUNCTION ledgerq.heartbeat(
    task_id bigint,
    attempt integer,
    lease_seconds integer DEFAULT 30
) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    RETURN (SELECT h.state
            FROM ledgerq.heartbeat_tasks(ARRAY[heartbeat.task_id], ARRAY[heartbeat.attempt],
                                         heartbeat.lease_seconds) h);
END;
$$;
