"""
vit.py: a Vision Transformer (ViT) from scratch, trained on CIFAR-10, FashionMNIST or any
image folder, and used to classify your own images.

Part I, the lesson: an image as a sequence of patch tokens, the CLS token, the learned
position embedding, pre-norm encoder blocks with self-attention written by hand, the head;
then the whole training recipe on one device: precision, data kept on the device and
augmented as tensor ops, AdamW, warmup + cosine, label smoothing, one step, one epoch, the
loop. Part II, the tool, builds on it: many GPUs, data files, big folders, checkpoints that
resume exactly, figures, --eval, --predict, ImageNet weights (--init), the command line.

Run it:
  python vit.py --epochs 30                           # CIFAR-10 (downloads into ./data)
  python vit.py --dataset fashionmnist --preset cpu   # a laptop CPU, about 5 minutes
  python vit.py --dataset path/to/folder              # any folder with train/ and test/
  python vit.py --resume runs/X/checkpoint.pth --epochs 40
  torchrun --nproc-per-node=2 vit.py --epochs 30      # two GPUs
  python vit.py --eval runs/X/model.pth
  python vit.py --predict runs/X/model.pth cat.jpg dog.png
  Colab, Jupyter: pasted into one cell, this file starts the default run (CIFAR-10, 30
  epochs) at once; `%run vit.py --epochs 5` takes options, as does main(["--epochs", "5"]).

What a run should reach: --preset cpu --precision fp32 gave test accuracy 75.6% after epoch
  1, 85.3% after 5, 90.3% after 25 (2-core AMD EPYC, torch 2.14.1, 2026-12-01).

Papers: Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", arxiv.org/abs/2010.11929;
  Vaswani et al. 2017, "Attention Is All You Need", arxiv.org/abs/1706.03762

Sections (each a banner "# N. Title" below):
  Part I, the lesson: 1. Patches; 2. Multi-head self-attention; 3. MLP and the encoder
    block; 4. The ViT; 5. Configuration and presets; 6. Precision; 7. Data on the device;
    8. Training.
  Part II, the tool: 9. Many devices; 10. Data files; 11. Checkpoints and run folders;
    12. Figures; 13. The training run; 14. Using a trained model; 15. Command line and main().

Shape legend:
  B batch, C channels, H, W image height and width, P patch size, N = (H/P)(W/P) patches,
  T = N + 1 tokens (patches and CLS), D = dim (model width), h heads, d_h = D / h (one
  head's width), K classes; q, k, v are queries, keys and values.
"""
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def in_notebook():                # in a Jupyter kernel (Colab, Kaggle, VS Code)
    return "ipykernel" in sys.modules


# -----------------------------------------------------------------------------------------
# 1. Patches: an image becomes a sequence of tokens
# A Transformer reads a sequence of vectors. ViT cuts the image into non-overlapping P x P
# patches, flattens each into a vector of C*P*P numbers, and projects it linearly to width D:
#   (B, C, H, W) -> (B, N, C*P*P) -> (B, N, D),   N = (H/P) * (W/P)
# The cut is nothing but a reshape and a permute. A Conv2d with kernel = stride = P computes
# the same (each output pixel: one patch dotted with the kernel), and torchvision and timm
# store the weight so; we keep it in a Conv2d and use it through the reshape, the lesson.
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
# (transformer.py, sections 3-4, says why the scale is sqrt(d_h) and why several heads.)
# One Linear(D, 3D) computes q, k and v together, rows laid out [W_q; W_k; W_v] as in
# nn.MultiheadAttention.in_proj_weight. Every token attends to every token (no mask). Two
# paths, the same numbers: the hand-written one below (fused=False), which keeps the weights
# for the attention maps, and F.scaled_dot_product_attention (fused=True), one kernel that
# never stores the (T, T) matrix: the fast path on GPUs (section 8 says where each runs).
# -----------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim, heads, dropout=0.0, fused=True):
        super().__init__()
        self.heads = heads
        self.d_head = dim // heads
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)           # W_o: mixes what the heads found
        # nn.Dropout follows .train() / .eval() (F.dropout drops at test time too, unless told)
        self.attn_drop = nn.Dropout(dropout)
        self.proj_drop = nn.Dropout(dropout)
        self.attn_weights = None      # the last weights of the hand-written path, for plots

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x)                                         # (B, T, 3D)
        qkv = qkv.view(B, T, 3, self.heads, self.d_head)          # (B, T, 3, h, d_h)
        qkv = qkv.permute(2, 0, 3, 1, 4)                          # (3, B, h, T, d_h)
        q, k, v = qkv.unbind(0)                                   # (B, h, T, d_h) each
        if not self.fused:                                        # the lesson, by hand
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)    # (B, h, T, T)
            # A float32 softmax at least: in mixed precision (section 6) the scores come in
            # 16 bits, and float32 is more exact and, on the CPU, faster.
            exact = torch.promote_types(scores.dtype, torch.float32)
            weights = scores.softmax(dim=-1, dtype=exact).type_as(v)     # rows sum to 1
            self.attn_weights = weights.detach()                  # kept for the figures
            out = self.attn_drop(weights) @ v                            # (B, h, T, d_h)
        else:                                                     # the same, one kernel
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)   # (B, h, T, d_h)
        out = out.transpose(1, 2)                                 # (B, T, h, d_h)
        out = out.reshape(B, T, D)                                # (B, T, D) heads concat
        return self.proj_drop(self.proj(out))                     # (B, T, D)


# -----------------------------------------------------------------------------------------
# 3. MLP and the encoder block
#   MLP(x) = GELU(x W1 + b1) W2 + b2, applied to every token on its own. GELU is a smooth
#   ReLU, x * Phi(x): it lets a little negative signal through, as BERT and ViT chose.
# Pre-norm block (ViT paper, eq. 2-3):
#   x = x + Attention(LayerNorm(x))
#   x = x + MLP(LayerNorm(x))
# LayerNorm rescales each token to zero mean and unit variance over its D features, then
# applies a learned gain and bias (transformer.py, section 6: why residuals and norms).
# Why pre-norm, when the original Transformer normalises after the sum: the path from input
# to output is then a clean identity, so gradients reach early layers undamped and training
# is stable without a long warmup (Xiong et al. 2020); the price, a final LayerNorm.
# (LayerNorm's eps is 1e-6 here, as in torchvision and timm, where PyTorch's default is 1e-5.)
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
        return x + self.mlp(self.norm2(x))                        # (B, T, D)


# -----------------------------------------------------------------------------------------
# 4. The ViT: CLS token, position embedding, encoder, head
#   images (B, C, H, W) -> patches (B, N, D) -> [CLS; patches] + pos (B, T, D)
#   -> depth x Block -> LayerNorm -> CLS output (B, D) -> Linear head -> logits (B, K)
# CLS token: one learned vector prepended to the patch tokens. With no patch of its own, it
# holds after the last block what it gathered from the patches through attention: a summary
# of the image, which the head classifies (pool="mean" averages the patch tokens instead).
# Position embedding: attention is blind to order, so each of the T = N + 1 positions gets a
# learned vector added to its token. Unlike the Transformer's fixed sinusoids, ViT learns
# them; after training, neighbouring patches end up with similar embeddings (pos_embed.png).
# Parameter names follow timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed,
# blocks.i.attn.qkv, blocks.i.mlp.fc1, norm, head): timm's model strict-loads our weights.
# -----------------------------------------------------------------------------------------
class ViT(nn.Module):
    def __init__(self, image_size, patch_size, in_channels, num_classes, dim, depth, heads,
                 mlp_dim, dropout=0.0, fused_attn=True, pool="cls"):
        super().__init__()
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
        # torchvision's initialisation (after the original ViT code's): Xavier-uniform linear
        # layers, a LeCun-normal patch projection (std 1/sqrt(C*P*P): patch tokens start at
        # unit scale), position embeddings with std 0.02, zero biases, CLS token and head.
        # The zero head makes every first prediction uniform.
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


# -----------------------------------------------------------------------------------------
# 5. Configuration and presets
# Every option lives in one dataclass; the command line (section 15) is generated from it.
# A preset is a named bundle of defaults; an option given explicitly always wins over it.
# default: CIFAR-10 on a GPU: patch 4 on 32x32 images (64 patches, fine enough to see
# shapes), a narrow model with MLP ratio 2 (small data cannot feed a wide one), light
# augmentation. cpu: FashionMNIST on a laptop CPU in about 5 minutes: 7x7 patches (16 of them,
# cheap attention), a narrow, shallow model (docs/experiments.md: what each choice gave).
# tiny: CIFAR-10 with a model.pth under 1 MB.
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
    attn: str = "auto"              # auto, fused or manual (section 8)
    compile: bool = False           # torch.compile (section 13)
    data: str = "auto"              # auto or stream (section 10)
    init: str = ""                  # start from a torchvision ViT or a model.pth (section 11)
    val_split: float = 0.0          # held out of train/, measured each epoch (section 13)


PRESETS = {
    "default": {},
    "cpu": dict(dataset="fashionmnist", epochs=25, batch_size=256, lr=3e-3, patch_size=7,
                dim=64, depth=3, heads=4, mlp_dim=128, crop_pad=1),
    "tiny": dict(dataset="cifar10", batch_size=256, lr=2e-3, dim=64, heads=4, mlp_dim=128),
}


