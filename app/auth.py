"""Optional HTTP basic auth for team deployments (off when no users are configured).

Users come from either or both of
  HEADSCOPE_BASIC_AUTH       "alice:secret,bob:other"
  HEADSCOPE_BASIC_AUTH_FILE  a file with one ``user:password`` per line (# comments allowed);
                             the password may be a werkzeug hash (``scrypt:...``, ``pbkdf2:...``),
                             made with ``python -c "from werkzeug.security import generate_password_hash as g; print(g('secret'))"``
Use it behind HTTPS (a reverse proxy): basic auth sends the password with every request.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from flask import Flask, Response, request
from werkzeug.security import check_password_hash

from analysis.errors import ConfigError

HASH_PREFIXES = ("scrypt:", "pbkdf2:")
OPEN_PATHS = ("/healthz",)  # container health checks need no password


def parse_users(text: str, sep: str = ",") -> dict[str, str]:
    """'user:password' entries separated by ``sep`` -> {user: password}."""
    users = {}
    for entry in text.split(sep):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        user, colon, password = entry.partition(":")
        if not colon or not user or not password:
            raise ConfigError(f"Bad basic-auth entry {user or entry!r}: write it as user:password.")
        users[user] = password
    return users


def load_users(environ=os.environ) -> dict[str, str]:
    """The users configured in the environment (empty: auth off); ConfigError when they cannot be read."""
    users = parse_users(environ.get("HEADSCOPE_BASIC_AUTH", ""))
    path = environ.get("HEADSCOPE_BASIC_AUTH_FILE")
    if path:
        try:
            users.update(parse_users(Path(path).read_text(), sep="\n"))
        except OSError as err:
            raise ConfigError(f"Cannot read HEADSCOPE_BASIC_AUTH_FILE={path}: {err}. Mount the file or "
                               "unset the variable.") from None
    return users


def check_password(stored: str, given: str) -> bool:
    if stored.startswith(HASH_PREFIXES):
        return check_password_hash(stored, given)
    return hmac.compare_digest(stored.encode(), given.encode())


def install_basic_auth(server: Flask, users: dict[str, str] | None = None) -> bool:
    """Require a login on every path but OPEN_PATHS when users are configured; True if installed."""
    users = load_users() if users is None else users
    if not users:
        return False

    @server.before_request
    def _require_login():
        if request.path in OPEN_PATHS:
            return None
        auth = request.authorization
        if auth and auth.type == "basic" and auth.username in users \
                and check_password(users[auth.username], auth.password or ""):
            return None
        return Response("Login required.", 401, {"WWW-Authenticate": 'Basic realm="HeadScope"'})

    return True
