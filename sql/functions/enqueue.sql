-- enqueue_task / enqueue_tasks: durable PENDING tasks, inside the caller's
-- transaction, with idempotency keys that never create two tasks.

-- Callers use named notation: the older signature (no concurrency_key,
-- queue 'default' and max_attempts 5 as defaults) goes, or a call naming
-- only its first arguments could match both.
DROP FUNCTION IF EXISTS ledgerq.enqueue_task(text, jsonb, text, integer, timestamptz, integer, text);

-- queue and max_attempts: NULL (the default) takes the task type's
-- registered values, else 'default' and 5 (task_defaults in types.sql).
CREATE OR REPLACE FUNCTION ledgerq.enqueue_task(
    task_type text,
    payload jsonb DEFAULT '{}',
    queue text DEFAULT NULL,
    priority integer DEFAULT 0,
    run_at timestamptz DEFAULT now(),
    max_attempts integer DEFAULT NULL,
    idempotency_key text DEFAULT NULL,
    concurrency_key text DEFAULT NULL
) RETURNS TABLE(id bigint, created boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    problem text;
    due_at timestamptz := coalesce(enqueue_task.run_at, now());
    task_queue text := enqueue_task.queue;
    task_max_attempts integer := enqueue_task.max_attempts;
    existing ledgerq.tasks%ROWTYPE;
    initial_status text := 'PENDING';
    initial_queued_at timestamptz;
    initial_turn bigint;
BEGIN
    IF task_queue IS NULL OR task_max_attempts IS NULL THEN
        SELECT coalesce(task_queue, d.queue), coalesce(task_max_attempts, d.max_attempts)
        INTO task_queue, task_max_attempts
        FROM ledgerq.task_defaults(ARRAY[enqueue_task.task_type]) d;
    END IF;
    problem := ledgerq.task_args_problem(enqueue_task.task_type, enqueue_task.payload,
        task_queue, enqueue_task.priority, due_at, task_max_attempts,
        enqueue_task.idempotency_key, enqueue_task.concurrency_key);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;
    -- A caller handing its tasks to Redis itself (task_hand_off) gets the task
    -- QUEUED at once when task_hand_off would mark it so: one row version, not
    -- an insert and then an update that rewrites every index entry. The rule
    -- is task_hand_off's: due now, no concurrency key, a queue with no row in
    -- ledgerq.queues (flow control decides those through the dispatcher).
    IF due_at <= now() AND enqueue_task.concurrency_key IS NULL AND ledgerq.task_handing_off()
       AND NOT EXISTS (SELECT 1 FROM ledgerq.queues q WHERE q.queue = task_queue) THEN
        initial_status := 'QUEUED';
        initial_queued_at := now();
    END IF;
    -- Without a concurrency key a task's turn is flow_turn's rule for it: the
    -- head of its queue's line (the lowest turn waiting in Redis or parked,
    -- else the frontier; 0 in a queue whose tasks never carried a key). Read here, in a
    -- statement whose plan this function keeps, as flow_turn (a SQL function
    -- with sub-selects) is planned on every call.
    IF enqueue_task.concurrency_key IS NULL THEN
        initial_turn := coalesce(
            (SELECT least((SELECT t.turn FROM ledgerq.tasks t
                           WHERE t.queue = task_queue AND t.status = 'QUEUED' AND t.turn > 0
                           ORDER BY t.turn LIMIT 1),
                          (SELECT t.turn FROM ledgerq.tasks t
                           WHERE t.queue = task_queue AND t.status = 'PENDING'
                             AND t.waiting_on IS NOT NULL AND t.turn > 0
                           ORDER BY t.turn LIMIT 1),
                          f.frontier)
             FROM ledgerq.flow_turns f WHERE f.queue = task_queue), 0);
    ELSE
        initial_turn := ledgerq.flow_turn(task_queue, enqueue_task.concurrency_key);
    END IF;

    IF enqueue_task.idempotency_key IS NULL THEN
        -- Nothing to conflict with: a plain INSERT spares the speculative
        -- insertion that ON CONFLICT costs.
        INSERT INTO ledgerq.tasks AS t (task_type, payload, queue, priority, run_at, max_attempts,
                                        concurrency_key, turn, status, queued_at)
        VALUES (enqueue_task.task_type, enqueue_task.payload, task_queue, enqueue_task.priority,
                due_at, task_max_attempts, enqueue_task.concurrency_key, initial_turn,
                initial_status, initial_queued_at)
        RETURNING t.id INTO id;
    ELSE
        -- ON CONFLICT DO NOTHING waits for a concurrent insert of the same key to
        -- commit or roll back, so racing callers see exactly one winner.
        INSERT INTO ledgerq.tasks AS t (task_type, payload, queue, priority, run_at, max_attempts,
                                        concurrency_key, idempotency_key, turn, status, queued_at)
        VALUES (enqueue_task.task_type, enqueue_task.payload, task_queue, enqueue_task.priority,
                due_at, task_max_attempts, enqueue_task.concurrency_key,
                enqueue_task.idempotency_key, initial_turn, initial_status, initial_queued_at)
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING t.id INTO id;
    END IF;

    IF id IS NOT NULL THEN
        -- A caller handing its tasks to Redis itself (task_hand_off) wakes
        -- the dispatcher only for those it leaves PENDING.
        IF due_at <= now() AND NOT ledgerq.task_handing_off() THEN
            PERFORM pg_notify('ledgerq_tasks', '');
        END IF;
        created := true;
        RETURN NEXT;
        RETURN;
    END IF;

    -- The key names the work: the same type and payload is the same task,
    -- whatever the other arguments (queue, priority, run_at, concurrency_key)
    -- say this time; the task keeps the ones it was created with.
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

