"""Turn library errors into one-line messages and exit codes.

Exit codes: 2 for usage errors (bad options, ConfigError), 1 for runtime errors. A traceback is
shown only with ``--debug``.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click

from onnxbits.errors import ConfigError, OnnxbitsError

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    """Return True when the root command got ``--debug``."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.obj and root.obj.get("debug"))


class _WarningLine(logging.Handler):
    """Print the library's warnings (``logging`` records of ``onnxbits.*``) as ``Warning: ...``
    lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"Warning: {' '.join(record.getMessage().split())}", err=True)


def show_library_warnings() -> None:
    """Route the ``onnxbits`` logger's warnings to stderr as one ``Warning:`` line each."""
    logger = logging.getLogger("onnxbits")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        logger.addHandler(_WarningLine(logging.WARNING))


def fail(message: str, code: int) -> None:
    """Print ``message`` as one line on stderr and exit with ``code``."""
    first_line = " ".join(str(message).split())
    click.echo(f"Error: {first_line}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Decorate a command: OnnxbitsError -> one line + exit 1 (ConfigError -> exit 2)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            if debug_enabled():
                traceback.print_exc()
            fail(str(exc), 2)
        except OnnxbitsError as exc:
            if debug_enabled():
                traceback.print_exc()
            fail(str(exc), 1)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # an internal bug: name it, keep the traceback behind --debug
            if debug_enabled():
                traceback.print_exc()
            fail(f"internal error: {type(exc).__name__}: {exc} (a bug in onnxbits, not in "
                 "your input: rerun with --debug and report the traceback)", 1)
        return None

    return wrapper  # type: ignore[return-value]
