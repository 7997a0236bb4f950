"""Evaluations: the metrics recorded for a version's tasks (what the gate reads)."""

from __future__ import annotations

from sqlalchemy import select

from storage.registry.connection import RegistryCore
from storage.registry.models import Evaluation
from storage.registry.records import EvaluationRecord
from storage.registry.rows import bundle_row, check_finite, evaluation_record, inserted, version_row


class EvaluationsMixin(RegistryCore):
    """`Registry` methods for evaluations."""

    def add_evaluation(
        self,
        bundle: str,
        version: int,
        task_name: str,
        metric: str,
        value: float,
        reference: float | None = None,
        normalized: float | None = None,
    ) -> EvaluationRecord:
        checked = check_finite("value", value)
        assert checked is not None
        reference = check_finite("reference", reference)
        normalized = check_finite("normalized", normalized)
        with self._tx(write=True) as s:
            v = version_row(s, bundle_row(s, bundle), version)
            row = inserted(
                s,
                Evaluation(
                    version_id=v.id,
                    task_name=task_name,
                    metric=metric,
                    value=checked,
                    reference=reference,
                    normalized=normalized,
                ),
            )
            return evaluation_record(row, bundle, version)

    def evaluations(self, bundle: str, version: int) -> list[EvaluationRecord]:
        with self._tx() as s:
            v = version_row(s, bundle_row(s, bundle), version)
            rows = s.scalars(
                select(Evaluation).where(Evaluation.version_id == v.id).order_by(Evaluation.id)
            )
            return [evaluation_record(r, bundle, version) for r in rows]
