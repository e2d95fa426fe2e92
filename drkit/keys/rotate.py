"""Make a new version of the wrapping key; new data keys use it from now on.

Existing records keep their version until ``drkit keys rewrap`` moves them; nothing in any
repository is touched here.
"""

from __future__ import annotations

from drkit.config.settings import Settings
from drkit.crypto.rotation import KeyState
from drkit.keys.common import open_managed_keys


class RotateOperation:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self) -> KeyState:
        keys = open_managed_keys(self.settings)
        return keys.require_versioned("rotate").rotate()
