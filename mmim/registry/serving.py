"""The MLflow pyfunc model: a checkpoint (weights, config, tokenizer) behind `predict`.

Input: a table with one row per utterance and the columns
    text    str
    audio   list of frames, each a list of audio_dim numbers
    vision  list of frames, each a list of vision_dim numbers
or, for a model trained on recordings, the columns
    text       str
    recording  the recording's file (mp4, mkv, webm, avi, wav, flac), base64-encoded
               (bytes from Python); never a path: a client must not make the server read files
Output: a table with `score` (sentiment in [-3, 3]), `polarity` (the Acc-2 class) and
`class7` (the Acc-7 class, -3..3).

The model is logged as "model from code" (`mmim/registry/pyfunc_entry.py`), so nothing is
pickled; loading it needs the `mmim` package and the logged checkpoint only.

The command line reaches registered models through the helpers below (and
mmim.registry.server.local_checkpoint, the checkpoint inside a registered model):
    check_model(uri)          the URI resolves to an MLflow model, or a one-line error
    serve_command(uri, ...)   `mlflow models serve` from this environment
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from mmim.core.child_process import python_module_command
from mmim.core.errors import MMIMInputError, ServiceUnavailableError
from mmim.core.limits import MAX_UTTERANCES
from mmim.registry.server import answering, tracking_uri
from mmim.registry.serving_app import MAX_REQUEST_ENV, MODEL_ENV
from mmim.training.checkpoint import load_checkpoint
from mmim.training.predict import predict_utterances

if TYPE_CHECKING:  # imported when a recording comes: it loads OpenCV, dlib, openSMILE
    from mmim.data.recordings.scoring import RecordingFeaturizer

COLUMNS = ("text", "audio", "vision")
RECORDING_COLUMN = "recording"
log = logging.getLogger(__name__)


class MMIMPyfunc(PythonModel):
    def load_context(self, context) -> None:
        self.model, self.config, self.tokenizer = load_checkpoint(context.artifacts["checkpoint"])
        self._recordings: RecordingFeaturizer | None = None  # with the first recording (OpenCV, dlib, openSMILE)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        try:
            if RECORDING_COLUMN in model_input.columns:
                rows = recording_rows(model_input)
                if self._recordings is None:
                    from mmim.data.recordings.scoring import RecordingFeaturizer

                    self._recordings = RecordingFeaturizer()
                utterances = self._recordings(self.config.model.extractor, rows)
            else:
                utterances = feature_utterances(model_input)
            predictions = predict_utterances(self.model, self.tokenizer, utterances)
        except MMIMInputError as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(predictions, columns=["score", "polarity", "class7"])


# ---------------------------------------------------------------- a request's table, for both servers


def feature_utterances(table: pd.DataFrame) -> list[dict]:
    """The utterances of a table with text, audio and vision columns (frames as nested lists)."""
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise MMIMInputError(
            f"input lacks column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}, or text and {RECORDING_COLUMN}"
        )
    return [
        {"text": row.text, "audio": _frames(row.audio), "vision": _frames(row.vision)}
        for row in table.itertuples(index=False)
    ]


def recording_rows(table: pd.DataFrame) -> list[tuple[bytes, str, str]]:
    """(recording bytes, text, "row <i>") of a table with text and recording columns."""
    if "text" not in table.columns:
        raise MMIMInputError(f"input lacks column text (with {RECORDING_COLUMN})")
    if len(table) > MAX_UTTERANCES:
        raise MMIMInputError(f"{len(table)} recordings, at most {MAX_UTTERANCES} per request")
    return [
        (_recording_bytes(row.recording, index), row.text, f"row {index}")
        for index, row in enumerate(table.itertuples(index=False))
    ]


def _recording_bytes(value, index: int) -> bytes:
    """A recording's bytes from base64 text (REST) or bytes (Python)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            # standard base64, also as `base64` writes it: lines of 76 characters
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            pass
    raise MMIMInputError(
        f"row {index}, field {RECORDING_COLUMN}: expected the file's bytes, base64-encoded (the server reads no paths)"
    )


def _frames(value):
    """Frames as nested lists (a column may hold numpy arrays of arrays)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [frame.tolist() if hasattr(frame, "tolist") else frame for frame in value]
    return value


def model_signature(example: pd.DataFrame, recordings: bool) -> ModelSignature:
    """The logged model's signature: the example's columns; for a model trained on recordings,
    `audio` and `vision` become optional beside an optional `recording`."""
    output = pd.DataFrame({"score": [0.0], "polarity": ["positive"], "class7": [0]})
    signature = infer_signature(example, output)
    if not recordings:
        return signature
    columns: list[ColSpec | TensorSpec] = [
        ColSpec(column.type, column.name, required=column.name == "text") for column in signature.inputs.inputs
    ]
    columns.append(ColSpec(DataType.string, RECORDING_COLUMN, required=False))
    return ModelSignature(Schema(columns), signature.outputs)


# ---------------------------------------------------------------- registered models, for the CLI


def check_model(uri: str) -> None:
    """Raise a one-line error unless `uri` (models:/<name>@<alias>, a path, ...) is an MLflow model."""
    with answering(uri):
        files = mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=tracking_uri())
    if "MLmodel" not in {Path(file.path).name for file in files}:
        raise MMIMInputError(f"{uri}: not an MLflow model (no MLmodel file there)")


MAX_REQUEST_MB = 4096.0  # --max-request-mb: a body is read into memory whole before it is parsed


def check_address(host: str, port: int, max_request_mb: float) -> None:
    """`mmim serve`'s options, and that `host`:`port` is free (a busy port is a one-line
    ServiceUnavailableError, exit 1, rather than uvicorn's exit 3 after loading the model)."""
    if not 0 < max_request_mb <= MAX_REQUEST_MB:  # also refuses nan
        raise MMIMInputError(f"--max-request-mb {max_request_mb}: expected a number of MB in (0, {MAX_REQUEST_MB:g}]")
    if not 1 <= port <= 65535:
        raise MMIMInputError(f"--port {port}: expected 1 to 65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as error:
        raise MMIMInputError(f"--host {host!r}: not an address of this machine ({error})") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ServiceUnavailableError(
                    f"{host}:{port}: already in use; stop that server or pick --port"
                ) from None
            raise MMIMInputError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None


def serve_command(uri: str, host: str, port: int, max_request_bytes: int) -> tuple[list[str], dict[str, str]]:
    """The REST server for `uri` (mmim.registry.serving_app: MLflow's scoring app behind request limits)
    run by this interpreter's uvicorn, and its environment: no activated virtual environment
    and nothing on PATH needed."""
    env = {**os.environ, MODEL_ENV: uri, MAX_REQUEST_ENV: str(max_request_bytes)}
    env.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    command = python_module_command(
        "uvicorn", "--factory", "mmim.registry.serving_app:build_app", "--host", host, "--port", str(port)
    )
    return command, env
