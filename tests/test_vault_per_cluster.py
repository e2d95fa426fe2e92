"""One transit key per cluster, as docs/vault.md lays it out: the policy printed there, applied to
OpenBao, lets a database host seal and unwrap its own cluster's keys and nothing of another's."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from rig.servers import VaultServer
from rig.vault import insecure_http

from drkit.config.settings import VaultSettings
from drkit.crypto.transit import VaultTransitProvider
from drkit.crypto.vault import VaultSession
from drkit.errors import VaultError, WrongKey

DOCS = Path(__file__).resolve().parent.parent / "docs" / "vault.md"


def documented_backup_policy(mount: str, cluster: str) -> str:
    """The database host's policy from docs/vault.md, for ``cluster`` on ``mount``."""
    blocks = re.findall(r"```hcl\n(.*?)```", DOCS.read_text(), re.DOTALL)
    [policy] = [b for b in blocks if b.startswith("# drkit-backup-pg-orders")]
    return policy.replace("transit/", f"{mount}/").replace("pg-orders", cluster)


def provider(server: VaultServer, token: str, mount: str, key: str) -> VaultTransitProvider:
    settings = VaultSettings(addr=server.addr, token=token, timeout=5, **insecure_http(server))
    return VaultTransitProvider(VaultSession(settings), mount, key)


def test_a_host_cannot_unwrap_or_seal_with_another_clusters_key(
    vault_server: VaultServer,
) -> None:
    mount = f"transit-{secrets.token_hex(4)}"
    vault_server.enable_transit(mount)
    tokens = {}
    for cluster in ("pg-orders", "pg-billing"):
        vault_server.api("POST", f"{mount}/keys/drkit-{cluster}")
        name = f"drkit-backup-{cluster}-{mount}"
        policy = documented_backup_policy(mount, cluster)
        vault_server.api("POST", f"sys/policies/acl/{name}", {"policy": policy})
        created = vault_server.api("POST", "auth/token/create", {"policies": [name], "ttl": "1h"})
        tokens[cluster] = str(created["auth"]["client_token"])

    orders = provider(vault_server, tokens["pg-orders"], mount, "drkit-pg-orders")
    billing = provider(vault_server, tokens["pg-billing"], mount, "drkit-pg-billing")
    orders_key = orders.new_data_key()
    billing_key = billing.new_data_key()
    assert orders.unwrap(orders_key.record) == orders_key.plaintext  # its own: fine
    assert billing.unwrap(billing_key.record) == billing_key.plaintext

    # The orders host, configured for the billing key, can neither read nor seal with it.
    intruder = provider(vault_server, tokens["pg-orders"], mount, "drkit-pg-billing")
    with pytest.raises(VaultError, match="Vault denied permission on"):
        intruder.unwrap(billing_key.record)
    with pytest.raises(VaultError, match="Vault denied permission on"):
        intruder.new_data_key()
    # Nor does its own key open the other cluster's record.
    with pytest.raises(WrongKey, match="wrapped by transit key"):
        orders.unwrap(billing_key.record)
