"""build-all as one run: sources before any compile, the estimate, --keep-going and the closing table."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from blackwheel.core.errors import BuildFailed, MissingOffline
from blackwheel.core.recipe import load_recipe, load_stack
from blackwheel.sources.fetch import Fetcher
from blackwheel.pipeline.stack_build import (build_stack, closing_table, estimate_request, estimate_text,
                                             fetch_everything_first, stack_plan, together_seconds)
from blackwheel.core.targets import TARGETS

STACK = load_stack("cu130-torch2.11")


def request(name: str, target: str = "gb10", fetcher=None):
    recipe = load_recipe(name)
    return SimpleNamespace(recipe=recipe, stack=STACK, target=TARGETS[target], fetcher=fetcher,
                           version=recipe.version(STACK.pins[name]))


def test_a_missing_vllm_source_stops_the_run_before_any_compile(tmp_path):
    empty = Fetcher(tmp_path / "cache", tmp_path / "mirror", offline=True)
    (tmp_path / "mirror").mkdir()
    built = []
    with pytest.raises(MissingOffline) as exc:
        build_stack([request("flash-attn", fetcher=empty), request("vllm", fetcher=empty)],
                    build=lambda req: built.append(req))
    assert built == []                                    # nothing compiled, flash-attn included
    message = str(exc.value)
    assert "vllm: " in message and "cutlass" in message and "\n" not in message
    assert "triton_kernels" not in message                # optional: a note, not a miss


class _Everything:
    """A fetcher that has every source (the build stage is what these tests look at)."""
    offline = False

    def check(self, sources):
        return [], []

    def fetch_optional(self, src):
        return (None, f"optional {src.name} left out") if src.optional else (Path("/x"), None)


def test_keep_going_builds_the_others_and_names_the_failure_and_its_log(tmp_path, capsys):
    reqs = [request("flash-attn", fetcher=_Everything()), request("vllm", fetcher=_Everything())]
    manifest = {"build": {"wall_s": 12.5, "peak_mem_gib": 3.2, "profile": {"unit_seconds_sum": 40.0},
                          "cache": {"hits": 3, "requests": 4}}, "verify": {"ok": True}}

    def build(req):
        if req.recipe.name == "flash-attn":
            raise BuildFailed("flash-attn build failed: error: x (log: /logs/fa.log)")
        return SimpleNamespace(wheel=tmp_path / "vllm-0.25.1+cu130.sm121-cp312-cp312-linux_x86_64.whl",
                               manifest=manifest, reused=False)

    with pytest.raises(BuildFailed):
        build_stack(reqs, keep_going=False, build=build, together=False)
    rows, rc = build_stack(reqs, keep_going=True, build=build, together=False)
    assert rc == 1 and [r["result"] for r in rows] == ["FAILED", "built"]
    assert rows[0]["log"] == "/logs/fa.log" and rows[1]["cache_hits"] == "3/4" and rows[1]["verify"] == "ok"
    assert rows[1]["estimate_s"] > 0 and "estimate_s" not in rows[0]       # beside the actual, when built
    out = capsys.readouterr()
    assert "flash-attn failed: flash-attn build failed" in out.out and "vllm-0.25.1+cu130.sm121" in out.out
    assert "estimate: about" in out.err


def test_the_estimate_of_the_measured_vllm_build_is_near_its_wall():
    """The gb10 build took 1246 s to its last unit on 16 cores (docs/reports/vllm-gb10-h200.md)."""
    est = estimate_request(request("vllm"), cores=16, available_bytes=120 * 2**30)
    assert 0.85 * 1246 <= est.seconds <= 1.15 * 1246, est
    more = estimate_request(request("vllm"), cores=64, available_bytes=500 * 2**30)
    prof = json.loads(Path(load_recipe("vllm").path.parent, "profiles", "vllm-0.25.1.json").read_text())
    assert more.seconds == max(prof["units"].values())    # many cores: the longest unit bounds it
    two_archs = estimate_request(request("vllm", "blackwell"), cores=16, available_bytes=120 * 2**30)
    assert two_archs.seconds > 1.8 * est.seconds
    assert estimate_request(request("flash-attn", "gb10"), cores=16, available_bytes=120 * 2**30).seconds > 0


def test_closing_table_lines_up_and_shows_missing_values_as_dashes():
    rows = [{"package": "vllm", "version": "0.25.1", "result": "reused", "wheel": "w.whl", "wall_s": 0.4,
             "cpu_s": None, "peak_gib": None, "cache_hits": None, "verify": "ok"}]
    lines = closing_table(rows).splitlines()
    assert lines[0].startswith("package") and "reused" in lines[2] and " - " in lines[2]
    assert len({len(line.rstrip()) <= len(lines[1]) for line in lines}) == 1


def test_the_stack_estimate_is_the_budget_kept_full_not_the_sum_of_the_packages():
    """Built together, the whole is the compile work over one budget, or the longest unit; the head line
    says both that and the one-after-another sum, then each package alone."""
    reqs = [request(n) for n in ("flash-attn", "flashinfer", "vllm")]
    resources = (16, 120 * 2**30)
    rows = [estimate_request(r, *resources) for r in reqs]
    jobs = stack_plan(reqs, resources).jobs
    whole = together_seconds(rows, jobs)
    assert max(e.longest_s for e in rows) <= whole < sum(e.seconds for e in rows)
    assert whole == pytest.approx(max(sum(e.cpu_s for e in rows) / jobs + max(e.tail_s for e in rows),
                                      max(e.longest_s for e in rows)))
    assert [e.tail_s > 0 for e in rows] == [True, False, True]      # FlashInfer's profile is a total only
    text = estimate_text(reqs, resources, together_jobs=jobs)
    head = text.splitlines()[0]
    assert f"about {whole / 60:.0f} min on this machine (16 cores, 120 GiB free), the packages at once" in head
    assert f"one after another: about {sum(e.seconds for e in rows) / 60:.0f} min" in head
    assert [ln.split()[0] for ln in text.splitlines()[1:]] == ["flash-attn", "flashinfer", "vllm"]
    assert "packages one after another" in estimate_text(reqs, resources).splitlines()[0]
    # on many cores the longest unit of any package bounds the whole
    big = [estimate_request(r, 512, 2000 * 2**30) for r in reqs]
    assert together_seconds(big, 512) == max(e.longest_s for e in big)


def test_the_closing_table_ends_with_the_stack_against_its_estimate(capsys):
    reqs = [request("flash-attn", fetcher=_Everything()), request("vllm", fetcher=_Everything())]

    def build(req):
        m = {"build": {"wall_s": 5.0, "peak_mem_gib": 2.0, "profile": {"unit_seconds_sum": 9.0}}, "verify": {"ok": True}}
        return SimpleNamespace(wheel=Path(f"/w/{req.recipe.name}.whl"), manifest=m, reused=False)

    rows, rc = build_stack(reqs, build=build, together=False, resources=(16, 120 * 2**30))
    assert rc == 0 and [r["package"] for r in rows] == ["flash-attn", "vllm"]     # the stack line is printed only
    last = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert last[0] == "(stack)" and last[1] == "built" and last[2:4] == ["2", "packages"]
    assert abs(int(last[5]) - sum(r["estimate_s"] for r in rows)) <= 1        # one after another: the sum
    assert last[6] == "18.0" and last[7] == "2.0" and last[-1] == "ok"           # CPU summed, peak the largest
