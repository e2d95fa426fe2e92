"""A session with Vault (or OpenBao): log in, keep the token alive, make requests, explain failures.

The only module that imports hvac; the transit and KV providers speak Vault's HTTP API through
``VaultSession.write``/``read`` and see only drkit errors.

Auth methods (token, AppRole, Kubernetes) are drkit/crypto/vault_auth.py: what a login sends
and what it gets back, without hvac.

Keeping the token alive, for processes that outlive a token's TTL (the scheduler, the async
archiver, a backup that takes longer than the TTL):

- a daemon thread renews a renewable token when two thirds of its TTL have passed, and logs in
  again when renewal is refused or the token is near its max TTL;
- before a request, a token known to have expired is replaced by a fresh login;
- a request answered 403 (the token expired or was revoked behind drkit's back) logs in once more
  and is retried once; a second 403 is a real permission problem and is reported as such.

Secrets (tokens, the secret_id, the JWT) are never put in an error message or a repr: messages are
built here from the status and Vault's error text, and known secret values are scrubbed from that
text as well.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import hvac
import hvac.exceptions
import requests

from drkit.config.settings import VaultSettings
from drkit.crypto.vault_auth import VaultToken, credentials_for
from drkit.errors import ConfigError, VaultError

RECOVERY_HINT = "to restore or verify without Vault, pass --recovery-key with the escrow key"
_RENEW_AT = 2 / 3  # renew (or log in again) when this share of the TTL has passed
_MIN_WAIT = 0.5  # seconds; the renewer never spins faster than this


class VaultRequestError(VaultError):
    """Vault answered a request with an error; ``status`` and ``errors`` let callers refine it."""

    def __init__(
        self,
        message: str,
        status: int,
        errors: list[str],
        body: dict[str, Any] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.status = status
        self.errors = errors
        self.body = body or {}  # Vault's JSON answer, e.g. a deleted KV version's metadata

    def mentions(self, *phrases: str) -> bool:
        text = " ".join(self.errors).lower()
        return any(phrase in text for phrase in phrases)


class VaultSession:
    """An authenticated Vault client, safe to share between threads.

    Logs in when created, so a wrong address, a sealed Vault or refused credentials are reported
    before any work starts, and keeps the token alive in the background. With
    ``keep_alive=False`` (one-shot processes such as a synchronous wal-push) it logs in at the first
    request instead, does not look a plain token up and starts no renewer: with token auth that
    request is then the only round trip. Raises VaultError (exit 11) for every Vault failure.
    """

    def __init__(self, settings: VaultSettings, *, keep_alive: bool = True) -> None:
        self.addr = settings.addr.rstrip("/")
        if settings.ca_cert is not None and not settings.ca_cert.is_file():
            raise ConfigError(
                f"keys.vault.ca_cert '{settings.ca_cert}' does not exist",
                hint="point it at the PEM file of the CA that signed Vault's certificate",
            )
        self._credentials = credentials_for(settings)
        self._client = hvac.Client(
            url=self.addr,
            token="",  # never hvac's fallback to VAULT_TOKEN or ~/.vault-token
            verify=str(settings.ca_cert) if settings.ca_cert is not None else True,
            namespace=settings.namespace,
            timeout=settings.timeout,
        )
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.logins = 0
        self.renewals = 0
        self._keep_alive_wanted = keep_alive
        self._token: VaultToken | None = None
        if keep_alive:
            self._token = self._login()
            _start_renewer(self)

    def __repr__(self) -> str:
        return f"VaultSession(addr={self.addr!r}, auth={self._credentials.method!r})"

    def close(self) -> None:
        """Stops the renewer thread and closes the connections (the token simply expires)."""
        self._stop.set()
        with self._lock:
            self._client.adapter.close()

    # -- requests ---------------------------------------------------------------------------------

    def write(self, path: str, body: dict[str, Any] | None, what: str) -> dict[str, Any]:
        """``POST /v1/<path>``; returns the response's ``data`` ({} when there is none).

        ``what`` says what drkit was doing, for messages ("create a data key with transit key
        'drkit'"). Raises VaultRequestError when Vault answers with an error, VaultError when it
        cannot be reached, is sealed or denies permission.
        """
        return self._request("post", path, body, what)

    def read(self, path: str, what: str) -> dict[str, Any]:
        """``GET /v1/<path>``; returns the response's ``data``. Raises like ``write``."""
        return self._request("get", path, None, what)

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None, what: str
    ) -> dict[str, Any]:
        with self._lock:
            if self._token is None or (self._token.expired() and self._credentials.can_login_again):
                self._token = self._login()
            try:
                return self._send(method, path, body, what)
            except hvac.exceptions.Forbidden:
                if not self._credentials.can_login_again:
                    raise self._token_or_policy(path, what) from None
            # The token may have expired or been revoked since the last renewal: log in once more
            self._token = self._login()
            try:
                return self._send(method, path, body, what)
            except hvac.exceptions.Forbidden:
                raise self._permission_denied(path, what) from None

    def _send(
        self, method: str, path: str, body: dict[str, Any] | None, what: str
    ) -> dict[str, Any]:
        """One request; Forbidden passes through (the caller decides), everything else is
        translated."""
        try:
            response = self._client.adapter.request(method, f"/v1/{path}", json=body)
        except hvac.exceptions.Forbidden:
            raise
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise self._translate(exc, what) from None
        if isinstance(response, dict):
            data = response.get("data")
            return data if isinstance(data, dict) else {}
        return {}  # 204 No Content

    # -- login and renewal ------------------------------------------------------------------------

    def _login(self) -> VaultToken:
        method = self._credentials.method
        try:
            token = self._credentials.login(self._client, lookup=self._keep_alive_wanted)
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest) as exc:
            raise VaultError(
                f"Vault refused the {method} login at '{self.addr}': {self._vault_text(exc)}",
                hint=_LOGIN_HINTS[method],
            ) from None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise self._translate(exc, f"log in with {method} auth") from None
        self.logins += 1
        return token

    def _keep_alive(self) -> float | None:
        """Renews the token or logs in again; returns seconds until the next attempt, None when
        there is nothing left to do (the token never expires, or cannot be renewed nor
        replaced). Failures are left for the next request to meet and report."""
        with self._lock:
            token = self._token
            if token is None or token.ttl <= 0:
                return None
            if token.age() < token.ttl * _RENEW_AT:
                return max(_MIN_WAIT, token.ttl * _RENEW_AT - token.age())
            try:
                if token.renewable:
                    self._token = self._renew(token)
                elif self._credentials.can_login_again:
                    self._token = self._login()
                else:
                    return None
            except VaultError:
                if not self._credentials.can_login_again:
                    return None
                try:
                    self._token = self._login()
                except VaultError:
                    return _MIN_WAIT * 4  # Vault is away; try again shortly
            return max(_MIN_WAIT, self._token.ttl * _RENEW_AT) if self._token.ttl > 0 else None

    def _renew(self, token: VaultToken) -> VaultToken:
        """Renews the token for another period. Near its max TTL (less than a third of a period
        granted) a fresh login replaces it where the credentials allow."""
        try:
            auth = self._client.auth.token.renew_self(increment=int(token.period))["auth"]
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise self._translate(exc, "renew the Vault token") from None
        self.renewals += 1
        granted = float(auth.get("lease_duration") or 0)
        if granted < token.period / 3 and self._credentials.can_login_again:
            return self._login()
        return VaultToken(token.value, granted, bool(auth.get("renewable")), token.period)

    # -- errors -----------------------------------------------------------------------------------

    def _translate(self, exc: Exception, what: str) -> VaultError:
        recovery = f"; {RECOVERY_HINT}"
        if isinstance(exc, requests.exceptions.SSLError):
            return VaultError(
                f"unable to {what}: the TLS certificate of Vault at '{self.addr}' could not be "
                "verified",
                hint="set keys.vault.ca_cert to the CA certificate that signed Vault's",
            )
        if isinstance(exc, requests.exceptions.Timeout):
            return VaultError(
                f"unable to {what}: Vault at '{self.addr}' did not answer in time",
                hint="check that Vault is up and reachable, or raise keys.vault.timeout" + recovery,
            )
        if isinstance(exc, requests.RequestException):
            return VaultError(
                f"unable to {what}: Vault at '{self.addr}' is unreachable ({_reason(exc)})",
                hint="check keys.vault.addr and that Vault is up and reachable" + recovery,
            )
        assert isinstance(exc, hvac.exceptions.VaultError)
        text = self._vault_text(exc)
        if isinstance(exc, hvac.exceptions.VaultDown):
            if "sealed" in text.lower():
                return VaultError(
                    f"unable to {what}: Vault at '{self.addr}' is sealed",
                    hint="unseal Vault (bao operator unseal / vault operator unseal)" + recovery,
                )
            return VaultError(
                f"unable to {what}: Vault at '{self.addr}' is unavailable (503: {text})",
                hint="check Vault's status (standby, maintenance)" + recovery,
            )
        status = _status_of(exc)
        body = exc.json if isinstance(exc.json, dict) else None
        return VaultRequestError(
            f"unable to {what}: Vault answered {status}: {text}",
            status,
            self._vault_errors(exc),
            body,
        )

    def _token_or_policy(self, path: str, what: str) -> VaultError:
        """A 403 with a token that cannot be replaced: tell an expired token from a policy."""
        try:
            self._client.auth.token.lookup_self()
        except hvac.exceptions.Forbidden:
            return VaultError(
                f"unable to {what}: Vault rejected the token (it expired or was revoked)",
                hint="provide a fresh token (VAULT_TOKEN or keys.vault.token_file); for "
                "long-running processes prefer approle or kubernetes auth, which log in again",
            )
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            return self._translate(exc, what)
        return self._permission_denied(path, what)

    def _permission_denied(self, path: str, what: str) -> VaultError:
        return VaultError(
            f"unable to {what}: Vault denied permission on '{path}'",
            hint=f"check the mount and key names in [keys.vault], and that the policy of "
            f"drkit's {self._credentials.method} identity grants '{path}' (docs/vault.md has "
            "least-privilege policies)",
        )

    def _vault_errors(self, exc: hvac.exceptions.VaultError) -> list[str]:
        errors = exc.errors if isinstance(exc.errors, list) else [str(exc.errors or "")]
        return [self._scrub(str(e)) for e in errors if e]

    def _vault_text(self, exc: hvac.exceptions.VaultError) -> str:
        return "; ".join(self._vault_errors(exc)) or "no detail given"

    def _scrub(self, text: str) -> str:
        for secret in self._credentials.secrets():
            if secret:
                text = text.replace(secret, "<redacted>")
        return text


