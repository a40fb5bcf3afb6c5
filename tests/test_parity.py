"""Greedy token-for-token parity of fastdebias with transformers (+ PEFT, unmerged) on every model variant."""

from __future__ import annotations

import pytest
import torch

import fastdebias
from fastdebias.errors import GenerationError
from fastdebias.generate import prefill

from .conftest import TOLERANCES, make_adapter, make_llama, save_peft05_bin_adapter

PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3], [1, 8, 9, 10, 11, 12, 13, 14, 15], [1, 77]]
NEW = 12


def hf_greedy(model_dir, prompts, n_new=NEW, adapter_dir=None, adapter_names=None, dtype=torch.float32, extra=None):
    """transformers' greedy generate on a left-padded batch; returns generated ids per row, cut after EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        dirs = adapter_dir if isinstance(adapter_dir, dict) else {"default": adapter_dir}
        first, *rest = dirs.items()
        model = PeftModel.from_pretrained(model, str(first[1]), adapter_name=first[0])
        for name, d in rest:
            model.load_adapter(str(d), adapter_name=name)
    model.eval()
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    kw = dict(do_sample=False, max_new_tokens=n_new, pad_token_id=0, num_beams=1, **(extra or {}))
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, t:].tolist()
    eos = (extra or {}).get("eos_token_id", model.generation_config.eos_token_id)
    eos = set(eos if isinstance(eos, list) else [eos])
    res = []
    for row in out:
        cut = next((j for j, x in enumerate(row) if x in eos), None)
        res.append(row if cut is None else row[: cut + 1])
    return res


def ours(model, prompts, n_new=NEW, **kw):
    return [r.token_ids for r in fastdebias.generate(model, prompts, max_new_tokens=n_new, **kw)]


@pytest.mark.parametrize(
    "variant",
    [
        dict(heads=4, kv_heads=4),  # MHA
        dict(heads=4, kv_heads=2),  # GQA
        dict(heads=6, kv_heads=2, hidden_size=48, tie=True),  # tied embeddings, GQA 3:1
        dict(vocab_size=203),  # vocab not a multiple of 64
        dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}),
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        dict(arch="mistral"),
        dict(layers=3, safe=False),  # legacy pytorch_model.bin
        dict(max_shard_size="60KB"),  # sharded safetensors + index
    ],
    ids=["mha", "gqa", "tied", "vocab203", "llama3-rope", "linear-rope", "mistral", "legacy-bin", "sharded"],
)
def test_base_parity(tmp_path, variant):
    d = make_llama(tmp_path / "m", **variant)
    if variant.get("max_shard_size"):
        assert (d / "model.safetensors.index.json").is_file()
    if variant.get("safe") is False:
        assert list(d.glob("pytorch_model*.bin"))
    model = fastdebias.load(d, dtype="float32", device="cpu", backend="torch", progress=False)
    assert ours(model, PROMPTS) == hf_greedy(d, PROMPTS)


def test_adapter_qv_parity(llama_dir, adapter_qv):
    model = fastdebias.load(llama_dir, adapter_qv, progress=False)
    got = ours(model, PROMPTS)
    assert got == hf_greedy(llama_dir, PROMPTS, adapter_dir=adapter_qv)
    # the adapter changes the output, so the comparison above is not vacuous
    assert got != ours(model, PROMPTS, adapter=None)


def test_adapter_all_projections_parity(llama_dir, adapter_all):
    model = fastdebias.load(llama_dir, adapter_all, progress=False)
    assert ours(model, PROMPTS) == hf_greedy(llama_dir, PROMPTS, adapter_dir=adapter_all)


def test_rslora_and_rank_pattern_parity(tmp_path, llama_dir):
    ad = make_adapter(
        llama_dir, tmp_path / "rs", r=8, alpha=32, targets=("q_proj", "v_proj", "down_proj"), use_rslora=True,
        rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 5},
    )
    model = fastdebias.load(llama_dir, ad, progress=False)
    assert ours(model, PROMPTS) == hf_greedy(llama_dir, PROMPTS, adapter_dir=ad)


def test_regex_targets_and_layers_to_transform(tmp_path, llama_dir):
    ad = make_adapter(llama_dir, tmp_path / "rx", targets=r".*\.(k_proj|up_proj)", seed=4)
    model = fastdebias.load(llama_dir, ad, progress=False)
    assert ours(model, PROMPTS) == hf_greedy(llama_dir, PROMPTS, adapter_dir=ad)
    ad2 = make_adapter(llama_dir, tmp_path / "lt", targets=("o_proj", "gate_proj"), layers_to_transform=[1], seed=5)
    model = fastdebias.load(llama_dir, ad2, progress=False)
    assert ours(model, PROMPTS) == hf_greedy(llama_dir, PROMPTS, adapter_dir=ad2)


def test_peft05_bin_adapter_parity(tmp_path, llama_dir, adapter_qv):
    old = save_peft05_bin_adapter(adapter_qv, tmp_path / "old")
    assert not (old / "adapter_model.safetensors").exists()
    model = fastdebias.load(llama_dir, old, progress=False)
    assert ours(model, PROMPTS) == hf_greedy(llama_dir, PROMPTS, adapter_dir=adapter_qv)


def test_merged_matches_unmerged(llama_dir, adapter_all):
    unmerged = fastdebias.load(llama_dir, adapter_all, progress=False)
    merged = fastdebias.load(llama_dir, adapter_all, merge=True, progress=False)
    ids = PROMPTS
    lu, *_ = prefill(unmerged, ids, 1, torch.zeros(len(ids), dtype=torch.int32))
    lm, *_ = prefill(merged, ids, 1, None)
    torch.testing.assert_close(lm, lu, rtol=1e-4, atol=1e-4)
    assert ours(merged, ids) == ours(unmerged, ids)
    # naming the merged adapter, once or per row, is the same call; anything else is refused
    name = merged.merged_adapter
    assert ours(merged, ids, adapter=name) == ours(merged, ids, adapter=[name] * len(ids)) == ours(merged, ids)
    for bad in (None, [name] * (len(ids) - 1) + [None], [name] * (len(ids) + 1)):
        with pytest.raises(GenerationError, match="merge=True"):
            ours(merged, ids, adapter=bad)


def test_multi_adapter_batch_matches_peft_mixed_batch(tmp_path, llama_dir, adapter_qv, adapter_all):
    model = fastdebias.load(llama_dir, {"qv": adapter_qv, "all": adapter_all}, progress=False)
    names = ["qv", "all", None, "all"]
    got = ours(model, PROMPTS, adapter=names)
    ref = hf_greedy(llama_dir, PROMPTS, adapter_dir={"qv": adapter_qv, "all": adapter_all},
                    adapter_names=["qv", "all", "__base__", "all"])
    assert got == ref
    # each row equals decoding it alone with its adapter: rows do not leak into each other
    for p, name, g in zip(PROMPTS, names, got):
        assert ours(model, [p], adapter=name)[0] == g


def test_batch_of_different_lengths_equals_one_by_one(llama_dir):
    model = fastdebias.load(llama_dir, progress=False)
    batch = ours(model, PROMPTS)
    assert batch == [ours(model, [p])[0] for p in PROMPTS]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_as_accurate_as_transformers(llama_dir, adapter_qv, dtype):
    """Half-precision logits vs the fp32 truth: no worse than transformers+PEFT in the same dtype (+25%)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def hf_logits(dt):
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=dt), str(adapter_qv))
        with torch.no_grad():
            return hf(torch.tensor(ids)).logits[:, -1].float()

    model = fastdebias.load(llama_dir, adapter_qv, dtype=dtype, progress=False)
    assert model.dtype == dtype
    ids = [PROMPTS[0]]
    got, *_ = prefill(model, ids, 1, torch.zeros(1, dtype=torch.int32))
    truth, ref = hf_logits(torch.float32), hf_logits(dtype)
    scale = truth.abs().max().item()
    err_ours, err_hf = (got - truth).abs().max().item(), (ref - truth).abs().max().item()
    assert err_ours <= 1.25 * err_hf + 1e-3 * scale, (err_ours, err_hf)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got, truth, rtol=rtol, atol=2.5 * atol * scale)


