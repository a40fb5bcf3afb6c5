"""How the chat prompt of ``fastdebias.debias`` fares on the embedded SmolLM2: with its worked examples (what ships)
and without them (only the system message and the instruction), on biased sentences that the examples do not
contain. Greedy, the default lexicon, at most 60 new tokens. A quality check of a prompt, not a speed benchmark.

Counted per prompt: "clean" rewrites (ended at EOS, one line, no preamble or commentary: no "rewrit", "sentence",
"original" or "stereotyp" in the text, no leading quote), rewrites that repeat their input, and lexicon rewinds.
Whether a rewrite is fair is for a reader to judge: every output is printed.

    python bench/debias_prompt.py --md bench/results/debias_prompt_cpu.md
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import transformers

import fastdebias
from fastdebias.bench import device_name, git_commit
from fastdebias.generate import chat_prompt_ids

# Written for this check; none of them is in the prompt's examples.
SENTENCES = [
    "Old people can't learn new technology.", "Women are too emotional to be leaders.",
    "Poor people are lazy and don't want to work.", "Immigrants are stealing our jobs.",
    "Boys are naturally better at math than girls.", "Muslims are dangerous.",
    "He is too old to be hired as a programmer.", "Blondes are dumb.",
    "Teenagers are always on their phones and never listen.", "Nurses should be women because they are more caring.",
    "People on welfare just want free money.", "Conservatives are all ignorant.",
    "Liberals hate this country.", "Disabled people can't do real jobs.",
    "Asians are bad drivers.", "Rich people are greedy.",
    "Men don't cry because they are strong.", "Girls are not good at sports.",
    "Country people are uneducated.", "Millennials are entitled and lazy.",
    "Fat people have no self-control.", "Single mothers raise bad kids.",
    "Engineers are socially awkward.", "People with tattoos are criminals.",
]  # fmt: skip
NOT_CLEAN = re.compile(r"rewrit|sentence|original|stereotyp|^[\"']|\n", re.IGNORECASE)
PROMPTS = {"with examples (shipped)": None, "without examples": ()}


def run(model, examples) -> tuple[list, int]:
    """Each sentence's rewrite under the chat prompt with ``examples`` (None: the shipped ones), as ``debias``
    decodes it; and the prompt's length in tokens for the first sentence."""
    kw = {} if examples is None else {"examples": examples}
    ids = [chat_prompt_ids(model.tokenizer, t, **kw) for t in SENTENCES]
    return fastdebias.generate(model, ids, max_new_tokens=60, lexicon="default"), len(ids[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--md", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    model = fastdebias.load(progress=False)
    commit, dirty = git_commit()
    lines = [f"# `debias` chat prompt on {model.path.name} ({model.dtype}, {device_name(model.device)})", "",
             f"`python bench/debias_prompt.py` at {commit}{'+dirty' if dirty else ''}; torch {torch.__version__}, "
             f"transformers {transformers.__version__}. {len(SENTENCES)} sentences in one batch, greedy, the "
             "default lexicon, at most 60 new tokens.", "",
             "| prompt | prompt tokens | clean | repeats its input | rewinds |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    detail = []
    for name, examples in PROMPTS.items():
        outs, n_tok = run(model, examples)
        texts = [o.text.strip() for o in outs]
        clean = sum(o.finish_reason == "eos" and not NOT_CLEAN.search(t) for o, t in zip(outs, texts))
        copies = sum(t.lower().rstrip(".") == s.lower().rstrip(".") for t, s in zip(texts, SENTENCES))
        rewinds = sum(i.action == "rewound" for o in outs for i in o.interventions)
        lines.append(f"| {name} | {n_tok} | {clean}/{len(SENTENCES)} | {copies} | {rewinds} |")
        detail += ["", f"## {name}", "", "| input | output | finish |", "| --- | --- | --- |"]
        detail += [f"| {s} | {t.replace(chr(10), ' / ').replace('|', '/')} | {o.finish_reason} |"
                   for s, t, o in zip(SENTENCES, texts, outs)]  # fmt: skip
    md = "\n".join(lines + detail) + "\n"
    print(md)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
