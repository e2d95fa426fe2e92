"""Vault providers and sessions against a real OpenBao server: no PostgreSQL needed.

Covers the transit and KV providers' records, every auth method, TLS with a CA file, namespaces,
keeping a token alive past its TTL, logging in again after a 403, and how each failure is told.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from rig.servers import LOOPBACK, OpenBaoServer, VaultServer, _Process, find_bao, free_port
from rig.vault import TokenReviewStub, VaultSetup, away_message, insecure_http

from drkit.config.settings import VaultSettings
from drkit.crypto.transit import VaultTransitProvider, ciphertext_version
from drkit.crypto.vault import VaultSession
from drkit.crypto.vaultkv import VaultKvProvider
from drkit.errors import ConfigError, IntegrityError, KeyMaterialError, VaultError, WrongKey


@pytest.fixture
def setup(vault_server: VaultServer, tmp_path: Path) -> VaultSetup:
    return VaultSetup(vault_server, tmp_path)


def settings(setup: VaultSetup, **values: Any) -> VaultSettings:
    base: dict[str, Any] = {
        "addr": setup.server.addr,
        **insecure_http(setup.server),
        "token": setup.server.root_token,
        "timeout": 5,
    }
    return VaultSettings(**(base | values))


def transit(setup: VaultSetup, **values: Any) -> VaultTransitProvider:
    session = VaultSession(settings(setup, **values))
    return VaultTransitProvider(session, setup.transit_mount, setup.transit_key)


def root_decrypt(setup: VaultSetup, ciphertext: str) -> bytes:
    answer = setup.server.api(
        "POST", f"{setup.transit_mount}/decrypt/{setup.transit_key}", {"ciphertext": ciphertext}
    )
    return base64.b64decode(answer["data"]["plaintext"])


# -- transit ---------------------------------------------------------------------------------------


def test_transit_data_key_is_stored_only_wrapped(setup: VaultSetup) -> None:
    provider = transit(setup)
    data_key = provider.new_data_key()
    record = data_key.record
    assert set(record) == {"provider", "mount", "key", "ciphertext"}
    assert record["provider"] == "vault-transit"
    assert record["ciphertext"].startswith("vault:v1:")
    assert ciphertext_version(record["ciphertext"]) == 1
    text = json.dumps(record)
    for form in (data_key.plaintext.hex(), base64.b64encode(data_key.plaintext).decode()):
        assert form not in text
    assert "plaintext" not in repr(data_key)
    assert root_decrypt(setup, record["ciphertext"]) == data_key.plaintext
    assert provider.unwrap(record) == data_key.plaintext
    assert provider.new_data_key().plaintext != data_key.plaintext


def test_transit_rotate_and_rewrap_keep_the_data_key(setup: VaultSetup) -> None:
    provider = transit(setup)
    data_key = provider.new_data_key()
    assert provider.rotate().latest_version == 2
    assert provider.new_data_key().record["ciphertext"].startswith("vault:v2:")
    rewrapped = provider.rewrap({**data_key.record, "escrow": {"kept": True}})
    assert rewrapped["ciphertext"].startswith("vault:v2:")
    assert rewrapped["escrow"] == {"kept": True}
    setup.set_min_decryption_version(2)
    assert provider.unwrap(rewrapped) == data_key.plaintext
    with pytest.raises(KeyMaterialError, match="below the key's min_decryption_version") as caught:
        provider.unwrap(data_key.record)
    assert "keys rewrap" in (caught.value.hint or "")
    state = provider.key_state()
    assert (state.latest_version, state.min_decryption_version) == (2, 2)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"ciphertext": "flip"}, IntegrityError, "failed authentication in Vault"),
        ({"ciphertext": "vault:v1:!!"}, IntegrityError, "not a Vault transit ciphertext"),
        ({"ciphertext": "v9"}, WrongKey, "which that key does not have"),
        ({"key": "other"}, WrongKey, "wrapped by transit key"),
        ({"provider": "keyfile"}, WrongKey, "wrapped by key provider 'keyfile'"),
    ],
)
def test_transit_refuses_bad_records(
    setup: VaultSetup, change: dict[str, str], error: type[Exception], message: str
) -> None:
    provider = transit(setup)
    record = dict(provider.new_data_key().record)
    for field, value in change.items():
        if value == "flip":
            prefix, body = record["ciphertext"].rsplit(":", 1)
            raw = bytearray(base64.b64decode(body))
            raw[-5] ^= 0x01
            value = f"{prefix}:{base64.b64encode(bytes(raw)).decode()}"
        elif value == "v9":
            value = record["ciphertext"].replace("vault:v1:", "vault:v9:")
        record[field] = value
    with pytest.raises(error, match=message):
        provider.unwrap(record)


def test_transit_missing_key_and_mount_are_named(setup: VaultSetup) -> None:
    session = VaultSession(settings(setup))
    with pytest.raises(VaultError, match="transit key 'nope' does not exist on mount") as caught:
        VaultTransitProvider(session, setup.transit_mount, "nope").new_data_key()
    assert "bao write -f" in (caught.value.hint or "")
    with pytest.raises(VaultError, match="no transit secrets engine is mounted at 'nomount'"):
        VaultTransitProvider(session, "nomount", "drkit").new_data_key()


# -- KV --------------------------------------------------------------------------------------------


def test_kv_records_keep_their_version_across_a_new_secret(setup: VaultSetup) -> None:
    setup.enable_kv()
    session = VaultSession(settings(setup))
    provider = VaultKvProvider(session, setup.kv_mount, setup.kv_path, "key")
    first = provider.new_data_key()
    assert first.record["version"] == 1 and first.record["provider"] == "vault-kv"
    assert setup.write_kek() == 2
    fresh = VaultKvProvider(VaultSession(settings(setup)), setup.kv_mount, setup.kv_path, "key")
    second = fresh.new_data_key()
    assert second.record["version"] == 2
    assert fresh.unwrap(first.record) == first.plaintext  # reads version 1 on purpose
    assert fresh.unwrap(second.record) == second.plaintext
    rewrapped = fresh.rewrap(first.record)
    assert rewrapped["version"] == 2 and fresh.unwrap(rewrapped) == first.plaintext

    tampered = dict(first.record, wrapped=base64.b64encode(b"\0" * 48).decode())
    with pytest.raises(IntegrityError, match="failed authentication"):
        fresh.unwrap(tampered)

    # Rotation writes a new version and keeps the secret's other fields
    assert fresh.rotate().latest_version == 3
    secret = setup.server.api("GET", f"{setup.kv_mount}/data/{setup.kv_path}")["data"]
    assert secret["data"]["note"] == "drkit test" and secret["metadata"]["version"] == 3

    # A destroyed version takes its backups with it: say so
    setup.server.api("POST", f"{setup.kv_mount}/destroy/{setup.kv_path}", {"versions": [1]})
    cold = VaultKvProvider(VaultSession(settings(setup)), setup.kv_mount, setup.kv_path, "key")
    with pytest.raises(VaultError, match="version 1 was destroyed") as caught:
        cold.unwrap(first.record)
    assert "--recovery-key" in (caught.value.hint or "")


def test_kv_secret_without_a_usable_key(setup: VaultSetup) -> None:
    setup.enable_kv()
    session = VaultSession(settings(setup))
    with pytest.raises(KeyMaterialError, match="has no field 'missing'"):
        VaultKvProvider(session, setup.kv_mount, setup.kv_path, "missing").new_data_key()
    with pytest.raises(KeyMaterialError, match="not a base64-encoded 32-byte key"):
        VaultKvProvider(session, setup.kv_mount, setup.kv_path, "note").new_data_key()
    with pytest.raises(VaultError, match="the secret does not exist"):
        VaultKvProvider(session, setup.kv_mount, "nothing/here", "key").new_data_key()


# -- auth ------------------------------------------------------------------------------------------


def test_token_from_file_and_least_privilege_policy(setup: VaultSetup, tmp_path: Path) -> None:
    token = setup.token(setup.policy())
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    provider = transit(setup, token=None, token_file=token_file)
    data_key = provider.new_data_key()
    assert provider.unwrap(data_key.record) == data_key.plaintext
    with pytest.raises(VaultError, match="Vault denied permission on") as caught:
        provider.rotate()  # the backup host's policy does not allow rotation
    assert "docs/vault.md" in (caught.value.hint or "")
    assert token not in str(caught.value) + str(caught.value.hint)


def test_token_is_required(setup: VaultSetup) -> None:
    with pytest.raises(ConfigError, match="needs a token"):
        VaultSession(settings(setup, token=None))


def test_approle_login(setup: VaultSetup) -> None:
    role_id, secret_id_file = setup.approle(setup.policy())
    session = VaultSession(
        settings(setup, token=None, auth="approle", role_id=role_id, secret_id_file=secret_id_file)
    )
    provider = VaultTransitProvider(session, setup.transit_mount, setup.transit_key)
    data_key = provider.new_data_key()
    assert provider.unwrap(data_key.record) == data_key.plaintext

    secret_id_file.write_text("not-the-secret-id")
    with pytest.raises(VaultError, match="Vault refused the approle login") as caught:
        VaultSession(
            settings(
                setup, token=None, auth="approle", role_id=role_id, secret_id_file=secret_id_file
            )
        )
    assert "secret_id" in (caught.value.hint or "")
    assert "not-the-secret-id" not in caught.value.message


def test_kubernetes_login(setup: VaultSetup, tmp_path: Path) -> None:
    if not isinstance(setup.server, OpenBaoServer):
        pytest.skip("the TokenReview stub runs on the host; a container cannot reach it")
    stub = TokenReviewStub()
    try:
        mount = setup.kubernetes(setup.policy(), stub)
        jwt_file = tmp_path / "token"
        jwt_file.write_text(stub.jwt)
        session = VaultSession(
            settings(
                setup,
                token=None,
                auth="kubernetes",
                role="backup",
                jwt_file=jwt_file,
                auth_mount=mount,
            )
        )
        provider = VaultTransitProvider(session, setup.transit_mount, setup.transit_key)
        data_key = provider.new_data_key()
        assert provider.unwrap(data_key.record) == data_key.plaintext
        assert stub.reviews[-1]["token"] == stub.jwt
        assert stub.reviews[-1]["authorization"] == f"Bearer {stub.reviewer_jwt}"

        jwt_file.write_text(stub.jwt[:-4] + "AAAA")
        with pytest.raises(VaultError, match="Vault refused the kubernetes login"):
            VaultSession(
                settings(
                    setup,
                    token=None,
                    auth="kubernetes",
                    role="backup",
                    jwt_file=jwt_file,
                    auth_mount=mount,
                )
            )
    finally:
        stub.close()


def test_namespace(setup: VaultSetup) -> None:
    namespace = f"ns-{setup.tag}"
    setup.server.api("POST", f"sys/namespaces/{namespace}", {})
    setup.server.api("POST", f"{namespace}/sys/mounts/transit", {"type": "transit"})
    setup.server.api("POST", f"{namespace}/transit/keys/drkit")
    session = VaultSession(settings(setup, namespace=namespace))
    provider = VaultTransitProvider(session, "transit", "drkit")
    data_key = provider.new_data_key()
    answer = setup.server.api(
        "POST", f"{namespace}/transit/decrypt/drkit", {"ciphertext": data_key.record["ciphertext"]}
    )
    assert base64.b64decode(answer["data"]["plaintext"]) == data_key.plaintext
    outside = VaultTransitProvider(VaultSession(settings(setup)), "transit", "drkit")
    with pytest.raises(VaultError, match="no transit secrets engine is mounted at 'transit'"):
        outside.unwrap(data_key.record)


def test_tls_with_a_ca_file(tmp_path: Path) -> None:
    port = free_port(pair=True)
    token = f"tls-{secrets.token_hex(8)}"
    certs = tmp_path / "certs"
    certs.mkdir()
    process = _Process(
        [
            str(find_bao()),
            "server",
            "-dev",
            "-dev-tls",
            f"-dev-tls-cert-dir={certs}",
            "-dev-no-store-token",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address={LOOPBACK}:{port}",
        ],
        tmp_path / "bao.log",
        {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    try:
        addr = f"https://{LOOPBACK}:{port}"
        ca = certs / "vault-ca.pem"
        deadline = time.monotonic() + 30
        while not ca.is_file() or _status(addr, ca) != 200:
            assert process.alive(), process.log_tail()
            assert time.monotonic() < deadline, "bao -dev-tls did not come up"
            time.sleep(0.1)
        subprocess.run(  # enable transit through the CLI, which trusts the same CA
            [str(find_bao()), "secrets", "enable", "transit"],
            check=True,
            capture_output=True,
            env={
                "BAO_ADDR": addr,
                "BAO_TOKEN": token,
                "BAO_CACERT": str(ca),
                "HOME": str(tmp_path),
            },
        )
        subprocess.run(
            [str(find_bao()), "write", "-f", "transit/keys/drkit"],
            check=True,
            capture_output=True,
            env={
                "BAO_ADDR": addr,
                "BAO_TOKEN": token,
                "BAO_CACERT": str(ca),
                "HOME": str(tmp_path),
            },
        )
        trusted = VaultSettings(addr=addr, token=token, ca_cert=ca)
        provider = VaultTransitProvider(VaultSession(trusted), "transit", "drkit")
        data_key = provider.new_data_key()
        assert provider.unwrap(data_key.record) == data_key.plaintext
        with pytest.raises(ConfigError, match=r"keys\.vault\.ca_cert .* does not exist"):
            VaultSession(VaultSettings(addr=addr, token=token, ca_cert=tmp_path / "nope.pem"))
        with pytest.raises(VaultError, match=r"TLS certificate of Vault .* could not be verified"):
            VaultSession(VaultSettings(addr=addr, token=token))
    finally:
        process.terminate()


def _status(addr: str, ca: Path) -> int:
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(f"{addr}/v1/sys/health", context=context, timeout=2) as r:
            return int(r.status)
    except (OSError, urllib.error.URLError):
        return 0


# -- keeping the token alive -----------------------------------------------------------------------


def test_renewable_token_is_renewed_past_its_ttl(setup: VaultSetup) -> None:
    token = setup.token(setup.policy(), ttl="3s", renewable=True, explicit_max_ttl="120s")
    provider = transit(setup, token=token)
    time.sleep(7)  # more than twice the TTL, doing nothing: only the renewer keeps it alive
    data_key = provider.new_data_key()
    assert provider.unwrap(data_key.record) == data_key.plaintext
    assert provider.session.renewals >= 2 and provider.session.logins == 1
    lookup = setup.server.api("POST", "auth/token/lookup", {"token": token})["data"]
    assert lookup["ttl"] > 0
    provider.session.close()


def test_approle_logs_in_again_after_max_ttl(setup: VaultSetup) -> None:
    role_id, secret_id_file = setup.approle(
        setup.policy(), token_ttl="2s", token_max_ttl="3s", secret_id_num_uses=0
    )
    session = VaultSession(
        settings(setup, token=None, auth="approle", role_id=role_id, secret_id_file=secret_id_file)
    )
    provider = VaultTransitProvider(session, setup.transit_mount, setup.transit_key)
    time.sleep(7)
    data_key = provider.new_data_key()
    assert provider.unwrap(data_key.record) == data_key.plaintext
    assert session.logins >= 2
    session.close()


def test_revoked_token_is_replaced_by_a_new_login(setup: VaultSetup) -> None:
    role_id, secret_id_file = setup.approle(setup.policy(), secret_id_num_uses=0)
    session = VaultSession(
        settings(setup, token=None, auth="approle", role_id=role_id, secret_id_file=secret_id_file),
        keep_alive=False,
    )
    provider = VaultTransitProvider(session, setup.transit_mount, setup.transit_key)
    first = provider.new_data_key()
    setup.server.api("POST", "auth/token/revoke", {"token": session._token.value})
    assert provider.unwrap(first.record) == first.plaintext  # 403, login, retry
    assert session.logins == 2


def test_revoked_plain_token_is_explained(setup: VaultSetup) -> None:
    token = setup.token(setup.policy())
    provider = transit(setup, token=token)
    setup.server.api("POST", "auth/token/revoke", {"token": token})
    with pytest.raises(VaultError, match="Vault rejected the token") as caught:
        provider.new_data_key()
    assert token not in caught.value.message + (caught.value.hint or "")


def test_one_shot_session_makes_exactly_one_round_trip(
    setup: VaultSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synchronous wal-push opens a provider, unwraps (or makes) one key and exits: with token
    auth that is one request to Vault; a long-running process logs in (and looks up) first."""
    import requests

    from drkit.config.settings import KeysSettings
    from drkit.crypto.providers import open_provider

    record = transit(setup).new_data_key().record
    token = setup.token(setup.policy())
    keys = KeysSettings(
        provider="vault-transit",
        vault=settings(setup, token=token, transit_mount=setup.transit_mount),
    )
    sent: list[str] = []
    real_send = requests.Session.send

    def counting_send(self: requests.Session, request: Any, **kwargs: Any) -> Any:
        sent.append(str(request.url))
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", counting_send)
    one_shot = open_provider(keys, one_shot=True)
    assert sent == []
    assert len(one_shot.unwrap(record)) == 32
    assert [url.split("/v1/")[1] for url in sent] == [
        f"{setup.transit_mount}/decrypt/{setup.transit_key}"
    ]
    sent.clear()
    open_provider(keys).unwrap(record)
    assert [url.split("/v1/")[1] for url in sent] == [
        "auth/token/lookup-self",
        f"{setup.transit_mount}/decrypt/{setup.transit_key}",
    ]


