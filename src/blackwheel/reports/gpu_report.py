"""GPU run report: bench results (and kernel-test result lines) -> report.md, report.json, PNG plots.

    blackwheel report OUT/bench.json --out DIR [--tests OUT/tests.jsonl]

Every derived number (achieved rate, fraction of the measured ceiling, speedup over the reference) is
recomputed here from the raw work and median times, so the report never repeats a stale ratio.
Datasheet figures (devices.py) are shown beside the measured ceilings and labelled as datasheet.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from .bench import achieved, validate_results
from .devices import DEVICES, find_device
from ..core.errors import UsageError
from ..core.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text

REPORT_SCHEMA = "blackwheel.gpu-report/1"
UNITS = {"gbps": "GB/s", "tflops": "TFLOP/s"}
CEILING_NAMES = {"gbps": "device copy (read + write)", "tflops": "bf16 matmul"}
PLOTS = ("ceilings.png", "kernels_vs_ceiling.png", "kernels_vs_reference.png")


# ---- loading ---------------------------------------------------------------------------------------
def load_results(path: str | Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"results file {path} does not exist") from None
    except ValueError as exc:
        raise UsageError(f"results file {path} is not JSON: {exc}") from None
    return validate_results(doc, str(path))


def load_test_lines(path: str | Path) -> list[dict]:
    """JSON lines written by tests/gpu (BLACKWHEEL_RESULTS); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"test results file {path} does not exist")
    lines = []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if text.strip():
            try:
                lines.append(json.loads(text))
            except ValueError:
                raise UsageError(f"{path}:{n} is not a JSON line") from None
    return lines


# ---- summary (the numbers) ---------------------------------------------------------------------------
def _ceiling_rows(doc: dict, spec) -> list[dict]:
    rows = []
    for metric in ("gbps", "tflops"):
        r = doc["ceilings"].get(metric)
        measured = achieved(metric, r["work"], r["median_ms"]) if r else None
        sheet = None
        if spec is not None:
            sheet = spec.bandwidth_gbps if metric == "gbps" else spec.bf16_dense_tflops
        rows.append({"metric": metric, "name": CEILING_NAMES[metric], "measured": measured,
                     "datasheet": sheet,
                     "fraction_of_datasheet": measured / sheet if measured and sheet else None})
    return rows


def _kernel_row(r: dict, ceilings: dict[str, float | None]) -> dict:
    row = {"package": r.get("package"), "kernel": r.get("kernel"), "name": r["name"], "error": r["error"]}
    if r["error"]:
        return row
    metric, ms = r["metric"], r["median_ms"]
    value = achieved(metric, r["work"], ms)
    ceiling = ceilings.get(metric)
    ref = r.get("reference") or {}
    ref_ms = ref.get("median_ms") if not ref.get("error") else None
    row.update(metric=metric, median_ms=ms, achieved=value, ceiling=ceiling,
               fraction_of_ceiling=value / ceiling if ceiling else None,
               reference=ref.get("impl"), reference_note=ref.get("note"),
               reference_error=ref.get("error"), reference_ms=ref_ms,
               speedup=ref_ms / ms if ref_ms else None)
    return row


def _test_summary(lines: list[dict]) -> dict | None:
    if not lines:
        return None
    tests = [t for t in lines if t.get("kind") == "test"]
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    failures = [{"test": t["test"], "message": t.get("message")} for t in tests
                if t["outcome"] in ("failed", "error")]
    session = next((t for t in lines if t.get("kind") == "session"), {})
    return {"counts": counts, "total": len(tests), "failures": failures, "session": session}


def summarize(doc: dict, test_lines: list[dict] | None = None) -> dict:
    env = doc["environment"]
    spec = find_device(env.get("device") or "")
    ceiling_rows = _ceiling_rows(doc, spec)
    ceilings = {row["metric"]: row["measured"] for row in ceiling_rows}
    return {
        "schema": REPORT_SCHEMA,
        "synthetic": bool(doc.get("synthetic")),
        "note": doc.get("note"),
        "mode": doc.get("mode"),
        "started": doc.get("started"), "finished": doc.get("finished"),
        "environment": env,
        "datasheet_device": spec.as_dict() if spec else None,
        "manifests": [_manifest_row(m) for m in doc.get("manifests", [])],
        "ceilings": ceiling_rows,
        "kernels": [_kernel_row(r, ceilings) for r in doc["results"]],
        "first_launch": doc["first_launch"],
        "errors": doc.get("errors", []),
        "tests": _test_summary(test_lines or []),
        "devices": [d.as_dict() for d in DEVICES],
    }


