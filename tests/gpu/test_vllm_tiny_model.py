"""The vLLM end-to-end test's input and judge, on the CPU: the tiny random Llama (vllm_tiny_model.py)
is deterministic, transformers loads it from disk and decodes it greedily, and the judge passes the
reference against itself and fails a wrong decode.

Why here, in tests/gpu/, though it needs no GPU: it needs transformers and tokenizers, which the CPU
test venv (nox -s tests) does not have, while the GPU machine does; importorskip would hide a missing
package, so it runs where the end-to-end test runs (a few seconds, on the CPU there). On a machine
without a GPU, ``BLACKWHEEL_GPU_TESTS_DEVICE=cpu`` runs it (with transformers installed).
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

import kernel_check as kc  # noqa: E402  (beside this file; conftest puts it on the path)
import vllm_tiny_model as tm  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def transformers():
    return kc.import_or_fail("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, transformers):
    return tm.make_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def model(folder, transformers):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def test_same_seed_same_bytes(folder, tmp_path) -> None:
    again = tm.fingerprint(tm.make_tiny_llama(tmp_path / "again", seed=0))
    assert again == tm.fingerprint(folder)
    other = tm.fingerprint(tm.make_tiny_llama(tmp_path / "other", seed=1))
    assert {name for name in other if other[name] != again[name]} == {"model.safetensors"}


def test_the_files_are_a_small_bf16_gqa_llama(folder) -> None:
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (8, 4, 64)
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (256, 4, 2048)
    with safe_open(folder / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [4 * 64, 256]
    assert dtypes == {"BF16"}
    assert not list(folder.glob("*.bin")), "weights must be safetensors only"


@pytest.mark.parametrize("head_dim", [128])
def test_other_head_dim(tmp_path, transformers, head_dim) -> None:
    folder = tm.make_tiny_llama(tmp_path, seed=0, head_dim=head_dim)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.head_dim == head_dim


def test_tokenizer_round_trip(folder, transformers) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = tm.sample_prompts()
    ids = [tokenizer(p).input_ids for p in prompts]
    assert [len(i) for i in ids] == [n + 1 for n in tm.PROMPT_WORDS]     # <s> + one token per word
    assert all(i[0] == tokenizer.bos_token_id == 1 for i in ids)
    assert not any(tokenizer.unk_token_id in i[1:] for i in ids)
    assert tokenizer.decode(ids[5], skip_special_tokens=True) == prompts[5]


def test_transformers_decodes_greedily_and_the_judge_agrees(folder, model, transformers) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(p).input_ids for p in tm.sample_prompts()[:6]]
    decodes = [tm.hf_greedy(model, p, 8) for p in prompts]
    assert all(len(d) == 8 and min(d) >= len(tm.SPECIALS) for d in decodes)   # never a special token
    assert len({tuple(d) for d in decodes}) > 1, "every prompt gives the same output: attention plays no part"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert [tm.hf_greedy(reloaded, p, 8) for p in prompts] == decodes
    for p, d in zip(prompts, decodes):
        forced = tm.hf_forced(model, p, d)
        verdict = tm.judge(d, d, forced, [f[2] for f in forced])
        assert verdict.outcome == "exact" and verdict.max_gap <= tm.TIE_MARGIN, verdict
        wrong = tm.judge(d, d[::-1], tm.hf_forced(model, p, d[::-1]))
        assert wrong.outcome == "mismatch", wrong
