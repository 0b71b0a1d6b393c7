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

-- flow_verdict: why a task of a configured queue may not start, or NULL, from
-- what its caller counted under the queue's flow lock: tasks of its key and of
-- its queue that hold a slot, and the whole tokens each rate bucket can still
-- give (NULL where a setting does not apply). Checked in this order, so the
-- reason names the first limit in the way.
CREATE OR REPLACE FUNCTION ledgerq.flow_verdict(
    settings jsonb, paused boolean, keyed boolean,
    key_busy bigint, queue_busy bigint,
    key_tokens double precision, queue_tokens double precision, retry_tokens double precision
) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN paused THEN 'paused'
        WHEN keyed AND key_busy >= (settings ->> 'per_key_max_running')::bigint
            THEN 'per_key_max_running'
        WHEN queue_busy >= (settings ->> 'max_running')::bigint THEN 'max_running'
        WHEN keyed AND key_tokens < 1 THEN 'per_key_rate_per_second'
        WHEN queue_tokens < 1 THEN 'rate_per_second'
        WHEN retry_tokens < 1 THEN 'retry_rate_per_second'
    END;
$$;

-- flow_rate_bucket: the bucket a rate refusal waits on, and its setting.
CREATE OR REPLACE FUNCTION ledgerq.flow_bucket_of(reason text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE reason WHEN 'rate_per_second' THEN 'queue'
                       WHEN 'per_key_rate_per_second' THEN 'key'
                       WHEN 'retry_rate_per_second' THEN 'retry' END;
$$;

-- flow_lock_queues: take the flow locks of the configured queues among these
-- tasks, in ascending lock order (the order every caller uses). Callers hold
-- the tasks' row locks already: row locks first, then flow locks, everywhere.
-- Deciding (claims, dispatch: they park) takes them exclusive; waking after a
-- freed slot takes them shared: wakers need only exclude the deciders, whose
-- parking they must see, and two wakers at once can only wake a task too many
-- (the next decision parks it again), never too few.
CREATE OR REPLACE FUNCTION ledgerq.flow_lock_queues(task_ids bigint[], shared boolean DEFAULT false)
RETURNS integer
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

-- --- claim and dispatch ---------------------------------------------------------------

-- flow_decide: the verdict on each task (in the given order) of a batch, under
-- the flow locks of their queues (the caller holds them and the tasks' row
-- locks). NULL for a task that may start (every task of a queue without a
-- settings row), else the reason it waits.
--
-- At claim (at_claim), a slot is held by a RUNNING task; a start spends a token
-- of each rate that applies, written to the buckets before returning. At
-- dispatch, a QUEUED task counts as started too (it is on its way to a worker,
-- where it will hold a slot and spend a token); nothing is spent. Either way a
-- task this batch let through counts for the ones after it, and a rate
-- refusal sets its bucket's wake_at to when a token is due for the first task
-- parked on it. Each scope is counted and each bucket read once per batch.
CREATE OR REPLACE FUNCTION ledgerq.flow_decide(task_ids bigint[], at_claim boolean, at timestamptz)
RETURNS TABLE(id bigint, reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c record;
    verdict text;
    slot_states text[] := CASE WHEN at_claim THEN '{RUNNING}'::text[] ELSE '{QUEUED,RUNNING}'::text[] END;
    busy jsonb := '{}';      -- scope name -> slots taken
    buckets jsonb := '{}';   -- scope name -> {queue, bucket, key, rate, tokens, spent, wake}
    qname text;
    kname text;
    rname text;
    keyed boolean;
    n bigint;
    rate double precision;
    name text;
    b jsonb;
BEGIN
    FOR c IN
        SELECT t.id, t.queue, t.concurrency_key, t.attempts > t.budget_start AS is_retry,
               q.settings, q.paused
        FROM unnest(task_ids) WITH ORDINALITY AS u(id, ord)
        JOIN ledgerq.tasks t ON t.id = u.id
        LEFT JOIN ledgerq.queues q ON q.queue = t.queue
        ORDER BY u.ord
    LOOP
        IF c.settings IS NULL THEN
            id := c.id; reason := NULL; RETURN NEXT;
            CONTINUE;
        END IF;
        keyed := c.concurrency_key IS NOT NULL;
        qname := 'q' || c.queue;
        kname := 'k' || c.queue || chr(31) || coalesce(c.concurrency_key, '');
        rname := 'r' || c.queue;

        -- First sight of a scope in this batch: count it, read its buckets.
        IF c.settings ? 'max_running' AND NOT busy ? qname THEN
            SELECT count(*) INTO n FROM ledgerq.tasks t
            WHERE t.queue = c.queue AND t.status IN ('QUEUED', 'RUNNING') AND t.status = ANY (slot_states);
            busy := busy || jsonb_build_object(qname, n);
        END IF;
        IF keyed AND c.settings ? 'per_key_max_running' AND NOT busy ? kname THEN
            SELECT count(*) INTO n FROM ledgerq.tasks t
            WHERE t.queue = c.queue AND t.concurrency_key = c.concurrency_key
              AND t.status IN ('QUEUED', 'RUNNING') AND t.status = ANY (slot_states);
            busy := busy || jsonb_build_object(kname, n);
        END IF;
        IF c.settings ? 'rate_per_second' AND NOT buckets ? qname THEN
            rate := (c.settings ->> 'rate_per_second')::double precision;
            n := 0;
            IF NOT at_claim THEN
                SELECT count(*) INTO n FROM ledgerq.tasks t WHERE t.queue = c.queue AND t.status = 'QUEUED';
            END IF;
            buckets := buckets || jsonb_build_object(qname, jsonb_build_object(
                'queue', c.queue, 'bucket', 'queue', 'key', NULL, 'rate', rate, 'spent', 0,
                'tokens', ledgerq.flow_tokens(c.queue, 'queue', NULL, rate, ledgerq.flow_burst(c.settings, rate), at),
                'reserved', n));
        END IF;
        IF c.is_retry AND c.settings ? 'retry_rate_per_second' AND NOT buckets ? rname THEN
            rate := (c.settings ->> 'retry_rate_per_second')::double precision;
            n := 0;
            IF NOT at_claim THEN
                SELECT count(*) INTO n FROM ledgerq.tasks t
                WHERE t.queue = c.queue AND t.status = 'QUEUED' AND t.attempts > t.budget_start;
            END IF;
            buckets := buckets || jsonb_build_object(rname, jsonb_build_object(
                'queue', c.queue, 'bucket', 'retry', 'key', NULL, 'rate', rate, 'spent', 0,
                'tokens', ledgerq.flow_tokens(c.queue, 'retry', NULL, rate, ledgerq.flow_burst(c.settings, rate), at),
                'reserved', n));
        END IF;
        IF keyed AND c.settings ? 'per_key_rate_per_second' AND NOT buckets ? kname THEN
            rate := (c.settings ->> 'per_key_rate_per_second')::double precision;
            n := 0;
            IF NOT at_claim THEN
                SELECT count(*) INTO n FROM ledgerq.tasks t
                WHERE t.queue = c.queue AND t.concurrency_key = c.concurrency_key AND t.status = 'QUEUED';
            END IF;
            buckets := buckets || jsonb_build_object(kname, jsonb_build_object(
                'queue', c.queue, 'bucket', 'key', 'key', c.concurrency_key, 'rate', rate, 'spent', 0,
                'tokens', ledgerq.flow_tokens(c.queue, 'key', c.concurrency_key, rate,
                                              ledgerq.flow_burst(c.settings, rate), at),
                'reserved', n));
        END IF;

        verdict := ledgerq.flow_verdict(c.settings, c.paused, keyed,
            (busy ->> kname)::bigint, (busy ->> qname)::bigint,
            ledgerq.flow_left(buckets -> kname), ledgerq.flow_left(buckets -> qname),
            CASE WHEN c.is_retry THEN ledgerq.flow_left(buckets -> rname) END);

        IF verdict IS NULL THEN
            IF busy ? qname THEN
                busy := jsonb_set(busy, ARRAY[qname], to_jsonb((busy ->> qname)::bigint + 1));
            END IF;
            IF keyed AND busy ? kname THEN
                busy := jsonb_set(busy, ARRAY[kname], to_jsonb((busy ->> kname)::bigint + 1));
            END IF;
            FOREACH name IN ARRAY ARRAY[qname, CASE WHEN keyed THEN kname END,
                                        CASE WHEN c.is_retry THEN rname END] LOOP
                IF name IS NOT NULL AND buckets ? name THEN
                    buckets := jsonb_set(buckets, ARRAY[name, 'spent'],
                                         to_jsonb((buckets #>> ARRAY[name, 'spent'])::bigint + 1));
                END IF;
            END LOOP;
        ELSIF ledgerq.flow_bucket_of(verdict) IS NOT NULL THEN
            name := CASE ledgerq.flow_bucket_of(verdict) WHEN 'key' THEN kname
                                                         WHEN 'queue' THEN qname ELSE rname END;
            IF NOT buckets -> name ? 'wake' THEN
                buckets := jsonb_set(buckets, ARRAY[name, 'wake'], to_jsonb(
                    greatest(0, 1 - ledgerq.flow_left(buckets -> name)) / (buckets #>> ARRAY[name, 'rate'])::double precision));
            END IF;
        END IF;
        id := c.id; reason := verdict; RETURN NEXT;
    END LOOP;

    -- One write per bucket: tokens spent (at claim), the wake-up of refusals.
    FOR b IN SELECT e.value FROM jsonb_each(buckets) e LOOP
        IF (at_claim AND (b ->> 'spent')::bigint > 0) OR b ? 'wake' THEN
            PERFORM ledgerq.flow_bucket_set(
                b ->> 'queue', b ->> 'bucket', b ->> 'key',
                (b ->> 'tokens')::double precision - CASE WHEN at_claim THEN (b ->> 'spent')::bigint ELSE 0 END,
                at,
                at + make_interval(secs => (b ->> 'wake')::double precision));
        END IF;
    END LOOP;
END;
$$;

-- flow_left: the whole tokens a bucket (as tracked by flow_decide) can still
-- give this batch; NULL when there is no such bucket.
CREATE OR REPLACE FUNCTION ledgerq.flow_left(b jsonb) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT (b ->> 'tokens')::double precision - (b ->> 'reserved')::bigint - (b ->> 'spent')::bigint;
$$;

-- flow_claim: claim_tasks for tasks of configured queues (and parked ones).
-- Under the queue's flow lock, each claimable task either starts (RUNNING, as
-- claim_tasks does it) or, when a limit or the pause refuses it, goes back to
-- PENDING parked on that reason, with its attempt count untouched. Returns
-- both: the claimed rows (status RUNNING) and the deferred ones (status
-- PENDING, waiting_on set).
CREATE OR REPLACE FUNCTION ledgerq.flow_claim(
    task_ids bigint[],
    worker_id text,
    lease_seconds integer
) RETURNS SETOF ledgerq.tasks
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    locked_ids bigint[];
    at timestamptz;
    start_ids bigint[];
    wait_ids bigint[];
    wait_reasons text[];
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
    -- The clock after the locks: buckets refill by the time that really
    -- passed, and an attempt starts when it really started, so the attempt
    -- intervals of one scope never overlap beyond its limit.
    at := clock_timestamp();
    SELECT array_agg(d.id) FILTER (WHERE d.reason IS NULL),
           array_agg(d.id) FILTER (WHERE d.reason IS NOT NULL),
           array_agg(d.reason) FILTER (WHERE d.reason IS NOT NULL)
    INTO start_ids, wait_ids, wait_reasons
    FROM ledgerq.flow_decide(
        -- Re-checked: a task may have moved while we waited for the locks.
        ARRAY(SELECT t.id FROM ledgerq.tasks t
              WHERE t.id = ANY (locked_ids)
                AND (t.status = 'QUEUED' OR (t.status = 'PENDING' AND t.run_at <= now()))
              ORDER BY t.id),
        true, at) d;

    RETURN QUERY
    WITH claimed AS (
        UPDATE ledgerq.tasks t
        SET status = 'RUNNING',
            attempts = t.attempts + 1,
            worker_id = flow_claim.worker_id,
            lease_expires_at = at + make_interval(secs => lease_seconds),
            queued_at = NULL,
            waiting_on = NULL,
            started_at = at
        WHERE t.id = ANY (start_ids)
        RETURNING t.*
    ), opened AS (
        INSERT INTO ledgerq.attempts (task_id, attempt, worker_id, started_at)
        SELECT c.id, c.attempts, c.worker_id, c.started_at FROM claimed c
    )
    SELECT * FROM claimed;

    RETURN QUERY
    UPDATE ledgerq.tasks t SET status = 'PENDING', queued_at = NULL, waiting_on = w.reason
    FROM unnest(wait_ids, wait_reasons) AS w(id, reason)
    WHERE t.id = w.id
    RETURNING t.*;
END;
$$;

-- flow_admit: which of these dispatch candidates (locked by the caller, in
-- dispatch order) may go to Redis. A candidate of a configured queue that
-- cannot start now is parked instead, so Redis never fills with ids the claim
-- would refuse. The claim re-checks exactly; this spares it the work.
CREATE OR REPLACE FUNCTION ledgerq.flow_admit(candidate_ids bigint[]) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    admitted bigint[];
    wait_ids bigint[];
    wait_reasons text[];
BEGIN
    PERFORM ledgerq.flow_lock_queues(candidate_ids);
    SELECT coalesce(array_agg(d.id) FILTER (WHERE d.reason IS NULL), '{}'),
           array_agg(d.id) FILTER (WHERE d.reason IS NOT NULL),
           array_agg(d.reason) FILTER (WHERE d.reason IS NOT NULL)
    INTO admitted, wait_ids, wait_reasons
    FROM ledgerq.flow_decide(candidate_ids, false, clock_timestamp()) d;
    IF wait_ids IS NOT NULL THEN
        UPDATE ledgerq.tasks t SET waiting_on = w.reason
        FROM unnest(wait_ids, wait_reasons) AS w(id, reason)
        WHERE t.id = w.id;
    END IF;
    RETURN admitted;
END;
$$;

-- --- waking ------------------------------------------------------------------------

-- flow_wake_scope: wake as many tasks parked on a concurrency limit of this
-- queue (and key) as there are free slots. The caller holds the queue's flow
-- lock (shared is enough). Tasks another transaction holds are skipped (that
-- one decides them).
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
    PERFORM ledgerq.flow_lock_queues(task_ids, shared => true);
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
-- on them: as many as the bucket holds whole tokens, in line
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
    have double precision;
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
        have := ledgerq.flow_tokens(due.queue, due.bucket, nullif(due.concurrency_key, ''), rate,
                                      ledgerq.flow_burst(cfg.settings, rate), at);
        IF have < 1 THEN
            -- Spent since the wake-up was set (a claim took the token): wake
            -- when the next one is due instead.
            UPDATE ledgerq.flow_buckets b SET wake_at = at + make_interval(secs => (1 - have) / rate)
            WHERE (b.queue, b.bucket, b.concurrency_key) = (due.queue, due.bucket, due.concurrency_key);
            CONTINUE;
        END IF;
        UPDATE ledgerq.tasks t SET waiting_on = NULL
        WHERE t.id IN (
            SELECT p.id FROM ledgerq.tasks p
            WHERE p.queue = due.queue AND p.status = 'PENDING' AND p.waiting_on = reason
              AND (due.bucket <> 'key' OR p.concurrency_key = due.concurrency_key)
            ORDER BY p.priority DESC, p.turn, p.id
            LIMIT floor(have)::integer
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
    -- A task parked on a rate whose bucket will not wake it (no wake time, or
    -- no bucket): back in line, to be judged again by the next dispatch.
    UPDATE ledgerq.tasks t SET waiting_on = NULL
    FROM (SELECT p.id FROM ledgerq.tasks p
          WHERE p.status = 'PENDING'
            AND p.waiting_on IN ('rate_per_second', 'per_key_rate_per_second', 'retry_rate_per_second')
            AND NOT EXISTS (
                SELECT 1 FROM ledgerq.flow_buckets b
                WHERE b.queue = p.queue AND b.bucket = ledgerq.flow_bucket_of(p.waiting_on)
                  AND b.concurrency_key = CASE WHEN p.waiting_on = 'per_key_rate_per_second'
                                               THEN p.concurrency_key ELSE '' END
                  AND b.wake_at IS NOT NULL)
          FOR NO KEY UPDATE OF p SKIP LOCKED) stranded
    WHERE t.id = stranded.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    woken := woken + n;
    -- Buckets that have refilled to full hold nothing a new bucket would not:
    -- keyed rates leave one row per key, so drop those.
    DELETE FROM ledgerq.flow_buckets b
    USING ledgerq.queues q
    WHERE q.queue = b.queue AND b.wake_at IS NULL
      AND b.refilled_at + make_interval(secs => ledgerq.flow_burst(q.settings,
              (q.settings ->> CASE b.bucket WHEN 'queue' THEN 'rate_per_second'
                                            WHEN 'key' THEN 'per_key_rate_per_second'
                                            ELSE 'retry_rate_per_second' END)::double precision)
              / (q.settings ->> CASE b.bucket WHEN 'queue' THEN 'rate_per_second'
                                              WHEN 'key' THEN 'per_key_rate_per_second'
                                              ELSE 'retry_rate_per_second' END)::double precision)
          < clock_timestamp()
      -- or whose rate is no longer set (NULL above).
      OR (q.queue = b.queue AND b.wake_at IS NULL
          AND NOT q.settings ? CASE b.bucket WHEN 'queue' THEN 'rate_per_second'
                                             WHEN 'key' THEN 'per_key_rate_per_second'
                                             ELSE 'retry_rate_per_second' END);
    IF woken > 0 THEN
        PERFORM pg_notify('ledgerq_tasks', '');
    END IF;
    RETURN woken;
END;
$$;
