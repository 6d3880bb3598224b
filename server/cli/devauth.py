"""`shardstate dev --auth`: an admin, a read-write and a read-only token for the `default`
namespace, the hashed token file every node reads, and a cluster token for node-to-node calls.

    DATA/tokens.toml       the token file (sha256 of each token; servers re-read it on change)
    DATA/cluster-token     the cluster token (mode 0600)
    DATA/dev-tokens.json   {"admin": ..., "readwrite": ..., "read": ...} (mode 0600)

A restart on the same DATA keeps all three, so clients holding the tokens keep working.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from shardstate.common import auth

ROLES = (("admin", "admin"), ("readwrite", "write"), ("read", "read"))
TOKEN_FILE = "tokens.toml"
CLUSTER_FILE = "cluster-token"
DEV_TOKENS = "dev-tokens.json"


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class DevAuth:
    data: Path
    tokens: dict[str, str]
    cluster_token: str

    @property
    def token_file(self) -> Path:
        return self.data / TOKEN_FILE

    @property
    def cluster_file(self) -> Path:
        return self.data / CLUSTER_FILE

    @property
    def tokens_file(self) -> Path:
        return self.data / DEV_TOKENS

    def node_args(self) -> list[str]:
        """What every node started by dev gets."""
        return ["--auth-file", str(self.token_file), "--cluster-token-file", str(self.cluster_file)]

    def state(self) -> dict[str, str]:
        """dev.json's "auth" entry (paths only)."""
        return {"token_file": str(self.token_file), "cluster_token_file": str(self.cluster_file),
                "tokens": str(self.tokens_file)}


def was_on(data: Path) -> bool:
    return (data / DEV_TOKENS).exists()


def prepare(data: Path) -> DevAuth:
    """The dev tokens of DATA: made the first time, read back afterwards."""
    tokens_path, cluster_path, file_path = data / DEV_TOKENS, data / CLUSTER_FILE, data / TOKEN_FILE
    if tokens_path.exists() and cluster_path.exists() and file_path.exists():
        tokens = json.loads(tokens_path.read_text())
        if all(k in tokens for k, _ in ROLES):
            return DevAuth(data, {k: tokens[k] for k, _ in ROLES}, cluster_path.read_text().strip())
    tokens = {key: auth.new_token() for key, _ in ROLES}
    cluster = auth.new_token()
    entries = [auth.token_entry(auth.hash_token(tokens[key]), role, ["default"], f"dev {key}") for key, role in ROLES]
    header = "# shardstate dev --auth: hashed tokens (the tokens are in dev-tokens.json).\n\n"
    _write_private(cluster_path, cluster + "\n")
    _write_private(file_path, header + "\n".join(entries))
    _write_private(tokens_path, json.dumps(tokens, indent=2) + "\n")
    return DevAuth(data, tokens, cluster)
