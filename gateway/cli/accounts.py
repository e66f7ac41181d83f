"""The commands of keys and usage: ``keys add|list|revoke|rotate`` (the API keys file, or the
keys database) and ``usage`` (the ledger)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta, timezone

from ..storage import keydb, keys, ledger, pg
from .registry import Action, FromSettings, arg, command

# Every keys action reads the file, or the database instead.
KEY_STORE = (arg("--file", default=FromSettings(lambda env: env.keys_file),
                 help="keys file (default LLAMAGATE_KEYS_FILE or keys.yaml)"),
             arg("--db", default=FromSettings(lambda env: env.database_url or None), metavar="URL",
                 help="the keys database instead of the file: postgresql://... (default "
                      "LLAMAGATE_DATABASE_URL; when set, the file is not used)"))


def key_limits(args: argparse.Namespace) -> dict[str, int]:
    return {name: value for name, value in (("requests_per_minute", args.rpm), ("tokens_per_minute", args.tpm),
                                            ("tokens_per_day", args.tokens_per_day),
                                            ("tokens_per_month", args.tokens_per_month),
                                            ("requests_per_day", args.requests_per_day)) if value is not None}


@command("keys", "manage the API keys file (hashes only)", actions=(
    Action("add", "make a key, print it once, store its hash", (
        arg("--client", required=True),
        arg("--role", choices=["user", "admin"], default="user"),
        arg("--models", help="comma-separated model ids the key may use (default: all)"),
        arg("--rpm", type=int, help="requests per minute for this key"),
        arg("--tpm", type=int, help="tokens per minute for this key"),
        arg("--tokens-per-day", type=int, help="quota: tokens per UTC day"),
        arg("--tokens-per-month", type=int, help="quota: tokens per UTC month"),
        arg("--requests-per-day", type=int, help="quota: requests per UTC day"),
        arg("--priority", type=int,
            help="queue priority, 0 (default) to 100: higher goes first, after admins (--db only)"),
        arg("--expires", help="an ISO time or a number of days (--db only)"), *KEY_STORE)),
    Action("list", "list clients, roles and key ids", (
        arg("--all", action="store_true", help="revoked keys too (--db only)"),
        arg("--client", default=None, help="only this client's keys (--db only)"), *KEY_STORE)),
    Action("revoke", "revoke the keys of a client or one key by its id (sha256 prefix)", (
        arg("who", help="client name or key id (sha256 prefix, 8 digits at least)"), *KEY_STORE)),
    Action("rotate", "a new key in place of a client's one key (--db only)", (
        arg("who", help="client name or key id"),
        arg("--grace", type=float, default=0.0, help="seconds the old key keeps working (default 0)"), *KEY_STORE))))
def cmd_keys(args: argparse.Namespace) -> int:
    if args.db:
        return cmd_keys_db(args)
    try:
        if args.action == "add":
            models = [m for m in (args.models or "").split(",") if m]
            if args.priority is not None or args.expires is not None:
                raise ValueError("--priority and --expires need the keys database (--db)")
            key = keys.add_key(args.file, args.client, args.role, models, key_limits(args))
            print(f"New key for {args.client} ({args.role}); it is shown only this once:\n{key}")
        elif args.action == "list":
            keys.load_keys_file(args.file)  # refuses a malformed file, naming the entry
            for entry in keys.read_entries(args.file):
                models = ",".join(entry.get("models") or []) or "*"
                print(f"{entry['client']:<20} {entry.get('role', 'user'):<6} models={models:<20} "
                      f"limits={json.dumps(entry.get('limits') or {})} sha256={entry['sha256'][:12]}")
        elif args.action == "rotate":
            raise ValueError("rotate needs the keys database (--db); with a file, add a key then revoke the old one")
        else:
            removed = keys.revoke(args.file, args.who)
            print(f"revoked {removed} key(s)")
            return 0 if removed else 1
    except (OSError, ValueError) as exc:
        print(f"llamagate keys: {exc}", file=sys.stderr)
        return 1
    return 0


def expiry(text: str | None) -> datetime | None:
    """``--expires``: an ISO time (UTC when it names no zone) or a number of days."""
    if text is None:
        return None
    if text.isdigit():
        return datetime.now(timezone.utc) + timedelta(days=int(text))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("--expires takes an ISO time (2027-01-31T00:00) or a number of days") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def cmd_keys_db(args: argparse.Namespace) -> int:
    conn = None
    try:
        conn = pg.connect(args.db)
        keydb.prepare(conn)
        if args.action == "add":
            models = [m for m in (args.models or "").split(",") if m]
            key, row = keydb.add_key(conn, args.client, args.role, models, key_limits(args), args.priority,
                                     expiry(args.expires))
            print(f"New key {row.key_id} for {row.client} ({row.role}); it is shown only this once:\n{key}")
        elif args.action == "list":
            for row in keydb.list_keys(conn, client=args.client, include_revoked=args.all):
                models = ",".join(row.models) or "*"
                state = f"revoked {row.revoked:%Y-%m-%d %H:%M}" if row.revoked else \
                    f"expires {row.expires:%Y-%m-%d %H:%M}" if row.expires else "live"
                print(f"{row.key_id}  {row.client:<20} {row.role:<6} models={models:<20} "
                      f"limits={json.dumps(row.limits)} priority={row.priority if row.priority is not None else '-'} "
                      f"{state}")
        elif args.action == "rotate":
            key, row = keydb.rotate(conn, args.who, args.grace)
            old = f"expires in {args.grace:g} s" if args.grace > 0 else "is revoked"
            print(f"New key {row.key_id} for {row.client}; the old one {old}. Shown only this once:\n{key}")
        else:
            revoked = keydb.revoke(conn, args.who)
            print(f"revoked {revoked} key(s)")
            return 0 if revoked else 1
    except (ValueError, RuntimeError, *pg.ERRORS) as exc:
        print(f"llamagate keys: {exc}", file=sys.stderr)
        return 1
    finally:
        pg.close_quietly(conn)
    return 0


@command("usage", "usage from the ledger: per day, client and model, or the top clients",
         arg("--db", default=FromSettings(lambda env: env.database_url or None), metavar="URL",
             help="the ledger database: postgresql://... (default LLAMAGATE_DATABASE_URL)"),
         arg("--client", default=None),
         arg("--from", dest="start", default=None, help="first UTC day, YYYY-MM-DD (default: 30 days ago)"),
         arg("--to", dest="end", default=None, help="last UTC day, YYYY-MM-DD (default: today)"),
         arg("--top", type=int, default=None, help="the N clients that used the most tokens on the last day"),
         arg("--json", action="store_true"))
def cmd_usage(args: argparse.Namespace) -> int:
    if not args.db:
        print("llamagate usage: give --db URL or set LLAMAGATE_DATABASE_URL", file=sys.stderr)
        return 1
    conn = None
    try:
        today = datetime.now(timezone.utc).date()
        first, last = ledger.day_range(args.start, args.end, today)
        conn = pg.connect(args.db)
        ledger.prepare(conn)
        if args.top:
            rows = ledger.top_clients(conn, last, args.top)
        else:
            rows = ledger.usage(conn, first, last, client=args.client)
    except (ValueError, RuntimeError, *pg.ERRORS) as exc:
        print(f"llamagate usage: {exc}", file=sys.stderr)
        return 1
    finally:
        pg.close_quietly(conn)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.top:
        print(f"{'client':<24} {'requests':>9} {'tokens':>12}   ({last})")
        for row in rows:
            print(f"{row['client']:<24} {row['requests']:>9} {row['total_tokens']:>12}")
        return 0
    print(f"{'day':<10} {'client':<20} {'model':<20} {'requests':>9} {'prompt':>10} {'completion':>10} {'total':>10}")
    for row in rows:
        print(f"{row['day']:<10} {row['client']:<20} {str(row['model']):<20} {row['requests']:>9} "
              f"{row['prompt_tokens']:>10} {row['completion_tokens']:>10} {row['total_tokens']:>10}")
    return 0
