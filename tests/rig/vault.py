"""Vault set-up for drkit's key tests: transit keys, KV secrets, policies, AppRole, Kubernetes.

Every ``VaultSetup`` uses names unique to one test (mounts, keys, roles, policies), because the
session's OpenBao server keeps its state across tests. ``TokenReviewStub`` is the smallest
Kubernetes API that OpenBao's kubernetes auth method needs: it answers TokenReview requests on
127.0.0.1 for one service account token.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rig.drkit import Drkit
from rig.servers import LOOPBACK, OpenBaoServer, VaultServer
from rig.tls import certificate_pem, make_certificate

TRANSIT_POLICY = """
path "{mount}/datakey/plaintext/{key}" {{ capabilities = ["update"] }}
path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}
path "{mount}/rewrap/{key}" {{ capabilities = ["update"] }}
path "{mount}/keys/{key}" {{ capabilities = ["read"] }}
"""

KV_POLICY = """
path "{mount}/data/{path}" {{ capabilities = ["read"] }}
path "{mount}/metadata/{path}" {{ capabilities = ["read"] }}
"""


@dataclass
class VaultSetup:
    """One test's corner of the shared Vault: a transit mount and key, a KV v2 mount."""

    server: VaultServer
    workdir: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(4))

    def __post_init__(self) -> None:
        self.transit_mount = f"transit-{self.tag}"
        self.transit_key = "drkit"
        self.kv_mount = f"kv-{self.tag}"
        self.kv_path = "drkit/kek"
        self.server.enable_transit(self.transit_mount)
        self.server.api("POST", f"{self.transit_mount}/keys/{self.transit_key}")

    # -- secrets engines --------------------------------------------------------------------------

    def enable_kv(self) -> None:
        self.server.api(
            "POST", f"sys/mounts/{self.kv_mount}", {"type": "kv", "options": {"version": "2"}}
        )
        self.write_kek()

    def write_kek(self) -> int:
        """Writes a new random KEK version; returns the version number."""
        kek = base64.b64encode(os.urandom(32)).decode()
        answer = self.server.api(
            "POST",
            f"{self.kv_mount}/data/{self.kv_path}",
            {"data": {"key": kek, "note": "drkit test"}},
        )
        return int(answer["data"]["version"])

    def transit_state(self) -> dict[str, Any]:
        return self.server.api("GET", f"{self.transit_mount}/keys/{self.transit_key}")["data"]

    def set_min_decryption_version(self, version: int) -> None:
        self.server.api(
            "POST",
            f"{self.transit_mount}/keys/{self.transit_key}/config",
            {"min_decryption_version": version},
        )

    # -- identities -------------------------------------------------------------------------------

    def policy(self, *, kv: bool = False, extra: str = "", suffix: str = "") -> str:
        """A least-privilege policy (as docs/vault.md gives it) for this test's key, plus
        ``extra`` rules; returns its name."""
        name = f"drkit-{self.tag}-{'kv' if kv else 'transit'}{suffix}"
        text = (
            KV_POLICY.format(mount=self.kv_mount, path=self.kv_path)
            if kv
            else TRANSIT_POLICY.format(mount=self.transit_mount, key=self.transit_key)
        ) + extra
        self.server.api("POST", f"sys/policies/acl/{name}", {"policy": text})
        return name

    def token(self, policy: str, ttl: str = "1h", **options: Any) -> str:
        body = {"policies": [policy], "ttl": ttl, "no_default_policy": False, **options}
        return str(self.server.api("POST", "auth/token/create", body)["auth"]["client_token"])

    def approle(self, policy: str, **role: Any) -> tuple[str, Path]:
        """(role_id, secret_id file) of a new AppRole role with ``policy``."""
        mounts = self.server.api("GET", "sys/auth")
        if "approle/" not in mounts.get("data", mounts):
            self.server.api("POST", "sys/auth/approle", {"type": "approle"})
        name = f"drkit-{self.tag}"
        self.server.api("POST", f"auth/approle/role/{name}", {"token_policies": [policy], **role})
        role_id = self.server.api("GET", f"auth/approle/role/{name}/role-id")["data"]["role_id"]
        secret_id = self.server.api("POST", f"auth/approle/role/{name}/secret-id")["data"][
            "secret_id"
        ]
        path = self.workdir / "secret-id"
        path.write_text(secret_id + "\n")
        path.chmod(0o600)
        return str(role_id), path

    def kubernetes(self, policy: str, stub: TokenReviewStub) -> str:
        """Mounts kubernetes auth against ``stub``; returns the mount path (role 'backup')."""
        mount = f"k8s-{self.tag}"
        self.server.api("POST", f"sys/auth/{mount}", {"type": "kubernetes"})
        self.server.api(
            "POST",
            f"auth/{mount}/config",
            {
                "kubernetes_host": stub.url,
                "kubernetes_ca_cert": stub.ca_pem,
                "token_reviewer_jwt": stub.reviewer_jwt,
                "disable_local_ca_jwt": True,
            },
        )
        self.server.api(
            "POST",
            f"auth/{mount}/role/backup",
            {
                "bound_service_account_names": [stub.account],
                "bound_service_account_namespaces": [stub.namespace],
                "token_policies": [policy],
                "token_ttl": "10m",
            },
        )
        return mount

    # -- drkit configuration ----------------------------------------------------------------------

    def configure(
        self,
        dk: Drkit,
        provider: str = "vault-transit",
        escrow: Path | None = None,
        **vault: Any,
    ) -> None:
        """Rewrites ``dk``'s drkit.toml for ``provider`` with this setup's key."""
        section: dict[str, Any] = {
            "addr": self.server.addr,
            "timeout": 5,
            **insecure_http(self.server),
        }
        if provider == "vault-transit":
            section |= {"transit_mount": self.transit_mount, "transit_key": self.transit_key}
        else:
            section |= {"kv_mount": self.kv_mount, "kv_path": self.kv_path}
        section |= vault
        extra: dict[str, dict[str, Any]] = {"keys.vault": section}
        if escrow is not None:
            extra["keys.escrow"] = {"public_key_file": escrow}
        dk.write_config(keys={"provider": provider}, **extra)


