"""`bertscale bench quality`: the paper's claim at small scale, end to end, in one resumable run:
bertscale pretrained vs `transformers` pretrained in the same time vs random init, fine-tuned on
GLUE alike (stages.py; docs/benchmarks.md says what is measured, and its limits)."""

from bertscale.bench.quality.report import markdown
from bertscale.bench.quality.runs import DEFAULT_RECIPE, GLUE_TASKS, MODEL_LABELS, MODELS
from bertscale.bench.quality.stages import QualityConfig, run

__all__ = ["DEFAULT_RECIPE", "GLUE_TASKS", "MODELS", "MODEL_LABELS", "QualityConfig", "markdown",
           "run"]
