-- record_effect: the execution log that stops a side effect from running twice.
-- True when this call recorded the effect, false when it was already recorded
-- (by any task). A concurrent call with the same key waits for this one's
-- transaction, so the answer is exact under any concurrency.
CREATE OR REPLACE FUNCTION ledgerq.record_effect(
    effect_key text,
    task_id bigint,
    result jsonb DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    inserted text;
BEGIN
    IF effect_key IS NULL OR effect_key = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = 'effect_key must be a non-empty string';
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
-- was already recorded and with what result. ctx.once runs its function only
-- when recorded is false, then calls record_effect in the same transaction:
-- two attempts racing on one key cannot both run it.
CREATE OR REPLACE FUNCTION ledgerq.effect_lock(effect_key text)
RETURNS TABLE(recorded boolean, result jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF effect_key IS NULL OR effect_key = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = 'effect_key must be a non-empty string';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('ledgerq.effect:' || effect_lock.effect_key, 0));
    RETURN QUERY
    SELECT true, e.result FROM ledgerq.effects e WHERE e.effect_key = effect_lock.effect_key
    UNION ALL
    SELECT false, NULL::jsonb
    WHERE NOT EXISTS (SELECT 1 FROM ledgerq.effects e WHERE e.effect_key = effect_lock.effect_key);
END;
$$;
