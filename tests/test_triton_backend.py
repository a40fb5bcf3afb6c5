"""backend="triton" in the decoder: same greedy tokens as the torch reference (interpreter on CPU, real on GPU)."""

from __future__ import annotations

import fastdebias

PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3], [1, 8, 9]]


def test_triton_backend_greedy_equals_torch(llama_dir, adapter_qv, adapter_all):
    adapters = {"qv": adapter_qv, "all": adapter_all}
    ref = fastdebias.load(llama_dir, adapters, backend="torch", progress=False)
    tri = fastdebias.load(llama_dir, adapters, backend="triton", device=ref.device, dtype=ref.dtype, progress=False)
    assert tri.backend == "triton"
    names = ["qv", None, "all"]
    a = fastdebias.generate(ref, PROMPTS, adapter=names, max_new_tokens=6)
    b = fastdebias.generate(tri, PROMPTS, adapter=names, max_new_tokens=6)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
