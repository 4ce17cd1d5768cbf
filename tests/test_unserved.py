"""A registered machine's queue that no worker serves is logged by the maintenance process:
once when it becomes unserved, once when a worker serves it again."""

from __future__ import annotations

import json
import time

from pgdurable.testing import assert_done

from .supervised import start, wait_until
from .unserved_machines import orphan

MODULES = '["tests.runtime_machines", "tests.unserved_machines"]'


def events(sup, name):
    lines = [json.loads(line) for line in sup.log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


def test_unserved_queue_is_warned_once_then_served(tmp_path, dsn, schema, client):
    ids = [client.insert(orphan, {"n": n}) for n in range(2)]
    sups: list = []
    try:
        first = start(
            sups,
            tmp_path,
            dsn,
            schema,
            modules=MODULES,
            queue_check_interval=0.5,
            extra='[logging]\nformat = "json"\n',
        )
        warned = wait_until(lambda: events(first, "queue_unserved"), what="a queue_unserved line")
        assert [(w["queue"], w["machines"], w["runnable"], w["level"]) for w in warned] == [
            ("orphan", ["orphan"], 2, "warning")
        ]
        assert "has no worker on any host (2 runnable rows wait)" in warned[0]["message"]
        # Passes 0.5 s apart go on meanwhile; they find it still unserved and say nothing.
        time.sleep(2)
        second = start(
            sups,
            tmp_path,
            dsn,
            schema,
            modules=MODULES,
            maintenance_enabled="false",
            extra='[queues.orphan]\nprocesses = 1\n[logging]\nformat = "json"\n',
        )
        served = wait_until(lambda: events(first, "queue_served"), what="a queue_served line")
        assert [s["queue"] for s in served] == ["orphan"]
        assert len(events(first, "queue_unserved")) == 1
        for iid, n in zip(ids, range(2), strict=True):
            wait_until(lambda iid=iid: client.get(iid).status == "done", what="the orphan rows ran")
            assert_done(client, iid, {"n": n})
        assert events(second, "queue_unserved") == []
    finally:
        for s in sups:
            s.close()
