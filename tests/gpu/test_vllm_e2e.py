"""vLLM end to end on a GPU: our vLLM wheel loads a tiny random Llama from disk and decodes 16 prompts
of mixed lengths greedily, once with the FlashInfer attention backend (our AOT wheel, JIT disabled)
and once with vLLM's FlashAttention backend; the tokens must be transformers' greedy tokens.

Install the built wheels first (vllm, and flashinfer-python from the AOT build); transformers must be
there too. A missing or broken vllm or transformers is a failure here, not a skip.

How a decode is judged (vllm_tiny_model.judge): transformers on the same GPU, bf16, is the reference.
Where vLLM's tokens equal transformers' greedy tokens, the prompt counts as exact; where they differ,
every vLLM token must still be one transformers would pick on vLLM's own path up to a near-tie
(its logit within TIE_MARGIN of the top logit, teacher-forced), and counts as tie-explained; anything
else fails. The chosen tokens' logprobs must agree within LOGPROB_ATOL throughout.

Each backend runs in its own Python (vLLM and the reference in one process can clash over the GPU
and over process start methods). Results: BLACKWHEEL_GPU_RESULTS/vllm-e2e-<BACKEND>.json (exact
matches, tie-explained divergences, tokens/s of one batch, vLLM version, the backend the engine
really used) and .log (vLLM's output); the folder defaults to a pytest tmp folder.

Environment:
- ``BLACKWHEEL_GPU_RESULTS=folder``: where the JSON and log files go.
- ``BLACKWHEEL_VLLM_E2E_EAGER=1``: ``enforce_eager`` (no torch.compile, no CUDA graphs): quicker to
  start; the default is vLLM's default, compiled with CUDA graphs, as users run it.
- ``BLACKWHEEL_VLLM_E2E_TIMEOUT=seconds``: the limit for one backend's run (default 600).
- ``BLACKWHEEL_VLLM_E2E_HEAD_DIM=64|128``: the tiny model's head dim (default 64).
- ``BLACKWHEEL_VLLM_E2E_KV_CACHE_DTYPE=auto|fp8``: vLLM's KV cache dtype (default auto: the model's).
- ``BLACKWHEEL_TRACE=flashinfer.jit.core:JitSpec.build_and_load``: record every FlashInfer module vLLM
  asks for into ``vllm-e2e-<BACKEND>.trace.json`` beside the results (the engine then runs in the
  worker's process, so the wrapper sees its loads): the trace a kernel set for vLLM is made from.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible", allow_module_level=True)
import kernel_check as kc  # noqa: E402  (beside this file; conftest puts it on the path)
import vllm_tiny_model as tm  # noqa: E402

pytestmark = pytest.mark.gpu

HEAD_DIM = int(os.environ.get("BLACKWHEEL_VLLM_E2E_HEAD_DIM", "64"))   # in FlashInfer's AOT set (64, 128)
MODEL_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "vocab_size", "dtype")
# fp8: what a KV cache of FP8 asks of FlashInfer (on 9.0 vLLM 0.25.1 also quantizes the prefill query);
# an FP8 cache rounds what attention reads, so near-ties may go the other way: a trace run, mostly
KV_CACHE_DTYPE = os.environ.get("BLACKWHEEL_VLLM_E2E_KV_CACHE_DTYPE", "auto")
MAX_TOKENS = 16
BENCH_PROMPTS, BENCH_TOKENS = 128, 128
# vLLM 0.25.1 has no VLLM_ATTENTION_BACKEND variable: the backend is AttentionConfig.backend
# (LLM(attention_config={"backend": ...}) or LLM(attention_backend=...)), as its own tests choose it.
BACKENDS = {
    # use_trtllm_attention=False: on SM90 vLLM would pick FlashInfer's XQA decode (and trtllm-gen on
    # SM100), cubins fetched from NVIDIA at run time; our AOT wheel ships FlashInfer's own kernels
    # and the machine has no network, so ask for those rather than depend on a failed download.
    "FLASHINFER": {"backend": "FLASHINFER", "use_trtllm_attention": False},
    "FLASH_ATTN": {"backend": "FLASH_ATTN"},
}
WORKER = Path(tm.__file__).resolve()
WORKER_ENV = {
    # FlashInfer: every kernel from the AOT wheel (no compiling, no downloads), the CUDA norm module
    "FLASHINFER_DISABLE_JIT": "1", "FLASHINFER_NO_DOWNLOAD": "1", "FLASHINFER_USE_CUDA_NORM": "1",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",   # LLM.apply_model sends a function to the engine process
    "PYTHONUNBUFFERED": "1",
}
# vllm/platforms/cuda.py: "Using AttentionBackendEnum.FLASHINFER backend." (asked for) or
# "Using FLASH_ATTN attention backend out of potential backends: [...]" (chosen by priority)
BACKEND_LOG = re.compile(r"Using (?:AttentionBackendEnum\.)?([A-Z][A-Z0-9_]+) (?:backend\.|attention backend out of)")


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    folder = os.environ.get("BLACKWHEEL_GPU_RESULTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("vllm-e2e")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def vllm_version() -> str:
    """vllm must import, in a Python of its own (none of vLLM in this process)."""
    proc = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        pytest.fail("vllm does not import on this GPU machine: " + " | ".join(tail), pytrace=False)
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny model on disk, the prompts as token ids, transformers' greedy tokens (bf16, this GPU),
    and the loaded transformers model for teacher forcing."""
    transformers = kc.import_or_fail("transformers")
    folder = tm.make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0, head_dim=HEAD_DIM)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(p).input_ids for p in tm.sample_prompts()]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()
    tokens = [tm.hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    assert all(len(t) == MAX_TOKENS for t in tokens), "transformers stopped early (EOS?)"
    return {"folder": folder, "prompts": prompts, "tokens": tokens, "model": model,
            "config": json.loads((folder / "config.json").read_text()),
            "transformers": transformers.__version__, "attn_implementation": model.config._attn_implementation}


def run_worker(spec: dict, stem: Path, inproc: bool = False) -> tuple[int | None, dict, str]:
    """Run vllm_tiny_model.py run-vllm in a fresh Python; returns (exit code or None on timeout,
    its JSON, its log). ``inproc``: the engine in the same process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
    so a FlashInfer error arrives with the name of the missing module."""
    spec_path, out, log = stem.with_suffix(".spec.json"), stem.with_suffix(".out.json"), stem.with_suffix(".log")
    spec_path.write_text(json.dumps(spec))
    out.unlink(missing_ok=True)
    env = dict(os.environ, **WORKER_ENV)
    if os.environ.get("BLACKWHEEL_TRACE"):     # the trace wrapper must see the engine's module loads
        inproc = True
        env["BLACKWHEEL_TRACE_OUT"] = str(stem.with_suffix(".trace.json"))
    if inproc:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    timeout = float(os.environ.get("BLACKWHEEL_VLLM_E2E_TIMEOUT", "600"))
    with open(log, "w") as f:
        # a session of its own: on a timeout the engine's processes go with it
        proc = subprocess.Popen([sys.executable, str(WORKER), "run-vllm", str(spec_path), str(out)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    text = log.read_text(errors="replace")
    return rc, (json.loads(out.read_text()) if out.is_file() else {}), text


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_vllm_greedy_matches_transformers(backend, reference, vllm_version, results_dir, record) -> None:
    eager = os.environ.get("BLACKWHEEL_VLLM_E2E_EAGER") == "1"
    spec = {"model": str(reference["folder"]), "prompts": reference["prompts"], "max_tokens": MAX_TOKENS,
            "attention_config": BACKENDS[backend], "enforce_eager": eager, "max_model_len": 1024,
            "gpu_memory_utilization": 0.25, "bench_prompts": BENCH_PROMPTS, "bench_tokens": BENCH_TOKENS,
            "kv_cache_dtype": KV_CACHE_DTYPE}
    stem = results_dir / f"vllm-e2e-{backend}"
    t0 = time.perf_counter()
    rc, run, log = run_worker(spec, stem)
    summary = {"backend_requested": backend, "attention_config": BACKENDS[backend], "enforce_eager": eager,
               "kv_cache_dtype": KV_CACHE_DTYPE,
               "vllm_version": run.get("vllm", vllm_version), "torch": run.get("torch"),
               "flashinfer": run.get("flashinfer"), "device": run.get("device"),
               "transformers": reference["transformers"], "hf_attn_implementation": reference["attn_implementation"],
               "backend_from_log": sorted(set(BACKEND_LOG.findall(log))), "layers": run.get("layers"),
               "exit_code": rc, "wall_s": round(time.perf_counter() - t0, 1), "startup_s": run.get("startup_s"),
               "model": {k: reference["config"].get(k) for k in MODEL_KEYS},
               "prompt_lengths": [len(p) for p in reference["prompts"]], "max_tokens": MAX_TOKENS,
               "tie_margin": tm.TIE_MARGIN, "logprob_atol": tm.LOGPROB_ATOL}

    if rc != 0:
        if "JIT compilation is disabled" in log and not run.get("missing_modules"):
            # the engine's own process swallowed the module name: once more with the engine in process
            _, again, _ = run_worker(spec, results_dir / f"vllm-e2e-{backend}-inproc", inproc=True)
            run["missing_modules"] = again.get("missing_modules", [])
        summary.update(error=run.get("error"), missing_modules=run.get("missing_modules"))
        (stem.with_suffix(".json")).write_text(json.dumps(summary, indent=1))
        why = "timed out" if rc is None else f"exit code {rc}"
        missing = run.get("missing_modules") or []
        if missing:
            why += f"; FlashInfer kernels missing from the AOT wheel: {missing}"
        if any(name.endswith("_sm90") for name in missing):   # FlashInfer names its fa3 modules so
            why += (" (vLLM's FlashInfer prefill asks for backend='auto', which FlashInfer resolves to fa3"
                    " on SM90: the installed kernel set lacks these FA3 modules)")
        pytest.fail(f"vLLM with {backend} {why}; log {stem.with_suffix('.log')}:\n{_tail(log)}", pytrace=False)

    verdicts = []
    for prompt, ref_tokens, tokens, logprobs in zip(reference["prompts"], reference["tokens"],
                                                    run["tokens"], run["logprobs"]):
        forced = tm.hf_forced(reference["model"], prompt, tokens)
        verdicts.append(tm.judge(ref_tokens, tokens, forced, logprobs))
    counts = {k: sum(v.outcome == k for v in verdicts) for k in ("exact", "tie", "mismatch")}
    used = sorted({layer[0] for layer in run["layers"] if isinstance(layer, list)}) or summary["backend_from_log"]
    summary.update(backend_used=used, counts=counts,
                   matched_tokens=sum(v.matched for v in verdicts), compared_tokens=MAX_TOKENS * len(verdicts),
                   max_gap=max(v.max_gap for v in verdicts),
                   max_logprob_diff=max(v.max_logprob_diff for v in verdicts),
                   tokens_per_s=run["bench"]["tokens_per_s"], bench=run["bench"],
                   prompts=[{"length": len(p), "ref": r, "vllm": t, **vars(v)}
                            for p, r, t, v in zip(reference["prompts"], reference["tokens"], run["tokens"], verdicts)])
    (stem.with_suffix(".json")).write_text(json.dumps(summary, indent=1))
    record(exact=counts["exact"], tie=counts["tie"], mismatch=counts["mismatch"], backend_used=",".join(used),
           tokens_per_s=run["bench"]["tokens_per_s"], max_gap=summary["max_gap"],
           max_logprob_diff=summary["max_logprob_diff"], vllm=summary["vllm_version"])

    assert used == [backend], f"asked for {backend}, the engine used {used} (log: {summary['backend_from_log']})"
    bad = [f"prompt {i} (length {len(p)}): positions {v.bad}, largest gap {v.max_gap:.3f}, "
           f"largest logprob diff {v.max_logprob_diff:.3f}"
           for i, (p, v) in enumerate(zip(reference["prompts"], verdicts)) if v.outcome == "mismatch"]
    assert not bad, f"{backend}: {len(bad)} of {len(verdicts)} prompts diverge from transformers: " + "; ".join(bad)