# -----------------------------------------------------------------------------------------
# 6. Precision
# Mixed precision ("autocast") runs the matrix products in 16 bits, several times faster on
# tensor cores, while sums, norms, softmax and the loss stay in float32. Auto picks:
#   bf16 where the hardware has it (CUDA compute capability >= 8.0: A100, H100, L4, RTX 30
#        and 40; CPUs with AVX512-BF16 or AMX): float32's exponent range, nothing overflows;
#   fp16 on older GPUs (T4, V100): its range ends at 65504 and small gradients underflow to
#        zero, so the loss is scaled first (GradScaler, section 8);
#   fp32 otherwise (Apple MPS, CPUs without native bf16, where bf16 is slower than fp32).
# -----------------------------------------------------------------------------------------
def cpu_has_bf16():
    # True on CPUs with native bf16 instructions (a private query; False if it goes away)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_policy(requested, device):
    # The precision to train in, and why, for the line printed at the start.
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = major >= 8
        where = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    elif device.type == "cpu":
        native = cpu_has_bf16()
        where = f"a CPU {'with' if native else 'without'} native bf16"
    else:
        native, where = False, "Apple MPS"
    if requested != "auto":
        if requested == "bf16" and not native and device.type != "mps":
            print(f"note: bf16 is emulated on {where}: slower, not faster; --precision auto "
                  f"picks the fast choice.")
        return requested, f"asked for, on {where}"
    return ("bf16" if native else "fp16" if device.type == "cuda" else "fp32"), f"auto, on {where}"


def autocast(precision, device):
    # fp32: no autocast context at all (MPS had none before torch 2.5, not even disabled).
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# -----------------------------------------------------------------------------------------
# 7. Data on the device
# Why on the device: a DataLoader decodes and augments each batch on the CPU, and for a
# model this small the GPU finishes a step sooner than a Colab CPU prepares the next batch.
# CIFAR-10 is only 184 MB as uint8: decoded once, it fits on any GPU, and cropping and
# flipping there as tensor operations costs next to nothing. (Too big: section 10 streams.)
# Training batches get a random crop from a zero-padded copy (a ViT, unlike a CNN, must learn
# from examples that a shifted cat is a cat) and a random horizontal flip. The test split is
# never augmented: it measures the model on the images as they are. Both are normalised with
# the training split's mean and std: the test split must not leak into anything we fit. (A
# pretrained model's larger input: each batch upsampled on the device, by Part II's Data.)
# -----------------------------------------------------------------------------------------
@dataclass
class Data:
    train_x: torch.Tensor          # (n_train, C, H, W) uint8 on the device (section 10:
    train_y: torch.Tensor          # (n_train,) int64                or files on disk)
    test_x: torch.Tensor           # (n_test, C, H, W)
    test_y: torch.Tensor           # (n_test,)
    classes: list                  # K names; label k is classes[k]
    mean: torch.Tensor             # (C,) per channel, in [0, 1], of the training split
    std: torch.Tensor              # (C,)
    held: str = "test"             # what test_x holds: "test", or "val" (part of train/)

    def normalize(self, x):
        # uint8 (B, C, H, W) -> float, zero mean, unit variance per channel: what the initial
        # weights (section 4) expect
        return (x.float() / 255 - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


def channel_stats(chunks, n_pixels, total=lambda t: t):
    # Mean and std per channel of n_pixels pixels in chunks (b, C, H, W) uint8; integer
    # sums are exact, in any order and over any number of processes (total).
    sums = [torch.zeros((), dtype=torch.long)] * 2               # int64: exact
    for chunk in chunks:
        c = chunk.long().cpu()                                    # (b, C, H, W)
        sums = [sums[0] + c.sum(dim=(0, 2, 3)), sums[1] + (c * c).sum(dim=(0, 2, 3))]
    s, s2 = (total(t).double() for t in sums)                     # (C,) each
    mean = s / n_pixels / 255
    std = (s2 / n_pixels / 255 ** 2 - mean ** 2).clamp_min(1e-12).sqrt()   # E[x^2] - E[x]^2
    return mean.float(), std.float()


def make_data(train_x, train_y, test_x, test_y, classes, device):
    # uint8 images (n, C, H, W), labels (n,) -> Data on the device, once, for the whole run
    mean, std = channel_stats(train_x.split(1024), train_x[:, 0].numel())
    tensors = (train_x, train_y.long(), test_x, test_y.long(), mean, std)
    train_x, train_y, test_x, test_y, mean, std = (t.to(device) for t in tensors)
    return Data(train_x, train_y, test_x, test_y, list(classes), mean, std)


def epoch_plan(n, cfg, epoch, device):
    # The order of the training images and each position's crop and flip, drawn for the epoch
    # from (seed, epoch) alone: a resumed run draws what the uninterrupted run drew, and the
    # processes of a data-parallel run (section 9) draw the same with no communication.
    g = torch.Generator().manual_seed(cfg.seed * 1_000_000 + epoch)
    order = torch.randperm(n, generator=g)                        # a new order every epoch
    pad = cfg.crop_pad if cfg.augment else 0
    shift = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)    # (n, 2): rows, columns
    mirror = torch.rand(n, generator=g) < 0.5                     # (n,): a coin for each
    mirror &= cfg.augment and cfg.flip                            # --no-flip: all False
    return order.to(device), pad, shift.to(device), mirror.to(device)


def augment(x, pad, shift, mirror):
    # x: (B, C, H, W) uint8 on the device. A crop of the original size from a zero-padded
    # copy, shifted by `shift` (B, 2), as one gather; then a horizontal flip where `mirror`
    # (B,) is True. Every image gets its own shift and coin, every epoch new ones.
    B, C, H, W = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))                   # (B, C, H+2p, W+2p)
        rows = shift[:, 0].view(B, 1, 1, 1) + torch.arange(H, device=x.device).view(1, 1, H, 1)
        cols = shift[:, 1].view(B, 1, 1, 1) + torch.arange(W, device=x.device).view(1, 1, 1, W)
        batch = torch.arange(B, device=x.device).view(B, 1, 1, 1)
        chans = torch.arange(C, device=x.device).view(1, C, 1, 1)
        x = padded[batch, chans, rows, cols]                      # (B, C, H, W)
    return torch.where(mirror.view(B, 1, 1, 1), x.flip(3), x)    # (B, C, H, W)


def batches(x, y, index_lists):
    # The images (uint8, on the device) and labels at each list of indices: on the device,
    # by indexing. A folder streamed from disk (section 10) reads each batch's files.
    return (((x[i], y[i]) for i in index_lists) if isinstance(x, torch.Tensor) else
            zip(x.stream(index_lists, y.device), (y[i] for i in index_lists)))


# -----------------------------------------------------------------------------------------
# 8. Training
# One step, in this order (train_step):
#   1. forward under autocast (section 6), and the loss: cross-entropy with label smoothing
#      0.1 (the target: 0.1 spread over all K classes, the other 0.9 on the true one). A
#      one-hot target is met only by infinite logits, so the model would keep growing its
#      weights on examples it already gets right; a smoothed one is met by finite logits.
#   2. backward: the loss's gradient for every parameter, added into .grad (so zeroed first);
#      in fp16 the loss is first multiplied by a large scale, so small gradients survive.
#   3. unscale: divide the gradients by that scale again, before anything reads them.
#   4. clip: if the global gradient norm exceeds --clip-grad (1.0), shrink all gradients in
#      proportion, so one unlucky batch cannot throw the weights far.
#   5. AdamW's step; in fp16 skipped if a gradient overflowed (the scale is then halved).
# AdamW divides each weight's step by the running size of its gradients, so every weight
# learns at a sensible speed whatever its scale; its weight decay pulls weights towards zero
# directly (decoupled: Adam's scaling would weaken it), a pressure towards simple solutions.
# Biases, LayerNorm gains, the CLS token and the position embedding get no decay: a LayerNorm
# gain pulled towards zero silences its features, and these few numbers are not what overfits.
# Warmup, then cosine: Adam's first running averages rest on a handful of batches, and large
# steps then can wreck the attention; so the learning rate rises linearly from 0.1% of its
# peak over the first 5% of steps, then follows half a cosine down to zero: large steps far
# from a good solution, ever smaller ones to settle into it. It depends on the step and the
# run's length alone (lr_at), so a resumed run, even with a new --epochs, gets exactly the
# value of its schedule. The last, partial batch is dropped: all steps have one size. Losses
# are summed on the device and read once an epoch: every .item() waits for the GPU.
# -----------------------------------------------------------------------------------------
def use_fused_attn(cfg, device):
    # fused CPU attention has a slow backward (docs/benchmark.py); on GPUs fused is the fast one
    return cfg.attn == "fused" or (cfg.attn == "auto" and device.type != "cpu")


def build_model(cfg, in_channels, num_classes, device):
    return ViT(cfg.image_size, cfg.patch_size, in_channels, num_classes, cfg.dim, cfg.depth,
               cfg.heads, cfg.mlp_dim, cfg.dropout, use_fused_attn(cfg, device), cfg.pool)


def build_optimizer(model, cfg, device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n
             and "cls_token" not in n]                            # the weight matrices
    no_decay = [p for p in model.parameters() if not any(p is q for q in decay)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                             fused=device.type == "cuda")


def lr_at(step, total, cfg):
    # The learning rate of step `step` (0, 1, ..., total - 1) of a run of `total` steps.
    warmup = max(1, round(cfg.warmup * total))
    if step < warmup:
        return cfg.lr * (1e-3 + (1 - 1e-3) * step / warmup)      # linear, from 0.1%
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))      # half a cosine, to 0


def train_step(model, x, y, opt, scaler, cfg, precision, lr, weight=1.0):
    # weight: this process's share of the batch times the number of processes (one device:
    # 1.0); so weighted, the processes' average gradient is the whole batch's (section 9).
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast(precision, x.device):
        logits = model(x)                                         # (B, K)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)                               # None: no zeros written
    scaler.scale(loss * weight).backward()                        # (not fp16: loss as is)
    scaler.unscale_(opt)
    if cfg.clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    scaler.step(opt)
    scaler.update()
    return logits, loss


@dataclass
class Hooks:                       # all that Part II changes in training; one device: nothing
    restore: Callable = lambda model, opt, scaler: []   # resume: load a checkpoint's state
    wrap: Callable = lambda model: model                 # torch.compile, data parallel
    share: Callable = lambda a, b: (a, b)                # this process's part of a..b-1
    world: int = 1                                       # processes that share every batch
    sum: Callable = lambda t: t                          # a tensor summed over the processes
    after_epoch: Callable = lambda model, opt, scaler, metrics: None   # save a checkpoint


