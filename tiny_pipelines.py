"""
Tiny random SD3 / SD3.5 and FLUX diffusers pipelines for tests: built offline, seeded, in about a second.

    from tiny_pipelines import sd3_pipeline, flux_pipeline
    folder, pipe = sd3_pipeline(tmp_path / "sd3")                            # SD3-Medium-like
    folder, pipe = sd3_pipeline(tmp_path / "sd35m", qk_norm="rms_norm", dual_attention_layers=(0, 1))
    folder, pipe = sd3_pipeline(tmp_path / "no_t5", t5=False)                # text_encoder_3 = None
    folder, pipe = flux_pipeline(tmp_path / "flux")                          # FLUX.1-dev-like
    folder, pipe = flux_pipeline(tmp_path / "schnell", guidance_embeds=False)

Each call writes a whole pipeline in the Hub layout (model_index.json, transformer/, vae/, text_encoder*/,
tokenizer*/, scheduler/) with `save_pretrained` and returns (folder, the in-memory diffusers pipeline). Test
support only: it imports diffusers, which runtime files never do.

The recipe (what is real, what is tiny):
  - tokenizers are built in-process from prompts/default_prompts.txt with deterministic hand-rolled learners
    (the `tokenizers` trainers break count ties differently from run to run):
      CLIP: byte-level BPE with "</w>" word ends, vocabulary in the real CLIP order (256 byte symbols, "!" = 0,
        the same 256 + "</w>", the merges, then <|startoftext|>, <|endoftext|> last), written as the Hub does:
        vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; model_max_length 77.
        Pad tokens as the real configs (pad positions are part of SD3's context, so the choice matters):
        CLIP-L (SD3 tokenizer/, FLUX tokenizer/) pads with <|endoftext|>; CLIP-G (SD3 tokenizer_2/) pads with
        "!" (id 0, declared a special token), the OpenCLIP convention, as the Hub's tokenizer_2 configs say.
      T5: Unigram, cased, <pad> = 0, </s> = 1 (appended), <unk> = 2, a few <extra_id_*>; saved by
        T5TokenizerFast (tokenizer.json; the Hub folder also has spiece.model, which needs sentencepiece).
  - text encoders: transformers CLIPTextModelWithProjection (SD3 CLIP-L 16 wide, CLIP-G 24 wide),
    CLIPTextModel (FLUX CLIP-L), T5EncoderModel (48 wide, gated-gelu as v1.1); 3 / 2 layers; eos id = the
    tokenizer's, so CLIP pooling finds it in every row.
  - transformer: SD3Transformer2DModel (hidden 32, 3 layers, sample_size 8 = 64 px, pos_embed_max_size 16) or
    FluxTransformer2DModel (hidden 32, 2 + 2 layers, guidance embedder, rope axes (4, 6, 6)); context and
    pooled widths follow the text encoders (SD3: 48 and 16 + 24; FLUX: 48 and 16). Keyword overrides go to the
    transformer (qk_norm, dual_attention_layers, guidance_embeds, num_layers, sample_size, ...).
  - vae: AutoencoderKL with 16 latent channels and 4 levels, so the real factor 8, widths (8, 8, 16, 16),
    2 layers per block, no quant convs; real scaling/shift factors (SD3 1.5305 / 0.0609, FLUX 0.3611 / 0.1159).
  - scheduler: FlowMatchEulerDiscreteScheduler with the Hub values: SD3/SD3.5 shift 3.0; FLUX.1-dev dynamic
    shifting (base_shift 0.5, max_shift 1.15, base_image_seq_len 256, max_image_seq_len 4096); FLUX.1-schnell
    (guidance_embeds=False) shift 1.0 without dynamic shifting (BFL samples schnell unshifted).
  - every parameter random (seeded): weights N(0, 0.15), norm weights 1 + N(0, 0.1); default inits hide bugs.
"""

import json
import math
import os
import shutil
import string
from collections import Counter
from functools import lru_cache

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "prompts", "default_prompts.txt")

CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 16, 24, 48     # tiny stand-ins for 768, 1280, 4096
SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                       attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, pos_embed_max_size=16)
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)


