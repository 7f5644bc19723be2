"""Settings: the environment and the command line read once, into one frozen object.

``Settings.from_env()`` is the only reader of blackwheel's own environment variables for the
stages; the command line (``cli``) then overrides what its options name (``with_options``) and
hands the result to whatever runs. ``ENV_VARS`` is the one table of every ``BLACKWHEEL_*`` variable
(the README prints it; a test checks that nothing in ``src/`` uses one it does not list).

Variables marked "internal" are not settings: blackwheel sets them for the processes it starts
(a compiler launcher, the ninja stand-in, a pytest plugin) and those read them there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

PROJECT_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    meaning: str
    internal: bool = False     # set by blackwheel for a process it starts, not by a user


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("BLACKWHEEL_CACHE", "~/.cache/blackwheel", "source cache (archives by sha256, git stores and trees)"),
    EnvVar("BLACKWHEEL_MIRROR", "unset", "mirror folder or source bundle file read before the network (`--mirror`)"),
    EnvVar("BLACKWHEEL_OFFLINE", "0", "1: read only the cache and the mirror, name what is missing (`--offline`)"),
    EnvVar("BLACKWHEEL_ALLOW_ABSENT", "0", "1: accept git trees whose store lacks some file contents "
           "(`--allow-absent`; recorded in the manifest)"),
    EnvVar("BLACKWHEEL_WHEELHOUSE", "<project>/wheelhouse", "where finished wheels and manifests go (`--wheelhouse`)"),
    EnvVar("BLACKWHEEL_WORKDIR", "<project>/build", "work folders, logs, plans and upstream test runs"),
    EnvVar("BLACKWHEEL_RECIPES", "<project>/recipes", "recipes, stacks, profiles and traces"),
    EnvVar("BLACKWHEEL_PATCHES", "<project>/patches", "the patch series of each package version"),
    EnvVar("BLACKWHEEL_CACHE_URL", "local disk", "compiler cache store: `redis://...`, `s3://bucket/prefix?...`, `off`"),
    EnvVar("BLACKWHEEL_INDEX_USER", "unset", "upload user for `publish --to` (else TWINE_USERNAME, keyring)"),
    EnvVar("BLACKWHEEL_INDEX_PASSWORD", "unset", "upload password for `publish --to` (else TWINE_PASSWORD, keyring)"),
    EnvVar("BLACKWHEEL_RESULTS", "unset", "tests/gpu: the JSON lines file the kernel tests append to (`report --tests`)"),
    EnvVar("BLACKWHEEL_TEST_TORCH", "2.14.1", "nox -s tests / faults: the torch the test venv installs"),
    EnvVar("BLACKWHEEL_FAULT_TRIALS", "3 (nox -s faults: 20)", "tests/faults: trials per injection point"),
    EnvVar("BLACKWHEEL_FAULT_POINTS", "3", "tests/faults: fault points drawn per case"),
    EnvVar("BLACKWHEEL_FAULT_SEED", "1969", "tests/faults: the seed of every case's generator"),
    EnvVar("BLACKWHEEL_FAULTS_OUT", "unset", "tests/faults: where faults.json is written"),
    EnvVar("BLACKWHEEL_ALLOW_JIT", "0", "tests/gpu: 1 lets a kernel test pass through the driver's PTX JIT"),
    EnvVar("BLACKWHEEL_GPU_TESTS_DEVICE", "cuda", "tests/gpu: `cpu` runs the tiny-model test without a GPU"),
    EnvVar("BLACKWHEEL_GPU_RESULTS", "unset", "tests/gpu: where the vLLM end-to-end JSON and logs go"),
    EnvVar("BLACKWHEEL_VLLM_E2E_EAGER", "0", "tests/gpu: 1 runs vLLM end-to-end with enforce_eager"),
    EnvVar("BLACKWHEEL_VLLM_E2E_TIMEOUT", "600", "tests/gpu: seconds for one vLLM end-to-end backend run"),
    EnvVar("BLACKWHEEL_VLLM_E2E_HEAD_DIM", "64", "tests/gpu: the tiny model's head dim (64 or 128)"),
    EnvVar("BLACKWHEEL_VLLM_E2E_KV_CACHE_DTYPE", "auto", "tests/gpu: vLLM's KV cache dtype in the end-to-end test (auto or fp8)"),
    EnvVar("BLACKWHEEL_OWNER", "", "marks a build's processes so the next build ends what a killed one left", True),
    EnvVar("BLACKWHEEL_JOBSERVER", "", "the shared jobserver every ninja of a build-all joins", True),
    EnvVar("BLACKWHEEL_MEMGATE_MIN_BYTES", "", "memory gate: free memory a compile waits for", True),
    EnvVar("BLACKWHEEL_MEMGATE_MAX_WAIT_S", "1800", "memory gate: longest wait before compiling anyway", True),
    EnvVar("BLACKWHEEL_NINJA_TIMES", "", "ninja stand-in: recorded unit times (longest first)", True),
    EnvVar("BLACKWHEEL_NINJA_LOG_DIR", "", "ninja stand-in: where each run's .ninja_log is kept", True),
    EnvVar("BLACKWHEEL_NINJA_ONLY", "", "ninja stand-in: build only these units (bench-build)", True),
    EnvVar("BLACKWHEEL_NINJA_NVCC_FLAGS", "", "ninja stand-in: extra nvcc flags for some units (recipe [split-compile], bench-build --split-compile)", True),
    EnvVar("BLACKWHEEL_REAL_NINJA", "", "ninja stand-in: the ninja it runs", True),
    EnvVar("BLACKWHEEL_PLAN_OUT", "", "plan: where the generated build file is kept", True),
    EnvVar("BLACKWHEEL_COVERAGE", "", "test-upstream plugin: the kernel set's declared coverage", True),
    EnvVar("BLACKWHEEL_COVERAGE_REPORT", "", "test-upstream plugin: where deselection counts go", True),
    EnvVar("BLACKWHEEL_TRACE", "", "test-upstream plugin and the vLLM end-to-end worker: the method every module load goes through", True),
    EnvVar("BLACKWHEEL_TRACE_OUT", "", "test-upstream plugin: where the trace goes", True),
    EnvVar("BLACKWHEEL_TEST_DEADLINE", "", "test-upstream plugin: when tests stop starting (--deadline-s)", True),
    EnvVar("BLACKWHEEL_NOT_RUN_OUT", "", "test-upstream plugin: file naming the tests the deadline left", True),
    EnvVar("BLACKWHEEL_ONLY_IDS", "", "test-upstream plugin: file of the only tests to run (--rest-of)", True),
    EnvVar("BLACKWHEEL_VANISHED_OUT", "", "test-upstream plugin: file naming the listed tests no longer collected (--rest-of)", True),
    EnvVar("BLACKWHEEL_UNCOLLECTED_OUT", "", "test-upstream plugin: file naming the listed tests whose file did not import (--rest-of)", True),
)


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "") not in ("", "0")


def _path(environ: Mapping[str, str], name: str, default: Path) -> Path:
    return Path(environ.get(name) or default)


@dataclass(frozen=True)
class Settings:
    """Where things are and how sources may be had; everything a stage would otherwise read
    from the environment itself."""

    recipes: Path
    patches: Path
    cache: Path
    wheelhouse: Path
    workdir: Path
    mirror: Path | None = None
    offline: bool = False
    allow_absent: bool = False
    cache_url: str | None = None      # compiler cache store (toolchain.ccache.CacheConfig)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        mirror = env.get("BLACKWHEEL_MIRROR")
        return cls(
            recipes=_path(env, "BLACKWHEEL_RECIPES", PROJECT_ROOT / "recipes"),
            patches=_path(env, "BLACKWHEEL_PATCHES", PROJECT_ROOT / "patches"),
            cache=_path(env, "BLACKWHEEL_CACHE", Path.home() / ".cache" / "blackwheel"),
            wheelhouse=_path(env, "BLACKWHEEL_WHEELHOUSE", PROJECT_ROOT / "wheelhouse"),
            workdir=_path(env, "BLACKWHEEL_WORKDIR", PROJECT_ROOT / "build"),
            mirror=Path(mirror) if mirror else None,
            offline=_flag(env, "BLACKWHEEL_OFFLINE"),
            allow_absent=_flag(env, "BLACKWHEEL_ALLOW_ABSENT"),
            cache_url=env.get("BLACKWHEEL_CACHE_URL") or None,
        )

    def with_options(self, **options) -> "Settings":
        """The command line over the environment: an option left unset (None) keeps the setting."""
        given = {k: (Path(v) if k in ("mirror", "wheelhouse") else v) for k, v in options.items() if v is not None}
        return replace(self, **given)


def env_table() -> str:
    """The Markdown table of ``ENV_VARS`` (README.md holds a copy; a test keeps them equal)."""
    rows = ["| variable | default | what it sets |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {v.default or '-'} | {'(internal) ' if v.internal else ''}{v.meaning} |"
             for v in ENV_VARS]
    return "\n".join(rows)
