-- enqueue_task / enqueue_tasks: durable PENDING tasks, inside the caller's
-- transaction, with idempotency keys that never create two tasks.

CREATE OR REPLACE FUNCTION ledgerq.enqueue_task(
    task_type text,
    payload jsonb DEFAULT '{}',
    queue text DEFAULT 'default',
    priority integer DEFAULT 0,
    run_at timestamptz DEFAULT now(),
    max_attempts integer DEFAULT 5,
    idempotency_key text DEFAULT NULL
) RETURNS TABLE(id bigint, created boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    problem text;
    new_id bigint;
    existing ledgerq.tasks%ROWTYPE;
BEGIN
    problem := ledgerq.task_args_problem(enqueue_task.task_type, enqueue_task.payload,
        enqueue_task.queue, enqueue_task.priority, enqueue_task.max_attempts,
        enqueue_task.idempotency_key);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;

    -- ON CONFLICT DO NOTHING waits for a concurrent insert of the same key to
    -- commit or roll back, so racing callers see exactly one winner.
    INSERT INTO ledgerq.tasks AS t (task_type, payload, queue, priority, run_at,
                                    max_attempts, idempotency_key)
    VALUES (enqueue_task.task_type, enqueue_task.payload, enqueue_task.queue,
            enqueue_task.priority, coalesce(enqueue_task.run_at, now()),
            enqueue_task.max_attempts, enqueue_task.idempotency_key)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING t.id INTO new_id;

    IF new_id IS NOT NULL THEN
        IF coalesce(enqueue_task.run_at, now()) <= now() THEN
            PERFORM pg_notify('ledgerq_tasks', '');
        END IF;
        id := new_id;
        created := true;
        RETURN NEXT;
        RETURN;
    END IF;

    SELECT * INTO existing FROM ledgerq.tasks t WHERE t.idempotency_key = enqueue_task.idempotency_key;
    IF existing.task_type IS DISTINCT FROM enqueue_task.task_type
       OR existing.payload IS DISTINCT FROM enqueue_task.payload THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ409',
            MESSAGE = format('idempotency_key %L is already used by task %s with a different type or payload',
                             enqueue_task.idempotency_key, existing.id),
            HINT = 'Use a new key for different work, or resend the original type and payload.';
    END IF;
    id := existing.id;
    created := false;
    RETURN NEXT;
END;
$$;

-- The batch form: a JSON array of objects with enqueue_task's fields. One row
-- per input in input order; all or nothing. Ids are drawn before the insert so
-- each input maps to its own row without relying on RETURNING order.
CREATE OR REPLACE FUNCTION ledgerq.enqueue_tasks(tasks jsonb)
RETURNS TABLE(id bigint, created boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    bad record;
    new_ids bigint[];
    clash record;
    any_due boolean;
BEGIN
    IF tasks IS NULL OR jsonb_typeof(tasks) <> 'array' THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = 'tasks must be a JSON array of task objects';
    END IF;

    -- The message names the element and the field, so a caller can fix one
    -- bad item in a batch of thousands.
    SELECT v.ord, v.problem INTO bad
    FROM (SELECT x.ord, ledgerq.task_json_problem(x.e) AS problem
          FROM jsonb_array_elements(tasks) WITH ORDINALITY AS x(e, ord)) v
    WHERE v.problem IS NOT NULL
    ORDER BY v.ord
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422',
            MESSAGE = format('tasks[%s] %s', bad.ord - 1, bad.problem);
    END IF;

    SELECT array_agg(nextval(pg_get_serial_sequence('ledgerq.tasks', 'id')) ORDER BY x.ord)
    INTO new_ids
    FROM jsonb_array_elements(tasks) WITH ORDINALITY AS x(e, ord);
    IF new_ids IS NULL THEN
        RETURN;  -- an empty batch enqueues nothing
    END IF;

    INSERT INTO ledgerq.tasks AS t (id, task_type, payload, queue, priority, run_at,
                                    max_attempts, idempotency_key)
    SELECT new_ids[x.ord], x.e ->> 'task_type', coalesce(x.e -> 'payload', '{}'),
           coalesce(x.e ->> 'queue', 'default'), coalesce((x.e ->> 'priority')::integer, 0),
           coalesce((x.e ->> 'run_at')::timestamptz, now()),
           coalesce((x.e ->> 'max_attempts')::integer, 5), x.e ->> 'idempotency_key'
    FROM jsonb_array_elements(tasks) WITH ORDINALITY AS x(e, ord)
    ORDER BY x.ord
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;

    -- Inputs that hit an existing key (earlier, or earlier in this batch) must
    -- carry the same type and payload as the task that holds the key.
    SELECT x.ord, x.e ->> 'idempotency_key' AS key, t.id AS holder
    INTO clash
    FROM jsonb_array_elements(tasks) WITH ORDINALITY AS x(e, ord)
    JOIN ledgerq.tasks t ON t.idempotency_key = x.e ->> 'idempotency_key'
    WHERE t.id <> new_ids[x.ord]
      AND (t.task_type <> x.e ->> 'task_type' OR t.payload <> coalesce(x.e -> 'payload', '{}'))
    ORDER BY x.ord
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ409',
            MESSAGE = format('tasks[%s]: idempotency_key %L is already used by task %s with a different type or payload',
                             clash.ord - 1, clash.key, clash.holder),
            HINT = 'Use a new key for different work, or resend the original type and payload.';
    END IF;

    SELECT bool_or(coalesce((x.e ->> 'run_at')::timestamptz, now()) <= now())
    INTO any_due
    FROM jsonb_array_elements(tasks) AS x(e);
    IF any_due THEN
        PERFORM pg_notify('ledgerq_tasks', '');
    END IF;

    RETURN QUERY
    SELECT coalesce(mine.id, holder.id), mine.id IS NOT NULL
    FROM jsonb_array_elements(tasks) WITH ORDINALITY AS x(e, ord)
    LEFT JOIN ledgerq.tasks mine ON mine.id = new_ids[x.ord]
    LEFT JOIN ledgerq.tasks holder
           ON mine.id IS NULL AND holder.idempotency_key = x.e ->> 'idempotency_key'
    ORDER BY x.ord;
END;
$$;
