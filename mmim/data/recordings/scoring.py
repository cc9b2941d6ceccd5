"""Scoring a new recording: the extractor a model was trained with, run on one more clip.

A model trained on a recordings store carries that store's extractor record (name,
version, settings) in its config (`model.extractor`). The same settings turn a
recording into the audio and vision frames the model expects; a different extractor
version (this code or its libraries changed since training) still runs, with a warning,
since its features may differ slightly from those the model learned from.

Recordings arrive as a path (the command line) or as the file's bytes (the REST server;
it never reads paths a client names). Either way they are decoded in the extractor's
child process, as untrusted media.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from pathlib import Path

from pydantic import ValidationError

from mmim.core.errors import MMIMInputError
from mmim.data.recordings.extractor import EXTRACTOR_VERSION, ExtractorSettings, IsolatedExtractor
from mmim.data.recordings.media import MediaError

log = logging.getLogger(__name__)


def model_extractor(record: dict | None) -> IsolatedExtractor:
    """The extractor described by a model's `model.extractor` record."""
    if not record:
        raise MMIMInputError(
            "this model was trained on features from a community release, not on recordings: "
            "it scores audio and vision frames, not a recording"
        )
    try:
        settings = ExtractorSettings.model_validate(record.get("settings", {}))
    except ValidationError as error:
        raise MMIMInputError(f"the model's extractor settings are invalid ({error.errors()[0]['msg']})") from None
    if record.get("version") != EXTRACTOR_VERSION:
        log.warning(
            "the model's features came from extractor version %s, this is %s: its features may differ "
            "slightly from those the model learned from",
            record.get("version"),
            EXTRACTOR_VERSION,
        )
    return IsolatedExtractor(settings)


def recording_utterance(
    extract: IsolatedExtractor,
    recording: str | Path | bytes,
    text: str,
    where: str,
    start: float | None = None,
    end: float | None = None,
) -> dict:
    """{"text", "audio", "vision"} of one recording (a path, or the file's bytes), or of its span
    from `start` to `end` seconds (a path's)."""
    if not isinstance(text, str) or not text.strip():
        raise MMIMInputError(f"{where}, field text: empty or not a string")
    try:
        if isinstance(recording, bytes):
            with tempfile.NamedTemporaryFile(prefix="mmim-recording-") as file:
                file.write(recording)
                file.flush()
                features = extract(file.name)
        else:
            if not Path(recording).is_file():
                raise MMIMInputError(f"{recording}: no such file")
            features = extract(recording, start, end)
    except MediaError as error:
        raise MMIMInputError(f"{where}: {error}") from None
    return {"text": text, "audio": features.audio, "vision": features.vision}


class RecordingFeaturizer:
    """Recordings -> utterances with the extractor a model's record describes, for a server or a
    scoring actor: one extractor child per record, started with the first recording, one clip at
    a time. A row: (recording, text, where), and optionally start and end (see recording_utterance)."""

    def __init__(self) -> None:
        self._extractors: dict[str, IsolatedExtractor] = {}
        self._lock = threading.Lock()

    def __call__(self, record: dict | None, rows: list[tuple]) -> list[dict]:
        """{"text", "audio", "vision"} for each row."""
        with self._lock:
            key = json.dumps(record, sort_keys=True)
            if key not in self._extractors:
                self._extractors[key] = model_extractor(record)
            return [recording_utterance(self._extractors[key], *row) for row in rows]
