-- pgdurable schema, version 2: concurrency gate slots and rate-limit token buckets.

-- One row per (concurrency key, shard) of a configured gate: free slots. A row holding a
-- slot is executing with concurrency_shard = shard; the CHECK makes over-admission
-- uncommittable.
CREATE TABLE {schema}.gate_slots (
    key        text     NOT NULL,
    shard      smallint NOT NULL,
    capacity   integer  NOT NULL CHECK (capacity >= 0),
    available  integer  NOT NULL,
    PRIMARY KEY (key, shard),
    CHECK (available >= 0 AND available <= capacity)
);

-- One row per (rate key, shard): a token bucket refilled lazily at `rate` tokens/s up to
-- `capacity`. Created on first use, pruned by GC once full and idle.
CREATE TABLE {schema}.rate_buckets (
    key          text             NOT NULL,
    shard        smallint         NOT NULL,
    capacity     double precision NOT NULL CHECK (capacity > 0),
    rate         double precision NOT NULL CHECK (rate >= 0),
    available    double precision NOT NULL,
    last_refill  timestamptz      NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (key, shard),
    CHECK (available >= -1e-9 AND available <= capacity + 1e-9)
);

-- Holders of a gate's slots, for credits and reconciliation.
CREATE INDEX instances_gate_holders ON {schema}.instances (concurrency_key, concurrency_shard)
    WHERE status = 'executing' AND concurrency_shard IS NOT NULL;
