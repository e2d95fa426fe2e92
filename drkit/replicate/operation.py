"""`drkit replicate`: catch every other repository up with the primary, verify the copies.

The copying itself is the copy service below the operations (drkit/repo/copies.py), which a
backup's fan-out and the async WAL pusher use too.
"""

from __future__ import annotations

from drkit.config.settings import Settings
from drkit.repo.copies import CopyService, ReplicationReport


class ReplicateOperation:
    """Copy every missing backup and the WAL to each other repository."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self) -> ReplicationReport:
        return CopyService(self.settings).catch_up()
