"""API keys files: SHA-256 hashes of keys with who they belong to.

The file the ``auth`` plugin reads and ``llamagate keys`` writes::

    keys:
      - sha256: 9f86d0...        # hex SHA-256 of the key; the key itself is never stored
        client: alice
        role: user               # or admin
        models: [smollm2]        # optional; absent or empty: every model
        limits: {requests_per_minute: 30, tokens_per_minute: 20000}   # optional
        priority: 10             # optional, 0-100 (default 0): higher goes first in a
                                 # backend's admission queue (admins before all)

Every entry is checked when the file is loaded: ``sha256`` 64 hex digits, once in the
file; ``client`` a non-empty string; ``role`` ``user`` or ``admin``; ``models`` a list
of model ids; ``limits`` only ``requests_per_minute``/``tokens_per_minute``, each an
integer >= 1 (a key cannot lift its role's limits; an admin role can); the quota plugin's
``tokens_per_day``, ``tokens_per_month`` and ``requests_per_day`` may be there too; ``priority``
an integer 0 to 100. A file that
breaks any of this is refused whole, naming the entry.

The file is written with mode 0600 (a fresh temporary file, then renamed over it); a
file that every user may write is refused when it loads (anyone could add an admin key).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterator

import yaml

from ..context import MAX_PRIORITY, Principal

KEY_PREFIX = "sk-lg-"
# Rate limits (the ratelimit plugin) and quotas (the quota plugin).
LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month", "requests_per_day")
ROLES = ("user", "admin")
MAX_KEY_CHARS = 512  # longer presented keys are refused before hashing
MIN_REVOKE_PREFIX = 8  # hex digits of a sha256 prefix that `revoke` accepts
MAX_CLIENT_CHARS = 64  # a new key's client id; it shows in logs, metrics, the ledger and the console
_HEX64 = re.compile(r"[0-9a-f]{64}")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def derived_client_id(key: str) -> str:
    """A stable id for a key that came without a client name (never the key itself)."""
    return "key-" + key_hash(key)[:12]


def check_client_id(client: Any) -> str:
    """A new key's client id, stripped: 1 to MAX_CLIENT_CHARS characters, none a control
    character (a newline would forge log lines). Other characters are allowed, and
    escaped wherever they are shown.

    Raises:
        ValueError: saying what is wrong.
    """
    if not isinstance(client, str) or not client.strip():
        raise ValueError("client must be a non-empty string")
    client = client.strip()
    if len(client) > MAX_CLIENT_CHARS:
        raise ValueError(f"client must be at most {MAX_CLIENT_CHARS} characters")
    if any(unicodedata.category(c).startswith("C") for c in client):
        raise ValueError("client must not hold control or invisible format characters")
    return client


def parse_env_keys(text: str, role: str) -> dict[str, Principal]:
    """``key:client,key2:client2,key3`` -> principals by key hash.

    Blank items are skipped; spaces around a key or a client are not part of it.

    Raises:
        ValueError: an item with a client but no key (``:alice``), or the same key twice
            for different clients.
    """
    principals: dict[str, Principal] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, client = item.partition(":")
        key, client = key.strip(), client.strip()
        if not key:
            raise ValueError(f"an item without a key ({item!r}): every item is key or key:client")
        if len(key) > MAX_KEY_CHARS:
            raise ValueError(f"a key longer than {MAX_KEY_CHARS} characters")
        digest = key_hash(key)
        principal = Principal(client_id=client or derived_client_id(key), role=role, key_id=digest[:12])
        if principals.get(digest, principal) != principal:
            raise ValueError(f"the same key is given twice, for {principals[digest].client_id} and "
                             f"{principal.client_id}")
        principals[digest] = principal
    return principals


def read_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The file's entries as written (not checked: see :func:`load_keys_file`).

    Raises:
        ValueError: the file is not YAML, or not ``{keys: [...]}``.
    """
    if not os.path.exists(path):
        return []
    if os.stat(path).st_mode & 0o002:
        raise ValueError(f"{path}: writable by every user of the machine, who could add an admin key; "
                         f"chmod o-w it (llamagate keys writes it 0600)")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with a `keys:` list")
    entries = data.get("keys") or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: keys must be a list")
    return entries


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock (on the file's folder) for a read-modify-write of the keys
    file, so that two ``llamagate keys`` at once do not lose one's change."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_entries(path: str | os.PathLike[str], entries: list[dict[str, Any]]) -> None:
    """Replace the file with ``entries``, mode 0600: written to a new private temporary
    file (never one that already exists, which may be wider or a symlink), then renamed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump({"keys": entries}, handle, sort_keys=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_limits(limits: Any, where: str) -> dict[str, int]:
    """A key's ``limits``: known names, each an integer >= 1.

    Raises:
        ValueError: naming ``where`` and the field at fault.
    """
    if limits is None:
        return {}
    if not isinstance(limits, dict):
        raise ValueError(f"{where}: limits must be a mapping of {' and/or '.join(LIMIT_NAMES)}")
    checked = {}
    for name, value in limits.items():
        if name not in LIMIT_NAMES:
            raise ValueError(f"{where}: limits.{name}: unknown limit (known: {', '.join(LIMIT_NAMES)})")
        if type(value) is not int or value < 1:
            raise ValueError(f"{where}: limits.{name}: {value!r} is not an integer >= 1 (a key cannot lift its "
                             "role's limits; give it a role whose limits are lifted instead)")
        checked[name] = value
    return checked


def principal_of(entry: Any, where: str) -> tuple[str, Principal]:
    """One checked entry of a keys file: its hash and principal.

    Raises:
        ValueError: naming ``where`` and the field at fault.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with sha256 and client")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
        raise ValueError(f"{where}: sha256 must be 64 hex digits")
    client = entry.get("client")
    if not isinstance(client, str) or not client.strip():
        raise ValueError(f"{where}: client must be a non-empty string")
    role = entry.get("role", "user")
    if role not in ROLES:
        raise ValueError(f"{where}: role must be user or admin (lower case), not {role!r}")
    models = entry.get("models")
    if models is None:
        models = []
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"{where}: models must be a list of model ids")
    priority = entry.get("priority", 0)
    if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"{where}: priority must be an integer from 0 to {MAX_PRIORITY}")
    principal = Principal(client_id=client.strip(), role=role, models=frozenset(models),
                          limits=check_limits(entry.get("limits"), where), key_id=digest.lower()[:12],
                          priority=priority)
    return digest.lower(), principal


