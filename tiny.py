"""
The embedded teacher's world: a procedural image set, its prompt encoder, its "VAE", its exact
metrics, and the command that pretrains the teacher shipped in assets/tiny_teacher.safetensors.

Images are 32x32 RGB: one coloured shape (circle, square, triangle) at one of five places on a dark
background, with random size, jitter and brightness. Prompts read "a red circle at the top left".
Because we know how every image was made, we can score a generated image exactly:
  - prompt adherence: read the image's colour and place off its mean colour and centroid, and its
    shape by maximum likelihood under the renderer, then compare with the prompt; on real data it is 1.0;
  - distribution distance: Frechet distance between Gaussian fits of a fixed, interpretable feature
    vector (position, size, fill, colour) of generated vs real images of the same prompts.

The "VAE" is exact and parameter-free: latents = pixel_unshuffle(image, 4), normalised, so the DiT
sees a (48, 8, 8) latent, 64 tokens, like SANA's 32x-downsampled DC-AE latents.

Re-train the shipped teacher (3000 steps, about 30 minutes on one CPU core; the defaults are its settings):
    python tiny.py --out assets/tiny_teacher.safetensors
Write a captioned folder of its images for data-aided SiD (train.py --data), clean or deliberately worse:
    python tiny.py --write_data runs/data_clean --n 3000
    python tiny.py --write_data runs/data_colour --n 3000 --corrupt colour
"""

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import SANA_CONFIGS, Sana, config_to_dict

# ----------------------------------------------------------------------------------------------
# The procedural data law

COLORS = {  # RGB in [0, 1]
    "red": (0.95, 0.15, 0.15), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.15), "purple": (0.65, 0.2, 0.85), "white": (0.95, 0.95, 0.95),
}
SHAPES = ["circle", "square", "triangle"]
PLACES = {  # centre in pixels of a 32x32 image
    "top left": (9.0, 9.0), "top right": (23.0, 9.0), "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0), "center": (16.0, 16.0),
}
IMAGE_SIZE = 32
BACKGROUND = 0.08          # dark grey, in [0, 1]
SIZE_RANGE = (4.0, 6.5)    # shape "radius" in pixels
JITTER = 2.0               # uniform position jitter in pixels
BRIGHTNESS = (0.75, 1.0)   # multiplies the colour


def prompt_text(color, shape, place):
    return f"a {color} {shape} in the center" if place == "center" else f"a {color} {shape} at the {place}"


ALL_PROMPTS = [prompt_text(c, s, p) for c in COLORS for s in SHAPES for p in PLACES]   # 90 prompts


def parse_prompt(prompt):
    """The (color, shape, place) a prompt asks for, or a ValueError naming what is wrong."""
    words = prompt.lower().split()
    color = [c for c in COLORS if c in words]
    shape = [s for s in SHAPES if s in words]
    place = [p for p in PLACES if all(w in words for w in p.split())]
    place = [p for p in place if not (p == "center" and len(place) > 1)]
    if len(color) != 1 or len(shape) != 1 or len(place) != 1:
        raise ValueError(f"prompt {prompt!r} must name exactly one colour {list(COLORS)}, one shape {SHAPES} "
                         f"and one place {list(PLACES)}")
    return color[0], shape[0], place[0]


# Shape geometry, in units of the "radius" r. The decoder below uses the same masks and areas.
SHAPE_AREA = {"circle": math.pi, "square": 1.7 ** 2, "triangle": 1.8}   # area / r^2
TRIANGLE_CENTROID = 0.2                                                  # centroid sits 0.2 r below the centre


def shape_masks(kind, centre, radius, supersample=4):
    """Anti-aliased coverage (B, 32, 32) in [0, 1] of shapes kind[b] in {0: circle, 1: square, 2: triangle}."""
    S = supersample
    # pixel-centre coordinates on a supersampled grid, relative to each shape's centre
    coords = (torch.arange(IMAGE_SIZE * S, dtype=torch.float32) + 0.5) / S
    dx = coords[None, None, :] - centre[:, 0, None, None]                                      # (B, 1, W)
    dy = coords[None, :, None] - centre[:, 1, None, None]                                      # (B, H, 1)
    r = radius[:, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    # upward triangle: apex at dy = -r, base at dy = +0.8 r, half-width r at the base
    triangle = (dy >= -r) & (dy <= 0.8 * r) & (dx.abs() <= (dy + r) / 1.8)
    kind = kind[:, None, None]
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)).float()   # (B, H*S, W*S)
    return F.avg_pool2d(mask[:, None], S)[:, 0]                                               # (B, 32, 32)


