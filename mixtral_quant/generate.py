"""Decoding: prefill the prompt into the KV cache, then one token at a time (greedy or sampled), streaming.

Small functions in gpt-fast's shape: `prefill`, `decode_one_token`, `decode_n_tokens`, `generate`; `stream` is the
iterator form. Left-padded batches (an attention_mask) and stopping at EOS per sequence are handled here.
On CUDA with every expert resident the decode step runs through torch.compile + CUDA graphs by default (static
shapes: the KV cache is preallocated; the kernels are custom operators); `compile=False` decodes eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0 or self.top_k):
            log.warning("temperature/top_p/top_k are ignored without do_sample=True: decoding greedily")


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits [B, V] -> scaled logits with the tokens outside top-k / the top-p nucleus set to -inf."""
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # ascending, as transformers
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p  # the low tail whose mass stays below 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(logits: Tensor, s: Sampling) -> Tensor:
    """logits [B, V] (the last position) -> next tokens [B] int64."""
    if not s.do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, s.temperature, s.top_k, s.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=s.generator).view(-1)


def prefill(model, input_ids: Tensor, input_pos: Tensor, attention_mask: Tensor | None, s: Sampling) -> Tensor:
    """Run the prompt [B, S] (input_pos 0..S-1) through the model, filling the cache; return the first new tokens [B]."""
    logits = model(input_ids, input_pos, attention_mask, last_only=True, from_start=True)  # [B, 1, V]
    return sample(logits[:, -1], s)


def decode_logits(model, cur: Tensor, input_pos: Tensor, attention_mask: Tensor | None) -> Tensor:
    """cur [B] at cache position input_pos [1] -> the next token's logits [B, V]. What compile=True compiles:
    sampling stays outside (its seeded torch.Generator is not traceable; greedy is one argmax)."""
    return model(cur[:, None], input_pos, attention_mask)[:, -1]  # [B, 1, V] -> [B, V]


def decode_one_token(model, cur: Tensor, input_pos: Tensor, attention_mask: Tensor | None, s: Sampling,
                     step: Callable = decode_logits) -> Tensor:  # fmt: skip
    """cur [B] at cache position input_pos [1] -> next tokens [B]; `step` is decode_logits or its compiled form."""
    return sample(step(model, cur, input_pos, attention_mask), s)


def resolve_compile(model, compile: bool | None) -> bool:
    """Whether to decode through compile_decode: `compile`, or by default (None) on CUDA when every expert is
    resident. Offloaded experts always decode eagerly (the expert cache reads the router's choice on the host);
    that is logged once per model."""
    resident = model.experts_resident()
    if compile is False or (compile is None and model.device.type != "cuda"):
        return False
    if not resident:
        if not model.__dict__.get("_said_eager"):
            model.__dict__["_said_eager"] = True
            (log.warning if compile else log.info)(
                "experts are offloaded: decoding eagerly (the expert cache reads the router's choice on the host)")
        return False
    return True


