"""
Pictures: a distilled student at 1..K steps next to its teacher, same prompts, same seeds.

    python sample.py --ckpt runs/tiny/ckpt.pt                    # prompts: 8 of the teacher's defaults
    python sample.py --ckpt runs/tiny/ckpt.pt --prompts my.txt --steps 1 2 4 --teacher_steps 32
    python sample.py --teacher tiny --teacher_steps 4 8 32        # teacher only, no checkpoint

Writes one PNG grid: a column per prompt, a row per sampler (student k=1..K, then the teacher at
each requested step count), and prints the row labels. The student runs the SiD-DiT K-step
sampler of sid.generate; the teacher runs Euler on its own flow shift and CFG scale (from the
teacher's scheduler config for real teachers; `Teacher.sampling`), which is how the teacher's
pipeline samples (SANA's default solver is DPM-Solver++; Euler at 20-50 steps is close).
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

import sid
from model import build_model, config_from_dict
from teacher_loaders import load_teacher, read_prompts


def shifted_sigmas(steps, shift):
    """Euler grid sigma_i = s u / (1 + (s - 1) u), u = 1 - i/N: SD3/SANA's resolution shift, s = 1 is linear."""
    u = torch.linspace(1, 0, steps + 1)
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def teacher_sample(net, z, cond, uncond, steps, guidance, shift=1.0):
    """Euler on dx/dt = v from t = 1 (x = z) to t = 0 with classifier-free guidance; returns x0."""
    x, sig = z, shifted_sigmas(steps, shift).tolist()
    for s, s_next in zip(sig[:-1], sig[1:]):
        t = torch.full((z.shape[0],), s, device=z.device)
        x = x + (s_next - s) * sid.cfg_velocity(net, x, t, cond, uncond, guidance)
    return x


@torch.no_grad()
def pipeline_sample(teacher, prompts, z, steps, guidance):
    """x0 from z as the teacher's pipeline samples: Euler on its flow shift with CFG against ""."""
    cond = teacher.encode_prompts(list(prompts))
    uncond = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in teacher.encode_prompts([""]).items()}
    shift = float(teacher.scheduler.get("flow_shift") or teacher.scheduler.get("shift") or 1.0)
    return teacher_sample(teacher.transformer, z, cond, uncond, steps, guidance, shift)


@torch.no_grad()
def student_sample(G, z, cond, k, K, t_init=1.0, noise="fresh", seed=0):
    """x0 after k steps of the K-step SiD-DiT sampler, with seeded fresh noise."""
    g = torch.Generator().manual_seed(seed)
    return sid.generate(G, z, cond, k, K, t_init, noise,
                        randn=lambda like: torch.randn(like.shape, generator=g).to(like))


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows, path, scale=1):
    """Write a grid PNG atomically; rows is a list of (B, 3, H, W) image batches in [-1, 1], one row each."""
    arr = np.concatenate([np.concatenate(list(to_uint8(r)), axis=1) for r in rows], axis=0)
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def load_student(ckpt_path, device="cpu", ema=True):
    """(generator module, checkpoint args) from a train.py checkpoint: its EMA weights if it has them
    (train.py --ema_halflife_kimg > 0) and ema is True, else the raw generator."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist; pass the ckpt.pt that train.py wrote")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        G = build_model(config_from_dict(ckpt["config"]))
        G.load_state_dict(ckpt["ema"] if ema and "ema" in ckpt else ckpt["generator"])
    except Exception as e:
        raise ValueError(f"checkpoint {ckpt_path} is corrupt or not a train.py checkpoint "
                         f"({type(e).__name__}: {str(e)[:200]}); use another checkpoint") from None
    return G.to(device).eval(), ckpt["args"]


def main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    G, ck = (load_student(args.ckpt, device, ema=not args.raw) if args.ckpt else (None, {}))
    teacher = load_teacher(args.teacher or ck.get("teacher", "tiny"), device)
    prompts = read_prompts(args.prompts) if args.prompts else teacher.default_prompts[::max(1, len(
        teacher.default_prompts) // args.n)][:args.n]
    C, h, w = teacher.latent_shape(args.resolution or ck.get("resolution"))
    z = torch.randn((len(prompts), C, h, w), generator=torch.Generator().manual_seed(args.seed)).to(device)
    cond = teacher.encode_prompts(prompts)
    uncond = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in teacher.encode_prompts([""]).items()}
    K = ck.get("num_steps", 4)
    rows, labels = [], []
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16):
        if G is not None:
            for k in args.steps:
                rows.append(teacher.decode(student_sample(G, z, cond, k, K, ck.get("t_init", 1.0),
                                                          ck.get("noise", "fresh"), args.seed)))
                labels.append(f"student {k} step{'s' * (k > 1)}")
        for n in args.teacher_steps:
            rows.append(teacher.decode(teacher.sample(prompts, z, n, args.guidance)))
            labels.append(f"teacher {n} steps, cfg {args.guidance or teacher.guidance}")
    save_grid(rows, args.out, scale=args.scale)
    print(f"wrote {args.out}: {len(prompts)} columns ({', '.join(prompts[:3])}...), rows:")
    for i, lab in enumerate(labels):
        print(f"  row {i}: {lab}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="sample a distilled student and its teacher side by side")
    p.add_argument("--ckpt", default=None, help="train.py checkpoint (ckpt.pt); omit to sample the teacher only")
    p.add_argument("--teacher", default=None, help="teacher name or path (default: the checkpoint's)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: teacher's list)")
    p.add_argument("--n", type=int, default=8, help="number of default prompts when --prompts is not given")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="student step counts k <= K")
    p.add_argument("--teacher_steps", type=int, nargs="*", default=[4, 32], help="teacher Euler step counts")
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: teacher's)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, shared by every row")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscale of the PNG (tiny images)")
    p.add_argument("--raw", action="store_true", help="the raw generator, not its EMA (when the run kept one)")
    p.add_argument("--out", default="samples.png", help="output PNG")
    try:
        main(p.parse_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
