"""Trace the CUDA ``"compile"`` runtime's compiled regions (a decoder layer, the final norm + lm_head) with the
Triton backend, on a machine without a GPU, and report whether dynamo takes each in one graph.

On CUDA, ``runtime="compile"`` captures CUDA graphs of a forward that runs through ``torch.compile(run_layers)`` (one
layer a call) and ``torch.compile(LlamaDecoder.head)``; with ``backend="triton"`` the layer's projections are Triton
LoRA launches. Dynamo takes a Triton launch into its graph as a ``triton_kernel_wrapper_mutation`` node only if it
recognises the kernel; anything it cannot trace in the host code around it (argument checks, meta-parameter rules,
allocations) breaks the graph, which costs speed (the pieces between breaks run as separate compiled graphs, their glue
in Python), not correctness. This script traces both regions with ``fullgraph=True``, the way the runtime calls them
(one-token step, the mask's kv length marked dynamic, ``dynamic=False``), and stops before anything runs: the backend
records the graph and raises. So it checks what a GPU run would trace, without one:

- the kernels are defined as GPU kernels (run it without ``TRITON_INTERPRET=1``) and Triton's driver is the
  compile-only one of ``tests/aot_compile.py`` (an sm_90 target), so dynamo's analysis of the kernels runs;
- the ops take CPU tensors (their device check is lifted) and torch's ``has_triton`` says yes (on a machine
  without a GPU it says no, and dynamo would trace into Triton's launcher instead of taking the kernel whole).

    python tests/trace_regions.py MODEL_DIR ADAPTER_DIR [ADAPTER_DIR ...] --json out.json [--dtype bfloat16] [--batch 4]

Prints and writes, per region, whether it traced in one graph (else dynamo's reason) and the Triton kernels in it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("trace_regions.py traces the GPU kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastdebias  # noqa: E402
import fastdebias.ops as ops  # noqa: E402
import fastdebias.ops.logits  # noqa: E402,F401 (defines the kernels now, as GPU kernels)
import fastdebias.ops.lora as ops_lora  # noqa: E402
from fastdebias.model import KVCache, LlamaDecoder, run_layers  # noqa: E402
from tests.aot_compile import _CompileOnlyDriver  # noqa: E402


class _Traced(Exception):
    """Raised by the recording backend: the region was traced; nothing is compiled or run."""


def _enable_triton_on_cpu() -> None:
    import torch.utils._triton as torch_triton

    driver.set_active(_CompileOnlyDriver())
    torch_triton.has_triton = lambda: True  # dynamo asks it (at each trace) whether Triton kernels are traceable
    ops._interpreting = ops_lora._interpreting = lambda: True  # backend="triton" and the op accept CPU tensors
    ops._kernels_interpreted = lambda: True  # (they are not, on purpose: compiled kernels, traced, never run)


def _region_args(model, batch: int):
    """The arguments with which the runtime's one-token forward calls the layer and the head: a real forward of the
    decoder, stopped at its first layer call (the mask marked dynamic in its kv length, as with compiled regions)."""
    dec = model.runner.decoder
    kv = 16
    cache = KVCache.allocate(model.config, batch, kv, model.dtype, torch.device("cpu"))
    tokens = torch.arange(3, 3 + batch).view(batch, 1)
    slots = torch.full((batch, 1), 5)
    start = torch.arange(batch) % 3
    # rows take the adapters in turn, every third row none
    aidx = torch.where(torch.arange(batch) % 3 == 2, -1, torch.arange(batch) % len(model.adapter_names)).int()
    seen = {}

    def grab(layers, h, *args):
        seen["layer"] = (layers, h, *args)
        raise _Traced

    try:
        dec(tokens, slots, start, kv, cache, aidx, regions=(grab, LlamaDecoder.head, 1))
    except _Traced:
        pass
    layer_args = seen["layer"]
    return {"layer": (run_layers, layer_args), "head": (LlamaDecoder.head, (dec, layer_args[1], aidx))}


def trace(fn, args) -> dict:
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        raise _Traced

    torch._dynamo.reset()
    try:
        torch.compile(fn, dynamic=False, fullgraph=True, backend=record)(*args)
    except Exception as e:  # noqa: BLE001 (a graph break, or the recording backend's stop)
        if not graphs:
            return dict(one_graph=False, error=f"{type(e).__name__}: {e}", kernels=[])
    else:
        return dict(one_graph=False, error="the region ran: the recording backend was not called", kernels=[])
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernels = [
        kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
        for n in graphs[0].graph.nodes
        if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)
    ]
    return dict(one_graph=True, error=None, kernels=kernels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("adapters", type=Path, nargs="+", help="PEFT LoRA directories (one may come twice)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    _enable_triton_on_cpu()
    adapters = {f"a{i}": a for i, a in enumerate(args.adapters)}
    model = fastdebias.load(args.model, adapters, backend="triton", runtime="eager", dtype=args.dtype, progress=False)
    result = dict(dtype=args.dtype, batch=args.batch, torch=torch.__version__, regions={})
    for name, (fn, fn_args) in _region_args(model, args.batch).items():
        r = trace(fn, fn_args)
        result["regions"][name] = r
        print(f"{name}: {'one graph' if r['one_graph'] else 'NOT one graph'}; Triton kernels {r['kernels']}"
              + (f"\n  {r['error'][-3000:]}" if r["error"] else ""))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(r["one_graph"] for r in result["regions"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
