"""The dashboard's web application: Starlette routes over the client and the named queries.

Reads run in Starlette's thread pool on a small pool of synchronous connections (the
code of ``pgdurable status``, ``list`` and ``show``); actions go through ``Client`` (its
own pool), as the CLI's verbs do. Every page needs a login (``auth.py``); every action
needs the admin role and the session's CSRF token. Templates are Jinja2 with autoescape
on: a state holding ``<script>`` shows as text. No inline script or style: the Content
Security Policy allows only this server's static files.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

import jinja2
import msgspec
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgdurable.client import Client
from pgdurable.contract.errors import PgdurableError
from pgdurable.contract.spec import STATUSES
from pgdurable.db import migrations
from pgdurable.db.queries import Queries, for_schema
from pgdurable.ops.cli.common import NOT_FOUND, CliError, age, compact, one_line, span
from pgdurable.ops.dashboard import data
from pgdurable.ops.dashboard.auth import SESSION_COOKIE, Auth, Identity

if TYPE_CHECKING:
    from pgdurable.contract.fsm import Registry

HERE = Path(__file__).resolve().parent
APPLICATION_NAME = "pgdurable dashboard"

#: Sent with every response. No inline script or style anywhere: ``'self'`` only.
SECURITY_HEADERS: dict[str, str] = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the dashboard serves: the database, the logins, the machines' code (for graphs)."""

    dsn: str
    schema: str
    auth: Auth
    registry: Registry | None = None
    window: dt.timedelta = dt.timedelta(hours=1)  # the overview's "finished within"


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response, static files and errors included."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                old = message.get("headers", [])
                headers = [(k, v) for k, v in old if k.decode().lower() not in SECURITY_HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Backend:
    """The connections: a pool for the reads, the client for the actions."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.q: Queries = for_schema(settings.schema)
        self.pool = ConnectionPool(
            settings.dsn,
            min_size=1,
            max_size=4,
            kwargs={"autocommit": True, "application_name": APPLICATION_NAME},
            open=False,
        )
        self.client = Client(settings.dsn, schema=settings.schema, max_connections=2)

    def open(self) -> None:
        self.pool.open(wait=True, timeout=30.0)
        with self.pool.connection() as conn:
            migrations.check(conn, self.settings.schema)  # the queries are this version's

    def close(self) -> None:
        self.client.close()
        self.pool.close()

    def read(self, fn: Callable[..., _T], *args: Any) -> Awaitable[_T]:
        """Run ``fn(conn, q, *args)`` in the thread pool."""

        def run() -> _T:
            with self.pool.connection() as conn:
                return fn(conn, self.q, *args)

        return run_in_threadpool(run)


# --------------------------------------------------------------------------- templates


def _json(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def _when(ts: dt.datetime | None) -> str:
    return "-" if ts is None else f"{ts.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value escaped, in every template
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(json=_json, compact=compact, age=age, when=_when, span=span)
    return Jinja2Templates(env=env)


# --------------------------------------------------------------------------- requests

Handler = Callable[[Request, "Page"], Awaitable[Response]]


@dataclass(slots=True)
class Page:
    """One request's identity and session, and what every template receives."""

    who: Identity
    session: dict[str, Any]
    fresh: bool  # the session cookie must be (re)set
    backend: Backend

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        flash = self.session.pop("flash", None)
        if flash is not None:
            self.fresh = True
        ctx = {"who": self.who, "csrf": self.backend.settings.auth.csrf_token(self.session), "flash": flash}
        response = TEMPLATES.TemplateResponse(request, name, {**ctx, **context}, status_code=status_code)
        return self.finish(request, response)

    def back(self, request: Request, to: str, kind: str, text: str) -> Response:
        """After an action: back to ``to`` with a message (in the session: nothing in the URL)."""
        self.session["flash"] = [kind, text]
        self.fresh = True
        return self.finish(request, RedirectResponse(to, status_code=303))

    def finish(self, request: Request, response: Response) -> Response:
        if self.fresh:
            set_session(request, response, self.backend.settings.auth, self.session)
        return response


def set_session(request: Request, response: Response, auth: Auth, session: Mapping[str, Any]) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        auth.dump(session),
        max_age=int(auth.session_seconds),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def session_of(request: Request, auth: Auth) -> tuple[dict[str, Any], bool]:
    session = auth.load(request.cookies.get(SESSION_COOKIE))
    return (session, False) if session is not None else (auth.new_session(), True)


def safe_next(target: str | None) -> str:
    """A local path to go to after the login (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def refuse(status: int, text: str) -> Response:
    return PlainTextResponse(text + "\n", status_code=status)


def guarded(role: str) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """A page (``read``) or an action (``admin``): the identity checked, an action's CSRF
    token checked before anything runs."""

    def decorate(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def endpoint(request: Request) -> Response:
            backend: Backend = request.app.state.backend
            auth = backend.settings.auth
            session, fresh = session_of(request, auth)
            who = auth.identify(request.headers, session)
            if who is None:
                if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                    where = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    response: Response = RedirectResponse("/login?" + urlencode({"next": where}), 303)
                    if fresh:
                        set_session(request, response, auth, session)
                    return response
                # A script is told it may send basic credentials; a browser is not (it would
                # open its own login dialog instead of showing the answer).
                browser = "text/html" in request.headers.get("accept", "")
                challenge = {} if browser else {"www-authenticate": 'Basic realm="pgdurable dashboard"'}
                return PlainTextResponse(
                    "authentication required: log in at /login\n", status_code=401, headers=challenge
                )
            if request.method == "POST":
                form = await request.form()
                origin = request.headers.get("origin")
                if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
                    return refuse(403, "refused: the request comes from another site")
                if fresh or not auth.csrf_ok(session, form.get("csrf")):
                    return refuse(403, "refused: the form's CSRF token is missing or not this session's")
            if role == "admin" and not who.admin:
                return refuse(403, f"refused: {who.name} has the read role; actions need admin")
            return await fn(request, Page(who, session, fresh, backend))

        return endpoint

    return decorate


async def form_of(request: Request) -> FormData:
    return await request.form()  # parsed once: Starlette caches it on the request


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


# --------------------------------------------------------------------------- login


async def login(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    auth = backend.settings.auth
    session, fresh = session_of(request, auth)
    error = None
    status = 200
    target = safe_next(request.query_params.get("next"))
    if request.method == "POST":
        form = await request.form()
        target = safe_next(text(form, "next"))
        if fresh or not auth.csrf_ok(session, form.get("csrf")):
            return refuse(403, "refused: the form's CSRF token is missing or not this session's")
        who = auth.check_password(text(form, "username"), str(form.get("password") or ""))
        if who is not None:
            response: Response = RedirectResponse(target, status_code=303)
            set_session(request, response, auth, auth.new_session(who.name))
            return response
        error, status = "wrong name or password", 401
    response = TEMPLATES.TemplateResponse(
        request,
        "login.html",
        {"csrf": auth.csrf_token(session), "next": target, "error": error, "who": None, "flash": None},
        status_code=status,
    )
    if fresh:
        set_session(request, response, auth, session)
    return response


@guarded("read")
async def logout(request: Request, page: Page) -> Response:
    page.session = page.backend.settings.auth.new_session()
    page.fresh = True
    return page.finish(request, RedirectResponse("/login", status_code=303))


# --------------------------------------------------------------------------- pages


@guarded("read")
async def overview(request: Request, page: Page) -> Response:
    s = page.backend.settings
    doc = await page.backend.read(data.overview, s.schema, s.window)
    return page.render(request, "overview.html", doc=doc, window=span(s.window.total_seconds()))


def _filters(request: Request) -> data.Filters:
    p = request.query_params
    cursor = p.get("cursor", "")
    limit = p.get("limit", "50")
    return data.Filters(
        machine=p.get("machine", "").strip(),
        queue=p.get("queue", "").strip(),
        statuses=tuple(s for s in p.getlist("status") if s),
        key=p.get("key", "").strip(),
        since=p.get("since", ""),
        until=p.get("until", ""),
        on_inserted=p.get("time") == "inserted",
        cursor=int(cursor) if cursor.isdigit() else None,
        limit=min(max(int(limit), 1), 500) if limit.isdigit() else 50,
    )


@guarded("read")
async def instances(request: Request, page: Page) -> Response:
    f = _filters(request)
    error = None
    found: list[dict[str, Any]] = []
    next_cursor = None
    try:
        found, next_cursor = await page.backend.read(data.instances, f)
    except data.FilterError as exc:
        error = str(exc)
    next_url = None
    if next_cursor is not None:
        query = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
        next_url = "/instances?" + urlencode([*query, ("cursor", str(next_cursor))])
    return page.render(
        request,
        "instances.html",
        status_code=400 if error else 200,
        f=f,
        statuses=STATUSES,
        rows=found,
        next_url=next_url,
        error=error,
    )


@guarded("read")
async def instance(request: Request, page: Page) -> Response:
    iid = int(request.path_params["iid"])
    try:
        doc = await page.backend.read(data.instance, iid)
    except CliError as exc:
        if exc.code != NOT_FOUND:
            raise
        return page.render(request, "missing.html", status_code=404, what=f"instance {iid}")
    registry = page.backend.settings.registry
    g, from_code = await run_in_threadpool(data.graph, registry, doc)
    from pgdurable.ops.transitions import LABELS, mermaid

    cancel = await run_in_threadpool(page.backend.client.get, iid)
    path = [h["step"] for h in doc["history"] if h["step"]]
    return page.render(
        request,
        "instance.html",
        doc=doc,
        graph=g,
        from_code=from_code,
        labels=LABELS,
        mermaid=mermaid(g),
        path=path,
        cancel_reason=cancel.cancel_reason if cancel is not None else None,
    )


@guarded("read")
async def inputs(request: Request, page: Page) -> Response:
    after = request.query_params.get("after", "")
    pending = await run_in_threadpool(
        functools.partial(page.backend.client.inputs, after=int(after) if after.isdigit() else 0, limit=100)
    )
    next_url = f"/inputs?after={pending[-1].instance}" if len(pending) == 100 else None
    return page.render(request, "inputs.html", pending=pending, next_url=next_url)


@guarded("read")
async def schedules(request: Request, page: Page) -> Response:
    found = await run_in_threadpool(page.backend.client.schedules)
    return page.render(request, "schedules.html", schedules=found)


@guarded("read")
async def held(request: Request, page: Page) -> Response:
    cursor = request.query_params.get("cursor", "")
    found, next_cursor = await page.backend.read(data.held, int(cursor) if cursor.isdigit() else None)
    next_url = f"/held?cursor={next_cursor}" if next_cursor is not None else None
    return page.render(request, "held.html", rows=found, next_url=next_url)


# --------------------------------------------------------------------------- actions


async def act(page: Page, request: Request, to: str, done: Callable[[], str]) -> Response:
    """Run an action in the thread pool; its refusal (NoTarget, OperationRefused,
    InvalidInput, …) is the message shown, one line."""
    try:
        message = await run_in_threadpool(done)
    except (PgdurableError, ValueError) as exc:
        return page.back(request, to, "error", one_line(exc))
    return page.back(request, to, "ok", message)


def _decode(raw: str, what: str) -> Any:
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None


@guarded("admin")
async def instance_action(request: Request, page: Page) -> Response:
    iid = int(request.path_params["iid"])
    verb = request.path_params["verb"]
    form = await form_of(request)
    client = page.backend.client
    to = f"/instances/{iid}"

    def run() -> str:
        if verb == "cancel":
            r = client.cancel(iid, text(form, "reason") or None)
            return f"instance {iid}: {r.outcome} (now {r.status})"
        if verb == "retry":
            return f"instance {iid} retried from step {client.retry(iid)}"
        if verb == "rewind":
            step = text(form, "step")
            if not step:
                raise ValueError("name the step to rewind to")
            rw = client.rewind(iid, step, _decode(text(form, "state"), "the state"))
            return f"instance {iid} rewound to step {step} (state from {rw.state_from})"
        if verb == "signal":
            name = text(form, "name")
            if not name:
                raise ValueError("name the signal")
            sid = client.signal(iid, name, _decode(text(form, "payload"), "the payload"))
            return f"signal {name} delivered to instance {iid}" + ("" if sid else " (a duplicate)")
        raise ValueError(f"no action {verb!r}")

    return await act(page, request, to, run)


@guarded("admin")
async def queue_action(request: Request, page: Page) -> Response:
    queue = request.path_params["queue"]
    verb = request.path_params["verb"]
    client = page.backend.client

    def run() -> str:
        if verb == "pause":
            return f"queue {queue} " + ("paused" if client.pause(queue) else "was already paused")
        if verb == "resume":
            return f"queue {queue} " + ("resumed" if client.resume(queue) else "was not paused")
        raise ValueError(f"no action {verb!r}")

    return await act(page, request, "/", run)


@guarded("admin")
async def schedule_action(request: Request, page: Page) -> Response:
    name = request.path_params["name"]
    verb = request.path_params["verb"]
    client = page.backend.client

    def run() -> str:
        if verb == "trigger":
            return f"schedule {name} fired: instance {client.trigger_schedule(name)}"
        if verb == "enable":
            changed = client.enable_schedule(name)
            return f"schedule {name} " + ("enabled" if changed else "was already enabled")
        if verb == "disable":
            changed = client.disable_schedule(name)
            return f"schedule {name} " + ("disabled" if changed else "was already disabled")
        raise ValueError(f"no action {verb!r}")

    return await act(page, request, "/schedules", run)


@guarded("admin")
async def respond(request: Request, page: Page) -> Response:
    iid = int(request.path_params["iid"])
    form = await form_of(request)
    name = text(form, "name")
    raw = text(form, "value")
    client = page.backend.client

    def run() -> str:
        try:
            value = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            value = raw  # not JSON: the text itself (a schema that wants a string takes it)
        client.respond(iid, name, value)
        return f"instance {iid}: answered {name} with {compact(value)}"

    return await act(page, request, "/inputs", run)


# --------------------------------------------------------------------------- the app

TEMPLATES = _templates()


def create_app(settings: Settings) -> Starlette:
    """The dashboard as an ASGI application (the connections open at its start-up)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backend = Backend(settings)
        await run_in_threadpool(backend.open)
        app.state.backend = backend
        try:
            yield
        finally:
            await run_in_threadpool(backend.close)

    routes = [
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", overview),
        Route("/instances", instances),
        Route("/instances/{iid:int}", instance),
        Route("/instances/{iid:int}/{verb:str}", instance_action, methods=["POST"]),
        Route("/inputs", inputs),
        Route("/inputs/{iid:int}", respond, methods=["POST"]),
        Route("/schedules", schedules),
        Route("/schedules/{name:str}/{verb:str}", schedule_action, methods=["POST"]),
        Route("/held", held),
        Route("/queues/{queue:str}/{verb:str}", queue_action, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(SecurityHeaders)
    return app
