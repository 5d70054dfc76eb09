"""The Mixtral decoder: KV cache, grouped-query attention with RoPE and an optional sliding window, top-k router, MoE.

Same arithmetic as transformers' MixtralForCausalLM (modeling_mixtral.py); the experts live behind an expert store
(offload.py) and the linears may be packed (linear.py). Weights are loaded by loader.py; read top to bottom.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MixtralConfig
from .linear import QuantLinear
from .offload import ExpertStore, ResidentExperts

# Legend: B batch, S new tokens, L key positions (the cache length, or S without a cache), T = B*S tokens,
# D hidden, H query heads, K key/value heads, hd head dim, E experts, A activated experts, V vocabulary.


class KVCache(nn.Module):
    """Preallocated keys/values [B, K, L, hd], written by position: shapes never change while decoding."""

    def __init__(self, max_batch: int, n_kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        # zeros, not empty: masked slots are multiplied by 0 in attention and must not hold NaN
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B = k.shape[0]
        k_out, v_out = self.k_cache[:B], self.v_cache[:B]
        k_out[:, :, input_pos] = k  # [B, K, S, hd] into [B, K, L, hd]
        v_out[:, :, input_pos] = v
        return k_out, v_out


@dataclass
class Context:
    """What every block needs besides the hidden state: rotary cos/sin, the attention mask and cache positions.

    causal: the keys are these S tokens and nothing is masked but the future (no padding, no window within them):
    attention runs with is_causal and no mask, which SDPA's flash / memory-efficient kernels accept on CUDA.
    """

    cos: Tensor  # [B or 1, 1, S, hd]
    sin: Tensor  # [B or 1, 1, S, hd]
    mask: Tensor | None  # bool [B or 1, 1, S, L], True = may attend; None when causal
    input_pos: Tensor  # [S] cache positions written by this forward
    use_cache: bool = False  # write/read the layers' KV caches (else attend over these S tokens only)
    causal: bool = False


def make_context(config: MixtralConfig, input_pos: Tensor, *, kv_len: int | None = None,
                 attention_mask: Tensor | None = None, dtype: torch.dtype = torch.float32,
                 inv_freq: Tensor | None = None, from_start: bool = False) -> Context:  # fmt: skip
    """Context for tokens at cache positions `input_pos` [S].

    kv_len: the KV cache length (keys at positions 0..kv_len-1); None without a cache (keys = these tokens).
    attention_mask: [B, P] 1 for real tokens, 0 for left padding, covering cache positions 0..P-1 (positions from
    P on count as real). RoPE positions then skip the padding, so a padded row matches the prompt run alone.
    from_start: input_pos is 0..S-1 (a prompt into an empty cache), so with a cache too the keys that matter are
    these S tokens. Without padding and with no window inside the S tokens, no mask is built (Context.causal).
    """
    device = input_pos.device
    S = input_pos.shape[0]
    window_bites = bool(config.sliding_window) and S > config.sliding_window
    causal = attention_mask is None and not window_bites and S > 1 and (kv_len is None or from_start)
    qpos = input_pos  # [S]
    positions = qpos[None, :]  # [1, S]
    mask = None
    if not causal:
        kpos = torch.arange(kv_len, device=device) if kv_len is not None else input_pos  # [L]
        allowed = kpos[None, :] <= qpos[:, None]  # [S, L] causal
        if config.sliding_window:
            allowed = allowed & (kpos[None, :] > qpos[:, None] - config.sliding_window)
        mask = allowed[None, None]  # [1, 1, S, L]
    if attention_mask is not None:
        am = attention_mask.to(device=device, dtype=torch.bool)  # [B, P]
        B, P = am.shape
        L = kpos.shape[0]
        valid = torch.ones(B, L, dtype=torch.bool, device=device)
        n = min(P, L)
        valid[:, :n] = am[:, :n]
        # a padding query attends to itself only, so its row stays finite (it is never read)
        mask = (allowed[None] & (valid[:, None, :] | (kpos[None, :] == qpos[:, None])[None]))[:, None]  # [B, 1, S, L]
        n_pad = P - am.sum(dim=1)  # [B] left padding
        positions = (qpos[None, :] - n_pad[:, None]).clamp(min=0)  # [B, S]
    if inv_freq is None:
        inv_freq = rope_inv_freq(config, device)
    freqs = positions[..., None].float() * inv_freq  # [B or 1, S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B or 1, S, hd]
    return Context(emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None], mask, input_pos,
                   use_cache=kv_len is not None, causal=causal)


class Transformer(nn.Module):
    """embed -> layers -> norm -> lm_head. Module names follow the checkpoint's, minus the leading 'model.'."""

    def __init__(self, config: MixtralConfig, layers: bool = True):
        super().__init__()
        self.config = config
        # _weight skips the random init (the loader assigns the checkpoint's): a meta normal_ imports dynamo
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers) if layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.max_batch_size = self.max_seq_length = 0
        self.tokenizer = None  # set by the loader

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocate (or reuse, when the size is unchanged) the KV cache of every layer."""
        if (max_batch_size, max_seq_length) == (self.max_batch_size, self.max_seq_length):
            return
        p = getattr(self, "expert_placement", None)  # the loader's memory.Placement under a max_memory budget
        if p is not None and max_batch_size * max_seq_length > p.batch * p.context:
            logging.getLogger(__name__).warning(
                "KV cache for %d x %d tokens exceeds the %d x %d reserved under max_memory: the device may go over "
                "the budget; load with a larger context= / batch= (mixq --context/--batch)",
                max_batch_size, max_seq_length, p.batch, p.context)  # fmt: skip
        c = self.config
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch_size, c.num_key_value_heads, max_seq_length, c.head_dim,
                                               self.dtype, self.device)  # fmt: skip
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.max_batch_size = self.max_seq_length = 0

    def context(self, input_pos: Tensor | None, attention_mask: Tensor | None = None, S: int = 0,
                from_start: bool = False) -> Context:  # fmt: skip
        """With input_pos: cache positions, through the KV cache. Without: positions 0..S-1, no cache."""
        kv_len = self.max_seq_length if input_pos is not None and self.max_seq_length else None
        if input_pos is None:
            input_pos = torch.arange(S, device=self.device)
        return make_context(self.config, input_pos, kv_len=kv_len, attention_mask=attention_mask, dtype=self.dtype,
                            inv_freq=self.inv_freq, from_start=from_start)  # fmt: skip

    def forward(self, input_ids: Tensor, input_pos: Tensor | None = None, attention_mask: Tensor | None = None,
                last_only: bool = False, from_start: bool = False) -> Tensor:  # fmt: skip
        """input_ids [B, S] -> logits [B, S, V]. input_pos [S]: the cache positions to write and attend from
        (caches must be set up, see generate.py); None: a plain forward over these S tokens, caches untouched.
        attention_mask [B, P] marks left padding (see make_context). last_only: logits of the last position only,
        [B, 1, V] (a prefill needs no more; the lm_head is the largest matmul of a small model). from_start:
        input_pos is 0..S-1 (a prompt into an empty cache): attention over these S tokens needs no mask."""
        ctx = self.context(input_pos, attention_mask, input_ids.shape[1], from_start)
        h = self.embed_tokens(input_ids)  # [B, S, D]
        for layer in self.layers:
            h = layer(h, ctx)
        if last_only:
            h = h[:, -1:]  # [B, 1, D]
        return self.lm_head(self.norm(h))  # [B, S or 1, V]

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kw) -> Tensor:
        """See mixtral_quant.generate.generate."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kw)

    def experts_resident(self) -> bool:
        """True when every layer's experts live on the compute device (no expert cache reading routes on the host)."""
        return all(isinstance(layer.block_sparse_moe.experts, ResidentExperts) for layer in self.layers)

    def offload_stats(self) -> dict:
        """Per-store statistics summed over layers (all zero when every expert is resident)."""
        total: dict = {"hits": 0, "misses": 0, "prefetches": 0, "prefetch_hits": 0, "bytes_copied": 0,
                       "pinned_bytes": 0}  # fmt: skip
        for layer in self.layers:
            for k, v in layer.block_sparse_moe.experts.stats().items():
                total[k] = total.get(k, 0) + v
        return total


