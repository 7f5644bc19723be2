"""sccache config, environment, and real cached nvcc compiles (local disk and Redis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.redisserver import start_redis

from blackwheel.toolchain import ccache

from blackwheel.toolchain import memgate
from blackwheel.toolchain import ninja as nj
from blackwheel.toolchain.ccache import CacheConfig
from blackwheel.core.errors import UsageError

SCCACHE = Path(sys.executable).with_name("sccache")
NVCC = "/usr/local/cuda/bin/nvcc"


@pytest.mark.parametrize("url, kind, check", [
    ("", "local", lambda c: c.directory == Path("~/.cache/blackwheel/sccache").expanduser()),
    ("off", "off", lambda c: True),
    ("file:///var/cache/bw", "local", lambda c: c.directory == Path("/var/cache/bw")),
    ("/srv/cache", "local", lambda c: c.directory == Path("/srv/cache")),
    ("redis://127.0.0.1:6379/3", "redis", lambda c: (c.url, c.db) == ("redis://127.0.0.1:6379", 3)),
    ("rediss://cache.lan", "redis", lambda c: (c.url, c.db) == ("rediss://cache.lan", 0)),
    ("s3://wheels/sccache?endpoint=http://minio:9000&region=eu-1", "s3",
     lambda c: (c.bucket, c.prefix, c.endpoint, c.region)
     == ("wheels", "sccache", "http://minio:9000", "eu-1")),
])
def test_from_url(url, kind, check):
    config = CacheConfig.from_url(url)
    assert config.kind == kind and check(config)


@pytest.mark.parametrize("url, message", [
    ("ftp://x/y", "unsupported cache URL"),
    ("relative/dir", "absolute path"),
    ("redis://127.0.0.1:6379/zero", "must be a number"),
    ("s3://bucket?acl=public", "unknown s3 option"),
    ("redis:///0", "no host"),
])
def test_bad_urls_are_one_line_usage_errors(url, message):
    with pytest.raises(UsageError, match=message) as info:
        CacheConfig.from_url(url)
    assert "\n" not in str(info.value)


def test_from_env_reads_the_variable():
    assert CacheConfig.from_env({ccache.CACHE_URL_ENV: "redis://h:1/2"}).db == 2


def test_redis_env_keeps_credentials_out_of_the_endpoint():
    env = ccache.cache_env(CacheConfig.from_url("redis://user:s%40cret@h:6380/1"), SCCACHE, port=4300)
    assert env["SCCACHE_REDIS_ENDPOINT"] == "redis://h:6380"
    assert (env["SCCACHE_REDIS_USERNAME"], env["SCCACHE_REDIS_PASSWORD"]) == ("user", "s@cret")
    assert env["SCCACHE_REDIS_DB"] == "1" and env["SCCACHE_SERVER_PORT"] == "4300"
    assert "s@cret" not in CacheConfig.from_url("redis://user:s%40cret@h:6380/1").describe()


def test_env_routes_nvcc_host_and_cmake_through_sccache(tmp_path):
    env = ccache.cache_env(CacheConfig(kind="local", directory=tmp_path), SCCACHE, nvcc=NVCC,
                           source_root=tmp_path, nvcc_prefix=["python3", "memgate.py", "--"])
    sccache = str(SCCACHE.resolve())
    assert env["PYTORCH_NVCC"].split() == ["python3", "memgate.py", "--", sccache, NVCC]
    assert {env[f"CMAKE_{lang}_COMPILER_LAUNCHER"] for lang in ("C", "CXX", "CUDA")} == {sccache}
    assert env["FLASHINFER_NVCC_LAUNCHER"].split() == ["python3", "memgate.py", "--", sccache]
    assert env["FLASHINFER_CXX_LAUNCHER"] == sccache
    assert env["SCCACHE_DIR"] == str(tmp_path) and "SCCACHE_BUCKET" not in env
    merged = ccache.apply_cache_env({"PATH": "/usr/bin", "SCCACHE_REDIS_ENDPOINT": "redis://stray",
                                     "HOME": "/root"}, env, SCCACHE)
    assert "SCCACHE_REDIS_ENDPOINT" not in merged and merged["HOME"] == "/root"
    assert merged["PATH"].split(os.pathsep)[0] == str(SCCACHE.resolve().parent)


def test_off_means_off():
    env = ccache.cache_env(CacheConfig(kind="off"), SCCACHE)
    assert env == {"TORCH_NO_COMPILER_WRAPPER": "1"}
    merged = ccache.apply_cache_env({"PYTORCH_NVCC": "sccache nvcc", "PATH": "/bin"}, env, SCCACHE)
    assert "PYTORCH_NVCC" not in merged and merged["PATH"] == "/bin"


def test_s3_env():
    env = ccache.cache_env(CacheConfig.from_url("s3://b/p?endpoint=https://s3.lan&region=r"), SCCACHE)
    assert (env["SCCACHE_BUCKET"], env["SCCACHE_S3_KEY_PREFIX"], env["SCCACHE_ENDPOINT"],
            env["SCCACHE_REGION"], env["SCCACHE_S3_USE_SSL"]) == ("b", "p", "https://s3.lan", "r", "true")


# ---- real compiles ---------------------------------------------------------------------------
KERNEL = """\
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// explicit conversions: torch builds with -D__CUDA_NO_HALF_CONVERSIONS__
__device__ float to_f(__half v) { return __half2float(v); }
__device__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ T from_f(float v);
template <> __device__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <typename T, int N>
__global__ void scale(T* x, float s, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  #pragma unroll
  for (int k = 0; k < N; ++k) if (i * N + k < n) x[i * N + k] = from_f<T>(to_f(x[i * N + k]) * s);
}
void run(__half* a, __nv_bfloat16* b, float s, int n) {
  scale<__half, 4><<<(n + 1023) / 1024, 256>>>(a, s, n);
  scale<__nv_bfloat16, 8><<<(n + 2047) / 2048, 256>>>(b, s, n);
}
"""
# the flags torch's cpp_extension gives flash-attn, with the two Blackwell targets
TORCH_LIKE = ["-DTORCH_EXTENSION_NAME=demo", "-D_GLIBCXX_USE_CXX11_ABI=1", "-O3", "-std=c++17",
              "--expt-relaxed-constexpr", "--use_fast_math", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "--compiler-options", "'-fPIC'",
              "-gencode", "arch=compute_120,code=sm_120", "-gencode", "arch=compute_121,code=sm_121"]


@pytest.fixture
def redis_url(redis_proc):
    yield redis_proc[1]


@pytest.fixture
def redis_proc(tmp_path):
    """A real redis-server (no persistence) and its URL; stopped after the test unless already gone."""
    proc, url = start_redis(tmp_path)
    yield proc, url
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


def _compile_twice(config: CacheConfig, tmp_path: Path, flashinfer: bool = False) -> list[tuple[float, dict]]:
    """The same source compiled from two build folders: (seconds, stats) of each.

    ``flashinfer``: the command FlashInfer's generated build.ninja runs (its launcher variable and
    ``--generate-dependencies-with-compile``) instead of torch's."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "kernel.cu").write_text(KERNEL)
    env = ccache.apply_cache_env(os.environ, ccache.cache_env(config, SCCACHE, nvcc=NVCC), SCCACHE)
    ccache.start_server(SCCACHE, env)
    results = []
    try:
        for name in ("build1", "build2"):
            out = tmp_path / name
            out.mkdir()
            ccache.zero_stats(SCCACHE, env)
            cmd = (f"{env['PYTORCH_NVCC']} -MD -MF {out}/kernel.cuda.o.d {' '.join(TORCH_LIKE)} "
                   f"-c {src}/kernel.cu -o {out}/kernel.cuda.o")
            if flashinfer:
                cmd = (f"{env['FLASHINFER_NVCC_LAUNCHER']} {NVCC} --generate-dependencies-with-compile "
                       f"-MF {out}/kernel.cuda.o.d {' '.join(TORCH_LIKE)} -c {src}/kernel.cu -o {out}/kernel.cuda.o")
            start = time.monotonic()
            subprocess.run(cmd, shell=True, env=env, check=True, cwd=out)
            results.append((time.monotonic() - start, ccache.stats(SCCACHE, env)))
    finally:
        ccache.stop_server(SCCACHE, env)
    first, second = (tmp_path / f"build{n}/kernel.cuda.o" for n in (1, 2))
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "build2/kernel.cuda.o.d").read_text().startswith(f"{tmp_path}/build2/kernel.cuda.o")
    return results


