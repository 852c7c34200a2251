"""Family ``event_transformer``: a masked transformer autoencoder on events as sets of physics objects.

An event is a padded list of objects (``x`` (B, N, F) = pt, eta, phi, b-tag, ...,
already standardized per feature; ``mask`` (B, N) real = True). With
``object_embedding="slot"`` (default) every slot of the list gets a learned
embedding: in a file whose slots hold fixed kinds of object (``event_objects``:
lepton, missing pT, jet 1..4 by pT; a HIGGS-style list) it tells the model what
each object is, and a hidden object's mask token says what to reconstruct (a
mask token alone cannot tell a lepton from a jet). ``"none"`` treats the list as
an unordered set: the encoder is then permutation equivariant and the task heads
permutation invariant. Padding is excluded
from every attention through a key mask, so it never changes a real event's
outputs (padded features are also zeroed before the embedding).

Encoder (``self.encoder``; its state-dict keys ``encoder.*`` carry pretraining over)::

    x (B, N, F) -> Linear(F, D) -> LayerNorm(D) [+ slot (N, D)]   tokens (B, N, D)
                -> depth x pre-norm Block(self-attn, MLP) -> LayerNorm   (B, N, D)

Task heads: every task ``t`` in ``tasks`` owns ``task_queries`` learned queries
(``query_sharing="per_task"``; ``"shared"``: one set of ``task_queries`` that every
task reads, the baseline a per-task query is measured against);
all queries (Q = n_tasks * task_queries, or task_queries shared) go together through
``head_depth`` pre-norm decoder layers::

    queries (B, Q, D) -> [self-attn among all queries (head_mixing)]   task heads exchange information
                      -> cross-attn to the object tokens (B, N, D)       padding masked
                      -> MLP                                             (B, Q, D)
    per task: mean over its own (or the shared) queries (B, D) -> Linear -> (B, n_t)
    outputs = concat over tasks, in ``tasks`` order                     (B, num_outputs)

``head_mixing=False`` drops the query self-attention: each query then only reads
the objects, so the tasks' heads are independent.

Masked-object pretraining (``forward(x, mask, pretrain=True)`` -> 0-dim loss), BERT style:
per event, ``ceil(mask_ratio * n_real)`` real objects are hidden (at least 1 when
the event has a real object, at most ``n_real - 1`` when it has 2 or more, so
something stays visible). Their tokens are replaced by a learned mask token (plus the slot embedding; the
set keeps its size), the encoder runs, and a small decoder (``decoder_depth``
blocks, then Linear(D, F)) reconstructs every token's input features; the loss
is the MSE over the hidden real objects only. Events without real objects add
nothing; a batch without any gives loss 0 (never NaN).

``finetune="linear"`` detaches the encoder's tokens before the task heads, so
only the heads (queries, decoder layers, per-task Linear) learn.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainables.layers.vit_common import heads_multiple
from trainables.registry import Capabilities, register_family


class EventTransformerParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    embed_dim: int = Field(default=64, ge=8)
    """Token width; rounded up to a multiple of num_heads."""
    depth: int = Field(default=3, ge=1)
    """Encoder blocks."""
    num_heads: int = Field(default=4, ge=1)
    mlp_ratio: float = Field(default=2.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout in attention weights, projections and MLPs (encoder, heads and decoder)."""
    task_queries: int = Field(default=1, ge=1)
    """Learned query vectors per task; a task's output is read from the mean of its queries."""
    head_depth: int = Field(default=1, ge=1)
    """Decoder layers the task queries go through (query self-attention, cross-attention, MLP)."""
    head_mixing: bool = True
    """Self-attention among all tasks' queries (True: heads exchange information; False: independent heads)."""
    mask_ratio: float = Field(default=0.3, gt=0, lt=1)
    """Fraction of an event's real objects hidden during pretraining (rounded up)."""
    decoder_depth: int = Field(default=1, ge=0)
    """Transformer blocks of the pretraining decoder before its Linear output (0 = Linear only)."""
    pretrain_epochs: int = Field(default=2, ge=0)
    """Epochs of masked-object pretraining the loop runs before fine-tuning (0 = none)."""
    object_embedding: Literal["slot", "type", "none"] = "slot"
    """``slot``: a learned embedding per position of the object list, added to each object's token and to the
    mask token that hides it (what kind of object it is, where the file's slots hold fixed kinds); ``type``: one
    embedding per object type of the file's ``object_type`` dataset (slots of one type share it: the four jets),
    each slot its own type when the file has none; ``none``: the list is an unordered set (permutation
    equivariant)."""
    query_sharing: Literal["per_task", "shared"] = "per_task"
    """``per_task``: each task reads its own ``task_queries`` queries; ``shared``: every task reads the same ones."""
    recon_loss: Literal["mse", "per_feature"] = "mse"
    """Pretraining loss of the hidden objects: ``mse`` over the standardized features; ``per_feature`` a loss
    suited to each (log pT, periodic phi, b-tag as a class; trainables/layers/object_recon.py), for files whose
    features are named (the event_objects / HIGGS layout), MSE for the others."""
    finetune: Literal["full", "linear"] = "full"
    """``full``: the encoder learns too; ``linear``: encoder tokens are detached (probe: only the heads learn)."""


