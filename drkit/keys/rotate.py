"""Make a new version of the wrapping key; new data keys use it from now on.

Existing records keep their version until ``drkit keys rewrap`` moves them; nothing in any
repository is touched here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from drkit.config.settings import Settings
from drkit.keys.common import KeyVersions, open_managed_keys
from drkit.result import OperationResult


@dataclass(kw_only=True)
class RotateResult(KeyVersions, OperationResult):
    """The key's versions after the rotation. ``phases``: rotate."""


def rotate_key(settings: Settings) -> RotateResult:
    """Make a new version of the configured wrapping key (Vault Transit or KV)."""
    return RotateOperation(settings).run()


class RotateOperation:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self) -> RotateResult:
        keys = open_managed_keys(self.settings)
        started = time.monotonic()
        state = keys.require_versioned("rotate").rotate()
        return RotateResult(
            provider=state.provider,
            key=state.key,
            latest_version=state.latest_version,
            min_decryption_version=state.min_decryption_version,
            phases={"rotate": time.monotonic() - started},
        )
