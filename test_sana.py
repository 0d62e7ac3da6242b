"""
SANA loaders checked against diffusers / transformers on tiny random checkpoints, offline, fp32 on CPU.

    HF_HUB_OFFLINE=1 python -m pytest test_sana.py -q        # ~30 s on 2 cores; add -s to see the numbers

What is compared (every parameter randomised with a fixed seed: weights N(0, 0.15), norm weights 1 + N(0, 0.1)):
  - load_transformer on diffusers folders (single file, sharded, bf16 variant; with and without qk-norm; the
    Sprint guidance embedder) and on an NVlabs-key .pth built by inverting ORIGINAL_KEYS, against diffusers
    SanaTransformer2DModel called with timestep = 1000 t (1 t for "sprint"): max error <= 1e-4 max|ref|;
  - the Gemma-2 prompt encoder against diffusers SanaPipeline.encode_prompt (instruction prefix, the "" negative,
    none; "" among the prompts: test_sample.py);
  - full-size tensor / parameter counts on the meta device against the official numbers;
  - load_teacher on a tiny pipeline folder, and `python train.py` distilling it for 2 steps;
  - one-line errors on bad input.
diffusers and transformers are reference implementations here only; the code under test does not import diffusers.
"""

import inspect
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

import teacher_loaders as tl
from model import SANA_CONFIGS, Sana

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=24,
            sample_size=8)