class Progress:
    # Not the lesson: a progress line every second in a terminal or notebook (rewritten in
    # place), every minute in a log file; and once, after 10 s, how long the run will take.
    def __init__(self, epoch, steps, bs, steps_left):    # steps_left 0: no estimate
        self.epoch, self.steps, self.bs, self.left = epoch, steps, bs, steps_left
        self.live = sys.stdout.isatty() or in_notebook()
        self.t0 = self.shown = time.perf_counter()    # made for durations; time.time() is not

    def step(self, step, loss, device):               # after step `step` (0, 1, ...) ended
        now = time.perf_counter()
        self.t1 = now if step == 0 else self.t1       # the estimate leaves out step 1: --compile
        if self.left and now - self.t1 >= 10:         # compiles it. Once: Colab's default
            minutes, self.left = self.left * (now - self.t1) / step / 60, 0   # runtime: a CPU
            print(("\r" if self.live else "") + f"  training will take about {minutes:,.1f} min" + (
                ": a GPU takes minutes (in Colab: Runtime > Change runtime type), or try "
                "--preset cpu" if device.type == "cpu" and minutes > 30 else "") + " " * 20,
                flush=True)
        if now - self.shown >= (1 if self.live else 60):
            rate = (step + 1) * self.bs / (now - self.t0)                 # images a second
            msg = (f"  epoch {self.epoch} [{step + 1}/{self.steps}] loss {loss.item():.3f}, "
                   f"{rate:,.0f} img/s")
            print("\r" + msg if self.live else msg, end="" if self.live else "\n", flush=True)
            self.shown = now

    def seconds(self):                                # the epoch's, its line cleared
        print("\r" + " " * 70 + "\r" if self.live else "", end="")
        return time.perf_counter() - self.t0


def train_one_epoch(model, data, opt, scaler, cfg, precision, epoch, hooks, first=False):
    model.train()                                                 # dropout on
    torch.manual_seed(cfg.seed * 1_000_000 + epoch)   # dropout's masks: from (seed, epoch) too
    n, bs = len(data.train_y), min(cfg.batch_size, len(data.train_y))   # tiny data: 1 batch
    steps = n // bs                                               # the last partial batch: out
    order, pad, shift, mirror = epoch_plan(n, cfg, epoch, data.train_y.device)
    spans = [hooks.share(s * bs, s * bs + bs) for s in range(steps)]   # one device: all
    loss_sum = torch.zeros((), device=data.train_y.device)
    correct = torch.zeros((), device=data.train_y.device, dtype=torch.long)
    progress = Progress(epoch, steps, bs, steps * (cfg.epochs - epoch + 1) * first)
    for step, (x, y) in enumerate(batches(data.train_x, data.train_y,
                                          [order[a:b] for a, b in spans])):
        a, b = spans[step]                                        # positions in the epoch
        x = data.normalize(augment(x, pad, shift[a:b], mirror[a:b]))   # (B, C, H, W) float
        step_no = (epoch - 1) * steps + step                      # since the run began
        logits, loss = train_step(model, x, y, opt, scaler, cfg, precision,
                                  lr_at(step_no, cfg.epochs * steps, cfg),
                                  weight=len(y) * hooks.world / bs)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
        progress.step(step, loss, x.device)
    seen, seconds = steps * bs, progress.seconds()
    return hooks.sum(loss_sum).item() / seen, hooks.sum(correct).item() / seen, seen / seconds


@torch.no_grad()                  # no graph for backward: faster, and less memory
def evaluate(model, data, cfg, precision):
    # The mean loss (label-smoothed like training's, so the two curves compare), the
    # accuracy, and every prediction (for the confusion matrix). eval() turns dropout off.
    model.eval()
    n, bs = len(data.test_y), cfg.batch_size
    index_lists = torch.arange(n, device=data.test_y.device).split(bs)
    loss_sum, preds = 0.0, []
    for x, y in batches(data.test_x, data.test_y, index_lists):
        with autocast(precision, y.device):
            logits = model(data.normalize(x)).float()             # (B, K)
        loss_sum += F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing,
                                    reduction="sum")
        preds.append(logits.argmax(dim=1))                        # (B,)
    preds = torch.cat(preds)                                      # (n,)
    return loss_sum.item() / n, (preds == data.test_y).float().mean().item(), preds


def train(cfg, data, device, hooks=Hooks()):
    # Set-up, then the loop. The seed before the model: the same seed, the same initial
    # weights. The model on the device before the optimizer: AdamW's state then lives there.
    cfg.image_size = data.normalize(data.train_x[:1].to(device)).shape[-1]   # the model's input
    if cfg.crop_pad is None:                      # a crop of the data itself: 4 px on CIFAR-10
        cfg.crop_pad = round(data.train_x.shape[-1] / 8)
    print(f"config: {cfg}")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.train_x.shape[1], len(data.classes), device).to(device)
    opt = build_optimizer(model, cfg, device)
    precision, why = precision_policy(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({n_params * 4 / 1e6:.2f} MB in float32), "
          f"attention {'fused' if use_fused_attn(cfg, device) else 'hand-written'}, "
          f"precision {precision} ({why})")
    metrics = hooks.restore(model, opt, scaler)                   # [] for a new run
    train_model = hooks.wrap(model)
    start, t0 = len(metrics) + 1, time.perf_counter()
    for epoch in range(start, cfg.epochs + 1):
        train_loss, train_acc, rate = train_one_epoch(train_model, data, opt, scaler, cfg,
                                                      precision, epoch, hooks, epoch == start)
        test_loss, test_acc, preds = evaluate(model, data, cfg, precision)   # plain model
        if not (math.isfinite(train_loss) and math.isfinite(test_loss)):   # stop before saving
            raise FloatingPointError(f"training diverged in epoch {epoch} (the loss became nan or "
                           f"inf); start a new run with a lower --lr than {cfg.lr}")
        metrics.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                            **{f"{data.held}_loss": test_loss, f"{data.held}_acc": test_acc},
                            lr=opt.param_groups[0]["lr"], images_per_s=rate))
        elapsed, done = time.perf_counter() - t0, (epoch - start + 1) / (cfg.epochs - start + 1)
        print(f"epoch {epoch:3d}/{cfg.epochs} | train loss {train_loss:.4f} acc "
              f"{100 * train_acc:5.2f}% | {data.held} loss {test_loss:.4f} acc "
              f"{100 * test_acc:5.2f}% | {rate:,.0f} img/s | {elapsed / 60:.1f} min, "
              f"{(elapsed / done - elapsed) / 60:.1f} min left", flush=True)
        hooks.after_epoch(model, opt, scaler, metrics)
    return model, metrics, preds



# Part II, the tool. The lesson ends here; what follows is plumbing, which changes training
# only through Part I's Hooks.
import argparse
import gc
import glob
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields, replace

import torch.distributed as dist


class UserError(Exception):
    # A problem the user can fix: main() prints its one sentence instead of a traceback.
    status = 1


class Interrupted(UserError):
    status = 130                  # the shell's status for a program stopped by Ctrl-C


# -----------------------------------------------------------------------------------------
# 9. Many devices: data parallel, with torchrun
# `torchrun --nproc-per-node=N vit.py` starts N copies, one per GPU, each told its rank.
# Each trains on its share of every batch (Hooks.share, .world); DDP averages the gradients
# inside backward() (an all-reduce), so all take the same step: the one-device run with the
# same --batch-size, up to rounding. Weights (the seed) and each epoch's plan (section 7)
# agree without a word; losses and counts are summed. Rank 0 alone writes files.
# -----------------------------------------------------------------------------------------
def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_sum(t):
    # The sum of `t` over all processes, on every process. (NCCL sums GPU tensors only.)
    if world_size() > 1:
        u = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(u)
        t = u.to(t.device)
    return t


def my_share(a, b):
    # This process's part of positions a..b-1, split as torch.tensor_split does
    q, r = divmod(b - a, world_size())
    start = a + rank() * q + min(rank(), r)
    return start, start + q + (rank() < r)


def fast_cuda(device):
    # From compute capability 8.0 float32 products use TF32, set by the one call that sets
    # torch's old and new flags alike (torch >= 2.9 refuses to read a mix; Inductor reads the
    # old). cuDNN's attention kernel has had wrong results for lengths not a multiple of 128.
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] >= 8:
            torch.set_float32_matmul_precision("high")
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def start_processes(name):
    # This process's device: under torchrun one GPU a process (LOCAL_RANK) by NCCL, or gloo.
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if name and not available.get(name.split(":")[0], False):
        why = f": torch {torch.__version__} is built without CUDA (README: Set-up)" * (
            name.startswith("cuda") and torch.version.cuda is None)   # PyPI's, on Windows
        raise UserError(f"device {name!r} is not available here{why}; use cpu"
                        + ", cuda" * available["cuda"] + ", mps" * available["mps"] + ".")
    device = torch.device(name or next(d for d in ("cuda", "mps", "cpu") if available[d]))
    warnings.filterwarnings("ignore", ".*not compiled with flash attention")   # Windows wheels
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return fast_cuda(device)
    if device.type == "mps":
        raise UserError("torchrun cannot use Apple's MPS; run `python vit.py` instead.")
    if device.type == "cuda":
        n, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if n > gpus:
            raise UserError(f"torchrun started {n} processes on a machine with {gpus} "
                            f"GPU(s); use --nproc-per-node={gpus}.")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    try:
        nccl = device.type == "cuda" and dist.is_nccl_available()    # Windows has none: gloo
        dist.init_process_group("nccl" if nccl else "gloo")
    except (ValueError, RuntimeError) as e:       # e.g. WORLD_SIZE set, but no torchrun
        raise UserError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']}, but the other processes "
                        f"cannot be reached ({str(e).splitlines()[0][:150]}); start vit.py "
                        f"with torchrun, or unset WORLD_SIZE.") from None
    if rank() != 0:                               # one copy of every line: rank 0's
        sys.stdout = open(os.devnull, "w")
    # DDP warns that the CLS token's gradient must be copied into its bucket: true, D numbers
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    return fast_cuda(device)


