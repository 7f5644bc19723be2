"""Everything the vLLM end-to-end test (test_vllm_e2e.py) needs outside pytest: a tiny Llama-style
model with random weights made on the spot, the transformers reference, the rule that judges a decode
against it, and the vLLM run itself (``python vllm_tiny_model.py run-vllm SPEC.json OUT.json``).

Why random weights made here: the GPU machine has no network, and a hub model would test the
download path, not our wheels. Everything is made from a seed on the CPU (same seed, same bytes),
so the model vLLM loads on the GPU machine is the one checked on any CPU.

Why these weight scales (not transformers' init, std 0.02): with std 0.02 every logit is close to
zero and greedy decoding is a string of near-ties that any rounding difference flips. Here every
linear layer has std 1/sqrt(fan_in), so each block adds O(1) to the residual stream and attention
scores have O(1) spread (attention decides the next token, which is what the test is about), and
the LM head spreads logits with std ~LOGIT_STD, so the top two are usually apart.

Why vLLM runs from this file and not from the test module: vLLM starts its engine in a child
process, and a spawned child re-imports the main module; this one imports only the standard library
at the top, so that is harmless. torch, transformers, tokenizers and vllm are imported inside the
functions: pytest's --doctest-modules imports this module in the CPU test venv, which has none of
transformers, tokenizers or vllm.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]        # ids 0..3: unk, bos, eos, pad
LOGIT_STD = 4.0
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def words(count: int) -> list[str]:
    """``count`` distinct pronounceable words, always the same ones (the tokenizer's vocabulary).

    >>> words(3)
    ['ba', 'be', 'bi']
    >>> len(set(words(2000)))
    2000
    """
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]             # 70
    out = list(syllables)
    for a in syllables:
        for b in syllables:
            out.append(a + b)                                              # + 4900
    if count > len(out):
        raise ValueError(f"at most {len(out)} words")
    return out[:count]


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer (``transformers.PreTrainedTokenizerFast``): specials, then words.

    Splits on whitespace, maps unknown words to ``<unk>``, puts ``<s>`` in front as Llama does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + words(vocab_size - len(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", model_max_length=4096)


def _init_weights(model, seed: int) -> None:
    """Overwrite every parameter from our own CPU generator, in sorted name order, so the weights do
    not depend on transformers' init code or version (see the module docstring for the scales)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                std, mean = 0.1, 1.0                       # RMSNorm gains near 1, not all equal
            elif "embed_tokens" in name:
                std, mean = 1.0, 0.0
            elif name.startswith("lm_head"):
                std, mean = LOGIT_STD / math.sqrt(hidden), 0.0
            else:                                          # q/k/v/o, gate/up/down: [out, in]
                std, mean = 1.0 / math.sqrt(p.shape[1]), 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean)
        # Specials are never predicted (logit exactly 0 against a top logit near 15): neither decoder
        # meets EOS, so stopping rules play no part in the comparison.
        model.lm_head.weight[:len(SPECIALS)] = 0


def make_tiny_llama(folder, seed: int = 0, *, head_dim: int = 64, hidden_size: int = 256,
                    num_layers: int = 4, num_heads: int = 8, num_kv_heads: int = 4,
                    intermediate_size: int = 512, vocab_size: int = 2048,
                    max_position_embeddings: int = 2048, dtype: str = "bfloat16") -> Path:
    """Write a random ``LlamaForCausalLM`` (safetensors) and its tokenizer into ``folder``; returns it.

    Defaults: hidden 256, 4 layers, 8 query heads over 4 KV heads (GQA), head_dim 64 (FlashInfer's
    AOT set has head dims 64 and 128 only), vocab 2048, bf16. Deterministic: the same arguments give
    the same bytes (``fingerprint``). Runs on the CPU; no hub access.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config)
    _init_weights(model, seed)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer(vocab_size).save_pretrained(folder)
    return folder


def fingerprint(folder) -> dict[str, str]:
    """sha256 of every file in ``folder`` (name -> hex): what "same seed, same bytes" compares."""
    folder = Path(folder)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


# ---- prompts and the judging of a decode ---------------------------------------------------------
# Word counts that put prompt lengths (one more, for <s>) on both sides of 16-token KV pages and of
# 64-row attention tiles, from a single token up to a few hundred.
PROMPT_WORDS = [0, 1, 2, 4, 7, 12, 15, 16, 17, 31, 48, 63, 64, 100, 200, 300]


def sample_prompts(seed: int = 0, vocab_size: int = 2048) -> list[str]:
    """One prompt per ``PROMPT_WORDS`` entry: random words of the tokenizer's vocabulary.

    >>> [len(p.split()) for p in sample_prompts()][:5]
    [0, 1, 2, 4, 7]
    >>> sample_prompts() == sample_prompts()
    True
    """
    rng = random.Random(seed)
    vocab = words(vocab_size - len(SPECIALS))
    return [" ".join(rng.choice(vocab) for _ in range(n)) for n in PROMPT_WORDS]


# A near-tie: the vLLM token's reference logit is within TIE_MARGIN of the reference's top logit, so
# two correct bf16 implementations may pick either. Logits here reach ~16, where one bf16 step is
# 0.0625-0.125; two correct bf16 implementations on the CPU (transformers' eager vs SDPA attention)
# differ by up to ~0.22 in a logit, and by up to ~0.10 in the chosen token's logprob. A wrong
# attention result moves logits by O(LOGIT_STD), far beyond both bounds.
TIE_MARGIN = 0.5
LOGPROB_ATOL = 0.3


@dataclass
class Verdict:
    """How one prompt's decode compares with the reference (transformers, same GPU, same dtype)."""
    outcome: str              # "exact" (= transformers' greedy tokens), "tie" (differs only at
                              # near-ties), "mismatch" (anything else)
    matched: int              # leading tokens equal to transformers' greedy tokens
    ties: int                 # positions where the token is not the reference's argmax (within the margin)
    bad: list[int]            # positions off by more than the margin, or with a logprob off
    max_gap: float            # largest reference (top-1 logit - logit of the token chosen)
    max_logprob_diff: float   # largest |logprob - reference logprob| of the chosen tokens


