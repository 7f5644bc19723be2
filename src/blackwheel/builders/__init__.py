"""builders: how a package's own build runs (pip-wheel, flashinfer-aot, vllm), behind one interface."""
