-- Schedules: periodic tasks that fire exactly once per slot. The functions
-- (schedule_task, run_schedules, the cron evaluator, the `schedules` view)
-- live in sql/functions/cron.sql and sql/functions/schedule.sql; this file
-- holds only what they store.
--
-- A schedule row keeps its cron expression twice: as the user wrote it
-- (`cron`, shown back to operators) and parsed (`spec`), so run_schedules,
-- which the dispatcher calls every second, never parses text. It also keeps a
-- cursor, `next_slot`: the earliest slot that may still fire. Everything
-- before it has been fired, skipped, or lies before the schedule was created,
-- so "which schedules are due" is one range scan of a small partial index and
-- costs nothing when nothing is due, however many schedules there are.

-- A parsed cron expression. Five-field expressions are bitmasks (bit n set:
-- value n allowed), so testing a value is one shift and finding the next
-- allowed one is a little bit arithmetic, with no array scans. `@every` is a
-- period in seconds; the masks are then 0 (and every_seconds is 0 for a
-- five-field expression), so no field is ever NULL and two specs compare equal
-- exactly when they fire at the same slots.
CREATE TYPE ledgerq.cron_spec AS (
    every_seconds    bigint,   -- @every: the period, slots at its multiples since the Unix epoch
    minutes          bigint,   -- bits 0-59
    hours            bigint,   -- bits 0-23
    days             bigint,   -- bits 1-31, day of month
    months           bigint,   -- bits 1-12
    weekdays         bigint,   -- bits 0-6, 0 = Sunday
    -- Both day fields restricted (neither starts with '*'): a day matches if
    -- EITHER matches, as in Vixie cron; otherwise both must.
    days_or_weekdays boolean
);

-- The table behind the `schedules` view (the view is the public face).
CREATE TABLE ledgerq.task_schedules (
    name          text             PRIMARY KEY,
    cron          text             NOT NULL,
    spec          ledgerq.cron_spec NOT NULL,
    timezone      text             NOT NULL,
    task_type     text             NOT NULL,
    payload       jsonb            NOT NULL DEFAULT '{}',
    queue         text             NOT NULL,
    priority      integer          NOT NULL DEFAULT 0,
    max_attempts  integer          NOT NULL DEFAULT 5,
    overlap       boolean          NOT NULL DEFAULT true,
    catch_up      interval         NOT NULL DEFAULT '0',
    paused        boolean          NOT NULL DEFAULT false,
    -- The earliest slot that may still fire: run_schedules fires slots at or
    -- after it and moves it past what it handled.
    next_slot     timestamptz      NOT NULL,
    -- The latest slot that produced a task, and that task. No foreign key:
    -- pruning deletes finished tasks, and a task that is gone was final.
    last_slot     timestamptz,
    last_task_id  bigint,
    created_at    timestamptz      NOT NULL DEFAULT now(),
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT task_schedules_name_valid CHECK (btrim(name) <> '' AND length(name) <= 200),
    CONSTRAINT task_schedules_type_not_blank CHECK (btrim(task_type) <> ''),
    CONSTRAINT task_schedules_queue_not_blank CHECK (btrim(queue) <> ''),
    CONSTRAINT task_schedules_payload_is_object CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT task_schedules_priority_range CHECK (priority BETWEEN -32768 AND 32767),
    CONSTRAINT task_schedules_max_attempts_positive CHECK (max_attempts >= 1),
    CONSTRAINT task_schedules_catch_up_not_negative CHECK (catch_up >= interval '0'),
    -- A slot at or before last_slot never fires again, even once its task is
    -- pruned and its idempotency key is free.
    CONSTRAINT task_schedules_cursor_after_last_slot CHECK (last_slot IS NULL OR next_slot > last_slot),
    CONSTRAINT task_schedules_last_task_with_slot CHECK ((last_slot IS NULL) = (last_task_id IS NULL))
);

-- run_schedules: the due, active schedules. Partial, so paused ones cost
-- nothing; with nothing due the scan returns no row at once.
CREATE INDEX task_schedules_due_idx ON ledgerq.task_schedules (next_slot) WHERE NOT paused;
