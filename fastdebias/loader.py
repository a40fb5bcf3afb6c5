"""Load SR-LLM-format checkpoints: an HF Llama-family base directory plus PEFT LoRA adapter directories.

Weights are read tensor by tensor from memory-mapped safetensors (or ``torch.load(weights_only=True, mmap=True)``
for legacy ``pytorch_model*.bin``) straight into the model, so RAM never holds a second full copy. Every
problem raises a ``CheckpointError`` / ``AdapterError`` naming the file or field; ``load`` builds its result
only when everything checked out, so nothing is left half-loaded.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from fastdebias.errors import AdapterError, CheckpointError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Keys some older checkpoints carry that hold no learned state (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------------------------- config


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); restore the file from the original checkpoint") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_config(model_dir: Path):
    """Parse ``config.json`` with transformers and check it describes a supported Llama-family model."""
    from transformers import AutoConfig

    raw = read_json(model_dir / "config.json", "model config (config.json)")
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise CheckpointError(
            f"{model_dir / 'config.json'}: architectures={archs} / model_type={model_type!r} is not supported; "
            f"fastdebias loads {', '.join(SUPPORTED_ARCHITECTURES)} checkpoints"
        )
    where = model_dir / "config.json"
    # Sizes first, on the raw file: transformers would fail on some of them with an unrelated message (a modulo by
    # zero) and accept others (a negative layer count builds a model with no layers that decodes garbage).
    _check_sizes(raw, where)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for malformed configs
        raise CheckpointError(f"{model_dir / 'config.json'}: transformers cannot parse it: {e}") from e
    _check_sizes({f: getattr(config, f, None) for f in _POSITIVE_INT_FIELDS if getattr(config, f, None) is not None},
                 where)  # transformers' defaults for fields the file leaves out
    _check_rope(raw, config, where)
    for field, ok in (
        ("hidden_act", getattr(config, "hidden_act", "silu") == "silu"),
        ("attention_bias", not getattr(config, "attention_bias", False)),
        ("mlp_bias", not getattr(config, "mlp_bias", False)),
        ("pretraining_tp", getattr(config, "pretraining_tp", 1) == 1),
    ):
        if not ok:
            raise CheckpointError(f"{where}: {field}={getattr(config, field)!r} is not supported by fastdebias")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise CheckpointError(
            f"{where}: rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3, yarn)"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.num_attention_heads % (config.num_key_value_heads or config.num_attention_heads):
        raise CheckpointError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    config.head_dim = head_dim
    if getattr(config, "num_key_value_heads", None) is None:
        config.num_key_value_heads = config.num_attention_heads
    return config


# config.json fields that size the model: each must be a positive integer when present (num_key_value_heads and
# head_dim may be absent or null; then they derive from num_attention_heads and hidden_size).
_POSITIVE_INT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings",
)
_OPTIONAL_FIELDS = ("num_key_value_heads", "head_dim")


def _is_number(v) -> bool:
    """A finite JSON number (bool is an int subclass in Python but not a number in a config)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_sizes(values: dict, where: Path) -> None:
    for field in _POSITIVE_INT_FIELDS:
        if field not in values or (values[field] is None and field in _OPTIONAL_FIELDS):
            continue
        v = values[field]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(
                f"{where}: field {field!r} = {json.dumps(v)} must be a positive integer; the config is corrupt, "
                "restore it from the original checkpoint"
            )


def _check_rope(raw: dict, config, where: Path) -> None:
    """rope_theta and the scaling factor must be positive: transformers accepts any number, and a zero or negative
    one yields NaN or meaningless positions that only show as garbage text. Checked as the file spells them (older
    configs keep rope_theta at the top level, newer ones inside rope_parameters) and as transformers resolved them."""
    found = [("rope_theta", raw["rope_theta"])] if "rope_theta" in raw else []
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(raw.get(key), dict):
            found += [(f"{key}.{sub}", raw[key][sub]) for sub in ("rope_theta", "factor") if sub in raw[key]]
    params = getattr(config, "rope_parameters", None) or {}
    found += [(f"rope_parameters.{sub}", params[sub]) for sub in ("rope_theta", "factor") if sub in params]
    for field, v in found:
        if not (_is_number(v) and v > 0):
            raise CheckpointError(f"{where}: field {field!r} = {json.dumps(v)} must be a positive number; the config "
                                  "is corrupt, restore it from the original checkpoint")
    eps = getattr(config, "rms_norm_eps", 1e-6)
    if not (_is_number(eps) and eps >= 0):
        raise CheckpointError(f"{where}: field 'rms_norm_eps' = {json.dumps(eps)} must be a non-negative number")


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """HF parameter name → shape for a Llama-family model (the names our model uses too)."""
    h, hd = config.hidden_size, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    inter, v = config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (nh * hd, h),
                p + "self_attn.k_proj.weight": (nkv * hd, h),
                p + "self_attn.v_proj.weight": (nkv * hd, h),
                p + "self_attn.o_proj.weight": (h, nh * hd),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