def _check_second_is_cached(results: list[tuple[float, dict]], store: str) -> None:
    (cold_s, cold), (warm_s, warm) = results
    print(f"\n{store}: cold {cold_s:.2f} s ({cold['misses']} misses), "
          f"cached {warm_s:.2f} s ({warm['hits']} hits), sccache {warm['version']}")
    assert cold["misses"] > 0 and cold["hits"] == 0
    assert warm["hits"] > 0 and warm["misses"] == 0 and warm["errors"] == 0
    # both arches went through cicc and ptxas, and came back from the cache
    assert warm["hits_by_stage"].get("cubin [ptxas]") == 2
    assert warm["hits_by_stage"].get("ptx [cicc]") == 2


@pytest.mark.nvcc
def test_local_cache_serves_the_second_build(tmp_path):
    config = CacheConfig(kind="local", directory=tmp_path / "cache")
    _check_second_is_cached(_compile_twice(config, tmp_path), "local")


@pytest.mark.nvcc
def test_flashinfer_compile_command_is_cached_too(tmp_path):
    config = CacheConfig(kind="local", directory=tmp_path / "store")
    _check_second_is_cached(_compile_twice(config, tmp_path, flashinfer=True), "local, FlashInfer's command")


@pytest.mark.nvcc
def test_redis_cache_serves_the_second_build(tmp_path, redis_url):
    results = _compile_twice(CacheConfig.from_url(redis_url), tmp_path)
    _check_second_is_cached(results, "redis")
    assert results[1][1]["location"].startswith("redis")


