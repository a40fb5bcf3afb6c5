"""End-to-end decode benchmark: fastdebias vs transformers generate, same prompts, adapter and lexicon, one run.

The same as ``fastdebias bench`` (the code is ``fastdebias/bench.py``); every option is passed through:

    python bench/bench_e2e.py --out bench/results                         # embedded SmolLM2, CPU or GPU
    python bench/bench_e2e.py --synthetic llama2-7b --out bench/results   # SR-LLM shape, GPU only
    python bench/bench_e2e.py --quick --json /tmp/e2e.json                # CI-sized

``--out DIR`` writes ``e2e_<device>.json``, ``.md`` and ``.png`` (``e2e_cpu``; other models add their name:
``e2e_NVIDIA-H100-80GB-HBM3_llama2-7b``), the JSON and markdown after every point, so a run stopped by a time
limit keeps what it measured. ``--help`` lists the sweep options (batch sizes, lexicon sizes, prompt and output
length, repetitions, ``--no-compile``, ``--interleave``).
"""

from __future__ import annotations

import sys

from fastdebias.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