# ---------------------------------------------------------------------------------------- weight files


def _weight_files(model_dir: Path) -> list[Path]:
    """The base checkpoint's weight files, in the order the index lists them."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = model_dir / index_name
        if index_path.is_file():
            index = read_json(index_path, "weight index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: field 'weight_map' is missing or empty")
            for tensor_name, shard in weight_map.items():
                if not isinstance(shard, str) or not shard:
                    raise CheckpointError(
                        f"{index_path}: weight_map[{tensor_name!r}] = {json.dumps(shard)} is not a shard file name; "
                        "restore the index from the original checkpoint"
                    )
            files = list(dict.fromkeys(weight_map.values()))
            root = model_dir.resolve()
            outside = [f for f in files if not (model_dir / f).resolve().is_relative_to(root)]
            if outside:
                raise CheckpointError(
                    f"{index_path}: lists shard(s) {outside} outside {model_dir}; an index names shard files inside "
                    "the model directory: restore it from the original checkpoint"
                )
            missing = [f for f in files if not (model_dir / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index_path}: lists shard(s) {missing} that are not in {model_dir}; download the missing shards"
                )
            return [model_dir / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise CheckpointError(
        f"{model_dir}: no weights found; expected model.safetensors, sharded model-0000k-of-0000n.safetensors with "
        "model.safetensors.index.json, or pytorch_model*.bin"
    )


def _safe_torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Legacy pickle checkpoints, loaded only through the weights-only unpickler."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # pre-zipfile legacy format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors (weights_only=True). "
            "Convert it to safetensors with a trusted tool, or re-save its state_dict"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict)")
    return sd


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one weight file, one tensor at a time (memory-mapped)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file ({e}); download or re-save it"
            ) from e
    else:
        yield from _safe_torch_load(path).items()


def count_tensors(path: Path) -> int | None:
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return len(list(f.keys()))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e}); download or re-save it") from e


def load_base_weights(
    model_dir: Path, config, dtype: torch.dtype, device: torch.device, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Read every expected tensor, check its shape, convert to ``dtype`` on ``device``; tqdm across shards."""
    shapes = expected_shapes(config)
    files = _weight_files(model_dir)
    totals = [count_tensors(p) for p in files]
    total = sum(t for t in totals if t is not None) if all(t is not None for t in totals) else None
    out: dict[str, torch.Tensor] = {}
    with tqdm(total=total, desc=f"Loading {model_dir.name}", unit="tensor", disable=not progress) as bar:
        for path in files:
            for name, t in iter_tensors(path):
                bar.update(1)
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in shapes:
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # tied checkpoints sometimes still store the (identical) head
                    layer = re.match(r"model\.layers\.(\d+)\.", name)
                    if layer and int(layer.group(1)) >= config.num_hidden_layers:  # not an extra: a truncated model
                        raise CheckpointError(
                            f"{path}: tensor {name!r} is for layer {layer.group(1)}, but config.json says "
                            f"num_hidden_layers={config.num_hidden_layers}; the weights and config.json do not "
                            "belong together"
                        )
                    warnings.warn(f"{path}: ignoring unexpected tensor {name!r}", stacklevel=3)
                    continue
                if tuple(t.shape) != shapes[name]:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {tuple(t.shape)}, but config.json implies "
                        f"{shapes[name]}; the weights and config.json do not belong together"
                    )
                if not t.is_floating_point():
                    raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}; expected floating point")
                out[name] = t.to(device=device, dtype=dtype)
                del t
    missing = [n for n in shapes if n not in out]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{model_dir}: weights are missing tensor(s) {missing[:5]}{more}; the checkpoint is incomplete"
        )
    return out


# -------------------------------------------------------------------------------------------- adapters

_UNSUPPORTED_LORA_FIELDS = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "LoRA bias terms",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}


@dataclass
class AdapterWeights:
    """One loaded LoRA adapter: per target module (HF module name) its A [r, in], B [out, r] and scale."""

    name: str
    path: Path
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    # copies of base layers peft saves beside the LoRA weights when an embedding-type layer (lm_head, embed_tokens)
    # is targeted (``save_embedding_layers``): base weight name → tensor; checked against the checkpoint on load
    saved_base: dict[str, torch.Tensor] = dataclass_field(default_factory=dict)


