"""
SD3 / FLUX prompt encoders (text_encoders.py) checked against diffusers' own pipelines, offline, fp32 on CPU.

    HF_HUB_OFFLINE=1 python -m pytest test_text_encoders.py -q        # ~15 s on 2 cores; add -s to see the numbers

What is compared, on tiny random pipelines from tiny_pipelines.py (every parameter randomised, seeded):
  - load_sd3_prompt_encoder / sd3_prompt_encoder against StableDiffusion3Pipeline.encode_prompt (T5 length 77 and
    256, with and without text_encoder_3, the CFG negative ""), and load_flux_prompt_encoder / flux_prompt_encoder
    against FluxPipeline.encode_prompt (512 and 77): prompts of different lengths, "", one longer than 512 tokens;
    max|ours - ref| <= 1e-6;
  - the loader on sharded and precision-variant weights, one-line errors on bad folders, one truncation warning;
  - the fixtures themselves: pad tokens as the real tokenizer configs, scheduler and VAE values, determinism, and
    that the saved folders load and sample in diffusers.
diffusers is the reference here only; text_encoders.py imports torch and transformers alone.
"""

import os
import shutil
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import text_encoders as te
import tiny_pipelines as tp

from diffusers.utils import logging as diffusers_logging
diffusers_logging.set_verbosity_error()    # the pipelines log every truncated token; we check our own warning

LONG = "a very long prompt " + "with many small words and details, " * 25        # > 77 CLIP, > 512 T5 tokens
MEDIUM = ("A cosy wooden cabin beside a frozen lake at dusk, warm light in the windows, smoke rising from the "
          "chimney, pine trees heavy with snow, a red canoe upside down on the shore, stars over the mountains, "
          "painted in the style of a storybook illustration with soft watercolour textures")   # 77 < T5 tokens < 256
PROMPTS = ["A Red Fox in the snow!!", "", "cat", MEDIUM, "un café à Paris", LONG]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tp.sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return tp.flux_pipeline(tmp_path_factory.mktemp("tiny_flux"))


def compare(name, ours, ref):
    diff = (ours - ref).abs().max().item()
    last = lambda x: [round(v, 4) for v in x.flatten()[-3:].tolist()]
    print(f"{name}: {tuple(ours.shape)} max|diff| {diff:.1e}, max|ref| {ref.abs().max():.3f}, "
          f"ours {last(ours)} ref {last(ref)}")
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert diff <= 1e-6, f"{name}: max|diff| {diff}"


def sd3_parts(pipe):
    return ((pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3),
            (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3))


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5


@pytest.mark.parametrize("length", [77, 256])
def test_sd3_matches_pipeline(sd3, length):
    folder, pipe = sd3
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                max_sequence_length=length)
    enc = te.load_sd3_prompt_encoder(folder, device="cpu", max_sequence_length=length)
    assert (enc.text_len, enc.text_dim, enc.pooled_dim) == (77 + length, pipe.transformer.config.joint_attention_dim,
                                                            pipe.transformer.config.pooled_projection_dim)
    out = enc(PROMPTS)
    compare(f"sd3 text, T5 {length}", out["text"], text)
    compare(f"sd3 pooled, T5 {length}", out["pooled"], pooled)
    # the same function on the pipeline's own modules
    out = te.sd3_prompt_encoder(*sd3_parts(pipe), max_sequence_length=length)(PROMPTS)
    compare("sd3 text (in-memory modules)", out["text"], text)
    compare("sd3 pooled (in-memory modules)", out["pooled"], pooled)


def test_sd3_negative_prompt(sd3):
    """The CFG negative "" is encoded through the same path as the pipeline's negative_prompt=""."""
    _, pipe = sd3
    with torch.no_grad():
        _, neg_text, _, neg_pooled = pipe.encode_prompt(PROMPTS[:2], None, None, do_classifier_free_guidance=True,
                                                        negative_prompt="", max_sequence_length=77)
    out = te.sd3_prompt_encoder(*sd3_parts(pipe))(["", ""])
    compare("sd3 negative text", out["text"], neg_text)
    compare("sd3 negative pooled", out["pooled"], neg_pooled)


