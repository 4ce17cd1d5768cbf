"""The vacuum horizon: a snapshot held open for long keeps every dead row version.

A queue updates each row several times in its life, so its tables live on vacuum. One
transaction left open (an idle ``psql`` in ``BEGIN``, a stuck report, an abandoned prepared
transaction, an inactive replication slot) holds back the horizon of the whole server:
the dead versions pile up behind it and claims and commits slow down by the minute. The
database does not complain; this sweep does — a warning when such a snapshot is older than
``maintenance.snapshot_warning`` seconds, once per holder, and a line when it is gone.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgdurable.db.queries import Queries
from pgdurable.runtime.sweeps.base import Connect, Sweep


class SnapshotWatch(Sweep):
    name = "snapshot-watch"

    def __init__(self, connect: Connect, q: Queries, interval: float, older: float, log: Any):
        super().__init__(connect, interval, log)
        self.q, self.older = q, older
        #: The holder reported (kind and who), until it is gone.
        self.reported: tuple[str, str] | None = None

    def sweep(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(self.q["snapshot_oldest"], {"older": self.older}).fetchone()
        holder = None if row is None else (str(row[0]), str(row[1]))
        if row is not None and holder != self.reported:
            kind, who, age, detail = row
            held = f"for {age / 60:.0f} min" if age is not None else "while inactive"
            self.log.warning(
                "a %s open %s holds back vacuum on this server (%s): dead rows pile up and claims "
                "slow down until it ends%s",
                kind,
                held,
                who,
                f"; {detail}" if detail else "",
                extra={"event": "vacuum_held", "holder": kind, "who": who, "age": age, "detail": detail},
            )
        elif holder is None and self.reported is not None:
            self.log.info(
                "the %s that held back vacuum is gone (%s)",
                self.reported[0],
                self.reported[1],
                extra={"event": "vacuum_released", "holder": self.reported[0], "who": self.reported[1]},
            )
        self.reported = holder
