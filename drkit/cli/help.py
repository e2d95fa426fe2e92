"""How ``--help`` reads: plain text that can be copied, words instead of Python types.

typer labels every option with its Python annotation (``--backup <str>``, ``--dry-run <bool>``,
``--tablespace-map <list[str]>``) and draws its rich help in boxes whose frame ends up in
whatever is copied from it. ``DrkitGroup`` (the root command's class) walks every command once
when the command tree is built: plain click help for each, flags without a type, and each
option's value named for what it is (``--pgdata DIR``, ``--backup LABEL``), by its ``metavar``
where a command gives one, else by the table below, else by its own name.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperGroup

# Values whose name says less than a word would: option name -> metavar.
METAVARS = {
    "config": "FILE",
    "recovery_key": "FILE",
    "textfile": "FILE",
    "pgdata": "DIR",
    "backup": "LABEL",
    "repo": "NAME",
    "process_max": "N",
    "compress_level": "N",
    "timeout": "SECONDS",
    "target_time": "TIME",
    "target_lsn": "LSN",
    "target_xid": "XID",
    "target_name": "NAME",
    "target_timeline": "TIMELINE",
    "interval": "DURATION",
    "rto": "DURATION",
    "rpo": "DURATION",
    "scenario": "FILE",
    "started_by": "WHO",
    "by": "WHO",
    "tablespace_map": "OID=DIR",
    "from": "DATE",
    "to": "DATE",
    "path": "PATH",
    "name": "WALNAME",
    "dest": "PATH",
}

EXIT_CODES = (
    "Exit codes: 0 ok; 1 warnings of several kinds; 2 a usage error (a bad option or value: the"
    " usage is printed) or an error of no more specific kind; 3-99 a specific error; 100-127 a"
    " specific warning (the command completed). Every code: docs/operations.md."
)


# Each command's examples, as typed (the test suite parses every one against the command).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "init": ("drkit init --config /etc/drkit/main.toml",),
    "backup": ("drkit backup --type full", "drkit backup --type incr --start-fast"),
    "info": ("drkit info", "drkit info --json --repo offsite"),
    "verify": ("drkit verify", "drkit verify --backup 20261126-010000F --wal"),
    "check": ("drkit check", "drkit check --nagios --timeout 30"),
    "restore": (
        "drkit restore --pgdata /var/lib/postgresql/15/restored",
        "drkit restore --pgdata /srv/pitr --target-time '2026-11-27 10:15:00+00'",
        "drkit restore --pgdata /srv/pg2 --type standby --primary-conninfo 'host=db1'",
        "drkit restore --plan --backup 20261126-010000F",
        "drkit restore --delta --pgdata /var/lib/postgresql/15/main",
        "drkit restore --delta --trust-timestamps --pgdata /srv/drill-copy",
    ),
    "replicate": ("drkit replicate",),
    "prune": (
        "drkit prune --dry-run",
        "drkit prune --backup 20261126-010000F --with-dependents --dry-run",
    ),
    "heartbeat": ("drkit heartbeat --interval 10s", "drkit heartbeat --once"),
    "schedule": ("drkit schedule --list", "drkit schedule"),
    "metrics": (
        "drkit metrics --textfile /var/lib/node_exporter/drkit.prom",
        "drkit metrics --serve --config /etc/drkit/drkit.toml",
    ),
    "report": (
        "drkit report --quarter 2026Q4 --out reports/",
        "drkit report --from 2026-10-01 --to 2026-12-31 --format md",
    ),
    "wal-push": ("drkit wal-push --config /etc/drkit/main.toml pg_wal/000000010000000000000007",),
    "wal-fetch": ("drkit wal-fetch --config /etc/drkit/main.toml 000000010000000000000007 x",),
    "keys": ("drkit keys status",),
    "keys create-keyfile": ("drkit keys create-keyfile /etc/drkit/backup.key",),
    "keys escrow-init": ("drkit keys escrow-init --out /root/drkit-recovery",),
    "keys rotate": ("drkit keys rotate",),
    "keys rewrap": ("drkit keys rewrap --dry-run",),
    "keys status": ("drkit keys status --repo offsite",),
    "drill": ("drkit drill", "drkit drill --scenario runbooks/site-loss.toml --rto 4h --rpo 1h"),
    "drill list": ("drkit drill list --json",),
    "drill note": ("drkit drill note 20261207-131500Z-3f9a --finding 'slow disks' --owner dba",),
    "drill signoff": ("drkit drill signoff --quarter 2026Q4 --by 'J. Doe, head of operations'",),
}


def examples(path: str) -> str:
    """The epilog of command ``path`` ('keys rotate'): its examples, kept as typed lines."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {c}" for c in EXAMPLES[path])


class DrkitGroup(TyperGroup):
    """The root command: plain help and named values for every command beneath it."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for name, sub in self.commands.items():
            _plain_help(sub, name)


def _plain_help(command: Any, path: str) -> None:
    command.rich_markup_mode = None
    if path in EXAMPLES:
        command.epilog = examples(path)
    for param in command.params:
        _name_value(param)
    for name, sub in getattr(command, "commands", {}).items():
        _plain_help(sub, f"{path} {name}")


class _NamedArgument(TyperArgument):
    """An argument listed by its name alone (typer adds its Python type)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def _name_value(param: Any) -> None:
    if isinstance(param, TyperArgument):
        param.__class__ = _NamedArgument  # same fields; only the help line differs
    if param.metavar is not None or getattr(param, "is_flag", False):
        return
    described = param.type_descriptor
    if described.is_choice and described.choices:
        param.metavar = "|".join(str(getattr(c, "value", c)) for c in described.choices)
    else:
        name = (param.name or "value").rstrip("_")  # format_: a Python keyword's escape
        param.metavar = METAVARS.get(name) or name.upper().replace("_", "-")
    if param.nargs != 1:  # an argument taking several values (a repeatable option takes one)
        param.metavar += " ..."
