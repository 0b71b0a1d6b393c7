-- The operators' dashboard reads what finished lately (throughput per minute
-- over the last hour, finished counts by status, the workers that finished
-- attempts in the last minutes) without scanning the tasks table: an index on
-- finished_at, carrying queue and status so those reads are index-only.
-- Partial: tasks still in flight have no finished_at and cost it nothing.
CREATE INDEX tasks_finished_idx ON ledgerq.tasks (finished_at) INCLUDE (queue, status)
    WHERE finished_at IS NOT NULL;
