"""Resident expert stacks and the one expert computation: `sum_k w_k * expert_k(x)` over a layer's stacked experts.

`ResidentExperts` holds E experts stacked on the compute device; an offloaded layer runs this same code over its
device slots (a ResidentExperts whose stacks are views of the slot buffer) with the ids mapped to slots, so the
arithmetic of an offloaded model is the resident model's.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MixtralConfig
from ..linear import QuantLinear, linear

# Legend: T tokens, E experts (stack rows), D hidden, F expert intermediate size, A activated experts per token.


class ExpertStore(nn.Module):
    """The interface. forward(x [T, D], topk_ids [T, A] int64, topk_weights [T, A] float) -> [T, D]."""

    num_experts: int

    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        raise NotImplementedError

    def prefetch(self, topk_ids: Tensor) -> None:
        """A hint: these experts [T, A] are likely needed soon (the next forward). Resident stores ignore it."""

    def stats(self) -> dict:
        return {}


class ResidentExperts(ExpertStore):
    """E experts of one layer stacked on one device: w13 [E, 2, F, D] (w1 and w3), w2 [E, 1, D, F].

    Packed (QuantLinear) or dense (a tensor in the compute dtype, for bf16/fp16 checkpoints). NF4 experts are one
    stack `w123` [E, 3] (w1, w3, w2: equal sizes) so that a token's experts decode in one call; `w13` and `w2` are
    views of it. Per expert e the tensors are views `w13.weight[e, 0]` etc., bytes as in the checkpoint.
    `route_experts`: the range of the ids given to the fused kernel (E, or the layer's expert count when these
    rows are an offloaded layer's slots: the kernel then pads and tunes exactly as for the resident layer).
    """

    def __init__(self, w13: QuantLinear | Tensor, w2: QuantLinear | Tensor, w123: QuantLinear | None = None,
                 route_experts: int | None = None):  # fmt: skip
        super().__init__()
        if isinstance(w13, Tensor):
            self.register_buffer("w13", w13)
            self.register_buffer("w2", w2)
            self.dense = True
            self.num_experts, _, self.ffn, self.hidden = w13.shape
        else:
            self.w13, self.w2, self.w123 = w13, w2, w123
            self.dense = False
            self.num_experts, self.ffn, self.hidden = w13.lead[0], w13.out_features, w13.in_features
        self.route_experts = route_experts or self.num_experts
        self._fused = None  # the kernels' stacked experts, built on first use with the triton backend

    @classmethod
    def from_checkpoint(cls, reader, prefix: str, config: MixtralConfig, *, device, compute_dtype: torch.dtype,
                        backend: str, experts: range | None = None) -> "ResidentExperts":  # fmt: skip
        """Read `{prefix}.{e}.w1/w2/w3` for every expert (or those in `experts`) straight into stacked buffers on
        `device`."""
        ids = experts if experts is not None else range(config.num_local_experts)
        parts = {n: [expert_module(reader, f"{prefix}.{e}.{n}") for e in ids] for n in ("w1", "w3", "w2")}
        return cls.from_parts(parts, len(ids), name=prefix, device=device, compute_dtype=compute_dtype,
                              backend=backend)  # fmt: skip

    @classmethod
    def from_parts(cls, parts: dict[str, list[dict[str, Tensor]]], E: int, *, name: str, device,
                   compute_dtype: torch.dtype, backend: str) -> "ResidentExperts":  # fmt: skip
        """From the checkpoint tensors of each expert's w1, w3, w2 ({"w1": [E module dicts], ...})."""
        first = parts["w1"][0]
        kw = dict(device=device, backend=backend, compute_dtype=compute_dtype)
        if all(any(k.startswith("weight.") for k in p[e]) for p in parts.values() for e in range(E)):
            # nf4 everywhere: one [E, 3] stack
            w123 = QuantLinear.from_tensors([p[e] for e in range(E) for p in parts.values()], (E, 3),
                                            name=f"{name}.*.w1/w3/w2", **kw)  # fmt: skip
            D, Fi = w123.in_features, w123.out_features
            return cls(w123.narrow_lead(0, 2), w123.narrow_lead(2, 1, (D, Fi)), w123)
        if "SCB" in first or any(k.startswith("weight.") for k in first):
            w13 = QuantLinear.from_tensors([p for e in range(E) for p in (parts["w1"][e], parts["w3"][e])], (E, 2),
                                           name=f"{name}.*.w1/w3", **kw)  # fmt: skip
            w2 = QuantLinear.from_tensors(parts["w2"], (E, 1), name=f"{name}.*.w2", **kw)
            return cls(w13, w2)
        Fi, D = first["weight"].shape
        w13 = torch.empty(E, 2, Fi, D, dtype=compute_dtype, device=device)
        w2 = torch.empty(E, 1, D, Fi, dtype=compute_dtype, device=device)
        for e in range(E):
            w13[e, 0].copy_(parts["w1"][e]["weight"])
            w13[e, 1].copy_(parts["w3"][e]["weight"])
            w2[e, 0].copy_(parts["w2"][e]["weight"])
        return cls(w13, w2)

    @classmethod
    def over(cls, template: "ResidentExperts", views: dict[tuple[str, str], Tensor], rows: int, *, backend: str,
             compute_dtype: torch.dtype, route_experts: int, standard_maps: bool) -> "ResidentExperts":  # fmt: skip
        """A store laid out like `template` whose stacks are the given views ({(stack, buffer): [rows, ...]}):
        an offloaded layer's device slots (or host rows)."""
        if template.dense:
            return cls(views["w13", ""], views["w2", ""], route_experts=route_experts)
        stacks = {}
        for mod in ("w123", "w13", "w2"):
            t = getattr(template, mod, None)
            if t is None or (mod != "w123" and template.w123 is not None):
                continue
            q = QuantLinear(t.fmt, t.out_features, t.in_features, (rows, *t.lead[1:]), t.blocksize, t.double_quant,
                            t.source_dtype, backend, compute_dtype)  # fmt: skip
            for name, _ in t.named_buffers(recurse=False):
                q.register_buffer(name, views[mod, name], persistent=False)
            q.standard_maps = standard_maps
            stacks[mod] = q
        if "w123" in stacks:
            w123 = stacks["w123"]
            D, Fi = w123.in_features, w123.out_features
            return cls(w123.narrow_lead(0, 2), w123.narrow_lead(2, 1, (D, Fi)), w123, route_experts=route_experts)
        return cls(stacks["w13"], stacks["w2"], route_experts=route_experts)

    def stacked_tensors(self) -> list[tuple[str, str, Tensor]]:
        """(stack, buffer name, the tensor [E, ...]) for every tensor that holds expert bytes."""
        if self.dense:
            return [("w13", "", self.w13), ("w2", "", self.w2)]
        mods = ("w123",) if self.w123 is not None else ("w13", "w2")
        return [(mod, name, t) for mod in mods for name, t in getattr(self, mod).named_buffers(recurse=False)]

    # ---- compute -------------------------------------------------------------------------------------------
    def _weights(self, index: Tensor | int) -> tuple[Tensor, Tensor]:
        """(w13 [*sel, 2F, D], w2 [*sel, D, F]) of the selected experts, decoded (a temporary) or dense views."""
        Fi, D = self.ffn, self.hidden
        if self.dense:
            w13, w2 = self.w13[index], self.w2[index]
        elif self.w123 is not None:
            w = self.w123.dequantize(index)  # [*sel, 3, F, D]
            w13, w2 = w[..., :2, :, :], w[..., 2, :, :]
        else:
            w13, w2 = self.w13.dequantize(index), self.w2.dequantize(index)
        lead = w13.shape[:-3]
        return w13.reshape(*lead, 2 * Fi, D), w2.reshape(*lead, D, Fi)

    @property
    def fused(self) -> bool:
        """The triton backend's fused MoE computes every forward (when the kernels provide one)."""
        if self.dense or self.w13.backend != "triton":
            return False
        try:
            from ..kernels import fused_moe, stack_experts  # noqa: F401
        except ImportError:
            return False
        return True

    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        T, A = topk_ids.shape
        if self.fused:
            return self._fused_moe(x, topk_ids, topk_weights)
        if T == 1 and (self.dense or self.w13.backend == "torch"):
            return self._one_token(x, topk_ids[0], topk_weights[0])
        return self.grouped(x, topk_ids, topk_weights)

    def _one_token(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """Decode: the A selected experts decoded in one batched call, no host sync."""
        A, Fi, D = ids.shape[0], self.ffn, self.hidden
        w13, w2 = self._weights(ids)  # [A, 2F, D], [A, D, F]
        h = F.linear(x, w13.reshape(A * 2 * Fi, D)).view(A, 2, Fi)  # one matvec for both experts: [A, 2, F]
        a = F.silu(h[:, 0]) * h[:, 1] * weights.to(h.dtype)[:, None]  # [A, F], routing weight applied here
        return torch.bmm(w2, a[:, :, None]).sum(0).view(1, D).to(x.dtype)  # [A, D, 1] summed over A

    def grouped(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, schedule=None) -> Tensor:
        """Prefill / batches: the T*A (token, expert) pairs sorted by expert, one matmul per expert with tokens,
        each token's A outputs summed in slot order (whatever the ids: offloaded = resident arithmetic).

        schedule: (expert, stack row) pairs in the order to compute them, iterated lazily (an offloaded layer
        copies each expert into its slot as the iteration reaches it); default: every used expert e at row e."""
        T, A = topk_ids.shape
        flat = topk_ids.reshape(-1)  # [T*A]
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert
        tok = order // A  # [T*A] token of each sorted pair
        counts = torch.bincount(flat, minlength=self.route_experts).tolist()  # one host sync per layer
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
        xs = x[tok]  # [T*A, D]
        ys = torch.empty_like(xs)
        torch_path = self.dense or self.w13.backend == "torch"
        for e, r in schedule if schedule is not None else ((e, e) for e, c in enumerate(counts) if c):
            a, c = starts[e], counts[e]
            seg = xs[a:a + c]  # [c, D]
            if torch_path:
                w13, w2 = self._weights(r)  # [2F, D], [D, F]
                h = F.linear(seg, w13).view(c, 2, self.ffn)  # [c, 2, F]
                ys[a:a + c] = F.linear(F.silu(h[:, 0]) * h[:, 1], w2)  # [c, D]
            else:
                h = linear(seg, self.w13, r).view(c, 2, self.ffn)
                ys[a:a + c] = linear(F.silu(h[:, 0]) * h[:, 1], self.w2, r)
        ys = ys * topk_weights.reshape(-1)[order, None].to(ys.dtype)
        out = torch.empty_like(ys)
        out[order] = ys  # back to (token, slot) order
        return out.view(T, A, -1).sum(1)  # [T, D], a fixed summation order

    def _fused_moe(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        """The kernels' fused MoE (mixtral_quant.kernels.fused_moe over stack_experts of these stacks)."""
        from ..kernels import fused_moe

        return fused_moe(x, topk_ids, topk_weights, self.kernel_stack())

    def kernel_stack(self):
        """The kernels' StackedExperts over these stacks (views), built once."""
        if self._fused is None:
            from ..kernels import stack_experts

            E, w13, w2 = self.num_experts, self.w13, self.w2
            if w13.fmt == "nf4":
                st = stack_experts([w13.nf4_weight(e, 0) for e in range(E)], [w2.nf4_weight(e, 0) for e in range(E)],
                                   [w13.nf4_weight(e, 1) for e in range(E)])  # fmt: skip
            else:
                st = stack_experts([(w13.weight[e, 0], w13.SCB[e, 0]) for e in range(E)],
                                   [(w2.weight[e, 0], w2.SCB[e, 0]) for e in range(E)],
                                   [(w13.weight[e, 1], w13.SCB[e, 1]) for e in range(E)])  # fmt: skip
            self._fused = dataclasses.replace(st, num_experts=self.route_experts)
        return self._fused

    def refresh_offsets(self) -> None:
        """After rows were rewritten (an offloaded layer's slots): the kernel stack's nested offsets taken again
        from the rows (a small device copy, no sync), unless the stack already views them."""
        if self._fused is None or self.dense or self.w13.fmt != "nf4":
            return
        f = self._fused
        for st, src in ((f.w1, self.w13.offset[:, 0]), (f.w3, self.w13.offset[:, 1]), (f.w2, self.w2.offset[:, 0])):
            if st.offsets.data_ptr() != src.data_ptr() or st.offsets.stride() != src.stride():
                st.offsets = src.contiguous()


def expert_module(reader, prefix: str) -> dict[str, Tensor]:
    t = reader.module(prefix)
    if not t:
        raise KeyError(f"{reader.path}: tensor {prefix + '.weight'!r} is missing; re-quantize or re-download")
    return t
