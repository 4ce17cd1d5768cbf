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

-- name: schema_ledger_exists
-- Whether the migration ledger exists (a never-migrated schema has none).
SELECT to_regclass(%(ledger)s) IS NOT NULL AS present;

-- name: schema_version
-- The newest applied migration (0 when the ledger is empty).
SELECT COALESCE(max(version), 0) AS version FROM {schema}.migrations;

-- name: schema_record
-- Record one applied migration.
INSERT INTO {schema}.migrations (version, name) VALUES (%(version)s, %(name)s);
