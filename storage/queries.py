"""Registry queries as a model registry's users expect them (MLflow, the Hub).

Each function returns plain JSON-ready dicts: the CLI prints them as tables or, with
``--json``, as they are. Their keys are a documented, stable contract (README,
"Registry queries"; tests pin them), so scripts can rely on them.

`list_bases` and `list_bundles` answer from the registry and the manifests alone; no
base is downloaded and no tensor is read. `bundle_summary` computes each task's r_t and
data-free lambda from the norms its manifest stores, over the tensors its superposition
shards hold, so it too reads nothing but JSON.
"""

from __future__ import annotations

from typing import Any

from randes.manifest import BundleManifest
from randes.scaling import data_free_scale, relative_interference, resolve_scale
from storage.registry import Registry, VersionRecord


def list_bases(registry: Registry) -> list[dict[str, Any]]:
    """Every registered base model."""
    return [
        {
            "name": b.name,
            "uri": b.uri,
            "sha256": b.sha256,
            "manifest_key": b.manifest_key,
            "created_at": b.created_at.isoformat(),
        }
        for b in registry.list_bases()
    ]


def list_bundles(registry: Registry, manifest_of: Any) -> list[dict[str, Any]]:
    """Every bundle with its base, transform, head, live task count, aliases and size.

    ``manifest_of(version_record)`` loads a version's manifest (the workspace's verified
    read); only heads are read, one manifest per bundle.
    """
    rows = []
    for b in registry.list_bundles():
        head = registry.head(b.name)
        aliases = {a.name: a.version for a in registry.aliases(b.name)}
        sizes = version_sizes(manifest_of(head)) if head is not None else None
        rows.append(
            {
                "name": b.name,
                "base": b.base_name,
                "transform": b.transform,
                "gate_threshold": b.gate_threshold,
                "head_version": head.version if head is not None else None,
                "head_status": head.status if head is not None else None,
                "tasks": len(registry.tasks(b.name)),
                "aliases": dict(sorted(aliases.items())),
                "bytes": sizes["total_bytes"] if sizes is not None else 0,
                "created_at": b.created_at.isoformat(),
            }
        )
    return rows


def version_sizes(manifest: BundleManifest) -> dict[str, int]:
    """Stored bytes of one version by kind (the base not included: bundles share it)."""
    master = sum(s.size for s in manifest.superposition)
    serving = sum(s.size for s in manifest.serving.shards) if manifest.serving else 0
    private = sum(s.size for t in manifest.tasks for s in t.private)
    files = sum(s.size for t in manifest.tasks for s in t.files.values())
    return {
        "master_bytes": master,
        "serving_bytes": serving,
        "private_bytes": private,
        "side_file_bytes": files,
        "total_bytes": master + serving + private + files,
    }


def bundle_summary(
    registry: Registry,
    record: VersionRecord,
    manifest: BundleManifest,
    base_norms: dict[str, float],
) -> dict[str, Any]:
    """One version as `randes bundle show` reports it: tasks with seeds, lambdas, r_t
    and evaluations; sizes of the master and serving copies; status and aliases."""
    names = sorted({t for shard in manifest.superposition for t in shard.tensors})
    norms = {t.name: t.delta_norms for t in manifest.tasks}
    evaluations: dict[str, list[dict[str, Any]]] = {}
    for e in registry.evaluations(record.bundle, record.version):
        evaluations.setdefault(e.task_name, []).append(
            {
                "metric": e.metric,
                "value": e.value,
                "reference": e.reference,
                "normalized": e.normalized,
            }
        )
    tasks = []
    for entry in manifest.tasks:
        r_t = relative_interference(entry.name, norms, base_norms, names)
        free = data_free_scale(entry.name, norms, base_norms, names)
        tasks.append(
            {
                "name": entry.name,
                "seed": entry.seed,
                "added_in_version": entry.added_in_version,
                "source_uri": entry.source_uri,
                "source_sha256": entry.source_sha256,
                "scale_override": entry.scale,
                "lambda": resolve_scale(manifest.transform, entry.scale, free),
                "interference": r_t,
                "private_bytes": sum(s.size for s in entry.private),
                "evaluations": evaluations.get(entry.name, []),
            }
        )
    aliases = sorted(a.name for a in registry.aliases(record.bundle) if a.version == record.version)
    return {
        "bundle": record.bundle,
        "version": record.version,
        "parent_version": record.parent_version,
        "status": record.status,
        "aliases": aliases,
        "created_at": record.created_at.isoformat(),
        "base": {"name": manifest.base.name, "sha256": manifest.base.sha256},
        "transform": manifest.transform.model_dump(mode="json"),
        "serving": manifest.serving.scheme.name if manifest.serving else "master",
        "sizes": version_sizes(manifest),
        "manifest_key": record.manifest_key,
        "manifest_sha256": record.manifest_sha256,
        "tasks": tasks,
    }
