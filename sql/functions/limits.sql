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
    -- SKIP LOCKED: the caller holds the queue's flow lock, and a task locked
    -- now belongs to a claim waiting for that lock, which decides it afresh.
    UPDATE ledgerq.tasks t SET waiting_on = NULL
    WHERE t.id IN (
        SELECT p.id FROM ledgerq.tasks p
        WHERE p.queue = flow_wake_queue.queue AND p.status = 'PENDING' AND p.waiting_on IS NOT NULL
          AND (include_paused OR p.waiting_on <> 'paused')
        FOR NO KEY UPDATE SKIP LOCKED);
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

-- --- token buckets ---------------------------------------------------------

-- flow_burst: a bucket's size, the `burst` setting or max(1, ceil(rate)).
CREATE OR REPLACE FUNCTION ledgerq.flow_burst(settings jsonb, rate double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce((settings ->> 'burst')::double precision, greatest(1, ceil(rate)));
$$;

-- flow_tokens: the tokens a bucket holds at `at` (a bucket never used is full).
CREATE OR REPLACE FUNCTION ledgerq.flow_tokens(
    queue text, bucket text, concurrency_key text, rate double precision, burst double precision,
    at timestamptz
) RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT least(burst, b.tokens + rate * greatest(0, extract(epoch FROM at - b.refilled_at)))
         FROM ledgerq.flow_buckets b
         WHERE b.queue = $1 AND b.bucket = $2 AND b.concurrency_key = coalesce($3, '')),
        burst);
$$;

