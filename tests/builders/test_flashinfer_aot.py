"""flashinfer_aot: kernel sets from the recipe, validation, resume keys, the wheel graft; then (marked)
the real thing: both sdists fetched, flashinfer's generators run, nvcc compiles a set for gb10."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import tomllib
import zipfile
from pathlib import Path

import pytest

from blackwheel.builders import flashinfer_aot as fa
from blackwheel.core.errors import RecipeError, UsageError
from blackwheel.core.targets import TARGETS, CudaArch

RECIPE_PATH = Path(__file__).resolve().parents[2] / "recipes" / "flashinfer.toml"
RECIPE = tomllib.loads(RECIPE_PATH.read_text())
VERSIONS = [v["version"] for v in RECIPE["versions"]]


# ---- kernel sets -----------------------------------------------------------------------------------
def labels(name: str, **kw) -> list[str]:
    return [r.label for r in fa.expand_kernel_set(RECIPE, name, **kw)]


def test_core_set_lists_the_small_kernels() -> None:
    got = labels("core")
    assert got[0] == "norm()"
    assert {"act_and_mul(act_func_name=silu)", "rope()", "sampling()", "page()", "topk()"} <= set(got)
    assert not any("batch_" in g for g in got)


def test_decode_set_is_head_dims_times_dtype_rows() -> None:
    reqs = fa.expand_kernel_set(RECIPE, "decode")
    combos = {(dict(r.kwargs)["head_dim_qk"], dict(r.kwargs)["dtype_q"], dict(r.kwargs)["dtype_kv"]) for r in reqs}
    assert len(reqs) == len(combos) == 8
    assert (128, "bfloat16", "float8_e4m3fn") in combos
    assert all(dict(r.kwargs)["dtype_idx"] == "int32" for r in reqs)  # the generator's fixed arguments


def test_default_set_includes_its_parts_once() -> None:
    parts = labels("core") + labels("decode") + labels("prefill")
    got = labels("default", archs=fa.target_archs(RECIPE, "gb10"))
    assert got[:len(parts) + 2] == parts + ["cascade()", "quantization()"]
    rest = got[len(parts) + 2:]   # single decode / prefill (FA2), 8 each; no FA3 module for 12.1a
    assert [r.split("(")[0] for r in rest] == ["single_decode"] * 8 + ["single_prefill"] * 8
    assert len(set(got)) == len(got)
    hopper = labels("default", archs=fa.target_archs(RECIPE, "hopper"))
    assert hopper[:len(got)] == got and [r.split("(")[0] for r in hopper[len(got):]] == (
        ["batch_prefill_sm90"] * 6 + ["single_prefill_sm90"] * 4)   # 6: f16, bf16 and FP8 (vLLM's FP8 KV)


def test_narrowing_to_one_head_dim_and_dtype() -> None:
    got = fa.expand_kernel_set(RECIPE, "prefill", head_dims=[128], dtypes=["bfloat16"])
    assert [(dict(r.kwargs)["head_dim_qk"], dict(r.kwargs)["dtype_kv"]) for r in got] == \
        [(128, "bfloat16"), (128, "float8_e4m3fn")]


@pytest.mark.parametrize("kwargs, words", [
    ({"name": "everything"}, ["unknown kernel set 'everything'", "core", "decode", "default"]),
    ({"name": "decode", "head_dims": [96]}, ["head dim 96", "64, 128, 256"]),
    ({"name": "decode", "dtypes": ["float32"]}, ["dtype float32", "float16, bfloat16"]),
])
def test_bad_kernel_requests_name_the_choices(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(UsageError) as exc:
        fa.expand_kernel_set(RECIPE, **kwargs)
    for word in words:
        assert word in str(exc.value)


def test_tied_parameters_need_matching_tuples() -> None:
    recipe = {**RECIPE, "kernel-sets": {"x": {"modules": [
        {"gen": "batch_decode", "params": {"head_dim_qk,head_dim_vo": [[64]]}}]}}}
    with pytest.raises(RecipeError, match="2-item lists"):
        fa.expand_kernel_set(recipe, "x")


def test_a_set_that_includes_itself_is_a_recipe_error() -> None:
    recipe = {**RECIPE, "kernel-sets": {"x": {"include": ["x"]}}}
    with pytest.raises(RecipeError, match="includes itself"):
        fa.expand_kernel_set(recipe, "x")


# ---- arches ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_arch_list_gives_each_device_native_code(target: str) -> None:
    archs = fa.target_archs(RECIPE, target)
    assert TARGETS[target].uncovered(archs) == []


def test_gb10_gets_its_own_arch_specific_cubin() -> None:
    assert fa.target_archs(RECIPE, "gb10") == (CudaArch(12, 1, "a"),)
    env = fa.build_env(RECIPE, fa.target_archs(RECIPE, "blackwell"), base={})
    assert env["FLASHINFER_CUDA_ARCH_LIST"] == "12.0f 12.1a"
    assert env["FLASHINFER_BUILD_NO_PIP"] == "1"


def test_unsupported_arch_and_unknown_target_are_refused() -> None:
    with pytest.raises(UsageError, match=r"CUDA arch 12\.0 .*12\.0f"):
        fa.check_archs(RECIPE, (CudaArch(12, 0),))
    with pytest.raises(UsageError, match="no arch list for target 'ampere'.*gb10"):
        fa.target_archs(RECIPE, "ampere")


def test_plan_jobs_is_bounded_by_memory_and_cores() -> None:
    gib = 2**30
    assert fa.plan_jobs(2.0, cores=16, avail_bytes=10 * gib)[0] == 4     # (10 - 2 reserved) / 2
    assert fa.plan_jobs(2.0, cores=2, avail_bytes=64 * gib)[0] == 2
    assert fa.plan_jobs(2.0, cores=8, avail_bytes=1 * gib)[0] == 1       # never zero


# ---- resume keys -----------------------------------------------------------------------------------------
def fake_module(tmp_path: Path, name: str = "norm") -> fa.AotModule:
    tree, build = tmp_path / "src", tmp_path / "build"
    (tree / "csrc").mkdir(parents=True, exist_ok=True)
    src = tree / "csrc" / f"{name}.cu"
    src.write_text("__global__ void k() {}\n")
    ninja = build / "cached_ops" / name / "build.ninja"
    ninja.parent.mkdir(parents=True, exist_ok=True)
    ninja.write_text(f"cuda_cflags = -gencode=arch=compute_121a,code=sm_121a -I{tree}/include\n"
                     f"build {ninja.parent}/{name}.so: link\n")
    return fa.AotModule(name, f"{name}()", ninja, ninja.parent / f"{name}.so", (src,), (tree, build))


def test_a_module_is_stale_until_stamped_and_again_when_a_source_changes(tmp_path: Path) -> None:
    m = fake_module(tmp_path)
    assert fa.stale_modules([m], "tree1") == [m]                   # no .so yet
    m.so.write_bytes(b"ELF")
    (m.so.parent / fa.KEY_FILE).write_text(m.key("tree1"))
    assert fa.stale_modules([m], "tree1") == []                    # resume: nothing to do
    assert fa.stale_modules([m], "tree2") == [m]                   # patched tree: rebuild
    assert not m.so.exists()                                       # and the old .so is gone


def test_module_key_follows_flags_not_folder_names(tmp_path: Path) -> None:
    a, b = fake_module(tmp_path / "one"), fake_module(tmp_path / "two")
    assert a.key("t") == b.key("t")                                # same inputs at other paths
    b.ninja.write_text(b.ninja.read_text().replace("121a", "120f"))
    assert a.key("t") != b.key("t")                                # other arch flags


def test_module_seconds_sums_each_modules_steps(tmp_path: Path) -> None:
    m = fake_module(tmp_path)
    d = m.so.parent.resolve()
    (tmp_path / ".ninja_log").write_text("# ninja log v7\n"
                                         f"0\t1500\t0\t{d}/a.cuda.o\th\n1500\t2000\t0\t{d}/norm.so\th\n"
                                         f"0\t9000\t0\t{d}x/other.o\th\n")
    assert fa.module_seconds(tmp_path / ".ninja_log", [m]) == {"norm": 2.0}


# ---- the wheel graft --------------------------------------------------------------------------------------
def make_base_wheel(folder: Path) -> Path:
    wheel = folder / "flashinfer_python-0.6.13-py3-none-any.whl"
    info = "flashinfer_python-0.6.13.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("flashinfer/__init__.py", "")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.4\nName: flashinfer-python\nVersion: 0.6.13\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def test_graft_adds_modules_where_the_loader_looks_and_retags(tmp_path: Path) -> None:
    m = fake_module(tmp_path)
    m.so.write_bytes(b"\x7fELF-fake-module")
    wheel = fa.graft_modules(make_base_wheel(tmp_path), [m], (CudaArch(12, 1, "a"),), tmp_path / "out",
                             local_version="cu130.sm121", plat="linux_aarch64")
    assert wheel.name == "flashinfer_python-0.6.13+cu130.sm121-py3-none-linux_aarch64.whl"
    info = "flashinfer_python-0.6.13+cu130.sm121.dist-info"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert zf.read("flashinfer/data/aot/norm/norm.so") == b"\x7fELF-fake-module"
        assert "Version: 0.6.13+cu130.sm121" in zf.read(f"{info}/METADATA").decode()
        assert "Tag: py3-none-linux_aarch64" in zf.read(f"{info}/WHEEL").decode()
        listing = json.loads(zf.read(f"flashinfer/data/aot/{fa.AOT_LIST_NAME}"))
        rows = list(csv.reader(io.StringIO(zf.read(f"{info}/RECORD").decode())))
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                continue
            data = zf.read(name)
            expect = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, size) == (f"sha256={expect}", str(len(data)))
    assert listing == {"archs": ["12.1a"], "modules": ["norm"]}
    assert not any(n.startswith("flashinfer_python-0.6.13.dist-info/") for n in names)
    assert {r[0] for r in rows} == set(names)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".part")]
    assert wheel.stat().st_mode & 0o044 == 0o044                  # readable by the index server


# ---- the real sdists (network) and real compiles (nvcc) ------------------------------------------------
def sdist_source(version: str):
    from blackwheel.core.recipe import load_recipe

    return load_recipe("flashinfer").version(version).sdist


@pytest.fixture(scope="session")
def flashinfer_tree(tmp_path_factory):
    """An extracted sdist per version, fetched (hash-checked) through blackwheel.sources.fetch."""
    from blackwheel.sources.fetch import Fetcher, safe_extract

    trees: dict[str, Path] = {}

    def get(version: str) -> Path:
        if version not in trees:
            archive = Fetcher.from_env().fetch(sdist_source(version))
            dest = tmp_path_factory.mktemp(f"fi-{version}")
            trees[version] = safe_extract(archive, dest)
        return trees[version]
    return get


@pytest.mark.network
@pytest.mark.parametrize("version", VERSIONS)
def test_sdist_fetches_and_is_self_contained(flashinfer_tree, version: str) -> None:
    tree = flashinfer_tree(version)
    for needed in ("3rdparty/cutlass/include/cutlass/cutlass.h", "3rdparty/spdlog/include/spdlog/spdlog.h",
                   "3rdparty/cccl/libcudacxx/include/cuda/std/version", "flashinfer/aot.py",
                   "flashinfer/jit/env.py", "csrc/norm.cu"):
        assert (tree / needed).is_file(), needed
    # both loaders look at flashinfer/data/aot before compiling: the place the graft uses
    assert '"data" / "aot"' in (tree / "flashinfer/jit/env.py").read_text()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_generators_give_specs_for_default_and_all(flashinfer_tree, version: str, tmp_path: Path) -> None:
    tree = flashinfer_tree(version)
    env = fa.build_env(RECIPE, fa.target_archs(RECIPE, "gb10"))
    mods, skipped = fa.generate_specs(tree, fa.expand_kernel_set(RECIPE, "default", archs=fa.target_archs(RECIPE, "gb10")),
                                      env, tmp_path / "d")
    names = {m.name for m in mods}
    assert {"norm", "silu_and_mul", "rope", "sampling", "page", "cascade"} <= names
    assert len([n for n in names if n.startswith("batch_decode_")]) == 8
    assert all("compute_121a" in m.ninja.read_text() for m in mods)
    everything, _ = fa.generate_specs(tree, fa.expand_kernel_set(RECIPE, "all"), env, tmp_path / "a")
    assert len(everything) > len(mods)
    # upstream's own list carries the small kernels too (0.7.2 names its FA2 prefill modules differently)
    assert {"norm", "silu_and_mul", "rope", "sampling", "page", "cascade"} <= {m.name for m in everything}


def cubin_archs(path: Path) -> dict[str, set[str]]:
    from blackwheel.check.inspect import inspect_path

    return {Path(o.path).name: {a.dotted for a in o.cubins} for o in inspect_path(path).cuda_objects}


CORE = ["gelu_and_mul", "gelu_tanh_and_mul", "norm", "page", "rope", "sampling", "silu_and_mul", "topk"]


@pytest.mark.network
@pytest.mark.nvcc
@pytest.mark.slow
def test_core_set_compiles_for_gb10_resumes_and_packages(flashinfer_tree, tmp_path: Path) -> None:
    """The whole `core` set for gb10 on this CPU (about 7.5 min on 2 idle cores), every .so sm_121a."""
    if not Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc").exists():
        pytest.skip("nvcc 13 not found (set CUDA_HOME)")
    tree = flashinfer_tree("0.6.13")
    req = fa.AotRequest(src_dir=tree, recipe=RECIPE, target="gb10", kernel_set="core",
                        work_dir=tmp_path / "work", out_dir=tmp_path / "dist", local_version="cu130.sm121")
    lines: list[str] = []
    first = fa.build(req, lines.append)
    assert sorted(first.report.built) == sorted(first.modules) == CORE
    assert any(f"module [{len(CORE)}/{len(CORE)}]" in line for line in lines)
    archs = cubin_archs(first.wheel)
    assert archs == {f"{m}.so": {"12.1a"} for m in CORE}
    second = fa.build(req, lines.append)                      # resume: nothing recompiled
    assert second.report.built == [] and sorted(second.report.reused) == CORE
    shutil.rmtree(tmp_path / "work" / "aot-121a" / "cached_ops" / "silu_and_mul", ignore_errors=False)
    third = fa.build(req, lines.append)                       # one module lost: only it is rebuilt
    assert third.report.built == ["silu_and_mul"]


def test_the_project_loader_reads_the_recipe_and_hands_this_builder_its_data() -> None:
    from blackwheel.core.recipe import load_recipe

    recipe = load_recipe("flashinfer")
    assert (recipe.name, recipe.dist_name, recipe.builder) == ("flashinfer", "flashinfer-python", "flashinfer-aot")
    assert [v.version for v in recipe.versions] == VERSIONS
    assert recipe.data["kernel-sets"].keys() == RECIPE["kernel-sets"].keys()
    # the knob build.py sets for a target is the list this builder compiles for
    assert recipe.arch.value_for(TARGETS["blackwell"]) == "12.0f 12.1a"


def test_libcuda_stub_only_when_the_toolkit_has_none(tmp_path: Path) -> None:
    full = tmp_path / "cuda"
    (full / "lib64" / "stubs").mkdir(parents=True)
    (full / "lib64" / "stubs" / "libcuda.so").write_bytes(b"")
    assert "FLASHINFER_EXTRA_LDFLAGS" not in fa.with_libcuda_stub({"CUDA_HOME": str(full)}, tmp_path / "b1")
    if shutil.which("c++") is None:
        pytest.skip("no host C++ compiler")
    (tmp_path / "slim" / "include").mkdir(parents=True)     # headers, but no libcuda
    (tmp_path / "slim" / "include" / "cuda.h").write_text("typedef int CUresult;\nCUresult cuInit(unsigned);\n")
    env = fa.with_libcuda_stub({"CUDA_HOME": str(tmp_path / "slim")}, tmp_path / "b2")
    stub = tmp_path / "b2" / "stubs" / "libcuda.so"
    assert env["FLASHINFER_EXTRA_LDFLAGS"] == f"-L{stub.parent}"
    from elftools.elf.elffile import ELFFile

    with open(stub, "rb") as f:
        sonames = [t.soname for t in ELFFile(f).get_section_by_name(".dynamic").iter_tags() if t.entry.d_tag == "DT_SONAME"]
    assert sonames == ["libcuda.so.1"]                # what the real driver is found by at load time