# -----------------------------------------------------------------------------------------
# 10. Data files: torchvision's data sets, your image folders, your images
# A folder data set is read, as --predict reads your images, by read_image. Real folders are
# untidy (gray and colour mixed, odd sizes, 16-bit scans, phone photos stored sideways,
# notebook and macOS litter): each is handled or refused in one sentence.
# -----------------------------------------------------------------------------------------
KNOWN_SIZES = {"cifar10": 32, "fashionmnist": 28}          # known before any download
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}   # Pillow's


@dataclass
class Upsampled(Data):            # each batch resized on the device, after augmentation (section 7)
    size: int = 0                 # the model's side (a pretrained ViT's 224; CIFAR-10 is 32)

    def normalize(self, x):
        x = super().normalize(x)                                  # (B, C, h, w): the data's
        return F.interpolate(x, size=self.size, mode="bilinear",  # (B, C, S, S): the model's
                             antialias=self.size < x.size(-1))


def load_data(cfg, device, saved=None, train=True):
    # The splits as Data on the device; not train (--eval): the test split alone. saved (a
    # model.pth's contents: --eval, --init) sets the channels, and the mean and std its weights
    # expect; else they are the training split's.
    name, splits = cfg.dataset.lower(), ("train", "test")[not train:]
    if name not in KNOWN_SIZES and not os.path.isdir(cfg.dataset):
        raise UserError(f"there is no folder {cfg.dataset!r} (if the data moved, give --dataset "
                        f"its new path)." if set("/\\") & set(cfg.dataset) else f"unknown dataset "
                        f"{cfg.dataset!r}: use cifar10, fashionmnist, or the path of a folder "
                        f"with train/ and test/ subfolders.")
    channels = saved and saved["config"]["in_channels"]
    xs, ys, classes = load_torchvision(cfg, splits, channels) if name in KNOWN_SIZES else \
        load_image_folder(cfg, device, splits, channels)
    if cfg.val_split and train:       # test/ checked, then left until train_run's end
        xs, ys = hold_out(xs[0], ys[0], cfg)
    if not saved and isinstance(xs[0], torch.Tensor):             # in memory: Part I's way
        data = make_data(xs[0], ys[0], xs[1], ys[1], classes, device)
    else:
        if saved:
            mean, std = (torch.tensor(saved[k]) for k in ("mean", "std"))
        else:                                 # streamed: each process its share, summed
            lo, hi = my_share(0, len(xs[0]))
            mean, std = channel_stats(xs[0].stream(torch.arange(lo, hi).split(256), "cpu"),
                                      len(xs[0]) * xs[0].size ** 2, all_sum)
        on = [t.to(device) if isinstance(t, torch.Tensor) else t for xy in zip(xs, ys) for t in xy]
        data = Data(*[None, None] * (not train), *on, classes, mean.to(device), std.to(device))
    data.held = "val" if cfg.val_split and train else "test"
    if cfg.image_size and cfg.image_size != data.test_x.shape[-1]:    # (torchvision's sets)
        data = Upsampled(**vars(data), size=cfg.image_size)
    return data


def hold_out(x, y, cfg):
    # --val-split: a seeded part of each class of the training split, measured every epoch in
    # the test split's place, so that choices made on it leave the test split unseen
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
    val = torch.zeros(len(y), dtype=torch.bool)
    for k in y.unique():                                          # each class its own part
        mine = order[y[order] == k]
        val[mine[:round(cfg.val_split * len(mine))]] = True
    if not val.any() or len(y[~val].unique()) < len(y.unique()):
        raise UserError(f"--val-split {cfg.val_split} of {len(y)} training images leaves " + (
            "a class with nothing to train on." if val.any() else "no validation image."))
    parts = [(~val).nonzero().flatten(), val.nonzero().flatten()]   # train, validation
    return [x[i] if isinstance(x, torch.Tensor) else ImageFiles(
        [x.files[j] for j in i.tolist()], x.mode, x.size) for i in parts], [y[i] for i in parts]


def load_torchvision(cfg, wanted, channels=None):
    # downloaded once (CIFAR-10 170 MB, FashionMNIST 30 MB); .data: (n, H, W[, C]) uint8
    import torchvision
    cls = {"cifar10": torchvision.datasets.CIFAR10,
           "fashionmnist": torchvision.datasets.FashionMNIST}[cfg.dataset.lower()]
    splits = []
    for train in (s == "train" for s in wanted):
        if rank() > 0:
            dist.barrier()                        # rank 0 downloads first, then the others
        try:
            ds = cls(cfg.data_root, train=train, download=True)
        except Exception as e:                    # URLError, RuntimeError, ...: "no data"
            hint = ("this Python cannot check certificates: on a Mac, run 'Install Certificates"
                    ".command' in Applications/Python" if "CERTIFICATE_VERIFY_FAILED" in str(e)
                    else "if this machine is offline, point --data-root at a folder that holds"
                    " the data set, or --dataset at an image folder with train/ and test/")
            raise UserError(f"could not find or download {cfg.dataset} in {cfg.data_root!r} "
                            f"({' '.join(str(e).split())}); {hint}.") from None
        if rank() == 0 and world_size() > 1:
            dist.barrier()
        x = torch.as_tensor(ds.data)                              # (n, H, W[, C]) uint8
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)   # (n, C, H, W)
        if channels and channels != x.size(1):    # a saved model's: as read_image converts
            x = x.expand(-1, 3, -1, -1) if channels == 3 else \
                torchvision.transforms.functional.rgb_to_grayscale(x)    # (n, 1, H, W)
        splits += [x.contiguous(), torch.as_tensor(ds.targets).long()]
    return splits[0::2], splits[1::2], list(ds.classes)


def read_image(path, mode, size):
    # One image file -> uint8 (C, size, size): upright as its EXIF tag says (phones store
    # photos sideways), 16-bit and float pixels scaled to 8 bits (Pillow's convert() would
    # clip them: a 16-bit scan white, a float one black), converted to "L" (gray) or "RGB",
    # the shorter side resized to `size`, the centre cut square.
    import numpy as np
    from PIL import Image, ImageOps
    from torchvision.transforms import functional as TF
    if not os.path.isfile(path):
        raise UserError(f"{path!r} is a folder; give image files (for example {path}/*.jpg)."
                        if os.path.isdir(path) else f"image {path!r} does not exist.")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I") or im.mode == "F":
                x = np.asarray(im, dtype=np.float64)
                x *= 255 / 65535 if im.mode.startswith("I") else 255 if x.max() <= 1 else 1
                im = Image.fromarray(x.round().clip(0, 255).astype(np.uint8))   # mode "L"
            im = im.convert(mode)
            if im.size != (size, size):
                im = TF.center_crop(TF.resize(im, size, antialias=True), size)
            return TF.pil_to_tensor(im)                           # (C, size, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {path!r} as an image ({e}).") from None


def list_split(folder):
    # ImageFolder's layout, folder/<class>/**/*.jpg, labels from the sorted class names;
    # hidden entries (.ipynb_checkpoints/, macOS's ._photo.jpg) are not data.
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name[0] != ".")
    def wanted(f):
        return f.lower().endswith(IMG_EXTENSIONS) and not any(
            p.startswith(".") for p in os.path.relpath(f, folder).split(os.sep))
    items = make_dataset(folder, {c: k for k, c in enumerate(classes)}, allow_empty=True,
                         is_valid_file=wanted) if classes else []
    return [f for f, _ in items], torch.tensor([k for _, k in items], dtype=torch.long), classes


def load_image_folder(cfg, device, wanted, channels=None):
    # folder/{train,test}/<class>/..., each wanted split one tensor: RGB if any image has
    # colour, else gray (or the given channels); --image-size, else the commonest shorter
    # side. A first pass reads only the headers (cheap) to decide, and whether it all fits.
    from PIL import Image
    path = cfg.dataset
    missing = [s + "/" for s in wanted if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise UserError(f"{path!r} has no {' or '.join(missing)} subfolder; an image folder "
                        f"needs train/<class>/... and test/<class>/... images.")
    try:
        splits = [list_split(os.path.join(path, s)) for s in wanted]   # (files, labels, classes)
    except OSError as e:                                          # e.g. no permission
        raise UserError(f"cannot read the image folder {path!r} ({e}).") from None
    _, labels, classes = splits[0]                        # train/ (--eval: test/)
    (test_files, _, test_classes), first = splits[-1], wanted[0]
    empty = [f"train/{c}/" for k, c in enumerate(classes) if not (labels == k).any()] * (
        first == "train")                                         # (--eval: test/ may lack one)
    problem = (f"train/ and test/ hold different classes ({classes} vs {test_classes})"
               if classes != test_classes else f"has {len(classes)} class folder(s) in {first}/;"
               f" a classifier needs at least two ({first}/<class>/...)" if len(classes) < 2 else
               f"has no images in {(empty + ['test/'])[0]}" if empty or not test_files else "")
    if problem:
        raise UserError(f"{path!r} {problem}.")
    modes, shapes, bad, files = set(), Counter(), [], [f for s in splits for f in s[0]]
    for file in files:
        try:
            with Image.open(file) as im:                          # reads the header only
                modes.add(im.mode)
                shapes[im.size] += 1                              # (width, height)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            bad.append(file)
    if bad:
        raise UserError(f"{len(bad)} files cannot be read as images: {', '.join(bad[:3])}"
                        + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                        + "; remove or replace them.")
    mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if modes <= GRAY_MODES else "RGB")
    sides = sum((Counter({min(shape): n}) for shape, n in shapes.items()), Counter())
    size = cfg.image_size or sides.most_common(1)[0][0]
    if size % cfg.patch_size:
        raise UserError(f"image size {size} is not divisible by patch size {cfg.patch_size}; "
                        f"choose --patch-size among its divisors, or an --image-size.")
    how = "--image-size" if cfg.image_size else "the commonest size"
    resized = sum(n for shape, n in shapes.items() if shape != (size, size))
    print(f"images: {'RGB' if mode == 'RGB' else 'gray'}, {size}x{size} px ({how}); "
          f"{resized:,} of {len(files):,} resized or cropped")
    # Kept on the device as uint8 if that takes at most half the free memory (of the device
    # and the RAM), else streamed from disk: all processes alike
    xs = [ImageFiles(files, mode, size) for files, _, _ in splits]
    free, need = free_memory(device), len(files) * math.prod(xs[0].shape[1:]) / 1e9   # GB
    have = "free memory unknown" if free is None else f"{free / 1e9:.1f} GB free"
    keep = (free is None or need <= free / 2e9) and cfg.data != "stream"
    keep = all_sum(torch.tensor(int(keep))).item() == world_size()   # all processes, or none
    print(f"data: {len(files):,} images of {xs[0].shape[1:]}, {need:.2f} GB as uint8, {have} on "
          f"{device}: " + ("kept on the device" if keep else "streamed from disk") +
          f" (--data {cfg.data})")
    return [x[:] if keep else x for x in xs], [y for _, y, _ in splits], classes