def load_keys_file(path: str | os.PathLike[str]) -> dict[str, Principal]:
    """Principals by key hash.

    Raises:
        ValueError: naming the entry that is malformed, or the two that hold the same key.
    """
    principals: dict[str, Principal] = {}
    seen: dict[str, int] = {}
    for i, entry in enumerate(read_entries(path)):
        digest, principal = principal_of(entry, f"{path}: keys[{i}]")
        if digest in seen:
            raise ValueError(f"{path}: keys[{i}]: the same sha256 as keys[{seen[digest]}]")
        seen[digest] = i
        principals[digest] = principal
    return principals


def add_key(path: str | os.PathLike[str], client: str, role: str = "user", models: list[str] | None = None,
            limits: dict[str, int] | None = None) -> str:
    """Store a new key's hash; returns the key (shown once, never stored).

    Raises:
        ValueError: a bad client, role, model list or limit (nothing is written).
    """
    key = new_key()
    entry: dict[str, Any] = {"sha256": key_hash(key), "client": check_client_id(client), "role": role}
    if models:
        entry["models"] = models
    if limits:
        entry["limits"] = limits
    principal_of(entry, "the new key")
    with locked(path):
        write_entries(path, read_entries(path) + [entry])
    return key


def revoke(path: str | os.PathLike[str], who: str) -> int:
    """Remove the keys of client ``who``, or the one key whose hash starts with ``who``
    (at least 8 hex digits); returns how many.

    Raises:
        ValueError: ``who`` is empty, or a hash prefix shorter than 8 digits or shared
            by several keys (nothing is removed).
    """
    who = who.strip()
    if not who:
        raise ValueError("name a client or a sha256 prefix")
    with locked(path):
        entries = read_entries(path)
        matches = [e for e in entries if isinstance(e, dict) and e.get("client") == who]
        if not matches:
            prefix = who.lower()
            matches = [e for e in entries if isinstance(e, dict) and str(e.get("sha256", "")).lower().startswith(prefix)]
            if matches and (len(prefix) < MIN_REVOKE_PREFIX or not re.fullmatch(r"[0-9a-f]+", prefix)):
                raise ValueError(f"a sha256 prefix must be at least {MIN_REVOKE_PREFIX} hex digits")
            if len(matches) > 1:
                raise ValueError(f"{len(matches)} keys have a sha256 starting with {who}; give more digits")
        if matches:
            write_entries(path, [e for e in entries if not any(e is m for m in matches)])
    return len(matches)
