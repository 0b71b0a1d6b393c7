-- Tasks parked on a limit or a pause wait in line too. In a queue with
-- max_running the dispatcher can hand out a task far down the line while the
-- tasks before it are parked, which moves the queue's frontier past all of
-- them; the head of the line is then the lowest parked turn, and flow_turn
-- finds it here. Only parked tasks of queues whose tasks carry keys.
CREATE INDEX tasks_parked_line_idx ON ledgerq.tasks (queue, turn)
    WHERE status = 'PENDING' AND waiting_on IS NOT NULL AND turn > 0;
