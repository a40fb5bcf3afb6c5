"""Bad values inside the user's files (configs, indexes, adapter tensors) and bad load() arguments: each raises a
FastDebiasError subclass naming the file, field or argument, never a raw TypeError from deep inside."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastdebias
from fastdebias import AdapterError, BackendError, CheckpointError, EmbeddedModelError, FastDebiasError

from .conftest import make_adapter, make_llama


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_json(path, **fields):
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------- adapter_config.json


@pytest.mark.parametrize(
    "field,value",
    [
        ("lora_alpha", "16"),
        ("lora_alpha", None),
        ("r", "8"),
        ("r", 2.5),
        ("r", True),
        ("rank_pattern", None),
        ("rank_pattern", {"q_proj": "4"}),
        ("alpha_pattern", None),
        ("alpha_pattern", []),
        ("target_modules", None),
        ("target_modules", 5),
        ("target_modules", ["q_proj", 3]),
        ("use_rslora", "false"),
        ("layers_to_transform", "0"),
    ],
)
def test_adapter_config_field_types(tmp_path, llama_dir, adapter_qv, field, value):
    ad = copy(adapter_qv, tmp_path / "ad")
    edit_json(ad / "adapter_config.json", **{field: value})
    with pytest.raises(AdapterError, match=rf"adapter_config\.json: field '{field}' = "):
        fastdebias.load(llama_dir, ad, progress=False)


def test_adapter_config_missing_target_modules_and_not_an_object(tmp_path, llama_dir, adapter_qv):
    ad = copy(adapter_qv, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    del cfg["target_modules"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"adapter_config\.json: field 'target_modules' is missing"):
        fastdebias.load(llama_dir, ad, progress=False)
    (ad / "adapter_config.json").write_text("[1, 2]")  # the adapter's file → AdapterError, not CheckpointError
    with pytest.raises(AdapterError, match=r"adapter_config\.json: expected a JSON object"):
        fastdebias.load(llama_dir, ad, progress=False)


# ---------------------------------------------------------------------------- generation_config.json, weight index


@pytest.mark.parametrize("content", [{"eos_token_id": "abc"}, {"eos_token_id": [2, None]}, {"eos_token_id": -1},
                                     {"eos_token_id": True}, {"eos_token_id": 99999}, {"eos_token_id": [2, 251]}])
def test_generation_config_bad_eos(tmp_path, llama_dir, content):
    d = copy(llama_dir, tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"generation_config\.json: field 'eos_token_id'"):
        fastdebias.load(d, progress=False)


def test_config_eos_outside_the_vocabulary(tmp_path, llama_dir):
    """config.json's eos id (no generation_config.json) is checked against the vocabulary at load too."""
    d = copy(llama_dir, tmp_path / "m")
    (d / "generation_config.json").unlink(missing_ok=True)
    edit_json(d / "config.json", eos_token_id=4000)
    with pytest.raises(CheckpointError, match=r"config\.json: field 'eos_token_id' = 4000 holds id\(s\) \[4000\] "
                                              r"outside the vocabulary \[0, 251\)"):  # fmt: skip
        fastdebias.load(d, progress=False)


def test_generation_config_not_an_object(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path / "m")
    (d / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"generation_config\.json: expected a JSON object"):
        fastdebias.load(d, progress=False)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))  # a list of ids is fine
    assert fastdebias.load(d, progress=False).eos_token_ids == [2]


def test_weight_index_shard_outside_the_model_dir(tmp_path):
    d = make_llama(tmp_path / "m", max_shard_size="60KB")
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = next(iter(data["weight_map"].values()))
    (tmp_path / shard).write_bytes((d / shard).read_bytes())  # a real shard, but beside the directory
    data["weight_map"] = {k: "../" + v if v == shard else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"lists shard\(s\) \['\.\./{shard}'\] outside"):
        fastdebias.load(d, progress=False)


def test_weight_index_value_not_a_file_name(tmp_path):
    d = make_llama(tmp_path / "m", max_shard_size="60KB")
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = 5
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: weight_map\['{name}'\] = 5"):
        fastdebias.load(d, progress=False)


# ------------------------------------------------------------------------------------------------ load arguments


