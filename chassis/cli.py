"""The ``cornucopia`` command.

cornucopia up [--var-dir var] [--no-nats]      the whole suite on this machine
cornucopia serve <service>                      one service (or the gateway)
cornucopia migrate <service>                    apply a service's migrations
cornucopia token --role R --scope S             a signed development token
cornucopia deadletters list|replay|discard      the events consumers gave up on
cornucopia rekey members [--batch-size N]       rewrap data keys under the active master key
cornucopia verify-ledger                        check the stored-value journal against the balances
cornucopia dev-ca --out-dir D                   a CA and a localhost server certificate, to try mTLS
cornucopia partner-cert --ca-cert F --ca-key F --common-name X --out-dir D
                                                a partner's client certificate, and its fingerprint
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import nats

from chassis import deadletters, mtls, supervisor
from chassis.auth import Role, Scope, mint_token
from chassis.config import ALL_SERVICES, GRPC_SERVICES, ConfigError, Settings
from chassis.crypto import KeyRing, keys_from_env
from chassis.db import Database
from chassis.logs import configure_logging
from chassis.migrations import upgrade_to_head
from chassis.service import main as service_main

EXIT_USAGE = 2


class UsageError(Exception):
    """A command line that names something that does not exist."""


# -- serve / migrate ----------------------------------------------------------


def check_service(name: str, allowed: Sequence[str] = ALL_SERVICES) -> str:
    if name not in allowed:
        raise UsageError(f"unknown service {name!r}; expected one of: {', '.join(allowed)}")
    return name


def load_server_module(service: str) -> ModuleType:
    """``services.<service>.server``; a clear error if it is not there yet."""
    module_name = f"services.{service}.server"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the module itself (or its package) missing is a usage error; a
        # dependency missing inside it is a real bug and keeps its traceback.
        if exc.name not in (module_name, f"services.{service}", "services"):
            raise
        raise UsageError(f"{module_name} cannot be imported: {exc}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    service = check_service(args.service)
    module = load_server_module(service)
    if service == "gateway":
        gateway_main: Callable[[], object] = module.main
        gateway_main()
        return 0
    service_main(module.definition)
    return 0


async def migrate(migrations_dir: Path, settings: Settings) -> None:
    """Bring the service's database to the newest revision."""
    db = Database(settings.database_url)
    try:
        await upgrade_to_head(db, migrations_dir, settings.service)
    finally:
        await db.dispose()


def cmd_migrate(args: argparse.Namespace) -> int:
    service = check_service(args.service, GRPC_SERVICES)
    definition = load_server_module(service).definition
    settings = Settings.from_env(service)
    configure_logging(service, settings.log_level, settings.log_json)
    asyncio.run(migrate(Path(definition.migrations_dir), settings))
    print(f"{service}: migrations applied up to head on {redact_url(settings.database_url)}")
    return 0


