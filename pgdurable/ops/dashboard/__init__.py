"""The web dashboard (``pgdurable dashboard``, docs/dashboard.md): Starlette, Jinja2 and
uvicorn, installed with the ``dashboard`` extra. ``app.create_app`` builds it; ``auth``
holds the logins, sessions and CSRF tokens; ``data`` reads what the pages show."""
