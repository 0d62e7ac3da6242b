"""
Tests for vae.py: our DC-AE against diffusers `AutoencoderDC` on tiny random checkpoints.

    python -m pytest test_vae.py -q        # add -s to see the max errors and first values

diffusers is the reference here only (vae.py never imports it). Every parameter is randomised with a fixed
seed (weights N(0, 0.15), norm weights 1 + N(0, 0.1)) so chunk-order and transposition bugs cannot hide;
the folders are written by diffusers' own save_pretrained (single file, sharded, bf16 variant) and read
back through load_dcae. Tolerance: max abs error <= 1e-4 * max|reference| in fp32 on CPU.
"""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae
from teacher_loaders import DCAE_DIFFUSERS_KEYS, load_dcae, map_keys, to_checkpoint
from vae import DCAE, DCAE_CONFIGS, dcae_config_from_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderDC  # noqa: E402
from diffusers.models.attention_processor import SanaMultiscaleLinearAttention  # noqa: E402

# architectures.md §7.2; the linear/quadratic switch happens at latent H*W vs attention_head_dim = 4
TINY = dict(in_channels=3, latent_channels=8, attention_head_dim=4,
            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
            encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
            encoder_layers_per_block=(1, 1, 2), decoder_layers_per_block=(1, 1, 2),
            downsample_block_type="conv", upsample_block_type="interpolate",
            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)

# the other resampling pair, per-stage decoder activations, an attention stage without and one with two
# aggregation scales, both shortcuts off
TINY_SHUFFLE = dict(TINY, encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                    decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                    encoder_qkv_multiscales=((), (), (5, 3)), decoder_qkv_multiscales=((), (), (5, 3)),
                    downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
                    decoder_act_fns=("relu", "silu", "gelu"), decoder_conv_act_fn="silu",
                    encoder_out_shortcut=False, decoder_in_shortcut=False, scaling_factor=1.0)

# the architecture keys of mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers config.json (note "Conv")
SANA_CONFIG_JSON = {
    "_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "interpolate", "downsample_block_type": "Conv", "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu", "scaling_factor": 0.41407,
}


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = name.endswith("norm.weight") or name.endswith("norm_out.weight")
            p.copy_(1 + 0.1 * noise if is_norm_weight else 0.15 * noise)
    return model.eval()


def reference(kwargs, seed=0):
    torch.manual_seed(seed)
    return randomise(AutoencoderDC(**kwargs), seed)


def compare(name, ours, ref):
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{name}: max|err| {err:.3e}, max|ref| {scale:.3e}, ours {ours.flatten()[:4].tolist()}, "
          f"ref {ref.flatten()[:4].tolist()}")
    assert ours.shape == ref.shape
    assert err <= 1e-4 * scale, f"{name}: max error {err:.3e} > 1e-4 * {scale:.3e}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The reference model and its folders: plain, sharded, bf16-variant-only (single file and sharded)."""
    ref = reference(TINY)
    root = tmp_path_factory.mktemp("dcae")
    ref.save_pretrained(root / "plain")
    ref.save_pretrained(root / "sharded", max_shard_size="20KB")
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    ref_bf16.save_pretrained(root / "bf16", variant="bf16")
    ref_bf16.save_pretrained(root / "bf16_sharded", variant="bf16", max_shard_size="50KB")
    return ref, root


@pytest.fixture
def attention_paths(monkeypatch):
    """Counts which of the two attention forms the reference and ours ran (both compute the same function,
    so matching outputs alone would not show that ours switched)."""
    calls = {"ref linear": 0, "ref quadratic": 0, "ours linear": 0, "ours quadratic": 0}

    def count(kind, fn):
        def wrapped(*a):
            calls[kind] += 1
            return fn(*a)
        return wrapped

    attn = SanaMultiscaleLinearAttention
    monkeypatch.setattr(attn, "apply_linear_attention", count("ref linear", attn.apply_linear_attention))
    monkeypatch.setattr(attn, "apply_quadratic_attention", count("ref quadratic", attn.apply_quadratic_attention))
    monkeypatch.setattr(vae, "linear_attention", count("ours linear", vae.linear_attention))
    monkeypatch.setattr(vae, "quadratic_attention", count("ours quadratic", vae.quadratic_attention))
    return calls


