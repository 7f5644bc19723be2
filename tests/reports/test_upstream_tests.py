"""test-upstream: upstream's own tests laid out alone, run, counted, and deselected by coverage."""

from __future__ import annotations

import tarfile
from concurrent.futures import ThreadPoolExecutor
import textwrap
from pathlib import Path

import pytest

from blackwheel.core.errors import UsageError
from blackwheel.core.fsutil import sha256_file
from blackwheel.core.recipe import load_recipe
from blackwheel.sources.fetch import Fetcher
from blackwheel.reports.upstream_tests import coverage_of, parse_junit, report_text, run_upstream_tests

UPSTREAM_TEST = '''
import importlib.util
import pytest

@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("q_dtype", ["float16", "float32"])
def test_decode(head_dim, q_dtype):
    assert head_dim in (64, 128)

def test_fails():
    assert 1 == 2

def test_module_missing():
    pytest.skip("Skipping due to missing JIT cache for module: batch_decode_x_128")

def test_plain_skip():
    pytest.skip("needs sm_100+")

def test_the_sdist_sources_are_not_importable():
    assert importlib.util.find_spec("pkg") is None     # the tests alone, not the sources beside them
'''


@pytest.fixture
def upstream(tmp_path, monkeypatch):
    sdist = tmp_path / "src" / "pkg-1.0"
    (sdist / "pkg").mkdir(parents=True)
    (sdist / "pkg" / "__init__.py").write_text("raise ImportError('the sdist copy was imported')\n")
    (sdist / "tests" / "attention").mkdir(parents=True)
    (sdist / "tests" / "attention" / "test_decode_kernels.py").write_text(UPSTREAM_TEST)
    mirror = tmp_path / "mirror" / "pypi"
    mirror.mkdir(parents=True)
    archive = mirror / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(sdist, arcname="pkg-1.0")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "pkg.toml").write_text(textwrap.dedent(f'''
        [package]
        name = "pkg"
        import-name = "pkg"
        [[versions]]
        version = "1.0"
        sdist = {{ pypi = "pkg", sha256 = "{sha256_file(archive)}" }}
          [versions.tests]
          paths = ["tests/attention/test_decode_kernels.py"]
          env = {{ PKG_DISABLE_JIT = "1" }}
        [arch]
        knob = "ARCHS"
        [kernel-sets.small]
        include = []
          [kernel-sets.small.coverage."tests/attention/test_*_kernels.py"]
          head_dim = [64, 128]
          q_dtype = ["float16"]
        '''))
    monkeypatch.setenv("BLACKWHEEL_RECIPES", str(recipes))
    return load_recipe("pkg"), Fetcher(tmp_path / "cache", tmp_path / "mirror", offline=True)


BROKEN = "tests/attention/test_broken_kernels.py"
BROKEN_TEST = "import torch_ops_that_are_not_there\n\ndef test_never():\n    pass\n"


def _repacked(recipe, tmp_path: Path, files: dict[str, str], run_first: tuple[str, ...] = ()) -> Fetcher:
    """The fixture's sdist with ``files`` written into it, packed again and pinned by the recipe;
    ``run_first``: test files the recipe lists before its own. A fetcher with a fresh cache reads it."""
    sdist = tmp_path / "src" / "pkg-1.0"
    for name, text in files.items():
        (sdist / name).write_text(text)
    archive = tmp_path / "mirror" / "pypi" / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(sdist, arcname="pkg-1.0")
    path = Path(recipe.path)
    listed = ", ".join(f'"{p}"' for p in (*run_first, "tests/attention/test_decode_kernels.py"))
    path.write_text(path.read_text().replace(recipe.version("1.0").sdist.sha256, sha256_file(archive))
                    .replace('paths = ["tests/attention/test_decode_kernels.py"]', f"paths = [{listed}]"))
    return Fetcher(tmp_path / "cache2", tmp_path / "mirror", offline=True)


def test_counts_per_file_and_the_coverage_deselects(upstream, tmp_path):
    recipe, fetcher = upstream
    result = run_upstream_tests(recipe, "1.0", fetcher, tmp_path / "work", kernel_set="small")
    counts = result["files"]["tests/attention/test_decode_kernels.py"]
    # 6 parametrized: 2 inside the coverage (64/128 x float16), 4 deselected
    assert counts == {"passed": 3, "failed": 1, "skipped": 1, "skipped_missing_module": 1, "deselected": 4}
    assert result["missing_modules"] == ["batch_decode_x_128"]
    assert result["env"] == {"PKG_DISABLE_JIT": "1"} and result["pytest_exit"] == 1
    table = report_text(result)
    assert "| total | 3 | 1 | 1 | 1 | 4 |" in table and "batch_decode_x_128" in table


