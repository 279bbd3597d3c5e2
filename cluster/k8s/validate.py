"""Offline validation of rendered manifests: no cluster, no network.

- Core kinds (ConfigMap, Service, Job) go through ``kubernetes-validate`` in
  strict mode, which rejects any field the Kubernetes OpenAPI schema of that
  version does not define.
- KubeRay's RayJob and RayCluster go through the ray.io/v1 schema in
  ``schemas/kuberay-ray.io-v1.json``. It rejects unknown fields too, and its
  pod templates, head Service and other core types refer to the same strict
  Kubernetes definitions, so an embedded pod template is checked as strictly
  as a Job's.
- :func:`crd_validator` builds the same kind of strict validator from a CRD
  that a cluster serves (``kubectl get crd rayjobs.ray.io -o yaml``), to check
  against the KubeRay version actually installed.

Both validators need the dev requirements (``kubernetes-validate``,
``jsonschema``); rendering does not.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kd_dagfm.errors import KDDAGFMError

KUBERNETES_VERSIONS = ("1.31", "1.37")
"""Kubernetes versions every manifest is validated against: 1.31 is the oldest
the manifests target (Pod failure policies and the DisruptionTarget pod
condition are GA there), 1.37 the newest kubernetes-validate 1.37.0 ships."""

KUBERAY_API_VERSION = "ray.io/v1"
KUBERAY_SCHEMA = "kuberay-ray.io-v1.json"
CORE_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
MAX_REPORTED_ERRORS = 10


class ManifestValidationError(KDDAGFMError, ValueError):
    """A manifest that does not match its schema."""


def validate_manifest(manifest: Mapping[str, Any], kubernetes_version: str) -> None:
    """Validate one manifest against the schema of its kind.

    Raises:
        ManifestValidationError: listing each invalid field with its path.
    """
    if manifest.get("apiVersion") == KUBERAY_API_VERSION:
        errors = list(kuberay_errors(manifest, kubernetes_version))
    else:
        errors = list(core_errors(manifest, kubernetes_version))
    if errors:
        raise ManifestValidationError(
            f"{_describe(manifest)} is invalid for Kubernetes {kubernetes_version}:"
            + "".join(f"\n  - {e}" for e in errors[:MAX_REPORTED_ERRORS])
        )


def validate_documents(
    documents: Iterable[Mapping[str, Any]],
    kubernetes_versions: Iterable[str] = KUBERNETES_VERSIONS,
) -> int:
    """Validate every document for every version and return how many were checked."""
    count = 0
    versions = list(kubernetes_versions)
    for document in documents:
        for version in versions:
            validate_manifest(document, version)
        count += 1
    return count


def validate_files(
    paths: Iterable[str | Path],
    kubernetes_versions: Iterable[str] = KUBERNETES_VERSIONS,
) -> int:
    """Validate every YAML document in ``paths`` and return how many were checked."""
    versions = list(kubernetes_versions)
    count = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            documents = [d for d in yaml.safe_load_all(f) if d]
        try:
            count += validate_documents(documents, versions)
        except ManifestValidationError as e:
            raise ManifestValidationError(f"{path}: {e}") from None
    return count


def core_errors(manifest: Mapping[str, Any], kubernetes_version: str) -> Iterator[str]:
    """Yield the errors of a core manifest under ``kubernetes-validate --strict``."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(dict(manifest), kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(root)"
        yield f"{path}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        yield (
            f"no Kubernetes {kubernetes_version} schema for kind "
            f"{manifest.get('kind')!r} in {manifest.get('apiVersion')!r}: {e.message}"
        )


def kuberay_errors(
    manifest: Mapping[str, Any], kubernetes_version: str
) -> Iterator[str]:
    """Yield the errors of a RayJob or RayCluster under the vendored schema."""
    kind = manifest.get("kind")
    if kind not in ("RayJob", "RayCluster"):
        yield (
            f"kind {kind!r} is not in the vendored KubeRay schema: expected "
            "RayJob or RayCluster"
        )
        return
    validator = _kuberay_validator(kind, kubernetes_version)
    yield from _format_errors(validator.iter_errors(dict(manifest)))