def _adapter_files(adapter_dir: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise AdapterError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin found")


def _lora_config(adapter_dir: Path):
    from peft import LoraConfig

    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: adapter config not found; is {adapter_dir} a PEFT LoRA adapter directory?")
    try:
        raw = read_json(cfg_path, "adapter config (adapter_config.json)")
    except CheckpointError as e:  # the adapter's file, so the adapter's error type
        raise AdapterError(str(e)) from e
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type={raw.get('peft_type')!r}; only LoRA adapters are supported")
    for field, what in _UNSUPPORTED_LORA_FIELDS.items():
        if raw.get(field):
            raise AdapterError(
                f"{cfg_path}: field {field!r} = {raw[field]!r}: {what} is not supported; "
                "retrain or export the adapter as plain LoRA"
            )
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={raw['bias']!r} is not supported (only 'none')")
    if raw.get("fan_in_fan_out", False):
        raise AdapterError(f"{cfg_path}: fan_in_fan_out=true is not supported (it is for GPT-2 Conv1D layers)")
    _check_lora_fields(raw, cfg_path)
    known = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in raw.items() if k in known}
    try:
        cfg = LoraConfig(**kwargs)
    except Exception as e:
        raise AdapterError(f"{cfg_path}: peft rejects this LoRA config: {e}") from e
    if not isinstance(cfg.r, int) or cfg.r < 1:
        raise AdapterError(f"{cfg_path}: field 'r' must be a positive integer, got {cfg.r!r}")
    return cfg, cfg_path