def test_bf16_greedy_equals_transformers_bf16_one_prompt_at_a_time(llama_dir):
    """bf16 on CPU (projections on oneDNN's packed weights where it computes bf16 natively): the same greedy tokens
    as transformers in bf16, each prompt alone. Not batched: in bf16 neither is batch-invariant (the GEMMs' blocking
    depends on the row count). Not with an adapter: the LoRA term rounds differently from PEFT's bf16 one (each
    within the half-precision accuracy test above), and a tiny random model's near-tied logits flip."""
    model = fastdebias.load(llama_dir, dtype="bfloat16", progress=False)
    for p in PROMPTS:
        assert ours(model, [p]) == hf_greedy(llama_dir, [p], dtype=torch.bfloat16)


def test_eos_stops_rows_like_transformers(llama_dir):
    model = fastdebias.load(llama_dir, progress=False)
    free = ours(model, PROMPTS, n_new=6)
    eos_ids = [free[0][2], free[1][1]]  # make tokens the model does produce act as EOS
    got = ours(model, PROMPTS, n_new=6, eos_token_id=eos_ids)
    assert got == hf_greedy(llama_dir, PROMPTS, n_new=6, extra={"eos_token_id": eos_ids})
    assert got[0][-1] in eos_ids and len(got[0]) <= 3


def test_embedded_smollm2_parity(embedded_dir):
    model = fastdebias.load(None, progress=False)
    tok = model.tokenizer
    texts = ["The capital of France is", "Write one sentence about fair hiring:"]
    prompts = [tok(t)["input_ids"] for t in texts]
    got = ours(model, prompts, n_new=16)
    assert got == hf_greedy(embedded_dir, prompts, n_new=16)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert model.config.tie_word_embeddings


def test_lm_head_adapter_parity_with_peft(tmp_path, llama_dir):
    """An adapter on the lm_head (peft also saves the head's base weight with it), unmerged, mixed with no-adapter
    rows: same greedy tokens as PEFT's mixed batch."""
    ad = make_adapter(llama_dir, tmp_path / "head", r=4, alpha=16, targets=["v_proj", "lm_head"], seed=11)
    model = fastdebias.load(llama_dir, {"head": ad}, progress=False)
    want = hf_greedy(llama_dir, PROMPTS, adapter_dir={"head": ad}, adapter_names=["head", "__base__", "head", "head"])
    assert ours(model, PROMPTS, adapter=["head", None, "head", "head"]) == want
    assert ours(model, PROMPTS, adapter=None) != ours(model, PROMPTS)  # the adapter changes the output
