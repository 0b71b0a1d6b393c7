-- Task types known to the ledger: workers announce themselves and the task
-- types they serve when they start, and keep that announcement alive while
-- they run. The ledger then knows
--   * each registered type's queue and max_attempts, and applies them as the
--     defaults of every enqueue (SQL, HTTP, CLI, clients) that gives none;
--   * whether some live worker serves a type, so a worker without a handler
--     can tell a rolling deploy (hand the task back) from a type nobody
--     serves (the task goes DEAD).
-- The functions that write these tables live in sql/functions/types.sql.

-- One row per worker process that ever registered; last_seen_at is renewed
-- while it runs, stopped_at is set by a graceful stop. A worker counts as
-- alive while it is not stopped and was seen within the liveness window.
CREATE TABLE ledgerq.workers (
    worker_id    text        PRIMARY KEY,
    queues       text[]      NOT NULL,
    task_types   text[]      NOT NULL,
    concurrency  integer     NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz,
    CONSTRAINT workers_id_not_blank CHECK (btrim(worker_id) <> ''),
    CONSTRAINT workers_concurrency_positive CHECK (concurrency >= 1)
);
-- "Who was seen lately": the dashboard and the liveness counts.
CREATE INDEX workers_last_seen_idx ON ledgerq.workers (last_seen_at);

-- The defaults enqueue applies, one row per task type. The latest
-- registration of a type wins, and it outlives the worker that made it: a task
-- enqueued while every worker is restarting still lands on its type's queue.
CREATE TABLE ledgerq.task_type_defaults (
    task_type       text             PRIMARY KEY,
    queue           text             NOT NULL,
    max_attempts    integer          NOT NULL,
    timeout_seconds double precision,
    registered_at   timestamptz      NOT NULL DEFAULT now(),
    registered_by   text             NOT NULL,
    CONSTRAINT task_type_defaults_queue_not_blank CHECK (btrim(queue) <> ''),
    CONSTRAINT task_type_defaults_max_attempts_positive CHECK (max_attempts >= 1),
    CONSTRAINT task_type_defaults_timeout_positive CHECK (timeout_seconds IS NULL OR timeout_seconds > 0)
);
