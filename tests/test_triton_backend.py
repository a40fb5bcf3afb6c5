"""backend="triton" in the decoder: same greedy tokens as the torch reference (interpreter on CPU, real on GPU)."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_triton_backend_half_as_accurate_as_torch(tmp_path, half):
    """fp16/bf16 logits vs the fp32 truth (mean over a batch that takes the prefill path, M > 64 rows). (bf16 under
    the interpreter: its tl.dot operands are upcast there, ``fastdebias.kernels.lora.dot_operand``.)"""
    import torch

    from fastdebias.generate import prefill

    from .conftest import make_adapter, make_llama

    m = make_llama(tmp_path / "m", hidden_size=128, intermediate=256, heads=4, kv_heads=2)
    a = make_adapter(m, tmp_path / "a", r=16)
    g = torch.Generator().manual_seed(0)
    # 12 rows: the mean error over the last positions of only a few rows is too noisy to compare two paths by
    ids = [[1] + torch.randint(3, 250, (n,), generator=g).tolist() for n in (70, 40, 9, 3, 65, 20, 33, 5, 12, 50, 2, 7)]
    idx = torch.zeros(len(ids), dtype=torch.int32)

    def logits(dtype, backend):
        return prefill(fastdebias.load(m, a, dtype=dtype, backend=backend, progress=False), ids, 1, idx)[0]

    truth = logits("float32", "torch")
    torch.testing.assert_close(logits("float32", "triton"), truth, rtol=1e-4, atol=1e-4)
    err_torch = (logits(half, "torch") - truth).abs().mean().item()
    err_triton = (logits(half, "triton") - truth).abs().mean().item()
    assert err_triton <= 1.25 * err_torch, (err_triton, err_torch)


def test_triton_backend_lm_head_lora_in_the_fused_step(llama_dir, tmp_path):
    """An adapter on the lm_head: the fused lm_head + step adds it per row (rows with and without it, one batch)."""
    from .conftest import make_adapter

    head = make_adapter(llama_dir, tmp_path / "head", r=6, alpha=24, targets=["q_proj", "lm_head"], seed=7)
    ref = fastdebias.load(llama_dir, {"head": head}, backend="torch", progress=False)
    tri = fastdebias.load(llama_dir, {"head": head}, backend="triton", device=ref.device, dtype=ref.dtype,
                          progress=False)
    assert tri.decoder.lm_head.loras[0] is not None
    names = ["head", None, "head"]
    want = [r.token_ids for r in fastdebias.generate(ref, PROMPTS, adapter=names, max_new_tokens=6)]
    assert [r.token_ids for r in fastdebias.generate(tri, PROMPTS, adapter=names, max_new_tokens=6)] == want
    base = [r.token_ids for r in fastdebias.generate(ref, PROMPTS, adapter=None, max_new_tokens=6)]
    assert want[1] == base[1] and (want[0] != base[0] or want[2] != base[2])  # the adapter is seen, per row
    # no row of the call uses an adapter (no adapter index at all): the fused step adds no LoRA, greedy and sampled
    assert [r.token_ids for r in fastdebias.generate(tri, PROMPTS, adapter=None, max_new_tokens=6)] == base
    hot = dict(adapter=None, max_new_tokens=6, temperature=1.0, seed=5)
    plain = fastdebias.load(llama_dir, backend="triton", device=ref.device, dtype=ref.dtype, progress=False)
    assert [r.token_ids for r in fastdebias.generate(tri, PROMPTS, **hot)] == [
        r.token_ids for r in fastdebias.generate(plain, PROMPTS, **hot)]  # fmt: skip


def test_min_p_on_both_backends(llama_dir, adapter_qv):
    """min-p end to end: at ``min_p=1.0`` only the most likely token survives, so sampling (hot, with a lexicon
    and a repetition penalty) gives the greedy tokens on either backend; without it the same sampling does not. On
    the Triton backend this also takes the unfused step (the fused lm_head + step does no filtering)."""
    from fastdebias.lexicon import Lexicon

    ref = fastdebias.load(llama_dir, adapter_qv, backend="torch", progress=False)
    tri = fastdebias.load(llama_dir, adapter_qv, backend="triton", device=ref.device, dtype=ref.dtype, progress=False)
    free = fastdebias.generate(ref, PROMPTS, max_new_tokens=8)
    lex = Lexicon.from_token_sequences({tuple(free[0].token_ids[2:4]): float("-inf"), (free[1].token_ids[1],): -2.0})
    kw = dict(max_new_tokens=8, lexicon=lex, repetition_penalty=1.3)
    greedy = [r.token_ids for r in fastdebias.generate(ref, PROMPTS, **kw)]
    for model in (ref, tri):
        for seed in (1, 2):
            hot = dict(temperature=5.0, seed=seed, **kw)
            assert [r.token_ids for r in fastdebias.generate(model, PROMPTS, min_p=1.0, **hot)] == greedy
            assert [r.token_ids for r in fastdebias.generate(model, PROMPTS, **hot)] != greedy


def test_tiny_temperatures_are_greedy_on_both_backends(llama_dir, adapter_qv):
    """Below 1e-5 a temperature is greedy (vLLM's rule): 1/T overflows fp32 from ~1e-38, which without the rule
    gave infinities and NaNs (token 0 every step), not the near-certain argmax."""
    ref = fastdebias.load(llama_dir, adapter_qv, backend="torch", progress=False)
    tri = fastdebias.load(llama_dir, adapter_qv, backend="triton", device=ref.device, dtype=ref.dtype, progress=False)
    greedy = [r.token_ids for r in fastdebias.generate(ref, PROMPTS, max_new_tokens=6)]
    for model in (ref, tri):
        for t in (1e-40, 1e-30, 9e-6):
            got = [r.token_ids for r in fastdebias.generate(model, PROMPTS, max_new_tokens=6, temperature=t, seed=0)]
            assert got == greedy, (model.backend, t)


def test_interpreter_variable_set_too_late_is_a_clear_error(llama_dir, tmp_path):
    """TRITON_INTERPRET=1 set after triton was imported leaves GPU kernels (triton reads it at import): load says so
    and how to fix it, instead of an InterpreterError at the first launch; set in time, the same load works."""
    import subprocess
    import sys

    script = tmp_path / "late.py"
    script.write_text(
        "import os, sys\n"
        "import triton  # noqa: F401\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import fastdebias\n"
        "from fastdebias.errors import BackendError\n"
        "try:\n"
        f"    fastdebias.load({str(llama_dir)!r}, backend='triton', device='cpu', progress=False)\n"
        "except BackendError as e:\n"
        "    print('BackendError:', e)\n"
        "else:\n"
        "    print('loaded')\n"
    )  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    late = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert "BackendError: backend='triton' on CPU: TRITON_INTERPRET=1 is set, but only after triton" in late.stdout, (
        late.stdout + late.stderr)
    in_time = subprocess.run([sys.executable, str(script)], env={**env, "TRITON_INTERPRET": "1"}, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert in_time.stdout.strip() == "loaded", in_time.stdout + in_time.stderr
