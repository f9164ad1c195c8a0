"""
docs/benchmark.py: vit.py's ViT against torchvision's VisionTransformer, same size, same
precision, same run. Machines are noisy, so it reports a ratio measured in one run: training
steps (forward, backward, AdamW, vit.py's precision policy) of both models alternate in
rounds on the same random batch, and each model's median step time is kept.

  python docs/benchmark.py --preset cpu             # any of vit.py's model and precision options
  python docs/benchmark.py --preset cpu --attn fused
  python docs/benchmark.py --batch-size 64          # the default (CIFAR-10) model
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import vit  # noqa: E402


def time_train_steps(model, images, labels, precision, steps):
    device = images.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        with vit.autocast(precision, device):
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
    # CIFAR-sized RGB images unless --image-size says otherwise: the largest multiple of the
    # patch size up to 32 (28 for 7x7 patches). torchvision's model takes 3 channels.
    size = cfg.image_size or cfg.patch_size * max(1, 32 // cfg.patch_size)
    torch.manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, 10, (cfg.batch_size,), device=device)
    cfg.image_size = size
    ours = vit.build_model(cfg, 3, 10, device).to(device)
    theirs = torchvision.models.VisionTransformer(size, cfg.patch_size, cfg.depth, cfg.heads,
                                                  cfg.dim, cfg.mlp_dim, num_classes=10)
    theirs.to(device)
    chosen, why = vit.precision_policy(cfg.precision, device)
    print(f"benchmark on {device}: ViT {size}px, patch {cfg.patch_size}, dim {cfg.dim}, depth "
          f"{cfg.depth}, heads {cfg.heads}, mlp {cfg.mlp_dim}, batch {cfg.batch_size}; "
          f"attention {'fused' if vit.use_fused_attn(cfg, device) else 'hand-written'}; "
          f"precision {chosen} ({why}); torch {torch.__version__}")
    for precision in ["fp32", chosen] if chosen != "fp32" else ["fp32"]:
        times = {"vit.py": [], "torchvision": []}
        for _ in range(rounds):
            for label, model in (("vit.py", ours), ("torchvision", theirs)):
                times[label].append(time_train_steps(model, images, labels, precision, steps))
        ours_t, theirs_t = (sorted(t)[len(t) // 2] for t in times.values())
        print(f"{precision}: vit.py {cfg.batch_size / ours_t:,.0f} img/s, torchvision "
              f"{cfg.batch_size / theirs_t:,.0f} img/s: vit.py is {theirs_t / ours_t:.2f}x "
              f"as fast (median of {rounds} rounds of {steps} training steps)")


if __name__ == "__main__":
    args = vit.build_parser().parse_args()
    benchmark(vit.resolve_config(args), vit.start_processes(args.device))
