"""
FLUX.1 transformer (model.Flux) and its loaders checked against diffusers on tiny random checkpoints, offline, on CPU.

    HF_HUB_OFFLINE=1 python -m pytest test_flux.py -q        # ~15 s on 2 cores; add -s to see the numbers

What is compared (every parameter randomised with a fixed seed: weights N(0, 0.15), norm weights 1 + N(0, 0.1)):
  - load_transformer on diffusers FluxTransformer2DModel folders (single file and sharded; 3 heads of 16; guidance
    on with several values, and off as in schnell), against diffusers called the way FluxPipeline calls it: its own
    static _pack_latents / _prepare_latent_image_ids / _unpack_latents, timestep = t, guidance = g (x1000 inside
    both). Non-square 8x12 latents. fp32, max error <= 1e-4 max|ref|;
  - load_transformer on a BFL single file (flux1-dev layout) written by running FLUX_ORIGINAL_KEYS backwards;
  - both key tables against diffusers' own BFL converter on a full-size FLUX.1-dev state dict (meta weights, real
    biases and norm scales, so split order and the final-layer swap are checked by value);
  - bf16: ours against diffusers run in bf16 on the same weights, rel L2 < 3e-2 and cosine > 0.999, and the
    same comparison with the timestep cast order NOT reproduced (printed, must be much worse);
  - full-size FLUX.1-dev / schnell tensor and parameter counts on the meta device; one-line errors on bad input.
diffusers is a reference implementation here only; the code under test does not import it.
"""

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

import model
import teacher_loaders as tl
from model import FLUX_CONFIGS, Flux, build_model, config_from_dict, config_to_dict
from test_sana import compare, one_line_error, randomise, rewrite

# architectures.md §7.2 with an odd head count: packed in_channels 16 = 4 latent channels x 2x2
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=48, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
TINY_AXES = {16: (4, 6, 6)}   # the BFL file does not store the RoPE split; full-size FLUX has 128: (16, 56, 56)


def tiny_diffusers_flux(seed, guidance_embeds):
    from diffusers import FluxTransformer2DModel
    return randomise(FluxTransformer2DModel(**TINY, guidance_embeds=guidance_embeds), seed)


def flux_inputs(seed=1):
    """Unpacked non-square latents (B, 4, 8, 12) -> a 4x6 token grid; 7 text tokens; two different times."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 12, generator=g)
    text = torch.randn(2, 7, TINY["joint_attention_dim"], generator=g)
    pooled = torch.randn(2, TINY["pooled_projection_dim"], generator=g)
    return x, torch.tensor([0.37, 0.85]), text, pooled


def reference(ref, x, t, text, pooled, guidance=None):
    """diffusers FluxTransformer2DModel on UNPACKED latents, packed and unpacked by FluxPipeline's own helpers."""
    from diffusers import FluxPipeline
    B, C, H, W = x.shape
    packed = FluxPipeline._pack_latents(x, B, C, H, W)                                  # (B, H/2 * W/2, 4C)
    img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype)
    txt_ids = torch.zeros(text.shape[1], 3, dtype=x.dtype)
    with torch.no_grad():
        out = ref(hidden_states=packed, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                  img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, 8 * H, 8 * W, 8)                            # (B, C, H, W)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """{case: (folder, diffusers model)}: FLUX.1-dev-like (guidance embedded) single and sharded, schnell-like."""
    root = tmp_path_factory.mktemp("flux")
    dev, schnell = tiny_diffusers_flux(0, True), tiny_diffusers_flux(1, False)
    dev.save_pretrained(root / "dev")
    dev.save_pretrained(root / "dev_sharded", max_shard_size="50KB")
    schnell.save_pretrained(root / "schnell")
    assert "diffusion_pytorch_model.safetensors.index.json" in os.listdir(root / "dev_sharded")
    return {"dev": (root / "dev", dev), "dev_sharded": (root / "dev_sharded", dev),
            "schnell": (root / "schnell", schnell)}


