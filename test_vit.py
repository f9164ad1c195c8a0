"""Tests for transformer.py and vit.py: CPU only, offline, seeded, about a minute on two cores.

Each test compares against an independent reference where one exists: PyTorch's own modules
with copied weights, the paper's formulas, or a second code path in the same file.
"""
import math

import pytest
import torch
import torch.nn as nn

import transformer as tf

torch.set_num_threads(2)


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


def lengths_to_tokens(lengths, T):
    # (B, T) token ids with 5 for real tokens and PAD (0) after each length
    return torch.stack([torch.tensor([5] * n + [tf.PAD] * (T - n)) for n in lengths])


@pytest.mark.parametrize("n_heads", [1, 4])
@pytest.mark.parametrize("case", ["none", "causal", "padding", "causal+padding", "cross"])
def test_multi_head_attention_matches_pytorch(n_heads, case):
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


def test_attention_scale_is_one_over_sqrt_dk():
    # softmax(q k^T / sqrt(d_k)) v computed by hand for one query and two keys
    q = torch.tensor([[[[1.0, 2.0, 0.0, 1.0]]]])                # (1, 1, 1, 4)
    k = torch.tensor([[[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]]])
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out, w = tf.scaled_dot_product_attention(q, k, v)
    s1, s2 = 1.0 / 2.0, 3.0 / 2.0                               # dot products / sqrt(4)
    p1 = math.exp(s1) / (math.exp(s1) + math.exp(s2))
    torch.testing.assert_close(w[0, 0, 0], torch.tensor([p1, 1 - p1]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([p1, 1 - p1]))


def test_attention_rows_sum_to_one_and_masked_weights_are_exactly_zero():
    torch.manual_seed(0)
    mha = tf.MultiHeadAttention(16, 2)
    x = torch.randn(2, 5, 16) * 10                              # large scores stress softmax
    mask = tf.causal_mask(5) & tf.padding_mask(lengths_to_tokens([5, 3], 5), tf.PAD)
    mha(x, x, x, mask)
    w = mha.attn_weights                                        # (B, H, T, T)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 5))
    assert torch.all(w.masked_select(~mask.expand_as(w)) == 0)


def test_fully_masked_query_row_gives_zero_weights_not_nan():
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


def test_encoder_layer_matches_pytorch():
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


def test_decoder_layer_matches_pytorch():
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
def test_positional_encoding_matches_formula_and_is_a_buffer():
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


def test_causal_mask():
    m = tf.causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            assert m[i, j].item() == (j <= i)


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


def test_transformer_script_options_are_validated():
    with pytest.raises(SystemExit) as e:
        tf.parse_args(["--steps", "0"])
    assert e.value.code != 0