def randomise(module, seed):
    """Every parameter random: weights N(0, 0.15), norm weights 1 + N(0, 0.1) (defaults hide chunk-order bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            norm_weight = "norm" in name and name.endswith("weight") and p.ndim == 1
            p.copy_(1 + 0.1 * noise if norm_weight else 0.15 * noise)
    return module.eval()


def corpus():
    with open(CORPUS) as f:
        return [line.strip() for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Tokenizers


def byte_symbols():
    """The 256 printable stand-ins of the bytes, in GPT-2/CLIP order: printable bytes first ("!" = 0), then the
    others mapped to 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=None)
def clip_bpe(n_merges=300):
    """(vocab list, merges) of a byte-level BPE learnt on the corpus: the most frequent adjacent pair is merged
    first, ties broken by the pair itself, so the result is the same on every run."""
    from transformers import CLIPTokenizer
    symbols = byte_symbols()
    splitter = CLIPTokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=[]).backend_tokenizer
    counts = Counter(word for text in corpus()
                     for word, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text)))
    words = [[*w[:-1], w[-1] + "</w>"] for w in counts]          # CLIP marks the word end
    freq = list(counts.values())
    pairs, where = Counter(), {}                                  # pair -> count, pair -> indices of words with it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pairs[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    merges = []
    while len(merges) < n_merges and pairs:
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for i in where.pop(best):                                 # re-count only the words that change
            w = words[i]
            for pair in zip(w, w[1:]):
                pairs[pair] -= freq[i]
            j, out = 0, []
            while j < len(w):
                take = tuple(w[j:j + 2]) == best
                out.append(best[0] + best[1] if take else w[j])
                j += 2 if take else 1
            words[i] = out
            for pair in zip(out, out[1:]):
                pairs[pair] += freq[i]
                where.setdefault(pair, set()).add(i)
        pairs = +pairs                                            # drop pairs that no longer occur
    vocab = symbols + [s + "</w>" for s in symbols]
    for a, b in merges:
        if a + b not in vocab:
            vocab.append(a + b)
    return vocab + ["<|startoftext|>", "<|endoftext|>"], merges


def clip_tokenizer(folder, pad_token="<|endoftext|>"):
    """Write a tiny CLIP tokenizer in the Hub layout and load it as the pipelines do (CLIPTokenizer.from_pretrained).
    pad_token: "<|endoftext|>" for CLIP-L, "!" for SD3's CLIP-G."""
    from transformers import CLIPTokenizer
    vocab, merges = clip_bpe()
    os.makedirs(folder, exist_ok=True)
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   pad_token=pad_token)
    added = {len(vocab) - 2: "<|startoftext|>", len(vocab) - 1: "<|endoftext|>"}
    if pad_token == "!":
        added[0] = "!"                               # CLIP-G: "!" is a declared special token (id 0)
    config = dict(special, model_max_length=77, do_lower_case=True, errors="replace", add_prefix_space=False,
                  tokenizer_class="CLIPTokenizer",
                  added_tokens_decoder={str(i): dict(content=t, lstrip=False, normalized=t == "<|startoftext|>",
                                                     rstrip=False, single_word=False, special=True)
                                        for i, t in sorted(added.items())})
    files = {"vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}),
             "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
             "tokenizer_config.json": json.dumps(config, indent=2),
             "special_tokens_map.json": json.dumps(special, indent=2)}
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return CLIPTokenizer.from_pretrained(folder)


@lru_cache(maxsize=None)
def t5_unigram(n_words=300):
    """[(piece, log prob)] of a Unigram vocabulary: <pad>, </s>, <unk>, then "▁", single characters (cased
    ASCII) and the corpus's most frequent words as "▁word" pieces, scored by their log frequency."""
    from transformers import T5Tokenizer
    splitter = T5Tokenizer(extra_ids=0).backend_tokenizer.pre_tokenizer
    counts = Counter(w for text in corpus() for w, _ in splitter.pre_tokenize_str(text))
    total = sum(counts.values())
    words = sorted((w for w in counts if len(w) > 2), key=lambda w: (-counts[w], w))[:n_words]
    chars = ["▁"] + sorted(set(string.ascii_letters + string.digits + string.punctuation))
    return ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -12.0) for c in chars]
            + [(w, math.log(counts[w] / total)) for w in words])


def t5_tokenizer(folder, extra_ids=4):
    """Write a tiny T5 tokenizer (eos appended, pad id 0) and load it as the pipelines do (T5TokenizerFast)."""
    from transformers import T5TokenizerFast
    T5TokenizerFast(vocab=t5_unigram(), extra_ids=extra_ids, model_max_length=512).save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------
# Text encoders, VAE


