"""The web dashboard over HTTP (Starlette's TestClient against a real database): every
page needs a login, actions need the admin role and the session's CSRF token, values are
escaped, and every response carries the security headers. The browser tests are in
tests/test_dashboard_browser.py."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import markupsafe
import pytest

pytest.importorskip("starlette", reason="the dashboard extra is not installed")

from starlette.testclient import TestClient

from pgdurable.contract.errors import ConfigError
from pgdurable.ops.dashboard.app import SECURITY_HEADERS, Settings, create_app
from pgdurable.ops.dashboard.auth import SESSION_COOKIE, Auth
from pgdurable.runtime.config import parse
from pgdurable.testing import assert_done, drain

from .dashboard_machines import Charge
from .input_machines import Expense

ROOT = Path(__file__).resolve().parent.parent
USERS = {"ada": ("ada-secret", "admin"), "rey": ("rey-secret", "read")}
HTML = {"accept": "text/html"}


def auth(**kw) -> Auth:
    return Auth(users=USERS, secret=b"k" * 32, **kw)


@pytest.fixture
def app(dsn, schema):
    with TestClient(create_app(Settings(dsn, schema, auth())), base_url="http://127.0.0.1") as c:
        yield c


def login(c: TestClient, user: str = "ada") -> None:
    page = c.get("/login")
    r = c.post(
        "/login",
        data={"username": user, "password": USERS[user][0], "csrf": csrf(page.text), "next": "/"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text


def csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def failed_charge(dsn, schema, client, tmp_path) -> int:
    iid = client.insert(Charge, {"order": 7, "unlock": str(tmp_path / "unlock")})
    drain(dsn, [Charge], schema=schema)
    assert client.get(iid).status == "failed"
    return iid


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("path", ["/", "/instances", "/instances/1", "/inputs", "/schedules", "/held"])
def test_every_page_needs_a_login(app, path):
    r = app.get(path, follow_redirects=False)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Basic")
    browser = app.get(path, headers=HTML, follow_redirects=False)
    assert browser.status_code == 303
    assert browser.headers["location"].startswith("/login?next=")


def test_a_wrong_password_is_refused_and_the_right_one_logs_in(app):
    page = app.get("/login")
    r = app.post("/login", data={"username": "ada", "password": "nope", "csrf": csrf(page.text)})
    assert r.status_code == 401 and "wrong name or password" in r.text
    assert app.get("/", follow_redirects=False).status_code == 401
    login(app)
    r = app.get("/")
    assert r.status_code == 200 and "ada (admin)" in r.text


def test_basic_credentials_work_without_a_session(app):
    assert app.get("/", headers=basic("rey", "rey-secret")).status_code == 200
    assert app.get("/", headers=basic("rey", "ada-secret")).status_code == 401
    assert app.get("/", headers=basic("nobody", "rey-secret")).status_code == 401


def test_a_forged_or_expired_session_cookie_is_no_login(app, dsn, schema):
    login(app)
    good = app.cookies[SESSION_COOKIE]
    body, mac = good.split(".")
    app.cookies.clear()
    # The same payload signed with another key, and a payload edited under the old mac.
    other = Auth(users=USERS, secret=b"x" * 32)
    for forged in (other.dump(auth().load(good)), body[:-2] + "AA." + mac):
        app.cookies[SESSION_COOKIE] = forged
        assert app.get("/", follow_redirects=False).status_code == 401
    expired = auth(session_seconds=-1).new_session("ada")
    app.cookies[SESSION_COOKIE] = auth().dump(expired)
    assert app.get("/", follow_redirects=False).status_code == 401


def test_the_login_goes_back_only_to_a_local_path(app):
    for target, expected in (("/held", "/held"), ("//evil.example/x", "/"), ("https://evil.example", "/")):
        page = app.get("/login")
        r = app.post(
            "/login",
            data={"username": "ada", "password": "ada-secret", "csrf": csrf(page.text), "next": target},
            follow_redirects=False,
        )
        assert r.headers["location"] == expected


def test_the_proxy_header_is_ignored_unless_configured(dsn, schema):
    with TestClient(create_app(Settings(dsn, schema, auth()))) as c:
        assert c.get("/", headers={"x-forwarded-user": "ada"}).status_code == 401
    trusted = auth(proxy_header="X-Forwarded-User", proxy_roles={"ada": "admin"})
    with TestClient(create_app(Settings(dsn, schema, trusted))) as c:
        r = c.get("/", headers={"x-forwarded-user": "carol"})
        assert r.status_code == 200 and "carol (read)" in r.text
        assert "ada (admin)" in c.get("/", headers={"x-forwarded-user": "ada"}).text


# --------------------------------------------------------------------------- roles and CSRF


def test_an_action_needs_the_admin_role(app, dsn, schema, client, tmp_path):
    iid = failed_charge(dsn, schema, client, tmp_path)
    login(app, "rey")
    page = app.get(f"/instances/{iid}")
    assert "/retry" not in page.text  # no action buttons for the read role
    r = app.post(f"/instances/{iid}/retry", data={"csrf": csrf(page.text)}, follow_redirects=False)
    assert r.status_code == 403 and "read role" in r.text
    assert client.get(iid).status == "failed"


def test_an_action_without_the_session_csrf_token_is_refused(app, dsn, schema, client, tmp_path):
    iid = failed_charge(dsn, schema, client, tmp_path)
    login(app)
    token = csrf(app.get(f"/instances/{iid}").text)
    for data in ({}, {"csrf": "0" * 64}, {"csrf": token[:-1] + ("0" if token[-1] != "0" else "1")}):
        r = app.post(f"/instances/{iid}/retry", data=data, follow_redirects=False)
        assert r.status_code == 403 and "CSRF" in r.text
    # Another site's page posting the right token (it cannot know it) is refused too.
    r = app.post(
        f"/instances/{iid}/retry",
        data={"csrf": token},
        headers={"origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert r.status_code == 403
    assert client.get(iid).status == "failed"
    r = app.post(f"/instances/{iid}/retry", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get(iid).status == "runnable"


def test_a_token_of_another_session_is_refused(app, dsn, schema, client, tmp_path):
    iid = failed_charge(dsn, schema, client, tmp_path)
    login(app)
    mine = csrf(app.get(f"/instances/{iid}").text)
    with TestClient(app.app, base_url="http://127.0.0.1") as other:
        login(other)
        r = other.post(f"/instances/{iid}/retry", data={"csrf": mine}, follow_redirects=False)
        assert r.status_code == 403
    assert client.get(iid).status == "failed"


def test_basic_credentials_alone_cannot_act(app, dsn, schema, client, tmp_path):
    """A browser resends basic credentials to any site's form: an action still needs the
    token of the session cookie."""
    iid = failed_charge(dsn, schema, client, tmp_path)
    r = app.post(f"/instances/{iid}/retry", headers=basic("ada", "ada-secret"), follow_redirects=False)
    assert r.status_code == 403
    assert client.get(iid).status == "failed"


# --------------------------------------------------------------------------- escaping, headers


def test_a_state_holding_a_script_shows_as_text(app, client):
    iid = client.insert("dash_unknown", {"note": "<script>alert(1)</script>"}, queue="nowhere")
    login(app)
    r = app.get(f"/instances/{iid}")
    assert "<script>alert(1)</script>" not in r.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert "<script>" not in r.text.replace('<script src="/static/dashboard.js" defer></script>', "")


@pytest.mark.parametrize("path", ["/login", "/", "/static/style.css", "/nowhere"])
def test_every_response_has_the_security_headers(app, path):
    if path == "/":
        login(app)
    r = app.get(path)
    for name, value in SECURITY_HEADERS.items():
        assert r.headers[name] == value
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "unsafe-inline" not in r.headers["content-security-policy"]


def test_no_template_has_an_inline_script_or_style():
    templates = ROOT / "pgdurable" / "ops" / "dashboard" / "templates"
    for t in templates.glob("*.html"):
        text = t.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), t.name
        assert "<style" not in text and " style=" not in text and " on" + "click=" not in text, t.name


def test_the_session_cookie_is_httponly_and_samesite_strict(app):
    r = app.get("/login")
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


# --------------------------------------------------------------------------- pages and actions


def test_the_pages_show_the_instances_and_the_timeline(app, dsn, schema, client, tmp_path):
    iid = failed_charge(dsn, schema, client, tmp_path)
    login(app)
    overview = app.get("/")
    assert 'data-queue="rt"' in overview.text
    listing = app.get("/instances", params={"status": "failed", "machine": "dash_charge"})
    assert f'href="/instances/{iid}"' in listing.text
    assert f'href="/instances/{iid}"' not in app.get("/instances", params={"status": "done"}).text
    bad = app.get("/instances", params={"since": "yesterday"})
    assert bad.status_code == 400 and "since" in bad.text
    page = app.get(f"/instances/{iid}").text
    assert "card declined &lt;b&gt;for order&lt;/b&gt;" in page  # the error, escaped
    assert "Traceback" in page and "RuntimeError" in page
    assert "charging order 7" in page  # the captured log line of the step
    assert 'id="path"' in page and "prepare" in page


def test_an_unknown_instance_is_not_found(app):
    login(app)
    r = app.get("/instances/987654")
    assert r.status_code == 404 and "There is no instance 987654" in r.text


def test_paging_of_the_instances(app, client):
    ids = [client.insert("dash_unknown", {"n": n}, queue="nowhere") for n in range(5)]
    login(app)
    first = app.get("/instances", params={"queue": "nowhere", "limit": "3"})
    shown = [int(i) for i in re.findall(r'class="iid">(\d+)<', first.text)]
    assert shown == ids[::-1][:3]
    nxt = re.search(r'href="([^"]+)" id="next"', first.text).group(1).replace("&amp;", "&")
    second = app.get(nxt)
    assert [int(i) for i in re.findall(r'class="iid">(\d+)<', second.text)] == ids[::-1][3:]
    assert 'id="next"' not in second.text


def test_retry_from_the_page_and_the_instance_finishes(app, dsn, schema, client, tmp_path):
    iid = failed_charge(dsn, schema, client, tmp_path)
    (tmp_path / "unlock").touch()
    login(app)
    token = csrf(app.get(f"/instances/{iid}").text)
    r = app.post(f"/instances/{iid}/retry", data={"csrf": token})
    assert "retried from step charge" in r.text
    drain(dsn, [Charge], schema=schema)
    assert_done(client, iid, {"charged": 7})
    # A refusal is a message, not an error page: it is not failed any more.
    r = app.post(f"/instances/{iid}/retry", data={"csrf": token})
    assert r.status_code == 200 and 'class="flash flash-error"' in r.text


def test_answer_a_pending_input(app, dsn, schema, client):
    iid = client.insert(Expense, {"amount": 120})
    drain(dsn, [Expense], schema=schema)
    login(app)
    page = app.get("/inputs").text
    assert "Approve 120 EUR?" in page
    token = csrf(page)
    bad = app.post(f"/inputs/{iid}", data={"csrf": token, "name": "approval", "value": '{"approved": "x"}'})
    assert 'class="flash flash-error"' in bad.text
    ok = app.post(
        f"/inputs/{iid}",
        data={"csrf": token, "name": "approval", "value": '{"approved": true, "amount": 120}'},
    )
    assert "answered approval" in ok.text
    drain(dsn, [Expense], schema=schema)
    assert_done(client, iid, {"type": "Approval", "approved": True, "amount": 120})


def test_cancel_signal_pause_and_schedules(app, dsn, schema, client):
    iid = client.insert(Expense, {"amount": 5})
    drain(dsn, [Expense], schema=schema)
    login(app)
    token = csrf(app.get("/").text)
    r = app.post(f"/instances/{iid}/signal", data={"csrf": token, "name": "poke", "payload": "{bad"})
    assert "not valid JSON" in r.text
    r = app.post(f"/instances/{iid}/signal", data={"csrf": token, "name": "poke", "payload": '{"a": 1}'})
    assert "signal poke delivered" in r.text
    r = app.post(f"/instances/{iid}/cancel", data={"csrf": token, "reason": "not needed"})
    assert client.get(iid).status == "cancelled"
    assert app.post("/queues/rt/pause", data={"csrf": token}).status_code == 200
    assert "rt" in client.paused()
    assert 'status-paused">paused' in app.get("/").text
    app.post("/queues/rt/resume", data={"csrf": token})
    assert "rt" not in client.paused()
    client.create_schedule("nightly", Expense, "0 3 * * *", state={"amount": 1})
    assert 'data-schedule="nightly"' in app.get("/schedules").text
    app.post("/schedules/nightly/disable", data={"csrf": token})
    assert client.get_schedule("nightly").enabled is False
    app.post("/schedules/nightly/enable", data={"csrf": token})
    assert client.get_schedule("nightly").enabled is True
    r = app.post("/schedules/nightly/trigger", data={"csrf": token})
    assert "schedule nightly fired: instance" in r.text


def test_held_rows_show_their_reason(app, dsn, schema, client, db):
    iid = client.insert("dash_unknown", {}, queue="nowhere")
    drain(dsn, [Charge], schema=schema, queues=["nowhere"])
    assert client.get(iid).status == "held"
    login(app)
    page = app.get("/held").text
    assert f'href="/instances/{iid}"' in page
    assert str(markupsafe.escape(client.get(iid).last_error)) in page


# --------------------------------------------------------------------------- config and verb


def test_the_dashboard_section_is_checked():
    base = {"queues": {"q": {}}}
    cfg = parse({**base, "dashboard": {"users": {"ada": {"password": "x", "role": "admin"}}}})
    assert cfg.dashboard.listen == "127.0.0.1:8321"
    for bad, key in (
        ({"listen": "8321"}, "dashboard.listen"),
        ({"users": {"ada": {"password": "x", "role": "root"}}}, "dashboard.users.ada.role"),
        ({"users": {"ada": {"role": "admin"}}}, "dashboard.users.ada"),
        ({"proxy_roles": {"ada": "boss"}}, "dashboard.proxy_roles.ada"),
        ({"proxy_header": "X Bad"}, "dashboard.proxy_header"),
        ({"colour": "blue"}, "dashboard.colour"),
    ):
        with pytest.raises(ConfigError) as e:
            parse({**base, "dashboard": bad}, "sup.toml")
        assert e.value.key == key, (bad, e.value)


def test_logins_come_from_the_config_or_the_environment(monkeypatch):
    cfg = parse({"queues": {"q": {}}}, "sup.toml")
    with pytest.raises(ConfigError, match="no login"):
        Auth.from_config(cfg, {})
    a = Auth.from_config(cfg, {"PGDURABLE_DASHBOARD_PASSWORD": "pw"})
    assert a.check_password("admin", "pw").role == "admin"
    monkeypatch.setenv("ADA_PW", "from-env")
    cfg = parse({"queues": {"q": {}}, "dashboard": {"users": {"ada": {"password": "${ADA_PW}"}}}})
    a = Auth.from_config(cfg, {})
    assert a.check_password("ada", "from-env").role == "read"
    cfg = parse({"queues": {"q": {}}, "dashboard": {"users": {"ada": {"password": "${NOT_SET_X}"}}}})
    with pytest.raises(ConfigError, match="NOT_SET_X"):
        Auth.from_config(cfg, {})


def test_the_verb_refuses_to_start_without_a_login(tmp_path, dsn, schema):
    cfg = tmp_path / "sup.toml"
    cfg.write_text(f'[database]\ndsn = "{dsn}"\nschema = "{schema}"\n[queues.rt]\n')
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "pgdurable", "dashboard", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2
    assert "no login" in r.stderr and "Traceback" not in r.stderr


def test_the_verb_refuses_a_schema_it_cannot_serve(tmp_path, dsn):
    cfg = tmp_path / "sup.toml"
    cfg.write_text(f'[database]\ndsn = "{dsn}"\nschema = "never_migrated"\n[queues.rt]\n')
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PGDURABLE_DASHBOARD_PASSWORD": "pw"}
    r = subprocess.run(
        [sys.executable, "-m", "pgdurable", "dashboard", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2
    assert "never_migrated" in r.stderr and "Traceback" not in r.stderr


def test_the_verb_binds_to_loopback_by_default():
    from pgdurable.ops.cli.dashboard import dashboard

    listen = next(p for p in dashboard.params if p.name == "listen")
    assert "127.0.0.1" in (listen.help or "")
    assert parse({"queues": {"q": {}}}).dashboard.listen.startswith("127.0.0.1:")


def test_the_other_verbs_do_not_load_the_web_stack():
    code = (
        "import sys, pgdurable.ops.cli, pgdurable.client\n"
        "loaded = [m for m in ('starlette', 'jinja2', 'uvicorn', 'multipart') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
