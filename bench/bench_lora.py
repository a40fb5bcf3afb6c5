"""Benchmark of the multi-adapter LoRA linear.

CPU (the PyTorch reference, small shapes; skipped unless asked for):
    pytest bench/bench_lora.py --benchmark-only
GPU (Triton kernel vs the base projection and PEFT-style unfused LoRA, Llama-2-7B shapes):
    python bench/bench_lora.py --out bench/results
writes ``lora_<device>.json`` and ``lora_<device>.md``. ``--sweep`` instead times a grid of decode meta-parameters
(the data behind ``fastdebias.kernels.lora.lora_meta``) and writes ``lora_sweep_<device>.json``.

GPU times are ``triton.testing.do_bench`` medians (with 20th/80th percentiles), which flushes L2 before every call,
so W streams from HBM as it does in a decode step. The HBM bandwidth is measured in the same run with a 1 GiB
device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.testing

from fastdebias.bench import copy_bandwidth_gbs, device_tag, git_commit
from fastdebias.ops.lora import LoRAMeta, _device_limits, lora_linear, lora_meta
from fastdebias.reference import lora as ref

SHAPES = [("q/v 4096→4096", 4096, 4096), ("gate/up 4096→11008", 4096, 11008), ("down 11008→4096", 11008, 4096)]
RANKS = (16, 64)
BATCHES = (1, 8, 32)
ADAPTERS = (1, 8)
QUANTILES = [0.5, 0.2, 0.8]
DEVICE = "cuda"


def make_case(m: int, k: int, n: int, r: int, n_adapters: int, dtype: torch.dtype, device: str) -> dict:
    """Inputs of one case; rows use the adapters round-robin (so min(m, n_adapters) distinct adapters)."""
    gen = torch.Generator(device).manual_seed(m + k + n + r + n_adapters)
    x = torch.randn(m, k, generator=gen, device=device)
    w = torch.randn(n, k, generator=gen, device=device) / k**0.5
    a = torch.randn(n_adapters, r, k, generator=gen, device=device) / k**0.5
    b = torch.randn(n_adapters, n, r, generator=gen, device=device) / r**0.5
    s = 0.5 + torch.rand(n_adapters, generator=gen, device=device)
    rows = [i % n_adapters for i in range(m)]
    return dict(
        x=x.to(dtype),
        w=w.to(dtype),
        a=a.to(dtype),
        b=b.to(dtype),
        s=s,
        idx=torch.tensor(rows, device=device),
        rows=rows,
    )


def peft_style(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: list[float], rows: list[int]):
    """PEFT's unmerged LoRA forward: ``base(x) + B(A(x))·s`` for one adapter, its mixed-batch loop for several."""
    result = F.linear(x, w)
    if len(s) == 1:
        return result + F.linear(F.linear(x, a[0]), b[0]) * s[0]
    for adapter in sorted(set(rows)):  # peft/tuners/lora/layer.py: Linear._mixed_batch_forward
        sub = [i for i, row in enumerate(rows) if row == adapter]
        out = F.linear(F.linear(x[sub], a[adapter]), b[adapter]) * s[adapter]
        result[sub] += out
    return result


# ------------------------------------------------------------------------------------------------------ CPU


CPU_CASES = [(1, 256, 256, 16, 1), (8, 256, 688, 16, 8), (32, 688, 256, 64, 8)]


@pytest.mark.parametrize("m,k,n,r,n_adapters", CPU_CASES)
def test_reference_lora_linear(benchmark, request, m, k, n, r, n_adapters):
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("a benchmark: run with --benchmark-only")
    c = make_case(m, k, n, r, n_adapters, torch.float32, "cpu")
    benchmark(ref.lora_linear, c["x"], c["w"], c["a"], c["b"], c["s"], c["idx"])


# ------------------------------------------------------------------------------------------------------ GPU


def _time(fn, warmup: int = 25, rep: int = 100, graph: bool = True) -> list[float]:
    """[median, p20, p80] in microseconds of ``fn`` replayed from a CUDA graph (as a captured decode step runs it).

    Eager timing would measure Python launch overhead, not the GPU: do_bench's L2 flush takes ~0.1 ms of GPU time,
    less than the host needs to launch a Triton kernel through its wrapper. ``graph=False`` times eagerly, for code
    that cannot be captured (PEFT's mixed-batch loop indexes with host lists).
    """
    fn()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    return [t * 1e3 for t in triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES)]


