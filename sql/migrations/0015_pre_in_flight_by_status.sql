-- A queue's max_running counts its RUNNING tasks at every claim. Ordered by
-- (queue, concurrency_key, status), the index made that count read every QUEUED
-- entry of the queue too (status was only a filter after the key), and far from
-- the limit the dispatcher may hand thousands of a queue's ids to Redis at once.
-- By (queue, status, concurrency_key) the count reads the RUNNING entries only,
-- and a key's count still seeks straight to (queue, status, key). In flight
-- means QUEUED or RUNNING: the index stays as small as before.
DROP INDEX ledgerq.tasks_in_flight_idx;
CREATE INDEX tasks_in_flight_idx ON ledgerq.tasks (queue, status, concurrency_key)
    WHERE status IN ('QUEUED', 'RUNNING');
