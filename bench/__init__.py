"""CPU benchmarks of mmfuse's fused ops against their baselines; `python bench/run_all.py --help`."""
