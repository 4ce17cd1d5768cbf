-- pgdurable schema, version 1: instances, their inboxes, and the indexes the hot path needs.
-- The marker {schema} is replaced by the quoted schema name when the file is rendered.

CREATE TABLE {schema}.instances (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fsm               text        NOT NULL,
    -- NULL version/step: inserted by name from a producer that does not know the machine;
    -- the first worker to claim it pins the newest version it knows and its initial step.
    version           integer,
    step              text,
    state             jsonb       NOT NULL DEFAULT '{}',
    status            text        NOT NULL DEFAULT 'runnable'
        CHECK (status IN ('runnable', 'executing', 'awaiting_signal', 'awaiting_children',
                          'held', 'done', 'failed', 'cancelled')),
    queue             text        NOT NULL DEFAULT 'default',
    priority          smallint    NOT NULL DEFAULT 0,
    eligible_at       timestamptz NOT NULL DEFAULT now(),
    attempt           integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    crashes           integer     NOT NULL DEFAULT 0 CHECK (crashes >= 0),
    -- ownership: worker id plus a fencing token that is new on every claim
    locked_by         text,
    lease_token       bigint,
    lease_expires_at  timestamptz,
    -- signals
    awaits            text[],
    await_deadline    timestamptz,
    -- children
    parent_id         bigint REFERENCES {schema}.instances (id) ON DELETE SET NULL,
    children_pending  integer     NOT NULL DEFAULT 0,
    -- identity: the key counts as occupied while status is one of correlation_scope
    correlation_key   text,
    correlation_scope text[]      NOT NULL DEFAULT '{}',
    correlation_guard text GENERATED ALWAYS AS (
        CASE WHEN correlation_key IS NOT NULL AND status = ANY (correlation_scope)
             THEN correlation_key END) STORED,
    -- limits
    concurrency_key   text,
    concurrency_name  text GENERATED ALWAYS AS (split_part(concurrency_key, ':', 1)) STORED,
    concurrency_shard smallint,
    rate_limit        text,
    weight            double precision NOT NULL DEFAULT 1 CHECK (weight > 0),
    -- outcome
    result            jsonb,
    last_error        text,
    inserted_at       timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- The pick: queue equality, priority then eligible_at; only runnable rows live here.
CREATE INDEX instances_pick ON {schema}.instances (queue, priority, eligible_at)
    WHERE status = 'runnable';
-- The reaper: expired leases of executing rows.
CREATE INDEX instances_lease ON {schema}.instances (lease_expires_at)
    WHERE status = 'executing';
-- Await timeouts.
CREATE INDEX instances_await_deadline ON {schema}.instances (await_deadline)
    WHERE status = 'awaiting_signal' AND await_deadline IS NOT NULL;
-- Mutual exclusion for unconfigured concurrency keys: a second executing row per key
-- cannot commit. Rows admitted through a configured gate carry a shard and are exempt.
CREATE UNIQUE INDEX instances_concurrency_active ON {schema}.instances (concurrency_key)
    WHERE status = 'executing' AND concurrency_key IS NOT NULL AND concurrency_shard IS NULL;
-- Identity: insert dedup and signal addressing by key.
CREATE UNIQUE INDEX instances_correlation ON {schema}.instances (correlation_guard)
    WHERE correlation_guard IS NOT NULL;
-- Children of a parent (enrichment, join, GC guard).
CREATE INDEX instances_parent ON {schema}.instances (parent_id)
    WHERE parent_id IS NOT NULL;
-- GC: terminal rows by age.
CREATE INDEX instances_gc ON {schema}.instances (updated_at)
    WHERE status IN ('done', 'failed', 'cancelled');
-- Held rows (unknown machine, version or step), for operators and release on deploy.
CREATE INDEX instances_held ON {schema}.instances (fsm, version)
    WHERE status = 'held';

-- The durable inbox.
CREATE TABLE {schema}.signals (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target_id   bigint NOT NULL REFERENCES {schema}.instances (id) ON DELETE CASCADE,
    name        text   NOT NULL,
    payload     jsonb  NOT NULL DEFAULT '{}',
    dedup_key   text,
    inserted_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (target_id, dedup_key)
);
CREATE INDEX signals_target ON {schema}.signals (target_id, name);

-- Machines the workers know: lets a producer insert by name without naming version,
-- initial step or queue. Upserted by every worker at start.
CREATE TABLE {schema}.machines (
    name         text    NOT NULL,
    version      integer NOT NULL,
    initial_step text    NOT NULL,
    queue        text    NOT NULL,
    steps        text[]  NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- The NOTIFY channel of a queue: short, fixed length, unique per schema and queue.
CREATE FUNCTION {schema}.notify_channel(queue text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT 'pgdurable_' || left(md5({schema_literal} || '/' || queue), 24) $$;
