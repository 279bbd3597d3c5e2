"""``kd-dagfm render-k8s``: render, optionally validate, and report next steps."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cluster.k8s.render import SUBMIT_SCRIPT, render
from kd_dagfm.config import RunConfig
from kd_dagfm.errors import KDDAGFMError, SchemaError
from kd_dagfm.schema import FeatureSchema

logger = logging.getLogger(__name__)


def render_k8s(
    config: RunConfig,
    out_dir: str,
    schema_path: str | None = None,
    validate: bool = False,
    crd_paths: Sequence[str] = (),
) -> str:
    """Write the manifests of ``config`` under ``out_dir`` and return a report.

    Raises:
        KDDAGFMError: on a config that cannot run on Kubernetes, an unreadable
            schema, or (with ``validate``) an invalid manifest.
    """
    schema = resolve_schema(config, schema_path)
    rendered = render(config, schema)
    paths = rendered.write(out_dir)
    lines = [f"wrote {path}" for path in paths]
    lines.append(f"worker memory estimate: {rendered.estimate.summary()}")

    if validate or crd_paths:
        from cluster.k8s.validate import KUBERNETES_VERSIONS, validate_files

        yaml_paths = [p for p in paths if p.suffix == ".yaml"]
        checked = validate_files(yaml_paths)
        versions = " and ".join(KUBERNETES_VERSIONS)
        lines.append(
            f"validated {checked} manifests against Kubernetes {versions} "
            "and the vendored KubeRay ray.io/v1 schema"
        )
        for crd_path in crd_paths:
            lines.append(_validate_against_crd(yaml_paths, crd_path))

    namespace = config.deploy.namespace
    out = Path(out_dir)
    lines += [
        "next:",
        f"  kubectl -n {namespace} apply -f {out / 'rayjob.yaml'}   # KubeRay",
        f"  kubectl -n {namespace} apply -f {out / 'indexed-job.yaml'}   # no KubeRay",
        f"  kubectl -n {namespace} apply -f {out / 'raycluster.yaml'} && "
        f"{out / SUBMIT_SCRIPT}   # long-lived cluster",
    ]
    return "\n".join(lines)


def resolve_schema(config: RunConfig, schema_path: str | None) -> FeatureSchema:
    """Load the feature schema that sizes the pods: ``schema_path``, the
    synthetic generator's, or the dataset's own ``schema.json``."""
    if schema_path is not None:
        from kd_dagfm.storage import filesystem

        fs, path = filesystem(schema_path)
        try:
            with fs.open(path, "r") as f:
                return FeatureSchema.from_json(f.read(), source=schema_path)
        except FileNotFoundError:
            raise SchemaError(f"schema file {schema_path!r} not found") from None

    data = config.data
    if data.dataset == "synthetic":
        from kd_dagfm.data.synthetic import synthetic_schema

        return synthetic_schema(data.synthetic_fields, data.synthetic_vocab_size)

    from kd_dagfm.data.reader import load_schema

    try:
        return load_schema(data.dataset)
    except (OSError, ValueError) as e:
        if isinstance(e, SchemaError):
            raise
        raise SchemaError(
            f"cannot read schema.json of dataset {data.dataset!r} from this "
            f"machine ({type(e).__name__}: {e}). Copy it here and pass "
            "--schema PATH, or set the S3 credentials in the environment"
        ) from None


def _validate_against_crd(yaml_paths: Sequence[Path], crd_path: str) -> str:
    from cluster.k8s.validate import crd_errors

    with open(crd_path, encoding="utf-8") as f:
        crd: dict[str, Any] = yaml.safe_load(f)
    kind = crd.get("spec", {}).get("names", {}).get("kind")
    checked = 0
    for path in yaml_paths:
        with open(path, encoding="utf-8") as f:
            documents = [d for d in yaml.safe_load_all(f) if d]
        for document in documents:
            if document.get("kind") != kind:
                continue
            errors = crd_errors(document, crd)
            if errors:
                raise KDDAGFMError(
                    f"{path}: {kind} is invalid under the CRD in {crd_path}:"
                    + "".join(f"\n  - {e}" for e in errors[:10])
                )
            checked += 1
    if not checked:
        raise KDDAGFMError(
            f"{crd_path} defines kind {kind!r}, which no rendered manifest has; "
            "pass the rayjobs.ray.io or rayclusters.ray.io CRD"
        )
    return f"validated {checked} {kind} manifests against the CRD in {crd_path}"
