-- pgdurable schema, version 3: plans and per-row costs of the hot path.

-- The lease index covers executing rows, and every executing row has a lease. Its predicate
-- says so: a statement that names only `status = 'executing'` (the ownership guards of
-- every flush, which find their rows by primary key) can no longer be planned as a scan
-- of this index, whose dead entries pile up between two vacuums under a busy queue. Scans
-- that want executing rows (reaper, reclaim) name `lease_expires_at IS NOT NULL` too.
DROP INDEX {schema}.instances_lease;
CREATE INDEX instances_lease ON {schema}.instances (lease_expires_at)
    WHERE status = 'executing' AND lease_expires_at IS NOT NULL;

-- Children are only ever inserted by the statement that holds their parent locked, so the
-- foreign key on parent_id guarded nothing, while costing a trigger event per inserted
-- row and a lookup per deleted one. A child may now outlive its parent's row (GC deletes a
-- finished parent once its children no longer need it); its parent_id then names an id
-- that no longer exists, which nothing reads.
ALTER TABLE {schema}.instances DROP CONSTRAINT instances_parent_id_fkey;

-- A key's scope defaults to the live statuses, as the inserts have always filled it in; a
-- batch whose rows keep every default can then leave the column out of its COPY.
ALTER TABLE {schema}.instances
    ALTER COLUMN correlation_scope SET DEFAULT '{runnable,executing,awaiting_signal,awaiting_children,held}';
