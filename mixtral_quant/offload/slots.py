"""The slot cache of one offloaded layer as a pure policy (no tensors): which expert sits in which of k device
slots, least recently used first, and the hit / miss / prefetch counts. `CachedExperts` drives it with the router's
choices and does the copies it asks for; `evals/offload_sim.py` replays routing traces through the same class.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass


@dataclass
class CacheStats:
    hits: int = 0  # experts a forward found in a slot (prefetched or kept from before)
    misses: int = 0  # experts a forward had to copy in and wait for
    prefetches: int = 0  # experts copied ahead of use on the next layer's guess
    prefetch_hits: int = 0  # prefetched experts a forward then used
    bytes_copied: int = 0  # host -> device, demand and prefetch (counted by the store that copies)


class SlotCache:
    """k slots over a layer's experts, LRU order. Every method returns the copies to make: (expert, slot) pairs."""

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"a slot cache needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(num_slots - 1, -1, -1))
        self.prefetched: set[int] = set()
        self.counts = CacheStats()

    def __contains__(self, e: int) -> bool:
        return e in self.lru

    def slot(self, e: int) -> int:
        return self.lru[e]

    def acquire(self, e: int, protected: set[int] = frozenset()) -> int | None:
        """A slot for expert e, which the caller then fills: a free one, else the least recently used one whose
        expert is not in `protected`; None when every slot is protected."""
        if self.free:
            s = self.free.pop()
        else:
            victim = next((v for v in self.lru if v not in protected), None)
            if victim is None:
                return None
            s = self.lru.pop(victim)
            self.prefetched.discard(victim)
        self.lru[e] = s
        return s

    def lookup(self, needed: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
        """A forward needs these distinct experts: ([(expert, slot)] already in a slot, now most recent; [experts
        not in a slot]), counted as hits and misses."""
        ready, missing = [], []
        for e in needed:
            if e in self.lru:
                self.lru.move_to_end(e)
                self.counts.hits += 1
                if e in self.prefetched:
                    self.counts.prefetch_hits += 1
                    self.prefetched.discard(e)
                ready.append((e, self.lru[e]))
            else:
                self.counts.misses += 1
                missing.append(e)
        return ready, missing

    def load(self, needed: list[int]) -> list[tuple[int, int]]:
        """lookup + a slot for every missing expert (evicting the least recently used experts not needed here):
        the copies to make. Needs len(needed) <= num_slots."""
        if len(needed) > self.num_slots:
            raise ValueError(f"{len(needed)} experts needed at once but only {self.num_slots} slots")
        _, missing = self.lookup(needed)
        protected = set(needed)
        return [(e, self.acquire(e, protected)) for e in missing]

    def stream(self, needed: list[int]):
        """More distinct experts than slots: yield (expert, slot, copy needed) one at a time, those in a slot first;
        an expert stays protected from eviction until the caller resumes the iteration (it has computed it)."""
        ready, todo = self.lookup(needed)
        protected = set(needed)
        loading = []
        while todo and (s := self.acquire(todo[0], protected)) is not None:
            loading.append((todo.pop(0), s))
        for (e, s), copy in [(p, False) for p in ready] + [(p, True) for p in loading]:
            yield e, s, copy
            protected.discard(e)
        while todo:  # each computed expert freed its slot for the next one
            e = todo.pop(0)
            yield e, self.acquire(e, protected), True
            protected.discard(e)

    def prefetch(self, guess: list[int]) -> list[tuple[int, int]]:
        """The most frequently guessed experts (at most num_slots; -1 = no guess) not yet in a slot, given slots
        ahead of the next forward: the copies to make."""
        guessed = [e for e, _ in Counter(g for g in guess if g >= 0).most_common(self.num_slots)]
        protected = set(guessed)  # a guessed expert already in a slot is not evicted for another guess
        copies = []
        for e in (e for e in guessed if e not in self.lru):
            s = self.acquire(e, protected)
            if s is None:
                break
            self.prefetched.add(e)
            self.counts.prefetches += 1
            copies.append((e, s))
        return copies


def rounds(token_experts: list[list[int]], num_slots: int) -> list[tuple[list[int], list[int]]]:
    """Split a forward whose distinct experts exceed the slots: [(experts, tokens)] with at most num_slots experts
    each and every token in the first round that holds all of its experts (a token is computed whole, once).
    Greedy in token order; each token's experts must fit (A <= num_slots)."""
    out: list[tuple[list[int], list[int]]] = []
    for t, es in enumerate(token_experts):
        es = list(dict.fromkeys(es))
        for experts, tokens in out:
            new = [e for e in es if e not in experts]
            if len(experts) + len(new) <= num_slots:
                experts.extend(new)
                tokens.append(t)
                break
        else:
            out.append((es, [t]))
    return out
