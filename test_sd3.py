"""
SD3 / SD3.5 transformer (model.MMDiT) and its loaders checked against diffusers on tiny random checkpoints, offline,
fp32 on CPU.

    HF_HUB_OFFLINE=1 python -m pytest test_sd3.py -q        # ~10 s on 2 cores; add -s to see the numbers

What is compared (every parameter and the pos_embed table randomised with a fixed seed: weights N(0, 0.15), norm
weights 1 + N(0, 0.1)):
  - load_transformer on diffusers folders against diffusers SD3Transformer2DModel called with timestep = 1000 t:
    SD3-like (no qk-norm, single file), SD3.5-Medium-like (qk-norm, MMDiT-X dual attention, bf16 variant) and
    SD3.5-Large-like (qk-norm, sharded), on non-square latents smaller than pos_embed_max_size (centre crop):
    max error <= 1e-4 max|ref|; once more in bf16 against diffusers in bf16 (rel L2, cosine);
  - SAI single files (`model.diffusion_model.*` + a VAE tensor) synthesized by running SD3_ORIGINAL_KEYS backwards,
    cross-checked with diffusers' convert_sd3_transformer_checkpoint_to_diffusers (exact round trip);
  - the random-init pos_embed table against diffusers' buffer (bit-exact);
  - full-size tensor / parameter counts on the meta device, and the diffusers table mapping diffusers' full-size
    state dicts 1:1;
  - one-line errors on bad input.
diffusers is the reference implementation here only; the code under test does not import it.
"""

import copy
import json
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import teacher_loaders as tl
from model import MMDiT, SD3_CONFIGS, build_model, config_from_dict, config_to_dict
from test_sana import compare, one_line_error, rewrite

TINY = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=24,
            pos_embed_max_size=8)
CASES = {   # name: (diffusers kwargs, how the folder is saved, latent H x W)
    "SD3-like": (dict(), "single", (6, 10)),                                         # 3x5 of 8x8 patches
    # dual attention also on the last (context-pre-only) block, which diffusers allows
    "SD3.5-Medium-like": (dict(qk_norm="rms_norm", dual_attention_layers=(0, 2)), "bf16_variant", (16, 14)),
    "SD3.5-Large-like": (dict(qk_norm="rms_norm", num_layers=4), "sharded", (10, 4)),
}


