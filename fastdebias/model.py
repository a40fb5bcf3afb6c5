"""Reference Llama-family decoder: static KV cache, prefill + one-token decode, unmerged multi-adapter LoRA.

gpt-fast-like: a config from transformers, flat modules named as in HF checkpoints (so state-dict and PEFT keys
map 1:1), and every projection routed through ``fastdebias.ops.lora_linear`` so one switch picks the backend.

Cache layout: each row owns cache slots ``0..S-1``. A prompt is left-padded to the batch's longest, so row ``b``'s
real tokens start at slot ``start[b]``; its RoPE position is ``slot - start[b]``. Each row has its own current slot,
so a row can be rewound (position reset) without touching the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastdebias import ops
from fastdebias.loader import AdapterWeights

# ``token_logprobs``: the fp32 logits of one block of positions stay within this many bytes
LOGPROB_BLOCK_BYTES = 64 << 20


class LoRALinear(nn.Module):
    """A projection made of 1–3 output slices (q/k/v, gate/up fused; o, down, lm_head alone), each with an
    optional stack of LoRA adapters applied unmerged per row. One fused weight, one op call per forward."""

    def __init__(self, weights: list[torch.Tensor], backend: str = "torch") -> None:
        super().__init__()
        self.sizes = [w.shape[0] for w in weights]
        self.weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)  # [sum N_i, K]
        # per slice: (lora_a [n_adapters, R, K], lora_b [n_adapters, N_i, R], scale [n_adapters] fp32) or None
        self.loras: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(weights)
        self.packed = None  # the backend's pre-packed form of ``loras`` (built once by ``attach``)
        # ``weight`` pre-packed for oneDNN on CPU (``LlamaDecoder.pack_cpu_weights``); under the eager runtime the
        # only copy (``weight`` is None then), except where few fp32 rows take F.linear (``ops.keeps_plain_weights``)
        self.cpu_weight = None
        self.backend = backend

    def slice_range(self, i: int) -> tuple[int, int]:
        start = sum(self.sizes[:i])
        return start, start + self.sizes[i]

    def attach(self, i: int, lora) -> None:
        self.loras[i] = lora
        self.packed = ops.pack_lora(self.sizes, self.loras, backend=self.backend)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        multiply_reduce = self.weight is not None and ops.multiply_reduce_rows(x)
        if multiply_reduce and REALIZE_GEMV_INPUT:
            x = _stored(x)
        cpu_weight = None if self.weight is not None and ops.reads_plain_weight(x) else self.cpu_weight
        y = ops.lora_linear_sliced(
            x, self.weight, self.sizes, self.loras, self.packed, rows if self.packed is not None else None,
            backend=self.backend, cpu_weight=cpu_weight,
        )
        return y.view(*lead, y.shape[-1])


def _stored(x: torch.Tensor) -> torch.Tensor:
    """``x`` as inductor must write it to memory: ``as_strided`` is an op it lowers only on a stored buffer. Where a
    multiply-reduce or a reduction over keys reads a computed input, inductor otherwise inlines the computation into
    the reduction's loop, repeating it once per output (``decode_attention``'s ``realize_q``, the CPU GEMV's
    input: ``REALIZE_GEMV_INPUT``)."""
    x = x.contiguous()
    return x.as_strided(x.shape, x.stride())


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling from transformers' own RoPE initialisers (llama3, yarn, ...)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = config.head_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class KVCache:
    """Per-layer K and V, each [B, n_kv_heads, max_len, head_dim], allocated once per generate call."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        n = config.num_hidden_layers
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)])


