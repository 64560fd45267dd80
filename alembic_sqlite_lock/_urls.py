"""URLs as people may see them: never a password, parsed or not.

Every URL in a log line, an error (``error.url``) or ``status`` goes through
:func:`describe_url`.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

from sqlalchemy.engine import URL

MASK = "***"
"""What a password or a secret query value is shown as."""

_SECRET_NAME = re.compile(
    r"pass(?:word|wd|phrase)|^pass$|pwd|secret|token|credential", re.IGNORECASE
)
"""Query parameter names whose values are secrets: libpq's password and sslpassword,
asyncpg's password, PyMySQL's and mysqlclient's passwd and password, and any name that
says secret, token or credential. A path to a secret (passfile, sslkey) is not one."""

# name=value in a URL's query. A value runs to the next "&name=": a password holding
# a bare "&" (which SQLAlchemy would split) is masked whole rather than half shown.
_QUERY_PARAM = re.compile(r"(?P<lead>[?&])(?P<name>[^=&?]+)=(?P<value>.*?)(?=&[^&=]*=|$)", re.S)
# name=value in a libpq keyword/value string ("host=db password='a b'"), pasted as a URL.
_KEYWORD_PARAM = re.compile(
    r"(?P<lead>^|\s)(?P<name>[\w.-]+)(?P<eq>\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|\S*)"
)


def describe_url(url: Any) -> str:
    """A URL fit for logs and errors: no password, no secret query value is shown.

    Masked on the text as written, parsed or not: SQLAlchemy's own parse ends the
    password at its first "@", and then shows the rest of a password holding a bare
    "@" as the host. Here the userinfo ends at the last "@" (a password may hold "@",
    "/", ":", "?" and "#"), so a URL with an "@" further on is masked too widely, never
    too narrowly. A URL object is rendered by SQLAlchemy first, which %-encodes them.
    """
    if isinstance(url, URL):
        text = url.render_as_string(hide_password=True)
    else:
        text = "" if url is None else str(url)
    return _mask_secret_params(_mask_userinfo(text)) or "<empty URL>"


def _mask_userinfo(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep:  # no scheme: "user:password@host/db" is still a password
        scheme, rest = "", text
    at = rest.rfind("@")
    if at < 0:
        # No "@": "user:password" with "@host" forgotten reads as host:port. A port is a
        # number; anything else after the colon may be a password.
        forgot = sep and re.match(r"([^/?:\[\]]*):([^/?]+)", rest)
        if not forgot or forgot[2].isdigit():
            return text
        return f"{scheme}{sep}{forgot[1]}:{MASK}{rest[forgot.end():]}"
    user, colon, _password = rest[:at].partition(":")
    if not colon:
        return text
    return f"{scheme}{sep}{user}:{MASK}{rest[at:]}"


def _mask_secret_params(text: str) -> str:
    def masked(match: re.Match[str]) -> str:
        if not _SECRET_NAME.search(unquote_plus(match["name"])):
            return match[0]
        return match[0][: match.start("value") - match.start()] + MASK

    return _KEYWORD_PARAM.sub(masked, _QUERY_PARAM.sub(masked, text))
