"""verify and compat: the rules table on hand-made reports (fast), then on nvcc-built objects (marked)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from blackwheel import cli
from blackwheel.core.errors import UsageError, VerifyFailed
from blackwheel.check.inspect import InspectReport, ObjectReport
from blackwheel.core.targets import TARGETS, ComputeCapability, CudaArch
from blackwheel.check.verify import compat_object, compat_path, verify_paths, verify_wheel
from tests.cuda_objects import build_all, find_nvcc

A = CudaArch.parse
CC = ComputeCapability.parse


def report(*objects: ObjectReport) -> InspectReport:
    return InspectReport("demo.whl", objects)


def obj(path: str, cubins: str = "", ptx: str = "", error: str | None = None) -> ObjectReport:
    return ObjectReport(path, tuple(A(a) for a in cubins.split()), tuple(A(a) for a in ptx.split()), error)


# ---- verify on hand-made reports -------------------------------------------------------------------
def test_plain_sm120_covers_gb10_but_not_when_arch_specific():
    assert verify_paths(report(obj("_C.so", "12.0")), TARGETS["gb10"]).ok
    failed = verify_paths(report(obj("_C.so", "12.0a")), TARGETS["gb10"])
    assert failed.failures == ("_C.so: no cubin runs natively on 12.1 (target gb10); cubins: 12.0a",)


def test_blackwell_with_only_121a_fails_naming_12_0():
    failed = verify_paths(report(obj("_C.so", "12.1a")), TARGETS["blackwell"])
    assert len(failed.failures) == 1 and "natively on 12.0" in failed.failures[0]


def test_ptx_alone_does_not_pass_but_is_mentioned():
    failed = verify_paths(report(obj("fa2.so", "8.0", "8.0")), TARGETS["gb10"])
    assert "PTX 8.0 would only JIT-compile" in failed.failures[0]


def test_ptx_only_ok_libraries_pass_by_jit_and_say_so():
    fa2 = obj("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "8.0", "8.0")
    ok = verify_paths(report(fa2, obj("vllm/_C.so", "12.1a")), TARGETS["gb10"],
                      ptx_ok=["vllm/vllm_flash_attn/_vllm_fa2_C*.so"])
    assert ok.ok and ok.notes == ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so: runs on 12.1 by PTX JIT from 8.0 "
                                  "(slow first launch; the recipe declares this library PTX-only-ok)",)
    assert "PTX-only-ok" in ok.to_dict()["notes"][0]
    # the declaration covers only the named library, and only where its PTX can serve the device
    other = verify_paths(report(fa2, obj("vllm/_C.so", "8.0", "8.0")), TARGETS["gb10"], ptx_ok=["*_fa2_C*.so"])
    assert other.failures == ("vllm/_C.so: no cubin runs natively on 12.1 (target gb10); cubins: 8.0; "
                              "PTX 8.0 would only JIT-compile",)
    no_ptx = verify_paths(report(obj("x/_fa2_C.so", "8.0")), TARGETS["gb10"], ptx_ok=["*_fa2_C*.so"])
    assert not no_ptx.ok


def test_objects_without_cuda_code_are_ignored_but_a_wheel_needs_some():
    assert verify_paths(report(obj("_C.so", "12.0f"), obj("libfoo.so")), TARGETS["blackwell"]).ok
    failed = verify_paths(report(obj("libfoo.so")), TARGETS["gb10"])
    assert failed.failures == ("demo.whl: no CUDA code at all (no cubin or PTX in any ELF file); "
                               "the build produced no kernels",)


def test_unreadable_object_fails():
    failed = verify_paths(report(obj("_C.so", "12.1"), obj("bad.so", error="truncated fatbin")), TARGETS["gb10"])
    assert failed.failures == ("bad.so: could not read: truncated fatbin",)


def test_required_cubins_per_glob():
    wheel = report(obj("vllm/_C.abi3.so", "12.0 12.1a"), obj("vllm/_moe_C.abi3.so", "12.0"))
    required = {"*_C.abi3.so": [A("12.1a")]}
    failed = verify_paths(wheel, TARGETS["gb10"], required)
    assert failed.failures == ("vllm/_moe_C.abi3.so: lacks required cubin sm_121a (required for *_C.abi3.so)",)
    assert verify_paths(wheel, TARGETS["gb10"], {"vllm/_C.abi3.so": [A("12.1a")]}).ok


def test_required_glob_that_matches_nothing_fails():
    failed = verify_paths(report(obj("x/_C.so", "12.1")), TARGETS["gb10"], {"flash_attn_2_cuda*.so": []})
    assert failed.failures == ("required flash_attn_2_cuda*.so: no CUDA object matches",)


def test_report_dict_and_raise():
    failed = verify_paths(report(obj("_C.so", "12.0a"), obj("_D.so", "9.0")), TARGETS["gb10"])
    d = json.loads(json.dumps(failed.to_dict()))
    assert d["ok"] is False and d["devices"] == ["12.1"] and len(d["failures"]) == 2
    assert d["objects"][0]["native"] == {"12.1": None}
    with pytest.raises(VerifyFailed, match=r"_C.so: no cubin runs natively on 12.1 .*\(and 1 more\)") as info:
        failed.raise_for_failure()
    assert info.value.exit_code == 7


def test_units_without_native_code_are_noted_not_failed():
    mixed = ObjectReport("_C.so", (A("9.0a"), A("12.0")), units=(((A("12.0"),), 5), ((A("9.0a"),), 2)))
    passed = verify_paths(report(mixed), TARGETS["gb10"])
    assert passed.ok and passed.notes == ("_C.so: 2 of 7 compilation units have no cubin for 12.1",)
    assert compat_object(mixed, CC("12.1")).units_without_native == (2, 7)
    assert compat_object(mixed, CC("9.0")).units_without_native == (5, 7)


def test_verify_wheel_rejects_non_wheel(tmp_path):
    with pytest.raises(UsageError, match="not a wheel"):
        verify_wheel(tmp_path / "x.tar.gz", TARGETS["gb10"])


# ---- compat: the rules table ------------------------------------------------------------------------
@pytest.mark.parametrize("cubins, ptx, cc, verdict, arch", [
    ("12.0a", "", "12.1", "none", None),
    ("12.0", "", "12.1", "native", "12.0"),
    ("", "12.0", "12.1", "ptx-jit", "12.0"),
    ("9.0a", "", "12.1", "none", None),
    ("12.0f", "", "12.1", "native", "12.0f"),
    ("12.1a", "", "12.0", "none", None),
    ("12.1", "", "12.0", "none", None),
    ("12.0 12.1a", "", "12.1", "native", "12.1a"),
    ("9.0", "9.0", "12.1", "ptx-jit", "9.0"),
    ("", "12.0a", "12.1", "none", None),
    ("9.0a", "", "9.0", "native", "9.0a"),
])
def test_compat_rules(cubins, ptx, cc, verdict, arch):
    entry = compat_object(obj("k.so", cubins, ptx), CC(cc))
    assert (entry.verdict, entry.arch) == (verdict, A(arch) if arch else None)
    assert entry.rule


def test_compat_none_explains_with_the_rule_text():
    entry = compat_object(obj("k.so", "12.0a"), CC("12.1"))
    assert entry.rule == "sm_120a is specific to 12.0; it does not run on 12.1"


def run_cli(argv: list[str]) -> int:
    """Through the real cli.main (it imports only the module of the chosen command)."""
    return cli.main(argv)


def test_cli_unknown_cc_is_a_clear_error(monkeypatch, capsys, tmp_path):
    assert run_cli(["compat", str(tmp_path), "--cc", "12.x"]) == 2
    err = capsys.readouterr().err
    assert err == "blackwheel: unknown compute capability '12.x': write it as MAJOR.MINOR, e.g. 12.1\n"


def test_cli_bad_require_is_a_clear_error(monkeypatch, capsys, tmp_path):
    assert run_cli(["verify", str(tmp_path), "--target", "gb10", "--require", "12.1a"]) == 2
    assert "--require '12.1a': write GLOB=ARCH" in capsys.readouterr().err


# ---- real objects --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def objects(tmp_path_factory) -> dict[str, Path]:
    if find_nvcc() is None:
        pytest.skip("nvcc not found")
    return build_all(tmp_path_factory.mktemp("cuda-objects"))


def make_wheel(path: Path, members: dict[str, Path | str]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, src in members.items():
            zf.write(src, name) if isinstance(src, Path) else zf.writestr(name, src)
    return path


@pytest.mark.nvcc
def test_sm120_so_passes_gb10_and_fails_when_121a_required(objects):
    lib = objects["lib_sm120"]
    assert verify_paths(lib, TARGETS["gb10"]).ok
    failed = verify_paths(lib, TARGETS["gb10"], {"lib_sm120.so": [A("12.1a")]})
    assert failed.failures == (f"{lib}: lacks required cubin sm_121a (required for lib_sm120.so)",)


@pytest.mark.nvcc
def test_arch_specific_120a_so_fails_gb10(objects):
    failed = verify_paths(objects["lib_zstd"], TARGETS["gb10"])  # sm_120a + compute_120a, compressed
    assert "no cubin runs natively on 12.1" in failed.failures[0]


@pytest.mark.nvcc
def test_blackwell_target_with_only_121a_fails_naming_12_0(objects, tmp_path):
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/_k.so": objects["lib_sm121a"]})
    failed = verify_wheel(wheel, TARGETS["blackwell"])
    assert failed.failures == ("demo/_k.so: no cubin runs natively on 12.0 (target blackwell); cubins: 12.1a",)
    assert verify_wheel(wheel, TARGETS["gb10"]).ok


@pytest.mark.nvcc
def test_cli_wheel_without_cuda_code_fails(monkeypatch, capsys, tmp_path):
    wheel = make_wheel(tmp_path / "empty-1.0-py3-none-any.whl", {"empty/__init__.py": "", "empty/x.txt": "hi"})
    assert run_cli(["verify", str(wheel), "--target", "gb10"]) == 7
    out = capsys.readouterr()
    assert "no CUDA code at all" in out.err and "Traceback" not in out.err


@pytest.mark.nvcc
def test_cli_verify_json_names_native_cubins(objects, monkeypatch, capsys, tmp_path):
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/_C.so": objects["lib_multi"]})
    assert run_cli(["verify", str(wheel), "--target", "blackwell", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["objects"][0]["native"] == {"12.0": "12.0a", "12.1": "12.1a"}


COMPAT_121 = {  # object -> verdict on a GB10 (12.1)
    "sm90a": "none", "sm120": "native", "sm120a": "none", "sm121": "native", "sm121a": "native",
    "family120f": "native", "ptx120": "ptx-jit", "lib_zstd": "none", "lib_lz4": "native", "mixed": "native",
}


@pytest.mark.nvcc
def test_compat_on_real_objects(objects, tmp_path):
    for name in COMPAT_121:
        shutil.copy(objects[name], tmp_path / objects[name].name)
    verdicts = {Path(e.path).stem: e.verdict for e in compat_path(tmp_path, CC("12.1"))}
    assert verdicts == COMPAT_121


@pytest.mark.nvcc
def test_mixed_units_pass_with_a_note(objects):
    (entry,) = compat_path(objects["mixed"], CC("12.1"))
    assert (entry.verdict, entry.units_without_native) == ("native", (1, 2))
    assert "1 of 2 compilation units have no cubin for 12.1" in verify_paths(objects["mixed"], TARGETS["gb10"]).notes[0]


@pytest.mark.nvcc
def test_cli_compat_exit_status(objects, monkeypatch, capsys):
    assert run_cli(["compat", str(objects["ptx120"]), "--cc", "12.1"]) == 0
    assert "ptx-jit" in capsys.readouterr().out
    assert run_cli(["compat", str(objects["sm120a"]), "--cc", "12.1", "--json"]) == 1
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["verdict"] == "none" and "specific to 12.0" in entry["rule"]


# ---- a FlashInfer wheel against a recorded trace ----------------------------------------------------
GB10_TRACE = Path(__file__).parents[2] / "recipes" / "traces" / "flashinfer-0.6.13-gb10.json"


def test_cli_trace_for_another_target_is_refused_before_inspect(capsys, tmp_path):
    assert run_cli(["verify", str(tmp_path / "nothing.whl"), "--target", "hopper", "--trace", str(GB10_TRACE)]) == 2
    assert "recorded for target 'gb10', not 'hopper'" in capsys.readouterr().err


def test_cli_unreadable_trace_is_one_line(capsys, tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("{}")
    assert run_cli(["verify", str(tmp_path), "--target", "gb10", "--trace", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a readable trace" in err and err.count("\n") == 1


def _aot_wheel(tmp_path: Path, lib: Path, modules: list[str]) -> Path:
    members = {f"flashinfer/data/aot/{m}/{m}.so": lib for m in modules}
    return make_wheel(tmp_path / "flashinfer_python-0.6.13-py3-none-any.whl", {**members, "flashinfer/__init__.py": ""})


@pytest.mark.nvcc
def test_trace_check_names_the_module_the_wheel_lacks(objects, capsys, tmp_path):
    traced = sorted(json.loads(GB10_TRACE.read_text())["modules"])
    wheel = _aot_wheel(tmp_path, objects["lib_sm121a"], traced[1:] + ["an_extra_module"])
    assert run_cli(["verify", str(wheel), "--target", "gb10", "--trace", str(GB10_TRACE)]) == 7
    err = capsys.readouterr().err
    assert f"{traced[0]} (asked by" in err and "is not in the wheel for gb10" in err

    whole = _aot_wheel(tmp_path, objects["lib_sm121a"], traced + ["an_extra_module"])
    assert run_cli(["verify", str(whole), "--target", "gb10", "--trace", str(GB10_TRACE)]) == 0
    out = capsys.readouterr().out
    assert f"{len(traced)} module(s) asked for, 0 missing; the wheel holds 1 more" in out


def test_a_library_that_calls_the_driver_without_linking_libcuda_fails(tmp_path):
    """vLLM's _C built against an empty libcuda stub: cuTensorMapEncodeTiled undefined, libcuda.so.1
    not in NEEDED; it loaded on the GPU machine only with libcuda preloaded."""
    if shutil.which("cc") is None:
        pytest.skip("no host C compiler")
    import subprocess
    src = tmp_path / "c.c"
    src.write_text("int cuTensorMapEncodeTiled(void *, int);\nint cuInit(unsigned);\n"
                   "int f(void) { return cuInit(0) + cuTensorMapEncodeTiled(0, 1); }\n")
    lib = tmp_path / "wheel" / "_C.abi3.so"
    lib.parent.mkdir()
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)   # undefined, allowed
    result = verify_paths(tmp_path / "wheel", TARGETS["hopper"])
    line = [f for f in result.failures if "libcuda" in f]
    assert line == ["_C.abi3.so: calls 2 CUDA driver function(s) (cuInit, cuTensorMapEncodeTiled) but does not link "
                    "libcuda.so.1 (not in its NEEDED): it fails to load with 'undefined symbol'"]
    # the same library linked to a libcuda passes this check
    stub = tmp_path / "stub" / "libcuda.so"
    stub.parent.mkdir()
    (tmp_path / "s.c").write_text("int cuInit(unsigned x) { return 0; }\nint cuTensorMapEncodeTiled(void *m, int r) { return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", str(tmp_path / "s.c"), "-Wl,-soname,libcuda.so.1", "-o", str(stub)], check=True)
    subprocess.run(["cc", "-shared", "-fPIC", str(src), f"-L{stub.parent}", "-lcuda", "-o", str(lib)], check=True)
    assert not [f for f in verify_paths(tmp_path / "wheel", TARGETS["hopper"]).failures if "libcuda" in f]


def test_links_torch_must_say_what_the_libraries_link(tmp_path):
    """A library linked to libc10.so loads only beside the torch it was built against: the recipe must
    say links-torch (its wheel then names that torch); one that links neither must not say it."""
    if shutil.which("cc") is None:
        pytest.skip("no host C compiler")
    import subprocess
    from blackwheel.check.verify import torch_link_failures
    stub = tmp_path / "stub" / "libc10.so"
    stub.parent.mkdir()
    (tmp_path / "s.c").write_text("int c10_f(void) { return 1; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", str(tmp_path / "s.c"), "-Wl,-soname,libc10.so", "-o", str(stub)], check=True)
    (tmp_path / "m.c").write_text("int c10_f(void);\nint g(void) { return c10_f(); }\n")
    wheel = tmp_path / "wheel"
    wheel.mkdir()
    linked, plain = wheel / "_C.so", tmp_path / "plain" / "_C.so"
    plain.parent.mkdir()
    subprocess.run(["cc", "-shared", "-fPIC", str(tmp_path / "m.c"), "-Wl,--no-as-needed", f"-L{stub.parent}",
                    "-lc10", "-o", str(linked)], check=True)
    subprocess.run(["cc", "-shared", "-fPIC", str(tmp_path / "m.c"), "-o", str(plain)], check=True)
    objects = verify_paths(wheel, TARGETS["hopper"]).objects
    assert [o.needed for o in objects if "libc10.so" in o.needed]
    assert torch_link_failures(objects, True, "pkg") == []
    assert torch_link_failures(objects, False, "pkg") == [
        "_C.so links torch (1 of the wheel's libraries do), but recipe pkg lacks links-torch = true: its wheel name would not "
        "say which torch it needs"]
    unlinked = verify_paths(plain.parent, TARGETS["hopper"]).objects
    assert torch_link_failures(unlinked, False, "pkg") == []
    assert "no library in the wheel links libtorch or libc10" in torch_link_failures(unlinked, True, "pkg")[0]