class Block(nn.Module):
    """One decoder layer: x + attn(norm(x)), then h + moe(norm(h)). Callable on its own with a Context."""

    def __init__(self, config: MixtralConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = MoE(config)

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class Attention(nn.Module):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, D, bias=False)
        self.kv_cache: KVCache | None = None
        # packed q/o and k/v stacks (set by the loader when the projections allow): the torch backend decodes
        # each pair in one call, the single projections above are views of them
        self.qo: QuantLinear | None = None
        self.kv: QuantLinear | None = None

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, S, _ = x.shape
        o_weight = None
        if self.qo is not None and self.kv is not None and self.qo.backend == "torch":
            w_qo, w_kv = self.qo.dequantize(dtype=x.dtype), self.kv.dequantize(dtype=x.dtype)  # [2, out, in]
            q = F.linear(x, w_qo[0])  # [B, S, H*hd]
            k, v = F.linear(x, w_kv.view(-1, w_kv.shape[-1])).chunk(2, dim=-1)  # [B, S, K*hd] each
            o_weight = w_qo[1].view(self.o_proj.out_features, self.o_proj.in_features)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = k.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, S, hd]
        v = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, S, hd]
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.use_cache:
            if self.kv_cache is None:
                raise RuntimeError("a cached forward (input_pos given) needs the KV cache: call setup_caches() first")
            k_all, v_all = self.kv_cache.update(ctx.input_pos, k, v)  # [B, K, L, hd]
            if not ctx.causal:  # else the S new keys are all there is (a prompt into an empty cache)
                k, v = k_all, v_all
        y = attend(q, k, v, ctx)  # [B, H, S, hd]
        y = y.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim)  # [B, S, H*hd]
        return self.o_proj(y) if o_weight is None else F.linear(y, o_weight)


