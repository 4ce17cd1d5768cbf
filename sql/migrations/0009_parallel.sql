-- pgdurable schema, version 9: parallel results (docs/coordination.md#parallel-results).

-- spawn_index: a child's position in the Spawn that created it (0, 1, …; positions of
-- children whose correlation key was taken stay empty), so its parent reads the results in
-- the order it spawned them, whatever order the insert took for its locks. NULL: not a
-- child, or created before version 9.
-- join_policy: how the instance waits for the children of its last Spawn. NULL: until all
-- of them ended. 'fail_fast': a child that fails wakes it at once; its worker then cancels
-- the live siblings and it runs its next step once they ended.
ALTER TABLE {schema}.instances
    ADD COLUMN spawn_index integer,
    ADD COLUMN join_policy text;
-- NOT VALID: every existing row holds NULL, so there is nothing to scan for.
ALTER TABLE {schema}.instances ADD CONSTRAINT instances_join_policy_check
    CHECK (join_policy IN ('fail_fast')) NOT VALID;
