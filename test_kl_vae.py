"""
Tests for the AutoencoderKL of vae.py (the 16-channel VAE of SD3, SD3.5 and FLUX) and its loaders in
teacher_loaders.py, against diffusers `AutoencoderKL` on tiny random checkpoints.

    python -m pytest test_kl_vae.py -q        # add -s to see the max errors and first values

diffusers is the reference here only (vae.py and teacher_loaders.py never import it). Every parameter is
randomised with a fixed seed (weights N(0, 0.15), GroupNorm weights 1 + N(0, 0.1)); the tiny config is the one
of architectures.md §7.2 with four stages, so the factor is 8 as in SD3/FLUX, and the images are non-square.
Layouts: diffusers folders written by save_pretrained (single file, sharded, bf16 variant), and original files
(SAI `first_stage_model.*` beside transformer junk, BFL unprefixed) whose layout is produced by an inverse written
here and checked by diffusers' own `convert_ldm_vae_checkpoint`. Tolerance: max abs error <= 1e-4 * max|reference|
in fp32 on CPU.
"""

import copy
import json
import os
import re
from dataclasses import replace
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from teacher_loaders import (KL_DIFFUSERS_KEYS, kl_config_from_original, kl_original_keys, kl_teacher_codec,
                             load_kl_vae, map_keys, to_checkpoint)
from vae import KL_CONFIGS, KLVAE, kl_config_from_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, FluxImg2ImgPipeline, StableDiffusion3InpaintPipeline  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

# architectures.md §7.2 with 4 stages (factor 8); widths change 32 -> 64 (an encoder and a decoder 1x1 shortcut);
# SD3's scaling and shift
TINY = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[32, 64, 64, 64], layers_per_block=2, latent_channels=16, norm_num_groups=32,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)

# an SD1/SDXL-style variant: quant convs, 4 latent channels, other norm groups, 1 layer per block, no shift
TINY_QUANT = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  block_out_channels=[8, 16, 16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  use_quant_conv=True, use_post_quant_conv=True, scaling_factor=0.18215)

# the architecture keys of stabilityai/stable-diffusion-3-medium-diffusers vae/config.json (FLUX.1-dev's differs
# only in scaling_factor 0.3611 and shift_factor 0.1159)
SD3_CONFIG_JSON = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "out_channels": 3, "latent_channels": 16, "latents_mean": None,
    "latents_std": None, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False,
}
FLUX_CONFIG_JSON = {**SD3_CONFIG_JSON, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                    "mid_block_add_attention": True}

SAI_PREFIX = "first_stage_model."


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
        # decoded images mostly inside [-1, 1], so the codec's clamp hides nothing
        model.decoder.conv_out.weight.mul_(0.2)
        model.decoder.conv_out.bias.mul_(0.2)
    return model.eval()


def reference(kwargs, seed=0):
    torch.manual_seed(seed)
    return randomise(AutoencoderKL(**kwargs), seed)


def compare(name, ours, ref):
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{name}: max|err| {err:.3e}, max|ref| {scale:.3e}, ours {ours.flatten()[:3].tolist()}, "
          f"ref {ref.flatten()[:3].tolist()}")
    assert ours.shape == ref.shape
    assert err <= 1e-4 * scale, f"{name}: max error {err:.3e} > 1e-4 * {scale:.3e}"


