-- Whether a time is one the ledger stores: finite, in years 1 to 9999 in UTC.
-- PostgreSQL stores far more (BC dates, year 294276, +-infinity), but drivers
-- cannot read such values back (psycopg's datetime stops at year 9999), and a
-- task nobody can read cannot be claimed, listed or shown. NULL when the time
-- is fine, else a sentence naming field. The bounds carry their own offset, so
-- the session's TimeZone cannot move them.
CREATE OR REPLACE FUNCTION ledgerq.run_at_problem(value timestamptz, field text DEFAULT 'run_at')
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN value IS NULL THEN format('%s must be a time, got NULL', field)
        WHEN NOT (value >= timestamptz '0001-01-01 00:00:00+00'
                  AND value < timestamptz '10000-01-01 00:00:00+00')
            THEN format('%s must be a finite time within years 1 to 9999 in UTC, got %s', field, value)
    END
$$;

-- Argument checks shared by enqueue_task and enqueue_tasks. Returns the first
-- problem as a sentence naming the field, or NULL when the arguments are valid.
-- queue and max_attempts are the values the task gets (the caller's, or the
-- defaults enqueue applied), run_at the time it becomes due.
-- STABLE, not IMMUTABLE: format() is STABLE, and PostgreSQL only inlines a SQL
-- function into its caller when the body is no more volatile than declared.
-- Not inlined, the body was planned afresh on every enqueue (a third of
-- enqueue_task's CPU time).
DROP FUNCTION IF EXISTS ledgerq.task_args_problem(text, jsonb, text, integer, integer, text);
CREATE OR REPLACE FUNCTION ledgerq.task_args_problem(
    task_type text,
    payload jsonb,
    queue text,
    priority integer,
    run_at timestamptz,
    max_attempts integer,
    idempotency_key text,
    concurrency_key text
) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN task_type IS NULL OR btrim(task_type) = '' THEN 'task_type must be a non-empty string'
        WHEN length(task_type) > 200 THEN 'task_type must be at most 200 characters'
        WHEN payload IS NULL OR jsonb_typeof(payload) <> 'object'
            THEN format('payload must be a JSON object, got %s', coalesce(jsonb_typeof(payload), 'null'))
        WHEN queue IS NULL OR btrim(queue) = '' THEN 'queue must be a non-empty string'
        WHEN length(queue) > 200 THEN 'queue must be at most 200 characters'
        WHEN priority IS NULL OR priority NOT BETWEEN -32768 AND 32767
            THEN 'priority must be an integer between -32768 and 32767'
        WHEN ledgerq.run_at_problem(run_at) IS NOT NULL THEN ledgerq.run_at_problem(run_at)
        WHEN max_attempts IS NULL OR max_attempts < 1
            THEN format('max_attempts must be >= 1, got %s', coalesce(max_attempts::text, 'NULL'))
        WHEN idempotency_key = '' THEN 'idempotency_key must not be empty (omit it or pass NULL)'
        WHEN length(idempotency_key) > 512 THEN 'idempotency_key must be at most 512 characters'
        WHEN btrim(concurrency_key) = ''
            THEN 'concurrency_key must be a non-blank string (omit it or pass NULL)'
        WHEN length(concurrency_key) > 512 THEN 'concurrency_key must be at most 512 characters'
    END
$$;

CREATE OR REPLACE FUNCTION ledgerq.task_json_problem(task jsonb) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    unknown text;
BEGIN
    IF jsonb_typeof(task) IS DISTINCT FROM 'object' THEN
        RETURN 'must be a JSON object';
    END IF;
    SELECT k INTO unknown FROM jsonb_object_keys(task) k
    WHERE k NOT IN ('task_type', 'payload', 'queue', 'priority', 'run_at', 'max_attempts',
                    'idempotency_key', 'concurrency_key')
    LIMIT 1;
    IF unknown IS NOT NULL THEN
        RETURN format('has unknown field %L (allowed: task_type, payload, queue, priority, run_at, '
                      'max_attempts, idempotency_key, concurrency_key)', unknown);
    END IF;
    IF jsonb_typeof(task -> 'task_type') IS DISTINCT FROM 'string' THEN
        RETURN 'task_type must be a non-empty string';
    END IF;
    IF coalesce(jsonb_typeof(task -> 'queue'), 'null') NOT IN ('string', 'null') THEN
        RETURN 'queue must be a string';
    END IF;
    IF coalesce(jsonb_typeof(task -> 'idempotency_key'), 'null') NOT IN ('string', 'null') THEN
        RETURN 'idempotency_key must be a string';
    END IF;
    IF coalesce(jsonb_typeof(task -> 'concurrency_key'), 'null') NOT IN ('string', 'null') THEN
        RETURN 'concurrency_key must be a string';
    END IF;
    IF coalesce(jsonb_typeof(task -> 'priority'), 'null') NOT IN ('number', 'null')
       OR (jsonb_typeof(task -> 'priority') = 'number' AND (task ->> 'priority') !~ '^-?[0-9]{1,6}$') THEN
        RETURN 'priority must be an integer between -32768 and 32767';
    END IF;
    -- As numeric: any JSON number converts, so the bound, not the cast, decides.
    IF coalesce(jsonb_typeof(task -> 'max_attempts'), 'null') NOT IN ('number', 'null')
       OR (jsonb_typeof(task -> 'max_attempts') = 'number'
           AND ((task ->> 'max_attempts')::numeric NOT BETWEEN 1 AND 2147483647
                OR (task ->> 'max_attempts') !~ '^[0-9]+$')) THEN
        RETURN format('max_attempts must be >= 1 and at most 2147483647 (an integer), got %s',
                      task -> 'max_attempts');
    END IF;
    IF coalesce(jsonb_typeof(task -> 'run_at'), 'null') NOT IN ('string', 'null') THEN
        RETURN 'run_at must be an ISO 8601 timestamp string';
    END IF;
    IF jsonb_typeof(task -> 'run_at') = 'string' THEN
        BEGIN
            PERFORM (task ->> 'run_at')::timestamptz;
        EXCEPTION WHEN data_exception THEN
            RETURN format('run_at %L is not a valid timestamp', task ->> 'run_at');
        END;
    END IF;
    -- A missing queue or max_attempts takes a default that is always valid
    -- (task_defaults'); the placeholders stand in for it.
    RETURN ledgerq.task_args_problem(
        task ->> 'task_type', coalesce(task -> 'payload', '{}'), coalesce(task ->> 'queue', 'default'),
        coalesce((task ->> 'priority')::integer, 0), coalesce((task ->> 'run_at')::timestamptz, now()),
        coalesce((task ->> 'max_attempts')::integer, 5), task ->> 'idempotency_key',
        task ->> 'concurrency_key');
END;
$$;

-- The first bad element of an enqueue_tasks array, as 'tasks[i] <problem>'
-- (i counted from 0), or NULL when every element is valid. enqueue_tasks checks
-- its elements inline and calls this only to name what it found wrong.
CREATE OR REPLACE FUNCTION ledgerq.task_batch_problem(tasks jsonb) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format('tasks[%s] %s', v.ord - 1, v.problem)
    FROM (SELECT x.ord, ledgerq.task_json_problem(x.e) AS problem
          FROM jsonb_array_elements(tasks) WITH ORDINALITY AS x(e, ord)) v
    WHERE v.problem IS NOT NULL
    ORDER BY v.ord
    LIMIT 1
$$;
