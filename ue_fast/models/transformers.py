"""ViT-small and CaiT-small: the two transformer victims of APBench.

Follows APBench (lafeat/apbench) ``nets/vit_small.py`` (``Vit_cifar``: lucidrains'
ViT for small data sets, with shifted patch tokenisation, SPT, and locality
self-attention, LSA) and ``nets/cait_small.py`` (``Cait_cifar``: lucidrains'
CaiT, class-attention layers after the patch layers, talking heads, LayerScale,
layer dropout). Sizes as there:

- ``vit-small``: patch 4, width 512, depth 6, 8 heads of 64, MLP 512, dropout 0.1
  (embedding and blocks), class-token pooling; 9.6 M parameters for 10 classes.
- ``cait-small``: patch 4, width 512, 6 patch layers + 2 class-attention layers,
  6 heads of 64, MLP 256, dropout 0.1, layer dropout 0.05; 8.3 M parameters.

Above 64 px the patch is 16 (the MI-UE authors' ViT on ImageNet-100,
``evaluation_sl.py``), the transformers' counterpart of the CNNs' ImageNet stem.

Differences from the sources, and why:

- The images are normalised inside the model (``Normalize``), as every model here:
  a perturbation bound stays a bound in pixel space. APBench feeds [0, 1] tensors.
- Inputs of any size: an image whose sides are not multiples of the patch is
  zero-padded on the right and bottom, and the position embedding (learnt for
  ``image_size``) is resized bicubically to another grid. The sources assert one size.
- Layer dropout (CaiT) acts in training only; lucidrains' ``dropout_layers`` also
  drops layers at test time, so that a test accuracy there is a random variable.
- Locality self-attention's diagonal mask is ``-inf`` through
  ``scaled_dot_product_attention`` (the source fills ``-finfo.max``: the same softmax).
- ``forward`` returns ``(features, logits)``; the features are the class token after
  the head's LayerNorm, the input of the last linear layer.

Training recipe (``ue_fast.models.RECIPES``): AdamW, lr 1e-3, weight decay 0.05,
cosine. APBench's ``train.py`` trains both with ``optim.Adam(lr=args.lr)`` and no
weight decay, at an ``--lr`` its scripts pass; SGD at 0.1, the CNNs' recipe, does
not train them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import Normalize


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] (H, W multiples of p) -> [N, (H/p)(W/p), p*p*C], each patch's pixels
    row by row with the channels innermost (the einops pattern ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def _pad_to(x: torch.Tensor, p: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % p, -w % p
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def _resized_grid(pos: torch.Tensor, grid: int, h: int, w: int) -> torch.Tensor:
    """pos [1, grid*grid, D] -> [1, h*w, D], bicubic on the grid (identity when it fits)."""
    if h == grid and w == grid:
        return pos
    d = pos.shape[-1]
    g = pos.reshape(1, grid, grid, d).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(h, w), mode="bicubic", align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(1, h * w, d)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class LSA(nn.Module):
    """Locality self-attention: a learnt temperature, and no token attends to itself."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.temperature = nn.Parameter(torch.tensor(math.log(dim_head ** -0.5)))
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # each [B, h, n, d]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x.device)
        q = q * self.temperature.exp().to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=off_diagonal, scale=1.0)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class SPT(nn.Module):
    """Shifted patch tokenisation: the image and its four half-patch diagonal shifts (by one pixel, as the
    source), stacked on channels, cut into patches, LayerNorm, linear."""

    def __init__(self, dim: int, patch: int, channels: int = 3):
        super().__init__()
        self.patch = patch
        patch_dim = patch * patch * 5 * channels
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)

    def forward(self, x):
        shifts = ((1, -1, 0, 0), (-1, 1, 0, 0), (0, 0, 1, -1), (0, 0, -1, 1))
        x = torch.cat([x] + [F.pad(x, s) for s in shifts], dim=1)
        return self.proj(self.norm(_patchify(x, self.patch)))