def randomise(module, seed):
    """Every parameter random: weights N(0, 0.15), norm weights 1 + N(0, 0.1) (defaults hide chunk-order bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and p.ndim == 1 else 0.15 * noise)
    return module.eval()


def tiny_diffusers_sana(seed=0, **overrides):
    from diffusers import SanaTransformer2DModel
    return randomise(SanaTransformer2DModel(**{**TINY, **overrides}), seed)


def sana_inputs(channels=8, caption=24, seed=1):
    """Non-square latents, padded text masks (one row mostly padding), two different times."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 6, 10, generator=g)
    text = torch.randn(2, 7, caption, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    return x, torch.tensor([0.3, 0.85]), text, mask


def compare(name, out, ref):
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    print(f"{name}: max|err| {err:.2e}, max|ref| {scale:.2f}, ours {out.flatten()[:3].tolist()}, "
          f"ref {ref.flatten()[:3].tolist()}")
    assert err <= 1e-4 * scale, f"{name}: max error {err:.3e} > 1e-4 * {scale:.3f}"


def run_both(ours, ref, guidance=None, time_scale=1000.0):
    x, t, text, mask = sana_inputs(ref.config.in_channels, ref.config.caption_channels)
    with torch.no_grad():
        extra = {} if guidance is None else dict(guidance=guidance * ref.config.guidance_embeds_scale)
        expected = ref(x, text, time_scale * t, encoder_attention_mask=mask, **extra).sample
        got = ours(x, t, text, text_mask=mask, guidance=guidance)
    return got, expected


def to_original(ours):
    """Our state dict -> NVlabs .pth keys: SANA_ORIGINAL_KEYS run backwards by the loading engine, plus the
    training-only tensors the loader drops."""
    orig = tl.to_checkpoint(ours, tl.SANA_ORIGINAL_KEYS)
    D = ours["patch_embed.weight"].shape[0]
    orig["pos_embed"] = torch.zeros(1, 64, D)
    orig["y_embedder.y_embedding"] = torch.randn(300, ours["caption_proj.linear_1.weight"].shape[1])
    return orig


# ----------------------------------------------------------------------------------------------
# Transformer: diffusers folders and NVlabs .pth


@pytest.mark.parametrize("case", ["single", "qk_norm_sharded", "sprint_guidance", "bf16_variant", "sincos_pe"])
def test_transformer_matches_diffusers(case, tmp_path):
    from diffusers import SanaTransformer2DModel
    kwargs = dict(qk_norm="rms_norm_across_heads") if case not in ("single", "sincos_pe") else {}
    if case == "sprint_guidance":
        kwargs["guidance_embeds"] = True
    if case == "sincos_pe":   # SANA 2K/4K (and our tiny teacher): 2D sin-cos table, here resized to a 6x10 latent
        kwargs["interpolation_scale"] = 1.5
    ref = tiny_diffusers_sana(seed=len(case), **kwargs)
    folder = tmp_path / ("Sana_Sprint_tiny" if case == "sprint_guidance" else "transformer")
    if case == "bf16_variant":   # the reference reads the same bf16 file, so both hold the same rounded weights
        ref.to(torch.bfloat16).save_pretrained(folder, variant="bf16")
        ref = SanaTransformer2DModel.from_pretrained(folder, variant="bf16", torch_dtype=torch.float32).eval()
        assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.bf16.safetensors"]
    else:
        ref.save_pretrained(folder, max_shard_size="5KB" if case == "qk_norm_sharded" else "10GB")
    if case == "qk_norm_sharded":
        assert "diffusion_pytorch_model.safetensors.index.json" in os.listdir(folder)
    ours = tl.load_transformer(folder)
    assert ours.config.time_scale == (1.0 if case == "sprint_guidance" else 1000.0)
    assert ours.patch_embed.weight.dtype == torch.float32
    guidance = torch.tensor([4.5, 2.0]) if case == "sprint_guidance" else None
    got, expected = run_both(ours, ref, guidance, ours.config.time_scale)
    compare(f"transformer[{case}]", got, expected)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_original_pth_matches_diffusers(qk_norm, tmp_path):
    from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers
    # NVlabs self-attention heads are always 32 wide (linear_head_dim), so the .pth loader assumes it
    ref = tiny_diffusers_sana(seed=7, qk_norm=qk_norm, attention_head_dim=32, cross_attention_head_dim=32,
                              cross_attention_dim=64)
    ours_state, _, unmatched = tl.map_keys(ref.state_dict(), tl.SANA_DIFFUSERS_KEYS)
    assert not unmatched
    orig = to_original(ours_state)
    if qk_norm is None:   # diffusers' own converter (no qk-norm support) must undo our inversion exactly
        back = convert_sana_transformer_to_diffusers(dict(orig))
        assert back.keys() == ref.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    path = tmp_path / "Sana_tiny.pth"
    torch.save({"state_dict": orig}, path)
    ours = tl.load_transformer(path, cross_heads=2)
    assert (ours.config.qk_norm, ours.config.depth, ours.config.caption_channels) == (qk_norm is not None, 2, 24)
    got, expected = run_both(ours, ref)
    compare(f"original .pth[qk_norm={qk_norm}]", got, expected)


# the Hub config.json of Efficient-Large-Model/Sana_{600M,1600M}_*_diffusers (architectures.md section 4.1)
HUB_CONFIG = dict(_class_name="SanaTransformer2DModel", in_channels=32, out_channels=32, attention_head_dim=32,
                  caption_channels=2304, mlp_ratio=2.5, attention_bias=False, norm_elementwise_affine=False,
                  norm_eps=1e-6, interpolation_scale=None, patch_size=1, timestep_scale=1.0, qk_norm=None)
FULL_SIZE = {   # preset: (diffusers config, official tensors, official parameters in billions)
    "Sana_600M_512px": (dict(num_attention_heads=36, num_layers=28, num_cross_attention_heads=16,
                             cross_attention_head_dim=72, cross_attention_dim=1152, sample_size=16), 548, 0.5917),
    "Sana_1600M_1024px": (dict(num_attention_heads=70, num_layers=20, num_cross_attention_heads=20,
                               cross_attention_head_dim=112, cross_attention_dim=2240, sample_size=32), 396, 1.6045),
}


@pytest.mark.parametrize("preset", list(FULL_SIZE))
def test_full_size_counts(preset):
    """Meta-device builds: our preset, the config our loader derives, and diffusers agree key by key."""
    from diffusers import SanaTransformer2DModel
    d, tensors, billions = FULL_SIZE[preset]
    cfg = tl.sana_config_from_diffusers({**HUB_CONFIG, **d}, preset)
    assert cfg == SANA_CONFIGS[preset]
    with torch.device("meta"):
        ours, ref = Sana(cfg), SanaTransformer2DModel(**{k: v for k, v in {**HUB_CONFIG, **d}.items() if k[0] != "_"})
    ref_state = ref.state_dict()
    mapped, _, unmatched = tl.map_keys(ref_state, tl.SANA_DIFFUSERS_KEYS)
    own = ours.state_dict()
    print(f"{preset}: ours {len(own)} tensors / {sum(v.numel() for v in own.values()) / 1e9:.4f} B, diffusers "
          f"{len(ref_state)} / {sum(v.numel() for v in ref_state.values()) / 1e9:.4f} B")
    assert not unmatched and mapped.keys() == own.keys()
    assert all(mapped[k].shape == own[k].shape for k in own)
    for state in (own, ref_state):
        assert len(state) == tensors
        assert round(sum(v.numel() for v in state.values()) / 1e9, 4) == billions
    assert own["blocks.0.ff.conv_inverted.weight"].shape[:2] == (5 * cfg.width, cfg.width)


def test_download_fetches_one_weight_variant(monkeypatch, tmp_path):
    """download_pipeline on the file list of Efficient-Large-Model/Sana_1600M_512px_diffusers (Hub tree pages),
    with the Hub calls replaced: fp32 weights only, every config and tokenizer file, nothing else."""
    import huggingface_hub
    listing = ["model_index.json", "README.md", "asset/logo.png", "scheduler/scheduler_config.json",
               "tokenizer/tokenizer.json", "tokenizer/tokenizer.model", "tokenizer/tokenizer_config.json",
               "tokenizer/special_tokens_map.json", "text_encoder/config.json",
               "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
               "text_encoder/model.fp16-00001-of-00002.safetensors",
               "text_encoder/model.fp16-00002-of-00002.safetensors",
               "text_encoder/model.safetensors.index.fp16.json", "text_encoder/model.safetensors.index.json",
               "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
               "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
               "transformer/diffusion_pytorch_model.fp16.safetensors",
               "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
               "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    asked = {}

    class FakeApi:
        def list_repo_files(self, repo_id):
            return listing

    def fake_snapshot_download(repo_id, allow_patterns):
        asked["files"] = sorted(allow_patterns)
        return "/cache/" + repo_id

    index = tmp_path / "model_index.json"      # the folders the pipeline names are the ones fetched
    index.write_text(json.dumps({"_class_name": "SanaPipeline", **{k: ["diffusers", "X"] for k in (
        "scheduler", "text_encoder", "tokenizer", "transformer", "vae")}}))
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: str(index))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert tl.download_pipeline("owner/repo") == "/cache/owner/repo"
    skipped = {f for f in listing if "fp16" in f or f.startswith(("README", "asset"))}
    assert set(asked["files"]) == set(listing) - skipped
    tl.download_pipeline("owner/repo", variant="fp16")      # the variant applies to the transformer only
    assert "transformer/diffusion_pytorch_model.fp16.safetensors" in asked["files"]
    assert not [f for f in asked["files"] if f.startswith("transformer/diffusion_pytorch_model-")]

    class OfflineApi:
        def list_repo_files(self, repo_id):
            raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)       # offline: the cached snapshot, if any
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, local_files_only: "/cache/" + repo_id)
    assert tl.download_pipeline("owner/repo") == "/cache/owner/repo"

    class GatedRepoError(OSError):   # huggingface_hub.errors.GatedRepoError needs a live HTTP response
        pass

    class GatedApi:
        def list_repo_files(self, repo_id):
            raise GatedRepoError("401 Client Error.\nCannot access gated repo: access to it is restricted.")

    def no_cache(repo_id, local_files_only):
        raise OSError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "HfApi", GatedApi)         # gated and not cached: the login and licence
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_cache)
    one_line_error(ValueError, lambda: tl.download_pipeline("stabilityai/stable-diffusion-3.5-large"),
                   "huggingface-cli login", "https://huggingface.co/stabilityai/stable-diffusion-3.5-large")
    assert tl.pick_weights(["diffusion_pytorch_model.bf16.safetensors", "config.json"]) == (
        "bf16", ["diffusion_pytorch_model.bf16.safetensors"])   # only a variant there: take it


