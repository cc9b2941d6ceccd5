"""The REST app `mmim serve` runs: MLflow's scoring server for one model, behind request limits.

    uvicorn --factory mmim.registry.serving_app:build_app     (MMIM_SERVE_MODEL=models:/mmim-synthetic@champion)

MLflow's scoring server reads any request body whole and parses it recursively: a
gigabyte body is read into memory, and 100,000 nested brackets crash its JSON parser
(HTTP 500). In front of it this app refuses, before anything is parsed:

    a body over MMIM_SERVE_MAX_REQUEST_BYTES (default 64 MB, as `mmim predict`)   -> 413, at once
    JSON nested deeper than MAX_JSON_DEPTH (32)                 -> 400

A real request is 5 levels deep (dataframe_records, rows, frames, numbers). The model
then applies its own caps (frames per utterance, utterances per request: mmim.training.predict).
"""

from __future__ import annotations

import asyncio
import json
import os

import mlflow
import numpy as np
from mlflow.pyfunc import scoring_server

from mmim.training.predict import MAX_INPUT_BYTES

MODEL_ENV = "MMIM_SERVE_MODEL"
MAX_REQUEST_ENV = "MMIM_SERVE_MAX_REQUEST_BYTES"
MAX_JSON_DEPTH = 32
DEPTH_CHUNK = 1 << 20  # bytes json_depth looks at at once
_OPENING, _CLOSING = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def json_depth(body: bytes) -> int:
    """How deep the brackets of `body` nest; brackets inside strings count too (an upper bound),
    which keeps this a vectorised pass over the bytes rather than a parse (1 MB at a time)."""
    deepest = depth = 0
    for start in range(0, len(body), DEPTH_CHUNK):
        data = np.frombuffer(body, np.uint8, count=min(DEPTH_CHUNK, len(body) - start), offset=start)
        steps = np.isin(data, _OPENING).astype(np.int32) - np.isin(data, _CLOSING)
        running = depth + np.cumsum(steps)
        deepest = max(deepest, int(running.max(initial=0)))
        depth = int(running[-1])  # every chunk holds at least one byte
    return deepest


class RequestLimits:
    """ASGI middleware: reads a POST body up to the cap, checks its nesting, then hands it on.

    A body whose Content-Length is over the cap is refused before it is read; one sent in
    chunks, as soon as the chunks pass the cap. The chunks are joined once, at the end."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        too_large = f"request body over {self.max_bytes} bytes (mmim serve --max-request-mb)"
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(send, 413, too_large)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await _refuse(send, 413, too_large)
                return
        body = b"".join(chunks)
        if await asyncio.to_thread(json_depth, body) > MAX_JSON_DEPTH:  # /ping answers meanwhile
            await _refuse(send, 400, f"request JSON nested deeper than {MAX_JSON_DEPTH} levels")
            return

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _refuse(send, status: int, message: str) -> None:
    content = json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": content})


def build_app() -> RequestLimits:
    """The app for the model named by $MMIM_SERVE_MODEL (uvicorn calls this once, at start)."""
    model = mlflow.pyfunc.load_model(os.environ[MODEL_ENV])
    max_bytes = int(os.environ.get(MAX_REQUEST_ENV, MAX_INPUT_BYTES))
    return RequestLimits(scoring_server.init(model), max_bytes)
