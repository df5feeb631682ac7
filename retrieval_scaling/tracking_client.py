"""The connection to the tracking store: which store a sweep uses, its URI with the secret kept out of
configs, and an MLflow client whose every call is retried on transient failures, within a bounded and
reported budget."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .credentials import MASK, redact
from .errors import UserError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow prints "View run … at: <host>" with the host as given, a URI's password included.
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
# MLflow's own HTTP retries (7, doubling: ~4 silent minutes) give way to `retrying`'s, which are bounded
# by RETRY_ENV and say what they are waiting for.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
RETRY_ENV = "RS_TRACKING_RETRY_S"
DEFAULT_RETRY_S = 120.0
URI_ENV = "MLFLOW_TRACKING_URI"
log = logging.getLogger(__name__)


class TrackingUnavailable(UserError):
    """The tracking store did not answer within the retry budget."""


def tracking_uri(tracking_cfg: Mapping[str, Any], sweep_root: str | os.PathLike) -> str:
    """$MLFLOW_TRACKING_URI (via config) if set, else SQLite at <sweep root>/mlflow.db. A job's config
    holds the URI redacted (see `hide_secret`); its password comes back from the environment."""
    uri = tracking_cfg.get("uri")
    if not uri:
        return f"sqlite:///{Path(sweep_root).resolve() / 'mlflow.db'}"
    uri = str(uri)
    if MASK in uri:
        full = os.environ.get(URI_ENV, "")
        if redact(full) != uri:
            raise UserError(f"tracking.uri {uri} has its secret redacted and ${URI_ENV} does not hold it: "
                            f"export {URI_ENV} with the full URI where the job runs")
        return full
    return uri


def hide_secret(uri: str) -> str:
    """The URI to write into configs: redacted, with the full one exported to $MLFLOW_TRACKING_URI for
    the jobs this process starts (local workers and sbatch inherit the environment)."""
    if redact(uri) != uri:
        os.environ[URI_ENV] = uri
    return redact(uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite URI (query string and all), None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def store_exists(uri: str) -> bool:
    """False only for a SQLite store not created yet (opening it would create it)."""
    path = sqlite_path(uri)
    return path is None or path.is_file()


# Failures worth waiting out: a server restarting or overloaded, a database busy or out of connections.
TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


TRANSIENT_TEXT = re.compile(
    r"QueuePool limit|API request to .* failed with exception|database is locked|Max retries exceeded|"
    r"Connection refused|Connection reset|could not connect|timed out|server closed the connection|"
    r"too many clients|failed with error code 50[234]")


def is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException) and exc.error_code in TRANSIENT_CODES:
        return True
    return isinstance(exc, (MlflowException, OSError)) and TRANSIENT_TEXT.search(str(exc)) is not None


def retry_budget_s() -> float:
    return float(os.environ.get(RETRY_ENV) or DEFAULT_RETRY_S)


def retrying(call: Callable[[], Any], what: str, uri: str, budget_s: float | None = None,
             sleep: Callable[[float], None] = time.sleep) -> Any:
    """`call()`, retried on transient failures with doubling waits (1 s, 2 s, … at most 30 s) for at
    most `budget_s` seconds (default: $RS_TRACKING_RETRY_S or 120), each retry logged; then
    TrackingUnavailable, which names the store (redacted), the call and the last failure."""
    budget = retry_budget_s() if budget_s is None else budget_s
    start, wait, tries = time.monotonic(), 1.0, 0
    while True:
        tries += 1
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 — sorted into transient or not just below
            from .disk import disk_full, is_disk_full

            if is_disk_full(exc):  # MLflow reports SQLite's full disk as TEMPORARILY_UNAVAILABLE
                raise disk_full(sqlite_path(uri) or redact(uri), f"the tracking store ({what})") from None
            if not is_transient(exc):
                raise
            reason = redact(" ".join(str(exc).split()))[:300]
            spent = time.monotonic() - start
            if spent + wait > budget:
                raise TrackingUnavailable(
                    f"tracking store {redact(uri)} did not answer {what} ({tries} tries over {spent:.0f} s): "
                    f"{reason}. Check that it is up and reachable, or point tracking.uri / ${URI_ENV} at one "
                    f"that is (${RETRY_ENV} sets how long to wait)") from None
            log.warning("tracking store %s: %s failed (%s); retry %d in %.0f s (up to %.0f s in all)",
                        redact(uri), what, reason, tries, wait, budget)
            sleep(wait)
            wait = min(2 * wait, 30.0)


class RetryingClient:
    """An MlflowClient whose every call goes through `retrying`."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        with _store_lock(uri):  # opening a SQLite store migrates its schema: one process at a time
            self.uri, self.inner = uri, MlflowClient(tracking_uri=uri)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: retrying(lambda: attr(*args, **kwargs), name, self.uri)


def client(uri: str) -> RetryingClient:
    return RetryingClient(uri)


UNWRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)  # a mount or directory this process cannot write


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store, an exclusive lock on `<db>.lock` (two sweeps started at once on a fresh
    store would both run the schema migration, and one fails with "table experiments already exists")."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        handle = open(db.with_name(db.name + ".lock"), "a")  # noqa: SIM115 — closed below
    except OSError as exc:
        if exc.errno not in UNWRITABLE_ERRNOS or not db.is_file():
            raise
        yield  # a store on a read-only mount: read, never migrated by anyone, so no lock is needed
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
