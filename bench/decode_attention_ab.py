"""A/B of the compiled CPU runtime's decode step, one switch at a time: its one-token attention as multiply-reduces
fused into the layer's graph (``model.decode_attention``) vs SDPA, in one process, interleaved; or, with ``--switch
REALIZE_Q``, the query written to memory before the multiply-reduce vs recomputed inside it (``model.REALIZE_Q``);
or, with ``--switch REALIZE_GEMV_INPUT``, the input of the 1-2-row GEMVs written to memory vs recomputed inside
them (``model.REALIZE_GEMV_INPUT``).

    python bench/decode_attention_ab.py --batch-sizes 1,8,32 --dtypes float32,bfloat16 --md out.md
    python bench/decode_attention_ab.py --switch REALIZE_Q --batch-sizes 1,8,32 --md out.md
    python bench/decode_attention_ab.py --switch REALIZE_GEMV_INPUT --batch-sizes 1,2 --md out.md

The embedded SmolLM2 + a random r=16 q/v adapter (as ``fastdebias bench``), ``runtime="compile"``, 64-token prompts,
64 new tokens (EOS ignored). Per batch size and dtype: both variants warmed (each compiles its own layer graph:
dynamo guards on the switch), then ``--reps`` rounds of (64-token, 1-token) generates per
variant, alternating; TPOT = (t64 - t1) / 63, median. Greedy outputs compared between the variants. And, less
exposed to the machine's noise, the decoder layer alone: one compiled function of the layer (as the runtime's
region, static shapes) over the first 6 layers, a full 129-slot cache, 15 alternating rounds of 20 passes per
variant (the adapter on every row, as in the generates); time per layer, median.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fastdebias
import fastdebias.model as fm
from fastdebias import bench
from fastdebias.model import KVCache, run_layers

NEW = 64
# the model globals an A/B may flip (False = baseline, True = candidate) → the variants' names
SWITCHES = {"MULTIPLY_REDUCE_ATTENTION": ("sdpa", "multiply-reduce"), "REALIZE_Q": ("q inlined", "q realized"),
            "REALIZE_GEMV_INPUT": ("GEMV input inlined", "GEMV input stored")}


def layer_ab(model, b: int, switch: str, kv_len: int = 129, n_layers: int = 6, rounds: int = 15) -> dict[bool, float]:
    """Median µs per decoder layer of one compiled layer function, ``model.<switch>`` False vs True."""
    dec, cfg = model.decoder, model.config
    dtype = dec.embed_tokens.dtype
    cache = KVCache.allocate(cfg, b, kv_len, dtype, torch.device("cpu"))
    for t in cache.k + cache.v:
        t.normal_()
    h = torch.randn(b, 1, cfg.hidden_size).to(dtype)
    slots = torch.full((b, 1), kv_len - 1)
    cos, sin = dec.rope_cos[slots].to(dtype), dec.rope_sin[slots].to(dtype)
    mask = (torch.arange(kv_len).view(1, 1, 1, kv_len) <= slots.view(b, 1, 1, 1)).expand(b, 1, 1, kv_len)
    rows = torch.zeros(b, dtype=torch.int32) if model.adapter_names else None
    fn = torch.compile(run_layers, dynamic=False)

    def passes(flag: bool, n: int = 20) -> float:
        setattr(fm, switch, flag)
        t = time.perf_counter()
        for _ in range(n):
            for i, layer in enumerate(dec.layers[:n_layers]):
                fn((layer,), h, rows, cos, sin, (cache.k[i],), (cache.v[i],), slots, mask)
        return (time.perf_counter() - t) / n / n_layers * 1e6

    for flag in (False, True):
        passes(flag, 3)
    times = {False: [], True: []}
    for _ in range(rounds):
        for flag in (False, True):
            times[flag].append(passes(flag))
    setattr(fm, switch, True)
    return {f: statistics.median(v) for f, v in times.items()}


def e2e_ab(model, b: int, reps: int, switch: str) -> tuple[dict[bool, list[float]], str]:
    """TPOTs (ms) per variant, ``model.<switch>`` False vs True, and whether their greedy outputs agree."""
    prompts = bench.make_prompts(model.tokenizer, b, 64, model.config.vocab_size)

    def run(flag: bool, n: int) -> tuple[float, list]:
        setattr(fm, switch, flag)
        t = time.perf_counter()
        out = fastdebias.generate(model, prompts, max_new_tokens=n, eos_token_id=[], progress=False)
        return time.perf_counter() - t, [o.token_ids for o in out]

    tpot, outs = {True: [], False: []}, {}
    for flag in (False, True):
        run(flag, NEW), run(flag, 1)
    for _ in range(reps):
        for flag in (False, True):
            (tn, outs[flag]), (t1, _) = run(flag, NEW), run(flag, 1)
            tpot[flag].append((tn - t1) / (NEW - 1) * 1000)
    setattr(fm, switch, True)
    return tpot, "yes" if outs[True] == outs[False] else "no"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--md", default=None, help="write the table here too")
    p.add_argument("--switch", default="MULTIPLY_REDUCE_ATTENTION", choices=sorted(SWITCHES),
                   help="the model global to flip")
    args = p.parse_args(argv)
    names = SWITCHES[args.switch]
    dev = torch.device("cpu")
    cfg = bench.BenchConfig(progress=False).resolve()
    lines = [f"# the compiled CPU decode step: {names[1]} vs {names[0]} ({bench.device_name(dev)}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; commit {bench.git_commit()[0]})", "",
             "| dtype | batch | variant | TPOT ms (median) | TPOTs | speedup | identical | layer µs | layer speedup |",
             "| --- | ---: | --- | ---: | --- | ---: | --- | ---: | ---: |"]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fastdebias-ab-") as tmp:
        setup = bench.prepare(cfg, Path(tmp), dev)
        models = {d: fastdebias.load(setup.model_dir, setup.adapter_dir, dtype=d, runtime="compile", progress=False)
                  for d in args.dtypes.split(",")}  # fmt: skip
        for dtype, model in models.items():
            for b in sizes:
                rows[dtype, b] = e2e_ab(model, b, args.reps, args.switch)
                print(dtype, b, rows[dtype, b], flush=True)
        # after every generate: the layer's static-shape compiles would otherwise add entries to the runtime's
        # compiled layer function (one code object: dynamo's cache limit, then eager)
        for dtype, model in models.items():
            for b in sizes:
                torch._dynamo.reset()
                lay = layer_ab(model, b, args.switch)
                tpot, same = rows[dtype, b]
                med = {f: statistics.median(v) for f, v in tpot.items()}
                for flag, name in zip((False, True), names):
                    lines.append(f"| {dtype} | {b} | {name} | {med[flag]:.2f} | "
                                 f"{', '.join(f'{x:.2f}' for x in tpot[flag])} | {med[False] / med[flag]:.2f} | "
                                 f"{same} | {lay[flag]:.0f} | {lay[False] / lay[flag]:.2f} |")
                    print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
