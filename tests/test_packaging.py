"""Packaging: kernels/ is importable only as fastdebias.kernels; the default lexicon ships as package data."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path


def test_kernels_only_as_subpackage():
    code = (
        "import sys, fastdebias.kernels, fastdebias.ops\n"
        "assert 'kernels' not in sys.modules, 'a bare top-level kernels module was imported'\n"
        "import importlib.util; assert importlib.util.find_spec('kernels') is None or "
        "'fastdebias' not in (importlib.util.find_spec('kernels').origin or '')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr


def test_default_lexicon_is_package_data():
    spec = importlib.util.find_spec("fastdebias")
    data = Path(spec.origin).parent / "data" / "default_lexicon.jsonl"
    assert data.is_file() and sum(1 for _ in data.open()) >= 500
