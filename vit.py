"""
vit.py: a Vision Transformer (ViT) from scratch, trained on CIFAR-10, FashionMNIST or any
image folder, and used to classify your own images.

What this file teaches, in reading order:
  how an image becomes a sequence (patches, shown as a reshape, and why that is a Conv2d),
  the CLS token, the learned position embedding, pre-norm encoder blocks with multi-head
  self-attention written by hand, the classification head; then a complete training recipe
  (the precision each device should train in, data kept on the device, augmentation as tensor
  ops, AdamW, warmup + cosine, label smoothing, gradient clipping and scaling), training on
  many GPUs at once (data parallel), checkpoints that resume exactly, and how a trained model
  classifies a new image.

Run it:
  python vit.py --epochs 30                           # CIFAR-10 (downloads into ./data)
  python vit.py --dataset fashionmnist --preset cpu   # a laptop CPU, a few minutes
  python vit.py --dataset path/to/folder              # any folder with train/ and test/
  python vit.py --resume runs/X/checkpoint.pth --epochs 40
  torchrun --nproc-per-node=2 vit.py --epochs 30      # two GPUs (section 9)
  python vit.py --eval runs/X/model.pth
  python vit.py --predict runs/X/model.pth cat.jpg dog.png
  In Colab or Jupyter: paste this file into one cell and run it, then call main([...]) with
  options; or `%run vit.py --epochs 5`, or `!python vit.py --epochs 5`.

Papers:
  Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929
  Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762

Sections (each a banner "# N. Title" below; test_vit.py checks that the two lists agree):
  1. Patches                        9. Many devices
  2. Multi-head self-attention     10. Checkpoints and run folders
  3. MLP and the encoder block     11. Data files
  4. The ViT                       12. Figures
  5. Configuration and presets     13. The training run
  6. Device and precision          14. Using a trained model
  7. Data                          15. Benchmark
  8. Training                      16. Command line and main()

Shape legend:
  B batch, C channels, H, W image height and width, P patch size, N = (H/P)(W/P) patches,
  T = N + 1 tokens (the patches and the CLS token), D = dim (model width), h heads,
  d_h = D / h (width of one head), K classes. (q, k, v are queries, keys and values.)
"""
import argparse
import contextlib
import errno
import gc
import json
import math
import os
import pickle
import signal
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, unusable file): main() prints its
    one-sentence message instead of a traceback, and exits with this status."""
    status = 1


class Interrupted(UserError):
    status = 130                  # the shell's status for a program stopped by Ctrl-C


def in_notebook():
    # True inside a Jupyter kernel (Colab, Kaggle, VS Code): figures are shown inline, the
    # progress line is rewritten in place, and main() returns after a user error.
    return "ipykernel" in sys.modules


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
#   attention(q, k, v) = softmax(q k^T / sqrt(d_h)) v, in h heads of width d_h = D / h
# One Linear(D, 3D) computes q, k and v together; its rows are laid out [W_q; W_k; W_v] like
# nn.MultiheadAttention.in_proj_weight, so weights map one to one. Every token attends to
# every token (no mask: all images have the same number of patches).
# Two paths give the same numbers:
#   fused=False: the hand-written reference below, which also keeps the attention weights
#                for the attention maps;
#   fused=True:  F.scaled_dot_product_attention, which never stores the (T, T) matrix and
#                runs one fused kernel; on GPUs it is the faster path (section 8 says which
#                path runs where, and why).
# -----------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim, heads, dropout=0.0, fused=True):
        super().__init__()
        self.heads = heads
        self.d_head = dim // heads
        self.fused = fused
        self.dropout_p = dropout      # a probability: F.scaled_dot_product_attention takes one
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_weights = None      # the last weights of the hand-written path, for plots

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x)                                         # (B, T, 3D)
        qkv = qkv.view(B, T, 3, self.heads, self.d_head)          # (B, T, 3, h, d_h)
        qkv = qkv.permute(2, 0, 3, 1, 4)                          # (3, B, h, T, d_h)
        q, k, v = qkv.unbind(0)                                   # (B, h, T, d_h) each
        p = self.dropout_p if self.training else 0.0
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)   # (B, h, T, d_h)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)    # (B, h, T, T)
            # The softmax runs in float32 at least (promote_types: the wider of the two):
            # in mixed precision (section 6) the scores come in 16 bits, and a float32
            # softmax is both more exact and, on the CPU, faster.
            exact = torch.promote_types(scores.dtype, torch.float32)
            weights = scores.softmax(dim=-1, dtype=exact).type_as(v)     # rows sum to 1
            self.attn_weights = weights.detach()
            out = F.dropout(weights, p) @ v                               # (B, h, T, d_h)
        out = out.transpose(1, 2)                                 # (B, T, h, d_h)
        out = out.reshape(B, T, D)                                # (B, T, D) heads concat
        return F.dropout(self.proj(out), p)                       # (B, T, D)


# -----------------------------------------------------------------------------------------
# 3. MLP and the encoder block
#   MLP(x) = GELU(x W1 + b1) W2 + b2, applied to every token on its own
# Pre-norm block (ViT paper, eq. 2-3):
#   x = x + Attention(LayerNorm(x))
#   x = x + MLP(LayerNorm(x))
# Why pre-norm, when the original Transformer normalises after the sum: here the residual
# path from input to output is a clean identity, so gradients reach early layers undamped
# and training is stable without a long warmup (Xiong et al. 2020). The price is a final
# LayerNorm before the head (section 4). LayerNorm eps is 1e-6 as in torchvision and timm.
# -----------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim, mlp_dim, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = self.dropout(F.gelu(self.fc1(x)))                     # (B, T, mlp_dim)
        return self.dropout(self.fc2(x))                          # (B, T, D)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim, dropout=0.0, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout, fused_attn)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))                          # (B, T, D)
        x = x + self.mlp(self.norm2(x))                           # (B, T, D)
        return x


# -----------------------------------------------------------------------------------------
# 4. The ViT: CLS token, position embedding, encoder, head
#   images (B, C, H, W) -> patches (B, N, D) -> [CLS; patches] + pos (B, T, D)
#   -> depth x Block -> LayerNorm -> CLS output (B, D) -> Linear head -> logits (B, K)
# CLS token: one learned vector prepended to the patch tokens. It has no patch of its own,
# so what it holds after the last block is whatever it gathered from the patches through
# attention: a summary of the image, which the head classifies. (Averaging the patch tokens,
# pool="mean", is the common alternative; in the README's runs it changed little.)
# Position embedding: attention is blind to order, so each of the T = N + 1 positions gets a
# learned vector added to its token. Unlike the Transformer's fixed sinusoids, ViT learns
# them; after training, neighbouring patches end up with similar embeddings (pos_embed.png).
# Parameter names follow timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed,
# blocks.i.attn.qkv, blocks.i.mlp.fc1, norm, head): a strict load_state_dict into timm's
# model of the same size works. torchvision stores the same tensors under other names
# (conv_proj, class_token, encoder.layers...); test_vit.py maps them one to one.
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
        x = torch.cat([cls, x], dim=1)                            # (B, T, D)
        x = self.pos_drop(x + self.pos_embed)                     # (B, T, D)
        for block in self.blocks:
            x = block(x)                                          # (B, T, D)
        x = self.norm(x)                                          # (B, T, D)
        x = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)   # (B, D)
        return self.head(x)                                       # (B, K)


@torch.no_grad()
def show_shapes(model, images):
    # forward() again, one step a line, printing the shape of a real batch at each step
    # (printed once at the start of training), and checking it gives forward()'s logits.
    def show(what, t, legend):
        print(f"  {what:<30} {str(tuple(t.shape)):<18} {legend}")
    show("images", images, "(B, C, H, W)")
    show("patches (section 1)", patchify(images, model.patch_embed.patch_size), "(B, N, C*P*P)")
    x = model.patch_embed(images)
    show("patch tokens", x, "(B, N, D)")
    x = torch.cat([model.cls_token.expand(x.size(0), -1, -1), x], dim=1)
    show("CLS token + patch tokens", x, "(B, T, D), T = N + 1")
    x = x + model.pos_embed
    show("+ position embedding", x, "(B, T, D)")
    for i, block in enumerate(model.blocks):
        x = block(x)
        show(f"block {i + 1} (attention, MLP)", x, "(B, T, D)")
    x = model.norm(x)
    x = x[:, 0] if model.pool == "cls" else x[:, 1:].mean(dim=1)
    show("CLS token out" if model.pool == "cls" else "mean patch token out", x, "(B, D)")
    logits = model.head(x)
    show("logits", logits, "(B, K)")
    print(f"  equals model(images): {torch.allclose(logits, model(images), atol=1e-5)}")


# -----------------------------------------------------------------------------------------
# 5. Configuration and presets
# Every option lives in one dataclass; the command line (section 16) is generated from it.
# A preset is a named bundle of defaults; an option given explicitly always wins over it.
#   default: CIFAR-10 on a GPU, 30 epochs.
#   cpu:     FashionMNIST on a laptop CPU in about 5 minutes: 7x7 patches (16 tokens, cheap
#            attention), a narrow and shallow model (3 blocks) so that 25 epochs fit, a
#            1-pixel crop and a flip, and a higher learning rate. At equal time, fewer blocks
#            for more epochs won (the README's tuning table).
#   tiny:    CIFAR-10 with a model whose model.pth stays under 1 MB (209k parameters).
# The recipe follows what is known to matter on short schedules from scratch: patch 4 on
# 32x32 images (64 tokens: fine enough to see shapes), a narrow model with MLP ratio 2 (small
# data cannot feed a wide one), and light augmentation. Section 8 says why each piece of
# the optimisation is there.
# -----------------------------------------------------------------------------------------
@dataclass
class Config:
    dataset: str = "cifar10"
    data_root: str = "./data"
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3                # peak learning rate, reached at the end of the warmup
    weight_decay: float = 0.05
    warmup: float = 0.05            # fraction of all steps spent warming up
    label_smoothing: float = 0.1
    clip_grad: float = 1.0          # largest global gradient norm; 0: no clipping
    seed: int = 0
    image_size: int = 0             # 0: the data set's own size
    patch_size: int = 4
    dim: int = 256
    depth: int = 6
    heads: int = 8
    mlp_dim: int = 512
    dropout: float = 0.0
    pool: str = "cls"               # cls or mean
    augment: bool = True            # master switch for the two below
    crop_pad: Optional[int] = None  # random-crop padding in pixels; None: image side / 8
    flip: bool = True
    precision: str = "auto"         # auto, bf16, fp16 or fp32 (section 6)
    attn: str = "auto"              # auto, fused or manual (section 2)
    compile: bool = False
    data: str = "auto"              # auto, device or stream (section 7)


PRESETS = {
    "default": {},
    "cpu": dict(dataset="fashionmnist", epochs=25, batch_size=256, lr=3e-3, patch_size=7,
                dim=64, depth=3, heads=4, mlp_dim=128, crop_pad=1),
    "tiny": dict(dataset="cifar10", batch_size=256, lr=2e-3, dim=64, depth=6, heads=4, mlp_dim=128),
}
KNOWN_SIZES = {"cifar10": 32, "fashionmnist": 28}          # known before any download
MODEL_KEYS = ("image_size", "patch_size", "dim", "depth", "heads", "mlp_dim", "dropout", "pool")
CHOICES = {"pool": ("cls", "mean"), "precision": ("auto", "bf16", "fp16", "fp32"),
           "attn": ("auto", "fused", "manual"), "data": ("auto", "device", "stream")}


def validate(cfg):
    # Checked before anything is loaded, so a typo costs a second, not a download.
    def bad(name, rule):
        return UserError(f"--{name.replace('_', '-')} must {rule}, got {getattr(cfg, name)}.")
    for f in fields(cfg):                         # nan and inf pass every comparison below
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise bad(f.name, "be a finite number")
    for name in ("epochs", "batch_size", "lr", "patch_size", "dim", "depth", "heads", "mlp_dim"):
        if getattr(cfg, name) <= 0:
            raise bad(name, "be positive")
    for name in ("dropout", "warmup", "label_smoothing"):
        if not 0 <= getattr(cfg, name) < 1:
            raise bad(name, "be in [0, 1)")
    for name in ("image_size", "crop_pad", "weight_decay", "clip_grad"):
        if (getattr(cfg, name) or 0) < 0:
            raise bad(name, "not be negative")
    if cfg.lr > 1:                                # Adam moves each weight by about lr a step
        raise bad("lr", "be at most 1: AdamW moves every weight by about lr at each step")
    if cfg.lr * cfg.weight_decay >= 1:            # AdamW multiplies weights by 1 - lr * wd
        raise UserError(f"--lr {cfg.lr} times --weight-decay {cfg.weight_decay} must be below 1: "
                        f"AdamW multiplies every weight by 1 - lr * weight_decay at each step.")
    if cfg.dim % cfg.heads != 0:
        raise UserError(f"dim {cfg.dim} is not divisible by heads {cfg.heads}; every head must "
                        f"get an equal share of the width.")
    if cfg.batch_size < world_size():
        raise bad("batch_size", f"be at least the number of processes, {world_size()}")
    if cfg.data == "stream" and cfg.dataset.lower() in KNOWN_SIZES:
        raise UserError(f"--data stream reads an image folder from disk; {cfg.dataset} is read "
                        f"whole by torchvision and kept in memory.")
    size = cfg.image_size or KNOWN_SIZES.get(cfg.dataset.lower(), 0)   # 0: a folder, unknown
    if size % cfg.patch_size != 0:
        raise UserError(f"image size {size} is not divisible by patch size {cfg.patch_size}; "
                        f"choose --patch-size among its divisors.")


# -----------------------------------------------------------------------------------------
# 6. Device and precision
# Mixed precision ("autocast") runs the matrix products in a 16-bit format, which tensor
# cores execute several times faster than float32, while sums, norms, softmax and the loss
# stay in float32. Which 16-bit format pays depends on the hardware, so --precision auto
# reads the device and picks:
#   device                           auto   why
#   CUDA, compute capability >= 8.0  bf16   A100, H100, L4, RTX 30/40: bf16 tensor cores;
#                                           float32's exponent range, so nothing overflows
#   CUDA, compute capability < 8.0   fp16   T4 (Colab's free GPU), V100: fp16 tensor cores
#                                           (P100: fast fp16, no tensor cores); bf16 only
#                                           emulated. fp16's range ends at 65504 and small
#                                           gradients underflow to zero, so the loss is
#                                           scaled (GradScaler, section 8)
#   Apple MPS                        fp32   no measurement here says autocast pays on it
#   CPU with AVX512-BF16 or AMX      bf16   native bf16 instructions
#   any other CPU                    fp32   bf16 would be emulated: slower than float32
# torch.cuda.is_bf16_supported() cannot make this choice: it is True on a T4, because it
# counts emulation. From compute capability 8.0, float32 matrix products use TF32 (float32's
# range, 10 mantissa bits): PyTorch's default, exact float32, leaves the tensor cores idle.
# -----------------------------------------------------------------------------------------
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


def cpu_has_bf16():
    # True on CPUs with native bf16 instructions (AVX512-BF16, AMX). Elsewhere bf16 is
    # emulated and slower than fp32. (A private PyTorch query; False if it ever goes away.)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


AMP_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}      # fp32: no autocast


def precision_policy(requested, device):
    # Returns the precision's name and why it was chosen, for the line printed at start.
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = major >= 8
        where = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    elif device.type == "cpu":
        native = cpu_has_bf16()
        where = f"a CPU {'with' if native else 'without'} native bf16 (AVX512-BF16 or AMX)"
    else:
        native, where = False, "Apple MPS"
    if requested == "auto":
        name = "bf16" if native else "fp16" if device.type == "cuda" else "fp32"
    else:
        name = requested
        if name == "bf16" and not native and device.type != "mps":    # MPS: not measured
            print(f"note: bf16 is emulated on {where}: slower, not faster; --precision auto "
                  f"picks the fast choice.")
    return name, f"{'auto' if requested == 'auto' else 'asked for'}, on {where}"


def choose_precision(requested, device):
    # The policy's choice, the fast float32 kernels on CUDA, and a check that the installed
    # torch can run the choice here: some versions refuse some pairs (MPS autocast before
    # torch 2.5), others switch autocast off with only a warning, which here is an error.
    name, why = precision_policy(requested, device)
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] >= 8:      # TF32, by the newer API
            if hasattr(torch.backends.cuda.matmul, "fp32_precision"):   # (the older warns)
                torch.backends.cuda.matmul.fp32_precision = "tf32"
            else:
                torch.set_float32_matmul_precision("high")
        # cuDNN's attention kernel, which F.scaled_dot_product_attention may pick on H100s,
        # has had wrong results for sequence lengths not a multiple of 128 (ours: 65)
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with autocast(name, device):
                pass
            torch.amp.GradScaler(device.type, enabled=name == "fp16")
    except (RuntimeError, UserWarning) as e:
        raise UserError(f"torch {torch.__version__} cannot run {name} autocast on "
                        f"{device.type} ({str(e).splitlines()[0]}); use --precision fp32.") \
            from None
    return name, why


def autocast(precision, device):
    # No autocast context at all in float32: even a disabled torch.autocast(...) raises on
    # some versions (MPS had no autocast before torch 2.5).
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPE[precision])


# -----------------------------------------------------------------------------------------
# 7. Data: kept on the device as uint8, or streamed from disk
# Why on the device: a DataLoader decodes and augments each batch on the CPU and copies it
# to the GPU. For a model this small the GPU finishes a step sooner than a Colab CPU can
# prepare the next batch, so the GPU would wait. CIFAR-10 is only 184 MB as uint8: decoded
# once, it fits on any GPU, and cropping and flipping a batch there as tensor operations
# costs next to nothing. A folder too big for that (ImageNet-100 at 224 px is 20 GB) is
# streamed instead: a DataLoader's worker processes read each batch's files from disk while
# the device trains on the previous batch (section 11). Either way the batches hold the same
# images in the same order, and are augmented on the device in the same way.
# Training batches are augmented: a random crop from a zero-padded copy (the object may sit
# anywhere, and a ViT, unlike a CNN, must learn from examples that a shifted cat is a cat)
# and a random horizontal flip. The test split is never augmented: it measures the model on
# the images as they are, the same way every epoch. Both are normalised with the mean and
# std of the training split: the test split must not leak into anything we fit.
# -----------------------------------------------------------------------------------------
@dataclass
class Data:
    train_x: object                # (n_train, C, H, W) uint8 tensor, or ImageFiles (on disk)
    train_y: torch.Tensor          # (n_train,) int64
    test_x: object
    test_y: torch.Tensor
    classes: list
    mean: list                     # per channel, in [0, 1]
    std: list

    def to(self, device):
        for name in ("train_x", "train_y", "test_x", "test_y"):
            if isinstance(getattr(self, name), torch.Tensor):     # files stay on disk
                setattr(self, name, getattr(self, name).to(device))   # once, for the run
        # Kept on the device once: a tensor built from a list at every step would be a
        # host-to-device copy (and a wait) at every step.
        self.mean_t = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        self.std_t = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return self

    def normalize(self, x):
        return normalize(x, self.mean_t, self.std_t)


def normalize(x, mean, std):
    # uint8 (B, C, H, W) -> float, zero mean and unit variance per channel; mean, std: (1, C, 1, 1)
    return (x.float() / 255 - mean) / std


def channel_stats(chunks, channels, n_pixels):
    # Mean and std of each channel over the whole training split, from its images in chunks
    # (B, C, H, W) uint8. Normalising with them puts every input channel at zero mean and
    # unit variance, the scale the initial weights (section 4) were chosen for. Sums of
    # integers are exact, in any order and over any number of processes (section 9).
    total = torch.zeros(channels, dtype=torch.int64)              # (C,)
    total_sq = torch.zeros(channels, dtype=torch.int64)
    for chunk, _ in chunks:
        c = chunk.long()                                          # (b, C, H, W)
        total += c.sum(dim=(0, 2, 3))
        total_sq += (c * c).sum(dim=(0, 2, 3))
    all_sum(total), all_sum(total_sq)
    mean = total.double() / n_pixels / 255
    std = (total_sq.double() / n_pixels / 255 ** 2 - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()                            # std: E[x^2] - E[x]^2


def load_data(cfg, device):
    # Both splits as uint8 tensors on the CPU (or, streamed, as files), the class names, and
    # the training split's statistics; the caller moves the tensors to the device (Data.to).
    name = cfg.dataset.lower()
    if name in KNOWN_SIZES:                                       # torchvision's
        splits, classes = load_torchvision(name, cfg, device)
    elif os.path.isdir(cfg.dataset):
        splits, classes = together(lambda: load_image_folder(cfg, device))
    else:
        raise UserError(f"unknown dataset {cfg.dataset!r}: use cifar10, fashionmnist, or the "
                        f"path of a folder with train/ and test/ subfolders.")
    train_x, train_y, test_x, test_y = splits                     # (n, C, H, W) and (n,)
    n, C, H, W = train_x.shape
    lo, hi = my_share(0, n)                       # under torchrun, each process a share
    chunks = [(i, min(i + 256, hi)) for i in range(lo, hi, 256)]  # 256 images at a time
    mean, std = channel_stats(batches(train_x, train_y, chunks), C, n * H * W)
    return Data(train_x, train_y.long(), test_x, test_y.long(), classes, mean, std)


def batches(x, y, spans, order=None):
    # The images (uint8, on the device) and labels of each span [a, b) of `order` (None: the
    # stored order). Kept on the device: indexing. Streamed: a DataLoader reads the same
    # images from disk, in the same order (section 11).
    order = torch.arange(len(y)) if order is None else order
    where = order.to(y.device)                                    # once, not at every step
    if isinstance(x, torch.Tensor):
        images = (x[where[a:b]] for a, b in spans)
    else:
        images = stream(x, [order[a:b].tolist() for a, b in spans], y.device)
    for x_ab, (a, b) in zip(images, spans):   # images first: it ends as a stream should
        yield x_ab, y[where[a:b]]


def epoch_plan(n, cfg, epoch, device):
    # The order of the training images and the crop and flip of each position in it, drawn
    # for a whole epoch from a generator seeded by (seed, epoch) alone: a resumed run draws
    # the plan the uninterrupted run drew, and the processes of a data-parallel run (section
    # 9) all draw the same plan without a word between them.
    g = torch.Generator().manual_seed(cfg.seed * 1_000_000 + epoch)
    order = torch.randperm(n, generator=g)                        # a new order every epoch
    pad = cfg.crop_pad if cfg.augment else 0
    shift = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)    # (n, 2): rows, columns
    mirror = torch.rand(n, generator=g) < 0.5                     # (n,): a coin for each
    return order, pad, shift.to(device), mirror.to(device) if cfg.augment and cfg.flip else None


def augment(x, pad, shift, mirror):
    # x: (B, C, H, W) uint8 on the device. Random crop of the original size from a copy
    # padded with zeros, shifted by `shift` (B, 2), done as one gather; then a horizontal
    # flip of the images where `mirror` (B,) is True. Every image gets its own shift and
    # coin, so no two epochs see the same batch. The crop's padding is the knob: 1/8 of the
    # side on CIFAR-10 (4 pixels); on 28x28 FashionMNIST with 7x7 patches, 1 pixel did
    # better (the README's tuning table).
    B, C, H, W = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))                   # (B, C, H+2p, W+2p)
        rows = shift[:, 0].view(B, 1, 1, 1) + torch.arange(H, device=x.device).view(1, 1, H, 1)
        cols = shift[:, 1].view(B, 1, 1, 1) + torch.arange(W, device=x.device).view(1, 1, 1, W)
        batch = torch.arange(B, device=x.device).view(B, 1, 1, 1)
        chans = torch.arange(C, device=x.device).view(1, C, 1, 1)
        x = padded[batch, chans, rows, cols]                      # (B, C, H, W)
    if mirror is not None:
        x = torch.where(mirror.view(B, 1, 1, 1), x.flip(3), x)    # (B, C, H, W)
    return x


# -----------------------------------------------------------------------------------------
# 8. Training
# One step, in this order (train_step):
#   1. forward under autocast (section 6), and the loss: cross-entropy with label smoothing
#      0.1, i.e. the target is 0.9 on the true class plus 0.1 spread over all classes. A
#      one-hot target can only be met by infinite logits, so the model would keep growing
#      its weights on examples it already gets right; a smoothed one is met by finite logits.
#   2. backward: gradients of the loss for every parameter, added into .grad (so zeroed
#      first). In fp16 the loss is first multiplied by a large scale (2^16 to start): the
#      gradients are multiplied too, and small ones no longer underflow fp16 to zero.
#   3. unscale: divide the gradients by that scale again, before anything reads them.
#   4. clip: if the global gradient norm exceeds 1.0 (--clip-grad; 0: never), shrink all
#      gradients in proportion, so one unlucky batch cannot throw the weights far.
#   5. optimizer step (AdamW). In fp16 the scaler skips it if any gradient overflowed to inf
#      or NaN, and halves its scale; after 2000 clean steps it doubles it again.
#   6. scheduler step: the learning rate for the next step. It steps on skipped steps too:
#      the schedule is a function of the step number and still ends at zero on the last one.
# AdamW: Adam divides each weight's step by the running size of its gradients, so every
# weight learns at a sensible speed whatever its scale. Its weight decay pulls the weights
# towards zero directly (decoupled: Adam's scaling would otherwise weaken it), a pressure
# towards simple solutions. Biases, LayerNorm gains, the CLS token and the position
# embedding get no decay: pulling a LayerNorm gain towards zero silences its features, and
# these few numbers are not what overfits.
# Warmup then cosine: at the start Adam's running averages rest on a handful of batches, its
# steps are unreliable, and large ones can wreck the attention; so the learning rate rises
# linearly from 0.1% of its peak over the first 5% of steps. Then it follows half a cosine
# down to exactly zero at the last step: large steps while far from a good solution, ever
# smaller ones to settle into it. Hence a 30-epoch run is not the first 30 epochs of a
# 50-epoch run: each schedule ends where its budget ends.
# Losses and accuracies are summed on the device and read once per epoch (and the loss at
# the ~20 progress lines): every .item() makes the CPU wait for the GPU to catch up.
# -----------------------------------------------------------------------------------------
def use_fused_attn(cfg, device):
    # PyTorch's fused CPU kernel has a slow backward pass. On a 2-core CPU, python vit.py
    # --benchmark --preset cpu trained at 9,741 img/s with the hand-written path against
    # 1,831 with --attn fused in bf16 (7,079 against 5,263 in fp32). On GPUs the fused kernels
    # are the fast ones (FlashAttention from compute capability 8.0, a memory-efficient kernel
    # on a T4 or V100), so "auto" uses them everywhere but on the CPU.
    return cfg.attn == "fused" or (cfg.attn == "auto" and device.type != "cpu")


def build_model(cfg, in_channels, num_classes, device):
    return ViT(cfg.image_size, cfg.patch_size, in_channels, num_classes, cfg.dim, cfg.depth,
               cfg.heads, cfg.mlp_dim, cfg.dropout, use_fused_attn(cfg, device), cfg.pool)


def build_optimizer(model, cfg, epoch_steps):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n
             and "cls_token" not in n]                            # the weight matrices
    no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    total = cfg.epochs * epoch_steps
    warmup = max(1, round(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, total))
    return opt, sched


def lr_factor(step, warmup, total):
    # The learning rate before step `step` (0, 1, ..., total), as a fraction of the peak: a
    # pure function of the step, so a resumed run, even one given a new --epochs, gets
    # exactly the new schedule's value by setting the step (restore, section 10).
    if step < warmup:
        return 1e-3 + (1 - 1e-3) * step / warmup                 # linear, from 0.1%
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))               # half a cosine, to 0


def step_schedule(sched):
    # PyTorch warns when the schedule steps while the optimizer did not (a step the fp16
    # scaler skipped, or the first step of a resumed run); here that is meant.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        sched.step()


def train_step(model, x, y, opt, sched, scaler, cfg, precision, device, share=1.0):
    # share: this process's part of the global batch, times the number of processes (1.0
    # on one device): DDP averages the processes' gradients, and so weighted, their average
    # is the gradient of the whole batch's mean loss, even for an uneven last batch.
    with autocast(precision, device):
        logits = model(x)                                         # (B, K)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)                               # None: no zeros written
    scaler.scale(loss * share).backward()                         # (not fp16: loss as is)
    scaler.unscale_(opt)
    if cfg.clip_grad > 0:                                         # 0: no clipping
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    scaler.step(opt)
    scaler.update()
    step_schedule(sched)
    return logits, loss


def steps_per_epoch(n_train, cfg):
    # torch.compile builds kernels for one batch shape, and a ragged last batch would compile
    # them all again; so a compiled run drops it, as DataLoader(drop_last=True) would (on
    # CIFAR-10: 336 of 50,000 images, other ones each epoch, since the order is reshuffled).
    # So does a data-parallel run whose last batch has fewer images than processes.
    last = n_train % cfg.batch_size
    if n_train > cfg.batch_size and last and (cfg.compile or last < world_size()):
        return n_train // cfg.batch_size
    return math.ceil(n_train / cfg.batch_size)


def train_one_epoch(model, data, opt, sched, scaler, cfg, precision, device, epoch):
    model.train()                                                 # dropout on
    n, bs = len(data.train_y), cfg.batch_size                     # images, batch size
    steps = steps_per_epoch(n, cfg)
    seen = min(n, steps * bs)
    order, pad, shift, mirror = epoch_plan(n, cfg, epoch, device)
    # Batch s is positions s*bs to (s+1)*bs - 1 of `order`; this process trains on its share
    # of each (section 9), which on one device is the whole batch.
    spans = [my_share(s * bs, min(n, s * bs + bs)) for s in range(steps)]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    # In a terminal or notebook one progress line is rewritten 20 times an epoch, in a log
    # file 4 lines are written. Rank 0's screen decides for all: every process must reach
    # the progress line's all-reduce at the same steps.
    live = from_rank_0(sys.stdout.isatty() or in_notebook())
    show_every = max(1, steps // (20 if live else 4))
    t0 = time.time()
    for step, (x, y) in enumerate(batches(data.train_x, data.train_y, spans, order)):
        a, b = spans[step]                                        # positions in the epoch
        x = augment(x, pad, shift[a:b], None if mirror is None else mirror[a:b])
        x = data.normalize(x)                                     # (B, C, H, W) float
        share = len(y) * world_size() / min(bs, n - step * bs)    # 1.0 on one device
        logits, loss = train_step(model, x, y, opt, sched, scaler, cfg, precision, device,
                                  share)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
        if (step + 1) % show_every == 0 and step + 1 < steps:
            value = all_sum(loss.detach() * share).item() / world_size()   # the global batch's
            if not math.isfinite(value):
                return math.nan, math.nan                         # diverged: train_run stops
            rate = (step + 1) * bs / (time.time() - t0)
            msg = f"  epoch {epoch} [{step + 1}/{steps}] loss {value:.3f} {rate:,.0f} img/s"
            print("\r" + msg if live else msg, end="" if live else "\n", flush=True)
    if live:
        print("\r" + " " * 60 + "\r", end="")
    return all_sum(loss_sum).item() / seen, all_sum(correct).item() / seen


@torch.no_grad()                  # no graph for backward: faster, and less memory
def evaluate(model, data, cfg, precision, device):
    # The mean loss (label-smoothed like training's, so the two curves compare), the
    # accuracy, and every prediction (for the confusion matrix). eval() turns dropout off.
    # A compiled model sees one batch shape only: the last batch is padded with blank
    # images, whose outputs are dropped.
    # Under torchrun each process evaluates its share of the test split, and the sums
    # (each prediction is written by one process, zeros elsewhere) make the whole.
    model.eval()
    n, bs = len(data.test_y), cfg.batch_size
    lo, hi = my_share(0, n)
    spans = [(i, min(i + bs, hi)) for i in range(lo, hi, bs)]
    loss_sum = torch.zeros((), device=device)
    preds = torch.zeros(n, dtype=torch.long, device=device)       # (n,)
    for (x, y), (a, b) in zip(batches(data.test_x, data.test_y, spans), spans):
        if cfg.compile and len(x) < bs:                           # never augmented
            x = torch.cat([x, x.new_zeros(bs - len(x), *x.shape[1:])])
        with autocast(precision, device):
            logits = model(data.normalize(x))[:len(y)]            # (B, K)
        loss_sum += F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing,
                                    reduction="sum")
        preds[a:b] = logits.argmax(dim=1)
    preds = all_sum(preds)
    acc = (preds == data.test_y).float().mean().item()
    return all_sum(loss_sum).item() / n, acc, preds


# -----------------------------------------------------------------------------------------
# 9. Many devices: data parallel, with torchrun
# `torchrun --nproc-per-node=N vit.py ...` starts N copies of this program, one per GPU (or
# N processes on a CPU), and tells each its rank, 0 to N-1, in environment variables.
# Data parallelism: every process holds the same model and the same optimizer. At each step
# each takes its own share of the global batch (--batch-size images in all, cut into N
# nearly equal parts), computes the loss on it and the gradients, and then the processes
# average their gradients: an all-reduce, after which every process holds the sum of all
# processes' tensors (then divided by N). The gradient of a sum is the sum of the gradients,
# so with each share's loss weighted by its size (train_step), that average is exactly the
# gradient of the mean loss over the whole batch. Every process then takes the same AdamW
# step from the same weights, and the copies never drift apart: the run is the one-device
# run with the same --batch-size, up to rounding (the sums are added in another order),
# with each device doing 1/N of the work. PyTorch's DistributedDataParallel (DDP) runs the
# all-reduce inside backward(), a bucket of gradients at a time, while the next bucket's
# gradients are still being computed, so the communication mostly hides behind the work.
# What the processes agree on without a word: the initial weights (the same seed; DDP
# copies rank 0's too) and each epoch's order and augmentation (epoch_plan, section 7).
# What they add up by all-reduce: the gradients, the losses and correct predictions of
# training and evaluation, and the pixel sums of the channel statistics. Rank 0 alone
# prints and writes files (the run folder, checkpoints, figures); together() tells the
# others whether that worked, so that a full disk stops every process with one sentence,
# rather than leaving N-1 waiting for rank 0.
# -----------------------------------------------------------------------------------------
def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def my_share(a, b):
    # This process's part of positions a, ..., b-1: N runs in rank order, the first
    # (b - a) % N of them one longer than the rest (torch.tensor_split's rule).
    q, r = divmod(b - a, world_size())
    start = a + rank() * q + min(rank(), r)
    return start, start + q + (rank() < r)


def all_sum(t):
    # The sum of `t` over all processes, on every process; in place. (SUM, not AVG: gloo on
    # older torch has no AVG. NCCL sums GPU tensors only.)
    if world_size() > 1:
        u = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(u)
        t.copy_(u)
    return t


def together(fn, here=True):
    # fn() on the processes where `here` holds (a file: on rank 0 alone); then every process
    # learns whether it failed anywhere, and if so, all stop with its sentence (printed by
    # rank 0) instead of waiting forever at the next all-reduce for one that has stopped.
    result, error = None, None
    try:
        if here:
            result = fn()
    except UserError as e:
        error = e
    if world_size() > 1:
        errors = [None] * world_size()
        dist.all_gather_object(errors, None if error is None else str(error))
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed and error is None:
            r, message = failed[0]
            error = UserError(message if r == 0 else f"process {r}: {message}")
    if error is not None:
        raise error
    return result


def from_rank_0(obj):
    # Rank 0's value of obj, on every process (e.g. the name of the run folder it made).
    if world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def start_processes(name):
    # The device of this process. Under torchrun (WORLD_SIZE > 1): one GPU per process,
    # numbered by LOCAL_RANK on each machine, joined by NCCL; CPU processes by gloo.
    device = pick_device(name)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return device
    if not dist.is_available():
        raise UserError("this torch has no torch.distributed; run `python vit.py` instead.")
    if device.type == "mps":
        raise UserError("torchrun cannot use Apple's MPS (torch.distributed has no backend "
                        "for it); run `python vit.py` instead.")
    if device.type == "cuda":
        n, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if n > gpus:
            raise UserError(f"torchrun started {n} processes on a machine with {gpus} "
                            f"GPU(s); use --nproc-per-node={gpus}.")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (ValueError, RuntimeError) as e:       # e.g. WORLD_SIZE set, but no torchrun
        raise UserError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']}, but the other processes "
                        f"cannot be reached ({str(e).splitlines()[0][:150]}); start vit.py "
                        f"with torchrun, or unset WORLD_SIZE.") from None
    if rank() != 0:                               # one copy of every line: rank 0's
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
    # DDP warns that the CLS token's gradient (a sum over the batch, laid out as a slice of
    # a larger one) must be copied into its all-reduce bucket: true, and for D numbers.
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    return device


# -----------------------------------------------------------------------------------------
# 10. Checkpoints and run folders: written atomically, loaded safely, never overwritten
# model.pth is what you would ship: the weights, the model's configuration as plain data,
# the class names and the normalisation, all that --eval and --predict need.
# checkpoint.pth is what resuming needs to give exactly the numbers of a run never stopped:
# every state the next step reads. The weights; AdamW's two running averages per weight and
# its step count; the epoch, from which the schedule's step follows; the fp16 scaler's
# scale; the random generators, which draw dropout's masks (the CPU's, and the one of the
# GPU or Mac in use); and the metrics and configuration so far. (The order, crops and flips
# need no saved state: they are drawn anew from (seed, epoch), section 7.)
# Both are written to a temporary file and renamed, so a crash mid-write never leaves a
# half-written file. Both are loaded with weights_only=True: the unpickler then accepts only
# tensors and plain containers, so a booby-trapped file cannot run code. A run folder holds
# one run: a new run never writes into a folder that holds one, and a run locks its folder
# while it writes, so finished work is never overwritten.
# -----------------------------------------------------------------------------------------
def write_atomically(path, write):
    # write(tmp) writes the file under a temporary name; only a complete file is renamed to
    # `path`. A failed write (a full disk, no permission, Ctrl-C) removes the temporary file
    # and leaves the previous file at `path` as it was.
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)                                     # atomic on one file system
    except (OSError, RuntimeError) as e:     # torch.save reports a full disk as RuntimeError
        cause = e.strerror if isinstance(e, OSError) and e.strerror else \
            "the write stopped short, as on a full disk"
        raise UserError(f"could not write {path!r} ({cause}); any earlier version of it is "
                        f"kept.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def writable_folder(path):
    # Made and tried before any data is read: a typo in --out costs a second, not a run.
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"cannot write in the folder {path!r} ({e.strerror or e}).") from None
    return path


def claim_run_folder(out):
    # A run folder holds one run. A new run claims its folder by creating metrics.json with
    # O_EXCL, which fails if the file exists: of two runs aimed at one folder, exactly one
    # gets it, and a folder that holds a run (even a finished one) is never written over.
    writable_folder(out)
    ckpt = os.path.join(out, "checkpoint.pth")
    try:
        if os.path.exists(ckpt) or os.path.exists(os.path.join(out, "model.pth")):
            raise FileExistsError
        fd = os.open(os.path.join(out, "metrics.json"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        hint = (f"continue it with --resume {ckpt}" if os.path.exists(ckpt) else
                "it is running, or stopped before its first epoch ended (then delete it)")
        raise UserError(f"{out!r} already holds a run; {hint}, or choose another --out.") \
            from None
    except OSError as e:
        raise UserError(f"cannot write in the run folder {out!r} ({e.strerror or e}).") from None
    with os.fdopen(fd, "w") as f:
        f.write("[]\n")                                           # no epoch yet


def lock_run_folder(out):
    # Held while a run (new or resumed) writes its folder, so that two processes never write
    # one folder at once. The operating system drops the lock when the process ends, however
    # it ends (a killed Colab session leaves no stale lock). No flock on Windows: there only
    # the claim above guards the folder.
    try:
        import fcntl
    except ImportError:
        return None
    lock = open(os.path.join(out, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):               # held by another process
            raise UserError(f"another run is writing {out!r} now; wait for it to end, or "
                            f"choose another --out.") from None
        return None                                               # a file system without locks
    return lock


def saved_epoch(out):
    # The epoch of the checkpoint in `out`, 0 if none: what a stopped run has kept.
    ckpt = os.path.join(out, "checkpoint.pth")
    return torch.load(ckpt, weights_only=True)["epoch"] if os.path.exists(ckpt) else 0


def release_run_folder(out):
    # A run that ends before its first checkpoint leaves nothing worth keeping: give the
    # folder back, so that the same command can be run again.
    for name in ("metrics.json", "patches.png", ".lock"):         # written before epoch 1
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out, name))
    with contextlib.suppress(OSError):
        os.rmdir(out)                                             # only if now empty


def new_run_folder(cfg):
    # runs/NAME-DATE-TIME; a second run started in the same second gets -2, and so on:
    # os.mkdir either creates the folder or fails, so two runs cannot both get one name.
    name = os.path.basename(os.path.normpath(cfg.dataset)).lower()    # cifar10, my-photos
    base = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.makedirs("runs", exist_ok=True)
        for n in range(1, 1000):
            out = base if n == 1 else f"{base}-{n}"
            with contextlib.suppress(FileExistsError):
                os.mkdir(out)
                return out
    except OSError as e:
        raise UserError(f"cannot create a run folder under {os.path.abspath('runs')!r} "
                        f"({e.strerror or e}); choose one with --out.") from None
    raise UserError(f"{base}-* are all taken; choose a run folder with --out.")


def load_file(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist.")
    if not zipfile.is_zipfile(path):                              # torch.save writes a zip
        raise UserError(f"{what} {path!r} is corrupt or is not a PyTorch file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)   # GPU-saved: on CPU
    except pickle.UnpicklingError:
        raise UserError(f"{what} {path!r} was refused: it holds objects other than tensors and "
                        f"plain data, and loading it could run code.") from None
    except Exception:
        raise UserError(f"{what} {path!r} is corrupt or is not a PyTorch file.") from None
    if not isinstance(obj, dict) or "config" not in obj or "classes" not in obj:   # foreign
        raise UserError(f"{what} {path!r} was not written by vit.py.")
    return obj


def rng_state(device):
    # Dropout's draws continue from these states: saved, they make the resumed epochs draw
    # exactly what the uninterrupted run would have. Only the device in use: a run saved on
    # a 2-GPU machine must resume on a 1-GPU one.
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and state.get("mps") is not None:
        torch.mps.set_rng_state(state["mps"])


def save_checkpoint(out, cfg, data, model, opt, sched, scaler, metrics, device):
    # Written after every epoch: a crash or a closed Colab tab loses at most one epoch.
    # (The disabled scaler of a bf16 or fp32 run saves an empty dict.)
    weights = model.state_dict()
    atomic_save({"config": asdict(cfg), "model": weights,
                 "optimizer": opt.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": metrics[-1]["epoch"],
                 "rng": rng_state(device), "metrics": metrics, "classes": data.classes,
                 "mean": data.mean, "std": data.std}, os.path.join(out, "checkpoint.pth"))
    # model.pth: plain data only, no pickled Config object, so that any later vit.py (and
    # any other program) can read it with weights_only=True.
    model_cfg = {k: getattr(cfg, k) for k in MODEL_KEYS}
    model_cfg["in_channels"] = data.train_x.shape[1]
    atomic_save({"config": model_cfg, "state_dict": weights, "classes": data.classes,
                 "mean": data.mean, "std": data.std, "dataset": cfg.dataset,
                 "data_root": cfg.data_root}, os.path.join(out, "model.pth"))
    save_metrics(metrics, out)


def save_metrics(metrics, out):
    # allow_nan=False: NaN is not JSON; train_run stops a diverged run before it gets here.
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=1, allow_nan=False)
    write_atomically(os.path.join(out, "metrics.json"), write)


def load_weights(model, state_dict, path):
    # load_state_dict is strict: every name and every shape must match, or it says which
    # do not; that sentence, not its traceback, is what the user needs.
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[-1].strip()[:200]
        raise UserError(f"the weights in {path!r} do not fit this model ({first}).") from None


def check_fits(saved_classes, data, path):
    if list(saved_classes) != list(data.classes):
        raise UserError(f"{path!r} was trained on classes {list(saved_classes)[:5]}..., but "
                        f"this data has {data.classes[:5]}...; it does not fit this data.")


def restore(ckpt, path, cfg, data, model, opt, sched, scaler, steps, device):
    # Puts a fresh setup back where the checkpoint left off. The optimizer is built first
    # and then loaded (rather than pickled whole) so that its state lands on this device.
    check_fits(ckpt["classes"], data, path)
    load_weights(model, ckpt["model"], path)
    opt.load_state_dict(ckpt["optimizer"])
    # The schedule is a formula of the step (section 8): put it at the steps already done, for
    # this run's length, which a new --epochs may have changed.
    sched.last_epoch = ckpt["epoch"] * steps - 1
    step_schedule(sched)
    if scaler.is_enabled() and ckpt.get("scaler"):                # an fp16 run's scale
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], device)
    return ckpt["metrics"]                                        # one record per epoch done


# -----------------------------------------------------------------------------------------
# 11. Data files: torchvision's data sets, your image folders, your images
# load_data (section 7) gets CIFAR-10 and FashionMNIST from torchvision, and reads a folder
# data set, as --predict reads your images, with read_image. Real folders are untidy: gray
# and colour images mixed, an odd size, 16-bit scans, phone photos stored sideways,
# notebook and macOS litter. Each is handled here, or refused in one sentence. A data set
# too big to keep in memory is left on disk and streamed (keep_on_device decides; ImageFiles
# and stream read it).
# -----------------------------------------------------------------------------------------
OFFLINE_HINT = ("if this machine is offline, point --data-root at a folder that already holds "
                "the data set, or --dataset at an image folder with train/ and test/ subfolders")


def load_torchvision(name, cfg, device):
    # torchvision's classes download the files once (CIFAR-10 170 MB, FashionMNIST 30 MB)
    # and keep every image of a split in one array: .data, (n, H, W, C) or (n, H, W) uint8.
    # They are always kept on the device; only another --image-size could make them large.
    import torchvision
    cls = {"cifar10": torchvision.datasets.CIFAR10,
           "fashionmnist": torchvision.datasets.FashionMNIST}[name]
    def get(train):
        try:
            return cls(cfg.data_root, train=train, download=True)
        except Exception as e:        # URLError, RuntimeError, ...: all mean "no data"
            reason = " ".join(str(e).split())                    # one line
            raise UserError(f"could not find or download {name} in {cfg.data_root!r} "
                            f"({reason}); {OFFLINE_HINT}.") from None
    splits = []
    for train in (True, False):
        # Under torchrun rank 0 first: it downloads the files, and the others then find them.
        ds = together(lambda: get(train), rank() == 0)
        ds = together(lambda: get(train), rank() > 0) or ds
        x = torch.as_tensor(ds.data)                              # (n, H, W[, C]) uint8
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)   # (n, C, H, W)
        splits += [x.contiguous(), torch.as_tensor(ds.targets)]
    size = cfg.image_size or splits[0].size(-1)
    n = len(splits[1]) + len(splits[3])
    keep_on_device(f"{name} at {size}x{size} px", n, (splits[0].size(1), size, size), cfg,
                   device, streamable=False)
    if size != splits[0].size(-1):                                # resized once, in chunks
        for i in (0, 2):
            splits[i] = torch.cat([F.interpolate(c.float(), size=size, mode="bilinear",
                                                 antialias=True).round().clamp(0, 255).byte()
                                   for c in splits[i].split(256)])
    return splits, list(ds.classes)


def read_image(path, mode, size):
    # One image file -> uint8 (C, size, size), the way every image of a folder data set is
    # read, and the way --predict reads yours: turned upright as its EXIF tag says (phones
    # store photos sideways and record how to turn them), brought to 8 bits, converted to
    # the model's channels ("L" gray or "RGB"), the shorter side resized to `size`, and
    # the centre cut square.
    from PIL import Image, ImageOps
    from torchvision.transforms import functional as TF
    if os.path.isdir(path):
        raise UserError(f"{path!r} is a folder; give image files (for example {path}/*.jpg).")
    if not os.path.isfile(path):
        raise UserError(f"image {path!r} does not exist.")
    try:
        with Image.open(path) as im:
            im = to_8_bits(ImageOps.exif_transpose(im)).convert(mode)
            if im.size != (size, size):
                im = TF.center_crop(TF.resize(im, size, antialias=True), size)
            return TF.pil_to_tensor(im)                           # (C, size, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {path!r} as an image ({e}).") from None


def to_8_bits(im):
    # Pillow's convert() clips 16-bit and float pixels to 0..255 instead of scaling them: a
    # 16-bit scan would come out white, a float one (0..1) black. Scale them ourselves.
    import numpy as np
    from PIL import Image
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im                                                 # already 8 bits a channel
    x = np.asarray(im, dtype=np.float64)
    scale = 255 / 65535 if im.mode.startswith("I") else 255 if x.max() <= 1 else 1
    return Image.fromarray((x * scale).round().clip(0, 255).astype(np.uint8))   # mode "L"


GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}   # Pillow's


def list_split(folder):
    # torchvision's ImageFolder layout: folder/<class>/**/*.jpg, classes sorted by name give
    # the labels. Hidden entries (.ipynb_checkpoints/, macOS's ._photo.jpg) are not data.
    from torchvision.datasets.folder import IMG_EXTENSIONS
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir()
                     and not e.name.startswith("."))
    files, labels = [], []
    for k, c in enumerate(classes):
        for root, dirs, names in os.walk(os.path.join(folder, c), followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found = sorted(n for n in names if n.lower().endswith(IMG_EXTENSIONS)
                           and not n.startswith("."))
            files += [os.path.join(root, n) for n in found]
            labels += [k] * len(found)
    return files, torch.tensor(labels, dtype=torch.long), classes


def refuse_unreadable(bad):
    # Every unreadable file in one message: fixing them one run at a time is no fun.
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserError(f"{len(bad)} files cannot be read as images: {', '.join(bad[:3])}"
                        f"{more}; remove or replace them.")


def load_image_folder(cfg, device):
    # Your own data: folder/train/<class>/... and folder/test/<class>/... . Every image is
    # brought to one size and one channel count, so that a split is one tensor: RGB if any
    # image has colour, else gray; the size of --image-size, else the commonest shorter side.
    # A first pass reads only the files' headers (cheap) to decide both, and whether the
    # data fits (section 7); the second decodes each image straight into its slot of a
    # tensor allocated once, or, streamed, each batch's images when training needs them.
    path, image_size = cfg.dataset, cfg.image_size
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS
    missing = [s for s in ("train", "test") if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise UserError(f"{path!r} has no {' or '.join(s + '/' for s in missing)} subfolder; an "
                        f"image folder needs train/<class>/... and test/<class>/... images.")
    try:
        (train_files, train_y, classes), (test_files, test_y, test_classes) = (
            list_split(os.path.join(path, s)) for s in ("train", "test"))
    except OSError as e:                                          # e.g. no permission
        raise UserError(f"cannot read the image folder {path!r} ({e}).") from None
    if classes != test_classes:
        raise UserError(f"train/ and test/ of {path!r} hold different classes "
                        f"({classes} vs {test_classes}).")
    if len(classes) < 2:
        raise UserError(f"{path!r} has {len(classes)} class folder(s) in train/; a classifier "
                        f"needs at least two.")
    empty = [c for k, c in enumerate(classes) if not (train_y == k).any()]
    if empty or not test_files:
        raise UserError(f"{path!r} has no images in " + (f"train/{empty[0]}/" if empty else
                        "test/") + f" (image files end in {', '.join(IMG_EXTENSIONS)}).")
    modes, shapes, bad = set(), Counter(), []
    for file in train_files + test_files:
        try:
            with Image.open(file) as im:                          # reads the header only
                modes.add(im.mode)
                shapes[im.size] += 1                              # (width, height)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            bad.append(file)
    refuse_unreadable(bad)
    mode = "L" if modes <= GRAY_MODES else "RGB"
    sides = Counter()
    for shape, n in shapes.items():
        sides[min(shape)] += n
    size = image_size or sides.most_common(1)[0][0]               # the commonest shorter side
    resized = sum(n for shape, n in shapes.items() if shape != (size, size))
    print(f"images: {'RGB' if mode == 'RGB' else 'gray'}, {size}x{size} px "
          f"({'--image-size' if image_size else 'the commonest size'}); {resized:,} of "
          f"{len(train_files) + len(test_files):,} resized or cropped")
    shape = (1 if mode == "L" else 3, size, size)
    keep = keep_on_device(f"{len(train_files) + len(test_files):,} images of {shape}",
                          len(train_files) + len(test_files), shape, cfg, device)
    splits = []
    for files, y in ((train_files, train_y), (test_files, test_y)):
        x = ImageFiles(files, mode, size)                         # streamed: left on disk
        if keep:
            x = torch.empty(len(files), *shape, dtype=torch.uint8)
            for i, file in enumerate(files):
                try:
                    x[i] = read_image(file, mode, size)           # (C, S, S)
                except UserError:
                    bad.append(file)
        splits += [x, y]
    refuse_unreadable(bad)
    return splits, classes


def keep_on_device(what, n_images, shape, cfg, device, streamable=True):
    # Before any pixel is read: the data set's size as uint8 against the free memory of the
    # device (and of the RAM it is read into on the way, shared by this machine's processes).
    # Kept on the device if it takes at most half of it, which leaves room for the model,
    # the activations and the rest of the machine; else streamed. --data overrides.
    need = n_images * math.prod(shape) / 1e9                      # GB
    free = free_memory(device)
    fits = free is None or need <= free / 2e9
    have = "free memory unknown" if free is None else f"{free / 1e9:.1f} GB free"
    if not fits and (cfg.data == "device" or not streamable):
        raise UserError(f"{what} is {need:.2f} GB as uint8, more than half of the {have} on "
                        f"{device}; " + ("use --data stream (or auto) to read it from disk."
                                         if streamable else "use a smaller --image-size."))
    keep = not streamable or cfg.data == "device" or (cfg.data == "auto" and fits)
    print(f"data: {what}, {need:.2f} GB as uint8, {have} on {device}: " +
          ("kept on the device" if keep else "streamed from disk") + f" (--data {cfg.data})")
    return keep


def free_memory(device):
    # Bytes free on a GPU, or in RAM (Linux's MemAvailable, shared by the processes of a
    # torchrun node): whichever is less. None where RAM cannot be read (macOS, Windows).
    ram = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as f:
            kb = next(line for line in f if line.startswith("MemAvailable:")).split()[1]
            ram = int(kb) * 1024 // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cuda":
        gpu = torch.cuda.mem_get_info(device)[0]
        return gpu if ram is None else min(gpu, ram)
    return ram


class ImageFiles(torch.utils.data.Dataset):
    # A split left on disk: image i is read by read_image when a batch needs it, exactly as
    # the in-memory path reads it. Indexed like the (n, C, S, S) tensor it stands for: an
    # int gives one image, a slice or a tensor of indices a stack of them.
    def __init__(self, files, mode, size):
        self.files, self.mode, self.size = files, mode, size
        self.shape = (len(files), 1 if mode == "L" else 3, size, size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        if isinstance(i, int):
            return read_image(self.files[i], self.mode, self.size)   # (C, S, S) uint8
        picked = range(len(self))[i] if isinstance(i, slice) else i.tolist()
        x = torch.empty(len(picked), *self.shape[1:], dtype=torch.uint8)   # (B, C, S, S)
        for k, j in enumerate(picked):
            x[k] = self[j]
        return x


def stream(files, index_lists, device):
    # The batches of ImageFiles `files` given by index_lists, on the device. DataLoader's
    # worker processes (one per CPU core this process may use, up to 8) decode the files
    # of the next batches while the device trains on this one; on CUDA into pinned (page-
    # locked) memory, from which the copy runs without making the CPU wait for it.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(8, max(1, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if in_notebook() and torch.multiprocessing.get_start_method() != "fork":
        workers = 0           # spawned workers cannot find a class defined in a notebook
    loader = torch.utils.data.DataLoader(files, batch_sampler=index_lists, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         worker_init_fn=quiet_worker)
    with ctrl_c_held():
        loaded = iter(loader)                                     # the workers start
    try:
        for x in loaded:
            yield x.to(device, non_blocking=True)                 # (B, C, S, S) uint8
    except UserError as e:    # raised in a worker, and wrapped in its traceback: one line
        raise UserError(str(e).strip().splitlines()[-1].split("UserError: ")[-1]) from None
    except RuntimeError as e:
        if not str(e).startswith("DataLoader worker"):            # e.g. killed for memory
            raise
        raise UserError(f"a process reading the images stopped ({str(e).splitlines()[0]}); "
                        f"the checkpoints written so far are kept.") from None
    finally:
        with ctrl_c_held():
            del loaded                                            # the workers stop


@contextlib.contextmanager
def ctrl_c_held():
    # Ctrl-C reaches every process of the terminal's group. While workers start and stop, it
    # is only noted, and raised right after: a worker hit as it starts would end the run in a
    # traceback, and a Ctrl-C inside DataLoader's own clean-up would be swallowed. The
    # workers (forked while it is held) then ignore it; the main process stops the run in
    # one sentence (run_in_folder).
    pressed = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    except ValueError:                 # not the main thread: its signals are not ours
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if pressed:
            raise KeyboardInterrupt


def quiet_worker(worker_id):
    # A worker ignores Ctrl-C (ctrl_c_held), and says nothing when the main process, so
    # stopped, breaks off a batch being handed over: a closed connection, which the thread
    # that hands tensors over (multiprocessing's resource sharer) reports to sys.excepthook.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = lambda kind, error, trace: (
        None if issubclass(kind, (EOFError, OSError)) else sys.__excepthook__(kind, error, trace))


# -----------------------------------------------------------------------------------------
# 12. Figures: PNG files, also shown inline in a notebook
# What the model learned: loss and accuracy curves (after training); and, after training
# and by --eval, where the CLS token looks (attention rollout across layers and each head of
# the last layer), how the learned position embeddings relate to each other, the confusion
# matrix and a grid of mistakes. matplotlib is imported inside the functions, so importing vit.py
# stays fast and works without a display.
# -----------------------------------------------------------------------------------------
def save_figure(fig, path, tight=True):
    import matplotlib.pyplot as plt
    try:
        if tight:
            fig.tight_layout()
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        if in_notebook():
            plt.show()
    finally:
        plt.close(fig)
    print(f"saved {path}")


def plot_patches(image, patch_size, path):
    # The central idea, drawn: one training image (C, H, W) cut into P x P patches, laid out
    # in the order the Transformer reads them, numbered as tokens, token 0 being the CLS
    # token. The patches come from patchify (section 1) itself; they are returned.
    import matplotlib.pyplot as plt
    from matplotlib import patheffects
    C, H, W = image.shape
    P = patch_size
    tiles = patchify(image[None], P)[0].view(-1, C, P, P)         # (N, C, P, P)
    shown = min(len(tiles), 255)                                  # 1,000 tiles do not read
    cols = min(shown + 1, max(8, math.ceil(1.6 * math.sqrt(shown + 1))))
    rows = math.ceil((shown + 1) / cols)
    fig = plt.figure(figsize=(4 + 0.8 * cols, max(3.2, 0.9 * rows + 0.8)))
    left, right = fig.subfigures(1, 2, width_ratios=[4, 0.8 * cols])
    ax = left.subplots()
    ax.imshow(to_display(image[None])[0], cmap="gray" if C == 1 else None, vmin=0, vmax=255)
    ax.set_xticks([c - 0.5 for c in range(0, W + 1, P)])          # patch borders
    ax.set_yticks([r - 0.5 for r in range(0, H + 1, P)])
    ax.grid(color="white", linewidth=1.5)
    ax.tick_params(length=0, labelbottom=False, labelleft=False)
    ax.set_title(f"the image, {H}x{W}, in {P}x{P} patches")
    for n in range(len(tiles) if len(tiles) <= 100 else 0):       # each patch's token number
        ax.text((n % (W // P) + 0.5) * P - 0.5, (n // (W // P) + 0.5) * P - 0.5, str(n + 1),
                ha="center", va="center", color="white", fontsize=8,
                path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
    axes = right.subplots(rows, cols, squeeze=False)
    for t, ax in enumerate(axes.flat):
        ax.axis("off")
        if t == 0:                              # the CLS token: learned, no patch of its own
            ax.imshow(torch.full((P, P), 200).numpy(), cmap="gray", vmin=0, vmax=255)
            ax.text(P / 2 - 0.5, P / 2 - 0.5, "CLS", ha="center", va="center", fontsize=8)
            ax.set_title("0", fontsize=8)
        elif t <= shown:
            ax.imshow(to_display(tiles[t - 1:t])[0], cmap="gray" if C == 1 else None,
                      vmin=0, vmax=255)
            ax.set_title(str(t), fontsize=8)
    right.suptitle(f"the sequence the Transformer reads: {len(tiles)} patch tokens after the "
                   f"CLS token" + (f" (the first {shown} shown)" if shown < len(tiles) else ""))
    save_figure(fig, path, tight=False)
    return tiles


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
    # layer's CLS attention of each head, (B, h, N). Uses the hand-written attention path,
    # which keeps the weights.
    fused = [b.attn.fused for b in model.blocks]
    for b in model.blocks:
        b.attn.fused = False
    model.eval()
    model(images)
    for b, f in zip(model.blocks, fused):
        b.attn.fused = f
    weights = [b.attn.attn_weights.float() for b in model.blocks]   # each (B, h, T, T)
    eye = torch.eye(weights[0].size(-1), device=images.device)
    rollout = eye
    for w in weights:
        a = 0.5 * w.mean(dim=1) + 0.5 * eye                          # (B, T, T)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout                                         # (B, T, T)
    return rollout[:, 0, 1:], weights[-1][:, :, 0, 1:]


def upsample(maps, size):
    # (B, N) patch weights -> (B, H, W) arrays: each patch's weight spread over its pixels
    side = math.isqrt(maps.size(1))                                   # H / P
    maps = maps.reshape(maps.size(0), 1, side, side)                  # (B, 1, H/P, W/P)
    return F.interpolate(maps, size=size, mode="nearest")[:, 0].cpu().numpy()


def spread(n_items, n):
    # n indices spread evenly over range(n_items): test folders are often sorted by class
    return torch.linspace(0, n_items - 1, min(n, n_items)).round().long().unique()


def plot_attention(model, images, x, titles, path):
    # Each image (uint8, for display; x: the same normalised, for the model), its rollout,
    # and the last layer's CLS attention in each head. Drawn for a spread of test images
    # after training, and for your own images by --predict, titled with the prediction.
    import matplotlib.pyplot as plt
    rollout, last = attention_maps(model, x)                          # (B, N), (B, h, N)
    heads, size = last.size(1), images.shape[-2:]
    maps = [upsample(rollout, size)] + [upsample(last[:, h], size) for h in range(heads)]
    fig, axes = plt.subplots(len(images), heads + 2, squeeze=False,
                             figsize=(max(6.4, 1.6 * (heads + 2)), 2.0 * len(images) + 0.6))
    cmap = "gray" if images.size(1) == 1 else None
    for i, im in enumerate(to_display(images)):
        axes[i, 0].imshow(im, cmap=cmap)
        axes[i, 0].set_title(titles[i], fontsize=8)
        for j, m in enumerate(maps):
            axes[i, j + 1].imshow(im, cmap=cmap)
            axes[i, j + 1].imshow(m[i], cmap="inferno", alpha=0.6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j in range(heads + 1):
        axes[0, j + 1].set_title(f"last layer\nhead {j - 1}" if j else "rollout", fontsize=8)
    axes[-1, 1].set_xlabel("all layers")
    fig.suptitle("Where the CLS token looks (bright = more attention): attention rollout,\n"
                 "and the last layer's CLS attention in each head", fontsize=10)
    save_figure(fig, path)


def plot_pos_embed(model, path):
    # Cosine similarity of each patch's learned position embedding with every other's
    # (ViT paper, Figure 7): tile (r, c) shows how similar patch (r, c) is to each patch.
    import matplotlib.pyplot as plt
    pos = F.normalize(model.pos_embed[0, 1:].detach().float().cpu(), dim=-1)   # (N, D)
    sim = pos @ pos.T                                                 # (N, N)
    side = math.isqrt(pos.size(0))
    fig, axes = plt.subplots(side, side, figsize=(8, 8), squeeze=False)
    for n, ax in enumerate(axes.flat):
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
    # Up to 30 classes: every cell with its count, every class named. Beyond that (1,000
    # classes would be a million labels) the matrix is drawn as a plain image.
    import matplotlib.pyplot as plt
    K = len(data.classes)
    y = data.test_y.cpu()
    conf = torch.zeros(K, K, dtype=torch.long)
    conf.index_put_((y, preds.cpu()), torch.ones_like(y), accumulate=True)   # (true, pred)
    per_class = conf.diag().float() / conf.sum(dim=1).clamp_min(1).float()
    order = per_class.argsort().tolist() if K > 30 else range(K)         # the worst first
    print(f"per-class accuracy{' (the 10 lowest)' if K > 30 else ''}: " + ", ".join(
        f"{data.classes[k]} {100 * per_class[k]:.1f}%" for k in list(order)[:10 if K > 30 else K]))
    side = min(1.0 + 0.6 * K, 12)
    fig, ax = plt.subplots(figsize=(side, side - 0.2))
    im = ax.imshow(conf.numpy(), cmap="Blues")
    if K <= 30:
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
    cmap = "gray" if data.test_x.shape[1] == 1 else None
    for ax in axes.flat:
        ax.axis("off")
    true, pred = data.test_y[wrong].tolist(), preds[wrong].tolist()
    for ax, t, p, im in zip(axes.flat, true, pred, to_display(data.test_x[wrong])):
        ax.imshow(im, cmap=cmap)
        ax.set_title(f"true {data.classes[t][:10]}\npred {data.classes[p][:10]}", fontsize=7)
    fig.suptitle(f"Misclassified test images ({(preds != data.test_y).sum().item()} of "
                 f"{len(preds)} wrong; {len(wrong)} shown)")
    save_figure(fig, path)


def first_look(model, data, cfg, out):
    # At the start of a new run: one image cut into patches, one batch through the model.
    plot_patches(data.train_x[0].cpu(), cfg.patch_size, os.path.join(out, "patches.png"))
    print("one batch through the model:")
    images = data.train_x[:cfg.batch_size].to(data.test_y.device)
    show_shapes(model.eval(), data.normalize(images))


def make_figures(model, data, preds, out, metrics=None):
    if metrics:                                   # after training; not by --eval
        plot_curves(metrics, os.path.join(out, "curves.png"))
    picked = spread(len(data.test_y), 6).to(data.test_y.device)
    images = data.test_x[picked].to(data.test_y.device)               # (6, C, H, W) uint8
    titles = [data.classes[k][:12] for k in data.test_y[picked].tolist()]
    plot_attention(model, images, data.normalize(images), titles, os.path.join(out,
                                                                               "attention.png"))
    plot_pos_embed(model, os.path.join(out, "pos_embed.png"))
    plot_confusion(data, preds, os.path.join(out, "confusion.png"))
    plot_mistakes(data, preds, os.path.join(out, "mistakes.png"))


# -----------------------------------------------------------------------------------------
# 13. The training run: set-up and the loop, on one screen
# train_run is the whole of training: it builds everything from the configuration (or from
# a checkpoint, to resume); then for each epoch it trains on every batch once, evaluates on
# the test split, logs one line, and saves the checkpoint, so that a crash loses at most one
# epoch. At the end it draws the figures of section 12.
# -----------------------------------------------------------------------------------------
def print_model_summary(model, cfg, device, precision, why):
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: ViT {cfg.image_size}px, patch {cfg.patch_size}, dim {cfg.dim}, depth "
          f"{cfg.depth}, heads {cfg.heads}, mlp {cfg.mlp_dim}, pool {cfg.pool}: "
          f"{n_params:,} parameters ({n_params * 4 / 1e6:.2f} MB in float32)")
    attn = "fused" if model.blocks[0].attn.fused else "hand-written"
    print(f"device: {device}, attention: {attn}, precision: {precision} ({why})")


def print_epoch(m, epochs, n_train, done, elapsed):
    # One line per epoch. Train accuracy is measured on augmented images while the weights
    # still change during the epoch, so it is not comparable to test accuracy point for
    # point; a test accuracy far below train accuracy is overfitting. done: the fraction of
    # this session's epochs finished, for the time left.
    print(f"epoch {m['epoch']:3d}/{epochs} | train loss {m['train_loss']:.4f} acc "
          f"{100 * m['train_acc']:5.2f}% | test loss {m['test_loss']:.4f} acc "
          f"{100 * m['test_acc']:5.2f}% | lr {m['lr']:.2e} | {n_train / m['seconds']:,.0f} "
          f"img/s | {elapsed / 60:.1f} min, {(elapsed / done - elapsed) / 60:.1f} min left",
          flush=True)


def train_run(cfg, device, out, resume=None, resume_path=None):
    # First everything the loop needs: data on the device, model, optimizer, schedule,
    # scaler, and the metrics so far (none, or the checkpoint's). The order matters: the seed
    # is set before the model is built, so the same seed gives the same initial weights; the
    # model moves to the device before the optimizer is built, so AdamW's state lives there.
    data = load_data(cfg, device)
    cfg.image_size = data.train_x.shape[-1]           # resolved now, and saved with the run
    if cfg.crop_pad is None:
        cfg.crop_pad = round(cfg.image_size / 8)     # 4 pixels on 32x32 CIFAR-10, the classic
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.train_x.shape[1], len(data.classes), device).to(device)
    data.to(device)
    steps = steps_per_epoch(len(data.train_y), cfg)
    opt, sched = build_optimizer(model, cfg, steps)
    precision, why = choose_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    metrics = restore(resume, resume_path, cfg, data, model, opt, sched, scaler, steps,
                      device) if resume else []
    print(f"config: {asdict(cfg)}")
    print(f"data: {cfg.dataset}: {len(data.train_y):,} train and {len(data.test_y):,} test "
          f"images of {tuple(data.train_x.shape[1:])}, {len(data.classes)} classes")
    print_model_summary(model, cfg, device, precision, why)
    print(f"run folder: {out}" + (f", {world_size()} processes" if world_size() > 1 else ""))
    if not metrics:                             # a new run: show the central idea first
        together(lambda: first_look(model, data, cfg, out), rank() == 0)
    # torch.compile fuses the model's small operations into a few kernels; it costs a
    # minute of compiling first. The checkpoint saves `model`, the same weights uncompiled.
    # Under torchrun, DDP wraps the (compiled) model for training, and adds the all-reduce.
    step_model = compile_model(model) if cfg.compile else model
    train_model = step_model
    if world_size() > 1:
        train_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device] if device.type == "cuda" else None)
    start, t_run = len(metrics) + 1, time.time()
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.time()
        train_loss, train_acc = train_one_epoch(train_model, data, opt, sched, scaler, cfg,
                                                precision, device, epoch)
        test_loss, test_acc, preds = evaluate(step_model, data, cfg, precision, device)
        check_finite(model, train_loss, test_loss, epoch, cfg, out)
        metrics.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                            test_loss=test_loss, test_acc=test_acc,
                            lr=opt.param_groups[0]["lr"], seconds=time.time() - t0))
        share = (epoch - start + 1) / (cfg.epochs - start + 1)      # of this session's epochs
        print_epoch(metrics[-1], cfg.epochs, len(data.train_y), share, time.time() - t_run)
        together(lambda: save_checkpoint(out, cfg, data, model, opt, sched, scaler, metrics,
                                         device), rank() == 0)
    together(lambda: make_figures(model, data, preds, out, metrics), rank() == 0)
    print(f"saved {os.path.join(out, 'model.pth')}, checkpoint.pth, metrics.json")
    print(f"test accuracy: {100 * metrics[-1]['test_acc']:.2f}%")
    return metrics


def run_in_folder(cfg, device, out, new_folder=True, resume=None, resume_path=None):
    # train_run, guarded. A new run (or a resumed one branching into a new folder) claims
    # `out` before any data is loaded (section 10), and gives it back if it ends before its
    # first checkpoint. Ctrl-C and a failing torch.compile end in one sentence.
    # Under torchrun, rank 0 alone claims, locks and (in the end) gives back the folder.
    validate(cfg)
    if new_folder:
        together(lambda: claim_run_folder(out), rank() == 0)
    lock = None
    try:
        lock = together(lambda: lock_run_folder(out), rank() == 0)
        return train_run(cfg, device, out, resume, resume_path)
    except KeyboardInterrupt:                   # Ctrl-C, or a notebook's stop button
        done = saved_epoch(out)
        again = (f"torchrun --nproc-per-node={world_size()} vit.py" if world_size() > 1 else
                 "python vit.py")
        if done:
            message = (f"interrupted after epoch {done}; resume with `{again} --resume "
                       f"{os.path.join(out, 'checkpoint.pth')}`")
        elif resume_path:
            message = (f"interrupted before an epoch ended; resume again with `{again} "
                       f"--resume {resume_path}`")
        else:
            message = "interrupted before the first epoch ended; nothing was saved"
        raise Interrupted(message) from None
    except Exception as e:
        if cfg.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise UserError(f"--compile failed ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200]}); run without --compile.") \
                from None
        raise
    finally:
        if lock:
            lock.close()                                          # and so unlocked
        if new_folder and rank() == 0 and not os.path.exists(os.path.join(out, "checkpoint.pth")):
            release_run_folder(out)


def check_finite(model, train_loss, test_loss, epoch, cfg, out):
    # A loss of nan or inf means the weights are lost (too large a learning rate, usually):
    # stop before they overwrite the last good checkpoint. (Steps the fp16 scaler skips have
    # a finite loss: only their gradients overflowed.)
    weights_ok = torch.stack([p.isfinite().all() for p in model.parameters()]).all().item()
    if math.isfinite(train_loss) and math.isfinite(test_loss) and weights_ok:
        return
    saved = saved_epoch(out)                  # a run branched by --resume --out may have none
    kept = (f"the checkpoint of epoch {saved} in {out} is kept" if saved else
            f"no checkpoint was written in {out}")
    raise UserError(f"training diverged in epoch {epoch} (the loss became "
                    f"{train_loss if not math.isfinite(train_loss) else test_loss}); {kept}; "
                    f"try a lower --lr than {cfg.lr}.")


def compile_model(model):
    # dynamic=False: kernels for the one batch shape of training and of evaluation (section
    # 8 keeps the shapes fixed), compiled once each.
    try:
        return torch.compile(model, dynamic=False)
    except RuntimeError as e:         # e.g. torch < 2.4 on Python 3.12: no Dynamo
        raise UserError(f"torch.compile is not available here ({str(e).splitlines()[0]}); run "
                        f"without --compile.") from None


# -----------------------------------------------------------------------------------------
# 14. Using a trained model: evaluate it, or classify your own images
# At test time a ViT is a function from a normalised image (B, C, H, W) to K logits, one
# score per class: softmax turns them into probabilities, and the prediction is the largest.
# No augmentation, no dropout, no gradients. The preprocessing must be the training's own:
# the same size, the same channels, the same mean and std (saved in model.pth), or the
# model sees numbers it never saw in training.
#   --eval MODEL:              the model on its data set's test split, and its figures.
#   --predict MODEL IMAGE...:  the top 3 classes of each image; with --out, each image with
#                              its attention rollout (section 12) and the predicted label.
# -----------------------------------------------------------------------------------------
def load_model(path, device):
    # Rebuild the architecture from the saved configuration, then fill in the weights.
    saved = load_file(path, "model file")
    if "state_dict" not in saved:
        raise UserError(f"{path!r} is a training checkpoint; use the model.pth next to it.")
    needed = MODEL_KEYS + ("in_channels",)
    if not (isinstance(saved["config"], dict) and all(k in saved["config"] for k in needed)
            and "mean" in saved and "std" in saved):
        raise UserError(f"model file {path!r} was not written by this vit.py.")
    cfg = Config(**{k: saved["config"][k] for k in MODEL_KEYS})
    in_channels = saved["config"]["in_channels"]
    if not all(torch.isfinite(w).all() for w in saved["state_dict"].values()):
        raise UserError(f"{path!r} holds weights that are nan or inf: its training diverged, "
                        f"and it cannot classify anything.")
    model = build_model(cfg, in_channels, len(saved["classes"]), device)
    load_weights(model, saved["state_dict"], path)
    return model.to(device).eval(), cfg, saved


def eval_run(args, device):
    model, cfg, saved = load_model(args.eval, device)
    cfg = replace(cfg, dataset=args.dataset or saved["dataset"],
                  data_root=args.data_root or saved["data_root"])
    out = writable_folder(args.out or os.path.dirname(os.path.abspath(args.eval)))
    data = load_data(replace(cfg, data=args.data or "auto"), device)
    check_fits(saved["classes"], data, args.eval)
    if data.train_x.shape[1] != saved["config"]["in_channels"]:
        raise UserError(f"{args.eval!r} expects {saved['config']['in_channels']}-channel images, "
                        f"but this data has {data.train_x.shape[1]}.")
    data.mean, data.std = saved["mean"], saved["std"]            # the training's own
    data.to(device)
    precision, why = choose_precision(args.precision or "auto", device)
    print_model_summary(model, cfg, device, precision, why)
    loss, acc, preds = evaluate(model, data, cfg, precision, device)
    make_figures(model, data, preds, out)
    print(f"evaluated {args.eval} on {cfg.dataset} ({len(data.test_y):,} test images), "
          f"loss {loss:.4f}")
    print(f"test accuracy: {100 * acc:.2f}%")
    return acc


@torch.no_grad()
def predict_run(args, device):
    # Each image is read as the test split is (read_image: the model's channels and size)
    # and normalised with the training's statistics; softmax turns the logits into
    # probabilities, and topk picks the 3 most probable classes.
    if len(args.predict) < 2:
        raise UserError("--predict takes a model.pth and then one or more image files.")
    model, cfg, saved = load_model(args.predict[0], device)
    if args.out:
        writable_folder(args.out)
    mode = "L" if saved["config"]["in_channels"] == 1 else "RGB"
    images = torch.stack([read_image(p, mode, cfg.image_size) for p in args.predict[1:]])
    images = images.to(device)                                    # (B, C, H, W) uint8
    mean, std = (torch.tensor(saved[k], device=device).view(1, -1, 1, 1) for k in ("mean", "std"))
    x = normalize(images, mean, std)                              # (B, C, H, W) float
    probs = model(x).float().softmax(dim=-1)                      # (B, K)
    top_p, top_k = probs.topk(min(3, probs.size(1)), dim=-1)      # (B, 3) each
    names = [[saved["classes"][k] for k in row] for row in top_k.tolist()]   # (B, 3)
    for path, row, p in zip(args.predict[1:], names, top_p.tolist()):
        print(f"{path}: " + ", ".join(f"{c} {100 * q:.1f}%" for c, q in zip(row, p)))
    if args.out:
        titles = [f"predicted: {row[0][:12]}\n{100 * p[0]:.1f}%" for row, p in
                  zip(names, top_p.tolist())]
        plot_attention(model, images, x, titles, os.path.join(args.out, "predicted.png"))
    return [row[0] for row in names]


# -----------------------------------------------------------------------------------------
# 15. Benchmark: this ViT against torchvision's, same size, same precision, same run
# Machines are noisy, so we report a ratio measured in one run: training steps (forward,
# backward, AdamW, with the precision policy of section 6) of both models alternate in
# rounds on the same random batch, and each model's median step time is kept.
# torchvision's VisionTransformer takes 3-channel images.
# -----------------------------------------------------------------------------------------
def time_train_steps(model, images, labels, precision, steps):
    device = images.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        with autocast(precision, device):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step()                                                        # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()                                  # GPU work is asynchronous
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
    chosen, why = choose_precision(cfg.precision, device)
    print(f"benchmark on {device}: ViT {size}px, patch {cfg.patch_size}, dim {cfg.dim}, depth "
          f"{cfg.depth}, heads {cfg.heads}, mlp {cfg.mlp_dim}, batch {cfg.batch_size}; "
          f"attention {'fused' if use_fused_attn(cfg, device) else 'hand-written'}; "
          f"precision {chosen} ({why})")
    results = {}
    for precision in ["fp32", chosen] if chosen != "fp32" else ["fp32"]:
        times = {"vit.py": [], "torchvision": []}
        for _ in range(rounds):
            for label, model in (("vit.py", ours), ("torchvision", theirs)):
                times[label].append(time_train_steps(model, images, labels, precision, steps))
        ours_t, theirs_t = (sorted(t)[len(t) // 2] for t in times.values())
        results[precision] = theirs_t / ours_t
        print(f"{precision}: vit.py {cfg.batch_size / ours_t:,.0f} img/s, torchvision "
              f"{cfg.batch_size / theirs_t:,.0f} img/s: vit.py is {theirs_t / ours_t:.2f}x "
              f"as fast (median of {rounds} rounds of {steps} training steps)")
    return results


# -----------------------------------------------------------------------------------------
# 16. Command line and main()
# The options are Config's fields (section 5), plus what to do. An option left out is None
# here, so that a preset can fill it. Every error a user can cause is a UserError and ends
# as one line on stderr: from a shell with exit status 1; in a notebook, main() returns None
# and the notebook goes on. In a notebook the kernel's own arguments (-f kernel.json) are
# ignored, while `%run vit.py --epochs 5` puts the user's options in sys.argv and they count.
# -----------------------------------------------------------------------------------------
HELP = {"dataset": "cifar10, fashionmnist, or a folder with train/ and test/ subfolders",
        "data_root": "where torchvision data sets are downloaded (default ./data)",
        "lr": "peak learning rate of AdamW", "warmup": "fraction of steps for the linear warmup",
        "image_size": "resize images to this size (default: their own)",
        "dim": "model width D", "depth": "number of encoder blocks",
        "pool": "classify the CLS token or the mean patch token",
        "augment": "random crop and flip",
        "crop_pad": "random-crop padding in pixels (default: image side / 8; 0: no crop)",
        "clip_grad": "largest global gradient norm (0: no clipping)",
        "precision": "auto picks per device (section 6 of vit.py)",
        "attn": "F.scaled_dot_product_attention, or the hand-written path",
        "data": "keep the data set on the device, or stream it from disk (default: by its size)"}


def build_parser():
    # prog is fixed: pasted into a notebook, the program would otherwise be named after the
    # kernel's launcher.
    p = argparse.ArgumentParser(prog="vit.py", description="Train a Vision Transformer from "
                                "scratch on CIFAR-10, FashionMNIST or an image folder.")
    p.add_argument("--preset", choices=PRESETS, default="default", help="bundle of defaults")
    for f in fields(Config):
        flag, text = "--" + f.name.replace("_", "-"), HELP.get(f.name)
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            kind = type(f.default) if f.default is not None else int   # crop_pad: None
            p.add_argument(flag, type=kind, choices=CHOICES.get(f.name), help=text)
    a = p.add_argument
    a("--device", help="cuda, mps or cpu (default: the best available)")
    a("--out", help="run folder, which must not hold a run yet (default: a new folder under "
      "runs/); with --resume, the run continues there and its own folder stays as it was")
    a("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint.pth "
      "(--epochs may change; --dataset/--data-root say where its data is now)")
    a("--eval", metavar="MODEL", help="evaluate a saved model.pth on its test split")
    a("--predict", nargs="+", metavar="FILE", help="a model.pth, then images to classify")
    a("--benchmark", action="store_true",
      help="time training steps of this ViT against torchvision's, same size and precision")
    return p


def command_line(argv):
    # A Jupyter kernel runs as `python -m ipykernel_launcher -f kernel-1234.json` (VS Code:
    # --f=...json); those arguments are the kernel's, not ours.
    if argv is not None:
        return list(argv)
    args = sys.argv[1:]
    first = args[0] if args else ""
    if in_notebook() and (first == "-f" or first.startswith("--f=")):
        return []
    return args


def resolve_config(args):
    # Config's defaults, then the preset's, then every option given explicitly. Paths are
    # saved resolved, so that the run can be resumed from another working folder.
    given = {f.name: getattr(args, f.name) for f in fields(Config)
             if getattr(args, f.name) is not None}
    cfg = Config(**{**PRESETS[args.preset], **given})
    return replace(cfg, **resolved_paths(cfg.dataset, cfg.data_root))


def resolved_paths(dataset, data_root):
    folder = dataset.lower() not in KNOWN_SIZES and os.path.isdir(dataset)
    return dict(dataset=os.path.abspath(dataset) if folder else dataset,
                data_root=os.path.abspath(data_root))


def resume_run(args, device):
    # A resumed run is the checkpoint's run: same model and recipe. --epochs may change, to
    # extend it (the schedule is then the one of the new length); --dataset and --data-root
    # may say where its data is now, if it has moved (the classes must still match); --out
    # branches it into a new folder, leaving the original as it is.
    ckpt = together(lambda: load_file(args.resume, "checkpoint"))     # on every process
    if "optimizer" not in ckpt:
        raise UserError(f"{args.resume!r} is a model file; --resume takes a checkpoint.pth.")
    try:
        cfg = Config(**ckpt["config"])
    except TypeError:
        raise UserError(f"{args.resume!r} holds a configuration this vit.py does not "
                        f"know.") from None
    allowed = ("epochs", "dataset", "data_root", "data")
    ignored = [f.name for f in fields(Config)
               if getattr(args, f.name) is not None and f.name not in allowed]
    if ignored:
        print(f"note: resuming with the checkpoint's own configuration; ignoring "
              f"{', '.join('--' + k.replace('_', '-') for k in ignored)}")
    cfg = replace(cfg, **{k: getattr(args, k) for k in allowed if getattr(args, k) is not None})
    cfg = replace(cfg, **resolved_paths(cfg.dataset, cfg.data_root))
    if ckpt["epoch"] >= cfg.epochs:
        raise UserError(f"the checkpoint has already finished {ckpt['epoch']} epochs; pass an "
                        f"--epochs above {ckpt['epoch']} to train further.")
    here = os.path.dirname(os.path.abspath(args.resume))
    out = os.path.abspath(args.out) if args.out else here
    return run_in_folder(cfg, device, out, out != here, ckpt, args.resume)


def main(argv=None):
    """Runs vit.py with a list of command-line options, e.g. main(["--epochs", "5"]).
    Returns the final test accuracy (training, --resume, --eval), the predicted labels
    (--predict), or the speed ratios (--benchmark); None after a user error in a notebook."""
    try:
        args = build_parser().parse_args(command_line(argv))
    except SystemExit:
        if in_notebook():          # argparse printed the help, or its usage and error
            return None
        raise
    error = None
    try:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and (args.eval or args.predict or
                                                         args.benchmark):
            raise UserError("--eval, --predict and --benchmark run in one process; use "
                            "`python vit.py`, not torchrun.")
        device = start_processes(args.device)
        if args.eval:
            return eval_run(args, device)
        if args.predict:
            return predict_run(args, device)
        if args.benchmark:
            cfg = resolve_config(args)
            validate(cfg)
            return benchmark(cfg, device)
        if args.resume:
            return resume_run(args, device)[-1]["test_acc"]
        cfg = resolve_config(args)
        validate(cfg)                             # before a run folder is made for it
        out = args.out or from_rank_0(together(lambda: new_run_folder(cfg), rank() == 0))
        return run_in_folder(cfg, device, out)[-1]["test_acc"]
    except KeyboardInterrupt:                     # outside training: nothing to save
        error = Interrupted("interrupted")
    except UserError as e:
        error = type(e)(str(e))                   # without its traceback (see below)
    finally:
        # torchrun: leave the process group, after freeing what still uses it: DDP's objects
        # sit in reference cycles, which only the garbage collector frees. After a run that
        # went well, all processes leave together (after a failure another may be gone).
        if dist.is_available() and dist.is_initialized():
            gc.collect()
            if error is None and sys.exc_info()[0] is None:
                dist.barrier()
            dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":        # one copy of the sentence: rank 0's
        print(error if isinstance(error, Interrupted) else f"error: {error}", file=sys.stderr)
    if not in_notebook():
        sys.exit(error.status)


if __name__ == "__main__":
    main()