def ldm_from_diffusers(sd, stages):
    """The original LDM/BFL layout of a diffusers AutoencoderKL state dict, written independently of
    kl_original_keys (and checked against diffusers' converter in test_original_layout_matches_diffusers)."""
    up = lambda m: f"decoder.up.{stages - 1 - int(m[1])}."            # LDM numbers up stages by width
    subs = [(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
            (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
            (r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block."),
            (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample."),
            (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.resnets\.1\.", "mid.block_2."),
            (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
            (r"mid_block\.attentions\.0\.to_([qkv])\.", r"mid.attn_1.\1."),
            (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
            (r"conv_shortcut", "nin_shortcut"), (r"conv_norm_out", "norm_out")]
    out = {}
    for key, value in sd.items():
        for pattern, repl in subs:
            key = re.sub(pattern, repl, key)
        is_attn_linear = re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key)
        out[key] = value[:, :, None, None] if is_attn_linear else value     # 1x1 convs there
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The reference model and its folders: plain, sharded, bf16-variant-only."""
    ref = reference(TINY)
    root = tmp_path_factory.mktemp("klvae")
    ref.save_pretrained(root / "plain")
    ref.save_pretrained(root / "sharded", max_shard_size="200KB")
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(root / "bf16", variant="bf16")
    ours, scaling, shift = load_kl_vae(root / "plain")
    return ref, ours, root


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return {hw: torch.rand(2, 3, *hw, generator=g) * 2 - 1 for hw in [(24, 40), (16, 8)]}


def tiny_cfg(scaling_factor, shift_factor):
    return kl_config_from_diffusers({**TINY, "scaling_factor": scaling_factor, "shift_factor": shift_factor})


# ----------------------------------------------------------------------------------------------
# Equivalence


@pytest.mark.parametrize("hw", [(24, 40), (16, 8)])
def test_matches_diffusers(tiny, images, hw):
    ref, ours, root = tiny
    _, scaling, shift = load_kl_vae(root / "plain")
    assert (scaling, shift) == (1.5305, 0.0609)
    img = images[hw]
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        compare(f"encode mean {hw}", ours.encode(img), dist.mean)
        sample = ours.encode(img, sample=True, generator=torch.Generator().manual_seed(5))
        compare(f"encode sample {hw}", sample, dist.sample(generator=torch.Generator().manual_seed(5)))
        assert (sample - dist.mean).abs().mean() > 0.1 * dist.std.mean()      # the noise is really there
        z = torch.randn(2, 16, hw[0] // 8, hw[1] // 8, generator=torch.Generator().manual_seed(2))
        compare(f"decode {hw}", ours.decode(z), ref.decode(z).sample)


def test_quant_conv_variant(tmp_path):
    ref = reference(TINY_QUANT, seed=3)
    ref.save_pretrained(tmp_path)
    ours, scaling, shift = load_kl_vae(tmp_path)
    assert (scaling, shift) == (0.18215, 0.0) and ours.quant_conv is not None
    g = torch.Generator().manual_seed(3)
    img, z = torch.rand(1, 3, 32, 16, generator=g) * 2 - 1, torch.randn(1, 4, 4, 2, generator=g)
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        compare("quant encode mean", ours.encode(img), dist.mean)
        compare("quant encode sample", ours.encode(img, sample=True, generator=torch.Generator().manual_seed(6)),
                dist.sample(generator=torch.Generator().manual_seed(6)))
        compare("quant decode", ours.decode(z), ref.decode(z).sample)


def test_sharded_and_bf16_variant_folders(tiny):
    ref, _, root = tiny
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1, "fixture did not shard"
    ref_sd = map_keys(ref.state_dict(), KL_DIFFUSERS_KEYS)[0]
    sharded = load_kl_vae(root / "sharded")[0]
    for k, v in sharded.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    only_bf16 = load_kl_vae(root / "bf16")[0]                   # found without naming the variant
    for k, v in only_bf16.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, ref_sd[k].bfloat16().float()), k


def test_bf16_run_close_to_fp32_reference(tiny, images):
    ref, _, root = tiny
    ours = load_kl_vae(root / "plain", dtype=torch.bfloat16)[0]
    img = images[(16, 8)]
    with torch.no_grad():
        z_ref = ref.encode(img).latent_dist.mean
        z, x, x_ref = ours.encode(img).float(), ours.decode(z_ref).float(), ref.decode(z_ref).sample
    for name, a, b in [("encode", z, z_ref), ("decode", x, x_ref)]:
        rel = ((a - b).norm() / b.norm()).item()
        print(f"bf16 {name}: rel L2 {rel:.3e}")
        assert rel < 3e-2


# ----------------------------------------------------------------------------------------------
# Original layouts: SAI single files (first_stage_model.*) and BFL ae.safetensors


def test_original_layout_matches_diffusers(tiny):
    """Our LDM table, run backwards, writes exactly the file diffusers' converter turns into the reference."""
    ref, ours, _ = tiny
    ref_sd = ref.state_dict()
    ldm = ldm_from_diffusers(ref_sd, stages=4)
    converted = convert_ldm_vae_checkpoint({SAI_PREFIX + k: v for k, v in ldm.items()}, dict(ref.config))
    assert converted.keys() == ref_sd.keys()
    assert all(torch.equal(converted[k], ref_sd[k]) for k in ref_sd), "the test's inverse disagrees with diffusers"
    cfg = tiny_cfg(1.5305, 0.0609)
    for prefix in ("", SAI_PREFIX):
        exported = to_checkpoint(ours.state_dict(), kl_original_keys(cfg, prefix))
        assert exported.keys() == {prefix + k for k in ldm}
        assert all(torch.equal(exported[prefix + k], v) for k, v in ldm.items())
    assert kl_config_from_original(ldm, "ldm") == tiny_cfg(1.0, 0.0)   # the factors are not in the file


@pytest.mark.parametrize("layout", ["sai", "bfl"])
def test_original_files(tiny, images, tmp_path, layout):
    ref, _, _ = tiny
    ldm = ldm_from_diffusers(ref.state_dict(), stages=4)
    if layout == "sai":   # the VAE beside the transformer and text encoders of an SD3 single file
        state = {SAI_PREFIX + k: v for k, v in ldm.items()}
        state.update({"model.diffusion_model.x_embedder.proj.weight": torch.zeros(2, 16, 2, 2),
                      "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(3)})
        prefix, scale_shift = SAI_PREFIX, (1.5305, 0.0609)
    else:
        state, prefix, scale_shift = ldm, "", (0.3611, 0.1159)
    path = tmp_path / f"{layout}.safetensors"
    save_file(state, path)
    ours, scaling, shift = load_kl_vae(path, prefix=prefix, config=tiny_cfg(*scale_shift))
    assert (scaling, shift) == scale_shift
    ref_sd = map_keys(ref.state_dict(), KL_DIFFUSERS_KEYS)[0]
    assert ours.state_dict().keys() == ref_sd.keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    img = images[(24, 40)]
    with torch.no_grad():
        compare(f"{layout} encode", ours.encode(img), ref.encode(img).latent_dist.mean)
    from_dict = load_kl_vae(state, prefix=prefix, config=tiny_cfg(*scale_shift))[0]   # a state dict works too
    assert all(torch.equal(v, ref_sd[k]) for k, v in from_dict.state_dict().items())


# ----------------------------------------------------------------------------------------------
# Teacher latents: x0 = (z - shift) * scaling, as the SD3 and FLUX pipelines normalise


@pytest.mark.parametrize("family,pipeline,scaling,shift", [
    ("sd3", StableDiffusion3InpaintPipeline, 1.5305, 0.0609), ("flux", FluxImg2ImgPipeline, 0.3611, 0.1159)])
def test_teacher_latents_match_pipelines(tiny, images, family, pipeline, scaling, shift):
    ref, ours, _ = tiny
    assert (KL_CONFIGS[family].scaling_factor, KL_CONFIGS[family].shift_factor) == (scaling, shift)
    encode, decode = kl_teacher_codec(ours, scaling, shift)
    # the pipeline's own encode code (its VAE stands in, with this family's factors)
    piped = SimpleNamespace(vae=SimpleNamespace(encode=ref.encode, config=SimpleNamespace(
        scaling_factor=scaling, shift_factor=shift)))
    img = images[(24, 40)]
    with torch.no_grad():
        x0_ref = pipeline._encode_vae_image(piped, img, torch.Generator().manual_seed(7))
        x0 = encode(img, generator=torch.Generator().manual_seed(7))
        compare(f"{family} teacher encode", x0, x0_ref)
        # StableDiffusion3Pipeline / FluxPipeline.__call__ decode: latents / scaling_factor + shift_factor
        # (pipeline_stable_diffusion_3.py, pipeline_flux.py), then postprocess clamps to [-1, 1]
        x0 = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(8))
        img_ref = ref.decode(x0 / scaling + shift).sample
        print(f"{family}: {(img_ref.abs() > 1).float().mean():.1%} of the reference pixels clamped")
        compare(f"{family} teacher decode", decode(x0), img_ref.clamp(-1, 1))


# ----------------------------------------------------------------------------------------------
# Full size (meta device, no weights)


def test_full_size_counts_and_keys():
    assert kl_config_from_diffusers(SD3_CONFIG_JSON) == KL_CONFIGS["sd3"]
    assert kl_config_from_diffusers(FLUX_CONFIG_JSON) == KL_CONFIGS["flux"]
    cfg = KL_CONFIGS["sd3"]
    kwargs = {k: v for k, v in SD3_CONFIG_JSON.items() if not k.startswith("_")}
    with torch.device("meta"):
        ours = KLVAE(cfg).state_dict()
        ref = AutoencoderKL(**kwargs).state_dict()
    n_params = sum(v.numel() for v in ours.values())
    print(f"AutoencoderKL-16: {len(ours)} tensors, {n_params / 1e6:.3f} M params")
    assert len(ours) == 244 and abs(n_params - 83.8e6) < 0.1e6
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}
    # the diffusers table maps every full-size tensor onto ours with the same shape, and back
    mapped, _, unmatched = map_keys(ref, KL_DIFFUSERS_KEYS)
    assert not unmatched and shapes(mapped) == shapes(ours)
    assert to_checkpoint(mapped, KL_DIFFUSERS_KEYS).keys() == ref.keys()
    # the original table, run backwards, is what diffusers' converter turns into the diffusers layout
    sai = to_checkpoint(ours, kl_original_keys(cfg, SAI_PREFIX))
    assert shapes(convert_ldm_vae_checkpoint(sai, kwargs)) == shapes(ref)
    assert sai[SAI_PREFIX + "decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sai[SAI_PREFIX + "decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    # the shapes give the architecture; the factors are not stored (KLConfig's neutral defaults)
    assert kl_config_from_original(sai, "sai", SAI_PREFIX) == replace(cfg, scaling_factor=1.0, shift_factor=0.0)


# ----------------------------------------------------------------------------------------------
# Bad inputs: one-line errors that name the problem


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def copy_folder(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(edit(load_file(src / "diffusion_pytorch_model.safetensors")), dst / "diffusion_pytorch_model.safetensors")
    return dst


def test_missing_key_and_wrong_shape(tiny, tmp_path):
    ref, _, root = tiny
    key = "decoder.up_blocks.1.upsamplers.0.conv.weight"
    folder = copy_folder(root / "plain", tmp_path / "missing", lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError) as e:
        load_kl_vae(folder)
    assert key in one_line(e)
    key = "encoder.mid_block.attentions.0.to_k.weight"
    folder = copy_folder(root / "plain", tmp_path / "shape", lambda sd: {**sd, key: torch.zeros(64, 63)})
    with pytest.raises(ValueError) as e:
        load_kl_vae(folder)
    assert key in one_line(e) and "(64, 63)" in one_line(e)
    # original file: the error names the file's own (prefixed, LDM) key
    ldm = {SAI_PREFIX + k: v for k, v in ldm_from_diffusers(ref.state_dict(), 4).items()}
    key = SAI_PREFIX + "decoder.up.2.block.1.conv1.bias"
    with pytest.raises(ValueError) as e:
        load_kl_vae({k: v for k, v in ldm.items() if k != key}, prefix=SAI_PREFIX, config=tiny_cfg(1.0, 0.0))
    assert key in one_line(e)


def test_bad_original_arguments(tiny):
    ref, _, root = tiny
    ldm = ldm_from_diffusers(ref.state_dict(), 4)
    sai = {SAI_PREFIX + k: v for k, v in ldm.items()}
    cases = [(dict(source=ldm), "config='sd3'"),                                        # the factors are not stored
             (dict(source=ldm, config="sdxl"), "unknown KL VAE preset"),
             (dict(source=ldm, config="sd3"), "block_out_channels (32, 64, 64, 64)"),   # preset of another size
             (dict(source=sai, config=tiny_cfg(1.0, 0.0)), "prefix='first_stage_model.'"),   # forgot the prefix
             (dict(source=ldm, prefix=SAI_PREFIX, config=tiny_cfg(1.0, 0.0)), "prefix="),
             (dict(source=ldm, config=tiny_cfg(1.0, 0.0), variant="bf16"), "variant="),
             (dict(source=root / "plain", config="sd3"), "config.json")]
    for kwargs, expected in cases:
        with pytest.raises(ValueError) as e:
            load_kl_vae(**kwargs)
        assert expected in one_line(e), (kwargs.keys(), one_line(e))


def test_bad_config_and_image(tiny, tmp_path):
    _, ours, _ = tiny
    for edit, expected in [({"act_fn": "gelu"}, "act_fn"), ({"up_block_types": ["AttnUpDecoderBlock2D"] * 4},
                           "up_block_types"), ({"mid_block_add_attention": False}, "mid_block_add_attention"),
                           ({"latents_mean": [0.0] * 16}, "latents_mean"), ({"norm_num_groups": 24}, "norm_num_groups"),
                           ({"_class_name": "AutoencoderDC"}, "AutoencoderDC")]:
        with pytest.raises(ValueError) as e:
            kl_config_from_diffusers({**SD3_CONFIG_JSON, **edit})
        assert expected in one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        load_kl_vae(tmp_path / "nope")
    assert "config.json" in one_line(e)
    for img in (torch.zeros(1, 3, 20, 40), torch.zeros(1, 3, 24, 36)):
        with pytest.raises(ValueError) as e:
            ours.encode(img)
        assert "divisible" in one_line(e)
    with pytest.raises(ValueError) as e:
        ours.encode(torch.zeros(1, 3, 8, 8), generator=torch.Generator())
    assert "sample=True" in one_line(e)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**SD3_CONFIG_JSON, "act_fn": "relu"}))
    with pytest.raises(ValueError) as e:
        load_kl_vae(tmp_path / "cfg")
    assert "act_fn" in one_line(e)
