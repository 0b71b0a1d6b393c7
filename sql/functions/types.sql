-- Task types known to the ledger: workers register the types they serve, keep
-- that registration alive, and drop out of it when they stop. Tables in
-- migration 0002 (ledgerq.workers, ledgerq.task_type_defaults).
--
-- A worker counts as alive while it has not stopped and was seen within
-- worker_liveness(): workers renew their registration every 10 s, so a killed
-- worker stops counting at most 30 s after its last renewal, and a worker that
-- stopped gracefully at once.

CREATE OR REPLACE FUNCTION ledgerq.worker_liveness() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT interval '30 seconds' $$;

-- worker_register: a worker announces itself and its task types when it
-- starts. types is a JSON array of {task_type, queue, max_attempts,
-- timeout_seconds}. The latest registration of a type sets its defaults.
CREATE OR REPLACE FUNCTION ledgerq.worker_register(
    worker_id text,
    queues text[],
    types jsonb,
    concurrency integer DEFAULT 1
) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    problem text;
    names text[];
BEGIN
    IF worker_id IS NULL OR btrim(worker_id) = '' THEN
        RAISE EXCEPTION 'worker_id must be a non-empty string' USING ERRCODE = 'LQ422';
    END IF;
    IF queues IS NULL OR cardinality(queues) = 0 OR EXISTS (
        SELECT 1 FROM unnest(queues) q WHERE q IS NULL OR btrim(q) = ''
    ) THEN
        RAISE EXCEPTION 'queues must list at least one non-empty queue name' USING ERRCODE = 'LQ422';
    END IF;
    IF concurrency IS NULL OR concurrency < 1 THEN
        RAISE EXCEPTION 'concurrency must be >= 1, got %', coalesce(concurrency::text, 'NULL')
            USING ERRCODE = 'LQ422';
    END IF;
    IF jsonb_typeof(types) IS DISTINCT FROM 'array' OR jsonb_array_length(types) = 0 THEN
        RAISE EXCEPTION 'types must be a non-empty JSON array of task types' USING ERRCODE = 'LQ422';
    END IF;
    SELECT format('types[%s]: %s', t.ord - 1, CASE
            WHEN jsonb_typeof(t.item) IS DISTINCT FROM 'object' THEN 'must be a JSON object'
            WHEN jsonb_typeof(t.item -> 'task_type') IS DISTINCT FROM 'string'
                OR btrim(t.item ->> 'task_type') = '' THEN 'task_type must be a non-empty string'
            WHEN jsonb_typeof(t.item -> 'queue') IS DISTINCT FROM 'string'
                OR btrim(t.item ->> 'queue') = '' THEN 'queue must be a non-empty string'
            WHEN length(t.item ->> 'queue') > 200 THEN 'queue must be at most 200 characters'
            WHEN jsonb_typeof(t.item -> 'max_attempts') IS DISTINCT FROM 'number'
                OR (t.item ->> 'max_attempts')::numeric NOT BETWEEN 1 AND 2147483647
                OR (t.item ->> 'max_attempts')::numeric <> trunc((t.item ->> 'max_attempts')::numeric)
                THEN 'max_attempts must be an integer >= 1 and at most 2147483647'
            WHEN coalesce(jsonb_typeof(t.item -> 'timeout_seconds'), 'null') NOT IN ('null', 'number')
                OR (t.item ->> 'timeout_seconds')::float8 <= 0
                THEN 'timeout_seconds must be a number > 0 or null'
        END)
    INTO problem
    FROM jsonb_array_elements(types) WITH ORDINALITY AS t(item, ord)
    WHERE jsonb_typeof(t.item) IS DISTINCT FROM 'object'
        OR jsonb_typeof(t.item -> 'task_type') IS DISTINCT FROM 'string'
        OR btrim(t.item ->> 'task_type') = ''
        OR jsonb_typeof(t.item -> 'queue') IS DISTINCT FROM 'string'
        OR btrim(t.item ->> 'queue') = ''
        OR length(t.item ->> 'queue') > 200
        OR jsonb_typeof(t.item -> 'max_attempts') IS DISTINCT FROM 'number'
        OR (t.item ->> 'max_attempts')::numeric NOT BETWEEN 1 AND 2147483647
        OR (t.item ->> 'max_attempts')::numeric <> trunc((t.item ->> 'max_attempts')::numeric)
        OR coalesce(jsonb_typeof(t.item -> 'timeout_seconds'), 'null') NOT IN ('null', 'number')
        OR (t.item ->> 'timeout_seconds')::float8 <= 0
    ORDER BY t.ord
    LIMIT 1;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem USING ERRCODE = 'LQ422';
    END IF;

    SELECT array_agg(DISTINCT t ->> 'task_type' ORDER BY t ->> 'task_type')
    INTO names
    FROM jsonb_array_elements(types) t;

    INSERT INTO ledgerq.workers AS w
        (worker_id, queues, task_types, concurrency, started_at, last_seen_at, stopped_at)
    VALUES (worker_id, queues, names, concurrency, now(), now(), NULL)
    ON CONFLICT (worker_id) DO UPDATE
    SET queues = EXCLUDED.queues,
        task_types = EXCLUDED.task_types,
        concurrency = EXCLUDED.concurrency,
        last_seen_at = now(),
        stopped_at = NULL;

    -- Sorted, so workers registering overlapping types at once lock the rows
    -- in one order and cannot deadlock; DISTINCT ON, so a type listed twice
    -- is one row (ON CONFLICT cannot touch a row twice in one statement).
    INSERT INTO ledgerq.task_type_defaults AS d
        (task_type, queue, max_attempts, timeout_seconds, registered_at, registered_by)
    SELECT DISTINCT ON (t ->> 'task_type')
        t ->> 'task_type', t ->> 'queue', (t ->> 'max_attempts')::integer,
        (t ->> 'timeout_seconds')::float8, now(), worker_id
    FROM jsonb_array_elements(types) t
    ORDER BY t ->> 'task_type'
    ON CONFLICT (task_type) DO UPDATE
    SET queue = EXCLUDED.queue,
        max_attempts = EXCLUDED.max_attempts,
        timeout_seconds = EXCLUDED.timeout_seconds,
        registered_at = EXCLUDED.registered_at,
        registered_by = EXCLUDED.registered_by;
    RETURN cardinality(names);
