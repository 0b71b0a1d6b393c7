-- Flow control's enforcement: turns (fairness between concurrency keys),
-- parking and waking tasks that wait on a limit or a pause. The settings and
-- the pause themselves are in queues.sql; the claim and the dispatcher call
-- the functions here (claim.sql, dispatch.sql).

-- flow_room gained the claim lane it decides in.
DROP FUNCTION IF EXISTS ledgerq.flow_room(bigint[], boolean);
-- flow_lane_queue became flow_lane_of, which also says what the lane decides on.
DROP FUNCTION IF EXISTS ledgerq.flow_lane_queue(bigint[]);

-- flow_turn: the turn of a task joining the line of its queue now. The line's
-- head is the lowest turn still waiting, in Redis (QUEUED) or parked on a limit
-- in the ledger, or, when neither is lower, the highest turn the dispatcher has
-- handed out (flow_turns). An
-- unkeyed task starts at the head; a keyed one after its key's last waiting
-- task (PENDING or QUEUED), never before the head, and never at 0 (turns of
-- keyed tasks start at 1, so the indexes of the line hold only keyed queues).
-- So a key with a backlog of 100,000 takes one turn in every round, and a key
-- that just arrived takes the next one, even when the dispatcher has already
-- handed the whole backlog to Redis (a queue without max_running).
CREATE OR REPLACE FUNCTION ledgerq.flow_turn(queue text, concurrency_key text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    -- ORDER BY ... LIMIT 1, not min()/max(): the planner turns those into a
    -- one-entry index probe only when it has statistics saying so, and a key
    -- with a backlog of 100,000 would otherwise be read whole at every enqueue.
    SELECT greatest(
        -- No flow_turns row: no keyed task of the queue was ever handed out.
        coalesce((SELECT least((SELECT t.turn FROM ledgerq.tasks t
                                WHERE t.queue = $1 AND t.status = 'QUEUED' AND t.turn > 0
                                ORDER BY t.turn LIMIT 1),
                               (SELECT t.turn FROM ledgerq.tasks t
                                WHERE t.queue = $1 AND t.status = 'PENDING'
                                  AND t.waiting_on IS NOT NULL AND t.turn > 0
                                ORDER BY t.turn LIMIT 1),
                               f.frontier)
                  FROM ledgerq.flow_turns f WHERE f.queue = $1), 0),
        CASE WHEN $2 IS NOT NULL THEN
            greatest(1,
                     (SELECT t.turn + 1 FROM ledgerq.tasks t
                      WHERE t.queue = $1 AND t.concurrency_key = $2 AND t.status = 'PENDING'
                      ORDER BY t.turn DESC LIMIT 1),
                     (SELECT t.turn + 1 FROM ledgerq.tasks t
                      WHERE t.queue = $1 AND t.concurrency_key = $2 AND t.status = 'QUEUED'
                        AND t.turn > 0
                      ORDER BY t.turn DESC LIMIT 1))
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
    ), starts AS MATERIALIZED (
        -- Once per queue and key, however many tasks of theirs the batch holds.
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

-- flow_lane_spent: what the claim lanes of a queue spent from one of its
-- buckets ('queue' or 'retry') that the bucket's row does not show yet
-- (flow_lane_spends); 0 for a key's bucket, which lanes do not share. The
-- tokens a bucket holds are flow_tokens less this.
CREATE OR REPLACE FUNCTION ledgerq.flow_lane_spent(queue text, bucket text) RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(s.spent), 0) FROM ledgerq.flow_lane_spends s
    WHERE s.queue = $1 AND s.bucket = $2;
$$;

-- flow_queue_tokens: the tokens a queue's bucket ('queue' or 'retry') holds at
-- `at`, less what its claim lanes spent (flow_tokens - flow_lane_spent, in
-- one statement). PL/pgSQL, so its plan is kept: the SQL functions, with a
-- subquery each, are planned at every call. For the deciders that run often
-- (flow_lane_verdict, flow_admit_all).
CREATE OR REPLACE FUNCTION ledgerq.flow_queue_tokens(
    queue text, bucket text, settings jsonb, rate double precision, at timestamptz
) RETURNS double precision
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    tokens double precision;
BEGIN
    SELECT coalesce((SELECT least(ledgerq.flow_burst(settings, rate),
                                  fb.tokens + rate * greatest(0, extract(epoch FROM at - fb.refilled_at)))
                     FROM ledgerq.flow_buckets fb
                     WHERE fb.queue = flow_queue_tokens.queue AND fb.bucket = flow_queue_tokens.bucket
                       AND fb.concurrency_key = ''),
                    ledgerq.flow_burst(settings, rate))
           - (SELECT coalesce(sum(ls.spent), 0) FROM ledgerq.flow_lane_spends ls
              WHERE ls.queue = flow_queue_tokens.queue AND ls.bucket = flow_queue_tokens.bucket)
    INTO tokens;
    RETURN tokens;
END;
$$;

-- flow_bucket_set: store a bucket's tokens as of `at`; wake_at, when given,
-- is kept at the earliest time asked for. The caller decides alone (it holds
-- every claim lane of the queue, or its flow lock exclusive) and counted the
-- lanes' spending in `tokens` (flow_lane_spent): it is folded in here.
CREATE OR REPLACE FUNCTION ledgerq.flow_bucket_set(
    queue text, bucket text, concurrency_key text, tokens double precision, at timestamptz,
    wake_at timestamptz DEFAULT NULL
) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM ledgerq.flow_lane_spends s WHERE s.queue = $1 AND s.bucket = $2 AND $3 IS NULL;
    INSERT INTO ledgerq.flow_buckets AS b (queue, bucket, concurrency_key, tokens, refilled_at, wake_at)
    VALUES ($1, $2, coalesce($3, ''), $4, $5, $6)
    ON CONFLICT (queue, bucket, concurrency_key) DO UPDATE
        SET tokens = excluded.tokens, refilled_at = excluded.refilled_at,
            wake_at = CASE WHEN excluded.wake_at IS NULL THEN b.wake_at
                           ELSE least(b.wake_at, excluded.wake_at) END;
$$;

-- flow_fold_lanes: fold what the claim lanes of a queue spent into its
-- buckets' rows, under the settings it was spent under, before they change
-- (configure_queue, holding the queue's flow lock exclusive: no claim of the
-- queue decides meanwhile). Spending from a rate no longer set is dropped.
CREATE OR REPLACE FUNCTION ledgerq.flow_fold_lanes(queue text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    cfg jsonb;
    lanes record;
    rate double precision;
    at timestamptz := clock_timestamp();
BEGIN
    SELECT q.settings INTO cfg FROM ledgerq.queues q WHERE q.queue = flow_fold_lanes.queue;
    FOR lanes IN
        SELECT DISTINCT s.bucket FROM ledgerq.flow_lane_spends s
        WHERE s.queue = flow_fold_lanes.queue ORDER BY 1
    LOOP
        rate := (cfg ->> CASE lanes.bucket WHEN 'queue' THEN 'rate_per_second'
                                           ELSE 'retry_rate_per_second' END)::double precision;
        IF rate IS NULL THEN
            DELETE FROM ledgerq.flow_lane_spends s
            WHERE s.queue = flow_fold_lanes.queue AND s.bucket = lanes.bucket;
        ELSE
            PERFORM ledgerq.flow_bucket_set(flow_fold_lanes.queue, lanes.bucket, NULL,
                ledgerq.flow_queue_tokens(flow_fold_lanes.queue, lanes.bucket, cfg, rate, at), at);
        END IF;
    END LOOP;
END;
$$;

-- flow_bucket_wake: keep the bucket's wake_at at the earliest time asked for,
-- its tokens untouched (a bucket not stored yet is stored with `tokens` as
-- of `at`, what flow_tokens gave).
CREATE OR REPLACE FUNCTION ledgerq.flow_bucket_wake(
    queue text, bucket text, concurrency_key text, tokens double precision, at timestamptz,
    wake_at timestamptz
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO ledgerq.flow_buckets AS b (queue, bucket, concurrency_key, tokens, refilled_at, wake_at)
    VALUES ($1, $2, coalesce($3, ''), $4, $5, $6)
    ON CONFLICT (queue, bucket, concurrency_key) DO UPDATE
        SET wake_at = least(b.wake_at, excluded.wake_at);
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
-- Claims take them shared and then their claim locks (flow_lock_claims);
-- what changes a queue's settings or pause, or wakes its tasks in bulk, takes
-- them exclusive. Waking after a freed slot takes the parking locks instead
-- (flow_lock_parking), shared: wakers need only exclude the deciders that
-- park, whose parking they must see, and two wakers at once can only wake a
-- task too many (the next decision parks it again), never too few.
CREATE OR REPLACE FUNCTION ledgerq.flow_lock_queues(task_ids bigint[], shared boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    RETURN ledgerq.flow_take_locks(ARRAY(
        SELECT ledgerq.flow_lock_key(q.queue) FROM ledgerq.queues q
        WHERE q.queue IN (SELECT t.queue FROM ledgerq.tasks t WHERE t.id = ANY (task_ids))), shared);
END;
$$;

-- --- claim lanes ---------------------------------------------------------------
-- A queue with a queue-wide limit (max_running, rate_per_second,
-- retry_rate_per_second) has flow_lanes() claim lanes, each an advisory lock.
-- A claim whose batch has few tasks of the queue (at most flow_lane_batch())
-- decides in one lane, beside the claims in the other lanes: it cannot see
-- what they are starting, so it starts only if the limit leaves room for them
-- too, flow_lane_room() slots and tokens, and spends the queue's tokens on its
-- lane's row (flow_lane_spends). Near the limit, or with a larger batch, a
-- claim takes every lane of the queue and decides alone, exactly, as before.
-- So a limit never reached costs no waiting: a claim used to wait for the
-- queue's previous claim to commit.
--
-- Why a lane's count is safe: a claim counts after it holds its lane, and
-- holds it until it commits. Every claim it cannot see held another lane
-- when it counted, and started at most flow_lane_batch() tasks.

CREATE OR REPLACE FUNCTION ledgerq.flow_lanes() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 4';

CREATE OR REPLACE FUNCTION ledgerq.flow_lane_batch() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 64';

-- flow_lane_room: the slots and tokens a claim in a lane leaves for the others.
CREATE OR REPLACE FUNCTION ledgerq.flow_lane_room() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT (ledgerq.flow_lanes() - 1) * ledgerq.flow_lane_batch()';

CREATE OR REPLACE FUNCTION ledgerq.flow_lane_key(queue text, lane integer) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- $2::text: text || integer is only STABLE, and would keep this from being
    -- inlined where it is called.
    SELECT hashtextextended('ledgerq.flow-claim:' || $1 || chr(31) || $2::text, 0);
$$;

-- flow_lane_fits: whether a claim of n tasks (retries of them retries) of a
-- queue with these settings may decide in a lane: the queue has a queue-wide
-- limit, the batch has at most flow_lane_batch() of its tasks, and each of its
-- limits is at least that many above flow_lane_room() (a smaller one is
-- always near).
CREATE OR REPLACE FUNCTION ledgerq.flow_lane_fits(settings jsonb, n bigint, retries bigint)
RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT $1 ?| '{max_running,rate_per_second,retry_rate_per_second}'::text[]
       AND $2 <= ledgerq.flow_lane_batch()
       AND coalesce(($1 ->> 'max_running')::numeric, 'Infinity') >= $2 + ledgerq.flow_lane_room()
       AND (NOT $1 ? 'rate_per_second'
            OR ledgerq.flow_burst($1, ($1 ->> 'rate_per_second')::double precision)
               >= $2 + ledgerq.flow_lane_room())
       AND ($3 = 0 OR NOT $1 ? 'retry_rate_per_second'
            OR ledgerq.flow_burst($1, ($1 ->> 'retry_rate_per_second')::double precision)
               >= $3 + ledgerq.flow_lane_room());
$$;

-- flow_lane_of: the queue whose lane a claim of these tasks can decide in
-- (lane_queue), or NULL when it must decide alone: exactly one queue of the
-- batch has a queue-wide limit, no queue of the batch is paused, and its tasks
-- fit a lane (flow_lane_fits). With it, the queue's settings, its tasks and
-- retries in the batch, and whether they are the whole batch with no per-key
-- limit to decide (lane_simple: then flow_lane_verdict decides, else
-- flow_room). Read under the queues' flow locks. flow_claim decides a batch
-- of one queue by the same rule without calling it.
CREATE OR REPLACE FUNCTION ledgerq.flow_lane_of(
    task_ids bigint[],
    OUT lane_queue text, OUT lane_settings jsonb, OUT lane_n bigint, OUT lane_retries bigint,
    OUT lane_simple boolean
)
-- PL/pgSQL, not SQL: its plan is kept (a SQL function is planned at every call).
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    WITH batch AS (
        SELECT t.queue, t.concurrency_key, q.settings, q.paused,
               t.attempts > t.budget_start AS is_retry
        FROM ledgerq.tasks t LEFT JOIN ledgerq.queues q ON q.queue = t.queue
        WHERE t.id = ANY (task_ids)
    ), wide AS (
        SELECT b.queue, b.settings, count(*) AS n, count(*) FILTER (WHERE b.is_retry) AS retries,
               count(*) FILTER (WHERE b.concurrency_key IS NOT NULL) AS keyed
        FROM batch b
        WHERE b.settings ?| '{max_running,rate_per_second,retry_rate_per_second}'::text[]
        GROUP BY b.queue, b.settings
    )
    SELECT w.queue, w.settings, w.n, w.retries,
           w.n = (SELECT count(*) FROM batch)
           AND (w.keyed = 0 OR NOT w.settings ?| '{per_key_max_running,per_key_rate_per_second}'::text[])
    INTO lane_queue, lane_settings, lane_n, lane_retries, lane_simple
    FROM wide w
    WHERE (SELECT count(*) FROM wide) = 1
      AND NOT EXISTS (SELECT 1 FROM batch b WHERE b.paused)
      AND ledgerq.flow_lane_fits(w.settings, w.n, w.retries);
END;
$$;

-- flow_take_lane: take a free lane of the queue, or wait for one; its number.
CREATE OR REPLACE FUNCTION ledgerq.flow_take_lane(queue text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    first integer := pg_backend_pid() % ledgerq.flow_lanes();
    lane integer;
BEGIN
    FOR i IN 0 .. ledgerq.flow_lanes() - 1 LOOP
        lane := (first + i) % ledgerq.flow_lanes();
        IF pg_try_advisory_xact_lock(ledgerq.flow_lane_key(queue, lane)) THEN
            RETURN lane;
        END IF;
    END LOOP;
    PERFORM pg_advisory_xact_lock(ledgerq.flow_lane_key(queue, first));
    RETURN first;
END;
$$;

-- flow_lock_claims: the claim locks a claim of these tasks decides under,
-- after the queues' flow locks, taken shared by the caller (flow_lock_queues):
-- the settings and the pause cannot change while a claim decides, and the
-- settings that chose the locks are the ones the decision reads.
--
-- First the lanes of the queues with a queue-wide limit: a claim in a lane
-- (lane_queue, whose lane the caller holds already) takes none; one that
-- decides alone takes every lane of each, queue after queue in ascending
-- order of their flow locks, lanes in ascending order. Then, in ascending
-- order, one lock per concurrency key of the batch's keyed tasks whose queue
-- has per-key limits and no lane held for it (a queue with per-key limits
-- only; in a lane, the lane's queue too): claims of other keys, and of tasks
-- without a key, do not wait for each other. Lanes before keys, in every
-- claim: no two claims wait for each other in a circle.
CREATE OR REPLACE FUNCTION ledgerq.flow_lock_claims(task_ids bigint[], lane_queue text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    wide record;
    taken integer := 0;
BEGIN
    IF lane_queue IS NULL THEN
        FOR wide IN
            SELECT q.queue FROM ledgerq.queues q
            WHERE q.queue IN (SELECT t.queue FROM ledgerq.tasks t WHERE t.id = ANY (task_ids))
              AND q.settings ?| '{max_running,rate_per_second,retry_rate_per_second}'::text[]
            ORDER BY ledgerq.flow_lock_key(q.queue)
        LOOP
            taken := taken + ledgerq.flow_take_locks(ARRAY(
                SELECT ledgerq.flow_lane_key(wide.queue, l)
                FROM generate_series(0, ledgerq.flow_lanes() - 1) l));
        END LOOP;
    END IF;
    RETURN taken + ledgerq.flow_take_locks(ARRAY(
        SELECT ledgerq.flow_lock_key(q.queue, t.concurrency_key)
        FROM ledgerq.tasks t JOIN ledgerq.queues q ON q.queue = t.queue
        WHERE t.id = ANY (task_ids)
          AND t.concurrency_key IS NOT NULL
          AND q.settings ?| '{per_key_max_running,per_key_rate_per_second}'::text[]
          AND (q.queue = lane_queue
               OR NOT q.settings ?| '{max_running,rate_per_second,retry_rate_per_second}'::text[])));
END;
$$;

-- flow_dispatch_lock_key: a queue's dispatch lock. The dispatcher decides
-- under it, not under the queue's flow lock, so dispatching never waits for
-- the claims of the queue nor they for it: its verdicts only spare the claim
-- work (the claim decides again, exactly, under the flow lock), and what it
-- parks must be seen by whoever wakes tasks of the queue, who takes this lock
-- too (configure, pause, resume, rate wake-ups, the rescue), after the flow
-- lock: row locks, flow locks, dispatch locks, parking locks.
CREATE OR REPLACE FUNCTION ledgerq.flow_dispatch_lock_key(queue text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtextextended('ledgerq.flow-dispatch:' || $1, 0);
$$;

-- flow_lock_parking: the parking locks of the queues among these tasks that
-- have a concurrency limit (max_running, per_key_max_running), in ascending
-- order. They order parking on a concurrency limit against the releases that
-- free a slot, which need not wait for the queue's flow lock: a decider takes
-- them exclusive before it counts for a verdict that may park (flow_decide),
-- a release shared after its own update, before it looks for parked tasks
-- to wake (flow_after_release). A release that took its lock first has
-- committed before the decider counts, so its slot is counted free; one
-- that takes it after sees the parked task and wakes it. Taken after the
-- queues' flow locks, by those that take both: row locks, flow locks,
-- parking locks.
CREATE OR REPLACE FUNCTION ledgerq.flow_lock_parking(task_ids bigint[], shared boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    RETURN ledgerq.flow_lock_parking_of(ARRAY(
        SELECT DISTINCT t.queue FROM ledgerq.tasks t WHERE t.id = ANY (task_ids)), shared);
END;
$$;

-- flow_lock_parking_of: flow_lock_parking for tasks of these queues.
CREATE OR REPLACE FUNCTION ledgerq.flow_lock_parking_of(queues text[], shared boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    RETURN ledgerq.flow_take_locks(ARRAY(
        SELECT hashtextextended('ledgerq.flow-parking:' || q.queue, 0) FROM ledgerq.queues q
        WHERE q.queue = ANY (queues)
          AND q.settings ?| '{max_running,per_key_max_running}'::text[]), shared);
END;
$$;

-- --- claim and dispatch ---------------------------------------------------------------

-- flow_room: the time of the verdict if every task of the batch may start,
-- else NULL; decided at once for the common case: no queue of the batch paused, and every scope with room
-- for all of the batch's tasks in it (its tasks holding a slot plus the
-- batch's within the concurrency limit; each bucket holding a whole token per
-- task, less what QUEUED tasks will spend, at dispatch). Then flow_decide
-- would let each task through in turn; this says so with one statement
-- instead of a loop, and at claim spends the tokens, one row write per
-- bucket. NULL, nothing spent: some task may have to wait, flow_decide
-- decides task by task. Same caller's duties as flow_decide: it holds the
-- tasks' row locks and the locks their decision is made under.
--
-- The time is read in the statement that counts, after its snapshot: a
-- release is not made to wait for the flow lock (flow_lock_parking), and one
-- that committed after the caller took the lock, counted free here, finished
-- before this time, so the attempt history never shows a scope over its limit.
--
-- The counts stop at the limit (LIMIT): a limit far away is proven so
-- without counting every task that holds a slot, and a count never reads
-- more rows than the limit allows.
--
-- In a claim lane (claim_lane: its number; lane_queue's claims in the other lanes
-- may be starting tasks now), the queue-wide limits of the lane's queue must
-- leave flow_lane_room() slots and tokens besides the batch's, and the queue's
-- tokens are spent on the lane's row. A claim that decides alone (claim_lane NULL)
-- spends on the bucket's row, folding the lanes' spending into it. Tokens
-- are what a bucket's row holds less its lanes' spending (flow_lane_spent).
CREATE OR REPLACE FUNCTION ledgerq.flow_room(task_ids bigint[], at_claim boolean, claim_lane integer DEFAULT NULL)
RETURNS timestamptz
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    -- What a queue-wide limit must leave besides the batch's need.
    lane_room bigint := CASE WHEN claim_lane IS NOT NULL THEN ledgerq.flow_lane_room() ELSE 0 END;
    verdict_at timestamptz;
BEGIN
    WITH clock AS MATERIALIZED (
        SELECT clock_timestamp() AS at
    ), batch AS (
        SELECT t.queue, t.concurrency_key, t.attempts > t.budget_start AS is_retry,
               q.settings, q.paused
        FROM ledgerq.tasks t JOIN ledgerq.queues q ON q.queue = t.queue
        WHERE t.id = ANY (task_ids)
    ), scopes AS (
        -- A queue, and each of its keys with a per-key setting.
        SELECT b.queue, NULL::text AS concurrency_key, b.settings, bool_or(b.paused) AS paused,
               count(*) AS n, count(*) FILTER (WHERE b.is_retry) AS retries,
               (b.settings ->> 'max_running')::bigint AS most,
               (b.settings ->> 'rate_per_second')::double precision AS rate
        FROM batch b GROUP BY b.queue, b.settings
        UNION ALL
        SELECT b.queue, b.concurrency_key, b.settings, false, count(*), 0,
               (b.settings ->> 'per_key_max_running')::bigint,
               (b.settings ->> 'per_key_rate_per_second')::double precision
        FROM batch b
        WHERE b.concurrency_key IS NOT NULL
          AND b.settings ?| '{per_key_max_running,per_key_rate_per_second}'::text[]
        GROUP BY b.queue, b.concurrency_key, b.settings
    ), buckets AS (
        -- The rate buckets the batch spends from, with the tokens each holds
        -- now (flow_tokens: a bucket never used is full) and the batch's need.
        SELECT s.queue, s.concurrency_key, r.bucket, r.rate, r.need,
               coalesce(least(ledgerq.flow_burst(s.settings, r.rate),
                              fb.tokens + r.rate * greatest(0, extract(epoch FROM c.at - fb.refilled_at))),
                        ledgerq.flow_burst(s.settings, r.rate))
                   -- flow_lane_spent, written out: a SQL function call would be planned each time.
                   - CASE WHEN s.concurrency_key IS NULL THEN (
                         SELECT coalesce(sum(ls.spent), 0) FROM ledgerq.flow_lane_spends ls
                         WHERE ls.queue = s.queue AND ls.bucket = r.bucket)
                     ELSE 0 END AS tokens,
               CASE WHEN s.concurrency_key IS NULL THEN lane_room ELSE 0 END AS lane_room
        FROM scopes s CROSS JOIN clock c
        CROSS JOIN LATERAL (VALUES
            (CASE WHEN s.concurrency_key IS NULL THEN 'queue' ELSE 'key' END, s.rate, s.n),
            ('retry', CASE WHEN s.concurrency_key IS NULL AND s.retries > 0
                           THEN (s.settings ->> 'retry_rate_per_second')::double precision END,
             s.retries)
        ) AS r(bucket, rate, need)
        LEFT JOIN ledgerq.flow_buckets fb
            ON fb.queue = s.queue AND fb.bucket = r.bucket AND fb.concurrency_key = coalesce(s.concurrency_key, '')
        WHERE r.rate IS NOT NULL
    ), verdict AS (
        SELECT NOT s.paused AND (s.most IS NULL OR s.n <= s.most - CASE
            -- Slots held: RUNNING tasks, and at dispatch QUEUED ones too, each
            -- status counted on its own so both are seeks in tasks_in_flight_idx
            -- (queue, status, key), whatever the planner knows of the table: a
            -- claim never reads the ids a queue has waiting in Redis.
            WHEN s.concurrency_key IS NULL THEN lane_room + (
                SELECT count(*) FROM (
                    SELECT 1 FROM ledgerq.tasks t
                    WHERE t.queue = s.queue AND t.status = 'RUNNING'
                    LIMIT greatest(s.most - s.n - lane_room + 1, 0)) busy) + (
                SELECT count(*) FROM (
                    SELECT 1 FROM ledgerq.tasks t
                    WHERE NOT at_claim AND t.queue = s.queue AND t.status = 'QUEUED'
                    LIMIT greatest(s.most - s.n - lane_room + 1, 0)) busy)
            ELSE (
                SELECT count(*) FROM (
                    SELECT 1 FROM ledgerq.tasks t
                    WHERE t.queue = s.queue AND t.status = 'RUNNING'
                      AND t.concurrency_key = s.concurrency_key
                    LIMIT greatest(s.most - s.n + 1, 0)) busy) + (
                SELECT count(*) FROM (
                    SELECT 1 FROM ledgerq.tasks t
                    WHERE NOT at_claim AND t.queue = s.queue AND t.status = 'QUEUED'
                      AND t.concurrency_key = s.concurrency_key
                    LIMIT greatest(s.most - s.n + 1, 0)) busy)
            END) AS ok
        FROM scopes s
        UNION ALL
        -- At dispatch, the QUEUED tasks of the bucket's scope will spend first.
        SELECT b.need + b.lane_room <= b.tokens - CASE
            WHEN at_claim THEN 0
            WHEN b.concurrency_key IS NULL THEN (
                SELECT count(*) FROM (
                    SELECT 1 FROM ledgerq.tasks t
                    WHERE t.queue = b.queue AND t.status = 'QUEUED'
                      AND (b.bucket <> 'retry' OR t.attempts > t.budget_start)
                    LIMIT greatest(ceil(b.tokens - b.need) + 1, 0)::bigint) queued)
            ELSE (
                SELECT count(*) FROM (
                    SELECT 1 FROM ledgerq.tasks t
                    WHERE t.queue = b.queue AND t.concurrency_key = b.concurrency_key
                      AND t.status = 'QUEUED'
                    LIMIT greatest(ceil(b.tokens - b.need) + 1, 0)::bigint) queued)
            END
        FROM buckets b
    ), spending AS (
        SELECT b.* FROM buckets b
        WHERE at_claim AND b.need > 0 AND NOT EXISTS (SELECT 1 FROM verdict v WHERE NOT v.ok)
    ), spent AS (
        INSERT INTO ledgerq.flow_buckets AS fb (queue, bucket, concurrency_key, tokens, refilled_at)
        SELECT b.queue, b.bucket, coalesce(b.concurrency_key, ''), b.tokens - b.need, c.at
        FROM spending b CROSS JOIN clock c
        WHERE claim_lane IS NULL OR b.concurrency_key IS NOT NULL
        -- In key order, as every writer of several buckets (see flow_decide).
        ORDER BY b.queue, b.bucket, coalesce(b.concurrency_key, '')
        ON CONFLICT (queue, bucket, concurrency_key) DO UPDATE
            SET tokens = excluded.tokens, refilled_at = excluded.refilled_at
    ), folded AS (
        -- Decided alone: the lanes' spending is in the tokens just written.
        DELETE FROM ledgerq.flow_lane_spends ls
        USING spending b
        WHERE claim_lane IS NULL AND b.concurrency_key IS NULL
          AND ls.queue = b.queue AND ls.bucket = b.bucket
    ), lane_spent AS (
        INSERT INTO ledgerq.flow_lane_spends AS ls (queue, bucket, lane, spent)
        SELECT b.queue, b.bucket, claim_lane, b.need
        FROM spending b
        WHERE claim_lane IS NOT NULL AND b.concurrency_key IS NULL
        ORDER BY b.queue, b.bucket
        ON CONFLICT (queue, bucket, lane) DO UPDATE SET spent = ls.spent + excluded.spent
    )
    SELECT CASE WHEN coalesce(bool_and(v.ok), true) THEN (SELECT c.at FROM clock c) END
    INTO verdict_at FROM verdict v;
    RETURN verdict_at;
END;
$$;

-- flow_lane_verdict: flow_room for the common claim in a lane, written out for
-- it (flow_room, general, costs three times as much): every task of the batch
-- is of the lane's queue, with no per-key limit to decide (lane_simple), so
-- only the queue's own limits count, each leaving flow_lane_room() for the
-- other lanes, and its tokens are spent on the lane's row. The same verdict as
-- flow_room(task_ids, true, lane) on such a batch: the time it decided at, or
-- NULL when a limit is near (the claim then decides alone).
CREATE OR REPLACE FUNCTION ledgerq.flow_lane_verdict(
    queue text, settings jsonb, n bigint, retries bigint, lane integer
) RETURNS timestamptz
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    room constant bigint := ledgerq.flow_lane_room();
    at constant timestamptz := clock_timestamp();
    most constant bigint := (settings ->> 'max_running')::bigint;
    rate constant double precision := (settings ->> 'rate_per_second')::double precision;
    retry_rate constant double precision :=
        CASE WHEN retries > 0 THEN (settings ->> 'retry_rate_per_second')::double precision END;
    busy bigint;
    tokens double precision;
BEGIN
    IF most IS NOT NULL THEN
        SELECT count(*) INTO busy FROM (
            SELECT 1 FROM ledgerq.tasks t
            WHERE t.queue = flow_lane_verdict.queue AND t.status = 'RUNNING'
            LIMIT greatest(most - n - room + 1, 0)) b;
        IF n > most - room - busy THEN
            RETURN NULL;
        END IF;
    END IF;
    IF rate IS NOT NULL THEN
        tokens := ledgerq.flow_queue_tokens(flow_lane_verdict.queue, 'queue', settings, rate, at);
        IF n + room > tokens THEN
            RETURN NULL;
        END IF;
    END IF;
    IF retry_rate IS NOT NULL THEN
        tokens := ledgerq.flow_queue_tokens(flow_lane_verdict.queue, 'retry', settings, retry_rate, at);
        IF retries + room > tokens THEN
            RETURN NULL;
        END IF;
    END IF;
    IF rate IS NOT NULL OR retry_rate IS NOT NULL THEN
        INSERT INTO ledgerq.flow_lane_spends AS ls (queue, bucket, lane, spent)
        SELECT flow_lane_verdict.queue, b.bucket, lane, b.need
        FROM (VALUES ('queue', rate, n), ('retry', retry_rate, retries)) AS b(bucket, rate, need)
        WHERE b.rate IS NOT NULL AND b.need > 0
        ORDER BY b.bucket
        ON CONFLICT (queue, bucket, lane) DO UPDATE SET spent = ls.spent + excluded.spent;
    END IF;
    RETURN at;
END;
$$;

-- flow_decide: the verdict on each task (in the given order) of a batch, under
-- the locks their decision is made under (the caller holds them and the
-- tasks' row locks: flow_lock_claims at claim, the dispatch locks at
-- dispatch). NULL for a task that may start (every task of a queue without a
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
    -- Its verdicts may park tasks on a concurrency limit: counted after the
    -- parking locks, so no release in progress is missed (flow_lock_parking).
    PERFORM ledgerq.flow_lock_parking(task_ids);
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
            -- RUNNING, and at dispatch QUEUED: each a seek (as in flow_room).
            SELECT (SELECT count(*) FROM ledgerq.tasks t WHERE t.queue = c.queue AND t.status = 'RUNNING')
                 + (SELECT count(*) FROM ledgerq.tasks t
                    WHERE NOT at_claim AND t.queue = c.queue AND t.status = 'QUEUED')
            INTO n;
            busy := busy || jsonb_build_object(qname, n);
        END IF;
        IF keyed AND c.settings ? 'per_key_max_running' AND NOT busy ? kname THEN
            SELECT (SELECT count(*) FROM ledgerq.tasks t
                    WHERE t.queue = c.queue AND t.status = 'RUNNING' AND t.concurrency_key = c.concurrency_key)
                 + (SELECT count(*) FROM ledgerq.tasks t
                    WHERE NOT at_claim AND t.queue = c.queue AND t.status = 'QUEUED'
                      AND t.concurrency_key = c.concurrency_key)
            INTO n;
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
                'lanes', ledgerq.flow_lane_spent(c.queue, 'queue'), 'reserved', n));
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
                'lanes', ledgerq.flow_lane_spent(c.queue, 'retry'), 'reserved', n));
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
                'lanes', 0, 'reserved', n));
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
    -- In key order, as every writer of several buckets: no deadlock between
    -- a claim and the dispatcher, which do not exclude each other.
    FOR b IN SELECT e.value FROM jsonb_each(buckets) e
             ORDER BY e.value ->> 'queue', e.value ->> 'bucket', coalesce(e.value ->> 'key', '') LOOP
        IF NOT at_claim AND b ? 'wake' THEN
            -- The dispatcher only asks for the wake-up: the tokens are the
            -- claims' to write (one may be spending them now).
            PERFORM ledgerq.flow_bucket_wake(
                b ->> 'queue', b ->> 'bucket', b ->> 'key', (b ->> 'tokens')::double precision,
                at, at + make_interval(secs => (b ->> 'wake')::double precision));
        ELSIF (at_claim AND (b ->> 'spent')::bigint > 0) OR b ? 'wake' THEN
            PERFORM ledgerq.flow_bucket_set(
                b ->> 'queue', b ->> 'bucket', b ->> 'key',
                (b ->> 'tokens')::double precision - (b ->> 'lanes')::double precision
                    - CASE WHEN at_claim THEN (b ->> 'spent')::bigint ELSE 0 END,
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
    SELECT (b ->> 'tokens')::double precision - (b ->> 'lanes')::double precision
           - (b ->> 'reserved')::bigint - (b ->> 'spent')::bigint;
$$;

-- flow_claim: claim_tasks for tasks of configured queues (and parked ones).
-- Under the claim locks (flow_lock_claims), each claimable task either starts (RUNNING, as
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
    batch_queue text;
    last_queue text;
    batch_retries bigint;
    batch_keyed bigint;
    cfg record;
    lane_queue text;
    lane_settings jsonb;
    lane_n bigint;
    lane_retries bigint;
    lane_simple boolean;
    lane integer;
    at timestamptz;
    start_ids bigint[];
    wait_ids bigint[];
    wait_reasons text[];
BEGIN
    -- The rows, and what the lane needs to know of them (row locks hold it still).
    SELECT array_agg(l.id ORDER BY l.id), min(l.queue), max(l.queue),
           count(*) FILTER (WHERE l.is_retry), count(*) FILTER (WHERE l.concurrency_key IS NOT NULL)
    INTO locked_ids, batch_queue, last_queue, batch_retries, batch_keyed
    FROM (
        SELECT t.id, t.queue, t.concurrency_key, t.attempts > t.budget_start AS is_retry
        FROM ledgerq.tasks t
        WHERE t.id = ANY (task_ids)
          AND (t.status = 'QUEUED' OR (t.status = 'PENDING' AND t.run_at <= now()))
        ORDER BY t.id
        FOR NO KEY UPDATE
    ) l;
    IF locked_ids IS NULL THEN
        RETURN;
    END IF;
    -- Our row locks kept every locked task claimable while we waited.
    IF batch_queue = last_queue THEN
        -- One queue, the common batch: its flow lock, then its settings, read
        -- once here rather than with the tasks again (flow_lock_queues,
        -- flow_lane_of).
        PERFORM ledgerq.flow_take_locks(ARRAY[ledgerq.flow_lock_key(batch_queue)], shared => true);
        SELECT q.settings, q.paused INTO cfg FROM ledgerq.queues q WHERE q.queue = batch_queue;
        IF FOUND AND NOT cfg.paused
           AND ledgerq.flow_lane_fits(cfg.settings, cardinality(locked_ids), batch_retries) THEN
            lane_queue := batch_queue;
            lane_settings := cfg.settings;
            lane_n := cardinality(locked_ids);
            lane_retries := batch_retries;
            lane_simple := batch_keyed = 0
                OR NOT cfg.settings ?| '{per_key_max_running,per_key_rate_per_second}'::text[];
        END IF;
    ELSE
        PERFORM ledgerq.flow_lock_queues(locked_ids, shared => true);
        SELECT f.lane_queue, f.lane_settings, f.lane_n, f.lane_retries, f.lane_simple
        INTO lane_queue, lane_settings, lane_n, lane_retries, lane_simple
        FROM ledgerq.flow_lane_of(locked_ids) f;
    END IF;
    IF lane_queue IS NOT NULL THEN
        -- In a lane, if the limits leave room for the other lanes' claims too.
        -- Else the lane and the key locks are let go (the block's rollback)
        -- before this claim waits for every lane: a claim holding one lane
        -- never waits for another.
        BEGIN
            lane := ledgerq.flow_take_lane(lane_queue);
            IF lane_simple THEN
                -- No key lock to take: no per-key limit is decided here.
                at := ledgerq.flow_lane_verdict(lane_queue, lane_settings, lane_n, lane_retries,
                                                lane);
            ELSE
                PERFORM ledgerq.flow_lock_claims(locked_ids, lane_queue);
                at := ledgerq.flow_room(locked_ids, true, lane);
            END IF;
            IF at IS NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'LQ000', MESSAGE = 'near a limit: decide alone';
            END IF;
        EXCEPTION WHEN SQLSTATE 'LQ000' THEN
            at := NULL;
        END;
    END IF;
    IF at IS NULL THEN
        PERFORM ledgerq.flow_lock_claims(locked_ids);
        at := ledgerq.flow_room(locked_ids, true);
    END IF;
    IF at IS NOT NULL THEN
        start_ids := locked_ids;
    ELSE
        -- The clock after the locks, the parking ones included (a release
        -- of a limited scope commits before them or waits for our commit):
        -- buckets refill by the time that really passed, and an attempt
        -- starts when it really started, so the attempt intervals of one
        -- scope never overlap beyond its limit.
        PERFORM ledgerq.flow_lock_parking(locked_ids);
        at := clock_timestamp();
        SELECT array_agg(d.id) FILTER (WHERE d.reason IS NULL),
               array_agg(d.id) FILTER (WHERE d.reason IS NOT NULL),
               array_agg(d.reason) FILTER (WHERE d.reason IS NOT NULL)
        INTO start_ids, wait_ids, wait_reasons
        FROM ledgerq.flow_decide(locked_ids, true, at) d;
    END IF;

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

    IF wait_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE ledgerq.tasks t SET status = 'PENDING', queued_at = NULL, waiting_on = w.reason
    FROM unnest(wait_ids, wait_reasons) AS w(id, reason)
    WHERE t.id = w.id
    RETURNING t.*;
END;
$$;

-- flow_admit_all: whether every one of n dispatch candidates of one queue,
-- none with a concurrency key and `retries` of them retries, may go to Redis:
-- flow_room(candidate_ids, false) for such a batch, written out for it, from
-- what the dispatcher's own query learned of them (flow_room reads them
-- again). False sends the batch to flow_admit, which decides task by task.
CREATE OR REPLACE FUNCTION ledgerq.flow_admit_all(queue text, n bigint, retries bigint)
RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    cfg record;
    at constant timestamptz := clock_timestamp();
    most bigint;
    rate double precision;
    busy bigint;
    tokens double precision;
BEGIN
    SELECT q.settings, q.paused INTO cfg FROM ledgerq.queues q WHERE q.queue = flow_admit_all.queue;
    IF NOT FOUND THEN
        RETURN true;
    ELSIF cfg.paused THEN
        RETURN false;
    END IF;
    -- A slot is held by a RUNNING task and by a QUEUED one, on its way to a
    -- worker; each counted as a seek (as in flow_room).
    most := (cfg.settings ->> 'max_running')::bigint;
    IF most IS NOT NULL THEN
        SELECT (SELECT count(*) FROM (
                    SELECT 1 FROM ledgerq.tasks t
                    WHERE t.queue = flow_admit_all.queue AND t.status = 'RUNNING'
                    LIMIT greatest(most - n + 1, 0)) b)
             + (SELECT count(*) FROM (
                    SELECT 1 FROM ledgerq.tasks t
                    WHERE t.queue = flow_admit_all.queue AND t.status = 'QUEUED'
                    LIMIT greatest(most - n + 1, 0)) b)
        INTO busy;
        IF n > most - busy THEN
            RETURN false;
        END IF;
    END IF;
    -- A rate's tokens, less what the QUEUED tasks will spend first.
    rate := (cfg.settings ->> 'rate_per_second')::double precision;
    IF rate IS NOT NULL THEN
        tokens := ledgerq.flow_queue_tokens(flow_admit_all.queue, 'queue', cfg.settings, rate, at);
        IF n > tokens - (SELECT count(*) FROM (
                             SELECT 1 FROM ledgerq.tasks t
                             WHERE t.queue = flow_admit_all.queue AND t.status = 'QUEUED'
                             LIMIT greatest(ceil(tokens - n) + 1, 0)::bigint) queued) THEN
            RETURN false;
        END IF;
    END IF;
    rate := CASE WHEN retries > 0 THEN (cfg.settings ->> 'retry_rate_per_second')::double precision END;
    IF rate IS NOT NULL THEN
        tokens := ledgerq.flow_queue_tokens(flow_admit_all.queue, 'retry', cfg.settings, rate, at);
        IF retries > tokens - (SELECT count(*) FROM (
                                   SELECT 1 FROM ledgerq.tasks t
                                   WHERE t.queue = flow_admit_all.queue AND t.status = 'QUEUED'
                                     AND t.attempts > t.budget_start
                                   LIMIT greatest(ceil(tokens - retries) + 1, 0)::bigint) queued) THEN
            RETURN false;
        END IF;
    END IF;
    RETURN true;
END;
$$;

-- flow_admit: which of these dispatch candidates (locked by the caller, in
-- dispatch order) may go to Redis. A candidate of a configured queue that
-- cannot start now is parked instead, so Redis never fills with ids the claim
-- would refuse. The claim re-checks exactly; this spares it the work. What it
-- parks it decides under the queues' dispatch locks (flow_dispatch_lock_key),
-- not their flow locks, so that whoever wakes tasks of the queue sees it.
-- When every candidate has room nothing is parked and no lock is needed:
-- dispatchers do not wait for each other for the common verdict.
CREATE OR REPLACE FUNCTION ledgerq.flow_admit(candidate_ids bigint[]) RETURNS bigint[]
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    admitted bigint[];
    wait_ids bigint[];
    wait_reasons text[];
BEGIN
    IF ledgerq.flow_room(candidate_ids, false) IS NOT NULL THEN
        RETURN candidate_ids;
    END IF;
    PERFORM ledgerq.flow_take_locks(ARRAY(
        SELECT ledgerq.flow_dispatch_lock_key(q.queue) FROM ledgerq.queues q
        WHERE q.queue IN (SELECT t.queue FROM ledgerq.tasks t WHERE t.id = ANY (candidate_ids))));
    IF ledgerq.flow_room(candidate_ids, false) IS NOT NULL THEN
        RETURN candidate_ids;
    END IF;
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
-- queue (and key) as there are free slots. The caller holds the queue's
-- parking lock (shared is enough) or its flow lock. Tasks another transaction
-- holds are skipped (that one decides them).
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
        -- Each status a seek in tasks_in_flight_idx (queue, status, key).
        SELECT (cfg.settings ->> 'per_key_max_running')::bigint - (
                   SELECT count(*) FROM ledgerq.tasks t
                   WHERE t.queue = flow_wake_scope.queue AND t.status = 'QUEUED'
                     AND t.concurrency_key = flow_wake_scope.concurrency_key) - (
                   SELECT count(*) FROM ledgerq.tasks t
                   WHERE t.queue = flow_wake_scope.queue AND t.status = 'RUNNING'
                     AND t.concurrency_key = flow_wake_scope.concurrency_key)
        INTO free;
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
    scope_queues text[];
    scope_keys text[];
    scope record;
    woken integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ledgerq.queues q
                   WHERE q.settings ?| '{max_running,per_key_max_running}'::text[]) THEN
        RETURN 0;
    END IF;
    -- The tasks' scopes, read once: the caller's row locks hold them still.
    SELECT array_agg(s.queue), array_agg(s.concurrency_key) INTO scope_queues, scope_keys
    FROM (SELECT DISTINCT t.queue, t.concurrency_key FROM ledgerq.tasks t
          WHERE t.id = ANY (task_ids)) s;
    PERFORM ledgerq.flow_lock_parking_of(scope_queues, shared => true);
    FOR scope IN
        SELECT u.queue, u.concurrency_key
        FROM unnest(scope_queues, scope_keys) AS u(queue, concurrency_key)
        JOIN ledgerq.queues q ON q.queue = u.queue
        WHERE q.settings ?| '{max_running,per_key_max_running}'::text[]
          -- Scopes with nothing parked on their slots have nothing to wake.
          AND EXISTS (SELECT 1 FROM ledgerq.tasks p
                      WHERE p.queue = u.queue AND p.status = 'PENDING'
                        AND (p.waiting_on = 'max_running'
                             OR (p.waiting_on = 'per_key_max_running'
                                 AND p.concurrency_key = u.concurrency_key)))
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
    PERFORM ledgerq.flow_take_locks(ARRAY(
        SELECT ledgerq.flow_lock_key(b.queue) FROM ledgerq.flow_buckets b
        WHERE b.wake_at <= coalesce(as_of, clock_timestamp())));
    PERFORM ledgerq.flow_take_locks(ARRAY(
        SELECT ledgerq.flow_dispatch_lock_key(b.queue) FROM ledgerq.flow_buckets b
        WHERE b.wake_at <= coalesce(as_of, clock_timestamp())));
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
                                      ledgerq.flow_burst(cfg.settings, rate), at)
                - ledgerq.flow_lane_spent(due.queue, due.bucket);
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
    woken integer := 0;
    n integer;
BEGIN
    PERFORM ledgerq.flow_take_locks(ARRAY(
        SELECT DISTINCT ledgerq.flow_lock_key(p.queue) FROM ledgerq.tasks p
        WHERE p.status = 'PENDING' AND p.waiting_on IS NOT NULL));
    PERFORM ledgerq.flow_take_locks(ARRAY(
        SELECT DISTINCT ledgerq.flow_dispatch_lock_key(p.queue) FROM ledgerq.tasks p
        WHERE p.status = 'PENDING' AND p.waiting_on IS NOT NULL));
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
