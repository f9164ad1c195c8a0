"""Tests for transformer.py and vit.py: CPU only, offline, seeded, about a minute on two cores.

Each test compares against an independent reference where one exists: PyTorch's own modules
with copied weights, the paper's formulas, or a second code path in the same file.
"""
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import transformer as tf
import vit

torch.set_num_threads(2)
# matplotlib 3.8 (the floor) calls pyparsing names that pyparsing 3.3 deprecates: not ours
pytestmark = pytest.mark.filterwarnings("ignore:'\\w+' deprecated - use:DeprecationWarning")
# Windows lacks what these use: SIGINT sent to a child, process groups (os.killpg), a pty
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals and process "
                           "groups (SIGINT to a child, os.killpg, a pty)")


# ------------------------------------------------------------------------------------------
# transformer.py: attention against nn.MultiheadAttention
# ------------------------------------------------------------------------------------------
def copy_mha_into_torch(ours, theirs):
    """Copy our W_q, W_k, W_v, W_o into nn.MultiheadAttention's packed in_proj and out_proj."""
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.W_q.weight, ours.W_k.weight, ours.W_v.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.W_q.bias, ours.W_k.bias, ours.W_v.bias]))
        theirs.out_proj.weight.copy_(ours.W_o.weight)
        theirs.out_proj.bias.copy_(ours.W_o.bias)


def seeded(f, seed=1):
    # f() with the random numbers drawn from `seed`: two code paths that draw in the same
    # order (dropout's masks) then compute the same numbers
    torch.manual_seed(seed)
    return f()


def drop(t, p=0.3):
    return nn.functional.dropout(t, p)                            # training: drops


def lengths_to_tokens(lengths, T):
    # (B, T) token ids with 5 for real tokens and PAD (0) after each length
    return torch.stack([torch.tensor([5] * n + [tf.PAD] * (T - n)) for n in lengths])


def test_ex04_multi_head_attention_matches_pytorch():
    for n_heads in (1, 4):
        for case in ("none", "causal", "padding", "causal+padding", "cross"):
            multi_head_attention_matches_pytorch(n_heads, case)


def multi_head_attention_matches_pytorch(n_heads, case):
    torch.manual_seed(0)
    D, B, T = 32, 3, 6
    S = 9 if case == "cross" else T
    ours = tf.MultiHeadAttention(D, n_heads).double()
    theirs = nn.MultiheadAttention(D, n_heads, batch_first=True).double()
    copy_mha_into_torch(ours, theirs)
    query = torch.randn(B, T, D, dtype=torch.float64)
    key = torch.randn(B, S, D, dtype=torch.float64) if case == "cross" else query
    keys = lengths_to_tokens([S, S - 2, 3], S)                 # every row keeps a real key
    our_mask, attn_mask, key_padding_mask = None, None, None
    if "causal" in case:
        our_mask = tf.causal_mask(T)
        attn_mask = ~our_mask                                   # PyTorch: True = blocked
    if "padding" in case or case == "cross":
        pad = tf.padding_mask(keys, tf.PAD)                     # (B, 1, 1, S)
        our_mask = pad if our_mask is None else pad & our_mask
        key_padding_mask = keys == tf.PAD                       # (B, S), True = blocked
    got = ours(query, key, key, our_mask)
    want, want_w = theirs(query, key, key, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                          average_attn_weights=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.attn_weights, want_w, rtol=0, atol=1e-10)


def test_ex03_attention_scale_is_one_over_sqrt_dk():
    # softmax(q k^T / sqrt(d_k)) v computed by hand for one query and two keys
    q = torch.tensor([[[[1.0, 2.0, 0.0, 1.0]]]])                # (1, 1, 1, 4)
    k = torch.tensor([[[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]]])
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out, w = tf.scaled_dot_product_attention(q, k, v)
    s1, s2 = 1.0 / 2.0, 3.0 / 2.0                               # dot products / sqrt(4)
    p1 = math.exp(s1) / (math.exp(s1) + math.exp(s2))
    torch.testing.assert_close(w[0, 0, 0], torch.tensor([p1, 1 - p1]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([p1, 1 - p1]))


def test_ex04_multi_head_attention_drops_attention_weights_while_training():
    torch.manual_seed(0)
    mha = tf.MultiHeadAttention(16, 2, dropout=0.3)
    x = torch.randn(2, 5, 16)
    mask = tf.padding_mask(lengths_to_tokens([5, 3], 5), tf.PAD)

    def by_hand():
        q, k, v = (mha.split_heads(W(x)) for W in (mha.W_q, mha.W_k, mha.W_v))
        out, _ = tf.scaled_dot_product_attention(q, k, v, mask, nn.Dropout(0.3))
        return mha.W_o(out.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(seeded(lambda: mha(x, x, x, mask)), seeded(by_hand))


def test_ex04_attention_rows_sum_to_one_and_masked_weights_are_exactly_zero():
    torch.manual_seed(0)
    mha = tf.MultiHeadAttention(16, 2)
    x = torch.randn(2, 5, 16) * 10                              # large scores stress softmax
    mask = tf.causal_mask(5) & tf.padding_mask(lengths_to_tokens([5, 3], 5), tf.PAD)
    mha(x, x, x, mask)
    w = mha.attn_weights                                        # (B, H, T, T)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 5))
    assert torch.all(w.masked_select(~mask.expand_as(w)) == 0)


def test_ex04_a_fully_masked_query_row_gives_zero_weights_not_nan():
    # Documented choice: a query whose keys are all padding attends to nothing (weights 0),
    # so its output is just W_o's bias, and nothing is NaN.
    torch.manual_seed(0)
    mha = tf.MultiHeadAttention(16, 4)
    x = torch.randn(2, 4, 16)
    tokens = torch.stack([torch.tensor([5, 5, 0, 0]), torch.zeros(4, dtype=torch.long)])
    out = mha(x, x, x, tf.padding_mask(tokens, tf.PAD))
    assert not torch.isnan(out).any()
    assert torch.all(mha.attn_weights[1] == 0)
    torch.testing.assert_close(out[1], mha.W_o.bias.expand(4, 16))


def test_ex03_attention_equals_pytorchs_and_masked_weights_are_exactly_zero():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    mask = tf.causal_mask(5) & tf.padding_mask(lengths_to_tokens([5, 3], 5), tf.PAD)
    out, w = tf.scaled_dot_product_attention(q, k, v, mask)       # (B, h, T, d_h), (B, h, T, T)
    want = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    assert torch.all(w.masked_select(~mask.expand_as(w)) == 0)
    none = torch.zeros(1, 1, 5, 5, dtype=torch.bool)              # every key masked: no NaN
    out, w = tf.scaled_dot_product_attention(q, k, v, none)
    assert torch.all(w == 0) and torch.all(out == 0)


def test_ex05_the_feed_forward_network_is_relu_between_two_linears():
    torch.manual_seed(0)
    ffn = tf.FeedForward(8, 32, dropout=0.5).eval()
    x = torch.randn(2, 3, 8)
    lin1, lin2 = ffn.linear1, ffn.linear2
    want = nn.functional.linear(nn.functional.relu(nn.functional.linear(
        x, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)      # the paper's formula
    torch.testing.assert_close(ffn(x), want)
    ffn.train()                                                   # dropout between the two
    torch.testing.assert_close(seeded(lambda: ffn(x)), seeded(lambda: lin2(drop(
        nn.functional.relu(lin1(x)), 0.5))))


# ------------------------------------------------------------------------------------------
# transformer.py: layers against nn.TransformerEncoderLayer / nn.TransformerDecoderLayer
# ------------------------------------------------------------------------------------------
def copy_ffn_and_norms(ours, theirs, n_norms):
    with torch.no_grad():
        theirs.linear1.load_state_dict(ours.ffn.linear1.state_dict())
        theirs.linear2.load_state_dict(ours.ffn.linear2.state_dict())
        for i in range(1, n_norms + 1):
            norm = getattr(ours, f"norm{i}")
            norm.weight.normal_()                               # non-trivial affine
            norm.bias.normal_()
            getattr(theirs, f"norm{i}").load_state_dict(norm.state_dict())


def test_ex06_encoder_layer_matches_pytorch():
    torch.manual_seed(0)
    D, H, F, B, S = 32, 4, 64, 3, 7
    ours = tf.EncoderLayer(D, H, F, dropout=0.0).double()
    theirs = nn.TransformerEncoderLayer(D, H, F, dropout=0.0, activation="relu",
                                        batch_first=True, norm_first=False).double()
    copy_mha_into_torch(ours.self_attn, theirs.self_attn)
    copy_ffn_and_norms(ours, theirs, 2)
    x = torch.randn(B, S, D, dtype=torch.float64)
    src = lengths_to_tokens([7, 4, 2], S)
    got = ours(x, tf.padding_mask(src, tf.PAD))
    want = theirs(x, src_key_padding_mask=src == tf.PAD)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_ex06_encoder_layer_with_dropout_is_its_sublayers_in_order():
    torch.manual_seed(0)
    layer = tf.EncoderLayer(16, 2, 32, dropout=0.3)               # training
    x, mask = torch.randn(2, 5, 16), tf.padding_mask(lengths_to_tokens([5, 3], 5), tf.PAD)

    def by_hand():
        h = layer.norm1(x + drop(layer.self_attn(x, x, x, mask)))
        return layer.norm2(h + drop(layer.ffn(h)))
    torch.testing.assert_close(seeded(lambda: layer(x, mask)), seeded(by_hand))


def test_ex07_decoder_layer_with_dropout_is_its_sublayers_in_order():
    torch.manual_seed(0)
    layer = tf.DecoderLayer(16, 2, 32, dropout=0.3)               # training
    x, memory = torch.randn(2, 4, 16), torch.randn(2, 5, 16)
    tgt_mask = tf.padding_mask(lengths_to_tokens([4, 2], 4), tf.PAD) & tf.causal_mask(4)
    src_mask = tf.padding_mask(lengths_to_tokens([5, 3], 5), tf.PAD)

    def by_hand():
        h = layer.norm1(x + drop(layer.self_attn(x, x, x, tgt_mask)))
        h = layer.norm2(h + drop(layer.cross_attn(h, memory, memory, src_mask)))
        return layer.norm3(h + drop(layer.ffn(h)))
    torch.testing.assert_close(seeded(lambda: layer(x, memory, tgt_mask, src_mask)),
                               seeded(by_hand))


def test_ex07_decoder_layer_matches_pytorch():
    torch.manual_seed(0)
    D, H, F, B, T, S = 32, 4, 64, 3, 6, 8
    ours = tf.DecoderLayer(D, H, F, dropout=0.0).double()
    theirs = nn.TransformerDecoderLayer(D, H, F, dropout=0.0, activation="relu",
                                        batch_first=True, norm_first=False).double()
    copy_mha_into_torch(ours.self_attn, theirs.self_attn)
    copy_mha_into_torch(ours.cross_attn, theirs.multihead_attn)
    copy_ffn_and_norms(ours, theirs, 3)
    x = torch.randn(B, T, D, dtype=torch.float64)
    memory = torch.randn(B, S, D, dtype=torch.float64)
    tgt, src = lengths_to_tokens([6, 3, 1], T), lengths_to_tokens([8, 5, 2], S)
    tgt_mask = tf.padding_mask(tgt, tf.PAD) & tf.causal_mask(T)
    got = ours(x, memory, tgt_mask, tf.padding_mask(src, tf.PAD))
    want = theirs(x, memory, tgt_mask=~tf.causal_mask(T), tgt_key_padding_mask=tgt == tf.PAD,
                  memory_key_padding_mask=src == tf.PAD)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------
# transformer.py: positional encoding, masks, the full model
# ------------------------------------------------------------------------------------------
def test_ex01_positional_encoding_matches_the_formula_and_is_a_buffer():
    d_model, max_len = 10, 50
    pe = tf.PositionalEncoding(d_model, max_len)
    assert "pe" in dict(pe.named_buffers()) and len(list(pe.parameters())) == 0
    for pos in (0, 1, 7, 49):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert pe.pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe.pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    x = torch.randn(2, 7, d_model)
    torch.testing.assert_close(pe(x), x + pe.pe[:7])
    pe = tf.PositionalEncoding(d_model, max_len, dropout=0.3)     # training: dropout after
    torch.testing.assert_close(seeded(lambda: pe(x)), seeded(lambda: drop(x + pe.pe[:7])))


def test_ex02_causal_and_padding_masks():
    m = tf.causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert m.tolist() == [[j <= i for j in range(4)] for i in range(4)]
    p = tf.padding_mask(torch.tensor([[5, 6, tf.PAD], [7, tf.PAD, tf.PAD]]), tf.PAD)
    assert p.dtype == torch.bool and p.shape == (2, 1, 1, 3)
    assert p[:, 0, 0].tolist() == [[True, True, False], [True, False, False]]


def small_model(seed=0):
    torch.manual_seed(seed)
    return tf.Transformer(tf.VOCAB_SIZE, tf.VOCAB_SIZE, d_model=32, n_heads=4, n_layers=2,
                          d_ff=64, dropout=0.0, pad_idx=tf.PAD).eval()


def test_future_target_tokens_do_not_change_earlier_logits():
    model = small_model()
    src, tgt_in, _ = tf.make_batch([[3, 4, 5, 6, 7], [8, 9, 10]])
    before = model(src, tgt_in)
    changed = tgt_in.clone()
    changed[:, 3:] = torch.randint(3, tf.VOCAB_SIZE, changed[:, 3:].shape)
    after = model(src, changed)
    torch.testing.assert_close(after[:, :3], before[:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 3:], before[:, 3:])     # the change was visible later


def test_source_padding_changes_nothing():
    model = small_model()
    src, tgt_in, _ = tf.make_batch([[3, 4, 5, 6]])
    padded = torch.cat([src, torch.full((1, 5), tf.PAD)], dim=1)
    torch.testing.assert_close(model(padded, tgt_in), model(src, tgt_in), rtol=0, atol=1e-6)


def test_a_few_training_steps_lower_the_loss():
    model = small_model().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    src, tgt_in, tgt_out = tf.make_batch([[3, 4, 5, 6, 7], [8, 9, 10], [12, 11, 5, 5]])
    losses = []
    for _ in range(20):
        loss = tf.loss_fn(model(src, tgt_in), tgt_out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_reduced_toy_run_learns_to_reverse():
    torch.manual_seed(0)
    cfg = tf.Config(d_model=32, n_heads=4, n_layers=2, d_ff=64, min_len=2, max_len=5,
                    n_train=20_000, n_test=200, batch_size=64, steps=400, lr=3e-3)
    train, test, _ = tf.make_datasets(cfg)
    model = tf.Transformer(tf.VOCAB_SIZE, tf.VOCAB_SIZE, cfg.d_model, cfg.n_heads, cfg.n_layers,
                           cfg.d_ff, cfg.dropout, pad_idx=tf.PAD)
    assert tf.exact_match(model, test, "cpu") < 0.05
    tf.train(model, train, cfg, "cpu", log_every=10_000)
    assert tf.exact_match(model, test, "cpu") > 0.9


def test_greedy_decode_pads_after_eos():
    model = small_model()
    src, _, _ = tf.make_batch([[3, 4, 5], [6, 7]])
    out = tf.greedy_decode(model, src, tf.BOS, tf.EOS, max_len=8)
    assert out.shape == (2, 8)
    for row in out.tolist():
        if tf.EOS in row:
            assert all(t == tf.PAD for t in row[row.index(tf.EOS) + 1:])


def test_transformer_figures_are_written(tmp_path):
    model = small_model()
    strings = [[3, 4, 5, 6], [7, 8]]
    tf.plot_positional_encoding(str(tmp_path / "pe.png"))
    tf.plot_causal_mask(str(tmp_path / "causal.png"))
    tf.plot_masks_for_batch(str(tmp_path / "masks.png"), strings)
    tf.plot_attention(str(tmp_path / "attention.png"), model, strings[0], "cpu")
    for name in ("pe.png", "causal.png", "masks.png", "attention.png"):
        assert os.path.getsize(tmp_path / name) > 0, name


def test_transformer_script_options_are_validated():
    with pytest.raises(SystemExit) as e:
        tf.parse_args(["--steps", "0"])
    assert e.value.code != 0


# ==========================================================================================
# vit.py
# ==========================================================================================


def tiny_vit(in_channels=3, image_size=16, fused=True, pool="cls", seed=0):
    torch.manual_seed(seed)
    model = vit.ViT(image_size=image_size, patch_size=4, in_channels=in_channels, num_classes=5,
                    dim=32, depth=2, heads=4, mlp_dim=64, fused_attn=fused, pool=pool)
    # The head starts at zero (as in the ViT paper), which makes every output equal; give it
    # random weights so that outputs depend on the input.
    nn.init.normal_(model.head.weight, std=0.5)
    return model


def torchvision_state_dict(ours):
    """Our parameters under torchvision.models.VisionTransformer's names."""
    sd = {"class_token": ours.cls_token, "conv_proj.weight": ours.patch_embed.proj.weight,
          "conv_proj.bias": ours.patch_embed.proj.bias,
          "encoder.pos_embedding": ours.pos_embed, "encoder.ln.weight": ours.norm.weight,
          "encoder.ln.bias": ours.norm.bias, "heads.head.weight": ours.head.weight,
          "heads.head.bias": ours.head.bias}
    for i, b in enumerate(ours.blocks):
        p = f"encoder.layers.encoder_layer_{i}."
        sd |= {p + "ln_1.weight": b.norm1.weight, p + "ln_1.bias": b.norm1.bias,
               p + "self_attention.in_proj_weight": b.attn.qkv.weight,
               p + "self_attention.in_proj_bias": b.attn.qkv.bias,
               p + "self_attention.out_proj.weight": b.attn.proj.weight,
               p + "self_attention.out_proj.bias": b.attn.proj.bias,
               p + "ln_2.weight": b.norm2.weight, p + "ln_2.bias": b.norm2.bias,
               p + "mlp.0.weight": b.mlp.fc1.weight, p + "mlp.0.bias": b.mlp.fc1.bias,
               p + "mlp.3.weight": b.mlp.fc2.weight, p + "mlp.3.bias": b.mlp.fc2.bias}
    return sd


def test_ex11_the_vit_pools_as_told_and_drops_after_the_position_embedding():
    for pool in ("cls", "mean"):
        torch.manual_seed(0)
        model = vit.ViT(16, 4, 3, 5, dim=32, depth=2, heads=4, mlp_dim=64, dropout=0.2,
                        fused_attn=False, pool=pool)
        nn.init.normal_(model.head.weight)
        x = torch.randn(2, 3, 16, 16)

        def by_hand():
            t = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], dim=1)
            t = nn.functional.dropout(t + model.pos_embed, 0.2)   # (B, T, D)
            for block in model.blocks:
                t = block(t)
            t = model.norm(t)
            return model.head(t[:, 0] if pool == "cls" else t[:, 1:].mean(dim=1))
        torch.testing.assert_close(seeded(lambda: model(x)), seeded(by_hand))


def test_ex11_vit_equals_torchvision_vision_transformer():
    for fused in (True, False):
        vit_equals_torchvision_vision_transformer(fused)


def vit_equals_torchvision_vision_transformer(fused):
    ours = tiny_vit(fused=fused).eval()
    with torch.no_grad():                      # non-trivial LayerNorms and biases
        for n, p in ours.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(0, 0.5 if n.endswith("bias") else 1.0)
    theirs = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
        num_classes=5).eval()
    theirs.load_state_dict(torchvision_state_dict(ours))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_ex09_fused_and_hand_written_attention_agree():
    torch.manual_seed(0)
    manual = vit.Attention(32, 4, fused=False).eval()
    fused = vit.Attention(32, 4, fused=True).eval()
    fused.load_state_dict(manual.state_dict())
    x = torch.randn(3, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), manual(x), rtol=0, atol=1e-5)


def test_ex09_attention_drops_while_training_and_never_in_eval():
    torch.manual_seed(0)
    attn = vit.Attention(32, 4, dropout=0.3, fused=False)          # training
    x = torch.randn(2, 17, 32)

    def by_hand(dropout=drop):
        q, k, v = attn.qkv(x).view(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)   # each (B, h, T, d_h)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
        out = (dropout(weights) @ v).transpose(1, 2).reshape(2, 17, 32)
        return dropout(attn.proj(out))
    torch.testing.assert_close(seeded(lambda: attn(x)), seeded(by_hand))
    attn.fused = True
    attn.proj_drop.p = 0.0                                # what differs: the kernel's dropout
    with torch.no_grad():
        assert not torch.allclose(attn(x), by_hand(lambda t: t), atol=1e-4)
        for fused in (True, False):                                   # eval: no dropout
            attn.fused = fused
            torch.testing.assert_close(attn.eval()(x), by_hand(lambda t: t), rtol=0,
                                       atol=1e-5)
            attn.train()


def test_ex09_hand_written_attention_in_bf16_stays_close_to_float32():
    # Under bf16 autocast (the training default on this CPU) and in a model cast to bf16,
    # the softmax runs in float32 and its result returns to bf16 for the product with V.
    torch.manual_seed(0)
    attn = vit.Attention(32, 4, fused=False).eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        want = attn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attn(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0.05)
        got = attn.to(torch.bfloat16)(x.to(torch.bfloat16))
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0.05)


