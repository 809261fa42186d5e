"""A TCP forwarder on 127.0.0.1 that delays every chunk by a fixed time (W5).

    python -m bench.delayproxy --port 6543 --target 127.0.0.1:5432 --delay-ms 1

Each direction of each connection is a reader thread and a writer thread: the
reader stamps a chunk with ``now + delay`` and queues it, the writer sleeps
until that time and sends it, so data keeps its order and a request/response
round trip gains twice the delay. Threads rather than asyncio because
``time.sleep`` keeps sub-millisecond precision where event-loop timers round
to whole milliseconds.

It stands in for netem on a veth pair in a network namespace (the issue's
plan), which this machine's kernel lacks (CONFIG_NET_SCH_NETEM is not set).
Unlike netem it adds no per-packet delay inside a chunk and no bandwidth
limit; for PostgreSQL's request/response traffic that is the same thing.
It listens on loopback only and stops after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import queue
import socket
import threading
import time

_CHUNK = 65536


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    pending: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def writer() -> None:
        while True:
            due, data = pending.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        while True:
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = b""
            pending.put((time.monotonic() + delay, data))
            if not data:
                break
    finally:
        thread.join(timeout=10)


def _serve(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(upstream, client, delay), daemon=True)
    back.start()
    _pump(client, upstream, delay)
    back.join(timeout=30)
    client.close()
    upstream.close()


class DelayProxy:
    """The forwarder in background threads of this process (for tests):
    ``with DelayProxy(("127.0.0.1", 5432), 0.1) as proxy: ... proxy.port``."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _addr = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            threading.Thread(
                target=_serve, args=(client, self.target, self.delay), daemon=True
            ).start()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.delayproxy")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", default="127.0.0.1:5432")
    parser.add_argument("--delay-ms", type=float, required=True, help="one way")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    delay = args.delay_ms / 1000
    listener = socket.create_server(("127.0.0.1", args.port), backlog=128)
    listener.settimeout(1.0)
    deadline = time.monotonic() + args.max_seconds
    print(
        f"delayproxy: 127.0.0.1:{args.port} -> {args.target}, +{args.delay_ms} ms each way",
        flush=True,
    )
    while time.monotonic() < deadline:
        try:
            client, _addr = listener.accept()
        except TimeoutError:
            continue
        client.settimeout(None)
        threading.Thread(
            target=_serve, args=(client, target, delay), daemon=True
        ).start()
    listener.close()


if __name__ == "__main__":
    main()
