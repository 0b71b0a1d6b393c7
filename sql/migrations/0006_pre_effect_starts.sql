-- The start marks of ctx.once: an effect's start is committed before its
-- function runs, and the mark is removed when the effect is recorded (or its
-- function raised). A mark that outlives its attempt means that attempt was
-- lost between running the function and recording it: nobody knows whether
-- the effect happened. The next attempt sees the mark and applies its
-- on_unknown policy (run again, skip, or fail) instead of guessing silently.
CREATE TABLE ledgerq.effect_starts (
    effect_key text        PRIMARY KEY,
    task_id    bigint      REFERENCES ledgerq.tasks (id) ON DELETE SET NULL,
    attempt    integer     NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT effect_starts_key_not_empty CHECK (effect_key <> '')
);
CREATE INDEX effect_starts_task_idx ON ledgerq.effect_starts (task_id);