def test_ex09_attention_equals_nn_multihead_attention():
    torch.manual_seed(0)
    attn = vit.Attention(32, 4, fused=False).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)  # rows [Q; K; V] in both
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.load_state_dict(attn.proj.state_dict())
        x = torch.randn(2, 17, 32)
        want, want_w = mha(x, x, x, average_attn_weights=False)
        torch.testing.assert_close(attn(x), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(attn.attn_weights, want_w, rtol=0, atol=1e-6)


def test_ex08_patchify_by_reshape_equals_conv2d():
    torch.manual_seed(0)
    embed = vit.PatchEmbed(patch_size=4, in_channels=3, dim=24)
    x = torch.randn(2, 3, 16, 12)
    assert vit.patchify(x, 4).shape == (2, 12, 48)                # (B, N, C*P*P)
    conv = embed.proj(x)                                    # (B, D, H/P, W/P)
    conv = conv.flatten(2).transpose(1, 2)                  # (B, N, D)
    torch.testing.assert_close(embed(x), conv, rtol=0, atol=1e-5)
    # and patch n is the pixels of the n-th P x P square, in row-major order
    patches = vit.patchify(x, 4)
    torch.testing.assert_close(patches[1, 4], x[1, :, 4:8, 4:8].reshape(-1))


def test_ex10_block_equals_a_pre_norm_nn_transformer_encoder_layer():
    # nn.TransformerEncoderLayer with norm_first=True is the ViT's block: MLP with GELU
    torch.manual_seed(0)
    ours = vit.Block(32, 4, 64).eval()
    theirs = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu",
                                        layer_norm_eps=1e-6, batch_first=True,
                                        norm_first=True).eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():                      # non-trivial norms, biases
            if "norm" in n or n.endswith("bias"):
                p.normal_(0, 0.5)
        theirs.self_attn.in_proj_weight.copy_(ours.attn.qkv.weight)
        theirs.self_attn.in_proj_bias.copy_(ours.attn.qkv.bias)
        for a, b in (("self_attn.out_proj", "attn.proj"), ("linear1", "mlp.fc1"),
                     ("linear2", "mlp.fc2"), ("norm1", "norm1"), ("norm2", "norm2")):
            theirs.get_submodule(a).load_state_dict(ours.get_submodule(b).state_dict())
        x = torch.randn(2, 17, 32)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_ex10_block_drops_where_the_mlp_says_and_never_in_eval():
    torch.manual_seed(0)
    block = vit.Block(32, 4, 64, dropout=0.3, fused_attn=False)   # training
    x = torch.randn(2, 17, 32)

    def by_hand():
        h = x + block.attn(block.norm1(x))
        m = block.mlp
        return h + drop(m.fc2(drop(nn.functional.gelu(m.fc1(block.norm2(h))))))
    torch.testing.assert_close(seeded(lambda: block(x)), seeded(by_hand))
    plain = vit.Block(32, 4, 64, dropout=0.0, fused_attn=False)
    plain.load_state_dict(block.state_dict())
    torch.testing.assert_close(block.eval()(x), plain.eval()(x))


@pytest.mark.parametrize("channels", [1, 3])
def test_vit_output_shape(channels):
    model = tiny_vit(in_channels=channels)
    assert model(torch.randn(2, channels, 16, 16)).shape == (2, 5)
    assert model.pos_embed.shape == (1, 16 + 1, 32) and model.cls_token.shape == (1, 1, 32)


def test_each_sample_is_independent_of_its_batch():
    model = tiny_vit().eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        full = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(6)])
        x2 = x.clone()
        x2[1:] = torch.randn(5, 3, 16, 16)
        torch.testing.assert_close(full, alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x2)[0], full[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_swapping_two_patches_changes_the_output(pool):
    # Without the position embedding a ViT is blind to where a patch is; with it, moving
    # patches changes the prediction. (Checked against a model with pos_embed zeroed.)
    model = tiny_vit(pool=pool).eval()
    x = torch.randn(1, 3, 16, 16)
    swapped = x.clone()
    swapped[..., 0:4, 0:4], swapped[..., 8:12, 4:8] = x[..., 8:12, 4:8], x[..., 0:4, 0:4]
    with torch.no_grad():
        assert not torch.allclose(model(x), model(swapped), atol=1e-4)
        model.pos_embed.zero_()
        if pool == "mean":
            torch.testing.assert_close(model(x), model(swapped), rtol=0, atol=1e-5)


def test_every_parameter_gets_a_gradient():
    # As built (zero head), only the head learns on the first step; from the second step on,
    # every parameter must get a gradient.
    torch.manual_seed(0)
    model = vit.ViT(16, 4, 3, 5, dim=32, depth=2, heads=4, mlp_dim=64)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_tiny_batch_can_be_overfit():
    model = tiny_vit()
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model(x).argmax(1) == y).all() and loss.item() < 0.1


def test_ex12_augment_crops_and_flips_exactly_as_drawn():
    # Each image is the window at its drawn shift of the zero-padded image, mirrored where
    # its coin says so; and epoch_plan draws every shift and both sides of the coin.
    x = torch.arange(6 * 1 * 4 * 4, dtype=torch.uint8).view(6, 1, 4, 4)
    cfg = vit.Config(crop_pad=1)
    order, pad, shift, mirror = vit.epoch_plan(6, cfg, epoch=1, device=torch.device("cpu"))
    out = vit.augment(x, pad, shift, mirror)
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    for i, ((dy, dx), m) in enumerate(zip(shift.tolist(), mirror.tolist())):
        window = padded[i, :, dy:dy + 4, dx:dx + 4]
        assert torch.equal(out[i], window.flip(-1) if m else window)
    assert sorted(order.tolist()) == list(range(6))
    _, _, shift, mirror = vit.epoch_plan(500, cfg, epoch=1, device=torch.device("cpu"))
    assert {tuple(s) for s in shift.tolist()} == {(a, b) for a in range(3) for b in range(3)}
    assert 200 < mirror.sum() < 300
    assert not vit.epoch_plan(500, replace(cfg, flip=False), 1, torch.device("cpu"))[3].any()
    # the same (seed, epoch) draws the same plan; another epoch another
    again = vit.epoch_plan(500, cfg, epoch=1, device=torch.device("cpu"))
    other = vit.epoch_plan(500, cfg, epoch=2, device=torch.device("cpu"))
    assert torch.equal(again[2], shift) and not torch.equal(other[2], shift)


# ------------------------------------------------------------------------------------------
# vit.py: the command line, on a tiny image folder made here
# ------------------------------------------------------------------------------------------
def make_image_folder(root, classes=("red", "blue"), n_train=12, n_test=6):
    colors = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30)}
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                noise = torch.randint(0, 40, (16, 16, 3), generator=g)
                pixels = (torch.tensor(colors[c]) + noise).clamp(0, 255).to(torch.uint8)
                size = (20, 18) if i == 1 else (16, 16)       # sizes may differ: resized
                Image.fromarray(pixels.numpy()).resize(size).save(
                    os.path.join(root, split, c, f"{i}.png"))
    return str(root)


SMALL = ["--epochs", "2", "--batch-size", "8", "--dim", "16", "--depth", "1", "--heads", "2",
         "--mlp-dim", "32", "--patch-size", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    folder = make_image_folder(root / "colors")
    out = str(root / "run")
    acc = vit.main(["--dataset", folder, "--out", out] + SMALL)
    metrics = read_metrics(out)
    assert acc == metrics[-1]["test_acc"]             # main() returns the final accuracy
    return folder, out, metrics


def read_metrics(run):
    with open(os.path.join(run, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def test_cli_run_writes_all_outputs(trained_run, capsys):
    folder, out, metrics = trained_run
    for name in ("model.pth", "checkpoint.pth", "metrics.json", "curves.png", "attention.png",
                 "pos_embed.png", "confusion.png", "patches.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert os.path.exists(os.path.join(out, "mistakes.png")) == (metrics[-1]["test_acc"] < 1)
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s"):
        assert all(isinstance(r[key], float) for r in records), key
    assert vit.lr_at(6, 6, vit.Config()) == 0        # the cosine ends at zero on the budget
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    saved = torch.load(os.path.join(out, "model.pth"), weights_only=True)
    assert saved["classes"] == ["blue", "red"] and saved["config"]["image_size"] == 16
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["config"]["crop_pad"] == 2            # the default, image side / 8, resolved


def test_eval_reproduces_the_final_test_accuracy_and_draws_the_figures(trained_run, capsys,
                                                                       tmp_path):
    folder, out, metrics = trained_run
    acc = vit.main(["--eval", os.path.join(out, "model.pth"), "--device", "cpu",
                    "--out", str(tmp_path)])
    assert acc == pytest.approx(metrics[-1]["test_acc"])
    lines = capsys.readouterr().out.strip().splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith("test accuracy: "))
    assert all(line.startswith("saved ") for line in lines[said + 1:-1])   # then the figures
    assert lines[-1] == "no test image is misclassified: no mistakes.png"
    for name in ("attention.png", "pos_embed.png", "confusion.png"):
        assert os.path.getsize(tmp_path / name) > 0, name


def test_mistakes_png_shows_six_mistakes_and_what_each_was_seen_as(tmp_path, monkeypatch,
                                                                   capsys):
    drawn, real = {}, vit.plot_attention

    def record(model, images, x, titles, path, heading=""):
        drawn[os.path.basename(path)] = images, titles, heading
        if len(drawn) == 2:                                     # mistakes.png, really drawn
            real(model, images, x, titles, path, heading)
    monkeypatch.setattr(vit, "plot_attention", record)
    monkeypatch.setattr(vit, "plot_pos_embed", lambda *a: None)
    monkeypatch.setattr(vit, "plot_confusion", lambda *a: None)
    y = torch.arange(20) % 5
    x = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    data = vit.Data(x[:0], y[:0], x, y, [f"c{k}" for k in range(6)], torch.tensor([0.5] * 3),
                    torch.tensor([0.25] * 3))
    preds = y.clone()
    preds[[2, 7, 11, 12, 13, 15, 19]] += 1                       # 7 wrong (c4 as c5: 6 classes)
    vit.make_figures(tiny_vit().eval(), data, preds, str(tmp_path))
    images, titles, heading = drawn["mistakes.png"]            # 6 of 7, spread
    assert torch.equal(images, x[[2, 7, 11, 13, 15, 19]])
    assert titles == [f"c{y[k]}\nseen as c{y[k] + 1}" for k in (2, 7, 11, 13, 15, 19)]
    assert heading == "7 of 20 test images misclassified, 6 shown.\n"
    assert os.path.getsize(tmp_path / "mistakes.png") > 0
    images, titles, heading = drawn["attention.png"]           # 6 of 20, spread; as before
    assert torch.equal(images, x[[0, 4, 8, 11, 15, 19]]) and heading == ""
    assert titles == ["c0", "c4", "c3", "c1", "c0", "c4"]
    # a test split streamed from disk: the same images drawn
    files = [str(tmp_path / f"{k}.png") for k in range(20)]
    for f, image in zip(files, x):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(f)
    vit.make_figures(tiny_vit().eval(), replace(data, test_x=vit.ImageFiles(files, "RGB", 16)),
                     preds, str(tmp_path))
    assert torch.equal(drawn["mistakes.png"][0], x[[2, 7, 11, 13, 15, 19]])
    drawn.clear()                                 # none wrong: no figure, the old one removed
    vit.make_figures(tiny_vit().eval(), data, y, str(tmp_path))
    assert list(drawn) == ["attention.png"] and not (tmp_path / "mistakes.png").exists()
    assert "no test image is misclassified: no mistakes.png" in capsys.readouterr().out


def test_torchvision_data_comes_in_the_saved_models_channels(monkeypatch):
    # --eval or --init with a model.pth: a 1-channel model sees CIFAR-10 gray, as Pillow
    # converts a folder's images for it; a 3-channel one FashionMNIST as 3 equal channels
    rgb = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)

    class Fake:
        def __init__(self, root, train, download):
            self.data, self.targets, self.classes = rgb.numpy(), [0, 1, 0, 1], ["a", "b"]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Fake)
    cfg = vit.Config(dataset="cifar10")
    gray = torch.stack([torch.from_numpy(np.array(Image.fromarray(image.numpy()).convert("L")))
                        for image in rgb])                         # (4, 8, 8)
    (x,), _, _ = vit.load_torchvision(cfg, ["test"], channels=1)
    assert x.shape == (4, 1, 8, 8) and (x[:, 0].int() - gray.int()).abs().max() <= 1
    assert vit.load_torchvision(cfg, ["test"])[0][0].shape == (4, 3, 8, 8)
    fake_fashionmnist(monkeypatch)
    (x,), _, _ = vit.load_torchvision(vit.Config(dataset="fashionmnist"), ["test"], channels=3)
    assert x.shape == (12, 3, 28, 28) and torch.equal(x[:, 0], x[:, 2])


def test_eval_evaluates_in_the_precision_the_run_asked_for(colors, tmp_path, monkeypatch):
    # --precision fp32 on a CPU where auto would pick bf16: --eval, not told, uses fp32 too
    # (saved in model.pth), so it reproduces the run's final accuracy
    monkeypatch.setattr(vit, "cpu_has_bf16", lambda: True)
    out = tmp_path / "run"
    vit.main(["--dataset", colors, "--out", str(out), "--precision", "fp32"] + SMALL)
    seen, real = [], vit.autocast
    monkeypatch.setattr(vit, "autocast", lambda p, device: seen.append(p) or real(p, device))
    acc = vit.main(["--eval", str(out / "model.pth"), "--device", "cpu", "--out", str(out / "e")])
    assert set(seen) == {"fp32"} and acc == read_metrics(out)[-1]["test_acc"]
    vit.main(["--eval", str(out / "model.pth"), "--precision", "bf16", "--out", str(out / "e")])
    assert seen[-1] == "bf16"                                   # told: as told


def test_under_torchrun_eval_and_predict_draw_on_rank_0_alone(trained_run, tmp_path,
                                                              monkeypatch, capsys):
    # torchrun --eval or --predict: every process computes the same, rank 0 alone draws
    folder, out, metrics = trained_run
    monkeypatch.setattr(vit, "rank", lambda: 1)
    model = os.path.join(out, "model.pth")
    assert vit.main(["--eval", model, "--out", str(tmp_path / "e")]) == metrics[-1]["test_acc"]
    image = os.path.join(folder, "test", "red", "0.png")
    assert vit.main(["--predict", model, image, "--out", str(tmp_path / "p")]) == ["red"]
    assert os.listdir(tmp_path / "e") == [] and os.listdir(tmp_path / "p") == []


def test_gray_images_keep_their_brightness_in_the_attention_figure(tmp_path, monkeypatch):
    # a dark and a light class must look dark and light, not each stretched to its own range
    import matplotlib.axes
    seen, real = [], matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, X, **k: seen.append((X, k)) or real(self, X, **k))
    images = torch.full((2, 1, 16, 16), 40, dtype=torch.uint8)
    images[1] = 200
    vit.plot_attention(tiny_vit(in_channels=1).eval(), images, images.float(), ["a", "b"],
                       str(tmp_path / "attention.png"), "2 of 2 wrong\n")
    drawn = [k for X, k in seen if X.dtype == np.uint8]           # the images, not the maps
    assert len(drawn) == 2 * 6 and all((k["vmin"], k["vmax"]) == (0, 255) for k in drawn)