def crd_validator(crd: Mapping[str, Any], version: str = "v1") -> Any:
    """Build a strict validator from a CustomResourceDefinition.

    The CRD's ``openAPIV3Schema`` gets ``additionalProperties: false`` on every
    object that lists its properties, unless it preserves unknown fields, so a
    misspelt field fails the way the API server's pruning would drop it.

    Raises:
        ManifestValidationError: when ``crd`` has no schema for ``version``.
    """
    import jsonschema

    names = crd.get("spec", {}).get("versions", [])
    for entry in names:
        if entry.get("name") == version:
            schema = entry.get("schema", {}).get("openAPIV3Schema")
            if schema is not None:
                strict = _strict_openapi(copy.deepcopy(schema))
                return jsonschema.Draft202012Validator(strict)
    served = [entry.get("name") for entry in names]
    raise ManifestValidationError(
        f"CRD {crd.get('metadata', {}).get('name')!r} has no openAPIV3Schema for "
        f"version {version!r}; it defines {served}"
    )


def crd_errors(manifest: Mapping[str, Any], crd: Mapping[str, Any]) -> list[str]:
    """Return the errors of ``manifest`` under the strict form of ``crd``'s schema."""
    version = str(manifest.get("apiVersion", "")).rpartition("/")[2]
    validator = crd_validator(crd, version)
    return list(_format_errors(validator.iter_errors(dict(manifest))))


def _strict_openapi(node: Any) -> Any:
    if isinstance(node, dict):
        for key, value in list(node.items()):
            if key in ("properties", "patternProperties", "$defs", "definitions"):
                node[key] = {k: _strict_openapi(v) for k, v in value.items()}
            elif key != "enum" and key != "default" and key != "example":
                node[key] = _strict_openapi(value)
        preserves = node.get("x-kubernetes-preserve-unknown-fields") is True
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not preserves
        ):
            node["additionalProperties"] = False
    elif isinstance(node, list):
        return [_strict_openapi(item) for item in node]
    return node


def _format_errors(errors: Iterable[Any]) -> Iterator[str]:
    for error in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
        leaf = _deepest(error)
        path = ".".join(str(p) for p in leaf.absolute_path) or "(root)"
        yield f"{path}: {leaf.message}"


def _deepest(error: Any) -> Any:
    """Return the most specific cause of an error under ``oneOf`` or ``anyOf``."""
    from jsonschema.exceptions import best_match

    if error.context:
        return _deepest(best_match(error.context))
    return error


@functools.lru_cache(maxsize=8)
def _kuberay_validator(kind: str, kubernetes_version: str) -> Any:
    import jsonschema
    from referencing import Registry, Resource

    schema = json.loads(
        resources.files("cluster.k8s")
        .joinpath("schemas", KUBERAY_SCHEMA)
        .read_text(encoding="utf-8")
    )
    registry: Registry[Any] = Registry().with_resources(
        [
            (schema["$id"], Resource.from_contents(schema)),
            (
                CORE_DEFINITIONS_ID,
                Resource.from_contents(_core_definitions(kubernetes_version)),
            ),
        ]
    )
    root = {"$ref": f"{schema['$id']}#/$defs/{kind}"}
    return jsonschema.Draft202012Validator(root, registry=registry)


def _core_definitions(kubernetes_version: str) -> dict[str, Any]:
    """Load kubernetes-validate's strict definitions for one bundled version."""
    directory = f"v{kubernetes_version}.0-local-strict"
    path = (
        resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / directory
        / "_definitions.json"
    )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestValidationError(
            f"kubernetes-validate has no schemas for Kubernetes {kubernetes_version}: "
            f"use one of {', '.join(KUBERNETES_VERSIONS)} or upgrade it "
            "(pip install -r requirements-dev.txt)"
        ) from None
    definitions: dict[str, Any] = json.loads(text)
    return definitions


def _describe(manifest: Mapping[str, Any]) -> str:
    name = manifest.get("metadata", {}).get("name", "?")
    return f"{manifest.get('kind', '?')}/{name}"
