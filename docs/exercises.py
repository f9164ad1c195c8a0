"""
A student copy of the lesson, with exercises: python docs/exercises.py OUT

OUT gets transformer.py and vit.py with the bodies of the lesson's key pieces replaced by
`raise NotImplementedError("exercise N: ...")`; the comments inside a body stay, as hints, and
so do the section banners, signatures, shape legends and all of vit.py's Part II. It also gets
the test file and EXERCISES.md (what each exercise computes, the command that checks it).
Then, in OUT:  pytest test_vit.py -k ex03  (one exercise's tests: that exercise and the ones
before it), and  python test_vit.py  (a score per exercise). The solution: the files here.
"""
import ast
import io
import os
import shutil
import sys
import tokenize

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository

# In reading order: (title, what the bodies must compute, the functions whose bodies go).
EXERCISES = [
    ("positional encoding", "__init__: nn.Module's own, self.dropout, and the table "
     "PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...) of section 1 as the "
     "buffer self.pe (max_len, D), not a parameter; forward adds its first T rows, then "
     "dropout", ["transformer.PositionalEncoding.__init__",
                 "transformer.PositionalEncoding.forward"]),
    ("masks", "True = may attend: causal (T, T) lower triangular; padding (B, 1, 1, T), "
     "False at PAD keys", ["transformer.causal_mask", "transformer.padding_mask"]),
    ("scaled dot-product attention", "softmax(q k^T / sqrt(d_k)) v; masked scores filled "
     "with the most negative float, masked weights then exactly 0; `dropout` (a module, or "
     "None) on the weights; returns (output, the weights used)",
     ["transformer.scaled_dot_product_attention"]),
    ("multi-head attention", "split_heads: (B, T, D) -> (B, h, T, d_h); forward: W_q, W_k, "
     "W_v, attention in every head at once (self.dropout on the weights), the weights kept in "
     "self.attn_weights, detached (the figures read them), heads concatenated, W_o",
     ["transformer.MultiHeadAttention.split_heads", "transformer.MultiHeadAttention.forward"]),
    ("feed-forward network", "linear2(dropout(relu(linear1(x)))), on every position",
     ["transformer.FeedForward.forward"]),
    ("encoder layer", "post-norm: x = norm1(x + dropout(self-attention)), then the same "
     "with the FFN and norm2", ["transformer.EncoderLayer.forward"]),
    ("decoder layer", "post-norm: masked self-attention, cross-attention to the memory, "
     "FFN; each through dropout, added to x and normalised", ["transformer.DecoderLayer.forward"]),
    ("patchify", "(B, C, H, W) -> (B, N, C*P*P) by reshape and permute, patches in rows, "
     "each flattened as (C, P, P), as the Conv2d's weight is", ["vit.patchify"]),
    ("the ViT's attention", "q, k, v from one Linear(D, 3D) in h heads; the hand-written "
     "path softmax(q k^T / sqrt(d_h)) v (a float32 softmax, attn_drop on the weights, which "
     "are kept in self.attn_weights), or F.scaled_dot_product_attention when self.fused "
     "(dropout_p: attn_drop's p while training, else 0); heads concatenated, proj, "
     "proj_drop", ["vit.Attention.forward"]),
    ("the pre-norm block", "MLP: dropout after the GELU of fc1 and after fc2; Block: "
     "x + attn(norm1(x)), then x + mlp(norm2(x))", ["vit.MLP.forward", "vit.Block.forward"]),
    ("the ViT's forward", "patch tokens, the CLS token in front, the position embedding "
     "added (then pos_drop), the blocks, the final norm, the CLS token (or the patches' mean, "
     "pool=\"mean\"), the head",
     ["vit.ViT.forward"]),
    ("augmentation", "from the copy zero-padded by `pad` on every side, the window whose "
     "top-left corner is `shift` (rows, columns), as one gather; then a horizontal flip "
     "where `mirror`", ["vit.augment"]),
    ("warmup + cosine", "the learning rate of step `step`: warmup = max(1, round(cfg.warmup "
     "* total)) steps rising linearly from 0.1% of cfg.lr, reaching cfg.lr at step warmup; "
     "then half a cosine that would reach 0 at step total", ["vit.lr_at"]),
    ("one training step", "set the learning rate; forward under autocast and the "
     "label-smoothed loss; zero the gradients; backward of loss * weight through the scaler; "
     "unscale, clip, step, update; return (logits, loss), the loss unweighted", ["vit.train_step"]),
    ("one epoch", "the epoch's plan (epoch_plan): batch s holds positions s*bs..s*bs+bs-1 of "
     "`order`, and `shift` and `mirror` are indexed by position too; each batch augmented, "
     "normalised and stepped at lr_at(step since the run began, cfg.epochs * steps); returns "
     "the mean loss, the accuracy and images a second. hooks.share, .world (train_step's "
     "weight: len(y) * world / bs) and .sum change nothing on one device; Progress prints "
     "the progress line",
     ["vit.train_one_epoch"]),
]