def test_attention_rollout_is_a_distribution_over_patches():
    model = tiny_vit().eval()
    rollout, last = vit.attention_maps(model, torch.randn(3, 3, 16, 16))
    assert rollout.shape == (3, 16) and last.shape == (3, 4, 16)
    # the CLS row of a product of row-stochastic matrices: patch shares sum to at most 1
    assert torch.all(rollout >= 0) and torch.all(rollout.sum(-1) <= 1 + 1e-6)
    assert model.blocks[0].attn.fused                       # the fused path is restored


def copy_of_run(out, copy):
    copy.mkdir()
    for name in ("checkpoint.pth", "model.pth", "metrics.json"):
        (copy / name).write_bytes(open(os.path.join(out, name), "rb").read())
    return copy


def test_resume_extends_a_run_in_its_folder(trained_run, tmp_path):
    folder, out, metrics = trained_run
    copy = copy_of_run(out, tmp_path / "copy")
    vit.main(["--resume", str(copy / "checkpoint.pth"), "--epochs", "3"])
    more = read_metrics(copy)
    assert [m["epoch"] for m in more] == [1, 2, 3]
    assert more[:2] == metrics                       # history kept, not retrained


def interrupt_in_epoch(epoch, monkeypatch):
    """Ctrl-C, as it would arrive during that epoch's evaluation."""
    real, calls = vit.evaluate, []

    def evaluate(*a, **k):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(vit, "evaluate", evaluate)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_crash_keeps_the_last_checkpoint_and_resume_continues_exactly(precision, tmp_path,
                                                                        monkeypatch):
    # fp16 (the T4 path) runs on the CPU too, with its GradScaler: the scaler's state must
    # survive the crash like everything else.
    folder = make_image_folder(tmp_path / "colors")
    args = ["--dataset", folder, "--epochs", "4", "--precision", precision] + SMALL[2:]
    vit.main(args + ["--out", str(tmp_path / "full")])
    full = read_metrics(tmp_path / "full")
    # The same run, killed during epoch 3's evaluation: epoch 2's checkpoint must survive.
    interrupt_in_epoch(3, monkeypatch)
    with pytest.raises(SystemExit) as e:
        vit.main(args + ["--out", str(tmp_path / "crashed")])
    assert e.value.code == 130
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "crashed" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2
    assert (precision == "fp16") == ("scale" in ckpt["scaler"])
    vit.main(["--resume", str(tmp_path / "crashed" / "checkpoint.pth")])
    resumed = read_metrics(tmp_path / "crashed")
    assert len(resumed) == 4 and full[-1]["test_acc"] == 1.0       # it trained
    # Same data order, same augmentation, same schedule: the same numbers as without a crash.
    for a, b in zip(resumed, full):
        assert {k: v for k, v in a.items() if k != "images_per_s"} == pytest.approx(
            {k: v for k, v in b.items() if k != "images_per_s"})


# ------------------------------------------------------------------------------------------
# vit.py: misuse ends with one clear sentence and a non-zero exit, never a traceback
# ------------------------------------------------------------------------------------------
def fails_with(argv, capsys, *words):
    with pytest.raises(SystemExit) as e:
        vit.main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(("error:", "vit.py: error:", "usage:")) or "error:" in last, err
    for w in words:
        assert w in err, (w, err)
    return err


