"""Benchmark of the bias-aware logits step and the fused lm_head + sample.

CPU (the PyTorch reference and the two baselines, small shapes, one thread; skipped unless asked for):
    pytest bench/bench_logits.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,rounds
GPU (Triton vs transformers' processor pipeline and vs plain torch ops; fused lm_head vs lm_head + step):
    python bench/bench_logits.py --out bench/results
writes ``logits_<device>.json`` and ``logits_<device>.md``;
    python bench/bench_logits.py --filter-sweep --out bench/results
times the top-k + top-p step under each threshold-pass meta (candidates per pass, tile width, warps) beside the
rule's choice, into ``logits_filter_sweep_<device>.*``.

Every case applies the same lexicon (800 random entries of 1-4 tokens over the vocabulary, 30% bans, the rest
penalties in [-8, 5], contexts shared so that automaton states carry several biased tokens) and a repetition
penalty of 1.1 over a 256-token context, to fp32 logits [B, V], and chooses one token per row:

- ``triton``: ``fastdebias.ops.logits.logits_step`` (states advanced, entry looked up, all inside);
- ``torch``: the same step in plain torch ops, as ``fastdebias.generate`` runs it today
  (``PhraseMatcher.apply`` → ``apply_repetition_penalty`` → ``choose_tokens`` → ``lookup`` → ``step``);
- ``transformers``: ``SequenceBiasLogitsProcessor`` + ``NoBadWordsLogitsProcessor`` + repetition penalty +
  temperature + top-k + top-p + min-p warpers, then softmax + ``torch.multinomial`` (argmax when greedy).

Modes: ``greedy``; ``sample`` (temperature 0.7); ``top_k_top_p`` (50, 0.9); ``min_p`` (0.05, alone: the Triton step
takes no threshold search for it).

GPU times are ``triton.testing.do_bench`` medians (with 20th/80th percentiles) of CUDA-graph replays where the
code can be captured (triton and torch; transformers' processors build tensors from Python lists every call and
are timed eagerly, as ``generate`` runs them). GB/s counts the bytes of the fp32 logits read once.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.testing
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fastdebias.bench import copy_bandwidth_gbs, device_tag, git_commit
from fastdebias.matcher import BAN, build_matcher
from fastdebias.reference import logits as ref
from fastdebias.reference.sampling import apply_repetition_penalty, choose_tokens

VOCABS = (32000, 128256)
BATCHES = (1, 8, 64, 256)
CONTEXT = 256
PENALTY = 1.1
N_ENTRIES = 800
HIDDEN = 4096
MODES = {
    "greedy": {"temperature": 0.0},
    "sample": {"temperature": 0.7},
    "top_k_top_p": {"temperature": 0.7, "top_k": 50, "top_p": 0.9},
    "min_p": {"temperature": 0.7, "min_p": 0.05},
}
QUANTILES = [0.5, 0.2, 0.8]
DEVICE = "cuda"


def make_case(b: int, v: int, device: str) -> dict:
    """Logits, lexicon, states, counts and the same context as transformers' input_ids."""
    rnd = random.Random(v)
    ctx = rnd.sample(range(v), 24)
    seqs = []
    for e in range(N_ENTRIES):
        n = rnd.randint(1, 4)
        ids = tuple(rnd.choice(ctx) for _ in range(n - 1)) + (rnd.randrange(v),)
        seqs.append((ids, BAN if rnd.random() < 0.3 else rnd.uniform(-8, 5), e))
    matcher = build_matcher(seqs, v)
    g = torch.Generator().manual_seed(b * v)
    input_ids = torch.randint(0, v, (b, CONTEXT), generator=g)
    for r in range(b):  # every other row ends in a lexicon prefix, so that phrase entries fire
        if r % 2:
            input_ids[r, -3:] = torch.tensor([rnd.choice(ctx) for _ in range(3)])
    logits = torch.randn(b, v, generator=g) * 3
    ones = torch.ones_like(input_ids, dtype=torch.int32)
    counts = torch.zeros(b, v, dtype=torch.int32).scatter_add_(1, input_ids, ones)
    m = matcher.to(device)
    return dict(
        logits=logits.to(device),
        input_ids=input_ids.to(device),
        counts=counts.to(device),
        matcher=m,
        states=m.init_states(input_ids.to(device)),
        seq_bias=matcher.hf_sequence_bias(),
        bad_words=matcher.hf_bad_words_ids(),
    )  # fmt: skip