def render(prompts, generator=None):
    """Images (B, 3, 32, 32) in [-1, 1] drawn from the data law given each prompt."""
    attrs = [parse_prompt(p) for p in prompts]
    rnd = torch.rand(len(prompts), 5, generator=generator)
    radius = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * rnd[:, 0]
    centre = torch.tensor([PLACES[a[2]] for a in attrs]) + JITTER * (2 * rnd[:, 1:3] - 1)     # (B, 2)
    bright = BRIGHTNESS[0] + (BRIGHTNESS[1] - BRIGHTNESS[0]) * rnd[:, 3]
    color = torch.tensor([COLORS[a[0]] for a in attrs]) * bright[:, None]                      # (B, 3)
    mask = shape_masks(torch.tensor([SHAPES.index(a[1]) for a in attrs]), centre, radius)[:, None]
    img = BACKGROUND + mask * (color[:, :, None, None] - BACKGROUND)
    return img * 2 - 1


def sample_prompts(n, generator=None):
    idx = torch.randint(len(ALL_PROMPTS), (n,), generator=generator)
    return [ALL_PROMPTS[i] for i in idx]


# ----------------------------------------------------------------------------------------------
# "VAE": exact pixel (un)shuffle, normalised to roughly zero mean and unit variance

LATENT_FACTOR = 4
LATENT_SHIFT, LATENT_SCALE = -0.78, 3.7   # measured on the data law: latent mean ~0, std ~1


def encode_images(img):          # (B, 3, 32, 32) in [-1, 1] -> (B, 48, 8, 8)
    return (F.pixel_unshuffle(img, LATENT_FACTOR) - LATENT_SHIFT) * LATENT_SCALE


def decode_latents(z):           # (B, 48, 8, 8) -> (B, 3, 32, 32) in [-1, 1]
    return F.pixel_shuffle(z / LATENT_SCALE + LATENT_SHIFT, LATENT_FACTOR)


# The teacher's own sampler ("pipeline"): Euler on the linear grid t_i = 1 - i/N, N = 32 steps, CFG 4.5
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


# ----------------------------------------------------------------------------------------------
# Prompt encoder: a word table and a position table, trained with the teacher

VOCAB = ["<bos>", "<pad>", "a", "at", "the", "in", "top", "bottom", "left", "right", "center"] + \
    list(COLORS) + SHAPES
MAX_TOKENS = 8   # <bos> + up to 7 words


class TinyTextEncoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.tok = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.randn(MAX_TOKENS, dim) * 0.02)

    def tokenize(self, prompts):
        ids = torch.full((len(prompts), MAX_TOKENS), VOCAB.index("<pad>"))
        mask = torch.zeros(len(prompts), MAX_TOKENS)
        for i, p in enumerate(prompts):
            words = p.lower().split()
            unknown = [w for w in words if w not in VOCAB]
            if unknown or len(words) > MAX_TOKENS - 1:
                raise ValueError(f"the tiny teacher cannot read {p!r}: it knows at most {MAX_TOKENS - 1} words "
                                 f"from {VOCAB[2:]}; unknown: {unknown}")
            ids[i, 0] = 0
            ids[i, 1:len(words) + 1] = torch.tensor([VOCAB.index(w) for w in words], dtype=torch.long)
            mask[i, :len(words) + 1] = 1
        return ids, mask

    def forward(self, prompts):
        """(text (B, 8, dim), text_mask (B, 8)); the empty prompt is <bos> alone."""
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.pos.device), mask.to(self.pos.device)
        return self.tok(ids) + self.pos[None], mask


# ----------------------------------------------------------------------------------------------
# Exact metrics


def coverage(img):
    """How much of each pixel (B, 32, 32) the shape covers, in [0, 1], read off an image (B, 3, 32, 32).

    Each pixel's distance d to the background grey, relative to the image's largest distance: 0 below
    20% of it (so generator noise on the background is not shape), 1 above 80%, linear between (so
    anti-aliased edges count fractionally).
    """
    x = (img.float().clamp(-1, 1) + 1) / 2                                        # (B, 3, H, W) in [0, 1]
    d = (x - BACKGROUND).abs().amax(dim=1)                                         # (B, H, W)
    rel = d / d.amax((1, 2), keepdim=True).clamp_min(0.2)
    return ((rel - 0.2) / 0.6).clamp(0, 1)


