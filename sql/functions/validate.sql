-- Argument checks shared by enqueue_task and enqueue_tasks. Returns the first
-- problem as a sentence naming the field, or NULL when the arguments are valid.
-- STABLE, not IMMUTABLE: format() is STABLE, and PostgreSQL only inlines a SQL
-- function into its caller when the body is no more volatile than declared.
-- Not inlined, the body was planned afresh on every enqueue (a third of
-- enqueue_task's CPU time).
CREATE OR REPLACE FUNCTION ledgerq.task_args_problem(
    task_type text,
    payload jsonb,
    queue text,
    priority integer,
    max_attempts integer,
    idempotency_key text
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
        WHEN max_attempts IS NULL OR max_attempts < 1
            THEN format('max_attempts must be >= 1, got %s', coalesce(max_attempts::text, 'NULL'))
        WHEN idempotency_key = '' THEN 'idempotency_key must not be empty (omit it or pass NULL)'
        WHEN length(idempotency_key) > 512 THEN 'idempotency_key must be at most 512 characters'
    END
$$;

-- The same checks for one element of enqueue_tasks' JSON array, plus its JSON
-- shape: field types and unknown fields (a misspelt field must not vanish).
CREATE OR REPLACE FUNCTION ledgerq.task_json_problem(task jsonb) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    unknown text;
BEGIN
    IF jsonb_typeof(task) IS DISTINCT FROM 'object' THEN
        RETURN 'must be a JSON object';
    END IF;
    SELECT k INTO unknown FROM jsonb_object_keys(task) k
    WHERE k NOT IN ('task_type', 'payload', 'queue', 'priority', 'run_at', 'max_attempts', 'idempotency_key')
    LIMIT 1;
    IF unknown IS NOT NULL THEN
        RETURN format('has unknown field %L (allowed: task_type, payload, queue, priority, run_at, max_attempts, idempotency_key)', unknown);
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
    IF coalesce(jsonb_typeof(task -> 'priority'), 'null') NOT IN ('number', 'null')
       OR (jsonb_typeof(task -> 'priority') = 'number' AND (task ->> 'priority') !~ '^-?[0-9]{1,6}$') THEN
        RETURN 'priority must be an integer between -32768 and 32767';
    END IF;
    IF coalesce(jsonb_typeof(task -> 'max_attempts'), 'null') NOT IN ('number', 'null')
       OR (jsonb_typeof(task -> 'max_attempts') = 'number' AND (task ->> 'max_attempts') !~ '^-?[0-9]{1,9}$') THEN
        RETURN 'max_attempts must be an integer >= 1';
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
    RETURN ledgerq.task_args_problem(
        task ->> 'task_type', coalesce(task -> 'payload', '{}'), coalesce(task ->> 'queue', 'default'),
        coalesce((task ->> 'priority')::integer, 0), coalesce((task ->> 'max_attempts')::integer, 5),
        task ->> 'idempotency_key');
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