def test_sd3_without_t5(tmp_path):
    """A pipeline saved without text_encoder_3: the pipeline and we put zeros where T5's tokens go."""
    folder, pipe = tp.sd3_pipeline(tmp_path / "no_t5", t5=False)
    assert not os.path.exists(os.path.join(folder, "text_encoder_3"))
    for length in (77, 256):
        with torch.no_grad():
            text, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                    max_sequence_length=length)
        enc = te.load_sd3_prompt_encoder(folder, device="cpu", max_sequence_length=length)
        assert (enc.text_len, enc.text_dim, len(enc.encoders)) == (77 + length, tp.T5_WIDTH, 2)
        out = enc(PROMPTS)
        compare(f"sd3 (no T5) text, {length}", out["text"], text)
        compare(f"sd3 (no T5) pooled, {length}", out["pooled"], pooled)
        assert out["text"][:, 77:].abs().max() == 0 and out["text"][:, :77].abs().max() > 0


# ----------------------------------------------------------------------------------------------
# FLUX


@pytest.mark.parametrize("length", [512, 77])
def test_flux_matches_pipeline(flux, length):
    folder, pipe = flux
    with torch.no_grad():
        text, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=length)
    enc = te.load_flux_prompt_encoder(folder, device="cpu", max_sequence_length=length)
    assert (enc.text_len, enc.text_dim, enc.pooled_dim) == (length, pipe.transformer.config.joint_attention_dim,
                                                            pipe.transformer.config.pooled_projection_dim)
    out = enc(PROMPTS)
    compare(f"flux text, T5 {length}", out["text"], text)
    compare(f"flux pooled, T5 {length}", out["pooled"], pooled)
    out = te.flux_prompt_encoder((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                                 max_sequence_length=length)(PROMPTS)
    compare("flux text (in-memory modules)", out["text"], text)
    compare("flux pooled (in-memory modules)", out["pooled"], pooled)


# ----------------------------------------------------------------------------------------------
# Truncation, loader files and errors


def test_truncation_warns_once(sd3, flux):
    for name, enc in [("sd3", te.sd3_prompt_encoder(*sd3_parts(sd3[1]))),
                      ("flux", te.flux_prompt_encoder((flux[1].tokenizer, flux[1].tokenizer_2),
                                                      (flux[1].text_encoder, flux[1].text_encoder_2)))]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            enc(["cat", MEDIUM[:60]])                 # fits everywhere: no warning
            assert not caught, f"{name}: {caught[0].message}"
            enc([LONG, "cat"])
            enc([LONG])
        print(f"{name}: {[str(w.message) for w in caught]}")
        assert len(caught) == 1 and "CLIPTokenizer (77 tokens)" in str(caught[0].message)
        with pytest.raises(ValueError, match="list of prompts"):
            enc("cat")


def test_loader_shards_and_variants(sd3, tmp_path):
    """T5 as bf16-variant shards with an index, CLIP-L with both a plain and an fp16 file: transformers reads them."""
    folder, pipe = sd3
    dst = tmp_path / "sd3"
    shutil.copytree(folder, dst)
    shutil.rmtree(dst / "text_encoder_3")
    t5 = pipe.text_encoder_3.state_dict()
    bf16 = {k: v.to(torch.bfloat16) for k, v in t5.items()}
    pipe.text_encoder_3.save_pretrained(dst / "text_encoder_3", state_dict=bf16, max_shard_size="40KB", variant="bf16")
    files = os.listdir(dst / "text_encoder_3")
    print(sorted(files))
    assert "model.safetensors.index.bf16.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    half = {k: v.half() for k, v in pipe.text_encoder.state_dict().items()}
    pipe.text_encoder.save_pretrained(dst / "text_encoder", state_dict=half, variant="fp16")
    enc = te.load_sd3_prompt_encoder(dst, device="cpu")
    clip_l, _, t5_loaded = enc.encoders
    for name, p in t5_loaded.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, t5[name].to(torch.bfloat16).float()), name
    for name, p in clip_l.state_dict().items():          # the plain fp32 file wins over the fp16 variant
        assert torch.equal(p, pipe.text_encoder.state_dict()[name]), name
    assert not any(p.requires_grad for e in enc.encoders for p in e.parameters())
    assert enc(["cat"])["text"].shape == (1, 154, tp.T5_WIDTH)


