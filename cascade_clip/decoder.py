"""Text-to-image decoders of the cascade (the official ``TPN_Decoder`` / ``TPN_DecoderLayer``).

A layer is cross-attention from class queries ``X`` (B, C, d) to an image memory ``M`` (B, N, d), then residual +
``norm2``, then a ReLU FFN + residual + ``norm3`` (MODEL_SPEC.md section 3.3). The official layer also builds
``self_attn``/``norm1``/``dropout1`` (``nn.TransformerDecoderLayer`` leftovers) that it never calls; they are not built
here and their checkpoint keys are skipped on load.

Attention runs through ``F.scaled_dot_product_attention`` (flash/cuDNN/memory-efficient kernels on GPU) instead of
materialising the per-head logits. Only the last layer's head-averaged pre-softmax logits are used by the model, and
they equal one scaled ``q k^T`` product (``ops.mask_logits``), so the last layer's value path, ``proj``, ``norm2``, FFN
and ``norm3`` are skipped in the forward pass; their parameters are kept (frozen) so checkpoints round-trip.

The head runs its three decoders through :func:`run_stages`: the same math as calling each decoder on its stage, with
every operation issued once for all stages (each layer's per-stage weights stacked into batched products).
"""

from __future__ import annotations

import copy
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossAttention(nn.Module):
    """Multi-head attention with separate biased q/k/v projections and an output ``proj`` (official ``Attention``)."""

    def __init__(self, *, dim: int, heads: int, attn_dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_dropout = attn_dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    @property
    def logit_scale(self) -> float:
        """Head-averaged pre-softmax logits = this scale times the full-width ``q k^T``."""
        return self.head_dim**-0.5 / self.heads

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, heads, L, head_dim)."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """queries (B, C, d), memory (B, N, d) -> attended (B, C, d)."""
        q, k, v = self._split(self.q(queries)), self._split(self.k(memory)), self._split(self.v(memory))
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # scale = head_dim ** -0.5
        return self.proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    """One cascade decoder layer: cross-attention, add & ``norm2``, ReLU FFN, add & ``norm3``."""

    def __init__(self, *, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.multihead_attn = CrossAttention(dim=dim, heads=heads, attn_dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """queries (B, C, d), memory (B, N, d) -> updated queries (B, C, d)."""
        x = self.norm2(queries + self.dropout2(self.multihead_attn(queries, memory)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm3(x + self.dropout3(ffn))

    def query_key(self, queries: torch.Tensor, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The projected q (B, C, d) and k (B, N, d) whose scaled product gives the layer's mask logits."""
        return self.multihead_attn.q(queries), self.multihead_attn.k(memory)

    def mask_logit_only_parameters(self):
        """Parameters that do not affect this layer's mask logits (unused when the layer is last in a decoder)."""
        attn = self.multihead_attn
        for module in (attn.v, attn.proj, self.norm2, self.norm3, self.linear1, self.linear2):
            yield from module.parameters()


class CascadeDecoder(nn.Module):
    """``num_layers`` decoder layers over one memory; returns the last layer's projected q and k.

    The official decoder deep-copies one layer, so all layers start identical (MODEL_SPEC.md section 6.5).
    """

    def __init__(self, *, dim: int, heads: int, ffn_dim: int, dropout: float, num_layers: int):
        super().__init__()
        first = DecoderLayer(dim=dim, heads=heads, ffn_dim=ffn_dim, dropout=dropout)
        self.layers = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(num_layers - 1)])
        # The last layer's value path, proj, norms and FFN never reach the output: freeze them so optimisers and DDP
        # see only parameters that receive gradients.
        for p in self.layers[-1].mask_logit_only_parameters():
            p.requires_grad_(False)

    @property
    def logit_scale(self) -> float:
        return self.layers[-1].multihead_attn.logit_scale

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """queries (B, C, d), memory (B, N, d) -> (q (B, C, d), k (B, N, d)) of the last layer."""
        for layer in self.layers[:-1]:
            queries = layer(queries, memory)
        return self.layers[-1].query_key(queries, memory)


# --------------------------------------------------------------------------- all stages at once
# An eager bf16 training step on a GPU is host-bound (bench/RESULTS.md): its time follows the number of operators
# dispatched. Calling the three decoders one after the other issues every operator three times; stacking each
# layer's per-stage weights issues it once on (S, ...) tensors (about 840 fewer ATen calls per ViT-B/16 training step,
# bench/step_ops.py). The modules, parameters and checkpoint keys stay per stage (the official layout); only the
# forward pass is batched. The price is a copy of the decoder weights per forward (torch.stack), a few percent of a
# compute-bound CPU step and negligible on a GPU.


def _stacked(modules: Sequence[nn.Module], name: str) -> torch.Tensor:
    return torch.stack([getattr(module, name) for module in modules])


# the floating dtypes autocast casts to its lower precision (it leaves float64 alone)
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


