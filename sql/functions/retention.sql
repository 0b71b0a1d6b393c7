-- Retention: deleting finished tasks, and later the effect records they left.
--
-- A finished task is deleted with its attempt rows (attempts.task_id is ON
-- DELETE CASCADE); its effect records and start marks stay, their task_id set
-- to NULL by their foreign keys, because they are what stops a side effect
-- from running twice (prune_effects removes them, separately and later). Once
-- a task is gone, its idempotency key is free: the unique index no longer
-- holds it, so enqueueing with that key creates a new task. A schedule slot
-- never fires twice anyway (its schedule's cursor has moved past it).
--
-- Deleting is done in batches of at most batch_size rows, oldest first, each
-- batch one DELETE of rows picked with FOR UPDATE SKIP LOCKED: concurrent
-- pruners take disjoint rows, and a row some other transaction holds (an
-- operator's retry, a handler's once_in_transaction) is skipped, not waited
-- for. DELETE takes ROW EXCLUSIVE on the table, which conflicts with neither
-- the ledger's own writes nor autovacuum, and rewrites nothing: the space is
-- reused after vacuum.
--
-- Why two entry points. A function cannot commit, so prune_tasks (the SQL
-- contract) runs all its batches in its caller's transaction: its row locks
-- are only on finished rows nobody else updates, but the transaction keeps
-- its snapshot until it ends, and while it runs vacuum cannot remove the dead
-- rows the rest of the queue leaves behind. Fine for a small or steady
-- backlog (pg_cron every minute deletes one minute's worth). For a big
-- backlog, call the procedure prune_tasks_in_batches, which commits after
-- every batch (`CALL` outside an explicit transaction, as pg_cron does), or
-- loop over prune_tasks_batch yourself as `ledgerq reaper` does: one batch per
-- autocommitted statement, so no lock and no snapshot lives longer than a batch.
--
-- Per queue, the setting `retention` (ledgerq.queues.settings, an interval
-- text, validated by configure_queue) overrides older_than.

CREATE OR REPLACE FUNCTION ledgerq.prune_check(older_than interval, batch_size integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422',
            MESSAGE = format('older_than must be an interval >= 0, got %s', coalesce(older_than::text, 'NULL'));
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422',
            MESSAGE = format('batch_size must be >= 1, got %s', coalesce(batch_size::text, 'NULL'));
    END IF;
END;
$$;

-- A queue's retention setting, or NULL when it has none. A text that is not an
-- interval (written around configure_queue) counts as none rather than
-- stopping every prune.
CREATE OR REPLACE FUNCTION ledgerq.queue_retention(settings jsonb)
RETURNS interval
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF settings IS NULL OR jsonb_typeof(settings -> 'retention') IS DISTINCT FROM 'string' THEN
        RETURN NULL;
    END IF;
    RETURN greatest((settings ->> 'retention')::interval, interval '0');
EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow THEN
    RETURN NULL;
END;
$$;

-- prune_tasks_batch: one batch (at most batch_size tasks, oldest first);
-- returns how many tasks it deleted. Fewer than batch_size means nothing more
-- was due when it looked.
CREATE OR REPLACE FUNCTION ledgerq.prune_tasks_batch(
    older_than interval DEFAULT '7 days',
    batch_size integer DEFAULT 5000,
    queue text DEFAULT NULL,
    include_dead boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    statuses text[] := CASE WHEN prune_tasks_batch.include_dead
                            THEN ARRAY['SUCCEEDED', 'CANCELLED', 'DEAD']
                            ELSE ARRAY['SUCCEEDED', 'CANCELLED'] END;
    configured record;
    configured_queues text[] := '{}';
    deleted bigint := 0;
    n bigint;
BEGIN
    PERFORM ledgerq.prune_check(older_than, batch_size);
    -- Queues with their own retention, one at a time: oldest first through
    -- tasks_finished_idx, or a small queue's through tasks_queue_status_idx.
    FOR configured IN
        SELECT q.queue, ledgerq.queue_retention(q.settings) AS retention
        FROM ledgerq.queues q
        WHERE ledgerq.queue_retention(q.settings) IS NOT NULL
          AND (prune_tasks_batch.queue IS NULL OR q.queue = prune_tasks_batch.queue)
        ORDER BY q.queue
    LOOP
        configured_queues := configured_queues || configured.queue;
        EXIT WHEN deleted >= batch_size;
        WITH victims AS (
            SELECT t.id FROM ledgerq.tasks t
            WHERE t.queue = configured.queue
              AND t.finished_at < now() - configured.retention
              AND t.status = ANY (statuses)
            ORDER BY t.finished_at
            LIMIT batch_size - deleted
            FOR UPDATE SKIP LOCKED
        )
        DELETE FROM ledgerq.tasks t USING victims v WHERE t.id = v.id;
        GET DIAGNOSTICS n = ROW_COUNT;
        deleted := deleted + n;
    END LOOP;
    IF deleted >= batch_size THEN
        RETURN deleted;
    END IF;
    -- Every other queue, by older_than, oldest first (tasks_finished_idx).
    WITH victims AS (
        SELECT t.id FROM ledgerq.tasks t
        WHERE t.finished_at < now() - older_than
          AND t.status = ANY (statuses)
          AND (prune_tasks_batch.queue IS NULL OR t.queue = prune_tasks_batch.queue)
          AND t.queue <> ALL (configured_queues)
        ORDER BY t.finished_at
        LIMIT batch_size - deleted
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM ledgerq.tasks t USING victims v WHERE t.id = v.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN deleted + n;
END;
$$;

-- prune_tasks: every due batch, in the caller's transaction (see above);
-- returns how many tasks it deleted.
CREATE OR REPLACE FUNCTION ledgerq.prune_tasks(
    older_than interval DEFAULT '7 days',
    batch_size integer DEFAULT 5000,
    queue text DEFAULT NULL,
    include_dead boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    total bigint := 0;
    n bigint;
BEGIN
    PERFORM ledgerq.prune_check(older_than, batch_size);
    LOOP
        n := ledgerq.prune_tasks_batch(older_than, batch_size, prune_tasks.queue, include_dead);
        total := total + n;
        EXIT WHEN n < batch_size;
    END LOOP;
    RETURN total;
END;
$$;

-- prune_tasks_in_batches: prune_tasks committing after every batch, for big
-- backlogs: `CALL ledgerq.prune_tasks_in_batches(older_than => '7 days')`
-- answers one row, `deleted`. Outside an explicit transaction only (a CALL
-- inside BEGIN ... cannot commit, and raises).
CREATE OR REPLACE PROCEDURE ledgerq.prune_tasks_in_batches(
    older_than interval DEFAULT '7 days',
    batch_size integer DEFAULT 5000,
    queue text DEFAULT NULL,
    include_dead boolean DEFAULT false,
    INOUT deleted bigint DEFAULT NULL
)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM ledgerq.prune_check(older_than, batch_size);
    deleted := 0;
    LOOP
        n := ledgerq.prune_tasks_batch(older_than, batch_size, prune_tasks_in_batches.queue, include_dead);
        deleted := deleted + n;
        COMMIT;
        EXIT WHEN n < batch_size;
    END LOOP;
END;
$$;

-- prune_effects: effect records and start marks older than older_than whose
-- task is gone (pruned) or final; an effect of a task that may still run (or
-- be retried after a wait) keeps guarding it. Returns how many effect records
-- it deleted (start marks are not counted). Deletes in batches of 5000 rows,
-- oldest first, by effects_recorded_idx.
CREATE OR REPLACE FUNCTION ledgerq.prune_effects(older_than interval)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    total bigint := 0;
    n bigint;
BEGIN
    PERFORM ledgerq.prune_check(older_than, 1);
    LOOP
        WITH victims AS (
            SELECT e.effect_key FROM ledgerq.effects e
            WHERE e.recorded_at < now() - older_than
              AND NOT EXISTS (SELECT 1 FROM ledgerq.tasks t
                              WHERE t.id = e.task_id AND t.finished_at IS NULL)
            ORDER BY e.recorded_at
            LIMIT 5000
            FOR UPDATE SKIP LOCKED
        )
        DELETE FROM ledgerq.effects e USING victims v WHERE e.effect_key = v.effect_key;
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
        EXIT WHEN n < 5000;
    END LOOP;
    DELETE FROM ledgerq.effect_starts s
    WHERE s.started_at < now() - older_than
      AND NOT EXISTS (SELECT 1 FROM ledgerq.tasks t
                      WHERE t.id = s.task_id AND t.finished_at IS NULL);
    RETURN total;
END;
$$;
