"""Every bad input raises a FastDebiasError subclass whose message names the file/field/argument."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastdebias
from fastdebias import AdapterError, CheckpointError, GenerationError

from .conftest import make_adapter, make_llama


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_weights_larger_than_free_memory_refused_before_reading(llama_dir, monkeypatch):
    """A checkpoint whose weights (in the dtype asked for) exceed the memory available is refused with the sizes and
    the fix, before any weight is read (the host's OOM killer would end the process with no message)."""
    from fastdebias import loader, pipeline
    from fastdebias.loader import expected_shapes, load_config

    fp32 = sum(torch.Size(s).numel() for s in expected_shapes(load_config(llama_dir)).values()) * 4
    monkeypatch.setattr(pipeline, "load_base_weights", lambda *a, **k: pytest.fail("weights read"))
    monkeypatch.setattr(pipeline, "available_memory", lambda dev: fp32 - 1)
    with pytest.raises(CheckpointError, match=rf"{llama_dir.name}: its weights take .* GiB in float32, more than "
                                              r"the .* GiB available on this host: load with dtype='bfloat16'"):
        fastdebias.load(llama_dir, progress=False)
    monkeypatch.setattr(pipeline, "available_memory", lambda dev: fp32 // 2 - 1)
    with pytest.raises(CheckpointError, match=r"more than .*: free memory, or use a machine with more"):
        fastdebias.load(llama_dir, progress=False)
    with pytest.raises(CheckpointError, match=r"in bfloat16, more than .*: free memory, or use a machine with more"):
        fastdebias.load(llama_dir, dtype="bfloat16", progress=False)
    monkeypatch.setattr(pipeline, "load_base_weights", loader.load_base_weights)
    monkeypatch.setattr(pipeline, "available_memory", lambda dev: fp32)  # exactly enough
    assert fastdebias.load(llama_dir, progress=False).dtype == torch.float32


def test_missing_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        fastdebias.load(tmp_path / "nope", progress=False)


def test_missing_config(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json.*not found"):
        fastdebias.load(d, progress=False)


def test_missing_weights(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        fastdebias.load(d, progress=False)


def test_invalid_json_config(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        fastdebias.load(d, progress=False)


def test_unsupported_architecture(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*not supported"):
        fastdebias.load(d, progress=False)


def test_truncated_safetensors(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        fastdebias.load(d, progress=False)


def test_corrupt_safetensors_header(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        fastdebias.load(d, progress=False)


def test_shard_listed_but_absent(tmp_path):
    d = make_llama(tmp_path / "m", max_shard_size="60KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[1].name}.*not in"):
        fastdebias.load(d, progress=False)


def test_wrong_tensor_shape(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(7, 64\)"):
        fastdebias.load(d, progress=False)


def test_missing_tensor(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.norm\.weight"):
        fastdebias.load(d, progress=False)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_bin_refused_by_weights_only(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save({**sd, "evil": _Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused to unpickle"):
        fastdebias.load(d, progress=False)


def test_adapter_for_other_base_shapes(tmp_path, llama_dir):
    other = make_llama(tmp_path / "other", hidden_size=32, heads=4, kv_heads=2, intermediate=48)
    ad = make_adapter(other, tmp_path / "ad")
    with pytest.raises(AdapterError, match=r"q_proj.*do not fit the base layer"):
        fastdebias.load(llama_dir, ad, progress=False)


def test_adapter_target_module_absent(tmp_path, llama_dir, adapter_qv):
    ad = copy(adapter_qv, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["qkv_proj"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"target_modules=.*qkv_proj.*matches no module"):
        fastdebias.load(llama_dir, ad, progress=False)


def test_adapter_tensor_for_nonexistent_module(tmp_path, llama_dir, adapter_qv):
    ad = copy(adapter_qv, tmp_path / "ad")
    sd = load_file(str(ad / "adapter_model.safetensors"))
    sd["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
    save_file(sd, str(ad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"layers\.9\.self_attn\.q_proj.*does not exist"):
        fastdebias.load(llama_dir, ad, progress=False)


def test_adapter_with_a_changed_copy_of_the_lm_head(tmp_path, llama_dir):
    """peft saves lm_head's base weight with an adapter that targets it: equal to the checkpoint's → loads; changed
    (a trained or resized head) → AdapterError naming the file, since every adapter shares one base model."""
    ad = make_adapter(llama_dir, tmp_path / "head", r=4, targets=["lm_head"])
    path = ad / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lm_head.base_layer.weight"))
    assert fastdebias.load(llama_dir, ad, progress=False).adapter_names == ["head"]
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors.*own copy of 'lm_head\.weight'"):
        fastdebias.load(llama_dir, ad, progress=False)


def test_adapter_r_disagrees_with_tensors(tmp_path, llama_dir, adapter_qv):
    ad = copy(adapter_qv, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["r"] = 16
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"rank 8/8 but adapter_config\.json says r=16"):
        fastdebias.load(llama_dir, ad, progress=False)


@pytest.mark.parametrize(
    "field,value,msg",
    [("use_dora", True, "DoRA"), ("modules_to_save", ["lm_head"], "modules_to_save"), ("bias", "all", "bias"),
     ("fan_in_fan_out", True, "fan_in_fan_out"), ("peft_type", "IA3", "only LoRA")],
)
def test_adapter_unsupported_features(tmp_path, llama_dir, adapter_qv, field, value, msg):
    ad = copy(adapter_qv, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg[field] = value
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=msg):
        fastdebias.load(llama_dir, ad, progress=False)


def test_adapter_dir_missing_and_weights_missing(tmp_path, llama_dir, adapter_qv):
    with pytest.raises(AdapterError, match="not found"):
        fastdebias.load(llama_dir, tmp_path / "none", progress=False)
    ad = copy(adapter_qv, tmp_path / "ad")
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model"):
        fastdebias.load(llama_dir, ad, progress=False)


def test_merge_needs_exactly_one_adapter(llama_dir):
    with pytest.raises(AdapterError, match="merge=True needs exactly one adapter"):
        fastdebias.load(llama_dir, merge=True, progress=False)


@pytest.fixture(scope="module")
def model(llama_dir):
    return fastdebias.load(llama_dir, progress=False)


@pytest.mark.parametrize(
    "prompts,kwargs,msg",
    [
        ([], {}, "prompts: expected a non-empty"),
        (["a", ""], {}, r"prompts\[1\] is an empty string"),
        ([[1, 2], []], {}, r"prompts\[1\] is empty"),
        ([[1, 999]], {}, r"prompts\[0\] holds token id\(s\) \[999\] outside the vocabulary"),
        ([[1] * 510], {"max_new_tokens": 10}, r"prompts\[0\] has 510 tokens.*context of 512"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ([[1, 2]], {"temperature": -0.5}, "temperature must be"),
        ([[1, 2]], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([[1, 2]], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ([[1, 2]], {"top_k": -1}, "top_k must be"),
        ([[1, 2]], {"repetition_penalty": 0}, "repetition_penalty must be"),
        ([[1, 2]], {"adapter": "nope"}, "adapter='nope' is not a loaded adapter"),
        ([[1, 2]], {"stop": [""]}, "stop: expected a non-empty string or a list of them"),
        ([[1, 2]], {"stop": 5}, "stop: expected a non-empty string or a list of them"),
        ([[1, 2]], {"temperature": True}, "temperature must be"),
        ([[1, 2]], {"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
        ([[1, 2]], {"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
        ([[1, 2]], {"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ([[1, 2]], {"min_p": float("nan")}, r"min_p must be in \[0, 1\]"),
        ([[1, 2]], {"min_p": "0.1"}, r"min_p must be in \[0, 1\]"),
        ([[1, 2]], {"repetition_penalty": False}, "repetition_penalty must be"),
        ([[1, 2]], {"batch_size": True}, "batch_size must be"),
        ([[1, 2]], {"seed": "abc", "temperature": 1.0}, "seed: expected an integer"),
        ([[1, 2]], {"seed": 1.5}, "seed: expected an integer"),
        ([[1, 2]], {"eos_token_id": "21"}, "eos_token_id: expected an int token id"),
        ([[1, 2]], {"eos_token_id": [2.9]}, "eos_token_id: expected an int token id"),
        ([[1, 2]], {"eos_token_id": True}, "eos_token_id: expected an int token id"),
        ([[1.7, 5.2]], {}, r"prompts\[0\]: token ids must be integers, got 1.7"),
        ([["5", "6"]], {}, r"prompts\[0\]: token ids must be integers, got '5'"),
        ([[[1, 2]]], {}, r"prompts\[0\]: token ids must be integers"),
        ([[True, 5]], {}, r"prompts\[0\]: token ids must be integers, got True"),
        ([torch.tensor([1.0, 2.0])], {}, r"prompts\[0\]: a tensor of token ids must hold integers"),
        (["old \udcff people"], {}, r"prompts\[0\] holds a character that is not valid Unicode.*position 4"),
        ([[1, 2]], {"stop": ["a\udcff"]}, r"stop\[0\] holds a character that is not valid Unicode"),
        ([[1, 2]], {"stream": "print"}, "stream: expected a callable stream"),
        ([[1, 2]], {"stream": lambda text: None}, r"stream: .* cannot be called as stream\(index, new_text\)"),
        ([[1, 2]], {"stream": lambda i, s, extra: None}, "give it two parameters"),
    ],
)
def test_generate_argument_errors(model, prompts, kwargs, msg):
    with pytest.raises(GenerationError, match=msg):
        fastdebias.generate(model, prompts, **kwargs)


def test_generate_accepts_what_it_should(model):
    """The other side of the checks above: numpy and tensor integers, a seed of any size, an int tensor of EOS ids."""
    import numpy as np

    def ids(prompts, **kw):
        return fastdebias.generate(model, prompts, **{"max_new_tokens": 4, **kw})[0].token_ids

    want = ids([[1, 2, 3]])
    assert ids([torch.tensor([1, 2, 3])]) == want and ids([[np.int64(1), 2, 3]]) == want
    assert ids([[1, 2, 3]], eos_token_id=torch.tensor([want[1]])) == want[:2]
    assert ids([[1, 2, 3]], eos_token_id=np.array([want[1]])) == want[:2]  # a numpy array of ids, as a tensor
    with pytest.raises(GenerationError, match=r"eos_token_id: a numpy array of dtype float64; give integer token"):
        ids([[1, 2, 3]], eos_token_id=np.array([2.0]))
    lex = fastdebias.Lexicon.from_token_sequences({(want[2],): -1.0})  # numpy integers for the integer arguments
    assert ids([[1, 2, 3]], max_new_tokens=np.int64(4), top_k=np.int32(0), max_rewinds=np.int64(2), lexicon=lex) \
        == ids([[1, 2, 3]], lexicon=lex, max_rewinds=2)  # fmt: skip
    for seed in (2**70, -5, np.int32(7)):  # any integer seeds the sampler; the same one gives the same tokens
        assert ids([[1, 2]], temperature=1.0, seed=seed) == ids([[1, 2]], temperature=1.0, seed=seed)
    calls = []  # any callable that takes (prompt_index, new_text) streams: *args, a default, a bound method

    class Sink:
        def write(self, i, text):
            calls.append((i, text))

    for stream in (lambda *a: calls.append(a), lambda i, s, sep="": calls.append((i, s)), Sink().write):
        before = len(calls)
        ids([[1, 2, 3]], max_new_tokens=8, stream=stream)
        assert len(calls) > before


def test_generate_and_debias_need_a_loaded_model(llama_dir):
    for bad in (None, str(llama_dir)):
        with pytest.raises(GenerationError, match=r"model: expected a model from fastdebias\.load\(\)"):
            fastdebias.generate(bad, "hello")
        with pytest.raises(GenerationError, match=r"model: expected a model from fastdebias\.load\(\)"):
            fastdebias.debias(bad, "hello")


def test_tokenizer_beyond_the_vocabulary(tmp_path, tiny_tokenizer_dir):
    """Tokenizer files of a larger vocabulary than the weights' (251 tokens, vocab_size 100): text prompts fail with
    a TokenizerError, not an index error inside the embedding."""
    m = fastdebias.load(make_llama(tmp_path / "m", vocab_size=100, tokenizer_dir=tiny_tokenizer_dir), progress=False)
    with pytest.raises(fastdebias.TokenizerError, match=r"prompts\[0\]: the tokenizer gave id\(s\).*\[0, 100\)"):
        fastdebias.generate(m, "The quick brown fox jumps", max_new_tokens=2)


def test_debias_argument_errors(model):
    """stop, template and prompt_format are checked before anything is tokenized; the SR-LLM end marker the format
    adds is not blamed on the user; a tokenizer without a chat template refuses prompt_format='chat'."""
    assert not getattr(model.tokenizer, "chat_template", None)
    cases = [
        (dict(stop=5), GenerationError, "stop: expected a non-empty string or a list of them, got 5$"),
        (dict(stop=[5]), GenerationError, r"got \[5\]$"),
        (dict(template=5), GenerationError, "template: expected a str containing the placeholder"),
        (dict(template="x {text}", prompt_format="bogus"), GenerationError, "prompt_format must be"),
        (dict(template="x \udcff {text}"), GenerationError, "template holds a character that is not valid"),
        (dict(prompt_format="chat"), fastdebias.TokenizerError, "prompt_format='chat' needs a chat template"),
    ]
    for kwargs, cls, msg in cases:
        with pytest.raises(cls, match=msg):
            fastdebias.debias(model, ["some text"], max_new_tokens=2, **kwargs)
    with pytest.raises(GenerationError, match=r"texts\[1\] holds a character that is not valid Unicode"):
        fastdebias.debias(model, ["fine", "not \udcff fine"], max_new_tokens=2)


def test_errors_are_one_hierarchy():
    names = ("CheckpointError", "AdapterError", "GenerationError", "TokenizerError", "BackendError",
             "EmbeddedModelError", "LexiconError")  # fmt: skip
    for name in names:  # each exported, and each a FastDebiasError
        assert name in fastdebias.__all__ and issubclass(getattr(fastdebias, name), fastdebias.FastDebiasError)


def test_backend_errors(llama_dir):
    with pytest.raises(fastdebias.BackendError, match="backend='bogus'"):
        fastdebias.load(llama_dir, backend="bogus", progress=False)
    with pytest.raises(fastdebias.BackendError, match="backend='cuda'"):
        fastdebias.load(llama_dir, backend="cuda", progress=False)
