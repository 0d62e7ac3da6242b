"""
Data-aided SiD (the adversarial / Diffusion-GAN mode), part A: the losses (sid.py), the discriminator features
(model.py), the real-data reader and latent cache (data.py). Offline, fp32/fp64 on CPU.

    HF_HUB_OFFLINE=1 python -m pytest test_adversarial.py -q -s     # ~10 s on 2 cores

What is checked:
  - discriminator_loss / generator_adversarial_loss against hand formulas (the official loop bodies of SiD-DiT
    training/sid_dit_training_loop.py: BCE with logits on clamped logits, per-sample channel mean, x C*H*W,
    sum / per-rank batch), values and gradients in fp64 with autograd on both sides, clamps active and not;
  - the 20k / 40k schedule at its boundaries;
  - forward_with_features: the velocity is forward's, the features are the token mean of diffusers'
    `norm_out` output (a forward hook) on a tiny random SanaTransformer2DModel; SD3 and FLUX cases run once
    their families are registered in teacher_loaders.DIFFUSERS_TRANSFORMERS; under FSDP2 with the extra
    method registered;
  - cfg_velocity_and_logits (same velocity as cfg_velocity, the cond half's logits) and discriminator_pass
    (real and fake inputs share eps and t);
  - data.py: both folder layouts, every bad input as a one-line error naming the file, the resize/crop, the
    latent cache (encode once, reuse, re-encode a changed file), the rank order (disjoint, complete, the same
    global batches on 1 and 2 ranks, resumable), the `tiny` stream;
  - train.py --data (subprocess runs on the tiny teacher): the 20k/40k schedule in the log, bit-exact resume and
    1-vs-2-rank parity with --data tiny, a folder of PNGs encoded once and reused on resume, bad input.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import sid
import teacher_loaders as tl
import tiny
from model import SANA_CONFIGS, Sana
from test_sana import compare, one_line_error, randomise, sana_inputs, tiny_diffusers_sana

# ----------------------------------------------------------------------------------------------
# Losses against hand formulas, fp64


def hand_bce(logit, label):
    """-[y log s + (1 - y) log(1 - s)], s = sigmoid of the logit clamped to [-10, 10] (zero gradient outside)."""
    clamped = torch.where(logit > 10, torch.full_like(logit, 10.0), torch.where(logit < -10, -10.0, logit))
    s = 1 / (1 + torch.exp(-clamped))
    return -(label * torch.log(s) + (1 - label) * torch.log(1 - s))


def logits(seed, B=3, D=5):
    """(B, D) fp64 logits: mostly |l| < 3, with a few beyond +-10 so the clamp is active for some channels."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(B, D, generator=g, dtype=torch.float64)
    x[0, 0], x[1, 2], x[2, 4] = 12.5, -11.0, 10.5
    return x.requires_grad_(True)


def test_discriminator_loss_matches_hand_formula():
    """L_D = lsd / B sum_b 1/2 [mean_ch BCE(real, 1) + mean_ch BCE(fake, 0)] * CHW; values and gradients."""
    real, fake = logits(0), logits(1)
    numel, lsd = 48 * 8 * 8, 0.7
    ours = sid.discriminator_loss(real, fake, numel, lsd)
    B = real.shape[0]
    ref = lsd / B * sum(0.5 * (hand_bce(real[b], 1.0).mean() + hand_bce(fake[b], 0.0).mean()) * numel for b in range(B))
    g_ours = torch.autograd.grad(ours, (real, fake))
    g_ref = torch.autograd.grad(ref, (real, fake))
    print(f"L_D ours {ours.item():.10f} ref {ref.item():.10f}; grad real[0] {g_ours[0][0].tolist()}")
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    # clamp active: no gradient through saturated logits; inactive: nonzero everywhere else
    clamped = torch.zeros_like(real, dtype=torch.bool)
    clamped[0, 0] = clamped[1, 2] = clamped[2, 4] = True
    assert (g_ours[0][clamped] == 0).all() and (g_ours[0][~clamped] != 0).all()
    # real wants logits up (negative gradient), fake wants them down
    assert (g_ours[0][~clamped] < 0).all() and (g_ours[1][~clamped] > 0).all()


