"""bench_build: the unit subset and the report arithmetic (the real side-by-side run is GPU-machine work)."""

from __future__ import annotations

from blackwheel.bench_build import pick_units, render


def test_pick_units_spans_heavy_to_light():
    profile = {f"u{i}.o": float(i) for i in range(10)}
    picked = pick_units(profile, 4)
    assert picked[0] == "u9.o" and picked[-1] == "u0.o" and len(set(picked)) == 4
    assert pick_units(profile, 20) == sorted(profile, key=lambda u: -profile[u])


def test_render_states_ratio_and_limit():
    run = {"wall_s": 100.0, "peak_mem_gib": 3.0, "jobs": "2", "nvcc_threads": "1"}
    result = {"package": "p", "version": "1", "target": "hopper",
              "machine": {"cores": 2, "available_gib": 20.0}, "subset": ["a.o"],
              "runs": {"upstream": {**run, "wall_s": 200.0, "jobs": "upstream default"}, "ours": run},
              "ratio_ours_to_upstream": 0.5, "limit_s": 90.0, "ours_over_limit": 1.111}
    md = render(result)
    assert "Ours / upstream: **0.5**" in md and "| upstream's command | 200.0 |" in md
    assert "1 units: a.o" in md and "1.111x" in md