def judge(ref_tokens: list[int], tokens: list[int], forced: list[tuple[float, float, float, int]],
          logprobs: list[float] | None = None, tie_margin: float = TIE_MARGIN,
          logprob_atol: float = LOGPROB_ATOL) -> Verdict:
    """Judge a greedy decode ``tokens`` of one prompt against the reference.

    ``ref_tokens``: the reference's own greedy decode (transformers ``generate``). ``forced[i]``: the
    reference run on the prompt plus ``tokens[:i]`` (teacher forcing): its top logit, the logit of
    ``tokens[i]``, that token's logprob and the reference's own pick (``hf_forced``).
    ``logprobs[i]``: the decoder's own logprob of ``tokens[i]``.

    The issue's rule is "equal up to the first position where the reference's top two are within a
    small margin": at that first divergence the forced prefix is the reference's own, so a token
    within ``tie_margin`` of the top logit is exactly such a near-tie. Teacher forcing then also
    checks every later token on the decoder's own path, instead of giving up after the divergence.

    >>> forced = lambda toks, gaps: [(9.0, 9.0 - g, -0.1, t if g == 0 else -1) for t, g in zip(toks, gaps)]
    >>> judge([5, 6, 7], [5, 6, 7], forced([5, 6, 7], [0, 0, 0]), [-0.1] * 3).outcome
    'exact'
    >>> v = judge([5, 6, 7], [5, 8, 9], forced([5, 8, 9], [0, 0.1, 0]))
    >>> v.outcome, v.matched, v.ties
    ('tie', 1, 1)
    >>> judge([5, 6, 7], [5, 8, 7], forced([5, 8, 7], [0, 3.0, 0])).bad
    [1]
    >>> judge([5, 6], [5, 6], forced([5, 6], [0, 0]), [-0.1, -0.9]).outcome
    'mismatch'
    >>> judge([5, 6, 7], [5, 6], forced([5, 6], [0, 0])).outcome
    'mismatch'
    """
    gaps = [f[0] - f[1] for f in forced]
    diffs = [abs(lp - f[2]) for lp, f in zip(logprobs or [], forced)]
    bad = [i for i, g in enumerate(gaps) if g > tie_margin]
    bad += [i for i, d in enumerate(diffs) if d > logprob_atol and i not in bad]
    matched = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b),
                   min(len(tokens), len(ref_tokens)))
    ties = sum(1 for t, f in zip(tokens, forced) if t != f[3])
    if bad or len(tokens) != len(ref_tokens) or len(forced) != len(tokens):
        outcome = "mismatch"
    else:
        outcome = "exact" if tokens == ref_tokens else "tie"
    return Verdict(outcome, matched, ties, sorted(bad), max(gaps, default=0.0), max(diffs, default=0.0))


# ---- the reference: transformers, on whatever device the model is on ------------------------------
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy decode (``generate``, do_sample=False) of one prompt, no padding.

    One prompt at a time: a padded batch would change the numerics (masked rows, shifted positions).
    ``eos_token_id=None``: never stop early (specials are never predicted anyway, see _init_weights).
    """
    import torch

    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def hf_forced(model, prompt: list[int], tokens: list[int]) -> list[tuple[float, float, float, int]]:
    """Teacher forcing: one forward pass over prompt + tokens; for each position i, given the prompt
    and ``tokens[:i]``: the top logit, the logit of ``tokens[i]``, its logprob, the top token."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt + tokens], device=model.device)
        logits = model(ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(tokens)].float()
    chosen = torch.tensor(tokens, device=logits.device)[:, None]
    top = logits.max(-1)
    return list(zip(top.values.tolist(), logits.gather(1, chosen)[:, 0].tolist(),
                    logits.log_softmax(-1).gather(1, chosen)[:, 0].tolist(), top.indices.tolist()))


