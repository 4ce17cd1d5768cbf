-- name: schema_prepare
-- Create the schema and its migration ledger if they do not exist yet.
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: schema_lock
-- Serialise concurrent migrators of one schema for the rest of the transaction.
SELECT pg_advisory_xact_lock(hashtext('pgdurable.migrate'), hashtext(%(schema)s));

-- name: schema_version
-- The newest applied migration, 0 when the ledger is missing or empty.
SELECT CASE WHEN to_regclass(%(ledger)s) IS NULL THEN 0
            ELSE (SELECT COALESCE(max(version), 0) FROM {schema}.migrations) END AS version;

-- name: schema_record
-- Record one applied migration.
INSERT INTO {schema}.migrations (version, name) VALUES (%(version)s, %(name)s);
