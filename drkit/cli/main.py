"""The drkit command line: each command parses, loads settings, runs one operation, renders.

``wal-push`` and ``wal-fetch`` run once per WAL segment on PostgreSQL's critical path, so
``main()`` hands them to drkit/cli/wal.py before anything heavy is imported: the typer app (typer,
rich, pydantic, psycopg through the commands) is built only for the other commands, on first use
of ``app`` (``from drkit.cli.main import app`` still works: PEP 562 module ``__getattr__``).
A command line naming a command gets an app holding that command alone: the other commands'
modules are not imported nor their options built (a restore's start-up is part of its RTO).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import Any

_FAST_COMMANDS = ("wal-push", "wal-fetch", "wal-pusher", "wal-fetcher")
# 128 + SIGINT, 128 + SIGTERM: drkit.interrupts.Interrupted's exit codes
_INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)
_app: Any = None


# Each command: its name -> the drkit.cli module defining it and the attribute, ``command`` (or
# ``app``: a group of commands), in the order ``drkit --help`` lists them
_COMMANDS = {
    "init": ("init", "command"),
    "backup": ("backup", "command"),
    "info": ("info", "command"),
    "verify": ("verify", "command"),
    "check": ("check", "command"),
    "restore": ("restore", "command"),
    "replicate": ("replicate", "command"),
    "prune": ("prune", "command"),
    "heartbeat": ("heartbeat", "command"),
    "schedule": ("schedule", "command"),
    "metrics": ("metrics", "command"),
    "report": ("report", "command"),
    "keys": ("keys", "app"),
    "drill": ("drill", "app"),
}


def _build_app(only: str | None = None) -> Any:
    """The typer app: every command, or (``only``) that one command alone."""
    import importlib

    import typer

    from drkit import __version__
    from drkit.cli.common import render_error
    from drkit.cli.help import EXIT_CODES, DrkitGroup
    from drkit.errors import DrkitError
    from drkit.logs import DEFAULT_LEVEL, LEVEL_ENV, LEVELS, setup_logging

    app = typer.Typer(
        cls=DrkitGroup,
        name="drkit",
        help="Backup and disaster recovery for PostgreSQL.",
        epilog=EXIT_CODES,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,
    )

    def _version(value: bool) -> None:
        if value:
            typer.echo(f"drkit {__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="show the version"
        ),
        log_level: str = typer.Option(
            DEFAULT_LEVEL,
            "--log-level",
            envvar=LEVEL_ENV,
            metavar="|".join(LEVELS),
            help="least severe messages logged on stderr",
        ),
    ) -> None:
        """Backup and disaster recovery for PostgreSQL."""
        try:
            setup_logging(log_level, "--log-level or " + LEVEL_ENV)
        except DrkitError as exc:
            render_error(exc)
            raise typer.Exit(exc.exit_code) from None

    for name, (module, attribute) in _COMMANDS.items():
        if only is None or only == name:
            defined = getattr(importlib.import_module(f"drkit.cli.{module}"), attribute)
            if attribute == "app":
                app.add_typer(defined, name=name)
            else:
                app.command(name)(defined)
    if only is None or only in _FAST_COMMANDS:
        from drkit.cli import wal

        wal.register(app)  # wal-push, wal-fetch (+ hidden wal-pusher, wal-fetcher)
    return app


def __getattr__(name: str) -> Any:
    global _app
    if name == "app":
        if _app is None:
            _app = _build_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    # pydantic looks for plugins in the entry points of every installed distribution when the
    # first model is built (tens of milliseconds per command); drkit's models want none
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    try:
        if len(sys.argv) > 1 and sys.argv[1] in _FAST_COMMANDS:
            from drkit.cli.wal import run_fast

            code = run_fast(sys.argv[1:])
            if code is not None:  # None: --help or a usage error, which typer explains
                sys.exit(code)
        command = sys.argv[1] if len(sys.argv) > 1 else None
        if command in _COMMANDS or command in _FAST_COMMANDS:
            _build_app(command)()
        else:  # drkit --help, options before the command, a mistyped command
            __getattr__("app")()
    except SystemExit as exc:
        _exit(exc.code)
    _exit(0)


def _exit(code: object) -> None:
    """End the process as Python would (threads joined, exit handlers run, output flushed) but
    without tearing down every imported module one by one: that takes 50-100 ms, on every
    backup and on every wal-push, for memory the kernel frees anyway. Files drkit writes are
    closed (and synced where it matters) by the operations themselves. After SIGINT or SIGTERM
    the workers still running are not waited for: what they write is never listed."""
    if code not in _INTERRUPTED:  # an interrupted command does not wait for its workers
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what sys.exit("message") prints
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code or 0)
