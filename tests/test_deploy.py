"""Deployment: rendered Kubernetes manifests, their offline validation, the
memory sizing, and the Dockerfiles (linted with hadolint).

No cluster and no Docker engine run here: every manifest goes through
``kubernetes-validate --strict`` (core kinds) and the vendored KubeRay schema
(RayJob, RayCluster, with embedded pod templates checked against the core
PodTemplateSpec), and deliberately broken manifests must fail both.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.k8s.render import (
    RAY_VERSION,
    RUN_AS_USER,
    SUBMIT_SCRIPT,
    RenderedDeployment,
    render,
    run_config_text,
    to_yaml,
)
from cluster.k8s.sizing import (
    GIB,
    MIB,
    RUNTIME_BYTES,
    estimate_worker_memory,
    optimizer_factor,
)
from cluster.k8s.validate import (
    KUBERNETES_VERSIONS,
    ManifestValidationError,
    crd_errors,
    validate_documents,
    validate_manifest,
)
from kd_dagfm import cli
from kd_dagfm.config import RunConfig, build_config
from kd_dagfm.errors import ConfigError
from kd_dagfm.schema import make_schema

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXAMPLES = ROOT / "cluster" / "k8s" / "examples"

GPU_RUN = {
    "output_dir": "s3://bucket/runs/kd",
    "dataset": "s3://bucket/data/criteo",
    "num_workers": 4,
    "cpus_per_worker": 8,
    "gpus_per_worker": 1,
    "train_batch_size": 4096,
    "image": "registry.example.com/kd-dagfm:0.1.0-gpu",
    "namespace": "recsys",
    "job_name": "kd-test",
    "s3_secret": "kd-s3",
    "node_selector": ["nvidia.com/gpu.present=true", "pool=a100"],
    "tolerations": ["nvidia.com/gpu:NoSchedule", "dedicated=ml:NoExecute"],
    "backoff_limit": 2,
    "active_deadline_s": 86400,
}


def small_schema() -> Any:
    return make_schema("label", {"C1": 1000, "C2": 3000}, dense=["I1"])


@pytest.fixture(scope="module")
def gpu_config() -> RunConfig:
    return build_config(GPU_RUN)


@pytest.fixture(scope="module")
def rendered(gpu_config: RunConfig) -> RenderedDeployment:
    return render(gpu_config, small_schema())


@pytest.fixture(scope="module")
def written(rendered: RenderedDeployment, tmp_path_factory: Any) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("k8s")
    return {path.name: path for path in rendered.write(out)}


def by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [d for d in documents if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def pod_templates(rendered: RenderedDeployment) -> list[dict[str, Any]]:
    templates = []
    for name in ("rayjob.yaml", "raycluster.yaml"):
        documents = rendered.manifests[name]
        resource = documents[-1]
        spec = resource["spec"]
        cluster = spec["rayClusterSpec"] if resource["kind"] == "RayJob" else spec
        templates.append(cluster["headGroupSpec"]["template"])
        templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    templates.append(
        by_kind(rendered.manifests["indexed-job.yaml"], "Job")["spec"]["template"]
    )
    return templates


def run_tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120
    )


# --- rendering -------------------------------------------------------------


def test_render_writes_every_file(written: dict[str, Path]) -> None:
    assert sorted(written) == sorted(
        ["rayjob.yaml", "raycluster.yaml", "indexed-job.yaml", SUBMIT_SCRIPT]
    )
    script = written[SUBMIT_SCRIPT]
    assert script.stat().st_mode & 0o111, "submit script is not executable"
    syntax = run_tool("bash", "-n", script)
    assert syntax.returncode == 0, syntax.stderr


def test_rayjob_runs_pipeline_and_retries(rendered: RenderedDeployment) -> None:
    job = by_kind(rendered.manifests["rayjob.yaml"], "RayJob")
    spec = job["spec"]
    assert (
        spec["entrypoint"] == "python -m jobs.pipeline --config /etc/kd-dagfm/run.yaml"
    )
    assert spec["backoffLimit"] == 2
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] == 86400
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    assert workers["rayStartParams"]["num-cpus"] == "8"
    assert workers["rayStartParams"]["num-gpus"] == "1"


def test_ray_cluster_and_submit_script(rendered: RenderedDeployment) -> None:
    cluster = by_kind(rendered.manifests["raycluster.yaml"], "RayCluster")
    assert cluster["metadata"]["name"] == "kd-test"
    script = rendered.submit_script
    assert "port-forward service/kd-test-head-svc 8265:8265" in script
    assert "kubectl -n recsys wait raycluster/kd-test" in script
    assert '-- python -m jobs.pipeline --config /etc/kd-dagfm/run.yaml "$@"' in script


def test_indexed_job_rank_layout(rendered: RenderedDeployment) -> None:
    documents = rendered.manifests["indexed-job.yaml"]
    job = by_kind(documents, "Job")
    service = by_kind(documents, "Service")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 2 * 4
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == [2]
    assert rules[1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == service["metadata"]["name"] == "kd-test-ranks"
    assert service["spec"]["clusterIP"] == "None"
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()

    (container,) = pod["containers"]
    assert container["command"][:4] == [
        "python",
        "-m",
        "kd_dagfm.distributed.launch",
        "pipeline",
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["WORLD_SIZE"]["value"] == "4"
    assert env["MASTER_ADDR"]["value"] == "kd-test-0.kd-test-ranks"
    assert env["MASTER_PORT"]["value"] == "29500"
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )


def test_single_phase_entrypoints() -> None:
    config = build_config({**GPU_RUN, "job_entrypoint": "distillation"})
    result = render(config, small_schema())
    job = by_kind(result.manifests["rayjob.yaml"], "RayJob")
    assert job["spec"]["entrypoint"].startswith("python -m jobs.distillation ")
    rank = by_kind(result.manifests["indexed-job.yaml"], "Job")
    command = rank["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[3:6] == ["train", "--phase", "distillation"]
    run = yaml.safe_load(run_config_text(config))
    assert run["train"]["phase"] == "distillation"


def test_placement_on_every_pod(rendered: RenderedDeployment) -> None:
    templates = pod_templates(rendered)
    assert len(templates) == 5
    for template in templates:
        spec = template["spec"]
        assert spec["nodeSelector"] == {
            "nvidia.com/gpu.present": "true",
            "pool": "a100",
        }
        assert spec["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {
                "key": "dedicated",
                "operator": "Equal",
                "value": "ml",
                "effect": "NoExecute",
            },
        ]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == RUN_AS_USER


def test_gpus_only_on_training_pods(rendered: RenderedDeployment) -> None:
    for template in pod_templates(rendered):
        (container,) = template["spec"]["containers"]
        limits = container["resources"]["limits"]
        if container["name"] == "ray-head":
            assert "nvidia.com/gpu" not in limits
        else:
            assert limits["nvidia.com/gpu"] == "1"
            assert container["resources"]["requests"]["cpu"] == "8"


def test_s3_credentials_only_from_secret(rendered: RenderedDeployment) -> None:
    for template in pod_templates(rendered):
        (container,) = template["spec"]["containers"]
        aws = [e for e in container["env"] if e["name"].startswith("AWS_")]
        assert {e["name"] for e in aws} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        }
        for entry in aws:
            assert "value" not in entry, f"{entry['name']} is inline"
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "kd-s3"
            assert ref["key"] == entry["name"]
    text = "".join(to_yaml(d) for d in rendered.manifests.values())
    assert "aws_secret_access_key:" not in text.lower()


def test_run_config_round_trips(gpu_config: RunConfig) -> None:
    run = yaml.safe_load(run_config_text(gpu_config))
    assert "deploy" not in run
    assert run["distributed"]["ray_address"] == "auto"
    loaded = build_config(run)
    expected = gpu_config.replace(ray_address="auto")
    for section in ("model", "train", "data", "distributed"):
        assert getattr(loaded, section) == getattr(expected, section), section


def test_local_paths_rejected() -> None:
    config = build_config({**GPU_RUN, "output_dir": "runs/local"})
    with pytest.raises(ConfigError, match="output_dir 'runs/local' is a local path"):
        render(config, small_schema())
    config = build_config({**GPU_RUN, "dataset": "/data/criteo"})
    with pytest.raises(ConfigError, match="set --dataset to shared storage"):
        render(config, small_schema())


def test_uneven_batch_rejected() -> None:
    config = build_config({**GPU_RUN, "train_batch_size": 1000, "num_workers": 3})
    with pytest.raises(ConfigError, match="1000 is not divisible by num_workers 3"):
        render(config, small_schema())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("job_name", "KD_job", "invalid job_name 'KD_job'"),
        ("job_name", "x" * 41, "expected at most 40 characters"),
        ("tolerations", ["gpu:Sometimes"], "invalid toleration 'gpu:Sometimes'"),
        ("node_selector", ["pool"], "invalid node_selector entry 'pool'"),
        ("memory_headroom", 0.5, "invalid memory_headroom 0.5"),
        ("image_pull_policy", "Sometimes", "invalid image_pull_policy 'Sometimes'"),
        ("job_entrypoint", "train", "invalid job_entrypoint 'train'"),
        ("gpu_resource", "gpu", "invalid gpu_resource 'gpu'"),
    ],
)
def test_deploy_config_errors(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config({key: value})


# --- memory sizing -----------------------------------------------------------


def test_optimizer_factor_by_optimizer() -> None:
    assert optimizer_factor("sgd", 8) == 2.0
    assert optimizer_factor("adagrad", 8) == 3.0
    assert optimizer_factor("adam", 8) == 4.0
    assert optimizer_factor("rowwise_adagrad", 8) == 2.125


def test_memory_estimate_golden() -> None:
    config = build_config(
        {
            "embedding_size": 8,
            "teacher": "crossnet",
            "t_depth": 2,
            "depth": 3,
            "student_type": "outer",
            "embedding_optimizer": "adam",
            "num_workers": 2,
            "sharding": "table_wise",
            "train_batch_size": 64,
            "eval_batch_size": 16,
            "prefetch_batches": 4,
        }
    )
    estimate = estimate_worker_memory(config, small_schema())
    # Tables: (1000 + 3000) rows x 8 x 4 bytes x (1 + 1 + 2 for Adam).
    assert estimate.table_bytes == 512_000
    # table_wise keeps C2 whole on one rank: 3000 x 8 x 4 x 4.
    assert estimate.share_bytes == 384_000
    # F = 3: embeddings 24 + DAGFM 3 x (72 + 9) + CrossNet 2 x 72 = 411 values
    # per example; a training step of 32 rows with backward: 2 x 32 x 411.
    assert estimate.activation_bytes == 2 * 32 * 411 * 4
    # 4 batches x 32 rows x (3 fields + label) x 8 bytes.
    assert estimate.prefetch_bytes == 4096
    working = 384_000 + 105_216 + 4096 + RUNTIME_BYTES
    host = math.ceil(math.ceil(1.25 * working) / MIB) * MIB
    assert estimate.host_bytes == host
    assert estimate.ray_worker_bytes == host + GIB
    assert estimate.rank_bytes == host
    assert estimate.gpu_bytes == 0

    even = estimate_worker_memory(config.replace(sharding="row_wise"), small_schema())
    assert even.share_bytes == 256_000
    replicated = estimate_worker_memory(
        config.replace(sharding="data_parallel"), small_schema()
    )
    assert replicated.share_bytes == 512_000


def test_memory_estimate_gpu_and_override() -> None:
    base = {"embedding_size": 8, "num_workers": 2, "train_batch_size": 64}
    gpu = estimate_worker_memory(
        build_config({**base, "gpus_per_worker": 1}), small_schema()
    )
    cpu = estimate_worker_memory(build_config(base), small_schema())
    assert gpu.gpu_bytes == math.ceil(1.25 * (gpu.share_bytes + gpu.activation_bytes))
    assert gpu.host_bytes < cpu.host_bytes, "GPU activations should leave the host"
    fixed = estimate_worker_memory(
        build_config({**base, "worker_memory_gib": 12}), small_schema()
    )
    assert fixed.ray_worker_bytes == fixed.rank_bytes == 12 * GIB


def test_memory_request_in_manifests(rendered: RenderedDeployment) -> None:
    estimate = rendered.estimate
    ray_memory = f"{estimate.ray_worker_bytes // MIB}Mi"
    rank_memory = f"{estimate.rank_bytes // MIB}Mi"
    for template in pod_templates(rendered):
        (container,) = template["spec"]["containers"]
        resources = container["resources"]
        expected = {"ray-worker": ray_memory, "trainer": rank_memory}.get(
            container["name"]
        )
        if expected is None:
            continue
        assert resources["requests"]["memory"] == expected
        assert resources["limits"]["memory"] == expected


def test_cin_teacher_activations_grow() -> None:
    base = {"embedding_size": 16, "num_workers": 1, "train_batch_size": 256}
    crossnet = estimate_worker_memory(build_config(base), small_schema())
    cin = estimate_worker_memory(
        build_config({**base, "teacher": "cin", "t_cin": [200, 200]}), small_schema()
    )
    # CIN's outer products: (3 x 3 x 16 + 200 x 16) + (200 x 3 x 16 + 200 x 16).
    delta_values = (3 * 3 * 16 + 200 * 16) + (200 * 3 * 16 + 200 * 16) - 3 * 3 * 3 * 16
    assert cin.activation_bytes - crossnet.activation_bytes == (
        max(2 * 256, 8192) * delta_values * 4
    )


# --- offline validation -------------------------------------------------------


def test_manifests_pass_python_validators(rendered: RenderedDeployment) -> None:
    for name, documents in rendered.manifests.items():
        assert validate_documents(documents) == len(documents), name


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_kubernetes_validate_cli(
    written: dict[str, Path], version: str
) -> None:
    files = [p for name, p in sorted(written.items()) if name.endswith(".yaml")]
    result = run_tool(
        BIN / "kubernetes-validate", "--strict", "-k", version, "--no-warn", *files
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"passed for resource (\S+)", result.stdout)
    assert sorted(passed) == sorted(
        ["configmap/kd-test-config"] * 3 + ["service/kd-test-ranks", "job/kd-test"]
    )


def broken_job(rendered: RenderedDeployment) -> list[tuple[str, dict[str, Any]]]:
    job = by_kind(rendered.manifests["indexed-job.yaml"], "Job")
    typo = copy.deepcopy(job)
    typo["spec"]["completionMod"] = typo["spec"].pop("completionMode")
    nested_typo = copy.deepcopy(job)
    container = nested_typo["spec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    missing = copy.deepcopy(job)
    del missing["spec"]["template"]["spec"]["containers"]
    return [
        ("completionMod", typo),
        ("resource", nested_typo),
        ("containers", missing),
    ]


def test_broken_job_fails_kubernetes_validate_cli(
    rendered: RenderedDeployment, tmp_path: Path
) -> None:
    for field, manifest in broken_job(rendered):
        path = tmp_path / f"broken-{field}.yaml"
        path.write_text(to_yaml([manifest]))
        result = run_tool(BIN / "kubernetes-validate", "--strict", "-k", "1.31", path)
        assert result.returncode == 1, f"{field}: {result.stdout}"
        assert f"ERROR {path} did not validate" in result.stdout
        assert field in result.stdout


def test_broken_job_fails_python_validator(rendered: RenderedDeployment) -> None:
    for field, manifest in broken_job(rendered):
        with pytest.raises(ManifestValidationError, match=field):
            validate_manifest(manifest, "1.31")


def broken_ray_job(rendered: RenderedDeployment) -> list[tuple[str, dict[str, Any]]]:
    job = by_kind(rendered.manifests["rayjob.yaml"], "RayJob")
    cases = []

    typo = copy.deepcopy(job)
    typo["spec"]["entrypont"] = typo["spec"].pop("entrypoint")
    cases.append(("spec: Additional properties are not allowed ('entrypont'", typo))

    group = copy.deepcopy(job)
    group["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 4
    cases.append(("workerGroupSpecs.0: Additional properties", group))

    head = copy.deepcopy(job)
    container = head["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]
    container["resource"] = container.pop("resources")
    cases.append(
        ("containers.0: Additional properties are not allowed ('resource'", head)
    )

    missing = copy.deepcopy(job)
    del missing["spec"]["rayClusterSpec"]["headGroupSpec"]
    cases.append(("'headGroupSpec' is a required property", missing))

    no_image = copy.deepcopy(job)
    worker = no_image["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del worker["template"]["spec"]["containers"][0]["name"]
    cases.append(("'name' is a required property", no_image))

    bad_mode = copy.deepcopy(job)
    bad_mode["spec"]["submissionMode"] = "K8sMode"
    cases.append(("submissionMode: 'K8sMode' is not one of", bad_mode))
    return cases


def test_broken_rayjob_fails_kuberay_schema(rendered: RenderedDeployment) -> None:
    for message, manifest in broken_ray_job(rendered):
        with pytest.raises(ManifestValidationError, match=re.escape(message)):
            validate_manifest(manifest, "1.31")


def test_kubernetes_validate_skips_custom_resources(
    rendered: RenderedDeployment, tmp_path: Path
) -> None:
    # kubernetes-validate has no schema for ray.io kinds and only warns; this is
    # why the RayJob needs the vendored KubeRay schema as well.
    _, manifest = broken_ray_job(rendered)[0]
    path = tmp_path / "broken-rayjob.yaml"
    path.write_text(to_yaml([manifest]))
    result = run_tool(BIN / "kubernetes-validate", "--strict", "-k", "1.31", path)
    assert result.returncode == 0
    assert "WARN" in result.stdout
    assert "Couldn't find schema for kind RayJob" in result.stdout


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "rayjobs.ray.io"},
    "spec": {
        "names": {"kind": "RayJob"},
        "versions": [
            {
                "name": "v1",
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "entrypoint": {"type": "string"},
                                    "backoffLimit": {"type": "integer"},
                                    "submissionMode": {"type": "string"},
                                    "shutdownAfterJobFinishes": {"type": "boolean"},
                                    "ttlSecondsAfterFinished": {"type": "integer"},
                                    "rayClusterSpec": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                        "properties": {
                                            "rayVersion": {"type": "string"}
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_validator_is_strict() -> None:
    good = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "x"},
        "spec": {
            "entrypoint": "python -m jobs.pipeline",
            "backoffLimit": 1,
            "rayClusterSpec": {"rayVersion": "2.60.0", "headGroupSpec": {}},
        },
    }
    assert crd_errors(good, CRD) == []
    typo = copy.deepcopy(good)
    typo["spec"]["entrypont"] = typo["spec"].pop("entrypoint")
    errors = crd_errors(typo, CRD)
    assert len(errors) == 1
    assert "'entrypont' was unexpected" in errors[0]
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["backoffLimit"] = "three"
    assert crd_errors(wrong_type, CRD) == [
        "spec.backoffLimit: 'three' is not of type 'integer'"
    ]


# --- command line and examples --------------------------------------------------


def test_render_k8s_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crd_path = tmp_path / "rayjobs-crd.yaml"
    crd_path.write_text(yaml.safe_dump(CRD))
    out = tmp_path / "out"
    code = cli.main(
        [
            "render-k8s",
            "--out",
            str(out),
            "--output_dir",
            "s3://bucket/run",
            "--num_workers",
            "2",
            "--synthetic_fields",
            "5",
            "--job_name",
            "smoke",
            "--validate",
            "--kuberay-crd",
            str(crd_path),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert f"wrote {out / 'rayjob.yaml'}" in printed
    assert "validated 7 manifests against Kubernetes 1.31 and 1.37" in printed
    assert f"validated 1 RayJob manifests against the CRD in {crd_path}" in printed
    job = by_kind(
        list(yaml.safe_load_all((out / "indexed-job.yaml").read_text())), "Job"
    )
    assert job["metadata"]["name"] == "smoke"


def test_render_k8s_command_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["render-k8s", "--out", str(tmp_path)])
    assert code == 2
    assert "output_dir 'runs/default' is a local path" in capsys.readouterr().err
    code = cli.main(
        [
            "render-k8s",
            "--out",
            str(tmp_path),
            "--output_dir",
            "s3://b/r",
            "--schema",
            str(tmp_path / "missing.json"),
        ]
    )
    assert code == 2
    assert "missing.json' not found" in capsys.readouterr().err


def without_run_config(text: str) -> list[dict[str, Any]]:
    """The documents of a manifest file, minus the ConfigMap's run.yaml, which
    lists every config key and so changes whenever a key is added."""
    documents = [d for d in yaml.safe_load_all(text) if d]
    for document in documents:
        if document["kind"] == "ConfigMap":
            document["data"].pop("run.yaml")
    return documents


def test_example_manifests_current(tmp_path: Path) -> None:
    code = cli.main(
        [
            "render-k8s",
            "--config",
            str(EXAMPLES / "gpu-s3.yaml"),
            "--schema",
            str(EXAMPLES / "criteo-hashed-schema.json"),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    stale = f"is stale; rerun the command at the top of {EXAMPLES / 'gpu-s3.yaml'}"
    for path in sorted((EXAMPLES / "gpu-s3").iterdir()):
        fresh = (tmp_path / path.name).read_text()
        if path.suffix != ".yaml":
            assert fresh == path.read_text(), f"{path} {stale}"
            continue
        assert without_run_config(fresh) == without_run_config(path.read_text()), (
            f"{path} {stale}"
        )
        # The example's run config must still load: no removed or renamed key.
        config_map = by_kind(list(yaml.safe_load_all(path.read_text())), "ConfigMap")
        build_config(yaml.safe_load(config_map["data"]["run.yaml"]))


def test_entrypoint_modules_exist() -> None:
    for module in (
        "jobs.pipeline",
        "jobs.teacher_training",
        "jobs.distillation",
        "jobs.finetuning",
        "kd_dagfm.distributed.launch",
    ):
        assert importlib.util.find_spec(module) is not None, module


# --- Docker images ----------------------------------------------------------------


DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu"]


def hadolint() -> Path:
    path = BIN / "hadolint"
    if not path.exists():
        found = shutil.which("hadolint")
        assert found, "hadolint not found: pip install -r requirements-dev.txt"
        path = Path(found)
    return path


def test_dockerfiles_pass_hadolint() -> None:
    result = run_tool(hadolint(), "--failure-threshold", "style", *DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_broken_dockerfile_fails_hadolint(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install wget\n"
        'CMD ["python"]\n'
    )
    result = run_tool(hadolint(), "--failure-threshold", "style", broken)
    assert result.returncode == 1
    assert "DL3007" in result.stdout  # the latest tag
    assert "DL3015" in result.stdout  # no --no-install-recommends


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-\[\],]+)==([^\s#]+)", line.strip())
        if match:
            found[match.group(1).split("[")[0]] = match.group(2)
    return found


def test_image_pins_match_requirements() -> None:
    cpu = pins(ROOT / "requirements-cpu.txt")
    gpu = pins(ROOT / "requirements-gpu.txt")
    assert cpu["torch"] == gpu["torch"] == "2.13.0"
    assert cpu["fbgemm-gpu-cpu"] == gpu["fbgemm-gpu"]
    assert cpu["ray"] == gpu["ray"] == RAY_VERSION
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    torchrec = re.search(r"torchrec==([\d.]+)", bootstrap)
    assert torchrec is not None
    cpu_file = DOCKERFILES[0].read_text()
    gpu_file = DOCKERFILES[1].read_text()
    for text in (cpu_file, gpu_file):
        assert f"--no-deps torchrec=={torchrec.group(1)}" in text
        assert f"USER {RUN_AS_USER}:{RUN_AS_USER}" in text
        assert "HEALTHCHECK" in text
    assert f"torch=={cpu['torch']}" in cpu_file
    assert "-r requirements-cpu.txt" in cpu_file
    assert "-r requirements-gpu.txt" in gpu_file


def test_dockerignore_keeps_copied_sources() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    unignored = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY") and "--from" not in line:
                sources = line.split()[1:-1]
                for source in sources:
                    assert source.rstrip("/") in unignored, (
                        f"{dockerfile.name}: {source}"
                    )