def randomise(module, seed):
    """Every parameter and buffer random: norm weights 1 + N(0, 0.1), the rest N(0, 0.15) (the pos_embed table
    included, so a wrong crop cannot hide in a smooth table)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*module.named_parameters(), *module.named_buffers()]:
            owner = module.get_submodule(name.rpartition(".")[0])
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "Norm" in type(owner).__name__ else 0.15 * noise)
    return module.eval()


def tiny_diffusers_sd3(seed=0, **overrides):
    from diffusers import SD3Transformer2DModel
    return randomise(SD3Transformer2DModel(**{**TINY, **overrides}), seed)


def sd3_inputs(ref, size, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = ref.config
    x = torch.randn(2, c.in_channels, *size, generator=g).to(dtype)
    text = torch.randn(2, 7, c.joint_attention_dim, generator=g).to(dtype)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g).to(dtype)
    return x, torch.tensor([0.3, 0.85]), text, pooled


def run_both(ours, ref, size, dtype=torch.float32):
    x, t, text, pooled = sd3_inputs(ref, size, dtype=dtype)
    with torch.no_grad():
        expected = ref(x, text, pooled, 1000 * t).sample
        got = ours(x, t, text, pooled=pooled)
    return got, expected


# ----------------------------------------------------------------------------------------------
# Transformer: diffusers folders


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """case -> (our module, diffusers reference, folder), each CASES row saved as it says and loaded once."""
    from diffusers import SD3Transformer2DModel
    cache = {}

    def get(case):
        if case not in cache:
            kwargs, layout, _ = CASES[case]
            ref = tiny_diffusers_sd3(seed=len(case), **kwargs)
            folder = tmp_path_factory.mktemp("transformer")
            if layout == "bf16_variant":   # the reference reads the same bf16 file: both hold the same rounded weights
                ref.to(torch.bfloat16).save_pretrained(folder, variant="bf16")
                ref = SD3Transformer2DModel.from_pretrained(folder, variant="bf16", torch_dtype=torch.float32).eval()
                assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.bf16.safetensors"]
            else:
                ref.save_pretrained(folder, max_shard_size="20KB" if layout == "sharded" else "10GB")
            if layout == "sharded":
                assert "diffusion_pytorch_model.safetensors.index.json" in os.listdir(folder)
            cache[case] = tl.load_transformer(folder), ref, folder
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_transformer_matches_diffusers(case, loaded):
    ours, ref, _ = loaded(case)
    kwargs, _, size = CASES[case]
    cfg = ours.config
    assert isinstance(ours, MMDiT) and cfg.time_scale == 1000.0 and ours.x_embedder.weight.dtype == torch.float32
    assert (cfg.qk_norm, cfg.dual_attention_layers, cfg.depth) == (
        "qk_norm" in kwargs, kwargs.get("dual_attention_layers", ()), kwargs.get("num_layers", 3))
    got, expected = run_both(ours, ref, size)
    assert got.shape == (2, 16, *size) and got.is_contiguous()
    compare(f"transformer[{case}, latent {size}]", got, expected)


def test_bf16_matches_diffusers_bf16(loaded):
    """bf16 weights and activations on both sides, on the case with every feature: close by relative L2 and
    cosine (architectures.md 7.5)."""
    case = "SD3.5-Medium-like"
    _, ref, folder = loaded(case)
    ours = tl.load_transformer(folder, dtype=torch.bfloat16)
    got, expected = run_both(ours, copy.deepcopy(ref).to(torch.bfloat16), CASES[case][2], dtype=torch.bfloat16)
    _, fp32 = run_both(ours, ref, CASES[case][2])
    got, expected = got.float(), expected.float()
    rel = ((got - expected).norm() / expected.norm()).item()
    cos = F.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    ref_err = ((expected - fp32).norm() / fp32.norm()).item()
    print(f"bf16 ours vs diffusers bf16: rel L2 {rel:.2e}, cosine {cos:.6f} (diffusers bf16 vs fp32: rel L2 "
          f"{ref_err:.2e})")
    assert ours.x_embedder.weight.dtype == torch.bfloat16 and rel < 3e-2 and cos > 0.999


def test_pos_embed_init_matches_diffusers():
    """At random init our table is the shared sincos_pos_embed; diffusers builds its buffer its own way: bit-exact."""
    from diffusers import SD3Transformer2DModel
    for kw in (TINY, dict(TINY, sample_size=128, pos_embed_max_size=96, num_layers=1)):
        torch.manual_seed(0)
        ours = build_model(tl.sd3_config_from_diffusers(kw, "tiny"))
        ref = SD3Transformer2DModel(**kw).pos_embed.pos_embed
        print(f"pos_embed M={kw['pos_embed_max_size']}: shape {tuple(ref.shape)}, max|diff| "
              f"{(ours.pos_embed - ref).abs().max().item():.1e}")
        assert ours.pos_embed.shape == ref.shape and torch.equal(ours.pos_embed, ref)


def test_gradient_checkpointing_and_config_round_trip(loaded):
    """The checkpointed block loop gives the same gradients; the config survives a JSON round trip."""
    ours = loaded("SD3-like")[0]
    x, t, text, pooled = sd3_inputs(ours, (6, 10))
    grads = []
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        xg = x.clone().requires_grad_(True)
        ours(xg, t, text, pooled=pooled).square().sum().backward()
        grads.append(xg.grad)
    ours.gradient_checkpointing = False
    ours.zero_grad(set_to_none=True)
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().max() > 0
    assert list(ours.fsdp_units()) == list(ours.joint_blocks)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(ours.config)))) == ours.config


# ----------------------------------------------------------------------------------------------
# SAI single files (model.diffusion_model.*)


def to_sai(ref):
    """diffusers state dict -> SAI single-file keys: our diffusers table forwards, SD3_ORIGINAL_KEYS backwards;
    diffusers' own converter must undo it exactly."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    cfg = tl.sd3_config_from_diffusers(dict(ref.config), "tiny")
    ours, _, unmatched = tl.map_keys(ref.state_dict(), tl.sd3_diffusers_keys(cfg))
    assert not unmatched
    sai = tl.to_checkpoint(ours, tl.SD3_ORIGINAL_KEYS)
    assert all(k.startswith("model.diffusion_model.") for k in sai)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    return sai