def free_memory(device):
    # Bytes free on the GPU (by index: torch < 2.5 refuses "cuda") and in RAM (MemAvailable,
    # shared by a node's processes), the less of the two; None where RAM is unknown (macOS).
    ram = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as f:
            kb = next(line for line in f if line.startswith("MemAvailable:")).split()[1]
            ram = int(kb) * 1024 // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(torch.cuda.mem_get_info(device.index)[0], ram or math.inf) \
        if device.type == "cuda" else ram


class ImageFiles:
    # A split left on disk, sliced or indexed by a tensor like the (n, C, S, S) uint8 tensor
    # it stands for.
    def __init__(self, files, mode, size):
        self.files, self.mode, self.size = files, mode, size
        self.shape = (len(files), 1 if mode == "L" else 3, size, size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):                     # a slice or a tensor of indices
        index = torch.arange(len(self))[i] if isinstance(i, slice) else i
        out = torch.empty((len(index), *self.shape[1:]), dtype=torch.uint8)   # (n, C, S, S)
        for k, batch in enumerate(self.stream(index.cpu().split(256), "cpu")):
            out[256 * k:256 * k + len(batch)] = batch   # in place: no second copy of the data
        return out

    def stream(self, index_lists, device):
        # Each list's images, (B, C, S, S) uint8 on the device, decoded by threads (Pillow
        # lets go of Python's lock while it decodes), the next batch while this one trains.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4
        pool = ThreadPoolExecutor(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        submit = lambda idx: [pool.submit(read_image, self.files[j], self.mode, self.size)
                              for j in idx.tolist()]
        try:
            ahead = submit(index_lists[0]) if len(index_lists) else []
            for k in range(len(index_lists)):
                now, ahead = ahead, submit(index_lists[k + 1]) if k + 1 < len(index_lists) else []
                yield torch.stack([f.result() for f in now]).to(device)
        finally:
            pool.shutdown(cancel_futures=True)


# -----------------------------------------------------------------------------------------
# 11. Checkpoints and run folders: written atomically, loaded safely, never overwritten
# model.pth is what you ship: the weights, the model's configuration as plain data, the
# class names and the normalisation. checkpoint.pth is every state an exact resume reads:
# the weights, AdamW's running averages and step counts, the fp16 scaler's scale, the epoch
# (the schedule is a function of the step), the metrics and the configuration; nothing
# random, since order, crops, flips and dropout are drawn from (seed, epoch).
# -----------------------------------------------------------------------------------------
def write_atomically(path, write, mode="wb"):
    # write(f) into a file we open and close (Windows deletes no open file), then rename: a
    # failed write (full disk, no permission, Ctrl-C) leaves the previous `path` as it was.
    tmp = f"{path}.{os.getpid()}.tmp"                             # one per process
    try:
        with open(tmp, mode) as f:
            write(f)
        for wait in (0.05, 0.1, 0.2, 0.4, 0.8):   # Windows: a virus scanner, OneDrive or an
            with contextlib.suppress(PermissionError):        # image viewer may hold `path`
                return os.replace(tmp, path)                      # atomic on one file system
            time.sleep(wait)
        os.replace(tmp, path)                                     # the last try: its error
    except (OSError, RuntimeError) as e:     # torch.save reports a full disk as RuntimeError
        if isinstance(e.__context__, KeyboardInterrupt):   # and Ctrl-C during a write too
            raise e.__context__ from None
        cause = getattr(e, "strerror", None) or "the write stopped short, as on a full disk"
        raise UserError(f"could not write {path!r} ({cause}); any earlier version of it is "
                        f"kept.") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def writable_folder(path):
    # made and tried before any data is read: a typo in --out costs a second, not a run
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"cannot write in the folder {path!r} ({e.strerror or e}).") from None
    return path


def claim_run_folder(out):
    # metrics.json created with O_EXCL, which fails if it exists: of two runs aimed at one
    # folder exactly one gets it, and a folder that holds a run is never written over.
    ckpt = os.path.join(writable_folder(out), "checkpoint.pth")
    try:
        if os.path.exists(ckpt) or os.path.exists(os.path.join(out, "model.pth")):
            raise FileExistsError
        open(os.path.join(out, "metrics.json"), "x").close()
    except FileExistsError:
        raise UserError(f"{out!r} already holds a run; " + (
            f"continue it with --resume {ckpt}" if os.path.exists(ckpt) else "it is running, "
            "or stopped before its first epoch ended (then delete it)") +
            ", or choose another --out.") from None
    save_metrics([], out)


def new_run_folder(cfg):
    # runs/NAME-DATE-TIME, or -2, -3, ... (os.mkdir creates or fails: two runs, two folders)
    base = os.path.join("runs", os.path.basename(os.path.normpath(cfg.dataset)).lower() +
                        "-" + time.strftime("%Y%m%d-%H%M%S"))
    writable_folder("runs")
    for out in [base] + [f"{base}-{n}" for n in range(2, 1000)]:
        with contextlib.suppress(FileExistsError):
            os.mkdir(out)
            return out
    raise UserError(f"{base}-* are all taken; choose a run folder with --out.")


def saved_epoch(out):
    ckpt = os.path.join(out, "checkpoint.pth")
    return torch.load(ckpt, weights_only=True)["epoch"] if os.path.exists(ckpt) else 0


def load_file(path, what):
    # A model.pth (what="model file") or a checkpoint.pth, each with all it needs; on the CPU
    needs = {"model file": ("state_dict", "mean", "std", "dataset", "data_root"),
             "checkpoint": ("model", "optimizer", "scaler", "epoch", "metrics")}
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} " + ("is a folder; give the model.pth or checkpoint.pth"
                        " in it." if os.path.isdir(path) else "does not exist" + f" (nor is it "
                        f"{', '.join(TORCHVISION_VITS)})" * (what == "model file") + "."))
    try:
        if not zipfile.is_zipfile(path):                          # torch.save writes a zip
            raise ValueError
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{what} {path!r} was refused: it holds objects other than tensors and "
                        f"plain data, and loading it could run code.") from None
    except Exception:
        raise UserError(f"{what} {path!r} is corrupt or is not a PyTorch file.") from None
    if isinstance(obj, dict) and ("state_dict" in obj) != (what == "model file"):   # the other
        raise UserError(f"{path!r} is " + ("a checkpoint; use the model.pth next to it." if
                        what == "model file" else "a model file; --resume takes checkpoint.pth."))
    if not (isinstance(obj, dict) and {"config", "classes", *needs[what]} <= obj.keys()):
        raise UserError(f"{what} {path!r} was not written by this vit.py.")
    return obj


MODEL_KEYS = ("image_size", "patch_size", "dim", "depth", "heads", "mlp_dim", "dropout", "pool")
# torchvision's ImageNet ViTs (--init, --predict): their shapes, and their names -> ours
TORCHVISION_VITS = {f"vit_{s}_{p}": dict(image_size=224, patch_size=p, dim=d, depth=n, heads=h,
                                         mlp_dim=4 * d, dropout=0.0, pool="cls")
                    for s, d, n, h in (("b", 768, 12, 12), ("l", 1024, 24, 16)) for p in (16, 32)}
TORCHVISION_NAMES = [                                     # (their pattern, our name), in order
    (r"^conv_proj", "patch_embed.proj"), (r"^class_token", "cls_token"), (r"^heads\.head", "head"),
    (r"^encoder\.pos_embedding", "pos_embed"), (r"^encoder\.ln\.", "norm."),
    (r"^encoder\.layers\.encoder_layer_", "blocks."), (r"\.ln_(\d)\.", r".norm\1."),
    (r"self_attention\.in_proj_", "attn.qkv."), (r"self_attention\.out_proj", "attn.proj"),
    (r"mlp\.0", "mlp.fc1"), (r"mlp\.3", "mlp.fc2")]


def pretrained(name):
    # A torchvision ViT's ImageNet weights, downloaded once into torch's cache, as our model.pth
    # holds them: shape, our names, the 1,000 class names, and the mean and std they expect
    import torchvision
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=rank() == 0)
    except Exception as e:                        # URLError, ...: offline
        raise UserError(f"could not download {name}'s weights ({' '.join(str(e).split())[:150]})"
                        f"; on a machine without internet, put {os.path.basename(weights.url)} "
                        f"into {os.path.join(torch.hub.get_dir(), 'checkpoints')}.") from None
    for theirs, ours in TORCHVISION_NAMES:
        state = {re.sub(theirs, ours, k): v for k, v in state.items()}
    return {"config": TORCHVISION_VITS[name] | {"in_channels": 3}, "state_dict": state,
            "classes": weights.meta["categories"], "mean": list(weights.transforms().mean),
            "std": list(weights.transforms().std), "dataset": "imagenet", "data_root": ""}


