"""What every command shares: the --config option, settings, error rendering, output, progress."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer

from drkit.config.settings import Settings, config_path, load_settings
from drkit.errors import DrkitError, DrkitWarning
from drkit.interrupts import Interrupted, interruptible
from drkit.logs import add_log_file, event, redacted
from drkit.progress import Progress as ProgressProtocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", envvar="DRKIT_CONFIG", help="drkit.toml to use", show_default=False
    ),
]
RecoveryKeyOption = Annotated[
    Path | None,
    typer.Option(help="unwrap data keys with this escrow recovery key; never contacts Vault"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print machine-readable JSON")]


class LazyConsole:
    """A rich Console on stdout or stderr, made on first use: rich is some 50 modules, which a
    command printing only JSON, off a terminal, never needs (its start-up is part of a restore's
    RTO)."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, highlight=False, soft_wrap=True)
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        self.console.print(*objects, **options)

    @property
    def is_terminal(self) -> bool:
        """rich's answer; a stream that is no terminal, with neither of the variables that make
        rich treat it as one, is answered without loading rich."""
        if self._console is None and not {"TTY_COMPATIBLE", "FORCE_COLOR"} & os.environ.keys():
            stream = sys.stderr if self._stderr else sys.stdout
            with contextlib.suppress(ValueError):  # a closed stream: rich says no terminal too
                if not stream.isatty():
                    return False
        return self.console.is_terminal


stdout = LazyConsole()
stderr = LazyConsole(stderr=True)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def settings_from(config: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load the settings and start the log file they name ([log] path)."""
    settings = load_settings(config, overrides)
    if settings.log.path is not None:
        add_log_file(settings.log.path, settings.log.level)
    # every setting in effect; pydantic masks SecretStr values, redacted() passwords in strings
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "settings loaded",
            extra={
                "config": str(config_path(config)),
                "settings": redacted(settings.model_dump(mode="json")),
            },
        )
    return settings


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn a DrkitError into one error line (+ hint) on stderr and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except DrkitError as exc:
            render_error(exc)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


@contextmanager
def stopped_by_signals(error: Callable[[Interrupted], DrkitError]) -> Iterator[None]:
    """SIGINT and SIGTERM stop the block (drkit/interrupts.py): ``error(exc)`` says what was
    stopped and what it left, and the command exits with 128 + the signal's number."""
    try:
        with interruptible():
            yield
    except Interrupted as exc:
        render_error(error(exc))
        raise typer.Exit(exc.exit_code) from None


def render_error(exc: DrkitError) -> None:
    stderr.print(f"[red]error:[/red] {exc.message}", markup=True, highlight=False)
    if exc.hint:
        stderr.print(f"HINT: {exc.hint}", markup=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False)


def warn_all(warnings: list[DrkitWarning]) -> None:
    """One line per warning an operation collected (+ its hint) on stderr."""
    for warning in warnings:
        warn(warning.message)
        if warning.hint:
            stderr.print(f"HINT: {warning.hint}", markup=False)


class RichProgress:
    """A transfer progress bar on stderr; used only when stderr is a terminal. It fits the
    terminal (80 columns included): the bar takes what the other columns leave, and a chain's
    label is shown by its last part (``backup …20261207-020000I``)."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=None),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(compact=True),
            console=console or stderr.console,
            transient=True,
            expand=True,
        )
        self._task: TaskID | None = None

    def start(self, description: str, total: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task(_short_labels(description), total=total)

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, amount)

    def stop(self) -> None:
        self._bar.stop()


def _short_labels(text: str) -> str:
    """``backup F_D_I`` -> ``backup …I``: the last part of a chain's label says which it is."""
    return re.sub(r"\S+_(\S+)", "…\\1", text)


class LogProgress:
    """Progress off a terminal (cron, systemd, a pod): one log record when a transfer starts
    and one when it ends, with its size and duration as fields."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._task: str | None = None
        self._total = self._done = 0
        self._started = 0.0

    def start(self, description: str, total: int) -> None:
        self._task, self._total, self._done = description, total, 0
        self._started = time.monotonic()
        event(log, f"{description} started", task=description, bytes_total=total)

    def advance(self, amount: int) -> None:
        with self._lock:
            self._done += amount

    def stop(self) -> None:
        if self._task is None:  # stopped already (an operation stops it again on failure)
            return
        seconds = round(time.monotonic() - self._started, 3)
        event(
            log,
            f"{self._task} ended",
            task=self._task,
            bytes=self._done,
            bytes_total=self._total,
            seconds=seconds,
        )
        self._task = None


def progress() -> ProgressProtocol:
    return RichProgress() if stderr.is_terminal else LogProgress()


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def objective_text(
    achieved_seconds: float | None, target_seconds: float | None, **_: object
) -> str:
    """An RTO or RPO as achieved/target, e.g. ``38.2s/4h``; ``-`` for what is unknown."""
    from drkit.config.durations import format_duration

    values = (achieved_seconds, target_seconds)
    return "/".join(format_duration(v) if v is not None else "-" for v in values)