@pytest.mark.parametrize("case", ["SD3.5-Medium-like", "SD3-like"])
def test_sai_single_file_matches_diffusers(case, tmp_path):
    # without qk-norm the file does not store the head size: the loader takes SAI's 64
    kwargs = dict(CASES[case][0], **({} if "qk_norm" in CASES[case][0] else dict(attention_head_dim=64,
                                                                                   num_attention_heads=2,
                                                                                   caption_projection_dim=128)))
    ref = tiny_diffusers_sd3(seed=7, **kwargs)
    sai = to_sai(ref)
    extra = {"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 16, 3, 3),   # loaded by the VAE loader
             "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    path = str(tmp_path / "sd3_tiny.safetensors")
    save_file({**sai, **extra}, path)
    ours = tl.load_transformer(path)
    # the file does not store sample_size (it only shapes a random-init table): the loader assumes the releases' 128
    assert ours.config == replace(tl.sd3_config_from_diffusers(dict(ref.config), "tiny"), sample_size=128)
    got, expected = run_both(ours, ref, CASES[case][2])
    compare(f"SAI single file[{case}]", got, expected)


# ----------------------------------------------------------------------------------------------
# Full size on the meta device

# the Hub config.json of the stabilityai SD3 / SD3.5 repos (architectures.md section 2.1)
HUB_CONFIG = dict(_class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                  attention_head_dim=64, joint_attention_dim=4096, pooled_projection_dim=2048)
FULL_SIZE = {   # preset: (diffusers config, official tensors, official parameters in billions)
    "SD3-Medium": (dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
                   683, 2.085),
    "SD3.5-Medium": (dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                          qk_norm="rms_norm", dual_attention_layers=list(range(13))), 909, 2.470),
    "SD3.5-Large": (dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                         qk_norm="rms_norm"), 1227, 8.146),
}


@pytest.mark.parametrize("preset", list(FULL_SIZE))
def test_full_size_counts(preset):
    """Meta-device builds: our preset, the config our loader derives, and diffusers agree key by key."""
    from diffusers import SD3Transformer2DModel
    d, tensors, billions = FULL_SIZE[preset]
    cfg = tl.sd3_config_from_diffusers({**HUB_CONFIG, **d}, preset)
    assert cfg == SD3_CONFIGS[preset]
    with torch.device("meta"):
        ours, ref = MMDiT(cfg), SD3Transformer2DModel(**{k: v for k, v in {**HUB_CONFIG, **d}.items() if k[0] != "_"})
    own, ref_state = ours.state_dict(), ref.state_dict()
    mapped, _, unmatched = tl.map_keys(ref_state, tl.sd3_diffusers_keys(cfg))
    print(f"{preset}: ours {len(own)} tensors / {sum(v.numel() for v in own.values()) / 1e9:.4f} B, diffusers "
          f"{len(ref_state)} / {sum(v.numel() for v in ref_state.values()) / 1e9:.4f} B")
    assert not unmatched and mapped.keys() == own.keys()
    assert all(mapped[k].shape == own[k].shape for k in own)
    for state in (own, ref_state):
        assert len(state) == tensors
        assert round(sum(v.numel() for v in state.values()) / 1e9, 3) == billions
    D, M, last = cfg.width, cfg.pos_embed_max_size, cfg.depth - 1
    assert own["pos_embed"].shape == (1, M * M, D)
    assert own["joint_blocks.0.x_mod.weight"].shape == ((9 if cfg.dual_attention_layers else 6) * D, D)
    assert own[f"joint_blocks.{last}.context_mod.weight"].shape == (2 * D, D)
    assert f"joint_blocks.{last}.context_attn.to_out.weight" not in own
    if preset == "SD3-Medium":   # architectures.md 7.3
        assert (own["pos_embed"].shape, own["joint_blocks.0.x_mod.weight"].shape) == ((1, 36864, 1536), (9216, 1536))