def _manifest_row(m: dict) -> dict:
    c = m.get("content") or {}
    return {"path": m.get("path"), "sha256": m.get("sha256"), "wheel": c.get("wheel"),
            "package": c.get("package"), "version": c.get("version"), "target": c.get("target"),
            "archs": (c.get("arch") or {}).get("value"), "wheel_sha256": c.get("wheel_sha256")}


# ---- Markdown ------------------------------------------------------------------------------------------
def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _md_environment(s: dict) -> list[str]:
    env = s["environment"]
    pk = ", ".join(f"{k} {v or 'not installed'}" for k, v in sorted(env.get("packages", {}).items()))
    lines = [f"- device: **{env.get('device')}**, compute capability {env.get('cc')}, "
             f"{env.get('sms')} SMs, {env.get('memory_gb')} GB",
             f"- driver {env.get('driver')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); "
             f"Python {env.get('python')} on {env.get('machine')}",
             f"- packages: {pk}",
             f"- run: {s.get('mode')} mode, {s.get('started')} .. {s.get('finished') or 'unfinished'}"]
    if not s["manifests"]:
        return lines + ["- wheel manifests: none recorded"]
    rows = [[m["wheel"] or m["path"], f"{m['package']} {m['version']}", str(m["target"]),
             str(m["archs"]), (m["wheel_sha256"] or "")[:16]] for m in s["manifests"]]
    return lines + ["", "Wheel manifests:", ""] + _table(["wheel", "package", "target", "archs", "sha256"], rows)


def _md_ceilings(s: dict) -> list[str]:
    rows = [[r["name"], f"{_num(r['measured'])} {UNITS[r['metric']]}", _num(r["datasheet"]),
             _num(r["fraction_of_datasheet"], "{:.2f}")] for r in s["ceilings"]]
    return _table(["ceiling", "measured", "datasheet", "measured / datasheet"], rows)


def _md_kernels(s: dict) -> list[str]:
    rows = []
    for k in s["kernels"]:
        if k["error"]:
            rows.append([k["name"], "ERROR", k["error"], "", "", "", ""])
            continue
        ref = (_num(k["reference_ms"], "{:.3f}") if k["reference_ms"]
               else f"n/a ({k['reference_error']})" if k["reference_error"] else "none")
        if k["reference_note"]:
            ref += f" ({k['reference_note']})"
        rows.append([k["name"], f"{k['median_ms']:.3f}", f"{k['achieved']:.1f} {UNITS[k['metric']]}",
                     _num(k["fraction_of_ceiling"], "{:.2f}"), ref, _num(k["speedup"], "{:.2f}x"),
                     k["package"] or ""])
    return _table(["kernel", "median ms", "achieved", "of ceiling", "reference ms", "speedup", "package"], rows)


def _md_first_launch(s: dict) -> list[str]:
    rows = []
    for f in s["first_launch"]:
        native = "yes" if f.get("native_code") else f"NO ({f.get('native_error')})"
        rows.append([f"{f['package']} {f['family']}", native,
                     _num(f.get("import_to_first_result_s"), "{:.2f}"), _num(f.get("second_call_s"), "{:.3f}"),
                     f.get("error") or ""])
    return _table(["family", "native code (PTX JIT off)", "import to first result s",
                   "second call s", "error"], rows)


def _md_devices(s: dict) -> list[str]:
    rows = [[d["name"], d["cc"], str(d["sms"]), _num(d["bandwidth_gbps"], "{:.0f}"),
             _num(d["bf16_dense_tflops"], "{:.0f}"), d["source"]] for d in s["devices"]]
    return _table(["device (datasheet)", "cc", "SMs", "GB/s", "BF16 dense TFLOP/s", "source"], rows)