# ----------------------------------------------------------------------------------------------
# Equivalence


# image sizes; the attention runs at the latent (H/4, W/4): 16 and 8 pixels > 4 -> linear; 4 and 2 -> quadratic
@pytest.mark.parametrize("hw,path", [((16, 16), "linear"), ((8, 16), "linear"), ((8, 8), "quadratic"),
                                     ((4, 8), "quadratic")])
def test_matches_diffusers(tiny, attention_paths, hw, path):
    ref, root = tiny
    ours, scaling = load_dcae(root / "plain")
    assert scaling == pytest.approx(0.41407)
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, *hw, generator=g) * 2 - 1
    z = torch.randn(2, 8, hw[0] // 4, hw[1] // 4, generator=g)
    with torch.no_grad():
        compare(f"encode {hw}", ours.encode(img), ref.encode(img).latent)
        compare(f"decode {hw}", ours.decode(z), ref.decode(z).sample)
    other = "quadratic" if path == "linear" else "linear"
    for who in ("ref", "ours"):     # 2 EfficientViT blocks each in encoder and decoder
        assert attention_paths[f"{who} {path}"] == 4 and attention_paths[f"{who} {other}"] == 0, attention_paths


def test_matches_diffusers_shuffle_variant(tmp_path):
    ref = reference(TINY_SHUFFLE, seed=3)
    ref.save_pretrained(tmp_path)
    ours, scaling = load_dcae(tmp_path)
    assert scaling == 1.0
    g = torch.Generator().manual_seed(2)
    for hw in [(16, 8), (4, 4)]:            # linear and quadratic at the last stage
        img = torch.rand(1, 3, *hw, generator=g) * 2 - 1
        z = torch.randn(1, 8, hw[0] // 4, hw[1] // 4, generator=g)
        with torch.no_grad():
            compare(f"shuffle encode {hw}", ours.encode(img), ref.encode(img).latent)
            compare(f"shuffle decode {hw}", ours.decode(z), ref.decode(z).sample)


def test_sharded_and_bf16_variant_folders(tiny):
    ref, root = tiny
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1, "fixture did not shard"
    ref_sd = map_keys(ref.state_dict(), DCAE_DIFFUSERS_KEYS)[0]
    sharded, _ = load_dcae(root / "sharded")
    for k, v in sharded.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    for folder in ("bf16", "bf16_sharded"):                     # found without naming the variant
        only_bf16, _ = load_dcae(root / folder)
        for k, v in only_bf16.state_dict().items():
            assert v.dtype == torch.float32 and torch.equal(v, ref_sd[k].bfloat16().float()), (folder, k)


def test_bf16_run_close_to_fp32_reference(tiny):
    ref, root = tiny
    ours, _ = load_dcae(root / "plain", dtype=torch.bfloat16)
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        z, z_ref = ours.encode(img).float(), ref.encode(img).latent
        x, x_ref = ours.decode(z_ref).float(), ref.decode(z_ref).sample
    for name, a, b in [("encode", z, z_ref), ("decode", x, x_ref)]:
        rel = ((a - b).norm() / b.norm()).item()
        print(f"bf16 {name}: rel L2 {rel:.3e}")
        assert rel < 3e-2


# ----------------------------------------------------------------------------------------------
# Full size (meta device, no weights)


def test_sana_full_size_counts_and_keys():
    cfg = dcae_config_from_diffusers(SANA_CONFIG_JSON)
    assert cfg == DCAE_CONFIGS["dc-ae-f32c32-sana-1.0"]
    with torch.device("meta"):
        ours = DCAE(cfg).state_dict()
        ref = AutoencoderDC(**{k: v for k, v in SANA_CONFIG_JSON.items() if not k.startswith("_")}).state_dict()
    n_params = sum(v.numel() for v in ours.values())
    print(f"DC-AE f32c32: {len(ours)} tensors, {n_params / 1e6:.3f} M params")
    assert len(ours) == 375 and abs(n_params - 312.3e6) < 0.1e6
    # the key table maps every full-size diffusers tensor onto ours with the same shape, and back
    mapped, _, unmatched = map_keys(ref, DCAE_DIFFUSERS_KEYS)
    assert not unmatched and {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert to_checkpoint(mapped, DCAE_DIFFUSERS_KEYS).keys() == ref.keys()
    assert ours["encoder.down_blocks.3.0.attn.aggreg.0.proj_out.weight"].shape == (1536, 32, 1, 1)  # §7.3
    assert ours["encoder.down_blocks.3.0.attn.to_out.weight"].shape == (512, 1024)


# ----------------------------------------------------------------------------------------------
# Bad inputs: one-line errors that name the problem


def copy_folder(src, dst, edit=None):
    """dst = src's config.json and weights, the state dict passed through `edit`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "diffusion_pytorch_model.safetensors")
    save_file(edit(sd) if edit else sd, dst / "diffusion_pytorch_model.safetensors")
    return dst


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_folder_and_weights(tmp_path, tiny):
    _, root = tiny
    with pytest.raises(FileNotFoundError) as e:
        load_dcae(tmp_path / "nope")
    assert "config.json" in one_line(e)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((root / "plain" / "config.json").read_text())
    with pytest.raises(FileNotFoundError) as e:
        load_dcae(tmp_path / "empty")
    assert "diffusion_pytorch_model.safetensors" in one_line(e)
    for variant in ("bf16", "fp16"):                           # two variants, no plain file: ambiguous
        (tmp_path / "empty" / f"diffusion_pytorch_model.{variant}.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as e:
        load_dcae(tmp_path / "empty")
    assert "variant=" in one_line(e)
    (tmp_path / "empty" / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError) as e:
        load_dcae(tmp_path / "empty")
    assert "not a readable safetensors file" in one_line(e)


def test_missing_key(tmp_path, tiny):
    _, root = tiny
    key = "encoder.down_blocks.2.0.conv_out.conv_point.weight"
    folder = copy_folder(root / "plain", tmp_path / "f", lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError) as e:
        load_dcae(folder)
    assert key in one_line(e)


def test_wrong_shape_and_unexpected_key(tmp_path, tiny):
    _, root = tiny
    key = "decoder.up_blocks.2.1.attn.to_q.weight"
    folder = copy_folder(root / "plain", tmp_path / "shape", lambda sd: {**sd, key: torch.zeros(32, 31)})
    with pytest.raises(ValueError) as e:
        load_dcae(folder)
    msg = one_line(e)
    assert key in msg and "(32, 31)" in msg and "(32, 32)" in msg
    folder = copy_folder(root / "plain", tmp_path / "extra", lambda sd: {**sd, "encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError) as e:
        load_dcae(folder)
    assert "encoder.extra.weight" in one_line(e)


def test_unsupported_config(tmp_path):
    with pytest.raises(ValueError) as e:
        dcae_config_from_diffusers({**SANA_CONFIG_JSON, "downsample_block_type": "avgpool"})
    assert "downsample_block_type" in one_line(e)
    with pytest.raises(ValueError) as e:
        dcae_config_from_diffusers({**SANA_CONFIG_JSON, "decoder_norm_types": "batch_norm"})
    assert "batch_norm" in one_line(e)
    with torch.device("meta"):
        vae = DCAE(DCAE_CONFIGS["dc-ae-f32c32-sana-1.0"])
    with pytest.raises(ValueError) as e:
        vae.encode(torch.zeros(1, 3, 48, 48, device="meta"))
    assert "divisible" in one_line(e)