def compile_decode(model) -> Callable:
    """decode_logits through torch.compile, gpt-fast style: fullgraph, static shapes (the preallocated KV cache keeps
    them fixed while decoding), CUDA graphs on a GPU ("reduce-overhead"), inductor's C++ kernels on the CPU.

    The kernels are custom operators (mixtral_quant.kernels), so the whole step is one graph. The first step runs
    eagerly: the kernels pick their launch configs for these shapes there, outside anything traced or captured.
    Compiling happens at the second step (tens of seconds the first time, seconds once inductor's cache is warm).
    If it fails (no C++ compiler, say), a warning is logged and the returned step decodes eagerly from then on.
    """
    if model.device.type == "cuda":
        compiled = torch.compile(decode_logits, mode="reduce-overhead", fullgraph=True, dynamic=False)
    else:  # no CUDA graphs on a CPU: a C++ wrapper calls the kernels instead of Python (~20% faster per step)
        compiled = torch.compile(decode_logits, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    state = {"fn": compiled, "warm": False, "checked": False}

    def step(model, cur: Tensor, input_pos: Tensor, attention_mask: Tensor | None) -> Tensor:
        fn = state["fn"]
        if fn is decode_logits or not state["warm"]:  # compiling failed, or the eager warm-up step
            state["warm"] = True
            return decode_logits(model, cur, input_pos, attention_mask)
        if state["checked"]:
            # the guards ran at this loop's first step and nothing they check changes between steps (same model,
            # shapes and dtypes; only input_pos and the caches' contents): skip re-evaluating them (~1 ms on a CPU)
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return fn(model, cur, input_pos, attention_mask)
        try:
            out = fn(model, cur, input_pos, attention_mask)
        except Exception as e:  # noqa: BLE001 - whatever made compiling fail: say so once, then decode eagerly
            msg = (str(e).strip().splitlines() or [""])[0]
            log.warning("compile=True: torch.compile of the decode step failed (%s: %s); decoding eagerly",
                        type(e).__name__, msg)  # fmt: skip
            state["fn"] = decode_logits
            return decode_logits(model, cur, input_pos, attention_mask)
        state["checked"] = True
        return out

    return step


def decode_n_tokens(model, cur: Tensor, input_pos: Tensor, n: int, attention_mask: Tensor | None, s: Sampling,
                    eos: Tensor | None, step: Callable = decode_logits) -> Iterator[Tensor]:  # fmt: skip
    """Yield up to n tokens [B] after `cur`; rows that produced EOS keep producing EOS; stop when all have."""
    done = torch.isin(cur, eos) if eos is not None else None
    for _ in range(n):
        if done is not None and bool(done.all()):  # one host sync per token, only when stopping at EOS
            return
        cur = decode_one_token(model, cur, input_pos, attention_mask, s, step)
        input_pos += 1
        if done is not None:
            cur = torch.where(done, eos[0], cur)
            done |= torch.isin(cur, eos)
        yield cur


def stream(model, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, seed: int | None = None, eos: int | list[int] | None = None,
           attention_mask: Tensor | None = None, compile: bool | None = None) -> Iterator[Tensor]:  # fmt: skip
    """The iterator form of `generate`: yields each step's new tokens [B] as soon as they exist."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt length >= 1], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model.device
    input_ids = input_ids.to(device)
    B, S = input_ids.shape
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"token ids must be in 0..{vocab - 1} (the model's vocabulary)")
    if attention_mask is not None:
        attention_mask = check_left_padding(attention_mask.to(device), B, S)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    s = Sampling(do_sample, temperature, top_p, top_k, gen)
    eos_ids = model.config.eos_token_id if eos is None else eos
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    eos_t = torch.tensor(eos_ids, device=device, dtype=torch.long) if eos_ids else None
    if max_new_tokens == 0:
        return
    compile = resolve_compile(model, compile)
    with torch.inference_mode():
        if model.max_batch_size < B or model.max_seq_length < S + max_new_tokens:  # else reuse the cache
            # compiled: a cache length from few sizes, so that calls with other lengths reuse the compiled step
            model.setup_caches(B, cache_length(S + max_new_tokens, model.config.max_position_embeddings) if compile
                               else S + max_new_tokens)  # fmt: skip
        input_pos = torch.arange(S, device=device)
        cur = prefill(model, input_ids, input_pos, attention_mask, s)
        yield cur
        input_pos = torch.tensor([S], device=device)
        step = compile_decode(model) if compile else decode_logits
        yield from decode_n_tokens(model, cur, input_pos, max_new_tokens - 1, attention_mask, s, eos_t, step)


def cache_length(n: int, max_positions: int) -> int:
    """n rounded up to a power of two (at least 256), at most max_positions unless n itself is larger."""
    return max(n, min(max(256, 1 << (n - 1).bit_length()), max_positions))


def generate(model, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, eos: int | list[int] | None = None,
             attention_mask: Tensor | None = None, callback: Callable[[Tensor], None] | None = None,
             compile: bool | None = None) -> Tensor:  # fmt: skip
    """input_ids [B, S] (left-padded when attention_mask [B, S] is given) -> LongTensor [B, S + new].

    Greedy unless do_sample; sampling uses temperature, top_k (0 = off), top_p (1 = off) and a torch.Generator
    seeded by `seed`. Stops when every row has produced an EOS (eos: id(s); default config.eos_token_id; [] for
    none), rows that finished early are filled with EOS. callback(tokens [B]) is called at every step.
    compile: decode through torch.compile and, on CUDA, a captured CUDA graph (see compile_decode): the same tokens,
    faster steps after a one-time compilation at the second step. None (default): on when the model is on CUDA
    with every expert resident, off otherwise (see resolve_compile); False: eager. Falls back to eager decoding,
    with a logged warning, where compiling fails.
    """
    B, S = input_ids.shape if input_ids.dim() == 2 else (0, 0)
    out = torch.empty(B, S + max(max_new_tokens, 0), dtype=torch.long, device=model.device)
    n = 0
    for tok in stream(model, input_ids, max_new_tokens, do_sample, temperature, top_p, top_k, seed, eos,
                      attention_mask, compile):  # fmt: skip
        out[:, S + n] = tok
        n += 1
        if callback is not None:
            callback(tok)
    out[:, :S] = input_ids
    return out[:, : S + n]


def check_left_padding(mask: Tensor, B: int, S: int) -> Tensor:
    """A [B, S] 0/1 mask whose zeros all come first in each row, with at least one 1 per row."""
    if tuple(mask.shape) != (B, S):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, S)}, got {tuple(mask.shape)}")
    m = mask.long()
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    if bool((m[:, 1:] < m[:, :-1]).any()) or bool((m[:, -1] == 0).any()):
        raise ValueError("attention_mask must be left-padded (zeros first in each row, the last token real); "
                         "pad prompts on the left")  # fmt: skip
    return m