# ----------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the problem and the fix


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformer")
    tiny_diffusers_sd3(seed=11, qk_norm="rms_norm").save_pretrained(folder)
    return folder


def test_bad_inputs(saved, tmp_path):
    one_line_error(FileNotFoundError, lambda: tl.load_transformer(tmp_path / "nothing"), "does not exist")
    (tmp_path / "empty").mkdir()
    with open(tmp_path / "empty" / "config.json", "w") as f:
        json.dump(json.load(open(saved / "config.json")), f)
    one_line_error(FileNotFoundError, lambda: tl.load_transformer(tmp_path / "empty"), "no safetensors weights")
    tiny_diffusers_sd3(seed=11).save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    shards = sorted(f for f in os.listdir(tmp_path / "shards") if f.endswith(".safetensors"))
    os.remove(tmp_path / "shards" / shards[1])
    one_line_error(FileNotFoundError, lambda: tl.load_transformer(tmp_path / "shards"), shards[1], "is missing")

    key = "transformer_blocks.2.norm1_context.linear.weight"      # the swapped row: still named as diffusers names it
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(saved, tmp_path / "a", edit=lambda s: s.pop(key))),
                   "1 missing keys", key)
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(saved, tmp_path / "b", edit=lambda s: s.update(
        {key: torch.zeros(96, 32)}))), key, "(96, 32)", "(64, 32)", "config.json")
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(saved, tmp_path / "c", edit=lambda s: s.update(
        {"transformer_blocks.0.attn.to_k.weight": torch.zeros(32, 31)}))), "to_k.weight", "(32, 31)", "(32, 32)")
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(saved, tmp_path / "d", {"qk_norm": "layer_norm"})),
                   "qk_norm='layer_norm'", "not supported")
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(saved, tmp_path / "e", {
        "caption_projection_dim": 48})), "caption_projection_dim 48", "32")

    ours = tl.load_transformer(saved)
    x, t, text, pooled = sd3_inputs(ours, (6, 10))
    one_line_error(ValueError, lambda: ours(x[..., :5], t, text, pooled=pooled), "6x5", "patch size 2")
    one_line_error(ValueError, lambda: ours(torch.zeros(2, 16, 18, 10), t, text, pooled=pooled),
                   "9x5", "pos_embed_max_size 8", "16x16")
    one_line_error(ValueError, lambda: ours(x, t, text), "pooled")

    sai = to_sai(tiny_diffusers_sd3(seed=11, qk_norm="rms_norm"))
    gone = "model.diffusion_model.joint_blocks.1.context_block.attn.qkv.weight"
    save_file({k: v for k, v in sai.items() if k != gone}, tmp_path / "sai.safetensors")
    one_line_error(ValueError, lambda: tl.load_transformer(tmp_path / "sai.safetensors"), "missing keys", gone)
    save_file({k: v for k, v in sai.items() if "pos_embed" not in k}, tmp_path / "sai2.safetensors")
    one_line_error(ValueError, lambda: tl.load_transformer(tmp_path / "sai2.safetensors"), "pos_embed",
                   "not a complete SAI")
