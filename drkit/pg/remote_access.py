"""What remote mode needs of the server and the role, checked before anything is taken.

`drkit init` and `drkit check` call it, so a missing grant is named once, clearly, rather than
surfacing as a failure halfway through a backup.
"""

from __future__ import annotations

from drkit.config.settings import PostgresSettings
from drkit.errors import RemotePrivilegeMissing
from drkit.pg.basebackup import check_passfile, check_remote_version, connect_replication
from drkit.pg.session import PgSession


def check_remote_access(session: PgSession, settings: PostgresSettings, version_num: int) -> str:
    """Raise RemotePrivilegeMissing naming every attribute and grant the role lacks (or the
    error a replication connection gets); a line saying what was proven otherwise."""
    check_remote_version(version_num)
    missing = session.missing_remote_privileges()
    if missing:
        lines = "\n".join(f"  - {m}" for m in missing)
        raise RemotePrivilegeMissing(
            f"the role drkit connects as lacks what remote backups need:\n{lines}",
            hint="docs/remote.md shows the role to create; or connect as a superuser",
        )
    connect_replication(settings.conninfo()).finish()
    tls = f", sslmode={settings.sslmode}" if settings.sslmode else ""
    return f"remote mode: the role may take base backups over a replication connection{tls}"


def check_passfile_setting(settings: PostgresSettings) -> None:
    """The configured password file, when there is one, is private."""
    if settings.passfile is not None:
        check_passfile(settings.passfile)
