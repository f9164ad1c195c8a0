"""
vit.py: a Vision Transformer (ViT) from scratch, trained on CIFAR-10, FashionMNIST or any
image folder.

What this file teaches, in reading order:
  how an image becomes a sequence (patches, shown as a reshape, and why that is a Conv2d),
  the CLS token, the learned position embedding, pre-norm encoder blocks with multi-head
  self-attention written by hand, the classification head; then a complete training recipe
  (data kept on the device as uint8, augmentation as tensor ops, AdamW, warmup + cosine,
  label smoothing, bf16 autocast) with checkpoints you can resume and evaluate.

Run it:
  python vit.py --epochs 30                           # CIFAR-10 (downloads into ./data)
  python vit.py --dataset fashionmnist --preset cpu   # a laptop CPU, a few minutes
  python vit.py --dataset path/to/folder              # any folder with train/ and test/
  python vit.py --resume runs/X/checkpoint.pth --epochs 40
  python vit.py --eval runs/X/model.pth
  In Colab or Jupyter: paste the whole file into one cell and run it, or call main([...]).

Papers:
  Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929
  Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762

Sections:
  1. Patches                 5. Configuration, presets   9. Benchmark against torchvision
  2. Attention               6. Data on the device      10. Figures
  3. MLP and block           7. Training and evaluation 11. main()
  4. The ViT (CLS, position) 8. Checkpoints (safe to load)

Shape legend:
  B batch, C channels, H, W image height and width, P patch size, N = (H/P)(W/P) patches,
  D = dim (model width), Hd = heads, Dh = D / Hd (width of one head), K classes.
"""
import argparse
import json
import math
import os
import pickle
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, unusable checkpoint): main() prints
    its one-sentence message and exits non-zero instead of showing a traceback."""


# -----------------------------------------------------------------------------------------
# 1. Patches: an image becomes a sequence of tokens
# A Transformer reads a sequence of vectors. ViT cuts the image into non-overlapping P x P
# patches, flattens each into a vector of C*P*P numbers, and projects it linearly to width D:
#   (B, C, H, W) -> (B, N, C*P*P) -> (B, N, D),   N = (H/P) * (W/P)
# The cut is nothing but a reshape and a permute. A Conv2d with kernel = stride = P computes
# exactly the same thing (each output pixel is one patch dotted with the kernel), which is
# how torchvision and timm store this weight, so we keep the weight in a Conv2d (the same
# parameter names) and use it through the reshape, which is the lesson.
# -----------------------------------------------------------------------------------------
def patchify(images, patch_size):
    B, C, H, W = images.shape
    P = patch_size
    x = images.reshape(B, C, H // P, P, W // P, P)                # (B, C, H/P, P, W/P, P)
    x = x.permute(0, 2, 4, 1, 3, 5)                               # (B, H/P, W/P, C, P, P)
    return x.reshape(B, (H // P) * (W // P), C * P * P)           # (B, N, C*P*P)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        patches = patchify(images, self.patch_size)               # (B, N, C*P*P)
        weight = self.proj.weight.flatten(1)                      # (D, C*P*P), same order
        return F.linear(patches, weight, self.proj.bias)          # (B, N, D)


# -----------------------------------------------------------------------------------------
# 2. Multi-head self-attention
#   Attention(Q, K, V) = softmax(Q K^T / sqrt(Dh)) V, in Hd heads of width Dh = D / Hd
# One Linear(D, 3D) computes Q, K and V together; its rows are laid out [Q; K; V] like
# nn.MultiheadAttention.in_proj_weight, so weights map one to one. Every patch attends to
# every patch (no mask: all images have the same number of patches).
# Two paths give the same numbers:
#   fused=False: the hand-written reference below, which also keeps the attention weights
#                for the attention maps;
#   fused=True:  F.scaled_dot_product_attention, which never stores the (N, N) matrix and
#                runs a fused kernel on GPUs (FlashAttention); this is the fast default.
# -----------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim, heads, dropout=0.0, fused=True):
        super().__init__()
        self.heads = heads
        self.d_head = dim // heads
        self.fused = fused
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_weights = None      # the last weights of the hand-written path, for plots

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x)                                         # (B, N, 3D)
        qkv = qkv.view(B, N, 3, self.heads, self.d_head)          # (B, N, 3, Hd, Dh)
        qkv = qkv.permute(2, 0, 3, 1, 4)                          # (3, B, Hd, N, Dh)
        q, k, v = qkv.unbind(0)                                   # (B, Hd, N, Dh) each
        p = self.dropout if self.training else 0.0
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)   # (B, Hd, N, Dh)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)    # (B, Hd, N, N)
            # The softmax runs in float32 at least: under bf16 autocast the scores are
            # bf16, and a float32 softmax is both more exact and, on the CPU, faster.
            exact = torch.promote_types(scores.dtype, torch.float32)
            weights = scores.softmax(dim=-1, dtype=exact).type_as(v)     # rows sum to 1
            self.attn_weights = weights.detach()
            out = F.dropout(weights, p) @ v                               # (B, Hd, N, Dh)
        out = out.transpose(1, 2)                                 # (B, N, Hd, Dh)
        out = out.reshape(B, N, D)                                # (B, N, D) heads concat
        return F.dropout(self.proj(out), p)                       # (B, N, D)


# -----------------------------------------------------------------------------------------
# 3. MLP and the encoder block
#   MLP(x) = GELU(x W1 + b1) W2 + b2, applied to every token on its own
# Pre-norm block (ViT paper, eq. 2-3):
#   x = x + Attention(LayerNorm(x))
#   x = x + MLP(LayerNorm(x))
# Why pre-norm, when the original Transformer normalises after the sum: here the residual
# path from input to output is a clean identity, so gradients reach early layers undamped
# and training is stable without a long warmup (Xiong et al. 2020). The price is a final
# LayerNorm before the head (section 5). LayerNorm eps is 1e-6 as in torchvision and timm.
# -----------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim, mlp_dim, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = self.dropout(F.gelu(self.fc1(x)))                     # (B, N, mlp_dim)
        return self.dropout(self.fc2(x))                          # (B, N, D)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim, dropout=0.0, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout, fused_attn)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))                          # (B, N+1, D)
        x = x + self.mlp(self.norm2(x))                           # (B, N+1, D)
        return x


# -----------------------------------------------------------------------------------------
# 4. The ViT: CLS token, position embedding, encoder, head
#   images (B, C, H, W) -> patches (B, N, D) -> [CLS; patches] + pos (B, N+1, D)
#   -> depth x Block -> LayerNorm -> CLS output (B, D) -> Linear head -> logits (B, K)
# CLS token: one learned vector prepended to the patch tokens. It has no patch of its own,
# so what it holds after the last block is whatever it gathered from the patches through
# attention: a summary of the image, which the head classifies. (Averaging the patch tokens,
# pool="mean", is the common alternative and is often better on small data.)
# Position embedding: attention is blind to order, so each of the N + 1 positions gets a
# learned vector added to its token. Unlike the Transformer's fixed sinusoids, ViT learns
# them; after training, neighbouring patches end up with similar embeddings (pos_embed.png).
# Parameter names follow torchvision's and timm's ViTs (patch_embed.proj, cls_token,
# pos_embed, blocks.i.attn.qkv, ...), so pretrained weights map one to one.
# -----------------------------------------------------------------------------------------
class ViT(nn.Module):
    def __init__(self, image_size, patch_size, in_channels, num_classes, dim, depth, heads,
                 mlp_dim, dropout=0.0, fused_attn=True, pool="cls"):
        super().__init__()
        if image_size % patch_size != 0:
            raise UserError(f"image size {image_size} is not divisible by patch size "
                            f"{patch_size}; choose --patch-size among its divisors.")
        if dim % heads != 0:
            raise UserError(f"dim {dim} is not divisible by heads {heads}; every head must get "
                            f"an equal share of the width.")
        if pool not in ("cls", "mean"):
            raise UserError(f"pool must be 'cls' or 'mean', got {pool!r}.")
        self.pool = pool
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [Block(dim, heads, mlp_dim, dropout, fused_attn) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.init_weights()

    def init_weights(self):
        # The original ViT code's initialisation (torchvision's too): Xavier-uniform linear
        # layers, a LeCun-normal patch projection (std 1/sqrt(C*P*P), so patch tokens start
        # with unit scale), position embeddings with std 0.02, zero biases, CLS token and
        # head. The zero head makes every first prediction uniform; only the head learns on
        # the first step, and everything else from the second on.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        fan_in = self.patch_embed.proj.weight[0].numel()          # C * P * P
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images):
        B = images.size(0)
        x = self.patch_embed(images)                              # (B, N, D)
        cls = self.cls_token.expand(B, -1, -1)                    # (B, 1, D)
        x = torch.cat([cls, x], dim=1)                            # (B, N+1, D)
        x = self.pos_drop(x + self.pos_embed)                     # (B, N+1, D)
        for block in self.blocks:
            x = block(x)                                          # (B, N+1, D)
        x = self.norm(x)                                          # (B, N+1, D)
        x = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)   # (B, D)
        return self.head(x)                                       # (B, K)


# -----------------------------------------------------------------------------------------
# 5. Configuration and presets
# Every option lives in one dataclass, filled from the command line. A preset is a named
# bundle of defaults; an option given explicitly on the command line always wins over it.
#   default: CIFAR-10 on a GPU, 30 epochs.
#   cpu:     FashionMNIST on a laptop CPU in under 5 minutes: 7x7 patches (16 tokens, cheap
#            attention), a narrow and shallow model (3 blocks) so that 25 epochs fit the
#            budget, a 1-pixel crop and a flip, and a higher learning rate. At equal time,
#            fewer blocks for more epochs won (the README's tuning table).
#   tiny:    CIFAR-10 with a model whose model.pth stays under 1 MB (209k parameters).
# The recipe follows what is known to matter on short schedules: patch 4 on 32x32 images,
# a narrow model with MLP ratio 2, AdamW at 1e-3 with weight decay 0.05, warmup over the
# first 5% of steps then cosine to zero exactly at the last step, label smoothing 0.1, and
# light augmentation (random crop with padding, horizontal flip).
# -----------------------------------------------------------------------------------------
@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str = "./data"
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05            # fraction of all steps spent warming up
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    seed: int = 0
    image_size: int = 0             # 0: the data set's own size
    patch_size: int = 4
    dim: int = 256
    depth: int = 6
    heads: int = 8
    mlp_dim: int = 512
    dropout: float = 0.0
    pool: str = "cls"
    augment: bool = True            # master switch for the two below
    crop_pad: int | None = None     # random-crop padding in pixels; None: image side / 8
    flip: bool = True
    precision: str = "auto"         # auto, bf16 or fp32
    attn: str = "auto"              # auto, fused or manual (see section 2)
    compile: bool = False


PRESETS = {
    "default": {},
    "cpu": dict(epochs=25, batch_size=256, lr=3e-3, patch_size=7, dim=64, depth=3, heads=4,
                mlp_dim=128, crop_pad=1),
    "tiny": dict(batch_size=256, lr=2e-3, dim=64, depth=6, heads=4, mlp_dim=128),
}
MODEL_KEYS = ("image_size", "patch_size", "dim", "depth", "heads", "mlp_dim", "dropout", "pool")


def validate(cfg):
    for name in ("epochs", "batch_size", "lr", "patch_size", "dim", "depth", "heads", "mlp_dim"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, "
                            f"got {getattr(cfg, name)}.")
    if cfg.image_size < 0:
        raise UserError(f"--image-size must be positive, got {cfg.image_size}.")
    if cfg.dim % cfg.heads != 0:
        raise UserError(f"dim {cfg.dim} is not divisible by heads {cfg.heads}; every head must "
                        f"get an equal share of the width.")
    for name in ("dropout", "warmup", "label_smoothing"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), "
                            f"got {getattr(cfg, name)}.")
    if cfg.crop_pad is not None and cfg.crop_pad < 0:
        raise UserError(f"--crop-pad must not be negative, got {cfg.crop_pad}.")
    if cfg.weight_decay < 0:
        raise UserError(f"--weight-decay must not be negative, got {cfg.weight_decay}.")


def pick_device(name=None):
    if name:
        available = {"cpu": True, "cuda": torch.cuda.is_available(),
                     "mps": torch.backends.mps.is_available()}
        if not available.get(name.split(":")[0], False):
            raise UserError(f"device {name!r} is not available here; use cpu"
                            + ", cuda" * available["cuda"] + ", mps" * available["mps"] + ".")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(cfg, device):
    # bf16 autocast: matmuls in bfloat16 (same exponent range as float32, so no loss
    # scaling is needed), reductions and the loss in float32. It pays on GPUs with tensor
    # cores and on CPUs with bf16 instructions; on Apple's MPS we stay in float32.
    if cfg.precision == "fp32" or device.type == "mps":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def cpu_has_bf16():
    # True on CPUs with native bf16 instructions (AVX512-BF16, AMX). Elsewhere bf16 is
    # emulated and slower than fp32. (A private PyTorch query; False if it ever goes away.)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# -----------------------------------------------------------------------------------------
# 6. Data, kept on the device as uint8
# The whole data set is decoded once into uint8 tensors (CIFAR-10 is 150 MB) and moved to
# the device. Each batch is then augmented there with tensor operations: a random crop
# from a zero-padded copy (pad = image side / 8 unless --crop-pad says otherwise) and a
# random horizontal flip. For a model this small, a DataLoader decoding PIL images on the
# CPU would be the bottleneck on a GPU.
# Test images are only normalised, with the mean and std of the training split.
# -----------------------------------------------------------------------------------------
@dataclass
class Data:
    train_x: torch.Tensor          # (N_train, C, H, W) uint8
    train_y: torch.Tensor          # (N_train,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list
    mean: list                     # per channel, in [0, 1]
    std: list

    def to(self, device):
        for name in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, name, getattr(self, name).to(device))
        # Kept on the device once: a tensor built from a list at every step would be a
        # host-to-device copy (and a wait) at every step.
        self.mean_t = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        self.std_t = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return self

    def normalize(self, x):
        # uint8 (B, C, H, W) -> float, zero mean and unit variance per channel
        return (x.float() / 255 - self.mean_t) / self.std_t


OFFLINE_HINT = ("if this machine is offline, point --data-root at a folder that already holds "
                "the data set, or --dataset at an image folder with train/ and test/ subfolders")


def load_torchvision(name, root):
    import torchvision
    cls = {"cifar10": torchvision.datasets.CIFAR10,
           "fashionmnist": torchvision.datasets.FashionMNIST}[name]
    splits = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=True)
        except Exception as e:        # URLError, RuntimeError, ...: all mean "no data"
            reason = " ".join(str(e).split())                    # one line
            raise UserError(f"could not find or download {name} in {root!r} ({reason}); "
                            f"{OFFLINE_HINT}.") from None
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)   # (N, C, H, W)
        splits += [x.contiguous(), torch.as_tensor(ds.targets)]
    return splits, list(ds.classes)


def load_image_folder(path, image_size):
    from PIL import Image
    import torchvision
    from torchvision.transforms import functional as TF
    missing = [s for s in ("train", "test") if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise UserError(f"{path!r} has no {' or '.join(s + '/' for s in missing)} subfolder; an "
                        f"image folder needs train/<class>/... and test/<class>/... images.")
    try:
        train = torchvision.datasets.ImageFolder(os.path.join(path, "train"))
        test = torchvision.datasets.ImageFolder(os.path.join(path, "test"))
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"cannot read the image folder {path!r}: {e}") from None
    if train.classes != test.classes:
        raise UserError(f"train/ and test/ of {path!r} hold different classes "
                        f"({train.classes} vs {test.classes}).")
    with Image.open(train.samples[0][0]) as first:
        mode = "L" if first.mode in ("1", "L", "I", "I;16", "F") else "RGB"
        size = image_size or min(first.size)

    def decode(ds):
        images = torch.empty(len(ds), 1 if mode == "L" else 3, size, size, dtype=torch.uint8)
        for i, (file, _) in enumerate(ds.samples):
            try:
                with Image.open(file) as im:
                    im = im.convert(mode)
                    if im.size != (size, size):
                        im = TF.center_crop(TF.resize(im, size), size)
                    images[i] = TF.pil_to_tensor(im)                  # (C, size, size)
            except OSError as e:
                raise UserError(f"cannot read image {file!r}: {e}") from None
        return images, torch.tensor(ds.targets)

    return [*decode(train), *decode(test)], train.classes


def channel_stats(x):
    # Mean and std of each channel over the whole training split, in chunks to spare memory.
    total = torch.zeros(x.size(1), dtype=torch.float64)
    total_sq = torch.zeros(x.size(1), dtype=torch.float64)
    for chunk in x.split(4096):
        c = chunk.double() / 255
        total += c.sum(dim=(0, 2, 3))
        total_sq += (c * c).sum(dim=(0, 2, 3))
    n = x.size(0) * x.size(2) * x.size(3)
    mean = total / n
    std = (total_sq / n - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def load_data(cfg):
    name = cfg.dataset.lower()
    if name in ("cifar10", "fashionmnist"):
        splits, classes = load_torchvision(name, cfg.data_root)
    elif os.path.isdir(cfg.dataset):
        splits, classes = load_image_folder(cfg.dataset, cfg.image_size)
    else:
        raise UserError(f"unknown dataset {cfg.dataset!r}: use cifar10, fashionmnist, or the "
                        f"path of a folder with train/ and test/ subfolders.")
    train_x, train_y, test_x, test_y = splits
    if cfg.image_size and train_x.size(-1) != cfg.image_size:
        # torchvision's sets come in one size; resize them once if another was asked for
        train_x, test_x = (F.interpolate(x.float(), size=cfg.image_size, mode="bilinear",
                                         antialias=True).round().clamp(0, 255).to(torch.uint8)
                           for x in (train_x, test_x))
    mean, std = channel_stats(train_x)
    return Data(train_x, train_y.long(), test_x, test_y.long(), classes, mean, std)


def augment(x, pad, flip):
    # x: (B, C, H, W) uint8 on the device. Random crop of the original size from a copy
    # padded with zeros, done as one gather; then a random horizontal flip by masking.
    B, C, H, W = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))                   # (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * pad + 1, (B, 1, 1, 1), device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (B, 1, 1, 1), device=x.device)
        rows = dy + torch.arange(H, device=x.device).view(1, 1, H, 1)   # (B, 1, H, 1)
        cols = dx + torch.arange(W, device=x.device).view(1, 1, 1, W)   # (B, 1, 1, W)
        batch = torch.arange(B, device=x.device).view(B, 1, 1, 1)
        chans = torch.arange(C, device=x.device).view(1, C, 1, 1)
        x = padded[batch, chans, rows, cols]                      # (B, C, H, W)
    if flip:
        mirror = torch.rand(B, 1, 1, 1, device=x.device) < 0.5
        x = torch.where(mirror, x.flip(3), x)                     # (B, C, H, W)
    return x


# -----------------------------------------------------------------------------------------
# 7. Training and evaluation
# AdamW (decoupled weight decay), a learning rate that rises linearly over the first
# `warmup` fraction of steps and then follows a cosine to zero exactly at the last step
# (torch's LinearLR + CosineAnnealingLR, stepped every batch), label smoothing 0.1 in the
# loss, gradient clipping. Losses and accuracies are summed on the device and read once per
# epoch, because every .item() makes the CPU wait for the GPU.
# -----------------------------------------------------------------------------------------
def use_fused_attn(cfg, device):
    # PyTorch's fused CPU kernel has a slow backward pass. On a 2-core CPU, python vit.py
    # --benchmark --preset cpu trained at 9,741 img/s with the hand-written path against
    # 1,831 with --attn fused in bf16 (7,079 against 5,263 in fp32). On GPUs the fused kernel
    # (FlashAttention) is the fast one, so "auto" uses it everywhere but on the CPU.
    return cfg.attn == "fused" or (cfg.attn == "auto" and device.type != "cpu")


def build_model(cfg, in_channels, num_classes, device):
    return ViT(cfg.image_size, cfg.patch_size, in_channels, num_classes, cfg.dim, cfg.depth,
               cfg.heads, cfg.mlp_dim, cfg.dropout, use_fused_attn(cfg, device), cfg.pool)


def build_optimizer(model, cfg, steps_per_epoch):
    # No weight decay on biases, LayerNorms, the CLS token and the position embedding:
    # shrinking them towards zero only hurts.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n
             and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, round(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warmup)),
    ], milestones=[warmup])
    return opt, sched


def format_time(seconds):
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def train_one_epoch(model, data, opt, sched, cfg, device, amp, epoch):
    model.train()
    N, bs = data.train_x.size(0), cfg.batch_size
    steps = math.ceil(N / bs)
    pad = cfg.crop_pad if cfg.augment else 0
    perm = torch.randperm(N, device=device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    interactive = sys.stdout.isatty() or "ipykernel" in sys.modules
    show_every = max(1, steps // (20 if interactive else 4))
    t0 = time.time()
    for step in range(steps):
        idx = perm[step * bs:(step + 1) * bs]
        x = augment(data.train_x[idx], pad, cfg.flip and cfg.augment)   # (B, C, H, W) uint8
        x = data.normalize(x)                                     # (B, C, H, W) float
        y = data.train_y[idx]                                     # (B,)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)                                     # (B, K)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        sched.step()
        loss_sum += loss.detach() * y.size(0)
        correct += (logits.argmax(dim=1) == y).sum()
        if (step + 1) % show_every == 0 and step + 1 < steps:
            rate = (step + 1) * bs / (time.time() - t0)
            msg = (f"  epoch {epoch} [{step + 1}/{steps}] loss {loss.item():.3f} "
                   f"{rate:,.0f} img/s")
            print("\r" + msg if interactive else msg, end="" if interactive else "\n",
                  flush=True)
    if interactive:
        print("\r" + " " * 60 + "\r", end="")
    return loss_sum.item() / N, correct.item() / N


@torch.no_grad()
def evaluate(model, data, cfg, device, amp, batch_size=1024):
    # Returns the mean loss (same label-smoothed loss as training, so the curves compare),
    # the accuracy, and every prediction (for the confusion matrix).
    model.eval()
    loss_sum, preds = torch.zeros((), device=device), []
    for i in range(0, data.test_x.size(0), batch_size):
        x = data.normalize(data.test_x[i:i + batch_size])
        y = data.test_y[i:i + batch_size]
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing,
                                    reduction="sum")
        preds.append(logits.argmax(dim=1))
    preds = torch.cat(preds)
    acc = (preds == data.test_y).float().mean().item()
    return loss_sum.item() / data.test_y.size(0), acc, preds


# -----------------------------------------------------------------------------------------
# 8. Checkpoints, written atomically and loaded safely
# model.pth:      what you would ship: weights, the model's configuration as plain data,
#                 class names and normalisation.
# checkpoint.pth: everything needed to resume: also the optimizer, the scheduler, the epoch,
#                 the random number generators, the metrics so far, the run's configuration.
# Both are written to a temporary file and renamed, so a crash mid-write never leaves a
# half-written file. Both are loaded with weights_only=True: the unpickler then accepts only
# tensors and plain containers, so a booby-trapped file cannot run code.
# -----------------------------------------------------------------------------------------
def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_file(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{what} {path!r} was refused: it holds objects other than tensors and "
                        f"plain data, and loading it could run code.") from None
    except Exception:
        raise UserError(f"{what} {path!r} is corrupt or is not a PyTorch file.") from None
    if not isinstance(obj, dict) or "config" not in obj or "classes" not in obj:
        raise UserError(f"{what} {path!r} was not written by vit.py.")
    return obj


def model_file(model, cfg, data, in_channels):
    return {"config": {k: getattr(cfg, k) for k in MODEL_KEYS} | {"in_channels": in_channels},
            "state_dict": model.state_dict(), "classes": data.classes, "mean": data.mean,
            "std": data.std, "dataset": cfg.dataset, "data_root": cfg.data_root}


def load_weights(model, state_dict, path):
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[-1].strip()[:200]
        raise UserError(f"the weights in {path!r} do not fit this model ({first}).") from None


def check_fits(saved_classes, data, path):
    if list(saved_classes) != list(data.classes):
        raise UserError(f"{path!r} was trained on classes {list(saved_classes)[:5]}..., but "
                        f"this data has {data.classes[:5]}...; it does not fit this data.")


# -----------------------------------------------------------------------------------------
# 9. Benchmark: this ViT against torchvision's, same size, same precision, same run
# Machines are noisy, so we report a ratio measured in one run: training steps (forward,
# backward, AdamW) of both models alternate in rounds on the same random batch, and each
# model's median step time is kept. torchvision's VisionTransformer takes 3-channel images.
# -----------------------------------------------------------------------------------------
def time_train_steps(model, images, labels, amp, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = images.device

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()                                                        # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def benchmark(cfg, device, rounds=5, steps=3):
    import torchvision
    # CIFAR-sized images unless --image-size says otherwise: the largest multiple of the
    # patch size up to 32 (28 for 7x7 patches, FashionMNIST's size)
    size = cfg.image_size or cfg.patch_size * max(1, 32 // cfg.patch_size)
    torch.manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, 10, (cfg.batch_size,), device=device)
    ours = build_model(replace(cfg, image_size=size), 3, 10, device).to(device)
    theirs = torchvision.models.VisionTransformer(size, cfg.patch_size, cfg.depth, cfg.heads,
                                                  cfg.dim, cfg.mlp_dim, num_classes=10)
    theirs.to(device)
    print(f"benchmark on {device}: ViT {size}px, patch {cfg.patch_size}, dim {cfg.dim}, depth "
          f"{cfg.depth}, heads {cfg.heads}, mlp {cfg.mlp_dim}, batch {cfg.batch_size}; "
          f"attention {'fused' if use_fused_attn(cfg, device) else 'hand-written'}")
    results = {}
    precisions = [("fp32", None)]
    if device.type == "cuda" or cpu_has_bf16():
        precisions.append(("bf16", torch.bfloat16))
    for name, amp in precisions:
        times = {"vit.py": [], "torchvision": []}
        for _ in range(rounds):
            for label, model in (("vit.py", ours), ("torchvision", theirs)):
                times[label].append(time_train_steps(model, images, labels, amp, steps))
        ours_t, theirs_t = (sorted(t)[len(t) // 2] for t in times.values())
        results[name] = theirs_t / ours_t
        print(f"{name}: vit.py {cfg.batch_size / ours_t:,.0f} img/s, torchvision "
              f"{cfg.batch_size / theirs_t:,.0f} img/s: vit.py is {theirs_t / ours_t:.2f}x "
              f"as fast (median of {rounds} rounds of {steps} training steps)")
    return results


# -----------------------------------------------------------------------------------------
# 10. Figures (PNG files; also shown inline when running in a notebook)
# What the model learned, drawn after training and by --eval: loss and accuracy curves,
# where the CLS token looks (attention rollout across layers and each head of the last
# layer), how the learned position embeddings relate to each other, the confusion matrix
# and a grid of mistakes. matplotlib is imported inside the functions, so importing vit.py
# stays fast and works without a display.
# -----------------------------------------------------------------------------------------
def save_figure(fig, path, tight=True):
    import matplotlib.pyplot as plt
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    if "ipykernel" in sys.modules:
        plt.show()
    plt.close(fig)
    print(f"saved {path}")


def plot_curves(metrics, path):
    import matplotlib.pyplot as plt
    epochs = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    ax1.plot(epochs, [m["test_loss"] for m in metrics], "o-", label="test")
    ax1.set(title="Loss (cross-entropy, label smoothing)", xlabel="epoch", ylabel="loss")
    ax2.plot(epochs, [100 * m["train_acc"] for m in metrics], "o-", label="train (augmented)")
    ax2.plot(epochs, [100 * m["test_acc"] for m in metrics], "o-", label="test")
    ax2.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def to_display(images):
    # uint8 (B, C, H, W) -> list of (H, W) or (H, W, 3) arrays for imshow
    images = images.cpu()
    return [im[0].numpy() if im.size(0) == 1 else im.permute(1, 2, 0).numpy() for im in images]


@torch.no_grad()
def attention_maps(model, images):
    # Attention rollout (Abnar & Zuidema 2020): attention flows through the residual
    # connections too, so each layer's map is 0.5 * A + 0.5 * I (A averaged over heads,
    # rows renormalised); multiplying the layers' maps gives how much each patch reaches
    # the CLS token at the end. Returns the CLS row of the rollout, (B, N), and the last
    # layer's CLS attention of each head, (B, Hd, N). Uses the hand-written attention path,
    # which keeps the weights.
    fused = [b.attn.fused for b in model.blocks]
    for b in model.blocks:
        b.attn.fused = False
    model.eval()
    model(images)
    for b, f in zip(model.blocks, fused):
        b.attn.fused = f
    weights = [b.attn.attn_weights.float() for b in model.blocks]   # each (B, Hd, N+1, N+1)
    eye = torch.eye(weights[0].size(-1), device=images.device)
    rollout = eye
    for w in weights:
        a = 0.5 * w.mean(dim=1) + 0.5 * eye                          # (B, N+1, N+1)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout                                         # (B, N+1, N+1)
    return rollout[:, 0, 1:], weights[-1][:, :, 0, 1:]


def spread(n_items, n):
    # n indices spread evenly over range(n_items): test folders are often sorted by class
    return torch.linspace(0, n_items - 1, min(n, n_items)).round().long().unique()


def plot_attention(model, data, path, n_images=6):
    import matplotlib.pyplot as plt
    picked = spread(data.test_x.size(0), n_images).to(data.test_x.device)
    n_images = len(picked)
    images = data.test_x[picked]                                      # (B, C, H, W) uint8
    labels = data.test_y[picked].tolist()
    rollout, last = attention_maps(model, data.normalize(images))
    side = int(math.isqrt(rollout.size(1)))                           # H / P

    def upsample(maps):
        # (B, N) -> (B, H, W): each patch's weight spread over its P x P pixels
        maps = maps.reshape(maps.size(0), 1, side, side)
        return F.interpolate(maps, size=images.shape[-2:], mode="nearest")[:, 0].cpu().numpy()

    heads = last.size(1)
    fig, axes = plt.subplots(n_images, heads + 2, figsize=(1.6 * (heads + 2), 1.7 * n_images),
                             squeeze=False)
    cmap = "gray" if images.size(1) == 1 else None
    roll = upsample(rollout)
    per_head = [upsample(last[:, h]) for h in range(heads)]
    for i, im in enumerate(to_display(images)):
        axes[i, 0].imshow(im, cmap=cmap)
        axes[i, 0].set_title(data.classes[labels[i]][:12], fontsize=8)
        axes[i, 1].imshow(im, cmap=cmap)
        axes[i, 1].imshow(roll[i], cmap="inferno", alpha=0.6)
        for h in range(heads):
            axes[i, h + 2].imshow(im, cmap=cmap)
            axes[i, h + 2].imshow(per_head[h][i], cmap="inferno", alpha=0.6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 1].set_title("rollout", fontsize=8)
    for h in range(heads):
        axes[0, h + 2].set_title(f"last layer\nhead {h}", fontsize=8)
    axes[-1, 0].set_xlabel("test image")
    axes[-1, 1].set_xlabel("all layers")
    fig.suptitle("Where the CLS token looks: attention rollout and the last layer's CLS "
                 "attention per head (bright = more attention)", fontsize=10)
    save_figure(fig, path)


def plot_pos_embed(model, path):
    # Cosine similarity of each patch's learned position embedding with every other's
    # (ViT paper, Figure 7): tile (r, c) shows how similar patch (r, c) is to each patch.
    import matplotlib.pyplot as plt
    pos = model.pos_embed[0, 1:].detach().float().cpu()               # (N, D)
    pos = F.normalize(pos, dim=-1)
    sim = pos @ pos.T                                                 # (N, N)
    side = int(math.isqrt(pos.size(0)))
    fig, axes = plt.subplots(side, side, figsize=(8, 8), squeeze=False)
    for n in range(side * side):
        ax = axes[n // side, n % side]
        im = ax.imshow(sim[n].view(side, side).numpy(), cmap="viridis", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    for r in range(side):
        axes[r, 0].set_ylabel(str(r + 1), rotation=0, labelpad=8)
        axes[-1, r].set_xlabel(str(r + 1))
    fig.supxlabel("input patch column")
    fig.supylabel("input patch row")
    fig.suptitle("Position embedding similarity (cosine) of each patch with all patches")
    fig.colorbar(im, ax=axes, shrink=0.6, label="cosine similarity")
    save_figure(fig, path, tight=False)          # tight_layout cannot place a shared colorbar


def plot_confusion(data, preds, path):
    import matplotlib.pyplot as plt
    K = len(data.classes)
    y = data.test_y.cpu()
    conf = torch.zeros(K, K, dtype=torch.long)
    conf.index_put_((y, preds.cpu()), torch.ones_like(y), accumulate=True)
    per_class = conf.diag().float() / conf.sum(dim=1).clamp_min(1).float()
    print("per-class accuracy: " + ", ".join(f"{c} {100 * a:.1f}%"
                                              for c, a in zip(data.classes, per_class)))
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * K, 0.8 + 0.55 * K))
    im = ax.imshow(conf.numpy(), cmap="Blues")
    for i in range(K):
        for j in range(K):
            ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if conf[i, j] > conf.max() / 2 else "black")
    ax.set_xticks(range(K))
    ax.set_yticks(range(K))
    ax.set_xticklabels(data.classes, rotation=45, ha="right")
    ax.set_yticklabels(data.classes)
    ax.set(title="Confusion matrix (test split)", xlabel="predicted class", ylabel="true class")
    fig.colorbar(im, ax=ax, label="images")
    save_figure(fig, path)


def plot_mistakes(data, preds, path, n=24):
    import matplotlib.pyplot as plt
    wrong = (preds != data.test_y).nonzero().flatten()
    wrong = wrong[spread(len(wrong), n).to(wrong.device)] if len(wrong) else wrong
    cols = 8
    rows = max(1, math.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 2.1 * rows), squeeze=False)
    cmap = "gray" if data.test_x.size(1) == 1 else None
    for ax in axes.flat:
        ax.axis("off")
    true, pred = data.test_y[wrong].tolist(), preds[wrong].tolist()
    for ax, t, p, im in zip(axes.flat, true, pred, to_display(data.test_x[wrong])):
        ax.imshow(im, cmap=cmap)
        ax.set_title(f"true {data.classes[t][:10]}\npred {data.classes[p][:10]}", fontsize=7)
    fig.suptitle(f"Misclassified test images ({(preds != data.test_y).sum().item()} of "
                 f"{len(preds)} wrong; {len(wrong)} shown)")
    save_figure(fig, path)


def make_figures(model, data, preds, out):
    plot_attention(model, data, os.path.join(out, "attention.png"))
    plot_pos_embed(model, os.path.join(out, "pos_embed.png"))
    plot_confusion(data, preds, os.path.join(out, "confusion.png"))
    plot_mistakes(data, preds, os.path.join(out, "mistakes.png"))


def plot_compare(runs, path):
    # Test accuracy against epoch for several runs, read from their metrics.json.
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        file = os.path.join(run, "metrics.json")
        try:
            with open(file) as f:
                metrics = json.load(f)
        except (OSError, ValueError):
            raise UserError(f"cannot read {file!r}; --compare takes run folders.") from None
        ax.plot([m["epoch"] for m in metrics], [100 * m["test_acc"] for m in metrics], "o-",
                ms=3, label=f"{os.path.basename(os.path.normpath(run))} "
                            f"({100 * metrics[-1]['test_acc']:.2f}%)")
    ax.set(title="Test accuracy of each run", xlabel="epoch", ylabel="test accuracy (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)     # whole epochs on the axis
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# -----------------------------------------------------------------------------------------
# 11. main(): parse the command line, then train, resume, evaluate, compare or benchmark
# Every error a user can cause is raised as UserError and ends here as one line on stderr
# and exit status 1. A notebook kernel's own arguments are ignored, so pasting this file into
# one cell runs main() with the defaults; main([...]) takes options as a list.
# -----------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(
        description="Train a Vision Transformer from scratch on CIFAR-10, FashionMNIST or "
                    "an image folder.")
    # Every option defaults to None here, so that we can tell "given" from "not given":
    # a given option overrides the preset, which overrides Config's defaults.
    a = p.add_argument
    a("--preset", default="default", help=f"bundle of defaults: {', '.join(PRESETS)}")
    a("--dataset", help="cifar10, fashionmnist, or a folder with train/ and test/ subfolders")
    a("--data-root", help="where torchvision data sets are downloaded (default ./data)")
    a("--epochs", type=int)
    a("--batch-size", type=int)
    a("--lr", type=float, help="peak learning rate of AdamW")
    a("--weight-decay", type=float)
    a("--warmup", type=float, help="fraction of steps for the linear warmup")
    a("--label-smoothing", type=float)
    a("--seed", type=int)
    a("--image-size", type=int, help="resize images to this size (default: their own)")
    a("--patch-size", type=int)
    a("--dim", type=int, help="model width D")
    a("--depth", type=int, help="number of encoder blocks")
    a("--heads", type=int)
    a("--mlp-dim", type=int)
    a("--dropout", type=float)
    a("--pool", choices=["cls", "mean"], help="classify the CLS token or the mean patch token")
    a("--augment", action=argparse.BooleanOptionalAction, help="random crop and flip")
    a("--crop-pad", type=int,
      help="random-crop padding in pixels (default: image side / 8; 0: no crop)")
    a("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip")
    a("--precision", choices=["auto", "bf16", "fp32"], help="bf16 autocast or plain fp32")
    a("--attn", choices=["auto", "fused", "manual"],
      help="attention path: F.scaled_dot_product_attention or the hand-written one")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    a("--device", help="cuda, mps or cpu (default: the best available)")
    a("--out", help="run folder (default: a new folder under runs/)")
    a("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint.pth")
    a("--eval", metavar="MODEL", help="evaluate a saved model.pth on its test split")
    a("--compare", nargs="+", metavar="RUN",
      help="plot the test accuracy of these run folders into one figure (in --out)")
    a("--benchmark", action="store_true",
      help="time training steps of this ViT against torchvision's, same size and precision")
    return p


def parse_args(argv=None):
    # A notebook kernel starts Python with its own arguments (-f kernel.json): ignore them.
    if argv is None and "ipykernel" in sys.modules:
        argv = []
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}.")
    return args


def explicit_options(args):
    return {f.name: getattr(args, f.name) for f in fields(Config)
            if getattr(args, f.name, None) is not None}


def resolve_config(args):
    return Config(**(PRESETS[args.preset] | explicit_options(args)))


def print_model_summary(model, cfg, device, amp):
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: ViT {cfg.image_size}px, patch {cfg.patch_size}, dim {cfg.dim}, depth "
          f"{cfg.depth}, heads {cfg.heads}, mlp {cfg.mlp_dim}, pool {cfg.pool}: "
          f"{n_params:,} parameters ({n_params * 4 / 1e6:.2f} MB in float32)")
    attn = "fused" if model.blocks[0].attn.fused else "hand-written"
    print(f"device: {device}, precision: {'bf16 autocast' if amp else 'fp32'}, "
          f"attention: {attn}")


def new_run_folder(cfg):
    name = os.path.basename(os.path.normpath(cfg.dataset)).lower()
    base = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, i = base, 1
    while os.path.exists(path):
        path, i = f"{base}-{i}", i + 1
    return path


def train_run(cfg, device, out, resume=None, resume_path=None):
    validate(cfg)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg)
    cfg.image_size = data.train_x.size(-1)
    if cfg.crop_pad is None:
        cfg.crop_pad = round(cfg.image_size / 8)     # 4 pixels on 32x32 CIFAR-10, the classic
    in_channels = data.train_x.size(1)
    model = build_model(cfg, in_channels, len(data.classes), device).to(device)
    data.to(device)
    steps_per_epoch = math.ceil(data.train_x.size(0) / cfg.batch_size)
    opt, sched = build_optimizer(model, cfg, steps_per_epoch)
    metrics, start_epoch = [], 1
    if resume is not None:
        check_fits(resume["classes"], data, resume_path)
        load_weights(model, resume["model"], resume_path)
        opt.load_state_dict(resume["optimizer"])
        if resume["config"]["epochs"] == cfg.epochs:
            sched.load_state_dict(resume["scheduler"])
        else:
            # A longer (or shorter) run: the cosine must now end at the new last epoch. The
            # schedule was built for the new length; step it past the finished steps.
            # (PyTorch warns when a scheduler steps before the optimizer; here that is the
            # point.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(resume["epoch"] * steps_per_epoch):
                    sched.step()
        torch.set_rng_state(resume["rng"]["cpu"])
        if device.type == "cuda" and resume["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
        metrics, start_epoch = resume["metrics"], resume["epoch"] + 1
    amp = autocast_dtype(cfg, device)
    print(f"config: {asdict(cfg)}")
    print(f"data: {cfg.dataset}: {data.train_x.size(0):,} train and {data.test_x.size(0):,} test "
          f"images of {tuple(data.train_x.shape[1:])}, {len(data.classes)} classes")
    print_model_summary(model, cfg, device, amp)
    print(f"run folder: {out}")
    if start_epoch > cfg.epochs:
        raise UserError(f"the checkpoint has already finished {cfg.epochs} epochs; pass a larger "
                        f"--epochs to train further.")
    step_model = torch.compile(model) if cfg.compile else model
    os.makedirs(out, exist_ok=True)
    t_run = time.time()
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        train_loss, train_acc = train_one_epoch(step_model, data, opt, sched, cfg, device, amp,
                                                epoch)
        test_loss, test_acc, preds = evaluate(step_model, data, cfg, device, amp)
        seconds = time.time() - t0
        metrics.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                            test_loss=test_loss, test_acc=test_acc,
                            lr=opt.param_groups[0]["lr"], seconds=seconds))
        elapsed = time.time() - t_run
        left = elapsed / (epoch - start_epoch + 1) * (cfg.epochs - epoch)
        print(f"epoch {epoch:3d}/{cfg.epochs} | train loss {train_loss:.4f} acc "
              f"{100 * train_acc:5.2f}% | test loss {test_loss:.4f} acc {100 * test_acc:5.2f}% "
              f"| lr {metrics[-1]['lr']:.2e} | {data.train_x.size(0) / seconds:,.0f} img/s | "
              f"{format_time(elapsed)} elapsed, {format_time(left)} left", flush=True)
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        atomic_save({"config": asdict(cfg), "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch, "rng": rng, "metrics": metrics, "classes": data.classes,
                     "mean": data.mean, "std": data.std}, os.path.join(out, "checkpoint.pth"))
        atomic_save(model_file(model, cfg, data, in_channels), os.path.join(out, "model.pth"))
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    plot_curves(metrics, os.path.join(out, "curves.png"))
    make_figures(model, data, preds, out)
    print(f"saved {os.path.join(out, 'model.pth')}, checkpoint.pth, metrics.json")
    print(f"test accuracy: {100 * metrics[-1]['test_acc']:.2f}%")
    return metrics


def eval_run(args, device):
    saved = load_file(args.eval, "model file")
    if "state_dict" not in saved:
        raise UserError(f"{args.eval!r} is a training checkpoint; --eval takes the model.pth "
                        f"next to it.")
    mc = saved["config"]
    cfg = Config(dataset=args.dataset or saved["dataset"],
                 data_root=args.data_root or saved["data_root"], image_size=mc["image_size"],
                 **{k: mc[k] for k in MODEL_KEYS if k != "image_size"})
    data = load_data(cfg)
    check_fits(saved["classes"], data, args.eval)
    if data.train_x.size(1) != mc["in_channels"]:
        raise UserError(f"{args.eval!r} expects {mc['in_channels']}-channel images, but this data "
                        f"has {data.train_x.size(1)}.")
    model = build_model(cfg, mc["in_channels"], len(data.classes), device)
    load_weights(model, saved["state_dict"], args.eval)
    # Evaluate with the normalisation the model was trained with.
    data.mean, data.std = saved["mean"], saved["std"]
    model.to(device)
    data.to(device)
    amp = autocast_dtype(cfg, device)
    print_model_summary(model, cfg, device, amp)
    loss, acc, preds = evaluate(model, data, cfg, device, amp)
    out = args.out or os.path.dirname(os.path.abspath(args.eval))
    os.makedirs(out, exist_ok=True)
    make_figures(model, data, preds, out)
    print(f"evaluated {args.eval} on {cfg.dataset} ({data.test_x.size(0):,} test images), "
          f"loss {loss:.4f}")
    print(f"test accuracy: {100 * acc:.2f}%")
    return acc


def main(argv=None):
    try:
        args = parse_args(argv)
        device = pick_device(args.device)
        if args.eval:
            return eval_run(args, device)
        if args.compare:
            os.makedirs(args.out or ".", exist_ok=True)
            return plot_compare(args.compare, os.path.join(args.out or ".", "compare.png"))
        if args.benchmark:
            cfg = resolve_config(args)
            validate(cfg)
            return benchmark(cfg, device)
        if args.resume:
            ckpt = load_file(args.resume, "checkpoint")
            if "optimizer" not in ckpt:
                raise UserError(f"{args.resume!r} is a model file; --resume takes a "
                                f"checkpoint.pth.")
            try:
                cfg = Config(**ckpt["config"])
            except TypeError:
                raise UserError(f"{args.resume!r} holds a configuration this vit.py does not "
                                f"know.") from None
            ignored = [k for k in explicit_options(args) if k != "epochs"]
            if ignored:
                print(f"note: resuming with the checkpoint's own configuration; ignoring "
                      f"{', '.join('--' + k.replace('_', '-') for k in ignored)}")
            if args.epochs is not None:
                cfg.epochs = args.epochs
            out = os.path.dirname(os.path.abspath(args.resume))
            return train_run(cfg, device, out, ckpt, args.resume)
        cfg = resolve_config(args)
        return train_run(cfg, device, args.out or new_run_folder(cfg))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