def test_generator_adversarial_loss_matches_hand_formula():
    """L_adv = lsg_gan / B sum_b mean_ch BCE(gen, 1) * w(t) * CHW; values and gradients (w and CHW per sample)."""
    gen = logits(2)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    w = sid.loss_weight("1_minus_sigma", t).double()
    numel, lsg_gan = 37, 1.3
    ours = sid.generator_adversarial_loss(gen, w, numel, lsg_gan)
    B = gen.shape[0]
    ref = lsg_gan / B * sum(hand_bce(gen[b], 1.0).mean() * w[b] * numel for b in range(B))
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, gen), torch.autograd.grad(ref, gen)
    print(f"L_adv ours {ours.item():.10f} ref {ref.item():.10f}; grad row norms {g_ours.norm(dim=1).tolist()}")
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    assert torch.allclose(g_ours, g_ref, rtol=1e-12, atol=1e-15)
    assert g_ours[0, 0] == 0 and g_ours[2, 4] == 0 and g_ours[1, 2] == 0     # clamped
    # the weight scales each sample's gradient: rows with w = 0.8, 0.5, 0.1 (grad / w is the unweighted one)
    unweighted = torch.autograd.grad(sid.generator_adversarial_loss(gen, torch.ones_like(w), numel, lsg_gan), gen)[0]
    assert torch.allclose(g_ours, unweighted * w[:, None], rtol=1e-12)


def test_adversarial_schedule_boundaries():
    """No G step while images_seen <= 20k; L_G alone while <= 40k; 0.5 L_G + 0.5 L_adv after (strict >)."""
    cases = {0: (False, 1.0, 0.0), 20_000: (False, 1.0, 0.0), 20_001: (True, 1.0, 0.0), 40_000: (True, 1.0, 0.0),
             40_001: (True, 0.5, 0.5), 10**6: (True, 0.5, 0.5)}
    for seen, want in cases.items():
        assert sid.adversarial_schedule(seen) == want, seen
    # batch 256: the first generator step is the iteration that starts at 79 * 256 = 20224 images
    first = next(i for i in range(200) if sid.adversarial_schedule(256 * i)[0])
    assert first == 79 and sid.adversarial_schedule(1000, g_start=999, adv_start=1000) == (True, 1.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Discriminator features: the final-norm tokens, averaged, against the reference classes' norm_out


def sd3_case():
    from diffusers import SD3Transformer2DModel
    ref = randomise(SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=3,
                                          attention_head_dim=8, num_attention_heads=4, joint_attention_dim=48,
                                          caption_projection_dim=32, pooled_projection_dim=24, out_channels=4,
                                          pos_embed_max_size=16, dual_attention_layers=(0, 1), qk_norm="rms_norm"), 5)
    g = torch.Generator().manual_seed(1)
    x, text, pooled = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, 48, generator=g), torch.randn(2, 24, generator=g)
    t = torch.tensor([0.3, 0.85])
    return ref, lambda: ref(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=1000 * t), \
        (x, t, text), dict(pooled=pooled)


def flux_case():
    from diffusers import FluxTransformer2DModel
    from model import patchify
    ref = randomise(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                           pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6)), 6)
    g = torch.Generator().manual_seed(2)
    x, text, pooled = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, 48, generator=g), torch.randn(2, 24, generator=g)
    t, guidance = torch.tensor([0.3, 0.85]), torch.tensor([3.5, 2.0])
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    img_ids = torch.stack([torch.zeros(24), rows.flatten(), cols.flatten()], dim=1)
    return ref, lambda: ref(hidden_states=patchify(x, 2), encoder_hidden_states=text, pooled_projections=pooled,
                            timestep=t, img_ids=img_ids, txt_ids=torch.zeros(7, 3), guidance=guidance), \
        (x, t, text), dict(pooled=pooled, guidance=guidance)


def sana_case():
    ref = tiny_diffusers_sana(seed=3, qk_norm="rms_norm_across_heads")
    x, t, text, mask = sana_inputs()
    return ref, lambda: ref(x, text, 1000 * t, encoder_attention_mask=mask), (x, t, text), dict(text_mask=mask)


