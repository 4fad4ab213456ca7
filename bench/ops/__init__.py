"""One module per op family, each exposing `OPS` (the op names it benchmarks) and
`cases(op, quick, dtypes) -> list[harness.Case]`; optionally `MEMORY` ({op: providers}), the ops
whose fwd+bwd peak memory run_all measures too (`harness.peak_memory_records`)."""

from bench.ops import bench_attention, bench_cross_entropy, bench_rms_norm, bench_rotary, bench_swiglu

FAMILIES = (bench_rms_norm, bench_rotary, bench_swiglu, bench_cross_entropy, bench_attention)
OP_MODULES = {op: module for module in FAMILIES for op in module.OPS}
ALL_OPS = tuple(OP_MODULES)