# ----------------------------------------------------------------------------------------------
# Transformer: diffusers folders and the BFL single file


@pytest.mark.parametrize("case", ["dev", "dev_sharded", "schnell"])
def test_transformer_matches_diffusers(case, refs):
    folder, ref = refs[case]
    ours = tl.load_transformer(folder)
    cfg = ours.config
    assert (cfg.in_channels, cfg.patch_size, cfg.num_heads, cfg.head_dim) == (4, 2, 3, 16)
    assert (cfg.depth, cfg.depth_single, cfg.axes_dims_rope) == (2, 2, (4, 6, 6))
    assert cfg.guidance_embeds == (case != "schnell") and ours.img_in.weight.dtype == torch.float32
    x, t, text, pooled = flux_inputs()
    if case == "schnell":            # no guidance embedder: a guidance argument is ignored
        with torch.no_grad():
            got = ours(x, t, text, pooled=pooled)
            ignored = ours(x, t, text, pooled=pooled, guidance=torch.tensor([3.5]))
        assert torch.equal(got, ignored)
        compare(f"flux[{case}]", got, reference(ref, x, t, text, pooled))
        return
    for g in ([3.5, 1.0], [0.0, 7.25]):
        g = torch.tensor(g)
        with torch.no_grad():
            got = ours(x, t, text, pooled=pooled, guidance=g)
        compare(f"flux[{case}, guidance {g.tolist()}]", got, reference(ref, x, t, text, pooled, g))


@pytest.mark.parametrize("case", ["dev", "schnell"])
def test_bfl_single_file_matches_diffusers(case, refs, tmp_path, monkeypatch):
    folder, ref = refs[case]
    ours_state = tl.load_transformer(folder).state_dict()
    bfl = tl.to_checkpoint(ours_state, tl.FLUX_ORIGINAL_KEYS)        # our table backwards: the BFL layout
    D = 3 * 16
    assert bfl["double_blocks.1.img_attn.qkv.weight"].shape == (3 * D, D)
    assert bfl["single_blocks.1.linear1.weight"].shape == (3 * D + 4 * D, D)    # q, k, v, mlp_in: unequal parts
    assert bfl["single_blocks.0.linear2.weight"].shape == (D, D + 4 * D)
    assert ("guidance_in.in_layer.weight" in bfl) == (case == "dev")
    assert len(bfl) == len(ours_state) - 2 * 2 * 4 - 2 * 6          # fused: qkv per stream per block, linear1
    path = tmp_path / f"flux1-{case}.safetensors"
    save_file(bfl, path)
    monkeypatch.setattr(tl, "FLUX_ROPE_AXES", TINY_AXES)
    ours = tl.load_transformer(path)
    assert ours.config == tl.load_transformer(folder).config
    x, t, text, pooled = flux_inputs(seed=2)
    g = torch.tensor([3.5, 2.0]) if case == "dev" else None
    with torch.no_grad():
        got = ours(x, t, text, pooled=pooled, guidance=g)
    compare(f"flux BFL single file[{case}]", got, reference(ref, x, t, text, pooled, g))


# the Hub transformer/config.json of black-forest-labs/FLUX.1-dev (schnell: guidance_embeds false)
HUB_CONFIG = dict(_class_name="FluxTransformer2DModel", attention_head_dim=128, guidance_embeds=True, in_channels=64,
                  joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
                  pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])


@pytest.fixture(scope="module")
def full_size():
    """Meta-device FLUX.1-dev: ours and diffusers' (built from the Hub config.json through our loader's config)."""
    from diffusers import FluxTransformer2DModel
    cfg = tl.flux_config_from_diffusers(HUB_CONFIG, "FLUX.1-dev")
    with torch.device("meta"):
        ours = Flux(cfg)
        ref = FluxTransformer2DModel(**{k: v for k, v in HUB_CONFIG.items() if k[0] != "_"})
    return cfg, ours.state_dict(), ref.state_dict()


