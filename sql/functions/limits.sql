-- Flow control's enforcement: turns (fairness between concurrency keys),
-- parking and waking tasks that wait on a limit or a pause. The settings and
-- the pause themselves are in queues.sql; the claim and the dispatcher call
-- the functions here (claim.sql, dispatch.sql).

-- flow_turn: the turn of a task joining the line of its queue now. An unkeyed
-- task starts at the queue's frontier (the highest turn handed out so far); a
-- keyed one after its key's last waiting task, and never before the frontier.
-- So a key with a backlog of 100,000 takes one turn in every round, and a key
-- that just arrived takes the next one.
CREATE OR REPLACE FUNCTION ledgerq.flow_turn(queue text, concurrency_key text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT greatest(
        coalesce((SELECT f.frontier FROM ledgerq.flow_turns f WHERE f.queue = $1), 0),
        CASE WHEN $2 IS NOT NULL THEN
            (SELECT max(t.turn) + 1 FROM ledgerq.tasks t
             WHERE t.queue = $1 AND t.concurrency_key = $2 AND t.status = 'PENDING')
        END);
$$;

-- flow_turns: flow_turn for a batch, in input order; a key's tasks within the
-- batch take consecutive turns.
CREATE OR REPLACE FUNCTION ledgerq.flow_turns(queues text[], concurrency_keys text[]) RETURNS bigint[]
LANGUAGE sql STABLE AS $$
    WITH input AS (
        SELECT u.queue, u.concurrency_key, u.ord,
               row_number() OVER (PARTITION BY u.queue, u.concurrency_key ORDER BY u.ord) AS nth
        FROM unnest(queues, concurrency_keys) WITH ORDINALITY AS u(queue, concurrency_key, ord)
    ), starts AS (
        SELECT s.queue, s.concurrency_key, ledgerq.flow_turn(s.queue, s.concurrency_key) AS first_turn
        FROM (SELECT DISTINCT i.queue, i.concurrency_key FROM input i) s
    )
    SELECT array_agg(s.first_turn + CASE WHEN i.concurrency_key IS NULL THEN 0 ELSE i.nth - 1 END
                     ORDER BY i.ord)
    FROM input i
    JOIN starts s ON s.queue = i.queue AND s.concurrency_key IS NOT DISTINCT FROM i.concurrency_key;
$$;

-- flow_wake_queue: every task of the queue parked on a limit goes back in
-- line (keeping its turn), and on the pause too when include_paused. They are
-- judged again when dispatched. Called when settings change and on resume.
CREATE OR REPLACE FUNCTION ledgerq.flow_wake_queue(queue text, include_paused boolean) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    woken integer;
BEGIN
    UPDATE ledgerq.tasks t SET waiting_on = NULL
    WHERE t.queue = flow_wake_queue.queue AND t.status = 'PENDING' AND t.waiting_on IS NOT NULL
      AND (include_paused OR t.waiting_on <> 'paused');
    GET DIAGNOSTICS woken = ROW_COUNT;
    UPDATE ledgerq.flow_buckets b SET wake_at = NULL
    WHERE b.queue = flow_wake_queue.queue AND b.wake_at IS NOT NULL;
    IF woken > 0 THEN
        PERFORM pg_notify('ledgerq_tasks', '');
    END IF;
    RETURN woken;
END;
$$;

-- flow_park_queued: a paused queue's tasks already handed to Redis wait in the
-- ledger instead (their ids in Redis are refused when popped). Waits for claims
-- of those tasks in progress: a task either started before the pause or waits.
CREATE OR REPLACE FUNCTION ledgerq.flow_park_queued(queue text) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    parked integer;
BEGIN
    UPDATE ledgerq.tasks t SET status = 'PENDING', queued_at = NULL, waiting_on = 'paused'
    WHERE t.queue = flow_park_queued.queue AND t.status = 'QUEUED';
    GET DIAGNOSTICS parked = ROW_COUNT;
    RETURN parked;
END;
$$;