def test_load_adapter_argument(llama_dir, adapter_qv):
    cases = [
        ({1: adapter_qv}, r"dict key 1 is not a valid adapter name.*non-empty str"),
        ({"": adapter_qv}, r"dict key '' is not a valid adapter name"),
        ({"a": None}, r"adapter\['a'\]: expected an adapter directory path.*got None"),
        ({"a": 5}, r"adapter\['a'\]: expected an adapter directory path.*got 5"),
        ([adapter_qv, None], r"adapter\[1\]: expected an adapter directory path.*got None"),
        ([b"/some/dir"], r"adapter\[0\]: expected an adapter directory path"),
        ("", r"adapter: empty path"),
    ]
    for adapter, msg in cases:
        with pytest.raises(AdapterError, match=msg):
            fastdebias.load(llama_dir, adapter, progress=False)
    # directory names collide → the hint to use a dict; a dict itself cannot repeat a name
    with pytest.raises(AdapterError, match=r"duplicate adapter names.*named by directory name.*pass a dict"):
        fastdebias.load(llama_dir, [adapter_qv, str(adapter_qv)], progress=False)
    assert fastdebias.load(llama_dir, {"x": adapter_qv}, progress=False).adapter_names == ["x"]


@pytest.mark.parametrize("model_path", [5, b"/some/dir", ["/some/dir"], ""])
def test_load_model_path_type(model_path):
    with pytest.raises(CheckpointError, match=r"model_path=.*(str or os\.PathLike|empty path)"):
        fastdebias.load(model_path, progress=False)


def test_dtype_device_runtime_errors_are_backend_errors(llama_dir):
    cases = [
        (dict(dtype="float64"), r"dtype='float64' is not supported"),
        (dict(device="gpu"), r"device='gpu' is not a valid torch device"),
        (dict(device="meta"), r"device='meta': only cpu and cuda"),
        (dict(runtime="bogus"), r"runtime='bogus' is not one of"),
    ]
    if not torch.cuda.is_available():
        cases += [
            (dict(device="cuda"), r"device='cuda' requested but CUDA is not available"),
            (dict(runtime="cuda_graph"), r"runtime='cuda_graph' needs a CUDA device"),
        ]
    for kwargs, msg in cases:
        with pytest.raises(BackendError, match=msg):
            fastdebias.load(llama_dir, progress=False, **kwargs)
    assert issubclass(BackendError, FastDebiasError)  # callers catching the base class still catch these


# --------------------------------------------------------------------------------------------- embedded model cache


def test_cache_path_that_is_a_file(tmp_path, monkeypatch):
    """A FASTDEBIAS_CACHE that cannot hold the converted model fails before any conversion work: the converter
    must not even be reached (it would take the real GGUF and tens of seconds)."""
    import fastdebias.embedded as embedded

    def no_conversion(*args, **kwargs):
        raise AssertionError("the conversion ran")

    monkeypatch.setattr(embedded, "gguf_path", no_conversion)
    monkeypatch.setattr(embedded, "convert_gguf", no_conversion)
    blocker = tmp_path / "cachefile"
    blocker.write_text("not a directory")
    for cache in (blocker, blocker / "sub"):
        monkeypatch.setenv("FASTDEBIAS_CACHE", str(cache))
        with pytest.raises(EmbeddedModelError, match=rf"cache directory {cache}.*FASTDEBIAS_CACHE="):
            fastdebias.load(None, progress=False)


def test_convert_gguf_into_a_file_path(tmp_path, monkeypatch):
    """convert_gguf itself also reports an unusable target directory (before reading its source)."""
    from fastdebias.embedded import convert_gguf

    blocker = tmp_path / "cachefile"
    blocker.write_text("")
    monkeypatch.setenv("FASTDEBIAS_CACHE", str(blocker))
    with pytest.raises(EmbeddedModelError, match="FASTDEBIAS_CACHE"):
        convert_gguf(tmp_path / "no.gguf", blocker / "model", progress=False)


# ------------------------------------------------------------------------------------------- adapter vs base model


