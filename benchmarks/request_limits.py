"""How long the REST server's request limits take to answer a large body.

`mmim serve` reads a POST body in front of MLflow's scoring app (mmim.registry.serving_app).
This drives that middleware the way uvicorn does - the body arrives in 64 KB messages - with
the default cap of 64 MB and three bodies: one a byte over the cap sent in chunks (no
Content-Length), the same with its Content-Length, and one just under the cap (read whole,
then its JSON nesting checked). It also times the way bodies were read before (`body +=
chunk`, quadratic) on the first. No model is loaded: the app behind is never reached for
the refused bodies and answers 200 for the last.

    .venv/bin/python benchmarks/request_limits.py
"""

from __future__ import annotations

import asyncio
import time

from mmim.core.limits import MAX_INPUT_BYTES
from mmim.registry.serving_app import RequestLimits

CHUNK = 65_536  # what uvicorn hands over per http.request message


async def served(size: int, declare_length: bool) -> tuple[int, float]:
    """(status, seconds) for a POST of `size` bytes through RequestLimits."""
    sent = 0
    statuses: list[int] = []

    async def receive():
        nonlocal sent
        part = min(CHUNK, size - sent)
        sent += part
        return {"type": "http.request", "body": b" " * part, "more_body": sent < size}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def behind(scope, receive, send):  # stands for MLflow's app: reached only by bodies under the cap
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})

    headers = [(b"content-length", str(size).encode())] if declare_length else []
    scope = {"type": "http", "method": "POST", "headers": headers}
    started = time.perf_counter()
    await RequestLimits(behind, MAX_INPUT_BYTES)(scope, receive, send)
    return statuses[0], time.perf_counter() - started


def quadratic(size: int) -> float:
    """Seconds the former reading (`body += chunk` until the cap) took for `size` bytes."""
    started, body, sent = time.perf_counter(), b"", 0
    while sent < size and len(body) <= MAX_INPUT_BYTES:
        part = min(CHUNK, size - sent)
        body += b" " * part
        sent += part
    return time.perf_counter() - started


def main() -> None:
    over, under = MAX_INPUT_BYTES + 1, MAX_INPUT_BYTES - 1
    print(f"cap {MAX_INPUT_BYTES / 2**20:g} MB, {CHUNK // 1024} KB per message")
    for label, size, declared in (
        ("over the cap, chunked", over, False),
        ("over the cap, Content-Length", over, True),
        ("under the cap, read whole + nesting check", under, True),
    ):
        status, seconds = asyncio.run(served(size, declared))
        print(f"{label:<48} {status}  {seconds:7.3f} s")
    print(f"{'over the cap, chunked, the former body += chunk':<48} 413  {quadratic(over):7.3f} s")


if __name__ == "__main__":
    main()
