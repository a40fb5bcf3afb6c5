"""The decode step: the one-token model forward replayed from a CUDA graph per (batch bucket, kv-length bucket)
(``"cuda_graph"``), or run with each decoder layer compiled by ``torch.compile`` (``"compile"``), or plain eager.

``"cuda_graph"`` needs static shapes: a CUDA graph replays fixed kernels on fixed addresses. So under it:

- the batch is padded up to a power of two (padding rows: token 0 at slot 0, start 0, no adapter; they only
  ever write their own cache rows, which no real row reads);
- attention reads the cache up to a kv bucket (the next multiple of ``KV_BUCKET`` slots, at most the cache
  length) under the model's slot mask, instead of exactly the slots written so far; a decode therefore moves
  through a few graphs as it grows (one capture each, reused by every later call with the same buckets);
- the KV cache, the step's input buffers and the LoRA stacks keep their addresses from call to call, and each
  step copies its inputs into the buffers before the replay. Changing the adapter mix (``adapter_idx``) needs no
  re-capture: the LoRA kernels' grids depend on shapes only.

A rewind (lexicon backtracking) is a change of a row's slot in ``slots``, which is an input like any other: the
graph reads it from its buffer, and the mask hides every slot past it.

What the graphs hold: (1) the decoder forward of one token per row (every layer's kernels, the LoRA ones included,
up to the logits or, for the fused lm_head + step, the final hidden state), kept across calls; (2) the step after it
(``generate._advance``: the logits step, lexicon, penalties, rewinds, done flags, the interventions log — a few
dozen small kernels that would otherwise each be a launch per token), captured per generate call on each forward
graph's output buffer (``_StepGraphs``), because it bakes in the call's seed, sizes and state addresses. The
prefill stays eager (chunked, one call per prompt batch). Manual graphs rather than
``torch.compile(mode="reduce-overhead")``: no compile of a 7B model per bucket, and the Triton kernels are captured
as they are. The alternative is there to measure: ``"compile"`` on CUDA is this same static step (buckets, kept
cache, these graphs and pool), with the captured forward running through the compiled layer and head (``_forward``:
compiled at the first capture of a batch bucket, with static shapes but for the kv length, whose buckets share one
graph): what ``reduce-overhead`` does, without cudagraph trees re-recording for every kv length. With the Triton
backend dynamo takes the layer and the head each in one graph, every LoRA launch a Triton kernel node and the
device limits of their meta rules a trace-time constant (``tests/trace_regions.py`` traces both on a CPU, kernels
defined for an sm_90 target). ``bench/gpu_all.sh e2e-runtimes`` compares the two in one run (pending a GPU).

Continuous batching works under every runtime: a prompt waiting for a place takes a finished row's, in place
(``place_rows`` copies its prefilled cache slots into the row; the loop's state is written into the row's entries),
so the batch keeps its shape and every tensor its address, and the captured graphs replay on as before. Once no
prompt waits, under ``"eager"`` and ``"compile"`` the finished rows leave the batch (``generate._retire_rows``;
``min_rows_after_retiring``, ``select_rows``: a new cache of the kept rows each time); ``"cuda_graph"`` keeps them
to the end (its graphs replay on fixed addresses; on a GPU a decode step streams the weights whatever the rows).

``"compile"`` (the fast CPU runtime) is regional: of a one-token forward, the decoder layers run through one compiled
function of a few consecutive layers (``model.run_layers``, three or two at a time where they divide the layer count, in
fp32, ``model.LAYER_GROUPS``: each call costs ~100 us of host time; the layers' weights are its inputs, so one graph
serves every group), and the final norm + lm_head through another; the embedding, RoPE gather and mask stay eager (a
handful of small ops). The kv length (the mask's last dimension) and the cache length are marked dynamic from the first
compile, and the batch size becomes dynamic at its second value (dynamo's automatic dynamic shapes; marking every
dimension dynamic, ``dynamic=True``, measured ~15% slower at batch 1: the head dimensions become symbolic too). So batch
size, kv length and cache size compile nothing new, apart from a graph each for batches of 1, 2 and more rows: on CPU,
inside the compiled layer, projections of up to ``ops.CPU_GEMV_MAX_ROWS`` rows are multiply-reduces, which inductor
streams at about twice the rate of oneDNN's GEMV, and larger ones oneDNN's matmul on the weight pre-packed at load, as
an opaque op (``ops._base_linear``, ``LlamaDecoder.pack_cpu_weights``; ``bench/cpu_gemm.py``); on Intel CPUs two fp32
rows take F.linear (MKL), as the eager runtime's one to three do there (``ops.CPU_MKL_MAX_ROWS``). The one-token
attention is a multiply-reduce as well (``model.decode_attention``, fused into the layer's graph): SDPA costs more per
call there than its arithmetic (``bench/results/decode_attention_ab_cpu.md``: the compiled layer 1.03-1.14x faster in
fp32 at batch 1-32, 1.25-2.16x in bf16), with its query stored first where it is not cheap to recompute per key
(``realize_q``; ``bench/results/realize_q_ab_cpu.md``). The loop's step (``generate._advance``) is compiled too
(``compile_step``). The prefill stays eager, and the cache is allocated per call as under ``"eager"``.
Measured against compiling the whole one-token forward with static shapes
(what ``"compile"`` was up to f269405), both in one process, interleaved, SmolLM2 on the 2-core CI CPU
(``bench/results/regional_compile_ab_cpu.md``): decode TPOT whole vs regional 24.5 vs 25.0 ms at batch 1, 67.9 vs
69.2 at batch 8, 137.2 vs 137.2 at batch 32 (within noise); the first call at each batch size (compiles and one
48-token generate) 12.0 vs 2.5 s, 17.9 vs 15.2 s, 89.9 vs 13.6 s with warm inductor caches; and no new compile per
batch bucket and per 256-slot cache size.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch.fx.experimental import _config as fx_config

from fastdebias.errors import BackendError
from fastdebias.model import KVCache, LlamaDecoder, layer_group, run_layers

KV_BUCKET = 256  # slots: the attention read grows in steps of this (a new graph per step of growth)
PREFILL_CHUNK = 512  # prompt tokens per prefill forward: bounds activation and mask memory for long prompts
RUNTIMES = ("auto", "eager", "cuda_graph", "compile")
COMPILE_ENTRIES = 256  # compiled variants kept per compiled function and process (models x batch kinds x settings)
# the name of dynamo's per-code-object entry limit (renamed in torch 2.6)
_DYNAMO_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


# Share of the memory that is free when a generate call starts that its batches may take by default (KV cache,
# prefill activations, per-step logits): the rest is left to the allocator's slack, the host and other processes.
BATCH_MEMORY_FRACTION = 0.5


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations on ``device``: the CUDA driver's free memory, or the host's available memory
    (``MemAvailable`` on Linux, else the free physical pages; where neither can be read, no limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not there (macOS has no SC_AVPHYS_PAGES; Windows no sysconf)
        return 1 << 62


def bytes_per_row(config, dtype: torch.dtype, prompt_len: int, max_new: int) -> int:
    """What one more row of a batch costs at its peak: its KV cache (every layer's K and V over prompt + new
    tokens, and the compile runtime's spare slot), the prefill's activations of one chunk (the hidden state,
    q/k/v, the MLP's gate/up and its product, attention scores over the chunk's keys, in the model's dtype or
    fp32, whichever is wider) and the step's fp32 logits with a few temporaries of their size."""
    item = torch.empty((), dtype=dtype).element_size()
    head_dim = config.head_dim
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * item * (prompt_len + max_new + 1)
    t = min(prompt_len, PREFILL_CHUNK)
    width = 4 * config.hidden_size + (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    width += 3 * config.intermediate_size + config.num_attention_heads * prompt_len
    act = t * width * max(item, 4)
    return kv + act + 4 * 4 * config.vocab_size


def _compiling_config():
    """The settings our compiled functions run under. Dynamo keeps one cache per code object, shared by every
    model's runner: each model x batch kind x settings is an entry, and past the default limit (8) it would
    silently run eagerly. Without duck shapes: a dimension that happens to equal another one at the first compile
    (the step's batch of 2 and its log's pair of columns) would be guarded equal, and recompile at the next batch
    size."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(**{_DYNAMO_LIMIT: COMPILE_ENTRIES}))
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    return stack


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """``"auto"``: CUDA graphs on CUDA, eager on CPU (a cold compile costs tens of seconds on CPU)."""
    if runtime not in RUNTIMES:
        raise BackendError(f"runtime={runtime!r} is not one of {RUNTIMES}")
    if runtime == "auto":
        return "cuda_graph" if device.type == "cuda" else "eager"
    if runtime == "cuda_graph" and device.type != "cuda":
        raise BackendError("runtime='cuda_graph' needs a CUDA device; on CPU use 'eager' or 'compile'")
    return runtime


def batch_bucket(b: int) -> int:
    return 1 << (b - 1).bit_length()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class DecodeRunner:
    """Owns the KV cache and runs the model forward for prefill (chunked) and for one decode step.

    Under ``"cuda_graph"`` the cache is kept between calls and grows (never shrinks) to the largest bucket seen;
    graphs captured for a smaller cache are dropped when it grows.
    """

    def __init__(self, decoder, runtime: str) -> None:
        self.decoder, self.runtime = decoder, runtime
        self.cache: KVCache | None = None
        # (batch bucket, kv bucket, has adapter, head, positions) → (graph, its output): a one-token forward, or
        # with positions T > 1 a prompt-lookup verification forward
        self.graphs: dict[tuple[int, int, bool, bool, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        # "compile": (compiled run_layers, compiled LlamaDecoder.head, layers per call), made at the first decode
        self.regions = None
        self.on_cuda = decoder.embed_tokens.device.type == "cuda"
        self._bufs: dict[str, torch.Tensor] = {}
        self._step_fns: dict = {}  # fn -> its compiled form (None after a failed compile or capture)
        # compile the loop's step too: on under "compile"; off under "cuda_graph", where the captured step's
        # kernels are replayed without launch overhead and a compile would cost seconds per batch size and
        # settings (set it to fuse the step's few dozen small kernels into a few: bench --compile-step)
        self.compile_step = runtime == "compile"
        # prefill a prefix that all of a call's prompts share once, and keep the latest such prefix (or one prompt's)
        # for later calls whose prompts begin the same way (``generate._SharedPrefix``), and a prompt given several
        # times (``generate(n=...)``) once; off only to compare (the bench: every row prefilled in full)
        self.share_prefix = True
        self.prefix = None

    @property
    def static(self) -> bool:
        """Static shapes: a padded batch, bucketed kv reads, a cache kept across calls (CUDA graphs need them).
        Under ``"cuda_graph"``, and under ``"compile"`` on CUDA: there the compiled forward is captured in the same
        graphs (what ``torch.compile(mode="reduce-overhead")`` does, with this runner's buckets and pool)."""
        return self.runtime == "cuda_graph" or (self.runtime == "compile" and self.on_cuda)

    def reset(self) -> None:
        """Drop the cache, every captured graph and the kept prompt prefix (frees their memory)."""
        self.cache, self.graphs, self.pool, self._bufs, self.prefix = None, {}, None, {}, None

    def allocate(self, b: int, length: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """A cache with at least ``b`` rows of ``length`` slots (bucketed and reused under static runtimes)."""
        cfg = self.decoder.config
        if not self.static:
            if self.runtime != "compile":
                return KVCache.allocate(cfg, b, length, dtype, device)
            # a spare slot, so that the last step's kv length never equals the cache length (a compiled layer
            # guards on whether its attention reads the whole cache, and would recompile for that one step)
            return self._dynamic_length(KVCache.allocate(cfg, b, length + 1, dtype, device))
        bb, lb = batch_bucket(b), min(_round_up(length, KV_BUCKET), max(length, cfg.max_position_embeddings))
        c = self.cache
        if c is None or c.k[0].shape[0] < bb or c.k[0].shape[2] < lb or c.k[0].dtype != dtype:
            if c is not None:
                bb, lb = max(bb, c.k[0].shape[0]), max(lb, c.k[0].shape[2])
            self.cache, self.graphs, self.pool = None, {}, None  # (graphs of the old cache's addresses: gone)
            self.cache = KVCache.allocate(cfg, bb, lb, dtype, device)
            self._bufs = {
                "tokens": torch.zeros(bb, 1, dtype=torch.long, device=device),
                "slots": torch.zeros(bb, 1, dtype=torch.long, device=device),
                "start": torch.zeros(bb, dtype=torch.long, device=device),
                "adapter_idx": torch.full((bb,), -1, dtype=torch.int32, device=device),
            }
        for name, buf in self._bufs.items():  # padding rows: token 0 at slot 0, start 0, no adapter
            buf.fill_(-1 if name == "adapter_idx" else 0)
        return self.cache

    def min_rows_after_retiring(self) -> int | None:
        """How few rows a batch may shrink to when finished rows leave it (``generate._retire_rows``, once no
        prompt waits for their places), or None: the batch keeps its rows to the end. Under ``"cuda_graph"`` it
        keeps them: its cache, buffers and step graphs are bound to the batch's addresses and bucket. Under
        ``"compile"`` it keeps at least 3: batches of 1 and 2 rows are compiled graphs of their own (seconds each on
        first use), 3 and more share one."""
        if self.static:
            return None
        return 3 if self.runtime == "compile" else 1

    def default_batch_size(self, n: int, prompt_len: int, max_new: int, dtype: torch.dtype,
                           device: torch.device) -> int:  # fmt: skip
        """Rows decoded at once when ``generate`` is not told: all ``n`` prompts if their batch fits
        ``BATCH_MEMORY_FRACTION`` of the free memory (``bytes_per_row``), else as many as fit (at least 1; the other
        prompts take finished rows' places). Under CUDA graphs a power of two: the batch bucket the graphs are
        captured for, with no padding rows."""
        per_row = bytes_per_row(self.decoder.config, dtype, prompt_len, max_new)
        fit = max(1, min(n, int(available_memory(device) * BATCH_MEMORY_FRACTION) // per_row))
        return 1 << (fit.bit_length() - 1) if self.static and fit < n else fit

    def select_rows(self, cache: KVCache, keep: torch.Tensor) -> KVCache:
        """The cache of the rows ``keep`` only (a copy), for a batch that finished rows have left."""
        return self._dynamic_length(
            KVCache([k.index_select(0, keep) for k in cache.k], [v.index_select(0, keep) for v in cache.v])
        )

    def place_rows(self, cache: KVCache, rows: torch.Tensor, other: KVCache) -> None:
        """Write the prefilled slots of ``other`` (prompts joining a running batch, a cache of their own) into the
        rows ``rows`` of ``cache``, in place (the cache keeps its address: CUDA graphs replay on it). The slots past
        them still hold the row's previous prompt: finite values that each row's mask hides (it stops at the
        row's own slot)."""
        t = other.k[0].shape[2]
        for dst, src in zip(cache.k + cache.v, other.k + other.v):
            dst[rows, :, :t] = src

    def _dynamic_length(self, cache: KVCache) -> KVCache:
        """Under ``"compile"``, the cache length marked dynamic: one compiled graph serves every cache length."""
        if self.runtime == "compile" and not self.static:
            for t in cache.k + cache.v:
                torch._dynamo.maybe_mark_dynamic(t, 2)
        return cache

    def prefill(self, tokens: torch.Tensor, start: torch.Tensor, cache: KVCache, adapter_idx,
                padded: bool = True, first: int = 0, prompt_logprobs: int | None = None):  # fmt: skip
        """tokens [B, T] (left-padded) into slots 0..T-1, in chunks of ``PREFILL_CHUNK`` → last logits [B, V].

        ``padded=False`` (every prompt has T tokens): the first chunk attends with ``is_causal`` and no mask, the
        flash-attention path on GPU; later chunks (queries offset from the keys) and padded batches use the mask.
        ``first``: slots below it are in the cache already (a shared prefix's), so the prefill starts there.
        ``prompt_logprobs=N``: also each prompt token's log-probability given the tokens before it → (logits,
        (lp [B, T], top_lp, top_ids [B, T, N] or None)): lp[:, p] is token p+1's, the top N tokens' at each
        position with N > 0 (left undefined: the last slot, padding, and the slots below ``first``)."""
        b, t = tokens.shape
        logits = None
        scores = None
        if prompt_logprobs is not None:
            n = prompt_logprobs
            scores = (torch.zeros(b, t, dtype=torch.float32, device=tokens.device),
                      torch.zeros(b, t, n, dtype=torch.float32, device=tokens.device) if n else None,
                      torch.zeros(b, t, n, dtype=torch.long, device=tokens.device) if n else None)  # fmt: skip
        for lo in range(first, t, PREFILL_CHUNK):
            hi = min(lo + PREFILL_CHUNK, t)
            slots = torch.arange(lo, hi, device=tokens.device).expand(b, hi - lo)
            out = self.decoder(
                tokens[:, lo:hi],
                slots,
                start,
                hi,
                cache,
                adapter_idx,
                last_logits=hi == t,
                causal=lo == 0 and not padded,
                all_hidden=scores is not None,
            )
            if scores is None:
                logits = out
                continue
            end = min(hi, t - 1)  # positions lo..end-1 have a next prompt token to score
            if end > lo:
                got = self.decoder.token_logprobs(out[:, : end - lo], adapter_idx, tokens[:, lo + 1 : end + 1],
                                                  prompt_logprobs)  # fmt: skip
                for dst, src in zip(scores, got):
                    if dst is not None:
                        dst[:, lo:end] = src
            if hi == t:
                logits = self.decoder.head(out[:, -1:], adapter_idx)
        return logits if scores is None else (logits, scores)

    def decode(self, token, slots, kv_len: int, start, cache: KVCache, adapter_idx, head: bool = True) -> torch.Tensor:
        """token [B] written at per-row ``slots`` [B], attending to slots < ``kv_len`` → logits [B, V] fp32 (with
        ``head=False``: the final hidden state [B, K], for the fused lm_head + step)."""
        b = token.shape[0]
        args = (token, slots, kv_len, start, cache, adapter_idx, head)
        if self.runtime == "compile" and not self.static:
            try:
                with _compiling_config():
                    return self.decoder(token.view(b, 1), slots.view(b, 1), start, kv_len, cache, adapter_idx,
                                        head=head, regions=self._dynamic_regions())  # fmt: skip
            except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler on this machine
                # (re-running the whole step is safe: it rewrites the same K/V into the same slots)
                return self._fall_back("torch.compile", e, lambda: self.decode(*args))
        if not self.static:
            return self.decoder(token.view(b, 1), slots.view(b, 1), start, kv_len, cache, adapter_idx, head=head)
        bufs = self._bufs
        bufs["tokens"][:b, 0].copy_(token)
        bufs["slots"][:b, 0].copy_(slots)
        return self._replay(b, 1, kv_len, start, cache, adapter_idx, head, lambda: self.decode(*args))

    def _replay(self, b: int, t: int, kv_len: int, start, cache: KVCache, adapter_idx, head: bool, again):
        """Static runtimes: the captured forward of ``t`` positions for the rows' buffers (tokens and slots already
        written), captured first if new → its output's first ``b`` rows. ``again()``: the call to make after a
        failed capture has changed the runtime."""
        bufs = self._bufs
        bb, kvb = batch_bucket(b), self.kv_read_len(kv_len, cache.k[0].shape[2])
        bufs["start"][:b].copy_(start)
        has_adapter = adapter_idx is not None
        if has_adapter:
            bufs["adapter_idx"][:b].copy_(adapter_idx)
        key = (bb, kvb, has_adapter, head, t)
        if key not in self.graphs:
            try:
                with _compiling_config():
                    self.graphs[key] = self._capture(*key)
            except Exception as e:
                if self.runtime == "compile":
                    # whatever broke (dynamo, inductor, or the capture of their kernels): capture the eager forward
                    # instead, as "cuda_graph" does; a fault of the forward itself shows again there
                    _warn_eager("torch.compile of the forward", e, "capturing the eager forward in CUDA graphs")
                    self.runtime, self.regions, self.graphs = "cuda_graph", None, {}
                    return again()
                if isinstance(e, RuntimeError):  # e.g. an op that syncs with the host
                    return self._fall_back("CUDA graph capture", e, again)
                raise
        graph, out = self.graphs[key]
        graph.replay()
        return out[:b] if t == 1 else out[:, :b]

    def verify(self, tokens, slots, kv_len: int, start, cache: KVCache, adapter_idx) -> torch.Tensor:
        """tokens [B, T] written at per-row ``slots`` [B, T] (a row's last kept token and its prompt-lookup drafts),
        attending to slots < ``kv_len`` → fp32 logits at every position, [T, B, V] (position-major: each position's
        [B, V] is contiguous for the loop's step). Under ``"compile"`` on CPU through the compiled decoder layer
        (one more graph, for B x T rows: its projections are oneDNN's, the small ops around them fused); under
        static runtimes a CUDA graph per batch bucket, kv bucket and T, of the eager forward (as ``decode``'s);
        else eagerly."""
        b, t = tokens.shape
        if self.static:
            toks, at = self._verify_buffers(batch_bucket(b), t)
            toks[:b].copy_(tokens)
            at[:b].copy_(slots)
            args = (tokens, slots, kv_len, start, cache, adapter_idx)
            return self._replay(b, t, kv_len, start, cache, adapter_idx, True, lambda: self.verify(*args))
        regions = self._dynamic_regions() if self.runtime == "compile" else None
        try:
            with _compiling_config():
                h = self.decoder(tokens, slots, start, kv_len, cache, adapter_idx, all_hidden=True, regions=regions)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler on this machine
            # (rerunning writes the same K/V into the same slots)
            args = (tokens, slots, kv_len, start, cache, adapter_idx)
            return self._fall_back("torch.compile", e, lambda: self.verify(*args))
        return self._every_position(h, adapter_idx)

    def _dynamic_regions(self):
        """The compiled decoder layers (a group a call) and head of the CPU ``"compile"`` runtime, and the group size
        (dynamic shapes; made at first use), shared by the one-token step and the verification forward."""
        if self.regions is None:
            # groups of layers in fp32 only: in half precision inductor, fusing across a layer boundary, skips the
            # rounding of the residual stream that eager and transformers make (SmolLM2 bf16, 8 rows x 48 greedy
            # tokens: diverged from eager after 204 of 384 tokens). Its emulate_precision_casts restored them bit
            # for bit with torch 2.13, not with 2.11 (1-2 bf16 ulps off): one layer a call there.
            fp32 = self.decoder.embed_tokens.dtype == torch.float32
            g = layer_group(len(self.decoder.layers)) if fp32 else 1
            self.regions = (torch.compile(run_layers), torch.compile(LlamaDecoder.head), g)
        return self.regions

    def _every_position(self, h: torch.Tensor, adapter_idx) -> torch.Tensor:
        """The last layer's output h [B, T, K] → fp32 logits [T, B, V] (final norm, lm_head and its LoRA)."""
        rows = adapter_idx.repeat(h.shape[1]) if adapter_idx is not None else None  # (position-major, as below)
        return self.decoder.lm_head(self.decoder.norm(h.transpose(0, 1)), rows).float()

    def _verify_buffers(self, bb: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The static tokens and slots [bb, t] of verification forwards of ``t`` positions (made at first use; the
        cache's ``allocate`` zeroes them with the others, and drops them when the cache grows)."""
        name = f"verify_{t}"
        if name + "_tokens" not in self._bufs:  # (as many rows as the cache's other buffers: its batch bucket)
            like = self._bufs["tokens"]
            for what in ("_tokens", "_slots"):
                self._bufs[name + what] = torch.zeros(like.shape[0], t, dtype=torch.long, device=like.device)
        return self._bufs[name + "_tokens"][:bb], self._bufs[name + "_slots"][:bb]

    def _fall_back(self, what: str, e: Exception, again) -> torch.Tensor:
        """Decode on eagerly, from this step on, and say so (a failed speed-up must not end the generation).
        ``again()``: the call to make, now eagerly."""
        _warn_eager(what, e)
        self.runtime, self.graphs, self.regions = "eager", {}, None
        return again()

    def step_function(self, fn):
        """``fn(loop, x, hidden)`` (the decode loop's token choice and bookkeeping, ``generate._advance``) as this
        runtime runs it, for one generate call: compiled when ``compile_step`` (by default under ``"compile"``;
        with dynamic shapes, so batch size, prompt and output lengths do not recompile it: one entry per lexicon
        and loop settings, batch 1 apart), then captured in CUDA graphs under
        ``"cuda_graph"`` (``_StepGraphs``); as is under ``"eager"``. A failed compile or capture warns, then runs
        ``fn`` eagerly (the forward keeps its own runtime)."""
        if self._step_fns.get(fn, fn) is None or self.runtime == "eager":  # eager, or a failure before
            return fn
        run = self._compiled_step(fn) if self.compile_step else fn
        return _StepGraphs(self, run, fn) if self.static else run

    def _compiled_step(self, fn):
        compiled = self._step_fns.get(fn)
        if compiled is None:
            # dynamic: its shapes ([B], [B, max_new], [B, V]) change from call to call, its ops are cheap either way
            compiled = self._step_fns[fn] = torch.compile(fn, dynamic=True)

        def run(*args):
            if self._step_fns.get(fn) is None:  # a compile failed earlier
                return fn(*args)
            try:
                with _compiling_config():
                    return compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                _warn_eager("torch.compile of the decode loop's step", e)
                self._step_fns[fn] = None
                return fn(*args)

        return run

    def is_graph_output(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a view into the output buffer of one of this runner's captured graphs: a leading slice
        of a one-token forward's logits, or one position of a verification forward's (every position's [B, V] keeps
        its address from replay to replay, so the step is captured once per position, as ``_StepGraphs`` keys)."""
        if not self.static:
            return False
        ptr = x.untyped_storage().data_ptr()
        return any(ptr == out.untyped_storage().data_ptr() for _, out in self.graphs.values())

    def _capture_graph(self, fn, args):
        """Capture ``fn(*args)`` in a CUDA graph (nothing runs) → (graph, its outputs), in the runner's shared pool.

        ``capture_begin/capture_end`` on a side stream, as ``torch.cuda.graph`` does, but without its device sync
        and ``empty_cache``: the loop's step is captured in every generate call, and emptying the allocator's cache
        each time would send the next call's allocations back to cudaMalloc."""
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graph.capture_begin(pool=self.pool)
            try:
                outs = fn(*args)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        self.pool = graph.pool()
        return graph, outs

    def kv_read_len(self, kv_len: int, cache_len: int) -> int:
        """Slots the graph-captured step attends over: a new kv bucket costs one capture (milliseconds)."""
        return min(_round_up(kv_len, KV_BUCKET), cache_len)

    def _forward(self, bb: int, kvb: int, has_adapter: bool, head: bool, t: int = 1) -> torch.Tensor:
        """The one-token forward on the static buffers, for a capture: under ``"compile"`` through the compiled
        layer and head (static shapes, the batch bucket's, but for the kv length, which the mask marks dynamic;
        compiled at the first capture's warm-up), else eagerly. ``t`` > 1: a verification forward of ``t``
        positions (``verify``; eager under both) → logits [t, bb, V]."""
        bufs = self._bufs
        aidx = bufs["adapter_idx"][:bb] if has_adapter else None
        if t > 1:
            toks, at = self._verify_buffers(bb, t)
            h = self.decoder(toks, at, bufs["start"][:bb], kvb, self.cache, aidx, all_hidden=True)
            return self._every_position(h, aidx)
        if self.runtime == "compile" and self.regions is None:
            # (one layer a call: the captured graphs replay without the per-call host cost that groups save on CPU)
            layers_fn, head_fn = (torch.compile(f, dynamic=False) for f in (run_layers, LlamaDecoder.head))
            self.regions = (layers_fn, head_fn, 1)
        return self.decoder(
            bufs["tokens"][:bb], bufs["slots"][:bb], bufs["start"][:bb], kvb, self.cache, aidx, head=head,
            regions=self.regions if self.runtime == "compile" else None,
        )

    def _capture(self, *key):
        # Warm-up on a side stream first (Triton JIT, cuBLAS workspaces), as torch.cuda.graphs asks. The warm-up
        # and the capture write the same K/V (this step's) into the same slots, so they are harmless.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(*key)
        torch.cuda.current_stream().wait_stream(side)
        return self._capture_graph(self._forward, key)


def _warn_eager(what: str, e: Exception, instead: str = "decoding eagerly") -> None:
    warnings.warn(
        f"fastdebias: {what} failed ({type(e).__name__}: {e}); {instead} from now on (load with "
        "runtime='eager' to skip the attempt)",
        RuntimeWarning,
        stacklevel=4,
    )


class _StepGraphs:
    """The decode loop's step under CUDA graphs, for one generate call: ``fn(loop, x, hidden)`` captured once per
    input buffer ``x`` (the output buffer of a forward graph, one per batch and kv bucket; with prompt lookup each
    position of a verification forward's), then replayed.

    Sound because the step reads and writes only device tensors that keep their addresses for the whole call (the
    loop's state, updated in place, and the forward graph's output), and every host value it passes to a kernel
    (seed, sizes, flags) is fixed for the call: a graph is never reused by another call. The first step on a new
    buffer runs eagerly (it is also the warm-up: Triton compiles its kernels there), the second is captured and
    replayed. The prefill's logits are a one-off buffer: that step is eager."""

    def __init__(self, runner: DecodeRunner, fn, key) -> None:
        self.runner, self.fn, self.key = runner, fn, key  # key: the step function as step_function knows it
        self.graphs: dict[tuple, tuple] = {}
        self.seen: set[tuple] = set()
        self.failed = False

    def __call__(self, loop, x: torch.Tensor, hidden: bool):
        # only a forward graph's output keeps its address from step to step (an eager forward's output may land
        # on an address seen before, by chance: never capture or replay on one)
        if self.failed or not self.runner.is_graph_output(x):
            return self.fn(loop, x, hidden)
        key = (x.data_ptr(), tuple(x.shape), hidden)
        if key not in self.seen:
            self.seen.add(key)
            return self.fn(loop, x, hidden)
        if key not in self.graphs:
            try:
                self.graphs[key] = self.runner._capture_graph(self.fn, (loop, x, hidden))
            except RuntimeError as e:
                _warn_eager("CUDA graph capture of the decode loop's step", e)
                self.failed = True
                self.runner._step_fns[self.key] = None  # later calls: eager, without another attempt
                return self.fn(loop, x, hidden)
        graph, outs = self.graphs[key]
        graph.replay()
        return outs
