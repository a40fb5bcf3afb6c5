"""Compile every Triton kernel launch of fastdebias for a GPU (an H100, sm_90, by default) on a machine without one.

The Triton interpreter, which runs the kernel tests on a CPU, checks what the kernels compute but not whether they
compile for a GPU: it accepts programs that the GPU compiler rejects, and it has no shared memory or registers to
run out of. This script drives the real host code (``fastdebias.ops``: argument checks, meta-parameter rules,
allocations, launches) on CPU tensors of the GPU shapes, but each launch only compiles the kernel with Triton's CUDA
backend (PTX → cubin by the ptxas that ships with Triton) instead of running it; nothing is computed. The meta-
parameter rules see the target GPU's SM count and shared memory, as they would on it. For each compiled variant it
reads the cubin's resource usage (``cuobjdump -res-usage``, also shipped with Triton) and checks it against the
GPU's limits: shared memory per program (the kernel's dynamic shared memory, as Triton checks it at launch, against
the opt-in maximum: 227 KiB on an H100; sm_90a cubins also show 1 KiB of static shared memory, the per-block
reservation that the opt-in maximum already leaves out) and registers per SM. Spills to local memory are reported,
not failed: they cost speed, not correctness.

    python tests/aot_compile.py                 # every case for an H100, a table of the variants on stdout
    python tests/aot_compile.py --arch 80       # for an A100 (89: an L4)
    python tests/aot_compile.py --quick         # the CI subset (tests/test_aot_compile.py, for each of the three)
    python tests/aot_compile.py --json out.json

Must run without ``TRITON_INTERPRET=1`` (the kernels are defined as GPU kernels then). Exit status 1 if a case failed
to compile or a variant exceeds a limit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from functools import partial
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_compile.py compiles for the GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# compute capability -> (a GPU of it, its SMs, the shared memory one block may opt into in bytes, 32-bit registers
# per SM): the H100 SXM that the benchmarks run on, the A100 and the L4, from the CUDA occupancy tables
ARCHS = {90: ("H100", 132, 232448, 65536), 80: ("A100", 108, 166912, 65536), 89: ("L4", 58, 101376, 65536)}
TARGET = GPUTarget("cuda", 90, 32)


class _CompileOnlyDriver:
    """The little of Triton's driver interface that a launch needs before it compiles: the target (``TARGET``)."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    """Turns every ``kernel[grid](...)`` into a compile for ``TARGET`` (``warmup``: no launch), and records it."""

    def __init__(self) -> None:
        self.launches: list[tuple[str, str, object]] = []  # (case, kernel name, compiled kernel)
        self.case = ""

    def install(self) -> None:
        driver.set_active(_CompileOnlyDriver())
        original = JITFunction.run
        rec = self

        def run(self, *args, grid, warmup, **kwargs):
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
            rec.launches.append((rec.case, self.fn.__name__, kernel))
            return kernel

        JITFunction.run = run


def _patch_ops(sms: int, smem: int) -> None:
    """The ops refuse CPU tensors outside the interpreter, and pick the interpreter's meta-parameters inside it: let
    them take CPU tensors with the GPU's rules, for a GPU of ``sms`` SMs and ``smem`` bytes of shared memory."""
    import fastdebias.ops.logits as ol
    import fastdebias.ops.lora as olo

    ol._check_backend = lambda device: None
    ol._interpreting = lambda: False
    olo._interpreting = lambda: True  # (lora's only use: the device check; its meta rule takes no interpret flag)
    ol._device_limits = olo._device_limits = lambda device: (sms, smem)