def _run_case(spec: tuple) -> None:
    """Compile (and run once) what one case or sweep point launches; executed in worker processes."""
    m, k, n, r, n_adapters, dtype_name, meta_fields = spec
    c = make_case(m, k, n, r, n_adapters, getattr(torch, dtype_name), DEVICE)
    meta = LoRAMeta(*meta_fields) if meta_fields else None
    try:
        lora_linear(c["x"], c["w"], meta=meta)
        lora_linear(c["x"], c["w"], c["a"], c["b"], c["s"], c["idx"], meta=meta)
    except Exception:  # an out-of-resources config in a sweep: reported when measured
        pass
    torch.cuda.synchronize()


def precompile(specs: list[tuple]) -> None:
    """Fill Triton's on-disk cache from parallel processes: serial compilation would dominate the run."""
    workers = min(len(specs), os.cpu_count() or 1, 16)
    if workers <= 1:
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_run_case, specs))


def _bytes(c: dict, m: int, k: int, n: int, r: int, n_adapters: int, with_lora: bool) -> int:
    size = c["x"].element_size()
    total = (n * k + m * k + m * n) * size
    if with_lora:
        used = min(m, n_adapters)
        total += used * (r * k + n * r) * size
    return total


def run_benchmark(dtype: torch.dtype) -> dict:
    cases = [(m, k, n, r, na) for _, k, n in SHAPES for m in BATCHES for r in RANKS for na in ADAPTERS]
    precompile([(*case, str(dtype).split(".")[1], None) for case in cases])
    hbm = copy_bandwidth_gbs(torch.device(DEVICE))
    print(f"HBM device-to-device copy: {hbm:.0f} GB/s", flush=True)
    rows, base_cache = [], {}
    for name, k, n in SHAPES:
        for m in BATCHES:
            for r in RANKS:
                for na in ADAPTERS:
                    c = make_case(m, k, n, r, na, dtype, DEVICE)
                    x, w, a, b, s, idx = c["x"], c["w"], c["a"], c["b"], c["s"], c["idx"]
                    y = lora_linear(x, w, a, b, s, idx)
                    err = (y.float() - ref.lora_linear(x, w, a, b, s, idx).float()).abs().max().item()
                    if (m, k, n) not in base_cache:
                        base_cache[m, k, n] = (_time(lambda: F.linear(x, w)), _time(lambda: lora_linear(x, w)))
                    t_torch, t_base = base_cache[m, k, n]
                    t_lora = _time(lambda: lora_linear(x, w, a, b, s, idx))
                    s_host = s.tolist()
                    t_peft = _time(lambda: peft_style(x, w, a, b, s_host, c["rows"]), graph=na == 1)
                    meta = lora_meta(m, n, k, r, na, x.element_size(), *_device_limits(x.device))
                    gbps = _bytes(c, m, k, n, r, na, True) / (t_lora[0] * 1e-6) / 1e9
                    row = dict(
                        shape=name, m=m, k=k, n=n, r=r, n_adapters=na,
                        path="fused" if meta.fuse_shrink else "shrink+expand",
                        meta=meta._asdict(),
                        torch_base_us=t_torch, triton_base_us=t_base, triton_lora_us=t_lora, peft_us=t_peft,
                        lora_gbps=gbps, lora_pct_hbm=100 * gbps / hbm,
                        base_gbps=_bytes(c, m, k, n, r, na, False) / (t_base[0] * 1e-6) / 1e9,
                        overhead_vs_torch_base_pct=100 * (t_lora[0] / t_torch[0] - 1),
                        overhead_vs_triton_base_pct=100 * (t_lora[0] / t_base[0] - 1),
                        speedup_vs_peft=t_peft[0] / t_lora[0],
                        max_abs_err_vs_reference=err,
                    )  # fmt: skip
                    rows.append(row)
                    print(
                        f"{name:20s} M={m:<3d} r={r:<3d} adapters={na}  torch {t_torch[0]:7.1f}  base {t_base[0]:7.1f}"
                        f"  lora {t_lora[0]:7.1f} us ({row['lora_pct_hbm']:4.0f}% HBM, "
                        f"+{row['overhead_vs_torch_base_pct']:5.1f}% vs torch)  peft {t_peft[0]:7.1f}  err {err:.1e}",
                        flush=True,
                    )
    return dict(
        device=torch.cuda.get_device_name(),
        sms=_device_limits(torch.device(DEVICE))[0],
        dtype=str(dtype),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        commit=git_commit()[0],
        hbm_copy_gbps=hbm,
        timer="triton.testing.do_bench of CUDA-graph replays (PEFT with 8 adapters: eager, it cannot be captured), "
        "L2 flushed per call; times in us as [median, p20, p80]",
        rows=rows,
    )


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        f"# LoRA linear on {result['device']} ({result['dtype']})",
        "",
        f"torch {result['torch']}, triton {result['triton']}, commit {result['commit']}; "
        f"HBM copy bandwidth measured in the same run: {result['hbm_copy_gbps']:.0f} GB/s. "
        "Median µs of `triton.testing.do_bench` over CUDA-graph replays (L2 flushed per call). "
        "'base' = the Triton kernel without LoRA; overhead = LoRA time over the base projection; "
        "PEFT = unfused torch LoRA, graph-captured for 1 adapter, eager for 8 (its mixed-batch loop indexes with host "
        "lists and cannot be captured; its time includes that host work).",
        "",
        "| shape | M | r | adapters | path | F.linear | base | LoRA | PEFT | LoRA GB/s | % HBM "
        "| overhead vs F.linear | overhead vs base | × vs PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['shape']} | {row['m']} | {row['r']} | {row['n_adapters']} | {row['path']} "
            f"| {row['torch_base_us'][0]:.1f} | {row['triton_base_us'][0]:.1f} | {row['triton_lora_us'][0]:.1f} "
            f"| {row['peft_us'][0]:.1f} | {row['lora_gbps']:.0f} | {row['lora_pct_hbm']:.0f}% "
            f"| {row['overhead_vs_torch_base_pct']:+.1f}% | {row['overhead_vs_triton_base_pct']:+.1f}% "
            f"| {row['speedup_vs_peft']:.1f} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


