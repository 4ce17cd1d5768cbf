-- pgdurable schema, version 5: the history of step attempts; the traceback of an
-- instance's last error.

-- One row per finished step attempt, written by the group commit that stores the attempt's
-- outcome (history_insert_many, in the same transaction, only for the rows its ownership
-- guard let through) and deleted with its instance by GC (gc_delete_ids). Rows are only
-- ever inserted, read per instance and deleted per instance, so the one index is by
-- instance: no primary key, no identity column to draw from on every insert. No foreign
-- key either: a trigger event per inserted row on the hot path, where GC collects the
-- rows in its delete statement, set-based (measured in docs/performance.md).
CREATE TABLE {schema}.history (
    instance_id bigint           NOT NULL,
    fsm         text             NOT NULL,
    -- NULL: a held row whose version was never pinned (inserted by name)
    version     integer,
    -- the step that ran (NULL: a held row inserted by name, its step unknown here)
    step        text,
    attempt     integer          NOT NULL,
    -- next | retry | await | spawn | done | stop | hold
    outcome     text             NOT NULL,
    -- where the instance goes: the next step (next, await, spawn), the same one (retry)
    next_step   text,
    started_at  timestamptz      NOT NULL,
    finished_at timestamptz      NOT NULL,
    -- seconds, from the worker's monotonic clock (finished_at - started_at is wall time)
    duration    double precision NOT NULL,
    worker      text             NOT NULL,
    -- the outcome's error (Retry's, Stop's reason, a hold's reason), else the exception
    -- the step raised
    error       text,
    -- when the step raised: the formatted exception, its last 16,384 characters
    traceback   text
);
CREATE INDEX history_instance ON {schema}.history (instance_id, started_at);

-- The traceback of the error in last_error, when a step raised it (bounded as above);
-- cleared whenever last_error is set without one.
ALTER TABLE {schema}.instances ADD COLUMN last_traceback text;
