-- cancel_task / retry_task: deliberate operator actions.

-- PENDING/QUEUED -> CANCELLED at once. RUNNING -> cancellation requested: the
-- worker learns it at its next heartbeat, and the attempt then ends CANCELLED
-- unless it had already succeeded. A final task is left as it is. Returns the
-- resulting status (RUNNING while a requested cancellation is pending).
CREATE OR REPLACE FUNCTION ledgerq.cancel_task(task_id bigint) RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_status text;
BEGIN
    UPDATE ledgerq.tasks t
    SET status = CASE WHEN t.status = 'RUNNING' THEN 'RUNNING' ELSE 'CANCELLED' END,
        cancel_requested = (t.status = 'RUNNING'),
        waiting_on = NULL,
        finished_at = CASE WHEN t.status = 'RUNNING' THEN NULL ELSE now() END,
        queued_at = NULL
    WHERE t.id = cancel_task.task_id AND t.status IN ('PENDING', 'QUEUED', 'RUNNING')
    RETURNING t.status INTO new_status;
    IF new_status = 'CANCELLED' THEN
        PERFORM ledgerq.flow_after_release(ARRAY[cancel_task.task_id]);
    END IF;
    IF new_status IS NULL THEN
        SELECT t.status INTO new_status FROM ledgerq.tasks t WHERE t.id = cancel_task.task_id;
        IF new_status IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'LQ404', MESSAGE = format('task %s does not exist', task_id);
        END IF;
    END IF;
    RETURN new_status;
END;
$$;

-- DEAD/CANCELLED -> PENDING with a fresh attempt budget. The attempt history
-- is kept and attempt numbers continue, so fencing still holds.
CREATE OR REPLACE FUNCTION ledgerq.retry_task(task_id bigint) RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    current_status text;
BEGIN
    SELECT t.status INTO current_status FROM ledgerq.tasks t
    WHERE t.id = retry_task.task_id FOR UPDATE;
    IF current_status IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ404', MESSAGE = format('task %s does not exist', task_id);
    END IF;
    IF current_status NOT IN ('DEAD', 'CANCELLED') THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ409',
            MESSAGE = format('task %s is %s; only DEAD or CANCELLED tasks can be retried', task_id, current_status);
    END IF;
    UPDATE ledgerq.tasks t
    SET status = 'PENDING', budget_start = t.attempts, run_at = now(), finished_at = NULL,
        result = NULL
    WHERE t.id = retry_task.task_id;
    PERFORM pg_notify('ledgerq_tasks', '');
    RETURN 'PENDING';
END;
$$;
