"""Batch debiasing jobs: how fast ``fastdebias.debias`` gets through a list of texts whose rewrites end at
different lengths (EOS), against the same model's batch kept whole to the end and against transformers.

    python bench/bench_jobs.py --out bench/results                    # embedded SmolLM2, 16 and 64 texts
    python bench/bench_jobs.py --batch-size 16 --texts 64 --out bench/results  # 16 rows at a time
    python bench/bench_jobs.py --texts 8 --reps 1 --max-new-tokens 16 # a quick look

Systems, in one process, interleaved repetition by repetition, on the same prompt ids (the debias prompts of the
texts below, greedy, stopping at the model's EOS, no lexicon so that all of them must produce the same tokens),
every text of a job in one batch, or with ``--batch-size N`` N rows at a time:

- ``fastdebias``: ``fastdebias.generate`` as it is: with ``--batch-size``, the next prompts take finished rows'
  places (continuous batching), and once none wait, rows that finish leave the batch (``generate._retire_rows``;
  not under CUDA graphs, where they stay);
- ``fastdebias-no-shared-prefix``: the same, with the prompts' shared prefix (the debias prompt's system prompt and
  instruction) prefilled in every row instead of once (``runner.share_prefix``);
- ``fastdebias-whole-batch``: the same model on batches of N one after another (one ``generate`` call each, prompts
  of similar lengths together), with rows leaving switched off (``runner.min_rows_after_retiring``): every row of a
  batch is computed until its last one ends;
- ``hf-eager``: transformers ``generate`` (eager, left-padded batch, attention mask), which also computes every
  row until the last one ends, on batches of N (prompts of similar lengths together, as fastdebias groups them).

Reports the wall time of the whole job (prefill included), texts/s, generated tokens/s (the tokens each row kept)
and the ratio to ``hf-eager``, plus whether each system's tokens equal ``hf-eager``'s. Writes
``jobs_<device>.json``, ``.md`` and ``.png`` with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import fastdebias
from fastdebias.bench import _sync, device_name, device_tag, git_commit
from fastdebias.generate import _normalize_eos, debias_prompts

# Biased sentences written for this benchmark (part of fastdebias, Apache-2.0), cycled to the job size.
TEXTS = [
    "Old people can't learn new technology.", "Women are too emotional to be leaders.",
    "Poor people are lazy and don't want to work.", "Immigrants are stealing our jobs.",
    "Men are bad at taking care of children.", "Young people today are entitled and lazy.",
    "People from the countryside are uneducated.", "Fat people have no self-control.",
    "Religious people are closed-minded.", "Blondes are not very smart.",
    "Disabled people cannot contribute to society.", "Rich people are all greedy.", "Girls are bad at math.",
    "Old drivers are a danger on the road.", "Teenagers are irresponsible.", "Single mothers raise bad children.",
]  # fmt: skip
SYSTEMS = ("fastdebias", "fastdebias-no-shared-prefix", "fastdebias-whole-batch", "hf-eager")


def hf_generate(hf, ids: list[list[int]], max_new: int, eos: list[int], pad: int) -> list[list[int]]:
    """transformers' greedy generate on the left-padded batch → each row's ids up to and including its EOS."""
    t = max(len(x) for x in ids)
    inp = torch.tensor([[pad] * (t - len(x)) + x for x in ids], device=hf.device)
    mask = torch.tensor([[0] * (t - len(x)) + [1] * len(x) for x in ids], device=hf.device)
    with torch.inference_mode():
        out = hf.generate(input_ids=inp, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                          eos_token_id=eos, pad_token_id=pad)  # fmt: skip
    rows = []
    for row in out[:, t:].tolist():
        end = next((j for j, x in enumerate(row) if x in eos), None)
        rows.append(row if end is None else row[: end + 1])
    return rows


def run(args) -> dict:
    model = fastdebias.load(args.model, runtime=args.runtime, dtype=args.dtype, progress=False)
    dev = model.device
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=model.dtype).to(dev).eval()
    eos = _normalize_eos(model, None)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else eos[0]
    retiring = model.runner.min_rows_after_retiring

    def in_turn(ids: list[list[int]], bs: int, gen) -> list[list[int]]:
        """``gen`` on batches of ``bs`` prompts one after another, prompts of similar lengths together."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if bs < len(ids) else list(range(len(ids)))
        out: list[list[int]] = [[] for _ in ids]
        for lo in range(0, len(ids), bs):
            chunk = order[lo:lo + bs]
            for i, row in zip(chunk, gen([ids[i] for i in chunk])):
                out[i] = row
        return out

    def fd_generate(ids: list[list[int]], bs: int) -> list[list[int]]:
        model.runner.prefix = None  # a cold job: no prompt prefix kept from an earlier call
        outs = fastdebias.generate(model, ids, max_new_tokens=args.max_new_tokens, lexicon=None, batch_size=bs,
                                   progress=False)  # fmt: skip
        return [o.token_ids for o in outs]

    def call(system: str, ids: list[list[int]]) -> list[list[int]]:
        bs = args.batch_size or len(ids)
        if system == "hf-eager":
            return in_turn(ids, bs, lambda chunk: hf_generate(hf, chunk, args.max_new_tokens, eos, pad))
        model.runner.share_prefix = system != "fastdebias-no-shared-prefix"
        if system != "fastdebias-whole-batch":
            model.runner.min_rows_after_retiring = retiring
            return fd_generate(ids, bs)
        model.runner.min_rows_after_retiring = lambda: None
        return in_turn(ids, bs, lambda chunk: fd_generate(chunk, bs))

    points = []
    for n in args.texts:
        ids, _ = debias_prompts(model, [TEXTS[i % len(TEXTS)] for i in range(n)])
        outs, times = {}, {s: [] for s in SYSTEMS}
        for s in SYSTEMS:  # warm-up (untimed)
            outs[s] = call(s, ids)
        for _ in range(args.reps):
            for s in SYSTEMS:
                _sync(dev)
                t0 = time.perf_counter()
                outs[s] = call(s, ids)
                _sync(dev)
                times[s].append(time.perf_counter() - t0)
        lengths = [len(r) for r in outs["hf-eager"]]
        base = statistics.median(times["hf-eager"])
        for s in SYSTEMS:
            wall = statistics.median(times[s])
            tokens = sum(len(r) for r in outs[s])
            points.append(dict(system=s, texts=n, wall_s=wall, times_s=times[s], texts_per_s=n / wall,
                               tokens_per_s=tokens / wall, generated_tokens=tokens, x_hf_eager=base / wall,
                               same_tokens_as_hf=outs[s] == outs["hf-eager"]))  # fmt: skip
        points[-1]["lengths"] = lengths
        print(f"{n} texts: " + ", ".join(f"{p['system']} {p['wall_s']:.2f} s" for p in points[-len(SYSTEMS):]),
              file=sys.stderr)
    commit, dirty = git_commit()
    header = dict(device=device_name(dev), tag=device_tag(dev), model=Path(model.path).name,
                  dtype=str(model.dtype).replace("torch.", ""), runtime=model.runtime,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, reps=args.reps,
                  threads=torch.get_num_threads(),
                  torch=torch.__version__, transformers=__import__("transformers").__version__,
                  commit=commit, dirty=dirty, command=" ".join(["python", "bench/bench_jobs.py", *sys.argv[1:]]))
    return dict(header=header, points=points)


