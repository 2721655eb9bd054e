"""Results and the comparison report: long-form CSV -> Markdown tables + PNG plots (Flower-free)."""

from .build import build_report
from .results import (
    COLUMNS,
    MEAN_OF_SITES,
    OWN_SITE,
    POOLED,
    RESULTS_VERSION,
    append_results,
    config_hash,
    finished_runs,
    make_row,
    predictions_path,
    read_results,
)
from .scores import Bootstrap, concat_predictions, macro_auroc, score_rows, site_scores

__all__ = [
    "COLUMNS", "MEAN_OF_SITES", "OWN_SITE", "POOLED", "RESULTS_VERSION", "Bootstrap", "append_results",
    "build_report", "concat_predictions", "config_hash", "finished_runs", "macro_auroc", "make_row",
    "predictions_path", "read_results", "score_rows", "site_scores",
]
