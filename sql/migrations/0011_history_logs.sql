-- pgdurable schema, version 11: log capture — the log lines (and, when configured, the
-- print output) of a step attempt, kept with its history row (docs/history.md).

-- A JSON array of {"at": seconds since the epoch, "level", "logger", "message"}, bounded
-- by [logging] capture_lines and capture_chars; NULL when the attempt logged nothing
-- (or capture is off). Written by history_insert_many with the rest of the row.
ALTER TABLE {schema}.history ADD COLUMN logs jsonb;
