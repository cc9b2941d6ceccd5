"""infra/ checked offline: Kubernetes objects against their schemas (kubernetes-validate for
core objects and pod templates, the checked-in KubeRay schema for RayCluster/RayJob), the
compose file's references, and the match between the environment and settings the infra
provides and what the code reads."""

import ast
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from mmim.cli import build_parser
from mmim.core.config import load_config
from mmim.core.errors import MMIMInputError
from tests.helpers import PROJECT

INFRA = PROJECT / "infra"
K8S_VERSION = "1.33"
KUBERAY_SCHEMA = yaml.safe_load((INFRA / "k8s" / "schemas" / "kuberay-v1.schema.json").read_text())
PROJECT_VERSION = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["version"]

# Read by the libraries we call, not by our code: the infra may set these.
LIBRARY_ENV = {
    "MLFLOW_TRACKING_URI": "MLflow client (our code reads it too)",
    "MLFLOW_S3_ENDPOINT_URL": "MLflow's S3 artifact store (MinIO)",
    "AWS_ACCESS_KEY_ID": "botocore: DVC remote, MLflow artifacts; pyarrow: Ray checkpoints",
    "AWS_SECRET_ACCESS_KEY": "idem",
    "AWS_DEFAULT_REGION": "idem",
    "AWS_ENDPOINT_URL": "botocore and our Ray storage: S3-compatible endpoint",
    "RAY_ADDRESS": "ray.init(): the cluster to join",
    "RAY_AUTH_MODE": "Ray 2.60 token authentication",
    "RAY_AUTH_TOKEN": "idem",
    "PREFECT_API_URL": "Prefect client and worker",
    "PREFECT_API_DATABASE_CONNECTION_URL": "Prefect server's database",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "Prefect server",
    "PREFECT_UI_API_URL": "Prefect UI",
}
# Read by the images' own entrypoints (postgres, minio, mc).
IMAGE_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
# What a process that runs the pipeline (flows, or `mmim train` as a Ray driver) needs on a cluster.
PIPELINE_ENV = {
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MMIM_SITE_CONFIG",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted((INFRA / "k8s").glob("*.yaml")) for doc in documents(path)]


def pod_templates(obj: dict) -> list[dict]:
    spec = obj["spec"]
    if obj["kind"] == "RayService":
        return pod_templates({"kind": "RayCluster", "spec": spec["rayClusterConfig"]})
    if obj["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    if obj["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else []
    return []


def containers(obj: dict) -> list[dict]:
    return [c for template in pod_templates(obj) for c in template["spec"]["containers"]]


# ---------------------------------------------------------------- code side: what it reads


def env_read_by_code() -> set[str]:
    """Environment variables our Python reads (os.environ / os.getenv with a literal or a
    module-level string constant) and that prefect.yaml and the worker script expand."""
    names: set[str] = set()
    for path in [
        *PROJECT.joinpath("mmim").rglob("*.py"),
        *PROJECT.joinpath("tasks").glob("*.py"),
        *PROJECT.joinpath("flows").glob("*.py"),
    ]:
        tree = ast.parse(path.read_text())
        constants = {
            t.id: n.value.value
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)
        }
        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                key = node.slice
            elif (
                isinstance(node, ast.Call)
                and ast.unparse(node.func) in ("os.environ.get", "os.getenv", "os.environ.setdefault")
                and node.args
            ):
                key = node.args[0]
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                names.add(key.value)
            elif isinstance(key, ast.Name) and isinstance(constants.get(key.id), str):
                names.add(constants[key.id])
    names |= set(re.findall(r"\{\{\s*\$(\w+)\s*\}\}", (PROJECT / "prefect.yaml").read_text()))
    names |= set(re.findall(r"\$\{(\w+)", (INFRA / "docker" / "prefect-worker.sh").read_text()))
    return names


def test_the_code_reads_what_the_infra_is_built_around():
    read = env_read_by_code()
    # the scan works: these are read by mmim/, prefect.yaml and the worker script
    assert {
        "MLFLOW_TRACKING_URI",
        "MMIM_SITE_CONFIG",
        "AWS_ENDPOINT_URL",
        "MMIM_PROJECT_DIR",
        "RAY_HEAD",
        "DVC_REMOTE_URL",
    } <= read


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path,obj", k8s_objects(), ids=lambda v: v.name if isinstance(v, Path) else v["kind"])
def test_kubernetes_objects_match_their_schemas(path, obj):
    if obj["kind"] in ("RayCluster", "RayJob", "RayService"):
        jsonschema.Draft202012Validator({"$ref": f"#/$defs/{obj['kind']}", **KUBERAY_SCHEMA}).validate(obj)
        for template in pod_templates(obj):  # the pod templates inside, as Kubernetes would check them
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                K8S_VERSION,
                strict=True,
            )
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_kuberay_schema_rejects_what_kuberay_would():
    (cluster,) = [obj for _, obj in k8s_objects() if obj["kind"] == "RayCluster"]
    validator = jsonschema.Draft202012Validator({"$ref": "#/$defs/RayCluster", **KUBERAY_SCHEMA})
    typo = {
        **cluster,
        "spec": {**cluster["spec"], "workerGroupSpecs": [{**cluster["spec"]["workerGroupSpecs"][0], "maxReplica": 8}]},
    }
    assert not validator.is_valid(typo)
    assert not validator.is_valid({**cluster, "apiVersion": "ray.io/v1alpha1"})


