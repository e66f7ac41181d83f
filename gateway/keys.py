"""API keys files: SHA-256 hashes of keys with who they belong to.

The file the ``auth`` plugin reads and ``llamagate keys`` writes::

    keys:
      - sha256: 9f86d0...        # hex SHA-256 of the key; the key itself is never stored
        client: alice
        role: user               # or admin
        models: [smollm2]        # optional; absent or empty: every model
        limits: {requests_per_minute: 30, tokens_per_minute: 20000}   # optional

The file is written with mode 0600.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from .context import Principal

KEY_PREFIX = "sk-lg-"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def derived_client_id(key: str) -> str:
    """A stable id for a key that came without a client name (never the key itself)."""
    return "key-" + key_hash(key)[:12]


def parse_env_keys(text: str, role: str) -> dict[str, Principal]:
    """``key:client,key2:client2,key3`` -> principals by key hash."""
    principals = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, client = item.partition(":")
        principals[key_hash(key)] = Principal(client_id=client or derived_client_id(key), role=role)
    return principals


def read_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    data = yaml.safe_load(Path(path).read_text()) or {}
    entries = data.get("keys") or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: keys must be a list")
    return entries


def write_entries(path: str | os.PathLike[str], entries: list[dict[str, Any]]) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump({"keys": entries}, handle, sort_keys=False)
    os.replace(tmp, path)


def load_keys_file(path: str | os.PathLike[str]) -> dict[str, Principal]:
    """Principals by key hash.

    Raises:
        ValueError: naming the entry that is malformed.
    """
    principals = {}
    for i, entry in enumerate(read_entries(path)):
        try:
            digest = str(entry["sha256"]).lower()
            principal = Principal(client_id=str(entry["client"]), role=entry.get("role", "user"),
                                  models=frozenset(entry.get("models") or ()),
                                  limits=dict(entry.get("limits") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: keys[{i}]: missing or malformed field {exc}") from None
        if principal.role not in ("user", "admin") or len(digest) != 64:
            raise ValueError(f"{path}: keys[{i}]: role must be user or admin, sha256 64 hex digits")
        principals[digest] = principal
    return principals


def add_key(path: str | os.PathLike[str], client: str, role: str = "user", models: list[str] | None = None,
            limits: dict[str, int] | None = None) -> str:
    """Store a new key's hash; returns the key (shown once, never stored)."""
    key = new_key()
    entry: dict[str, Any] = {"sha256": key_hash(key), "client": client, "role": role}
    if models:
        entry["models"] = models
    if limits:
        entry["limits"] = limits
    write_entries(path, read_entries(path) + [entry])
    return key


def revoke(path: str | os.PathLike[str], who: str) -> int:
    """Remove the keys of client ``who`` or whose hash starts with ``who``; returns how many."""
    entries = read_entries(path)
    kept = [e for e in entries if e.get("client") != who and not str(e.get("sha256", "")).startswith(who)]
    write_entries(path, kept)
    return len(entries) - len(kept)