def test_full_size_counts(full_size):
    cfg, own, ref_state = full_size
    assert cfg == FLUX_CONFIGS["FLUX.1-dev"]
    schnell_cfg = tl.flux_config_from_diffusers({**HUB_CONFIG, "guidance_embeds": False}, "FLUX.1-schnell")
    assert schnell_cfg == FLUX_CONFIGS["FLUX.1-schnell"]
    mapped, _, unmatched = tl.map_keys(ref_state, tl.FLUX_DIFFUSERS_KEYS)
    count = lambda s: (len(s), round(sum(v.numel() for v in s.values()) / 1e9, 4))
    print(f"FLUX.1-dev: ours {count(own)}, diffusers {count(ref_state)} (tensors, billions)")
    assert not unmatched and mapped.keys() == own.keys()
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert count(own) == count(ref_state) == (1160, 11.9014)
    assert own["single_blocks.0.proj_out.weight"].shape == (3072, 15360)
    with torch.device("meta"):
        schnell = Flux(FLUX_CONFIGS["FLUX.1-schnell"]).state_dict()
    assert len(schnell) == 1156                                       # no guidance_in (2 linears)


def test_bfl_table_against_diffusers_converter(full_size):
    """BFL keys from our table, converted by diffusers' convert_flux_transformer_checkpoint_to_diffusers (it
    hard-codes width 3072, so only at full size), then back to ours through FLUX_DIFFUSERS_KEYS: every name and
    shape must match diffusers' model and every real tensor must come back where it started. Weights stay on the
    meta device; biases and norm scales are real and distinct, so each split part and the swap are checked."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    _, own, ref_state = full_size
    g = torch.Generator().manual_seed(0)
    ours = {k: torch.randn(v.shape, generator=g) if v.ndim == 1 else v for k, v in own.items()}
    bfl = tl.to_checkpoint(ours, tl.FLUX_ORIGINAL_KEYS)
    assert "final_layer.adaLN_modulation.1.bias" in bfl and "single_blocks.37.linear1.bias" in bfl
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert converted.keys() == ref_state.keys()
    assert all(converted[k].shape == ref_state[k].shape for k in ref_state)
    back, _, unmatched = tl.map_keys(converted, tl.FLUX_DIFFUSERS_KEYS)
    assert not unmatched and back.keys() == ours.keys()
    real = [k for k, v in ours.items() if v.ndim == 1]
    print(f"{len(real)} real 1-D tensors round-tripped ours -> BFL -> diffusers converter -> ours")
    assert all(torch.equal(back[k], ours[k]) for k in real)


# ----------------------------------------------------------------------------------------------
# bf16: the timestep / guidance cast order


def rel_l2_cos(out, ref):
    out, ref = out.double().flatten(), ref.double().flatten()
    return ((out - ref).norm() / ref.norm()).item(), torch.nn.functional.cosine_similarity(out, ref, dim=0).item()


def test_bf16_matches_diffusers_bf16(refs, monkeypatch):
    """Same bf16 weights on both sides. The inputs are what FluxPipeline feeds a bf16 transformer: latents and text
    in bf16, timestep = bf16(1000 sigma) / 1000 in bf16, guidance in fp32; both transformers then round to bf16 and
    multiply by 1000 in bf16. Feeding the sinusoid exact values instead (the cast order not reproduced) is printed."""
    folder, ref = refs["dev"]
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    ours16 = tl.load_transformer(folder, dtype=torch.bfloat16)
    x, t, text, pooled = (v.to(torch.bfloat16) for v in flux_inputs(seed=3))
    t = (1000 * torch.tensor([0.37, 0.61])).to(torch.bfloat16) / 1000                   # as FluxPipeline.__call__
    g = torch.tensor([3.5, 4.3])
    expected = reference(ref16, x, t, text, pooled, g)
    with torch.no_grad():
        got = ours16(x, t, text, pooled=pooled, guidance=g)
        monkeypatch.setattr(model, "flux_timestep", lambda s, scale, dtype: s.float() * scale)   # exact values
        exact = ours16(x, t, text, pooled=pooled, guidance=g)
    (err, cos), (err_exact, cos_exact) = rel_l2_cos(got, expected), rel_l2_cos(exact, expected)
    print(f"bf16 vs diffusers bf16: rel L2 {err:.4f}, cosine {cos:.5f}; with exact t and g instead of the cast "
          f"order: rel L2 {err_exact:.4f}, cosine {cos_exact:.5f}")
    assert got.dtype == torch.bfloat16 and err < 3e-2 and cos > 0.999
    assert err_exact > 5 * err


# ----------------------------------------------------------------------------------------------
# The DiT contract: FSDP units, checkpointed block loop, config round trip


def test_fsdp_units_and_checkpointing(refs):
    ours = tl.load_transformer(refs["dev"][0])
    assert ours.fsdp_units() == [*ours.double_blocks, *ours.single_blocks] and len(ours.fsdp_units()) == 4
    x, t, text, pooled = flux_inputs()
    g = torch.tensor([3.5, 3.5])
    runs = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = ckpt
        out = ours(x, t, text, pooled=pooled, guidance=g)
        out.square().mean().backward()
        runs.append((out.detach(), ours.img_in.weight.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-6)
    cfg = config_from_dict(json.loads(json.dumps(config_to_dict(ours.config))))    # axes come back as a tuple
    assert cfg == ours.config and type(build_model(cfg)) is Flux


# ----------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the problem and the fix


def test_bad_inputs(refs, tmp_path, monkeypatch):
    folder = refs["dev"][0]
    key = "transformer_blocks.1.attn.add_k_proj.weight"
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(folder, tmp_path / "a", edit=lambda s: s.pop(key))),
                   "1 missing keys", key)
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(folder, tmp_path / "b", edit=lambda s: s.update(
        {key: torch.zeros(48, 40)}))), key, "(48, 40)", "(48, 48)", "config.json")
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(folder, tmp_path / "c", {"patch_size": 2})),
                   "patch_size=2", "not supported")
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(folder, tmp_path / "d", {"out_channels": 4})),
                   "out_channels=4", "not supported")

    bfl = tl.to_checkpoint(tl.load_transformer(folder).state_dict(), tl.FLUX_ORIGINAL_KEYS)
    save_file(bfl, tmp_path / "flux1-dev.safetensors")
    one_line_error(ValueError, lambda: tl.load_transformer(tmp_path / "flux1-dev.safetensors"),
                   "head width 16", "FLUX_ROPE_AXES")          # a head width no released FLUX.1 has
    monkeypatch.setattr(tl, "FLUX_ROPE_AXES", TINY_AXES)
    bfl.pop("single_blocks.1.norm.key_norm.scale")
    save_file(bfl, tmp_path / "missing.safetensors")
    one_line_error(ValueError, lambda: tl.load_transformer(tmp_path / "missing.safetensors"),
                   "1 missing keys", "single_blocks.1.norm.key_norm.scale", "BFL FLUX.1 file")
    bfl["single_blocks.1.norm.key_norm.scale"] = torch.ones(8)
    save_file(bfl, tmp_path / "shape.safetensors")
    one_line_error(ValueError, lambda: tl.load_transformer(tmp_path / "shape.safetensors"),
                   "single_blocks.1.norm.key_norm.scale", "(8,)", "(16,)")

    ours = tl.load_transformer(folder)
    x, t, text, pooled = flux_inputs()
    one_line_error(ValueError, lambda: ours(x[..., :11], t, text, pooled=pooled, guidance=t), "8x11", "patch size 2")
    one_line_error(ValueError, lambda: ours(x, t, text, pooled=pooled), "guidance=", "3.5")
    one_line_error(ValueError, lambda: ours(x, t, text, guidance=t), "pooled=")