class Evil:
    """Unpickling this runs a shell command: a booby-trapped checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("misuse") / "colors")


@pytest.mark.parametrize("flags, words", [
    (["--patch-size", "5"], ["not divisible by patch size"]),
    (["--dim", "30", "--heads", "4"], ["--dim must be divisible by --heads 4", "got 30"]),
    (["--epochs", "0"], ["--epochs must be positive"]),
    (["--epochs", "-3"], ["--epochs must be positive"]),
    (["--batch-size", "0"], ["--batch-size must be positive"]),
    (["--lr", "0"], ["--lr must be positive"]),
    (["--lr", "-0.1"], ["--lr must be positive"]),
    (["--crop-pad", "-1"], ["--crop-pad must not be negative"]),
    (["--preset", "huge"], ["invalid choice", "huge"]),
    (["--precision", "fp8"], ["invalid choice", "fp8"]),
    (["--lr", "nan"], ["--lr must be a finite number"]),
    (["--lr", "inf"], ["--lr must be a finite number"]),
    (["--clip-grad", "nan"], ["--clip-grad must be a finite number"]),
    (["--weight-decay", "nan"], ["--weight-decay must be a finite number"]),
    (["--warmup", "nan"], ["--warmup must be a finite number"]),
    (["--lr", "3000"], ["--lr must be at most 1"]),
    (["--lr", "0.5", "--weight-decay", "2"], ["times --weight-decay", "below 1"]),
    (["--data", "disk"], ["invalid choice", "disk"]),
    (["--dataset", "cifar10", "--data", "stream"], ["--data stream reads an image folder"]),
])
def test_bad_options_exit_with_a_message(flags, words, colors, capsys, tmp_path):
    fails_with(["--dataset", colors, "--out", str(tmp_path / "run")] + SMALL + flags, capsys,
               *words)
    assert not (tmp_path / "run").exists()                   # no run folder is left behind


def test_unknown_dataset_name(capsys):
    fails_with(["--dataset", "imagenet-21k"], capsys, "unknown dataset", "cifar10")


def test_folder_without_train_and_test(tmp_path, capsys):
    (tmp_path / "cats").mkdir()
    fails_with(["--dataset", str(tmp_path)], capsys, "train/", "test/")


def test_missing_data_offline_says_how_to_point_at_a_local_copy(tmp_path, capsys, monkeypatch):
    # The real torchvision class runs its check for local files, then its download, which
    # fails as it does with no network.
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    fails_with(["--dataset", "fashionmnist", "--data-root", str(tmp_path)], capsys,
               "--data-root", "--dataset")


def test_checkpoint_missing_corrupt_or_booby_trapped(trained_run, tmp_path, capsys):
    _, out, _ = trained_run
    fails_with(["--eval", str(tmp_path / "nope.pth")], capsys, "does not exist")
    fails_with(["--resume", str(tmp_path / "nope.pth")], capsys, "does not exist")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(open(os.path.join(out, "model.pth"), "rb").read()[:2000])
    fails_with(["--eval", str(corrupt)], capsys, "corrupt")
    marker = tmp_path / "pwned"
    trapped = tmp_path / "trapped.pth"
    torch.save({"config": {}, "classes": [], "payload": Evil(marker)}, trapped)
    fails_with(["--eval", str(trapped)], capsys, "refused")
    fails_with(["--resume", str(trapped)], capsys, "refused")
    assert not marker.exists()
    fails_with(["--resume", os.path.join(out, "model.pth")], capsys, "checkpoint.pth")
    fails_with(["--eval", os.path.join(out, "checkpoint.pth")], capsys, "model.pth")


def test_checkpoint_that_does_not_fit_the_data_or_the_model(trained_run, tmp_path, capsys):
    _, out, _ = trained_run
    three = make_image_folder(tmp_path / "three", classes=("red", "green", "blue"), n_train=2,
                              n_test=2)
    model_pth = os.path.join(out, "model.pth")
    fails_with(["--eval", model_pth, "--dataset", three], capsys, "does not fit")
    saved = torch.load(model_pth, weights_only=True)
    saved["config"]["dim"] = 24                       # the weights are for dim 16
    saved["config"]["heads"] = 2
    torch.save(saved, tmp_path / "wrong.pth")
    fails_with(["--eval", str(tmp_path / "wrong.pth")], capsys, "do not fit")


def test_misuse_from_the_shell_has_no_traceback():
    r = subprocess.run([sys.executable, "vit.py", "--epochs", "0"], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: --epochs must be positive, got 0."


# ------------------------------------------------------------------------------------------
# Both scripts in notebooks: importing runs nothing, the kernel's argv does not crash
# ------------------------------------------------------------------------------------------
def test_import_prints_and_writes_nothing(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", "import vit, transformer"], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": here})
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script", [vit, tf])
def test_notebook_kernel_arguments_are_ignored_but_run_options_count(script, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", sys)           # as inside a Jupyter kernel
    for kernel_argv in (["ipykernel_launcher.py", "-f", "/root/.local/kernel-1.json"],
                        ["colab_kernel_launcher.py", "-f", "/root/kernel-2.json"],
                        ["ipykernel_launcher.py", "--f=/home/u/kernel-v3.json"]):
        monkeypatch.setattr(sys, "argv", kernel_argv)
        assert script.command_line(None) == []
    # IPython's `%run vit.py --epochs 5` sets sys.argv to the script and the user's options
    monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", "--seed", "7"])
    assert script.command_line(None) == ["--seed", "7"]
    assert script.build_parser().parse_args(script.command_line(None)).seed == 7


@pytest.mark.parametrize("script, bad", [(vit, ["--epochs", "0", "--dataset", "nowhere"]),
                                         (vit, ["--epochs", "zero"]),
                                         (tf, ["--steps", "0"]), (tf, ["--steps", "zero"])])
def test_a_user_error_in_a_notebook_returns_instead_of_exiting(script, bad, monkeypatch,
                                                               capsys):
    monkeypatch.setitem(sys.modules, "ipykernel", sys)
    assert script.main(bad) is None                              # no SystemExit
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err.splitlines()[-1]
    assert script.__name__ + ".py" in err or err.startswith("error:")   # named by the script
    assert script.main(["--help"]) is None
    assert "usage: " + script.__name__ + ".py" in capsys.readouterr().out


def test_in_a_shell_a_user_error_still_exits_non_zero(capsys):
    for script, bad in ((vit, ["--epochs", "0"]), (tf, ["--steps", "0"])):
        with pytest.raises(SystemExit) as e:
            script.main(bad)
        assert e.value.code not in (0, None)


def test_presets_are_overridden_by_explicit_flags():
    cfg = vit.resolve_config(vit.build_parser().parse_args(["--preset", "cpu", "--dim", "48"]))
    assert cfg.dim == 48 and cfg.depth == vit.PRESETS["cpu"]["depth"]


# ------------------------------------------------------------------------------------------
# vit.py: the precision each device trains in, faked where this CPU cannot be that device
# ------------------------------------------------------------------------------------------
def fake_gpu(monkeypatch, name, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("name, capability, expected", [
    ("Tesla P100", (6, 0), "fp16"), ("Tesla V100", (7, 0), "fp16"), ("Tesla T4", (7, 5), "fp16"),
    ("NVIDIA A100", (8, 0), "bf16"), ("NVIDIA L4", (8, 9), "bf16"), ("NVIDIA H100", (9, 0), "bf16"),
])
def test_precision_policy_on_gpus(name, capability, expected, monkeypatch, capsys):
    fake_gpu(monkeypatch, name, capability)
    # torch.cuda.is_bf16_supported() says True on a T4 (it counts emulation): never read
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    precision, why = vit.precision_policy("auto", torch.device("cuda"))
    assert precision == expected and name in why
    assert vit.precision_policy("fp32", torch.device("cuda"))[0] == "fp32"
    assert vit.precision_policy("bf16", torch.device("cuda"))[0] == "bf16"     # as asked...
    note = capsys.readouterr().out
    assert ("emulated" in note) == (expected == "fp16")        # ...with a note where emulated


@pytest.mark.parametrize("native", [True, False])
def test_precision_policy_on_cpus_and_macs(native, monkeypatch, capsys):
    monkeypatch.setattr(vit, "cpu_has_bf16", lambda: native)
    assert vit.precision_policy("auto", torch.device("cpu"))[0] == ("bf16" if native else "fp32")
    assert vit.precision_policy("auto", torch.device("mps"))[0] == "fp32"
    vit.precision_policy("bf16", torch.device("cpu"))
    assert ("emulated" in capsys.readouterr().out) == (not native)


@pytest.mark.parametrize("name, capability, tf32", [("Tesla T4", (7, 5), False),
                                                     ("NVIDIA A100", (8, 0), True)])
def test_cuda_uses_tf32_where_it_pays_and_never_cudnn_attention(name, capability, tf32,
                                                                monkeypatch):
    # TF32 only from compute capability 8.0, with no warning, set so that torch's old and new
    # readers agree (torch >= 2.9 raises when the new API was set and the old one is read,
    # as Inductor does under --compile); cuDNN's attention kernel off on every GPU.
    fake_gpu(monkeypatch, name, capability)
    cudnn_sdp = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", cudnn_sdp.append)
    before = torch.get_float32_matmul_precision()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vit.fast_cuda(torch.device("cpu"))
            assert torch.get_float32_matmul_precision() == before and cudnn_sdp == []
            vit.fast_cuda(torch.device("cuda"))
            assert torch.get_float32_matmul_precision() == ("high" if tf32 else before)
            assert torch.backends.cuda.matmul.allow_tf32 == (tf32 or before != "highest")
        assert cudnn_sdp == [False]
    finally:
        torch.set_float32_matmul_precision(before)


def test_fp32_builds_no_autocast_context(colors, tmp_path, monkeypatch):
    # A disabled torch.autocast(...) raised on torch 2.1's CPU and on MPS before torch 2.5.
    def refuse(*a, **k):
        raise AssertionError("torch.autocast was built in an fp32 run")
    monkeypatch.setattr(torch, "autocast", refuse)
    out = str(tmp_path / "run")
    vit.main(["--dataset", colors, "--out", out, "--precision", "fp32"] + SMALL[2:])
    vit.main(["--eval", os.path.join(out, "model.pth"), "--precision", "fp32"])


def test_an_unsupported_autocast_is_one_sentence(colors, tmp_path, monkeypatch, capsys):
    def old_torch(*a, **k):               # what torch <= 2.4 raises for any MPS autocast
        raise RuntimeError("User specified an unsupported autocast device_type 'mps'")
    monkeypatch.setattr(torch, "autocast", old_torch)
    monkeypatch.setattr(vit, "train", None)                    # nothing may train
    fails_with(["--dataset", colors, "--out", str(tmp_path / "r"), "--precision", "bf16"]
               + SMALL, capsys, "cannot run bf16 autocast", "--precision fp32")
    assert not (tmp_path / "r").exists()


def test_ex14_a_skipped_fp16_step_changes_no_weight_and_halves_the_scale():
    # A scale of 2^127 overflows every gradient: the scaler skips AdamW's step (no weight
    # moves) and halves its scale; the learning rate is still the one given for the step.
    model = tiny_vit()
    cfg = vit.Config(epochs=1, warmup=0.5)
    opt = vit.build_optimizer(model, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4) % 5
    for lr in (1e-3, 2e-3):
        vit.train_step(model, x, y, opt, scaler, cfg, "fp16", lr)
        assert all(g["lr"] == lr for g in opt.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # skipped
    assert scaler.get_scale() == 2.0 ** 125                         # halved twice


def test_ex13_warmup_and_cosine_equal_torchs_own_schedulers():
    # LinearLR from 0.1% over the warmup steps, then CosineAnnealingLR down to 0: PyTorch's
    # schedulers, stepped as a training loop steps them
    for total, warmup in ((40, 0.1), (7, 0.3), (100, 0.05), (3, 0.0)):
        cfg, steps = vit.Config(lr=0.01, warmup=warmup), max(1, round(warmup * total))
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = torch.optim.lr_scheduler
        theirs = sched.SequentialLR(opt, [sched.LinearLR(opt, 1e-3, 1.0, steps),
                                          sched.CosineAnnealingLR(opt, total - steps)], [steps])
        want = []
        with warnings.catch_warnings():              # torch 2.3's SequentialLR warns inside
            warnings.simplefilter("ignore")
            for _ in range(total):
                want.append(opt.param_groups[0]["lr"])
                opt.step()
                theirs.step()
        got = [vit.lr_at(step, total, cfg) for step in range(total)]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), (total, warmup)


def test_ex14_one_training_step_is_a_plain_pytorch_step():
    # train_step against the step written out with PyTorch: the lr set, label-smoothed
    # cross-entropy times the weight, backward, the global norm clipped to 1 (of the gradients
    # unscaled), AdamW; the loss returned unweighted; on a model of one Linear
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    theirs = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    theirs.load_state_dict(ours.state_dict())
    cfg = vit.Config(weight_decay=0.05, label_smoothing=0.1)
    opt = torch.optim.AdamW(ours.parameters(), weight_decay=cfg.weight_decay)
    ref = torch.optim.AdamW(theirs.parameters(), weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)    # gradients scaled by 1024
    for lr, weight, clip in ((0.5, 1.0, 1.0), (0.1, 0.5, 0.0), (0.02, 2.0, 1.0)):
        x, y = torch.randn(8, 3, 2, 2) * 10, torch.randint(0, 3, (8,))   # large: clipped
        logits, loss = vit.train_step(ours, x, y, opt, scaler, replace(cfg, clip_grad=clip),
                                      "fp32", lr, weight)
        for group in ref.param_groups:
            group["lr"] = lr
        want = nn.functional.cross_entropy(theirs(x), y, label_smoothing=0.1)
        ref.zero_grad()
        (want * weight).backward()
        if clip:
            assert nn.utils.clip_grad_norm_(theirs.parameters(), clip) > clip
        ref.step()
        torch.testing.assert_close(loss, want)
        assert logits.shape == (8, 3)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)   # as stepped
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_ex15_an_epoch_is_its_plan_stepped_and_training_learns():
    # One epoch against the same epoch written out from its plan (order, crops, flips) and
    # the schedule: the same weights, loss and accuracy; then three epochs learn a task.
    torch.manual_seed(0)
    dark, light = torch.randint(0, 100, (40, 1, 8, 8)), torch.randint(156, 256, (40, 1, 8, 8))
    x, y = torch.cat([dark, light]).to(torch.uint8), torch.arange(80) // 40
    cpu = torch.device("cpu")
    data = vit.make_data(x[::2], y[::2], x[1::2], y[1::2], ["dark", "light"], cpu)
    cfg = vit.Config(epochs=3, batch_size=16, lr=3e-3, patch_size=4, dim=16, depth=1,
                     heads=2, mlp_dim=32, image_size=8, crop_pad=1, precision="fp32")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    models = [vit.build_model(cfg, 1, 2, cpu) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [vit.build_optimizer(m, cfg, cpu) for m in models]
    loss, acc, rate = vit.train_one_epoch(models[0], data, opts[0], scaler, cfg, "fp32", 1,
                                          vit.Hooks())
    order, pad, shift, mirror = vit.epoch_plan(40, cfg, 1, cpu)
    losses, correct = [], 0
    for step in range(40 // 16):                          # the last partial batch: dropped
        i = slice(16 * step, 16 * step + 16)
        images = vit.augment(data.train_x[order[i]], pad, shift[i], mirror[i])
        logits, l = vit.train_step(models[1], data.normalize(images), data.train_y[order[i]],
                                   opts[1], scaler, cfg, "fp32", vit.lr_at(step, 3 * 2, cfg))
        losses.append(l.item())
        correct += (logits.argmax(1) == data.train_y[order[i]]).sum().item()
    assert loss == pytest.approx(sum(losses) / 2) and acc == correct / 32 and rate > 0
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for epoch in (2, 3):
        loss, acc, _ = vit.train_one_epoch(models[0], data, opts[0], scaler, cfg, "fp32",
                                           epoch, vit.Hooks())
    assert vit.evaluate(models[0], data, cfg, "fp32")[1] >= 0.9


def test_adamw_is_fused_on_cuda_only(monkeypatch):
    made = []
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, **k: made.append(k))
    for device in ("cuda", "cpu", "mps"):
        vit.build_optimizer(tiny_vit(), vit.Config(), torch.device(device))
    assert [k["fused"] for k in made] == [True, False, False]


# ------------------------------------------------------------------------------------------
# vit.py: a GPU's paths and a run that travels between machines (#26), each faked where this
# CPU cannot be that device: what the code reads from the device is what is faked
# ------------------------------------------------------------------------------------------
CPU_FUSED = torch.__version__ >= "2.4"       # torch 2.3 has no fused AdamW kernel for the CPU


def as_if_on(monkeypatch, fused=None, precision=None):
    # AdamW built as on a GPU (fused) or not, and the auto precision another device picks
    real_opt, real_policy = vit.build_optimizer, vit.precision_policy
    if fused is not None:
        monkeypatch.setattr(vit, "build_optimizer", lambda model, cfg, device: real_opt(
            model, cfg, torch.device("cuda" if fused else "cpu")))
    if precision is not None:
        monkeypatch.setattr(vit, "precision_policy", lambda requested, device: (
            (precision, "faked") if requested == "auto" else real_policy(requested, device)))


def checkpoint_from_a_gpu(path, fused):
    # What a checkpoint saved on another device holds once loaded here: its own fused flag
    ckpt = torch.load(path, weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"] = fused
    torch.save(ckpt, path)


@pytest.mark.parametrize("saved_fused, fused", [
    (True, False),                           # a Colab GPU's run resumed on a laptop's CPU
    pytest.param(False, True, marks=pytest.mark.skipif(not CPU_FUSED, reason="torch < 2.4")),
])                                           # a laptop's run resumed on a GPU, in fp16
def test_a_checkpoint_resumes_exactly_under_another_devices_optimizer(saved_fused, fused,
                                                                      colors, tmp_path,
                                                                      monkeypatch):
    # fp16 with its GradScaler: a fused AdamW takes the scaler's found_inf, an unfused one
    # refuses it (AssertionError); torch 2.3 has no fused CPU kernel (RuntimeError).
    args = ["--dataset", colors, "--epochs", "3", "--precision", "fp16"] + SMALL[2:]
    vit.main(args + ["--out", str(tmp_path / "full")])
    interrupt_in_epoch(2, monkeypatch)
    with pytest.raises(SystemExit):
        vit.main(args + ["--out", str(tmp_path / "moved")])
    monkeypatch.undo()
    checkpoint_from_a_gpu(tmp_path / "moved" / "checkpoint.pth", saved_fused)
    as_if_on(monkeypatch, fused=fused)
    vit.main(["--resume", str(tmp_path / "moved" / "checkpoint.pth")])
    ckpt = torch.load(tmp_path / "moved" / "checkpoint.pth", weights_only=True)
    assert [g["fused"] for g in ckpt["optimizer"]["param_groups"]] == [fused, fused]
    # the same numbers as the run that never moved, up to the two kernels' rounding
    same_metrics(read_metrics(tmp_path / "moved"), read_metrics(tmp_path / "full"), rel=1e-4)


@pytest.mark.parametrize("before, after", [("fp32", "fp16"), ("fp16", "bf16")])
def test_a_checkpoint_resumes_with_or_without_an_fp16_scaler(before, after, colors, tmp_path,
                                                             monkeypatch):
    # --precision auto: a Mac's fp32 run resumed on a T4 (fp16: a new scaler), a T4's run
    # resumed on an A100 (bf16: its saved scale is not needed)
    args = ["--dataset", colors, "--epochs", "2"] + SMALL[2:]
    out = tmp_path / "run"
    as_if_on(monkeypatch, fused=False, precision=before)
    interrupt_in_epoch(2, monkeypatch)
    with pytest.raises(SystemExit):
        vit.main(args + ["--out", str(out)])
    monkeypatch.undo()
    assert ("scale" in torch.load(out / "checkpoint.pth", weights_only=True)["scaler"]) == (
        before == "fp16")
    as_if_on(monkeypatch, fused=CPU_FUSED, precision=after)
    acc = vit.main(["--resume", str(out / "checkpoint.pth")])
    assert acc == read_metrics(out)[-1]["test_acc"]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ("scale" in ckpt["scaler"]) == (after == "fp16")


def test_model_pth_opens_with_a_plain_torch_load_on_any_machine(trained_run, tmp_path):
    # torch.load(path, weights_only=True), no map_location, as a laptop or timm loads it.
    # A GPU's tensors are faked: a tensor type that a weights-only load refuses, as it would
    # refuse CUDA storage on a machine without CUDA; .cpu() gives a plain tensor.
    class OnGPU(torch.Tensor):
        def cpu(self):
            return self.as_subclass(torch.Tensor)

    _, out, metrics = trained_run
    model, _, saved = vit.load_model(os.path.join(out, "model.pth"), torch.device("cpu"))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.state_dict = lambda: {k: v.as_subclass(OnGPU) for k, v in weights.items()}
    cfg = vit.Config(**torch.load(os.path.join(out, "checkpoint.pth"),
                                  weights_only=True)["config"])
    data = vit.Data(torch.zeros(1, 3, 16, 16), None, None, None, saved["classes"],
                    torch.tensor(saved["mean"]), torch.tensor(saved["std"]))
    vit.save_checkpoint(str(tmp_path), cfg, data, model, vit.build_optimizer(
        model, cfg, torch.device("cpu")), torch.amp.GradScaler("cpu", enabled=False), metrics)
    loaded = torch.load(tmp_path / "model.pth", weights_only=True)
    assert all(type(v) is torch.Tensor and v.device.type == "cpu" and torch.equal(v, weights[k])
               for k, v in loaded["state_dict"].items())


def test_free_gpu_memory_is_read_by_index_as_torch_2_3_needs(monkeypatch):
    def mem_get_info(device=None):             # torch 2.3 and 2.4: no index, no answer
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, "
                             f"but got:{device}")
        return 123_000_000, 16_000_000_000
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert vit.free_memory(torch.device("cuda")) == 123_000_000
    assert vit.free_memory(torch.device("cuda", 1)) == 123_000_000


def test_fp16_on_a_torch_whose_scaler_cannot_run_on_the_device_is_one_sentence(
        colors, tmp_path, monkeypatch, capsys):
    def mps_before_2_7(self, optimizer):     # GradScaler.unscale_ on MPS, torch 2.5 and 2.6
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework "
                        "doesn't support float64. Please use float32 instead.")
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", mps_before_2_7)
    monkeypatch.setattr(vit, "train", None)                    # nothing may train
    fails_with(["--dataset", colors, "--out", str(tmp_path / "r"), "--precision", "fp16"]
               + SMALL, capsys, "cannot run fp16", "float64", "--precision fp32")
    assert not (tmp_path / "r").exists()


def virtual_clock(monkeypatch, first_step, later_steps):
    # time.perf_counter() as if each training step took that long (the first: compiling)
    now, real = [0.0], vit.train_step

    def train_step(*a, **k):
        now[0] += later_steps if now[0] else first_step
        return real(*a, **k)
    monkeypatch.setattr(vit, "train_step", train_step)
    monkeypatch.setattr(vit.time, "perf_counter", lambda: now[0])


@pytest.mark.parametrize("first_step, later_steps, minutes, hint", [
    (600, 600, "60.0", True),                # slow on a CPU: say so, and what to do
    (6, 6, "0.6", False),
    (1000, 10, "1.0", False),                # --compile: the first step compiles for 17 min
])
def test_the_run_time_estimate_comes_in_the_first_epoch_and_leaves_out_compiling(
        first_step, later_steps, minutes, hint, colors, tmp_path, capsys, monkeypatch):
    # 3 steps an epoch, 2 epochs: 6 steps; said once the steps after the first took 10 s
    virtual_clock(monkeypatch, first_step, later_steps)
    vit.main(["--dataset", colors, "--out", str(tmp_path / "run")] + SMALL)
    out = capsys.readouterr().out
    said = out.index(f"training will take about {minutes} min")
    assert said < out.index("epoch   1/2")                      # in the first epoch
    assert ("Runtime > Change runtime type" in out) == hint
    assert ("--preset cpu" in out) == hint


@pytest.mark.parametrize("clock", ["still", "backwards"])
def test_durations_do_not_read_the_wall_clock(clock, colors, tmp_path, monkeypatch):
    # Windows before Python 3.13 advances time.time() in 15.6 ms ticks, and NTP may set it
    # back: an epoch's rate divided by zero, or went negative.
    import itertools
    ticks = itertools.repeat(1e9) if clock == "still" else itertools.count(1e9, -1)
    monkeypatch.setattr(vit.time, "time", lambda: next(ticks))
    vit.main(["--dataset", colors, "--out", str(tmp_path / "run")] + SMALL)
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 2 and all(m["images_per_s"] > 0 for m in metrics)


def test_ctrl_c_in_a_longer_resume_says_a_command_that_works(trained_run, tmp_path, capsys,
                                                              monkeypatch):
    # a 2-epoch run resumed with --epochs 3, stopped before epoch 3 ends: the checkpoint on
    # disk still says 2 epochs, so the command must say --epochs 3
    import shlex
    _, out, _ = trained_run
    copy = copy_of_run(out, tmp_path / "copy")
    interrupt_in_epoch(1, monkeypatch)
    with pytest.raises(SystemExit):
        vit.main(["--resume", str(copy / "checkpoint.pth"), "--epochs", "3"])
    monkeypatch.undo()
    said = capsys.readouterr().err.strip()
    assert said.startswith("interrupted after epoch 2; resume with `python vit.py ")
    command = shlex.split(said.split("`")[1])
    assert command[:2] == ["python", "vit.py"]
    assert vit.main(command[2:]) == read_metrics(copy)[-1]["test_acc"]
    assert len(read_metrics(copy)) == 3


def test_model_pth_is_never_older_than_the_checkpoint(trained_run, tmp_path, capsys,
                                                       monkeypatch):
    # Ctrl-C between the last epoch's two files: whatever the sentence says must be true
    folder, out, _ = trained_run
    real, pth = vit.write_atomically, []

    def write_atomically(path, *a):
        if path.endswith(".pth"):
            pth.append(path)
            if len(pth) == 4:                    # the last epoch's second file
                raise KeyboardInterrupt
        return real(path, *a)
    monkeypatch.setattr(vit, "write_atomically", write_atomically)
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        vit.main(["--dataset", folder, "--out", str(run)] + SMALL)
    said = capsys.readouterr().err
    final = torch.load(os.path.join(out, "model.pth"), weights_only=True)["state_dict"]
    mine = torch.load(run / "model.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], mine[k]) for k in final)        # the trained model
    assert "interrupted after epoch 1; resume with" in said          # and the checkpoint's


def test_a_folder_is_decoded_into_memory_without_a_second_copy(monkeypatch):
    # The memory check lets the data take half of the free memory; decoding must then not
    # hold it twice (chunks, then one torch.cat: 2.15 times here). Peak resident memory, on
    # Linux; the threads' batches in flight add some 25 MB (1.25 times here).
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")

    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))
    monkeypatch.setattr(vit, "read_image", lambda path, mode, size: torch.full(
        (3, size, size), 7, dtype=torch.uint8))                # decoding, without files
    files = vit.ImageFiles(["x.png"] * 8000, "RGB", 96)        # 221 MB as uint8
    base = kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                           # peak := now
    x = files[:]
    peak = (kib("VmHWM:") - base) * 1024
    assert x.shape == (8000, 3, 96, 96) and x.min() == x.max() == 7
    assert peak < 1.7 * x.numel(), f"decoding peaked at {peak / x.numel():.2f} times the data"


def test_a_validation_split_is_measured_every_epoch_and_the_test_split_once(colors, tmp_path,
                                                                           capsys):
    out = tmp_path / "run"
    vit.main(["--dataset", colors, "--val-split", "0.25", "--out", str(out)] + SMALL)
    printed = capsys.readouterr().out
    assert "18 train and 6 val images" in printed
    epochs = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("| val loss" in e and "test" not in e for e in epochs)
    metrics = read_metrics(out)
    assert all({"val_loss", "val_acc"} <= m.keys() for m in metrics)
    assert "test_acc" not in metrics[0] and {"test_loss", "test_acc"} <= metrics[-1].keys()
    assert f"test accuracy: {100 * metrics[-1]['test_acc']:.2f}%" in printed
    vit.main(["--eval", str(out / "model.pth"), "--out", str(tmp_path / "eval")])  # test/ alone
    assert f"test accuracy: {100 * metrics[-1]['test_acc']:.2f}%" in capsys.readouterr().out


def test_the_validation_split_is_seeded_disjoint_and_streams_alike(colors, capsys):
    # the same images whether kept in memory or streamed; normalised by the training part
    # alone; another seed, other images
    cfg = vit.Config(dataset=colors, val_split=0.25, patch_size=4)
    cpu = torch.device("cpu")
    a = vit.load_data(cfg, cpu)
    b = vit.load_data(replace(cfg, data="stream"), cpu)
    assert torch.equal(a.test_x, b.test_x[:]) and torch.equal(a.train_x, b.train_x[:])
    assert torch.equal(a.test_y, b.test_y) and len(a.test_y) == 6 and len(a.train_y) == 18
    whole = vit.load_data(replace(cfg, val_split=0.0), cpu)
    assert a.held == b.held == "val" and whole.held == "test"   # what train() calls it
    whole = whole.train_x
    rows = {tuple(x.flatten().tolist()) for x in torch.cat([a.train_x, a.test_x])}
    assert rows == {tuple(x.flatten().tolist()) for x in whole}           # a partition
    mean, std = vit.channel_stats([a.train_x], a.train_x[:, 0].numel())
    for data in (a, b):
        torch.testing.assert_close((data.mean, data.std), (mean, std))
    assert not torch.equal(vit.load_data(replace(cfg, seed=1), cpu).test_x, a.test_x)
    for fraction, words in ((0.01, "no validation image"), (0.99, "nothing to train on")):
        with pytest.raises(vit.UserError, match=words):
            vit.load_data(replace(cfg, val_split=fraction), cpu)
    assert a.test_y.bincount().tolist() == [3, 3]                 # a part of every class
    y = torch.tensor([0] * 8 + [1])                               # a class of one image
    (_, val), (_, val_y) = vit.hold_out(torch.arange(9), y, replace(cfg, val_split=0.25))
    assert val_y.tolist() == [0, 0]                               # it stays in training
    with pytest.raises(vit.UserError, match="a class with nothing to train on"):
        vit.hold_out(torch.arange(9), y, replace(cfg, val_split=0.9))


def test_eval_reads_only_the_test_split(trained_run, tmp_path, capsys):
    # model.pth holds the classes, the channels and the normalisation: no train/ is needed
    folder, out, metrics = trained_run
    import shutil
    shutil.copytree(os.path.join(folder, "test"), tmp_path / "only" / "test")
    acc = vit.main(["--eval", os.path.join(out, "model.pth"), "--dataset",
                    str(tmp_path / "only"), "--out", str(tmp_path / "eval")])
    assert acc == pytest.approx(metrics[-1]["test_acc"])
    assert "of 12 resized or cropped" in capsys.readouterr().out       # 12 files looked at
    shutil.rmtree(tmp_path / "only" / "test" / "blue")                # a class with no test
    os.mkdir(tmp_path / "only" / "test" / "blue")                     # images: still fine
    assert vit.main(["--eval", os.path.join(out, "model.pth"), "--dataset",
                     str(tmp_path / "only"), "--out", str(tmp_path / "eval")]) >= 0


def test_the_figures_raise_no_warning(trained_run, tmp_path):
    # numpy 2 warned at every torch tensor handed to matplotlib: 1,509 warnings in the suite
    _, out, _ = trained_run
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vit.main(["--eval", os.path.join(out, "model.pth"), "--out", str(tmp_path)])


def test_parameter_names_are_timms():
    # timm's VisionTransformer names, which a strict load_state_dict into timm needs
    names = set(tiny_vit().state_dict())
    block = {f"blocks.{i}.{n}.{w}" for i in range(2) for w in ("weight", "bias")
             for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")}
    assert names == block | {"cls_token", "pos_embed", "patch_embed.proj.weight",
                             "patch_embed.proj.bias", "norm.weight", "norm.bias",
                             "head.weight", "head.bias"}


# ------------------------------------------------------------------------------------------
# vit.py --predict: a trained model on your own images
# ------------------------------------------------------------------------------------------
def test_predict_agrees_with_eval_on_test_images(trained_run, tmp_path, capsys):
    folder, out, _ = trained_run
    model_pth = os.path.join(out, "model.pth")
    files = sorted(os.path.join(folder, "test", c, f) for c in ("blue", "red")
                   for f in os.listdir(os.path.join(folder, "test", c)))
    jpeg = str(tmp_path / "first.jpg")
    Image.open(files[0]).convert("RGB").save(jpeg, quality=95)
    labels = vit.main(["--predict", model_pth, *files, jpeg, "--device", "cpu",
                       "--out", str(tmp_path)])
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("saved ")]
    # --eval's path: the image folder decoded, normalised with the saved statistics, evaluated
    model, cfg, saved = vit.load_model(model_pth, torch.device("cpu"))
    data = vit.load_data(replace_dataset(cfg, folder), torch.device("cpu"))
    data.mean, data.std = (torch.tensor(saved[k]) for k in ("mean", "std"))
    _, _, preds = vit.evaluate(model, data, cfg, "fp32")
    assert labels[:-1] == [data.classes[p] for p in preds.tolist()]
    assert labels[-1] == labels[0]                                  # the JPEG of the first
    for line, path in zip(lines, files + [jpeg]):                   # "file: cls p%, cls p%"
        assert line.startswith(path + ": ") and line.count("%") == 2   # 2 classes: top 2
        shares = [float(w.rstrip("%,")) for w in line.split()[2::2]]
        assert sum(shares) == pytest.approx(100, abs=0.2) and shares == sorted(shares)[::-1]
    assert os.path.getsize(tmp_path / "predicted.png") > 0


def replace_dataset(cfg, folder):
    return vit.Config(**{**vit.asdict(cfg), "dataset": folder})


@pytest.mark.parametrize("model_channels, image_mode", [(1, "RGB"), (3, "L")])
def test_predict_converts_channels_to_the_models(model_channels, image_mode, tmp_path, capsys):
    model = tiny_vit(in_channels=model_channels)
    config = {k: getattr(vit.Config(image_size=16, patch_size=4, dim=32, depth=2, heads=4,
                                    mlp_dim=64), k) for k in vit.MODEL_KEYS}
    torch.save({"config": {**config, "in_channels": model_channels},
                "state_dict": model.state_dict(), "classes": list("abcde"),
                "mean": [0.5] * model_channels, "std": [0.25] * model_channels,
                "dataset": "x", "data_root": "x"}, tmp_path / "model.pth")
    image = tmp_path / "photo.png"
    Image.new(image_mode, (40, 30), 120).save(image)               # other size, other mode
    labels = vit.main(["--predict", str(tmp_path / "model.pth"), str(image)])
    assert len(labels) == 1 and labels[0] in "abcde"
    assert capsys.readouterr().out.strip().count("%") == 3          # the top 3 of 5 classes


def test_predict_bad_input_is_one_sentence(trained_run, tmp_path, capsys):
    _, out, _ = trained_run
    model_pth = os.path.join(out, "model.pth")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    fails_with(["--predict", model_pth, str(tmp_path / "missing.png")], capsys,
               "does not exist")
    fails_with(["--predict", model_pth, str(text)], capsys, "as an image")
    fails_with(["--predict", str(text), str(text)], capsys, "corrupt or is not a PyTorch file")
    fails_with(["--predict", os.path.join(out, "checkpoint.pth"), str(text)], capsys,
               "model.pth")
    fails_with(["--predict", model_pth], capsys, "one or more image")


# ------------------------------------------------------------------------------------------
# vit.py: never silently wrong (divergence, schedule on resume, flags, image folders, GPUs)
# ------------------------------------------------------------------------------------------
def strict_json(path):
    # JSON as JavaScript's JSON.parse reads it: NaN and Infinity are not JSON
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_a_diverging_run_stops_with_one_sentence_and_writes_no_nan(colors, tmp_path, capsys,
                                                                   monkeypatch):
    # After the first step the weights are nan, as after a step far too large: the loss of
    # every later step is nan. (Naturally diverging runs are slow or depend on the CPU.)
    real, steps = vit.train_step, []

    def blow_up_after_one_step(model, *a, **k):
        result = real(model, *a, **k)
        steps.append(1)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(vit, "train_step", blow_up_after_one_step)
    out = tmp_path / "run"
    err = fails_with(["--dataset", colors, "--out", str(out)] + SMALL, capsys,
                     "diverged in epoch 1", "no checkpoint was written", "lower --lr")
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()                         # nothing worth keeping: folder given back
    assert len(steps) == 3                          # stopped at the end of epoch 1


def test_divergence_keeps_the_last_good_checkpoint(colors, tmp_path, capsys, monkeypatch):
    # Epoch 1 trains well; in epoch 2 the weights turn to NaN. checkpoint.pth and model.pth
    # must still hold epoch 1, and metrics.json must stay JSON.
    real = vit.train_one_epoch

    def poison_epoch_2(model, *a, **k):
        result = real(model, *a, **k)
        if a[5] == 2:                                          # the epoch number
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return result

    out = tmp_path / "run"
    monkeypatch.setattr(vit, "train_one_epoch", poison_epoch_2)
    fails_with(["--dataset", colors, "--out", str(out)] + SMALL[:1] + ["3"] + SMALL[2:], capsys,
               "diverged in epoch 2", "checkpoint of epoch 1", "is kept")
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    saved = torch.load(out / "model.pth", weights_only=True)
    assert all(torch.isfinite(w).all() for w in saved["state_dict"].values())
    assert [m["epoch"] for m in strict_json(out / "metrics.json")] == [1]
    # The same divergence in a resumed run branched into a new folder: that folder has no
    # checkpoint to keep (the message must not claim one), and the original is untouched.
    before = file_bytes(out)
    fails_with(["--resume", str(out / "checkpoint.pth"), "--out", str(tmp_path / "branch")],
               capsys, "diverged in epoch 2", "no checkpoint was written in")
    assert file_bytes(out) == before and not (tmp_path / "branch").exists()


def schedule(step, peak, warmup, total):
    # the schedule as the README states it, written out independently of vit.py
    if step < warmup:
        return peak * (0.001 + 0.999 * step / warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def record_lrs(monkeypatch):
    lrs, real = [], vit.train_step

    def recording(model, x, y, opt, scaler, cfg, precision, lr, **k):
        lrs.append(lr)                                        # the lr this step uses
        return real(model, x, y, opt, scaler, cfg, precision, lr, **k)
    monkeypatch.setattr(vit, "train_step", recording)
    return lrs


@pytest.mark.parametrize("stop_after, epochs", [(1, 4), (1, 6), (2, 6), (2, 3)])
def test_a_resumed_run_follows_the_schedule_of_its_length(stop_after, epochs, colors, tmp_path,
                                                          monkeypatch, capsys):
    # 3 steps an epoch, warmup 30% of 12 steps = 4 steps: a run stopped after epoch 1 stops
    # inside the warmup, one stopped after epoch 2 after it. Resumed with the same or a new
    # --epochs, every step's lr must be the formula's for the new length.
    args = ["--dataset", colors, "--epochs", "4", "--warmup", "0.3", "--lr", "0.01"] + SMALL[2:]
    interrupt_in_epoch(stop_after + 1, monkeypatch)
    with pytest.raises(SystemExit):
        vit.main(args + ["--out", str(tmp_path / "first")])
    monkeypatch.undo()
    lrs = record_lrs(monkeypatch)
    vit.main(["--resume", str(tmp_path / "first" / "checkpoint.pth"), "--epochs", str(epochs),
              "--out", str(tmp_path / "resumed")])
    total = 3 * epochs
    warmup = round(0.3 * total)
    want = [schedule(s, 0.01, warmup, total) for s in range(3 * stop_after, total)]
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert max(lrs) <= 0.01 * (1 + 1e-9)


def test_clip_grad_zero_means_no_clipping(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("gradients were clipped")
    monkeypatch.setattr(nn.utils, "clip_grad_norm_", refuse)
    model, reference = tiny_vit(), tiny_vit()
    cfg = vit.Config(epochs=1, clip_grad=0)
    opt = vit.build_optimizer(model, cfg, torch.device("cpu"))
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4) % 5
    vit.train_step(model, x, y, opt, torch.amp.GradScaler("cpu", enabled=False), cfg, "fp32",
                   1e-3)
    nn.functional.cross_entropy(reference(x), y, label_smoothing=0.1).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)                # as computed: not zeroed
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_preset_names_its_data_set_and_an_explicit_dataset_wins():
    parse = vit.build_parser().parse_args
    assert vit.resolve_config(parse(["--preset", "cpu"])).dataset == "fashionmnist"
    assert vit.resolve_config(parse(["--preset", "tiny"])).dataset == "cifar10"
    assert vit.resolve_config(parse(["--preset", "cpu", "--dataset", "cifar10"])).dataset == \
        "cifar10"


@pytest.mark.parametrize("dataset, patch", [("cifar10", "7"), ("fashionmnist", "5")])
def test_a_patch_size_that_misfits_a_known_data_set_is_refused_before_downloading(
        dataset, patch, capsys, monkeypatch, tmp_path):
    def no_download(*a, **k):
        raise AssertionError("the data set was loaded")
    monkeypatch.setattr(vit, "load_torchvision", no_download)
    fails_with(["--dataset", dataset, "--patch-size", patch, "--out", str(tmp_path / "r")],
               capsys, "not divisible by patch size")


def test_many_classes_draw_a_plain_confusion_image(tmp_path, monkeypatch, capsys):
    # 1,000 classes: no per-cell text (a million labels took over 15 minutes); 5: all 25.
    import matplotlib.axes
    texts, real = [], matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, *a, **k: texts.append(1) or real(self, *a, **k))
    for K, cells in ((1000, 0), (5, 25)):
        texts.clear()
        y = torch.arange(2 * K) % K
        data = vit.Data(torch.zeros(0), y[:0], torch.zeros(2 * K, 1, 4, 4, dtype=torch.uint8),
                        y, [f"class{k}" for k in range(K)], torch.tensor([0.5]),
                        torch.tensor([0.5]))
        vit.plot_confusion(data, y.roll(1), str(tmp_path / f"conf{K}.png"))
        assert len(texts) == cells
        assert os.path.getsize(tmp_path / f"conf{K}.png") > 0


def test_compile_builds_one_graph_for_training(tmp_path, monkeypatch):
    # 26 training images in batches of 8: the ragged last batch is dropped, so training
    # has one shape; evaluation runs the model uncompiled.
    # A counting backend stands in for inductor (too slow for this suite): it records the
    # input shapes of every graph Dynamo compiles.
    folder = make_image_folder(tmp_path / "colors", n_train=13, n_test=7)
    shapes, real_compile = [], torch.compile

    def counting(gm, example_inputs):
        shapes.append([tuple(t.shape) for t in example_inputs
                       if isinstance(t, torch.Tensor) and t.shape[1:] == (3, 16, 16)])  # images
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **k: real_compile(
        model, backend=counting, **k))
    torch._dynamo.reset()
    vit.main(["--dataset", folder, "--out", str(tmp_path / "run"), "--compile"] + SMALL)
    torch._dynamo.reset()
    batches = {s for graph in shapes for s in graph}
    assert batches == {(8, 3, 16, 16)}, shapes          # one batch shape
    assert len(shapes) == 1, shapes                     # one graph
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1, 2]


def test_a_compile_failure_is_one_sentence(colors, tmp_path, capsys, monkeypatch):
    def python_312(*a, **k):           # what torch < 2.4 raises on Python 3.12
        raise RuntimeError("Dynamo is not supported on Python 3.12+")
    monkeypatch.setattr(torch, "compile", python_312)
    fails_with(["--dataset", colors, "--out", str(tmp_path / "run"), "--compile"] + SMALL,
               capsys, "torch.compile is not available", "without --compile")
    assert not (tmp_path / "run").exists()


def save_rgb(path, rgb, size=(16, 16), **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, rgb).save(path, **kwargs)


def test_an_image_folder_is_read_from_all_its_files_not_its_first(tmp_path, capsys):
    # Sorted first in train/a: a grayscale image, then a 16-bit one, a float TIFF, a large
    # 640x480 photo, a sideways phone photo (EXIF orientation 6) and a macOS ._ file; a
    # .ipynb_checkpoints folder beside the classes. The set must come out RGB, 16 px, two
    # classes, with every pixel value scaled right.
    root = tmp_path / "mixed"
    for split in ("train", "test"):
        for c, rgb in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            for i in range(4):
                save_rgb(str(root / split / c / f"{i + 10}.png"), rgb)
    a = root / "train" / "a"
    Image.new("L", (16, 16), 77).save(a / "00-gray.png")
    Image.fromarray(np.full((16, 16), 65535 // 2, dtype=np.uint16)).save(a / "01-16bit.png")
    Image.fromarray(np.full((16, 16), 0.25, dtype=np.float32)).save(a / "02-float.tiff")
    save_rgb(str(a / "03-photo.jpg"), (10, 200, 10), size=(640, 480), quality=95)
    upright = np.zeros((32, 16, 3), dtype=np.uint8)              # tall: top half white
    upright[:16] = 255
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)   # stored wide
    exif = Image.Exif()
    exif[0x0112] = 6                                             # "rotate 90 degrees clockwise"
    sideways.save(a / "04-phone.jpg", exif=exif, quality=95)
    (a / "._00-gray.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    save_rgb(str(root / "train" / ".ipynb_checkpoints" / "x.png"), (0, 0, 0))
    data = vit.load_data(vit.Config(dataset=str(root)), torch.device("cpu"))
    assert data.classes == ["a", "b"]
    assert data.train_x.shape == (13, 3, 16, 16) and data.test_x.shape == (8, 3, 16, 16)
    x = {f: data.train_x[i] for i, f in enumerate(sorted(os.listdir(a)) [1:])}   # no ._ file
    assert torch.all(x["00-gray.png"] == 77)                     # gray in an RGB set
    assert torch.all((x["01-16bit.png"] - 127).abs() <= 1)      # half of 65535: half of 255
    assert torch.all((x["02-float.tiff"] - 64).abs() <= 1)      # 0.25 of 1: 64 of 255
    assert (x["03-photo.jpg"][1].float().mean() - 200).abs() < 5   # resized, still green
    top, bottom = x["04-phone.jpg"][:, :4].float().mean(), x["04-phone.jpg"][:, -4:].float().mean()
    assert top > 200 and bottom < 50                             # upright: white on top
    out = capsys.readouterr().out
    assert "images: RGB, 16x16 px (the commonest size); 2 of 21 resized or cropped" in out


def test_predict_turns_a_phone_photo_upright(tmp_path):
    upright = np.zeros((32, 16, 3), dtype=np.uint8)
    upright[:16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "p.jpg", exif=exif, quality=95)
    x = vit.read_image(str(tmp_path / "p.jpg"), "L", 16)         # the centre 16x16 of 16x32
    assert x[0, :4].float().mean() > 200 and x[0, -4:].float().mean() < 50


def test_hostile_inputs_are_one_sentence(trained_run, colors, tmp_path, capsys):
    # images straight in train/ (no class folders), a seed that would overflow, a checkpoint
    # with a key missing or a nan in its configuration, a folder given as a model file
    flat = tmp_path / "flat"
    for split in ("train", "test"):
        save_rgb(str(flat / split / "0.png"), (1, 2, 3))
    fails_with(["--dataset", str(flat), "--out", str(tmp_path / "r")], capsys,
               "0 class folder(s)", "train/<class>/")
    fails_with(["--dataset", colors, "--seed", str(10 ** 15)] + SMALL, capsys,
               "--seed must be in")
    _, out, _ = trained_run
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    for broken, words in (({k: v for k, v in ckpt.items() if k != "epoch"}, "not written by"),
                          ({**ckpt, "config": {**ckpt["config"], "lr": math.nan}}, "does not know")):
        torch.save(broken, tmp_path / "broken.pth")
        fails_with(["--resume", str(tmp_path / "broken.pth"), "--epochs", "5"], capsys, words)
    fails_with(["--eval", out], capsys, "is a folder", "model.pth")


def test_running_out_of_memory_is_one_sentence(colors, tmp_path, capsys, monkeypatch):
    # what the CPU allocator raises for a model far too big (a real one would be killed
    # by the operating system first, on some machines)
    def too_big(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 960153606144 bytes.")
    monkeypatch.setattr(vit, "build_model", too_big)
    fails_with(["--dataset", colors, "--out", str(tmp_path / "oom")] + SMALL, capsys,
               "out of memory on cpu", "smaller --batch-size")
    assert not (tmp_path / "oom").exists()


def test_an_image_folder_with_one_class_or_unreadable_files_is_one_sentence(tmp_path, capsys):
    one = tmp_path / "one"
    for split in ("train", "test"):
        save_rgb(str(one / split / "cat" / "0.png"), (1, 2, 3))
    fails_with(["--dataset", str(one), "--out", str(tmp_path / "r1")], capsys,
               "1 class folder", "at least two")
    broken = tmp_path / "broken"
    make_image_folder(broken)
    for i in range(5):                                           # the first file among them
        (broken / "train" / "blue" / f"0{i}-bad.png").write_bytes(b"not a png")
    err = fails_with(["--dataset", str(broken), "--out", str(tmp_path / "r2")], capsys,
                     "5 files cannot be read as images", "00-bad.png", "and 2 more")
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------
# transformer.py: bad input and divergence are one sentence
# ------------------------------------------------------------------------------------------
def transformer_fails_with(argv, capsys, code, *words):
    with pytest.raises(SystemExit) as e:
        tf.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "error: " in err.splitlines()[-1], err   # [usage,] error
    for w in words:
        assert w in err, (w, err)


def test_transformer_bad_device_and_lr_are_one_sentence(capsys, monkeypatch):
    monkeypatch.setattr(tf, "train", None)                     # nothing may train
    transformer_fails_with(["--device", "banana"], capsys, 1, "'banana' is not available")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    transformer_fails_with(["--device", "cuda"], capsys, 1, "'cuda' is not available")
    transformer_fails_with(["--lr", "nan"], capsys, 2, "--lr must be positive")
    transformer_fails_with(["--lr", "inf"], capsys, 2, "--lr must be at most 1")


def test_transformer_trains_for_any_number_of_steps():
    # OneCycleLR divided by zero for some short runs (--steps 10); the formula does not
    for steps in (1, 2, 10):
        cfg = tf.Config(d_model=16, n_heads=2, n_layers=1, d_ff=32, steps=steps, batch_size=4)
        model = tf.Transformer(tf.VOCAB_SIZE, tf.VOCAB_SIZE, 16, 2, 1, 32, 0.0, pad_idx=tf.PAD)
        assert len(tf.train(model, [[3, 4, 5]] * 8, cfg, "cpu", log_every=100)) == steps


def test_transformer_stops_when_the_loss_turns_non_finite(monkeypatch):
    real, calls = tf.loss_fn, []

    def nan_from_step_3(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) >= 3 else loss
    monkeypatch.setattr(tf, "loss_fn", nan_from_step_3)
    cfg = tf.Config(d_model=16, n_heads=2, n_layers=1, d_ff=32, steps=10, batch_size=8)
    model = tf.Transformer(tf.VOCAB_SIZE, tf.VOCAB_SIZE, 16, 2, 1, 32, 0.0, pad_idx=tf.PAD)
    with pytest.raises(tf.UserError, match="diverged at step 3"):
        tf.train(model, [[3, 4, 5]] * 20, cfg, "cpu", log_every=100)
    assert len(calls) == 3


def test_transformer_checks_its_out_folder_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tf, "train", None)
    (tmp_path / "file").write_text("x")
    transformer_fails_with(["--out", str(tmp_path / "file" / "figs")], capsys, 1,
                           "cannot write in the folder")


def test_transformer_figure_write_failure_is_one_sentence(tmp_path, monkeypatch):
    import matplotlib.figure

    def full_disk(self, path, **k):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(tf.UserError, match="No space left on device"):
        tf.plot_causal_mask(str(tmp_path / "causal.png"))
    assert os.listdir(tmp_path) == []                          # no partial file left


# ------------------------------------------------------------------------------------------
# vit.py and transformer.py on a student's laptop (#29): Windows and macOS, faked on Linux
# ------------------------------------------------------------------------------------------
def test_a_torch_without_cuda_says_so(colors, tmp_path, capsys, monkeypatch):
    # PyPI's torch for Windows is CPU-only: --device cuda says why, and the estimate on a CPU
    # no longer assumes Colab
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails_with(["--dataset", colors, "--device", "cuda"], capsys, "built without CUDA",
               "README: Set-up", "use cpu")
    fails_with(["--dataset", colors, "--device", "mps"], capsys, "not available here; use cpu")
    virtual_clock(monkeypatch, 600, 600)
    vit.main(["--dataset", colors, "--out", str(tmp_path / "run")] + SMALL)
    assert ": a GPU takes minutes (in Colab: Runtime > Change runtime type), or try --preset " \
        "cpu" in capsys.readouterr().out


def test_a_mac_python_without_certificates_is_told_what_to_run(tmp_path, capsys,
                                                                monkeypatch):
    import ssl
    import urllib.error

    class NoCertificates:                   # python.org's Python before its certificates
        def __init__(self, root, train, download):
            raise urllib.error.URLError(ssl.SSLCertVerificationError(
                1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get "
                   "local issuer certificate (_ssl.c:1000)"))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoCertificates)
    err = fails_with(["--data-root", str(tmp_path)], capsys, "Install Certificates.command")
    assert "offline" not in err


def locked(monkeypatch, times, names=(".pth", ".json", ".png")):
    # os.replace refused, as Windows refuses while a scanner or a viewer holds the file
    real, refused = os.replace, []

    def replace(src, dst):
        if str(dst).endswith(names) and refused.count(dst) < times:
            refused.append(dst)
            raise PermissionError(13, "The process cannot access the file because it is being "
                                      "used by another process", dst)
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    return refused


def test_a_file_held_a_moment_on_windows_is_written_after_a_retry(colors, tmp_path,
                                                                   monkeypatch):
    refused = locked(monkeypatch, times=2)                  # twice, then it lets go
    vit.main(["--dataset", colors, "--out", str(tmp_path / "run")] + SMALL)
    assert {os.path.basename(p) for p in refused} >= {"model.pth", "checkpoint.pth",
                                                      "metrics.json", "curves.png"}
    assert len(read_metrics(tmp_path / "run")) == 2
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]


def test_a_figure_held_open_still_lets_eval_print_its_accuracy(trained_run, tmp_path, capsys,
                                                               monkeypatch):
    # Photos shows attention.png: --eval ends in one sentence, after saying the accuracy
    _, out, metrics = trained_run
    locked(monkeypatch, times=10 ** 9, names=("attention.png",))
    with pytest.raises(SystemExit):
        vit.main(["--eval", os.path.join(out, "model.pth"), "--out", str(tmp_path)])
    said = capsys.readouterr()
    assert f"test accuracy: {100 * metrics[-1]['test_acc']:.2f}%" in said.out
    assert said.err.strip() == (f"error: could not write {str(tmp_path / 'attention.png')!r} "
                                f"(The process cannot access the file because it is being "
                                f"used by another process); any earlier version of it is kept.")


def test_transformer_figure_held_open_is_one_sentence_and_keeps_the_old_one(tmp_path,
                                                                            monkeypatch):
    path = tmp_path / "causal.png"
    path.write_bytes(b"the previous figure")
    locked(monkeypatch, times=10 ** 9)
    with pytest.raises(tf.UserError, match="being used by another process"):
        tf.plot_causal_mask(str(path))
    assert path.read_bytes() == b"the previous figure" and os.listdir(tmp_path) == ["causal.png"]


def test_a_failed_save_leaves_no_tmp_file_where_open_files_cannot_be_deleted(colors, tmp_path,
                                                                             capsys, monkeypatch):
    # Windows deletes no file that is open. torch.save given a path name keeps its own handle
    # when it fails; given a file object, it writes through ours, which we close.
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs Linux's /proc/self/fd to see which files are open")
    real_save, real_remove, handles = torch.save, os.remove, []

    def failing_save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")
            handles.append(f)                             # torch's own handle, left open
        f.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    def windows_remove(path):
        fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}")]
        if os.path.abspath(path) in fds:
            raise PermissionError(13, "The process cannot access the file", path)
        return real_remove(path)
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(os, "remove", windows_remove)
    out = tmp_path / "run"
    fails_with(["--dataset", colors, "--out", str(out)] + SMALL, capsys, "could not write",
               "model.pth")
    for f in handles:
        f.close()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert not os.path.exists(out)                          # given back: no epoch ended


def test_predict_expands_a_pattern_that_windows_shells_pass_as_it_is(trained_run, tmp_path,
                                                                     capsys):
    folder, out, _ = trained_run
    labels = vit.main(["--predict", os.path.join(out, "model.pth"),
                       os.path.join(folder, "test", "red", "*.png")])  # quoted: unexpanded
    assert labels == ["red"] * 6
    assert capsys.readouterr().out.count(".png: red") == 6
    # a name that exists is never read as a pattern: [1] is not "1"
    Image.open(os.path.join(folder, "test", "red", "0.png")).save(tmp_path / "cat [1].png")
    Image.open(os.path.join(folder, "test", "blue", "0.png")).save(tmp_path / "cat 1.png")
    assert vit.main(["--predict", os.path.join(out, "model.pth"), str(tmp_path / "cat [1].png")]
                    ) == ["red"]


@pytest.mark.filterwarnings("ignore:Glyph")      # Hangul in the figures: a font matter
def test_a_console_in_cp1252_prints_any_class_name(tmp_path, monkeypatch):
    # Windows encodes redirected output in its ANSI code page: Hangul class names (and a
    # Hangul folder) must not end the run with UnicodeEncodeError
    import io
    folder = make_image_folder(tmp_path / "사진", classes=("red", "blue"))
    for split in ("train", "test"):
        os.rename(os.path.join(folder, split, "red"), os.path.join(folder, split, "빨강"))
    console = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", console)
    vit.main(["--dataset", folder, "--out", str(tmp_path / "run")] + SMALL)
    labels = vit.main(["--predict", str(tmp_path / "run" / "model.pth"),
                       os.path.join(folder, "test", "빨강", "0.png")])
    console.flush()
    shown = console.buffer.getvalue().decode("cp1252")
    assert labels == ["빨강"] and "\\ube68\\uac15" in shown and "\\uc0ac\\uc9c4" in shown


def test_torchrun_without_nccl_joins_gpus_by_gloo(monkeypatch, capsys):
    # Windows' torch has no NCCL; gloo carries CUDA tensors too
    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    backends = []

    def init_process_group(backend, *a, **k):
        backends.append(backend)
        raise ValueError("stop here: the backend is chosen")
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with pytest.raises(vit.UserError):
        vit.start_processes("cuda")
    assert backends == ["gloo"]


def test_a_model_from_another_machine_does_not_download_into_its_old_path(trained_run,
                                                                         tmp_path, capsys,
                                                                         monkeypatch):
    # trained on Colab (/content/data), evaluated on a laptop: the data goes into ./data
    _, out, metrics = trained_run
    saved = torch.load(os.path.join(out, "model.pth"), weights_only=True)
    torch.save({**saved, "dataset": "cifar10", "data_root": "/content/data"},
               tmp_path / "model.pth")
    roots = []

    class CIFAR10:                          # the test split of the colour folder, as CIFAR-10
        def __init__(self, root, train, download):
            roots.append(root)
            files, y, self.classes = vit.list_split(os.path.join(trained_run[0], "test"))
            self.data = torch.stack([vit.read_image(f, "RGB", 16) for f in files]).permute(
                0, 2, 3, 1).numpy()
            self.targets = y.tolist()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", CIFAR10)
    monkeypatch.chdir(tmp_path)
    acc = vit.main(["--eval", "model.pth", "--out", "eval"])
    assert roots == ["./data"] and acc == pytest.approx(metrics[-1]["test_acc"])


@pytest.mark.parametrize("path", ["data/moved", "C:\\Users\\me\\data\\moved"])
def test_a_missing_folder_is_named_whatever_the_system_wrote_it(path, capsys):
    fails_with(["--dataset", path], capsys, "there is no folder", "give --dataset its new path")


def test_a_resume_into_its_own_folder_spelled_otherwise_continues_there(trained_run, tmp_path):
    # a case-blind file system (Windows, macOS) spells one folder many ways: a link stands in
    _, out, _ = trained_run
    copy = copy_of_run(out, tmp_path / "copy")
    os.symlink(copy, tmp_path / "COPY")
    vit.main(["--resume", str(copy / "checkpoint.pth"), "--epochs", "3", "--out",
              str(tmp_path / "COPY")])
    assert len(read_metrics(copy)) == 3


def test_no_flash_attention_warning_breaks_the_progress_line(colors, tmp_path, monkeypatch):
    real = torch.nn.functional.scaled_dot_product_attention

    def windows_wheel(*a, **k):             # what Windows' CUDA wheels say at the first call
        warnings.warn("1Torch was not compiled with flash attention. (Triggered internally "
                      "at C:\\actions-runner\\_work\\pytorch\\aten\\src\\ATen\\native\\"
                      "transformers\\cuda\\sdp_utils.cpp:555.)")
        return real(*a, **k)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", windows_wheel)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        vit.main(["--dataset", colors, "--out", str(tmp_path / "run"), "--attn", "fused"]
                 + SMALL)
    assert not [w for w in shown if "flash attention" in str(w.message)]


# ------------------------------------------------------------------------------------------
# vit.py from pretrained weights (#28): torchvision's ImageNet ViTs in our ViT. No download
# here: a torchvision VisionTransformer of the same layout, small and random, stands in
# ------------------------------------------------------------------------------------------
def stand_in(monkeypatch, name="vit_b_16", fail=None):
    # torchvision's weights for `name`, as the real enum gives them (url, transforms, the 1,000
    # ImageNet class names: all offline), but a small random network's state dict; the shape
    # table says that network's shape
    torch.manual_seed(0)
    theirs = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=2,
                                                  num_heads=4, hidden_dim=32, mlp_dim=128).eval()
    with torch.no_grad():                     # non-trivial norms, biases and head
        for n, p in theirs.named_parameters():
            if "ln" in n or n.endswith("bias") or "head" in n:
                p.normal_(0, 0.5 if n.endswith("bias") or "head" in n else 1.0)
    real = torchvision.models.get_model_weights(name).IMAGENET1K_V1

    class Weights:
        url, meta, transforms = real.url, real.meta, real.transforms

        def get_state_dict(self, progress=True):
            if fail:
                raise fail
            return theirs.state_dict()
    monkeypatch.setattr(torchvision.models, "get_model_weights",
                        lambda n: type("Enum", (), {"IMAGENET1K_V1": Weights()}))
    monkeypatch.setitem(vit.TORCHVISION_VITS, name, dict(
        image_size=224, patch_size=16, dim=32, depth=2, heads=4, mlp_dim=128, dropout=0.0,
        pool="cls"))
    return theirs, real


def test_torchvision_imagenet_weights_run_unchanged_in_our_vit(monkeypatch):
    theirs, real = stand_in(monkeypatch)
    ours, cfg, saved = vit.load_model("vit_b_16", torch.device("cpu"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-4)
    assert saved["classes"] == real.meta["categories"] and len(saved["classes"]) == 1000
    assert saved["mean"] == [0.485, 0.456, 0.406] and saved["std"] == [0.229, 0.224, 0.225]
    # the conversion is the inverse of the test's own table of names (ours -> torchvision's)
    assert {torchvision_state_dict(ours)[k].data_ptr(): k for k in theirs.state_dict()} == {
        p.data_ptr(): k for k, p in torchvision_state_dict(ours).items()}


def test_the_position_embedding_is_resized_as_torchvision_resizes_it(monkeypatch):
    from torchvision.models.vision_transformer import interpolate_embeddings
    theirs, _ = stand_in(monkeypatch)
    _, _, saved = vit.load_model("vit_b_16", torch.device("cpu"))
    cfg = vit.Config(image_size=64, patch_size=16, dim=32, depth=2, heads=4, mlp_dim=128)
    ours = vit.build_model(cfg, 3, 1000, torch.device("cpu")).eval()
    ours.load_state_dict(vit.transferred(saved, ours, cfg, saved["classes"]))
    at_64 = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2,
                                                 num_heads=4, hidden_dim=32, mlp_dim=128).eval()
    at_64.load_state_dict(interpolate_embeddings(64, 16, theirs.state_dict()))
    assert ours.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(ours.pos_embed, at_64.encoder.pos_embedding, rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), at_64(x), rtol=0, atol=1e-4)


FINE = ["--epochs", "2", "--batch-size", "8", "--device", "cpu", "--image-size", "32"]


def test_a_short_fine_tune_runs_end_to_end_and_its_model_reloads(colors, tmp_path, capsys,
                                                                  monkeypatch):
    stand_in(monkeypatch)
    out = tmp_path / "run"
    acc = vit.main(["--dataset", colors, "--init", "vit_b_16", "--out", str(out)] + FINE)
    said = capsys.readouterr().out
    assert "dim=32, depth=2, heads=4, mlp_dim=128" in said and "init='vit_b_16'" in said
    saved = torch.load(out / "model.pth", weights_only=True)
    assert saved["classes"] == ["blue", "red"] and saved["config"]["in_channels"] == 3
    assert saved["mean"] == pytest.approx([0.485, 0.456, 0.406])   # as the weights expect
    assert saved["state_dict"]["pos_embed"].shape == (1, 5, 32)      # 224 px -> 32 px
    assert vit.main(["--eval", str(out / "model.pth")]) == pytest.approx(acc)
    image = os.path.join(colors, "test", "red", "0.png")
    assert vit.main(["--predict", str(out / "model.pth"), image])[0] in ("blue", "red")
    vit.main(["--resume", str(out / "checkpoint.pth"), "--epochs", "3"])    # resumes as well
    assert len(read_metrics(out)) == 3
    assert torch.load(out / "model.pth", weights_only=True)["mean"] == saved["mean"]


def test_predict_with_pretrained_weights_names_imagenet_classes(colors, tmp_path, capsys,
                                                                monkeypatch):
    _, real = stand_in(monkeypatch)
    image = os.path.join(colors, "test", "red", "1.png")      # 20x18 px: read at 224 px
    labels = vit.main(["--predict", "vit_b_16", image, "--out", str(tmp_path)])
    assert len(labels) == 1 and labels[0] in real.meta["categories"]
    assert f"{image}: {labels[0]} " in capsys.readouterr().out
    assert os.path.getsize(tmp_path / "predicted.png") > 0  # the rollout on the photo


def test_a_missing_download_or_a_wrong_name_is_one_sentence(colors, tmp_path, capsys,
                                                            monkeypatch):
    import urllib.error
    stand_in(monkeypatch, fail=urllib.error.URLError("[Errno -3] Temporary failure in name "
                                                     "resolution"))
    fails_with(["--dataset", colors, "--init", "vit_b_16", "--out", str(tmp_path / "r")]
               + FINE, capsys, "could not download vit_b_16's weights", "vit_b_16-c867db91.pth",
               os.path.join(torch.hub.get_dir(), "checkpoints"))
    assert not (tmp_path / "r").exists()
    fails_with(["--predict", "vit_b_16", os.path.join(colors, "test", "red", "0.png")], capsys,
               "could not download")
    fails_with(["--dataset", colors, "--init", "vit_b_61"] + FINE, capsys, "'vit_b_61' does not "
               "exist (nor is it vit_b_16, vit_b_32, vit_l_16, vit_l_32)")


@pytest.mark.parametrize("data", ["folder", "fashionmnist"])
def test_gray_images_go_in_as_three_equal_channels(data, tmp_path, monkeypatch):
    stand_in(monkeypatch)
    if data == "folder":
        folder = make_image_folder(tmp_path / "gray")
        for f in glob_files(folder):
            Image.open(f).convert("L").save(f)
    else:
        fake_fashionmnist(monkeypatch)
        folder = "fashionmnist"
    out = tmp_path / "run"
    vit.main(["--dataset", folder, "--init", "vit_b_16", "--out", str(out)] + FINE)
    saved = torch.load(out / "model.pth", weights_only=True)
    assert saved["config"]["in_channels"] == 3 and len(read_metrics(out)) == 2


def glob_files(folder):
    return [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]


def test_init_from_our_own_model_trains_another_folder_with_a_new_head(trained_run, tmp_path,
                                                                       monkeypatch):
    _, out, _ = trained_run
    three = make_image_folder(tmp_path / "three", classes=("red", "green", "blue"), n_train=4,
                              n_test=2)
    starts = []
    real = vit.transferred

    def transferred(saved, model, cfg, classes):
        state = real(saved, model, cfg, classes)
        starts.append({k: v.detach().clone() for k, v in state.items()})
        return state
    monkeypatch.setattr(vit, "transferred", transferred)
    vit.main(["--dataset", three, "--init", os.path.join(out, "model.pth"), "--out",
              str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--device", "cpu"])
    before = torch.load(os.path.join(out, "model.pth"), weights_only=True)
    start = starts[0]
    assert start["head.weight"].shape == (3, 16) and not start["head.weight"].any()   # new, 0
    assert all(torch.equal(start[k], v) for k, v in before["state_dict"].items()
               if not k.startswith("head"))                  # the rest: the trained model's
    saved = torch.load(tmp_path / "run" / "model.pth", weights_only=True)
    assert saved["classes"] == ["blue", "green", "red"] and saved["config"]["dim"] == 16
    assert saved["mean"] == before["mean"]                   # what its weights expect


# ------------------------------------------------------------------------------------------
# vit.py: a run is never lost (run folders, full disks, Ctrl-C, moved data)
# ------------------------------------------------------------------------------------------
def file_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, f))}


def test_a_new_run_never_writes_into_a_folder_that_holds_a_run(trained_run, colors, tmp_path,
                                                               capsys):
    _, out, _ = trained_run
    before = file_bytes(out)
    fails_with(["--dataset", colors, "--out", out, "--epochs", "1"] + SMALL[2:], capsys,
               "already holds a run", "--resume " + os.path.join(out, "checkpoint.pth"))
    # a resumed run branched into a folder that holds another run: refused as well
    other = tmp_path / "other"
    vit.claim_run_folder(str(other))
    fails_with(["--resume", os.path.join(out, "checkpoint.pth"), "--epochs", "3", "--out",
                str(other)], capsys, "already holds a run")
    assert file_bytes(out) == before                           # byte for byte


def test_a_resume_into_a_folder_it_cannot_write_stops_before_training(trained_run, tmp_path,
                                                                      capsys, monkeypatch):
    _, out, _ = trained_run
    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(vit.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(vit, "train", None)                    # nothing may train
    fails_with(["--resume", os.path.join(out, "checkpoint.pth"), "--epochs", "3"], capsys,
               "cannot write in the folder", "Read-only file system")


def test_resume_with_out_branches_and_leaves_the_original_as_it_was(trained_run, tmp_path):
    _, out, metrics = trained_run
    before = file_bytes(out)
    branch = tmp_path / "branch"
    vit.main(["--resume", os.path.join(out, "checkpoint.pth"), "--epochs", "3", "--out",
              str(branch)])
    assert file_bytes(out) == before
    more = read_metrics(branch)
    assert [m["epoch"] for m in more] == [1, 2, 3] and more[:2] == metrics


def test_a_second_process_cannot_claim_a_claimed_run_folder(tmp_path):
    vit.claim_run_folder(str(tmp_path / "run"))               # as the first process does
    with pytest.raises(vit.UserError, match="already holds a run"):
        vit.claim_run_folder(str(tmp_path / "run"))


def test_runs_started_in_the_same_second_get_their_own_folders(colors, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261129-120000")
    for _ in range(2):
        vit.main(["--dataset", colors] + SMALL)
    assert sorted(os.listdir(tmp_path / "runs")) == ["colors-20261129-120000",
                                                     "colors-20261129-120000-2"]
    for run in os.listdir(tmp_path / "runs"):
        assert len(read_metrics(tmp_path / "runs" / run)) == 2


def test_an_out_folder_that_cannot_be_made_fails_before_any_data_is_read(trained_run, tmp_path,
                                                                        capsys, monkeypatch):
    folder, out, _ = trained_run
    model_pth = os.path.join(out, "model.pth")
    image = os.path.join(folder, "test", "red", "0.png")

    def no_data(*a, **k):
        raise AssertionError("data was read before the output folder was checked")
    monkeypatch.setattr(vit, "load_data", no_data)
    monkeypatch.setattr(vit, "read_image", no_data)
    (tmp_path / "file").write_text("x")
    bad = [str(tmp_path / "file"), str(tmp_path / "file" / "under")]
    if os.path.isdir("/proc/self"):
        bad.append("/proc/vit-test")
    for path in bad:
        fails_with(["--dataset", folder, "--out", path] + SMALL, capsys, "cannot", path)
        fails_with(["--eval", model_pth, "--out", path], capsys, "cannot", path)
        fails_with(["--predict", model_pth, image, "--out", path], capsys, "cannot", path)


def test_a_full_disk_is_one_sentence_and_keeps_the_last_checkpoint(colors, tmp_path, capsys,
                                                                   monkeypatch):
    real_save, calls = torch.save, []

    def disk_full_in_epoch_2(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 4:                  # epoch 2's checkpoint.pth, after its model.pth
            f.write(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "19712 vs 19600")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", disk_full_in_epoch_2)
    out = tmp_path / "run"
    err = fails_with(["--dataset", colors, "--out", str(out)] + SMALL, capsys,
                     str(out / "checkpoint.pth"), "full disk")
    assert len(err.splitlines()) == 1
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(torch, "save", real_save)

    import matplotlib.figure

    def no_space(self, f, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    err = fails_with(["--dataset", colors, "--out", str(tmp_path / "run2")] + SMALL, capsys,
                     "patches.png", "No space left on device")     # the first figure
    assert not (tmp_path / "run2").exists()           # before the first checkpoint: given back


def test_a_save_cut_by_ctrl_c_ends_as_ctrl_c_and_keeps_the_old_file(tmp_path):
    # torch.save turns a KeyboardInterrupt in one of its writes into a RuntimeError (seen in
    # CI on torch 2.3): it must still end as Ctrl-C does, not as "a full disk".
    path = tmp_path / "model.pth"
    path.write_bytes(b"the last epoch's")

    class Interrupted:                    # a file whose third write meets Ctrl-C
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return self.f.write(b)

        def flush(self):
            self.f.flush()
    with pytest.raises(KeyboardInterrupt):
        vit.write_atomically(str(path), lambda f: torch.save({"w": torch.ones(999)},
                                                             Interrupted(f)))
    assert path.read_bytes() == b"the last epoch's" and os.listdir(tmp_path) == ["model.pth"]


@POSIX
def test_ctrl_c_says_how_to_resume_and_the_resumed_run_is_exact(colors, tmp_path):
    args = ["--dataset", colors, "--epochs", "40"] + SMALL[2:]
    vit.main(args + ["--out", str(tmp_path / "full"), "--precision", "fp32"])
    full = read_metrics(tmp_path / "full")
    out = tmp_path / "stopped"
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.Popen([sys.executable, "vit.py", *args, "--out", str(out), "--precision",
                          "fp32"], cwd=here, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    t0 = time.time()
    while not (out / "checkpoint.pth").exists() and p.poll() is None and time.time() - t0 < 60:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err
    assert "Traceback" not in err
    stopped = torch.load(out / "checkpoint.pth", weights_only=True)["epoch"]
    assert err.strip() == (f"interrupted after epoch {stopped}; resume with `python vit.py "
                           f"--resume {out / 'checkpoint.pth'} --epochs 40`")
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert 1 <= stopped < 40
    vit.main(["--resume", str(out / "checkpoint.pth")])
    resumed = read_metrics(out)
    assert len(resumed) == len(full)
    for a, b in zip(resumed, full):
        assert {k: v for k, v in a.items() if k != "images_per_s"} == pytest.approx(
            {k: v for k, v in b.items() if k != "images_per_s"})


def test_ctrl_c_in_a_notebook_prints_the_line_and_returns(colors, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", sys)
    interrupt_in_epoch(2, monkeypatch)
    assert vit.main(["--dataset", colors, "--out", str(tmp_path / "run")] + SMALL) is None
    assert capsys.readouterr().err.strip().startswith("interrupted after epoch 1; resume with")


def test_a_run_resumes_after_its_data_moved(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "mydata")
    vit.main(["--dataset", "mydata", "--out", "run"] + SMALL)  # a relative path
    os.rename(tmp_path / "mydata", tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = str(tmp_path / "run" / "checkpoint.pth")
    fails_with(["--resume", ckpt, "--epochs", "3"], capsys, "mydata")     # not there any more
    other = make_image_folder(tmp_path / "other", classes=("red", "green"))
    fails_with(["--resume", ckpt, "--epochs", "3", "--dataset", other], capsys, "does not fit")
    vit.main(["--resume", ckpt, "--epochs", "3", "--dataset", "../moved"])
    assert len(read_metrics(tmp_path / "run")) == 3
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert saved["config"]["dataset"] == str(tmp_path / "moved")          # saved resolved


def test_messages_say_what_is_true(trained_run, tmp_path, capsys):
    folder, out, _ = trained_run
    fails_with(["--resume", os.path.join(out, "checkpoint.pth"), "--epochs", "1"], capsys,
               "already finished 2 epochs")
    fails_with(["--predict", os.path.join(out, "model.pth"), folder], capsys, "is a folder")


# ------------------------------------------------------------------------------------------
# The lesson: the map matches the file, and the central idea is shown
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [vit, tf])
def test_the_docstring_section_list_matches_the_banners(script):
    import re
    text = open(script.__file__, encoding="utf-8").read()
    banners = re.findall(r"^# (\d+)\. ([^:\n]+)", text, flags=re.M)
    banners = [(int(n), title.strip()) for n, title in banners]
    listed = " ".join(text[text.index("Sections"):text.index("Shape legend")].split())
    listed = sorted((int(n), t.strip()) for n, t in
                    re.findall(r"(\d+)\. (.+?)(?=[;.]? \d+\. |[;.]? Part|[;.]? *$)", listed))
    assert [n for n, _ in banners] == list(range(1, len(banners) + 1))
    assert listed == banners
    for n in re.findall(r"[Ss]ections? (\d+)", text):       # every reference names a section
        assert 1 <= int(n) <= len(banners), n


def test_the_readme_tells_the_files_as_they_are():
    # its section maps, Part I's sections and its options are the files' own
    import re
    here = os.path.dirname(os.path.abspath(__file__))
    readme = open(os.path.join(here, "README.md"), encoding="utf-8").read()
    source = open(vit.__file__, encoding="utf-8").read()
    part_one = re.findall(r"^# (\d+)\. ", source[:source.index("\n# Part II")], flags=re.M)
    assert f"**Part I, the lesson** (sections 1–{part_one[-1]}, under 600 lines)" in readme
    for script in (vit, tf):
        banners = re.findall(r"^# (\d+)\. ", open(script.__file__, encoding="utf-8").read(),
                             flags=re.M)
        mapped = readme[readme.index(f"`{script.__name__}.py`: ") if script is tf else
                        readme.index("`vit.py` has two parts"):]
        mapped = mapped[:mapped.index("\n\n")]
        assert re.findall(r"(?<![\w,–.])(\d+) (?!lines)[A-Za-z`]", mapped) == banners, mapped
    section = readme[readme.index("## Options that matter"):readme.index("## Tests")]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    rest = "\n".join(line for line in section.splitlines() if not line.startswith("|"))
    for script, text in ((vit, table), (tf, rest)):
        options = {a for action in script.build_parser()._actions for a in action.option_strings}
        assert set(re.findall(r"`(--[a-z-]+)", text)) <= options, script
    assert len(readme.splitlines()) <= 250 and "../shared" not in readme


@POSIX
def test_on_windows_the_text_is_read_as_utf8_and_what_needs_posix_is_skipped(tmp_path):
    # Windows, faked in a pytest of its own (the locale and the platform are the
    # interpreter's): an ASCII locale stands in for cp1252, which cannot read README.md's
    # UTF-8 unaided, and sys.platform is "win32", under which the POSIX tests say why they skip.
    (tmp_path / "fake_windows.py").write_text(     # once torch is in: it loads DLLs on win32
        "import sys, torch, torchvision, matplotlib.pyplot, PIL.Image\n"
        "def pytest_configure(config):\n    sys.platform = 'win32'\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0",
           "PYTHONUTF8": "0", "PYTHONPATH": os.pathsep.join(
               [str(tmp_path)] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    run = subprocess.run([sys.executable, "-X", "utf8=0", "-m", "pytest", "-q", "-rs", "-p",
                          "fake_windows", "-p", "no:cacheprovider", os.path.abspath(__file__),
                          "-k", "readme or docstring or ctrl_c_says or ctrl_c_while or "
                          "two_processes or write_that_fails"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "3 passed, 6 skipped" in run.stdout, run.stdout[-3000:]
    skipped = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("needs POSIX signals and process groups" in s for s in skipped)


def test_the_benchmark_compares_with_torchvision_in_one_run():
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "docs/benchmark.py", "--dim", "16", "--depth", "1",
                        "--heads", "2", "--mlp-dim", "32", "--batch-size", "4", "--precision",
                        "fp32", "--device", "cpu"], cwd=here, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"fp32: vit.py [\d,]+ img/s, torchvision [\d,]+ img/s: vit.py is "
                     r"[\d.]+x as fast", r.stdout), r.stdout


def test_patches_figure_reassembles_the_image_exactly(tmp_path):
    torch.manual_seed(0)
    for C, size, P in ((3, 32, 4), (1, 28, 7)):
        image = torch.randint(0, 256, (C, size, size), dtype=torch.uint8)
        tiles = vit.plot_patches(image, P, str(tmp_path / f"p{C}.png"))   # (N, C, P, P)
        side = size // P
        assert tiles.dtype == torch.uint8 and tiles.shape == (side * side, C, P, P)
        rebuilt = tiles.view(side, side, C, P, P).permute(2, 0, 3, 1, 4).reshape(C, size, size)
        assert torch.equal(rebuilt, image)                   # token n is the n-th patch, row-major
        assert os.path.getsize(tmp_path / f"p{C}.png") > 0


def test_part_one_alone_trains_a_vit_on_tensors_in_memory():
    # Everything above the Part II banner, run in a fresh namespace, as a student who stops
    # reading there would: it must train by itself (and so define every name it uses).
    source = open(vit.__file__, encoding="utf-8").read()
    part_one = source[:source.index("\n# Part II")]
    assert source.count("\n# Part II") == 1 and part_one.count("\n") < 600
    ns = {"__name__": "part_one"}
    exec(compile(part_one, "part_one", "exec"), ns)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 60, (96, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(96) % 2
    x[y == 1, :, :4] += 150                        # class 1: a bright top half
    cfg = ns["Config"](epochs=4, batch_size=16, lr=3e-3, patch_size=4, dim=16, depth=1,
                       heads=2, mlp_dim=32, crop_pad=0)
    data = ns["make_data"](x[:64], y[:64], x[64:], y[64:], ["dark", "bright"], torch.device("cpu"))
    model, metrics, preds = ns["train"](cfg, data, torch.device("cpu"))
    assert metrics[-1]["train_loss"] < 0.8 * metrics[0]["train_loss"]
    assert metrics[-1]["test_acc"] == 1.0 and preds.shape == (32,)


def test_the_shapes_of_one_batch_are_printed_and_match_forward(capsys):
    import re
    model = tiny_vit().eval()
    vit.print_shapes(model, torch.randn(3, 3, 16, 16))
    lines = capsys.readouterr().out.splitlines()[1:]
    shapes = [re.search(r"\(([\d, ]+)\)", line).group(1) for line in lines]
    assert shapes == ["3, 3, 16, 16", "3, 16, 32", "3, 17, 32", "3, 17, 32", "3, 32", "3, 5"]
    assert [line.split()[0] for line in lines] == ["images", "patch", "block", "block", "cls",
                                                   "logits"]


# ------------------------------------------------------------------------------------------
# vit.py: past one device (torchrun, 2 CPU processes on gloo) and past memory (streaming)
# ------------------------------------------------------------------------------------------
TWO = "torch.distributed unavailable in this torch build"


def torchrun(args, n=2, script="vit.py", terminal=False, timeout=300):
    # The real launcher, as a user runs it; localhost:0 picks a free port. terminal: its
    # output goes to a terminal (a pseudo-terminal here), where progress lines are rewritten.
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
               "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", script, *args]
    if not terminal:                        # a hang: all its processes stopped, then failed
        p = subprocess.Popen(command, cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
            return subprocess.CompletedProcess(command, p.returncode, out, err)
        except subprocess.TimeoutExpired:   # torchrun stops its workers (their own sessions)
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"torchrun hung for {timeout} s: {' '.join(args)}") from None
    import pty
    import select
    screen, end = pty.openpty()
    p = subprocess.Popen(command, cwd=here, stdout=end, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    os.close(end)
    shown, deadline = b"", time.time() + timeout
    with contextlib.suppress(OSError):                        # EIO: the other end closed
        while time.time() < deadline:
            if select.select([screen], [], [], 1)[0]:
                chunk = os.read(screen, 4096)
                if not chunk:
                    break
                shown += chunk
    os.close(screen)
    if p.poll() is None and time.time() >= deadline:          # hung: stop all its processes
        os.killpg(p.pid, signal.SIGKILL)
    err = p.communicate(timeout=60)[1]
    out = shown.decode().replace("\r\n", "\n")
    return subprocess.CompletedProcess(command, p.returncode, out, err)


def same_metrics(a, b, rel):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "images_per_s"} == pytest.approx(
            {k: v for k, v in y.items() if k != "images_per_s"}, rel=rel, abs=0)


def vit_changed(tmp_path, name, change):
    # vit.py with `change` (lines run after `import os, vit`) in every process: a wrapper
    # script, since torchrun's processes cannot be monkeypatched from here
    wrapper = tmp_path / name
    wrapper.write_text(f"import os, sys\nsys.path.insert(0, "
                       f"{os.path.dirname(os.path.abspath(vit.__file__))!r})\nimport vit\n"
                       f"{change}vit.main()\n")
    return str(wrapper)


def crashing(at_evaluation, tmp_path):
    # vit.py, made to crash during the given evaluation, on every process
    return vit_changed(tmp_path, "crashing.py", (
        "real, calls = vit.evaluate, []\n"
        "def evaluate(*a, **k):\n"
        "    calls.append(1)\n"
        f"    if len(calls) == {at_evaluation}:\n"
        "        raise KeyboardInterrupt\n"
        "    return real(*a, **k)\n"
        "vit.evaluate = evaluate\n"))


@pytest.fixture(scope="module")
def thirteen(tmp_path_factory):
    # 26 training images: 2 batches of 10 split 5 + 5 over two processes, 8 batches of 3
    # split 2 + 1 (the last, partial batch is dropped)
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "colors", n_train=13, n_test=7)


def ddp_args(folder, batch):
    return ["--dataset", folder, "--epochs", "3", "--precision", "fp32", "--batch-size",
            batch] + SMALL[4:]


@pytest.fixture(scope="module")
def two_process_run(thirteen, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "two"
    run = torchrun(ddp_args(thirteen, "10") + ["--out", str(out)])
    assert run.returncode == 0, run.stderr
    return run, out


@POSIX
@pytest.mark.skipif(not torch.distributed.is_available(), reason=TWO)
@pytest.mark.parametrize("batch, data", [("10", "auto"), ("3", "stream")])
def test_two_processes_train_as_one_with_the_same_global_batch(batch, data, thirteen,
                                                               two_process_run, tmp_path):
    # Streamed, each process reads only its own share of each batch from disk.
    vit.main(ddp_args(thirteen, batch) + ["--out", str(tmp_path / "one")])
    if data == "auto":
        two, out = two_process_run
    else:       # rank 1 sees too little free memory (another job on its GPU): deciding alone,
        # it streamed and waited in sums that rank 0 never joined, a hang until NCCL's
        # timeout; together, both stream. Rank 0 writes to a terminal.
        out = tmp_path / "two"
        unequal = vit_changed(tmp_path, "unequal.py", "vit.free_memory = lambda device: "
                              "10 ** 12 if os.environ['RANK'] == '0' else 1000\n")
        two = torchrun(ddp_args(thirteen, batch) + ["--out", str(out)], script=unequal,
                       terminal=True, timeout=60)
        assert two.returncode == 0, two.stderr
        assert "streamed from disk (--data auto)" in two.stdout
    # the same numbers, up to the order in which the sums were added
    same_metrics(read_metrics(out), read_metrics(tmp_path / "one"), rel=1e-5)
    lines = [line.strip() for line in two.stdout.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line]
    assert len(lines) == len(set(lines)) and "Traceback" not in two.stderr   # printed once
    assert sum(line.startswith("epoch ") and "/3 |" in line for line in lines) == 3
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "one"))   # one set
    assert not os.path.exists(os.path.join(os.path.dirname(vit.__file__), "runs", "colors"))


@POSIX
@pytest.mark.skipif(not torch.distributed.is_available(), reason=TWO)
def test_two_processes_crash_and_resume_as_if_never_stopped(thirteen, two_process_run,
                                                            tmp_path):
    out = tmp_path / "crashed"
    crashed = torchrun(ddp_args(thirteen, "10") + ["--out", str(out)],
                       script=crashing(2, tmp_path))
    assert crashed.returncode != 0
    ours = [line for line in crashed.stderr.splitlines() if "interrupted" in line]
    assert ours == [f"interrupted after epoch 1; resume with `torchrun --nproc-per-node=2 "
                    f"vit.py --resume {out / 'checkpoint.pth'} --epochs 3`"], crashed.stderr
    resumed = torchrun(["--resume", str(out / "checkpoint.pth")])
    assert resumed.returncode == 0, resumed.stderr
    same_metrics(read_metrics(out), read_metrics(two_process_run[1]), rel=1e-12)


@POSIX
@pytest.mark.skipif(not torch.distributed.is_available(), reason=TWO)
def test_a_write_that_fails_on_rank_0_stops_every_process_with_one_sentence(colors, tmp_path):
    # curves.png cannot be written (a folder holds its name): rank 0 fails after training,
    # while rank 1 would wait for it; both must stop, and the sentence be printed once.
    out = tmp_path / "run"
    os.makedirs(out / "curves.png")
    args = ["--dataset", colors, "--epochs", "1", "--out", str(out)] + SMALL[2:]
    run = torchrun(args)
    assert run.returncode != 0
    ours = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "could not write" in ours[0] and "curves.png" in ours[0], run.stderr
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1   # kept


@POSIX
@pytest.mark.skipif(not torch.distributed.is_available(), reason=TWO)
def test_a_failure_on_another_rank_stops_every_process(colors, tmp_path):
    # Rank 1 alone cannot read the data (as on a second machine without it): it stops, and
    # torchrun then stops rank 0 and reports it; no process may wait for the other (a hang
    # would run into torchrun()'s timeout).
    wrapper = vit_changed(tmp_path, "rank1_fails.py", (
        "def unreadable(*a):\n"
        "    raise vit.UserError('cannot read the image folder here')\n"
        "if os.environ['RANK'] == '1':\n"
        "    vit.load_image_folder = unreadable\n"))
    run = torchrun(["--dataset", colors, "--out", str(tmp_path / "run")] + SMALL[2:],
                   script=wrapper)
    assert run.returncode != 0
    assert "local_rank: 1" in run.stderr and "exitcode: 1" in run.stderr, run.stderr
    assert "UserError" not in run.stderr and "TypeError" not in run.stderr   # ours, caught
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pth")


@pytest.mark.parametrize("env, flags, words", [
    ({"mps": True}, ["--device", "mps"], ["torchrun cannot use Apple's MPS"]),
    ({"gpus": 1}, ["--device", "cuda"], ["started 2 processes on a machine with 1 GPU",
                                          "--nproc-per-node=1"]),
    ({}, ["--device", "cpu"], ["WORLD_SIZE is 2, but the other processes cannot be reached",
                               "start vit.py with torchrun"]),
])
def test_what_torchrun_cannot_do_is_one_sentence(env, flags, words, colors, monkeypatch, capsys):
    # torchrun's environment, faked (without its rendezvous address, as when WORLD_SIZE is
    # set by something else): refused before any process group is made
    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: env.get("mps", False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: "gpus" in env)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: env.get("gpus", 0))
    fails_with(["--dataset", colors] + SMALL[:-2] + flags, capsys, *words)
    assert not torch.distributed.is_initialized()


def test_a_streamed_run_gives_exactly_the_numbers_of_an_in_memory_run(colors, tmp_path,
                                                                     capsys):
    args = ["--dataset", colors, "--epochs", "2", "--precision", "fp32"] + SMALL[2:]
    vit.main(args + ["--out", str(tmp_path / "memory")])
    assert "kept on the device (--data auto)" in capsys.readouterr().out
    vit.main(args + ["--out", str(tmp_path / "stream"), "--data", "stream"])
    assert "streamed from disk (--data stream)" in capsys.readouterr().out
    same_metrics(read_metrics(tmp_path / "stream"), read_metrics(tmp_path / "memory"), rel=0)
    a, b = (torch.load(tmp_path / run / "model.pth", weights_only=True)
            for run in ("memory", "stream"))
    assert a["mean"] == b["mean"] and a["std"] == b["std"]          # integer sums: exact
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # and --eval streams too, with the same accuracy
    acc = vit.main(["--eval", str(tmp_path / "stream" / "model.pth"), "--data", "stream"])
    assert acc == read_metrics(tmp_path / "stream")[-1]["test_acc"]


@POSIX
def test_ctrl_c_while_streaming_is_one_sentence(colors, tmp_path):
    # Ctrl-C reaches the whole process group; while the reader's threads decode the next
    # batch, the run must still end in the one sentence.
    here = os.path.dirname(os.path.abspath(__file__))
    for delay in (0.4,):
        out = tmp_path / f"run{delay}"
        p = subprocess.Popen([sys.executable, "vit.py", "--dataset", colors, "--epochs", "300",
                              "--data", "stream", "--out", str(out)] + SMALL[2:], cwd=here,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        t0 = time.time()
        while not (out / "checkpoint.pth").exists() and time.time() - t0 < 60:
            time.sleep(0.01)
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGINT)
        err = p.communicate(timeout=60)[1]
        assert p.returncode == 130, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("interrupted after"), err


def test_a_folder_too_big_for_memory_is_streamed(colors, tmp_path, capsys,
                                                            monkeypatch):
    # 36 RGB images of 16x16 are 27,648 bytes; with 40,000 bytes free, they take more than
    # half: auto streams them; with 60,000 they are kept.
    monkeypatch.setattr(vit, "free_memory", lambda device: 40_000)
    args = ["--dataset", colors, "--epochs", "1"] + SMALL[2:]
    vit.main(args + ["--out", str(tmp_path / "auto")])
    assert "streamed from disk (--data auto)" in capsys.readouterr().out
    monkeypatch.setattr(vit, "free_memory", lambda device: 60_000)
    vit.main(args + ["--out", str(tmp_path / "fits")])
    assert "kept on the device (--data auto)" in capsys.readouterr().out


def fake_fashionmnist(monkeypatch, n_train=24, n_test=12):
    # FashionMNIST's files, faked (no download here): gray 28x28 images of two classes, light
    # or dark
    class Fake:
        def __init__(self, root, train, download):
            n = n_train if train else n_test
            self.targets = torch.arange(n) % 2
            self.data = (self.targets * 160 + 40).to(torch.uint8).view(n, 1, 1).expand(
                n, 28, 28).contiguous() + torch.randint(0, 30, (n, 28, 28), dtype=torch.uint8)
            self.classes = ["dark", "light"]
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Fake)


def test_a_torchvision_data_set_stays_small_and_each_batch_is_upsampled(tmp_path,
                                                                       monkeypatch):
    # --image-size 56 on 28 px FashionMNIST: the data stays at 28 px (a 224 px CIFAR-10 would
    # be 9 GB), and each batch is resized on the device, after augmentation
    fake_fashionmnist(monkeypatch)
    real, seen = vit.train, []

    def train(cfg, data, device, hooks=vit.Hooks()):
        seen.append(data)
        return real(cfg, data, device, hooks)
    monkeypatch.setattr(vit, "train", train)
    vit.main(["--dataset", "fashionmnist", "--image-size", "56", "--patch-size", "14",
              "--out", str(tmp_path / "run")] + SMALL[:12] + SMALL[14:])
    data = seen[0]
    assert isinstance(data, vit.Upsampled) and data.train_x.shape[-1] == 28
    x = data.train_x[:4]
    torch.testing.assert_close(data.normalize(x), torch.nn.functional.interpolate(
        (x.float() / 255 - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1), size=56,
        mode="bilinear"))
    saved = torch.load(tmp_path / "run" / "model.pth", weights_only=True)
    assert saved["config"]["image_size"] == 56 and saved["state_dict"]["pos_embed"].shape[1] == 17



# ------------------------------------------------------------------------------------------
# Exercises (docs/exercises.py makes a student copy): the tests named test_exNN_ grade
# exercise NN; each fails, naming its exercise, until that body is written
# ------------------------------------------------------------------------------------------
def exercise_tests():
    # {N: exercise N's tests}, from their names
    tests = {}
    for name, test in globals().items():
        if re.match(r"test_ex\d\d_", name):
            tests.setdefault(int(name[7:9]), []).append(test)
    return tests


def load_exercises():
    # docs/exercises.py, the generator of a student copy, as a module
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("exercises", f"{here}/docs/exercises.py")
    exercises = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exercises)
    return here, exercises


def test_a_student_copy_fails_each_exercise_until_its_body_is_written(tmp_path, monkeypatch,
                                                                       capsys):
    import types
    here, exercises = load_exercises()
    tests, n_exercises, copy = exercise_tests(), len(exercises.EXERCISES), tmp_path / "copy"
    assert sorted(tests) == list(range(1, n_exercises + 1))
    with open(f"{here}/README.md", encoding="utf-8") as f:
        assert f"a student copy, with {n_exercises} exercises" in f.read()
    exercises.main([str(copy)])                               # the teacher's command
    with pytest.raises(SystemExit, match="already holds transformer.py, vit.py, test_vit.py"):
        exercises.main([str(copy)])                           # a student's work is kept
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "EXERCISES.md").write_text("my notes")
    with pytest.raises(SystemExit, match="already holds EXERCISES.md"):
        exercises.main([str(tmp_path / "mine")])              # any of the four
    assert os.listdir(tmp_path / "mine") == ["EXERCISES.md"]
    (tmp_path / "a file").write_text("")
    with pytest.raises(SystemExit, match="cannot write the copy in"):
        exercises.main([str(tmp_path / "a file")])
    assert sorted(os.listdir(copy)) == ["EXERCISES.md", "test_vit.py", "transformer.py",
                                        "vit.py"]
    for n in range(1, n_exercises + 2):         # exercises 1..n-1 written, n.. still blank
        for name, alias in (("transformer", "tf"), ("vit", "vit")):
            with open(f"{here}/{name}.py", encoding="utf-8") as f:
                text = exercises.blank(f.read(), name, set(range(n, n_exercises + 1)))
            if n == 1:                                        # the copy as it was made
                assert text == (copy / f"{name}.py").read_text(encoding="utf-8")
            module = types.ModuleType(name)
            module.__file__ = str(copy / f"{name}.py")
            monkeypatch.setitem(sys.modules, name, module)    # (dataclasses look it up)
            exec(compile(text, module.__file__, "exec"), module.__dict__)
            monkeypatch.setitem(globals(), alias, module)     # what the tests call
        if n == 1:                                            # it imports; --help works
            for script in (tf, vit):
                with pytest.raises(SystemExit) as e:
                    script.main(["--help"])
                assert e.value.code == 0 and "usage:" in capsys.readouterr().out
        for test in tests.get(n - 1, []):                     # the one just written: passes
            test()
        for m in range(n, n_exercises + 1):                   # the blank ones fail, the
            for test in tests[m]:                             # next one naming itself
                naming = f"exercise {n}: " if m == n else None
                with pytest.raises(NotImplementedError, match=naming):
                    test()


def test_python_test_vit_py_scores_a_student_copy(tmp_path):
    # the student's one command: a line for each exercise, passed or failed, and the score;
    # Ctrl-C (here: in exercise 14's body) leaves the rest not finished, and exits 130
    here, exercises = load_exercises()
    exercises.main([str(tmp_path)])
    n = len(exercises.EXERCISES)
    with open(f"{here}/transformer.py", encoding="utf-8") as f:  # exercises 1 and 2 written
        (tmp_path / "transformer.py").write_text(
            exercises.blank(f.read(), "transformer", set(range(3, n + 1))), encoding="utf-8")
    copy = (tmp_path / "vit.py").read_text(encoding="utf-8")
    (tmp_path / "vit.py").write_text(copy.replace(
        'raise NotImplementedError("exercise 14', 'raise KeyboardInterrupt("exercise 14'),
        encoding="utf-8")
    run = subprocess.run([sys.executable, "test_vit.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert run.returncode == 130 and lines[-1] == f"score: 2 of {n} exercises", run.stdout
    assert lines[-n - 1:-1] == [f"exercise {k:2d}: " + ("passed" if k < 3 else "failed" if
                                k < 14 else "not finished (interrupted)") for k in range(1, n + 1)]
    assert "NotImplementedError: exercise 3: scaled dot-product attention" in run.stdout


if __name__ == "__main__":
    # python test_vit.py: a student copy graded, a line for each exercise (EXERCISES.md)
    class Score:
        def __init__(self):
            self.passed, self.exercises = {}, []  # exercise -> all its tests passed so far

        def pytest_collection_modifyitems(self, items):
            items[:] = sorted((item for item in items if re.match(r"test_ex\d\d_", item.name)),
                              key=lambda item: item.name[7:9])      # in the exercises' order
            self.exercises = sorted({int(item.name[7:9]) for item in items})

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or not report.passed:
                n = int(report.nodeid.split("::")[-1][7:9])
                self.passed[n] = self.passed.get(n, True) and report.passed
    score = Score()
    status = pytest.main([__file__, "-q", "--tb=line", "-rN", "-p", "no:cacheprovider"]
                         + sys.argv[1:], plugins=[score])
    for n in score.exercises:
        print(f"exercise {n:2d}: " + {True: "passed", False: "failed"}.get(
            score.passed.get(n), "not finished (interrupted)"))
    print(f"score: {sum(score.passed.values())} of {len(score.exercises)} exercises")
    sys.exit(130 if status == pytest.ExitCode.INTERRUPTED else
             0 if status == pytest.ExitCode.OK else 1)
