"""The load client: a separate process that drives the server over raw HTTP/1.1.

Run as ``python -m tests.reliability.client PLAN.json``; prints one JSON
result on stdout. Standard library only, and no connection reuse: every
request is its own TCP connection (``Connection: close``), so a client that
disconnects really closes the socket the server reads from.

A plan::

    {"port": 8000, "clients": 300, "per_client": 10, "deadline": 120,
     "timeout": 30, "requests": [
        {"label": "plain", "path": "/plain/?sleep=0.02"},
        {"label": "drop", "path": "/gathered/?sleep=30", "kind": "disconnect",
         "after": 0.3},
        {"label": "stall", "path": "/body/", "kind": "stalled_body", "hold": 2}]}

Client ``i`` sends its ``j``-th request from ``requests[(i + j) % len]``, so
the mix is the same on every run. ``path`` may contain ``{client}`` and
``{seq}``, replaced by the client's number and its request's number.
Every loop is bounded by ``per_client`` and by ``deadline`` seconds (a client
that reaches the deadline stops: timed runs set a large ``per_client``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter, defaultdict
from typing import Any

MAX_ERRORS = 20


async def _read_response(
    reader: asyncio.StreamReader,
) -> tuple[int, bytes]:
    raw = await reader.read(-1)  # Connection: close: the server ends it
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head:
        raise ConnectionError("the server closed the connection without answering")
    status = int(head.split(b"\r\n", 1)[0].split(b" ")[1])
    headers = head.lower()
    if b"transfer-encoding: chunked" in headers:
        body = _unchunk(body)
    return status, body


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


async def one_request(
    port: int, spec: dict[str, Any], path: str, timeout: float
) -> dict[str, Any]:
    kind = spec.get("kind", "get")
    started = time.monotonic()
    outcome: dict[str, Any] = {"label": spec.get("label", spec["path"]), "status": 0}
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout
        )
        host = f"Host: 127.0.0.1:{port}\r\nConnection: close\r\n"
        if kind == "stalled_body":
            # Promise a large body, send a little of it, then go quiet.
            writer.write(
                f"POST {path} HTTP/1.1\r\n{host}Content-Type: text/plain\r\n"
                f"Content-Length: 1000000\r\n\r\n".encode()
                + b"x" * 100
            )
            await writer.drain()
            await asyncio.sleep(float(spec.get("hold", 1.0)))
            writer.transport.abort()
            outcome["status"] = "stalled"
        elif kind == "disconnect":
            writer.write(f"GET {path} HTTP/1.1\r\n{host}\r\n".encode())
            await writer.drain()
            await asyncio.sleep(float(spec.get("after", 0.2)))
            writer.transport.abort()  # drop it, as a client that went away
            outcome["status"] = "dropped"
        else:
            writer.write(f"GET {path} HTTP/1.1\r\n{host}\r\n".encode())
            await writer.drain()
            status, body = await asyncio.wait_for(_read_response(reader), timeout)
            outcome["status"] = status
            expect = spec.get("expect")
            if status == 200 and expect is not None:
                data = json.loads(body)
                wrong = {k: data.get(k) for k, v in expect.items() if data.get(k) != v}
                if wrong:
                    outcome["wrong"] = wrong
            if status == 200 and spec.get("keep_body"):
                outcome["body"] = json.loads(body)
    except TimeoutError:
        outcome["error"] = f"no answer within {timeout} s"
    except (OSError, ValueError, IndexError) as exc:
        outcome["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    outcome["seconds"] = time.monotonic() - started
    outcome["ended"] = time.time()
    return outcome


async def run(plan: dict[str, Any]) -> dict[str, Any]:
    port = int(plan["port"])
    requests = plan["requests"]
    per_client = int(plan.get("per_client", 1))
    timeout = float(plan.get("timeout", 30))
    deadline = time.monotonic() + float(plan.get("deadline", 120))
    outcomes: list[dict[str, Any]] = []
    stopped = 0

    async def client(i: int) -> None:
        nonlocal stopped
        for j in range(per_client):
            if time.monotonic() >= deadline:
                stopped += 1  # a timed run ends here; not an error
                return
            spec = requests[(i + j) % len(requests)]
            path = spec["path"].replace("{client}", str(i)).replace("{seq}", str(j))
            outcomes.append(await one_request(port, spec, path, timeout))

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(int(plan["clients"]))))
    result = summarize(outcomes, time.monotonic() - started)
    result["clients_stopped_at_deadline"] = stopped
    return result


def summarize(outcomes: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    statuses: dict[str, Counter[str]] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    wrong: list[dict[str, Any]] = []
    bodies: dict[str, list[Any]] = defaultdict(list)
    last_end = 0.0
    for outcome in outcomes:
        label = outcome["label"]
        statuses[label][str(outcome["status"])] += 1
        if isinstance(outcome["status"], int) and outcome["status"]:
            latencies[label].append(round(outcome["seconds"], 4))
        if "error" in outcome and len(errors) < MAX_ERRORS:
            errors.append(f"{label}: {outcome['error']}")
        if "wrong" in outcome and len(wrong) < MAX_ERRORS:
            wrong.append({"label": label, **outcome["wrong"]})
        if "body" in outcome:
            bodies[label].append(outcome["body"])
        last_end = max(last_end, outcome.get("ended", 0.0))
    return {
        "requests": len(outcomes),
        "seconds": round(seconds, 3),
        "statuses": {label: dict(counts) for label, counts in statuses.items()},
        "latencies": dict(latencies),
        "errors": errors,
        "error_count": sum(1 for o in outcomes if "error" in o),
        "wrong": wrong,
        "wrong_count": sum(1 for o in outcomes if "wrong" in o),
        "bodies": dict(bodies),
        "last_end": last_end,
    }


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    result = asyncio.run(run(plan))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
