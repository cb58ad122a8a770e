"""The local web server behind ``textgen label`` and ``textgen inspect``: a FastAPI app run by uvicorn.

A page that writes labels or shows a model's outputs is for the person at this machine, so it listens on loopback
by default. Exposed on another interface (``--host``), every request must carry a secret token in its URL, which
the printed address includes, so that only whoever was handed the address can read or write.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

__all__ = [
    "LOOPBACK", "TOKEN_PARAM", "access_token", "bind", "check_web_stack", "is_loopback", "page_url", "require_token",
    "serve",
]  # fmt: skip

LOOPBACK = "127.0.0.1"
TOKEN_PARAM = "token"  # the query parameter (or X-TextGen-Token header) that carries the secret
_PUBLIC_PREFIXES = ("/static/",)  # page code and styles only, no data: a <script src> cannot carry the token


def check_web_stack(feature: str = "the pages") -> None:
    """Raise :class:`~text_env.extras.MissingExtra` naming the ``label`` extra when FastAPI or uvicorn is missing."""
    from text_env.extras import require

    require("label", feature)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``127.0.0.0/8``, ``::1`` or ``localhost``)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def access_token(host: str, token: str | None = None) -> str | None:
    """The token a server on ``host`` requires: ``token`` if given, a fresh random one off loopback, else none.

    :raises ValueError: an empty ``token``, which would guard nothing.
    """
    if token is not None:
        if not token.strip():
            raise ValueError("--token must not be empty")
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(16)


def require_token(app: Any, token: str | None) -> None:
    """Answer 403 to every request of ``app`` (but static page code) whose ``token`` query parameter or
    ``X-TextGen-Token`` header is not ``token``; nothing when ``token`` is ``None``."""
    if token is None:
        return
    from fastapi import Request
    from fastapi.responses import JSONResponse

    expected = token.encode()

    @app.middleware("http")
    async def check_token(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        if not request.url.path.startswith(_PUBLIC_PREFIXES):
            given = request.query_params.get(TOKEN_PARAM) or request.headers.get("x-textgen-token", "")
            if not secrets.compare_digest(given.encode(), expected):
                detail = (
                    f"this server needs the secret token of its address: open the URL it printed (?{TOKEN_PARAM}=...)"
                )
                return JSONResponse({"detail": detail}, status_code=403)
        return await call_next(request)


def page_url(host: str, port: int, token: str | None = None, **params: str) -> str:
    """The address to open: ``http://host:port/?token=...&...`` (a wildcard host is shown as this machine's name)."""
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    query = {**({TOKEN_PARAM: token} if token else {}), **params}
    return f"http://{shown}:{port}/" + (f"?{urlencode(query)}" if query else "")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), or an error that says what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror}): choose another --port or --host") from err
    sock.listen(128)
    return sock


def serve(app: Any, host: str = LOOPBACK, port: int = 0, token: str | None = None, what: str = "page") -> None:
    """Serve ``app`` until Ctrl-C or SIGTERM, after printing the address to open.

    :param port: 0 picks a free port (the printed address has it).
    :param token: the secret every request must carry (see :func:`require_token`, which must guard ``app``).
    """
    import uvicorn

    sock = bind(host, port)
    url = page_url(host, sock.getsockname()[1], token)
    print(f"{what}: open {url}  (Ctrl-C stops the server)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    server.run(sockets=[sock])