def _check_lora_fields(raw: dict, cfg_path: Path) -> None:
    """Type-check the fields the loader reads, before peft sees them: peft's config dataclass does not check types,
    so a string lora_alpha or a null rank_pattern would otherwise surface as a TypeError deep in the scale maths.
    Absent fields keep peft's defaults; present ones must have the type peft writes."""

    def bad(field: str, want: str):
        raise AdapterError(
            f"{cfg_path}: field {field!r} = {json.dumps(raw[field])}: {want}; fix the field to match the values the "
            "adapter was trained with"
        )

    def is_pos_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def is_str_list(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) and x for x in v)

    def is_index(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if "r" in raw and not is_pos_int(raw["r"]):
        bad("r", "must be a positive integer (the LoRA rank)")
    if "lora_alpha" in raw and not _is_number(raw["lora_alpha"]):
        bad("lora_alpha", "must be a number (the LoRA scale is lora_alpha / r)")
    if "use_rslora" in raw and not isinstance(raw["use_rslora"], bool):
        bad("use_rslora", "must be true or false")
    for field, ok, want in (
        ("rank_pattern", is_pos_int, "must be an object mapping module-name patterns to positive integer ranks"),
        ("alpha_pattern", _is_number, "must be an object mapping module-name patterns to numbers"),
    ):
        if field in raw:  # null is not {}: peft itself fails on it, and the adapter was not saved by peft as is
            v = raw[field]
            if not isinstance(v, dict) or not all(isinstance(k, str) and ok(x) for k, x in v.items()):
                bad(field, want + " ({} for none)")
    tm = raw.get("target_modules")
    if not (isinstance(tm, str) and tm) and not (is_str_list(tm) and tm):
        if "target_modules" not in raw:
            raise AdapterError(
                f"{cfg_path}: field 'target_modules' is missing; set it to the modules the adapter was trained on, "
                'e.g. ["q_proj", "v_proj"]'
            )
        bad("target_modules", 'must be a list of module names (e.g. ["q_proj", "v_proj"]) or a regex string')
    em = raw.get("exclude_modules")
    if em is not None and not isinstance(em, str) and not is_str_list(em):
        bad("exclude_modules", "must be null, a list of module names or a regex string")
    lt = raw.get("layers_to_transform")
    if lt is not None and not is_index(lt) and not (isinstance(lt, list) and all(map(is_index, lt))):
        bad("layers_to_transform", "must be null, a layer index or a list of layer indices")
    lp = raw.get("layers_pattern")
    if lp is not None and not isinstance(lp, str) and not is_str_list(lp):
        bad("layers_pattern", "must be null, a string or a list of strings")


# peft's names for the base-layer copies it saves with an adapter that targets lm_head / embed_tokens
_SAVED_BASE_LAYERS = {
    "lm_head.base_layer.weight": "lm_head.weight",
    "lm_head.weight": "lm_head.weight",
    "model.embed_tokens.base_layer.weight": "model.embed_tokens.weight",
    "model.embed_tokens.weight": "model.embed_tokens.weight",
}


def check_saved_base_layers(adapter: AdapterWeights, weights: dict[str, torch.Tensor], tied: bool) -> None:
    """An adapter's saved copies of base layers must equal the checkpoint's: the decoder shares one base model
    across adapters, so an adapter that changes it (a resized vocabulary, a trained head) cannot be applied."""
    for name, saved in adapter.saved_base.items():
        base = weights.get(name)
        if base is None and tied and name == "lm_head.weight":
            base = weights.get("model.embed_tokens.weight")
        if base is None or saved.shape != base.shape or not torch.equal(saved.to(base.device, base.dtype), base):
            raise AdapterError(
                f"{_adapter_files(adapter.path)}: the adapter carries its own copy of {name!r} that differs from "
                "the base checkpoint's (peft saves it when lm_head/embed_tokens is targeted; it differs after a "
                "vocabulary resize or a trained head): merge that layer into the base checkpoint and load the "
                "adapter without it"
            )


def _strip_key(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' → ('model.layers.0.self_attn.q_proj', 'A')."""
    if key.startswith("base_model.model."):
        key = key[len("base_model.model.") :]
    for kind in ("A", "B"):
        for tail in (f".lora_{kind}.weight", f".lora_{kind}.default.weight"):
            if key.endswith(tail):
                return key[: -len(tail)], kind
    return None


def load_adapter(adapter_dir: Path, name: str, config, module_shapes: dict[str, tuple[int, int]]) -> AdapterWeights:
    """Read and validate one PEFT LoRA adapter against the base model's module shapes ([out, in])."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter directory not found")
    cfg, cfg_path = _lora_config(adapter_dir)
    wpath = _adapter_files(adapter_dir)
    try:
        tensors = dict(iter_tensors(wpath))
    except CheckpointError as e:
        raise AdapterError(str(e)) from e

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, str] = {}  # module → one of its tensor names, for messages
    saved_base: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        parsed = _strip_key(key)
        short = key.removeprefix("base_model.model.")
        if parsed is None and short in _SAVED_BASE_LAYERS:
            saved_base[_SAVED_BASE_LAYERS[short]] = t
            continue
        if parsed is None:
            if "lora_embedding" in key or "embed_tokens" in key:
                raise AdapterError(f"{wpath}: tensor {key!r}: LoRA on embeddings is not supported")
            raise AdapterError(f"{wpath}: tensor {key!r} is not a LoRA A/B weight; unsupported adapter content")
        # Adapters are small, so checking every value is cheap; an integer or non-finite factor would load and then
        # silently turn every output of its layer into garbage or NaN.
        if not t.is_floating_point():
            raise AdapterError(
                f"{wpath}: tensor {key!r} has dtype {t.dtype}; LoRA weights must be floating point: re-save the "
                "adapter with peft"
            )
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(
                f"{wpath}: tensor {key!r} contains NaN or inf values; the adapter is corrupt or its training "
                "diverged: export it again from a good checkpoint"
            )
        module, kind = parsed
        pairs.setdefault(module, {})[kind] = t
        keys.setdefault(module, key)

    # Shapes before anything else: an adapter trained for another base model is told most clearly by a module both
    # models have whose shape differs, not by the modules one of them lacks.
    for module, ab in pairs.items():
        if module not in module_shapes:
            continue
        out_f, in_f = module_shapes[module]
        a, b = ab.get("A"), ab.get("B")
        if (a is not None and (a.dim() != 2 or a.shape[1] != in_f)) or (
            b is not None and (b.dim() != 2 or b.shape[0] != out_f)
        ):
            got = " / ".join(f"lora_{k} {tuple(t.shape)}" for k, t in sorted(ab.items()))
            raise AdapterError(
                f"{wpath}: module {module!r}: {got} do not fit the base layer [out={out_f}, in={in_f}]; the adapter "
                "was trained for a different base model"
            )
    for module in pairs:
        if module not in module_shapes:
            raise AdapterError(
                f"{wpath}: tensor {keys[module]!r} targets module {module!r}, which does not exist in the base model "
                f"(check target_modules and that the adapter was trained on this architecture)"
            )
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{wpath}: module {module!r} has lora_{'A' if 'A' in ab else 'B'} but not its pair")

    try:
        if cfg.target_modules == "all-linear":  # PEFT's shorthand: every linear layer except the output head
            targeted = [m for m in module_shapes if m != "lm_head"]
        else:
            targeted = [m for m in module_shapes if check_target_module_exists(cfg, m)]
    except Exception as e:  # e.g. a target_modules / exclude_modules regex that does not compile
        raise AdapterError(f"{cfg_path}: peft cannot match target_modules={cfg.target_modules!r}: {e}") from e
    if not targeted:
        raise AdapterError(
            f"{cfg_path}: target_modules={cfg.target_modules!r} matches no module of the base model "
            f"(LoRA-capable modules: {', '.join(LORA_MODULES)}, lm_head)"
        )
    missing = [m for m in targeted if m not in pairs]
    if missing:
        raise AdapterError(
            f"{wpath}: no LoRA weights for targeted module {missing[0]!r}{_more(missing)}: the adapter file is "
            f"incomplete, or it was trained for a different base model{_layer_hint(pairs, config)}"
        )
    untargeted = [m for m in pairs if m not in set(targeted)]
    if untargeted:  # peft would not apply these (its layers exist for targeted modules only): outputs would differ
        scope = f"target_modules={cfg.target_modules!r}" + (
            f", layers_to_transform={cfg.layers_to_transform!r}" if cfg.layers_to_transform is not None else "")
        raise AdapterError(
            f"{wpath}: tensor {keys[untargeted[0]]!r}{_more(untargeted)} is for module {untargeted[0]!r}, which "
            f"{cfg_path.name} does not target ({scope}); peft would leave it out: fix the config to name every "
            "module the weights cover, or re-save the adapter with peft"
        )
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, ab in pairs.items():
        a, b = ab["A"], ab["B"]
        rank = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module), cfg.r)
        alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(
                f"{wpath}: module {module!r}: tensors have rank {a.shape[0]}/{b.shape[1]} but {cfg_path.name} says "
                f"r={rank} (field 'r' or 'rank_pattern'); fix the config to match the weights"
            )
        scale = alpha / math.sqrt(rank) if cfg.use_rslora else alpha / rank
        modules[module] = (a, b, float(scale))
    return AdapterWeights(name=name, path=adapter_dir, modules=modules, saved_base=saved_base)


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _layer_hint(pairs: dict, config) -> str:
    """' (its weights cover layers 0-1; this model has 4)' when the adapter's layers are fewer than the model's."""
    layers = {int(m.split(".")[2]) for m in pairs if m.startswith("model.layers.") and m.split(".")[2].isdigit()}
    if not layers or max(layers) + 1 >= config.num_hidden_layers:
        return ""
    return f" (its weights cover layers {min(layers)}-{max(layers)}; this model has {config.num_hidden_layers})"


def normalize_adapters(adapter) -> list[tuple[str, Path]]:
    """None | path | list of paths | {name: path} → [(name, dir)], names unique."""
    if adapter is None:
        return []

    def as_dir(value, where: str) -> Path:
        if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
            raise AdapterError(f"{where}: expected an adapter directory path (str or os.PathLike), got {value!r}")
        if not os.fspath(value):
            raise AdapterError(f"{where}: empty path; pass the adapter's directory")
        return Path(value)

    def dir_name(path: Path) -> str:  # "." or "adapters/x/" still get a name: the directory's own
        return path.name or path.resolve().name

    if isinstance(adapter, (str, os.PathLike)):
        path = as_dir(adapter, "adapter")
        items = [(dir_name(path), path)]
    elif isinstance(adapter, dict):
        items = []
        for k, v in adapter.items():
            if not isinstance(k, str) or not k:
                raise AdapterError(
                    f"adapter: dict key {k!r} is not a valid adapter name; names must be non-empty str (they are "
                    "what generate(adapter=...) selects by)"
                )
            items.append((k, as_dir(v, f"adapter[{k!r}]")))
    elif isinstance(adapter, (list, tuple)):
        items = []
        for i, a in enumerate(adapter):
            path = as_dir(a, f"adapter[{i}]")
            items.append((dir_name(path), path))
    else:
        raise AdapterError(f"adapter: expected a directory, a list of directories or a dict name→dir, got {adapter!r}")
    unnamed = [p for n, p in items if not n]  # only a root directory has no name
    if unnamed:
        raise AdapterError(f"adapter: cannot name the adapter at {unnamed[0]}; pass a dict name → directory")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):  # only from directory names: a dict's str keys are unique
        raise AdapterError(
            f"adapter: duplicate adapter names {names} (named by directory name); pass a dict name → directory "
            "to name them explicitly"
        )
    return items
