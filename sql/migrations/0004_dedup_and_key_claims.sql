-- pgdurable schema, version 4: signal dedup keys outlive consumption; keyed claims
-- serialise per key instead of colliding on the arbiter index.

-- Every dedup key ever delivered to an instance, consumed or not, for as long as the
-- instance's row exists: delivery inserts the key here (ON CONFLICT DO NOTHING is the
-- duplicate test), consumption never touches it, and GC deletes an instance's keys with
-- the instance (gc_delete_ids). No foreign key: GC collects the keys in the same statement,
-- set-based, instead of a cascade trigger per deleted instance. A key table, not consumed
-- rows kept in `signals`, so the inbox reads, the await recheck and consumption stay as
-- they were (see docs/findings.md).
CREATE TABLE {schema}.signal_dedup (
    target_id bigint NOT NULL,
    dedup_key text   NOT NULL,
    PRIMARY KEY (target_id, dedup_key)
);
INSERT INTO {schema}.signal_dedup (target_id, dedup_key)
SELECT target_id, dedup_key FROM {schema}.signals WHERE dedup_key IS NOT NULL;
-- signals keeps UNIQUE (target_id, dedup_key): redundant with signal_dedup for this
-- version's statements, but the arbiter of the previous signal_deliver, which processes
-- started before this migration still run.

-- Asked by instance_claim once per unconfigured concurrency key (K = 1) in its batch, for
-- the key's first candidate: true when this transaction may claim it. Claimers of one key
-- are serialised by a transaction-level advisory lock (released at the claim's commit),
-- taken without waiting: a key another claim is taking right now is left out, like a busy
-- one. The probe after the lock is a statement of its own in a VOLATILE function, so in
-- READ COMMITTED it runs with a fresh snapshot: it sees a claim of the key that committed
-- after the calling statement's snapshot was taken, which the claim's own probe cannot see
-- (its UPDATE would then collide on instances_concurrency_active). The unique index stays
-- the guarantee; this keeps claims from running into it.
CREATE FUNCTION {schema}.concurrency_key_try_claim(ckey text) RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('pgdurable.concurrency/' || {schema_literal}),
                                     hashtext(ckey)) THEN
        RETURN false;
    END IF;
    RETURN NOT EXISTS (
        SELECT 1 FROM {schema}.instances
        WHERE concurrency_key = ckey AND status = 'executing' AND concurrency_shard IS NULL);
END
$$;
