-- queue_stats: task counts per queue and status, and the earliest run_at.
CREATE OR REPLACE VIEW ledgerq.queue_stats AS
SELECT t.queue, t.status, count(*) AS count, min(t.run_at) AS oldest_run_at
FROM ledgerq.tasks t
GROUP BY t.queue, t.status;
