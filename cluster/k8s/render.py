"""Render Kubernetes manifests for a run from its RunConfig.

One run config (plus its ``deploy`` section) produces every file, so a user
changes one config instead of five YAML files:

==========================  ===================================================
file                        contents
==========================  ===================================================
``rayjob.yaml``             ConfigMap + KubeRay RayJob: starts a RayCluster,
                            runs ``python -m jobs.<entrypoint>`` on it, deletes
                            the cluster when the job ends
``raycluster.yaml``         ConfigMap + a long-lived KubeRay RayCluster
``ray-job-submit.sh``       port-forward to that cluster's dashboard and
                            ``ray job submit`` the same entrypoint
``indexed-job.yaml``        ConfigMap + headless Service + ``batch/v1`` Job in
                            Indexed mode, one pod per rank, for clusters
                            without KubeRay
==========================  ===================================================

The ConfigMap carries the whole run config as ``run.yaml``; every pod mounts
it at :data:`CONFIG_DIR` and the entrypoint reads it with ``--config``.

Resume: checkpoints go to ``output_dir``, which must be shared storage (an
``s3://`` URL), and the trainer resumes each phase from the newest checkpoint
that has its COMPLETE marker. So every retry below simply reruns the same
command: KubeRay's RayJob ``backoffLimit`` (a fresh RayCluster per retry), Ray
Train's ``max_failures`` (lost workers inside one cluster) and the indexed
Job's ``backoffLimit`` (replacement pods for failed ranks).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from cluster.k8s.sizing import (
    MemoryEstimate,
    estimate_worker_memory,
    head_memory_bytes,
    quantity,
)
from kd_dagfm.config import RunConfig, parse_node_selector, parse_tolerations
from kd_dagfm.errors import ConfigError
from kd_dagfm.schema import FeatureSchema
from kd_dagfm.storage import is_remote

logger = logging.getLogger(__name__)

RAY_VERSION = "2.60.0"
"""Ray version in the images (requirements-cpu.txt, requirements-gpu.txt).
KubeRay uses it to build the ``ray start`` and ``ray job submit`` commands."""

CONFIG_DIR = "/etc/kd-dagfm"
CONFIG_FILE = "run.yaml"
RUN_AS_USER = 10001
"""The images' non-root ``kd`` user (docker/Dockerfile.*)."""

CONFIG_ERROR_EXIT_CODE = 2
"""Exit status of ``kd-dagfm`` on a KDDAGFMError (an invalid config, data or
checkpoint). A retry cannot fix those, so the indexed Job fails at once."""

