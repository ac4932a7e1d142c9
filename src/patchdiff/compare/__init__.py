"""Comparing training configurations at equal compute: a study file, its runs, its results."""

from patchdiff.compare.results import write_results
from patchdiff.compare.study import (
    StudyConfig,
    StudyRun,
    finished_results,
    load_study,
    plan_study,
    run_study,
)

__all__ = [
    "StudyConfig",
    "StudyRun",
    "finished_results",
    "load_study",
    "plan_study",
    "run_study",
    "write_results",
]
