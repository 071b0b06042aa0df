"""The dead-letter console: a small Starlette app with Jinja2 pages, no script and no CDN.

Pages: the overview, dead letters (filtered, newest first, paged by keyset), a letter, waiting
events, a mapping lookup. Replay and discard (one letter, the selected ones, or everything a
filter matches) first show a confirmation with how many, then run in short batches
(:mod:`.actions`). Every page needs a login (:mod:`.auth`); every form carries a CSRF token;
read-only users see no action buttons and their POSTs are refused.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from dokstamp_sync.console import actions, queries
from dokstamp_sync.console.auth import COOKIE, LIFETIME, Logins, User
from dokstamp_sync.db import session_scope
from dokstamp_sync.dokstamp.errors import redact, redact_text
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.states import LetterStatus

log = logging.getLogger("dokstamp_sync.console")
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
PRE = "dokstamp_console_pre"  # the login form's CSRF cookie (before a session exists)
SHOWN_MAX = 20_000  # characters of an event's JSON shown on a page
HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
           "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                      "form-action 'self'; frame-ancestors 'none'"}


def pretty(value: Any) -> str:
    """JSON for a page, every secret-named key's value shown as ``***`` (:func:`redact`)."""
    text = json.dumps(redact(value), indent=2, ensure_ascii=False, default=str)
    return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX] + "\n… (cut)"


def raw(text: str) -> str:
    """A malformed entry's raw text for a page, secret-named members' values hidden."""
    return redact_text(text[:SHOWN_MAX])


TEMPLATES.env.filters["pretty"] = pretty
TEMPLATES.env.filters["raw"] = raw