END;
$$;

-- worker_heartbeat: keeps a registration alive. False when the worker is not
-- registered (or stopped): it should register again.
CREATE OR REPLACE FUNCTION ledgerq.worker_heartbeat(worker_id text) RETURNS boolean
LANGUAGE sql AS $$
    UPDATE ledgerq.workers w SET last_seen_at = now()
    WHERE w.worker_id = worker_heartbeat.worker_id AND w.stopped_at IS NULL
    RETURNING true
$$;

-- worker_stop: a graceful stop; the worker no longer counts at once.
CREATE OR REPLACE FUNCTION ledgerq.worker_stop(worker_id text) RETURNS boolean
LANGUAGE sql AS $$
    UPDATE ledgerq.workers w SET stopped_at = now(), last_seen_at = now()
    WHERE w.worker_id = worker_stop.worker_id AND w.stopped_at IS NULL
    RETURNING true
$$;

-- Whether some live worker (other than except_worker) serves task_type (on
-- queue, when one is given: a worker that serves the type on other queues
-- would never receive the task).
DROP FUNCTION IF EXISTS ledgerq.task_type_served(text, text);
CREATE OR REPLACE FUNCTION ledgerq.task_type_served(
    task_type text,
    except_worker text DEFAULT NULL,
    queue text DEFAULT NULL
) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM ledgerq.workers w
        WHERE w.stopped_at IS NULL
          AND w.last_seen_at > now() - ledgerq.worker_liveness()
          AND task_type_served.task_type = ANY (w.task_types)
          AND (task_type_served.queue IS NULL OR task_type_served.queue = ANY (w.queues))
          AND w.worker_id IS DISTINCT FROM except_worker
    )
$$;

