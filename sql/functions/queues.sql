-- Queue settings and pause: configure_queue, pause_queue, resume_queue and the
-- view queue_settings. One row per configured queue in ledgerq.queues
-- (migration 0008); a queue without a row has no settings and is not paused.
-- How the settings are enforced (at claim and at dispatch) is in limits.sql.

-- flow_lock_key: the advisory lock of one flow-control scope: a queue
-- (concurrency_key NULL) or one concurrency key of a queue. Claims, the
-- dispatcher and the transitions that free a slot take these locks, always in
-- ascending key order, so the decisions "this task may start" and "this task
-- must wait" are made one at a time per scope, each seeing the last one's
-- commit. Keys are never empty (tasks_concurrency_key_not_empty), so the two
-- kinds of scope cannot share a text.
CREATE OR REPLACE FUNCTION ledgerq.flow_lock_key(queue text, concurrency_key text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtextextended('ledgerq.flow:' || $1 || chr(31) || coalesce($2, ''), 0);
$$;

-- flow_take_locks: take these transaction-level advisory locks, each once,
-- in ascending order: the order every taker of several flow, claim, dispatch
-- or parking locks of one kind uses, so two takers never wait for each other
-- in a circle. Shared or exclusive; how many were taken.
CREATE OR REPLACE FUNCTION ledgerq.flow_take_locks(lock_keys bigint[], shared boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    lock_key bigint;
    taken integer := 0;
BEGIN
    -- No lock or one (the common cases: every claim and completion comes here)
    -- needs no sorting query.
    IF coalesce(cardinality(lock_keys), 0) = 0 THEN
        RETURN 0;
    ELSIF cardinality(lock_keys) = 1 THEN
        lock_keys := array_remove(lock_keys, NULL);
        IF cardinality(lock_keys) = 0 THEN
            RETURN 0;
        ELSIF shared THEN
            PERFORM pg_advisory_xact_lock_shared(lock_keys[1]);
        ELSE
            PERFORM pg_advisory_xact_lock(lock_keys[1]);
        END IF;
        RETURN 1;
    END IF;
    FOR lock_key IN SELECT DISTINCT k FROM unnest(lock_keys) k WHERE k IS NOT NULL ORDER BY 1 LOOP
        IF shared THEN
            PERFORM pg_advisory_xact_lock_shared(lock_key);
        ELSE
            PERFORM pg_advisory_xact_lock(lock_key);
        END IF;
        taken := taken + 1;
    END LOOP;
    RETURN taken;
END;
$$;

-- The first problem with a settings object, as a sentence naming the key, or
-- NULL. A JSON null is always valid: it removes the key.
CREATE OR REPLACE FUNCTION ledgerq.queue_settings_problem(settings jsonb) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    item record;
    number numeric;
    span interval;
BEGIN
    IF settings IS NULL OR jsonb_typeof(settings) <> 'object' THEN
        RETURN format('settings must be a JSON object, got %s', coalesce(jsonb_typeof(settings), 'null'));
    END IF;
    FOR item IN SELECT e.key, e.value FROM jsonb_each(settings) e ORDER BY e.key LOOP
        CONTINUE WHEN jsonb_typeof(item.value) = 'null';
        CASE
        WHEN item.key IN ('max_running', 'per_key_max_running', 'burst') THEN
            number := CASE WHEN jsonb_typeof(item.value) = 'number' THEN (item.value #>> '{}')::numeric END;
            IF number IS NULL OR number <> trunc(number) OR number < 1 OR number > 2147483647 THEN
                RETURN format('%s must be a positive integer (at most 2147483647), got %s', item.key, item.value);
            END IF;
        WHEN item.key IN ('rate_per_second', 'per_key_rate_per_second', 'retry_rate_per_second') THEN
            number := CASE WHEN jsonb_typeof(item.value) = 'number' THEN (item.value #>> '{}')::numeric END;
            -- The bound keeps the token arithmetic (double precision) exact
            -- enough; no outside API takes a billion calls a second.
            IF number IS NULL OR number <= 0 OR number > 1000000000 THEN
                RETURN format('%s must be a positive number (at most 1000000000), got %s', item.key, item.value);
            END IF;
        WHEN item.key = 'retention' THEN
            span := NULL;
            IF jsonb_typeof(item.value) = 'string' AND length(item.value #>> '{}') <= 100 THEN
                BEGIN
                    span := (item.value #>> '{}')::interval;
                EXCEPTION WHEN data_exception OR syntax_error THEN
                    span := NULL;
                END;
            END IF;
            IF span IS NULL OR span <= interval '0' OR isfinite(span) IS NOT TRUE THEN
                RETURN format('retention must be a positive interval such as "3 days", got %s', item.value);
            END IF;
        ELSE
            RETURN format('unknown setting %L (allowed: max_running, per_key_max_running, rate_per_second, '
                          'per_key_rate_per_second, retry_rate_per_second, burst, retention)', item.key);
        END CASE;
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION ledgerq.queue_name_problem(queue text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN queue IS NULL OR btrim(queue) = '' THEN 'queue must be a non-empty string'
        WHEN length(queue) > 200 THEN 'queue must be at most 200 characters'
    END;
$$;

-- configure_queue: merges settings into the queue's and returns all of them.
-- A key set to JSON null is removed, a key left out is unchanged. Integers are
-- stored as integers (5.0 becomes 5). Tasks waiting on a limit are woken, so
-- a raised or removed limit lets them start at once.
CREATE OR REPLACE FUNCTION ledgerq.configure_queue(queue text, settings jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    problem text := coalesce(ledgerq.queue_name_problem(configure_queue.queue),
                             ledgerq.queue_settings_problem(configure_queue.settings));
    additions jsonb;
    removals text[];
    merged jsonb;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;
    SELECT coalesce(jsonb_object_agg(e.key, CASE
               WHEN e.key IN ('max_running', 'per_key_max_running', 'burst')
                   THEN to_jsonb((e.value #>> '{}')::numeric::integer)
               ELSE e.value END) FILTER (WHERE jsonb_typeof(e.value) <> 'null'), '{}'),
           coalesce(array_agg(e.key) FILTER (WHERE jsonb_typeof(e.value) = 'null'), '{}')
    INTO additions, removals
    FROM jsonb_each(configure_queue.settings) e;

    -- Claims of the queue hold this lock while they decide: new limits apply
    -- to every claim that starts after this call returns.
    PERFORM pg_advisory_xact_lock(ledgerq.flow_lock_key(configure_queue.queue));
    PERFORM pg_advisory_xact_lock(ledgerq.flow_dispatch_lock_key(configure_queue.queue));
    -- The tokens claim lanes spent count under the rate they were spent under.
    PERFORM ledgerq.flow_fold_lanes(configure_queue.queue);
    INSERT INTO ledgerq.queues AS q (queue, settings)
    VALUES (configure_queue.queue, additions - removals)
    ON CONFLICT (queue) DO UPDATE
        SET settings = (q.settings || additions) - removals, updated_at = now()
    RETURNING q.settings INTO merged;

    PERFORM ledgerq.flow_wake_queue(configure_queue.queue, false);
    RETURN merged;
END;
$$;

-- pause_queue: no task of the queue starts after this returns (running ones
-- finish); enqueues are still accepted. Durable: it is a row in the ledger.
-- Returns true when this call paused the queue, false when it was already
-- paused.
CREATE OR REPLACE FUNCTION ledgerq.pause_queue(queue text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    problem text := ledgerq.queue_name_problem(pause_queue.queue);
    was_paused boolean;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;
    -- Row locks before the queue's lock, as claims take them (no deadlock).
    PERFORM ledgerq.flow_park_queued(pause_queue.queue);
    -- Waits for claims of the queue that are deciding now; those that decide
    -- after it see the pause.
    PERFORM pg_advisory_xact_lock(ledgerq.flow_lock_key(pause_queue.queue));
    PERFORM pg_advisory_xact_lock(ledgerq.flow_dispatch_lock_key(pause_queue.queue));
    SELECT q.paused INTO was_paused FROM ledgerq.queues q WHERE q.queue = pause_queue.queue;
    IF was_paused THEN
        RETURN false;
    END IF;
    INSERT INTO ledgerq.queues AS q (queue, paused) VALUES (pause_queue.queue, true)
    ON CONFLICT (queue) DO UPDATE SET paused = true, updated_at = now();
    RETURN true;
END;
$$;

-- resume_queue: the queue's tasks may start again, at once. Returns true when
-- this call resumed the queue, false when it was not paused.
CREATE OR REPLACE FUNCTION ledgerq.resume_queue(queue text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    problem text := ledgerq.queue_name_problem(resume_queue.queue);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;
    PERFORM pg_advisory_xact_lock(ledgerq.flow_lock_key(resume_queue.queue));
    PERFORM pg_advisory_xact_lock(ledgerq.flow_dispatch_lock_key(resume_queue.queue));
    UPDATE ledgerq.queues q SET paused = false, updated_at = now()
    WHERE q.queue = resume_queue.queue AND q.paused;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM ledgerq.flow_wake_queue(resume_queue.queue, true);
    RETURN true;
END;
$$;

-- queue_settings: every queue that has settings or was ever paused.
CREATE OR REPLACE VIEW ledgerq.queue_settings AS
SELECT q.queue, q.paused, q.settings, q.updated_at FROM ledgerq.queues q;