class Console:
    """The app's state: the logins, the store, Redis and the stream's name."""

    def __init__(self, logins: Logins, sessions: sessionmaker[Session], client: redis.Redis,
                 stream: str, keys: RedisKeys = RedisKeys()) -> None:
        self.logins, self.sessions, self.redis, self.stream = logins, sessions, client, stream
        self.keys = keys

    # -- helpers ---------------------------------------------------------------------------
    def user(self, request: Request) -> User:
        user = self.logins.user(request.cookies.get(COOKIE))
        if user is None:
            raise HTTPException(303, headers={"Location": "/login"})
        return user

    def render(self, request: Request, name: str, user: User | None,
               status: int = 200, **context: Any) -> Response:
        cookie = request.cookies.get(COOKIE) or ""
        context |= {"user": user, "csrf": self.logins.csrf(cookie) if user else ""}
        return TEMPLATES.TemplateResponse(request, name, context, status_code=status,
                                          headers=HEADERS)

    async def form(self, request: Request, *, change: bool = True) -> tuple[User, FormData]:
        """The POSTed form, after the login, the CSRF token and (``change``) the role."""
        user = self.user(request)
        form = await request.form()
        token = form.get("csrf")
        if not self.logins.csrf_ok(request.cookies.get(COOKIE),
                                   token if isinstance(token, str) else None):
            raise HTTPException(403, "missing or wrong CSRF token")
        if change and not user.may_change:
            raise HTTPException(403, "this login is read-only")
        return user, form

    # -- login -----------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        pre = request.cookies.get(PRE) or secrets.token_urlsafe(24)
        error = ""
        if request.method == "POST":
            form = await request.form()
            token = form.get("csrf")
            user = self.logins.check(str(form.get("user", "")), str(form.get("password", "")))
            if not self.logins.csrf_ok(request.cookies.get(PRE),
                                       token if isinstance(token, str) else None):
                raise HTTPException(403, "missing or wrong CSRF token")
            if user is not None:
                log.info("console: %s logged in (%s)", user.name, user.role)
                home = RedirectResponse("/", status_code=303)
                home.set_cookie(COOKIE, self.logins.cookie(user), max_age=LIFETIME,
                                httponly=True, samesite="strict")
                return home
            log.warning("console: a login as %r was refused", str(form.get("user", ""))[:100])
            error = "Wrong user or password."
        response = self.render(request, "login.html", None, status=401 if error else 200,
                               error=error, login_csrf=self.logins.csrf(pre))
        response.set_cookie(PRE, pre, httponly=True, samesite="strict")
        return response

    async def logout(self, request: Request) -> Response:
        user, _ = await self.form(request, change=False)
        self.logins.end(request.cookies.get(COOKIE))
        log.info("console: %s logged out", user.name)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    # -- pages -----------------------------------------------------------------------------
    async def overview(self, request: Request) -> Response:
        user = self.user(request)
        with session_scope(self.sessions) as session:
            data = queries.overview(session, self.redis, self.stream, self.keys)
        return self.render(request, "overview.html", user, data=data)

    async def letters(self, request: Request) -> Response:
        user = self.user(request)
        f = queries.Filter.from_params(request.query_params)
        before = queries.row_id(request.query_params.get("before"))
        with session_scope(self.sessions) as session:
            page = queries.letters(session, f, before)
        return self.render(request, "letters.html", user, page=page, f=f)

    async def letter(self, request: Request) -> Response:
        user = self.user(request)
        letter_id = int(request.path_params["letter_id"])
        if not 0 < letter_id <= queries.ID_MAX:
            raise HTTPException(404, "no such dead letter")
        with session_scope(self.sessions) as session:
            data = queries.letter(session, letter_id)
        if data is None:
            raise HTTPException(404, "no such dead letter")
        return self.render(request, "letter.html", user, **data)

    async def waiting(self, request: Request) -> Response:
        user = self.user(request)
        before = queries.row_id(request.query_params.get("before"))
        with session_scope(self.sessions) as session:
            page = queries.waiting(session, before)
        return self.render(request, "waiting.html", user, page=page)

    async def mapping(self, request: Request) -> Response:
        user = self.user(request)
        entity = queries.clean(request.query_params.get("entity"))
        key = queries.clean(request.query_params.get("key"))
        data: dict[str, Any] = {}
        if entity and key:
            with session_scope(self.sessions) as session:
                data = queries.mapping(session, entity, key)
        return self.render(request, "mapping.html", user, entity=entity, key=key, data=data)

    # -- actions ---------------------------------------------------------------------------
    async def act(self, request: Request) -> Response:
        """Confirm (how many), then replay or discard: the letters ticked, or the filter's."""
        user, form = await self.form(request)
        action = str(form.get("action", ""))
        if action not in actions.ACTIONS:
            raise HTTPException(400, "unknown action")
        f = queries.Filter.from_params(form)
        everything = form.get("scope") == "filter"
        chosen: list[int] = []
        for value in form.getlist("ids"):
            letter_id = queries.row_id(value)
            if letter_id is None:
                raise HTTPException(400, "not a dead letter id")
            chosen.append(letter_id)
        if form.get("confirmed") != "yes":
            with session_scope(self.sessions) as session:
                matched = queries.count(session, queries.Filter(
                    **{**f.__dict__, "status": LetterStatus.OPEN})) if everything else len(chosen)
            return self.render(request, "confirm.html", user, action=action, count=matched,
                               everything=everything, ids=chosen, f=f)
        if everything:
            done = actions.act_on_filter(self.sessions, action, f, user.name)
        else:
            done = actions.act(self.sessions, action, chosen, user.name)
        return self.render(request, "done.html", user, action=action, done=done, f=f)


def build_app(console: Console) -> Starlette:
    routes = [Route("/login", console.login, methods=["GET", "POST"]),
              Route("/logout", console.logout, methods=["POST"]),
              Route("/", console.overview),
              Route("/letters", console.letters),
              Route("/letters/action", console.act, methods=["POST"]),
              Route("/letters/{letter_id:int}", console.letter),
              Route("/waiting", console.waiting),
              Route("/mapping", console.mapping)]
    return Starlette(routes=routes)
