-- Flow control's enforcement state (the functions are in sql/functions/limits.sql):
--   * a task's turn: its place among the due tasks of its priority, so that
--     concurrency keys take turns (fairness) instead of running in creation order;
--   * waiting_on: why a PENDING task is parked (a limit or a pause it cannot pass
--     now). Parked tasks are out of the dispatcher's index, so nothing spins on
--     them; the event that lifts the limit wakes them (waiting_on back to NULL);
--   * each queue's turn frontier, and the token buckets of the rate limits.

ALTER TABLE ledgerq.tasks
    ADD COLUMN turn bigint NOT NULL DEFAULT 0,
    ADD COLUMN waiting_on text,
    ADD CONSTRAINT tasks_waiting_on_valid CHECK (waiting_on IN (
        'paused', 'max_running', 'per_key_max_running', 'rate_per_second',
        'per_key_rate_per_second', 'retry_rate_per_second')),
    ADD CONSTRAINT tasks_waiting_only_while_pending CHECK (waiting_on IS NULL OR status = 'PENDING');

-- The dispatcher's hot query: ready PENDING tasks by priority, turn, run_at,
-- creation. Parked tasks are not in it.
DROP INDEX ledgerq.tasks_dispatch_idx;
CREATE INDEX tasks_dispatch_idx ON ledgerq.tasks (priority DESC, turn, run_at, id)
    WHERE status = 'PENDING' AND waiting_on IS NULL;

-- Every PENDING task by queue and key: a key's last waiting turn (enqueue),
-- and the per-queue counts of the metrics.
CREATE INDEX tasks_pending_key_idx ON ledgerq.tasks (queue, concurrency_key, turn)
    WHERE status = 'PENDING';

-- What is in flight per queue and key: the concurrency limits count these.
CREATE INDEX tasks_in_flight_idx ON ledgerq.tasks (queue, concurrency_key, status)
    WHERE status IN ('QUEUED', 'RUNNING');

-- Parked tasks, in the order they are woken: by queue, and by key.
CREATE INDEX tasks_parked_idx ON ledgerq.tasks (queue, waiting_on, priority DESC, turn, id)
    WHERE status = 'PENDING' AND waiting_on IS NOT NULL;
CREATE INDEX tasks_parked_key_idx
    ON ledgerq.tasks (queue, concurrency_key, waiting_on, priority DESC, turn, id)
    WHERE status = 'PENDING' AND waiting_on IS NOT NULL AND concurrency_key IS NOT NULL;

-- A queue's turn frontier: the highest turn the dispatcher has handed out.
-- A task that joins the line starts there, not behind a backlog it never saw.
-- No row: frontier 0 (a queue whose tasks carry no keys never gets one).
CREATE TABLE ledgerq.flow_turns (
    queue    text   PRIMARY KEY,
    frontier bigint NOT NULL DEFAULT 0
);

-- The token buckets of the rate limits: one per queue ('queue'), per retried
-- attempts of a queue ('retry'), and per concurrency key of a queue ('key').
-- wake_at: when the next token falls due while tasks wait on this bucket.
CREATE TABLE ledgerq.flow_buckets (
    queue           text             NOT NULL,
    bucket          text             NOT NULL,
    concurrency_key text             NOT NULL DEFAULT '',
    tokens          double precision NOT NULL,
    refilled_at     timestamptz      NOT NULL,
    wake_at         timestamptz,
    PRIMARY KEY (queue, bucket, concurrency_key),
    CONSTRAINT flow_buckets_kind_valid CHECK (bucket IN ('queue', 'retry', 'key'))
);
CREATE INDEX flow_buckets_wake_idx ON ledgerq.flow_buckets (wake_at) WHERE wake_at IS NOT NULL;
