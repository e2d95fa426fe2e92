"""Vault auth methods: how drkit logs in to Vault and what a login gives (a token and its TTL).

A token (``VAULT_TOKEN``, ``keys.vault.token`` or ``token_file``), AppRole (role_id plus a
secret_id read from a file) and Kubernetes (the service account JWT file and a role). The
secret_id and the JWT are read from their files at every login, so a rotated file is picked up;
a plain token cannot log in again, but a ``token_file`` is read again (an agent may have written
a fresh token).

The client handed to ``login`` is the session's ``hvac.Client`` (drkit/crypto/vault.py). It is
typed ``Any`` here so that hvac stays imported by that one module: what a login calls on it is
``token``, ``auth.token.lookup_self``, ``auth.approle.login`` and ``auth.kubernetes.login``.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from drkit.config.settings import VaultSettings
from drkit.errors import ConfigError


@dataclass
class VaultToken:
    """The current token and when it runs out; ``ttl == 0`` means it never expires."""

    value: str = field(repr=False)
    ttl: float
    renewable: bool
    period: float = 0.0  # the TTL first granted: what a renewal asks for again
    obtained: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.period = self.period or self.ttl

    def age(self) -> float:
        return time.monotonic() - self.obtained

    def expired(self) -> bool:
        return self.ttl > 0 and self.age() >= self.ttl


class Credentials(Protocol):
    method: str
    can_login_again: bool

    def login(self, client: Any, *, lookup: bool) -> VaultToken:
        """Logs in; with ``lookup=False`` a plain token is only set, not looked up (its TTL is
        then unknown, as a one-shot process does not need it)."""
        ...

    def secrets(self) -> list[str]:
        """Secret values read so far, to scrub from any text shown to the user."""
        ...


class _TokenCredentials:
    method = "token"

    def __init__(self, token: str | None, token_file: Path | None) -> None:
        if token is None and token_file is None:
            raise ConfigError(
                "Vault auth 'token' needs a token, and none is set",
                hint="set VAULT_TOKEN (or DRKIT_KEYS__VAULT__TOKEN), or keys.vault.token_file",
            )
        self._token = token
        self._file = token_file
        self._seen: list[str] = [token] if token else []
        # A token file may be refreshed by an agent; a token given directly cannot be replaced.
        self.can_login_again = token is None

    def login(self, client: Any, *, lookup: bool) -> VaultToken:
        value = self._token if self._token is not None else read_secret_file(self._file, "token")
        self._seen.append(value)
        client.token = value
        if not lookup:
            return VaultToken(value, 0, False)
        data = client.auth.token.lookup_self()["data"]
        # Renewals ask for the TTL the token was made with, not what is left of it: a session
        # that logged in late (a job of the scheduler, sharing its token) must never shorten it
        created = float(data.get("creation_ttl") or 0)
        return VaultToken(value, float(data.get("ttl") or 0), bool(data.get("renewable")), created)

    def secrets(self) -> list[str]:
        return self._seen


class _AppRoleCredentials:
    method = "approle"
    can_login_again = True

    def __init__(self, role_id: str, secret_id_file: Path, mount: str) -> None:
        self._role_id = role_id
        self._file = secret_id_file
        self._mount = mount
        self._seen: list[str] = []

    def login(self, client: Any, *, lookup: bool) -> VaultToken:
        secret_id = read_secret_file(self._file, "AppRole secret_id")
        self._seen.append(secret_id)
        auth = client.auth.approle.login(self._role_id, secret_id, mount_point=self._mount)["auth"]
        return _token_from_auth(auth, self._seen)

    def secrets(self) -> list[str]:
        return self._seen


class _KubernetesCredentials:
    method = "kubernetes"
    can_login_again = True

    def __init__(self, role: str, jwt_file: Path, mount: str) -> None:
        self._role = role
        self._file = jwt_file
        self._mount = mount
        self._seen: list[str] = []

    def login(self, client: Any, *, lookup: bool) -> VaultToken:
        # kubelet mounts the projected token 0644 inside the pod: its mode says nothing here
        jwt = read_secret_file(self._file, "Kubernetes service account token", private=False)
        self._seen.append(jwt)
        auth = client.auth.kubernetes.login(self._role, jwt, mount_point=self._mount)["auth"]
        return _token_from_auth(auth, self._seen)

    def secrets(self) -> list[str]:
        return self._seen


def _token_from_auth(auth: dict[str, Any], seen: list[str]) -> VaultToken:
    token = str(auth["client_token"])
    seen.append(token)
    return VaultToken(token, float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))


def credentials_for(settings: VaultSettings) -> Credentials:
    if settings.auth == "approle":
        assert settings.role_id is not None and settings.secret_id_file is not None
        mount = settings.auth_mount or "approle"
        return _AppRoleCredentials(settings.role_id, settings.secret_id_file, mount)
    if settings.auth == "kubernetes":
        assert settings.role is not None
        mount = settings.auth_mount or "kubernetes"
        return _KubernetesCredentials(settings.role, settings.jwt_file, mount)
    token = settings.token.get_secret_value() if settings.token is not None else None
    return _TokenCredentials(token or None, settings.token_file)


def read_secret_file(path: Path | None, what: str, *, private: bool = True) -> str:
    """The secret in ``path``, stripped. With ``private``, a file that group or others may
    access is refused, as for the key file: its secret would let any local user act as drkit."""
    assert path is not None
    try:
        with path.open("rb") as file:
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)  # of what is read
            if private and mode & 0o077:
                raise ConfigError(
                    f"the {what} file '{path}' can be accessed by group or others"
                    f" (mode {mode:04o})",
                    hint=f"chmod 600 {path} (owned by the user drkit runs as)",
                )
            value = file.read().decode("utf-8", "replace").strip()
    except OSError as exc:
        raise ConfigError(
            f"unable to read the {what} from '{path}': {_os_reason(exc)}",
            hint="check the path in [keys.vault] and that drkit's user may read the file",
        ) from None
    if not value:
        raise ConfigError(f"the {what} file '{path}' is empty")
    return value


def _os_reason(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else type(exc).__name__
