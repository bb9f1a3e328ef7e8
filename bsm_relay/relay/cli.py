"""``bsm-relay``: the one command (serve, and manage sellers, senders, buyers,
orders, aliases and the queue).

Every listing accepts ``--json``.  A refused or failed command exits non-zero with
a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..aliases import keys as keyring
from ..aliases.codec import Direction
from ..config import settings as config
from . import cli_marketplace, cli_ops, db
from .dkim import DkimKeyError, generate_key, txt_record_name
from .queue import admin as queue_admin
from .queue import get_item, list_items
from .server import StartupError, dkim_key_path, load_signer, open_relay, serve
from .store import ORDER_STATUSES, StoreError


class CommandError(RuntimeError):
    pass


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(text)


def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else "-"


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(f"{value!r} is not an ISO 8601 date or time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# -- commands ---------------------------------------------------------------------

async def cmd_init(s: config.Settings, args: argparse.Namespace) -> None:
    state = Path(s.state_dir)
    # The database holds real addresses and queued messages: a state directory and a SQLite file
    # that init creates are the relay user's alone, whatever the umask (an existing one is left
    # as its owner set it).  systemd/bsm-relay.service also runs with UMask=0077.
    if not state.exists():
        state.mkdir(mode=0o700, parents=True)
    database = db.sqlite_file(s.database_url)
    if database is not None and not database.exists():
        database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        database.touch(mode=0o600)      # SQLite gives its -wal and -shm files the same mode
    _, created = keyring.ensure(state)
    engine = db.make_engine(s.database_url)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()
    key_path = dkim_key_path(s)
    dkim_created = not key_path.exists()
    if dkim_created:
        generate_key(state, s.dkim.selector, s.dkim.algorithm)
    signer = load_signer(s)
    record = {"name": txt_record_name(s.dkim.selector, s.aliases.domain), "value": signer.txt_record()}
    _out(args, {"state_dir": str(state), "key_created": created, "database": "current",
                "dkim_key_created": dkim_created, "dkim_txt_record": record},
         f"state directory {state}: database current, alias key {'created' if created else 'present'}, "
         f"DKIM key {'created' if dkim_created else 'present'}\n"
         f"publish: {record['name']} TXT \"{record['value']}\"")


async def cmd_dkim_keygen(s: config.Settings, args: argparse.Namespace) -> None:
    selector = args.selector or s.dkim.selector
    algorithm = args.algorithm or s.dkim.algorithm
    try:
        path, txt = generate_key(Path(s.state_dir), selector, algorithm, force=args.force)
    except (DkimKeyError, FileExistsError) as exc:
        raise CommandError(f"{exc} (use --force to replace it)") from None
    name = txt_record_name(selector, s.aliases.domain)
    note = "" if selector == s.dkim.selector else f"\nset [dkim] selector = \"{selector}\" to sign with it"
    _out(args, {"path": str(path), "selector": selector, "algorithm": algorithm, "name": name, "value": txt},
         f"wrote {path}\npublish: {name} TXT \"{txt}\"{note}")


async def _with_relay(s: config.Settings, fn: Callable[[Any], Awaitable[None]]) -> None:
    relay = await open_relay(s)
    try:
        await fn(relay)
    finally:
        await relay.engine.dispose()


async def cmd_seller_add(s: config.Settings, args: argparse.Namespace) -> None:
    async def run(relay: Any) -> None:
        row = await relay.store.add_seller(args.seller_id, args.name, args.email)
        _out(args, {"seller_id": row.ext_id, "name": row.name}, f"seller {row.ext_id} added")
    await _with_relay(s, run)


async def cmd_sender_list(s: config.Settings, args: argparse.Namespace) -> None:
    async def run(relay: Any) -> None:
        rows = await relay.store.list_senders(args.seller_id, args.status)
        lines = [f"{'ADDRESS':40} {'STATUS':9} {'ATTEMPTS':>8}  FIRST SEEN"]
        for r in rows:
            status = "primary" if r["primary"] else r["status"]
            lines.append(f"{r['address']:40} {status:9} {r['attempts']:>8}  {_iso(r['first_seen'])}")
        _out(args, rows, "\n".join(lines))
    await _with_relay(s, run)


def _sender_set(status: str) -> Callable[[config.Settings, argparse.Namespace], Awaitable[None]]:
    async def cmd(s: config.Settings, args: argparse.Namespace) -> None:
        async def run(relay: Any) -> None:
            await relay.store.set_sender_status(args.seller_id, args.address, status,
                                                max_approved=s.auth.max_approved_senders)
            _out(args, {"seller_id": args.seller_id, "address": args.address, "status": status},
                 f"{args.address} is now {status} for seller {args.seller_id}")
        await _with_relay(s, run)
    return cmd


async def cmd_sender_delete(s: config.Settings, args: argparse.Namespace) -> None:
    async def run(relay: Any) -> None:
        await relay.store.delete_sender(args.seller_id, args.address)
        _out(args, {"seller_id": args.seller_id, "address": args.address, "deleted": True},
             f"{args.address} deleted from seller {args.seller_id}")
    await _with_relay(s, run)


async def cmd_buyer_add(s: config.Settings, args: argparse.Namespace) -> None:
    async def run(relay: Any) -> None:
        row = await relay.store.add_buyer(args.buyer_id, args.email, args.name, args.opt_out, args.locale)
        _out(args, {"buyer_id": row.ext_id}, f"buyer {row.ext_id} added")
    await _with_relay(s, run)


async def cmd_order_add(s: config.Settings, args: argparse.Namespace) -> None:
    async def run(relay: Any) -> None:
        await relay.store.add_order(args.order_id, args.seller, args.buyer, args.status, args.category,
                                    _parse_time(args.placed_at), _parse_time(args.delivered_at))
        _out(args, {"order_id": args.order_id, "status": args.status}, f"order {args.order_id} added")
    await _with_relay(s, run)


async def cmd_order_set(s: config.Settings, args: argparse.Namespace) -> None:
    async def run(relay: Any) -> None:
        await relay.store.set_order_status(args.order_id, args.status, _parse_time(args.delivered_at))
        _out(args, {"order_id": args.order_id, "status": args.status},
             f"order {args.order_id} is now {args.status}")
    await _with_relay(s, run)


async def pair_aliases(relay: Any, seller_ext: str, buyer_ext: str) -> dict[str, str]:
    seller = await relay.store.require_seller(seller_ext)
    buyer = await relay.store.require_buyer(buyer_ext)
    return {"buyer_alias": relay.alias(Direction.TO_BUYER, seller.id, buyer.id),
            "seller_alias": relay.alias(Direction.TO_SELLER, seller.id, buyer.id)}


async def cmd_alias(s: config.Settings, args: argparse.Namespace) -> None:
    async def run(relay: Any) -> None:
        aliases = await pair_aliases(relay, args.seller_id, args.buyer_id)
        if args.revoke:
            for address in aliases.values():
                await relay.store.revoke(address.partition("@")[0])
            aliases["revoked"] = "true"
        _out(args, aliases, f"buyer alias (the seller writes to):  {aliases['buyer_alias']}\n"
                            f"seller alias (the buyer replies to): {aliases['seller_alias']}"
             + ("\nboth are now revoked" if args.revoke else ""))
    await _with_relay(s, run)


async def cmd_alias_key_rotate(s: config.Settings, args: argparse.Namespace) -> None:
    ring = keyring.rotate(Path(s.state_dir))
    _out(args, {"current": ring.current, "key_ids": sorted(ring.alias_keys)},
         f"alias key {ring.current} is now current; older keys keep resolving")


def _queue_row(relay: Any, r: dict[str, Any]) -> dict[str, Any]:
    r = dict(r)
    if r.get("last_error"):
        r["last_error"] = relay.redactor.text(r["last_error"])
    return r


async def cmd_queue_list(s: config.Settings, args: argparse.Namespace) -> None:
    async def run(relay: Any) -> None:
        rows = [_queue_row(relay, r) for r in await list_items(relay.sessions, include_done=args.all)]
        lines = [f"{'ID':15} {'KIND':10} {'STATUS':7} {'ATTEMPTS':>8} {'NEXT ATTEMPT':25} LAST ERROR"]
        for r in rows:
            lines.append(f"{r['id']:15} {r['kind']:10} {r['status']:7} {r['attempts']:>8} "
                         f"{_iso(r['next_attempt_at']):25} {r['last_error'] or '-'}")
        _out(args, rows, "\n".join(lines) if rows else "the queue is empty")
    await _with_relay(s, run)


async def cmd_queue_show(s: config.Settings, args: argparse.Namespace) -> None:
    async def run(relay: Any) -> None:
        found = await get_item(relay.sessions, args.queue_id)
        if found is None:
            raise CommandError(f"no queue item {args.queue_id}")
        item, rcpts = found
        data: dict[str, Any] = {"id": item.id, "kind": item.kind, "status": item.status, "attempts": item.attempts,
                "errors": item.errors, "created_at": item.created_at, "next_attempt_at": item.next_attempt_at,
                "size": item.size, "delay_notified": item.delay_notified,
                "last_error": relay.redactor.text(item.last_error or "") or None,
                "recipients": [{"alias": r.alias, "status": r.status,
                                "last_error": relay.redactor.text(r.last_error or "") or None} for r in rcpts]}
        lines = [f"{k}: {_iso(v) if k.endswith('_at') else v}" for k, v in data.items() if k != "recipients"]
        lines += [f"recipient {r['alias']}: {r['status']} {r['last_error'] or ''}".rstrip()
                  for r in data["recipients"]]
        _out(args, data, "\n".join(lines))
    await _with_relay(s, run)


def _queue_action(action: str) -> Callable[[config.Settings, argparse.Namespace], Awaitable[None]]:
    async def cmd(s: config.Settings, args: argparse.Namespace) -> None:
        async def run(relay: Any) -> None:
            queue_id = getattr(args, "queue_id", None)
            changed = await queue_admin(relay.sessions, action, queue_id, state_dir=s.state_dir)
            if queue_id and not changed:
                raise CommandError(f"{action}: no {'held ' if action == 'release' else ''}queue item {queue_id}"
                                   + ("" if action in ("delete", "release") else " waiting in the queue"))
            _out(args, {"action": action, "queue_id": queue_id, "changed": changed},
                 f"{action}: {changed} item{'s' if changed != 1 else ''}")
        await _with_relay(s, run)
    return cmd


async def cmd_demo(s: config.Settings, args: argparse.Namespace) -> None:
    """Seed a small demo marketplace when the database is empty, and print how to try it."""
    async def run(relay: Any) -> None:
        if await relay.store.is_empty():
            await relay.store.add_seller("S1", "Acme Books", "seller@acme.example")
            await relay.store.add_buyer("B1", "buyer@example.org", "Bea Buyer")
            await relay.store.add_order("111-2223334-4445556", "S1", "B1", "shipped", "books")
            seeded = True
        else:
            seeded = False
        aliases = await pair_aliases(relay, "S1", "B1")
        host, port = s.listen_host_port
        data = {"seeded": seeded, **aliases, "seller_address": "seller@acme.example",
                "buyer_address": "buyer@example.org"}
        py = ("python3 -c \"import smtplib; smtplib.SMTP('{h}', {p}).sendmail('{f}', ['{t}'], "
              "'From: {f}\\r\\nTo: {t}\\r\\nSubject: About order 111-2223334-4445556\\r\\n\\r\\nHello!\\r\\n')\"")
        text = "\n".join([
            f"demo marketplace {'seeded' if seeded else 'already present'}: seller S1 (seller@acme.example), "
            "buyer B1 (buyer@example.org), order 111-2223334-4445556 (shipped)",
            f"  buyer alias  (the seller writes to):  {aliases['buyer_alias']}",
            f"  seller alias (the buyer replies to):  {aliases['seller_alias']}",
            "try, in another terminal (delivered mail lands in " + s.delivery.maildir + "/new):",
            "  " + py.format(h=host, p=port, f="seller@acme.example", t=aliases["buyer_alias"]),
            "  " + py.format(h=host, p=port, f="buyer@example.org", t=aliases["seller_alias"]),
            f"  or: swaks --server {host}:{port} --from seller@acme.example --to {aliases['buyer_alias']}",
        ])
        _out(args, data, text)
    await _with_relay(s, run)


async def cmd_serve(s: config.Settings, args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise CommandError("--workers must be at least 1")
    if args.workers == 1:
        await serve(s)
    else:
        from .supervisor import supervise
        await supervise(s, args.workers, args.config)


# -- argument parsing ----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bsm-relay", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML configuration file (default: $BSM_RELAY_CONFIG, else built-in defaults)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(parent: Any, name: str, fn: Callable[..., Awaitable[None]], help: str, json_flag: bool = True) -> Any:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    cmd(sub, "init", cmd_init, "create or upgrade the database and create the alias key if missing")
    sp = cmd(sub, "serve", cmd_serve, "serve SMTP and deliver the queue", json_flag=False)
    sp.add_argument("--workers", type=int, default=1, metavar="N",
                    help="processes sharing the port (SO_REUSEPORT) and the database; default 1")
    cmd(sub, "demo", cmd_demo, "seed a demo marketplace when the database is empty and show how to try it")

    seller = sub.add_parser("seller", help="manage sellers").add_subparsers(dest="action", required=True)
    sp = cmd(seller, "add", cmd_seller_add, "add a seller")
    sp.add_argument("seller_id")
    sp.add_argument("--name", required=True)
    sp.add_argument("--email", required=True, help="the primary address (always approved)")

    sender = sub.add_parser("sender", help="Messaging Permissions: a seller's sending addresses").add_subparsers(
        dest="action", required=True)
    sp = cmd(sender, "list", cmd_sender_list, "list a seller's addresses")
    sp.add_argument("seller_id")
    sp.add_argument("--status", choices=("approved", "pending", "blocked"))
    for action, status in (("approve", "approved"), ("block", "blocked")):
        sp = cmd(sender, action, _sender_set(status), f"mark an address {status}")
        sp.add_argument("seller_id")
        sp.add_argument("address")
    sp = cmd(sender, "delete", cmd_sender_delete, "delete a pending address (approved and blocked ones "
             "can only be switched between the two)")
    sp.add_argument("seller_id")
    sp.add_argument("address")

    buyer = sub.add_parser("buyer", help="manage buyers").add_subparsers(dest="action", required=True)
    sp = cmd(buyer, "add", cmd_buyer_add, "add a buyer")
    sp.add_argument("buyer_id")
    sp.add_argument("--email", required=True)
    sp.add_argument("--name")
    sp.add_argument("--opt-out", action="store_true", help="the buyer opted out of unsolicited messages")
    sp.add_argument("--locale", default="en")

    order = sub.add_parser("order", help="manage orders").add_subparsers(dest="action", required=True)
    sp = cmd(order, "add", cmd_order_add, "add an order")
    sp.add_argument("order_id")
    sp.add_argument("--seller", required=True)
    sp.add_argument("--buyer", required=True)
    sp.add_argument("--status", required=True, choices=ORDER_STATUSES)
    sp.add_argument("--category")
    sp.add_argument("--placed-at", help="ISO 8601 (default: now)")
    sp.add_argument("--delivered-at", help="ISO 8601")
    sp = cmd(order, "set", cmd_order_set, "change an order's status")
    sp.add_argument("order_id")
    sp.add_argument("--status", required=True, choices=ORDER_STATUSES)
    sp.add_argument("--delivered-at", help="ISO 8601")

    sp = cmd(sub, "alias", cmd_alias, "print the buyer alias and the seller alias of a seller-buyer pair")
    sp.add_argument("seller_id")
    sp.add_argument("buyer_id")
    sp.add_argument("--revoke", action="store_true", help="revoke both aliases of the pair")

    dk = sub.add_parser("dkim", help="DKIM signing keys").add_subparsers(dest="action", required=True)
    sp = cmd(dk, "keygen", cmd_dkim_keygen, "write a new DKIM key into the state directory and print its TXT record")
    sp.add_argument("--selector", help="default: [dkim] selector")
    sp.add_argument("--algorithm", choices=("rsa", "ed25519"), help="default: [dkim] algorithm")
    sp.add_argument("--force", action="store_true", help="replace an existing key of that selector")

    ak = sub.add_parser("alias-key", help="alias keys").add_subparsers(dest="action", required=True)
    cmd(ak, "rotate", cmd_alias_key_rotate, "add a new alias key and make it current")

    queue = sub.add_parser("queue", help="the delivery queue").add_subparsers(dest="action", required=True)
    sp = cmd(queue, "list", cmd_queue_list, "what is waiting, with attempts, next attempt and last error")
    sp.add_argument("--all", action="store_true", help="include delivered items")
    sp = cmd(queue, "show", cmd_queue_show, "one item, with each recipient's state")
    sp.add_argument("queue_id")
    for action, text in (("retry", "make an item due now"), ("hold", "stop delivering an item until released"),
                         ("release", "put a held item back in the queue, due now"),
                         ("delete", "remove an item for good (no bounce)")):
        sp = cmd(queue, action, _queue_action(action), text)
        sp.add_argument("queue_id")
    cmd(queue, "flush", _queue_action("flush"), "make everything in the queue due now")
    cli_marketplace.register(sub, cmd)
    cli_ops.register(sub, cmd)
    return p


def _loop_factory(settings: config.Settings,
                  args: argparse.Namespace) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``serve`` runs on uvloop unless ``[smtp] event_loop = "asyncio"``; commands on the stdlib loop."""
    if args.fn is not cmd_serve or settings.smtp.event_loop != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:  # an installation without it (it has no wheels for every platform)
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = config.load(args.config)
        with asyncio.Runner(loop_factory=_loop_factory(settings, args)) as runner:
            runner.run(args.fn(settings, args))
    except (config.ConfigError, StartupError, StoreError, CommandError, keyring.KeyError_) as exc:
        print(f"bsm-relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