def redact_url(url: str) -> str:
    """A database URL without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


# -- token --------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    try:
        scope = Scope.parse(args.scope)
    except ValueError as exc:
        raise UsageError(f"--scope: {exc}") from None
    if args.ttl_hours <= 0:
        raise UsageError("--ttl-hours must be more than 0")
    roles = args.role or [Role.HQ_ADMIN.value]
    secret = Settings.from_env("gateway").token_secret
    token = mint_token(
        secret,
        args.subject,
        roles,
        scope,
        ttl_seconds=int(args.ttl_hours * 3600),
        store_id=args.store or "",
    )
    print(token)
    return 0


# -- deadletters --------------------------------------------------------------


def nats_url(explicit: str | None = None, environ: dict[str, str] | None = None) -> str:
    """--nats-url, else NATS_URL, else the NATS ``cornucopia up`` is running
    (var/endpoints.json), else the default."""
    env = dict(os.environ) if environ is None else environ
    if explicit:
        return explicit
    if env.get("NATS_URL"):
        return env["NATS_URL"]
    endpoints = Path(env.get("CORNUCOPIA_VAR_DIR") or "var") / "endpoints.json"
    try:
        url = json.loads(endpoints.read_text(encoding="utf-8")).get("nats_url")
    except (OSError, ValueError, AttributeError):
        url = None
    if isinstance(url, str) and url:
        return url
    settings = Settings.from_env("gateway", env)
    if settings.production:
        # No guessing at a local server in production.
        raise ConfigError("production mode needs NATS_URL (or --nats-url)")
    return settings.nats_url


async def _with_jetstream(url: str, action: Callable[[Any], Awaitable[int]]) -> int:
    async def quiet(_exc: Exception) -> None:
        """nats-py logs every failed attempt with a traceback otherwise."""

    try:
        # Two attempts, then NoServersError (0 would mean: retry for ever).
        nc = await nats.connect(
            servers=[url],
            name="cornucopia-cli",
            allow_reconnect=False,
            connect_timeout=3,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.5,
            error_cb=quiet,
        )
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        print(f"cornucopia: cannot connect to NATS at {url}: {reason}", file=sys.stderr)
        return 1
    try:
        return await action(nc.jetstream(timeout=5))
    finally:
        await nc.close()


async def deadletters_list(js: Any, limit: int) -> int:
    letters = await deadletters.list_dead_letters(js, limit)
    if not letters:
        print("no dead letters", file=sys.stderr)
        return 0
    print(deadletters.LIST_HEADER)
    for letter in letters:
        print(deadletters.format_line(letter))
    return 0


async def deadletters_replay(js: Any, sequences: Sequence[int]) -> int:
    status = 0
    for seq in sequences:
        try:
            done = await deadletters.replay(js, seq)
        except (deadletters.DeadLetterNotFound, ValueError) as exc:
            print(f"{seq}: {exc}", file=sys.stderr)
            status = 1
            continue
        note = " (already stored: duplicate)" if done.duplicate else ""
        print(
            f"{seq}: replayed {done.event_id} to {done.subject} "
            f"({done.stream} #{done.stream_sequence}){note}; dead letter deleted"
        )
    return status


async def deadletters_discard(js: Any, sequences: Sequence[int]) -> int:
    status = 0
    for seq in sequences:
        try:
            letter = await deadletters.discard(js, seq)
        except deadletters.DeadLetterNotFound as exc:
            print(f"{seq}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{seq}: discarded {letter.event_id or '-'} ({letter.original_subject or '-'})")
    return status


def cmd_deadletters(args: argparse.Namespace) -> int:
    url = nats_url(args.nats_url)
    action: Callable[[Any], Awaitable[int]]
    if args.action == "list":
        limit = int(args.limit)

        async def action(js: Any) -> int:
            return await deadletters_list(js, limit)

    elif args.action == "replay":
        sequences = list(args.sequence)

        async def action(js: Any) -> int:
            return await deadletters_replay(js, sequences)

    else:
        sequences = list(args.sequence)

        async def action(js: Any) -> int:
            return await deadletters_discard(js, sequences)

    return asyncio.run(_with_jetstream(url, action))


# -- verify-ledger ------------------------------------------------------------


def cmd_verify_ledger(args: argparse.Namespace) -> int:
    settings = Settings.from_env("cards")
    configure_logging("cards", settings.log_level, settings.log_json)
    return asyncio.run(verify_ledger(settings))


async def verify_ledger(settings: Settings) -> int:
    """Every movement's entries sum to zero and every account's balances
    equal its journal; exit status 1 with a line per problem otherwise."""
    from services.cards.store import stored_value  # noqa: PLC0415 - cards only

    db = Database(settings.database_url)
    try:
        async with db.sessions() as session:
            problems = await stored_value.verify(session)
            accounts, movements = await stored_value.counts(session)
    finally:
        await db.dispose()
    for problem in problems:
        print(f"{problem.what}: {problem.subject} {problem.detail}".rstrip(), file=sys.stderr)
    if problems:
        print(f"{len(problems)} problems in the stored-value ledger", file=sys.stderr)
        return 1
    print(f"ledger consistent: {accounts} accounts, {movements} movements, every movement balanced")
    return 0


# -- rekey --------------------------------------------------------------------

# Services that keep data keys wrapped by master keys.
REKEY_SERVICES = ("members",)


def cmd_rekey(args: argparse.Namespace) -> int:
    service = check_service(args.service, REKEY_SERVICES)
    settings = Settings.from_env(service)
    configure_logging(service, settings.log_level, settings.log_json)
    ring, _index = keys_from_env(service.upper(), os.environ, production=settings.production)
    return asyncio.run(
        rekey(settings, ring, batch_size=int(args.batch_size), dry_run=bool(args.dry_run))
    )


def _key_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key_id} {n}" for key_id, n in sorted(counts.items())) or "none"


async def rekey(settings: Settings, ring: KeyRing, *, batch_size: int, dry_run: bool) -> int:
    """Rewrap every data key not under the active master key; report what
    is left under other keys. Exit status 1 if some could not be rewrapped."""
    from services.members import rekey as members_rekey  # noqa: PLC0415 - members only

    service = settings.service
    prefix = service.upper()
    db = Database(settings.database_url)
    try:
        before = await members_rekey.data_keys_by_master_key(db)
        print(f"{service}: active master key {ring.active_id!r}")
        print(f"data keys by master key: {_key_counts(before)}")
        if dry_run:
            waiting = sum(n for key_id, n in before.items() if key_id != ring.active_id)
            print(f"{waiting} data keys to rewrap (dry run: nothing changed)")
            return 0

        def progress(report: members_rekey.RekeyReport) -> None:
            print(
                f"batch {report.batches}: {report.rewrapped} rewrapped so far",
                file=sys.stderr,
            )

        report = await members_rekey.rewrap_data_keys(
            db, ring, batch_size=batch_size, progress=progress
        )
        after = await members_rekey.data_keys_by_master_key(db)
    finally:
        await db.dispose()
    print(f"rewrapped {report.rewrapped} data keys to {ring.active_id!r}")
    print(f"data keys by master key now: {_key_counts(after)}")
    for key_id, n in sorted(report.unknown_key.items()):
        print(
            f"{n} data keys are wrapped by master key {key_id!r}, which is not in "
            f"{prefix}_MASTER_KEYS: add it back and run again",
            file=sys.stderr,
        )
    for key_id, n in sorted(report.unreadable.items()):
        print(
            f"{n} data keys do not open with master key {key_id!r}: {prefix}_MASTER_KEYS "
            "holds a different key under that id",
            file=sys.stderr,
        )
    if report.failed:
        return 1
    others = sorted(key_id for key_id in after if key_id != ring.active_id)
    if others:
        # Written by another process meanwhile (a pod with another active key).
        print(f"data keys under {', '.join(others)} remain: run again", file=sys.stderr)
        return 1
    retired = sorted(ring.key_ids - {ring.active_id})
    if retired:
        print(
            f"no data key uses {', '.join(map(repr, retired))} any more: "
            f"it may be removed from {prefix}_MASTER_KEYS"
        )
    return 0


# -- certificates for partner endpoints (mutual TLS) -------------------------


def cmd_dev_ca(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    hosts = args.host or ["localhost", "127.0.0.1"]
    try:
        ca = mtls.create_ca(out_dir, "Cornucopia development CA")
        server = mtls.issue_server_certificate(ca, out_dir, hosts)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    print(f"CA:     {ca.cert} (key {ca.key})")
    print(f"server: {server.cert} (key {server.key}) for {', '.join(hosts)}")
    print(f"client certificates: cornucopia partner-cert --ca-cert {ca.cert} --ca-key {ca.key} ...")
    return 0


def cmd_partner_cert(args: argparse.Namespace) -> int:
    ca = mtls.CertificateFiles(Path(args.ca_cert), Path(args.ca_key))
    try:
        issued = mtls.issue_client_certificate(
            ca,
            Path(args.out_dir),
            args.common_name,
            organisation=args.organisation,
            days=args.days,
        )
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    info = mtls.certificate_info(issued.cert.read_bytes())
    # Only the fingerprint on stdout: what a partner is registered with.
    print(info.sha256_fingerprint)
    print(
        f"{issued.cert}: {info.subject}, valid until {info.not_after:%Y-%m-%d}; key {issued.key}",
        file=sys.stderr,
    )
    return 0


# -- up -----------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    var_dir = Path(args.var_dir) if args.var_dir else supervisor.default_var_dir()
    if os.environ.get("CORNUCOPIA_ENV", "development").strip().lower() != "development":
        return supervisor.run(var_dir, start_nats=not args.no_nats, ready_timeout=args.timeout)
    return asyncio.run(
        _up_with_demo_data(var_dir, start_nats=not args.no_nats, ready_timeout=args.timeout)
    )


async def _up_with_demo_data(var_dir: Path, *, start_nats: bool, ready_timeout: float) -> int:
    """``up`` in development: once every service is SERVING (the supervisor
    then writes endpoints.json), load the demo chain and print its logins."""
    suite = supervisor.Supervisor(var_dir, start_nats=start_nats, ready_timeout=ready_timeout)
    endpoints = var_dir / "endpoints.json"
    endpoints.unlink(missing_ok=True)  # left by a run that did not stop cleanly
    loader = asyncio.create_task(_load_demo_data(suite, endpoints))
    try:
        return await suite.run()
    finally:
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader


async def _load_demo_data(suite: supervisor.Supervisor, endpoints: Path) -> None:
    import grpc  # noqa: PLC0415 - only `up` in development needs these

    from chassis.grpcclient import open_channel  # noqa: PLC0415
    from services.cards.demo import load_demo_cards  # noqa: PLC0415
    from services.loyalty.demo import load_demo_conversion  # noqa: PLC0415
    from services.members.demo import demo_banner, load_demo_data  # noqa: PLC0415

    # Written by the supervisor once every health check says SERVING.
    while True:
        if await asyncio.to_thread(endpoints.exists):
            text = await asyncio.to_thread(endpoints.read_text, encoding="utf-8")
            break
        await asyncio.sleep(0.5)
    info = json.loads(text)
    secret = Settings.from_env("gateway").token_secret
    channel = open_channel(info["grpc"]["members"])
    try:
        logins = await load_demo_data(channel, supervisor.development_token(secret))
    except grpc.aio.AioRpcError as exc:
        suite.say(f"demo data not loaded: {exc.code().name}")
        return
    finally:
        await channel.close(grace=None)
    certificate = info.get("partner_tls", {}).get("demo_client_cert")
    pem = await asyncio.to_thread(Path(certificate).read_text, "utf-8") if certificate else None
    channel = open_channel(info["grpc"]["cards"])
    cards_loaded = False
    try:
        await load_demo_cards(channel, supervisor.development_token(secret), pem)
        cards_loaded = True
    except grpc.aio.AioRpcError as exc:
        suite.say(f"demo cards not loaded: {exc.code().name}")
    finally:
        await channel.close(grace=None)
    # The demo bank's conversion terms need the demo bank, registered above.
    if cards_loaded:
        channel = open_channel(info["grpc"]["loyalty"])
        try:
            await load_demo_conversion(channel, supervisor.development_token(secret))
        except grpc.aio.AioRpcError as exc:
            suite.say(f"demo points conversion not loaded: {exc.code().name}")
        finally:
            await channel.close(grace=None)
    suite.print_raw(demo_banner(logins, info["gateway"]))


# -- the parser ---------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cornucopia", description="Cornucopia: run, operate and call the suite."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole suite on this machine (make up)")
    up.add_argument(
        "--var-dir", help="where data and logs go (default: $CORNUCOPIA_VAR_DIR or ./var)"
    )
    up.add_argument(
        "--no-nats",
        action="store_true",
        help="do not start a nats-server; use NATS_URL (or nats://127.0.0.1:4222)",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="seconds to wait for every health check (default 90)",
    )
    up.set_defaults(handler=cmd_up)

    serve = commands.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", help=", ".join(ALL_SERVICES))
    serve.set_defaults(handler=cmd_serve)

    migrate_cmd = commands.add_parser("migrate", help="apply a service's database migrations")
    migrate_cmd.add_argument("service", help=", ".join(GRPC_SERVICES))
    migrate_cmd.set_defaults(handler=cmd_migrate)

    token = commands.add_parser(
        "token",
        help="print a signed development token",
        description="Print a token signed with CORNUCOPIA_TOKEN_SECRET (or the development "
        "secret outside production).",
    )
    token.add_argument(
        "--role",
        action="append",
        choices=[r.value for r in Role],
        help="may be repeated (default: hq_admin)",
    )
    token.add_argument(
        "--scope",
        default="hq",
        help="hq, region:<id>, store:<id>, call_center or partner:<id> (default: hq)",
    )
    token.add_argument("--subject", default="dev-admin", help="who the token is for")
    token.add_argument("--store", help="the store the principal acts from (audit stamps)")
    token.add_argument(
        "--ttl-hours", type=float, default=12.0, help="validity in hours (default 12)"
    )
    token.set_defaults(handler=cmd_token)

    dead = commands.add_parser(
        "deadletters", help="list, replay or discard events consumers gave up on"
    )
    dead.add_argument(
        "--nats-url",
        help="default: $NATS_URL, else the NATS of a running `cornucopia up`, "
        "else nats://127.0.0.1:4222",
    )
    dead_actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = dead_actions.add_parser("list", help="one line per parked event, oldest first")
    listing.add_argument("--limit", type=_positive_int, default=100)
    replay = dead_actions.add_parser(
        "replay", help="republish to the original subject, then delete the dead letter"
    )
    replay.add_argument("sequence", type=_positive_int, nargs="+")
    discard = dead_actions.add_parser("discard", help="delete dead letters for good")
    discard.add_argument("sequence", type=_positive_int, nargs="+")
    dead.set_defaults(handler=cmd_deadletters)

    rekey_cmd = commands.add_parser(
        "rekey",
        help="rewrap data keys under the active master key (after a rotation)",
        description="Rewrap every member data key that is not under the active master key "
        "(MEMBERS_ACTIVE_KEY_ID, default the last of MEMBERS_MASTER_KEYS), in batches that "
        "each commit: safe to interrupt and to run again, and while the service runs.",
    )
    rekey_cmd.add_argument("service", help=", ".join(REKEY_SERVICES))
    rekey_cmd.add_argument(
        "--batch-size", type=_positive_int, default=500, help="rows per transaction (default 500)"
    )
    rekey_cmd.add_argument(
        "--dry-run", action="store_true", help="only count the data keys by master key"
    )
    rekey_cmd.set_defaults(handler=cmd_rekey)

    verify = commands.add_parser(
        "verify-ledger",
        help="check that every stored-value movement balances and every account's "
        "balances equal its journal (CARDS_DATABASE_URL)",
    )
    verify.set_defaults(handler=cmd_verify_ledger)

    dev_ca = commands.add_parser(
        "dev-ca",
        help="make a CA and a server certificate, to try a partner endpoint (mutual TLS)",
        description="Write ca.pem, ca-key.pem, server.pem and server-key.pem (keys 0600) to "
        "--out-dir; existing files are never overwritten.",
    )
    dev_ca.add_argument("--out-dir", required=True)
    dev_ca.add_argument(
        "--host",
        action="append",
        help="a DNS name or IP address of the server; may be repeated "
        "(default: localhost and 127.0.0.1)",
    )
    dev_ca.set_defaults(handler=cmd_dev_ca)

    partner_cert = commands.add_parser(
        "partner-cert",
        help="issue a partner's client certificate and print its SHA-256 fingerprint",
        description="Make a key and a client certificate signed by the partner CA, write them "
        "to --out-dir as <common-name>.pem and <common-name>-key.pem, and print the "
        "certificate's SHA-256 fingerprint (what the partner is registered with).",
    )
    partner_cert.add_argument("--ca-cert", required=True, help="the CA's certificate (PEM)")
    partner_cert.add_argument(
        "--ca-key", required=True, help="the CA's private key (PEM, unencrypted)"
    )
    partner_cert.add_argument("--common-name", required=True, help="e.g. bank-a-cards")
    partner_cert.add_argument("--organisation", default="", help="e.g. 'Bank A'")
    partner_cert.add_argument("--out-dir", required=True)
    partner_cert.add_argument(
        "--days",
        type=_positive_int,
        default=mtls.CERTIFICATE_DAYS,
        help=f"validity (default {mtls.CERTIFICATE_DAYS})",
    )
    partner_cert.set_defaults(handler=cmd_partner_cert)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {exc}\n")
    except ConfigError as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog}: configuration error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
