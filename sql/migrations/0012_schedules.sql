-- pgdurable schema: cron schedules (docs/schedules.md). A schedule inserts an instance of
-- its machine at each occurrence of its cron expression, in its time zone. The maintenance
-- process of every supervisor fires them; each occurrence is fired exactly once because
-- the fire locks the schedule row (FOR UPDATE SKIP LOCKED), advances next_fire_at under a
-- guard on its old value, and inserts the occurrence under a correlation key reserved in
-- every status — all in one transaction.

CREATE TABLE {schema}.schedules (
    name             text        PRIMARY KEY,
    -- the machine an occurrence inserts (by name: its newest registered version)
    fsm              text        NOT NULL,
    -- 5 fields (minute hour day month weekday, names and @aliases), or 6 with a leading
    -- seconds field; evaluated in `timezone`
    cron             text        NOT NULL,
    timezone         text        NOT NULL DEFAULT 'UTC',
    state            jsonb       NOT NULL DEFAULT '{}',
    -- NULL: the machine's queue
    queue            text,
    priority         smallint    NOT NULL DEFAULT 0,
    -- several occurrences due at once (the fleet was down): 'skip' fires the latest only,
    -- 'catch_up' the latest catch_up_limit of them
    missed           text        NOT NULL DEFAULT 'skip' CHECK (missed IN ('skip', 'catch_up')),
    catch_up_limit   integer     NOT NULL DEFAULT 10 CHECK (catch_up_limit >= 1),
    -- the previous run still live: 'allow' fires anyway, 'skip' does not fire, 'cancel'
    -- cancels it and fires
    overlap          text        NOT NULL DEFAULT 'allow' CHECK (overlap IN ('allow', 'skip', 'cancel')),
    enabled          boolean     NOT NULL DEFAULT true,
    -- the next occurrence to fire; NULL: to be computed (by the next cron pass)
    next_fire_at     timestamptz,
    -- the occurrence fired last, and its instance (the previous run, for `overlap`)
    last_fire_at     timestamptz,
    last_instance_id bigint,
    fires            bigint      NOT NULL DEFAULT 0,
    -- occurrences not fired: dropped by `missed`, or by `overlap` = 'skip'
    skipped          bigint      NOT NULL DEFAULT 0,
    -- why the last occurrence did not fire (a machine no supervisor registered, a cron
    -- expression or time zone that no longer parses); cleared by the next fire
    last_error       text,
    last_error_at    timestamptz,
    -- 'code': declared with @schedule and registered by the supervisors; 'api': created
    -- by a client or the command line
    source           text        NOT NULL DEFAULT 'api' CHECK (source IN ('code', 'api')),
    -- the declaration in code as last registered; a field follows the code only when the
    -- code's declaration of that field changes, so an operator's run-time change (disable
    -- included) outlives restarts of the same code
    declared         jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- The cron pass: due schedules in fire order, and the earliest next fire to sleep until.
CREATE INDEX schedules_due ON {schema}.schedules (next_fire_at) WHERE enabled;

-- The channel the cron pass LISTENs on: a change of a schedule wakes it (the payload is
-- the schedule's name). Not a queue's channel: those are 'pgdurable_' and 24 hex digits.
CREATE FUNCTION {schema}.schedule_channel() RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT 'pgdurable_s_' || left(md5({schema_literal}), 24) $$;