# ----------------------------------------------------------------------------------------------
# A tiny SANA pipeline: Gemma-2 + tokenizer + DC-AE + transformer + scheduler, offline


def tiny_tokenizer():
    """A Gemma tokenizer (BOS, no EOS) with a BPE vocabulary trained in-process on the instruction text."""
    import string
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")          # as Gemma: spaces become U+2581
    alphabet = sorted(set(string.printable.replace(" ", "")) | {"\u2581"})
    texts = ["\n".join(tl.COMPLEX_HUMAN_INSTRUCTION)] * 2 + tl.read_prompts(tl.DEFAULT_PROMPTS)[:100]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=alphabet, show_progress=False))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    return GemmaTokenizer(vocab=bpe.get_vocab(), merges=merges, add_bos_token=True, add_eos_token=False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(folder, in-memory diffusers SanaPipeline) of a tiny random SANA pipeline saved in the Hub layout."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model
    tokenizer = tiny_tokenizer()
    encoder = randomise(Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=16, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        attn_implementation="eager")), seed=3)
    vae = randomise(AutoencoderDC(
        latent_channels=8, attention_head_dim=4, encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16, 32),
        decoder_block_out_channels=(8, 16, 32),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 2), decoder_layers_per_block=(1, 1, 2), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407), seed=4)
    transformer = tiny_diffusers_sana(seed=5, caption_channels=32)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.5)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    folder = tmp_path_factory.mktemp("tiny_sana_pipeline")
    pipe.save_pretrained(folder)
    return str(folder), pipe


