-- Waiting for a task to finish (client.wait, GET /tasks/{id}?wait=S) is woken
-- by the ledger, not by polling: every transition into a final status sends
-- the task's id on the channel ledgerq_final, delivered when the transition
-- commits.
--
-- A row trigger with a WHEN clause, not a statement trigger with transition
-- tables: the WHEN is checked as each row is updated and the function runs
-- only for the rows that became final, while transition tables would copy
-- every row of every update (claims, heartbeats, dispatch) for nothing.
CREATE OR REPLACE FUNCTION ledgerq.task_final_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ledgerq_final', NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_final_notify
    AFTER UPDATE OF status ON ledgerq.tasks
    FOR EACH ROW
    WHEN (NEW.status IN ('SUCCEEDED', 'DEAD', 'CANCELLED') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION ledgerq.task_final_notify();