# -- Vault away ------------------------------------------------------------------------------------


def test_unreachable_and_sealed(vault: VaultServer, tmp_path: Path) -> None:
    setup = VaultSetup(vault, tmp_path)
    provider = transit(setup)
    record = provider.new_data_key().record
    vault.stop()
    try:
        with pytest.raises(VaultError, match=away_message(vault)) as caught:
            provider.unwrap(record)
        assert "--recovery-key" in (caught.value.hint or "")
        with pytest.raises(VaultError, match=away_message(vault)):
            VaultSession(settings(setup))
    finally:
        vault.start()
    if not isinstance(vault, OpenBaoServer):
        return  # the compose server cannot be unsealed again
    vault.seal()
    try:
        with pytest.raises(VaultError, match="is sealed") as caught:
            provider.new_data_key()
        assert "unseal" in (caught.value.hint or "")
    finally:
        vault.unseal()
    assert len(provider.unwrap(record)) == 32


# -- settings --------------------------------------------------------------------------------------


def write_config(tmp_path: Path, keys: str) -> Path:
    path = tmp_path / "drkit.toml"
    path.write_text(
        f'[postgres]\npgdata = "{tmp_path}"\n{keys}\n[[repo]]\nname = "r"\npath = "{tmp_path}"\n'
    )
    return path


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('[keys]\nprovider = "vault-transit"', "needs a [keys.vault] section"),
        (
            '[keys]\nprovider = "vault-kv"\n[keys.vault]\naddr = "https://x"',
            "needs keys.vault.kv_path",
        ),
        (
            '[keys]\nprovider = "vault-transit"\n[keys.vault]\naddr = "https://x"\n'
            'auth = "approle"',
            "needs keys.vault.role_id and secret_id_file",
        ),
        (
            '[keys]\nprovider = "vault-transit"\n[keys.vault]\naddr = "https://x"\n'
            'auth = "kubernetes"',
            "needs keys.vault.role",
        ),
    ],
)
def test_incomplete_vault_settings(tmp_path: Path, keys: str, message: str) -> None:
    from drkit.config.settings import load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, keys))
    assert message in caught.value.message


