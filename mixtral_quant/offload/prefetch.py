"""Speculative prefetch (Eliseev & Mazur 2023, arXiv 2312.17238): while layer i runs, layer i+1's router applied to
layer i's MoE input guesses the experts to copy into layer i+1's slots. Measured to help only for longer forwards
(PREFETCH_MIN_TOKENS, evals/offload_sim.py), so batch-1 decode does not speculate by default.
"""

from __future__ import annotations

from .cached import PREFETCH_MIN_TOKENS, CachedExperts

__all__ = ["PREFETCH_MIN_TOKENS", "wire_prefetch", "set_prefetch"]


def wire_prefetch(model) -> None:
    """Point every MoE before an offloaded layer at that layer: its lookahead speculates for it."""
    moes = [layer.block_sparse_moe for layer in model.layers]
    for moe, nxt in zip(moes, moes[1:]):
        if not isinstance(nxt.experts, CachedExperts):
            continue
        if isinstance(moe.experts, CachedExperts):
            moe.experts._next = (nxt,)
            moe.lookahead = moe.experts.speculate
        else:  # a resident layer before an offloaded one: its own sync, copies start before its compute
            moe.lookahead = nxt.prefetch


def set_prefetch(model, min_tokens: int) -> None:
    """Speculative prefetch for forwards of at least `min_tokens` tokens in every offloaded layer (1: always;
    a huge number: never)."""
    for layer in model.layers:
        if isinstance(layer.block_sparse_moe.experts, CachedExperts):
            layer.block_sparse_moe.experts.prefetch_min_tokens = min_tokens
