"""Device kernels shipped inside the package (so a wheel carries them): `triton/` for CUDA GPUs,
written to the Triton 3.2 language subset that triton-ascend also compiles. Nothing here is
imported until an op dispatches to it (`mmfuse.ops._backend`): importing mmfuse never imports triton."""
