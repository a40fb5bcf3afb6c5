"""Prompt-lookup speculative decoding on the debiasing task: ``generate(prompt_lookup_tokens=k)`` against plain greedy
decoding and against transformers' ``generate`` with and without ``prompt_lookup_num_tokens``, in one process.

The case: the embedded model's chat debiasing prompt for each biased text (``--texts short``: the bench's eight
one-sentence texts; ``paragraph``: four texts of two to three sentences), greedy, EOS honoured, no lexicon (so that
every system must return the same tokens), no adapter. Batch 1: one ``generate`` call per text, in turn, as
transformers' prompt lookup requires; ``--batch`` also times fastdebias on all texts in one call. Medians of
``--reps`` rounds after a warm-up round, the systems interleaved within each round.

Reported per system: seconds for all texts, generated tokens, tokens/s, the ratio to transformers' greedy and to
fastdebias's plain greedy, forwards per generated token (fastdebias: prefill excluded, counted), and whether its
tokens equal transformers' greedy tokens (they must; a mismatch is printed loudly).

    python bench/bench_lookup.py --out bench/results
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers

import fastdebias
from fastdebias.bench import TEXTS, device_name, device_tag, git_commit, save_results
from fastdebias.generate import _normalize_eos, debias_prompts

PARAGRAPHS = [
    "Our new hire is a woman, so she will probably leave once she has children. We should not give her the lead "
    "role on the project, and we should keep the important clients with the men on the team.",
    "Older employees cannot keep up with modern software. They are slow to learn and resist every change, so the "
    "training budget is better spent on the younger staff.",
    "People from that neighbourhood are all criminals. If one of them applies for the job, we should check his "
    "background twice and never leave him alone with the cash register.",
    "Immigrants do not want to learn the language or fit in. They take our jobs and live off benefits, and the city "
    "should stop building housing for them.",
]


def hf_generate(hf, ids: list[int], max_new: int, eos: set[int], lookup: int, temperature: float = 0.0):
    """transformers' ``generate`` of one prompt, greedy or sampled at ``temperature`` (``lookup`` > 0:
    ``prompt_lookup_num_tokens``), cut after EOS as fastdebias's token_ids are."""
    kw = dict(prompt_lookup_num_tokens=lookup) if lookup else {}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, num_beams=1,
                          **kw)[0, len(ids):].tolist()  # fmt: skip
    cut = next((j for j, t in enumerate(out) if t in eos), None)
    return out if cut is None else out[: cut + 1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", nargs="+", default=["short", "paragraph"], choices=["short", "paragraph"])
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8], help="draft tokens per step (both libraries)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", action="store_true", help="also fastdebias on all texts in one call")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (fastdebias seeded: lookup must give the samples without it; "
                         "transformers' samples cannot be compared)")
    ap.add_argument("--runtime", default="auto", choices=["auto", "eager", "compile"],
                    help="fastdebias's runtime (auto: eager on CPU, the default users get)")
    ap.add_argument("--out", type=Path, help="write lookup_<device>.{md,json,png} here")
    args = ap.parse_args(argv)
    # (the embedded model, on the CPU: its wheel is not on the GPU machine)
    model = fastdebias.load(device="cpu", runtime=args.runtime, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32).eval()
    eos = set(_normalize_eos(model, None))
    commit, dirty = git_commit()
    dev = device_name(model.device)
    forwards = {"n": 0}
    verify, decode = model.runner.verify, model.runner.decode

    def counted(fn):
        def run(*a, **k):
            forwards["n"] += 1
            return fn(*a, **k)

        return run

    model.runner.verify, model.runner.decode = counted(verify), counted(decode)
    points = []
    reference = ("transformers' greedy tokens" if args.temperature == 0 else
                 "fastdebias's samples without lookup, same per-prompt seeds")  # fmt: skip
    for which in args.texts:
        texts = TEXTS if which == "short" else PARAGRAPHS
        prompts = debias_prompts(model, texts)[0]

        def fd(k: int, batch: bool = False):
            kw = dict(max_new_tokens=args.max_new_tokens, prompt_lookup_tokens=k, temperature=args.temperature,
                      seed=[7 + i for i in range(len(prompts))])  # (per-prompt seeds: the same draws in a batch)
            if batch:
                return [o.token_ids for o in fastdebias.generate(model, prompts, **kw)]
            return [fastdebias.generate(model, [p], **{**kw, "seed": [sd]})[0].token_ids
                    for p, sd in zip(prompts, kw["seed"])]  # fmt: skip

        temp = args.temperature
        systems = {"hf-eager": lambda: [hf_generate(hf, p, args.max_new_tokens, eos, 0, temp) for p in prompts],
                   "fastdebias": lambda: fd(0)}  # fmt: skip
        for k in args.k:
            systems[f"hf-eager lookup {k}"] = lambda k=k: [hf_generate(hf, p, args.max_new_tokens, eos, k, temp)
                                                           for p in prompts]  # fmt: skip
            systems[f"fastdebias lookup {k}"] = lambda k=k: fd(k)
        if args.batch:
            systems[f"fastdebias batch {len(prompts)}"] = lambda: fd(0, batch=True)
            for k in args.k:
                systems[f"fastdebias batch {len(prompts)} lookup {k}"] = lambda k=k: fd(k, batch=True)
        times: dict[str, list[float]] = {name: [] for name in systems}
        got: dict[str, list] = {}
        steps: dict[str, int] = {}
        for rep in range(args.reps + 1):  # the first round is the warm-up
            for name, fn in systems.items():
                forwards["n"] = 0
                t0 = time.perf_counter()
                got[name] = fn()
                dt = time.perf_counter() - t0
                steps[name] = forwards["n"]
                if rep:
                    times[name].append(dt)
        # greedy: every system must give transformers' tokens; sampled: fastdebias's lookup its samples without
        ref = got["hf-eager"] if temp == 0 else got["fastdebias"]

        def rate(name: str) -> float:  # tokens/s (sampled systems need not return as many tokens)
            return sum(len(x) for x in got[name]) / statistics.median(times[name])

        for name in systems:
            med = statistics.median(times[name])
            n_tok = sum(len(x) for x in got[name])
            same = None if temp > 0 and name.startswith("hf") else got[name] == ref
            if same is False:
                print(f"!!! {which}: {name}'s tokens differ from {reference}")
            points.append(dict(texts=which, system=name, prompts=len(prompts), prompt_tokens=sum(map(len, prompts)),
                               tokens=n_tok, median_s=med, times_s=times[name], tokens_per_s=n_tok / med,
                               x_hf_eager=rate(name) / rate("hf-eager"), x_fastdebias=rate(name) / rate("fastdebias"),
                               forwards_per_token=(steps[name] / n_tok) if name.startswith("fastdebias") else None,
                               identical=same))  # fmt: skip
    head = [f"# Prompt-lookup decoding on the debiasing task: {model.path.name} ({model.dtype}, {dev})", "",
            f"`python bench/bench_lookup.py{' --batch' if args.batch else ''} --runtime {args.runtime}"
            f"{f' --temperature {args.temperature}' if args.temperature else ''}` at "
            f"{commit}{'+dirty' if dirty else ''} (fastdebias runtime: {model.runner.runtime}); "
            f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
            f"{'greedy' if not args.temperature else f'sampled at temperature {args.temperature}'}, EOS honoured, at "
            f"most {args.max_new_tokens} new tokens, no lexicon, no adapter; batch 1 (one call per text) unless named; "
            f"medians of {args.reps} rounds after a warm-up, interleaved; ratios of tokens/s. Forwards per token: the "
            "decode forwards (one-token steps or lookup verifications) per generated token. Identical: to "
            f"{reference}.", "",
            "| texts | system | tokens | median s | tok/s | x hf-eager | x fastdebias | forwards/token | identical |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    rows = [f"| {p['texts']} | {p['system']} | {p['tokens']} | {p['median_s']:.3f} | {p['tokens_per_s']:.1f} | "
            f"{p['x_hf_eager']:.2f} | {p['x_fastdebias']:.2f} | "
            f"{'' if p['forwards_per_token'] is None else format(p['forwards_per_token'], '.2f')} | "
            f"{ {None: '-', True: 'yes', False: '**NO**'}[p['identical']]} |" for p in points]  # fmt: skip
    md = "\n".join(head + rows) + "\n"
    print(md)
    if args.out:
        stem = args.out / (f"lookup_{device_tag(model.device)}{'' if args.runtime == 'auto' else '_' + args.runtime}"
                           f"{'_t' + format(args.temperature, 'g').replace('.', 'p') if args.temperature else ''}")
        meta = dict(commit=commit, dirty=dirty, device=dev, torch=torch.__version__, batch=args.batch,
                    transformers=transformers.__version__, threads=torch.get_num_threads(), reps=args.reps,
                    max_new_tokens=args.max_new_tokens, k=args.k, runtime=model.runner.runtime,
                    temperature=args.temperature, identical_to=reference)  # fmt: skip

        def draw(fig):
            for ax, which in zip(fig.subplots(1, len(args.texts), squeeze=False)[0], args.texts):
                ps = [p for p in points if p["texts"] == which]
                ax.barh([p["system"] for p in ps][::-1], [p["tokens_per_s"] for p in ps][::-1])
                ax.set_xlabel("generated tokens/s (median)")
                ax.set_title(f"{which} texts")
            fig.suptitle(f"prompt lookup, debiasing, {dev}", fontsize=9)

        save_results(stem, md, dict(meta=meta, points=points), draw, figsize=(5 * len(args.texts), 4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
