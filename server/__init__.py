"""The inference server: a model repository served over KServe v2 gRPC with Triton's extensions (no torch)."""
