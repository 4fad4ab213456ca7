"""Evaluation on the public multimodal benchmarks (AI2D, ChartQA, DocVQA, MMMU) with their metrics."""

from mmfuse.eval.run import EvalResult, evaluate
from mmfuse.eval.tasks import TASKS, get_task

__all__ = ["EvalResult", "TASKS", "evaluate", "get_task"]