def _resources(cubin: bytes) -> dict:
    """REG, SHARED (static), LOCAL and STACK bytes of the cubin's kernel, from ``cuobjdump -res-usage``."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    return dict(zip(("reg", "stack", "static_shared", "local"), map(int, m.groups())))


# --------------------------------------------------------------------------------------------------- the cases


def _matcher(v: int):
    """A lexicon with single-token and phrase entries, bans and penalties (states carry several pairs)."""
    import random

    from fastdebias.matcher import BAN, build_matcher

    rnd = random.Random(v)
    ctx = rnd.sample(range(v), 4)
    seqs = []
    for e in range(200):
        n = rnd.randint(1, 4)
        ids = tuple(rnd.choice(ctx) for _ in range(n - 1)) + (rnd.randrange(v),)
        seqs.append((ids, BAN if rnd.random() < 0.3 else rnd.choice([-4.0, -1.5, 2.0]), e))
    return build_matcher(seqs, v)


def logits_cases(quick: bool):
    """(name, thunk) for ``logits_step``: every meta-parameter class of the tile pass (B x V), every mode, the
    kernels' flags on and off."""
    from fastdebias.ops.logits import logits_step

    modes = {"greedy": {}, "sample": {"temperature": 0.8}, "top_k": {"temperature": 0.8, "top_k": 50},
             "top_p": {"temperature": 0.8, "top_p": 0.9},
             "top_k_top_p": {"temperature": 0.8, "top_k": 50, "top_p": 0.9}}  # fmt: skip
    batches, vocabs = ((1, 64), (32064, 128256)) if quick else ((1, 8, 64, 256), (32000, 32064, 49152, 128256))
    quick_set = {("greedy", False), ("sample", True), ("top_k_top_p", True)}
    for b, v in zip(batches, vocabs) if quick else ((b, v) for b in batches for v in vocabs):
        full = dict(matcher=_matcher(v), states=torch.zeros(b, dtype=torch.int64),
                    mask_phrases=torch.arange(b) % 2 == 0, banned_tokens=torch.zeros(b, 2, dtype=torch.int64),
                    counts=torch.zeros(b, v, dtype=torch.int32), repetition_penalty=1.3,
                    output_counts=torch.zeros(b, v, dtype=torch.int32), presence_penalty=0.5, frequency_penalty=0.3,
                    row_ids=torch.arange(b), step=torch.zeros((), dtype=torch.int64))  # fmt: skip
        for mode, kw in modes.items():
            for flags in (False, True):
                if quick and (mode, flags) not in quick_set:
                    continue
                dtype = torch.float32 if flags or mode != "greedy" else torch.bfloat16
                name = f"logits_step B={b} V={v} {mode} {'lexicon+bans+penalties+row_ids+step' if flags else 'plain'}"
                yield (f"{name} {str(dtype)[6:]}",
                       partial(_logits, logits_step, b, v, dtype, {**kw, **(full if flags else {})}))  # fmt: skip


def _logits(logits_step, b, v, dtype, kw):
    return logits_step(torch.empty(b, v, dtype=dtype), **kw)


def filter_sweep_cases(quick: bool):
    """(name, thunk) for ``bench/bench_logits.py --filter-sweep`` (a GPU session's command): the top-k + top-p step
    under each threshold-pass meta it times, at its shapes (quick: the largest tiles and candidate counts)."""
    import itertools

    from fastdebias.kernels.logits import _passes, logits_meta
    from fastdebias.ops.logits import logits_step

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        from bench_logits import BATCHES, FILTER_SWEEP, VOCABS
    finally:
        sys.path.pop(0)
    kw = {"temperature": 0.8, "top_k": 50, "top_p": 0.9}
    sweep = [(16, 256, 4), (4, 256, 8)] if quick else list(itertools.product(*FILTER_SWEEP.values()))
    for b, v in [(1, 128256)] if quick else itertools.product(BATCHES, VOCABS):
        rule = logits_meta(b, v, _num_sms())
        for nc, bn, warps in sweep:
            meta = rule._replace(n_cand=nc, n_pass=_passes(nc), pass_block_n=bn, pass_num_warps=warps)
            yield (f"filter sweep B={b} V={v} n_cand={nc} block={bn} warps={warps}",
                   partial(_logits, logits_step, b, v, torch.float32, {**kw, "meta": meta}))


def _num_sms() -> int:
    import fastdebias.ops.logits as ol

    return ol._device_limits(torch.device("cpu"))[0]