# False: SDPA in the compiled CPU decode step too (for A/B measurements, bench/decode_attention_ab.py; dynamo guards
# on this global, so flipping it recompiles rather than reusing a graph of the other kind)
MULTIPLY_REDUCE_ATTENTION = True
# False: ``decode_attention`` never writes the query to memory first (A/Bs: ``--switch REALIZE_Q``; guarded as above)
REALIZE_Q = True
# False: the compiled CPU GEMV (``ops.multiply_reduce_rows``) reads its input as inductor leaves it, possibly inlined
# (A/Bs: ``--switch REALIZE_GEMV_INPUT``; guarded as above)
REALIZE_GEMV_INPUT = True


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     realize_q: bool = True):
    """Attention of one query per row as multiply-reduces, for inductor to fuse (the compiled runtime's decode step
    on CPU, where SDPA's per-call cost exceeds its arithmetic). q [B, H, 1, D]; k, v [B, Hkv, L, D] (GQA: H a
    multiple of Hkv); mask [B, 1, 1, L] bool, True = attend, at least one True per row. Computes in fp32, returns
    [B, H, 1, D] in q's dtype.

    ``realize_q``: write q (in its dtype) to memory before the multiply-reduce. Left to itself inductor inlines
    q's producers (its slice of the q/k/v output, RoPE; with an unmerged LoRA also the delta and the per-row
    select) into the reduction over keys, recomputing them once per key. ``as_strided`` is an op inductor lowers
    only on a stored buffer, so it forces the store. Measured on the layer alone (``bench/decode_attention_ab.py
    --switch REALIZE_Q``, ``bench/results/realize_q_ab_cpu.md``): 1.14-1.48x faster with an unmerged adapter at
    batch 8-32; at batch 1 without an adapter the recompute is cheap and the extra kernel costs more, so the caller
    passes False there."""
    b, h, _, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    g = h // hkv
    if realize_q and REALIZE_Q:
        q = _stored(q)
    qf = q.float().reshape(b, hkv, g, 1, d)
    s = (qf * k.float().view(b, hkv, 1, kv_len, d)).sum(-1) * scale  # [B, Hkv, g, L]
    s = s.masked_fill(~mask.reshape(b, 1, 1, kv_len), float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = (p.unsqueeze(-1) * v.float().view(b, hkv, 1, kv_len, d)).sum(-2)  # [B, Hkv, g, D]
    return out.reshape(b, h, 1, d).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config, w: dict[str, torch.Tensor], backend: str) -> None:
        super().__init__()
        self.qkv_proj = LoRALinear([w.pop("q_proj"), w.pop("k_proj"), w.pop("v_proj")], backend)
        self.o_proj = LoRALinear([w.pop("o_proj")], backend)
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def forward(self, x, rows, cos, sin, k_cache, v_cache, slots, mask):
        """Attends to cache slots < kv_len, the mask's last dimension (``mask=None``: causal over this call's
        ``t`` tokens in slots 0..t-1)."""
        b, t, _ = x.shape
        kv_len = mask.shape[-1] if mask is not None else t
        q, k, v = self.qkv_proj(x, rows).split(self.qkv_proj.sizes, dim=-1)
        q = q.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, hd]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Scatter this step's K/V into each row's own slots: index [B,1] × [B,T] → [B, T, n_kv, hd].
        bidx = torch.arange(b, device=x.device).view(b, 1)
        k_cache[bidx, :, slots] = k.transpose(1, 2)
        v_cache[bidx, :, slots] = v.transpose(1, 2)
        # The cache may hold more rows than this batch (a static runtime pads it to a bucket).
        kc, vc = k_cache[:b, :, :kv_len], v_cache[:b, :, :kv_len]
        if t == 1 and mask is not None and MULTIPLY_REDUCE_ATTENTION and torch.compiler.is_compiling() \
                and x.device.type == "cpu":  # fmt: skip
            out = decode_attention(q, kc, vc, mask, self.head_dim**-0.5, realize_q=rows is not None or b > 1)
        else:
            out = F.scaled_dot_product_attention(
                q, kc, vc, attn_mask=mask, is_causal=mask is None, scale=self.head_dim**-0.5,
                enable_gqa=self.n_kv != self.n_heads,
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1), rows)


