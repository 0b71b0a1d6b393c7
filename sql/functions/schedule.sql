-- Schedules: periodic tasks, fired exactly once per slot however many callers
-- run run_schedules at once (every dispatcher each second, pg_cron, a psql
-- session). The cron evaluator is in cron.sql; the table in migration 0004.
--
-- The model. A schedule is a cron expression (parsed once, by schedule_task),
-- a time zone, the task to enqueue, and a cursor `next_slot`: the earliest
-- slot that may still fire. run_schedules(as_of) takes the schedules whose
-- cursor is at or before as_of, decides which of their due slots fire,
-- enqueues one task per fired slot with run_at = the slot and the idempotency
-- key `schedule:<name>:<slot in UTC, YYYY-MM-DDTHH:MM:SSZ>`, and moves each
-- cursor past what it handled. Whether anything is due is one step down a
-- partial index on next_slot (the earliest cursor), and the due rows are a
-- range of it: with nothing due a call costs the same for ten schedules or
-- ten thousand.
--
-- Exactly once per slot. Two guards, each enough on its own in the common case:
--  * Row locks with SKIP LOCKED. A caller locks the due rows it takes, and
--    moves their cursors in the same transaction as the enqueue. A concurrent
--    caller skips rows that are locked, without waiting (so eight callers
--    split the work instead of queueing behind each other), and a row it
--    reaches after the first caller committed is re-checked by PostgreSQL
--    against its new cursor, which is no longer due. No slot is handled twice,
--    and none is left behind by a caller that skipped it: its owner handles it.
--  * The idempotency key. The unique index on tasks.idempotency_key is the
--    final word: a slot whose key already holds a task (a schedule dropped and
--    created again, an operator's manual enqueue) is not enqueued again, it is
--    counted as already enqueued and its task becomes the schedule's last task.
--    Keys are checked before the enqueue so that such a task, even with other
--    content, never fails the whole batch with LQ409.
--
-- Which slots fire (documented in the README):
--  * A new schedule's first slot is the first one after it was created; a
--    replaced one keeps its cursor when its expression and time zone are
--    unchanged (so a worker upserting its schedules at every start never loses
--    or repeats a slot), and otherwise starts at the first new slot after the
--    replacement (and after its last slot). Slots before creation never fire,
--    whatever catch_up says: catch_up is about downtime, not history.
--  * resume_schedule starts at the first slot after the resume: the slots a
--    pause covered are skipped, not caught up.
--  * Of the due slots, the latest always fires, and so does every earlier one
--    no older than catch_up (as_of - catch_up <= slot); older ones are skipped.
--    With the default catch_up of 0, only the latest due slot fires. At most
--    1,000 slots of one schedule fire per call; the next call goes on.
--  * overlap = false: a slot is skipped while the task of the previous fired
--    slot is not final (SUCCEEDED, DEAD or CANCELLED; a task pruned away was
--    final). Among several due slots, the first may fire and the rest skip.
--  * A slot at or before last_slot never fires again (a table constraint holds
--    the cursor after it), even after its task was pruned and its key is free.
--
-- DST is the evaluator's: slots are wall-clock minutes in the schedule's time
-- zone, a minute the clocks skip is no slot, a minute they repeat is a slot
-- once, at its first instant. Keys are in UTC, so the two 02:30s of an autumn
-- night could never share a key even if both fired.

-- Argument checks of schedule_task, except cron and timezone (cron_parse and
-- cron_timezone_problem check those): the first problem as a sentence naming
-- the field, or NULL. The task-side limits are enqueue_task's, so a stored
-- schedule always enqueues.
CREATE OR REPLACE FUNCTION ledgerq.schedule_args_problem(
    name text,
    task_type text,
    payload jsonb,
    queue text,
    priority integer,
    max_attempts integer,
    overlap boolean,
    catch_up interval
) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN name IS NULL OR btrim(name) = '' THEN 'name must be a non-empty string'
        WHEN length(name) > 200 THEN 'name must be at most 200 characters'
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
        WHEN overlap IS NULL THEN 'overlap must be true or false'
        WHEN catch_up IS NULL OR catch_up < interval '0'
            THEN format('catch_up must be an interval of zero or more, got %s', coalesce(catch_up::text, 'NULL'))
        WHEN catch_up > interval '100 years' THEN format('catch_up must be at most 100 years, got %s', catch_up)
    END
$$;

CREATE OR REPLACE FUNCTION ledgerq.schedule_task(
    name text,
    cron text,
    task_type text,
    payload jsonb DEFAULT '{}',
    queue text DEFAULT 'default',
    priority integer DEFAULT 0,
    max_attempts integer DEFAULT 5,
    timezone text DEFAULT 'UTC',
    overlap boolean DEFAULT true,
    catch_up interval DEFAULT '0'
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    problem text;
    parsed ledgerq.cron_spec;
BEGIN
    problem := ledgerq.schedule_args_problem(schedule_task.name, schedule_task.task_type,
        schedule_task.payload, schedule_task.queue, schedule_task.priority,
        schedule_task.max_attempts, schedule_task.overlap, schedule_task.catch_up);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;
    parsed := ledgerq.cron_parse(schedule_task.cron);
    problem := ledgerq.cron_timezone_problem(schedule_task.timezone);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;

    INSERT INTO ledgerq.task_schedules AS s
        (name, cron, spec, timezone, task_type, payload, queue, priority, max_attempts,
         overlap, catch_up, next_slot)
    VALUES (schedule_task.name, schedule_task.cron, parsed, schedule_task.timezone,
            schedule_task.task_type, schedule_task.payload, schedule_task.queue,
            schedule_task.priority, schedule_task.max_attempts, schedule_task.overlap,
            schedule_task.catch_up, ledgerq.cron_next(parsed, schedule_task.timezone, now()))
    ON CONFLICT ON CONSTRAINT task_schedules_pkey DO UPDATE
    SET cron = EXCLUDED.cron, spec = EXCLUDED.spec, timezone = EXCLUDED.timezone,
        task_type = EXCLUDED.task_type, payload = EXCLUDED.payload, queue = EXCLUDED.queue,
        priority = EXCLUDED.priority, max_attempts = EXCLUDED.max_attempts,
        overlap = EXCLUDED.overlap, catch_up = EXCLUDED.catch_up,
        -- Same slots: keep the cursor, so a due slot is neither lost nor
        -- repeated. New slots: start after now and after the last slot.
        next_slot = CASE
            WHEN s.spec = EXCLUDED.spec AND s.timezone = EXCLUDED.timezone THEN s.next_slot
            ELSE ledgerq.cron_next(EXCLUDED.spec, EXCLUDED.timezone, greatest(now(), s.last_slot))
        END,
        updated_at = now()
    -- An unchanged schedule (every worker start upserts it) writes nothing.
    WHERE (s.cron, s.spec, s.timezone, s.task_type, s.payload, s.queue, s.priority,
           s.max_attempts, s.overlap, s.catch_up)
          IS DISTINCT FROM
          (EXCLUDED.cron, EXCLUDED.spec, EXCLUDED.timezone, EXCLUDED.task_type, EXCLUDED.payload,
           EXCLUDED.queue, EXCLUDED.priority, EXCLUDED.max_attempts, EXCLUDED.overlap,
           EXCLUDED.catch_up);
END;
$$;

-- Deletes the schedule; its tasks stay. False for an unknown name.
CREATE OR REPLACE FUNCTION ledgerq.unschedule_task(name text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM ledgerq.task_schedules s WHERE s.name = unschedule_task.name;
    RETURN FOUND;
END;
$$;

-- No slot fires while paused. True for a known name (paused already or not).
CREATE OR REPLACE FUNCTION ledgerq.pause_schedule(name text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ledgerq.task_schedules s SET paused = true, updated_at = now()
    WHERE s.name = pause_schedule.name AND NOT s.paused;
    RETURN FOUND OR EXISTS (SELECT 1 FROM ledgerq.task_schedules s WHERE s.name = pause_schedule.name);
END;
$$;

-- Fires again from the first slot after now (and after its last slot): the
-- slots the pause covered are skipped. True for a known name.
CREATE OR REPLACE FUNCTION ledgerq.resume_schedule(name text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ledgerq.task_schedules s
    SET paused = false,
        next_slot = ledgerq.cron_next(s.spec, s.timezone, greatest(now(), s.last_slot)),
        updated_at = now()
    WHERE s.name = resume_schedule.name AND s.paused;
    RETURN FOUND OR EXISTS (SELECT 1 FROM ledgerq.task_schedules s WHERE s.name = resume_schedule.name);
END;
$$;

-- The latest slot at or before as_of, given one slot (known_slot) that is.
-- A bisection that only ever asks cron_next: after long downtime it takes
-- about log2(downtime in minutes) steps, where walking slot by slot could take
-- tens of thousands; the step by one slot each round ends it once the gap is
-- small. Epoch arithmetic keeps the midpoint free of the session's time zone.
CREATE OR REPLACE FUNCTION ledgerq.schedule_latest_slot(
    spec ledgerq.cron_spec, tz text, known_slot timestamptz, as_of timestamptz
) RETURNS timestamptz
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE AS $$
DECLARE
    lo timestamptz := known_slot;
    hi timestamptz := as_of;
    probe timestamptz;
BEGIN
    IF spec.every_seconds > 0 THEN
        RETURN to_timestamp(floor(extract(epoch FROM as_of) / spec.every_seconds) * spec.every_seconds);
    END IF;
    LOOP
        probe := ledgerq.cron_next(spec, tz, lo);
        IF probe > as_of THEN
            RETURN lo;
        END IF;
        lo := probe;
        IF extract(epoch FROM hi) - extract(epoch FROM lo) > 120 THEN
            probe := ledgerq.cron_next(spec, tz,
                to_timestamp((extract(epoch FROM lo) + extract(epoch FROM hi)) / 2));
            IF probe <= as_of THEN
                lo := probe;
            ELSE
                hi := to_timestamp((extract(epoch FROM lo) + extract(epoch FROM hi)) / 2);
            END IF;
        END IF;
    END LOOP;
END;
$$;

-- Which slots of a schedule fire at as_of, given its cursor: `slots`
-- (ascending, empty when nothing is due) and `following`, its next cursor
-- (the first slot after the last one handled). See "Which slots fire" above.
CREATE OR REPLACE FUNCTION ledgerq.schedule_plan(
    spec ledgerq.cron_spec,
    tz text,
    catch_up interval,
    next_slot timestamptz,
    as_of timestamptz,
    OUT slots timestamptz[],
    OUT following timestamptz
)
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE AS $$
DECLARE
    max_slots CONSTANT integer := 1000;
    window_start timestamptz;
    slot timestamptz;
BEGIN
    IF next_slot > as_of THEN
        slots := '{}';
        following := next_slot;
        RETURN;
    END IF;
    following := ledgerq.cron_next(spec, tz, next_slot);
    IF following > as_of THEN
        slots := ARRAY[next_slot];  -- the usual case: called at least once a slot
        RETURN;
    END IF;

    -- Several slots are due: downtime, or a pause in calls. Fire the ones in
    -- the catch-up window; if there are none, the latest due one alone.
    -- Seconds, not calendar units, so the session's time zone cannot stretch
    -- a day of catch_up across its DST change.
    window_start := as_of - make_interval(secs => extract(epoch FROM catch_up));
    slots := '{}';
    IF next_slot >= window_start THEN
        slot := next_slot;
    ELSE
        slot := ledgerq.cron_next(spec, tz, window_start - interval '1 microsecond');
    END IF;
    WHILE slot <= as_of AND cardinality(slots) < max_slots LOOP
        slots := slots || slot;
        slot := ledgerq.cron_next(spec, tz, slot);
    END LOOP;
    IF cardinality(slots) > 0 THEN
        following := slot;
        RETURN;
    END IF;
    slot := ledgerq.schedule_latest_slot(spec, tz, following, as_of);
    slots := ARRAY[slot];
    following := ledgerq.cron_next(spec, tz, slot);
END;
$$;

-- run_schedules with a report: one row per schedule it handled (those due at
-- as_of that no concurrent caller held), for the dispatcher's metrics.
--   enqueued          tasks this call created
--   already_enqueued  fired slots whose key already held a task (not created again)
--   skipped_overlap   slots skipped because the previous task was not final
--   last_slot         the schedule's latest fired slot, next_slot its new cursor
--
--
-- Two planner settings, for the statement that locks and plans the due rows:
--  * jit = off: the planner cannot see that the set-returning functions
--    return a handful of rows, and its inflated cost estimate crossed
--    jit_above_cost, so every call spent ~40 ms compiling expressions.
--  * plan_cache_mode = force_custom_plan: whether 3 or 10,000 schedules are due
--    decides between an index scan and a sequential one, and only a plan made
--    for the call's own as_of knows which (a generic plan guesses a third of
--    the table). It runs only when something is due, so the planning is paid
--    next to real work.
CREATE OR REPLACE FUNCTION ledgerq.schedule_fire(as_of timestamptz DEFAULT now())
RETURNS TABLE(name text, task_type text, queue text, enqueued integer, already_enqueued integer,
              skipped_overlap integer, last_slot timestamptz, next_slot timestamptz)
LANGUAGE plpgsql SET jit = off SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    due_by timestamptz := coalesce(schedule_fire.as_of, now());
    earliest timestamptz;
    -- One element per slot handled, in (schedule name, slot) order.
    slot_names text[];
    slot_times timestamptz[];
    slot_fates text[];          -- 'enqueue', 'exists' (key already held) or 'overlap'
    slot_held_ids bigint[];     -- for 'exists': the task holding the key
    slot_batch_pos integer[];   -- for 'enqueue': 1-based position in the batch
    slot_following timestamptz[];
    batch jsonb;
    batch_ids bigint[];
    batch_created boolean[];
    problem text;
BEGIN
    -- Slots become tasks' run_at, so as_of keeps to the times a task may have
    -- (an infinite one would also send the cron evaluator past its range).
    problem := ledgerq.run_at_problem(due_by, 'as_of');
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;

    -- The dispatcher asks every second and the answer is almost always "no".
    -- The earliest cursor is one step down the partial index whatever the
    -- table holds (min() over an index needs no parameter, so no generic plan
    -- can turn it into a scan), and it spares that answer the planning of the
    -- statement below.
    SELECT min(s.next_slot) INTO earliest FROM ledgerq.task_schedules s WHERE NOT s.paused;
    IF earliest IS NULL OR earliest > due_by THEN
        RETURN;
    END IF;

    WITH due AS (
        -- SKIP LOCKED: rows another caller is firing are its job; waiting for
        -- them would only find them handled. A row that caller committed in
        -- the meantime is re-read and re-checked here (READ COMMITTED), and
        -- its new cursor is no longer due.
        SELECT s.name, s.cron, s.spec, s.timezone, s.catch_up, s.next_slot, s.overlap, s.last_task_id,
               s.task_type, s.payload, s.queue, s.priority, s.max_attempts
        FROM ledgerq.task_schedules s
        WHERE NOT s.paused AND s.next_slot <= due_by
        FOR UPDATE SKIP LOCKED
    ), planned AS (
        -- Plan once per distinct (expression, zone, catch_up, cursor): ten
        -- thousand hourly schedules due at the same slot need one evaluation.
        -- Grouped by the expression's text, whose parse the spec column is:
        -- the same groups, and text sorts in about two thirds of the time a
        -- composite takes (record comparison goes field by field).
        SELECT n.name, p.slots, p.following
        FROM (SELECT d.cron, d.timezone, d.catch_up, d.next_slot,
                     (array_agg(d.spec))[1] AS spec, array_agg(d.name) AS names
              FROM due d
              GROUP BY d.cron, d.timezone, d.catch_up, d.next_slot) g
        CROSS JOIN LATERAL ledgerq.schedule_plan(g.spec, g.timezone, g.catch_up, g.next_slot, due_by) p
        CROSS JOIN LATERAL unnest(g.names) AS n(name)
    ), slots AS (
        -- The tasks table may hold millions of rows: both lookups are
        -- correlated subqueries, one index probe per slot, never a join
        -- the planner could turn into a scan of the whole table.
        SELECT d.name, d.overlap, d.task_type, d.payload, d.queue, d.priority, d.max_attempts,
               p.following, u.slot, u.ord, k.key,
               CASE WHEN NOT d.overlap AND d.last_task_id IS NOT NULL THEN
                   (SELECT prev.status FROM ledgerq.tasks prev WHERE prev.id = d.last_task_id)
               END AS previous_status,  -- NULL: none, or pruned (it was final)
               (SELECT held.id FROM ledgerq.tasks held
                WHERE held.idempotency_key = k.key AND held.idempotency_key IS NOT NULL) AS held_id
        FROM due d
        JOIN planned p ON p.name = d.name
        CROSS JOIN LATERAL unnest(p.slots) WITH ORDINALITY AS u(slot, ord)
        CROSS JOIN LATERAL (
            SELECT 'schedule:' || d.name || ':'
                   || to_char(u.slot AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS key
        ) k
    ), fates AS MATERIALIZED (  -- each fate decided once, however often it is read
        SELECT s.*,
               CASE
                   WHEN NOT s.overlap
                        AND (s.ord > 1 OR s.previous_status NOT IN ('SUCCEEDED', 'DEAD', 'CANCELLED'))
                       THEN 'overlap'
                   WHEN s.held_id IS NOT NULL THEN 'exists'
                   ELSE 'enqueue'
               END AS fate
        FROM slots s
    ), numbered AS (
        SELECT f.*,
               CASE WHEN f.fate = 'enqueue' THEN
                   count(*) FILTER (WHERE f.fate = 'enqueue') OVER (ORDER BY f.name, f.slot)
               END::integer AS batch_pos
        FROM fates f
    )
    -- A sorted subquery feeding the aggregates with no join between keeps its
    -- order (enqueue_tasks relies on the same): every array, and the batch,
    -- follow (name, slot), the order batch_pos counted in, without a sort per
    -- aggregate.
    SELECT array_agg(x.name), array_agg(x.slot), array_agg(x.fate), array_agg(x.held_id),
           array_agg(x.batch_pos), array_agg(x.following),
           -- queue and max_attempts always explicit: enqueue's own defaults
           -- (the task type's registered ones) must not override a schedule.
           -- Built as json text and parsed once: about 15% cheaper than
           -- assembling a jsonb value per slot.
           (json_agg(json_build_object(
                   'task_type', x.task_type, 'payload', x.payload, 'queue', x.queue,
                   'priority', x.priority, 'run_at', x.slot, 'max_attempts', x.max_attempts,
                   'idempotency_key', x.key)) FILTER (WHERE x.fate = 'enqueue'))::jsonb
    INTO slot_names, slot_times, slot_fates, slot_held_ids, slot_batch_pos, slot_following, batch
    FROM (SELECT * FROM numbered n ORDER BY n.name, n.slot) x;

    IF slot_names IS NULL THEN
        RETURN;  -- nothing due
    END IF;

    IF batch IS NOT NULL THEN
        SELECT array_agg(e.id ORDER BY e.ord), array_agg(e.created ORDER BY e.ord)
        INTO batch_ids, batch_created
        FROM ledgerq.enqueue_tasks(tasks => batch) WITH ORDINALITY AS e(id, created, ord);
    END IF;

    RETURN QUERY
    WITH per_slot AS (
        SELECT u.name, u.slot, u.fate, u.following,
               coalesce(u.held_id, batch_ids[u.batch_pos]) AS task_id,
               coalesce(batch_created[u.batch_pos], false) AS created
        FROM unnest(slot_names, slot_times, slot_fates, slot_held_ids, slot_batch_pos, slot_following)
             AS u(name, slot, fate, held_id, batch_pos, following)
    ), per_schedule AS (
        SELECT p.name,
               (count(*) FILTER (WHERE p.created))::integer AS enqueued,
               (count(*) FILTER (WHERE p.fate <> 'overlap' AND NOT p.created))::integer AS already_enqueued,
               (count(*) FILTER (WHERE p.fate = 'overlap'))::integer AS skipped_overlap,
               max(p.slot) FILTER (WHERE p.fate <> 'overlap') AS fired_slot,
               (array_agg(p.task_id ORDER BY p.slot DESC) FILTER (WHERE p.fate <> 'overlap'))[1] AS fired_task_id,
               max(p.following) AS following
        FROM per_slot p
        GROUP BY p.name
    ), moved AS (
        UPDATE ledgerq.task_schedules s
        SET next_slot = ps.following,
            last_slot = coalesce(ps.fired_slot, s.last_slot),
            last_task_id = CASE WHEN ps.fired_slot IS NULL THEN s.last_task_id ELSE ps.fired_task_id END
        FROM per_schedule ps
        WHERE s.name = ps.name
        RETURNING s.name, s.task_type, s.queue, s.last_slot, s.next_slot
    )
    SELECT m.name, m.task_type, m.queue, ps.enqueued, ps.already_enqueued, ps.skipped_overlap,
           m.last_slot, m.next_slot
    FROM moved m
    JOIN per_schedule ps ON ps.name = m.name;
END;
$$;

-- Enqueue every due slot of every active schedule, exactly once per slot;
-- returns how many tasks it created. Safe from any number of connections at
-- once and from pg_cron.
CREATE OR REPLACE FUNCTION ledgerq.run_schedules(as_of timestamptz DEFAULT now()) RETURNS integer
LANGUAGE sql AS $$
    SELECT coalesce(sum(f.enqueued), 0)::integer FROM ledgerq.schedule_fire(as_of => run_schedules.as_of) f
$$;

-- value when the ledger may hand it out (run_at_problem, validate.sql, finds
-- nothing), else NULL: for a schedule's next slot, which the ledger computes
-- rather than takes, past the end of year 9999 means "none". (Here, not in
-- validate.sql: the view below needs it to exist, and files apply in name order.)
CREATE OR REPLACE FUNCTION ledgerq.time_or_null(value timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN ledgerq.run_at_problem(value) IS NULL THEN value END
$$;

-- The first slot of schedule `name` strictly after `after` by its expression
-- and time zone (whether or not it is paused, and whatever its cursor), or
-- NULL for an unknown name. Like every time the ledger hands out, `after` and
-- the answer stay within years 1 to 9999 UTC (run_at_problem): a bad `after`
-- is LQ422 naming it, and a slot past the end of year 9999 is NULL (none).
CREATE OR REPLACE FUNCTION ledgerq.schedule_next_slot(name text, after timestamptz DEFAULT now())
RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    problem text := ledgerq.run_at_problem(schedule_next_slot.after, 'after');
    slot timestamptz;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = problem;
    END IF;
    SELECT ledgerq.cron_next(s.spec, s.timezone, schedule_next_slot.after) INTO slot
    FROM ledgerq.task_schedules s
    WHERE s.name = schedule_next_slot.name;
    RETURN ledgerq.time_or_null(slot);
END;
$$;

-- next_run_at: the run_at of the next task the schedule will enqueue (unless
-- overlap skips it). Normally the cursor, a future slot, read without
-- evaluating anything; while slots are due and not yet fired (nothing called
-- run_schedules since), the first slot the next call will fire, which may be
-- in the past. NULL while paused, and when the next slot would fall after
-- year 9999 (a schedule fired at the end of time has no next slot anyone
-- could read).
CREATE OR REPLACE VIEW ledgerq.schedules AS
SELECT s.name, s.cron, s.timezone, s.task_type, s.queue, s.paused,
       ledgerq.time_or_null(CASE
           WHEN s.paused THEN NULL
           WHEN s.next_slot > now() THEN s.next_slot
           ELSE (ledgerq.schedule_plan(s.spec, s.timezone, s.catch_up, s.next_slot, now())).slots[1]
       END) AS next_run_at,
       s.last_slot, s.last_task_id
FROM ledgerq.task_schedules s;
