"""
The embedded teacher's world (tiny.py): the data law, its exact "VAE", its prompt encoder, and the
two metrics bench.py reports. A benchmark is only as good as its scorer, so the scorer is tested
on images whose answer we know.

    python -m pytest test_tiny.py -q -s
"""

import torch
import torch.nn.functional as F

import tiny
from teacher_loaders import load_teacher


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = tiny.sample_prompts(n, g)
    return tiny.render(prompts, g), prompts


def test_latent_codec_is_exact_and_normalised():
    """decode(encode(x)) == x, and latents of the data have mean ~0 and std ~1 (like a VAE's scaled latents)."""
    img, _ = data(2000)
    z = tiny.encode_images(img)
    print(f"latent shape {tuple(z.shape[1:])}, mean {z.mean():.3f}, std {z.std():.3f}")
    assert z.shape[1:] == (48, 8, 8)
    assert torch.allclose(tiny.decode_latents(z), img, atol=1e-6)
    assert abs(z.mean()) < 0.05 and 0.9 < z.std() < 1.1


def test_adherence_is_one_on_data_and_zero_on_the_wrong_prompt():
    """Every rendered image decodes to its own prompt; relabelled images (another colour/shape/place) score 0."""
    img, prompts = data(3000)
    right = tiny.prompt_adherence(img, prompts)
    colours, shapes, places = list(tiny.COLORS), tiny.SHAPES, list(tiny.PLACES)
    wrong = []
    for i, p in enumerate(prompts):
        c, s, pl = tiny.parse_prompt(p)
        attr = i % 3    # change one attribute at a time
        c = colours[(colours.index(c) + 1) % 6] if attr == 0 else c
        s = shapes[(shapes.index(s) + 1) % 3] if attr == 1 else s
        pl = places[(places.index(pl) + 1) % 5] if attr == 2 else pl
        wrong.append(tiny.prompt_text(c, s, pl))
    mislabelled = tiny.prompt_adherence(img, wrong)
    blank_img = torch.full_like(img, tiny.BACKGROUND * 2 - 1)
    blank = tiny.prompt_adherence(blank_img, prompts)
    assert tiny.image_features(blank_img).abs().max() < 100        # no division blow-up on an empty image
    print(f"adherence: data {right:.4f}, one attribute changed {mislabelled:.4f}, blank images {blank:.4f}")
    assert right == 1.0 and mislabelled == 0.0 and blank == 0.0


def gaussian_blur(img, sigma):
    k = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-k**2 / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)                                          # (3, 1, 1, 7) per channel
    img = F.conv2d(F.pad(img, (3, 3, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(img, (0, 0, 3, 3), mode="replicate"), k.transpose(2, 3), groups=3)


def test_shape_decoder_survives_soft_edges():
    """A generator's soft, ragged edges must not change the shape read: data blurred (sigma 0.6 px) and
    noised (std 0.1) still decodes to its own shape. A threshold on fill (~1 square, pi/4 circle) fails
    here: ragged edges widen the row and column profiles, so squares read as circles."""
    img, prompts = data(1500, seed=5)
    soft = gaussian_blur(img, 0.6) + 0.1 * torch.randn(img.shape, generator=torch.Generator().manual_seed(6))
    want = torch.tensor([tiny.SHAPES.index(tiny.parse_prompt(p)[1]) for p in prompts])
    got = tiny.decode_shape(soft)
    per_shape = {s: (got[want == k] == k).float().mean().item() for k, s in enumerate(tiny.SHAPES)}
    adherence = tiny.prompt_adherence(soft, prompts)
    print(f"blurred, noised data: shape accuracy {per_shape}, adherence {adherence:.4f}")
    assert min(per_shape.values()) > 0.98 and adherence > 0.98


def test_feature_distance_floor_and_sensitivity():
    """FD(data, fresh data) is near 0; shrinking the shapes, dimming them or dropping a mode raises it clearly."""
    img, prompts = data(2000, seed=1)
    floor = tiny.feature_distance(img, prompts, seed=2)
    dim = tiny.feature_distance((img + 1) * 0.8 - 1, prompts, seed=2)          # colours 20% darker
    saved = tiny.SIZE_RANGE
    try:
        tiny.SIZE_RANGE = (3.0, 4.0)                                              # shapes too small
        small = tiny.render(prompts, torch.Generator().manual_seed(3))
    finally:
        tiny.SIZE_RANGE = saved
    shrunk = tiny.feature_distance(small, prompts, seed=2)
    red = [tiny.prompt_text("red", *tiny.parse_prompt(p)[1:]) for p in prompts]  # every image red
    collapsed = tiny.feature_distance(tiny.render(red, torch.Generator().manual_seed(4)), prompts, seed=2)
    print(f"FD: data floor {floor:.4f}, dimmed {dim:.3f}, smaller shapes {shrunk:.3f}, colour collapse {collapsed:.3f}")
    assert floor < 0.02
    assert min(dim, shrunk, collapsed) > 10 * floor + 0.1


def test_frechet_distance_matches_closed_form():
    """For Gaussians with commuting covariances, FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.randn(200000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64) + 1
    exact = 3 * 1.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    got = tiny.frechet_distance(a, b)
    print(f"FD sampled {got:.4f} vs closed form {exact:.4f}")
    assert abs(got - exact) < 0.05


def test_prompt_encoder_and_teacher_file():
    """The shipped teacher loads; prompts tokenise to <bos> + words; unknown words fail with a one-line reason."""
    teacher = load_teacher("tiny")
    cond = teacher.encode_prompts(["a red circle at the top left", ""])
    print({k: tuple(v.shape) for k, v in cond.items()}, cond["text_mask"].tolist())
    assert cond["text"].shape == (2, tiny.MAX_TOKENS, teacher.transformer.config.caption_channels)
    assert cond["text_mask"].tolist() == [[1] * 8, [1] + [0] * 7]      # <bos> + 7 words; "" is <bos> alone
    try:
        teacher.encode_prompts(["a cat"])
    except ValueError as e:
        assert "cannot read" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("an unknown word must raise")
    assert teacher.latent_shape() == (48, 8, 8)
