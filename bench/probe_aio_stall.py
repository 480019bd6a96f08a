"""Can a gRPC Python server end a stream whose client stopped reading? sync vs grpc.aio (docs/under_pressure.md).

    .venv/bin/python -m bench.probe_aio_stall        # ~40 s

A server streams 64 messages of 1 MiB to a client that reads the first and stops. After STALL_S without
progress the server gives up on it, in the ways each API offers:

  * sync + cancel: a watchdog thread calls `context.cancel()` (what daemon/guard.py does);
  * aio + abort / raise / return: the handler's write times out (`asyncio.wait_for`), then it calls
    `context.abort()`, raises, or returns (aio's ServicerContext has no cancel()).

For each: how long until the server's handler was done with the call, how long until gRPC itself
ended the call on the server (its done callback: the stream's buffers and slot released), and what
the client gets when it finally resumes reading, WAIT_S later (messages, then how the stream ended).
The daemon's choice of the sync server rests on this table.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent import futures

import grpc
import grpc.aio

STALL_S, WAIT_S, MESSAGES = 1.0, 4.0, 64
CHUNK = os.urandom(1 << 20)
OPTIONS = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]
METHOD = "/probe.Stall/Fetch"


def client_side(port: int, done: threading.Event, ended: threading.Event) -> tuple[float, float | None, str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
        call = channel.unary_stream(METHOD)(b"")
        next(call)
        started = time.monotonic()
        done.wait(STALL_S + WAIT_S)
        gave_up = time.monotonic() - started
        released = time.monotonic() - started if ended.wait(max(0.0, STALL_S + WAIT_S - gave_up)) else None
        time.sleep(max(0.0, STALL_S + WAIT_S - (time.monotonic() - started)))
        got = 0
        try:
            for _ in call:
                got += 1
            ending = "OK"
        except grpc.RpcError as exc:
            ending = exc.code().name
        return gave_up, released, f"{got} more, then {ending}"


def sync_cancel() -> tuple[float, float | None, str]:
    done, ended = threading.Event(), threading.Event()

    def fetch(request: bytes, context: grpc.ServicerContext):
        context.add_callback(ended.set)
        last = [time.monotonic()]

        def watchdog() -> None:
            while context.is_active():
                if time.monotonic() - last[0] > STALL_S:
                    context.cancel()
                    return
                time.sleep(0.05)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            yield b"header"
            for _ in range(MESSAGES):
                last[0] = time.monotonic()
                yield CHUNK
        finally:
            done.set()

    server = grpc.server(futures.ThreadPoolExecutor(4), options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "probe.Stall", {"Fetch": grpc.unary_stream_rpc_method_handler(fetch)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        return client_side(port, done, ended)
    finally:
        server.stop(0)


def aio(mode: str) -> tuple[float, float | None, str]:
    done, ended, ready, ports = threading.Event(), threading.Event(), threading.Event(), []
    stop: asyncio.Event | None = None

    async def fetch(request: bytes, context: grpc.aio.ServicerContext) -> None:
        context.add_done_callback(lambda _: ended.set())
        try:
            await context.write(b"header")
            for _ in range(MESSAGES):
                await asyncio.wait_for(context.write(CHUNK), STALL_S)
        except TimeoutError:
            if mode == "abort":
                done.set()
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "stalled")
            if mode == "raise":
                done.set()
                raise RuntimeError("stalled") from None
        finally:
            done.set()

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "probe.Stall", {"Fetch": grpc.unary_stream_rpc_method_handler(fetch)}),))
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        await stop.wait()
        await server.stop(0)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    ready.wait()
    try:
        return client_side(ports[0], done, ended)
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join()
        loop.close()


def main() -> int:
    print(f"| server | handler done after (s) | call ended on the server after (s) | client resumes reading "
          f"{STALL_S + WAIT_S:g} s in |")
    print("|---|---:|---:|---|")
    for name, probe in (("sync + cancel()", sync_cancel), ("aio + abort()", lambda: aio("abort")),
                        ("aio + raise", lambda: aio("raise")), ("aio + return", lambda: aio("return"))):
        gave_up, released, resumed = probe()
        ended = f"{released:.2f}" if released is not None else f"not within {STALL_S + WAIT_S:g}"
        print(f"| {name} | {gave_up:.2f} | {ended} | {resumed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
