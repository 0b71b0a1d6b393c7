-- reap_stuck: recover what crashed workers or a lost Redis left behind.
--  * RUNNING tasks whose lease expired: the attempt is recorded as lost; the
--    task is retried with backoff, or goes DEAD if that was its last attempt,
--    or CANCELLED if cancellation had been requested.
--  * QUEUED tasks not claimed within the redelivery timeout go back to
--    PENDING, and the dispatcher hands them to Redis again. A dispatcher that
--    sees a queue's tasks still waiting in a Redis backlog says so for the
--    whole queue (task_queued_seen, one row in ledgerq.queued_seen), so a long
--    backlog is not redelivered; and Redis queues are sets, so a second
--    delivery of the same id never piles up.
-- SKIP LOCKED makes concurrent reapers (pg_cron and `ledgerq reaper` at once)
-- take disjoint rows instead of waiting on each other or on a completing worker.
-- The redelivery timeout is the setting ledgerq.redelivery_timeout (default
-- 30 s), e.g. ALTER DATABASE app SET ledgerq.redelivery_timeout = '60s'.

-- The setting, read leniently: PostgreSQL accepts any text for a custom
-- setting, and a typo there must not stop recovery. A value that is not a
-- positive interval gives the default, with a WARNING naming the setting.
CREATE OR REPLACE FUNCTION ledgerq.redelivery_timeout_setting() RETURNS interval
LANGUAGE plpgsql STABLE AS $$
DECLARE
    fallback CONSTANT interval := interval '30 seconds';
    raw text := nullif(btrim(current_setting('ledgerq.redelivery_timeout', true)), '');
    value interval;
BEGIN
    IF raw IS NULL THEN
        RETURN fallback;
    END IF;
    BEGIN
        value := raw::interval;
    EXCEPTION WHEN data_exception OR feature_not_supported THEN
        value := NULL;
    END;
    IF value IS NULL OR value <= interval '0' THEN
        RAISE WARNING 'ledgerq.redelivery_timeout = %: not a positive interval; using %',
            quote_literal(raw), fallback
            USING HINT = 'Set it to an interval such as ''60s'', or RESET it.';
        RETURN fallback;
    END IF;
    RETURN value;
END;
$$;

CREATE OR REPLACE FUNCTION ledgerq.task_reap(
    as_of timestamptz DEFAULT NULL,
    redelivery_timeout interval DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := coalesce(as_of, now());
    timeout interval := coalesce(
        redelivery_timeout, ledgerq.redelivery_timeout_setting());
    expired_count integer;
    expired_ids bigint[];
    requeued_count integer;
BEGIN
    WITH expired AS (
        SELECT t.id FROM ledgerq.tasks t
        WHERE t.status = 'RUNNING' AND t.lease_expires_at < cutoff
        -- NO KEY UPDATE, the lock the UPDATE takes anyway: FOR UPDATE would also
        -- conflict with the KEY SHARE lock a handler's once_in_transaction holds
        -- on its task (the effects.task_id foreign key) until it completes, and
        -- skip exactly the task whose worker froze with that transaction open.
        FOR NO KEY UPDATE SKIP LOCKED
    ), recovered AS (
        UPDATE ledgerq.tasks t
        SET status = CASE
                WHEN t.cancel_requested THEN 'CANCELLED'
                WHEN t.attempts - t.budget_start >= t.max_attempts THEN 'DEAD'
                ELSE 'PENDING' END,
            run_at = CASE
                WHEN t.cancel_requested OR t.attempts - t.budget_start >= t.max_attempts THEN t.run_at
                ELSE now() + ledgerq.compute_backoff(t.attempts - t.budget_start) END,
            turn = CASE
                WHEN t.cancel_requested OR t.attempts - t.budget_start >= t.max_attempts THEN t.turn
                ELSE ledgerq.flow_turn(t.queue, t.concurrency_key) END,
            finished_at = CASE
                WHEN t.cancel_requested OR t.attempts - t.budget_start >= t.max_attempts THEN now() END,
            last_error = format('lease expired: worker %s stopped heartbeating during attempt %s',
                                t.worker_id, t.attempts),
            lease_expires_at = NULL,
            cancel_requested = false
        FROM expired e
        WHERE t.id = e.id AND t.status = 'RUNNING' AND t.lease_expires_at < cutoff
        RETURNING t.id, t.attempts, t.status, t.last_error
    ), closed AS (
        UPDATE ledgerq.attempts a
        SET finished_at = now(),
            outcome = CASE WHEN r.status = 'CANCELLED' THEN 'cancelled' ELSE 'lost' END,
            error = r.last_error
        FROM recovered r
        WHERE a.task_id = r.id AND a.attempt = r.attempts
    )
    SELECT count(*), array_agg(r.id) INTO expired_count, expired_ids FROM recovered r;

    WITH stale AS (
        SELECT t.id FROM ledgerq.tasks t
        WHERE t.status = 'QUEUED' AND t.queued_at < cutoff - timeout
          -- Not if the dispatcher's sweep saw it in Redis since (queued_seen).
          AND NOT EXISTS (
              SELECT 1 FROM ledgerq.queued_seen s
              WHERE s.queue = t.queue AND t.queued_at < s.queued_before
                AND s.seen_at >= cutoff - timeout)
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), requeued AS (
        UPDATE ledgerq.tasks t
        SET status = 'PENDING', queued_at = NULL
        FROM stale s
        WHERE t.id = s.id AND t.status = 'QUEUED'
        RETURNING t.id
    )
    SELECT count(*) INTO requeued_count FROM requeued;

    IF expired_count + requeued_count > 0 THEN
        PERFORM pg_notify('ledgerq_tasks', '');
    END IF;
    IF expired_count > 0 THEN
        -- Slots freed: wake tasks waiting on a concurrency limit (limits.sql).
        PERFORM ledgerq.flow_after_release(expired_ids);
    END IF;
    RETURN expired_count + requeued_count;
END;
$$;

CREATE OR REPLACE FUNCTION ledgerq.reap_stuck() RETURNS integer
LANGUAGE sql AS $$
    SELECT ledgerq.task_reap();
$$;
