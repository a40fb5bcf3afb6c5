"""``fastdebias bench``: the --quick run end to end (JSON fields, plot, token identity), and its building blocks."""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
from unittest import mock

import pytest
import torch

from fastdebias import bench
from fastdebias.cli import main

from .conftest import as_cuda_graph

# Written out here rather than imported, so that dropping a field from the JSON fails a test.
POINT_FIELDS = {
    "system", "batch", "lexicon_size", "status", "reason", "ttft_ms", "tpot_ms", "total_ms", "tokens_per_s",
    "decode_tokens_per_s", "bytes_per_step", "gbps", "pct_copy_bandwidth", "peak_allocated_mib",
    "peak_reserved_mib", "peak_rss_mib", "memory_bound_mib", "speedup_vs_hf_eager", "speedup_vs_hf_compile",
    "tokens_identical", "ttft_ms_all", "total_ms_all",
}
HEADER_FIELDS = {
    "device", "device_tag", "device_type", "torch", "transformers", "peft", "triton", "python", "dtype", "commit",
    "dirty", "model", "adapter", "loadavg_start", "loadavg_end", "prompt_len", "new_tokens", "batch_sizes",
    "lexicon_sizes", "lexicon_size", "lexicon", "reps", "warmup", "prompts", "hf_compile_config", "memory_method",
    "order", "seconds", "complete", "model_tag", "fastdebias_runtime", "cpu_mkl_max_rows",
}
TOP_FIELDS = {
    "schema", "header", "copy_bandwidth_gbs", "model_bytes", "lexicon_build_s", "systems", "points", "comparisons",
    "mismatches", "lora_overhead", "lexicon_overhead", "goals",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``fastdebias bench --quick`` run through the CLI: (exit code, stdout, result JSON, output paths)."""
    d = tmp_path_factory.mktemp("bench")
    paths = dict(json=d / "e2e.json", md=d / "e2e.md", png=d / "e2e.png")
    out, writes = io.StringIO(), []

    def spy(result, **kw):  # every write: a checkpoint after each point, then the final one
        writes.append((json.loads(json.dumps(result)), kw))
        return write_outputs(result, **kw)

    write_outputs = bench.write_outputs
    with contextlib.redirect_stdout(out), mock.patch.object(bench, "write_outputs", spy):
        code = main(["bench", "--quick", "--device", "cpu", "-q", "--json", str(paths["json"]), "--md",
                     str(paths["md"]), "--plot", str(paths["png"])])
    paths["writes"] = writes
    return code, out.getvalue(), json.loads(paths["json"].read_text()), paths


def test_quick_json_has_every_field(quick):
    code, _, res, _ = quick
    assert code == 0
    assert TOP_FIELDS <= set(res)
    assert HEADER_FIELDS <= set(res["header"])
    h = res["header"]
    assert h["quick"] and h["device_type"] == "cpu" and h["dtype"] == "float32"
    assert h["batch_sizes"] == [1, 2] and h["lexicon_sizes"] == [0, 1000] and h["new_tokens"] == 8
    assert res["copy_bandwidth_gbs"] > 0
    assert set(res["systems"]) == set(bench.SYSTEMS)
    # every planned (system, batch, lexicon) has a record with every field
    planned = {(s, b, lx) for s in bench.HEAD_TO_HEAD for b, lx in [(1, 1000), (2, 1000), (1, 0)]}
    planned |= {(s, b, 1000) for s in ("fastdebias-merged", "fastdebias-noadapter") for b in (1, 2)}
    assert {(p["system"], p["batch"], p["lexicon_size"]) for p in res["points"]} == planned
    for p in res["points"]:
        assert POINT_FIELDS <= set(p), POINT_FIELDS - set(p)
        if p["system"] == "hf-compile":  # --quick never compiles, and says so
            assert p["status"] == "skipped" and p["reason"] == "--quick"
            continue
        assert p["status"] == "ok", p
        for k in ("ttft_ms", "total_ms", "tokens_per_s", "bytes_per_step", "peak_rss_mib", "memory_bound_mib"):
            assert p[k] > 0 and math.isfinite(p[k]), (k, p)
        assert len(p["ttft_ms_all"]) == len(p["total_ms_all"]) == h["reps"]
        assert p["tokens_per_s"] == pytest.approx(p["batch"] * 8 / (p["total_ms"] / 1e3))
        assert p["speedup_vs_hf_eager"] > 0 and p["speedup_vs_hf_compile"] is None
    assert res["systems"]["hf-compile"]["status"] == "skipped"
    assert {r["batch"] for r in res["lora_overhead"]} == {1, 2}
    assert {(r["system"], r["lexicon_size"]) for r in res["lexicon_overhead"]} == {("fastdebias", 1000),
                                                                                 ("hf-eager", 1000)}
    assert [g["goal"] for g in res["goals"]][0].startswith("CPU")


def test_quick_outputs_token_identical(quick):
    _, stdout, res, _ = quick
    assert {(c["batch"], c["lexicon_size"]) for c in res["comparisons"]} == {(1, 1000), (2, 1000), (1, 0)}
    assert all(c["identical"] and c["rows_identical"] == c["rows"] for c in res["comparisons"]), res["comparisons"]
    assert res["mismatches"] == []
    assert "MISMATCH" not in stdout
    for p in res["points"]:
        if p["system"] in ("fastdebias", "hf-eager"):
            assert p["tokens_identical"] is True


def test_quick_prints_table_and_writes_plot(quick, tmp_path):
    _, stdout, res, paths = quick
    assert "| system | batch | lexicon | TTFT ms | TPOT ms | tok/s |" in stdout
    assert res["header"]["torch"] in stdout and res["header"]["commit"] in stdout
    from fastdebias import ops

    assert res["header"]["cpu_mkl_max_rows"] == ops.CPU_MKL_MAX_ROWS  # (which CPU GEMM few rows took: by machine)
    assert f"fastdebias.ops.CPU_MKL_MAX_ROWS = {ops.CPU_MKL_MAX_ROWS}:" in stdout
    assert paths["md"].read_text() == bench.format_markdown(res)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the plot and table are made from the JSON alone; --out names them by device
    written = bench.write_outputs(res, out_dir=tmp_path)
    assert sorted(p.name for p in written) == ["e2e_cpu_quick.json", "e2e_cpu_quick.md", "e2e_cpu_quick.png"]
    embedded = dict(res, header=dict(res["header"], model_tag=""))
    assert sorted(p.name for p in bench.write_outputs(embedded, out_dir=tmp_path)) == [
        "e2e_cpu.json", "e2e_cpu.md", "e2e_cpu.png"]


def test_partial_results_after_every_point(quick):
    """A run cut short (a device time limit) keeps what it measured: JSON and markdown after each point."""
    *partial, (final, final_kw) = quick[3]["writes"]
    assert len(partial) == 3  # (1, 1000), (2, 1000), (1, 0)
    assert [len([p for p in r["points"] if p["status"] == "ok"]) for r, _ in partial] == [4, 8, 10]
    assert all(not r["header"]["complete"] and kw["with_plot"] is False for r, kw in partial)
    assert final["header"]["complete"] and final_kw.get("with_plot", True)


def test_mismatch_is_loud(quick):
    _, _, res, _ = quick
    bad = json.loads(json.dumps(res))
    c = dict(bad["comparisons"][0], identical=False, rows_identical=0, first_divergence=dict(row=0, step=3))
    bad["comparisons"][0] = c
    bad["mismatches"] = [c]
    assert "MISMATCH" in bench.format_markdown(bad)
    assert bench.mismatch_lines(bad)[0].startswith("MISMATCH: fastdebias vs hf-eager")


def test_runtime_and_the_eager_system(tmp_path, monkeypatch, capsys):
    """--runtime picks fastdebias' decode runtime (recorded per system); fastdebias-eager and fastdebias-compile run
    only when named, to compare runtimes in one run (torch.compile replaced by the identity: the step, eagerly)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    j = tmp_path / "r.json"
    code = main(["bench", "--quick", "--device", "cpu", "-q", "--batch-sizes", "1", "--lexicon-sizes", "10",
                 "--lexicon-size", "10", "--systems", "fastdebias,fastdebias-eager,fastdebias-compile,hf-eager",
                 "--runtime", "eager", "--json", str(j)])
    assert code == 0
    res = json.loads(j.read_text())
    assert res["header"]["fastdebias_runtime"] == "eager"
    systems = res["systems"]
    assert systems["fastdebias"]["runtime"] == "eager" and systems["fastdebias-eager"]["runtime"] == "eager"
    assert systems["fastdebias-compile"]["runtime"] == "compile" and systems["fastdebias-compile"]["compile_s"] > 0
    assert systems["fastdebias"]["compile_s"] is None
    assert {p["system"] for p in res["points"]} == {"fastdebias", "fastdebias-eager", "fastdebias-compile", "hf-eager"}
    assert not res["mismatches"]


def test_compare_finds_first_divergence():
    assert bench._compare([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]])["identical"]
    c = bench._compare([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert not c["identical"] and c["rows_identical"] == 1 and c["first_divergence"] == dict(row=1, step=1)


def test_synthetic_lexicon():
    lex = bench.synthetic_lexicon(500, 300, seed=3, exclude=[0, 1, 2])
    assert len(lex) == 500
    seqs = [e.phrase for e in lex]
    assert len(set(seqs)) == 500
    assert all(1 <= len(s) <= 4 and all(3 <= t < 300 for t in s) for s in seqs)
    assert all(math.isfinite(e.bias) and e.bias < 0 for e in lex)
    assert [e.phrase for e in bench.synthetic_lexicon(500, 300, seed=3, exclude=[0, 1, 2])] == seqs
    assert bench.synthetic_lexicon(0, 300) is None


def test_prompts_have_the_requested_length(llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    for n_tokens in (5, 300):
        prompts = bench.make_prompts(tok, 11, n_tokens, 251)
        assert len(prompts) == 11 and all(len(p) == n_tokens for p in prompts)
    assert all(len(p) == 7 for p in bench.make_prompts(None, 3, 7, 100))


def test_synthetic_builder_on_a_small_shape(tmp_path):
    """The --synthetic code path, on a shape small enough for CPU: config, dtype and a LoRA with non-zero B."""
    from safetensors.torch import load_file

    import fastdebias

    spec = dict(config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=96, vocab_size=320, max_position_embeddings=128,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                dtype="bfloat16", lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model_dir, adapter_dir = bench.make_synthetic("small", tmp_path, torch.device("cpu"), spec)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["vocab_size"] == 320 and cfg["dtype"] == "bfloat16"
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    bs = [v for k, v in lora.items() if "lora_B" in k]
    assert len(bs) == 4 and all(b.shape[1] == 8 and b.abs().sum() > 0 for b in bs)
    assert bench.adapter_numel(adapter_dir) == sum(v.numel() for v in lora.values())
    model = fastdebias.load(model_dir, adapter_dir, dtype="float32", device="cpu", progress=False)
    assert len(fastdebias.generate(model, [[5, 6, 7]], max_new_tokens=3, eos_token_id=[])[0].token_ids) == 3


def test_synthetic_refused_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    assert main(["bench", "--synthetic", "llama2-7b", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--synthetic llama2-7b needs a CUDA GPU" in err


def test_bad_arguments_exit_2(capsys):
    assert main(["bench", "--quick", "--systems", "fastdebias,nope", "-q"]) == 2
    assert "--systems: unknown ['nope']" in capsys.readouterr().err
    assert main(["bench", "--quick", "--new-tokens", "1", "-q"]) == 2
    assert "--new-tokens" in capsys.readouterr().err


def test_profile_script_runs(tmp_path, capsys):
    """bench/profile_decode.py (the GPU session's profiler) on the tiny model: a table, a share, a trace."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "profile_decode.py"
    spec = importlib.util.spec_from_file_location("profile_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--new-tokens", "4", "--lexicon-size", "100", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model_forward" in out and "host time in the model forward" in out
    assert (tmp_path / "profile_cpu_quick.json").stat().st_size > 0


def _bench_logits_on_cpu(monkeypatch):
    """bench/bench_logits.py loaded as a module, on CPU through the interpreter: tiny lexicon and hidden size, the
    timer stubbed out (it calls each function once and returns a made-up time)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "bench_logits.py"
    spec = importlib.util.spec_from_file_location("bench_logits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []

    def fake_time(fn, graph=True, warmup=25, rep=100):
        fn()
        calls.append(fn)
        return [float(len(calls))] * 3, False

    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "_time", fake_time)
    monkeypatch.setattr(mod, "N_ENTRIES", 40)
    monkeypatch.setattr(mod, "HIDDEN", 64)
    return mod


def test_logits_bench_runs(tmp_path, monkeypatch):
    """The GPU session's ``bench_logits.py`` (every mode of the step, the fused lm_head against the unfused one)
    on a tiny shape: its rows have their fields and the markdown is written, so an API change fails here, not in a
    GPU slot."""
    mod = _bench_logits_on_cpu(monkeypatch)
    steps = mod._step_rows(2, 300, 1000.0)
    assert [r["mode"] for r in steps] == list(mod.MODES)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=g, dtype=torch.float32).to(torch.float16)
    heads = mod._lm_head_rows(2, 300, w, g)
    assert [r["mode"] for r in heads] == ["greedy", "sample"]
    result = dict(device="cpu", torch="t", triton="t", transformers="t", commit="c", hbm_copy_gbps=1000.0,
                  lm_head_dtype="torch.float16", steps=steps, lm_head=heads)  # fmt: skip
    mod.write_markdown(result, tmp_path / "logits.md")
    text = (tmp_path / "logits.md").read_text()
    assert all(f"| 300 | 2 | {mode} |" in text for mode in ("greedy", "sample", "top_k_top_p", "min_p"))


def test_logits_filter_sweep_runs(tmp_path, monkeypatch):
    """bench/bench_logits.py --filter-sweep (a GPU session's one command) on a tiny shape: every meta gives the
    same draws, the rule's meta is among those swept, and the markdown is written."""
    mod = _bench_logits_on_cpu(monkeypatch)
    monkeypatch.setattr(mod, "FILTER_SWEEP", {"n_cand": (4, 16), "pass_block_n": (64, 128), "pass_num_warps": (4,)})
    rows = mod.run_filter_sweep(batches=(2,), vocabs=(300,))
    assert len(rows) == 4 and all(r["same_tokens"] for r in rows)
    assert sum(r["is_rule"] for r in rows) == 1
    out = tmp_path / "sweep.md"
    mod.write_sweep_markdown(dict(device="cpu", torch="t", triton="t", commit="c", sweep=rows), out)
    text = out.read_text()
    assert "| 300 | 2 | 16, 128, 4 |" in text and "| True |" in text


def test_jobs_bench_runs(tmp_path, llama_dir):
    """bench/bench_jobs.py end to end on the tiny model: its three systems, their ratios and token checks, and the
    JSON, markdown and PNG it writes."""
    mod = _bench_module("bench_jobs")
    out = tmp_path / "res"
    assert mod.main(["--model", str(llama_dir), "--texts", "3,5", "--reps", "1", "--max-new-tokens", "6",
                     "--runtime", "eager", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "jobs_cpu.json").read_text())
    pts = result["points"]
    assert [(p["system"], p["texts"]) for p in pts] == [(s, n) for n in (3, 5) for s in mod.SYSTEMS]
    for p in pts:
        assert p["wall_s"] > 0 and len(p["times_s"]) == 1 and p["generated_tokens"] > 0
        assert math.isclose(p["texts_per_s"], p["texts"] / p["wall_s"])
        assert p["same_tokens_as_hf"] is True  # greedy, no lexicon: every system must agree
    assert all(p["x_hf_eager"] == 1.0 for p in pts if p["system"] == "hf-eager")
    assert result["header"]["runtime"] == "eager" and result["header"]["max_new_tokens"] == 6
    assert "| 5 | fastdebias-whole-batch |" in (out / "jobs_cpu.md").read_text()
    assert (out / "jobs_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # two rows at a time: fastdebias joins prompts as rows finish, the others take batches in turn; same tokens
    assert mod.main(["--model", str(llama_dir), "--texts", "5", "--reps", "1", "--max-new-tokens", "6",
                     "--runtime", "eager", "--batch-size", "2", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "jobs_cpu_bs2.json").read_text())
    assert result["header"]["batch_size"] == 2 and all(p["same_tokens_as_hf"] for p in result["points"])
    assert "2 rows at a time" in (out / "jobs_cpu_bs2.md").read_text()


def _bench_module(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_verify_bench_runs(tmp_path):
    """bench/bench_verify.py --quick: a point per batch and T, the one-token step as the ratios' unit, and the
    JSON, markdown and PNG it writes."""
    out = tmp_path / "res"
    assert _bench_module("bench_verify").main(["--quick", "--batch-sizes", "1", "2", "--positions", "3", "5",
                                               "--reps", "2", "--warmup", "1", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "verify_cpu_tiny.json").read_text())
    pts = result["points"]
    assert [(p["batch"], p["positions"]) for p in pts] == [(b, t) for b in (1, 2) for t in (1, 3, 5)]
    for p in pts:
        assert p["ms"] > 0 and len(p["ms_all"]) == 2 and math.isclose(p["ms"], statistics.median(p["ms_all"]))
        one = next(q for q in pts if q["batch"] == p["batch"] and q["positions"] == 1)
        assert math.isclose(p["ratio_to_one_token"], p["ms"] / one["ms"])
    assert result["meta"]["runtime"] == "eager" and "unmerged" in (out / "verify_cpu_tiny.md").read_text()
    assert (out / "verify_cpu_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_reasons_stay_in_their_cell():
    """A reason with line breaks and pipes (an exception's message) keeps the table one row per point."""
    assert bench._cell("load: AdapterError: x\n  y | z") == "load: AdapterError: x y \\| z"


def test_fp32_reference_and_the_half_precision_rule(tmp_path, monkeypatch):
    """``bench._fp32_logits`` equals the same model cast to fp32 whole, and leaves its weights as they were (dtype,
    bits, ordinary tensors). In half precision ``_diagnose`` also calls a divergence rounding when fastdebias' logits
    are about as close to the fp32 logits as transformers' (tested with crafted fp32 logits and the fixed tolerance
    set to 0, so that only this rule can pass)."""
    import copy

    setup = bench.prepare(bench.BenchConfig(quick=True), tmp_path, torch.device("cpu"))
    dev, dt = torch.device("cpu"), torch.bfloat16
    hf = bench._Transformers("hf-eager", setup, dev, dt, lambda n: ({}, []), 60.0)
    prompts = [[1, 5, 9, 14, 3, 7], [1, 8, 2, 6, 4, 11]]
    before = {n: p.detach().clone() for n, p in hf.model.named_parameters()}
    assert any(p.dtype == dt for p in before.values())
    got = bench._fp32_logits(hf.model, torch.tensor(prompts))
    with torch.no_grad():
        want = copy.deepcopy(hf.model).float()(input_ids=torch.tensor(prompts)).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, p in hf.model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]) and not p.is_inference(), n

    fd = bench._FastDebias("fastdebias", setup, dev, dt, lambda n: None, "backtrack", "eager")
    ref = hf.call(prompts, 5, 0)
    k = 3
    ids = torch.tensor([p + r[:k] for p, r in zip(prompts, ref)])
    with torch.inference_mode():  # as _diagnose scores them
        l_hf = hf.model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
    second = l_hf[1].topk(2).indices[1].item()
    ours = [list(r) for r in ref]
    ours[1][k] = second
    monkeypatch.setitem(bench.ROUNDING_TOL, dt, 0.0)

    def diagnose(exact):
        monkeypatch.setattr(bench, "_fp32_logits", lambda model, x: exact)
        return bench._diagnose(fd, hf, prompts, ours, ref, 0, dt)["rows"][0]

    # fp32 far from both models (bf16 logits of the tiny model differ by < 0.1; this noise is ~3), preferring ours
    far = l_hf + 3 * torch.randn(l_hf.shape, generator=torch.Generator().manual_seed(0))
    far[1, second] = far[1, ref[1][k]] + 1.0
    row = diagnose(far)
    assert row["rounding"] is True and row["err_fastdebias"] <= 1.25 * row["err_transformers"]
    assert row["fp32_prefers"] == "fastdebias" and row["ref_margin"] == pytest.approx(1.0)
    row = diagnose(l_hf.clone())  # fp32 equal to transformers' logits: fastdebias is the one off
    assert row["err_transformers"] == 0 < row["err_fastdebias"] and row["rounding"] is False
    assert row["fp32_prefers"] == "transformers"


def test_diagnose_tells_rounding_flips_from_errors(tmp_path, monkeypatch, emulated_graphs):
    """``bench._diagnose`` (why greedy outputs diverged): a token transformers scores far below its own pick is an
    error even when the models agree; a pick within the models' logit difference (made here by shifting fastdebias'
    logits of one token by more than transformers' margin, within the dtype's tolerance) is a rounding flip; and a
    shift beyond the tolerance is an error however close the scores."""
    import sys

    gen_mod = sys.modules["fastdebias.generate"]
    cfg = bench.BenchConfig(quick=True)
    setup = bench.prepare(cfg, tmp_path, torch.device("cpu"))
    dev, dt = torch.device("cpu"), torch.float32
    fd = bench._FastDebias("fastdebias", setup, dev, dt, lambda n: None, "backtrack", "eager")
    hf = bench._Transformers("hf-eager", setup, dev, dt, lambda n: ({}, []), 60.0)
    prompts = [[1, 5, 9, 14, 3, 7], [1, 8, 2, 6, 4, 11]]
    ref = hf.call(prompts, 5, 0)
    assert fd.call(prompts, 5, 0) == ref  # fp32: token-identical
    k = 3
    ids = torch.tensor([p + r[:k] for p, r in zip(prompts, ref)])
    with torch.inference_mode():
        scores = hf.model(input_ids=ids).logits[:, -1].float()
    worst, second = scores[1].argmin().item(), scores[1].topk(2).indices[1].item()
    margin = (scores[1, ref[1][k]] - scores[1, second]).item()

    def wrong(token):
        out = [list(r) for r in ref]
        out[1][k] = token
        return out

    d = bench._diagnose(fd, hf, prompts, wrong(worst), ref, 0, dt)
    assert d["rounding"] is False and [(f["row"], f["step"], f["ours"]) for f in d["rows"]] == [(1, k, worst)]
    assert d["rows"][0]["margin"] > d["rows"][0]["max_logit_diff"]
    # the same under the cuda_graph runtime's logic (static cache, captured forward: emulated on CPU)
    as_cuda_graph(fd.model)
    assert fd.call(prompts, 5, 0) == ref
    g = bench._diagnose(fd, hf, prompts, wrong(worst), ref, 0, dt)
    assert g["rows"][0]["margin"] == d["rows"][0]["margin"] and g["rows"][0]["max_logit_diff"] < 1e-4
    fd.model.runner.runtime = "eager"
    first = [list(r) for r in ref]  # a divergence at the first token: the prefill's logits
    with torch.inference_mode():
        first[0][0] = hf.model(input_ids=torch.tensor(prompts)).logits[0, -1].argmin().item()
    d = bench._diagnose(fd, hf, prompts, first, ref, 0, dt)
    assert d["rounding"] is False and [(f["row"], f["step"]) for f in d["rows"]] == [(0, 0)]
    assert d["rows"][0]["max_logit_diff"] < 1e-3 < d["rows"][0]["margin"]
    first[1][k] = worst  # two divergence steps, only the earliest diagnosed
    monkeypatch.setattr(bench, "MAX_DIAGNOSED_STEPS", 1)
    d = bench._diagnose(fd, hf, prompts, first, ref, 0, dt)
    assert [(f["row"], f["step"]) for f in d["rows"]] == [(0, 0)] and d["not_diagnosed"] == 1
    monkeypatch.undo()

    def shifted(shift):
        real = gen_mod.decode_one_token

        def decode(*a, **kw):
            out = real(*a, **kw).clone()
            out[1, second] += shift
            return out

        monkeypatch.setattr(gen_mod, "decode_one_token", decode)
        try:
            return bench._diagnose(fd, hf, prompts, wrong(second), ref, 0, dt)
        finally:
            monkeypatch.setattr(gen_mod, "decode_one_token", real)

    # a tolerance that admits a shift of 1.5x the margin (fp32's would not: its margins are far above rounding)
    scale = scores.abs().max().item()
    monkeypatch.setitem(bench.ROUNDING_TOL, dt, 2 * margin / scale)
    d = shifted(margin * 1.5)
    assert d["rounding"] is True and d["rows"][0]["margin"] <= d["rows"][0]["max_logit_diff"]
    d = shifted(margin * 3)  # the models' logits differ by more than the tolerance: not rounding
    assert d["rounding"] is False and d["rows"][0]["max_logit_diff"] > bench.ROUNDING_TOL[dt] * scale