RAY_HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
S3_REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_KEYS = ("AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
SHM_EXTRA_GIB = 1.0
"""/dev/shm beyond the Ray object store, for gloo/NCCL shared-memory transport."""

MANAGED_BY = "kd-dagfm-render-k8s"
ESTIMATE_ANNOTATION = "kd-dagfm/memory-estimate"
SUBMIT_SCRIPT = "ray-job-submit.sh"

Manifest = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RenderedDeployment:
    """Every rendered file: YAML documents by file name, plus the submit script."""

    manifests: dict[str, list[Manifest]]
    submit_script: str
    estimate: MemoryEstimate

    def write(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Write the files under ``out_dir`` (created if missing) and return them."""
        root = Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, documents in self.manifests.items():
            path = root / name
            path.write_text(to_yaml(documents), encoding="utf-8")
            paths.append(path)
        script = root / SUBMIT_SCRIPT
        script.write_text(self.submit_script, encoding="utf-8")
        script.chmod(0o755)
        paths.append(script)
        return paths


def render(config: RunConfig, schema: FeatureSchema) -> RenderedDeployment:
    """Render every manifest of a run.

    Args:
        config: the run, with its ``deploy`` section.
        schema: the dataset's features; sizes the worker memory.

    Raises:
        ConfigError: when the run cannot work on Kubernetes as configured
            (local paths that pods would lose, a batch size the workers cannot
            split).
    """
    check_deployable(config)
    estimate = estimate_worker_memory(config, schema)
    _log_estimate(config, estimate)
    config_map = render_config_map(config)
    manifests = {
        "rayjob.yaml": [config_map, render_ray_job(config, estimate)],
        "raycluster.yaml": [config_map, render_ray_cluster(config, estimate)],
        "indexed-job.yaml": [
            config_map,
            render_rank_service(config),
            render_indexed_job(config, estimate),
        ],
    }
    return RenderedDeployment(
        manifests=manifests,
        submit_script=render_submit_script(config),
        estimate=estimate,
    )


def check_deployable(config: RunConfig) -> None:
    """Reject configs that would lose data or fail on a multi-pod cluster."""
    train = config.train
    locations = {
        "output_dir": train.output_dir,
        "warm_up": train.warm_up,
        "storage_path": config.distributed.storage_path,
    }
    if config.data.dataset != "synthetic":
        locations["dataset"] = config.data.dataset
    for key, value in locations.items():
        if value is not None and not is_remote(value):
            raise ConfigError(
                f"{key} {value!r} is a local path: every pod has its own "
                "filesystem and loses it on restart, so ranks could not share "
                f"data and a retry could not resume; set --{key} to shared "
                "storage such as s3://bucket/prefix"
            )
    workers = config.distributed.num_workers
    if train.train_batch_size % workers:
        raise ConfigError(
            f"train_batch_size {train.train_batch_size} is not divisible by "
            f"num_workers {workers}: every rank needs an equal batch; use a "
            f"multiple of {workers}"
        )


def run_config_text(config: RunConfig) -> str:
    """Return the run config a pod reads: every section but ``deploy``, spelled out.

    ``ray_address`` is ``auto``: the Ray entrypoints join the cluster they run
    on instead of starting a local one. A single-phase ``job_entrypoint`` also
    sets ``phase``.
    """
    sections = config.to_dict()
    del sections["deploy"]
    sections["distributed"]["ray_address"] = "auto"
    if config.deploy.job_entrypoint != "pipeline":
        sections["train"]["phase"] = config.deploy.job_entrypoint
    header = (
        "# Rendered by kd-dagfm render-k8s; every key is spelled out so the run\n"
        "# does not depend on the defaults of the image's kd-dagfm version.\n"
    )
    return header + yaml.safe_dump(sections, sort_keys=True)


def render_config_map(config: RunConfig) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config, _config_map_name(config), "config"),
        "data": {CONFIG_FILE: run_config_text(config)},
    }


def entrypoint_command(config: RunConfig) -> list[str]:
    """Return the Ray driver command (what ``ray job submit --`` runs)."""
    return [
        "python",
        "-m",
        f"jobs.{config.deploy.job_entrypoint}",
        "--config",
        f"{CONFIG_DIR}/{CONFIG_FILE}",
    ]


def launch_command(config: RunConfig) -> list[str]:
    """Return the command of each indexed-Job rank (torch.distributed, no Ray)."""
    entrypoint = config.deploy.job_entrypoint
    if entrypoint == "pipeline":
        command = ["pipeline"]
    else:
        command = ["train", "--phase", entrypoint]
    return [
        "python",
        "-m",
        "kd_dagfm.distributed.launch",
        *command,
        "--config",
        f"{CONFIG_DIR}/{CONFIG_FILE}",
    ]


def render_ray_job(config: RunConfig, estimate: MemoryEstimate) -> Manifest:
    """Render a RayJob. KubeRay starts a RayCluster, submits the entrypoint,
    then deletes the cluster ``ttl_after_finished_s`` after the job ends.

    ``backoffLimit`` retries create a fresh RayCluster and rerun the
    entrypoint, which resumes from the newest complete checkpoint.
    """
    deploy = config.deploy
    spec: dict[str, Any] = {
        "entrypoint": shlex.join(entrypoint_command(config)),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": deploy.ttl_after_finished_s,
        "backoffLimit": deploy.backoff_limit,
        "rayClusterSpec": _ray_cluster_spec(config, estimate),
    }
    if deploy.active_deadline_s:
        spec["activeDeadlineSeconds"] = deploy.active_deadline_s
    metadata = _metadata(config, deploy.job_name, "ray-job")
    metadata["annotations"] = {ESTIMATE_ANNOTATION: estimate.summary()}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata,
        "spec": spec,
    }


def render_ray_cluster(config: RunConfig, estimate: MemoryEstimate) -> Manifest:
    """Render a long-lived RayCluster with the RayJob's layout. Runs go to it
    through the script from :func:`render_submit_script`."""
    metadata = _metadata(config, config.deploy.job_name, "ray-cluster")
    metadata["annotations"] = {ESTIMATE_ANNOTATION: estimate.summary()}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": metadata,
        "spec": _ray_cluster_spec(config, estimate),
    }


def render_submit_script(config: RunConfig) -> str:
    """Render a bash script that submits the entrypoint to the RayCluster."""
    deploy = config.deploy
    namespace = shlex.quote(deploy.namespace)
    cluster = shlex.quote(deploy.job_name)
    service = shlex.quote(f"{deploy.job_name}-head-svc")
    dashboard = RAY_HEAD_PORTS["dashboard"]
    entrypoint = shlex.join(entrypoint_command(config))
    return f"""#!/usr/bin/env bash
# Submit a kd-dagfm run to the long-lived RayCluster {deploy.job_name} in namespace
# {deploy.namespace} (apply raycluster.yaml first). Needs kubectl and Ray
# {RAY_VERSION} on this machine. Extra arguments go to the entrypoint, after the
# config file, for example: {SUBMIT_SCRIPT} --epochs 5
# Rendered by kd-dagfm render-k8s.
set -euo pipefail

kubectl -n {namespace} wait raycluster/{cluster} \\
    --for=jsonpath='{{.status.state}}'=ready --timeout=15m
kubectl -n {namespace} port-forward service/{service} {dashboard}:{dashboard} >/dev/null &
forward=$!
trap 'kill "$forward"' EXIT

address=http://127.0.0.1:{dashboard}
for _ in $(seq 30); do
    ray job list --address "$address" >/dev/null 2>&1 && break
    sleep 1
done

# Resubmitting after a failure resumes from the newest complete checkpoint in
# output_dir, because the config (and so output_dir) is the same.
ray job submit --address "$address" \\
    --submission-id "{deploy.job_name}-$(date +%Y%m%d-%H%M%S)" \\
    -- {entrypoint} "$@"
"""


def render_rank_service(config: RunConfig) -> Manifest:
    """Render the headless Service that gives each indexed-Job pod a DNS name,
    ``<job>-<index>.<service>``. Rank 0's name is MASTER_ADDR."""
    deploy = config.deploy
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(config, _rank_service_name(config), "rank"),
        "spec": {
            "clusterIP": "None",
            # Ranks resolve rank 0 while it starts, before it could be ready.
            "publishNotReadyAddresses": True,
            "selector": _selector_labels(config, "rank"),
            "ports": [
                {
                    "name": "rendezvous",
                    "port": deploy.rendezvous_port,
                    "targetPort": deploy.rendezvous_port,
                    "protocol": "TCP",
                }
            ],
        },
    }


def render_indexed_job(config: RunConfig, estimate: MemoryEstimate) -> Manifest:
    """Render a ``batch/v1`` Job in Indexed mode, where pod ``i`` is rank ``i``.

    A lost rank makes every other rank fail at its next collective, so one
    failure costs up to ``num_workers`` retries: ``backoffLimit`` is
    ``backoff_limit x num_workers``. Pods removed by a disruption (node loss,
    drain, preemption) do not count, and exit code 2 (an invalid config, data
    or checkpoint) fails the Job at once. Every replacement pod reruns the
    command and resumes from the newest complete checkpoint.
    """
    deploy = config.deploy
    workers = config.distributed.num_workers
    service = _rank_service_name(config)
    env: list[dict[str, Any]] = [
        {
            "name": "RANK",
            "valueFrom": {
                "fieldRef": {
                    "fieldPath": (
                        "metadata.annotations"
                        "['batch.kubernetes.io/job-completion-index']"
                    )
                }
            },
        },
        {"name": "WORLD_SIZE", "value": str(workers)},
        {"name": "MASTER_ADDR", "value": f"{deploy.job_name}-0.{service}"},
        {"name": "MASTER_PORT", "value": str(deploy.rendezvous_port)},
        {"name": "LOCAL_RANK", "value": "0"},
        {"name": "LOCAL_WORLD_SIZE", "value": "1"},
    ]
    container = _container(
        config,
        name="trainer",
        resources=_worker_resources(config, estimate.rank_bytes),
        extra_env=env,
        threads=config.distributed.cpus_per_worker,
        command=launch_command(config),
    )
    container["ports"] = [
        {
            "name": "rendezvous",
            "containerPort": deploy.rendezvous_port,
            "protocol": "TCP",
        }
    ]
    pod_spec = _pod_spec(config, [container], shm_gib=SHM_EXTRA_GIB)
    pod_spec["restartPolicy"] = "Never"
    pod_spec["subdomain"] = service

    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": workers,
        "parallelism": workers,
        "backoffLimit": deploy.backoff_limit * workers,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": "trainer",
                        "operator": "In",
                        "values": [CONFIG_ERROR_EXIT_CODE],
                    },
                },
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
        "ttlSecondsAfterFinished": deploy.ttl_after_finished_s,
        "template": {
            "metadata": {"labels": _labels(config, "rank")},
            "spec": pod_spec,
        },
    }
    if deploy.active_deadline_s:
        spec["activeDeadlineSeconds"] = deploy.active_deadline_s
    metadata = _metadata(config, deploy.job_name, "rank")
    metadata["annotations"] = {ESTIMATE_ANNOTATION: estimate.summary()}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the ConfigMap's run.yaml) as ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def to_yaml(documents: list[Manifest]) -> str:
    """Serialise documents as one multi-document YAML file."""
    header = "# Rendered by kd-dagfm render-k8s; edit the run config, not this file.\n"
    body = yaml.dump_all(
        documents, Dumper=_BlockDumper, sort_keys=False, explicit_start=True
    )
    return header + body


