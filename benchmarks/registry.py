"""Every suite the runner knows, by name, imported only when asked for.

Lazy: ``python -m benchmarks report`` must not import torch and transformers for suites
whose results it does not render, and ``list`` must work without the ``bench`` extra.
"""

from __future__ import annotations

import importlib

from benchmarks.suite import Suite

SUITES: dict[str, str] = {
    "cost": "benchmarks.cost_suite:CostSuite",
    "cost_maps": "benchmarks.cost_maps:CostMapsSuite",
    "runtime": "benchmarks.runtime_suite:RuntimeSuite",
    "first_run": "benchmarks.first_run:FirstRunSuite",
    "s3_throughput": "benchmarks.s3_throughput:S3ThroughputSuite",
    "validation_cost": "benchmarks.validation_cost:ValidationCostSuite",
    "quality": "benchmarks.quality_suite:QualitySuite",
    "quality_storage": "benchmarks.quality_storage_suite:QualityStorageSuite",
    "quality_maps": "benchmarks.quality_maps_suite:QualityMapsSuite",
    "minilm_models": "benchmarks.minilm_models:MiniLMModelsSuite",
    "minilm_conformance": "benchmarks.conformance_minilm:MiniLMConformanceSuite",
}


def get(name: str) -> Suite:
    """The suite called ``name``; a clear error naming the known ones otherwise."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(sorted(SUITES))}")
    module, _, cls = SUITES[name].partition(":")
    suite = getattr(importlib.import_module(module), cls)()
    assert isinstance(suite, Suite), name
    return suite
