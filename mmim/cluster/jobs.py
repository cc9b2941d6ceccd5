"""Submitting training to a remote Ray cluster as a Ray Job.

The job ships this project's code with `runtime_env={"working_dir": <project>}` (data,
runs, virtual environments and Git metadata excluded) and runs
`python -m mmim.cli train` on the cluster, where RAY_ADDRESS (which Ray sets for a job's
entrypoint) names the cluster it runs in (mmim.cluster.connect). The `python` of the
cluster's nodes must have the dependencies installed (see infra/); the feature store must
be readable there (a shared path, or `data.dvc_url` so that workers fetch it with DVC).
Ray 2.60 clusters use token authentication: the submitting side needs RAY_AUTH_MODE=token
and the cluster's token.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from mmim.core.errors import MMIMInputError, ServiceUnavailableError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# A cluster that has just started refuses jobs until its node agents have joined.
SUBMIT_ATTEMPTS, SUBMIT_RETRY_SECONDS = 20, 3
# Never uploaded: large or machine-specific.
EXCLUDES = [
    ".venv/",
    ".git/",
    "data/",
    "runs/",
    "mlruns/",
    "**/__pycache__/",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
]


def training_entrypoint(config_path: str | Path | None, overrides: list[str]) -> str:
    """The shell command the job runs, with the config path relative to the project."""
    parts = ["python", "-m", "mmim.cli", "train"]
    if config_path is not None:
        path = Path(config_path).resolve()
        if not path.is_relative_to(PROJECT_ROOT):
            raise MMIMInputError(
                f"--config {config_path}: must be inside the project ({PROJECT_ROOT}) to be shipped with the job"
            )
        parts += ["--config", str(path.relative_to(PROJECT_ROOT))]
    for override in overrides:
        parts += ["--set", override]
    return " ".join(shlex.quote(part) for part in parts)


def submit_training_job(
    address: str, config_path: str | Path | None, overrides: list[str], submission_id: str | None = None
) -> str:
    """Submit `mmim train` to the Ray cluster at `address` (http://head:8265); returns the job id."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    entrypoint = training_entrypoint(config_path, overrides)
    try:
        client = JobSubmissionClient(address)
    except AuthenticationError:
        raise MMIMInputError(
            f"--submit {address}: the cluster requires its auth token; set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN (or ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH)"
        ) from None
    except ConnectionError as error:
        raise ServiceUnavailableError(f"--submit {address}: cannot reach the Ray job server ({error})") from None
    except (RuntimeError, ValueError) as error:
        raise MMIMInputError(f"--submit {address}: not a Ray job server address ({error})") from None
    for attempt in range(SUBMIT_ATTEMPTS):
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES},
            )
        except RuntimeError as error:
            if "try again later" not in str(error) or attempt == SUBMIT_ATTEMPTS - 1:
                reason = str(error).strip().splitlines()[-1]
                raise ServiceUnavailableError(
                    f"--submit {address}: the job server refused the job ({reason})"
                ) from None
            time.sleep(SUBMIT_RETRY_SECONDS)
    raise AssertionError("unreachable: the last attempt returns or raises")
