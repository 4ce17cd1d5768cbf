"""A node's identity: who owns rows, so that a restarted supervisor recognises the rows of its
previous incarnations — and only those.

Row owners are ``HOST:KEY:PID:RANDOM/queue/index/pid``. ``KEY`` is stable across restarts of
the same supervisor and differs between machines that share a host name: by default a hash
of the machine's ``/etc/machine-id`` and the config file's absolute path (two supervisors on
one machine with different configs are different nodes), or ``runtime.node_id`` when set.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pgdurable.contract.errors import ConfigError

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def machine_id() -> str:
    """The machine's id (systemd's ``/etc/machine-id``), or "" where there is none."""
    for name in MACHINE_ID_FILES:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return ""


def node_key(config_path: str, node_id: str | None = None) -> str:
    """The stable part of this node's identity (see the module docstring)."""
    if node_id is not None:
        if not _NODE_ID.fullmatch(node_id):
            raise ConfigError(
                "must be 1 to 64 letters, digits, '.', '_' or '-'", file=config_path, key="runtime.node_id"
            )
        return node_id
    path = str(Path(config_path).resolve()) if config_path else ""
    return hashlib.sha256(f"{machine_id()}\0{path}".encode()).hexdigest()[:12]