# ---- the vLLM side: runs in a fresh Python (``main`` below) ----------------------------------------
def _layer_backends(model) -> list[list]:
    """[backend name, impl class, flash-attn version] of each kind of attention layer in the model;
    runs inside vLLM's worker (``LLM.apply_model``), so it imports what it needs itself."""
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    seen = {(m.get_attn_backend().get_name(), type(getattr(m, "impl", None)).__name__,
             getattr(getattr(m, "impl", None), "vllm_flash_attn_version", None))
            for m in model.modules() if isinstance(m, AttentionLayerBase)}
    return [list(s) for s in sorted(seen, key=str)]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_vllm(spec: dict) -> dict:
    """Load ``spec["model"]`` in vLLM with ``spec["attention_config"]``, decode ``spec["prompts"]``
    (token ids) greedily, then time one larger batch. Returns tokens, logprobs and the figures.

    Token ids, not text, go in: both sides then see exactly the same input.
    """
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], tokenizer=spec["model"], dtype="bfloat16", seed=0,
              max_model_len=spec["max_model_len"], max_num_seqs=spec["bench_prompts"],
              gpu_memory_utilization=spec["gpu_memory_utilization"], enforce_eager=spec["enforce_eager"],
              kv_cache_dtype=spec.get("kv_cache_dtype", "auto"),
              attention_config=spec["attention_config"])
    startup_s = time.perf_counter() - t0
    try:
        layers = llm.apply_model(_layer_backends)[0]
    except Exception as exc:             # the log line still says which backend was chosen
        layers = [f"apply_model failed: {type(exc).__name__}: {exc}"]

    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=1, ignore_eos=True)
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                for o in outs]

    # throughput: the prompts repeated to one batch; a first pass warms every batch size up
    batch = [prompts[i % len(prompts)] for i in range(spec["bench_prompts"])]
    bench = SamplingParams(temperature=0.0, max_tokens=spec["bench_tokens"], ignore_eos=True)
    llm.generate(batch, bench, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(batch, bench, use_tqdm=False)
    seconds = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "vllm": vllm.__version__, "torch": torch.__version__, "flashinfer": _version("flashinfer-python"),
        "device": torch.cuda.get_device_name(0), "layers": layers, "startup_s": round(startup_s, 2),
        "tokens": tokens, "logprobs": logprobs,
        "bench": {"prompts": len(batch), "max_tokens": spec["bench_tokens"], "generated_tokens": generated,
                  "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in batch),
                  "seconds": round(seconds, 4), "tokens_per_s": round(generated / seconds, 1)},
    }


def missing_modules(exc: BaseException) -> list[str]:
    """Names of FlashInfer modules a ``MissingJITCacheError`` in the exception's chain asked for
    (its message does not name the module; its ``spec`` does)."""
    names, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = getattr(getattr(exc, "spec", None), "name", None)
        if name:
            names.append(name)
        exc = exc.__cause__ or exc.__context__
    return names


def main(argv: list[str]) -> int:
    """``run-vllm SPEC.json OUT.json``: run_vllm; on an error, OUT.json says what failed."""
    if len(argv) != 3 or argv[0] != "run-vllm":
        print("usage: vllm_tiny_model.py run-vllm SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec, out = json.loads(Path(argv[1]).read_text()), Path(argv[2])
    trace_out = _start_trace()
    try:
        result = run_vllm(spec)
    except BaseException as exc:
        out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000],
                                   "missing_modules": missing_modules(exc)}))
        raise
    finally:
        if trace_out:
            from blackwheel.reports import upstream_trace
            upstream_trace.write_recorded(trace_out)
    out.write_text(json.dumps(result))
    return 0


def _start_trace() -> str | None:
    """``BLACKWHEEL_TRACE`` (``module:Class.method``) and ``BLACKWHEEL_TRACE_OUT``: record every FlashInfer
    module vLLM asks for, hits and misses. The engine must run in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): a wrapper installed here does not reach a spawned engine."""
    target, out = os.environ.get("BLACKWHEEL_TRACE"), os.environ.get("BLACKWHEEL_TRACE_OUT")
    if not (target and out):
        return None
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise SystemExit("vllm_tiny_model: a trace needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine in process)")
    from blackwheel.reports import upstream_trace
    upstream_trace.install(target)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
