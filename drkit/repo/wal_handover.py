"""The WAL period keys a restore with the recovery key hands to recovery (crypto/walkeys.py).

Recovery from a backup replays WAL pushed after the backup started, so the periods it can need
are the one the backup's start falls in and every later one. Each key record of those periods
is unwrapped and authenticated here, as ``wal-fetch --recovery-key`` would (a record that is not
signed by the repository's signing key is left out and logged), so the file recovery reads
holds only genuine keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from drkit.crypto.walkeys import record_digest
from drkit.errors import DrkitError
from drkit.repo.repository import Repository
from drkit.repo.wal_objects import KEYS_PREFIX

log = logging.getLogger(__name__)


def handover_keys(repos: Sequence[Repository], since: datetime) -> dict[str, bytes]:
    """Record digest -> DEK for every authentic key record, in any of ``repos``, of the WAL
    periods from the one holding ``since`` on. A repository that cannot be listed is skipped:
    the others' copies hold the same records."""
    keys: dict[str, bytes] = {}
    first = since.astimezone(UTC).strftime("%Y%m%d%H")
    for repo in repos:
        try:
            objects = repo.storage.list(KEYS_PREFIX)
        except DrkitError as exc:
            log.warning("WAL keys of repository '%s' not read: %s", repo.name, exc.message)
            continue
        for obj in objects:
            period, _, file = obj.key[len(KEYS_PREFIX) :].partition("/")
            if not file.endswith(".json") or period < first[: len(period)]:
                continue
            try:
                record = json.loads(repo.storage.read_bytes(obj.key))
                digest = record_digest(record)
                if digest in keys:
                    continue
                dek = repo.keys.unwrap(record)
                repo.auth.check_key_record(record, dek, "wal", period, obj.key)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                log.warning("WAL key record '%s' left out: %s", obj.key, exc)
                continue
            except DrkitError as exc:
                log.warning("WAL key record '%s' left out: %s", obj.key, exc.message)
                continue
            keys[digest] = dek
    return keys