@pytest.fixture(scope="module")
def teacher(pipeline):
    return tl.load_teacher(pipeline[0], device="cpu", text_dtype=torch.float32)


PROMPTS = ["A Red Fox in the snow ", "  a very long prompt " + "with many words and details, " * 40, "cat"]


def test_prompt_encoding_matches_diffusers(pipeline, teacher):
    from diffusers import SanaPipeline
    folder, pipe = pipeline
    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert tl.COMPLEX_HUMAN_INSTRUCTION == default
    emb, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, negative_prompt="",
                                                  complex_human_instruction=default)
    with pytest.warns(UserWarning, match="truncated") as record:            # PROMPTS[1] is cut: one warning
        got = teacher.encode_prompts(PROMPTS)
        teacher.encode_prompts(PROMPTS)
    assert len([w for w in record if "truncated" in str(w.message)]) == 1
    got_neg = teacher.encode_prompts([""], negative=True)                    # CFG negative: no CHI
    assert got["text"].shape == (3, 300, 32) and got_neg["text_mask"].shape == (1, 300)
    assert mask[1].all() and not mask[0].all()                   # one prompt truncated, one padded
    compare("prompt embeddings (instruction)", got["text"], emb)
    compare("empty negative prompt embeddings", got_neg["text"], neg[:1])
    assert torch.equal(got["text_mask"], mask) and torch.equal(got_neg["text_mask"], neg_mask[:1])
    plain = tl.gemma_prompt_encoder(pipe.tokenizer, pipe.text_encoder, instruction=[])(PROMPTS)
    emb0, mask0, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, complex_human_instruction=None)
    compare("prompt embeddings (no instruction)", plain["text"], emb0)
    assert torch.equal(plain["text_mask"], mask0)


