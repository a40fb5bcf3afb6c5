"""A/B in one process: the compiled runtime (whole one-token forward, static cache) vs per-layer ("regional")
compilation of an eager-runtime model, vs plain eager. An experiment for choosing what ``runtime="compile"``
should be on CPU; not a fastdebias feature yet.

    python bench/regional_compile_ab.py --batch-sizes 1,8 [--md PATH]

Each variant is loaded once (the embedded SmolLM2, a random r=16 q/v adapter); ``regional`` calls
``layer.compile()`` on every decoder layer, so one compiled graph serves all layers (dynamic batch and kv length);
``regional+step`` also compiles the loop's token choice and bookkeeping, as ``"compile"`` does.
Per batch size: the first calls (one full generate + one 1-token generate: compiles included, inductor's disk cache
as found), then ``--pairs`` interleaved rounds; TPOT = (time of n tokens - time of 1 token) / (n - 1), median.
Greedy outputs are compared with the first variant's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fastdebias
from fastdebias import bench, embedded

VARIANTS = ("whole", "regional", "regional+step", "eager")


def load(variant: str, model_dir: Path, adapter: Path):
    runtime = "compile" if variant == "whole" else "eager"
    model = fastdebias.load(model_dir, {"a": adapter}, runtime=runtime, progress=False)
    if variant.startswith("regional"):
        for layer in model.decoder.layers:
            layer.compile()
    if variant == "regional+step":  # the loop's step compiled as under "compile" (the eager runtime runs it as is)
        runner = model.runner
        runner.step_function = runner._compiled_step
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64
    variants = args.variants.split(",")
    model_dir = embedded.embedded_model_dir(progress=False)
    adapter = bench.make_random_adapter(model_dir, Path(tempfile.mkdtemp()) / "adapter", r=16, lora_alpha=16,
                                        target_modules=["q_proj", "v_proj"])  # fmt: skip
    models = {v: load(v, model_dir, adapter) for v in variants}
    n = args.new_tokens
    kw, kw1 = dict(max_new_tokens=n, eos_token_id=[]), dict(max_new_tokens=1, eos_token_id=[])
    lines = [f"# regional vs whole-forward compilation (CPU, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; commit {bench.git_commit()[0]})", "",
             "| batch | variant | first calls s | TPOT ms (median) | TPOTs | identical |",
             "| ---: | --- | ---: | ---: | --- | --- |"]  # fmt: skip
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = [[1] + list(range(100 + i, 100 + i + 63)) for i in range(b)]
        first, outs, tpots = {}, {}, {v: [] for v in variants}
        for v in variants:
            t = time.perf_counter()
            outs[v] = [r.token_ids for r in fastdebias.generate(models[v], prompts, **kw)]
            fastdebias.generate(models[v], prompts, **kw1)
            first[v] = time.perf_counter() - t
        for _ in range(args.pairs):
            for v in variants:
                t = time.perf_counter()
                fastdebias.generate(models[v], prompts, **kw1)
                t1 = time.perf_counter() - t
                t = time.perf_counter()
                fastdebias.generate(models[v], prompts, **kw)
                tpots[v].append((time.perf_counter() - t - t1) / (n - 1) * 1e3)
        for v in variants:
            same = "yes" if outs[v] == outs[variants[0]] else "NO"
            lines.append(f"| {b} | {v} | {first[v]:.1f} | {statistics.median(tpots[v]):.1f} | "
                         f"{', '.join(f'{x:.1f}' for x in tpots[v])} | {same} |")  # fmt: skip
        print("\n".join(lines[-len(variants):]), flush=True)
    print("\n" + "\n".join(lines))
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