@pytest.mark.parametrize("family", ["sana", "sd3", "flux"])
def test_features_are_token_mean_of_final_norm(family, tmp_path):
    ref, call_ref, (x, t, text), kwargs = {"sana": sana_case, "sd3": sd3_case, "flux": flux_case}[family]()
    if type(ref).__name__ not in tl.DIFFUSERS_TRANSFORMERS:
        pytest.skip(f"{type(ref).__name__} is not a registered family yet (teacher_loaders.DIFFUSERS_TRANSFORMERS)")
    ref.save_pretrained(tmp_path / "transformer")
    ours = tl.load_transformer(tmp_path / "transformer")
    seen = {}
    hook = ref.norm_out.register_forward_hook(lambda mod, args, out: seen.update(tokens=out))
    with torch.no_grad():
        v_ref = call_ref().sample
        v, feats = ours.forward_with_features(x, t, text, **kwargs)
        v_plain = ours(x, t, text, **kwargs)
    hook.remove()
    feats_ref = seen["tokens"].mean(dim=1)                                     # (B, D)
    assert feats.shape == feats_ref.shape == (x.shape[0], ref.norm_out.linear.in_features if family != "sana"
                                              else ref.config.num_attention_heads * ref.config.attention_head_dim)
    compare(f"features[{family}]", feats, feats_ref)
    assert torch.equal(v, v_plain)                                              # one body, two entry points
    if family != "flux":                                                        # FLUX's reference output is packed
        compare(f"velocity[{family}]", v, v_ref)


def tiny_sana(seed=0):
    return randomise(Sana(SANA_CONFIGS["tiny"]), seed)


