"""Logging: one setup for every command, on stderr and optionally in a log file.

Every module logs through ``logging.getLogger(__name__)`` (all under the ``drkit`` logger); only
the CLI's rendering of results (stdout) and of the error that ends a command writes to the
terminal directly. ``setup_logging`` is called once per command, before anything is logged:

- stderr: one human line per record when stderr is a terminal (``warning: message key=value``),
  otherwise one JSON object per line (``time``, ``level``, ``logger``, ``message`` and the
  record's extra fields), because a non-terminal stderr is read by journald, PostgreSQL's log
  or a log shipper;
- the log file (``[log] path``), when configured: always JSON lines, opened append-only and
  never through a symlink (``open_log_file``), reopened when logrotate moved it away.

The level applies to drkit's own loggers. Third-party libraries (botocore, urllib3, hvac) stay
at WARNING whatever the level: at DEBUG they print request headers and bodies, where
credentials live, and a secret must never reach a log.

Structured events (one line per job start/end, per repository copied) use ``event``: the
message is constant and the facts are fields, so that a machine filters on them::

    event(log, "backup finished", label=label, seconds=round(elapsed, 3))

This module imports only the standard library: wal-push sets up logging on PostgreSQL's
critical path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from drkit.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LEVEL = "info"
LEVEL_ENV = "DRKIT_LOG_LEVEL"
LOG_FILE_MODE = 0o600

_ROOT = "drkit"
MASK = "**********"  # as pydantic shows a SecretStr
_DSN_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s]+)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
# Attributes every LogRecord has: whatever else a record carries came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def parse_level(value: str, source: str) -> int:
    """The logging level named ``value`` (case-insensitive); ConfigError naming ``source``."""
    name = value.strip().lower()
    if name not in LEVELS:
        raise ConfigError(
            f"unknown log level '{value}' in {source}", hint=f"use one of: {', '.join(LEVELS)}"
        )
    return logging.getLevelNamesMapping()[name.upper()]


def event(log: logging.Logger, message: str, /, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event: a constant ``message`` and its facts as fields (JSON keys in
    the JSON lines, ``key=value`` on a terminal). Field names must not be LogRecord attributes
    (``name``, ``msg``, ``args``, ``message``...): logging refuses those with a KeyError."""
    log.log(level, message, extra=fields)


def redacted(value: Any) -> Any:
    """``value`` (nested dicts, lists, strings) with passwords in libpq connection strings
    (``password=...``) and in URLs (``scheme://user:password@host``) masked: for logging a
    configuration whose strings an operator may have written credentials into."""
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    if isinstance(value, str):
        value = _DSN_PASSWORD.sub(r"\1" + MASK, value)
        return _URL_PASSWORD.sub(r"\1" + MASK + "@", value)
    return value


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; values JSON cannot hold become their ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **extra_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


_COLORS = {"debug": "2", "info": "36", "warning": "33", "error": "31", "critical": "31"}  # ANSI


class HumanFormatter(logging.Formatter):
    """``level: message key=value ...`` for a person at a terminal (colored level)."""

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        text = f"\x1b[{_COLORS.get(level, '0')}m{level}\x1b[0m: {record.getMessage()}"
        fields = " ".join(f"{k}={v}" for k, v in extra_fields(record).items())
        if fields:
            text += f"  {fields}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (the CLI test runner
    swaps it), choosing the format when the first record is written."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self._json = JsonFormatter()
        self._human = HumanFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        try:
            formatter = self._human if _is_terminal(stream) else self._json
            stream.write(formatter.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class LogFileHandler(logging.Handler):
    """Appends JSON lines to a file opened by ``open_log_file``. Before each record it checks
    that the path still names the open file and reopens it if not, so logrotate's default
    (rename, then a new file) works for long-running processes too."""

    def __init__(self, path: Path, level: int) -> None:
        super().__init__(level)
        self.path = path
        self.setFormatter(JsonFormatter())
        self._fd = open_log_file(path)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode()
            self._reopen_if_moved()
            os.write(self._fd, line)  # O_APPEND: one write, one whole line at the end
        except Exception:
            self.handleError(record)

    def _reopen_if_moved(self) -> None:
        opened = os.fstat(self._fd)
        try:
            current = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is None or (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            fd = open_log_file(self.path)
            os.close(self._fd)
            self._fd = fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


def open_log_file(path: Path) -> int:
    """Open ``path`` for appending, creating it with mode 0600; never truncates, never follows
    a symlink at ``path``, and refuses what another user could have planted: a directory that
    others may write to without the sticky bit, a file owned by someone else, anything but a
    regular file. Returns the file descriptor; raises ConfigError."""
    path = Path(path)
    hint = "set [log] path to a file in a directory only drkit's user can write to"
    try:
        parent = os.stat(path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot use log file '{path}': {exc.strerror}", hint=hint) from None
    if parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"refusing log file '{path}': its directory is writable by every user", hint=hint
        )
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, LOG_FILE_MODE)  # NONBLOCK: a planted FIFO
    except OSError as exc:
        why = "it is a symbolic link" if os.path.islink(path) else exc.strerror
        raise ConfigError(f"refusing log file '{path}': {why}", hint=hint) from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "it is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = f"it is owned by uid {info.st_uid}, not by drkit's user"
    if problem:
        os.close(fd)
        raise ConfigError(f"refusing log file '{path}': {problem}", hint=hint)
    os.set_blocking(fd, True)
    return fd


def setup_logging(level: str = DEFAULT_LEVEL, source: str = "--log-level") -> None:
    """(Re)configure drkit's logging to stderr at ``level`` (named in errors as coming from
    ``source``), without a log file (``add_log_file``). Replaces the handlers of a previous
    call, so each command (and each in-process test run) starts clean."""
    handler = StderrHandler(parse_level(level, source))
    root = logging.getLogger()
    for old in _handlers():
        root.removeHandler(old)
        old.close()
    root.setLevel(logging.WARNING)  # third-party libraries: warnings only (see the docstring)
    root.addHandler(handler)
    logging.getLogger(_ROOT).setLevel(handler.level)


def add_log_file(path: Path, level: str) -> None:
    """Add (or replace) the log file, at ``level``, keeping stderr as it is."""
    handler = LogFileHandler(path, parse_level(level, "[log] level"))
    root = logging.getLogger()
    for old in [h for h in _handlers() if isinstance(h, LogFileHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    logging.getLogger(_ROOT).setLevel(min(h.level for h in _handlers()))


def _handlers() -> list[logging.Handler]:
    return [
        h for h in logging.getLogger().handlers if isinstance(h, StderrHandler | LogFileHandler)
    ]


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
