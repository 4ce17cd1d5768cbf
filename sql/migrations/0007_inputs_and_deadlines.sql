-- pgdurable schema: human input (awaits that carry a prompt, a schema and choices) and
-- time limits (expiry before start, instance deadlines). docs/inputs.md and
-- docs/deadlines.md describe the semantics.

-- input_request: what an Await that asks for input carries, as one document
-- {"prompt": text | null, "schema": JSON Schema | null, "choices": [values] | null}; the
-- input is answered on the await's first name (awaits[1]). Written by every park (NULL for
-- a plain await). A pending input is a row awaiting_signal with a request: nothing else
-- reads the column, so an instance that woke, finished, was cancelled or timed out has no
-- pending input, whatever the column still holds.
ALTER TABLE {schema}.instances ADD COLUMN input_request jsonb;

-- The pending inputs, listed by machine or queue (pending_inputs below, input_respond).
-- Only parked rows that asked for input are in it.
CREATE INDEX instances_inputs ON {schema}.instances (id)
    WHERE status = 'awaiting_signal' AND input_request IS NOT NULL;

-- Every pending input, for SQL users and for the clients (input_pending_list): the
-- instance, its machine, the step the answer wakes, the signal name to answer on, the
-- prompt, the JSON Schema of the answer, the allowed values, and the await's deadline.
CREATE VIEW {schema}.pending_inputs AS
SELECT i.id AS instance_id, i.fsm, i.version, i.step, i.awaits[1] AS name,
       i.input_request->>'prompt' AS prompt,
       NULLIF(i.input_request->'schema', 'null'::jsonb) AS schema,
       NULLIF(i.input_request->'choices', 'null'::jsonb) AS choices,
       i.await_deadline AS deadline, i.queue, i.correlation_key, i.updated_at AS asked_at
FROM {schema}.instances AS i
WHERE i.status = 'awaiting_signal' AND i.input_request IS NOT NULL;
