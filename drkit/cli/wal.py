"""drkit wal-push / wal-fetch: PostgreSQL's archive_command and restore_command.

    archive_command = 'drkit wal-push --config /etc/drkit/drkit.toml %p'
    restore_command = 'drkit wal-fetch --config /etc/drkit/drkit.toml %f %p'

These run once per WAL segment, so ``drkit.cli.main.main`` calls ``run_fast`` before typer is
imported, and nothing here imports typer, rich, pydantic or psycopg at module level (typer only in
``register``, for ``--help`` and the in-process test runner). Errors are one line on stderr,
prefixed with the command, because they land in PostgreSQL's log.

Exit codes (docs/wal-archiving.md):

- wal-push: 0 once the file is durably archived (or was already, with identical content);
  otherwise the drkit error's code (2..15, e.g. 10 for a conflicting archived copy), all below
  126 so that PostgreSQL's archiver simply retries later.
- wal-fetch: 0 with the file written; 1 when no repository has it and every repository is there
  (PostgreSQL then ends recovery or keeps waiting, as with a missing file); 200 + the drkit
  error's code for every real error in any repository asked (damage, wrong key, a repository
  that is unreachable or not there, bad configuration). PostgreSQL treats a
  restore_command exit status above 125 as fatal and aborts recovery, instead of taking the
  failure for the end of the archive and opening the database at the wrong point.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from drkit.config.settings import Settings

FETCH_ERROR_BASE = 200
_INTERNAL_ERROR = 2


def wal_push(path: str, config: Path | None) -> int:
    """archive_command: push one WAL file; returns the exit code."""
    from drkit.errors import DrkitError

    try:
        from drkit.wal.config import load_wal_config

        settings = load_wal_config(config, one_shot=True)
        source = Path(path)
        if settings.archive.async_:
            from drkit.wal.spool import push_async

            if push_async(settings, source):
                return 0
        from drkit.repo.wal_objects import WalKeyring
        from drkit.wal.push import Pusher, PushOptions

        repo = settings.open_repository()
        options = PushOptions(settings.archive.key_period, settings.archive.compress_level)
        result = Pusher(repo, options, WalKeyring(repo, cache=False)).push(source)
        if not result.stored:
            _say(
                "wal-push",
                f"WAL file {result.name} was already archived with identical content;"
                " nothing to do",
            )
        return 0
    except DrkitError as exc:
        _fail("wal-push", exc.message, exc.hint)
        return exc.exit_code
    except Exception as exc:  # never a traceback in PostgreSQL's log, always a non-zero exit
        _fail("wal-push", f"unexpected error: {exc!r}", None)
        return _INTERNAL_ERROR


def wal_fetch(
    name: str,
    dest: str,
    config: Path | None,
    recovery_key: Path | None = None,
    repos: list[str] | None = None,
    prefetch: bool = False,
) -> int:
    """restore_command: fetch one WAL file to ``dest``; returns the exit code. A file missing,
    unreadable or damaged in the primary repository is fetched from the next one that has it.
    ``repos``: only these repositories, in this order; ``prefetch``: through the background
    fetcher ([archive] fetch_ahead)."""
    from drkit.errors import DrkitError

    try:
        from drkit.wal.config import load_wal_config
        from drkit.wal.operation import WalFetchRequest, fetch_wal

        settings = load_wal_config(
            config, recovery_key=recovery_key, one_shot=True, repos=repos, lazy=prefetch
        )
        request = WalFetchRequest(name, Path(dest), recovery_key, repos, prefetch)
        result = fetch_wal(settings, request)
        for warning in result.warnings:
            _say("wal-fetch", warning.message)
        if not result.fetched:
            _say("wal-fetch", f"WAL file {name} is not in repository '{result.searched[0]}'")
        return result.exit_code
    except DrkitError as exc:
        _fail("wal-fetch", exc.message, exc.hint)
        return FETCH_ERROR_BASE + exc.exit_code
    except Exception as exc:
        _fail("wal-fetch", f"unexpected error: {exc!r}", None)
        return FETCH_ERROR_BASE + _INTERNAL_ERROR


def wal_pusher(config: Path | None, idle: float) -> int:
    """The async mode's background pusher (started by wal-push; not for people)."""
    from drkit.errors import DrkitError

    try:
        from drkit.wal.config import load_wal_config
        from drkit.wal.spool import run_pusher

        wal_config = load_wal_config(config)
        return run_pusher(
            wal_config, copy_settings=partial(_full_settings, wal_config.config_path), idle=idle
        )
    except DrkitError as exc:
        _fail("wal-pusher", exc.message, exc.hint)
        return exc.exit_code


