"""Saved KV states: a tenant's conversations stay warm when they lose their llama-server
slot, when their model is stopped (a swap, ``idle_ttl``, an unload, a drain) and when
they move to another replica of the host (docs/kv-states.md).

llama-server saves a slot's KV cache to a file and restores it into any slot of a
server running the same model file with the same context settings
(``POST /slots/<id>?action=save|restore`` with ``{"filename": ...}``, a bare name inside
the server's ``--slot-save-path``). The gateway owns those files:

* **where**: one private folder per host (:func:`states_directory`, ``states`` in the
  slot table's folder, 0700), the ``--slot-save-path`` of every llama-server the fleet
  launches on the host, so a state saved from one replica restores into another;
* **whose**: a state is named by its tenant scope (``BackendView.kv_scope``) and its
  conversation (:func:`conversation_key`, which already hashes the scope in) under the
  model's identity (:func:`model_tag`); the name is an opaque hash, and the core only
  ever builds the name of the request's own scope, so no request can name, let alone
  restore, another scope's state;
* **when**: the attempt layer (:mod:`gateway.backends.send`) saves what a slot holds
  before giving it to another conversation, and restores the request's own state into
  the slot it took when the slot does not hold it (``warm.keep_warm``); the fleet saves the
  live conversations' slots before it stops a model (:func:`save_replica`);
* **how much**: a disk budget per host, least recently used states removed first, and a
  per-tenant share of it (:func:`enforce_budget`, after each save).

A failed save or restore never fails the request: the turn runs cold, and the failure is
counted (``kv.save_failures``, ``kv.restore_failures``) and logged without the prompt.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any
from urllib.parse import urlsplit

from . import slots
from ..answers.usage import cached_tokens
from ..errors import LlamagateError

log = logging.getLogger("llamagate")

SUFFIX = ".kv"
SLOT_ACTION_TIMEOUT = 30.0  # seconds for a save or a restore (20 MB in ~40 ms measured; a slow disk)
DEFAULT_PREFIX_CHARS = 2048  # completions: how much of the prompt's head keys the conversation


# --- which conversation a request continues --------------------------------------------------------

def conversation_key(body: dict[str, Any] | None, route: str, model: str, scope: str,
                     prefix_chars: int = DEFAULT_PREFIX_CHARS) -> bytes | None:
    """The conversation's key, the same for every turn of it, or None when the request
    has no prompt to key by (embeddings, a malformed body). The router's prefix affinity
    and the core's saved states share it (``gateway.plugin.conversation_key``).

    For chat, the messages up to and including the first ``user`` message (the system
    prompt and the opening question: every later turn starts with them), and likewise
    Responses' ``instructions`` and ``input`` items; for completions (and llama-server's
    ``/completion`` and ``/infill``), the prompt's first ``prefix_chars`` characters (or
    tokens). BLAKE2b, not Python's salted ``hash()``: every process must agree.

    Args:
        body: The request body.
        route: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``,
            ``/completion`` or ``/infill``; other routes have no key.
        model: The public model id (one backend may serve several).
        scope: Whose caches the request may share (``BackendView.kv_scope``): hashed in,
            so two tenants sending the same prompt have different keys.
        prefix_chars: For completions, how much of the prompt's head is the key.
    """
    if not isinstance(body, dict):
        return None
    digest = blake2b(digest_size=16)
    digest.update(f"{len(scope)}:{scope}\0{len(model)}:{model}\0{route}\0".encode())
    if route in ("/v1/chat/completions", "/v1/responses"):
        messages = body.get("messages") if route == "/v1/chat/completions" else body.get("input")
        if route == "/v1/responses":
            if isinstance(messages, str):
                messages = [{"role": "user", "content": messages}]
            if isinstance(body.get("instructions"), str) and isinstance(messages, list):
                messages = [{"role": "system", "content": body["instructions"]}, *messages]
        if not isinstance(messages, list) or not messages:
            return None
        for message in messages:
            if not isinstance(message, dict):
                return None
            role = message.get("role")
            digest.update(f"\0{role}\0".encode())
            _update(digest, message.get("content"))
            if role == "user":  # the opening question: every later turn repeats it
                break
    elif route in ("/v1/completions", "/completion", "/infill"):
        prompt = body.get("input_prefix") if route == "/infill" else body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch: its first prompt
        if isinstance(prompt, str) and prompt:
            digest.update(prompt[:prefix_chars].encode("utf-8", "surrogatepass"))
        elif isinstance(prompt, list) and prompt:
            digest.update(json.dumps(prompt[:prefix_chars]).encode())  # token ids
        else:
            return None
    else:
        return None
    return digest.digest()


def _update(digest: Any, content: Any) -> None:
    """Feed a message's content: a string, or a list of parts (text, images...)."""
    if isinstance(content, str):
        digest.update(content.encode("utf-8", "surrogatepass"))
    elif isinstance(content, list):
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            data = text if isinstance(text, str) else json.dumps(part, sort_keys=True, default=str)
            digest.update(b"\0" + data.encode("utf-8", "surrogatepass"))
    elif content is not None:
        digest.update(json.dumps(content, sort_keys=True, default=str).encode())


