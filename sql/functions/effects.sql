-- The execution log that stops a side effect from running twice.
--
-- Effect keys are btree index keys: PostgreSQL refuses an index entry over
-- about a third of a page (2,704 bytes), so a key is at most 2,000 bytes,
-- checked before any effect runs (ledgerq.effect_key_problem).

-- effect_key_problem: why effect_key cannot be used, or NULL.
CREATE OR REPLACE FUNCTION ledgerq.effect_key_problem(effect_key text)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN $1 IS NULL OR $1 = '' THEN 'effect_key must be a non-empty string'
        WHEN octet_length($1) > 2000 THEN
            format('effect_key must be at most 2000 bytes (an index entry holds about 2700), got %s',
                   octet_length($1))
    END;
$$;

-- effect_lock_key: the advisory lock that serialises work on one effect key,
-- shared by the transaction-level (once_in_transaction) and the session-level
-- (ctx.once) forms, so the two take turns on the same key.
CREATE OR REPLACE FUNCTION ledgerq.effect_lock_key(effect_key text)
RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended('ledgerq.effect:' || $1, 0);
$$;

-- record_effect: true when this call recorded the effect, false when it was
-- already recorded (by any task). A concurrent call with the same key waits
-- for this one's transaction, so the answer is exact under any concurrency.
CREATE OR REPLACE FUNCTION ledgerq.record_effect(
    effect_key text,
    task_id bigint,
    result jsonb DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    inserted text;
    problem text := ledgerq.effect_key_problem(record_effect.effect_key);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;
    IF task_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM ledgerq.tasks t WHERE t.id = record_effect.task_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422',
            MESSAGE = format('record_effect: task %s does not exist', task_id);
    END IF;
    INSERT INTO ledgerq.effects AS e (effect_key, task_id, result)
    VALUES (record_effect.effect_key, record_effect.task_id, record_effect.result)
    ON CONFLICT (effect_key) DO NOTHING
    RETURNING e.effect_key INTO inserted;
    RETURN inserted IS NOT NULL;
END;
$$;

-- effect_result: what an earlier record_effect stored, for ctx.once to return
-- on later attempts. Zero rows when the effect was never recorded.
CREATE OR REPLACE FUNCTION ledgerq.effect_result(effect_key text)
RETURNS TABLE(task_id bigint, result jsonb, recorded_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT e.task_id, e.result, e.recorded_at FROM ledgerq.effects e WHERE e.effect_key = $1;
$$;

-- effect_lock: serialise work on one effect key for the rest of the caller's
-- transaction (a transaction-level advisory lock), and say whether the effect
-- was already recorded and with what result. once_in_transaction runs its
-- function only when recorded is false, then calls record_effect in the same
-- transaction: two attempts racing on one key cannot both run it.
CREATE OR REPLACE FUNCTION ledgerq.effect_lock(effect_key text)
RETURNS TABLE(recorded boolean, result jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    problem text := ledgerq.effect_key_problem(effect_lock.effect_key);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;
    PERFORM pg_advisory_xact_lock(ledgerq.effect_lock_key(effect_lock.effect_key));
    RETURN QUERY
    SELECT true, e.result FROM ledgerq.effects e WHERE e.effect_key = effect_lock.effect_key
    UNION ALL
    SELECT false, NULL::jsonb
    WHERE NOT EXISTS (SELECT 1 FROM ledgerq.effects e WHERE e.effect_key = effect_lock.effect_key);
END;
$$;

-- effect_start: ctx.once's first call, in a statement of its own (autocommit).
-- Takes the key's session-level advisory lock, so attempts racing on one key
-- take turns, and the lock goes with the session if the worker dies.
--   * recorded: the lock is released at once; result is the recorded result.
--   * not recorded: the lock stays held, and a start mark is committed
--     before the effect runs. A mark already there is returned as
--     unknown_task_id/unknown_attempt/unknown_started_at and kept: the first
--     attempt that started the effect and was lost before recording it (it
--     ran the effect, or was about to; nobody knows).
-- The caller then calls effect_finish (ran and recorded) or effect_forget (the
-- function raised), or neither (unknown), and then effect_unlock.
--
-- Bounds (milliseconds; NULL: none): wait_ms is how long to wait for the lock
-- (lock_timeout: 55P03 past it), hold_ms how long this session may then sit idle
-- while the effect runs before the server ends it (idle_session_timeout; reset
-- by effect_unlock). A stopped worker cannot hold a key, and block every later
-- attempt, for longer than hold_ms; its start mark then says what happened.
CREATE OR REPLACE FUNCTION ledgerq.effect_start(
    effect_key text,
    task_id bigint,
    attempt integer,
    wait_ms integer DEFAULT NULL,
    hold_ms integer DEFAULT NULL
) RETURNS TABLE(recorded boolean, result jsonb, unknown_task_id bigint, unknown_attempt integer,
              unknown_started_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    problem text := ledgerq.effect_key_problem(effect_start.effect_key);
    lock_key bigint := ledgerq.effect_lock_key(effect_start.effect_key);
    found_result jsonb;
    earlier ledgerq.effect_starts%ROWTYPE;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;
    IF wait_ms IS NOT NULL THEN
        PERFORM set_config('lock_timeout', wait_ms || 'ms', true);
    END IF;
    PERFORM pg_advisory_lock(lock_key);
    IF hold_ms IS NOT NULL THEN
        PERFORM set_config('idle_session_timeout', hold_ms || 'ms', false);
    END IF;
    SELECT e.result INTO found_result FROM ledgerq.effects e WHERE e.effect_key = effect_start.effect_key;
    IF FOUND THEN
        PERFORM pg_advisory_unlock(lock_key);
        PERFORM set_config('idle_session_timeout', '0', false);
        RETURN QUERY SELECT true, found_result, NULL::bigint, NULL::integer, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT * INTO earlier FROM ledgerq.effect_starts s WHERE s.effect_key = effect_start.effect_key;
    IF NOT FOUND THEN
        INSERT INTO ledgerq.effect_starts (effect_key, task_id, attempt)
        VALUES (effect_start.effect_key, effect_start.task_id, effect_start.attempt);
    END IF;
    RETURN QUERY SELECT false, NULL::jsonb, earlier.task_id, earlier.attempt, earlier.started_at;
END;
$$;

-- effect_finish: record the effect ctx.once ran (record_effect) and clear its
-- start mark. True when this call recorded the effect. The key's lock is
-- released by a statement of its own (effect_unlock) once this one has
-- committed: released inside it, another attempt could take the lock and read
-- the effects table before this row is visible, and run the effect again.
CREATE OR REPLACE FUNCTION ledgerq.effect_finish(effect_key text, task_id bigint, result jsonb)
RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    recorded boolean;
BEGIN
    recorded := ledgerq.record_effect(effect_finish.effect_key, effect_finish.task_id, effect_finish.result);
    DELETE FROM ledgerq.effect_starts s WHERE s.effect_key = effect_finish.effect_key;
    RETURN recorded;
END;
$$;

-- effect_forget: clear the start mark of an effect whose function raised: it
-- came back, so nothing is unknown. (A start mark left in place says: started,
-- never recorded.) The lock is released by effect_unlock, as above.
CREATE OR REPLACE FUNCTION ledgerq.effect_forget(effect_key text)
RETURNS void
LANGUAGE sql AS $$
    DELETE FROM ledgerq.effect_starts s WHERE s.effect_key = $1;
$$;

-- effect_unlock: release the key's session-level lock taken by effect_start,
-- and the idle bound that came with it.
CREATE OR REPLACE FUNCTION ledgerq.effect_unlock(effect_key text)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT set_config('idle_session_timeout', '0', false);
    SELECT pg_advisory_unlock(ledgerq.effect_lock_key($1));
$$;
