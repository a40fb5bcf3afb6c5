"""Write a synthetic checkpoint and its adapter to a directory: the shapes of ``fastdebias bench --synthetic``
(``llama2-7b``: the SR-LLM shape, Llama-2-7B config, vocab 32064, bf16, random weights, LoRA r=64 alpha=16 on
q_proj and v_proj with random non-zero B), saved by transformers and peft, for runs that take ``--model/--adapter``:
on a CPU with the memory for it (13.5 GB of bf16 weights, built once), where ``--synthetic`` itself refuses.

    python bench/make_synthetic.py llama2-7b /tmp/synth      # → /tmp/synth/llama2-7b, /tmp/synth/llama2-7b-lora
    fastdebias bench --model /tmp/synth/llama2-7b --adapter /tmp/synth/llama2-7b-lora --dtype bfloat16 ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fastdebias.bench import SYNTHETIC, make_synthetic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(SYNTHETIC))
    ap.add_argument("root", type=Path, help="directory to write <name>/ and <name>-lora/ into")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if (args.root / args.name).exists():
        print(f"{args.root / args.name} exists: remove it first", file=sys.stderr)
        return 2
    args.root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir, adapter_dir = make_synthetic(args.name, args.root, torch.device(args.device))
    print(f"{model_dir}\n{adapter_dir}\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