def _ray_cluster_spec(config: RunConfig, estimate: MemoryEstimate) -> dict[str, Any]:
    """Build the cluster spec: a head with ``num-cpus`` 0 (no training) and one
    worker pod per Ray Train worker.

    Each worker pod offers exactly ``cpus_per_worker`` CPUs and
    ``gpus_per_worker`` GPUs to Ray, so Ray Train places one worker per pod.
    Ray Train V2's controller asks for no CPU, so it fits on the head.
    """
    distributed = config.distributed
    deploy = config.deploy
    object_store = str(int(deploy.object_store_gib * 1024**3))
    head_memory = quantity(head_memory_bytes(config))
    head = _container(
        config,
        name="ray-head",
        resources={
            "requests": {"cpu": str(deploy.head_cpus), "memory": head_memory},
            "limits": {"memory": head_memory},
        },
        extra_env=[],
        threads=1,
    )
    head["ports"] = [
        {"name": name, "containerPort": port, "protocol": "TCP"}
        for name, port in RAY_HEAD_PORTS.items()
    ]
    worker = _container(
        config,
        name="ray-worker",
        resources=_worker_resources(config, estimate.ray_worker_bytes),
        extra_env=[],
        threads=distributed.cpus_per_worker,
    )
    shm_gib = deploy.object_store_gib + SHM_EXTRA_GIB
    worker_start = {
        "num-cpus": str(distributed.cpus_per_worker),
        "num-gpus": str(distributed.gpus_per_worker),
        "object-store-memory": object_store,
    }
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": {
                "num-cpus": "0",
                "dashboard-host": "0.0.0.0",
                "object-store-memory": object_store,
            },
            "template": {
                "metadata": {"labels": _labels(config, "ray-head")},
                "spec": _pod_spec(config, [head], shm_gib=shm_gib),
            },
        },
        "workerGroupSpecs": [
            {
                "groupName": "workers",
                "replicas": distributed.num_workers,
                "minReplicas": distributed.num_workers,
                "maxReplicas": distributed.num_workers,
                "rayStartParams": worker_start,
                "template": {
                    "metadata": {"labels": _labels(config, "ray-worker")},
                    "spec": _pod_spec(config, [worker], shm_gib=shm_gib),
                },
            }
        ],
    }


