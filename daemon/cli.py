"""`flexcache serve` runs the daemon; `flexcache stats` asks a running one; `flexcache verify` checks a
stopped one's data folder; `flexcache tokens` adds, lists and revokes credentials (the tokens file);
`flexcache backup` has a running node write a consistent copy of its store, and `flexcache restore`
copies one into a stopped node's data folder (docs/backup.md); `flexcache health` asks a node's health
service (an exec readiness probe: exit 0 when SERVING); `flexcache drain` has a node of a cluster hand
its entries to their other owners and waits until it holds none; `config-table` and `metrics-table`
print the README's tables from the code; `flexcache --version` names the installed release. Errors end
with a sentence and exit code 1 (runtime) or 2 (configuration, bad usage); `verify` exits 1 when it
finds damage, 2 when it cannot check."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.json_format import MessageToDict

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc

from . import config as cfg
from .version import version

if TYPE_CHECKING:
    from .auth import Entry

EXIT_CONFIG, EXIT_RUNTIME = 2, 1


def _serve(args: argparse.Namespace) -> int:
    try:
        from .server import Daemon, StartError  # imported here: `flexcache stats` needs none of the daemon's packages
    except ModuleNotFoundError as exc:
        print(f"flexcache serve: {exc.name} is not installed; the daemon needs the 'daemon' extra: "
              "pip install 'flexcache[daemon]'", file=sys.stderr)
        return EXIT_CONFIG

    try:
        config = cfg.from_args(args)
    except cfg.ConfigError as exc:
        print(f"flexcache serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    links = cfg.service_links(os.environ)
    if links:
        logging.getLogger("flexcache").debug("ignoring Kubernetes service-link variables (not settings): %s",
                                             ", ".join(links))
    try:
        daemon = Daemon(config)
        daemon.start()
    except StartError as exc:  # a known cause (an address or the data folder in use): the sentence says it all
        logging.getLogger("flexcache").debug("start failed", exc_info=True)
        print(f"flexcache serve: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as exc:  # a daemon that cannot start says why in one line, then exits
        logging.getLogger("flexcache").debug("start failed", exc_info=True)
        print(f"flexcache serve: cannot start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"flexcache listening on port {daemon.port}", flush=True)  # for people; launchers read port_file
    if daemon.metrics_port:
        print(f"flexcache metrics on port {daemon.metrics_port}", flush=True)
    if config.port_file:
        _write_port_file(Path(config.port_file), daemon.ports())
    daemon.run_until_signal()
    return 0


def _write_port_file(path: Path, ports: dict[str, int | None]) -> None:
    """Written whole or not at all (a rename), so a launcher polling for it never reads half."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(ports))
    partial.replace(path)


class _Failed(Exception):
    """A verb's error: `main` prints the sentence on stderr and exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME):
        super().__init__(message)
        self.code = code


def _add_client_flags(parser: argparse.ArgumentParser, timeout: float = 5.0,
                      timeout_help: str = "Seconds to wait for the answer.") -> None:
    """--target, --timeout and the credentials of a verb that calls a running daemon."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="Daemon address (host:port).")
    parser.add_argument("--timeout", type=float, default=timeout, help=timeout_help)
    for flag, env, what in (("--token", "TOKEN", "Bearer token, for a daemon with auth_tokens_file"),
                            ("--tls-ca-file", "TLS_CA_FILE", "CA of the daemon's certificate (TLS on)"),
                            ("--tls-cert-file", "TLS_CERT_FILE", "client certificate (mTLS)"),
                            ("--tls-key-file", "TLS_KEY_FILE", "key of the client certificate")):
        variable = cfg.CLIENT_ENV_PREFIX + env  # the client library's own variables
        parser.add_argument(flag, default=os.environ.get(variable, ""), help=f"{what} [env {variable}]")


