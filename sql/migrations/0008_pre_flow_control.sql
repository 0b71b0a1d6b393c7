-- Flow control's durable state: a task's concurrency key, and one row per
-- configured queue holding its settings and its pause. A queue with no row has
-- no settings and is not paused, so unconfigured queues cost nothing.
-- (Settings are checked by configure_queue in sql/functions/; the constraints
-- here only make an impossible row impossible to store.)

ALTER TABLE ledgerq.tasks
    ADD COLUMN concurrency_key text,
    ADD CONSTRAINT tasks_concurrency_key_not_empty CHECK (concurrency_key <> '');

CREATE TABLE ledgerq.queues (
    queue      text        PRIMARY KEY,
    settings   jsonb       NOT NULL DEFAULT '{}',
    paused     boolean     NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queues_name_not_blank CHECK (btrim(queue) <> ''),
    CONSTRAINT queues_settings_is_object CHECK (jsonb_typeof(settings) = 'object')
);