-- task_hand_back: a worker received tasks of a type it has no handler for.
-- Where some other live worker serves the type on the task's queue (a rolling
-- deploy), the task
-- goes back to PENDING without spending an attempt, due again after
-- delay_seconds (so the worker that cannot run it does not spin on it), and
-- the reason is recorded in the attempt. Returns one row per input: PENDING
-- (or CANCELLED, if cancellation was requested) for a task handed back, NULL
-- for one nobody live serves (the caller then fails it as an unknown type).
CREATE OR REPLACE FUNCTION ledgerq.task_hand_back(
    task_ids bigint[],
    attempts integer[],
    worker_id text,
    delay_seconds double precision DEFAULT 1
) RETURNS TABLE(task_id bigint, status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    served_ids bigint[];
    served_attempts integer[];
    back_ids bigint[];
    back_statuses text[];
BEGIN
    SELECT array_agg(i.task_id ORDER BY i.ord), array_agg(i.attempt ORDER BY i.ord)
    INTO served_ids, served_attempts
    FROM unnest(task_ids, attempts) WITH ORDINALITY AS i(task_id, attempt, ord)
    JOIN ledgerq.tasks t ON t.id = i.task_id
    WHERE ledgerq.task_type_served(t.task_type, worker_id, t.queue);
    IF served_ids IS NULL THEN
        RETURN QUERY SELECT i.task_id, NULL::text FROM unnest(task_ids) AS i(task_id);
        RETURN;
    END IF;

    -- task_release makes the attempt free and records the reason; a statement
    -- of its own, so the delay below sees the rows it changed.
    SELECT array_agg(r.task_id), array_agg(r.status)
    INTO back_ids, back_statuses
    FROM ledgerq.task_release(
        served_ids, served_attempts,
        format('handed back by worker %s: it has no handler for this task type, '
               'another live worker serves it', worker_id)
    ) r
    WHERE r.status IS NOT NULL;

    UPDATE ledgerq.tasks t
    SET run_at = now() + make_interval(secs => greatest(delay_seconds, 0))
    FROM unnest(back_ids, back_statuses) AS b(task_id, status)
    WHERE t.id = b.task_id AND b.status = 'PENDING';

    RETURN QUERY
    SELECT i.task_id, b.status
    FROM unnest(task_ids) WITH ORDINALITY AS i(task_id, ord)
    LEFT JOIN unnest(back_ids, back_statuses) AS b(task_id, status) ON b.task_id = i.task_id
    ORDER BY i.ord;
END;
$$;

-- The registered task types, with how many live workers serve each.
CREATE OR REPLACE VIEW ledgerq.task_types AS
SELECT d.task_type,
       d.queue,
       d.max_attempts,
       d.timeout_seconds,
       count(w.worker_id) FILTER (
           WHERE w.stopped_at IS NULL AND w.last_seen_at > now() - ledgerq.worker_liveness()
       )::integer AS workers_alive,
       max(w.last_seen_at) AS last_seen_at
FROM ledgerq.task_type_defaults d
LEFT JOIN ledgerq.workers w ON d.task_type = ANY (w.task_types)
GROUP BY d.task_type, d.queue, d.max_attempts, d.timeout_seconds;

-- The queue and max_attempts a task of each given type gets when its enqueue
-- names none: the type's registration, else 'default' and 5. One row per
-- distinct type, in no particular order. enqueue_task and enqueue_tasks apply
-- it (a caller's explicit value always wins); the runtime asks it too, so that
-- the task it answers with is the one stored.
--
-- When registrations disagree (two versions of a worker during a deploy), the
-- latest registration wins: worker_register overwrites the type's row, so the
-- worker that started last decides. A registration outlives its workers: a
-- type whose workers are all stopped keeps its queue, so tasks enqueued while
-- nothing runs wait where the next worker will look.
CREATE OR REPLACE FUNCTION ledgerq.task_defaults(task_types text[])
RETURNS TABLE(task_type text, queue text, max_attempts integer)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT t.task_type, coalesce(d.queue, 'default'), coalesce(d.max_attempts, 5)
    FROM (SELECT DISTINCT u.task_type FROM unnest(task_defaults.task_types) AS u(task_type)) t
    LEFT JOIN ledgerq.task_type_defaults d ON d.task_type = t.task_type
$$;