class MLP(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], backend: str) -> None:
        super().__init__()
        self.gate_up_proj = LoRALinear([w.pop("gate_proj"), w.pop("up_proj")], backend)
        self.down_proj = LoRALinear([w.pop("down_proj")], backend)

    def forward(self, x, rows):
        gate, up = self.gate_up_proj(x, rows).split(self.gate_up_proj.sizes, dim=-1)
        return self.down_proj(F.silu(gate) * up, rows)


class DecoderLayer(nn.Module):
    def __init__(self, config, w: dict[str, torch.Tensor], backend: str) -> None:
        super().__init__()
        self.self_attn = Attention(config, w, backend)
        self.mlp = MLP(w, backend)
        self.input_layernorm = RMSNorm(w["input_layernorm"], config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(w["post_attention_layernorm"], config.rms_norm_eps)

    def forward(self, h, rows, cos, sin, k_cache, v_cache, slots, mask):
        h = h + self.self_attn(self.input_layernorm(h), rows, cos, sin, k_cache, v_cache, slots, mask)
        return h + self.mlp(self.post_attention_layernorm(h), rows)


class LlamaDecoder(nn.Module):
    """The whole decoder. ``forward`` returns fp32 logits of each row's last position only."""

    def __init__(self, config, weights: dict[str, torch.Tensor], backend: str = "torch",
                 progress: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = weights["model.embed_tokens.weight"]
        self.layers = nn.ModuleList()
        # (a tqdm bar: the fused q/k/v and gate/up weights are copies, and a checkpoint loaded without a conversion
        # is read from disk here, through its memory map: Llama-2-7B's 9 GB of them took ~10 s on the CI machine)
        for i in tqdm(range(config.num_hidden_layers), desc="Fusing q/k/v and gate/up", unit="layer",
                      disable=not progress):  # fmt: skip
            p = f"model.layers.{i}."
            w = {k[len(p):].split(".")[-2]: v for k, v in weights.items() if k.startswith(p)}
            self.layers.append(DecoderLayer(config, w, backend))
        self.norm = RMSNorm(weights["model.norm.weight"], config.rms_norm_eps)
        head = self.embed_tokens if config.tie_word_embeddings else weights["lm_head.weight"]
        self.lm_head = LoRALinear([head], backend)
        inv_freq, attn_scale = rope_inv_freq(config)
        pos = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        dev = self.embed_tokens.device
        self.rope_cos = (emb.cos() * attn_scale).to(dev)  # [max_pos, hd] fp32
        self.rope_sin = (emb.sin() * attn_scale).to(dev)
        self.adapter_names: list[str] = []
        self._layer_groups: dict[int, list[tuple]] = {}

    # ------------------------------------------------------------------------------------------ adapters

    def lora_targets(self) -> dict[str, tuple[LoRALinear, int]]:
        """HF module name → (fused projection, slice index), for every projection an adapter may target."""
        mods: dict[str, tuple[LoRALinear, int]] = {"lm_head": (self.lm_head, 0)}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
                mods[p + "self_attn." + n] = (layer.self_attn.qkv_proj, j)
            mods[p + "self_attn.o_proj"] = (layer.self_attn.o_proj, 0)
            for j, n in enumerate(("gate_proj", "up_proj")):
                mods[p + "mlp." + n] = (layer.mlp.gate_up_proj, j)
            mods[p + "mlp.down_proj"] = (layer.mlp.down_proj, 0)
        return mods

    def attach_adapters(self, adapters: list[AdapterWeights]) -> None:
        """Stack adapters per module (ranks zero-padded to the module's max; scale 0 where untargeted)."""
        n = len(adapters)
        self.adapter_names = [a.name for a in adapters]
        for name, (mod, i) in self.lora_targets().items():
            present = [a.modules.get(name) for a in adapters]
            if not any(p is not None for p in present):
                continue
            r_max = max(p[0].shape[0] for p in present if p is not None)
            w = mod.weight if mod.weight is not None else mod.cpu_weight
            out_f, in_f = mod.sizes[i], w.shape[1]
            lora_a = torch.zeros(n, r_max, in_f, dtype=w.dtype, device=w.device)
            lora_b = torch.zeros(n, out_f, r_max, dtype=w.dtype, device=w.device)
            scale = torch.zeros(n, dtype=torch.float32, device=w.device)
            for j, p in enumerate(present):
                if p is not None:
                    a, b, s = p
                    lora_a[j, : a.shape[0]] = a.to(w.dtype)
                    lora_b[j, :, : b.shape[1]] = b.to(w.dtype)
                    scale[j] = s
            mod.attach(i, (lora_a, lora_b, scale))

    def projections(self) -> list[LoRALinear]:
        """Every fused projection, once each (the decoder layers' and the lm_head)."""
        return list({id(m): m for m, _ in self.lora_targets().values()}.values())

    def pack_cpu_weights(self, keep_plain: bool = True, progress: bool = False,
                         packed_if_not_both: bool = False) -> int:  # fmt: skip
        """Pack each fp32 (or bf16) CPU projection weight for oneDNN (``ops.pack_cpu_weight``). Call after any merge.

        ``keep_plain=True`` (the compiled runtime, whose 1-2-row multiply-reduce reads the plain weights, and the
        eager one where F.linear takes a few rows, ``ops.keeps_plain_weights``): the packed copies sit beside them,
        if they fit ``ops.cpu_pack_fits`` (else nothing is packed, or with ``packed_if_not_both``, the eager runtime's
        case, the packed ones alone, as below). ``keep_plain=False`` (the eager runtime elsewhere, which reads only the
        packed ones): each packed copy replaces its plain weight, one projection at a time, so
        nothing is added, except for an lm_head tied to the input embedding (the embedding lookup reads the plain
        one). Returns the bytes the packed copies add (0: nothing packed, or nothing added). ``progress``: a tqdm bar
        (Llama-2-7B's bf16 weights took 11-13 s to pack on the CI machine)."""
        mods = [m for m in self.projections() if m.weight is not None and ops.cpu_packable(m.weight)]
        if not mods:
            return 0

        def beside(keep: bool):  # the projections whose packed copy sits beside their plain weight, and its bytes
            added = [m for m in mods if keep or m.weight is self.embed_tokens]
            return added, sum(m.weight.numel() * m.weight.element_size() for m in added)

        added, nbytes = beside(keep_plain)
        if keep_plain and not ops.cpu_pack_fits(nbytes):
            if not packed_if_not_both:
                return 0
            keep_plain, (added, nbytes) = False, beside(False)
        for m in tqdm(mods, desc="Packing weights for oneDNN", unit="weight", disable=not progress):
            m.cpu_weight = ops.pack_cpu_weight(m.weight)
            if m not in added:
                m.weight = None
        if not keep_plain:
            self._copy_out_remaining()
        return nbytes

    def _copy_out_remaining(self) -> None:
        """Copy the plain tensors left (the embedding, the norms) into memory of their own. Loaded from a
        safetensors file without a conversion they are views of its memory map, and one view keeps the whole map
        (every page packing read, the dropped weights' included) resident: SmolLM2 in fp32, 513 MiB of it, where
        the embedding is 108 MiB."""
        emb = self.embed_tokens.clone()
        if self.lm_head.weight is self.embed_tokens:
            self.lm_head.weight = emb
        self.embed_tokens = emb
        for norm in [self.norm] + [n for layer in self.layers for n in (layer.input_layernorm,
                                                                        layer.post_attention_layernorm)]:
            norm.weight = norm.weight.clone()

    def merge_adapter(self, adapter: AdapterWeights) -> None:
        """Fold W ← W + s·B@A (computed in fp32) into the base weights; lossy for QLoRA-trained adapters."""
        for mod in self.projections():
            if mod.weight is None:  # packed only: back to the plain layout
                mod.weight = mod.cpu_weight.to_dense()
            mod.cpu_weight = None  # a packed copy would be stale (pack again after the merge)
        for name, (mod, i) in self.lora_targets().items():
            if name in adapter.modules:
                a, b, s = adapter.modules[name]
                lo, hi = mod.slice_range(i)
                delta = ((b.float() @ a.float()) * s).to(mod.weight.device)
                if mod is self.lm_head and mod.weight is self.embed_tokens:
                    mod.weight = mod.weight.clone()  # untie: the merge must not change the input embedding
                mod.weight[lo:hi] = (mod.weight[lo:hi].float() + delta).to(mod.weight.dtype)
        self.adapter_names = []

    # ------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        start: torch.Tensor,
        kv_len: int,
        cache: KVCache,
        adapter_idx: torch.Tensor | None = None,
        last_logits: bool = True,
        head: bool = True,
        causal: bool = False,
        regions=None,
        all_hidden: bool = False,
    ) -> torch.Tensor | None:
        """Run ``tokens`` [B, T] written at cache ``slots`` [B, T]; rows' real tokens begin at ``start`` [B].

        Returns fp32 logits [B, V] of the last position (None with ``last_logits=False``: a prefill chunk that is
        not the last; with ``head=False``, the last position's final hidden state [B, K] in the weights' dtype, for
        the fused lm_head + step). ``kv_len`` (host int) bounds the slots attended to. ``causal=True`` promises
        that no row is padded and ``tokens`` fill slots 0..T-1 (``kv_len == T``): attention then runs without a
        mask (``is_causal``), which lets SDPA take its flash kernel on GPU. ``regions``: a triple
        ``(layers_fn, head_fn, group)`` through which to run the decoder layers, ``group`` consecutive ones a call
        (``layers_fn(layers, h, rows, cos, sin, k_caches, v_caches, slots, mask)``, as ``run_layers``), and the
        final norm + lm_head (``head_fn(self, h, rows)``, as ``LlamaDecoder.head``): the compiled runtime passes
        their compiled forms; default, these two as they are. ``all_hidden=True``: the last
        layer's output at every position [B, T, K] (before the final norm) instead, for ``token_logprobs``.
        """
        b, t = tokens.shape
        # (clamped above too: prompt lookup's drafts may run past the model's last position, where no token is kept)
        positions = (slots - start.view(b, 1)).clamp(min=0, max=self.rope_cos.shape[0] - 1)
        cos = self.rope_cos[positions].to(self.embed_tokens.dtype)
        sin = self.rope_sin[positions].to(self.embed_tokens.dtype)
        mask = None  # causal: SDPA's is_causal
        if not causal:
            j = torch.arange(kv_len, device=tokens.device).view(1, 1, kv_len)
            s = slots.view(b, t, 1)
            # Causal within the row's own span; a padding query sees only itself (never an all-masked row → NaN).
            mask = (((j >= start.view(b, 1, 1)) & (j <= s)) | (j == s)).unsqueeze(1)  # [B, 1, T, kv_len]
            if regions is not None:  # compiled regions: one graph for every kv length (the mask carries it)
                torch._dynamo.maybe_mark_dynamic(mask, 3)
        rows = adapter_idx if t == 1 or adapter_idx is None else adapter_idx.repeat_interleave(t)
        layers_fn, head_fn, g = regions or (run_layers, LlamaDecoder.head, 1)
        h = F.embedding(tokens, self.embed_tokens)
        for i, layers in enumerate(self.layer_groups(g)):
            ks, vs = tuple(cache.k[i * g:(i + 1) * g]), tuple(cache.v[i * g:(i + 1) * g])
            h = layers_fn(layers, h, rows, cos, sin, ks, vs, slots, mask)
        if all_hidden:
            return h
        if not last_logits:
            return None
        if not head:
            return self.norm(h[:, -1:])[:, 0]
        return head_fn(self, h[:, -1:], adapter_idx)

    def layer_groups(self, g: int) -> list[tuple]:
        """The decoder layers as consecutive tuples of ``g`` (made once per ``g``; ``g`` divides the layer count)."""
        groups = self._layer_groups.get(g)
        if groups is None:
            layers = list(self.layers)
            groups = self._layer_groups[g] = [tuple(layers[i:i + g]) for i in range(0, len(layers), g)]
        return groups

    def head(self, h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """The last position's hidden state [B, 1, K] → fp32 logits [B, V] (final norm, lm_head and its LoRA)."""
        return self.lm_head(self.norm(h), rows)[:, 0].float()

    def token_logprobs(self, h: torch.Tensor, rows: torch.Tensor | None, targets: torch.Tensor, top: int = 0,
                       budget: int = LOGPROB_BLOCK_BYTES):  # fmt: skip
        """Hidden states ``h`` [B, S, K] (``forward(all_hidden=True)``) → the log-probability [B, S] fp32 of
        ``targets`` [B, S] (the next token at each position) under the model's raw logits, and with ``top`` > 0 the
        ``top`` most likely tokens' (log-probabilities, ids) [B, S, top]. The logits are computed a block of
        positions at a time (at least one), each block's [B, block, V] fp32 logits within ``budget`` bytes where one
        position allows it: [B, S, V] is never held whole. The log-softmax's output (and, for half-precision
        weights, the fp32 copy) are further transients of a block's size."""
        b, s, _ = h.shape
        v = self.lm_head.sizes[0]
        step = max(1, budget // (4 * b * v))
        lp = torch.empty(b, s, dtype=torch.float32, device=h.device)
        top_lp = torch.empty(b, s, top, dtype=torch.float32, device=h.device) if top else None
        top_ids = torch.empty(b, s, top, dtype=torch.long, device=h.device) if top else None
        for lo in range(0, s, step):
            hi = min(lo + step, s)
            r = rows.repeat_interleave(hi - lo) if rows is not None else None
            logp = torch.log_softmax(self.lm_head(self.norm(h[:, lo:hi]), r).float(), dim=-1)
            lp[:, lo:hi] = logp.gather(2, targets[:, lo:hi, None])[..., 0]
            if top:
                top_lp[:, lo:hi], top_ids[:, lo:hi] = logp.topk(top, dim=-1)
        return lp, top_lp, top_ids


def run_layers(layers: tuple, h: torch.Tensor, rows, cos, sin, k_caches: tuple, v_caches: tuple, slots,
               mask) -> torch.Tensor:  # fmt: skip
    """Consecutive decoder layers, each with its own K/V cache (a function of the layers, so that one compiled form
    serves every group of as many layers: their weights are its inputs, not constants)."""
    for layer, kc, vc in zip(layers, k_caches, v_caches):
        h = layer(h, rows, cos, sin, kc, vc, slots, mask)
    return h


# The compiled CPU runtime runs the first of these that divides the layer count as consecutive layers per call of its
# compiled region (else one; and one in half precision, ``DecodeRunner._dynamic_regions``). A call costs ~100 us of host
# time beside its kernel (dynamo's guards on the layers' weights, inductor's wrapper and allocations): on the 2-core
# Intel Xeon CI machine, SmolLM2's 30 layers, one-token step, one process: 30 calls of one layer 24.0 ms in fp32 / 19.8
# in bf16, 15 of two 21.2 / 17.4, 10 of three 20.5 / 17.1, 5 of six 20.0 (fp32), 1 of thirty 21.9; the first compile
# (cold inductor cache) 14.4 s for one, two or three layers in fp32 (13.0 / 14.9 / 16.1 in bf16), 18.4 for six, 56.4 for
# thirty. Whole decodes there (groups of three vs one layer a call, interleaved in one process, 32 new tokens, medians,
# same tokens): fp32 TPOT 26.9 vs 27.9 ms at batch 1 (8 rounds), 28.9 vs 30.8 at batch 2, 42.2 vs 44.9 at batch 8 (bf16,
# with inductor emulating eager's roundings: 22.0 vs 22.7 at batch 1, 25.8 vs 27.9 at batch 8; not used, see there).
LAYER_GROUPS = (3, 2)


def layer_group(n_layers: int) -> int:
    """How many consecutive layers a compiled CPU region runs (``LAYER_GROUPS``)."""
    return next((g for g in LAYER_GROUPS if n_layers % g == 0), 1)