def test_without_a_kernel_set_nothing_is_deselected(upstream, tmp_path):
    recipe, fetcher = upstream
    result = run_upstream_tests(recipe, "1.0", fetcher, tmp_path / "work")
    counts = result["files"]["tests/attention/test_decode_kernels.py"]
    assert "deselected" not in counts and counts["passed"] == 5 and counts["failed"] == 3


MODULE_PARAM = {"head_dim": "head_dim_qk", "q_dtype": "dtype_q", "kv_dtype": "dtype_kv"}
POS_ENCODING = {0: "NONE", 1: "ROPE_LLAMA", 2: "ALIBI"}


def test_flashinfer_default_coverage_agrees_with_its_attention_modules():
    """The declared coverage is what the decode/prefill modules hold: their parameters and the
    generators' fixed arguments, read from the same recipe."""
    recipe = load_recipe("flashinfer")
    sets, generators = recipe.data["kernel-sets"], recipe.data["aot"]["generators"]
    derived = {k: set() for k in (*MODULE_PARAM, "pos_encoding_mode", "logits_soft_cap")}
    for name in [*sets["default"]["include"], "default"]:
        for module in sets[name].get("modules", []):
            if module["gen"] not in ("batch_decode", "batch_prefill"):
                continue
            for key, values in module.get("params", {}).items():
                names = key.split(",")
                for combo in values:
                    combo = dict(zip(names, combo if len(names) > 1 else [combo]))
                    for test_name, module_name in MODULE_PARAM.items():
                        if module_name in combo:
                            derived[test_name].add(combo[module_name])
            fixed = generators[module["gen"]]["fixed"]
            derived["pos_encoding_mode"].add(POS_ENCODING[fixed["pos_encoding_mode"]])
            if not fixed["use_logits_soft_cap"]:
                derived["logits_soft_cap"].add(0.0)
    declared = coverage_of(recipe, "default")["tests/attention/test_*_kernels.py"]
    assert {k: set(v) for k, v in declared.items()} == derived


