"""
transformer.py: the encoder-decoder Transformer of "Attention Is All You Need", from scratch.

What this file teaches, in reading order:
  the sinusoidal positional encoding, padding and causal masks, scaled dot-product attention
  and multi-head attention written by hand, the position-wise feed-forward network, encoder
  and decoder layers (post-norm, as in the paper), the full model, greedy decoding, and a toy
  task (reversing digit strings of different lengths) trained end to end in about a minute
  on a laptop CPU.

Run it:
  python transformer.py                 # trains, prints shapes and results, saves figures
  python transformer.py --out figs      # choose where the PNG figures go
  In Colab or Jupyter: paste the whole file into one cell and run it, then call main([...])
  with options; or `%run transformer.py --steps 2000`, or `!python transformer.py`.

Papers:
  Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762

Sections (each a banner "# N. Title" below):
  1. Positional encoding                   8. Greedy decoding
  2. Masks                                 9. The toy task
  3. Scaled dot-product attention         10. Training and evaluation
  4. Multi-head attention                 11. Shape walk-through
  5. Position-wise feed-forward network   12. Figures
  6. Encoder and decoder layers           13. main()
  7. The full Transformer

Shape legend:
  B batch, S source length, T target length, D = d_model (model width),
  h = n_heads, d_h = D / h (width of one head), V vocabulary size.
"""
import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A problem the user can fix (a device this machine lacks, a folder it cannot write, a
    run that diverged): main() prints its one-sentence message instead of a traceback."""


# -----------------------------------------------------------------------------------------
# 1. Positional encoding
# Attention treats its input as a set: shuffle the tokens and every output is shuffled the
# same way. To give the model word order, the paper adds a fixed pattern to each embedding:
#   PE(pos, 2i)   = sin(pos / 10000^(2i / d_model))
#   PE(pos, 2i+1) = cos(pos / 10000^(2i / d_model))
# Each pair of dimensions is a sinusoid of a different wavelength (2*pi ... 10000*2*pi), so
# every position gets a unique code and PE(pos + k) is a linear function of PE(pos).
# -----------------------------------------------------------------------------------------
class PositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len=5000, dropout=0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len).unsqueeze(1)                    # (max_len, 1)
        # 1 / 10000^(2i / d_model), computed in log space for accuracy
        inv_freq = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        angles = position * inv_freq                                     # (max_len, ceil(D/2))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(angles)
        pe[:, 1::2] = torch.cos(angles[:, : d_model // 2])
        # A buffer moves with .to(device) but is not trained: the encoding is fixed.
        self.register_buffer("pe", pe, persistent=False)                 # (max_len, D)

    def forward(self, x):
        # x: (B, T, D) token embeddings
        T = x.size(1)
        return self.dropout(x + self.pe[:T])                             # (B, T, D)


# -----------------------------------------------------------------------------------------
# 2. Masks
# All masks here are boolean and True means "this query may attend to this key", and they
# broadcast against the attention scores of shape (B, h, T_q, T_k).
#   padding mask: sequences in a batch have different lengths, so short ones are filled with
#                 a PAD token. No query may attend to a PAD key: (B, 1, 1, T_k).
#   causal mask:  in the decoder, position i may only look at positions j <= i, so that the
#                 model cannot peek at the word it is asked to predict: (T, T), lower
#                 triangular.
# The decoder's self-attention uses both: padding & causal -> (B, 1, T, T).
# Note: PyTorch's own nn.MultiheadAttention uses the opposite convention (True = blocked).
# -----------------------------------------------------------------------------------------
def causal_mask(T, device=None):
    return torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))   # (T, T)


def padding_mask(tokens, pad_idx):
    # tokens: (B, T) integer ids
    return (tokens != pad_idx)[:, None, None, :]                         # (B, 1, 1, T)


# -----------------------------------------------------------------------------------------
# 3. Scaled dot-product attention
#   Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
# Each query is compared to every key by a dot product; softmax turns the scores of one query
# into weights that sum to 1, and the output is the weighted average of the values.
# Why divide by sqrt(d_k): if q and k have d_k independent entries of variance 1, q.k has
# variance d_k. Large scores push softmax into a near one-hot region where its gradient
# vanishes; dividing by sqrt(d_k) brings the variance back to 1.
# Why a large negative fill and not -inf: a row whose keys are all masked (a sequence made
# only of padding) would be softmax(-inf, ..., -inf) = 0/0 = NaN, which then spreads through
# the whole batch. With the most negative finite number the softmax stays finite; we then set
# the masked weights to exactly 0. Our chosen behaviour: a fully masked query row gets all-zero
# weights, so it attends to nothing and its output is 0 (before W_o and its bias).
# -----------------------------------------------------------------------------------------
def scaled_dot_product_attention(q, k, v, mask=None, dropout=None):
    # q: (B, h, T_q, d_h), k and v: (B, h, T_k, d_h), mask: broadcastable to (B, h, T_q, T_k)
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)                    # (B, h, T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)                                     # (B, h, T_q, T_k)
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)
    if dropout is not None:
        weights = dropout(weights)
    return weights @ v, weights                                          # (B, h, T_q, d_h)


# -----------------------------------------------------------------------------------------
# 4. Multi-head attention
#   MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W_o,  head_i = Attention(Q W_q^i, ...)
# One head can only form one weighted average per query: one "kind" of relation. h heads of
# width d_h = D / h each look for something different (the previous token, the matching word,
# ...) at the same total cost as one head of width D. In code, W_q holds the h per-head
# projections side by side as one (D, D) matrix; we split its output into h heads with a
# reshape, attend in every head at once, then concatenate the heads back and mix them with W_o.
# -----------------------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.W_q = nn.Linear(d_model, d_model)
        self.W_k = nn.Linear(d_model, d_model)
        self.W_v = nn.Linear(d_model, d_model)
        self.W_o = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.attn_weights = None      # the last attention weights, kept for plotting

    def split_heads(self, x):
        B, T, D = x.shape
        x = x.view(B, T, self.n_heads, self.d_head)                      # (B, T, h, d_h)
        return x.transpose(1, 2)                                         # (B, h, T, d_h)

    def forward(self, query, key, value, mask=None):
        # query: (B, T_q, D); key, value: (B, T_k, D). Self-attention passes x three times.
        B, T_q, D = query.shape
        q = self.split_heads(self.W_q(query))                            # (B, h, T_q, d_h)
        k = self.split_heads(self.W_k(key))                              # (B, h, T_k, d_h)
        v = self.split_heads(self.W_v(value))                            # (B, h, T_k, d_h)
        out, weights = scaled_dot_product_attention(q, k, v, mask, self.dropout)
        self.attn_weights = weights.detach()                             # (B, h, T_q, T_k)
        out = out.transpose(1, 2)                                        # (B, T_q, h, d_h)
        out = out.reshape(B, T_q, D)                                     # (B, T_q, D) concat
        return self.W_o(out)                                             # (B, T_q, D)


# -----------------------------------------------------------------------------------------
# 5. Position-wise feed-forward network
#   FFN(x) = max(0, x W1 + b1) W2 + b2
# The same two-layer MLP is applied to every position on its own (attention mixes positions,
# the FFN transforms each one). d_ff is usually 4 * d_model (2048 for d_model = 512).
# -----------------------------------------------------------------------------------------
class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff, dropout=0.0):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # x: (B, T, D)
        h = F.relu(self.linear1(x))                                      # (B, T, d_ff)
        return self.linear2(self.dropout(h))                             # (B, T, D)


# -----------------------------------------------------------------------------------------
# 6. Encoder and decoder layers
# Every sub-layer is wrapped as LayerNorm(x + Dropout(Sublayer(x))): the paper's "post-norm".
#   skip connection (x + ...): the layer learns a correction to its input, and gradients flow
#                              straight through the sum, so deep stacks still train.
#   layer normalisation:       rescales each token vector to mean 0, variance 1 (then a
#                              learned scale and shift), keeping activations in a stable range
#                              from layer to layer.
# Encoder layer: self-attention, then FFN.
# Decoder layer: masked (causal) self-attention, then cross-attention whose queries come from
# the decoder and whose keys and values come from the encoder output ("memory"), then FFN.
# (The ViT in vit.py uses pre-norm, x + Sublayer(LayerNorm(x)), which trains more easily
# without warmup; here we follow the paper.)
# -----------------------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        # x: (B, S, D), mask: (B, 1, 1, S)
        x = self.norm1(x + self.dropout(self.self_attn(x, x, x, mask)))  # (B, S, D)
        x = self.norm2(x + self.dropout(self.ffn(x)))                    # (B, S, D)
        return x


class DecoderLayer(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        # x: (B, T, D), memory: (B, S, D), tgt_mask: (B, 1, T, T), memory_mask: (B, 1, 1, S)
        x = self.norm1(x + self.dropout(self.self_attn(x, x, x, tgt_mask)))
        x = self.norm2(x + self.dropout(self.cross_attn(x, memory, memory, memory_mask)))
        x = self.norm3(x + self.dropout(self.ffn(x)))                    # (B, T, D)
        return x


# -----------------------------------------------------------------------------------------
# 7. The full Transformer
# source tokens -> embedding * sqrt(D) + PE -> N encoder layers -> memory
# target tokens -> embedding * sqrt(D) + PE -> N decoder layers (with memory) -> linear -> logits
# Why scale the embeddings by sqrt(D): the Xavier initialisation below gives embedding entries
# a variance of 2 / (V + D), about 0.03 here; times sqrt(D) they are of order 1, as large as
# the PE's entries (in [-1, 1]), so token identity is not drowned by position. Deviation
# from the paper: we do not tie the embedding and output weights (the toy task has separate
# small vocabularies; tying is a one-line change).
# The model builds its own masks from pad_idx, so callers pass token ids only.
# -----------------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, src_vocab_size, tgt_vocab_size, d_model=512, n_heads=8, n_layers=6,
                 d_ff=2048, dropout=0.1, pad_idx=0, max_len=512):
        super().__init__()
        self.d_model = d_model
        self.pad_idx = pad_idx
        self.src_embed = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model)
        self.pos_enc = PositionalEncoding(d_model, max_len, dropout)
        self.encoder = nn.ModuleList(
            [EncoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)])
        self.decoder = nn.ModuleList(
            [DecoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)])
        self.generator = nn.Linear(d_model, tgt_vocab_size)
        # Xavier initialisation for the weight matrices, as in the reference implementations.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src):
        # src: (B, S) token ids
        src_mask = padding_mask(src, self.pad_idx)                       # (B, 1, 1, S)
        x = self.pos_enc(self.src_embed(src) * math.sqrt(self.d_model))  # (B, S, D)
        for layer in self.encoder:
            x = layer(x, src_mask)                                       # (B, S, D)
        return x, src_mask

    def decode(self, tgt, memory, src_mask):
        # tgt: (B, T) token ids, memory: (B, S, D)
        T = tgt.size(1)
        tgt_mask = padding_mask(tgt, self.pad_idx) & causal_mask(T, tgt.device)  # (B, 1, T, T)
        x = self.pos_enc(self.tgt_embed(tgt) * math.sqrt(self.d_model))  # (B, T, D)
        for layer in self.decoder:
            x = layer(x, memory, tgt_mask, src_mask)                     # (B, T, D)
        return self.generator(x)                                         # (B, T, V)

    def forward(self, src, tgt):
        memory, src_mask = self.encode(src)                              # (B, S, D)
        return self.decode(tgt, memory, src_mask)                        # (B, T, V)


# -----------------------------------------------------------------------------------------
# 8. Greedy decoding
# Training uses teacher forcing: the decoder sees the true previous tokens and predicts all
# positions in one pass (the causal mask keeps it honest). At test time there are no true
# tokens: we start from BOS, predict the most likely next token, append it, and repeat, so
# the model consumes its own predictions (and its own mistakes). The encoder runs once.
# -----------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_decode(model, src, bos_idx, eos_idx, max_len):
    # src: (B, S). Returns (B, max_len) predicted tokens (without the leading BOS);
    # after a sequence emits EOS the rest of its row is PAD.
    memory, src_mask = model.encode(src)                                 # (B, S, D)
    B = src.size(0)
    ys = torch.full((B, 1), bos_idx, dtype=torch.long, device=src.device)  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits = model.decode(ys, memory, src_mask)                      # (B, t, V)
        next_token = logits[:, -1].argmax(dim=-1)                        # (B,)
        next_token = next_token.masked_fill(done, model.pad_idx)
        ys = torch.cat([ys, next_token[:, None]], dim=1)                 # (B, t + 1)
        done |= next_token == eos_idx
        if done.all():
            break
    out = torch.full((B, max_len), model.pad_idx, dtype=torch.long, device=src.device)
    out[:, : ys.size(1) - 1] = ys[:, 1:]
    return out                                                           # (B, max_len)


# -----------------------------------------------------------------------------------------
# 9. The toy task: reverse a string of digits
#   source 3 1 4 1 5          -> target 5 1 4 1 3 <eos>
# Lengths vary, so every batch is padded and the padding masks matter. Reversal cannot be
# solved by looking at token identities alone: output position t must find source position
# n - 1 - t, so the model has to use the positional encoding and the source length.
# Vocabulary (shared by source and target): 0 PAD, 1 BOS, 2 EOS, 3..12 the digits 0..9.
# The test strings are drawn first and removed from the training pool, so every test
# sequence is unseen. A second test set has lengths longer than any seen in training.
# -----------------------------------------------------------------------------------------
PAD, BOS, EOS, N_SPECIAL = 0, 1, 2, 3
VOCAB_SIZE = N_SPECIAL + 10


def random_digit_strings(n, min_len, max_len, generator):
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    digits = torch.randint(0, 10, (n, max_len), generator=generator) + N_SPECIAL
    keep = torch.arange(max_len)[None, :] < lengths[:, None]             # (n, max_len)
    return [row[k].tolist() for row, k in zip(digits, keep)]


def make_batch(strings):
    B, L = len(strings), max(len(s) for s in strings)
    src = torch.full((B, L), PAD)                                        # (B, S)
    tgt_in = torch.full((B, L + 1), PAD)                                 # (B, T): BOS y1 .. yn
    tgt_out = torch.full((B, L + 1), PAD)                                # (B, T): y1 .. yn EOS
    for i, s in enumerate(strings):
        n, rev = len(s), s[::-1]
        src[i, :n] = torch.tensor(s)
        tgt_in[i, : n + 1] = torch.tensor([BOS] + rev)
        tgt_out[i, : n + 1] = torch.tensor(rev + [EOS])
    return src, tgt_in, tgt_out


def make_datasets(cfg):
    g = torch.Generator().manual_seed(cfg.seed)
    test = random_digit_strings(cfg.n_test, cfg.min_len, cfg.max_len, g)
    longer = random_digit_strings(cfg.n_test, cfg.max_len + 1, cfg.max_len + 4, g)
    seen = set(map(tuple, test))
    train = [s for s in random_digit_strings(cfg.n_train, cfg.min_len, cfg.max_len, g)
             if tuple(s) not in seen]
    return train, test, longer


# -----------------------------------------------------------------------------------------
# 10. Training and evaluation
# Adam with the paper's betas, warmup then half a cosine to zero (lr_factor, via LambdaLR),
# label smoothing 0.1 as in the paper, PAD positions ignored by the loss, gradient clipping.
# -----------------------------------------------------------------------------------------
@dataclass
class Config:
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    dropout: float = 0.0            # the paper uses 0.1; this toy task does not overfit
    min_len: int = 4
    max_len: int = 12
    n_train: int = 100_000
    n_test: int = 1000
    batch_size: int = 128
    steps: int = 1000
    lr: float = 2e-3
    seed: int = 0


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


def loss_fn(logits, tgt_out, label_smoothing=0.1):
    # logits: (B, T, V), tgt_out: (B, T)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1),
                           ignore_index=PAD, label_smoothing=label_smoothing)


def lr_factor(step, warmup, total):
    # The rate after `step` updates, as a fraction of the peak; update k runs at lr_factor(k-1):
    # 0.04 at the first, rising linearly to 1 at update warmup + 1 (warmup: 10% of the steps),
    # then half a cosine that is 0 after the last update (the last runs at 3e-6 in 1000 steps).
    # Why warmup: Adam's moment estimates rest on a few batches at first (after one, its step is
    # lr * sign(gradient): every weight moves by the full rate), and large early steps can wreck
    # attention, post-norm (section 6) most of all. Starting at 1/25 of the peak, not 0, wastes
    # no update. Why a cosine, not the paper's d_model^-0.5 * min(step^-0.5, step * 4000^-1.5):
    # that decays as 1/sqrt(step), never reaches 0, and ties the peak to d_model and a warmup
    # sized for 100k-step runs. A run of a fixed, short budget usually ends best with the rate
    # annealed to 0 at its last step, and the cosine, a pure function of the step, fits any --steps.
    if step < warmup:
        return 0.04 + 0.96 * step / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train(model, train_strings, cfg, device, log_every=250):
    # beta2 is the decay of Adam's running mean of squared gradients, which sets each weight's
    # step size: the paper's 0.98 averages over ~50 steps (torch's 0.999: ~1000), so the step
    # size keeps up when the gradient scale changes fast, as early in training. eps: the paper's.
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    warmup = max(1, round(0.1 * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, cfg.steps))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    losses, t0 = [], time.time()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(train_strings), (cfg.batch_size,), generator=g).tolist()
        batch = make_batch([train_strings[i] for i in idx])
        src, tgt_in, tgt_out = (t.to(device) for t in batch)            # (B, S), (B, T), (B, T)
        loss = loss_fn(model(src, tgt_in), tgt_out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):           # the weights are lost: stop, and say so
            raise UserError(f"training diverged at step {step} (the loss became "
                            f"{losses[-1]}); try a lower --lr than {cfg.lr}.")
        if step % log_every == 0 or step == cfg.steps:
            recent = losses[-log_every:]
            print(f"step {step:5d}/{cfg.steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.1f}s")
    return losses


@torch.no_grad()
def exact_match(model, strings, device, batch_size=500):
    # Fraction of strings whose free-running greedy output is the target exactly, EOS included.
    model.eval()
    correct = 0
    for i in range(0, len(strings), batch_size):
        src, _, tgt_out = (t.to(device) for t in make_batch(strings[i:i + batch_size]))
        pred = greedy_decode(model, src, BOS, EOS, max_len=tgt_out.size(1))  # (B, T)
        ok = (pred == tgt_out) | (tgt_out == PAD)                        # (B, T)
        correct += ok.all(dim=1).sum().item()
    return correct / len(strings)


# -----------------------------------------------------------------------------------------
# 11. Shape walk-through
# The shapes courses ask about, for d_model = 768, 12 heads and 5 tokens: we replay the steps
# of MultiHeadAttention.forward one by one, print each shape, and check the module agrees.
# -----------------------------------------------------------------------------------------
def walk_through_shapes(d_model=768, n_tokens=5):
    torch.manual_seed(0)
    x = torch.randn(1, n_tokens, d_model)                                # (B, T, D)
    for n_heads in (1, 12):
        mha = MultiHeadAttention(d_model, n_heads).eval()
        title = "single-head" if n_heads == 1 else f"multi-head ({n_heads} heads)"
        print(f"\n--- {title} self-attention, d_model = {d_model}, {n_tokens} tokens ---")
        print(f"tokens x                      {tuple(x.shape)}")
        for name in ("W_q", "W_k", "W_v", "W_o"):
            layer = getattr(mha, name)
            print(f"{name}.weight                  {tuple(layer.weight.shape)}  "
                  f"(bias {tuple(layer.bias.shape)})")
        Q, K, V = mha.W_q(x), mha.W_k(x), mha.W_v(x)                     # (B, T, D) each
        print(f"Q = x W_q^T + b, K, V         {tuple(Q.shape)} each")
        q = Q.view(1, n_tokens, n_heads, d_model // n_heads)             # (B, T, h, d_h)
        print(f"per-head q (B, T, h, d_h)     {tuple(q.shape)}")
        q = q.transpose(1, 2)                                            # (B, h, T, d_h)
        k = mha.split_heads(K)                                           # (B, h, T, d_h)
        v = mha.split_heads(V)                                           # (B, h, T, d_h)
        print(f"heads first (B, h, T, d_h)    {tuple(q.shape)}")
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))         # (B, h, T, T)
        print(f"scores q k^T / sqrt(d_h)      {tuple(scores.shape)}")
        weights = scores.softmax(dim=-1)                                 # (B, h, T, T)
        print(f"attention weights (softmax)   {tuple(weights.shape)}")
        heads = weights @ v                                              # (B, h, T, d_h)
        print(f"per-head outputs              {tuple(heads.shape)}")
        merged = heads.transpose(1, 2).reshape(1, n_tokens, d_model)     # (B, T, D)
        print(f"merged (concat heads)         {tuple(merged.shape)}")
        out = mha.W_o(merged)                                            # (B, T, D)
        print(f"output = merged W_o^T + b     {tuple(out.shape)}")
        same = torch.allclose(out, mha(x, x, x), atol=1e-5)
        print(f"equals MultiHeadAttention.forward: {same}")


def show_pytorch_weight_layout(d_model=4, n_heads=2):
    # nn.MultiheadAttention stacks W_q, W_k, W_v in one (3D, D) in_proj_weight (rows 0..D-1
    # are W_q) and keeps W_o in out_proj; copied into our three, they give the same output.
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
    ours = MultiHeadAttention(d_model, n_heads)
    print(f"\n--- where W_q, W_k, W_v live in nn.MultiheadAttention(d_model={d_model}, "
          f"n_heads={n_heads}) ---")
    print(f"in_proj_weight {tuple(theirs.in_proj_weight.shape)} = [W_q; W_k; W_v], "
          f"in_proj_bias {tuple(theirs.in_proj_bias.shape)}, out_proj = W_o")
    weights = theirs.in_proj_weight.detach().chunk(3)            # 3 x (D, D)
    biases = theirs.in_proj_bias.detach().chunk(3)               # 3 x (D,)
    with torch.no_grad():
        for i, name in enumerate(("W_q", "W_k", "W_v")):
            print(f"{name} = in_proj_weight[{i * d_model}:{(i + 1) * d_model}]:")
            print(weights[i].numpy().round(3))
            getattr(ours, name).weight.copy_(weights[i])
            getattr(ours, name).bias.copy_(biases[i])
        ours.W_o.load_state_dict(theirs.out_proj.state_dict())
        x = torch.randn(1, 3, d_model)
        same = torch.allclose(ours(x, x, x), theirs(x, x, x)[0], atol=1e-6)
    print(f"our MultiHeadAttention with these slices gives the same output: {same}")


def show_masked_attention(T=5):
    print(f"\n--- causal mask for {T} tokens (True = may attend) ---")
    mask = causal_mask(T)
    print(mask.int())
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 1).eval()
    x = torch.randn(1, T, 8)
    mha(x, x, x, mask)
    print("masked attention weights (row i = query i; zeros above the diagonal, rows sum to 1):")
    print(mha.attn_weights[0, 0].numpy().round(3))


# -----------------------------------------------------------------------------------------
# 12. Figures: PNG files, also shown inline in a notebook
# -----------------------------------------------------------------------------------------
def in_notebook():
    return "ipykernel" in sys.modules


def save_figure(fig, path):
    # Written under a temporary name, then renamed: a full disk, or a PNG that Windows' Photos
    # holds open, is one sentence, and the previous figure stays as it was.
    import matplotlib.pyplot as plt
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
        if in_notebook():
            plt.show()
    except OSError as e:
        raise UserError(f"could not write {path!r} ({e.strerror or e}).") from None
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):       # gone already: renamed
            os.remove(tmp)
    print(f"saved {path}")


def plot_positional_encoding(path, d_model=128, max_len=100):
    import matplotlib.pyplot as plt
    pe = PositionalEncoding(d_model, max_len).pe                         # (max_len, D)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    im = ax1.imshow(pe.T.numpy(), aspect="auto", cmap="RdBu", origin="lower")
    ax1.set(title=f"Sinusoidal positional encoding (d_model = {d_model})",
            xlabel="position", ylabel="dimension")
    fig.colorbar(im, ax=ax1, label="PE value")
    for dim in (4, 5, 20, 60):
        ax2.plot(pe[:, dim].numpy(), label=f"dim {dim}")
    ax2.set(title="A few of its sinusoids", xlabel="position", ylabel="PE value")
    ax2.legend()
    save_figure(fig, path)


def plot_causal_mask(path, T=8):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(causal_mask(T).numpy(), cmap="Greens", vmin=0, vmax=1)
    ax.set(title="Causal mask (green = may attend)", xlabel="key position j",
           ylabel="query position i")
    save_figure(fig, path)


def plot_masks_for_batch(path, strings):
    # The three masks of the decoder's self-attention for one real padded batch.
    import matplotlib.pyplot as plt
    _, tgt_in, _ = make_batch(strings)                                   # (B, T)
    T = tgt_in.size(1)
    pad = padding_mask(tgt_in, PAD)                                      # (B, 1, 1, T)
    both = pad & causal_mask(T)                                          # (B, 1, T, T)
    fig, axes = plt.subplots(1, 3, figsize=(14, 5))
    panels = [(pad[:, 0, 0].int(), f"Padding mask of the batch (B = {len(strings)})",
               "key position", "sequence in batch"),
              (causal_mask(T).int(), "Causal mask", "key position", "query position"),
              (both[-1, 0].int(), "Padding & causal, last sequence",
               "key position", "query position")]
    for ax, (m, title, xl, yl) in zip(axes, panels):
        ax.imshow(m.numpy(), cmap="Greens", vmin=0, vmax=1)
        ax.set(title=title, xlabel=xl, ylabel=yl)
    save_figure(fig, path)


def token_names(tokens):
    names = {PAD: "pad", BOS: "bos", EOS: "eos"}
    return [names.get(t, str(t - N_SPECIAL)) for t in tokens]


@torch.no_grad()
def plot_attention(path, model, string, device):
    # Run one example through the trained model (teacher-forced) and draw the last layer's
    # attention averaged over heads: encoder self-, decoder self- and cross-attention.
    import matplotlib.pyplot as plt
    model.eval()
    src, tgt_in, _ = (t.to(device) for t in make_batch([string]))
    model(src, tgt_in)
    src_names, tgt_names = token_names(src[0].tolist()), token_names(tgt_in[0].tolist())
    panels = [(model.encoder[-1].self_attn, "Encoder self-attention", src_names, src_names),
              (model.decoder[-1].self_attn, "Decoder self-attention (causal)",
               tgt_names, tgt_names),
              (model.decoder[-1].cross_attn, "Cross-attention (decoder -> source)",
               tgt_names, src_names)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, (attn, title, rows, cols) in zip(axes, panels):
        im = ax.imshow(attn.attn_weights[0].mean(0).cpu().numpy(), cmap="viridis", vmin=0,
                       vmax=1)
        ax.set(title=f"{title}\nlast layer, mean over heads",
               xlabel="key token", ylabel="query token",
               xticks=range(len(cols)), yticks=range(len(rows)))
        ax.set_xticklabels(cols)
        ax.set_yticklabels(rows)
        fig.colorbar(im, ax=ax, fraction=0.046, label="attention weight")
    save_figure(fig, path)


# -----------------------------------------------------------------------------------------
# 13. main()
# The command line is short: the model and the task are fixed by Config, and only the budget
# (steps, batch size, learning rate), the seed and where the figures go can be changed.
# -----------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(prog="transformer.py", description="Train a from-scratch "
                                "Transformer to reverse digit strings.")
    p.add_argument("--steps", type=int, default=Config.steps, help="training steps")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--out", default="runs/transformer", help="folder for the PNG figures")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    return p


def command_line(argv):
    # A Jupyter kernel runs as `python -m ipykernel_launcher -f kernel-1234.json` (VS Code:
    # --f=...json); those arguments are the kernel's, not ours. IPython's
    # `%run transformer.py --steps 2000` puts the user's options there instead: they count.
    if argv is not None:
        return list(argv)
    args = sys.argv[1:]
    first = args[0] if args else ""
    if in_notebook() and (first == "-f" or first.startswith("--f=")):
        return []
    return args


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(command_line(argv))
    for name in ("steps", "batch_size", "lr"):
        if not getattr(args, name) > 0:                                 # nan fails this too
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if not args.lr <= 1:                                                # inf fails this too
        p.error(f"--lr must be at most 1 (Adam moves every weight by about lr at each step), "
                f"got {args.lr}.")
    return args


def writable_folder(path):
    # Made and tried before training: a typo in --out costs a second, not a minute of training.
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"cannot write in the folder {path!r} ({e.strerror or e}).") from None


def main(argv=None):
    """Runs the lesson with a list of command-line options, e.g. main(["--steps", "2000"]).
    Returns the exact-match accuracy on held-out strings."""
    try:
        args = parse_args(argv)
    except SystemExit:
        # argparse has printed the help, or its usage line and the error. From a shell that
        # ends the program; in a notebook the cell returns and the notebook goes on.
        if in_notebook():
            return None
        raise
    try:
        return run(args)
    except KeyboardInterrupt:                   # Ctrl-C, or a notebook's stop button
        error, status = "interrupted; nothing is saved but the figures already written", 130
    except UserError as e:
        error, status = f"error: {e}", 1
    print(error, file=sys.stderr)
    if not in_notebook():
        sys.exit(status)


def run(args):
    cfg = Config(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    device = pick_device(args.device)
    if not args.no_figures:
        writable_folder(args.out)
    t_start = time.time()

    walk_through_shapes()                       # these seed themselves: the same every run
    show_pytorch_weight_layout()
    show_masked_attention()

    train_strings, test_strings, longer_strings = make_datasets(cfg)
    torch.manual_seed(cfg.seed)                 # --seed decides the initial weights
    model = Transformer(VOCAB_SIZE, VOCAB_SIZE, cfg.d_model, cfg.n_heads, cfg.n_layers,
                        cfg.d_ff, cfg.dropout, pad_idx=PAD).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n--- training: reverse digit strings of length {cfg.min_len}-{cfg.max_len} ---")
    print(f"config: {cfg}")
    print(f"device: {device}, parameters: {n_params:,} ({n_params * 4 / 1e6:.2f} MB in float32)"
          f", {len(train_strings):,} training strings, {len(test_strings)} unseen test strings")
    train(model, train_strings, cfg, device)

    if not args.no_figures:
        plot_positional_encoding(os.path.join(args.out, "positional_encoding.png"))
        plot_causal_mask(os.path.join(args.out, "causal_mask.png"))
        plot_masks_for_batch(os.path.join(args.out, "masks.png"), test_strings[:6])
        plot_attention(os.path.join(args.out, "attention.png"), model, test_strings[0], device)

    acc_long = exact_match(model, longer_strings, device)
    acc = exact_match(model, test_strings, device)
    print(f"time: {time.time() - t_start:.1f}s on {device}")
    print(f"longer than training (length {cfg.max_len + 1}-{cfg.max_len + 4}), greedy decoding: "
          f"exact match {100 * acc_long:.2f}%")
    print(f"held-out strings of length {cfg.min_len}-{cfg.max_len}, greedy decoding: "
          f"exact match {100 * acc:.2f}%")
    return acc


if __name__ == "__main__":
    main()
