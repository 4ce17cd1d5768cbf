"""Who is asking, and may they: the dashboard's logins, sessions, roles and CSRF tokens.

An identity comes from, in this order: the reverse proxy's header (only when
``dashboard.proxy_header`` names one: off by default, since any client could send it), a
signed session cookie (set by the login form), or HTTP basic credentials (for scripts).

Every form carries a CSRF token derived from the session's random id; an action (any POST)
is refused unless the token it carries is the one of the session cookie it came with. A
page of another site can make a browser send the cookie, but cannot read the token.
Cookies are HttpOnly and SameSite=Strict; a session's payload is signed (HMAC-SHA256) with
``dashboard.secret``, or a key drawn at each start (every session then ends at a restart).

Only the standard library here: the web stack is imported by ``app.py``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgdurable.contract.errors import ConfigError

if TYPE_CHECKING:
    from pgdurable.runtime.config import Config

#: The environment variable that makes a login ``admin`` (role admin) when the config file
#: names no ``[dashboard.users.NAME]``.
PASSWORD_ENV = "PGDURABLE_DASHBOARD_PASSWORD"  # noqa: S105 - a variable's name
#: The environment variable of the session key, when ``dashboard.secret`` is not set.
SECRET_ENV = "PGDURABLE_DASHBOARD_SECRET"  # noqa: S105 - a variable's name

SESSION_COOKIE = "pgdurable_session"
ADMIN, READ = "admin", "read"


@dataclass(frozen=True, slots=True)
class Identity:
    """A user the dashboard knows: by name, with a role; ``via``: session, basic or proxy."""

    name: str
    role: str
    via: str

    @property
    def admin(self) -> bool:
        return self.role == ADMIN


@dataclass(frozen=True, slots=True)
class Auth:
    """The dashboard's logins and keys, read once at start."""

    users: Mapping[str, tuple[str, str]]  # name -> (password, role)
    secret: bytes
    session_seconds: float = 12 * 3600.0
    proxy_header: str | None = None
    proxy_roles: Mapping[str, str] = field(default_factory=dict)
    proxy_default_role: str = READ

    @classmethod
    def from_config(cls, cfg: Config | None, environ: Mapping[str, str] = os.environ) -> Auth:
        """The logins of ``[dashboard.users.NAME]`` (their passwords may be ${VAR}), else the
        one ``admin`` login of $PGDURABLE_DASHBOARD_PASSWORD. A ConfigError when there is no
        login at all, unless a proxy header is trusted."""
        from pgdurable.runtime.config import DashboardSettings

        d = cfg.dashboard if cfg is not None else DashboardSettings()
        path = cfg.path if cfg is not None else None
        users: dict[str, tuple[str, str]] = {}
        for name, user in d.users.items():
            key = f"dashboard.users.{name}.password"
            password = cfg.expand(user.password, key) if cfg is not None else user.password
            if not password:
                raise ConfigError("a password must not be empty", file=path, key=key)
            users[name] = (password, user.role)
        if not users and environ.get(PASSWORD_ENV):
            users["admin"] = (environ[PASSWORD_ENV], ADMIN)
        if not users and d.proxy_header is None:
            raise ConfigError(
                f"the dashboard has no login: add a [dashboard.users.NAME] table with a password and "
                f"a role, or set {PASSWORD_ENV} (a login named admin)",
                file=path,
                key="dashboard.users",
            )
        raw = cfg.expand(d.secret, "dashboard.secret") if cfg is not None and d.secret else None
        raw = raw or environ.get(SECRET_ENV)
        secret = hashlib.sha256(raw.encode()).digest() if raw else secrets.token_bytes(32)
        return cls(
            users=users,
            secret=secret,
            session_seconds=d.session_hours * 3600.0,
            proxy_header=d.proxy_header,
            proxy_roles=dict(d.proxy_roles),
            proxy_default_role=d.proxy_default_role,
        )

    # -- identities ------------------------------------------------------------------------

    def check_password(self, name: str, password: str) -> Identity | None:
        """The login ``name`` when ``password`` is its password (compared in constant time)."""
        known = self.users.get(name)
        expected = known[0] if known is not None else secrets.token_hex(16)
        ok = hmac.compare_digest(expected.encode(), password.encode())
        return Identity(name, known[1], "basic") if ok and known is not None else None

    def identify(self, headers: Mapping[str, str], session: Mapping[str, Any]) -> Identity | None:
        """Who sent a request with these headers and this (verified) session payload."""
        if self.proxy_header is not None:
            name = headers.get(self.proxy_header.lower(), "").strip()
            if name:
                return Identity(name, self.proxy_roles.get(name, self.proxy_default_role), "proxy")
        user = session.get("user")
        if isinstance(user, str) and user in self.users:
            return Identity(user, self.users[user][1], "session")
        return self.basic(headers.get("authorization", ""))

    def basic(self, header: str) -> Identity | None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return None
        try:
            name, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return self.check_password(name, password) if sep else None

    # -- sessions and CSRF tokens ----------------------------------------------------------

    def new_session(self, user: str | None = None) -> dict[str, Any]:
        """A fresh session (a new random id: a login never keeps the id it came with)."""
        return {"sid": secrets.token_urlsafe(24), "user": user, "exp": time.time() + self.session_seconds}

    def dump(self, session: Mapping[str, Any]) -> str:
        body = _b64(json.dumps(dict(session), separators=(",", ":")).encode())
        mac = hmac.new(self.secret, body.encode(), hashlib.sha256).digest()
        return f"{body}.{_b64(mac)}"

    def load(self, cookie: str | None) -> dict[str, Any] | None:
        """The session a cookie holds: None when it is missing, forged or expired."""
        if not cookie or "." not in cookie:
            return None
        body, _, mac = cookie.partition(".")
        try:
            given = _unb64(mac)
            expected = hmac.new(self.secret, body.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(given, expected):
                return None
            session = json.loads(_unb64(body))
        except (binascii.Error, ValueError):
            return None
        if not isinstance(session, dict) or not isinstance(session.get("sid"), str):
            return None
        exp = session.get("exp")
        if not isinstance(exp, int | float) or exp < time.time():
            return None
        return session

    def csrf_token(self, session: Mapping[str, Any]) -> str:
        """The token every form of this session carries."""
        return hmac.new(self.secret, b"csrf:" + str(session["sid"]).encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: Mapping[str, Any] | None, token: object) -> bool:
        if session is None or not isinstance(token, str) or not token:
            return False
        return hmac.compare_digest(self.csrf_token(session), token)


def _b64(raw: bytes) -> str:
    """URL-safe base64 without padding: a cookie value that needs no quoting."""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode((text + "=" * (-len(text) % 4)).encode())
