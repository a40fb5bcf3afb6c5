"""What a prompt-lookup verification forward costs beside a one-token decode step, on the runner as ``generate``
uses it (CUDA graphs on GPU, the chosen runtime on CPU): the forward of each row's last token plus T - 1 drafts
against the one-token forward, for T = 1..9 and a few batch sizes, adapter unmerged.

Lookup gains when a forward keeps more tokens than it costs: with ``ratio(T)`` = verify(T) / decode, a run that keeps
``a`` tokens per forward on average decodes ``a / ratio(T)`` times as fast (less the step's per-position work).

    python bench/bench_verify.py --synthetic llama2-7b --out bench/results   # GPU: the SR-LLM shape
    python bench/bench_verify.py --out bench/results                         # CPU: the embedded SmolLM2
    python bench/bench_verify.py --quick                                     # tiny model, seconds (CI)

Each figure is the median of ``--reps`` timed calls after warm-up calls (which also capture or compile), the device
synchronised around each; every call rewrites the same cache slots, after a prefill of ``--prompt-len`` tokens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fastdebias
from fastdebias import bench
from fastdebias.generate import prefill


def measure(model, batch: int, spans: list[int], prompt_len: int, reps: int, warmup: int) -> list[dict]:
    """ms per forward of T positions at ``batch`` rows, for each T in ``spans`` (T = 1: ``runner.decode``)."""
    dev = model.device
    prompts = bench.make_prompts(model.tokenizer, batch, prompt_len, model.config.vocab_size)
    adapter_idx = torch.zeros(batch, dtype=torch.int32, device=dev) if model.adapter_names else None
    span_max = max(spans)
    _, cache, start, _ = prefill(model, prompts, span_max, adapter_idx, length=prompt_len + 2 * span_max)
    out = []
    for t in spans:
        tokens = torch.tensor(prompts, device=dev)[:, -t:]  # any ids: the cost does not depend on them
        slots = torch.arange(prompt_len, prompt_len + t, device=dev).expand(batch, t)
        kv_len = prompt_len + t

        def run():
            if t == 1:
                return model.runner.decode(tokens[:, 0], slots[:, 0], kv_len, start, cache, adapter_idx)
            return model.runner.verify(tokens, slots, kv_len, start, cache, adapter_idx)

        times = []
        for i in range(warmup + reps):
            bench._sync(dev)
            t0 = time.perf_counter()
            run()
            bench._sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        out.append(dict(batch=batch, positions=t, ms=1000 * statistics.median(times),
                        ms_all=[1000 * x for x in times]))  # fmt: skip
    one = out[0]["ms"]
    for p in out:
        p["ratio_to_one_token"] = p["ms"] / one
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", choices=sorted(bench.SYNTHETIC), default=None, help="GPU: the SR-LLM shape")
    ap.add_argument("--quick", action="store_true", help="tiny random model (CPU, seconds)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 (GPU: 1 8 32)")
    ap.add_argument("--positions", type=int, nargs="+", default=[1, 2, 3, 5, 9], help="T; 1 is the decode step")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=None, help="default 20 (GPU), 7 (CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runtime", default="auto", choices=["auto", "eager", "cuda_graph", "compile"],
                    help="auto: CUDA graphs on GPU, compile on CPU (the runtimes that decode fastest)")
    ap.add_argument("--out", type=Path, help="write verify_<device>_<model>.{md,json,png} here")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runtime = args.runtime if args.runtime != "auto" or dev.type == "cuda" else "compile"
    if args.quick:
        runtime = "eager" if args.runtime == "auto" else runtime
    spans = sorted(set([1] + args.positions))
    batches = args.batch_sizes or ([1, 8, 32] if dev.type == "cuda" else [1, 8])
    reps = args.reps or (20 if dev.type == "cuda" else 7)
    cfg = bench.BenchConfig(synthetic=args.synthetic, quick=args.quick, progress=False).resolve()
    with tempfile.TemporaryDirectory(prefix="fastdebias-verify-") as tmp:
        setup = bench.prepare(cfg, Path(tmp), dev)
        model = fastdebias.load(setup.model_dir, setup.adapter_dir, device=dev, runtime=runtime, progress=False)
    prompt_len = min(args.prompt_len, model.max_context - 2 * max(spans))
    points = []
    for b in batches:
        points += measure(model, b, spans, prompt_len, reps, args.warmup)
    commit, dirty = bench.git_commit()
    name = bench.device_name(dev)
    tag = "tiny" if args.quick else (args.synthetic or "smollm2")
    head = [f"# Prompt lookup: a verification forward of T positions vs a one-token step ({tag}, {name})", "",
            f"`python bench/bench_verify.py{' --synthetic ' + args.synthetic if args.synthetic else ''}"
            f"{' --quick' if args.quick else ''}` at {commit}{'+dirty' if dirty else ''}; torch {torch.__version__}; "
            f"model: {setup.model_desc}, {model.dtype}; adapter: {setup.adapter_desc}, unmerged; runtime "
            f"{model.runner.runtime}; {prompt_len}-token prompts; medians of {reps} after {args.warmup} warm-up "
            "calls. A run keeping a tokens per forward at T positions decodes a / ratio times as fast.", "",
            "| batch | T | ms | ratio to one token |", "| ---: | ---: | ---: | ---: |"]  # fmt: skip
    rows = [f"| {p['batch']} | {p['positions']} | {p['ms']:.2f} | {p['ratio_to_one_token']:.2f} |" for p in points]
    md = "\n".join(head + rows) + "\n"
    print(md)
    if args.out:
        meta = dict(commit=commit, dirty=dirty, device=name, torch=torch.__version__, model=setup.model_desc,
                    adapter=setup.adapter_desc, dtype=str(model.dtype), runtime=model.runner.runtime,
                    prompt_len=prompt_len, reps=reps, warmup=args.warmup)  # fmt: skip

        def draw(fig):
            ax = fig.add_subplot()
            for b in batches:
                ps = [p for p in points if p["batch"] == b]
                ax.plot([p["positions"] for p in ps], [p["ratio_to_one_token"] for p in ps], marker="o",
                        label=f"batch {b}")  # fmt: skip
            ax.set_xlabel("positions per forward (T)")
            ax.set_ylabel("time / one-token step")
            ax.set_title(f"verification forward cost, {tag}, {name}", fontsize=9)
            ax.legend()

        bench.save_results(args.out / f"verify_{bench.device_tag(dev)}_{tag}", md, dict(meta=meta, points=points), draw,
                           figsize=(6, 3.5))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