class _PatchClassifier(nn.Module):
    """What ViT and CaiT share: the head (LayerNorm, linear) and the input's way to a patch grid."""

    def _head(self, dim: int, num_classes: int) -> None:
        self.head_norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        self.feature_dim = dim

    def _grid(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Normalised, zero-padded to whole patches; with the grid's height and width."""
        x = _pad_to(self.normalize(x), self.patch)
        return x, x.shape[-2] // self.patch, x.shape[-1] // self.patch

    def forward(self, x):
        features = self.forward_features(x)
        return features, self.fc(features)


class ViT(_PatchClassifier):
    """ViT for small data sets (SPT + LSA), class-token pooling.

    forward(x [N, 3, H, W] in [0, 1]) -> (features [N, dim], logits [N, num_classes]).
    """

    def __init__(self, num_classes: int = 10, *, image_size: int = 32, patch: int = 4, dim: int = 512, depth: int = 6,
                 heads: int = 8, dim_head: int = 64, mlp_dim: int = 512, dropout: float = 0.1,
                 emb_dropout: float = 0.1):
        super().__init__()
        self.normalize = Normalize()
        self.patch = patch
        self.grid = -(-image_size // patch)
        self.to_patch_embedding = SPT(dim, patch)
        self.pos_embedding = nn.Parameter(torch.randn(1, self.grid * self.grid + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(dim, LSA(dim, heads, dim_head, dropout)), PreNorm(dim, FeedForward(dim, mlp_dim,
                                                                                                       dropout))])
            for _ in range(depth))
        self._head(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self._grid(x)
        tokens = self.to_patch_embedding(x)
        pos = self.pos_embedding
        pos = torch.cat([pos[:, :1], _resized_grid(pos[:, 1:], self.grid, h, w)], dim=1)
        x = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + pos
        x = self.dropout(x)
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.head_norm(x[:, 0])


class TalkingHeadAttention(nn.Module):
    """CaiT's attention: queries from x, keys and values from x and the context, heads mixed by learnt
    [h, h] matrices before and after the softmax."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.mix_heads_pre_attn = nn.Parameter(torch.randn(heads, heads))
        self.mix_heads_post_attn = nn.Parameter(torch.randn(heads, heads))
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        b, n, _ = x.shape
        ctx = x if context is None else torch.cat((x, context), dim=1)
        q = self.to_q(x).reshape(b, n, self.heads, -1).transpose(1, 2)  # [B, h, n, d]
        k, v = self.to_kv(ctx).reshape(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        dots = (q @ k.transpose(-1, -2)) * self.scale  # [B, h, n, m]
        dots = torch.einsum("bhij,hg->bgij", dots, self.mix_heads_pre_attn.to(dots.dtype))
        attn = torch.einsum("bhij,hg->bgij", dots.softmax(-1), self.mix_heads_post_attn.to(dots.dtype))
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class LayerScale(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, depth: int):
        super().__init__()
        eps = 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6  # the CaiT paper's section 2
        self.scale = nn.Parameter(torch.full((1, 1, dim), eps))
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(x, **kwargs) * self.scale


class CaiTStack(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float,
                 layer_dropout: float):
        super().__init__()
        self.layer_dropout = layer_dropout
        self.layers = nn.ModuleList(
            nn.ModuleList([LayerScale(dim, PreNorm(dim, TalkingHeadAttention(dim, heads, dim_head, dropout)), i + 1),
                           LayerScale(dim, PreNorm(dim, FeedForward(dim, mlp_dim, dropout)), i + 1)])
            for i in range(depth))

    def forward(self, x, context=None):
        layers = list(self.layers)
        if self.training and self.layer_dropout > 0:
            drop = torch.rand(len(layers)) < self.layer_dropout
            if bool(drop.all()):  # keep at least one layer, as the source does
                drop[torch.randint(len(layers), ())] = False
            layers = [layer for layer, d in zip(layers, drop.tolist()) if not d]
        for attn, ff in layers:
            x = attn(x, context=context) + x
            x = ff(x) + x
        return x


class CaiT(_PatchClassifier):
    """CaiT: self-attention over patches, then class-attention layers where the class token attends to them.

    forward(x [N, 3, H, W] in [0, 1]) -> (features [N, dim], logits [N, num_classes]).
    """

    def __init__(self, num_classes: int = 10, *, image_size: int = 32, patch: int = 4, dim: int = 512, depth: int = 6,
                 cls_depth: int = 2, heads: int = 6, dim_head: int = 64, mlp_dim: int = 256, dropout: float = 0.1,
                 emb_dropout: float = 0.1, layer_dropout: float = 0.05):
        super().__init__()
        self.normalize = Normalize()
        self.patch = patch
        self.grid = -(-image_size // patch)
        self.to_patch_embedding = nn.Linear(3 * patch * patch, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, self.grid * self.grid, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.patch_transformer = CaiTStack(dim, depth, heads, dim_head, mlp_dim, dropout, layer_dropout)
        self.cls_transformer = CaiTStack(dim, cls_depth, heads, dim_head, mlp_dim, dropout, layer_dropout)
        self._head(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self._grid(x)
        x = self.to_patch_embedding(_patchify(x, self.patch)) + _resized_grid(self.pos_embedding, self.grid, h, w)
        x = self.patch_transformer(self.dropout(x))
        cls = self.cls_transformer(self.cls_token.expand(len(x), -1, -1), context=x)
        return self.head_norm(cls[:, 0])


def _patch(image_size: int) -> int:
    return 16 if image_size > 64 else 4


def vit_small(num_classes: int = 10, image_size: int = 32) -> ViT:
    """APBench's ``Vit_cifar`` (patch 16 above 64 px)."""
    return ViT(num_classes, image_size=image_size, patch=_patch(image_size))


def cait_small(num_classes: int = 10, image_size: int = 32) -> CaiT:
    """APBench's ``Cait_cifar`` (patch 16 above 64 px)."""
    return CaiT(num_classes, image_size=image_size, patch=_patch(image_size))
