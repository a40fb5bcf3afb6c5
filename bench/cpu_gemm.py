"""CPU projections of one decode step: which GEMM the torch backend should call, by number of rows.

    python bench/cpu_gemm.py --rows 1,2,4,8,16,32 [--json PATH] [--md PATH]

Times, in one process, the decoder projections of one step of a Llama shape (SmolLM2-135M by default: per layer
the fused q/k/v, o, fused gate/up and down) and the lm_head, for M rows, seven ways:

- ``F.linear`` (MKL's sgemm) and oneDNN's matmul (``mkldnn._linear_pointwise``), eagerly;
- oneDNN's matmul on weights packed ahead of time into its own blocked layout
  (``mkldnn._reorder_linear_weight``, once, outside the timing): packed for M rows, and packed for 8 rows but
  called with M (one packed copy serving every batch size); eagerly. Not used by fastdebias yet;
- compiled (``torch.compile``): a multiply-reduce (what ``fastdebias.ops._base_linear`` emits for few rows),
  oneDNN as an opaque custom op (``fastdebias::cpu_linear``, what it emits for more rows), and F.linear.

Medians of ``--reps`` runs after two warm-ups, ms per step. ``fastdebias.ops.CPU_GEMV_MAX_ROWS``,
``fastdebias.ops.CPU_MKL_MAX_ROWS`` (``bench/results/cpu_gemm_cpu-xeon.md``) and the choice of
oneDNN come from this table on the CI machine; rerun it on another CPU before trusting them there.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdebias import ops


def _median_ms(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 1000
    dtype = getattr(torch, args.dtype)
    h, i, hd = args.hidden, args.intermediate, args.hidden // args.q_heads
    layer = [(h + 2 * args.kv_heads * hd, h), (h, h), (2 * i, h), (h, i)]
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=gen) * 0.02).to(dtype) for n, k in layer * args.layers]
    head = (torch.randn(args.vocab, h, generator=gen) * 0.02).to(dtype)

    ways = [  # name, op, compiled, weights packed for how many rows (None: plain)
        ("F.linear", F.linear, False, None),
        ("oneDNN", ops._onednn, False, None),
        ("oneDNN packed for M", ops._onednn, False, "M"),
        ("oneDNN packed for 8", ops._onednn, False, 8),
        ("compiled multiply-reduce", ops._multiply_reduce, True, None),
        ("compiled oneDNN op", ops._cpu_linear, True, None),
        ("compiled F.linear", F.linear, True, None),
    ]
    plain = [(w, w.shape[1]) for w in weights]
    rows = []
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {k: torch.randn(m, k, generator=gen).to(dtype) for k in (h, i)}
        for name, op, compiled, pack in ways:
            ws, hw = plain, head
            if pack is not None:
                hint = m if pack == "M" else pack
                ws = [(torch.ops.mkldnn._reorder_linear_weight(w, hint), k) for w, k in plain]
                hw = torch.ops.mkldnn._reorder_linear_weight(head, hint)

            def layers(op=op, ws=ws):
                acc = 0
                for w, k in ws:  # keep each output alive only as one element, as a chain of layers would
                    acc = acc + op(xs[k], w)[:, :1].sum()
                return acc

            def lm_head(op=op, hw=hw):
                return op(xs[h], hw)

            if compiled:
                torch._dynamo.reset()
                layers, lm_head = torch.compile(layers), torch.compile(lm_head)
            with torch.no_grad():
                rows.append(
                    {"rows": m, "way": name, "layers_ms": _median_ms(layers, args.reps),
                     "lm_head_ms": _median_ms(lm_head, args.reps)}
                )  # fmt: skip
            r = rows[-1]
            print(f"rows {m:3d}  {name:26s} layers {r['layers_ms']:7.1f} ms  lm_head {r['lm_head_ms']:6.1f} ms")
    names = [w[0] for w in ways]
    lines = [
        f"# CPU projections of one decode step ({platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {args.dtype})",
        "",
        f"`python bench/cpu_gemm.py --rows {args.rows}`: ms per decode step, the {len(weights)} decoder projections"
        f" + the lm_head ({args.vocab} x {h}), medians of {args.reps}.",
        "",
        "| rows | " + " | ".join(names) + " |",
        "| ---: |" + " ---: |" * len(names),
    ]
    for m in sorted({r["rows"] for r in rows}):
        cells = [next(r for r in rows if r["rows"] == m and r["way"] == n) for n in names]
        lines.append(f"| {m} | " + " | ".join(f"{c['layers_ms']:.1f} + {c['lm_head_ms']:.1f}" for c in cells) + " |")
    print("\n" + "\n".join(lines))
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
                       "rows": rows}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