def functions(tree, prefix):
    # {"vit.Attention.forward": its ast node, ...} for every function and class
    found = {}
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[f"{prefix}.{node.name}"] = node
            found.update(functions(node, f"{prefix}.{node.name}"))
    return found


def blank(source, module, numbers):
    # `source` (module "vit" or "transformer") with the bodies of the exercises numbered in
    # `numbers` replaced by a raise; a body's comments are kept, each on a line of its own
    # (a shape after a line of code too: the shapes are the hints).
    lines = source.splitlines(keepends=True)
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(
        io.StringIO(source).readline) if t.type == tokenize.COMMENT}      # line -> "# ..."
    found = functions(ast.parse(source), module)
    cuts = []
    for n, (title, _, names) in enumerate(EXERCISES, 1):
        for name in names:
            if n in numbers and name.startswith(module + "."):
                if name not in found:
                    raise SystemExit(f"error: {name} (exercise {n}) is not in {module}.py.")
                cuts.append((found[name], n, title))
    for node, n, title in sorted(cuts, key=lambda c: -c[0].lineno):     # from the bottom up
        first = node.body[0].lineno - 1                                 # 0-based
        while lines[first - 1].strip().startswith("#"):                 # comments above it
            first -= 1
        code = lines[node.body[0].lineno - 1]
        indent = code[:len(code) - len(code.lstrip())]
        kept = [f"{indent}{comments[i]}\n" for i in range(first + 1, node.end_lineno + 1)
                if i in comments]
        lines[first:node.end_lineno] = kept + [
            f'{indent}raise NotImplementedError("exercise {n}: {title} (EXERCISES.md)")\n']
    return "".join(lines)


def exercises_md():
    rows = "\n".join(f"| {n} | {title}: {what} | `{'`, `'.join(names)}` | "
                     f"`pytest test_vit.py -k ex{n:02d}` |"
                     for n, (title, what, names) in enumerate(EXERCISES, 1))
    return f"""# Exercises

Each `raise NotImplementedError("exercise N: ...")` in transformer.py and vit.py is a body
for you to write, in this order. The section banner above it, the comments left inside it
and the shape legend say what to compute. Check one exercise (its tests need it and the
ones before it) with its command; all of them, with a score:

    python test_vit.py

| # | What to compute | Where | Check |
|---|---|---|---|
{rows}

When all pass, train for real: `python transformer.py`, `python vit.py --preset cpu`.
"""


def main(argv):
    if len(argv) != 1 or not argv[0] or argv[0].startswith("-"):
        raise SystemExit("usage: python docs/exercises.py OUT  (a folder for the student copy)")
    out = argv[0]
    held = [f for f in ("transformer.py", "vit.py", "test_vit.py", "EXERCISES.md")
            if os.path.exists(os.path.join(out, f))]
    if held:
        raise SystemExit(f"error: {out!r} already holds {', '.join(held)}; that work is kept. "
                         f"Choose a new folder.")
    every = set(range(1, len(EXERCISES) + 1))
    try:
        os.makedirs(out, exist_ok=True)
        for module in ("transformer", "vit"):
            with open(os.path.join(HERE, f"{module}.py"), encoding="utf-8") as f:
                text = blank(f.read(), module, every)
            with open(os.path.join(out, f"{module}.py"), "w", encoding="utf-8") as f:
                f.write(text)
        shutil.copyfile(os.path.join(HERE, "test_vit.py"), os.path.join(out, "test_vit.py"))
        with open(os.path.join(out, "EXERCISES.md"), "w", encoding="utf-8") as f:
            f.write(exercises_md())
    except OSError as e:
        raise SystemExit(f"error: cannot write the copy in {out!r} ({e.strerror or e}).")
    print(f"{len(EXERCISES)} exercises in {out}: read {os.path.join(out, 'EXERCISES.md')}")


if __name__ == "__main__":
    main(sys.argv[1:])
