"""Logging set-up: plain text, or JSON lines carrying the session and task ids.

Sessions put their ids in a context variable; trio tasks inherit the context of the task
that started them, so every line a session's tasks log carries its ids without passing them.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO


@dataclass
class LogContext:
    session_id: str = ""
    task_id: str = ""


current: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar(
    "asrd_log_context", default=None
)


# trio-websocket reads each connection in a task it starts before the session's own, so that
# task's lines (its debug lines, one per frame) lack the session's context. They name their
# connection as their first argument: a session binds its connection to its ids.
_by_connection: weakref.WeakKeyDictionary[object, LogContext] = weakref.WeakKeyDictionary()
_CONNECTION_LOGGER = "trio-websocket"


def bind(connection: object, context: LogContext) -> None:
    """Lines trio-websocket logs about ``connection`` carry ``context``'s ids."""
    _by_connection[connection] = context


def _context(record: logging.LogRecord) -> LogContext | None:
    ctx = current.get()
    if ctx is None and record.name == _CONNECTION_LOGGER and isinstance(record.args, tuple):
        try:
            ctx = _by_connection.get(record.args[0]) if record.args else None
        except TypeError:  # not a connection: a str or int can have no weak reference
            ctx = None
    return ctx


@contextlib.contextmanager
def about(session_id: str, task_id: str = "") -> Iterator[None]:
    """Lines logged inside carry these ids: for a line about a session written by a task
    that serves more than one (a session's own task sets :data:`current` once)."""
    token = current.set(LogContext(session_id, task_id))
    try:
        yield
    finally:
        current.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = _context(record)
        if ctx is not None:
            out["session_id"] = ctx.session_id
            if ctx.task_id:
                out["task_id"] = ctx.task_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = _context(record)
        if ctx is not None and ctx.session_id:
            line += f" [session={ctx.session_id} task={ctx.task_id or '-'}]"
        return line


def stderr_is_journal() -> bool:
    """Whether stderr is systemd's journal: ``$JOURNAL_STREAM`` names its device and inode
    (set for a unit's processes with StandardError=journal, the default)."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):  # no stderr, or not a file
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def _syslog_priority(levelno: int) -> int:
    for level, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4)):
        if levelno >= level:
            return priority
    return 6 if levelno >= logging.INFO else 7


class JournalHandler(logging.StreamHandler[TextIO]):
    """Lines to a stderr that is the journal start with their syslog priority (``<4>``),
    which journald strips and keeps (``SyslogLevelPrefix=``, on by default): without it
    every line was stored at info, and ``journalctl -p warning`` showed no warning or error
    of asrd's."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_syslog_priority(record.levelno)}>{super().format(record)}"


# The options that set this process's logging up, for the asrd processes it starts.
_options: list[str] = []


def setup(level: str, *, json_lines: bool = False) -> None:
    _options[:] = ["--log-level", level] + (["--log-json"] if json_lines else [])
    handler = (JournalHandler if stderr_is_journal() else logging.StreamHandler)(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def options() -> list[str]:
    """The options, before the command, that make another asrd process log as this one does
    (the workers of ``asrd serve``): level and format, as given to :func:`setup`."""
    return list(_options)


def fatal(reason: str) -> None:
    """Say why a command fails: ``asrd: reason`` on stderr for a person, or, under
    ``--log-json``, a JSON line like every other (a log collector parses each line)."""
    if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers):
        logging.getLogger("asrd").critical(reason)
    else:
        priority = f"<{_syslog_priority(logging.CRITICAL)}>" if stderr_is_journal() else ""
        print(f"{priority}asrd: {reason}", file=sys.stderr)
