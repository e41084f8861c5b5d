"""UniAD's reconstruction network (You et al., "A Unified Model for Multi-class Anomaly Detection",
NeurIPS 2022, Sec. 3, Fig. 3), written after the official zhiyuanyou/UniAD
models/reconstructions/uniad.py and models/necks/mfcn.py:

* ``align_features`` (MFCN neck, Sec. 3 "feature extraction"): every backbone stage resized to one
  grid (stride 16) with bilinear interpolation (align_corners=True, nn.UpsamplingBilinear2d) and
  concatenated along channels.
* ``feature_jitter`` (Sec. 3, "feature jittering"): D ~ N(0, (alpha * ||f|| / C)^2) added to every token with
  probability p during training (alpha = 20, p = 1).
* ``neighbor_mask`` (Sec. 3, "neighbor masked attention"): each query may not attend to the keys inside its own
  h×w neighbourhood (7×7), in the encoder's self-attention and both attentions of the decoder.
* ``UniADNet``: a linear projection C -> 256, a learned 2-D position embedding, the Neighbor Masked
  Encoder (4 post-norm layers), the Layer-wise Query Decoder (4 layers, each with its own learned
  query embedding that first attends to the encoder output and then to the previous layer's
  output), a final LayerNorm and a projection 256 -> C (Sec. 3, Fig. 3).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def align_features(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """MFCN: each B×C_i×h_i×w_i map bilinearly resized (align_corners=True) to ``size``, concatenated."""
    out = [m if tuple(m.shape[-2:]) == tuple(size) else
           F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in maps]
    return torch.cat(out, dim=1)


def feature_jitter(tokens: torch.Tensor, scale: float, prob: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Feature jittering: tokens (L×B×C) + N(0, 1) * scale * ||token||_2 / C, applied with probability ``prob``."""
    if scale <= 0 or prob <= 0:
        return tokens
    draw = torch.rand((), generator=generator, device=tokens.device).item()
    if draw > prob:
        return tokens
    norms = tokens.norm(dim=2, keepdim=True) / tokens.shape[2]
    noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
    return tokens + noise * norms * scale


def neighbor_mask(h: int, w: int, neighbor: Sequence[int], device=None) -> torch.Tensor:
    """(h·w)×(h·w) bool attention mask, True = masked: the keys within the query's neighbourhood
    (rows i - hm//2 .. i + hm//2, columns j - wm//2 .. j + wm//2, itself included)."""
    hm, wm = int(neighbor[0]), int(neighbor[1])
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    near = ((yy[:, None] - yy[None, :]).abs() <= hm // 2) & ((xx[:, None] - xx[None, :]).abs() <= wm // 2)
    if near.all(dim=1).any():
        raise ValueError(f"uniad: a {hm}x{wm} neighbour mask covers the whole {h}x{w} feature grid, so some "
                         f"positions could attend to nothing; use a larger image or a smaller neighbor_size")
    return near


class LearnedPositionEmbedding(nn.Module):
    """Row / column embeddings (uniform init), concatenated as [column, row]: (h·w)×dim."""

    def __init__(self, h: int, w: int, dim: int):
        super().__init__()
        self.h, self.w = h, w
        self.row_embed = nn.Embedding(h, dim // 2)
        self.col_embed = nn.Embedding(w, dim - dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> torch.Tensor:
        x = self.col_embed.weight[None].expand(self.h, -1, -1)       # h×w×d/2
        y = self.row_embed.weight[:, None].expand(-1, self.w, -1)    # h×w×d/2
        return torch.cat([x, y], dim=-1).flatten(0, 1)


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; positions are added to queries and keys only."""

    def __init__(self, dim: int, nhead: int, ff: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(dim, ff), nn.Linear(ff, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop, self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src, pos, mask):
        q = k = src + pos
        src = self.norm1(src + self.drop1(self.self_attn(q, k, value=src, attn_mask=mask)[0]))
        return self.norm2(src + self.drop2(self.linear2(self.drop(F.relu(self.linear1(src))))))


class QueryDecoderLayer(nn.Module):
    """Layer-wise query decoder layer (Sec. 3): a learned query embedding attends to the encoder
    output (``memory``), then to the previous decoder output (``out``), then a feed-forward block."""

    def __init__(self, n_queries: int, dim: int, nhead: int, ff: int, dropout: float):
        super().__init__()
        self.learned_embed = nn.Embedding(n_queries, dim)
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(dim, ff), nn.Linear(ff, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, out, memory, pos, mask1, mask2):
        tgt = self.learned_embed.weight[:, None].expand(-1, memory.shape[1], -1)
        a = self.self_attn(tgt + pos, memory + pos, value=memory, attn_mask=mask1)[0]
        tgt = self.norm1(tgt + self.drop1(a))
        a = self.multihead_attn(tgt + pos, out + pos, value=out, attn_mask=mask2)[0]
        tgt = self.norm2(tgt + self.drop2(a))
        return self.norm3(tgt + self.drop3(self.linear2(self.drop(F.relu(self.linear1(tgt))))))


class UniADNet(nn.Module):
    """features B×C×h×w -> reconstructed features B×C×h×w (Fig. 3)."""

    def __init__(self, channels: int, h: int, w: int, hidden_dim: int = 256, nhead: int = 8,
                 num_encoder_layers: int = 4, num_decoder_layers: int = 4, dim_feedforward: int = 1024,
                 dropout: float = 0.1, neighbor_size: Sequence[int] | None = (7, 7),
                 mask_in: Sequence[bool] = (True, True, True)):
        super().__init__()
        self.h, self.w = h, w
        self.input_proj = nn.Linear(channels, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, channels)
        self.pos_embed = LearnedPositionEmbedding(h, w, hidden_dim)
        enc = EncoderLayer(hidden_dim, nhead, dim_feedforward, dropout)
        dec = QueryDecoderLayer(h * w, hidden_dim, nhead, dim_feedforward, dropout)
        self.encoder = nn.ModuleList([copy.deepcopy(enc) for _ in range(num_encoder_layers)])
        self.decoder = nn.ModuleList([copy.deepcopy(dec) for _ in range(num_decoder_layers)])
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        mask = neighbor_mask(h, w, neighbor_size) if neighbor_size else None
        self.register_buffer("mask", mask if mask is not None else torch.zeros(0, dtype=torch.bool),
                             persistent=False)
        self.mask_in = tuple(bool(m) for m in mask_in) if mask is not None else (False, False, False)
        # official initializer: xavier_uniform on every Linear weight (attention out-projections
        # included), zero biases; embeddings keep their own init (normal queries, uniform positions)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _mask(self, i: int):
        return self.mask if self.mask_in[i] else None

    def forward(self, feats: torch.Tensor, jitter: tuple[float, float] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        b, c, h, w = feats.shape
        tokens = feats.flatten(2).permute(2, 0, 1)                  # (h·w)×B×C
        if self.training and jitter is not None:
            tokens = feature_jitter(tokens, jitter[0], jitter[1], generator)
        x = self.input_proj(tokens)
        pos = self.pos_embed()[:, None].expand(-1, b, -1)
        for layer in self.encoder:
            x = layer(x, pos, self._mask(0))
        memory, out = x, x
        for layer in self.decoder:
            out = layer(out, memory, pos, self._mask(1), self._mask(2))
        rec = self.output_proj(self.decoder_norm(out))              # (h·w)×B×C
        return rec.permute(1, 2, 0).reshape(b, c, h, w)
