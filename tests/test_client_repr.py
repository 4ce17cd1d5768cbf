"""What a producer prints stays readable."""

from __future__ import annotations

from pgdurable.client import Busy


def test_busy_prints_as_one_short_line(client):
    iid = client.insert("ghost", {"big": "x" * 1000}, queue="ghostq")
    res = client.wait(iid, timeout=0.01)
    assert isinstance(res, Busy)
    text = repr(res)
    assert text == f"Busy(id={iid}, fsm='ghost', step=None, status='runnable', attempt=0)"
    assert res.instance.state == {"big": "x" * 1000}  # the snapshot is all still there