def wal_fetcher(
    config: Path | None,
    pgdata: Path,
    segment_size: int,
    recovery_key: Path | None,
    repos: list[str] | None,
    idle: float | None = None,
) -> int:
    """wal-fetch --prefetch's background fetcher (started by wal-fetch; not for people)."""
    from drkit.errors import DrkitError

    try:
        from drkit.wal.config import load_wal_config
        from drkit.wal.fetcher import run_fetcher

        wal_config = load_wal_config(config, recovery_key=recovery_key, repos=repos)
        from drkit.wal.prefetch import IDLE

        return run_fetcher(
            wal_config,
            pgdata,
            segment_size,
            recovery_key,
            repos,
            idle=IDLE if idle is None else idle,
        )
    except DrkitError as exc:
        _fail("wal-fetcher", exc.message, exc.hint)
        return exc.exit_code


def _full_settings(path: Path) -> Settings:
    """The full loader, imported only when called (pydantic is slow to import)."""
    from drkit.config.settings import load_settings

    return load_settings(path)


def _say(command: str, message: str) -> None:
    import logging

    logging.getLogger(__name__).info(message, extra={"command": command})


def _fail(command: str, message: str, hint: str | None) -> None:
    """The error that ends the command: one line on stderr, prefixed with the command, for
    PostgreSQL's log (the command's error rendering, not a log record)."""
    line = " ".join(message.split())  # one line, whatever the message holds
    if hint:
        line += f" (hint: {' '.join(hint.split())})"
    sys.stderr.write(f"drkit {command}: error: {line}\n")
    sys.stderr.flush()


# -- the fast path --------------------------------------------------------------------------------

_ARITY = {"wal-push": 1, "wal-fetch": 2, "wal-pusher": 0, "wal-fetcher": 0}


def run_fast(argv: list[str]) -> int | None:
    """Runs ``argv`` (command first) without typer; None for --help or a usage error, which the
    caller hands to typer so that it prints the usage."""
    import os

    from drkit.errors import DrkitError
    from drkit.logs import DEFAULT_LEVEL, LEVEL_ENV, setup_logging

    try:
        setup_logging(os.environ.get(LEVEL_ENV) or DEFAULT_LEVEL, LEVEL_ENV)
    except DrkitError as exc:
        _fail(argv[0], exc.message, exc.hint)
        return exc.exit_code
    command, rest = argv[0], argv[1:]
    config: Path | None = None
    recovery_key: Path | None = None
    repos: list[str] = []
    idle: float | None = None
    prefetch = False
    pgdata: Path | None = None
    segment_size: int | None = None
    positional: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            positional += rest[i + 1 :]
            break
        if arg in ("--config", "-c") and i + 1 < len(rest):
            config, i = Path(rest[i + 1]), i + 2
            continue
        if arg.startswith("--config="):
            config, i = Path(arg.split("=", 1)[1]), i + 1
            continue
        fetching = command in ("wal-fetch", "wal-fetcher")
        if fetching and arg in ("--recovery-key", "--wal-keys") and i + 1 < len(rest):
            recovery_key, i = Path(rest[i + 1]), i + 2
            continue
        if command == "wal-fetch" and arg == "--prefetch":
            prefetch, i = True, i + 1
            continue
        if command == "wal-fetcher" and arg == "--pgdata" and i + 1 < len(rest):
            pgdata, i = Path(rest[i + 1]), i + 2
            continue
        if command == "wal-fetcher" and arg == "--segment-size" and i + 1 < len(rest):
            if not rest[i + 1].isdigit():
                return None
            segment_size, i = int(rest[i + 1]), i + 2
            continue
        if fetching and arg == "--repo" and i + 1 < len(rest):
            repos.append(rest[i + 1])
            i += 2
            continue
        if command in ("wal-pusher", "wal-fetcher") and arg == "--idle" and i + 1 < len(rest):
            try:
                idle = float(rest[i + 1])
            except ValueError:
                return None
            i += 2
            continue
        if arg.startswith("-") and arg != "-":
            return None
        positional.append(arg)
        i += 1
    if len(positional) != _ARITY[command]:
        return None
    if command == "wal-push":
        return wal_push(positional[0], config)
    if command == "wal-fetch":
        return wal_fetch(
            positional[0], positional[1], config, recovery_key, repos or None, prefetch
        )
    if command == "wal-fetcher":
        if pgdata is None or segment_size is None:
            return None
        return wal_fetcher(config, pgdata, segment_size, recovery_key, repos or None, idle)
    from drkit.wal.spool import DEFAULT_IDLE

    return wal_pusher(config, DEFAULT_IDLE if idle is None else idle)