def test_token_comes_from_the_environment_and_stays_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from drkit.config.settings import load_settings

    config = write_config(
        tmp_path, '[keys]\nprovider = "vault-transit"\n[keys.vault]\naddr = "https://x"'
    )
    assert load_settings(config).keys.vault.token is None  # type: ignore[union-attr]
    monkeypatch.setenv("VAULT_TOKEN", "hvs.from-vault-token")
    vault = load_settings(config).keys.vault
    assert vault is not None and vault.token is not None
    assert vault.token.get_secret_value() == "hvs.from-vault-token"
    assert "from-vault-token" not in repr(vault) + str(vault)
    monkeypatch.setenv("DRKIT_KEYS__VAULT__TOKEN", "hvs.from-drkit")
    vault = load_settings(config).keys.vault
    assert vault is not None and vault.token is not None
    assert vault.token.get_secret_value() == "hvs.from-drkit"


def test_hvac_is_imported_by_one_module_and_only_when_used() -> None:
    import re
    import sys

    root = Path(__file__).resolve().parent.parent / "drkit"
    importers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"^\s*(import hvac|from hvac)", path.read_text(), re.MULTILINE)
    )
    assert importers == ["crypto/vault.py"]
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, drkit.cli.main, drkit.repo.open, drkit.crypto.providers;"
            " print('hvac' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "False"