SAMPLE_STATS = {
    "stats": {"compile_requests": 2, "requests_not_cacheable": 0, "non_cacheable_compilations": 1,
              "cache_errors": {"counts": {}, "adv_counts": {}}, "cache_read_errors": 0,
              "cache_write_errors": 0,
              "cache_hits": {"counts": {"CUBIN": 2, "CUDA": 1}, "adv_counts": {"cubin [ptxas]": 2}},
              "cache_misses": {"counts": {"PTX": 2}, "adv_counts": {"ptx [cicc]": 2}}},
    "cache_location": "Local disk: \"/c\"", "version": "0.16.0",
}


def test_parse_stats_sums_stages():
    summary = ccache.parse_stats(json.dumps(SAMPLE_STATS))
    assert (summary["hits"], summary["misses"], summary["not_cacheable"]) == (3, 2, 1)
    assert summary["misses_by_stage"] == {"ptx [cicc]": 2} and summary["version"] == "0.16.0"


def test_arch_delta_plan_names_the_delta():
    plan = ccache.arch_delta_plan("12.0", "12.0;12.1a", "torch-ext")
    assert "add sm_121a; keep sm_120; drop none" in plan
    assert "not possible" in plan and "build.ninja" in plan
    assert "Nothing new" in ccache.arch_delta_plan("12.0;12.1", "12.0", "cmake")
    with pytest.raises(UsageError, match="unknown builder"):
        ccache.arch_delta_plan("12.0", "12.1", "make")


@pytest.mark.nvcc
def test_adding_an_arch_reuses_the_kept_arch_stages(tmp_path):
    """The fact arch_delta_plan rests on: sm_120's cicc and ptxas hit when sm_121 is added."""
    (tmp_path / "kernel.cu").write_text(KERNEL)
    config = CacheConfig(kind="local", directory=tmp_path / "cache")
    env = ccache.apply_cache_env(os.environ, ccache.cache_env(config, SCCACHE, nvcc=NVCC), SCCACHE)
    ccache.start_server(SCCACHE, env)
    try:
        results = []
        for archs in (["120"], ["120", "121"]):
            ccache.zero_stats(SCCACHE, env)
            gencode = [f"-gencode arch=compute_{a},code=sm_{a}" for a in archs]
            subprocess.run(f"{env['PYTORCH_NVCC']} -O3 {' '.join(gencode)} -c kernel.cu -o k.o",
                           shell=True, env=env, check=True, cwd=tmp_path)
            results.append(ccache.stats(SCCACHE, env))
    finally:
        ccache.stop_server(SCCACHE, env)
    added = results[1]
    for stage in ("ptx [cicc]", "cubin [ptxas]"):
        assert added["hits_by_stage"].get(stage) == 1 and added["misses_by_stage"].get(stage) == 1


