-- pgdurable schema, version 14: a row without a correlation key stores no correlation scope.

-- The scope only matters for a row that has a key: correlation_guard is NULL without one,
-- whatever the scope. Every row used to carry the live statuses as its scope (the column's
-- default, 101 bytes of a plain job's 240), in each of the three versions a job writes
-- (insert, claim, outcome) and in the WAL of each. A keyless row now stores NULL; a keyed
-- row stores its scope as before (every insert path writes it explicitly). Rows inserted
-- before this version keep theirs: nothing reads the scope of a keyless row.
ALTER TABLE {schema}.instances ALTER COLUMN correlation_scope DROP NOT NULL;
ALTER TABLE {schema}.instances ALTER COLUMN correlation_scope DROP DEFAULT;

-- A keyed row without a scope would neither dedup nor be addressable by its key, silently:
-- refused instead. NOT VALID: the rows already there all have a scope, and checking them
-- would read the whole table.
ALTER TABLE {schema}.instances ADD CONSTRAINT instances_correlation_scope_check
    CHECK (correlation_key IS NULL OR correlation_scope IS NOT NULL) NOT VALID;
