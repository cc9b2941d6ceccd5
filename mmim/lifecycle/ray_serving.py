"""The registry's champion on Ray Serve: replicas, batching, recordings featurised apart, and the
alias followed while it serves.

    mmim serve --ray --model models:/mmim-synthetic@champion --replicas 2

One Serve application of three deployments:

    Ingress     the REST contract of `mmim serve` (MLflow's scoring server): POST /invocations
                with dataframe_split or dataframe_records, rows of text + audio + vision or text +
                recording (base64); the same limits (413 over the size cap, 400 over 32 levels of
                JSON, mmim.registry.serving_app); GET /ping and /health. The answer is MLflow's
                {"predictions": [...]} plus "model_version", the registry version that scored it.
    Featurizer  a recording's bytes -> audio and vision frames, in an extractor child process
                per replica: the CPU-heavy step, scaled apart from the model (--featurizer-replicas).
    Model       one registry version's checkpoint; concurrent requests are scored in one batch
                (@serve.batch). Given models:/<name>@<alias>, every `follow_every_s` it asks the
                registry which version the alias names; a new one is loaded beside the old and
                swapped in, so requests in flight finish on the old model and none fails.

This is where the Ray side and the MLflow side meet for serving, as mmim.lifecycle.retrain is
for training.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request),
# and in a Serve replica, where the class arrives by value, a name in a string would not resolve.
import asyncio
import json
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, fields

import pandas as pd
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.scoring_server import infer_and_parse_data
from ray import serve
from transformers import PreTrainedTokenizerBase

from mmim.core.errors import MMIMInputError
from mmim.core.model import MMIM
from mmim.registry.server import absolute_tracking_uri, local_checkpoint, model_version_uri
from mmim.registry.serving import RECORDING_COLUMN, feature_utterances, recording_rows
from mmim.registry.serving_app import RequestLimits
from mmim.training.checkpoint import load_checkpoint
from mmim.training.predict import predict_utterances

log = logging.getLogger(__name__)

APP_NAME = "mmim"
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


@dataclass(frozen=True)
class ServeSettings:
    """`mmim serve --ray`'s options (the fields are the options' names)."""

    model: str  # models:/<name>@<alias> (followed) or models:/<name>/<version>
    replicas: int = 1  # Model replicas; with max_replicas, the autoscaler's minimum
    max_replicas: int | None = None  # None: a fixed number of replicas
    replica_cpus: float = 1.0  # CPUs each Model replica reserves (and torch threads, at least 1)
    featurizer_replicas: int = 1
    batch_size: int = 16  # utterances Model scores at once, across requests
    batch_wait_ms: float = 10.0  # how long a batch waits to fill
    follow_every: float = 10.0  # seconds between Model's questions to the registry: where is the alias?
    max_request_mb: float = 64.0

    @classmethod
    def from_options(cls, options) -> "ServeSettings":
        """From `mmim serve`'s parsed options; a one-line MMIMInputError naming a bad one."""
        settings = cls(**{field.name: getattr(options, field.name) for field in fields(cls)})
        settings.validate()
        return settings

    def validate(self) -> None:
        if not MODEL_URI.fullmatch(self.model):
            raise MMIMInputError(
                f"--model {self.model!r}: Ray Serve serves a registered model, models:/<name>@<alias> "
                "or models:/<name>/<version>"
            )
        if self.replicas < 1 or (self.max_replicas is not None and self.max_replicas < self.replicas):
            raise MMIMInputError(
                f"--replicas {self.replicas} --max-replicas {self.max_replicas}: expected 1 <= min <= max"
            )
        if self.featurizer_replicas < 1:
            raise MMIMInputError(f"--featurizer-replicas {self.featurizer_replicas}: expected at least 1")
        if not 0 < self.replica_cpus <= 1024:
            raise MMIMInputError(f"--replica-cpus {self.replica_cpus}: expected a number of CPUs in (0, 1024]")
        if not 1 <= self.batch_size <= 1024:
            raise MMIMInputError(f"--batch-size {self.batch_size}: expected 1 to 1024")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise MMIMInputError(f"--batch-wait-ms {self.batch_wait_ms}: expected 0 to 10000")
        if not 0.1 <= self.follow_every <= 86_400:
            raise MMIMInputError(f"--follow-every {self.follow_every}: expected 0.1 to 86400 seconds")


# ---------------------------------------------------------------- the model, following its alias


@dataclass(frozen=True)
class LoadedVersion:
    version: str
    model: MMIM
    tokenizer: PreTrainedTokenizerBase
    extractor: dict | None  # the model's extractor record (trained on recordings), else None


