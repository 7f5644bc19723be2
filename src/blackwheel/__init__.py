"""blackwheel: source builds of vLLM, FlashInfer and flash-attention for NVIDIA Blackwell.

The stages are packages, each importing only those below it (``docs/ARCHITECTURE.md``; the
contract is ``[tool.importlinter]`` in pyproject.toml): core, sources, toolchain, check,
builders, release, pipeline, reports, cli.
"""
