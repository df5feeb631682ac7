"""The one place secrets are taken out of text: a tracking URI may carry a password
(`postgresql://user:pw@host/db`, `http://user:pw@host`) or a token in its query string, and it is
written into configs, submitit pickles, logs and error messages. Everything that writes or prints a
URI, a config or an error passes it through `redact` first."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
# `scheme://user:password@` — the password part.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]*@")
# `?…&password=…` — query parameters that name a secret.
_QUERY = re.compile(r"(?P<head>[?&;](?:[A-Za-z_]*(?:password|passwd|pwd|token|secret|key|credential)[A-Za-z_]*)=)"
                    r"[^&\s#'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every URI password and secret query value replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


def redact_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a (nested) config with every string value redacted."""
    def walk(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return redact(value) if isinstance(value, str) else value

    return walk(cfg)
