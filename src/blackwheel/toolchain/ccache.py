"""A compiler cache for builds: sccache in front of nvcc and the host compiler.

One setting, ``BLACKWHEEL_CACHE_URL``, picks the store:

- unset or ``file:///path`` or a plain path: local disk (default ``~/.cache/blackwheel/sccache``);
- ``redis://host:port/db`` (``rediss://`` for TLS): a Redis every builder shares;
- ``s3://bucket/prefix?endpoint=http://host:9000&region=us-east-1``: S3 or an S3-compatible store
  (credentials come from the usual AWS_* variables, never from the URL);
- ``off``: no cache.

How builds reach sccache (read from torch 2.14.1's cpp_extension and vLLM's setup.py):
- torch cpp_extension (flash-attn): ``PYTORCH_NVCC`` is used verbatim as the ``nvcc`` of
  build.ninja; the host compiler is ``CXX`` (default ``c++``), which torch itself prefixes
  with ``ccache`` or ``sccache`` when one is on PATH (``TORCH_NO_COMPILER_WRAPPER`` stops it;
  ccache wins when both are present). So the sccache folder goes first on PATH.
- CMake (vLLM): ``CMAKE_{C,CXX,CUDA}_COMPILER_LAUNCHER``; vLLM also adds sccache when on PATH.

sccache 0.16 caches nvcc per stage (cudafe++, cicc and ptxas per arch, host compile) and handles
``-gencode`` lists and torch's ``-MD -MF`` depfiles (it rewrites the depfile's target). Measured
across two source folders: with ``SCCACHE_BASEDIRS`` (``source_root`` below) host compiles and
ptxas hit, but cudafe++ and cicc hash the absolute ``--orig_src_file_name`` and miss. So a
rebuild hits fully only when the sources sit at the same path: extract each sdist to a fixed
folder. Adding an arch reuses the kept arches' stages (see ``arch_delta_plan``).

A remote store that stops answering mid-build: sccache 0.16 then waits 30 s for a connection on
every lookup and again on every store (measured: a minute per nvcc stage, so a 14 s build took
280 s). ``StoreWatch`` asks the store every second; once it stops answering, builds call the
compiler directly (the ``sccache`` they call is ``write_launcher``'s script) and the server is
ended, so its waiting clients compile on their own (``SCCACHE_IGNORE_SERVER_IO_ERROR``).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qs, unquote, urlsplit

from ..core.errors import ToolchainError, UsageError
from ..core.targets import parse_arch_list
from ..core.fsutil import atomic_write_text
from ..core.settings import Settings
from .interrupt import descendants, end_processes

CACHE_URL_ENV = "BLACKWHEEL_CACHE_URL"
DEFAULT_DIR = Path("~/.cache/blackwheel/sccache")
KINDS = ("off", "local", "redis", "s3")
# every variable cache_env may set: scrubbed from the base environment first, so a stray
# SCCACHE_REDIS_ENDPOINT from the user's shell cannot redirect a "local" build
OWNED_PREFIXES = ("SCCACHE_",)
OWNED_NAMES = ("PYTORCH_NVCC", "TORCH_NO_COMPILER_WRAPPER", "CMAKE_C_COMPILER_LAUNCHER",
               "CMAKE_CXX_COMPILER_LAUNCHER", "CMAKE_CUDA_COMPILER_LAUNCHER",
               "FLASHINFER_NVCC_LAUNCHER", "FLASHINFER_CXX_LAUNCHER")


@dataclass(frozen=True)
class CacheConfig:
    kind: str = "local"
    directory: Path | None = None  # local
    url: str | None = None  # redis endpoint without the db path
    db: int = 0  # redis
    bucket: str | None = None  # s3
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown cache kind {self.kind!r}: expected one of {', '.join(KINDS)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "CacheConfig":
        return cls.from_url(Settings.from_env(environ).cache_url or "")

    @classmethod
    def from_url(cls, text: str) -> "CacheConfig":
        """Parse a ``BLACKWHEEL_CACHE_URL`` value (see the module doc for the forms)."""
        text = text.strip()
        if text.lower() in ("off", "none", "0", "false"):
            return cls(kind="off")
        if not text:
            return cls(kind="local", directory=DEFAULT_DIR.expanduser())
        parts = urlsplit(text)
        if parts.scheme in ("", "file"):
            path = Path(unquote(parts.path)).expanduser()
            if not path.is_absolute():
                raise UsageError(f"{CACHE_URL_ENV}: cache folder {text!r} must be an absolute path")
            return cls(kind="local", directory=path)
        if parts.scheme in ("redis", "rediss"):
            return _redis_config(text, parts)
        if parts.scheme == "s3":
            return _s3_config(text, parts)
        raise UsageError(f"{CACHE_URL_ENV}: unsupported cache URL {text!r}: use file://, "
                         f"redis://, rediss://, s3:// or off")

    def describe(self) -> str:
        """For logs: where the cache lives, without credentials."""
        if self.kind == "local":
            return f"local {self.directory}"
        if self.kind == "redis":
            parts = urlsplit(self.url or "")
            return f"redis {parts.hostname}:{parts.port or 6379}/{self.db}"
        if self.kind == "s3":
            return f"s3 {self.bucket}/{self.prefix}" + (f" at {self.endpoint}" if self.endpoint else "")
        return "off"


def _redis_config(text: str, parts) -> CacheConfig:
    if not parts.hostname:
        raise UsageError(f"{CACHE_URL_ENV}: redis URL {text!r} has no host")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise UsageError(f"{CACHE_URL_ENV}: redis database must be a number, got {db_text!r}")
    endpoint = parts._replace(path="", query="").geturl()
    return CacheConfig(kind="redis", url=endpoint, db=int(db_text))


def _s3_config(text: str, parts) -> CacheConfig:
    if not parts.hostname:
        raise UsageError(f"{CACHE_URL_ENV}: s3 URL {text!r} has no bucket")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"endpoint", "region"}
    if unknown:
        raise UsageError(f"{CACHE_URL_ENV}: unknown s3 option(s) {', '.join(sorted(unknown))}: "
                         f"use endpoint= and region=")
    return CacheConfig(kind="s3", bucket=parts.hostname, prefix=parts.path.strip("/"),
                       endpoint=query.get("endpoint"), region=query.get("region"))


def free_port() -> int:
    """A TCP port nobody listens on now: each build gets its own sccache server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store_env(config: CacheConfig) -> dict[str, str]:
    if config.kind == "local":
        return {"SCCACHE_DIR": str(config.directory or DEFAULT_DIR.expanduser())}
    if config.kind == "redis":
        parts = urlsplit(config.url or "")
        env = {"SCCACHE_REDIS_ENDPOINT": parts._replace(netloc=_host_port(parts)).geturl(),
               "SCCACHE_REDIS_DB": str(config.db)}
        if parts.username:
            env["SCCACHE_REDIS_USERNAME"] = unquote(parts.username)
        if parts.password:
            env["SCCACHE_REDIS_PASSWORD"] = unquote(parts.password)
        return env
    env = {"SCCACHE_BUCKET": config.bucket or ""}
    if config.prefix:
        env["SCCACHE_S3_KEY_PREFIX"] = config.prefix
    if config.endpoint:
        env["SCCACHE_ENDPOINT"] = config.endpoint
        env["SCCACHE_S3_USE_SSL"] = "true" if config.endpoint.startswith("https") else "false"
    if config.region:
        env["SCCACHE_REGION"] = config.region
    return env


