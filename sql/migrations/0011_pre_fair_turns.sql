-- Fair turns while the line waits in Redis.
--
-- A task's turn orders it among the due tasks of its priority (0009). A queue
-- without max_running has its whole backlog handed to Redis at once, so the
-- line a newcomer joins is mostly QUEUED tasks: the lowest QUEUED turn is its
-- head, and a key's last QUEUED turn is where that key's next task goes after.
-- Both indexes hold only QUEUED tasks of queues whose tasks carry keys (turn
-- above 0), so queues without keys never write them.
CREATE INDEX tasks_line_head_idx ON ledgerq.tasks (queue, turn)
    WHERE status = 'QUEUED' AND turn > 0;
CREATE INDEX tasks_line_key_idx ON ledgerq.tasks (queue, concurrency_key, turn)
    WHERE status = 'QUEUED' AND turn > 0;