def lm_head_cases(quick: bool):
    """(name, thunk) for the fused ``lm_head_step``: batch sizes of the decode loop (up to 8 rows) and beyond, the
    models' vocabularies and widths, each dtype, with and without an lm_head LoRA, greedy and sampled."""
    from fastdebias.ops.logits import lm_head_step

    if quick:
        shapes = [(1, 49152, 576, torch.float32), (8, 32064, 4096, torch.bfloat16)]
    else:
        shapes = [(b, v, k, dt) for b in (1, 8, 64) for (v, k) in ((49152, 576), (32064, 4096), (128256, 4096))
                  for dt in (torch.float32, torch.float16, torch.bfloat16)]  # fmt: skip
    for b, v, k, dt in shapes:
        for lora in (False, True):
            for temp in (0.0, 0.7):
                if quick and (lora, temp) not in {(False, 0.0), (True, 0.7)}:
                    continue
                name = f"lm_head_step B={b} V={v} K={k} {str(dt)[6:]} lora+penalties={lora} T={temp}"
                yield name, partial(_lm_head, lm_head_step, b, v, k, dt, lora, temp)


def _lm_head(lm_head_step, b, v, k, dt, lora, temp):
    kw = {}
    if lora:  # (and the penalties' epilogue)
        r = 64
        kw = dict(lora=(torch.empty(2, r, k, dtype=dt), torch.empty(2, v, r, dtype=dt), torch.ones(2)),
                  adapter_idx=torch.zeros(b, dtype=torch.int32), counts=torch.zeros(b, v, dtype=torch.int32),
                  repetition_penalty=1.3, output_counts=torch.zeros(b, v, dtype=torch.int32), presence_penalty=0.5,
                  frequency_penalty=0.3)  # fmt: skip
    return lm_head_step(torch.empty(b, k, dtype=dt), torch.empty(v, k, dtype=dt), temperature=temp,
                        row_ids=torch.arange(b), **kw)  # fmt: skip


def lora_cases(quick: bool):
    """(name, thunk) for the LoRA linear: the decoder's projections of Llama-2-7B (q/k/v sliced, LoRA on q and v,
    r = 64, as SR-LLM) and of SmolLM2-135M (GQA), at decode and prefill row counts, each dtype, one stacked adapter
    (fused shrink) and three (two-phase), and no LoRA."""
    from fastdebias.ops.lora import lora_linear_sliced, pack_sliced_lora

    llama = [("qkv", 4096, (4096, 4096, 4096), (True, False, True)), ("o", 4096, (4096,), (False,)),
             ("gate_up", 4096, (11008, 11008), (False, False)), ("down", 11008, (4096,), (False,))]  # fmt: skip
    smol = [("qkv", 576, (576, 192, 192), (True, True, True)), ("gate_up", 576, (1536, 1536), (True, True)),
            ("down", 1536, (576,), (True,))]  # fmt: skip
    models = [("llama2-7b", llama, 64), ("smollm2", smol, 16)]
    rows = (1, 64, 512) if quick else (1, 8, 32, 64, 65, 512, 2048)
    dtypes = {"llama2-7b": (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32),
              "smollm2": (torch.float32,) if quick else (torch.float32, torch.bfloat16)}  # fmt: skip
    for model, projs, r in models:
        for name, k, sizes, targeted in projs:
            for dt in dtypes[model]:
                for n in (0, 1, 3):
                    if n and not any(targeted):
                        continue
                    for m in rows:
                        if quick and (n, m) not in {(0, 1), (1, 1), (3, 64), (3, 512)}:
                            continue
                        yield (f"lora_linear {model} {name} M={m} {str(dt)[6:]} adapters={n}",
                               partial(_sliced, lora_linear_sliced, pack_sliced_lora, k, sizes, targeted, dt, n, m, r))


def _sliced(lora_linear_sliced, pack_sliced_lora, k, sizes, targeted, dt, n, m, r):
    loras = [(torch.zeros(n, r, k, dtype=dt), torch.zeros(n, s, r, dtype=dt), torch.ones(n, dtype=torch.float32))
             if (n and t) else None for s, t in zip(sizes, targeted)]  # fmt: skip
    packed = pack_sliced_lora(sizes, loras)
    idx = torch.zeros(m, dtype=torch.int32) if n else None
    return lora_linear_sliced(torch.empty(m, k, dtype=dt), torch.empty(sum(sizes), k, dtype=dt), sizes, packed, idx)


