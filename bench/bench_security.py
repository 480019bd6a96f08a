"""What TLS and tokens cost a worker: lookup latency and fetch throughput, plain against secured, side by
side in one run (issue 17's target: lookup latency with TLS and auth within 1.3x of without).

    .venv/bin/python -m bench.bench_security            # ~30 s
    .venv/bin/python -m bench.bench_security --quick    # ~10 s

Two daemons on loopback hold the same entries (384-d vectors, `--entries` of them, 64 KiB raw blobs,
plus `--blob-mib` MiB ones for the fetches): `plain` (no TLS, no tokens file: today's default) and
`tls+auth` (TLS on the gRPC port and the data port with a trustme certificate, a tokens file, every
call carrying a bearer token the daemon hashes and looks up). The same CacheClient code asks both: in
each of `--rounds` rounds, `--lookups` lookups of stored vectors against one daemon, then the other
(the order alternates per round), so the machine's background load falls on both alike; then
fetches of the large blobs (data port, CRC-32C verified) the same way. Latencies are per call on the
caller's side; the table has medians and p99 over all rounds, and the ratio secured / plain.
Channels and data-port connections are kept open, as a worker keeps them: the TLS handshake is paid
once per connection, not per call (the first call of each client is a warm-up, not timed).
The results block of docs/security.md is rewritten (`--no-doc`: print only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import trustme

from flexcache.client import CacheClient, Namespace
from flexcache.v1 import cache_pb2 as pb

from .launch import daemon as launch
from .report import replace_results

NS = Namespace(tenant="bench", model="security", width=64, height=64, frames=8, scheduler="flow", total_steps=50)
DIM = 384
DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"


def unit(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--lookups", type=int, default=300, help="lookups per daemon per round")
    parser.add_argument("--fetches", type=int, default=4, help="large-blob fetches per daemon per round")
    parser.add_argument("--blob-mib", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="500 entries, 4 rounds of 100 lookups")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.entries, args.rounds, args.lookups, args.fetches = 500, 4, 100, 2
    began = time.time()
    from flexcache.daemon import auth

    with tempfile.TemporaryDirectory(prefix="flexcache-bench-tls-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        cert.private_key_pem.write_to_path(str(folder / "server.key"))
        cert.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
        token, _ = auth.add_token(folder / "tokens.yaml", NS.tenant)
        plain = stack.enter_context(launch())
        secured = stack.enter_context(launch(
            tls_cert_file=folder / "server.pem", tls_key_file=folder / "server.key",
            auth_tokens_file=folder / "tokens.yaml", trust_ca=folder / "ca.pem", token=token))
        clients = {
            "plain": stack.enter_context(CacheClient(plain.target, NS, max_rel_error=None, timeout_s=5.0,
                                                     transfer_timeout_s=60.0)),
            "tls+auth": stack.enter_context(CacheClient(secured.target, NS, max_rel_error=None, timeout_s=5.0,
                                                        transfer_timeout_s=60.0, token=token,
                                                        tls_ca_file=str(folder / "ca.pem"))),
        }
        small = pb.BlobInfo(codec="raw", dtype="uint8", shape=[64 << 10])
        large_size = args.blob_mib << 20
        large = pb.BlobInfo(codec="raw", dtype="uint8", shape=[large_size])
        big_ids: dict[str, list[str]] = {name: [] for name in clients}
        rng = np.random.default_rng(0)
        for i in range(args.entries):
            data = rng.bytes(64 << 10)
            for c in clients.values():
                assert c.put_blob(f"prompt {i}", data, small, unit(i)) is not None
        for i in range(4):
            data = os.urandom(large_size)
            for name, c in clients.items():
                eid = c.put_blob(f"large {i}", data, large, unit(10_000_000 + i))
                assert eid is not None
                big_ids[name].append(eid)

        lookups: dict[str, list[float]] = {name: [] for name in clients}
        fetches: dict[str, list[float]] = {name: [] for name in clients}
        misses = {name: 0 for name in clients}
        for name, c in clients.items():  # warm-up: connections and handshakes, not timed
            c.lookup(unit(0))
            c.fetch(big_ids[name][0])
        for r in range(args.rounds):
            order = list(clients) if r % 2 == 0 else list(reversed(clients))
            for name in order:
                c = clients[name]
                for j in range(args.lookups):
                    v = unit((r * args.lookups + j) * 7919 % args.entries)
                    t0 = time.perf_counter()
                    result = c.lookup(v)
                    lookups[name].append((time.perf_counter() - t0) * 1e3)
                    misses[name] += result is None or result.best is None
            for name in order:
                c = clients[name]
                for j in range(args.fetches):
                    t0 = time.perf_counter()
                    fetched = c.fetch(big_ids[name][(r + j) % len(big_ids[name])])
                    fetches[name].append(time.perf_counter() - t0)
                    misses[name] += fetched is None

    lines = [f"`.venv/bin/python -m bench.bench_security{' --quick' if args.quick else ''}` "
             f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {time.time() - began:.0f} s): {args.entries} entries, "
             f"{args.rounds} rounds of {args.lookups} lookups and {args.fetches} fetches of "
             f"{args.blob_mib} MiB per daemon, alternating.", "",
             "| daemon | lookups | lookup p50 ms | lookup p99 ms | fetch MB/s (median) | failed or missed |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in clients:
        mbps = large_size / statistics.median(fetches[name]) / 1e6
        lines.append(f"| {name} | {len(lookups[name])} | {pct(lookups[name], 50):.2f} | {pct(lookups[name], 99):.2f} | "
                     f"{mbps:.0f} | {misses[name]} |")
    p50 = pct(lookups["tls+auth"], 50) / pct(lookups["plain"], 50)
    p99 = pct(lookups["tls+auth"], 99) / pct(lookups["plain"], 99)
    fetch_ratio = statistics.median(fetches["plain"]) / statistics.median(fetches["tls+auth"])
    lines += ["", f"Secured / plain: lookup p50 {p50:.2f}x, p99 {p99:.2f}x (target <= 1.3x: "
              f"{'met' if max(p50, p99) <= 1.3 else 'NOT met'}); fetch throughput {fetch_ratio:.2f}x of plain."]
    print("\n".join(lines))
    if not args.no_doc:
        replace_results(DOC, "Security", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