def insecure_http(server: VaultServer) -> dict[str, bool]:
    """The setting that lets drkit talk plain http to the test server on 127.0.0.1 (a real
    deployment uses https: drkit refuses http without it)."""
    return {"allow_insecure_http": True} if server.addr.startswith("http://") else {}


def away_message(server: VaultServer) -> str:
    """What drkit says about a stopped server: the local relay refuses connections, a paused
    container (the Docker provider) just never answers."""
    return "is unreachable" if isinstance(server, OpenBaoServer) else "did not answer in time"


class TokenReviewStub:
    """``POST /apis/authentication.k8s.io/v1/tokenreviews`` for one service account, on HTTP.

    OpenBao sends the reviewer JWT as the bearer token and the login JWT in the body; the stub
    authenticates exactly ``jwt`` and records every review it was asked for.
    """

    def __init__(self, namespace: str = "drkit", account: str = "backup") -> None:
        self.namespace = namespace
        self.account = account
        self.uid = secrets.token_hex(8)
        self.reviewer_jwt = f"reviewer-{secrets.token_hex(8)}"
        self.jwt = _service_account_jwt(namespace, account, self.uid)
        self.ca_pem = _throwaway_ca()
        self.reviews: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.reviews.append(
                    {
                        "path": self.path,
                        "authorization": self.headers.get("Authorization"),
                        "token": body["spec"]["token"],
                    }
                )
                self._answer(stub.review(self.path, self.headers.get("Authorization"), body))

            def _answer(self, status: dict[str, Any]) -> None:
                data = json.dumps(
                    {
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "status": status,
                    }
                ).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def review(self, path: str, authorization: str | None, body: dict[str, Any]) -> dict[str, Any]:
        if (
            path != "/apis/authentication.k8s.io/v1/tokenreviews"
            or authorization != f"Bearer {self.reviewer_jwt}"
            or body["spec"]["token"] != self.jwt
        ):
            return {"authenticated": False, "error": "token not valid"}
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{self.namespace}:{self.account}",
                "uid": self.uid,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{self.namespace}"],
            },
        }

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _service_account_jwt(namespace: str, account: str, uid: str) -> str:
    """A JWT with a service account's claims. OpenBao reads the claims without checking the
    signature when no public keys are configured; the TokenReview is what authenticates it."""
    claims = {
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": account,
        "kubernetes.io/serviceaccount/service-account.uid": uid,
        "sub": f"system:serviceaccount:{namespace}:{account}",
    }
    signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return f"{_b64url({'alg': 'RS256', 'typ': 'JWT'})}.{_b64url(claims)}.{signature}"


def _throwaway_ca() -> str:
    """OpenBao insists on a CA certificate for the Kubernetes API even when it speaks HTTP."""
    return certificate_pem(make_certificate("drkit-test-k8s-ca")[1]).decode()


# -- end-to-end helpers ---------------------------------------------------------------------------


def backup_label(dk: Drkit, *args: str) -> str:
    return str(json.loads(dk.ok("backup", "--json", *args).stdout)["label"])


def restore_and_compare(
    dk: Drkit, label: str, target: Path, expected: dict[str, dict[str, str]], *extra: str
) -> None:
    """Restores ``label`` into ``target``, starts it, compares every table, stops it."""
    from rig.postgres import attach_cluster, database_checksums

    dk.ok("restore", "--pgdata", str(target), "--backup", label, *extra)
    restored = attach_cluster(target, dk.cluster.version, dk.workdir)
    restored.start()
    try:
        assert database_checksums(restored) == expected
    finally:
        restored.stop()


def key_record(dk: Drkit, label: str, seq: int = 1) -> dict[str, Any]:
    path = dk.repo_path / "backup" / label / "key" / f"{seq:04d}.json"
    return dict(json.loads(path.read_text()))


def assert_secrets_absent(secrets_: list[str | bytes], texts: list[str], repo: Path) -> None:
    """No secret (in clear, base64 or hex for bytes) in any text or any repository file."""
    forms: list[bytes] = []
    for secret in secrets_:
        if isinstance(secret, bytes):
            forms += [secret, base64.b64encode(secret), secret.hex().encode()]
        else:
            forms.append(secret.encode())
    blobs = [t.encode() for t in texts]
    blobs += [p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()]
    for form in forms:
        assert len(form) >= 16, "a secret this short would match by chance"
        assert not any(form in blob for blob in blobs), f"a secret leaked ({len(form)} bytes)"