# ------------------------------------------------------------------------------------------------------ driver


def report(head: str, variants: list[dict], command: str) -> str:
    """Markdown: per kernel, its variants' largest shared memory and register counts and any spills; then each
    variant (the first case that compiled it, and how many launches used it)."""
    lines = ["# Triton kernels compiled without a GPU", "", f"`{command}`: {head}.", "",
             "| kernel | variants | max shared B | max regs/thread | variants spilling (local B) |",
             "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for name in dict.fromkeys(v["kernel"] for v in variants):
        vs = [v for v in variants if v["kernel"] == name]
        spills = ", ".join(f"{v['first_case']} ({v['local']})" for v in vs if v["local"]) or "none"
        lines.append(f"| {name} | {len(vs)} | {max(v['shared'] for v in vs)} | {max(v['reg'] for v in vs)} | "
                     f"{spills} |")  # fmt: skip
    lines += ["", "| kernel | first case | launches | warps | stages | shared B | regs | local B | over a limit |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for v in variants:
        lines.append(f"| {v['kernel']} | {v['first_case']} | {v['launches']} | {v['num_warps']} | {v['num_stages']} | "
                     f"{v['shared']} | {v['reg']} | {v['local']} | {'; '.join(v['over']) or '-'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the CI subset")
    p.add_argument("--arch", type=int, default=90, choices=sorted(ARCHS),
                   help="compile for this compute capability, with its GPU's limits (default 90: H100)")
    p.add_argument("--json", type=Path, default=None, help="write the variants and failures here")
    p.add_argument("--md", type=Path, default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    global TARGET
    TARGET = GPUTarget("cuda", args.arch, 32)
    gpu, sms, smem_optin, regs_per_sm = ARCHS[args.arch]
    rec = Recorder()
    rec.install()
    _patch_ops(sms, smem_optin)
    failures = []
    cases = [*logits_cases(args.quick), *filter_sweep_cases(args.quick), *lm_head_cases(args.quick),
             *lora_cases(args.quick)]
    for name, thunk in cases:
        rec.case = name
        try:
            thunk()
        except Exception as e:  # noqa: BLE001 (reported per case, with its traceback)
            failures.append(dict(case=name, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()))
    variants, seen = [], {}
    for case, kernel_name, kernel in rec.launches:
        key = kernel.hash
        if key in seen:
            seen[key]["launches"] += 1
            continue
        md = kernel.metadata
        res = _resources(kernel.asm["cubin"])
        threads = md.num_warps * 32
        v = dict(kernel=kernel_name, first_case=case, launches=1, num_warps=md.num_warps, num_stages=md.num_stages,
                 shared=md.shared, **res, regs_per_block=res["reg"] * threads)  # fmt: skip
        over = []
        if md.shared > smem_optin:
            over.append(f"shared memory {md.shared} B > {smem_optin} B")
        if res["reg"] * threads > regs_per_sm:
            over.append(f"{res['reg']} registers x {threads} threads > {regs_per_sm}")
        v["over"] = over
        seen[key] = v
        variants.append(v)
    over = [v for v in variants if v["over"]]
    head = (f"triton {triton.__version__}, sm_{args.arch} ({gpu}: {sms} SMs, {smem_optin} B of shared memory per "
            f"block): {len(cases)} cases, {len(rec.launches)} launches, {len(variants)} distinct compiled kernels, "
            f"{len(failures)} failed to compile, {len(over)} over a limit")  # fmt: skip
    text = report(head, variants, " ".join(["python tests/aot_compile.py", *sys.argv[1:]]))
    print(text)
    if args.md:
        args.md.write_text(text)
    for f in failures:
        print(f"\nFAILED to compile: {f['case']}\n{f['traceback']}", file=sys.stderr)
    for v in over:
        print(f"OVER A LIMIT: {v['kernel']} ({v['first_case']}): {'; '.join(v['over'])}", file=sys.stderr)
    if args.json:
        result = dict(triton=triton.__version__, arch=args.arch, variants=variants, failures=failures)
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if failures or over else 0


if __name__ == "__main__":
    sys.exit(main())
