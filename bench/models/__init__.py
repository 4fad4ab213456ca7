"""Whole-model benchmarks: one training step of an mmfuse model against its transformers twin on
the same weights and inputs (`bench_<model>_step.py`)."""
