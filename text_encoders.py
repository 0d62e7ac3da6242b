"""
Prompt encoders of the SD3 / SD3.5 and FLUX.1 teachers: CLIP-L, CLIP-G and T5-XXL run through transformers.

    enc = load_sd3_prompt_encoder("stable-diffusion-3.5-large/")   # a diffusers pipeline folder
    cond = enc(["a red fox in the snow", ""])   # {"text": (2, 77 + 77, 4096), "pooled": (2, 2048)}
    enc = load_flux_prompt_encoder("FLUX.1-dev/")
    cond = enc(["a red fox in the snow"])       # {"text": (1, 512, 4096), "pooled": (1, 768)}

Each computes exactly what the diffusers pipeline feeds its transformer (the negative prompt "" included):

SD3 / SD3.5 (StableDiffusion3Pipeline.encode_prompt, clip_skip None; the same for all three models):
    CLIP-L, CLIP-G: tokens padded to 77 (CLIP-L pads with <|endoftext|>, CLIP-G with "!", as their tokenizer
        configs say; pad positions are context, so this matters), no attention mask; per-token features =
        hidden_states[-2], the penultimate layer BEFORE the final LayerNorm; pooled = text_embeds, the projected
        final-LN state at the first end-of-text token.
    T5-XXL: eos appended, padded with <pad> to max_sequence_length, NO attention mask (pads are encoded as
        ordinary tokens); last_hidden_state. A folder without text_encoder_3 gives zeros there, as the pipeline.
    text   = concat_seq(zero_pad_channels(concat_ch(L (B,77,768), G (B,77,1280)) -> 4096), T5 (B,N,4096))
    pooled = concat(L (B,768), G (B,1280)) = (B, 2048)
    N = 77 by default, the official SiD-DiT setting (the diffusers pipeline default is 256).
FLUX.1 (FluxPipeline.encode_prompt):
    pooled = CLIP-L (CLIPTextModel) pooler_output (B, 768): final-LN state at the first end-of-text, no projection.
    text   = T5-XXL last_hidden_state (B, N, 4096), N = 512 (dev), no attention mask. The position ids (all
        zeros for text) are built by the FLUX module itself.
Longer prompts are cut as the pipelines cut them (one warning per encoder).

Checked against diffusers 0.42.1 StableDiffusion3Pipeline / FluxPipeline.encode_prompt on tiny random pipelines
(max difference 0 in fp32), run: HF_HUB_OFFLINE=1 python -m pytest test_text_encoders.py -q
"""

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

CLIP_TOKENS = 77      # both pipelines pad CLIP to tokenizer.model_max_length, 77 in every official config


@dataclass
class PromptEncoder:
    """A loaded prompt encoder: enc(prompts) -> {"text": (B, text_len, text_dim), "pooled": (B, pooled_dim)}.
    The widths must equal the transformer's joint_attention_dim and pooled_projection_dim."""
    encode_prompts: Callable[..., dict]     # (prompts, negative=False): negative is the CFG negative prompt
    text_len: int
    text_dim: int
    pooled_dim: int
    encoders: list          # the frozen transformers modules (to move or shard them)

    def __call__(self, prompts, negative=False):
        return self.encode_prompts(prompts, negative)


# ----------------------------------------------------------------------------------------------
# Encoding (given tokenizers and transformers modules)


def prompt_list(prompts):
    if isinstance(prompts, str):   # list("cat") would encode three one-letter prompts
        raise ValueError(f"encode_prompts takes a list of prompts, got the string {prompts[:40]!r}; pass [prompt]")
    return list(prompts)


def tokenize(tokenizer, prompts, length, cut):
    """ids (B, length): special tokens added, padded with the tokenizer's pad token, cut at `length` (the closing
    eos kept) as the pipelines do; adds the tokenizer's name to the set `cut` if a prompt was longer."""
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    if max(len(x) for x in tokenizer(prompts, verbose=False).input_ids) > length:
        cut.add(f"{type(tokenizer).__name__} ({length} tokens)")
    return ids


def warn_once(warned, cut):
    if cut and not warned:
        warnings.warn(f"prompts were truncated to fit {', '.join(sorted(cut))}, as the diffusers pipelines do; "
                      f"shorten them to keep every word", stacklevel=3)
        warned.append(True)


