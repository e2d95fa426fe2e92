"""What remote mode needs of the server and the role, checked before anything is taken.

`drkit init` and `drkit check` call it, so a missing grant is named once, clearly, rather than
surfacing as a failure halfway through a backup.
"""

from __future__ import annotations

from drkit.config.settings import PostgresSettings
from drkit.errors import RemotePrivilegeMissing
from drkit.pg.basebackup import check_remote_version, connect_replication
from drkit.pg.session import PgSession


def check_remote_access(
    session: PgSession, settings: PostgresSettings, functions: tuple[str, ...] = ()
) -> str:
    """Raise RemotePrivilegeMissing naming every attribute and grant the role lacks (or the
    error a replication connection gets); a line saying what was proven otherwise. Runs before
    anything else asks the server, so that a missing grant is named rather than failing a query.
    ``functions``: what the command calls besides a backup's functions."""
    check_remote_version(session.version_num())
    missing = session.missing_remote_privileges(functions)
    if missing:
        lines = "\n".join(f"  - {m}" for m in missing)
        raise RemotePrivilegeMissing(
            f"the role drkit connects as lacks what remote backups need:\n{lines}",
            hint="docs/remote.md shows the role to create; or connect as a superuser",
        )
    connect_replication(settings.conninfo()).finish()
    tls = f", sslmode={settings.sslmode}" if settings.sslmode else ""
    return f"remote mode: the role may take base backups over a replication connection{tls}"