-- flow_bucket_set: store a bucket's tokens as of `at`; wake_at, when given,
-- is kept at the earliest time asked for.
CREATE OR REPLACE FUNCTION ledgerq.flow_bucket_set(
    queue text, bucket text, concurrency_key text, tokens double precision, at timestamptz,
    wake_at timestamptz DEFAULT NULL
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO ledgerq.flow_buckets AS b (queue, bucket, concurrency_key, tokens, refilled_at, wake_at)
    VALUES ($1, $2, coalesce($3, ''), $4, $5, $6)
    ON CONFLICT (queue, bucket, concurrency_key) DO UPDATE
        SET tokens = excluded.tokens, refilled_at = excluded.refilled_at,
            wake_at = CASE WHEN excluded.wake_at IS NULL THEN b.wake_at
                           ELSE least(b.wake_at, excluded.wake_at) END;
$$;

-- --- the verdict -------------------------------------------------------------

-- flow_refusal: why a task of a configured queue may not start now, or NULL.
-- The caller holds the queue's flow lock (flow_lock_key(queue)), so no other
-- decision of the queue interleaves. Concurrency counts the queue's tasks in
-- `counted` states ('{RUNNING}' at claim; '{QUEUED,RUNNING}' at dispatch, where
-- a QUEUED task will start) plus `extra_queue`/`extra_key` admitted by the
-- caller and not yet written. A rate passes when its bucket, less `reserved`
-- tokens of tasks already on their way, holds a whole token; with `take`
-- (the claim) the token is spent. A refused rate sets its bucket's wake_at.
CREATE OR REPLACE FUNCTION ledgerq.flow_refusal(
    queue text, concurrency_key text, is_retry boolean, settings jsonb, paused boolean,
    at timestamptz, take boolean, counted text[],
    extra_queue integer DEFAULT 0, extra_key integer DEFAULT 0
) RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    n bigint;
    rate double precision;
    burst double precision;
    key_tokens double precision;
    queue_tokens double precision;
    retry_tokens double precision;
    reserved bigint;
BEGIN
    IF paused THEN
        RETURN 'paused';
    END IF;
    IF concurrency_key IS NOT NULL AND settings ? 'per_key_max_running' THEN
        SELECT count(*) INTO n FROM ledgerq.tasks t
        WHERE t.queue = flow_refusal.queue AND t.concurrency_key = flow_refusal.concurrency_key
          AND t.status IN ('QUEUED', 'RUNNING') AND t.status = ANY (counted);
        IF n + extra_key >= (settings ->> 'per_key_max_running')::bigint THEN
            RETURN 'per_key_max_running';
        END IF;
    END IF;
    IF settings ? 'max_running' THEN
        SELECT count(*) INTO n FROM ledgerq.tasks t
        WHERE t.queue = flow_refusal.queue AND t.status IN ('QUEUED', 'RUNNING') AND t.status = ANY (counted);
        IF n + extra_queue >= (settings ->> 'max_running')::bigint THEN
            RETURN 'max_running';
        END IF;
    END IF;

    -- Rates: every bucket must pass before any token is spent.
    IF concurrency_key IS NOT NULL AND settings ? 'per_key_rate_per_second' THEN
        rate := (settings ->> 'per_key_rate_per_second')::double precision;
        burst := ledgerq.flow_burst(settings, rate);
        key_tokens := ledgerq.flow_tokens(queue, 'key', concurrency_key, rate, burst, at);
        reserved := extra_key;
        IF NOT take THEN
            SELECT reserved + count(*) INTO reserved FROM ledgerq.tasks t
            WHERE t.queue = flow_refusal.queue AND t.concurrency_key = flow_refusal.concurrency_key
              AND t.status = 'QUEUED';
        END IF;
        IF key_tokens - reserved < 1 THEN
            PERFORM ledgerq.flow_bucket_set(queue, 'key', concurrency_key, key_tokens, at,
                                            at + make_interval(secs => (1 + reserved - key_tokens) / rate));
            RETURN 'per_key_rate_per_second';
        END IF;
    END IF;
    IF settings ? 'rate_per_second' THEN
        rate := (settings ->> 'rate_per_second')::double precision;
        burst := ledgerq.flow_burst(settings, rate);
        queue_tokens := ledgerq.flow_tokens(queue, 'queue', NULL, rate, burst, at);
        reserved := extra_queue;
        IF NOT take THEN
            SELECT reserved + count(*) INTO reserved FROM ledgerq.tasks t
            WHERE t.queue = flow_refusal.queue AND t.status = 'QUEUED';
        END IF;
        IF queue_tokens - reserved < 1 THEN
            PERFORM ledgerq.flow_bucket_set(queue, 'queue', NULL, queue_tokens, at,
                                            at + make_interval(secs => (1 + reserved - queue_tokens) / rate));
            RETURN 'rate_per_second';
        END IF;
    END IF;
    IF is_retry AND settings ? 'retry_rate_per_second' THEN
        rate := (settings ->> 'retry_rate_per_second')::double precision;
        burst := ledgerq.flow_burst(settings, rate);
        retry_tokens := ledgerq.flow_tokens(queue, 'retry', NULL, rate, burst, at);
        reserved := 0;
        IF NOT take THEN
            SELECT count(*) INTO reserved FROM ledgerq.tasks t
            WHERE t.queue = flow_refusal.queue AND t.status = 'QUEUED' AND t.attempts > t.budget_start;
        END IF;
        -- extra_queue counts every task admitted in this batch, retries or
        -- not: an overestimate of the retries, so on the safe side.
        reserved := reserved + extra_queue;
        IF retry_tokens - reserved < 1 THEN
            PERFORM ledgerq.flow_bucket_set(queue, 'retry', NULL, retry_tokens, at,
                                            at + make_interval(secs => (1 + reserved - retry_tokens) / rate));
            RETURN 'retry_rate_per_second';
        END IF;
    END IF;
    IF take THEN
        IF key_tokens IS NOT NULL THEN
            PERFORM ledgerq.flow_bucket_set(queue, 'key', concurrency_key, key_tokens - 1, at);
        END IF;
        IF queue_tokens IS NOT NULL THEN
            PERFORM ledgerq.flow_bucket_set(queue, 'queue', NULL, queue_tokens - 1, at);
        END IF;
        IF retry_tokens IS NOT NULL THEN
            PERFORM ledgerq.flow_bucket_set(queue, 'retry', NULL, retry_tokens - 1, at);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- flow_lock_queues: take the flow locks of the configured queues among these
-- tasks, in ascending lock order (the order every caller uses). Callers hold
-- the tasks' row locks already: row locks first, then flow locks, everywhere.
CREATE OR REPLACE FUNCTION ledgerq.flow_lock_queues(task_ids bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    lock_key bigint;
    taken integer := 0;
BEGIN
    FOR lock_key IN
        SELECT DISTINCT ledgerq.flow_lock_key(q.queue)
        FROM ledgerq.queues q
        WHERE q.queue IN (SELECT t.queue FROM ledgerq.tasks t WHERE t.id = ANY (task_ids))
        ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(lock_key);
        taken := taken + 1;
    END LOOP;
    RETURN taken;
END;
$$;

-- --- claim ---------------------------------------------------------------------

-- flow_claim: claim_tasks for tasks of configured queues (and parked ones).
-- Each claimable task either starts (RUNNING, as claim_tasks does it) or, when
-- a limit or the pause refuses it, goes back to PENDING, parked on that
-- reason, with its attempt count untouched. Returns both: the claimed rows
-- (status RUNNING) and the deferred ones (status PENDING, waiting_on set).
CREATE OR REPLACE FUNCTION ledgerq.flow_claim(
    task_ids bigint[],
    worker_id text,
    lease_seconds integer
) RETURNS SETOF ledgerq.tasks
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    locked_ids bigint[];
    candidate record;
    reason text;
    at timestamptz;
    claimed ledgerq.tasks%ROWTYPE;
BEGIN
    SELECT array_agg(l.id) INTO locked_ids FROM (
        SELECT t.id FROM ledgerq.tasks t
        WHERE t.id = ANY (task_ids)
          AND (t.status = 'QUEUED' OR (t.status = 'PENDING' AND t.run_at <= now()))
        ORDER BY t.id
        FOR NO KEY UPDATE
    ) l;
    IF locked_ids IS NULL THEN
        RETURN;
    END IF;
    PERFORM ledgerq.flow_lock_queues(locked_ids);
    -- The clock after the locks: buckets refill by the time that really passed.
    at := clock_timestamp();
    FOR candidate IN
        SELECT t.id, t.queue, t.concurrency_key, t.attempts > t.budget_start AS is_retry,
               q.settings, q.paused
        FROM ledgerq.tasks t LEFT JOIN ledgerq.queues q ON q.queue = t.queue
        WHERE t.id = ANY (locked_ids)
          -- Re-checked: a task may have moved while we waited for the locks.
          AND (t.status = 'QUEUED' OR (t.status = 'PENDING' AND t.run_at <= now()))
        ORDER BY t.id
    LOOP
        reason := NULL;
        IF candidate.settings IS NOT NULL THEN
            reason := ledgerq.flow_refusal(candidate.queue, candidate.concurrency_key,
                candidate.is_retry, candidate.settings, candidate.paused, at, true, '{RUNNING}');
        END IF;
        IF reason IS NULL THEN
            UPDATE ledgerq.tasks t
            SET status = 'RUNNING',
                attempts = t.attempts + 1,
                worker_id = flow_claim.worker_id,
                lease_expires_at = at + make_interval(secs => lease_seconds),
                queued_at = NULL,
                waiting_on = NULL,
                -- When it really started: after the locks, so the attempt
                -- intervals of one scope never overlap beyond its limit.
                started_at = at
            WHERE t.id = candidate.id
            RETURNING t.* INTO claimed;
            INSERT INTO ledgerq.attempts (task_id, attempt, worker_id, started_at)
            VALUES (claimed.id, claimed.attempts, claimed.worker_id, claimed.started_at);
            RETURN NEXT claimed;
        ELSE
            RETURN QUERY
            UPDATE ledgerq.tasks t SET status = 'PENDING', queued_at = NULL, waiting_on = reason
            WHERE t.id = candidate.id
            RETURNING t.*;
        END IF;
    END LOOP;
END;
$$;

-- --- dispatch --------------------------------------------------------------------

-- flow_admit: which of these dispatch candidates (locked by the caller, in
-- dispatch order) may go to Redis. A candidate of a configured queue that
-- cannot start now is parked instead, so Redis never fills with ids the claim
-- would refuse. Counts what is QUEUED or RUNNING, plus what this batch
-- admitted before it. The claim re-checks exactly; this keeps it from
-- having to.
CREATE OR REPLACE FUNCTION ledgerq.flow_admit(candidate_ids bigint[]) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    candidate record;
    reason text;
    at timestamptz;
    admitted bigint[] := '{}';
    per_queue jsonb := '{}';
    per_key jsonb := '{}';
    key_name text;
BEGIN
    PERFORM ledgerq.flow_lock_queues(candidate_ids);
    at := clock_timestamp();
    FOR candidate IN
        SELECT t.id, t.queue, t.concurrency_key, t.attempts > t.budget_start AS is_retry,
               q.settings, q.paused
        FROM unnest(candidate_ids) WITH ORDINALITY AS u(id, ord)
        JOIN ledgerq.tasks t ON t.id = u.id
        LEFT JOIN ledgerq.queues q ON q.queue = t.queue
        ORDER BY u.ord
    LOOP
        IF candidate.settings IS NULL THEN
            admitted := admitted || candidate.id;
            CONTINUE;
        END IF;
        key_name := candidate.queue || chr(31) || coalesce(candidate.concurrency_key, '');
        reason := ledgerq.flow_refusal(candidate.queue, candidate.concurrency_key, candidate.is_retry,
            candidate.settings, candidate.paused, at, false, '{QUEUED,RUNNING}',
            coalesce((per_queue ->> candidate.queue)::integer, 0),
            coalesce((per_key ->> key_name)::integer, 0));
        IF reason IS NULL THEN
            admitted := admitted || candidate.id;
            per_queue := per_queue || jsonb_build_object(candidate.queue,
                coalesce((per_queue ->> candidate.queue)::integer, 0) + 1);
            IF candidate.concurrency_key IS NOT NULL THEN
                per_key := per_key || jsonb_build_object(key_name,
                    coalesce((per_key ->> key_name)::integer, 0) + 1);
            END IF;
        ELSE
            UPDATE ledgerq.tasks t SET waiting_on = reason WHERE t.id = candidate.id;
        END IF;
    END LOOP;
    RETURN admitted;
END;
$$;

-- --- waking ------------------------------------------------------------------------

-- flow_wake_scope: wake as many tasks parked on a concurrency limit of this
-- queue (and key) as there are free slots. The caller holds the queue's flow
-- lock. Tasks another transaction holds are skipped (that one decides them).
CREATE OR REPLACE FUNCTION ledgerq.flow_wake_scope(queue text, concurrency_key text) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    cfg record;
    free bigint;
    woken integer := 0;
    n integer;
BEGIN
    SELECT q.settings, q.paused INTO cfg FROM ledgerq.queues q WHERE q.queue = flow_wake_scope.queue;
    IF NOT FOUND OR cfg.paused THEN
        RETURN 0;
    END IF;
    IF flow_wake_scope.concurrency_key IS NOT NULL AND cfg.settings ? 'per_key_max_running' THEN
        SELECT (cfg.settings ->> 'per_key_max_running')::bigint - count(*) INTO free
        FROM ledgerq.tasks t
        WHERE t.queue = flow_wake_scope.queue AND t.concurrency_key = flow_wake_scope.concurrency_key
          AND t.status IN ('QUEUED', 'RUNNING');
        IF free > 0 THEN
            UPDATE ledgerq.tasks t SET waiting_on = NULL
            WHERE t.id IN (
                SELECT p.id FROM ledgerq.tasks p
                WHERE p.queue = flow_wake_scope.queue AND p.concurrency_key = flow_wake_scope.concurrency_key
                  AND p.status = 'PENDING' AND p.waiting_on = 'per_key_max_running'
                ORDER BY p.priority DESC, p.turn, p.id
                LIMIT free
                FOR NO KEY UPDATE SKIP LOCKED);
            GET DIAGNOSTICS n = ROW_COUNT;
            woken := woken + n;
        END IF;
    END IF;
    IF cfg.settings ? 'max_running' THEN
        SELECT (cfg.settings ->> 'max_running')::bigint - count(*) INTO free
        FROM ledgerq.tasks t
        WHERE t.queue = flow_wake_scope.queue AND t.status IN ('QUEUED', 'RUNNING');
        IF free > 0 THEN
            UPDATE ledgerq.tasks t SET waiting_on = NULL
            WHERE t.id IN (
                SELECT p.id FROM ledgerq.tasks p
                WHERE p.queue = flow_wake_scope.queue AND p.status = 'PENDING' AND p.waiting_on = 'max_running'
                ORDER BY p.priority DESC, p.turn, p.id
                LIMIT free
                FOR NO KEY UPDATE SKIP LOCKED);
            GET DIAGNOSTICS n = ROW_COUNT;
            woken := woken + n;
        END IF;
    END IF;
    RETURN woken;
END;
$$;

-- flow_after_release: these tasks just left QUEUED or RUNNING (completed,
-- reaped, released, handed back, cancelled): wake what waits for the slots
-- they held. Costs one look at the (small) queues table when no queue has a
-- concurrency limit. The caller holds the tasks' row locks.
CREATE OR REPLACE FUNCTION ledgerq.flow_after_release(task_ids bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    scope record;
    woken integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ledgerq.queues q
                   WHERE q.settings ?| '{max_running,per_key_max_running}'::text[]) THEN
        RETURN 0;
    END IF;
    PERFORM ledgerq.flow_lock_queues(task_ids);
    FOR scope IN
        SELECT DISTINCT t.queue, t.concurrency_key
        FROM ledgerq.tasks t JOIN ledgerq.queues q ON q.queue = t.queue
        WHERE t.id = ANY (task_ids) AND q.settings ?| '{max_running,per_key_max_running}'::text[]
    LOOP
        woken := woken + ledgerq.flow_wake_scope(scope.queue, scope.concurrency_key);
    END LOOP;
    IF woken > 0 THEN
        PERFORM pg_notify('ledgerq_tasks', '');
    END IF;
    RETURN woken;
END;
$$;

-- flow_wake_due: rate buckets whose next token has come wake the tasks parked
-- on them: as many as the bucket holds whole tokens (at least one), in line
-- order; while tasks remain parked, the bucket wakes again after the next
-- token. The dispatcher calls it in its own transaction before taking due
-- tasks (it takes flow locks, which must come before any row lock).
CREATE OR REPLACE FUNCTION ledgerq.flow_wake_due(as_of timestamptz DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    due record;
    cfg record;
    at timestamptz;
    rate double precision;
    reason text;
    tokens double precision;
    n integer;
    woken integer := 0;
BEGIN
    FOR due IN
        SELECT DISTINCT b.queue FROM ledgerq.flow_buckets b
        WHERE b.wake_at <= coalesce(as_of, clock_timestamp())
        ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(ledgerq.flow_lock_key(due.queue));
    END LOOP;
    at := coalesce(as_of, clock_timestamp());
    FOR due IN
        SELECT b.queue, b.bucket, b.concurrency_key FROM ledgerq.flow_buckets b
        WHERE b.wake_at <= at
        ORDER BY b.wake_at
        LIMIT 1000
    LOOP
        SELECT q.settings, q.paused INTO cfg FROM ledgerq.queues q WHERE q.queue = due.queue;
        reason := CASE due.bucket WHEN 'queue' THEN 'rate_per_second'
                                  WHEN 'key' THEN 'per_key_rate_per_second'
                                  ELSE 'retry_rate_per_second' END;
        rate := (cfg.settings ->> reason)::double precision;
        IF rate IS NULL OR cfg.paused THEN
            -- The limit is gone (configure_queue woke its tasks) or the queue
            -- is paused (resume_queue wakes them).
            UPDATE ledgerq.flow_buckets b SET wake_at = NULL
            WHERE (b.queue, b.bucket, b.concurrency_key) = (due.queue, due.bucket, due.concurrency_key);
            CONTINUE;
        END IF;
        tokens := ledgerq.flow_tokens(due.queue, due.bucket, nullif(due.concurrency_key, ''), rate,
                                      ledgerq.flow_burst(cfg.settings, rate), at);
        UPDATE ledgerq.tasks t SET waiting_on = NULL
        WHERE t.id IN (
            SELECT p.id FROM ledgerq.tasks p
            WHERE p.queue = due.queue AND p.status = 'PENDING' AND p.waiting_on = reason
              AND (due.bucket <> 'key' OR p.concurrency_key = due.concurrency_key)
            ORDER BY p.priority DESC, p.turn, p.id
            LIMIT greatest(1, floor(tokens))::integer
            FOR NO KEY UPDATE SKIP LOCKED);
        GET DIAGNOSTICS n = ROW_COUNT;
        woken := woken + n;
        UPDATE ledgerq.flow_buckets b
        SET wake_at = CASE WHEN EXISTS (
                SELECT 1 FROM ledgerq.tasks p
                WHERE p.queue = due.queue AND p.status = 'PENDING' AND p.waiting_on = reason
                  AND (due.bucket <> 'key' OR p.concurrency_key = due.concurrency_key))
            THEN at + make_interval(secs => 1 / rate) END
        WHERE (b.queue, b.bucket, b.concurrency_key) = (due.queue, due.bucket, due.concurrency_key);
    END LOOP;
    IF woken > 0 THEN
        PERFORM pg_notify('ledgerq_tasks', '');
    END IF;
    RETURN woken;
END;
$$;

-- flow_next_wake: the earliest time a rate bucket wakes parked tasks.
CREATE OR REPLACE FUNCTION ledgerq.flow_next_wake() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(b.wake_at) FROM ledgerq.flow_buckets b WHERE b.wake_at IS NOT NULL;
$$;

-- flow_rescue: the safety net under the event-driven wake-ups. Any scope with
-- tasks parked on a concurrency limit and a free slot gets them woken; every
-- parked task of a queue that is no longer configured or paused for it goes
-- back in line. The dispatcher runs it now and then (its sweep). Returns how
-- many tasks it woke (0 when the events did their job).
CREATE OR REPLACE FUNCTION ledgerq.flow_rescue() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    scope record;
    lock_key bigint;
    woken integer := 0;
    n integer;
BEGIN
    FOR lock_key IN
        SELECT DISTINCT ledgerq.flow_lock_key(p.queue) FROM ledgerq.tasks p
        WHERE p.status = 'PENDING' AND p.waiting_on IS NOT NULL
        ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(lock_key);
    END LOOP;
    -- Parked on something that no longer holds them.
    UPDATE ledgerq.tasks t SET waiting_on = NULL
    FROM (SELECT p.id FROM ledgerq.tasks p LEFT JOIN ledgerq.queues q ON q.queue = p.queue
          WHERE p.status = 'PENDING' AND p.waiting_on IS NOT NULL
            AND (q.queue IS NULL
                 OR (p.waiting_on = 'paused' AND NOT q.paused)
                 OR (p.waiting_on <> 'paused' AND NOT q.settings ? p.waiting_on))
          FOR NO KEY UPDATE OF p SKIP LOCKED) gone
    WHERE t.id = gone.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    woken := woken + n;
    FOR scope IN
        SELECT DISTINCT p.queue,
               CASE WHEN p.waiting_on = 'per_key_max_running' THEN p.concurrency_key END AS concurrency_key
        FROM ledgerq.tasks p
        WHERE p.status = 'PENDING' AND p.waiting_on IN ('max_running', 'per_key_max_running')
    LOOP
        woken := woken + ledgerq.flow_wake_scope(scope.queue, scope.concurrency_key);
    END LOOP;
    -- A rate-parked task whose bucket has no wake time set.
    UPDATE ledgerq.flow_buckets b SET wake_at = clock_timestamp()
    FROM (SELECT DISTINCT p.queue,
                 CASE p.waiting_on WHEN 'rate_per_second' THEN 'queue'
                                   WHEN 'retry_rate_per_second' THEN 'retry' ELSE 'key' END AS bucket,
                 CASE WHEN p.waiting_on = 'per_key_rate_per_second' THEN p.concurrency_key ELSE '' END AS concurrency_key
          FROM ledgerq.tasks p
          WHERE p.status = 'PENDING'
            AND p.waiting_on IN ('rate_per_second', 'per_key_rate_per_second', 'retry_rate_per_second')) w
    WHERE (b.queue, b.bucket, b.concurrency_key) = (w.queue, w.bucket, w.concurrency_key)
      AND b.wake_at IS NULL;
    IF woken > 0 THEN
        PERFORM pg_notify('ledgerq_tasks', '');
    END IF;
    RETURN woken;
END;
$$;
