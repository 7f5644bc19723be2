"""check: what CUDA code a wheel, .so or .o holds (inspect) and whether it runs on a target (verify)."""