def markdown(result: dict) -> str:
    h = result["header"]
    lines = [
        f"# Batch debias jobs ({h['device']}, {h['model']} {h['dtype']}, runtime {h['runtime']})", "",
        f"`{h['command']}` at {h['commit']}{'+dirty' if h['dirty'] else ''}; torch {h['torch']}, transformers "
        f"{h['transformers']}, {h['threads']} threads. "
        + (f"{h['batch_size']} rows at a time" if h.get("batch_size") else "Every text of a job in one batch")
        + f", greedy, EOS, at most {h['max_new_tokens']} new tokens, no lexicon; medians of {h['reps']} interleaved "
        "repetitions, prefill included.", "",
        "| texts | system | wall s | texts/s | tokens/s | x hf-eager | tokens = hf-eager |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]  # fmt: skip
    for p in result["points"]:
        lines.append(f"| {p['texts']} | {p['system']} | {p['wall_s']:.2f} | {p['texts_per_s']:.2f} | "
                     f"{p['tokens_per_s']:.1f} | {p['x_hf_eager']:.2f} | "
                     f"{'yes' if p['same_tokens_as_hf'] else '**NO**'} |")  # fmt: skip
    for p in result["points"]:
        if "lengths" in p:
            ls = p["lengths"]
            lines.append(f"\n{p['texts']} texts: generated lengths {min(ls)}-{max(ls)} tokens, mean "
                         f"{statistics.mean(ls):.1f}.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    sizes = sorted({p["texts"] for p in result["points"]})
    width = 0.8 / len(SYSTEMS)
    for k, s in enumerate(SYSTEMS):
        vals = [next(p["texts_per_s"] for p in result["points"] if p["system"] == s and p["texts"] == n)
                for n in sizes]  # fmt: skip
        ax.bar([i + k * width for i in range(len(sizes))], vals, width, label=s)
    ax.set_xticks([i + width * (len(SYSTEMS) - 1) / 2 for i in range(len(sizes))], [f"{n} texts" for n in sizes])
    h = result["header"]
    rows = f"{h['batch_size']} rows at a time" if h.get("batch_size") else "each job in one batch"
    ax.set(ylabel="texts/s (whole job)", title=f"debias jobs, {rows}, {h['device']}")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(str(path), dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    p.add_argument("--texts", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64],
                   help="job sizes, comma-separated (default 16,64)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=None, help="rows at a time (default: each job in one batch)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runtime", default="auto", choices=("auto", "eager", "compile", "cuda_graph"))
    p.add_argument("--dtype", default=None, help="weights' dtype (default: fastdebias.load's: float32 on CPU, the "
                   "checkpoint's half type on CUDA); float32 for token identity with transformers on a GPU")
    p.add_argument("--out", type=Path, default=None, help="write jobs_<device>.json/.md/.png here")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.texts) or args.reps < 1 or args.max_new_tokens < 1 or (args.batch_size or 1) < 1:
        p.error("--texts, --reps, --max-new-tokens and --batch-size must be >= 1")
    result = run(args)
    md = markdown(result)
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / (f"jobs_{result['header']['tag']}" + (f"_bs{args.batch_size}" if args.batch_size else ""))
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(md)
        plot(result, stem.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