def transferred(saved, model, cfg, classes):
    # --init: saved weights for `model`, the position embedding resized for another image size
    # (bicubic, the CLS row kept: torchvision's own), and for other classes a new zero head
    from torchvision.models.vision_transformer import interpolate_embeddings
    pos = {"encoder.pos_embedding": saved["state_dict"]["pos_embed"]}     # torchvision's name
    state = saved["state_dict"] | {"pos_embed": interpolate_embeddings(
        cfg.image_size, cfg.patch_size, pos)["encoder.pos_embedding"]}
    if list(saved["classes"]) != list(classes):
        state |= {"head.weight": model.head.weight, "head.bias": model.head.bias}
    return state


def save_checkpoint(out, cfg, data, model, opt, scaler, metrics):
    # model.pth holds plain data only and CPU tensors, so that any program on any machine can
    # read it with torch.load(path, weights_only=True); it is written first, never older.
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    common = {"classes": data.classes, "mean": data.mean.tolist(), "std": data.std.tolist()}
    shape = {k: getattr(cfg, k) for k in MODEL_KEYS} | {"in_channels": data.train_x.shape[1]}
    for name, obj in (("model.pth", {"config": shape, "state_dict": weights, "dataset": cfg.dataset,
            "data_root": cfg.data_root, "precision": cfg.precision}), ("checkpoint.pth", {
            "config": asdict(cfg), "model": weights, "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "epoch": metrics[-1]["epoch"], "metrics": metrics})):
        write_atomically(os.path.join(out, name), lambda f: torch.save(obj | common, f))
    save_metrics(metrics, out)


def save_metrics(metrics, out):
    write_atomically(os.path.join(out, "metrics.json"), lambda f: json.dump(
        metrics, f, indent=1, allow_nan=False), "w")              # NaN is not JSON


def load_weights(model, state_dict, path):
    # strict: every name and shape must match, or the sentence says which does not
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
# 12. Figures: PNG files, also shown inline in a notebook
# At the start: the patches, one batch's shapes. After training and by --eval: the curves,
# attention (in mistakes too), position-embedding similarity (ViT paper, Figure 7), confusion.
# -----------------------------------------------------------------------------------------
def save_figure(fig, path):
    import matplotlib.pyplot as plt
    try:
        write_atomically(path, lambda f: fig.savefig(f, dpi=120, format="png",
                                                     bbox_inches="tight"))
        if in_notebook():
            plt.show()
    finally:
        plt.close(fig)
    print(f"saved {path}")


def plot_patches(image, P, path):
    # One training image (C, H, W), and its patches in token order, from patchify itself
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid                       # tiles images into one
    tiles = patchify(image[None], P)[0].view(-1, image.size(0), P, P)   # (N, C, P, P)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), width_ratios=[1, 1.4])
    for ax, images, title in ((axes[0], image[None], f"the image, {image.shape[1]} px"), (
            axes[1], tiles, f"its {len(tiles)} {P}x{P} patches in token order, 1 to "
            f"{len(tiles)} (token 0: CLS)")):
        ax.imshow(make_grid(images.expand(-1, 3, -1, -1).cpu(), nrow=image.shape[2] // P,
                            padding=1, pad_value=255).permute(1, 2, 0).numpy())   # (h, w, 3)
        ax.set_title(title)
        ax.axis("off")
    save_figure(fig, path)
    return tiles


@torch.no_grad()
def print_shapes(model, images):
    # One batch through the model, and the shape after each stage (by forward hooks)
    def show(what, shape, legend):
        print(f"  {what:<28} {str(tuple(shape)):<18} {legend}")
    stages = [(model.patch_embed, "patch tokens", "(B, N, D)")] + [
        (b, f"block {i + 1} (CLS + patches)", "(B, T, D), T = N + 1")
        for i, b in enumerate(model.blocks)]
    hooks = [m.register_forward_hook(lambda m, i, o, w=w, l=l: show(w, o.shape, l))
             for m, w, l in stages] + [model.head.register_forward_pre_hook(
                 lambda m, i: show(f"{model.pool} token out", i[0].shape, "(B, D)"))]
    print("one batch through the model:")
    show("images", images.shape, "(B, C, H, W)")
    show("logits", model.eval()(images).shape, "(B, K)")
    for h in hooks:
        h.remove()


def plot_curves(metrics, path):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    held = ("val", "validation") if "val_acc" in metrics[0] else ("test", "test")   # --val-split
    for ax, key, scale, title in ((axes[0], "loss", 1, "Loss (label-smoothed cross-entropy)"),
                                  (axes[1], "acc", 100, "Accuracy (%)")):
        for split, label in (("train", "train (augmented)"), held):
            ax.plot([m["epoch"] for m in metrics], [scale * m[f"{split}_{key}"] for m in metrics],
                    "o-", label=label)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


@torch.no_grad()
def attention_maps(model, images):
    # The rollout (Abnar & Zuidema 2020), (B, N): attention also flows through the residuals,
    # so each layer's map is 0.5 A + 0.5 I (A: the heads' mean), and their product says how
    # much each patch reaches the output token (CLS; under pool="mean", the patches' mean).
    # And the last layer's map from each head, (B, h, N). Both by the hand-written path.
    fused = [b.attn.fused for b in model.blocks]
    for b in model.blocks:
        b.attn.fused = False
    model.eval()(images)
    for b, f in zip(model.blocks, fused):
        b.attn.fused = f
    weights = [b.attn.attn_weights.float() for b in model.blocks]   # each (B, h, T, T)
    eye = torch.eye(weights[0].size(-1), device=images.device)
    rollout = eye
    for w in weights:
        a = 0.5 * w.mean(dim=1) + 0.5 * eye                       # (B, T, T)
        rollout = (a / a.sum(dim=-1, keepdim=True)) @ rollout     # (B, T, T)
    rows = slice(0, 1) if model.pool == "cls" else slice(1, None)   # who reads the output
    return rollout[:, rows, 1:].mean(1), weights[-1][:, :, rows, 1:].mean(2)


def plot_attention(model, images, x, titles, path, heading=""):
    # Each image (uint8; x: normalised, for the model), its rollout, each head's last map.
    import matplotlib.pyplot as plt
    rollout, last = attention_maps(model, x)                      # (B, N), (B, h, N)
    side = math.isqrt(rollout.size(1))                            # H / P
    maps = torch.cat([rollout[:, None], last], 1).view(len(x), -1, side, side)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="nearest").cpu()   # (B, 1+h, H, W)
    fig, axes = plt.subplots(len(x), maps.size(1) + 1, squeeze=False, layout="constrained",
                             figsize=(1.6 * (maps.size(1) + 1) + 1, 1.8 * len(x) + 0.8))
    for i in range(len(x)):
        im = images[i].cpu().permute(1, 2, 0).squeeze(-1).numpy()   # matplotlib takes numpy
        for j, ax in enumerate(axes[i]):
            ax.imshow(im, cmap="gray" if images.size(1) == 1 else None, vmin=0, vmax=255)
            if j:
                ax.imshow(maps[i, j - 1].numpy(), cmap="inferno", alpha=0.6)
            ax.set_title(titles[i] if j == 0 else "rollout" if j == 1 else f"head {j - 2}",
                         fontsize=8)
            ax.axis("off")
    who = "the CLS token looks" if model.pool == "cls" else "the patch tokens look on average"
    fig.suptitle(f"{heading}Where {who} (bright = more attention): the rollout over all\n"
                 "layers, and each head of the last layer", fontsize=10)
    save_figure(fig, path)


def plot_pos_embed(model, path):
    # Tile (r, c): the cosine similarity of patch (r, c)'s position embedding with each other
    import matplotlib.pyplot as plt
    pos = F.normalize(model.pos_embed[0, 1:].detach().float().cpu(), dim=-1)   # (N, D)
    side = math.isqrt(pos.size(0))
    sim = (pos @ pos.T).view(-1, 1, side, side)                   # (N, 1, side, side)
    fig, ax = plt.subplots(figsize=(8, 8))
    from torchvision.utils import make_grid
    grid = make_grid(sim, nrow=side, padding=1, pad_value=float("nan"))[0]
    shown = ax.imshow(grid.numpy(), cmap="viridis", vmin=-1, vmax=1)
    ax.set(title="Position embedding similarity (cosine) of each patch with all patches",
           xlabel="patch column", ylabel="patch row", xticks=[], yticks=[])
    fig.colorbar(shown, ax=ax, shrink=0.7, label="cosine similarity")
    save_figure(fig, path)


def plot_confusion(data, preds, path):
    # Up to 30 classes, every cell with its count and every class named; beyond, an image.
    import matplotlib.pyplot as plt
    K = len(data.classes)
    conf = torch.bincount(data.test_y.cpu() * K + preds.cpu(), minlength=K * K).view(K, K)
    fig, ax = plt.subplots(figsize=(min(1.0 + 0.6 * K, 12),) * 2)
    shown = ax.imshow(conf.numpy(), cmap="Blues")
    if K <= 30:
        for i, j in torch.cartesian_prod(torch.arange(K), torch.arange(K)).tolist():
            ax.text(j, i, conf[i, j].item(), ha="center", va="center", fontsize=7,
                    color="white" if conf[i, j] > conf.max() / 2 else "black")
        ax.set_xticks(range(K), data.classes, rotation=45, ha="right")
        ax.set_yticks(range(K), data.classes)
    ax.set(title="Confusion matrix (test split)", xlabel="predicted class", ylabel="true class")
    fig.colorbar(shown, ax=ax, label="images")
    save_figure(fig, path)


def make_figures(model, data, preds, out, metrics=None):
    if metrics:                                   # after training; not by --eval
        plot_curves(metrics, os.path.join(out, "curves.png"))
    plot_pos_embed(model, os.path.join(out, "pos_embed.png"))
    plot_confusion(data, preds, os.path.join(out, "confusion.png"))
    wrong = (preds != data.test_y).nonzero().flatten().cpu()
    for name, among in (("attention", torch.arange(len(preds))), ("mistakes", wrong)):
        # where the model looks in 6 test images spread over `among` (folders sort by class)
        spread = torch.linspace(0, len(among) - 1, min(6, len(among))).round().long().unique()
        picked, path = among[spread].to(data.test_y.device), os.path.join(out, f"{name}.png")
        if len(picked) == 0:                      # nothing wrong; no old mistakes.png either
            print("no test image is misclassified: no mistakes.png")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        images = data.test_x[picked].to(data.test_y.device)       # (n <= 6, C, H, W) uint8
        titles = [data.classes[k][:20] + (among is wrong) * f"\nseen as {data.classes[p][:20]}"
                  for k, p in zip(data.test_y[picked].tolist(), preds[picked].tolist())]
        heading = (f"{len(wrong):,} of {len(preds):,} test images misclassified, "
                   f"{len(picked)} shown.\n") if among is wrong else ""
        plot_attention(model, images, data.normalize(images), titles, path, heading)


# -----------------------------------------------------------------------------------------
# 13. The training run: Part I's train, with a run folder, checkpoints and figures
# -----------------------------------------------------------------------------------------
def validate(cfg):
    # Before anything is loaded, so a typo costs a second, not a download.
    def bad(name, rule):
        return UserError(f"--{name.replace('_', '-')} must {rule}, got {getattr(cfg, name)}.")
    for f in fields(cfg):                         # nan and inf pass every comparison below
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise bad(f.name, "be a finite number")
    for name in ("epochs", "batch_size", "lr", "patch_size", "dim", "depth", "heads", "mlp_dim"):
        if getattr(cfg, name) <= 0:
            raise bad(name, "be positive")
    for name in ("dropout", "warmup", "label_smoothing", "val_split"):
        if not 0 <= getattr(cfg, name) < 1:
            raise bad(name, "be in [0, 1)")
    for name in ("image_size", "crop_pad", "weight_decay", "clip_grad"):
        if (getattr(cfg, name) or 0) < 0:
            raise bad(name, "not be negative")
    if not 0 <= cfg.seed < 2 ** 32:
        raise bad("seed", "be in [0, 2^32)")
    if cfg.lr > 1:
        raise bad("lr", "be at most 1: AdamW moves every weight by about lr at each step")
    if cfg.lr * cfg.weight_decay >= 1:
        raise UserError(f"--lr {cfg.lr} times --weight-decay {cfg.weight_decay} must be below 1: "
                        f"AdamW multiplies every weight by 1 - lr * weight_decay at each step.")
    if cfg.dim % cfg.heads:
        raise bad("dim", f"be divisible by --heads {cfg.heads}: each head gets an equal share")
    if cfg.batch_size < world_size():
        raise bad("batch_size", f"be at least the number of processes, {world_size()}")
    if cfg.data == "stream" and cfg.dataset.lower() in KNOWN_SIZES:
        raise UserError(f"--data stream reads an image folder from disk; {cfg.dataset} is read "
                        f"whole by torchvision and kept in memory.")
    size = cfg.image_size or KNOWN_SIZES.get(cfg.dataset.lower(), 0)   # 0: a folder, unknown
    if size % cfg.patch_size:
        raise UserError(f"image size {size} is not divisible by patch size {cfg.patch_size}; "
                        f"choose --patch-size among its divisors.")


def check_precision(requested, device):
    # A tiny step first: some torch versions refuse a pair (MPS autocast before 2.5, fp16's
    # scaler on MPS before 2.7: float64), others only warn.
    name = requested if requested != "auto" else precision_policy("auto", device)[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with autocast(name, device):
                w = torch.ones(1, device=device, requires_grad=True)
                scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
                scaler.scale((w * 2).sum()).backward()
            scaler.unscale_(torch.optim.SGD([w]))
    except (RuntimeError, UserWarning, TypeError) as e:
        raise UserError(f"torch {torch.__version__} cannot run {name} autocast on {device.type} "
                        f"({str(e).splitlines()[0]}); use --precision fp32.") from None
    return name


def train_run(cfg, device, out, ckpt=None, ckpt_path=None):
    init = cfg.init and load_model(cfg.init, torch.device("cpu"))[2]   # --init's model.pth
    data = load_data(cfg, device, init or None)   # with its channels, mean and std
    precision = check_precision(cfg.precision, device)
    print(f"data: {cfg.dataset}: {len(data.train_y):,} train and {len(data.test_y):,} "
          f"{data.held} images of {tuple(data.train_x.shape[1:])}, {len(data.classes)} classes; "
          f"run folder: {out}" + (f", {world_size()} processes" if world_size() > 1 else ""))

    def restore(model, opt, scaler):              # the loop starts where the checkpoint ended
        if ckpt is None:
            if init:
                load_weights(model, transferred(init, model, cfg, data.classes), cfg.init)
            if rank() == 0:                       # the image as the model sees it
                plot_patches(F.interpolate(data.train_x[:1].float(), cfg.image_size).byte()[0]
                             .cpu(), cfg.patch_size, os.path.join(out, "patches.png"))
                print_shapes(model, data.normalize(data.train_x[:cfg.batch_size].to(device)))
            return []
        check_fits(ckpt["classes"], data, ckpt_path)
        load_weights(model, ckpt["model"], ckpt_path)
        fused = {"fused": opt.defaults["fused"]}   # as this device runs AdamW, not the saving one
        try:
            groups = [g | fused for g in ckpt["optimizer"]["param_groups"]]
            opt.load_state_dict(ckpt["optimizer"] | {"param_groups": groups})
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{ckpt_path!r} holds an optimizer state for another model.") from None
        if scaler.is_enabled() and ckpt["scaler"]:                 # an fp16 run's scale
            scaler.load_state_dict(ckpt["scaler"])
        return ckpt["metrics"]

    def wrap(model):            # torch.compile fuses small operations, for one batch shape
        if cfg.compile:
            try:
                model = torch.compile(model, dynamic=False)
            except RuntimeError as e:                 # e.g. no Dynamo on this Python
                raise UserError(f"torch.compile is not available here "
                                f"({str(e).splitlines()[0]}); run without --compile.") from None
        if world_size() > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None)
        return model

    hooks = Hooks(restore, wrap, my_share, world_size(), all_sum,   # after_epoch: rank 0 saves
                  lambda *state: rank() == 0 and save_checkpoint(out, cfg, data, *state))
    model, metrics, preds = train(cfg, data, device, hooks)
    if cfg.val_split:                  # the test split, once, read as --eval reads it
        data = load_data(cfg, device, {"config": {"in_channels": data.train_x.shape[1]},
                                       "mean": data.mean.tolist(), "std": data.std.tolist()}, False)
        loss, acc, preds = evaluate(model, data, cfg, precision)
        metrics[-1] |= dict(test_loss=loss, test_acc=acc)
    if rank() == 0:
        save_metrics(metrics, out)                # (--val-split: with the test split's result)
        make_figures(model, data, preds, out, metrics)
    print(f"saved {os.path.join(out, 'model.pth')}, checkpoint.pth, metrics.json")
    print(f"test accuracy: {100 * metrics[-1]['test_acc']:.2f}%")
    return metrics


def run_in_folder(cfg, device, out, new_folder=True, ckpt=None, ckpt_path=None):
    if rank() == 0:                     # a resume in place, too, must be able to write there
        claim_run_folder(out) if new_folder else writable_folder(out)
    again = (f"torchrun --nproc-per-node={world_size()} vit.py" if world_size() > 1 else
             "python vit.py")
    try:
        return train_run(cfg, device, out, ckpt, ckpt_path)
    except KeyboardInterrupt:                   # Ctrl-C, or a notebook's stop button
        done = saved_epoch(out)
        raise Interrupted(
            "interrupted after the last epoch; the trained model is saved (--eval draws its "
            "figures)" if done == cfg.epochs else
            f"interrupted after epoch {done}; resume with `{again} --resume "
            f"{os.path.join(out, 'checkpoint.pth')} --epochs {cfg.epochs}`" if done else
            f"interrupted before an epoch ended; resume again with `{again} --resume {ckpt_path}"
            + (f" --out {out}" if new_folder else "") + f" --epochs {cfg.epochs}`" if ckpt_path
            else "interrupted before the first epoch ended; nothing was saved") from None
    except FloatingPointError as e:
        done = saved_epoch(out)
        raise UserError(f"{e}; " + (f"the checkpoint of epoch {done} in {out} is kept." if done
                                    else f"no checkpoint was written in {out}.")) from None
    except (RuntimeError, MemoryError) as e:
        if isinstance(e, MemoryError) or "out of memory" in str(e) or "can't allocate" in str(e):
            raise UserError(f"out of memory on {device} ({str(e).splitlines()[0][:120]}); try a "
                            f"smaller --batch-size, model or --image-size.") from None
        if cfg.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise UserError(f"--compile failed ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200]}); run without --compile.") \
                from None
        raise
    finally:                  # a run that ends before its first checkpoint gives its folder back
        if new_folder and rank() == 0 and not os.path.exists(os.path.join(out, "checkpoint.pth")):
            for name in ("metrics.json", "patches.png", "model.pth"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out, name))
            with contextlib.suppress(OSError):
                os.rmdir(out)                                     # only if now empty


# -----------------------------------------------------------------------------------------
# 14. Using a trained model: evaluate it, or classify your own images
# At test time the preprocessing must be the training's own: the same size, channels, mean
# and std (saved in model.pth), or the model sees numbers it never saw in training.
# -----------------------------------------------------------------------------------------
def load_model(path, device):
    saved = pretrained(path) if path in TORCHVISION_VITS else load_file(path, "model file")
    if not all(k in saved["config"] for k in MODEL_KEYS + ("in_channels",)):
        raise UserError(f"model file {path!r} was not written by this vit.py.")
    cfg = Config(**{k: saved["config"][k] for k in MODEL_KEYS})
    model = build_model(cfg, saved["config"]["in_channels"], len(saved["classes"]), device)
    load_weights(model, saved["state_dict"], path)
    return model.to(device).eval(), cfg, saved


def eval_run(args, device):
    model, cfg, saved = load_model(args.eval, device)
    here = saved["data_root"] if os.path.isdir(saved["data_root"]) else "./data"  # not C:\content
    cfg = replace(cfg, dataset=args.dataset or saved["dataset"], data=args.data or "auto",
                  data_root=args.data_root or here)
    out = writable_folder(args.out or os.path.join(os.path.dirname(os.path.abspath(args.eval)),
                                                   "eval"))       # the run's own figures stay
    data = load_data(cfg, device, saved, train=False)             # the test split alone
    check_fits(saved["classes"], data, args.eval)
    precision = check_precision(args.precision or saved.get("precision", "auto"), device)
    loss, acc, preds = evaluate(model, data, cfg, precision)
    print(f"evaluated {args.eval} on {cfg.dataset} ({len(data.test_y):,} test images), "
          f"loss {loss:.4f}\ntest accuracy: {100 * acc:.2f}%", flush=True)   # before figures
    if rank() == 0:                               # under torchrun, as in training
        make_figures(model, data, preds, out)
    return acc


@torch.no_grad()
def predict_run(args, device):
    # Read and normalised as the test split; the softmax gives probabilities, topk the best 3.
    if len(args.predict) < 2:
        raise UserError("--predict takes a model.pth and then one or more image files.")
    model, cfg, saved = load_model(args.predict[0], device)
    if args.out:
        writable_folder(args.out)
    mode = "L" if saved["config"]["in_channels"] == 1 else "RGB"
    files = [f for p in args.predict[1:]           # cmd and PowerShell leave *.jpg to us
             for f in ([p] if os.path.exists(p) else sorted(glob.glob(p)) or [p])]
    images = torch.stack([read_image(p, mode, cfg.image_size) for p in files])
    data = Data(images.to(device), None, None, None, saved["classes"],
                *(torch.tensor(saved[k], device=device) for k in ("mean", "std")))
    x = data.normalize(data.train_x)                              # (B, C, H, W) float
    top_p, top_k = model(x).float().softmax(dim=-1).topk(min(3, len(data.classes)))  # (B, 3)
    names = [[data.classes[k] for k in row] for row in top_k.tolist()]
    for path, row, p in zip(files, names, top_p.tolist()):
        print(f"{path}: " + ", ".join(f"{c} {100 * q:.1f}%" for c, q in zip(row, p)))
    if args.out and rank() == 0:
        titles = [f"predicted: {row[0][:20]}\n{100 * p[0]:.1f}%" for row, p in
                  zip(names, top_p.tolist())]
        plot_attention(model, data.train_x, x, titles, os.path.join(args.out, "predicted.png"))
    return [row[0] for row in names]


# -----------------------------------------------------------------------------------------
# 15. Command line and main()
# The options are Config's fields (section 5), plus what to do. An option left out is None,
# so that a preset can fill it. A user error ends as one line on stderr.
# -----------------------------------------------------------------------------------------
CHOICES = {"pool": ("cls", "mean"), "precision": ("auto", "bf16", "fp16", "fp32"),
           "attn": ("auto", "fused", "manual"), "data": ("auto", "stream")}
HELP = {"dataset": "cifar10, fashionmnist, or a folder with train/ and test/ subfolders",
        "data_root": "where torchvision data sets are downloaded (default ./data)",
        "lr": "peak learning rate", "image_size": "resize images to this size (0: their own)",
        "warmup": "fraction of all steps spent warming up", "epochs": "passes over the data",
        "crop_pad": "random-crop padding in pixels (default: image side / 8; 0: no crop)",
        "clip_grad": "largest global gradient norm (0: no clipping)",
        "precision": "auto picks per device (section 6)", "attn": "auto: fused on GPUs",
        "data": "stream: read an image folder from disk (default: only if too big)",
        "val_split": "a seeded fraction of each class of train/, measured each epoch; test/ last",
        "init": f"start from {', '.join(TORCHVISION_VITS)} (torchvision's ImageNet weights), "
                "or a model.pth: its shape and weights, a new head for new classes"}
# finetune: ViT-B/16's ImageNet weights, CIFAR-10 at 224 px; batch 64 meant to fit a T4's 15 GB
PRESETS["finetune"] = dict(init="vit_b_16", epochs=3, batch_size=64, lr=1e-4, warmup=0.1)


def build_parser():
    # prog is fixed: in a notebook it would be named after the kernel's launcher
    p = argparse.ArgumentParser(prog="vit.py", description="Train a Vision Transformer from "
                                "scratch on CIFAR-10, FashionMNIST or an image folder.")
    p.add_argument("--preset", choices=PRESETS, default="default", help="bundle of defaults; "
                   "finetune aims at the published 98-99%% on CIFAR-10 (not measured here)")
    for f in fields(Config):
        flag, text = "--" + f.name.replace("_", "-"), HELP.get(f.name)
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            p.add_argument(flag, type=type(f.default) if f.default is not None else int,
                           choices=CHOICES.get(f.name), help=text)
    a = p.add_argument
    a("--device", help="cuda, mps or cpu (default: the best available)")
    a("--out", help="run folder, which must not hold a run yet (default: a new folder under "
      "runs/); with --resume, the run continues there and its own folder stays as it was")
    a("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint.pth "
      "(--epochs may change; --dataset/--data-root say where its data is now)")
    a("--eval", metavar="MODEL", help="evaluate a saved model.pth on its test split")
    a("--predict", nargs="+", metavar="FILE", help="a model.pth, then images to classify")
    return p


def command_line(argv):
    # A Jupyter kernel runs as `python -m ipykernel_launcher -f kernel-1234.json` (VS Code:
    # --f=...json): those arguments are the kernel's; `%run vit.py --epochs 5` gives ours.
    args = sys.argv[1:] if argv is None else list(argv)
    if argv is None and in_notebook() and args and (args[0] == "-f" or args[0].startswith("--f=")):
        return []
    return args


def resolved_paths(cfg):
    # saved resolved, so that the run can be resumed from another working folder
    folder = cfg.dataset.lower() not in KNOWN_SIZES and os.path.isdir(cfg.dataset)
    return replace(cfg, dataset=os.path.abspath(cfg.dataset) if folder else cfg.dataset,
                   data_root=os.path.abspath(cfg.data_root), init=os.path.abspath(cfg.init)
                   if cfg.init.endswith(".pth") else cfg.init)


def resolve_config(args):
    # Config's defaults, the preset's, every option given; the rest of the shape --init's
    given = {f.name: getattr(args, f.name) for f in fields(Config)
             if getattr(args, f.name) is not None}
    cfg = Config(**{**PRESETS[args.preset], **given})
    shape = TORCHVISION_VITS.get(cfg.init) or cfg.init and load_file(cfg.init, "model file")[
        "config"] or {}
    return resolved_paths(replace(cfg, **{k: shape[k] for k in MODEL_KEYS if k in shape and
                                          k not in given}))


def resume_run(args, device):
    # The checkpoint's run, same model and recipe; --epochs may change (the schedule is then
    # the new length's), --dataset / --data-root say where its data is now, --out branches.
    ckpt = load_file(args.resume, "checkpoint")
    try:
        cfg = Config(**ckpt["config"])
        validate(cfg)
    except (TypeError, UserError):
        raise UserError(f"{args.resume!r} holds a configuration this vit.py does not "
                        f"know.") from None
    allowed = ("epochs", "dataset", "data_root", "data")
    ignored = [f.name for f in fields(Config) if getattr(args, f.name) not in (None, getattr(
        cfg, f.name)) and f.name not in allowed]
    if ignored:
        print(f"note: resuming with the checkpoint's own configuration; ignoring "
              f"{', '.join('--' + k.replace('_', '-') for k in ignored)}")
    cfg = resolved_paths(replace(cfg, **{k: getattr(args, k) for k in allowed
                                         if getattr(args, k) is not None}))
    if ckpt["epoch"] >= cfg.epochs:
        raise UserError(f"the checkpoint has already finished {ckpt['epoch']} epochs; pass an "
                        f"--epochs above {ckpt['epoch']} to train further.")
    here = os.path.dirname(os.path.abspath(args.resume))
    out = os.path.abspath(args.out) if args.out else here
    same = os.path.isdir(out) and os.path.samefile(out, here)   # case-blind file systems too
    return run_in_folder(cfg, device, out, not same, ckpt, args.resume)


def main(argv=None):
    """Runs vit.py with a list of command-line options, e.g. main(["--epochs", "5"]).
    Returns the final test accuracy (training, --resume, --eval) or the predicted labels
    (--predict); None after a user error in a notebook."""
    try:
        args = build_parser().parse_args(command_line(argv))
    except SystemExit:
        if in_notebook():          # argparse printed the help, or its usage and error
            return None
        raise
    for stream in (sys.stdout, sys.stderr):      # a Windows log in cp1252 prints Hangul escaped
        getattr(stream, "reconfigure", lambda **k: None)(errors="backslashreplace")
    error = None
    try:
        device = start_processes(args.device)
        if args.eval:
            return eval_run(args, device)
        if args.predict:
            return predict_run(args, device)
        if args.resume:
            return resume_run(args, device)[-1]["test_acc"]
        cfg = resolve_config(args)
        validate(cfg)                             # before a run folder is made for it
        box = [args.out or (new_run_folder(cfg) if rank() == 0 else None)]
        if world_size() > 1:                      # rank 0's run folder, on every process
            dist.broadcast_object_list(box, src=0)
        return run_in_folder(cfg, device, box[0])[-1]["test_acc"]
    except KeyboardInterrupt:                     # outside training: nothing to save
        error = Interrupted("interrupted")
    except UserError as e:
        error = type(e)(str(e))                   # without its traceback
    finally:
        if dist.is_available() and dist.is_initialized():
            gc.collect()                          # DDP's objects sit in reference cycles
            if error is None and sys.exc_info()[0] is None:
                dist.barrier()                    # after a failure another may be gone
            dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":        # one copy of the sentence: rank 0's
        print(error if isinstance(error, Interrupted) else f"error: {error}", file=sys.stderr)
    if not in_notebook():
        sys.exit(error.status)


if __name__ == "__main__":
    main()
