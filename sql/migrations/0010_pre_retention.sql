-- Retention and churn: the indexes pruning and the operators' reads need, and
-- storage settings that let vacuum keep up with a queue's churn.
--
-- Which updates can be HOT. A task row is written about four times in its
-- life: PENDING -> QUEUED (status, queued_at), QUEUED -> RUNNING (status,
-- attempts, worker_id, lease_expires_at, queued_at, started_at), heartbeats
-- while it runs (lease_expires_at only), and the final one (status,
-- finished_at, result or last_error, lease_expires_at). PostgreSQL makes an
-- update HOT (no new index entries, the old version pruned on its own page
-- without vacuum) only when no column that any index uses changes, and a
-- partial index's predicate counts. `status` is in the predicate of
-- tasks_dispatch_idx, tasks_queued_idx, tasks_dead_idx and of the running
-- index below, so every status change is a non-HOT update whatever we do,
-- short of dropping the dispatcher's index. What can be HOT is the heartbeat:
-- before this migration tasks_lease_idx was keyed on lease_expires_at, so
-- every heartbeat also inserted an index entry. reap_stuck needs "RUNNING and
-- lease expired"; RUNNING tasks are few (at most the fleet's concurrency), so
-- it reads them all through a partial index on a column that is stable while
-- a task runs (worker_id, which the dashboard's "running per worker" groups
-- by) and tests the lease on the row. Heartbeats now change no indexed column.
-- Measured (tests/sql/test_retention_plans.py): a heartbeat is 1 HOT update
-- of 1, a completion 0 of 1. In bench/churn_bench.py (2,000 tasks/s for 60 s,
-- 1% of tasks running 3.5 s under a 3 s lease) that moves the tasks table's
-- HOT share only from 0.0% to 0.5-1%: short tasks hardly heartbeat, and
-- every other update changes status. The attempts table: 57% -> 67-69%.
--
-- Fillfactor. A HOT update needs room on the row's own page. tasks: 70, so
-- the QUEUED and RUNNING versions, a few heartbeats and the final version of
-- a row written at enqueue can stay on its page, and page pruning reclaims
-- them without vacuum; the price is a table about 30% larger for the same
-- rows. attempts: an attempt row is inserted at the claim and updated once at
-- the end (finished_at, outcome, error: no index uses them), so 80 makes that
-- update HOT.
--
-- Autovacuum. At 2,000 tasks/s a queue leaves about 8,000 dead row versions
-- per second in tasks and 2,000 in attempts, while the table holds only what
-- retention keeps. The default trigger (20% of the table plus 50 rows) waits
-- for hundreds of thousands of dead rows on a table of a million, and the
-- default cost limit then throttles the vacuum that finally runs. Here: a
-- fixed trigger of 5,000 dead rows plus 1% of the table, no cost delay on
-- these two tables (their vacuum is the work that keeps the queue fast),
-- inserts trigger a vacuum too (so the visibility map stays fresh for the
-- index-only scans of GET /queues and the dashboard), and analyze follows the
-- same pace so the planner sees a queue's live statuses as they are. The
-- server's autovacuum_naptime (default 1 min) still bounds how often a
-- database is looked at: in the 60 s churn runs autovacuum never got to the
-- new database, before or after this migration (tasks peaked at 413,000
-- dead rows before it, 206,000 after it with the drain slowed by a loaded
-- machine). What bounds dead rows under that load is vacuuming as soon as
-- they pile up, which `ledgerq reaper` does (--vacuum-dead-rows, default
-- 50,000): peak 54,000 dead rows and a 21 MB heap instead of 64.5 MB. The
-- README's Retention section suggests autovacuum_naptime = 10s as well.

ALTER TABLE ledgerq.tasks SET (
    fillfactor = 70,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE ledgerq.attempts SET (
    fillfactor = 80,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- reap_stuck and the workers seen on the dashboard: RUNNING tasks, keyed on a
-- column no heartbeat changes (see above).
DROP INDEX ledgerq.tasks_lease_idx;
CREATE INDEX tasks_running_idx ON ledgerq.tasks (worker_id) WHERE status = 'RUNNING';

-- GET /tasks?queue= and ?type=: newest first by id, the cursor an id bound.
-- Every non-HOT update adds an entry with an unchanged key to these; b-tree
-- bottom-up deletion removes such versions before a page splits.
CREATE INDEX tasks_queue_id_idx ON ledgerq.tasks (queue, id);
CREATE INDEX tasks_type_id_idx ON ledgerq.tasks (task_type, id);

-- GET /queues and `ledgerq stats`: finished tasks counted by queue and status,
-- index-only. Few distinct keys, so deduplication keeps it small (about 7 MB
-- at 1,000,000 rows, against 250 MB of table). Partial: a task enters it
-- once, when it finishes. The live statuses are counted through their own
-- partial indexes. prune_tasks reads finished tasks oldest first through
-- tasks_finished_idx (migration 0007), and a small queue's through this one.
-- (An index on (queue, finished_at) was tried for queues with their own
-- retention: at 300,000 rows the planner preferred these two every time.)
CREATE INDEX tasks_queue_status_idx ON ledgerq.tasks (queue, status)
    WHERE finished_at IS NOT NULL;

-- prune_effects: the oldest effect records first.
CREATE INDEX effects_recorded_idx ON ledgerq.effects (recorded_at);
