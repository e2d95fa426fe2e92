"""Vault secrets in transit and at rest: no token over plain http to the network, no token or
secret_id in a file other local users can read."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rig.drkit import Drkit
from rig.postgres import PgCluster
from rig.servers import LOOPBACK, VaultServer
from rig.vault import VaultSetup, insecure_http

from drkit.config.settings import VaultSettings, load_settings
from drkit.crypto.transit import VaultTransitProvider
from drkit.crypto.vault import VaultSession
from drkit.errors import ConfigError


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in for Vault that only records what reaches it (what a network eavesdropper on
    plain http would read)."""

    seen: list[str]

    def _answer(self) -> None:
        self.seen.append(f"{self.command} {self.path}\n{self.headers}")
        self.send_response(503)
        self.end_headers()

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def eavesdropper() -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_token_is_never_sent_over_plain_http(
    pg: PgCluster,
    workdir: Path,
    eavesdropper: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, seen = eavesdropper
    token = "hvs.must-not-cross-the-network-7d2a"
    monkeypatch.setenv("VAULT_TOKEN", token)
    dk = Drkit(pg, workdir)
    dk.write_config(keys={"provider": "vault-transit"}, **{"keys.vault": {"addr": url}})
    for command in (["init"], ["backup"]):
        result = dk.run(*command)
        assert result.exit_code == ConfigError.exit_code, result.output
        assert f"addr '{url}' would send Vault tokens and data keys unencrypted" in result.stderr
        assert "allow_insecure_http" in result.stderr
        assert token not in result.output
    assert seen == []  # nothing, token or otherwise, went out


@pytest.mark.parametrize(
    "addr",
    ["http://vault.internal:8200", "http://192.0.2.10:8200", "http://[2001:db8::1]:8200"],
)
def test_insecure_http_is_allowed_only_to_loopback(addr: str) -> None:
    with pytest.raises(ValueError, match="plain http to a host that is not loopback"):
        VaultSettings(addr=addr, allow_insecure_http=True)


@pytest.mark.parametrize(
    "addr", ["http://127.0.0.1:8200", "http://localhost:8200", "http://[::1]:1"]
)
def test_insecure_http_to_loopback_with_the_switch(addr: str) -> None:
    assert VaultSettings(addr=addr, allow_insecure_http=True).addr == addr
    with pytest.raises(ValueError, match="unencrypted"):
        VaultSettings(addr=addr)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_token_file_others_can_read_is_refused(
    vault_server: VaultServer, tmp_path: Path, mode: int
) -> None:
    setup = VaultSetup(vault_server, tmp_path)
    token = setup.token(setup.policy())
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(mode)
    settings = VaultSettings(
        addr=vault_server.addr, token=None, token_file=token_file, **insecure_http(vault_server)
    )
    with pytest.raises(ConfigError) as caught:
        VaultSession(settings)
    assert caught.value.message == (
        f"the token file '{token_file}' can be accessed by group or others (mode {mode:04o})"
    )
    assert f"chmod 600 {token_file}" in (caught.value.hint or "")
    assert token not in str(caught.value) + str(caught.value.hint)

    token_file.chmod(0o600)  # the same file, private: accepted
    provider = VaultTransitProvider(VaultSession(settings), setup.transit_mount, setup.transit_key)
    data_key = provider.new_data_key()
    assert provider.unwrap(data_key.record) == data_key.plaintext


def test_a_secret_id_file_others_can_read_is_refused(
    vault_server: VaultServer, tmp_path: Path
) -> None:
    setup = VaultSetup(vault_server, tmp_path)
    role_id, secret_id_file = setup.approle(setup.policy())
    secret_id_file.chmod(0o644)
    settings = VaultSettings(
        addr=vault_server.addr,
        auth="approle",
        token=None,
        role_id=role_id,
        secret_id_file=secret_id_file,
        **insecure_http(vault_server),
    )
    with pytest.raises(ConfigError, match="can be accessed by group or others") as caught:
        VaultSession(settings)
    assert f"AppRole secret_id file '{secret_id_file}'" in caught.value.message
    secret_id_file.chmod(0o600)
    assert VaultSession(settings).logins == 1


def test_a_configuration_holding_a_token_must_be_private(tmp_path: Path) -> None:
    config = tmp_path / "drkit.toml"
    config.write_text(
        f'[postgres]\npgdata = "{tmp_path}"\n[keys]\nprovider = "vault-transit"\n'
        '[keys.vault]\naddr = "https://vault.internal:8200"\ntoken = "hvs.inline-token-3c9e"\n'
        f'[[repo]]\nname = "r"\npath = "{tmp_path}"\n'
    )
    config.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert caught.value.message == (
        f"configuration file '{config}' holds a Vault token and can be accessed by group or"
        " others (mode 0644)"
    )
    assert "inline-token" not in str(caught.value) + str(caught.value.hint)
    config.chmod(0o600)
    vault = load_settings(config).keys.vault
    assert vault is not None and vault.token is not None
    assert vault.token.get_secret_value() == "hvs.inline-token-3c9e"
