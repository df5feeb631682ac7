"""What every verb shares at its edge: logging that never shows a secret, `key=value` arguments, and
one way to fail — a single `error:` line naming the culprit and the fix, and exit status 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence

from .credentials import redact
from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


class RedactingFilter(logging.Filter):
    """Formats each record once and redacts it, so a URI with a password never reaches a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())


def report(exc: BaseException) -> int:
    print(f"error: {redact(' '.join(str(exc).split()))}", file=sys.stderr)
    return EXIT_USER_ERROR


def run_verb(main: Callable[[], int | None]) -> int:
    """A verb's outer frame: logging set up, its exit status, bad input reported as one line."""
    setup_logging()
    try:
        return main() or 0
    except UserError as exc:
        return report(exc)
    except OSError as exc:
        from .disk import READ_ONLY_ERRNOS, disk_full, is_disk_full

        if is_disk_full(exc):
            return report(disk_full(exc.filename or ".", "it"))
        if exc.errno in READ_ONLY_ERRNOS:
            return report(UserError(f"{exc.filename} is on a read-only file system and this command writes there: "
                                    "`status`, `curves out=<dir>` and `relog dry_run=true` read a sweep without "
                                    "writing to it; run this one where the sweep root is writable"))
        raise
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): finished work is kept; run the same command again to go on", file=sys.stderr)
        return EXIT_INTERRUPTED


def key_value_args(argv: Sequence[str], defaults: Mapping[str, str | None], usage: str,
                   choices: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """`key=value` arguments over `defaults` (the verbs take them as Hydra would); `sweep` is required.
    An unknown key, a value outside `choices` or a missing sweep is a UserError that shows `usage`."""
    args = dict(defaults)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in args:
            raise UserError(f"unknown argument {item!r}; {usage}")
        args[key] = value
    for key, allowed in (choices or {}).items():
        if args[key] not in allowed:
            raise UserError(f"{key}={args[key]!r}: expected one of {', '.join(allowed)}; {usage}")
    if not args.get("sweep"):
        raise UserError(f"sweep=<name> is required; {usage}")
    from .layout import check_name

    check_name("sweep", args["sweep"])
    return args