def _connect(args: argparse.Namespace, name: str) -> tuple[grpc.Channel, tuple[tuple[str, str], ...]]:
    """A channel to `args.target` (TLS when a TLS file is named) and the call metadata (the token)."""
    from flexcache.client.tls import ClientTLS, ClientTLSError

    try:
        files = (args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
        channel = (grpc.secure_channel(args.target, ClientTLS(*files).channel_credentials()) if any(files)
                   else grpc.insecure_channel(args.target))
    except ClientTLSError as exc:
        raise _Failed(f"flexcache {name}: {exc}", EXIT_CONFIG) from exc
    if not args.timeout > 0:
        channel.close()
        raise _Failed(f"flexcache {name}: --timeout must be a positive number of seconds", EXIT_CONFIG)
    metadata = (("authorization", f"Bearer {args.token.strip()}"),) if args.token.strip() else ()
    return channel, metadata


def _call_failed(name: str, target: str, exc: grpc.RpcError) -> _Failed:
    details = " ".join((exc.details() or "").split())  # one line, whatever gRPC put in it
    return _Failed(f"flexcache {name}: {target}: {exc.code().name}: {details}")


def _stats(args: argparse.Namespace) -> int:
    channel, metadata = _connect(args, "stats")
    with channel:
        try:
            stats = pb_grpc.CacheServiceStub(channel).Stats(pb.StatsRequest(), timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise _call_failed("stats", args.target, exc) from None
    if args.json:
        print(json.dumps(MessageToDict(stats, always_print_fields_with_no_presence=True), indent=2))
        return 0
    print(f"entries {stats.entries}  bytes {stats.bytes} / {stats.max_bytes}  policy {stats.eviction_policy}  "
          f"index {stats.index_backend}  evictions {stats.evictions}")
    print(f"disk {stats.disk_bytes} bytes  free {stats.disk_free_bytes}" + ("  FULL: puts refused" if stats.disk_full
                                                                         else ""))
    for ns in stats.namespaces:
        print(f"  {ns.name}  dim {ns.dimension}  entries {ns.entries}  bytes {ns.bytes}")
    return 0


def _backup(args: argparse.Namespace) -> int:
    """NodeService.Backup: the node writes the copy on its own file system; prints its answer as JSON."""
    from flexcache.v1 import node_pb2, node_pb2_grpc

    channel, metadata = _connect(args, "backup")
    with channel:
        try:
            answer = node_pb2_grpc.NodeServiceStub(channel).Backup(node_pb2.BackupRequest(path=args.path),
                                                                   timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise _call_failed("backup", args.target, exc) from None
    print(json.dumps(MessageToDict(answer, always_print_fields_with_no_presence=True), indent=2))
    return 0


def _restore(args: argparse.Namespace) -> int:
    """Offline: the backup's store copied into the data folder; the daemon rebuilds the index when it starts."""
    try:
        from .backup import restore
        from .errors import InvalidRequest
    except ModuleNotFoundError as exc:
        raise _Failed(f"flexcache restore: {exc.name} is not installed; restore needs the 'daemon' extra: "
                      "pip install 'flexcache[daemon]'", EXIT_CONFIG) from None
    try:
        entries = restore(Path(args.source), Path(args.data_dir), force=args.force)
    except InvalidRequest as exc:
        raise _Failed(f"flexcache restore: {exc}", EXIT_CONFIG) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise _Failed(f"flexcache restore: copying {args.source} into {args.data_dir} failed: "
                      f"{exc.strerror or exc}{where}; the data folder is as it was") from None
    print(f"restored {entries} entries from {args.source} into {Path(args.data_dir) / 'store'}; a daemon started "
          "on it re-indexes them")
    return 0


def _health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check: prints the status in one line; exit 0 only when SERVING."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ModuleNotFoundError as exc:
        raise _Failed(f"flexcache health: {exc.name} is not installed; health needs the 'daemon' extra: "
                      "pip install 'flexcache[daemon]'", EXIT_CONFIG) from None

    channel, metadata = _connect(args, "health")
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                                timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise _call_failed("health", args.target, exc) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{args.target}{' ' + args.service if args.service else ''}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else EXIT_RUNTIME


def _drain(args: argparse.Namespace) -> int:
    """NodeService.Drain once a second until the node holds no entry or --wait has passed."""
    import time

    from flexcache.v1 import node_pb2, node_pb2_grpc

    if not args.wait >= 0:
        raise _Failed("flexcache drain: --wait must be 0 or a positive number of seconds", EXIT_CONFIG)
    channel, metadata = _connect(args, "drain")
    deadline = time.monotonic() + args.wait
    with channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        while True:
            try:
                answer = stub.Drain(node_pb2.DrainRequest(), timeout=args.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                raise _call_failed("drain", args.target, exc) from None
            state = node_pb2.NodeState.Name(answer.state) if answer.state in node_pb2.NodeState.values() \
                else str(answer.state)
            if answer.entries == 0:
                print(f"{args.target}: {state}: drained, no entries left", flush=True)
                return 0
            print(f"{args.target}: {state}: {answer.entries} entries left", flush=True)
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" after {args.wait:g} s" if args.wait else ""
                raise _Failed(f"flexcache drain: {args.target}: not drained{waited}: {answer.entries} entries "
                              "still on the node")
            time.sleep(min(1.0, left))


def _verify(args: argparse.Namespace) -> int:
    """Check every entry of a stopped daemon's store: its records with RocksDB's checksums on, its blob's
    recorded size and checksum; print each damaged one, and the acknowledged puts its log recovery lost.
    Changes nothing of FlexCache's own (RocksDB replays its log, as a start would)."""
    try:
        from .scrub import Damage, verify_store
        from .store import OldLayout, Store, StoreLocked
    except ModuleNotFoundError as exc:
        print(f"flexcache verify: {exc.name} is not installed; verify needs the 'daemon' extra: "
              "pip install 'flexcache[daemon]'", file=sys.stderr)
        return EXIT_CONFIG
    store_dir = Path(args.data_dir) / "store"
    if not (store_dir / "CURRENT").is_file():
        print(f"flexcache verify: {args.data_dir} holds no store ({store_dir} is not a RocksDB folder)",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        store = Store(store_dir, max_bytes=0, audit=True)
    except StoreLocked:
        print(f"flexcache verify: the data folder {args.data_dir} is in use by a running daemon; stop it first "
              "(a running daemon checks itself: its scrubber, scrub_bytes_per_second)", file=sys.stderr)
        return EXIT_CONFIG
    except OldLayout as exc:
        print(f"flexcache verify: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # RocksDB cannot open it at all: that is damage too
        print(f"flexcache verify: the store in {store_dir} cannot be opened: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    damaged = checked_bytes = entries = 0
    try:
        for found in verify_store(store):
            if isinstance(found, Damage):
                damaged += 1
                print(f"damaged {found.entry_id}  namespace {found.namespace}  prompt {found.prompt[:60]!r}: "
                      f"{found.problem}")
            else:
                entries, checked_bytes = found
        lost = store.lost_puts
    finally:
        store.close()
    if lost:
        print(f"lost {lost} acknowledged puts: the write-ahead log was damaged or cut short after they were "
              "acknowledged, and its recovery dropped them")
    print(f"verified {entries} entries ({checked_bytes} blob bytes): {damaged} damaged, {lost} lost")
    return EXIT_RUNTIME if damaged or lost else 0


def _tokens(args: argparse.Namespace) -> int:
    """`flexcache tokens add|list|revoke`: the tokens file (auth_tokens_file). `add` prints the new token
    alone on stdout (TOKEN=$(flexcache tokens add ...)), its id on stderr; `--certificate CN` binds a
    client-certificate identity instead and prints nothing secret. Exit 2 for an unusable file or
    argument, 1 when `revoke` finds nothing to revoke."""
    name = f"flexcache tokens {args.action}"
    try:
        from . import auth  # imported here: needs yaml (the daemon extra), not RocksDB or Qdrant
    except ModuleNotFoundError as exc:
        print(f"{name}: {exc.name} is not installed; tokens need the 'daemon' extra: "
              "pip install 'flexcache[daemon]'", file=sys.stderr)
        return EXIT_CONFIG
    path = args.file or os.environ.get("FLEXCACHE_AUTH_TOKENS_FILE", "")
    if not path:
        print(f"{name}: name the tokens file with --file PATH (or FLEXCACHE_AUTH_TOKENS_FILE)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.action == "add":
            if args.tenant is None and not args.admin:
                print(f"{name}: --tenant NAME is required (only an --admin credential may have none)",
                      file=sys.stderr)
                return EXIT_CONFIG
            tenant = args.tenant or ""
            if args.certificate is not None:
                cert = auth.add_certificate(path, args.certificate, tenant, admin=args.admin)
                print(f"certificate CN {cert.cn!r} bound to {_bound(cert)} in {path}")
                return 0
            token, entry = auth.add_token(path, tenant, admin=args.admin)
            print(f"token {entry.id} for {_bound(entry)} written to {path}; it is shown only once",
                  file=sys.stderr)
            print(token, flush=True)
            return 0
        if args.action == "list":
            entries = auth.list_entries(path)
            if args.json:
                print(json.dumps([_listed(e) for e in entries], indent=2))
                return 0
            rows = [("KIND", "ID", "TENANT", "ADMIN", "CREATED")]
            rows += [(r["kind"], r["id"], r["tenant"] or "(all)", "yes" if r["admin"] else "no", r["created"])
                     for r in map(_listed, entries)]
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            for row in rows:
                print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
            return 0
        if not auth.revoke(path, args.id):
            print(f"{name}: {path} holds no token id or certificate CN {args.id!r}", file=sys.stderr)
            return EXIT_RUNTIME
        print(f"revoked {args.id} in {path}; a running daemon stops accepting it within seconds")
        return 0
    except auth.AuthConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _bound(entry: Entry) -> str:
    if entry.admin:
        return f"admin (tenant {entry.tenant!r})" if entry.tenant else "admin of every tenant"
    return f"tenant {entry.tenant!r}"


def _listed(entry: Entry) -> dict[str, object]:
    """One entry as `tokens list` shows it: never its hash."""
    return {"kind": entry.kind, "id": entry.key, "tenant": entry.tenant, "admin": entry.admin,
            "created": entry.created}


def _metrics_table(args: argparse.Namespace) -> int:
    from .metrics import Metrics

    print(Metrics().markdown_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexcache", description="FlexCache approximate-cache daemon.")
    parser.add_argument("--version", action="version", version=f"flexcache {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Run the daemon.", allow_abbrev=False)
    cfg.add_flags(serve)
    serve.set_defaults(run=_serve)
    stats = commands.add_parser("stats", help="Print a running daemon's statistics.")
    _add_client_flags(stats)
    stats.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    stats.set_defaults(run=_stats)
    backup = commands.add_parser("backup", help="Have a running node write a consistent copy of its store.")
    _add_client_flags(backup, timeout=600.0, timeout_help="Seconds to wait for the backup to be written.")
    backup.add_argument("--path", required=True,
                        help="Folder to create on the node (absolute, not existing yet; its parent must exist).")
    backup.set_defaults(run=_backup)
    restore = commands.add_parser("restore", help="Copy a backup into a stopped daemon's data folder.")
    restore.add_argument("--from", dest="source", required=True, metavar="PATH",
                         help="The backup folder (what `flexcache backup --path` wrote).")
    restore.add_argument("--data-dir", required=True, help="The daemon's data folder (data_dir).")
    restore.add_argument("--force", action="store_true",
                         help="Replace the store the data folder already holds (its entries are lost).")
    restore.set_defaults(run=_restore)
    health = commands.add_parser("health", help="Ask a daemon's health service; exit 0 when SERVING "
                                                "(a readiness probe).")
    _add_client_flags(health, timeout=2.0)
    health.add_argument("--service", default="", metavar="NAME",
                        help="The service to ask about (flexcache.v1.CacheService); the whole daemon by default.")
    health.set_defaults(run=_health)
    drain = commands.add_parser("drain", help="Have a node hand its entries to their other owners; wait until "
                                              "it holds none.")
    _add_client_flags(drain, timeout=5.0, timeout_help="Seconds to wait for each answer.")
    drain.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="Ask again once a second until the node holds no entry, for at most this long "
                            "(0: ask once).")
    drain.set_defaults(run=_drain)
    verify = commands.add_parser("verify", help="Check a stopped daemon's data folder for damaged entries.")
    verify.add_argument("--data-dir", default="./data", help="The daemon's data folder (data_dir).")
    verify.set_defaults(run=_verify)
    tokens = commands.add_parser("tokens", help="Add, list or revoke credentials in a tokens file (auth_tokens_file).")
    actions = tokens.add_subparsers(dest="action", required=True)
    file_help = "The tokens file (auth_tokens_file) [env FLEXCACHE_AUTH_TOKENS_FILE]."
    add = actions.add_parser("add", help="Create a token bound to a tenant and print it (only it, on stdout).")
    add.add_argument("--file", default=None, metavar="PATH", help=file_help + " Created if missing.")
    add.add_argument("--tenant", default=None, metavar="NAME", help="The tenant the credential is bound to.")
    add.add_argument("--admin", action="store_true",
                     help="The credential may use and manage every tenant (--tenant is then optional).")
    add.add_argument("--certificate", default=None, metavar="CN",
                     help="Bind this mTLS client-certificate subject CN instead of creating a token.")
    listing = actions.add_parser("list", help="Print the file's tokens and certificate identities (no hashes).")
    listing.add_argument("--file", default=None, metavar="PATH", help=file_help)
    listing.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    revoke = actions.add_parser("revoke", help="Remove a token (by the id `list` shows) or a certificate CN.")
    revoke.add_argument("--file", default=None, metavar="PATH", help=file_help)
    revoke.add_argument("id", metavar="ID", help="A token id, or a certificate CN.")
    tokens.set_defaults(run=_tokens)
    table = commands.add_parser("config-table", help="Print the settings table (markdown, for the README).")
    table.set_defaults(run=lambda args: print(cfg.markdown_table()) or 0)
    metrics = commands.add_parser("metrics-table", help="Print the metrics table (markdown, for the README).")
    metrics.set_defaults(run=_metrics_table)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except _Failed as exc:
        print(exc, file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
