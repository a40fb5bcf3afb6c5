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


def test_triton_backend_with_lexicon_penalty_and_sampling(llama_dir, adapter_qv):
    from fastdebias.lexicon import Lexicon

    ref = fastdebias.load(llama_dir, adapter_qv, backend="torch", progress=False)
    tri = fastdebias.load(llama_dir, adapter_qv, backend="triton", device=ref.device, dtype=ref.dtype, progress=False)
    free = fastdebias.generate(ref, PROMPTS, max_new_tokens=8)
    phrase = tuple(free[0].token_ids[2:4])
    lex = Lexicon.from_token_sequences({phrase: float("-inf"), (free[1].token_ids[1],): -2.0})
    kw = dict(max_new_tokens=8, lexicon=lex, repetition_penalty=1.3)
    a = fastdebias.generate(ref, PROMPTS, **kw)
    b = fastdebias.generate(tri, PROMPTS, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]  # greedy: identical across backends
    assert [[(i.step, i.action) for i in r.interventions] for r in a] == [
        [(i.step, i.action) for i in r.interventions] for r in b
    ]
    s1 = fastdebias.generate(tri, PROMPTS, temperature=1.0, seed=3, **kw)
    s2 = fastdebias.generate(tri, PROMPTS, temperature=1.0, seed=3, **kw)
    assert [r.token_ids for r in s1] == [r.token_ids for r in s2]  # same seed, same tokens on one backend
    for r in s1:
        assert not any(tuple(r.token_ids[i:i + 2]) == phrase for i in range(len(r.token_ids) - 1))