def test_features_under_fsdp2(tmp_path):
    """train.py's shard() (fully_shard each unit, then the root) plus register_fsdp_forward_method for every name in
    fsdp_forward_methods: forward_with_features then gives the unsharded module's results (1-rank gloo group)."""
    import copy
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    net = tiny_sana(4)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 48, 8, 8, generator=g), torch.tensor([0.4, 0.9])
    cond = tiny_cond(["a red circle at the top left", "a blue square in the center"])
    with torch.no_grad():
        v_ref, f_ref = net.forward_with_features(x, t, **cond)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        sharded = copy.deepcopy(net)
        for unit in sharded.fsdp_units():
            fully_shard(unit)
        fully_shard(sharded)
        for name in sharded.fsdp_forward_methods:
            register_fsdp_forward_method(sharded, name)
        with torch.no_grad():
            v, f = sharded.forward_with_features(x, t, **cond)
    finally:
        dist.destroy_process_group()
    print(f"FSDP2: max|dv| {(v - v_ref).abs().max():.2e}, max|dfeats| {(f - f_ref).abs().max():.2e}")
    assert torch.allclose(v, v_ref, atol=1e-6) and torch.allclose(f, f_ref, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Guided pass with logits, and the discriminator inputs


def tiny_cond(prompts):
    enc = randomise(tiny.TinyTextEncoder(SANA_CONFIGS["tiny"].caption_channels), 9)
    with torch.no_grad():
        text, mask = enc(prompts)
    return {"text": text, "text_mask": mask}


@pytest.fixture(scope="module")
def guided_setup():
    net = tiny_sana(1)
    g = torch.Generator().manual_seed(3)
    x_g, x_real, eps = (torch.randn(3, 48, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0.2, 0.6, 0.95])
    cond = tiny_cond(["a red circle at the top left", "a green triangle at the bottom right", "a blue square in the center"])
    cond_real = tiny_cond(["a white circle in the center", "a yellow square at the top right",
                           "a purple triangle at the bottom left"])
    uncond = {k: v for k, v in tiny_cond([""] * 3).items()}
    return net, x_g, x_real, eps, t, cond, cond_real, uncond


@pytest.mark.parametrize("scale", [1.0, 0.0, 4.5])
def test_cfg_velocity_and_logits(guided_setup, scale):
    """The velocity equals cfg_velocity's; the logits are the conditional branch's features."""
    net, x_g, _, eps, t, cond, _, uncond = guided_setup
    x_t = sid.add_noise(x_g, eps, t)
    with torch.no_grad():
        v, lg = sid.cfg_velocity_and_logits(net, x_t, t, cond, uncond, scale)
        v_ref = sid.cfg_velocity(net, x_t, t, cond, uncond, scale)
        _, lg_ref = net.forward_with_features(x_t, t, **cond)
    assert lg.shape == (3, SANA_CONFIGS["tiny"].width) and lg.dtype == v.dtype == torch.float32
    compare(f"guided velocity[{scale}]", v, v_ref)
    compare(f"cond logits[{scale}]", lg, lg_ref)


def test_discriminator_pass_shares_eps_and_t(guided_setup):
    """Real and fake inputs use the same eps and t: with x_real = x_g and the same captions the logits agree; with
    other real data the real logits are those of (1 - t) x_real + t eps under the real captions."""
    net, x_g, x_real, eps, t, cond, cond_real, uncond = guided_setup
    with torch.no_grad():
        v, l_fake, l_real_same = sid.discriminator_pass(net, x_g, x_g, eps, t, cond, cond, uncond, 4.5)
        _, _, l_real = sid.discriminator_pass(net, x_g, x_real, eps, t, cond, cond_real, uncond, 4.5)
        _, l_real_ref = net.forward_with_features(sid.add_noise(x_real, eps, t), t, **cond_real)
        v_ref = sid.cfg_velocity(net, sid.add_noise(x_g, eps, t), t, cond, uncond, 4.5)
    compare("real logits with x_real = x_g vs fake logits", l_real_same, l_fake)
    compare("real logits", l_real, l_real_ref)
    compare("fake velocity", v, v_ref)
    acc_real, acc_fake = sid.discriminator_accuracy(l_real, l_fake)
    assert 0 <= acc_real <= 1 and 0 <= acc_fake <= 1
    assert acc_real == (l_real > 0).float().mean().item()


# ----------------------------------------------------------------------------------------------
# data.py: folders, bad inputs, resize/crop, cache, order


def write_image(path, rgb=None, size=(20, 12), seed=0, fmt=None):
    """An RGB image; random pixels unless a constant colour is given."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = size
    arr = (np.random.default_rng(seed).integers(0, 256, (h, w, 3)) if rgb is None
           else np.broadcast_to(np.array(rgb), (h, w, 3))).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def make_folder(root, layout, n=4):
    """n images (PNG and JPEG); captions in metadata.jsonl (image 0 has two) or in same-name .txt files."""
    names = [f"img{i}.png" if i % 2 == 0 else f"sub/img{i}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        write_image(os.path.join(root, name), seed=i, size=(16 + 2 * i, 12 + i))
    if layout == "metadata":
        rows = [{"file_name": name, "text": f"caption {i}", "extra": 1} for i, name in enumerate(names)]
        rows.insert(1, {"file_name": names[0], "text": "caption 0 again"})
        with open(os.path.join(root, "metadata.jsonl"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        for i, name in enumerate(names):
            with open(os.path.join(root, os.path.splitext(name)[0] + ".txt"), "w") as f:
                f.write(f"  caption {i}\n")
    return names


class CountingEncode:
    """A stand-in VAE: 4x4 average pooling, (B, 3, R, R) -> (B, 3, R/4, R/4); counts the images it encodes."""

    def __init__(self):
        self.images = 0

    def __call__(self, img):
        self.images += len(img)
        return F.avg_pool2d(img, 4)


def test_read_folder_both_layouts(tmp_path):
    names = make_folder(str(tmp_path / "m"), "metadata")
    items = data.read_folder(str(tmp_path / "m"))
    assert items == [(names[0], "caption 0"), (names[0], "caption 0 again")] + \
        [(names[i], f"caption {i}") for i in range(1, 4)]
    names = make_folder(str(tmp_path / "t"), "txt")
    assert data.read_folder(str(tmp_path / "t")) == sorted((n, f"caption {i}") for i, n in enumerate(names))


def test_load_image_resize_and_crop(tmp_path):
    """Shorter side to R (PIL bilinear), centre crop with torchvision's int(round(...)) offsets, [-1, 1]."""
    R = 8
    wide = write_image(str(tmp_path / "wide.png"), size=(20, 8))               # no resize; left = round(6) = 6
    x = data.load_image(str(tmp_path / "wide.png"), R)
    assert x.shape == (3, R, R) and x.dtype == torch.float32
    assert torch.equal(x, (torch.from_numpy(wide[:, 6:14].copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)
    tall = write_image(str(tmp_path / "tall.png"), size=(8, 13), seed=1)        # top = round(2.5) = 2 (to even)
    x = data.load_image(str(tmp_path / "tall.png"), R)
    assert torch.equal(x, (torch.from_numpy(tall[2:10].copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)
    taller = write_image(str(tmp_path / "taller.png"), size=(8, 15), seed=2)    # top = round(3.5) = 4 (to even)
    x = data.load_image(str(tmp_path / "taller.png"), R)
    assert torch.equal(x, (torch.from_numpy(taller[4:12].copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)
    write_image(str(tmp_path / "big.png"), rgb=(255, 0, 51), size=(40, 24))   # shrink 3x: a flat colour stays flat
    x = data.load_image(str(tmp_path / "big.png"), R)
    assert torch.allclose(x, torch.tensor([1.0, -1.0, -0.6]).view(3, 1, 1).expand(3, R, R), atol=1e-6)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(rgba)                      # alpha dropped, as RGB conversion
    assert torch.allclose(data.load_image(str(rgba), R)[:, 0, 0], (torch.tensor([10, 20, 30]) / 255 - 0.5) / 0.5)


def test_bad_inputs_one_line_errors(tmp_path):
    enc = CountingEncode()

    def opened(root):
        return lambda: data.open_data(str(root), 8, enc, str(tmp_path / "cache"))

    one_line_error(FileNotFoundError, opened(tmp_path / "nowhere"), "nowhere", "not a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    one_line_error(ValueError, opened(tmp_path / "empty"), "empty", "holds no images")
    # .txt layout: an image without a caption file, then with an empty one
    write_image(str(tmp_path / "t" / "a.png"))
    one_line_error(ValueError, opened(tmp_path / "t"), "a.png", "has no caption", "a.txt")
    (tmp_path / "t" / "a.txt").write_text("   \n")
    one_line_error(ValueError, opened(tmp_path / "t"), "a.png", "has no caption", "empty")
    # metadata layout: bad JSON, a missing text, an unlisted image, a listed file that does not exist
    root = tmp_path / "m"
    names = make_folder(str(root), "metadata", n=2)
    meta = root / "metadata.jsonl"
    good = meta.read_text()
    meta.write_text(good + "{not json\n")
    one_line_error(ValueError, opened(root), "metadata.jsonl line 4", "not valid JSON")
    meta.write_text(good + json.dumps({"file_name": names[1]}) + "\n")
    one_line_error(ValueError, opened(root), names[1], "has no caption", 'no "text"')
    meta.write_text(good.split("\n")[0] + "\n")
    one_line_error(ValueError, opened(root), names[1], "has no caption", "not in")
    meta.write_text(good + json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    one_line_error(FileNotFoundError, opened(root), "gone.png", "not an image")
    meta.write_text(good)
    assert enc.images == 0                                    # nothing was encoded: the run never half-started
    # a truncated PNG and a file that is no image at all
    png = root / names[0]
    blob = png.read_bytes()
    png.write_bytes(blob[:len(blob) // 2])
    one_line_error(ValueError, opened(root), names[0], "cannot read image")
    png.write_bytes(blob)
    jpg = root / names[1]
    blob = jpg.read_bytes()
    jpg.write_bytes(blob[:len(blob) * 2 // 3])
    one_line_error(ValueError, opened(root), names[1], "cannot read image")
    jpg.write_bytes(b"this is text, not a JPEG")
    one_line_error(ValueError, opened(root), names[1], "cannot read image")
    one_line_error(ValueError, lambda: data.open_data("tiny", 64, enc, None), "tiny", "32x32", "--teacher tiny")
    (tmp_path / "cache" / "latents-r0-broken.safetensors").write_bytes(b"\x10\x00")
    one_line_error(ValueError, opened(root), "latents-r0-broken.safetensors", "unreadable", "delete it")


def test_latent_cache_encodes_once(tmp_path):
    """First reader encodes every image once; a second (a resumed run) encodes nothing; a changed file, and only it,
    is re-encoded; the cached latents are exactly encode(load_image(file))."""
    root, cache = str(tmp_path / "imgs"), str(tmp_path / "run" / "latents")
    names = make_folder(root, "txt", n=5)
    enc = CountingEncode()
    first = data.open_data(root, 8, enc, cache, encode_batch=2)
    assert enc.images == 5 and len(first) == 5
    second = data.open_data(root, 8, enc, cache)
    assert enc.images == 5
    z, captions = second.draw(5)
    for zi, caption in zip(z, captions):
        name = names[int(caption.split()[-1])]
        assert torch.equal(zi, F.avg_pool2d(data.load_image(os.path.join(root, name), 8)[None], 4)[0])
    path = os.path.join(root, names[2])
    write_image(path, seed=99, size=(18, 14))                 # new pixels; force a new mtime too
    os.utime(path, ns=(10**18, 10**18))
    third = data.open_data(root, 8, enc, cache)
    assert enc.images == 6
    data.open_data(root, 16, enc, cache)                      # another resolution: another latent for every image
    assert enc.images == 11
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        third.load_state_dict(second.state_dict())


def test_rank_order_disjoint_complete_resumable(tmp_path):
    """2 ranks: disjoint slices whose union per epoch is every item; together they are the 1-rank global batches;
    a reader restored from a stored position continues identically."""
    root, cache = str(tmp_path / "imgs"), str(tmp_path / "cache")
    make_folder(root, "metadata", n=5)                         # 6 items (one image has two captions)
    enc = CountingEncode()
    one = data.open_data(root, 8, enc, cache, seed=3)
    ranks = [data.open_data(root, 8, enc, cache, seed=3, rank=r, world=2) for r in range(2)]
    n = len(one)
    seen = []
    for gb in (2, 2, 2, 4, 2):                                  # 12 draws = 2 epochs of 6; the 4 spans both
        z1, c1 = one.draw(gb)
        parts = [r.draw(gb) for r in ranks]
        assert c1 == parts[0][1] + parts[1][1] and torch.equal(z1, torch.cat([parts[0][0], parts[1][0]]))
        seen += c1
    items = sorted(c for _, c in one.items)
    assert sorted(seen[:n]) == items and sorted(seen[n:]) == items    # ranks disjoint, each epoch complete
    assert seen[:n] != seen[n:]                                         # and epochs are reshuffled
    gb = 2
    state = ranks[1].state_dict()
    resumed = data.open_data(root, 8, enc, cache, seed=3, rank=1, world=2)
    resumed.load_state_dict(state)
    a, b = ranks[1].draw(gb), resumed.draw(gb)
    assert a[1] == b[1] and torch.equal(a[0], b[0])
    assert data.open_data(root, 8, enc, cache, seed=4).draw(n)[1] != data.open_data(root, 8, enc, cache, seed=3).draw(n)[1]
    assert enc.images == 5
    one_line_error(ValueError, lambda: ranks[0].draw(3), "3", "2 ranks")


def test_tiny_stream_parity_and_resume():
    """`tiny`: fresh rendered images with their prompts; 2 ranks see the 1-rank batch; resumable from the position."""
    one = data.open_data("tiny", 32, tiny.encode_images, None, seed=5)
    ranks = [data.open_data("tiny", 32, tiny.encode_images, None, seed=5, rank=r, world=2) for r in range(2)]
    z1, p1 = one.draw(6)
    parts = [r.draw(6) for r in ranks]
    assert p1 == parts[0][1] + parts[1][1] and torch.equal(z1, torch.cat([parts[0][0], parts[1][0]]))
    assert z1.shape == (6, 48, 8, 8) and tiny.prompt_adherence(tiny.decode_latents(z1), p1) == 1.0
    state = one.state_dict()
    z2, p2 = one.draw(6)
    again = data.open_data("tiny", 32, tiny.encode_images, None, seed=5)
    again.load_state_dict(state)
    z3, p3 = again.draw(6)
    assert p2 == p3 and torch.equal(z2, z3) and not torch.equal(z1, z2)


# ----------------------------------------------------------------------------------------------
# train.py --data: the two phases gain the adversarial terms; resume, ranks, the latent cache


GAN = ["--batch", "4", "--sample_every", "0", "--grad_checkpointing", "0", "--gan_g_start", "4",
       "--gan_adv_start", "8"]   # batch 4: iteration 1-2 the discriminator alone, 3 L_G, 4+ 0.5 L_G + 0.5 L_adv


def test_train_data_tiny_schedule_and_exact_resume(tmp_path):
    from test_train import ckpt, metrics, run
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(["--teacher", "tiny", "--data", "tiny", "--out", a, "--max_steps", "5"] + GAN)
    run(["--teacher", "tiny", "--data", "tiny", "--out", b, "--max_steps", "3"] + GAN)
    run(["--teacher", "tiny", "--data", "tiny", "--out", b, "--max_steps", "5", "--resume"] + GAN)
    c = str(tmp_path / "c")     # saving at every step, before G's first step too, changes nothing
    run(["--teacher", "tiny", "--data", "tiny", "--out", c, "--max_steps", "5", "--ckpt_every", "1"] + GAN)
    ma, mb = metrics(a), metrics(b)
    assert [(r["loss_fake"], r["loss_gen"]) for r in metrics(c)][2:] == [(r["loss_fake"], r["loss_gen"]) for r in ma][2:]
    for r in ma:
        print({k: r[k] for k in ("step", "k", "loss_fake", "loss_gen", "loss_sid", "loss_d", "loss_adv", "acc_real",
                                 "acc_fake", "w_sid", "w_adv")})
    assert [r["w_adv"] for r in ma] == [0, 0, 0, 0.5, 0.5] and [r["w_sid"] for r in ma] == [1, 1, 1, 0.5, 0.5]
    assert all(np.isnan(r["loss_gen"]) for r in ma[:2]) and all(np.isfinite(r["loss_gen"]) for r in ma[2:])
    assert all(r["loss_d"] > 0 for r in ma) and all(r["loss_adv"] > 0 for r in ma[2:])
    for r in ma[2:]:    # what G's backward saw: L_G alone, then the 0.5 / 0.5 mix
        assert r["loss_gen"] == pytest.approx(r["w_sid"] * r["loss_sid"] + r["w_adv"] * r["loss_adv"], rel=1e-6)
    for ra, rb in zip(ma, mb):
        assert [ra[k] for k in ("k", "loss_fake", "loss_d")] == [rb[k] for k in ("k", "loss_fake", "loss_d")]
        assert ra["loss_gen"] == rb["loss_gen"] or np.isnan(ra["loss_gen"]) and np.isnan(rb["loss_gen"])
    ca, cb, w0 = ckpt(a), ckpt(b), tl.load_teacher("tiny").transformer.state_dict()
    assert ca["data"] == cb["data"] == {"position": 5 * 4 * 1}      # 5 iterations x 1 round x batch 4
    for key in ("generator", "fake"):
        assert all(torch.equal(ca[key][n], cb[key][n]) for n in ca[key]), f"{key} differs after resume"
    assert max((ca["generator"][n] - w0[n]).abs().max() for n in w0) > 0


def test_train_data_tiny_two_ranks_match_one_rank(tmp_path):
    from test_train import metrics, run
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(["--teacher", "tiny", "--data", "tiny", "--out", one, "--max_steps", "4", "--precision", "fp32"] + GAN)
    run(["--teacher", "tiny", "--data", "tiny", "--out", two, "--max_steps", "4", "--precision", "fp32"] + GAN, nproc=2)
    for r1, r2 in zip(metrics(one), metrics(two)):
        print(r1["step"], [(r1[k], r2[k]) for k in ("loss_fake", "loss_d", "loss_gen", "loss_adv")])
        assert r1["k"] == r2["k"] and r1["acc_real"] == pytest.approx(r2["acc_real"], abs=0.02)
        for key in ("loss_fake", "loss_d", "loss_adv"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-4), key
        assert r1["loss_gen"] == pytest.approx(r2["loss_gen"], rel=1e-3, abs=1e-3, nan_ok=True)


def test_train_data_folder_is_encoded_once(tmp_path):
    """A folder of captioned PNGs, as a user brings it: encoded into <out>/latents once; --resume reads the same
    shards and encodes nothing; a bad folder is one line on stderr."""
    from test_train import bad, run
    root = tmp_path / "images"
    root.mkdir()
    prompts = tiny.ALL_PROMPTS[:6]
    images = tiny.render(prompts, torch.Generator().manual_seed(0))
    rows = []
    for i, (p, img) in enumerate(zip(prompts, images)):
        Image.fromarray(((img.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": p}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    run(["--teacher", "tiny", "--data", str(root), "--out", str(out), "--max_steps", "1"] + GAN)
    shards = sorted((f.name, f.stat().st_mtime_ns) for f in (out / "latents").iterdir())
    print("latent shards:", shards)
    assert len(shards) == 1 and shards[0][0].endswith(".safetensors")
    run(["--teacher", "tiny", "--data", str(root), "--out", str(out), "--max_steps", "2", "--resume"] + GAN)
    assert sorted((f.name, f.stat().st_mtime_ns) for f in (out / "latents").iterdir()) == shards
    (tmp_path / "empty").mkdir()
    bad(["--teacher", "tiny", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "x")] + GAN, tmp_path,
        "holds no images")