def _host_port(parts) -> str:
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def cache_env(config: CacheConfig, sccache_bin: str | os.PathLike, nvcc: str | None = None,
              port: int | None = None, source_root: str | os.PathLike | None = None,
              nvcc_prefix: list[str] | None = None, launcher: str | os.PathLike | None = None) -> dict[str, str]:
    """Variables that route a build's compiles through sccache with ``config``'s store.

    ``nvcc_prefix`` goes before sccache in PYTORCH_NVCC (e.g. the memgate launcher); ``launcher``
    (``write_launcher``) is called in sccache's place.
    With kind "off" only ``TORCH_NO_COMPILER_WRAPPER`` is set, so off means off.
    Merge with ``apply_cache_env``: it first drops stray SCCACHE_* variables.
    """
    if config.kind == "off":
        return {"TORCH_NO_COMPILER_WRAPPER": "1"}
    sccache = str(Path(launcher or sccache_bin).resolve())
    env = _store_env(config)
    env["SCCACHE_SERVER_PORT"] = str(port or free_port())
    # longer than any unit (flash-attn's take up to ~10 min); a server a killed build leaks is
    # ended by the next build (``interrupt.end_orphans``)
    env["SCCACHE_IDLE_TIMEOUT"] = "7200"
    env["SCCACHE_IGNORE_SERVER_IO_ERROR"] = "1"   # a server that is gone: its clients compile on their own
    if source_root is not None:
        env["SCCACHE_BASEDIRS"] = str(Path(source_root).resolve())
    nvcc = nvcc or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    env["PYTORCH_NVCC"] = shlex.join([*(nvcc_prefix or []), sccache, nvcc])
    for lang in ("C", "CXX", "CUDA"):
        env[f"CMAKE_{lang}_COMPILER_LAUNCHER"] = sccache
    # FlashInfer's generated build.ninja: "$nvcc_launcher $nvcc ..." and "$cxx_launcher $cxx ..."
    env["FLASHINFER_NVCC_LAUNCHER"] = shlex.join([*(nvcc_prefix or []), sccache])
    env["FLASHINFER_CXX_LAUNCHER"] = sccache
    return env