# -- typer (help, and the in-process CliRunner of the tests) -------------------------------------


def register(app: Any) -> None:
    import typer

    config_option = typer.Option(
        None, "--config", "-c", envvar="DRKIT_CONFIG", help="drkit.toml to use", show_default=False
    )

    @app.command("wal-push")
    def push_command(
        path: str = typer.Argument(..., help="the WAL file to archive (archive_command's %p)"),
        config: Path | None = config_option,
    ) -> None:
        """Archive one WAL file (archive_command = 'drkit wal-push %p')."""
        raise typer.Exit(wal_push(path, config))

    @app.command("wal-fetch")
    def fetch_command(
        name: str = typer.Argument(..., help="the WAL file to fetch (restore_command's %f)"),
        dest: str = typer.Argument(..., help="where to write it (restore_command's %p)"),
        config: Path | None = config_option,
        recovery_key: Path | None = typer.Option(
            None, help="unwrap keys with this escrow recovery key; never contacts Vault"
        ),
        wal_keys: Path | None = typer.Option(
            None,
            help="unwrap keys with the WAL keys file a restore with --recovery-key wrote"
            " (its restore_command passes it)",
        ),
        repo: list[str] | None = typer.Option(
            None,
            help="read only this repository (repeat for several, tried in the order given)",
        ),
        prefetch: bool = typer.Option(
            False,
            "--prefetch",
            help="fetch the next [archive] fetch_ahead segments in the background (run by a"
            " recovering server)",
        ),
    ) -> None:
        """Fetch one archived WAL file (restore_command = 'drkit wal-fetch %f %p').

        Exit 0: written; 1: not archived; above 125: a real error (PostgreSQL aborts recovery).
        """
        keys = wal_keys or recovery_key
        raise typer.Exit(wal_fetch(name, dest, config, keys, repo or None, prefetch))

    @app.command("wal-pusher", hidden=True)
    def pusher_command(
        config: Path | None = config_option,
        idle: float = typer.Option(5.0, help="exit after this many idle seconds"),
    ) -> None:
        """The async mode's background pusher, started by wal-push."""
        raise typer.Exit(wal_pusher(config, idle))

    @app.command("wal-fetcher", hidden=True)
    def fetcher_command(
        pgdata: Path = typer.Option(..., help="the data directory of the recovering server"),
        segment_size: int = typer.Option(..., help="its WAL segment size in bytes"),
        config: Path | None = config_option,
        recovery_key: Path | None = typer.Option(None, help="as wal-fetch --recovery-key"),
        repo: list[str] | None = typer.Option(None, help="as wal-fetch --repo"),
        idle: float | None = typer.Option(None, help="exit after this many seconds unasked"),
    ) -> None:
        """wal-fetch --prefetch's background fetcher, started by wal-fetch."""
        raise typer.Exit(
            wal_fetcher(config, pgdata, segment_size, recovery_key, repo or None, idle)
        )