def _md_tests(s: dict) -> list[str]:
    t = s["tests"]
    if t is None:
        return ["No kernel-test results were given (--tests)."]
    counts = ", ".join(f"{n} {k}" for k, n in sorted(t["counts"].items()))
    lines = [f"{t['total']} tests: {counts}."]
    for f in t["failures"]:
        lines.append(f"- FAILED `{f['test']}`: {f['message']}")
    return lines


def render_markdown(s: dict) -> str:
    out = ["# GPU kernel report", ""]
    if s["synthetic"]:
        out += ["> **SYNTHETIC FIXTURE: these numbers are invented for tests, not measurements.**", ""]
    out += _md_environment(s) + ["", "## Ceilings measured in this run", ""] + _md_ceilings(s)
    out += ["", "## Kernels", "", "Achieved rate over this run's measured ceiling; speedup = reference "
            "time / our time (> 1: ours is faster).", ""] + _md_kernels(s)
    out += ["", "## First launch (fresh process per family, JIT cache off)", ""] + _md_first_launch(s)
    out += ["", "## Kernel tests", ""] + _md_tests(s)
    if s["errors"]:
        out += ["", "## Errors", ""] + [f"- {e}" for e in s["errors"]]
    out += ["", "## Devices (datasheet figures, not measured)", ""] + _md_devices(s)
    return "\n".join(out) + "\n"


# ---- plots ---------------------------------------------------------------------------------------------
def _figure(rows: int = 1, cols: int = 1, height: float = 4.0, width: float = 5.5):
    from matplotlib.figure import Figure  # optional (the report extra); no pyplot: no global backend state

    fig = Figure(figsize=(width * cols, height), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]


def plot_ceilings(s: dict):
    """Measured ceilings of this device next to every device's datasheet figure."""
    fig, axes = _figure(1, 2)
    for ax, row in zip(axes, s["ceilings"]):
        key = "bandwidth_gbps" if row["metric"] == "gbps" else "bf16_dense_tflops"
        names = [d["name"] for d in s["devices"] if d[key]]
        values = [d[key] for d in s["devices"] if d[key]]
        colors = ["#9aa5b1"] * len(values)
        if row["measured"]:
            names.append(f"measured: {s['environment'].get('device')}")
            values.append(row["measured"])
            colors.append("#d95f02")
        ax.barh(names, values, color=colors)
        ax.set_xlabel(UNITS[row["metric"]])
        ax.set_ylabel("device (grey: datasheet)")
        ax.set_title(row["name"])
    return fig


def _kernel_bars(s: dict, key: str, xlabel: str, title: str, line_at: float):
    rows = [k for k in s["kernels"] if not k["error"] and k.get(key) is not None]
    fig, (ax,) = _figure(height=1.5 + 0.35 * max(len(rows), 1), width=10.0)
    ax.barh([k["name"] for k in rows], [k[key] for k in rows], color="#1b9e77")
    ax.axvline(line_at, color="black", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("kernel")
    ax.set_title(title)
    return fig


def plot_kernels_vs_ceiling(s: dict):
    return _kernel_bars(s, "fraction_of_ceiling", "achieved / this run's ceiling (copy GB/s, matmul TFLOP/s)",
                        "Kernels against this GPU's ceilings", 1.0)


def plot_kernels_vs_reference(s: dict):
    return _kernel_bars(s, "speedup", "speedup over torch SDPA: reference time / our time",
                        "Ours against the reference", 1.0)


def _save_png(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


# ---- writing -------------------------------------------------------------------------------------------
def write_report(results: str | Path, out_dir: str | Path, tests: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.json and the PNGs into ``out_dir``; returns name -> path."""
    doc = load_results(results)
    lines = load_test_lines(tests) if tests else None
    s = summarize(doc, lines)
    out = Path(out_dir)
    paths = {"report.json": atomic_write_json(out / "report.json", s),
             "report.md": atomic_write_text(out / "report.md", render_markdown(s))}
    plots = zip(PLOTS, (plot_ceilings, plot_kernels_vs_ceiling, plot_kernels_vs_reference))
    for name, plot in plots:
        paths[name] = _save_png(plot(s), out / name)
    return paths