def test_load_teacher_pipeline_folder(pipeline, teacher):
    folder, pipe = pipeline
    assert teacher.latent_shape() == (8, 8, 8) and teacher.resolution == 32 and teacher.vae_factor == 4
    assert (teacher.sample_steps, teacher.guidance, teacher.scheduler["flow_shift"]) == (20, 4.5, 2.5)
    assert len(teacher.default_prompts) >= 300 and teacher.train_defaults == {}
    assert not any(p.requires_grad for p in teacher.transformer.parameters())
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = teacher.encode(img)
    with torch.no_grad():
        ref_x0 = pipe.vae.encode(img).latent * pipe.vae.config.scaling_factor
    compare("teacher.encode (DC-AE x scaling)", x0, ref_x0)
    assert x0.shape == (2, *teacher.latent_shape())
    out = teacher.decode(x0)
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1
    cond = teacher.encode_prompts(["a cat", ""])
    t = torch.tensor([0.5, 0.9])
    with torch.no_grad():
        v = teacher.transformer(x0, t, **cond)
        ref_v = pipe.transformer(x0, cond["text"], 1000 * t, encoder_attention_mask=cond["text_mask"]).sample
    compare("teacher.transformer on encoded prompts", v, ref_v)


def test_train_py_distils_tiny_pipeline(pipeline, tmp_path):
    """Two SiD iterations of the real train.py on the tiny pipeline folder; must exit 0 and write a checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--teacher", pipeline[0], "--out", str(out), "--max_steps", "2",
           "--batch", "2", "--num_steps", "2", "--precision", "fp32", "--sample_every", "0", "--ckpt_every", "2"]
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert os.path.isfile(out / "checkpoint" / "info.json") and os.path.isfile(out / "generator.safetensors")


# ----------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the problem and the fix


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformer")
    tiny_diffusers_sana(seed=11).save_pretrained(folder)
    return folder


def rewrite(src, dst, config=None, edit=None):
    """Copy a diffusers transformer folder, optionally editing its config dict or its state dict."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**cfg, **(config or {})}, f)
    state = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    if edit:
        edit(state)
    save_file(state, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    return dst


def one_line_error(kind, fn, *words):
    with pytest.raises(kind) as e:
        fn()
    msg = str(e.value)
    print(f"{kind.__name__}: {msg}")
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_inputs(saved, tmp_path):
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(saved, tmp_path / "a", {
        "_class_name": "UNet2DConditionModel"})), "UNet2DConditionModel", "not a supported transformer")
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(saved, tmp_path / "b", {
        "attention_bias": True})), "attention_bias", "not supported")
    one_line_error(FileNotFoundError, lambda: tl.load_transformer(tmp_path / "nothing"), "does not exist")
    (tmp_path / "empty").mkdir()
    with open(tmp_path / "empty" / "config.json", "w") as f:
        json.dump(json.load(open(saved / "config.json")), f)
    one_line_error(FileNotFoundError, lambda: tl.load_transformer(tmp_path / "empty"), "no safetensors weights")
    key = "transformer_blocks.1.attn2.to_k.weight"
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(saved, tmp_path / "c", edit=lambda s: s.pop(key))),
                   "1 missing keys", key)
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(saved, tmp_path / "d", edit=lambda s: s.update(
        {key: torch.zeros(16, 12)}))), key, "(16, 12)", "(16, 16)", "config.json")
    one_line_error(ValueError, lambda: tl.load_transformer(rewrite(saved, tmp_path / "e", edit=lambda s: s.update(
        {"extra.weight": torch.zeros(1)}))), "unexpected", "extra.weight")
    tiny_diffusers_sana(seed=11).save_pretrained(tmp_path / "f", max_shard_size="5KB")
    os.remove(tmp_path / "f" / "diffusion_pytorch_model-00002-of-00013.safetensors")
    one_line_error(FileNotFoundError, lambda: tl.load_transformer(tmp_path / "f"), "00002-of-00013", "is missing")
    one_line_error(ValueError, lambda: tl.load_teacher("sana-2b"), "unknown teacher", "sana-1.6b-1024")
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "x.pth")
    one_line_error(ValueError, lambda: tl.load_transformer(tmp_path / "x.pth"), "not an NVlabs SANA")
    one_line_error(FileNotFoundError, lambda: tl.load_teacher(str(saved)), "model_index.json")