# ---- the real thing: pip wheel of a torch cpp extension, twice -------------------------------
EXT_SETUP = """\
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

GENCODE = ["-gencode", "arch=compute_120,code=sm_120", "-gencode", "arch=compute_121,code=sm_121"]
setup(name="bwdemo", version="0.0.1", packages=["bwdemo"],
      ext_modules=[CUDAExtension("bwdemo._C", ["csrc/module.cpp", "csrc/kernel.cu"],
                                 extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O3", *GENCODE]})],
      cmdclass={"build_ext": BuildExtension})
"""
# a plain CPython module: torch's headers would make each cold compile take minutes here
EXT_MODULE = """\
#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mod); }
"""


def _write_extension(root: Path) -> None:
    (root / "csrc").mkdir(parents=True)
    (root / "bwdemo").mkdir()
    (root / "bwdemo/__init__.py").write_text("")
    (root / "setup.py").write_text(EXT_SETUP)
    (root / "csrc/module.cpp").write_text(EXT_MODULE)
    (root / "csrc/kernel.cu").write_text(KERNEL)


@pytest.mark.nvcc
@pytest.mark.slow
def test_pip_wheel_of_a_torch_extension_twice_hits_the_cache(tmp_path, redis_url):
    """What a rebuild does: a fresh copy of the same sdist at the same path, new build folder."""
    pytest.importorskip("torch.utils.cpp_extension")
    config = CacheConfig.from_url(redis_url)
    gate = [sys.executable, memgate.__file__, "--"]  # the launcher chain a real build uses
    cache = ccache.cache_env(config, SCCACHE, nvcc=NVCC, nvcc_prefix=gate)
    env = ccache.apply_cache_env(os.environ, cache, SCCACHE)
    shim = nj.write_ninja_shim(tmp_path / "shim", str(Path(sys.executable).with_name("ninja")))
    env.update(CUDA_HOME="/usr/local/cuda", MAX_JOBS="2", **{memgate.MIN_BYTES_ENV: "1"},
               PATH=os.pathsep.join([str(shim.parent), str(Path(sys.executable).parent), env["PATH"]]),
               **{nj.SHIM_LOGS_ENV: str(tmp_path / "ninja-logs")})
    project = tmp_path / "work" / "bwdemo-0.0.1"
    ccache.start_server(SCCACHE, env)
    try:
        runs = []
        for attempt in ("cold", "cached"):
            if project.exists():
                project.rename(tmp_path / f"done-{len(runs)}")
            _write_extension(project)
            ccache.zero_stats(SCCACHE, env)
            start = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                                   "--no-deps", "-v", "-w", str(tmp_path / attempt), str(project)],
                                  env=env, capture_output=True, text=True, cwd=tmp_path)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            runs.append((time.monotonic() - start, ccache.stats(SCCACHE, env)))
    finally:
        ccache.stop_server(SCCACHE, env)
    (cold_s, cold), (warm_s, warm) = runs
    print(f"\npip wheel: cold {cold_s:.1f} s ({cold['misses']} misses), cached {warm_s:.1f} s "
          f"({warm['hits']} hits)")
    assert cold["misses"] > 0
    assert warm["hits"] > 0 and warm["misses"] == 0
    assert len(list((tmp_path / "cached").glob("bwdemo-0.0.1-*.whl"))) == 1
    logs = sorted((tmp_path / "ninja-logs").glob("*.ninja_log"))  # torch ran ninja via the shim
    assert len(logs) == 2 and any(k.endswith("kernel.o") for k in nj.read_ninja_log(logs[0]))


def test_a_down_redis_falls_back_to_local_without_leaking_a_server(tmp_path):
    port = ccache.free_port()  # nothing listens here: the Redis is "down"
    config = CacheConfig.from_url(f"redis://127.0.0.1:{port}/0")
    server_port = ccache.free_port()  # one port for every attempt: leftovers would show there
    used, env, note = ccache.start_with_fallback(config, SCCACHE, os.environ,
                                                 fallback_dir=tmp_path / "local", port=server_port)
    try:
        assert len(ccache.server_pids(server_port)) == 1  # the local one; the stuck one was ended
        assert used.kind == "local" and env["SCCACHE_DIR"] == str(tmp_path / "local")
        assert note.startswith(f"compiler cache: local {tmp_path / 'local'} (redis 127.0.0.1:{port}/0:")
        assert ccache.stats(SCCACHE, env)["requests"] == 0
    finally:
        ccache.stop_server(SCCACHE, env)
    assert wait_until(10, lambda: ccache.server_pids(server_port) == []), ccache.server_pids(server_port)