SWEEP_BLOCKS = [(16, 128), (16, 256), (32, 128), (32, 256), (32, 512), (64, 128), (64, 256), (128, 128)]


def run_sweep(dtype: torch.dtype) -> dict:
    """Time decode meta-parameters: base alone and fused LoRA, for each shape at M = 1 and 32."""
    sms = _device_limits(torch.device(DEVICE))[0]
    points = []
    for _, k, n in SHAPES:
        for m, variants in (
            (1, ((16, 1, True), (16, 1, False), (64, 1, True), (64, 1, False))),
            (32, ((16, 1, True),)),
        ):
            for r, na, fuse in variants:
                default = lora_meta(m, n, k, r, na, dtype.itemsize, *_device_limits(torch.device(DEVICE)))
                for bn, bk in SWEEP_BLOCKS:
                    for warps, stages in ((4, 4), (8, 4)):
                        meta = default._replace(
                            block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, fuse_shrink=fuse,
                            block_r=max(16, r) if fuse else min(max(16, r), 64),
                        )  # fmt: skip
                        points.append((m, k, n, r, na, meta))
    precompile([(m, k, n, r, na, str(dtype).split(".")[1], tuple(meta)) for m, k, n, r, na, meta in points])
    results, base_done, cases = [], set(), {}
    for m, k, n, r, na, meta in points:
        if (m, k, n, r, na) not in cases:
            cases[m, k, n, r, na] = make_case(m, k, n, r, na, dtype, DEVICE)
        c = cases[m, k, n, r, na]
        x, w = c["x"], c["w"]
        entry = dict(m=m, k=k, n=n, r=r, n_adapters=na, meta=meta._asdict())
        try:
            key = (m, k, n, meta.block_n, meta.block_k, meta.num_warps, meta.num_stages)
            if key not in base_done:
                base_done.add(key)
                entry["base_us"] = _time(lambda: lora_linear(x, w, meta=meta), warmup=10, rep=40)[0]
            entry["lora_us"] = _time(
                lambda: lora_linear(x, w, c["a"], c["b"], c["s"], c["idx"], meta=meta), warmup=10, rep=40
            )[0]
        except Exception as e:  # out of shared memory / registers for this point
            entry["error"] = type(e).__name__
        results.append(entry)
        print(json.dumps(entry), flush=True)
    for _, k, n in SHAPES:
        for m in (1, 32):
            c = make_case(m, k, n, 16, 1, dtype, DEVICE)
            entry = dict(m=m, k=k, n=n, torch_base_us=_time(lambda: F.linear(c["x"], c["w"]), warmup=10, rep=40)[0])
            results.append(entry)
            print(json.dumps(entry), flush=True)
    return dict(device=torch.cuda.get_device_name(), sms=sms, dtype=str(dtype), points=results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for the JSON + markdown")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--sweep", action="store_true", help="time a grid of decode meta-parameters instead")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_lora.py needs a CUDA GPU; on CPU run: pytest bench/bench_lora.py --benchmark-only", file=sys.stderr
        )
        return 2
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  commit {git_commit()[0]}")
    if args.sweep:
        result = run_sweep(dtype)
        path = args.out / f"lora_sweep_{device_tag(torch.device(DEVICE))}.json"
        path.write_text(json.dumps(result, indent=1), encoding="utf-8")
        return 0
    result = run_benchmark(dtype)
    stem = f"lora_{device_tag(torch.device(DEVICE))}" + ("" if dtype == torch.float16 else f"_{args.dtype}")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    write_markdown(result, args.out / f"{stem}.md")
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