def attend(q: Tensor, k: Tensor, v: Tensor, ctx: Context) -> Tensor:
    """SDPA in a form CUDA's flash or memory-efficient kernels accept (the math fallback upcasts to fp32 and
    materialises the [S, L] scores: 4.4 GB for a 4096-token Mixtral prefill). Flash takes no mask but grouped heads;
    memory-efficient takes a mask but not grouped heads. q [B, H, S, hd], k/v [B, K, L, hd] -> [B, H, S, hd].
    """
    B, H, S, hd = q.shape
    K = k.shape[1]
    if ctx.causal:  # no mask: flash (grouped heads in fp16/bf16; expanded in fp32, which only efficient takes)
        if K != H and q.dtype == torch.float32:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # [B, H, S, hd]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)
    if S == 1:  # decode: a group's H/K query heads become rows of one key head; the mask [B or 1, 1, 1, L] fits all
        y = F.scaled_dot_product_attention(q.reshape(B, K, H // K, hd), k, v, attn_mask=ctx.mask)  # [B, K, H/K, hd]
        return y.reshape(B, H, 1, hd)
    if K != H:  # a mask (padding, a window inside the S tokens): memory-efficient, over expanded K/V [B, H, L, hd]
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)


class MoE(nn.Module):
    """Router (softmax over all E experts in fp32, top-A, renormalise) + an expert store that does the compute.

    `lookahead`, when set (by an offloading loader), is called with this layer's MoE input before the experts run,
    e.g. `next_layer_moe.prefetch`, so the next layer's experts can be fetched while this one computes.
    """

    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts: ExpertStore | None = None  # set by the loader
        self.lookahead: Callable[[Tensor], None] | None = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, D] -> (topk_ids [T, A] int64, topk_weights [T, A] fp32 summing to 1)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, A]
        return ids, weights / weights.sum(dim=-1, keepdim=True)

    def prefetch(self, x: Tensor) -> None:
        """Tell this layer's store which experts `x` [T, D] would pick."""
        self.experts.prefetch(self.route(x)[0])

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        x = x.view(B * S, D)  # [T, D]
        ids, weights = self.route(x)
        if self.lookahead is not None:
            self.lookahead(x)
        return self.experts(x, ids, weights).view(B, S, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(config: MixtralConfig, device=None) -> Tensor:
    hd = config.head_dim
    # fp32 on the CPU as transformers does, also under a meta device context (a meta arange imports dynamo: seconds)
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device="cpu") / hd))  # [hd/2]
    return inv if device is None else inv.to(device)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hub checkpoints' q/k layout): x [B, H, S, hd], cos/sin [B or 1, 1, S, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