def test_the_launcher_skips_sccache_once_the_store_is_down(tmp_path):
    fake = tmp_path / "bin" / "sccache"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho via-sccache \"$@\"\n")
    fake.chmod(0o755)
    launcher = ccache.write_launcher(tmp_path / "launch", fake)
    def run(*args: str) -> str:
        return subprocess.run([str(launcher), *args], capture_output=True, text=True).stdout.strip()
    assert run("echo", "hi") == "via-sccache echo hi"
    (launcher.parent / ccache.DOWN_FLAG).write_text("down\n")
    assert run("echo", "hi") == "hi"                           # the compiler alone
    assert run("--show-stats") == "via-sccache --show-stats"   # sccache's own commands still reach it
    ccache.write_launcher(tmp_path / "launch", fake)             # a new build starts with the store up
    assert run("echo", "hi") == "via-sccache echo hi"


def test_store_answers_sees_redis_go(redis_url):
    config = CacheConfig.from_url(redis_url)
    assert ccache.store_answers(config)
    assert not ccache.store_answers(CacheConfig.from_url(f"redis://127.0.0.1:{ccache.free_port()}/0"))
    assert ccache.store_answers(CacheConfig(kind="local", directory=Path("/nonexistent")))   # never asked


def _compile_clients(port: int) -> list[int]:
    """sccache clients (not servers) of ``port`` now running."""
    wanted = f"SCCACHE_SERVER_PORT={port}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            comm = (entry / "comm").read_text().strip()
        except (OSError, ValueError):
            continue
        if comm == "sccache" and wanted in environ and b"SCCACHE_START_SERVER=1" not in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.nvcc
def test_a_store_that_stops_answering_mid_compile_is_abandoned_not_waited_for(tmp_path, redis_proc):
    """Measured without this: sccache waits 30 s for a Redis connection on every lookup and again on
    every store, a minute per nvcc stage. With the watch: the compile waiting on the dead store is
    run by its client instead (the server is abandoned), and the next compile skips sccache."""
    proc, url = redis_proc
    (tmp_path / "kernel.cu").write_text(KERNEL)
    launcher = ccache.write_launcher(tmp_path / "launch", SCCACHE)
    used, env, _ = ccache.start_with_fallback(CacheConfig.from_url(url), SCCACHE, os.environ,
                                              fallback_dir=tmp_path / "local", launcher=launcher)
    port = env["SCCACHE_SERVER_PORT"]
    watch = ccache.StoreWatch(used, env, launcher.parent / ccache.DOWN_FLAG, every=0.2, misses=2, settle=0.5)
    cmd = f"{launcher} {NVCC} -O3 -gencode arch=compute_120,code=sm_120 -c kernel.cu -o"
    try:
        assert used.kind == "redis"
        proc.kill()
        proc.wait()
        first = subprocess.Popen(f"{cmd} first.o", shell=True, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        assert wait_until(20, lambda: _compile_clients(port)), "the compile never reached sccache"
        watch.start()      # the compile now waits on the dead store inside the server
        assert first.wait(timeout=25) == 0, first.stderr.read()
        assert "compiling locally instead" in first.stderr.read()   # abandoned, not waited out
        assert watch.fell_back and ccache.server_pids(port) == []
        second = subprocess.run(f"{cmd} second.o", shell=True, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert second.returncode == 0, second.stderr
        assert ccache.server_pids(port) == []    # it skipped sccache: a client would have started a server
        assert (tmp_path / "first.o").stat().st_size > 0 and (tmp_path / "second.o").stat().st_size > 0
    finally:
        watch.stop()
        ccache.stop_server(SCCACHE, env)


def test_off_needs_no_server(tmp_path):
    used, env, note = ccache.start_with_fallback(CacheConfig(kind="off"), SCCACHE, {"PATH": "/bin"})
    assert used.kind == "off" and env == {"PATH": "/bin", "TORCH_NO_COMPILER_WRAPPER": "1"}
    assert note == "compiler cache: off"