@serve.deployment(name="Model")
class Model:
    def __init__(self, settings: ServeSettings, mlflow_uri: str) -> None:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
        torch.set_num_threads(max(1, int(settings.replica_cpus)))
        found = MODEL_URI.fullmatch(settings.model)
        assert found is not None  # ServeSettings.validate
        self.name, self.alias = found["name"], found["alias"]
        # @serve.batch's setters (mypy sees the plain method)
        self.score.set_max_batch_size(settings.batch_size)  # type: ignore[attr-defined]
        self.score.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)  # type: ignore[attr-defined]
        self.current = self._load(found["version"] or self._aliased_version())
        if self.alias:
            threading.Thread(target=self._follow, args=(settings.follow_every,), daemon=True).start()

    def _aliased_version(self) -> str:
        return model_version_uri(f"models:/{self.name}@{self.alias}").rsplit("/", 1)[1]

    def _load(self, version: str) -> LoadedVersion:
        with local_checkpoint(f"models:/{self.name}/{version}") as checkpoint:
            model, config, tokenizer = load_checkpoint(checkpoint)
        log.info("loaded %s version %s", self.name, version)
        return LoadedVersion(version, model, tokenizer, config.model.extractor)

    def _follow(self, every_s: float) -> None:
        """Load the version the alias names when it moves; the swap is one assignment."""
        while True:
            time.sleep(every_s)
            try:
                version = self._aliased_version()
                if version != self.current.version:
                    self.current = self._load(version)
                    log.warning("%s@%s moved: now serving version %s", self.name, self.alias, version)
            except Exception as error:  # noqa: BLE001 - a registry that does not answer: keep serving, ask again
                log.warning("could not follow %s@%s: %s", self.name, self.alias, error)

    def info(self) -> dict:
        """What the Featurizer needs: the version served now and its extractor record."""
        current = self.current
        return {"version": current.version, "extractor": current.extractor}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # set from ServeSettings in __init__
    async def score(self, requests: list[tuple[dict | None, list[dict]]]) -> list[dict]:
        """Each request: (the extractor record its recordings were featurised with, or None for
        features, utterances) -> {"version", "predictions"}, {"stale": True} when the served
        version featurises otherwise (featurise again), or {"error": message}."""
        return await asyncio.to_thread(self._score, self.current, requests)

    @staticmethod
    def _score(current: LoadedVersion, requests: list[tuple[dict | None, list[dict]]]) -> list[dict]:
        answers: list[dict] = [{"stale": True}] * len(requests)
        fresh = [i for i, (record, _) in enumerate(requests) if record is None or record == current.extractor]
        utterances = [utterance for i in fresh for utterance in requests[i][1]]
        try:
            predictions = predict_utterances(current.model, current.tokenizer, utterances) if utterances else []
        except MMIMInputError:  # one bad request: score each alone, so only it fails
            for i in fresh:
                answers[i] = Model._score_one(current, requests[i][1])
            return answers
        start = 0
        for i in fresh:
            count = len(requests[i][1])
            answers[i] = {"version": current.version, "predictions": predictions[start : start + count]}
            start += count
        return answers

    @staticmethod
    def _score_one(current: LoadedVersion, utterances: list[dict]) -> dict:
        try:
            return {
                "version": current.version,
                "predictions": predict_utterances(current.model, current.tokenizer, utterances),
            }
        except MMIMInputError as error:
            return {"error": str(error)}


# ---------------------------------------------------------------- recordings -> frames


@serve.deployment(name="Featurizer", max_ongoing_requests=2, ray_actor_options={"num_cpus": 0.5})
class Featurizer:
    """One recording at a time through this replica's extractor child (one per extractor record)."""

    def __init__(self) -> None:
        from mmim.data.recordings.scoring import RecordingFeaturizer  # OpenCV, dlib, openSMILE: here only

        self.featurize = RecordingFeaturizer()

    async def __call__(self, record: dict | None, row: tuple[bytes, str, str]) -> dict:
        """{"utterance": {...}} or {"error": message} for (recording bytes, text, where)."""
        try:
            (utterance,) = await asyncio.to_thread(self.featurize, record, [row])
        except MMIMInputError as error:
            return {"error": str(error)}
        return {"utterance": utterance}


