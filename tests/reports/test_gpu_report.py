"""gpu_report on a recorded, clearly synthetic result file: numbers, Markdown rows, PNGs, axes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blackwheel.cli import reports as cli_reports
from blackwheel.reports import gpu_report
from blackwheel.core.errors import UsageError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "bench"
BENCH = FIXTURES / "synthetic-h100-bench.json"
TESTS = FIXTURES / "synthetic-h100-tests.jsonl"


@pytest.fixture(scope="module")
def fixture_doc():
    doc = json.loads(BENCH.read_text())
    assert doc["synthetic"] is True, "the fixture must say it is synthetic"
    return doc


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, gpu_report.write_report(BENCH, out, TESTS)


@pytest.fixture(scope="module")
def markdown(written):
    return written[1]["report.md"].read_text()


def _row(markdown: str, first_cell: str) -> list[str]:
    rows = [ln for ln in markdown.splitlines() if ln.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"expected one row for {first_cell!r}, found {len(rows)}"
    return [c.strip() for c in rows[0].strip("|").split("|")]


def _rate(r: dict) -> float:
    scale = 1e12 if r["metric"] == "tflops" else 1e9
    return r["work"] / (r["median_ms"] * 1e-3) / scale


def test_ceiling_rows_recomputed_from_raw_numbers(fixture_doc, markdown):
    copy = fixture_doc["ceilings"]["gbps"]
    row = _row(markdown, "device copy (read + write)")
    assert row[1] == f"{_rate(copy):.1f} GB/s"
    assert row[2] == "3350.0"   # H100 SXM datasheet
    assert row[3] == f"{_rate(copy) / 3350:.2f}"
    mm = fixture_doc["ceilings"]["tflops"]
    assert _row(markdown, "bf16 matmul")[3] == f"{_rate(mm) / 989:.2f}"


def test_kernel_rows_have_fraction_and_speedup(fixture_doc, markdown):
    ceilings = {m: _rate(r) for m, r in fixture_doc["ceilings"].items()}
    ok = [r for r in fixture_doc["results"] if not r["error"]]
    assert len(ok) >= 5
    for r in ok:
        row = _row(markdown, r["name"])
        assert row[1] == f"{r['median_ms']:.3f}"
        assert row[3] == f"{_rate(r) / ceilings[r['metric']]:.2f}"
        ref = r["reference"]
        if ref.get("error"):
            assert row[5] == "n/a" and ref["error"] in row[4]
        else:
            assert row[5] == f"{ref['median_ms'] / r['median_ms']:.2f}x"


def test_errors_manifests_and_synthetic_banner_are_shown(fixture_doc, markdown):
    broken = next(r for r in fixture_doc["results"] if r["error"])
    assert _row(markdown, broken["name"])[1] == "ERROR"
    assert "SYNTHETIC FIXTURE" in markdown
    manifest = fixture_doc["manifests"][0]["content"]
    assert _row(markdown, manifest["wheel"])[1] == f"{manifest['package']} {manifest['version']}"
    assert "NVIDIA H100 80GB HBM3" in markdown and "2.11.0+cu130" in markdown
    jit = next(f for f in fixture_doc["first_launch"] if not f["native_code"])
    assert _row(markdown, f"flash_attn {jit['family']}")[1].startswith("NO (")


def test_test_results_are_counted(markdown):
    assert "3 tests: 1 failed, 2 passed." in markdown
    assert "FAILED `tests/gpu/test_flash_attn.py::test_kvcache[fp16-paged-gqa8-2-decode]`" in markdown


def test_device_table_labels_datasheet_rows(markdown):
    row = _row(markdown, "NVIDIA GB10 (DGX Spark)")
    assert row[1:4] == ["12.1", "48", "273"]
    assert "Devices (datasheet figures, not measured)" in markdown


def test_report_json_matches_markdown(written, fixture_doc):
    summary = json.loads(written[1]["report.json"].read_text())
    assert summary["synthetic"] is True
    first = next(k for k in summary["kernels"] if not k["error"])
    r = next(r for r in fixture_doc["results"] if r["name"] == first["name"])
    assert first["speedup"] == pytest.approx(r["reference"]["median_ms"] / r["median_ms"])


@pytest.mark.parametrize("name", gpu_report.PLOTS)
def test_pngs_are_valid_and_not_blank(written, name):
    import matplotlib.image

    path = written[1][name]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(pixels[..., :3].var()) > 1e-3, "the plot is blank"


@pytest.mark.parametrize("plot", [gpu_report.plot_ceilings, gpu_report.plot_kernels_vs_ceiling,
                                  gpu_report.plot_kernels_vs_reference])
def test_plot_axes_are_labelled(fixture_doc, plot):
    fig = plot(gpu_report.summarize(fixture_doc))
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert len(ax.patches) >= 2, "bars are drawn"


def test_bad_inputs_fail_with_one_line(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        gpu_report.write_report(tmp_path / "missing.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(UsageError, match="not a blackwheel bench result"):
        gpu_report.write_report(bad, tmp_path)
    lines = tmp_path / "t.jsonl"
    lines.write_text("{not json}\n")
    with pytest.raises(UsageError, match="t.jsonl:1"):
        gpu_report.write_report(BENCH, tmp_path, lines)


def test_cli_report_command(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    cli_reports.register(parser.add_subparsers())
    args = parser.parse_args(["report", str(BENCH), "--out", str(tmp_path)])
    assert args.func(args) == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "ceilings.png").is_file()


# ---- FlashInfer results (the recorded H200 run of 2026-11-30, docs/reports/h200-2026-11-30) ----------
FI_BENCH = FIXTURES / "h200-flashinfer-bench.json"


@pytest.fixture(scope="module")
def fi_doc():
    doc = json.loads(FI_BENCH.read_text())
    assert doc["synthetic"] is False and doc["environment"]["device"] == "NVIDIA H200"
    return doc


@pytest.fixture(scope="module")
def fi_markdown(tmp_path_factory):
    return gpu_report.write_report(FI_BENCH, tmp_path_factory.mktemp("fi-report"))["report.md"].read_text()


def test_flashinfer_fixture_matches_the_bench_cases(fi_doc):
    from blackwheel.reports import bench

    cases = {c.name: c for c in bench.flashinfer_cases(bench.SIZES["full"])}
    assert [r["name"] for r in fi_doc["results"]] == list(cases)
    for r in fi_doc["results"]:
        assert r["package"] == "flashinfer" and r["shape"] == cases[r["name"]].shape()
        if not r["error"]:
            assert (r["metric"], r["work"]) == (cases[r["name"]].metric, cases[r["name"]].work())
    assert {f["family"] for f in fi_doc["first_launch"]} == set(bench.BENCHMARKS["flashinfer"].families)


def test_flashinfer_rows_show_unit_ratio_and_reference(fi_doc, fi_markdown):
    ceilings = {m: _rate(r) for m, r in fi_doc["ceilings"].items()}
    ok = [r for r in fi_doc["results"] if not r["error"]]
    assert {r["metric"] for r in ok} == {"gbps", "tflops"}
    for r in ok:
        row = _row(fi_markdown, r["name"])
        unit = "GB/s" if r["kernel"] == "decode" else "TFLOP/s"
        assert row[2] == f"{_rate(r):.1f} {unit}"
        assert row[3] == f"{_rate(r) / ceilings[r['metric']]:.2f}"       # decode vs copy, prefill vs matmul
        assert row[6] == "flashinfer"
        if r["reference"] is None:                                        # decode: no reference timed
            assert row[4:6] == ["none", "n/a"]
        else:
            assert row[4] == f"{r['reference']['median_ms']:.3f}"
            assert row[5] == f"{r['reference']['median_ms'] / r['median_ms']:.2f}x"



def test_a_broken_flashinfer_case_is_a_row_saying_so(fi_doc, tmp_path):
    from blackwheel.reports import bench

    doc = json.loads(json.dumps(fi_doc))
    first = doc["results"][0]
    doc["results"][0] = bench.error_result(package="flashinfer", kernel=first["kernel"], name=first["name"],
                                           shape=first["shape"], exc=RuntimeError("MissingJITCacheError: not in the set"))
    (tmp_path / "bench.json").write_text(json.dumps(doc))
    md = gpu_report.write_report(tmp_path / "bench.json", tmp_path / "out")["report.md"].read_text()
    assert _row(md, first["name"])[1:3] == ["ERROR", "RuntimeError: MissingJITCacheError: not in the set"]


def test_flashinfer_environment_and_first_launch_rows(fi_doc, fi_markdown):
    assert "flashinfer-python 0.6.13+cu130.sm90" in fi_markdown
    assert _row(fi_markdown, "device copy (read + write)")[2] == "4800.0"     # H200 SXM datasheet
    for f in fi_doc["first_launch"]:
        row = _row(fi_markdown, f"flashinfer {f['family']}")
        assert row[1] == "yes" and row[2] == f"{f['import_to_first_result_s']:.2f}"
