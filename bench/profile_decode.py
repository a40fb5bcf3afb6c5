"""Where a decode step's time goes: torch.profiler over fastdebias.generate, on the bench's model and adapter.

    python bench/profile_decode.py --synthetic llama2-7b --out bench/results     # GPU: the SR-LLM shape
    python bench/profile_decode.py --quick                                       # CPU: tiny model, seconds

Prints the ops with the most device time (CUDA) or CPU time, and the share of the step outside the model forward
(the logits step and the loop's bookkeeping: what the lexicon-overhead goal depends on); writes a Chrome trace
(``profile_<device>_<model>.json``, open in chrome://tracing or Perfetto) under ``--out`` if given.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import fastdebias
from fastdebias import bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", choices=sorted(bench.SYNTHETIC), default=None)
    p.add_argument("--quick", action="store_true", help="tiny random model (CPU, seconds)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lexicon-size", type=int, default=10_000)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runtime", default="auto", choices=["auto", "eager", "cuda_graph", "compile"])
    p.add_argument("--out", default=None, help="directory for the Chrome trace")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bench.BenchConfig(synthetic=args.synthetic, quick=args.quick, progress=False).resolve()
    with tempfile.TemporaryDirectory(prefix="fastdebias-profile-") as tmp:
        setup = bench.prepare(cfg, Path(tmp), dev)
        model = fastdebias.load(setup.model_dir, setup.adapter_dir, device=dev, runtime=args.runtime, progress=False)
    prompts = bench.make_prompts(model.tokenizer, args.batch, 64, model.config.vocab_size)
    lex = bench.synthetic_lexicon(args.lexicon_size, model.config.vocab_size)
    kw = dict(max_new_tokens=args.new_tokens, eos_token_id=[], lexicon=lex, progress=False)
    fastdebias.generate(model, prompts, **kw)  # warm-up: compile / capture, lexicon tables
    decoder_forward = model.decoder.forward

    def traced_forward(*a, **k):  # mark the model forward (eager) so the rest of the step can be told apart
        with record_function("model_forward"):
            return decoder_forward(*a, **k)

    model.decoder.forward = traced_forward
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function("generate"):
            fastdebias.generate(model, prompts, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    model.decoder.forward = decoder_forward
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(f"device {dev}, runtime {model.runtime}, backend {model.backend}, batch {args.batch}, "
          f"lexicon {args.lexicon_size}, {args.new_tokens} new tokens")
    avg = {e.key: e for e in prof.key_averages()}
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    total, fwd = avg["generate"].cpu_time_total, avg.get("model_forward")
    if fwd is not None and fwd.count > 1:
        print(f"host time in the model forward: {100 * fwd.cpu_time_total / total:.1f}% of generate "
              f"({fwd.count} calls, prefill included); the rest: the logits step, the loop's bookkeeping, Python")
    else:
        print("the decode forward is replayed from CUDA graphs (cudaGraphLaunch above); the kernels between two "
              "replays in the trace are the logits step and the bookkeeping")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"profile_{bench.device_tag(dev)}_{args.synthetic or ('quick' if args.quick else 'embedded')}.json"
        prof.export_chrome_trace(str(path))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
