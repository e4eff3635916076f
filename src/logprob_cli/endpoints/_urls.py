"""Credentials never leave in a URL: a URL is shown and stored with its secrets as `***`.

A secret is the password of a URL's userinfo (`http://user:secret@host`) and the value of any
query parameter whose name says it is one (api_key, key, token, secret, password, sig...).
"""

from __future__ import annotations

import re

HIDDEN = "***"
_PASSWORD = re.compile(r"(//[^/\s:@?#]*:)[^/\s?#]*@")  # up to the last @ of the host part, as URL parsers read it
_SECRET_PARAMETER = re.compile(
    r"([?&][^=&\s#]*(?:key|token|secret|password|passwd|pwd|auth|sig|credential)[^=&\s#]*=)[^&\s#)'\"]*", re.IGNORECASE
)


def redact(text: str) -> str:
    """`text` (a URL, or a message quoting URLs) with every URL's password and secret-named query values as ***."""
    return _SECRET_PARAMETER.sub(rf"\g<1>{HIDDEN}", _PASSWORD.sub(rf"\g<1>{HIDDEN}@", text))


def has_userinfo(url: str) -> bool:
    """Whether `url` names a user (and maybe a password) before its host: `http://user:pw@host/v1`."""
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://[^/?#]*@", url, re.IGNORECASE))


USERINFO_REFUSED = (
    "the base URL {url} carries a user name or password: the API key goes in {api_key} or $OPENAI_API_KEY "
    "(sent as a Bearer token, which excludes URL credentials); remove them from the URL"
)