-- The batch form: a JSON array of objects with enqueue_task's fields (a
-- missing or null queue or max_attempts takes the type's registered value,
-- as in enqueue_task). One row per input in input order; all or nothing. Ids
-- are drawn before the insert so each input maps to its own row without
-- relying on RETURNING order.
--
-- Built for batches of thousands: the array is read once, into one array per
-- column, by a single query that also checks every element and applies the
-- defaults (one task_defaults lookup for all the batch's types); a batch
-- without idempotency keys then needs one plain INSERT and nothing else.
CREATE OR REPLACE FUNCTION ledgerq.enqueue_tasks(tasks jsonb)
RETURNS TABLE(id bigint, created boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    id_seq regclass := pg_get_serial_sequence('ledgerq.tasks', 'id');
    first_bad bigint;
    problem text;
    new_ids bigint[];
    task_types text[];
    payloads jsonb[];
    queues text[];
    priorities integer[];
    run_ats timestamptz[];
    max_attempts_list integer[];
    keys text[];
    concurrency_keys text[];
    any_due boolean;
    any_key boolean;
    any_concurrency_key boolean;
    one_queue boolean;
    inserted bigint;
    clash record;
    turns bigint[];
BEGIN
    IF tasks IS NULL OR jsonb_typeof(tasks) <> 'array' THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = 'tasks must be a JSON array of task objects';
    END IF;

    -- The checks inline here are exactly task_json_problem's (a call per
    -- element, with a query inside, cost more than the INSERT). A value that
    -- does not even convert (a run_at that is no timestamp, a priority of 1.5)
    -- raises instead. Either way task_batch_problem then names the element and
    -- the field, so a caller can fix one bad item in a batch of thousands.
    BEGIN
        SELECT min(v.ord) FILTER (WHERE NOT v.ok), array_agg(nextval(id_seq)),
               array_agg(v.task_type), array_agg(v.payload), array_agg(v.queue),
               array_agg(v.priority), array_agg(v.run_at), array_agg(v.max_attempts),
               array_agg(v.idempotency_key), array_agg(v.concurrency_key),
               bool_or(v.run_at <= now()), bool_or(v.idempotency_key IS NOT NULL),
               bool_or(v.concurrency_key IS NOT NULL), min(v.queue) = max(v.queue)
        INTO first_bad, new_ids, task_types, payloads, queues, priorities, run_ats,
             max_attempts_list, keys, concurrency_keys, any_due, any_key,
             any_concurrency_key, one_queue
        FROM (
            SELECT c.*, coalesce(
                       jsonb_typeof(c.e) = 'object'
                       AND c.e - '{task_type,payload,queue,priority,run_at,max_attempts,idempotency_key,concurrency_key}'::text[] = '{}'::jsonb
                       AND jsonb_typeof(c.e -> 'task_type') = 'string'
                       AND coalesce(jsonb_typeof(c.e -> 'queue'), 'null') IN ('string', 'null')
                       AND coalesce(jsonb_typeof(c.e -> 'idempotency_key'), 'null') IN ('string', 'null')
                       AND coalesce(jsonb_typeof(c.e -> 'concurrency_key'), 'null') IN ('string', 'null')
                       AND coalesce(jsonb_typeof(c.e -> 'priority'), 'null') IN ('number', 'null')
                       AND coalesce(jsonb_typeof(c.e -> 'max_attempts'), 'null') IN ('number', 'null')
                       AND coalesce(jsonb_typeof(c.e -> 'run_at'), 'null') IN ('string', 'null')
                       AND ledgerq.task_args_problem(c.task_type, c.payload, c.queue, c.priority,
                                                     c.run_at, c.max_attempts, c.idempotency_key,
                                                     c.concurrency_key) IS NULL,
                       false) AS ok
            FROM (
                SELECT x.ord, x.e, x.e ->> 'task_type' AS task_type,
                       coalesce(x.e -> 'payload', '{}') AS payload,
                       coalesce(x.e ->> 'queue', d.queue) AS queue,
                       coalesce((x.e ->> 'priority')::integer, 0) AS priority,
                       coalesce((x.e ->> 'run_at')::timestamptz, now()) AS run_at,
                       coalesce((x.e ->> 'max_attempts')::integer, d.max_attempts) AS max_attempts,
                       x.e ->> 'idempotency_key' AS idempotency_key,
                       x.e ->> 'concurrency_key' AS concurrency_key
                FROM jsonb_array_elements(tasks) WITH ORDINALITY AS x(e, ord)
                LEFT JOIN ledgerq.task_defaults(
                    ARRAY(SELECT y ->> 'task_type' FROM jsonb_array_elements(tasks) AS y)
                ) d ON d.task_type = x.e ->> 'task_type'
                OFFSET 0  -- convert each field once, not once per check that reads it
            ) c
            -- A sorted subquery feeding the aggregates with no join between keeps
            -- its order: every array, and the ids drawn, follow the input order.
            ORDER BY c.ord
        ) v;
    EXCEPTION WHEN data_exception THEN
        problem := ledgerq.task_batch_problem(tasks);
        IF problem IS NULL THEN
            RAISE;  -- not an input problem the checks know of
        END IF;
    END;
    IF problem IS NULL AND first_bad IS NOT NULL THEN
        problem := ledgerq.task_batch_problem(tasks);
    END IF;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;
    IF new_ids IS NULL THEN
        RETURN;  -- an empty batch enqueues nothing
    END IF;

    -- Each task's place in its queue's line (limits.sql). Tasks without a
    -- concurrency key all join at their queue's head: for one queue, one
    -- flow_turn instead of flow_turns' numbering (2 ms per 1,000 tasks).
    IF one_queue AND NOT any_concurrency_key THEN
        turns := array_fill(ledgerq.flow_turn(queues[1], NULL), ARRAY[cardinality(new_ids)]);
    ELSE
        turns := ledgerq.flow_turns(queues, concurrency_keys);
    END IF;

    IF NOT any_key THEN
        INSERT INTO ledgerq.tasks (id, task_type, payload, queue, priority, run_at, max_attempts,
                                   concurrency_key, turn)
        SELECT * FROM unnest(new_ids, task_types, payloads, queues, priorities, run_ats,
                             max_attempts_list, concurrency_keys, turns);
        inserted := cardinality(new_ids);
    ELSE
        -- An input whose key is taken, earlier or by an earlier input of this
        -- batch (rows go in in input order), is skipped and answered below.
        INSERT INTO ledgerq.tasks AS t (id, task_type, payload, queue, priority, run_at,
                                        max_attempts, concurrency_key, idempotency_key, turn)
        SELECT u.id, u.task_type, u.payload, u.queue, u.priority, u.run_at, u.max_attempts,
               u.concurrency_key, u.key, u.turn
        FROM unnest(new_ids, task_types, payloads, queues, priorities, run_ats, max_attempts_list,
                    concurrency_keys, keys, turns) WITH ORDINALITY
             AS u(id, task_type, payload, queue, priority, run_at, max_attempts, concurrency_key,
                  key, turn, ord)
        ORDER BY u.ord
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
        GET DIAGNOSTICS inserted = ROW_COUNT;
    END IF;

    IF any_due AND NOT ledgerq.task_handing_off() THEN
        PERFORM pg_notify('ledgerq_tasks', '');
    END IF;

    IF inserted = cardinality(new_ids) THEN
        RETURN QUERY SELECT u.id, true FROM unnest(new_ids) WITH ORDINALITY AS u(id, ord) ORDER BY u.ord;
        RETURN;
    END IF;

    -- Inputs that hit an existing key must carry the same type and payload as
    -- the task that holds the key (as in enqueue_task, the other fields may
    -- differ: the task keeps its own).
    SELECT u.ord, u.key, h.id AS holder
    INTO clash
    FROM unnest(new_ids, keys, task_types, payloads) WITH ORDINALITY
         AS u(id, key, task_type, payload, ord)
    JOIN ledgerq.tasks h ON h.idempotency_key = u.key
    WHERE h.id <> u.id AND (h.task_type <> u.task_type OR h.payload <> u.payload)
    ORDER BY u.ord
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ409',
            MESSAGE = format('tasks[%s]: idempotency_key %L is already used by task %s with a different type or payload',
                             clash.ord - 1, clash.key, clash.holder),
            HINT = 'Use a new key for different work, or resend the original type and payload.';
    END IF;

    RETURN QUERY
    SELECT coalesce(h.id, u.id), h.id IS NULL OR h.id = u.id
    FROM unnest(new_ids, keys) WITH ORDINALITY AS u(id, key, ord)
    LEFT JOIN ledgerq.tasks h ON h.idempotency_key = u.key
    ORDER BY u.ord;
END;
$$;