def apply_cache_env(base: Mapping[str, str], cache: Mapping[str, str],
                    sccache_bin: str | os.PathLike | None = None,
                    launcher: str | os.PathLike | None = None) -> dict[str, str]:
    """``base`` without stray cache settings, plus ``cache``; the launcher's folder, then sccache's,
    first on PATH."""
    env = {k: v for k, v in base.items()
           if not k.startswith(OWNED_PREFIXES) and k not in OWNED_NAMES}
    env.update(cache)
    if sccache_bin is not None and "PYTORCH_NVCC" in cache:
        first = [str(Path(p).resolve().parent) for p in (launcher, sccache_bin) if p is not None]
        env["PATH"] = os.pathsep.join([*first, base.get("PATH", "")])
    return env


def _sccache(sccache_bin: str | os.PathLike, env: Mapping[str, str], *args: str) -> str:
    proc = subprocess.run([str(sccache_bin), *args], env=dict(env), capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise ToolchainError(f"sccache {' '.join(args)} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def server_pids(port: int | str, proc: Path = Path("/proc")) -> list[int]:
    """PIDs of sccache servers started for ``port`` (found by their SCCACHE_SERVER_PORT).

    Needed because a server whose store does not answer (Redis down) fails its start-up check
    without exiting, and no longer listens, so ``--stop-server`` cannot reach it.
    """
    wanted = {b"SCCACHE_START_SERVER=1", f"SCCACHE_SERVER_PORT={port}".encode()}
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            pids.append(int(entry.name))
    return pids


def start_server(sccache_bin: str | os.PathLike, env: Mapping[str, str]) -> None:
    """Start this build's server (with ``env``'s store) and zero its counters.

    Raises ToolchainError when the store is unreachable (sccache checks it at start-up and
    gives up after 10 s); the half-started server is ended first.
    """
    try:
        _sccache(sccache_bin, env, "--start-server")
        _sccache(sccache_bin, env, "--zero-stats")
    except ToolchainError:
        stop_server(sccache_bin, env)
        raise


def server_jobs(port: int | str) -> set[int]:
    """What the servers for ``port`` run: compilers (nvcc, cicc, ptxas, cc1plus...) and their children."""
    return descendants(server_pids(port))


def end_server_jobs(port: int | str) -> list[int]:
    """End the compiles the servers for ``port`` still run (their clients may be gone already).

    An interrupted build's compilers are the server's children, outside the build's session:
    ending the build alone leaves them running. Returns the pids that would not end.
    """
    return end_processes(lambda: server_jobs(port))


def stop_server(sccache_bin: str | os.PathLike, env: Mapping[str, str]) -> None:
    """Stop this build's server, and first the compiles it still runs; returns once it is gone.

    ``--stop-server`` lets a server finish its running compiles first, and a server ended by a
    signal leaves them running: after an interrupted build, cicc went on for minutes. Only
    servers started with this build's own port are touched; one that ignores SIGTERM (a store
    that never answered) gets SIGKILL.
    """
    port = env.get("SCCACHE_SERVER_PORT")
    if port:
        end_server_jobs(port)
    subprocess.run([str(sccache_bin), "--stop-server"], env=dict(env), capture_output=True)
    if port:
        end_processes(lambda: server_pids(port))


def start_with_fallback(config: CacheConfig, sccache_bin: str | os.PathLike, base_env: Mapping[str, str],
                        fallback_dir: Path | None = None,
                        **cache_kw) -> tuple[CacheConfig, dict[str, str], str]:
    """Start ``config``'s server; if its store is down, fall back to local disk, then to off.

    Returns (config in use, full build environment, a one-line note for the log). A shared
    cache being down should slow a build, not fail it.
    """
    tried = []
    for candidate in _fallbacks(config, fallback_dir or DEFAULT_DIR.expanduser()):
        env = apply_cache_env(base_env, cache_env(candidate, sccache_bin, **cache_kw), sccache_bin,
                              cache_kw.get("launcher"))
        if candidate.kind == "off":
            return candidate, env, _note(config, candidate, tried)
        try:
            start_server(sccache_bin, env)
            return candidate, env, _note(config, candidate, tried)
        except ToolchainError as exc:
            tried.append(f"{candidate.describe()}: {exc}")
    raise AssertionError("unreachable: the last fallback is off")


def _fallbacks(config: CacheConfig, local_dir: Path) -> list[CacheConfig]:
    chain = [config]
    if config.kind in ("redis", "s3"):
        chain.append(CacheConfig(kind="local", directory=local_dir))
    if config.kind != "off":
        chain.append(CacheConfig(kind="off"))
    return chain


def _note(wanted: CacheConfig, used: CacheConfig, failures: list[str]) -> str:
    if used == wanted:
        return f"compiler cache: {used.describe()}"
    return f"compiler cache: {used.describe()} ({'; '.join(failures)})"


# ---- a store that stops answering mid-build -------------------------------------------------------
DOWN_FLAG = "store-down"
_LAUNCHER = """#!/bin/sh
# written by blackwheel: sccache, until the build's store stopped answering ({flag} exists);
# then the compiler alone (sccache would wait 30 s on the store for every lookup and every store)
case "$1" in -*) exec {sccache} "$@" ;; esac
[ -e {flag} ] && exec "$@"
exec {sccache} "$@"
"""


def write_launcher(folder: Path, sccache_bin: str | os.PathLike) -> Path:
    """``folder/sccache``: what a build calls in sccache's place (its folder goes first on PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DOWN_FLAG).unlink(missing_ok=True)
    launcher = folder / "sccache"
    atomic_write_text(launcher, _LAUNCHER.format(flag=shlex.quote(str(folder / DOWN_FLAG)),
                                                 sccache=shlex.quote(str(Path(sccache_bin).resolve()))))
    launcher.chmod(0o755)
    return launcher


def store_answers(config: CacheConfig, timeout: float = 2.0) -> bool:
    """Whether a remote store answers now: Redis a PING (any reply; NOAUTH too), rediss and an S3
    endpoint a TCP connection. Local disk, off and S3 without an endpoint are not asked (True)."""
    if config.kind == "redis":
        parts = urlsplit(config.url or "")
        address, probe = (parts.hostname, parts.port or 6379), b"PING\r\n" if parts.scheme == "redis" else b""
    elif config.kind == "s3" and config.endpoint:
        parts = urlsplit(config.endpoint)
        address, probe = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), b""
    else:
        return True
    try:
        with socket.create_connection(address, timeout=timeout) as conn:
            if probe:
                conn.sendall(probe)
                return conn.recv(1) in (b"+", b"-")
            return True
    except OSError:
        return False


def _signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def abandon_servers(port: int | str) -> None:
    """End the servers for ``port`` and the compiles they run, so their clients compile on their own.

    Each server is stopped first (SIGSTOP: it can neither start another job nor report an ended
    one as a failed compile), then killed; its clients see it gone and run their compiler
    themselves (SCCACHE_IGNORE_SERVER_IO_ERROR); then its compiles are ended."""
    servers = server_pids(port)
    _signal_all(servers, signal.SIGSTOP)
    jobs = descendants(servers)
    _signal_all(servers, signal.SIGKILL)
    end_processes(lambda: server_pids(port))
    end_processes(lambda: jobs)


class StoreWatch:
    """Asks a build's remote store every ``every`` s while the build runs. After ``misses``
    unanswered asks in a row: the launcher's flag is set (new compiles skip sccache), and after
    ``settle`` s (a compile that read the flag just before reaches the server) the server is
    abandoned (``abandon_servers``). ``fell_back`` then says what happened, in one line."""

    def __init__(self, config: CacheConfig, env: Mapping[str, str], flag: Path, every: float = 1.0,
                 misses: int = 3, settle: float = 2.0):
        self.config, self.port, self.flag = config, env["SCCACHE_SERVER_PORT"], flag
        self.every, self.misses, self.settle = every, misses, settle
        self.fell_back: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-watch", daemon=True)

    def start(self) -> "StoreWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:   # started
            self._thread.join()

    def _run(self) -> None:
        started, missed = time.monotonic(), 0
        while missed < self.misses:
            if self._stop.wait(self.every):
                return
            missed = 0 if store_answers(self.config) else missed + 1
        atomic_write_text(self.flag, "down\n")
        self.fell_back = (f"{self.config.describe()} stopped answering (seen {time.monotonic() - started:.0f} s "
                          f"after the build's server started): the rest compiles uncached")
        print(f"compiler cache: {self.fell_back}", file=sys.stderr)
        if not self._stop.wait(self.settle):
            abandon_servers(self.port)


def zero_stats(sccache_bin: str | os.PathLike, env: Mapping[str, str]) -> None:
    _sccache(sccache_bin, env, "--zero-stats")


def parse_stats(text: str) -> dict:
    """Summarise ``--show-stats --stats-format json``.

    nvcc counts once per stage (cudafe++, cicc and ptxas per arch, host compile), so one .cu
    with two arches gives 6 hits or misses; ``requests`` counts compiler invocations.
    """
    data = json.loads(text)
    stats = data["stats"]
    hits = stats["cache_hits"]["counts"]
    misses = stats["cache_misses"]["counts"]
    return {
        "hits": sum(hits.values()),
        "misses": sum(misses.values()),
        "requests": stats["compile_requests"],
        "not_cacheable": stats["requests_not_cacheable"] + stats["non_cacheable_compilations"],
        "errors": sum(stats["cache_errors"]["counts"].values()) + stats["cache_read_errors"]
        + stats["cache_write_errors"],
        "hits_by_stage": stats["cache_hits"].get("adv_counts", {}),
        "misses_by_stage": stats["cache_misses"].get("adv_counts", {}),
        "location": data.get("cache_location"),
        "version": data.get("version"),
    }


def stats(sccache_bin: str | os.PathLike, env: Mapping[str, str]) -> dict:
    return parse_stats(_sccache(sccache_bin, env, "--show-stats", "--stats-format", "json"))


BUILDERS = ("torch-ext", "cmake")


def arch_delta_plan(old_archs, new_archs, builder: str) -> str:
    """What a rebuild for ``new_archs`` after a build for ``old_archs`` recompiles, and why.

    Measured with sccache 0.16 and nvcc 13.0 (tests/test_ccache.py): sccache caches nvcc per
    stage, and the cicc and ptxas stages of one arch do not depend on the other -gencode
    entries. So although every nvcc command line changes (ninja re-runs every edge and the
    whole-command key misses), each unit only recompiles the added arches' device code and
    its host pass; the kept arches come back from the cache.
    """
    if builder not in BUILDERS:
        raise UsageError(f"unknown builder {builder!r}: expected one of {', '.join(BUILDERS)}")
    old, new = parse_arch_list(old_archs), parse_arch_list(new_archs)
    added = [a for a in new if a not in old]
    kept = [a for a in new if a in old]
    dropped = [a for a in old if a not in new]
    names = lambda archs: ", ".join(a.sm for a in archs) or "none"  # noqa: E731
    lines = [f"arch change: add {names(added)}; keep {names(kept)}; drop {names(dropped)}."]
    lines.append(
        "Recompiling only the new arch is not possible at the build-system level: the arch list "
        "is in every nvcc command line (" + ("torch's build.ninja" if builder == "torch-ext"
                                             else "CMake's CUDA flags") + "), so ninja reruns "
        "every unit and no build folder can be patched in place.")
    lines.append(
        "What is possible, with the same source path and sccache: per unit, cicc+ptxas for "
        f"{names(added)} and the host pass compile; cicc+ptxas for {names(kept)} are cache hits "
        "(sccache 0.16 caches nvcc stage by stage). Expect roughly host pass + "
        f"{len(added)}/{max(1, len(new))} of the device time of a cold build.")
    if not added:
        lines.append("Nothing new to compile: only host passes and the link rerun.")
    lines.append(
        "Not worth it: a separate fatbin for the delta. Torch extensions and vLLM's libraries "
        "embed one fatbin per object, registered by host code at load time; merging a second "
        "one needs relinking every object, which is the rebuild above.")
    return "\n".join(lines)
