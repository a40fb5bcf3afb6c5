"""Every Triton kernel compiles for an H100 (sm_90), an A100 (sm_80) and an L4 (sm_89) within their limits, checked
on a machine without a GPU.

The interpreter tests check what the kernels compute; this one checks what only a GPU compile finds: programs the
CUDA backend rejects, shared memory or registers beyond the GPU's. ``tests/aot_compile.py --quick`` drives the real
host code of ``fastdebias.ops`` on CPU tensors of the GPU shapes and compiles each launch instead of running it
(see its docstring); it runs in a subprocess, since the kernels must be defined without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from .conftest import triton_cuda_backend  # noqa: E402

HARNESS = Path(__file__).with_name("aot_compile.py")
KERNELS = {"_logits_tile_kernel", "_threshold_pass_kernel", "_finalize_kernel", "_lm_head_tile_kernel",
           "_lora_shrink_kernel", "_lora_linear_kernel"}  # fmt: skip


@pytest.mark.skipif(not triton_cuda_backend(tools=True), reason="triton has no CUDA backend with ptxas, cuobjdump")
@pytest.mark.parametrize("arch,smem", [(90, 232448), (80, 166912), (89, 101376)])
def test_every_kernel_compiles_within_the_gpus_limits(tmp_path, arch, smem):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(HARNESS), "--quick", "--arch", str(arch), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())
    assert result["arch"] == arch and result["failures"] == []
    variants = result["variants"]
    # every kernel was compiled, in more than one variant each where the cases ask for several
    assert {v["kernel"] for v in variants} == KERNELS
    assert len(variants) >= 30
    for v in variants:
        assert v["over"] == [], v
        assert 0 < v["reg"] <= 255 and v["shared"] <= smem, v