_LOGIN_HINTS = {
    "token": "check the token (VAULT_TOKEN or keys.vault.token_file)",
    "approle": "check keys.vault.role_id and the secret_id in keys.vault.secret_id_file (it may "
    "have expired or been used up)",
    "kubernetes": "check keys.vault.role and that the role is bound to this service account and "
    "namespace",
}


def _start_renewer(session: VaultSession) -> None:
    """A daemon thread that keeps the session's token alive; it holds the session only weakly,
    so it ends by itself when the session is closed or dropped."""
    ref = weakref.ref(session)
    stop = session._stop

    def run() -> None:
        wait: float | None = 0.0
        while wait is not None and not stop.wait(wait):
            current = ref()
            if current is None:
                return
            wait = current._keep_alive()
            del current

    threading.Thread(target=run, name="drkit-vault-renewer", daemon=True).start()


def _status_of(exc: hvac.exceptions.VaultError) -> int:
    by_class: dict[type[Exception], int] = {
        hvac.exceptions.InvalidRequest: 400,
        hvac.exceptions.Unauthorized: 401,
        hvac.exceptions.Forbidden: 403,
        hvac.exceptions.InvalidPath: 404,
        hvac.exceptions.UnsupportedOperation: 405,
        hvac.exceptions.PreconditionFailed: 412,
        hvac.exceptions.RateLimitExceeded: 429,
        hvac.exceptions.InternalServerError: 500,
        hvac.exceptions.VaultNotInitialized: 501,
        hvac.exceptions.BadGateway: 502,
        hvac.exceptions.VaultDown: 503,
    }
    return by_class.get(type(exc), 0)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).lower()
    for known in (
        "connection refused",
        "connection reset",
        "name or service not known",
        "no route to host",
        "network is unreachable",
        "timed out",
    ):
        if known in text:
            return known
    return type(exc).__name__