class _StagedLinear(torch.autograd.Function):
    """y[s] = x[s] w[s]^T + b[s] for x (S, M, in), w (S, out, in), b (S, out).

    Written out because autograd's ``baddbmm(b, x, w.mT)`` returns the weight gradient in the transposed (S, in, out)
    layout: each stage's slice then reaches its ``nn.Linear.weight`` as a strided view that AccumulateGrad copies
    (a strided add per parameter and step, which made the batched decoders slower than the per-stage ones on the
    CPU). Here the weight gradient is ``g^T x``, in the weight's own layout. Under autocast the products run in the
    autocast dtype, as ``F.linear``'s do; each gradient is returned in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        device = x.device.type
        inputs = (x.dtype, weight.dtype, bias.dtype)
        if torch.is_autocast_enabled(device) and all(t in _AUTOCAST_ELIGIBLE for t in inputs):
            dtype = torch.get_autocast_dtype(device)
        elif len(set(inputs)) == 1:
            dtype = x.dtype
        else:  # as F.linear: no silent casts of what autocast would not cast either
            raise ValueError(f"staged linear: input {x.dtype}, weight {weight.dtype} and bias {bias.dtype} differ "
                             "(autocast casts only float16/bfloat16/float32 inputs)")
        ctx.input_dtypes = inputs
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        ctx.save_for_backward(x, weight)
        with torch.autocast(device, enabled=False):
            return torch.baddbmm(bias.unsqueeze(1), x, weight.mT)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        x_dtype, weight_dtype, bias_dtype = ctx.input_dtypes
        grad_x = torch.bmm(grad, weight).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.mT, x).to(weight_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1).to(bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def _linear(x: torch.Tensor, linears: Sequence[nn.Linear]) -> torch.Tensor:
    """(S, M, in) -> (S, M, out): stage s through ``linears[s]``."""
    return _StagedLinear.apply(x, _stacked(linears, "weight"), _stacked(linears, "bias"))


def _layer_norm(x: torch.Tensor, norms: Sequence[nn.LayerNorm]) -> torch.Tensor:
    """(S, M, d) -> (S, M, d): stage s normalised with ``norms[s]``'s affine parameters."""
    weight, bias = _stacked(norms, "weight").unsqueeze(1), _stacked(norms, "bias").unsqueeze(1)
    return torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], eps=norms[0].eps), weight)


def _attention(attns: Sequence[CrossAttention], x: torch.Tensor, memory: torch.Tensor, batch: int,
               training: bool) -> torch.Tensor:
    """Queries x (S, B*C, d) attend to memory (S, B*N, d), stage by stage -> (S, B*C, d)."""
    first = attns[0]
    stages, rows, dim = x.shape

    def heads(t: torch.Tensor) -> torch.Tensor:  # (S, B*L, d) -> (S*B, heads, L, head_dim)
        return t.view(stages * batch, -1, first.heads, first.head_dim).transpose(1, 2)

    q = heads(_linear(x, [a.q for a in attns]))
    k = heads(_linear(memory, [a.k for a in attns]))
    v = heads(_linear(memory, [a.v for a in attns]))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=first.attn_dropout if training else 0.0)
    return _linear(out.transpose(1, 2).reshape(stages, rows, dim), [a.proj for a in attns])


def _layer(layers: Sequence[DecoderLayer], x: torch.Tensor, memory: torch.Tensor, batch: int,
           training: bool) -> torch.Tensor:
    """:meth:`DecoderLayer.forward` of every stage at once."""
    first = layers[0]
    attended = _attention([layer.multihead_attn for layer in layers], x, memory, batch, training)
    x = _layer_norm(x + F.dropout(attended, first.dropout2.p, training), [layer.norm2 for layer in layers])
    hidden = F.dropout(F.relu(_linear(x, [layer.linear1 for layer in layers])), first.dropout.p, training)
    ffn = _linear(hidden, [layer.linear2 for layer in layers])
    return _layer_norm(x + F.dropout(ffn, first.dropout3.p, training), [layer.norm3 for layer in layers])


def run_each_stage(decoders: Sequence[CascadeDecoder], queries: torch.Tensor,
                   memories: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`run_stages` the plain way, one decoder call per stage: what it is tested and benchmarked against."""
    pairs = [decoder(queries[s], memories[s]) for s, decoder in enumerate(decoders)]
    return torch.stack([q for q, _ in pairs]), torch.stack([k for _, k in pairs])


def run_stages(decoders: Sequence[CascadeDecoder], queries: torch.Tensor,
               memories: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``decoders[s](queries[s], memories[s])`` for every stage s, batched over stages.

    queries (S, B, C, d), memories (S, B, N, d) -> (q (S, B, C, d), k (S, B, N, d)) of each decoder's last layer.
    The decoders must share their structure (layer count, heads, dropout rates, norm eps; the head builds them so)
    and their training mode: the first decoder's heads, rates and eps are used for all (layer count and mode are
    checked).
    """
    if queries.dim() != 4 or memories.dim() != 4 or queries.shape[:2] != memories.shape[:2] \
            or queries.shape[0] != len(decoders):
        raise ValueError(
            f"expected queries (S, B, C, d) and memories (S, B, N, d) for S={len(decoders)} decoders, got "
            f"{tuple(queries.shape)} and {tuple(memories.shape)}"
        )
    training = decoders[0].training
    if any(d.training != training or len(d.layers) != len(decoders[0].layers) for d in decoders):
        raise ValueError(
            "run_stages needs decoders of one structure and mode; got training "
            f"{[d.training for d in decoders]}, layers {[len(d.layers) for d in decoders]}"
        )
    stages, batch, classes, dim = queries.shape
    pixels = memories.shape[2]
    x, memory = queries.reshape(stages, batch * classes, dim), memories.reshape(stages, batch * pixels, dim)
    for depth in range(len(decoders[0].layers) - 1):
        x = _layer([decoder.layers[depth] for decoder in decoders], x, memory, batch, training)
    last = [decoder.layers[-1].multihead_attn for decoder in decoders]
    q = _linear(x, [a.q for a in last]).view(stages, batch, classes, dim)
    k = _linear(memory, [a.k for a in last]).view(stages, batch, pixels, dim)
    return q, k