def torch_step(c: dict, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """What ``fastdebias.generate`` runs per step today, in plain torch ops."""
    m, states = c["matcher"], c["states"]
    x = m.apply(c["logits"], states)
    x = apply_repetition_penalty(x, c["counts"] > 0, PENALTY)
    dead = torch.isneginf(x).all(dim=-1)
    x = torch.where(dead.view(-1, 1), torch.zeros_like(x), x)
    nxt = choose_tokens(x, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    entry = m.lookup(states, nxt)[2]
    return nxt, m.step(states, nxt), dead, entry


def hf_pipeline(
    c: dict, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if c["seq_bias"]:
        procs.append(SequenceBiasLogitsProcessor(c["seq_bias"]))
    if c["bad_words"]:
        procs.append(NoBadWordsLogitsProcessor(c["bad_words"], eos_token_id=None))
    procs.append(RepetitionPenaltyLogitsProcessor(PENALTY))
    if temperature > 0:
        procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
        if min_p > 0.0:
            procs.append(MinPLogitsWarper(min_p))
    return procs


def hf_step(c: dict, procs: LogitsProcessorList, temperature: float) -> torch.Tensor:
    scores = procs(c["input_ids"], c["logits"])
    if temperature == 0:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


# ------------------------------------------------------------------------------------------------------ CPU


CPU_CASES = [(1, 1000), (8, 1000), (8, 32000)]


def _skip_unless_benchmark(request) -> None:
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("a benchmark: run with --benchmark-only")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("b,v", CPU_CASES)
@pytest.mark.parametrize("impl", ["reference", "torch", "transformers"])
def test_cpu_step(benchmark, request, impl, b, v, mode):
    _skip_unless_benchmark(request)
    # one thread: on a shared 2-core machine the OpenMP pool makes these sub-millisecond ops 10-30x slower and noisy
    torch.set_num_threads(1)
    c = make_case(b, v, "cpu")
    kw = MODES[mode]
    benchmark.extra_info.update(case=f"B={b} V={v} {mode}", impl=impl)
    benchmark.group = f"B={b} V={v} {mode}"
    if impl == "reference":
        benchmark(
            ref.logits_step, c["logits"], matcher=c["matcher"], states=c["states"], counts=c["counts"],
            repetition_penalty=PENALTY, seed=0, step=0, **kw,
        )  # fmt: skip
    elif impl == "torch":
        benchmark(torch_step, c, **kw)
    else:
        procs = hf_pipeline(c, **kw)
        benchmark(hf_step, c, procs, kw["temperature"])


# ------------------------------------------------------------------------------------------------------ GPU


def _time(fn, graph: bool = True, warmup: int = 25, rep: int = 100) -> tuple[list[float], bool]:
    """([median, p20, p80] µs, captured) of ``fn``, replayed from a CUDA graph when it can be captured."""
    fn()  # compile, build the lexicon tables, allocate outside the capture
    torch.cuda.synchronize()
    captured = False
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fn, captured = g.replay, True
        except RuntimeError:  # not capturable: time it eagerly
            torch.cuda.synchronize()
    times = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES)
    return [t * 1e3 for t in times], captured


def _step_rows(b: int, v: int, hbm: float) -> list[dict]:
    from fastdebias.ops.logits import logits_step

    c = make_case(b, v, DEVICE)
    step = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    rows = []
    for mode, kw in MODES.items():
        args = dict(matcher=c["matcher"], states=c["states"], counts=c["counts"], repetition_penalty=PENALTY, seed=0,
                    step=step, **kw)  # fmt: skip
        t_tri, _ = _time(lambda: logits_step(c["logits"], **args))
        t_tri_eager, _ = _time(lambda: logits_step(c["logits"], **args), graph=False)
        t_torch, torch_graph = _time(lambda: torch_step(c, **kw))
        procs = hf_pipeline(c, **kw)
        t_hf, _ = _time(lambda: hf_step(c, procs, kw["temperature"]), graph=False)
        gbps = b * v * 4 / (t_tri[0] * 1e-6) / 1e9
        row = dict(
            v=v, b=b, mode=mode, triton_us=t_tri, triton_eager_us=t_tri_eager, torch_us=t_torch,
            torch_graph=torch_graph, transformers_us=t_hf, logits_gbps=gbps, pct_hbm=100 * gbps / hbm,
            speedup_vs_torch=t_torch[0] / t_tri[0], speedup_vs_transformers=t_hf[0] / t_tri[0],
        )  # fmt: skip
        rows.append(row)
        print(
            f"V={v:<6d} B={b:<3d} {mode:12s} triton {t_tri[0]:8.1f} us ({gbps:6.0f} GB/s, {row['pct_hbm']:3.0f}% HBM)"
            f"  torch {t_torch[0]:8.1f}  transformers {t_hf[0]:8.1f}",
            flush=True,
        )
    return rows


def _lm_head_rows(b: int, v: int, w: torch.Tensor, g: torch.Generator) -> list[dict]:
    from fastdebias.ops.logits import lm_head_step, logits_step

    c = make_case(b, v, DEVICE)
    hidden = torch.randn(b, HIDDEN, generator=g, device=DEVICE).to(w.dtype)
    step = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    rows = []
    for mode in ("greedy", "sample"):
        args = dict(matcher=c["matcher"], states=c["states"], counts=c["counts"], repetition_penalty=PENALTY, seed=0,
                    step=step, **MODES[mode])  # fmt: skip
        t_fused, _ = _time(lambda: lm_head_step(hidden, w, **args))
        t_unfused, _ = _time(lambda: logits_step(F.linear(hidden, w), **args))
        t_linear, _ = _time(lambda: F.linear(hidden, w))
        w_bytes = v * HIDDEN * w.element_size()
        row = dict(
            v=v, b=b, k=HIDDEN, mode=mode, dtype=str(w.dtype), fused_us=t_fused, unfused_us=t_unfused,
            linear_only_us=t_linear, weight_gbps=w_bytes / (t_fused[0] * 1e-6) / 1e9,
            speedup_vs_unfused=t_unfused[0] / t_fused[0],
        )  # fmt: skip
        rows.append(row)
        print(
            f"lm_head V={v:<6d} B={b:<3d} {mode:7s} fused {t_fused[0]:8.1f} us  lm_head+step {t_unfused[0]:8.1f}"
            f"  (F.linear alone {t_linear[0]:8.1f})",
            flush=True,
        )
    return rows


def run_step_benchmark(hbm: float) -> list[dict]:
    rows = []
    for v in VOCABS:
        for b in BATCHES:
            rows += _step_rows(b, v, hbm)
            torch.cuda.empty_cache()
    return rows


def run_lm_head_benchmark(dtype: torch.dtype) -> list[dict]:
    rows = []
    for v in VOCABS:
        g = torch.Generator(device=DEVICE).manual_seed(v)
        w = (torch.randn(v, HIDDEN, generator=g, device=DEVICE) / HIDDEN**0.5).to(dtype)
        for b in BATCHES:
            rows += _lm_head_rows(b, v, w, g)
        torch.cuda.empty_cache()
    return rows


FILTER_SWEEP = {"n_cand": (4, 8, 16), "pass_block_n": (64, 128, 256), "pass_num_warps": (4, 8)}


def run_filter_sweep(batches=BATCHES, vocabs=VOCABS) -> list[dict]:
    """Time the top-k + top-p step (``MODES["top_k_top_p"]``) under every threshold-pass meta of ``FILTER_SWEEP``
    (the rest as ``logits_meta`` picks it), beside the rule's own choice and plain torch ops: which meta the rule
    should pick, by measurement."""
    import itertools

    from fastdebias.kernels.logits import _passes, logits_meta
    from fastdebias.ops.logits import _num_sms, logits_step

    kw = MODES["top_k_top_p"]
    n_sms = _num_sms(torch.device(DEVICE))
    rows = []
    for v in vocabs:
        for b in batches:
            c = make_case(b, v, DEVICE)
            step = torch.zeros(1, dtype=torch.int64, device=DEVICE)
            args = dict(matcher=c["matcher"], states=c["states"], counts=c["counts"], repetition_penalty=PENALTY,
                        seed=0, step=step, **kw)  # fmt: skip
            rule = logits_meta(b, v, n_sms)
            t_torch, _ = _time(lambda: torch_step(c, **kw))
            want = logits_step(c["logits"], **args).next_ids
            for nc, bn, warps in itertools.product(*FILTER_SWEEP.values()):
                # (the rule's split: the ops round each chunk up to whole tiles, so wide tiles may use fewer chunks)
                meta = rule._replace(n_cand=nc, n_pass=_passes(nc), pass_block_n=bn, pass_num_warps=warps)
                # the same draws whatever the meta (the kept set is exact; Gumbel-max is per column)
                same = bool(torch.equal(logits_step(c["logits"], meta=meta, **args).next_ids, want))
                t, _ = _time(lambda: logits_step(c["logits"], meta=meta, **args), warmup=10, rep=50)
                rows.append(dict(v=v, b=b, n_cand=nc, pass_block_n=bn, pass_num_warps=warps,
                                 is_rule=meta == rule, us=t, torch_us=t_torch, same_tokens=same,
                                 speedup_vs_torch=t_torch[0] / t[0]))  # fmt: skip
            best = min((r for r in rows if r["v"] == v and r["b"] == b), key=lambda r: r["us"][0])
            ruled = [r for r in rows if r["v"] == v and r["b"] == b and r["is_rule"]]
            rule_us = f"{ruled[0]['us'][0]:.1f}" if ruled else "n/a"
            print(
                f"top_k_top_p V={v:<6d} B={b:<3d} rule {rule_us} us  best {best['us'][0]:.1f} us (n_cand "
                f"{best['n_cand']}, block {best['pass_block_n']}, {best['pass_num_warps']} warps)  torch "
                f"{t_torch[0]:.1f} us",
                flush=True,
            )
            torch.cuda.empty_cache()
    return rows


def write_sweep_markdown(result: dict, path: Path) -> None:
    lines = [
        f"# Top-k + top-p threshold passes on {result['device']}: meta sweep",
        "",
        f"torch {result['torch']}, triton {result['triton']}, commit {result['commit']}. Mode {MODES['top_k_top_p']}, "
        f"lexicon of {N_ENTRIES} entries, repetition penalty {PENALTY}; median µs of CUDA-graph replays "
        "(`triton.testing.do_bench`). Rule = `logits_meta`'s choice; best = the fastest meta of the sweep.",
        "",
        "| V | B | rule (n_cand, block, warps) | rule µs | best (n_cand, block, warps) | best µs | torch ops µs "
        "| best × torch | same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    shapes = sorted({(r["v"], r["b"]) for r in result["sweep"]})
    for v, b in shapes:
        rs = [r for r in result["sweep"] if (r["v"], r["b"]) == (v, b)]
        best = min(rs, key=lambda r: r["us"][0])
        rule = next((r for r in rs if r["is_rule"]), None)
        cfg = "{n_cand}, {pass_block_n}, {pass_num_warps}"
        rule_cells = f"{cfg.format(**rule)} | {rule['us'][0]:.1f}" if rule else "outside the sweep | –"
        lines.append(
            f"| {v} | {b} | {rule_cells} | {cfg.format(**best)} | {best['us'][0]:.1f} | {best['torch_us'][0]:.1f} "
            f"| {best['speedup_vs_torch']:.2f} | {all(r['same_tokens'] for r in rs)} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        f"# Logits step on {result['device']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, transformers {result['transformers']}, "
        f"commit {result['commit']}; HBM copy bandwidth measured in the same run: {result['hbm_copy_gbps']:.0f} GB/s. "
        f"Lexicon of {N_ENTRIES} entries, repetition penalty {PENALTY} over {CONTEXT} tokens, fp32 logits. "
        "Median µs (`triton.testing.do_bench`), CUDA-graph replays for triton and torch, eager for transformers. "
        "GB/s = fp32 logits bytes / triton time.",
        "",
        "| V | B | mode | triton | triton (eager) | torch ops | transformers | GB/s | % HBM | × torch "
        "| × transformers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["steps"]:
        lines.append(
            f"| {r['v']} | {r['b']} | {r['mode']} | {r['triton_us'][0]:.1f} | {r['triton_eager_us'][0]:.1f} "
            f"| {r['torch_us'][0]:.1f}{'' if r['torch_graph'] else ' (eager)'} | {r['transformers_us'][0]:.1f} "
            f"| {r['logits_gbps']:.0f} | {r['pct_hbm']:.0f}% | {r['speedup_vs_torch']:.1f} "
            f"| {r['speedup_vs_transformers']:.1f} |"
        )
    lines += [
        "",
        f"## Fused lm_head + sample ({result['lm_head_dtype']}, K = {HIDDEN})",
        "",
        "| V | B | mode | fused | F.linear + step | F.linear alone | W GB/s (fused) | × unfused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["lm_head"]:
        lines.append(
            f"| {r['v']} | {r['b']} | {r['mode']} | {r['fused_us'][0]:.1f} | {r['unfused_us'][0]:.1f} "
            f"| {r['linear_only_us'][0]:.1f} | {r['weight_gbps']:.0f} | {r['speedup_vs_unfused']:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for the JSON + markdown")
    parser.add_argument("--lm-head-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument(
        "--filter-sweep", action="store_true",
        help="instead: time the top-k/top-p step under every threshold-pass meta (logits_filter_sweep_<device>.*)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_logits.py needs a CUDA GPU; on CPU run: pytest bench/bench_logits.py --benchmark-only",
            file=sys.stderr,
        )
        return 2
    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()[0]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  commit {commit}")
    hbm = copy_bandwidth_gbs(torch.device(DEVICE))
    print(f"HBM device-to-device copy: {hbm:.0f} GB/s", flush=True)
    if args.filter_sweep:
        result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                      commit=commit, timer="triton.testing.do_bench [median, p20, p80] us, CUDA-graph replays",
                      sweep=run_filter_sweep())  # fmt: skip
        stem = f"logits_filter_sweep_{device_tag(torch.device(DEVICE))}"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        write_sweep_markdown(result, args.out / f"{stem}.md")
        print(f"wrote {args.out / stem}.json and .md")
        return 0
    dtype = getattr(torch, args.lm_head_dtype)
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        commit=commit,
        hbm_copy_gbps=hbm,
        timer="triton.testing.do_bench medians [median, p20, p80] in us; CUDA-graph replays where capturable",
        lm_head_dtype=str(dtype),
        steps=run_step_benchmark(hbm),
        lm_head=run_lm_head_benchmark(dtype),
    )
    stem = f"logits_{device_tag(torch.device(DEVICE))}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    write_markdown(result, args.out / f"{stem}.md")
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