def image_features(img):
    """Per-image features (B, 8): centroid x, y, area, fill, drop, mean r, g, b of the shape.

    From the coverage m: width and height are the sums of the column and row coverage profiles;
    fill = area / (width * height) is ~1 for a square, pi/4 for a circle, 1/2 for a triangle; drop = how
    far the mass centroid sits below the middle of the row profile, in heights (apex-up triangle ~1/6,
    circle and square 0).
    """
    x = (img.float().clamp(-1, 1) + 1) / 2                                        # (B, 3, H, W) in [0, 1]
    B, _, H, W = x.shape
    m = coverage(img)
    area = m.sum((1, 2)).clamp_min(1e-3)
    ys = torch.arange(H, dtype=torch.float32) + 0.5
    xs = torch.arange(W, dtype=torch.float32) + 0.5
    cx, cy = (m.sum(1) * xs).sum(1) / area, (m.sum(2) * ys).sum(1) / area
    rows, cols = m.amax(2), m.amax(1)                                              # (B, H), (B, W) profiles
    height, width = rows.sum(1).clamp_min(1), cols.sum(1).clamp_min(1)          # >= 1 px: blank images stay finite
    mid_y = (rows * ys).sum(1) / height
    drop = (cy - mid_y) / height
    fg = (m > 0.5).float()[:, None]
    rgb = (x * fg).sum((2, 3)) / fg.sum((2, 3)).clamp_min(1)
    return torch.stack([cx, cy, area, area / (width * height), drop, rgb[:, 0], rgb[:, 1], rgb[:, 2]], dim=1)


def decode_shape(img):
    """Which shape (B,) in {0: circle, 1: square, 2: triangle} best explains each image's coverage.

    Maximum likelihood under the data law: each candidate is rendered by shape_masks with the image's
    area and centroid (which fix its size and position), and the one with the least squared error to
    the coverage wins. Soft or ragged edges, as a generator draws them, cost every candidate about
    equally, so only the corners and the apex decide. A fixed threshold on fill would not work: ragged
    edges widen the bounding box and squares read as circles (test_tiny checks blurred, noised data).
    """
    m = coverage(img)
    feats = image_features(img)
    cx, cy, area = feats[:, 0], feats[:, 1], feats[:, 2]
    errors = []
    for k, name in enumerate(SHAPES):
        r = (area / SHAPE_AREA[name]).sqrt()
        centre = torch.stack([cx, cy - (TRIANGLE_CENTROID * r if name == "triangle" else 0)], dim=1)
        fit = shape_masks(torch.full_like(r, k, dtype=torch.long), centre, r)
        errors.append((fit - m).square().sum((1, 2)))
    return torch.stack(errors, dim=1).argmin(1)


def decode_attributes(img):
    """The (color, shape, place) an image shows, and whether it shows nothing: colour and place by
    nearest prototype of the mean shape colour and the centroid, shape by decode_shape."""
    feats = image_features(img)
    cols = torch.tensor(list(COLORS.values()))                                   # (6, 3)
    rgb = feats[:, 5:8]
    rgb_n = rgb / rgb.amax(1, keepdim=True).clamp_min(1e-3)                      # brightness-invariant hue
    cols_n = cols / cols.amax(1, keepdim=True)
    color = (rgb_n[:, None] - cols_n[None]).norm(dim=2).argmin(1)
    places = torch.tensor(list(PLACES.values()))
    place = (feats[:, None, 0:2] - places[None]).norm(dim=2).argmin(1)
    empty = feats[:, 2] < 10                                                     # no shape drawn at all
    return color, decode_shape(img), place, empty


def prompt_adherence(images, prompts):
    """Fraction of images whose decoded colour, shape and place all equal the prompt's."""
    c, s, p, empty = decode_attributes(images)
    want = [parse_prompt(q) for q in prompts]
    wc = torch.tensor([list(COLORS).index(a[0]) for a in want])
    ws = torch.tensor([SHAPES.index(a[1]) for a in want])
    wp = torch.tensor([list(PLACES).index(a[2]) for a in want])
    ok = (c == wc) & (s == ws) & (p == wp) & ~empty
    return ok.float().mean().item()


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussian fits of two feature sets, in float64."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    # Tr((S1 S2)^(1/2)) = sum of sqrt of eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric PSD)
    e, V = torch.linalg.eigh(s1)
    r1 = V @ torch.diag(e.clamp_min(0).sqrt()) @ V.T
    tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


# feature scales so that every feature counts about equally in the distance (std of each on the data)
FEATURE_SCALE = torch.tensor([6.0, 6.0, 25.0, 0.17, 0.05, 0.3, 0.3, 0.3])