def _worker_resources(config: RunConfig, memory_bytes: int) -> dict[str, Any]:
    """Build CPU and memory requests, a memory limit equal to the request, and
    the GPUs. Past the limit the kernel kills this pod, not its neighbours.

    There is no CPU limit: it would throttle the rank without protecting
    anything the request does not already reserve.
    """
    distributed = config.distributed
    memory = quantity(memory_bytes)
    limits: dict[str, str] = {"memory": memory}
    if distributed.gpus_per_worker:
        limits[config.deploy.gpu_resource] = str(distributed.gpus_per_worker)
    return {
        "requests": {"cpu": str(distributed.cpus_per_worker), "memory": memory},
        "limits": limits,
    }


def _container(
    config: RunConfig,
    name: str,
    resources: dict[str, Any],
    extra_env: list[dict[str, Any]],
    threads: int,
    command: list[str] | None = None,
) -> dict[str, Any]:
    deploy = config.deploy
    env: list[dict[str, Any]] = [
        {"name": "OMP_NUM_THREADS", "value": str(threads)},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        *_s3_env(config),
        *extra_env,
    ]
    container: dict[str, Any] = {
        "name": name,
        "image": deploy.image,
        "imagePullPolicy": deploy.image_pull_policy,
    }
    if command is not None:
        container["command"] = command
    return {
        **container,
        "env": env,
        "resources": resources,
        "volumeMounts": [
            {"name": "run-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def _s3_env(config: RunConfig) -> list[dict[str, Any]]:
    """Return AWS credential variables that reference the Secret, never values.

    The two keys s3fs needs are required, so a missing key stops the pod with
    CreateContainerConfigError. The session token, region and endpoint are
    optional.
    """
    secret = config.deploy.s3_secret
    if secret is None:
        return []
    return [
        {
            "name": key,
            "valueFrom": {
                "secretKeyRef": {"name": secret, "key": key, "optional": optional}
            },
        }
        for keys, optional in ((S3_REQUIRED_KEYS, False), (S3_OPTIONAL_KEYS, True))
        for key in keys
    ]


def _pod_spec(
    config: RunConfig, containers: list[dict[str, Any]], shm_gib: float
) -> dict[str, Any]:
    deploy = config.deploy
    spec: dict[str, Any] = {
        "containers": containers,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {"name": "run-config", "configMap": {"name": _config_map_name(config)}},
            {
                # Ray's object store and gloo/NCCL use /dev/shm; a container's
                # default of 64 MiB is too small for either.
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib:g}Gi"},
            },
        ],
    }
    node_selector = parse_node_selector(deploy.node_selector)
    if node_selector:
        spec["nodeSelector"] = node_selector
    tolerations = parse_tolerations(deploy.tolerations)
    if tolerations:
        spec["tolerations"] = tolerations
    if deploy.service_account:
        spec["serviceAccountName"] = deploy.service_account
    if deploy.image_pull_secret:
        spec["imagePullSecrets"] = [{"name": deploy.image_pull_secret}]
    return spec


def _labels(config: RunConfig, component: str) -> dict[str, str]:
    return {
        **_selector_labels(config, component),
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _selector_labels(config: RunConfig, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kd-dagfm",
        "app.kubernetes.io/instance": config.deploy.job_name,
        "app.kubernetes.io/component": component,
    }


def _metadata(config: RunConfig, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": config.deploy.namespace,
        "labels": _labels(config, component),
    }


def _config_map_name(config: RunConfig) -> str:
    return f"{config.deploy.job_name}-config"


def _rank_service_name(config: RunConfig) -> str:
    return f"{config.deploy.job_name}-ranks"


def _log_estimate(config: RunConfig, estimate: MemoryEstimate) -> None:
    logger.debug("worker memory estimate: %s", estimate.summary())
    image = config.deploy.image
    if config.distributed.gpus_per_worker and "cpu" in image.rsplit(":", 1)[-1]:
        logger.warning(
            "gpus_per_worker=%d but image %s is tagged as a CPU build; build "
            "docker/Dockerfile.gpu and pass its tag with --image",
            config.distributed.gpus_per_worker,
            image,
        )