# ---------------------------------------------------------------- REST


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    def __init__(self, model, featurizer, max_request_bytes: int) -> None:
        self.model, self.featurizer, self.max_request_bytes = model, featurizer, max_request_bytes

    def __serve_build_asgi_app__(self):
        """MLflow's routes, behind the same request limits as `mmim serve`."""
        app = FastAPI()

        @app.get("/ping")
        @app.get("/health")
        async def ping() -> Response:  # answers once the Model has loaded (Serve routes here only then)
            info = await self.model.info.remote()
            return JSONResponse({"model_version": info["version"]})

        @app.post("/invocations")
        async def invocations(request: Request) -> Response:
            try:
                version, predictions = await self._invocations(await request.body())
            except MlflowException as error:
                return Response(error.serialize_as_json(), error.get_http_status_code(), media_type="application/json")
            return JSONResponse({"predictions": predictions, "model_version": version})

        return RequestLimits(app, self.max_request_bytes)

    async def _invocations(self, body: bytes) -> tuple[str, list[dict]]:
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise bad_request(f"Ensure that input is a valid JSON formatted string. Error: '{error!r}'") from None
        if not isinstance(request, dict):
            raise bad_request("the request must be a JSON object with dataframe_split or dataframe_records")
        table = infer_and_parse_data(request)
        if not isinstance(table, pd.DataFrame):
            raise bad_request("the request must hold a table: dataframe_split or dataframe_records")
        for _ in range(2):  # a second time only when the alias moved to a model that featurises otherwise
            try:
                if RECORDING_COLUMN in table.columns:
                    record, utterances = await self._featurized(recording_rows(table))
                else:
                    record, utterances = None, feature_utterances(table)
            except MMIMInputError as error:
                raise bad_request(str(error)) from None
            answer = await self.model.score.remote((record, utterances))
            if "error" in answer:
                raise bad_request(answer["error"])
            if "stale" not in answer:
                return answer["version"], answer["predictions"]
        raise MlflowException("the served model changed twice while this request was featurised; send it again")

    async def _featurized(self, rows: list[tuple[bytes, str, str]]) -> tuple[dict | None, list[dict]]:
        record = (await self.model.info.remote())["extractor"]
        answers = await asyncio.gather(*(self.featurizer.remote(record, row) for row in rows))
        for answer in answers:
            if "error" in answer:
                raise MMIMInputError(answer["error"])
        return record, [answer["utterance"] for answer in answers]


def application(settings: ServeSettings):
    """The Serve application for `settings` (bound, not yet running)."""
    scaling: dict = {"num_replicas": settings.replicas}
    if settings.max_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": settings.replicas, "max_replicas": settings.max_replicas}}
    # (@serve.deployment makes each class a Deployment; mypy sees the class)
    model = Model.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": settings.replica_cpus}, **scaling
    ).bind(settings, absolute_tracking_uri())  # this process's, which a replica elsewhere may not share
    featurizer = Featurizer.options(num_replicas=settings.featurizer_replicas).bind()  # type: ignore[attr-defined]
    return Ingress.bind(model, featurizer, int(settings.max_request_mb * 2**20))  # type: ignore[attr-defined]


def app_builder(args: dict):
    """The application for a Serve config file (KubeRay's serveConfigV2, `serve run`):
    `import_path: mmim.lifecycle.ray_serving:app_builder` with `args` named as ServeSettings'
    fields. The replicas read MLFLOW_TRACKING_URI from their environment."""
    unknown = set(args) - {field.name for field in fields(ServeSettings)}
    if unknown:
        raise MMIMInputError(f"serve config args {sorted(unknown)}: not settings of mmim serve --ray")
    settings = ServeSettings(**args)
    settings.validate()
    return application(settings)


def serve_until_stopped(settings: ServeSettings, host: str, port: int, ray_address: str | None) -> None:
    """Run the application on the named Ray cluster (else a private local one), its HTTP proxy on
    host:port, until this process is interrupted or terminated; then remove it from the cluster."""
    from mmim.cluster.connect import connect

    connect(ray_address)
    if not log.isEnabledFor(logging.DEBUG):  # Serve's notes on its own start and stop (-v shows them)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    log.info("starting Ray Serve: %s", settings.model)
    serve.start(http_options={"host": host, "port": port})
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # terminated: clean up as for Ctrl-C
    try:
        serve.run(application(settings), name=APP_NAME, route_prefix="/")
        replicas = f"{settings.replicas}-{settings.max_replicas}" if settings.max_replicas else settings.replicas
        log.info("serving on http://%s:%d, %s model replica(s); Ctrl-C stops", host, port, replicas)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        serve.delete(APP_NAME)
