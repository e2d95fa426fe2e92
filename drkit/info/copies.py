"""3-2-1: at least 3 copies (the live database counts as one), on 2 kinds of media, 1 offsite.

Copies are counted from what each repository actually holds (a backup's manifest is listed there),
never from a record of what was meant to be copied. A repository that cannot be listed counts as
holding nothing, and is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drkit.config.settings import Settings
from drkit.errors import DrkitError
from drkit.repo.open import open_repository
from drkit.repo.wal_names import WAL_PREFIX

LIVE_MEDIA = "disk"  # the running database's own copy


@dataclass
class CopyStatus:
    repos: list[str]  # repositories holding the backup
    copies: int  # including the live database
    media: list[str]
    offsite: int

    @property
    def passes(self) -> bool:
        return self.copies >= 3 and len(self.media) >= 2 and self.offsite >= 1

    def as_dict(self) -> dict[str, object]:
        return {
            "repos": self.repos,
            "copies": self.copies,
            "media": self.media,
            "offsite": self.offsite,
            "rule_3_2_1": "PASS" if self.passes else "FAIL",
        }


@dataclass
class CopyMap:
    holdings: dict[str, set[str]] = field(default_factory=dict)  # repo -> labels it holds
    wal: dict[str, set[str]] = field(default_factory=dict)  # repo -> WAL object keys
    unreachable: dict[str, str] = field(default_factory=dict)  # repo -> error

    @classmethod
    def scan(cls, settings: Settings) -> CopyMap:
        found = cls()
        for repo_settings in settings.repo:
            try:
                repo = open_repository(settings, repo_settings.name)
                found.holdings[repo.name] = {str(label) for label in repo.backups()}
                found.wal[repo.name] = {o.key for o in repo.storage.list(WAL_PREFIX)}
            except DrkitError as exc:
                found.unreachable[repo_settings.name] = str(exc)
                found.holdings[repo_settings.name] = set()
                found.wal[repo_settings.name] = set()
        return found

    def status(self, settings: Settings, label: str) -> CopyStatus:
        holders = [r for r in settings.repo if label in self.holdings.get(r.name, set())]
        return CopyStatus(
            repos=[r.name for r in holders],
            copies=1 + len(holders),
            media=sorted({LIVE_MEDIA, *(r.media for r in holders)}),
            offsite=sum(1 for r in holders if r.offsite),
        )

    def wal_lag(self, primary: str) -> dict[str, int]:
        """WAL files in the primary that each other repository lacks."""
        source = self.wal.get(primary, set())
        return {name: len(source - keys) for name, keys in self.wal.items() if name != primary}