def test_adapter_for_a_bigger_or_deeper_base(tmp_path, tiny_tokenizer_dir):
    """An adapter for another base model is told by the shapes of the modules it has, not reported as an
    incomplete file because the other model has more layers."""
    small = make_llama(tmp_path / "small", hidden_size=64, layers=2)
    ad = make_adapter(small, tmp_path / "ad")
    big = make_llama(tmp_path / "big", hidden_size=128, layers=3, intermediate=192)
    with pytest.raises(AdapterError, match=r"module 'model\.layers\.0\.self_attn\.q_proj': lora_A \(8, 64\).*"
                                           r"do not fit the base layer \[out=128, in=128\].*different base model"):
        fastdebias.load(big, ad, progress=False)
    deeper = make_llama(tmp_path / "deeper", hidden_size=64, layers=3)  # same widths, one more layer
    with pytest.raises(AdapterError, match=r"no LoRA weights for targeted module 'model\.layers\.2\..*different "
                                           r"base model \(its weights cover layers 0-1; this model has 3\)"):
        fastdebias.load(deeper, ad, progress=False)


@pytest.mark.parametrize("fields,module", [({"target_modules": ["q_proj"]}, r"model\.layers\.0\.self_attn\.v_proj"),
                                           ({"layers_to_transform": [0]}, r"model\.layers\.1\.self_attn\.q_proj")])
def test_adapter_weights_the_config_does_not_target(tmp_path, llama_dir, adapter_qv, fields, module):
    """Weights for modules the config does not target (a hand-edited target_modules or layers_to_transform): peft
    would leave them out, so applying them would break parity with peft; an AdapterError says which."""
    ad = copy(adapter_qv, tmp_path / "ad")
    edit_json(ad / "adapter_config.json", **fields)
    with pytest.raises(AdapterError, match=rf"is for module '{module}', which adapter_config\.json does not target"):
        fastdebias.load(llama_dir, ad, progress=False)


def test_config_with_fewer_layers_than_the_weights(tmp_path, llama_dir):
    """num_hidden_layers lower than the weights' layers: not extras to skip with a warning (that ran a truncated
    model), a CheckpointError."""
    d = copy(llama_dir, tmp_path / "m")
    edit_json(d / "config.json", num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\..*' is for layer 1, but config\.json says "
                                              r"num_hidden_layers=1"):  # fmt: skip
        fastdebias.load(d, progress=False)


# ------------------------------------------------------------------------------------------------ config.json values


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_hidden_layers", 0),
        ("num_hidden_layers", -1),
        ("num_attention_heads", 0),
        ("hidden_size", -64),
        ("vocab_size", 0),
        ("max_position_embeddings", 0),
        ("intermediate_size", "96"),
        ("rope_theta", 0),
        ("rope_theta", -1),
    ],
)
def test_config_values_must_be_positive(tmp_path, llama_dir, field, value):
    d = copy(llama_dir, tmp_path / "m")
    edit_json(d / "config.json", **{field: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: field '{field}' = "):
        fastdebias.load(d, progress=False)


def test_rope_scaling_factor_must_be_positive(tmp_path, tiny_tokenizer_dir):
    d = make_llama(tmp_path / "m", rope_scaling={"rope_type": "linear", "factor": 2.0})
    cfg = json.loads((d / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    cfg[key]["factor"] = -2.0
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config\.json: field '{key}\.factor' = -2"):
        fastdebias.load(d, progress=False)


# --------------------------------------------------------------------------------------------- adapter tensor values


@pytest.mark.parametrize(
    "corrupt,msg",
    [
        (lambda t: t.to(torch.int64), r"has dtype torch\.int64; LoRA weights must be floating point"),
        (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), r"contains NaN or inf"),
        (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), r"contains NaN or inf"),
    ],
)
def test_adapter_tensor_values(tmp_path, llama_dir, adapter_qv, corrupt, msg):
    ad = copy(adapter_qv, tmp_path / "ad")
    sd = load_file(str(ad / "adapter_model.safetensors"))
    key = sorted(k for k in sd if "lora_B" in k)[0]
    sd[key] = corrupt(sd[key]).contiguous()
    save_file(sd, str(ad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=rf"adapter_model\.safetensors: tensor '{key}' {msg}"):
        fastdebias.load(llama_dir, ad, progress=False)