def test_loader_errors(sd3, tmp_path):
    folder, _ = sd3
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    cases = [(lambda: te.load_sd3_prompt_encoder(broken, device="cpu"), FileNotFoundError, "text_encoder_2/"),
             (lambda: te.load_flux_prompt_encoder(tmp_path / "nowhere", device="cpu"), FileNotFoundError, "nowhere"),
             (lambda: te.load_sd3_prompt_encoder(folder, device="cpu", dtype=torch.float16), ValueError, "float16")]
    no_weights = tmp_path / "no_weights"
    shutil.copytree(folder, no_weights)
    os.remove(no_weights / "text_encoder" / "model.safetensors")
    cases.append((lambda: te.load_sd3_prompt_encoder(no_weights, device="cpu"), FileNotFoundError, "text_encoder"))
    for call, kind, needle in cases:
        with pytest.raises(kind) as e:
            call()
        print(e.value)
        assert needle in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# The fixtures: real tokenizer conventions, schedulers, VAEs, determinism, diffusers round trip


def test_tiny_pipelines_are_faithful(sd3, flux, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    _, pipe = sd3
    clip_l, clip_g, t5 = pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3
    ids_l, ids_g = clip_l([""], padding="max_length", max_length=77).input_ids[0], clip_g([""], padding="max_length",
                                                                                         max_length=77).input_ids[0]
    eos, bos = clip_l.eos_token_id, clip_l.bos_token_id
    assert (clip_l.pad_token, clip_g.pad_token, clip_g.pad_token_id) == ("<|endoftext|>", "!", 0)
    assert ids_l == [bos] + [eos] * 76 and ids_g == [bos, eos] + [0] * 75 and eos == len(clip_l) - 1
    assert flux[1].tokenizer.pad_token == "<|endoftext|>"
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2) and t5("cat").input_ids[-1] == 1
    assert pipe.text_encoder.config.eos_token_id == eos and pipe.scheduler.config.shift == 3.0
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor, pipe.vae_scale_factor) == (1.5305, 0.0609, 8)
    s = flux[1].scheduler.config
    assert (s.use_dynamic_shifting, s.base_shift, s.max_shift, s.base_image_seq_len, s.max_image_seq_len) == (
        True, 0.5, 1.15, 256, 4096)
    assert (flux[1].vae.config.scaling_factor, flux[1].vae.config.shift_factor) == (0.3611, 0.1159)

    for p in (pipe, flux[1]):   # every parameter randomised: no tensor left constant (zeros, ones) by a default init
        for name, module in p.components.items():
            if isinstance(module, torch.nn.Module):
                constant = [k for k, v in module.named_parameters() if v.numel() > 1 and v.std() == 0]
                assert not constant, f"{name}: {constant[:3]}"

    # deterministic: the tokenizers relearnt from scratch and a second build give the same files and weights
    vocab, merges = tp.clip_bpe()
    tp.clip_bpe.cache_clear()
    assert tp.clip_bpe() == (vocab, merges)
    again = tp.sd3_pipeline(tmp_path / "again")[1]
    for a, b in zip(pipe.components.values(), again.components.values()):
        if isinstance(a, torch.nn.Module):
            assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    # the saved folders (CLIP tokenizers in the Hub's vocab.json + merges.txt layout) load and run in diffusers;
    # SD3.5-style and schnell-style overrides build too
    for cls, (folder, ref), kwargs in [
            (StableDiffusion3Pipeline, sd3, dict(prompt_3=None, do_classifier_free_guidance=False)),
            (FluxPipeline, flux, {})]:
        loaded = cls.from_pretrained(folder)
        with torch.no_grad():
            reloaded, original = (p.encode_prompt(PROMPTS, None, max_sequence_length=77, **kwargs)[0]
                                  for p in (loaded, ref))
        compare(f"{cls.__name__} reloaded", reloaded, original)
    sd35 = tp.sd3_pipeline(tmp_path / "sd35", qk_norm="rms_norm", dual_attention_layers=(0, 1))[1]
    schnell = tp.flux_pipeline(tmp_path / "schnell", guidance_embeds=False)[1]
    assert schnell.scheduler.config.shift == 1.0 and not schnell.scheduler.config.use_dynamic_shifting
    for p in (sd35, schnell):
        with torch.no_grad():
            img = p("a red fox", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0), max_sequence_length=77).images
        assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    with pytest.raises(ValueError, match="joint_attention_dim"):
        tp.flux_pipeline(tmp_path / "bad", joint_attention_dim=64)