def sd3_prompt_encoder(tokenizers, encoders, max_sequence_length=77, joint_attention_dim=4096):
    """prompts -> {"text": (B, 77 + max_sequence_length, 4096), "pooled": (B, 2048)}, as diffusers
    StableDiffusion3Pipeline.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=N).

    tokenizers, encoders: (CLIP-L, CLIP-G, T5) CLIPTokenizer x2 + T5TokenizerFast, CLIPTextModelWithProjection x2
    + T5EncoderModel; T5's pair may be None (no text_encoder_3): zeros of width joint_attention_dim take its place.
    """
    (tok_l, tok_g, tok_t5), (clip_l, clip_g, t5) = tokenizers, encoders
    width = t5.config.d_model if t5 is not None else joint_attention_dim
    clip_width = clip_l.config.hidden_size + clip_g.config.hidden_size
    if clip_width > width:
        raise ValueError(f"CLIP-L + CLIP-G width {clip_width} exceeds the T5 width {width}: these are not SD3 text "
                         f"encoders (the real ones are 768 + 1280 <= 4096)")
    warned = []

    @torch.no_grad()
    def encode_prompts(prompts, negative=False):    # the pipeline encodes its CFG negative like any prompt
        prompts, cut = prompt_list(prompts), set()
        tokens, pooled = [], []
        for tok, clip in ((tok_l, clip_l), (tok_g, clip_g)):
            out = clip(tokenize(tok, prompts, CLIP_TOKENS, cut).to(clip.device), output_hidden_states=True)
            tokens.append(out.hidden_states[-2].to(clip_l.dtype))   # penultimate layer, no final LN (B, 77, 768|1280)
            pooled.append(out.text_embeds)                          # projected, at the first eos (B, 768|1280)
        clip_text = torch.cat(tokens, dim=-1)                       # (B, 77, 2048)
        if t5 is None:                                              # the pipeline's stand-in for a dropped T5
            t5_text = clip_text.new_zeros(len(prompts), max_sequence_length, width)
        else:                                                       # no attention mask: pads are context
            t5_text = t5(tokenize(tok_t5, prompts, max_sequence_length, cut).to(t5.device)).last_hidden_state
        warn_once(warned, cut)
        clip_text = F.pad(clip_text, (0, width - clip_width))       # zero channels up to T5's width (B, 77, 4096)
        return {"text": torch.cat([clip_text, t5_text.to(clip_text.device)], dim=1),   # CLIP first (B, 77 + N, 4096)
                "pooled": torch.cat(pooled, dim=-1)}                                  # (B, 2048)

    return encode_prompts


def flux_prompt_encoder(tokenizers, encoders, max_sequence_length=512):
    """prompts -> {"text": (B, max_sequence_length, 4096), "pooled": (B, 768)}, as diffusers
    FluxPipeline.encode_prompt(prompt, max_sequence_length=N) (its text_ids are not returned).

    tokenizers, encoders: (CLIP-L, T5) CLIPTokenizer + T5TokenizerFast, CLIPTextModel + T5EncoderModel.
    """
    (tok_clip, tok_t5), (clip, t5) = tokenizers, encoders
    warned = []

    @torch.no_grad()
    def encode_prompts(prompts, negative=False):    # FluxPipeline's (true-CFG) negative: encoded like any prompt
        prompts, cut = prompt_list(prompts), set()
        # CLIP-L's final-LN state at the first eos, no projection (B, 768); T5 without a mask (B, N, 4096)
        pooled = clip(tokenize(tok_clip, prompts, CLIP_TOKENS, cut).to(clip.device)).pooler_output
        text = t5(tokenize(tok_t5, prompts, max_sequence_length, cut).to(t5.device)).last_hidden_state
        warn_once(warned, cut)
        return {"text": text, "pooled": pooled.to(text.device)}

    return encode_prompts


# ----------------------------------------------------------------------------------------------
# Loading from a diffusers pipeline folder


WEIGHTS = re.compile(r"^model(?:\.(?P<variant>\w+?))?(?:-\d+-of-\d+)?\.safetensors$|"
                     r"^model\.safetensors\.index(?:\.(?P<index_variant>\w+))?\.json$")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def default_device():
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def weights_variant(folder, dtype):
    """The precision variant transformers should read in `folder`: None when the plain model.safetensors (or its
    shards' index) is there, else the one matching dtype (e.g. "bf16"), else the first."""
    variants = set()
    for name in os.listdir(folder):
        m = WEIGHTS.match(name)
        if m:
            variants.add(m["variant"] or m["index_variant"])
    if not variants:
        raise FileNotFoundError(f"{folder} has no model*.safetensors weights; download the text encoder with them")
    if None in variants:
        return None
    return DTYPE_NAMES[dtype] if DTYPE_NAMES.get(dtype) in variants else sorted(variants)[0]