# --- names and the folder ----------------------------------------------------------------------------

_tags: dict[tuple[str, int, int], bytes] = {}


def model_tag(model: str, ctx: int, parallel: int) -> bytes:
    """What a saved state is valid for: the model file (its path, size and modification
    time: a file replaced in place is another model) and the context of a slot."""
    cached = _tags.get((model, ctx, parallel))
    if cached is not None:
        return cached
    try:
        info = os.stat(model)
        identity = f"{model}\0{info.st_size}\0{info.st_mtime_ns}\0{ctx}\0{parallel}"
    except OSError:
        identity = f"{model}\0?\0{ctx}\0{parallel}"
    tag = _tags[(model, ctx, parallel)] = blake2b(identity.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return tag


def backend_tag(name: str, urls: tuple[str, ...]) -> bytes:
    """A backend the gateway does not launch: its states are not saved (its llama-servers'
    save path is not the host's folder), but its slots' conversations are told apart."""
    return blake2b("\0".join((name, *urls)).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def state_id(tag: bytes, key: bytes) -> bytes:
    """The 16 bytes a slot's record keeps for the conversation it holds (never all zero)."""
    return blake2b(tag + key, digest_size=16, person=b"llamagate-kvst").digest()


def file_name(owner: bytes, state: bytes) -> str:
    """A state's file: its scope's hash first (the per-tenant share counts by it), then
    the state's. Both opaque: nothing of the tenant or the prompt shows."""
    return f"{owner.hex()}-{state.hex()}{SUFFIX}"


def states_directory(slots_directory: str) -> str:
    """The host's saved states: beside the slot table, in its private folder."""
    return os.path.join(slots_directory, "states")


# --- llama-server's slot actions ---------------------------------------------------------------------

class SlotActionFailed(LlamagateError):
    """llama-server refused or failed a save, restore or erase (the reason, without names)."""


def slot_action(url: str, slot: int, action: str, filename: str, api_key: str | None,
                timeout: float = SLOT_ACTION_TIMEOUT) -> dict[str, Any]:
    """``POST <url>/slots/<slot>?action=<action>`` with the file name; llama-server's answer.

    Raises:
        SlotActionFailed: a transport failure, an error status, or an answer that is not JSON.
    """
    parts = urlsplit(url)
    conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_class(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.request("POST", f"{parts.path.rstrip('/')}/slots/{slot}?action={action}",
                     json.dumps({"filename": filename}), headers)
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise SlotActionFailed(f"{action}: {type(exc).__name__}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise SlotActionFailed(f"{action}: HTTP {resp.status}")
    try:
        answer = json.loads(data)
    except ValueError:
        raise SlotActionFailed(f"{action}: an answer that is not JSON") from None
    if not isinstance(answer, dict):
        raise SlotActionFailed(f"{action}: an answer that is not an object")
    return answer


def check_restored_turn(ctx: Any, restored: int) -> None:
    """A turn that ran after a restore must have reused it: one that took less than half
    of what was restored from the cache (llama-server evaluated the prompt again) is a
    failed restore, counted ``kv.restore_failures`` and logged; its answer stands."""
    cached = cached_tokens(ctx.usage)
    if cached is not None and cached * 2 < restored:
        ctx.incr("kv.restore_failures")
        ctx.log(logging.WARNING, "kv states: the turn after a restore of %d tokens reused %d", restored, cached)


# --- the folder's budget -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """How much of the host's disk saved states may take.

    Attributes:
        total: Bytes for every state of the host (0: saved states off).
        tenant_share: The fraction of ``total`` one scope's states may take.
    """

    total: int
    tenant_share: float

    @property
    def per_tenant(self) -> int:
        return int(self.total * self.tenant_share)


def enforce_budget(directory: str, budget: Budget, owner: bytes | None = None) -> list[str]:
    """Remove states, least recently used first (a restore touches its file), until
    ``owner``'s states fit the tenant share and the folder fits the total. Returns the
    removed names (they are counted ``kv.evicted``)."""
    files: list[tuple[float, int, str]] = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(SUFFIX):
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    files.append((info.st_mtime, info.st_size, entry.name))
    except OSError:
        return []
    files.sort()
    removed: list[str] = []

    def drop(name: str) -> None:
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("kv states: cannot remove a state (%s)", exc.strerror or exc)

    if owner is not None:
        prefix = owner.hex() + "-"
        own = [f for f in files if f[2].startswith(prefix)]
        used = sum(size for _, size, _ in own)
        for _, size, name in own:
            if used <= budget.per_tenant:
                break
            drop(name)
            used -= size
    total = sum(size for _, size, name in files if name not in removed)
    for _, size, name in files:
        if total <= budget.total:
            break
        if name in removed:
            continue
        drop(name)
        total -= size
    return removed


# --- one attempt's saves and restores ----------------------------------------------------------------

@dataclass
class Outcome:
    """What one attempt's saves and restores did (``warm.keep_warm``), for its counters."""

    saves: int = 0
    saved_bytes: int = 0
    save_ms: float = 0.0
    restored_bytes: int = 0
    restore_ms: float = 0.0
    restored_tokens: int = 0
    save_failed: bool = False
    restore_failed: bool = False
    moved: bool = False  # the state came live from another replica's slot
    evicted: int = 0

    def restored(self) -> bool:
        return self.restored_tokens > 0


class States:
    """The host's saved states: the folder, its budget, the actions on a replica.

    Args:
        directory: The private folder (made 0700 if missing).
        budget: The disk budget; a total of 0 turns saved states off.
    """

    def __init__(self, directory: str, budget: Budget) -> None:
        self.directory = directory
        self.budget = budget
        self.broken: str | None = None
        if budget.total > 0:
            try:
                # the parent first: made here, it would get the default mode, and the
                # slot table (and these states) would be open to other users
                slots.check_private_directory(os.path.dirname(directory))
                slots.check_private_directory(directory)
            except OSError as exc:
                self.broken = f"{directory}: {exc.strerror or exc}"
                log.error("kv states: folder unusable (%s); conversations evicted from their slots go cold", self.broken)

    @property
    def enabled(self) -> bool:
        return self.budget.total > 0 and self.broken is None

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def has(self, name: str) -> bool:
        return os.path.isfile(self.path(name))

    def save(self, url: str, slot: int, owner: bytes, state: bytes, api_key: str | None, outcome: Outcome) -> bool:
        """Save what ``slot`` holds as the (owner, state) file, then keep the budget."""
        name = file_name(owner, state)
        start = time.monotonic()
        try:
            slot_action(url, slot, "save", name, api_key)
        except SlotActionFailed as exc:
            outcome.save_failed = True
            log.warning("kv states: saving slot %d of %s failed (%s)", slot, url, exc)
            return False
        outcome.save_ms += (time.monotonic() - start) * 1000.0
        try:
            outcome.saved_bytes += os.path.getsize(self.path(name))
        except OSError:  # a llama-server whose save path is not this folder
            outcome.save_failed = True
            log.warning("kv states: slot %d of %s saved outside the host's states folder", slot, url)
            return False
        outcome.saves += 1
        outcome.evicted += len(enforce_budget(self.directory, self.budget, owner))
        return True

    def restore(self, url: str, slot: int, owner: bytes, state: bytes, api_key: str | None,
                outcome: Outcome) -> bool:
        """Restore the (owner, state) file into ``slot``; a missing or unreadable file, or
        an answer without restored tokens, is a failure (the turn then runs cold)."""
        name = file_name(owner, state)
        path = self.path(name)
        start = time.monotonic()
        try:
            size = os.path.getsize(path)
            answer = slot_action(url, slot, "restore", name, api_key)
        except (OSError, SlotActionFailed) as exc:
            outcome.restore_failed = True
            log.warning("kv states: restoring into slot %d of %s failed (%s)", slot, url,
                        exc if isinstance(exc, SlotActionFailed) else exc.strerror or "no file")
            self.discard(name)
            return False
        tokens = answer.get("n_restored")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
            outcome.restore_failed = True
            log.warning("kv states: slot %d of %s restored no tokens", slot, url)
            self.discard(name)
            return False
        outcome.restore_ms += (time.monotonic() - start) * 1000.0
        outcome.restored_bytes += size
        outcome.restored_tokens = tokens
        try:
            os.utime(path)  # recently used: the budget removes it last
        except OSError:
            pass
        return True

    def discard(self, name: str) -> None:
        """A state that failed to restore is not tried again."""
        try:
            os.unlink(self.path(name))
        except OSError:
            pass


def save_replica(url: str, count: int, api_key: str | None) -> tuple[int, int]:
    """Before the fleet stops the llama-server at ``url``: save every idle slot holding a
    known conversation (:meth:`gateway.backends.slots.SlotTable.held`), then forget what
    its slots hold. Returns (states saved, their bytes)."""
    saved, size = 0, 0
    kept = states()
    if kept.enabled:
        for slot, owner, state in slots.table().held(url, count):
            outcome = Outcome()
            if kept.save(url, slot, owner, state, api_key, outcome):
                saved, size = saved + 1, size + outcome.saved_bytes
    slots.table().forget(url)
    return saved, size


_states: States | None = None


def states() -> States:
    """The process's saved states, made on first use from the settings."""
    global _states
    if _states is None:
        from .. import settings

        current = settings.current()
        _states = States(states_directory(current.slots_dir or slots.default_directory()),
                         Budget(current.kv_states_budget, current.kv_states_tenant_share))
    return _states


def reset() -> None:
    """Forget the process's saved states object (tests that change the settings)."""
    global _states
    _states = None