# --------------------------------------------------------------------------- building blocks
class Attention(nn.Module):
    """Multi-head attention of queries (B, Nq, D) over a context (B, Nk, D) with a key mask (B, Nk)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = dropout
        self.proj_drop = nn.Dropout(dropout)

    def weights(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention weights ``forward`` applies (without dropout), averaged over heads: (B, Nq, Nk), rows
        sum to 1 over the keys, masked keys get 0."""
        B, Nq, D = x.shape
        Nk = context.shape[1]
        h = self.num_heads
        q = self.q(x).reshape(B, Nq, h, D // h).transpose(1, 2)                 # (B, h, Nq, d)
        k = self.kv(context).reshape(B, Nk, 2, h, D // h)[:, :, 0].transpose(1, 2)  # (B, h, Nk, d)
        logits = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D // h)  # (B, h, Nq, Nk)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
        return logits.softmax(-1).mean(1)                                       # (B, Nq, Nk)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, Nq, D = x.shape
        Nk = context.shape[1]
        h = self.num_heads
        q = self.q(x).reshape(B, Nq, h, D // h).transpose(1, 2)                 # (B, h, Nq, d)
        k, v = self.kv(context).reshape(B, Nk, 2, h, D // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, Nk, d)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]   # (B, 1, 1, Nk), True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, Nq, D)))  # (B, Nq, D)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float, dropout: float = 0.0):
        hidden = max(1, int(dim * mlp_ratio))
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class Block(nn.Module):
    """Pre-norm transformer block over a set: x + SelfAttn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)                                                       # (B, N, D)
        x = x + self.attn(h, h, key_mask)
        return x + self.mlp(self.norm2(x))                                      # (B, N, D)


class QueryBlock(nn.Module):
    """Pre-norm decoder layer for task queries: [query self-attn], cross-attn to the objects, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0, mixing: bool = True):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim) if mixing else None
        self.self_attn = Attention(dim, num_heads, dropout) if mixing else None
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio, dropout)

    def forward(self, q: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor,
                record: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``record``: a list that gets this layer's cross-attention weights (B, Q, N), head-averaged."""
        if self.self_attn is not None and self.norm_self is not None:           # all tasks' queries mix
            h = self.norm_self(q)                                               # (B, Q, D)
            q = q + self.self_attn(h, h)
        hq, hk = self.norm_q(q), self.norm_kv(tokens)
        if record is not None:
            record.append(self.cross_attn.weights(hq, hk, key_mask))
        q = q + self.cross_attn(hq, hk, key_mask)                               # (B, Q, D)
        return q + self.mlp(self.norm_mlp(q))                                   # (B, Q, D)


class ObjectEncoder(nn.Module):
    """Embedding + transformer blocks: objects (B, N, F) -> tokens (B, N, D)."""

    slot_type: torch.Tensor

    def __init__(self, n_features: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, dropout: float,
                 n_slots: int = 0, slot_types: list[int] | None = None):
        super().__init__()
        # LayerNorm after the Linear, not on the raw features: a LayerNorm across a handful of
        # heterogeneous, already standardized features would discard each object's mean and scale.
        self.embed = nn.Sequential(nn.Linear(n_features, dim), nn.LayerNorm(dim))
        # one row per slot, or per object type (slots of a type share a row): (N or T, D), or none
        n_rows = max(slot_types) + 1 if slot_types else n_slots
        self.slot = nn.Parameter(torch.randn(n_rows, dim) * 0.02) if n_slots else None
        self.register_buffer("slot_type", torch.as_tensor(slot_types if slot_types else range(n_slots), dtype=torch.long),
                             persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def embed_objects(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.with_slot(self.embed(x * mask.unsqueeze(-1).to(x.dtype)))  # (B, N, D), padding zeroed first

    def with_slot(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) plus each slot's embedding (unchanged without one)."""
        return tokens if self.slot is None else tokens + self.slot[self.slot_type].to(tokens.dtype)

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            tokens = blk(tokens, key_mask)
        return self.norm(tokens)                                                # (B, N, D)


def attend_mask(mask: torch.Tensor) -> torch.Tensor:
    """Key mask (B, N): the real objects; an event without any attends to its (zeroed) padding instead of NaN."""
    return mask | ~mask.any(dim=1, keepdim=True)


def hidden_counts(n_real: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Objects to hide per event: ceil(ratio * n), >= 1 if n >= 1, <= n - 1 if n >= 2, 0 if n == 0."""
    # the epsilon keeps float error from rounding e.g. 0.3 * 10 = 3.0000000000000004 up to 4
    k = torch.ceil(n_real.to(torch.float64) * mask_ratio - 1e-9).long().clamp_min(1)
    return torch.minimum(k, (n_real - 1).clamp_min(1)).minimum(n_real)


# --------------------------------------------------------------------------- model
class EventTransformer(nn.Module):
    def __init__(self, p: EventTransformerParams, n_features: int, tasks: dict[str, int], n_objects: int = 0,
                 feature_stats: tuple[list[float] | None, list[float] | None] = (None, None),
                 slot_types: list[int] | None = None):
        super().__init__()
        dim = heads_multiple(p.embed_dim, p.num_heads)
        self.tasks = dict(tasks)
        self.task_queries = p.task_queries
        self.mask_ratio = p.mask_ratio
        self.linear_probe = p.finetune == "linear"
        types = slot_types if p.object_embedding == "type" and slot_types and len(slot_types) == n_objects else None
        self.encoder = ObjectEncoder(n_features, dim, p.depth, p.num_heads, p.mlp_ratio, p.dropout,
                                     n_objects if p.object_embedding != "none" else 0, types)
        # task heads
        self.shared = p.query_sharing == "shared" and len(self.tasks) > 1
        n_q = p.task_queries * (1 if self.shared else len(self.tasks))
        self.queries = nn.Parameter(torch.randn(n_q, dim) * 0.02)              # (Q, D), task t owns a slice
        self.head_blocks = nn.ModuleList(QueryBlock(dim, p.num_heads, p.mlp_ratio, p.dropout, p.head_mixing)
                                         for _ in range(p.head_depth))
        self.head_norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, n) for t, n in self.tasks.items()})
        # masked-object pretraining
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)                # (D,)
        self.decoder = nn.ModuleList(Block(dim, p.num_heads, p.mlp_ratio, p.dropout) for _ in range(p.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim)
        self.reconstruct = nn.Linear(dim, n_features)
        self.feature_losses = None
        if p.recon_loss == "per_feature":
            from trainables.data.object_names import slot_names
            from trainables.layers.object_recon import FeatureLosses

            self.feature_losses = FeatureLosses(slot_names(max(1, n_objects), n_features)[1], *feature_stats)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Objects (B, N, F), mask (B, N) -> encoder tokens (B, N, D)."""
        mask = mask.bool()
        return self.encoder(self.encoder.embed_objects(x, mask), attend_mask(mask))

    def forward_heads(self, tokens: torch.Tensor, mask: torch.Tensor,
                      record: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Tokens (B, N, D) -> outputs (B, num_outputs), one column block per task. ``record`` gets each
        head layer's cross-attention weights (B, Q, N)."""
        key_mask = attend_mask(mask.bool())
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)          # (B, Q, D)
        for blk in self.head_blocks:
            q = blk(q, tokens, key_mask, record)
        q = self.head_norm(q)
        if self.shared:                                                        # every task reads the same queries
            pooled = q.mean(dim=1, keepdim=True).expand(-1, len(self.tasks), -1)  # (B, T, D)
        else:
            pooled = q.unflatten(1, (len(self.tasks), self.task_queries)).mean(dim=2)  # (B, T, D)
        return torch.cat([head(pooled[:, i]) for i, head in enumerate(self.heads.values())], dim=-1)

    def sample_hidden(self, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random objects to hide (B, N) bool: ``hidden_counts`` real objects per event, never padding.
        ``generator`` (any device): a reproducible draw (validation), else the global RNG."""
        mask = mask.bool()
        k = hidden_counts(mask.sum(dim=1), self.mask_ratio)                   # (B,)
        if generator is None:
            score = torch.rand(mask.shape, device=mask.device)
        else:
            score = torch.rand(mask.shape, generator=generator, device=generator.device).to(mask.device)
        score = score.masked_fill(~mask, 2.0)                                  # padding sorts last
        rank = score.argsort(dim=1).argsort(dim=1)                            # (B, N) rank of each object
        return (rank < k.unsqueeze(1)) & mask

    def reconstruct_hidden(self, x: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Hide objects (B, N), encode, decode: predicted input features (B, N, F) for every position."""
        mask = mask.bool()
        key_mask = attend_mask(mask)
        tokens = self.encoder.embed_objects(x, mask)                           # (B, N, D)
        masked = self.encoder.with_slot(self.mask_token.to(tokens.dtype).expand_as(tokens))  # what each hides
        tokens = torch.where(hidden.unsqueeze(-1), masked, tokens)
        h = self.encoder(tokens, key_mask)
        for blk in self.decoder:
            h = blk(h, key_mask)
        return self.reconstruct(self.decoder_norm(h))                          # (B, N, F)

    def pretrain_loss(self, x: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between reconstructed and true features over the hidden real objects (0-dim)."""
        mask = mask.bool()
        hidden = self.sample_hidden(mask) if hidden is None else hidden.bool() & mask
        pred = self.reconstruct_hidden(x, mask, hidden)                       # (B, N, F)
        fl = self.feature_losses
        err = fl.loss(pred, x) if fl is not None else (pred - x).pow(2).mean(dim=-1)  # (B, N)
        w = hidden.to(err.dtype)
        return (err * w).sum() / w.sum().clamp_min(1.0)                       # 0 (with grads) when nothing hidden

    def query_labels(self) -> list[str]:
        """One label per task query, in the order of ``task_attention``'s Q axis: ``<task>`` or ``<task> q<i>``."""
        tasks = ["shared"] if self.shared else list(self.tasks)
        if self.task_queries == 1:
            return tasks
        return [f"{t} q{i + 1}" for t in tasks for i in range(self.task_queries)]

    @torch.no_grad()
    def task_attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Objects (B, N, F), mask (B, N) -> (B, Q, N): the attention weight each task query gives each object,
        averaged over attention heads and over the ``head_depth`` layers (each row sums to 1 over the real
        objects; padding gets 0). The model is run in eval mode (no dropout) and left as it was."""
        was = self.training
        self.eval()
        try:
            rec: list[torch.Tensor] = []
            self.forward_heads(self.encode(x, mask), mask, rec)
        finally:
            self.train(was)
        return torch.stack(rec).mean(0)                                       # (B, Q, N)

    @torch.no_grad()
    def masked_errors(self, x: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Squared reconstruction errors (B, N, F), in the units of ``x`` (standardized features) squared, of
        the objects ``hidden`` (B, N) hides (real ones only; every other position 0). Eval mode, left as it was."""
        was = self.training
        self.eval()
        try:
            hidden = hidden.bool() & mask.bool()
            pred = self.reconstruct_hidden(x, mask, hidden)                    # (B, N, F)
        finally:
            self.train(was)
        if self.feature_losses is not None:  # back to standardized inputs: comparable with the MSE form
            return self.feature_losses.errors(pred, x) * hidden.unsqueeze(-1)
        return (pred.float() - x.float()).pow(2) * hidden.unsqueeze(-1)        # (B, N, F)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pretrain: bool = False) -> torch.Tensor:
        if pretrain:
            return self.pretrain_loss(x, mask)
        tokens = self.encode(x, mask)                                         # (B, N, D)
        if self.linear_probe:
            tokens = tokens.detach()
        return self.forward_heads(tokens, mask)                               # (B, num_outputs)


@register_family("event_transformer", params=EventTransformerParams,
                 capabilities=Capabilities(inputs="objects", task_heads=True, pretraining=True, task_attention=True,
                                           masked_objects=True))
def build_event_transformer(p: EventTransformerParams, *, n_objects: int, n_features: int, num_outputs: int,
                            tasks: dict[str, int] | None = None,
                            feature_stats: tuple[list[float] | None, list[float] | None] = (None, None),
                            slot_types: list[int] | None = None) -> nn.Module:
    """Masked-object transformer autoencoder on events as object sets, with cross-attention task heads."""
    tasks = dict(tasks) if tasks else {"out": num_outputs}
    if sum(tasks.values()) != num_outputs:
        raise ValueError(f"tasks {tasks} give {sum(tasks.values())} outputs, expected {num_outputs}")
    return EventTransformer(p, n_features, tasks, n_objects, feature_stats, slot_types)