def load_text_encoders(folder, parts, device=None, dtype=None):
    """{part: tokenizer, or frozen eval model on device} for {subfolder name: transformers class} of a diffusers
    pipeline folder. dtype defaults to bf16 on GPU, fp32 on CPU."""
    from transformers import PreTrainedModel
    folder = str(folder)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype == torch.float16 and any(issubclass(cls, PreTrainedModel) and cls.__name__.startswith("T5")
                                           for cls in parts.values()):
        # T5 overflows in fp16 (activations pass 65504; it was trained in bf16): run it in bf16 or fp32
        raise ValueError("T5 text encoders overflow in float16; load them with dtype=torch.bfloat16 or torch.float32")
    for part in parts:
        if not os.path.isdir(os.path.join(folder, part)):
            raise FileNotFoundError(f"{folder} has no {part}/ folder; the prompt encoder needs "
                                    f"{', '.join(p + '/' for p in parts)} (download the pipeline with them)")
    loaded = {}
    for part, cls in parts.items():
        sub = os.path.join(folder, part)
        if issubclass(cls, PreTrainedModel):   # from_pretrained follows a shards' index and reads the variant's files
            model = cls.from_pretrained(sub, dtype=dtype, variant=weights_variant(sub, dtype))
            loaded[part] = model.to(device).eval().requires_grad_(False)
        else:
            loaded[part] = cls.from_pretrained(sub)
    return loaded


def read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_sd3_prompt_encoder(folder, device=None, dtype=None, max_sequence_length=77):
    """PromptEncoder of an SD3 / SD3.5 diffusers folder (text_encoder*/, tokenizer*/ as StableDiffusion3Pipeline).
    A folder saved without text_encoder_3 (model_index.json lists it as null) gets zeros for T5, as the pipeline."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder; pass a diffusers SD3 pipeline folder (e.g. a download of "
                                f"stabilityai/stable-diffusion-3.5-large)")
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
    parts = {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
             "tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer}
    if read_json(os.path.join(folder, "model_index.json")).get("text_encoder_3", [""])[0] is not None:
        parts.update(text_encoder_3=T5EncoderModel, tokenizer_3=T5TokenizerFast)   # else saved without T5
    m = load_text_encoders(folder, parts, device, dtype)
    width = read_json(os.path.join(folder, "transformer", "config.json")).get("joint_attention_dim", 4096)
    tokenizers = (m["tokenizer"], m["tokenizer_2"], m.get("tokenizer_3"))
    encoders = (m["text_encoder"], m["text_encoder_2"], m.get("text_encoder_3"))
    return PromptEncoder(
        encode_prompts=sd3_prompt_encoder(tokenizers, encoders, max_sequence_length, joint_attention_dim=width),
        text_len=CLIP_TOKENS + max_sequence_length,
        text_dim=encoders[2].config.d_model if encoders[2] is not None else width,
        pooled_dim=encoders[0].config.projection_dim + encoders[1].config.projection_dim,
        encoders=[e for e in encoders if e is not None])


def load_flux_prompt_encoder(folder, device=None, dtype=None, max_sequence_length=512):
    """PromptEncoder of a FLUX.1 diffusers folder (text_encoder/ CLIP-L, text_encoder_2/ T5, their tokenizers).
    max_sequence_length: 512 for FLUX.1-dev, 256 for schnell (the pipelines' settings)."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder; pass a diffusers FLUX pipeline folder (e.g. a download of "
                                f"black-forest-labs/FLUX.1-dev)")
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
    m = load_text_encoders(folder, {"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel,
                                    "tokenizer": CLIPTokenizer, "tokenizer_2": T5TokenizerFast}, device, dtype)
    encoders = (m["text_encoder"], m["text_encoder_2"])
    return PromptEncoder(
        encode_prompts=flux_prompt_encoder((m["tokenizer"], m["tokenizer_2"]), encoders, max_sequence_length),
        text_len=max_sequence_length, text_dim=encoders[1].config.d_model,
        pooled_dim=encoders[0].config.hidden_size, encoders=list(encoders))