def clip_encoder(tokenizer, width, seed, projection=True):
    """CLIPTextModelWithProjection (SD3) or CLIPTextModel (FLUX), 3 layers, eos id = the tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=3, num_attention_heads=4, projection_dim=width,
                            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return randomise((CLIPTextModelWithProjection if projection else CLIPTextModel)(config), seed)


def t5_encoder(tokenizer, seed):
    from transformers import T5Config, T5EncoderModel
    config = T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    return randomise(T5EncoderModel(config), seed)


def tiny_vae(seed, scaling_factor, shift_factor):
    """16-channel AutoencoderKL, 4 levels (factor 8, as the real one), no quant convs."""
    from diffusers import AutoencoderKL
    return randomise(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=2,
        latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor), seed)


# ----------------------------------------------------------------------------------------------
# Whole pipelines


def _save(pipe, folder, clip_pads):
    """save_pretrained, then rewrite the CLIP tokenizer folders in the Hub's own layout (vocab.json + merges.txt;
    transformers would save a tokenizer.json instead)."""
    pipe.save_pretrained(folder)
    for sub, pad in clip_pads.items():
        shutil.rmtree(os.path.join(folder, sub))
        clip_tokenizer(os.path.join(folder, sub), pad)
    return str(folder)


def text_widths_fixed(overrides):
    if {"joint_attention_dim", "pooled_projection_dim"} & set(overrides):
        raise ValueError("joint_attention_dim / pooled_projection_dim follow the tiny text encoders; do not override "
                         "them (change CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH instead)")


def sd3_pipeline(folder, t5=True, seed=0, **transformer_overrides):
    """(folder, StableDiffusion3Pipeline): a tiny random SD3 pipeline saved at `folder`. t5=False leaves
    text_encoder_3 / tokenizer_3 out (the pipeline then feeds zeros). Overrides go to SD3Transformer2DModel."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    text_widths_fixed(transformer_overrides)
    folder = str(folder)
    tokenizer = clip_tokenizer(os.path.join(folder, "tokenizer"), "<|endoftext|>")
    tokenizer_2 = clip_tokenizer(os.path.join(folder, "tokenizer_2"), "!")
    tokenizer_3 = t5_tokenizer(os.path.join(folder, "tokenizer_3")) if t5 else None
    transformer = SD3Transformer2DModel(**{**SD3_TRANSFORMER, **transformer_overrides, "joint_attention_dim": T5_WIDTH,
                                           "pooled_projection_dim": CLIP_L_WIDTH + CLIP_G_WIDTH})
    pipe = StableDiffusion3Pipeline(
        transformer=randomise(transformer, seed), vae=tiny_vae(seed + 1, **SD3_VAE_FACTORS),
        text_encoder=clip_encoder(tokenizer, CLIP_L_WIDTH, seed + 2), tokenizer=tokenizer,
        text_encoder_2=clip_encoder(tokenizer_2, CLIP_G_WIDTH, seed + 3), tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(tokenizer_3, seed + 4) if t5 else None, tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return _save(pipe, folder, {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}), pipe


def flux_pipeline(folder, seed=0, **transformer_overrides):
    """(folder, FluxPipeline): a tiny random FLUX.1-dev pipeline saved at `folder` (guidance_embeds=False: schnell,
    with schnell's scheduler). Overrides go to FluxTransformer2DModel."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    text_widths_fixed(transformer_overrides)
    folder = str(folder)
    tokenizer = clip_tokenizer(os.path.join(folder, "tokenizer"), "<|endoftext|>")
    tokenizer_2 = t5_tokenizer(os.path.join(folder, "tokenizer_2"))
    transformer = FluxTransformer2DModel(**{**FLUX_TRANSFORMER, **transformer_overrides,
                                            "joint_attention_dim": T5_WIDTH, "pooled_projection_dim": CLIP_L_WIDTH})
    if transformer.config.guidance_embeds:     # FLUX.1-dev: resolution-dependent shift
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:                                      # FLUX.1-schnell
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        transformer=randomise(transformer, seed), vae=tiny_vae(seed + 1, **FLUX_VAE_FACTORS),
        text_encoder=clip_encoder(tokenizer, CLIP_L_WIDTH, seed + 2, projection=False), tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tokenizer_2, seed + 3), tokenizer_2=tokenizer_2, scheduler=scheduler)
    return _save(pipe, folder, {"tokenizer": "<|endoftext|>"}), pipe
