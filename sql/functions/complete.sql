-- complete_task / complete_tasks: record an attempt's outcome and move the task
-- on. Only the task's current RUNNING attempt may complete it: any other
-- attempt number (a stale worker that lost its lease) is fenced out and gets
-- NULL back, changing nothing.
--
-- Performance notes. The statements test RUNNING as lease_expires_at IS NOT
-- NULL, which is the same (constraint tasks_lease_iff_running), on purpose:
-- given status = 'RUNNING' the planner may read every RUNNING task through
-- tasks_running_idx and match them against the input in a nested loop, and it
-- does when its statistics say few tasks run (after an ANALYZE of a quiet
-- table): O(running x batch), 3.7 ms instead of 1.6 for a batch of 100. This
-- way it can only look the given ids up by primary key. Generic plans and a
-- PL/pgSQL complete_task: see claim.sql.

CREATE OR REPLACE FUNCTION ledgerq.complete_tasks(
    task_ids bigint[],
    attempts integer[],
    succeeded boolean[],
    results jsonb[] DEFAULT NULL,
    errors text[] DEFAULT NULL,
    retryable boolean[] DEFAULT NULL
) RETURNS TABLE(task_id bigint, attempt integer, status text)
-- Scans off: the tasks are found by id (see task_claim in claim.sql).
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
#variable_conflict use_column
BEGIN
    IF coalesce(cardinality(task_ids), 0) <> coalesce(cardinality(attempts), 0)
       OR coalesce(cardinality(task_ids), 0) <> coalesce(cardinality(succeeded), 0) THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422',
            MESSAGE = 'task_ids, attempts and succeeded must have the same length';
    END IF;
    RETURN QUERY
    WITH input AS (
        SELECT i.task_id, i.attempt, coalesce(i.succeeded, false) AS succeeded, i.result,
               i.error, coalesce(i.retryable, true) AS retryable, i.ord
        FROM unnest(task_ids, attempts, succeeded, results, errors, retryable)
             WITH ORDINALITY AS i(task_id, attempt, succeeded, result, error, retryable, ord)
    ), first_outcome AS (
        -- A task listed twice in one batch: the first outcome wins.
        SELECT DISTINCT ON (i.task_id) i.* FROM input i ORDER BY i.task_id, i.ord
    ), locked AS (
        -- Lock in id order, so concurrent batches (a worker and the reaper)
        -- cannot deadlock.
        SELECT t.id, o.attempt, o.succeeded, o.result, o.error, o.retryable
        FROM ledgerq.tasks t JOIN first_outcome o ON t.id = o.task_id AND t.attempts = o.attempt
        WHERE t.lease_expires_at IS NOT NULL
        ORDER BY t.id
        -- NO KEY UPDATE: see reap.sql (a stale attempt's effect transaction).
        FOR NO KEY UPDATE OF t
    ), finished AS (
        UPDATE ledgerq.tasks t
        SET status = CASE
                WHEN l.succeeded THEN 'SUCCEEDED'
                WHEN t.cancel_requested THEN 'CANCELLED'
                WHEN NOT l.retryable OR t.attempts - t.budget_start >= t.max_attempts THEN 'DEAD'
                ELSE 'PENDING' END,
            result = CASE WHEN l.succeeded THEN l.result END,
            last_error = CASE WHEN l.succeeded THEN t.last_error
                              ELSE coalesce(l.error, 'attempt failed without an error message') END,
            run_at = CASE
                WHEN l.succeeded OR t.cancel_requested OR NOT l.retryable
                     OR t.attempts - t.budget_start >= t.max_attempts THEN t.run_at
                ELSE now() + ledgerq.compute_backoff(t.attempts - t.budget_start) END,
            -- A retry joins the line again, after its key's waiting tasks.
            turn = CASE
                WHEN l.succeeded OR t.cancel_requested OR NOT l.retryable
                     OR t.attempts - t.budget_start >= t.max_attempts THEN t.turn
                ELSE ledgerq.flow_turn(t.queue, t.concurrency_key) END,
            finished_at = CASE
                WHEN l.succeeded OR t.cancel_requested OR NOT l.retryable
                     OR t.attempts - t.budget_start >= t.max_attempts THEN now() END,
            lease_expires_at = NULL,
            cancel_requested = false
        FROM locked l
        WHERE t.id = l.id AND t.attempts = l.attempt AND t.lease_expires_at IS NOT NULL
        -- The attempt records the same error as the task, the default
        -- message included, so the history never shows a silent failure.
        RETURNING t.id, t.attempts, t.status, t.last_error AS error
    ), closed AS (
        UPDATE ledgerq.attempts a
        SET finished_at = now(),
            outcome = CASE f.status WHEN 'SUCCEEDED' THEN 'succeeded'
                                    WHEN 'CANCELLED' THEN 'cancelled' ELSE 'failed' END,
            error = CASE WHEN f.status = 'SUCCEEDED' THEN NULL ELSE f.error END
        FROM finished f
        WHERE a.task_id = f.id AND a.attempt = f.attempts
    )
    SELECT i.task_id, i.attempt, f.status
    FROM input i LEFT JOIN finished f ON f.id = i.task_id AND f.attempts = i.attempt
    ORDER BY i.ord;
    -- Slots freed: wake tasks waiting on a concurrency limit (limits.sql).
    PERFORM ledgerq.flow_after_release(task_ids);
END;
$$;

CREATE OR REPLACE FUNCTION ledgerq.complete_task(
    task_id bigint,
    attempt integer,
    succeeded boolean,
    result jsonb DEFAULT NULL,
    error text DEFAULT NULL,
    retryable boolean DEFAULT true
) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    RETURN (SELECT c.status
            FROM ledgerq.complete_tasks(ARRAY[complete_task.task_id], ARRAY[complete_task.attempt],
                                        ARRAY[complete_task.succeeded], ARRAY[complete_task.result],
                                        ARRAY[complete_task.error], ARRAY[complete_task.retryable]) c);
END;
$$;

-- task_release: a worker shutting down hands back attempts it cannot finish in
-- its grace period. The task is due again at once, and the attempt (recorded
-- as lost) does not count against its budget: the handler did not fail.
CREATE OR REPLACE FUNCTION ledgerq.task_release(
    task_ids bigint[],
    attempts integer[],
    reason text DEFAULT 'released by a worker shutting down'
) RETURNS TABLE(task_id bigint, status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH input AS (
        SELECT i.task_id, i.attempt, i.ord
        FROM unnest(task_ids, attempts) WITH ORDINALITY AS i(task_id, attempt, ord)
    ), released AS (
        UPDATE ledgerq.tasks t
        SET status = CASE WHEN t.cancel_requested THEN 'CANCELLED' ELSE 'PENDING' END,
            finished_at = CASE WHEN t.cancel_requested THEN now() END,
            budget_start = CASE WHEN t.cancel_requested THEN t.budget_start ELSE t.budget_start + 1 END,
            run_at = CASE WHEN t.cancel_requested THEN t.run_at ELSE now() END,
            last_error = reason,
            lease_expires_at = NULL,
            cancel_requested = false
        FROM input i
        WHERE t.id = i.task_id AND t.attempts = i.attempt AND t.status = 'RUNNING'
        RETURNING t.id, t.attempts, t.status
    ), closed AS (
        UPDATE ledgerq.attempts a
        SET finished_at = now(),
            outcome = CASE WHEN r.status = 'CANCELLED' THEN 'cancelled' ELSE 'lost' END,
            error = reason
        FROM released r
        WHERE a.task_id = r.id AND a.attempt = r.attempts
    )
    SELECT i.task_id, r.status
    -- Join on the attempt too: a stale attempt listed beside the current one
    -- was not released.
    FROM input i LEFT JOIN released r ON r.id = i.task_id AND r.attempts = i.attempt
    ORDER BY i.ord;
    IF FOUND THEN
        PERFORM pg_notify('ledgerq_tasks', '');
        PERFORM ledgerq.flow_after_release(task_ids);
    END IF;
END;
$$;