def feature_distance(images, prompts, n_ref=None, seed=1234):
    """Frechet distance of standardised features: generated images vs fresh data for the same prompts."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.cat([render(prompts[i:i + 1024], g) for i in range(0, len(prompts), 1024)])
    return frechet_distance(image_features(images) / FEATURE_SCALE, image_features(ref) / FEATURE_SCALE)


# ----------------------------------------------------------------------------------------------
# Pretraining the teacher (rectified flow, v = eps - x0, 10% empty prompts for CFG)


def pretrain(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cfg = SANA_CONFIGS["tiny"]
    net, enc = Sana(cfg), TinyTextEncoder(cfg.caption_channels)
    params = list(net.parameters()) + list(enc.parameters())
    ema_net, ema_enc = copy.deepcopy(net).requires_grad_(False), copy.deepcopy(enc).requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    n = sum(p.numel() for p in params)
    print(f"tiny teacher: {n / 1e6:.2f} M parameters; {args.steps} steps of batch {args.batch}")
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        prompts = sample_prompts(args.batch, g)
        x0 = encode_images(render(prompts, g))
        drop = torch.rand(args.batch, generator=g) < 0.1
        prompts = ["" if d else p for p, d in zip(prompts, drop)]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(args.batch, generator=g))        # logit-normal(0, 1), as SD3
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            text, mask = enc(prompts)
            v = net(xt, t, text, mask)
        loss = (v.float() - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(list(ema_net.parameters()) + list(ema_enc.parameters()), params):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == 1:
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
        if step % 1000 == 0 or step == args.steps:
            save_teacher(args.out, ema_net, ema_enc, step)


def save_teacher(path, net, enc, step):
    from safetensors.torch import save_file
    tensors = {f"transformer.{k}": v.detach().float().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.detach().float().contiguous() for k, v in enc.state_dict().items()})
    meta = {"config": json.dumps(config_to_dict(net.config)), "step": str(step), "vocab": json.dumps(VOCAB)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)      # atomic: a crash never leaves a half-written teacher


def write_folder(folder, n, seed=0, corrupt="none"):
    """A captioned image folder of n procedural images (PNG + metadata.jsonl), the layout `train.py --data` reads;
    corrupt="colour" rolls the RGB channels (a red circle comes out green: colours off their prompts), "blur"
    blurs with a Gaussian of std 1 px: deliberately worse data than the teacher's samples."""
    import numpy as np
    from PIL import Image
    if os.path.exists(folder):
        raise ValueError(f"{folder} exists; pass a new folder (data folders are never overwritten)")
    g = torch.Generator().manual_seed(seed)
    prompts = sample_prompts(n, g)
    images = render(prompts, g)                                            # (n, 3, 32, 32) in [-1, 1]
    if corrupt == "colour":
        images = images.roll(1, dims=1)
    elif corrupt == "blur":
        k = torch.exp(-torch.arange(-3, 4.0) ** 2 / 2)
        k = (k[:, None] * k[None]) / k.sum() ** 2                          # (7, 7) Gaussian, std 1 px
        images = F.conv2d(F.pad(images, (3, 3, 3, 3), mode="replicate"), k.expand(3, 1, 7, 7), groups=3)
    elif corrupt != "none":
        raise ValueError(f"unknown corruption {corrupt!r}; use none, colour or blur")
    tmp = folder + ".tmp"
    os.makedirs(tmp)
    rows = []
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        pixels = ((img.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(os.path.join(tmp, f"{i:06d}.png"))
        rows.append(json.dumps({"file_name": f"{i:06d}.png", "text": prompt}))
    with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
        f.write("\n".join(rows) + "\n")
    os.replace(tmp, folder)
    print(f"wrote {n} images ({corrupt}) with captions to {folder}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="pretrain the embedded tiny teacher on the procedural shapes, or write "
                                            "a captioned folder of its images for data-aided SiD (--write_data)")
    p.add_argument("--out", default="assets/tiny_teacher.safetensors", help="where to write the teacher")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: fastest on a shared 2-core machine)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--write_data", default=None, help="write a captioned image folder here instead of pretraining")
    p.add_argument("--n", type=int, default=3000, help="with --write_data: number of images")
    p.add_argument("--corrupt", default="none", choices=["none", "colour", "blur"],
                   help="with --write_data: make the data worse (colours off their prompts, or blurred)")
    args = p.parse_args()
    if args.write_data:
        write_folder(args.write_data, args.n, args.seed, args.corrupt)
    else:
        pretrain(args)