def test_ray_cluster_and_job_fit_together():
    objects = {obj["kind"]: obj for _, obj in k8s_objects()}
    cluster, job = objects["RayCluster"], objects["RayJob"]
    assert cluster["spec"]["rayVersion"] == ray.__version__  # the images install this Ray
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] >= 1
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    for container in containers(cluster) + containers(job):
        assert container["image"].endswith(f":{PROJECT_VERSION}"), container["image"]


def test_ray_job_entrypoint_is_a_valid_mmim_command():
    (job,) = [obj for _, obj in k8s_objects() if obj["kind"] == "RayJob"]
    command = shlex.split(job["spec"]["entrypoint"])
    command = command[command.index("python") :]
    assert command[:3] == ["python", "-m", "mmim.cli"]
    args = build_parser().parse_args(command[3:])
    config = load_config(PROJECT / args.config, args.set)  # every --set key exists, every value is valid
    assert config.ray.num_workers >= 1 and config.ray.use_gpu and config.tracking.enabled


def test_ray_service_runs_the_application_of_mmim_serve_ray():
    """serveConfigV2 is a config Ray Serve accepts, its import_path builds our application from
    its args, and the cluster runs this Ray and this project's image with the pipeline's env."""
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from mmim.lifecycle.ray_serving import APP_NAME, app_builder

    (service,) = [obj for _, obj in k8s_objects() if obj["kind"] == "RayService"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert (app.name, app.import_path) == (APP_NAME, "mmim.lifecycle.ray_serving:app_builder")
    assert isinstance(app_builder(app.args), Application)
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    for container in containers(service):
        assert container["image"].endswith(f":{PROJECT_VERSION}"), container["image"]
        assert {"configMapRef": {"name": "mmim-env"}} in container["envFrom"]
    with pytest.raises(MMIMInputError, match="replicas"):
        app_builder({**app.args, "replicas": 0})
    with pytest.raises(MMIMInputError, match="not settings"):
        app_builder({**app.args, "replica": 2})


def k8s_env(obj: dict) -> tuple[set[str], set[str]]:
    """(variables set directly, ConfigMap/Secret names pulled in with envFrom) over all containers."""
    direct, refs = set(), set()
    for container in containers(obj):
        direct |= {e["name"] for e in container.get("env", [])}
        refs |= {next(iter(source.values()))["name"] for source in container.get("envFrom", [])}
    return direct, refs


def test_kubernetes_env_is_what_the_code_reads():
    objects = {(obj["kind"], obj["metadata"]["name"]): obj for _, obj in k8s_objects()}
    config_maps = {name: obj["data"] for (kind, name), obj in objects.items() if kind == "ConfigMap"}
    known = env_read_by_code() | set(LIBRARY_ENV)
    assert set(config_maps["mmim-env"]) <= known, set(config_maps["mmim-env"]) - known
    secret_keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # documented in config.yaml's header
    cluster = objects[("RayCluster", "mmim")]
    for template in pod_templates(cluster):
        (container,) = template["spec"]["containers"]
        direct, refs = k8s_env({"kind": "RayCluster", "spec": {"headGroupSpec": {"template": template}}})
        provided = direct | set(config_maps["mmim-env"]) | (secret_keys if "mmim-secrets" in refs else set())
        assert PIPELINE_ENV <= provided, PIPELINE_ENV - provided
        assert direct <= known
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert str(Path(config_maps["mmim-env"]["MMIM_SITE_CONFIG"]).parent) in mounts


@pytest.mark.parametrize("site", ["compose", "k8s"])
def test_site_configs_are_valid_settings(site, tmp_path, monkeypatch):
    if site == "compose":
        path = INFRA / "site" / "compose.yaml"
    else:
        (config_map,) = [obj for _, obj in k8s_objects() if obj["metadata"]["name"] == "mmim-site"]
        path = tmp_path / "site.yaml"
        path.write_text(config_map["data"]["site.yaml"])
    monkeypatch.setenv("MMIM_SITE_CONFIG", str(path))
    run = PROJECT / "configs" / "mosi.yaml"
    config = load_config(run)
    assert config.ray.storage_path.startswith("s3://") and config.ray.s3_endpoint
    assert config.tracking.artifact_location.startswith("s3://")
    site_values, run_values = yaml.safe_load(path.read_text()), yaml.safe_load(run.read_text())
    for section, values in site_values.items():  # every site setting arrives, as the site file has it
        for key, value in values.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    for section, values in run_values.items():  # the run's own settings stand where the site says nothing
        if isinstance(values, dict):
            for key, value in values.items():
                if key not in site_values.get(section, {}):
                    assert getattr(getattr(config, section), key) == value, f"{section}.{key}"


# ---------------------------------------------------------------- compose

COMPOSE = yaml.safe_load((INFRA / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def service_env(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[name].get("environment", {}).items()}


def test_compose_references_resolve():
    for name, service in SERVICES.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            expected = (
                "service_completed_successfully" if SERVICES[dependency].get("restart") == "no" else "service_healthy"
            )
            assert condition["condition"] == expected, f"{name} -> {dependency}"
            if expected == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], f"{dependency} has no healthcheck"
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in COMPOSE["volumes"], f"{name}: volume {source} is not declared"
        if "build" in service:
            assert (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
    host_ports = [p.split(":")[0] for s in SERVICES.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"
    built = {s["image"] for s in SERVICES.values() if "build" in s}
    assert built == {f"mmim-cpu:{PROJECT_VERSION}", f"mmim-train:{PROJECT_VERSION}"}


def test_compose_secrets_come_from_the_env_file():
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)\}", text))
    example = {
        line.split("=", 1)[0]
        for line in (INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used == example
    assert "/infra/.env" in (PROJECT / ".gitignore").read_text().splitlines()  # never committed


def test_compose_env_is_what_the_code_reads():
    known = env_read_by_code() | set(LIBRARY_ENV) | IMAGE_ENV
    for name in SERVICES:
        unknown = set(service_env(name)) - known
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"
    worker = service_env("prefect-worker")
    assert PIPELINE_ENV | {"PREFECT_API_URL", "MMIM_PROJECT_DIR", "RAY_ADDRESS"} <= set(worker)
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    site = worker["MMIM_SITE_CONFIG"].replace("/workspace/", "")
    assert (PROJECT / site).is_file()
    for ray_node in ("ray-head", "ray-worker"):
        assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(
            service_env(ray_node)
        )
    # the databases the servers use are the ones postgres creates
    created = set(re.findall(r"CREATE DATABASE (\w+)", (INFRA / "postgres" / "create-databases.sql").read_text()))
    mlflow_db = next(a for a in SERVICES["mlflow"]["command"] if a.startswith("--backend-store-uri"))
    prefect_db = service_env("prefect-server")["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert {mlflow_db.rsplit("/", 1)[1], prefect_db.rsplit("/", 1)[1]} == created


def test_dockerfiles_pin_their_base_and_run_as_a_user():
    torch_pin = next(
        d
        for d in tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch==")
    )
    for dockerfile in (INFRA / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
        assert re.search(r":\d", base), f"{dockerfile.name}: base image {base} is not pinned"
        assert torch_pin in text, f"{dockerfile.name}: torch is not installed by the project's pin"
        users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} runs as root"
        for copied in re.findall(r"^COPY (?!--)(.+?) \S+$", text, re.MULTILINE):
            for source in copied.split():
                assert (PROJECT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