def test_the_command_line_keeps_some_files_and_passes_pytest_args(upstream, tmp_path, monkeypatch, capsys):
    from blackwheel import cli
    recipe, fetcher = upstream
    stacks = Path(recipe.path).parent / "stacks"
    stacks.mkdir()
    (stacks / "s.toml").write_text('name = "s"\ndefault = true\n[pins]\ntorch = "2.11.0"\npkg = "1.0"\n')
    monkeypatch.setenv("BLACKWHEEL_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("BLACKWHEEL_WORKDIR", str(tmp_path / "work"))
    rc = cli.main(["test-upstream", "pkg", "--kernels", "small", "--offline", "--only", "tests/attention/*",
                   "--pytest-args", "-k 'not fails'", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1                                      # a module was missing: not proven
    assert "| tests/attention/test_decode_kernels.py | 3 | 0 | 1 | 1 | 4 |" in out   # test_fails not run
    assert (tmp_path / "upstream-tests-pkg.json").is_file()


def test_coverage_excludes_test_functions_by_name(upstream, tmp_path):
    recipe, fetcher = upstream
    path = Path(recipe.path)
    path.write_text(path.read_text() + textwrap.dedent('''
          [kernel-sets.small.coverage."tests/attention/test_decode_*.py"]
          exclude-tests = ["test_fails", "test_module_*"]
        '''))
    recipe = load_recipe("pkg")
    result = run_upstream_tests(recipe, "1.0", fetcher, tmp_path / "work", kernel_set="small")
    counts = result["files"]["tests/attention/test_decode_kernels.py"]
    # the failing and the missing-module test are named out; the parametrized ones as before
    assert counts == {"passed": 3, "failed": 0, "skipped": 1, "skipped_missing_module": 0, "deselected": 6}
    assert result["pytest_exit"] == 0


def test_plain_skips_keep_their_reasons(upstream, tmp_path):
    recipe, fetcher = upstream
    result = run_upstream_tests(recipe, "1.0", fetcher, tmp_path / "work", kernel_set="small")
    assert result["skip_reasons"] == {"tests/attention/test_decode_kernels.py": {"needs sm_100+": 1}}
    assert "skipped in tests/attention/test_decode_kernels.py: 1 x needs sm_100+" in report_text(result)


DEADLINE_TEST = '''
import os

def test_runs_first():
    os.environ["BLACKWHEEL_TEST_DEADLINE"] = "0"    # as if the deadline passed during this test

def test_not_started_in_time():
    raise AssertionError("ran after the deadline")

def test_nor_this():
    raise AssertionError("ran after the deadline")
'''


def test_a_deadline_skips_what_was_not_started_and_keeps_the_counts(upstream, tmp_path):
    recipe, fetcher = upstream
    repacked = _repacked(recipe, tmp_path, {"tests/attention/test_decode_kernels.py": DEADLINE_TEST})
    result = run_upstream_tests(load_recipe("pkg"), "1.0", repacked, tmp_path / "work", deadline_s=3600)
    counts = result["files"]["tests/attention/test_decode_kernels.py"]
    assert counts == {"passed": 1, "failed": 0, "skipped": 0, "skipped_missing_module": 0, "not_run_deadline": 2}
    assert result["partial"] == "2 test(s) not run: the 3600 s deadline passed"
    assert "PARTIAL: 2 test(s) not run" in report_text(result)
    left = ["tests/attention/test_decode_kernels.py::test_nor_this",
            "tests/attention/test_decode_kernels.py::test_not_started_in_time"]
    assert result["not_run_ids"] == left

    # the rest of that run: only the two it left run (no deadline now, so they run, and fail as written)
    both = run_upstream_tests(load_recipe("pkg"), "1.0", repacked, tmp_path / "work", rest_of=result)
    assert both["files"]["tests/attention/test_decode_kernels.py"] == {
        "passed": 1, "failed": 2, "skipped": 0, "skipped_missing_module": 0}
    assert both["runs"] == 2 and "partial" not in both and "not_run_ids" not in both
    assert both["failure_reasons"]["tests/attention/test_decode_kernels.py"] == {
        "AssertionError: ran after the deadline": 2}
    assert "counts of 2 runs together" in report_text(both)
    with pytest.raises(UsageError, match="left no test unrun"):
        run_upstream_tests(load_recipe("pkg"), "1.0", fetcher, tmp_path / "work", rest_of=both)
    with pytest.raises(UsageError, match="kernel set 'small'"):
        run_upstream_tests(load_recipe("pkg"), "1.0", fetcher, tmp_path / "work", kernel_set=None,
                           rest_of={**result, "kernel_set": "small"})


def test_a_listed_test_that_no_longer_exists_is_named_as_vanished(upstream, tmp_path):
    """A rest-of list naming a test upstream has since renamed: the real ones run, that one is named
    (it is in no count), and one that -k deselects still exists, so it is not named."""
    recipe, fetcher = upstream
    first = run_upstream_tests(recipe, "1.0", fetcher, tmp_path / "work", kernel_set="small")
    file = "tests/attention/test_decode_kernels.py"
    gone = f"{file}::test_decode[float16-96]"       # as if upstream renamed a parametrization
    left = [f"{file}::test_decode[float16-64]", f"{file}::test_plain_skip", f"{file}::test_fails", gone]
    both = run_upstream_tests(recipe, "1.0", fetcher, tmp_path / "work", kernel_set="small",
                              pytest_args=["-k", "not fails"], rest_of={**first, "not_run_ids": left})
    assert both["vanished_ids"] == [gone]
    # the first run's counts, and one more passed and one more skipped: the real ids ran
    assert both["files"][file] == {"passed": 4, "failed": 1, "skipped": 2, "skipped_missing_module": 1,
                                   "deselected": 4}
    assert f"VANISHED: 1 listed test(s) no longer exist (renamed or removed upstream): not run, in no count: " \
           f"{gone}" in report_text(both)
    assert "uncollected_ids" not in both


def test_a_listed_test_whose_file_no_longer_imports_is_not_vanished(upstream, tmp_path):
    """The rest of a run, where one listed file has since stopped importing: its tests are named as
    not collected (its import error is its one failure), not as vanished; the other file's still run."""
    recipe, _ = upstream
    broken = BROKEN
    fetcher = _repacked(recipe, tmp_path, {broken: BROKEN_TEST}, run_first=(broken,))   # before the recipe is read
    file = "tests/attention/test_decode_kernels.py"
    first = {"package": "pkg", "version": "1.0", "kernel_set": None, "pytest_exit": 0, "missing_modules": [],
             "files": {file: {"passed": 4, "failed": 0, "skipped": 0, "skipped_missing_module": 0}}}
    gone = f"{file}::test_decode[float16-96]"
    left = [f"{broken}::test_never", f"{file}::test_plain_skip", gone]
    both = run_upstream_tests(load_recipe("pkg"), "1.0", fetcher, tmp_path / "work",
                              rest_of={**first, "not_run_ids": left})
    assert both["uncollected_ids"] == [f"{broken}::test_never"]
    assert both["vanished_ids"] == [gone]
    assert both["files"][broken]["failed"] == 1 and both["files"][file]["skipped"] == 1
    text = report_text(both)
    assert f"NOT COLLECTED: 1 listed test(s) not run: their file did not import (counted once as that file's " \
           f"failure): {broken}::test_never" in text
    assert f"VANISHED: 1 listed test(s) no longer exist (renamed or removed upstream): not run, in no count: {gone}" in text


def test_a_file_that_does_not_import_fails_alone_and_says_why(upstream, tmp_path):
    recipe, _ = upstream
    fetcher = _repacked(recipe, tmp_path, {BROKEN: BROKEN_TEST}, run_first=(BROKEN,))
    result = run_upstream_tests(load_recipe("pkg"), "1.0", fetcher, tmp_path / "work")
    assert result["files"]["tests/attention/test_broken_kernels.py"]["failed"] == 1
    assert result["files"]["tests/attention/test_decode_kernels.py"]["passed"] == 5   # the others still ran
    why = result["failure_reasons"]["tests/attention/test_broken_kernels.py"]
    assert list(why) == ["ModuleNotFoundError: No module named 'torch_ops_that_are_not_there'"]
    assert result["failure_reasons"]["tests/attention/test_decode_kernels.py"] == {
        "assert 256 in (64, 128)": 2, "assert 1 == 2": 1}     # one cause, counted once per test
    assert "failed in tests/attention/test_broken_kernels.py: 1 x ModuleNotFoundError" in report_text(result)


def test_two_runs_at_once_in_one_work_folder_keep_their_own_files(upstream, tmp_path):
    recipe, fetcher = upstream
    work = tmp_path / "work"
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_upstream_tests, recipe, "1.0", fetcher, work, kernel_set=ks)
                for ks in ("small", None)]
        small, whole = (r.result() for r in runs)
    assert small["files"]["tests/attention/test_decode_kernels.py"]["deselected"] == 4
    assert whole["files"]["tests/attention/test_decode_kernels.py"]["passed"] == 5
    assert not list(work.glob("run-*")) and not list(work.glob("sdist-*"))   # each run's folders go when it ends


def test_a_deadline_of_zero_is_refused_in_one_line(capsys):
    from blackwheel import cli
    assert cli.main(["test-upstream", "pkg", "--deadline-s", "0"]) == 2
    assert capsys.readouterr().err == "blackwheel: --deadline-s 0: give a number of seconds above 0\n"


def test_rest_of_is_refused_in_one_line_without_a_readable_run_or_beside_only(capsys, tmp_path):
    from blackwheel import cli
    assert cli.main(["test-upstream", "pkg", "--rest-of", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blackwheel: --rest-of {tmp_path}: no readable upstream-tests-pkg.json") and err.count("\n") == 1
    assert cli.main(["test-upstream", "pkg", "--rest-of", str(tmp_path), "--only", "tests/x.py"]) == 2
    assert capsys.readouterr().err == "blackwheel: --rest-of runs what that run left; --only cannot narrow it\n"


JUNIT_OOM = """<testsuites><testsuite>
<testcase classname="tests.attention.test_rope" name="test_a" file="tests/attention/test_rope.py"/>
<testcase classname="tests.attention.test_rope" name="test_b" file="tests/attention/test_rope.py">
 <failure message="torch.OutOfMemoryError: CUDA out of memory.">E   torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.54 GiB</failure></testcase>
<testcase classname="tests.attention.test_rope" name="test_c" file="tests/attention/test_rope.py">
 <skipped message="conftest.py:9: Skipping due to OOM"/></testcase>
<testcase classname="tests.attention.test_rope" name="test_d" file="tests/attention/test_rope.py">
 <failure message="AssertionError">E   AssertionError: wrong rotation</failure></testcase>
<testcase classname="tests.attention.test_rope" name="test_e" file="tests/attention/test_rope.py">
 <skipped message="conftest.py:3: needs sm_100+"/></testcase>
</testsuite></testsuites>"""


def test_results_that_ran_out_of_gpu_memory_are_counted_apart_and_said(tmp_path):
    """They stay in failed and skipped (a run with them is not clean), and the report says what they judge."""
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT_OOM)
    result = parse_junit(junit)
    assert result["files"]["tests/attention/test_rope.py"] == {
        "passed": 1, "failed": 2, "skipped": 2, "skipped_missing_module": 0, "out_of_memory": 2}
    text = report_text(result)
    assert "OUT OF MEMORY: 2 of the failed and skipped ran out of GPU memory" in text
    junit.write_text(JUNIT_OOM.replace("out of memory", "fault").replace("OutOfMemoryError", "Err")
                     .replace("Skipping due to OOM", "skip"))
    assert "OUT OF MEMORY" not in report_text(parse_junit(junit))
