"""
Teachers: official checkpoints -> our modules, with their prompt encoders and latent codecs.

Every teacher, embedded or downloaded, is returned as one `Teacher` with the same interface, so
train.py and sample.py never ask which family they hold:

    teacher = load_teacher("tiny")            # or "sana", a diffusers pipeline folder, a HF repo id
    cond = teacher.encode_prompts(["a red circle at the top left"])   # dict of tensors
    v = teacher.transformer(x_t, t, **cond)   # velocity, t in [0, 1]
    img = teacher.decode(x0)                  # (B, 3, H, W) in [-1, 1]

`cond` holds whichever of text (B, L, D), text_mask (B, L), pooled (B, P) the family uses; its
tensors are batched along dim 0, so CFG can concatenate them.

SANA weights come in two layouts, both mapped onto model.Sana through the declarative key tables
below: a diffusers `transformer/` folder (single file, sharded, or a precision variant) and an
original NVlabs `.pth`. `load_transformer(path)` returns the module alone; `load_teacher("sana")`
downloads (once) and assembles the whole pipeline: transformer, Gemma-2 prompt encoder (as diffusers
SanaPipeline.encode_prompt), DC-AE (vae.py), sampler settings and the bundled prompt list.

Checked against: the tiny teacher round-trips through its own safetensors file (test_train.py);
SANA loaders and prompt encoding against diffusers/transformers on tiny random checkpoints, and
full-size tensor/parameter counts on the meta device (test_sana.py: `python -m pytest test_sana.py -q`).
"""

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from model import Sana, SanaConfig, build_model, config_from_dict

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")
DEFAULT_PROMPTS = os.path.join(HERE, "prompts", "default_prompts.txt")   # data-free prompts for any teacher

# named real teachers -> Hugging Face repos (diffusers layout, SanaPipeline)
SANA_REPOS = {
    "sana": "Efficient-Large-Model/Sana_600M_512px_diffusers",
    "sana-600m-1024": "Efficient-Large-Model/Sana_600M_1024px_diffusers",
    "sana-1.6b-512": "Efficient-Large-Model/Sana_1600M_512px_diffusers",
    "sana-1.6b-1024": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
}


@dataclass
class Teacher:
    name: str
    transformer: torch.nn.Module                 # v = transformer(x, t, **cond); frozen
    encode_prompts: Callable[[list], dict]       # prompts -> {"text", "text_mask"?, "pooled"?}
    encode: Callable[[torch.Tensor], torch.Tensor]   # images (B, 3, H, W) in [-1, 1] -> latents x0
    decode: Callable[[torch.Tensor], torch.Tensor]   # latents x0 -> images in [-1, 1]
    latent_channels: int
    vae_factor: int                              # image pixels per latent pixel
    resolution: int                              # default image side in pixels
    sampling: dict = field(default_factory=dict) # teacher's own sampler: steps, guidance, shift
    train_defaults: dict = field(default_factory=dict)   # train.py flag defaults for this teacher
    default_prompts: list = field(default_factory=list)  # data-free distillation prompts

    def latent_shape(self, resolution=None):
        """(C, h, w) of the latent for a square image of `resolution` pixels; errors name the fix."""
        res = resolution or self.resolution
        step = self.vae_factor * self.transformer.config.patch_size
        if res <= 0 or res % step:
            raise ValueError(f"resolution {res} is not divisible by {step} (VAE factor {self.vae_factor} x patch "
                             f"{self.transformer.config.patch_size}); use e.g. {max(step, res // step * step)}")
        return (self.latent_channels, res // self.vae_factor, res // self.vae_factor)


def load_teacher(name_or_path, device=None, text_dtype=None, variant=None):
    """A `Teacher` for 'tiny', a named SANA teacher (SANA_REPOS), a local diffusers pipeline folder, or a HF repo id.

    device: where the frozen nets run (default: CPU for 'tiny'; this rank's GPU for SANA when there is one).
    text_dtype: Gemma-2's dtype (default bf16 on GPU, as the official code; fp32 on CPU).
    variant: transformer weight variant to read ("fp16", "bf16"; default fp32 when the repo has it).
    """
    name = str(name_or_path)
    if name == "tiny" or name.endswith(".safetensors"):
        path = os.path.join(ASSETS, "tiny_teacher.safetensors") if name == "tiny" else name
        return load_tiny_teacher(path, device or "cpu")
    if name in SANA_REPOS or (not os.path.exists(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name)):
        folder = download_pipeline(SANA_REPOS.get(name, name), variant)
    elif os.path.isdir(name):
        folder = name
    else:
        raise ValueError(f"unknown teacher {name!r}; use one of {['tiny', *SANA_REPOS]}, a tiny-teacher .safetensors "
                         f"file, a diffusers pipeline folder, or a Hugging Face repo id (owner/name)")
    return load_sana_teacher(folder, name, device, text_dtype, variant)


# ----------------------------------------------------------------------------------------------
# The embedded teacher (tiny.py)


def read_safetensors(path):
    """(tensors, metadata) of a .safetensors file, or a one-line error naming the file and the fix."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path (the tiny teacher ships as "
                                f"assets/tiny_teacher.safetensors; re-create it with `python tiny.py`)")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         f"re-download or re-create it") from None


def load_tiny_teacher(path, device="cpu"):
    import tiny
    tensors, meta = read_safetensors(path)
    if "config" not in meta:
        raise ValueError(f"{path} has no model config in its metadata: it is not a tiny-teacher file "
                         f"(re-create it with `python tiny.py`)")
    cfg = config_from_dict(json.loads(meta["config"]))
    net, enc = build_model(cfg), tiny.TinyTextEncoder(cfg.caption_channels)
    load_exact(net, {k[len("transformer."):]: v for k, v in tensors.items() if k.startswith("transformer.")}, path)
    load_exact(enc, {k[len("text_encoder."):]: v for k, v in tensors.items() if k.startswith("text_encoder.")}, path)
    net.to(device).eval().requires_grad_(False)
    enc.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode_prompts(prompts):
        text, mask = enc(list(prompts))
        return {"text": text, "text_mask": mask}

    return Teacher(
        name="tiny", transformer=net, encode_prompts=encode_prompts,
        encode=tiny.encode_images, decode=tiny.decode_latents,
        latent_channels=cfg.in_channels, vae_factor=tiny.LATENT_FACTOR, resolution=tiny.IMAGE_SIZE,
        sampling=dict(steps=32, guidance=4.5, shift=1.0),
        # CPU-sized run of the paper's recipe: same losses, guidance, Adam betas; bigger lr, smaller batch.
        # At this lr the raw G wanders from one iteration to the next (1-step feature FD between 0.5 and 2 at
        # steps 200-300); an EMA with a 1-kimg half-life (~31 iterations) averages that out.
        train_defaults=dict(batch=32, lr=1e-4, glr=1e-4, max_steps=300, sample_every=100, ckpt_every=100,
                            grad_checkpointing=0, ema_halflife_kimg=1.0),
        default_prompts=list(tiny.ALL_PROMPTS),
    )


def load_exact(module, state, source):
    """load_state_dict that names the first missing/unexpected key or mismatched shape, in one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source}: {len(missing)} missing keys (first: {missing[:1]}), {len(unexpected)} "
                         f"unexpected keys (first: {unexpected[:1]}); is this the right checkpoint for this model?")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: key {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    module.load_state_dict(state)


def read_prompts(path):
    """Prompts from a text file, one per line; blank lines dropped, duplicates kept once, order kept."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} does not exist; pass --prompts FILE with one prompt per line")
    with open(path, encoding="utf-8") as f:
        prompts = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts


# ----------------------------------------------------------------------------------------------
# SANA transformer weights -> model.Sana: declarative key tables

# diffusers SanaTransformer2DModel name -> our name. `{i}` is a block index; each row covers the
# module's .weight and .bias (or a bare parameter such as scale_shift_table). Renames only.
DIFFUSERS_KEYS = [
    ("patch_embed.proj", "patch_embed"),
    ("time_embed.emb.timestep_embedder.linear_1", "t_embedder.linear_1"),   # AdaLayerNormSingle
    ("time_embed.emb.timestep_embedder.linear_2", "t_embedder.linear_2"),
    ("time_embed.timestep_embedder.linear_1", "t_embedder.linear_1"),       # Sprint (guidance_embeds=True) layout
    ("time_embed.timestep_embedder.linear_2", "t_embedder.linear_2"),
    ("time_embed.guidance_embedder.linear_1", "guidance_embedder.linear_1"),
    ("time_embed.guidance_embedder.linear_2", "guidance_embedder.linear_2"),
    ("time_embed.linear", "t_block"),
    ("caption_projection.linear_1", "caption_proj.linear_1"),
    ("caption_projection.linear_2", "caption_proj.linear_2"),
    ("caption_norm", "caption_norm"),
    ("transformer_blocks.{i}.scale_shift_table", "blocks.{i}.scale_shift_table"),
    ("transformer_blocks.{i}.attn1.to_q", "blocks.{i}.attn.to_q"),
    ("transformer_blocks.{i}.attn1.to_k", "blocks.{i}.attn.to_k"),
    ("transformer_blocks.{i}.attn1.to_v", "blocks.{i}.attn.to_v"),
    ("transformer_blocks.{i}.attn1.to_out.0", "blocks.{i}.attn.to_out"),
    ("transformer_blocks.{i}.attn1.norm_q", "blocks.{i}.attn.norm_q"),
    ("transformer_blocks.{i}.attn1.norm_k", "blocks.{i}.attn.norm_k"),
    ("transformer_blocks.{i}.attn2.to_q", "blocks.{i}.cross_attn.to_q"),
    ("transformer_blocks.{i}.attn2.to_k", "blocks.{i}.cross_attn.to_k"),
    ("transformer_blocks.{i}.attn2.to_v", "blocks.{i}.cross_attn.to_v"),
    ("transformer_blocks.{i}.attn2.to_out.0", "blocks.{i}.cross_attn.to_out"),
    ("transformer_blocks.{i}.attn2.norm_q", "blocks.{i}.cross_attn.norm_q"),
    ("transformer_blocks.{i}.attn2.norm_k", "blocks.{i}.cross_attn.norm_k"),
    ("transformer_blocks.{i}.ff.conv_inverted", "blocks.{i}.ff.conv_inverted"),
    ("transformer_blocks.{i}.ff.conv_depth", "blocks.{i}.ff.conv_depth"),
    ("transformer_blocks.{i}.ff.conv_point", "blocks.{i}.ff.conv_point"),
    ("scale_shift_table", "final_scale_shift_table"),    # final layer, rows (shift, scale) in both layouts
    ("proj_out", "proj_out"),
]

# NVlabs Sana .pth name -> our name(s). A tuple of targets is a fused tensor whose rows are the targets
# stacked in order: it is split with chunk(len(targets), dim=0), weight and bias alike (as diffusers'
# scripts/convert_sana_to_diffusers.py does; architectures.md section 4.6).
ORIGINAL_KEYS = [
    ("x_embedder.proj", "patch_embed"),
    ("t_embedder.mlp.0", "t_embedder.linear_1"),
    ("t_embedder.mlp.2", "t_embedder.linear_2"),
    ("cfg_embedder.mlp.0", "guidance_embedder.linear_1"),   # Sprint
    ("cfg_embedder.mlp.2", "guidance_embedder.linear_2"),
    ("t_block.1", "t_block"),                                # t_block = Sequential(SiLU, Linear)
    ("y_embedder.y_proj.fc1", "caption_proj.linear_1"),
    ("y_embedder.y_proj.fc2", "caption_proj.linear_2"),
    ("attention_y_norm", "caption_norm"),
    ("blocks.{i}.scale_shift_table", "blocks.{i}.scale_shift_table"),
    ("blocks.{i}.attn.qkv", ("blocks.{i}.attn.to_q", "blocks.{i}.attn.to_k", "blocks.{i}.attn.to_v")),  # split into 3
    ("blocks.{i}.attn.q_norm", "blocks.{i}.attn.norm_q"),    # SANA-1.5 / Sprint qk-norm
    ("blocks.{i}.attn.k_norm", "blocks.{i}.attn.norm_k"),
    ("blocks.{i}.attn.proj", "blocks.{i}.attn.to_out"),
    ("blocks.{i}.cross_attn.q_linear", "blocks.{i}.cross_attn.to_q"),
    ("blocks.{i}.cross_attn.kv_linear", ("blocks.{i}.cross_attn.to_k", "blocks.{i}.cross_attn.to_v")),  # split into 2
    ("blocks.{i}.cross_attn.q_norm", "blocks.{i}.cross_attn.norm_q"),
    ("blocks.{i}.cross_attn.k_norm", "blocks.{i}.cross_attn.norm_k"),
    ("blocks.{i}.cross_attn.proj", "blocks.{i}.cross_attn.to_out"),
    ("blocks.{i}.mlp.inverted_conv.conv", "blocks.{i}.ff.conv_inverted"),
    ("blocks.{i}.mlp.depth_conv.conv", "blocks.{i}.ff.conv_depth"),
    ("blocks.{i}.mlp.point_conv.conv", "blocks.{i}.ff.conv_point"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.scale_shift_table", "final_scale_shift_table"),
]
# in the .pth but unused at inference: the sincos buffer (no positional embedding at 512/1024 px), the
# learned null caption of training-time CFG dropout, and the optional log-variance head
ORIGINAL_DROPPED = ("pos_embed", "y_embedder.y_embedding", "logvar_linear.")

# NVlabs configs give cross-attention `num_heads` per width (SanaMS_600M_P1_D28: 16, SanaMS_1600M_P1_D20
# and SANA-1.5: 20); the .pth does not store it, and self-attention heads are always width / 32.
CROSS_HEADS_BY_WIDTH = {1152: 16, 2240: 20}


def _row_pattern(source):
    return re.compile("^" + re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?P<param>\.weight|\.bias)?$")


def map_keys(state, table, dropped=()):
    """Apply a key table: ({our key: tensor}, {our key: checkpoint key}, [checkpoint keys no row matches])."""
    rules = [(_row_pattern(src), dst) for src, dst in table]
    out, source, unmatched = {}, {}, []
    for key, value in state.items():
        match = next(((m, dst) for pattern, dst in rules if (m := pattern.match(key))), None)
        if match is None:
            if not key.startswith(tuple(dropped)):
                unmatched.append(key)
            continue
        m, dst = match
        targets = dst if isinstance(dst, tuple) else (dst,)
        if value.shape[0] % len(targets):
            raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)}, whose first dimension does not "
                             f"split into {len(targets)} equal parts; this is not a SANA checkpoint")
        parts = value.chunk(len(targets), dim=0) if len(targets) > 1 else (value,)
        for target, part in zip(targets, parts):
            ours = target.format(i=m.groupdict().get("i")) + (m["param"] or "")
            out[ours] = part.clone() if len(targets) > 1 else part    # clone: no parameter shares a fused storage
            source[ours] = key
    return out, source, unmatched


def _source_key(ours, table):
    """The checkpoint key that a table maps onto our key `ours` (for error messages)."""
    for src, dst in table:
        for target in (dst if isinstance(dst, tuple) else (dst,)):
            m = _row_pattern(target).match(ours)
            if m:
                return src.format(i=m.groupdict().get("i")) + (m["param"] or "")
    return ours


def load_mapped(cfg, state, table, where, dropped=()):
    """model.Sana(cfg) on the meta device, filled from a checkpoint through a key table; every key and shape checked."""
    with torch.device("meta"):
        net = Sana(cfg)
    expected = net.state_dict()
    ours, source, unmatched = map_keys(state, table, dropped)
    unexpected = unmatched + [source[k] for k in ours if k not in expected]
    missing = [_source_key(k, table) for k in expected if k not in ours]
    if missing or unexpected:
        raise ValueError(f"{where}: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:3]}; the weights do not match the config ({_describe(cfg)}): use the "
                         f"config.json saved with them, or a SANA checkpoint of a supported kind")
    for k, v in ours.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{where}: {source[k]!r} has shape {tuple(v.shape)} but the config ({_describe(cfg)}) "
                             f"needs {tuple(expected[k].shape)} for our {k!r}; use the config.json saved with these "
                             f"weights (or re-download them)")
    net.load_state_dict(ours, assign=True)
    return net


def _describe(cfg):
    return (f"width {cfg.width}, depth {cfg.depth}, heads {cfg.num_heads}x{cfg.head_dim}, cross heads "
            f"{cfg.cross_heads}x{cfg.cross_head_dim}, qk_norm {cfg.qk_norm}, guidance_embeds {cfg.guidance_embeds}")


def _time_scale(path, timestep_scale=1.0):
    """Checkpoint timestep per unit flow time: 1000 * timestep_scale, or 1 for Sana-Sprint teachers.

    Like the official code (sid_dit_train.py), a teacher is "Sprint" when its path/repo name contains
    "sprint" (any case); pass time_scale= to load_transformer to override.
    """
    return 1.0 if "sprint" in str(path).lower() else 1000.0 * timestep_scale


# ----------------------------------------------------------------------------------------------
# SANA transformer weights -> model.Sana: configs and files


def sana_config_from_diffusers(d, path):
    """SanaConfig from a diffusers config.json dict; options model.py does not implement are one-line errors."""
    if d.get("_class_name") != "SanaTransformer2DModel":
        raise ValueError(f"{path} describes a {d.get('_class_name')!r}, not a SanaTransformer2DModel; point at the "
                         f"`transformer/` folder of a SANA diffusers checkpoint (e.g. {SANA_REPOS['sana']})")
    only = [   # (option, the one value model.py implements, what a different value means)
        ("attention_bias", False, "self-attention q/k/v biases are not in model.py; use a released SANA checkpoint"),
        ("norm_elementwise_affine", False, "affine block LayerNorms are not in model.py; use a released SANA "
                                           "checkpoint"),
        ("norm_eps", 1e-6, "model.py's block LayerNorms use eps 1e-6; use a released SANA checkpoint"),
    ]
    for option, value, why in only:
        if d.get(option, value) != value:
            raise ValueError(f"{path}: {option}={d[option]!r} is not supported ({why})")
    if d.get("qk_norm") not in (None, "rms_norm_across_heads"):
        raise ValueError(f"{path}: qk_norm={d['qk_norm']!r} is not supported (model.py implements only "
                         f"'rms_norm_across_heads', the SANA-1.5 / Sprint one)")
    heads, head_dim = d.get("num_attention_heads", 70), d.get("attention_head_dim", 32)
    cross_dim = d.get("cross_attention_dim", 2240)
    if cross_dim is not None and cross_dim != heads * head_dim:
        raise ValueError(f"{path}: cross_attention_dim {cross_dim} != num_attention_heads x attention_head_dim "
                         f"{heads * head_dim}; SANA's cross-attention works at the model width")
    in_channels = d.get("in_channels", 32)
    return SanaConfig(
        in_channels=in_channels, out_channels=d.get("out_channels") or in_channels, patch_size=d.get("patch_size", 1),
        num_heads=heads, head_dim=head_dim, depth=d.get("num_layers", 20),
        cross_heads=d.get("num_cross_attention_heads", 20), cross_head_dim=d.get("cross_attention_head_dim", 112),
        caption_channels=d.get("caption_channels", 2304), mlp_ratio=d.get("mlp_ratio", 2.5),
        qk_norm=d.get("qk_norm") == "rms_norm_across_heads", guidance_embeds=bool(d.get("guidance_embeds", False)),
        guidance_scale=d.get("guidance_embeds_scale", 0.1), time_scale=_time_scale(path, d.get("timestep_scale", 1.0)),
        sample_size=d.get("sample_size", 32), interpolation_scale=d.get("interpolation_scale"))


def sana_config_from_original(state, path, cross_heads=None):
    """SanaConfig inferred from the tensor shapes of an NVlabs .pth state dict (see CROSS_HEADS_BY_WIDTH)."""
    if "x_embedder.proj.weight" not in state or "blocks.0.mlp.inverted_conv.conv.weight" not in state:
        raise ValueError(f"{path} has no x_embedder.proj.weight / blocks.0.mlp.* tensors: it is not an NVlabs SANA "
                         f"checkpoint; pass a SANA .pth or a diffusers `transformer/` folder")
    if re.search(r"[24]kpx", str(path).lower()):
        raise ValueError(f"{path}: the 2K/4K SANA models add sincos positional embeddings, which model.py does not "
                         f"implement; use a 512 or 1024 px checkpoint")
    width, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    cross_heads = cross_heads or CROSS_HEADS_BY_WIDTH.get(width)
    if cross_heads is None or width % 32 or width % cross_heads:
        raise ValueError(f"{path}: width {width} has no known cross-attention head count (known: "
                         f"{CROSS_HEADS_BY_WIDTH}); pass cross_heads= (the NVlabs config's num_heads)")
    hidden = state["blocks.0.mlp.inverted_conv.conv.weight"].shape[0] // 2          # Mix-FFN F (the GLU doubles it)
    n_pos = state["pos_embed"].shape[1] if "pos_embed" in state else 0                 # (1, (input_size/p)^2, D)
    return SanaConfig(
        in_channels=in_channels, out_channels=state["final_layer.linear.weight"].shape[0] // patch**2,
        patch_size=patch, num_heads=width // 32, head_dim=32,
        depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
        cross_heads=cross_heads, cross_head_dim=width // cross_heads,
        caption_channels=state["y_embedder.y_proj.fc1.weight"].shape[1], mlp_ratio=hidden / width,
        qk_norm="blocks.0.attn.q_norm.weight" in state, guidance_embeds="cfg_embedder.mlp.0.weight" in state,
        time_scale=_time_scale(path), sample_size=math.isqrt(n_pos) if n_pos else 32)


WEIGHT_FILE = re.compile(r"^(?P<base>[A-Za-z_]+)(?:\.(?P<variant>\w+?))?(?:-\d+-of-\d+)?\.safetensors$")
INDEX_FILE = re.compile(r"^(?P<base>[A-Za-z_]+)\.safetensors\.index(?:\.(?P<variant>\w+))?\.json$")


def pick_weights(names, variant=None, where="folder"):
    """(variant, files) among one folder's file names: the plain (fp32) safetensors if present, else the asked-for
    or first variant; files = one single file, or an index .json plus its shards."""
    found = {}
    for name in names:
        m = WEIGHT_FILE.match(name) or INDEX_FILE.match(name)
        if m:
            found.setdefault(m["variant"], []).append(name)
    if not found:
        raise FileNotFoundError(f"{where} has no safetensors weights (diffusion_pytorch_model.safetensors, its shards "
                                f"or a precision variant); download the folder with its weights")
    if variant is None and None not in found:
        if len(found) > 1:
            raise ValueError(f"{where} holds several weight variants {sorted(found)} and no plain fp32 file; pass "
                             f"variant= one of them")
        variant = next(iter(found))          # e.g. only diffusion_pytorch_model.bf16.safetensors is there
    if variant not in found:
        raise FileNotFoundError(f"{where} has no {variant} safetensors weights; pass variant= one of "
                                f"{sorted(str(v) for v in found)} (None: plain fp32)")
    return variant, sorted(found[variant])


def read_diffusers_weights(folder, variant=None, device="cpu"):
    """{name: tensor} of a diffusers model folder: single file, sharded (index .json), or a precision variant."""
    from safetensors import safe_open
    variant, files = pick_weights(os.listdir(folder), variant, folder)
    index = [f for f in files if f.endswith(".json")]
    if index:
        with open(os.path.join(folder, index[0])) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weight file {path} (listed in {index[0]}) is missing; re-download the folder")
        try:
            f = safe_open(path, framework="pt", device=str(device))   # straight to the GPU: no 8x host copies
        except Exception as e:  # safetensors raises several types for truncated or foreign files
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                             f"re-download it") from None
        with f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def read_model_config(folder, sub, what):
    """(model folder, config.json dict): `folder` itself, or its `sub/` when given a pipeline folder."""
    folder = str(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
            os.path.join(folder, sub, "config.json")):
        folder = os.path.join(folder, sub)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist; pass {what}")
    with open(config_path) as f:
        return folder, json.load(f)


def load_dcae(folder, device="cpu", dtype=torch.float32, variant=None):
    """(vae.DCAE, scaling_factor) from a diffusers AutoencoderDC `vae/` folder (or a pipeline folder holding one).

    Keys map through vae.KEY_RENAMES; every tensor is checked by name and shape against the module that
    config.json describes. Frozen, eval mode. The teacher latent is x0 = encode(img) * scaling_factor.
    """
    from vae import DCAE, dcae_config_from_diffusers, diffusers_key, rename_diffusers_key
    folder, config = read_model_config(folder, "vae", "the diffusers `vae/` folder of a SANA pipeline "
                                                      "(config.json + diffusion_pytorch_model.safetensors)")
    cfg = dcae_config_from_diffusers(config)
    with torch.device("meta"):
        model = DCAE(cfg)
    expected = model.state_dict()
    state = {}
    for key, t in read_diffusers_weights(folder, variant, device).items():
        ours = rename_diffusers_key(key)
        if ours not in expected:
            raise ValueError(f"{folder}: unexpected key {key!r}; these weights do not match config.json (use the "
                             f"config.json saved with them)")
        if t.shape != expected[ours].shape:
            raise ValueError(f"{folder}: {key!r} has shape {tuple(t.shape)} but config.json implies "
                             f"{tuple(expected[ours].shape)}; use the config.json saved with these weights")
        state[ours] = t.to(dtype)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} weights missing from the checkpoint, first "
                         f"{diffusers_key(missing[0])!r}; the weights do not match config.json, or the download is "
                         f"incomplete: re-download the `vae/` folder")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False), cfg.scaling_factor


def load_transformer(path, variant=None, cross_heads=None, time_scale=None, device="cpu", dtype=torch.float32):
    """Our model.Sana from a diffusers `transformer/` folder (or a pipeline folder holding one) or an NVlabs .pth.

    variant: "fp16"/"bf16" weight files of a diffusers folder (default: fp32 if present, else the variant there).
    cross_heads: cross-attention heads of a .pth whose width is not in CROSS_HEADS_BY_WIDTH.
    time_scale: override the checkpoint timestep per unit flow time (default 1000, 1 for "sprint" names).
    Weights are read into the meta-built module without a random init, then cast to `dtype` (fp32 master weights).
    """
    path = str(path)
    if os.path.isdir(path):
        path, config = read_model_config(path, "transformer", "a diffusers `transformer/` folder (config.json + "
                                                              "diffusion_pytorch_model*.safetensors) or an NVlabs .pth")
        cfg = sana_config_from_diffusers(config, os.path.join(path, "config.json"))
        net = load_mapped(cfg, read_diffusers_weights(path, variant, device), DIFFUSERS_KEYS, path)
    elif os.path.isfile(path) and path.endswith((".pth", ".pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
        cfg = sana_config_from_original(state, path, cross_heads)
        net = load_mapped(cfg, state, ORIGINAL_KEYS, path, ORIGINAL_DROPPED)
    else:
        raise FileNotFoundError(f"SANA checkpoint {path} does not exist or is neither a folder nor a .pth; pass a "
                                f"diffusers `transformer/` folder or an NVlabs .pth")
    if time_scale is not None:
        net.config.time_scale = float(time_scale)
    return net.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# SANA pipeline: download, Gemma-2 prompt encoder, DC-AE, Teacher

# The default `complex_human_instruction` of diffusers SanaPipeline.__call__ (diffusers 0.42.1),
# prepended to every non-empty prompt; its tokens are dropped again after encoding (see below).
COMPLEX_HUMAN_INSTRUCTION = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
]
TEXT_TOKENS = 300   # SANA's model_max_length


def gemma_prompt_encoder(tokenizer, encoder, instruction=COMPLEX_HUMAN_INSTRUCTION, tokens=TEXT_TOKENS):
    """prompts -> {"text": (B, 300, D), "text_mask": (B, 300)}, as diffusers SanaPipeline.encode_prompt does:

    each prompt is lower().strip()-ed and prefixed with the instruction, tokenised (BOS, right padding) to
    n_instruction_tokens + 300 - 2 and run through Gemma-2 with its mask; then BOS and the last 299 positions
    are kept, which drops the instruction tokens (their influence stays through causal attention). The empty
    prompt (the CFG negative) is encoded without the instruction, padded to 300, as the official SiD-DiT code.
    """
    tokenizer.padding_side = "right"
    prefix = "\n".join(instruction)
    prefix_len = len(tokenizer.encode(prefix))            # BOS included
    keep = [0] + list(range(-(tokens - 1), 0))            # BOS + the last 299 positions

    def run(texts, length):
        batch = tokenizer(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                          return_tensors="pt")
        ids, mask = batch.input_ids.to(encoder.device), batch.attention_mask.to(encoder.device)
        text = encoder(ids, attention_mask=mask).last_hidden_state                  # (B, length, D)
        return text[:, keep], mask[:, keep]                                         # (B, 300, D), (B, 300)

    @torch.no_grad()
    def encode_prompts(prompts):
        prompts = [p.lower().strip() for p in prompts]
        length = prefix_len + tokens - 2 if instruction else tokens
        groups = [([i for i, p in enumerate(prompts) if p], prefix, length),    # with the instruction
                  ([i for i, p in enumerate(prompts) if not p], "", tokens)]    # "" without it
        text = torch.zeros(len(prompts), tokens, encoder.config.hidden_size, dtype=encoder.dtype, device=encoder.device)
        mask = torch.zeros(len(prompts), tokens, dtype=torch.long, device=encoder.device)
        for idx, pre, length in groups:
            if idx:
                text[idx], mask[idx] = run([pre + prompts[i] for i in idx], length)
        return {"text": text, "text_mask": mask}

    return encode_prompts


def download_pipeline(repo_id, variant=None):
    """Local folder of a HF diffusers pipeline repo; downloads (once, to the HF cache) only what a teacher needs:
    model_index.json and transformer/ vae/ text_encoder/ tokenizer/ scheduler/, one weight variant each.
    Offline (HF_HUB_OFFLINE=1 or no network), an earlier download from the cache is used."""
    from huggingface_hub import HfApi, snapshot_download
    try:
        files = HfApi().list_repo_files(repo_id)
    except Exception as e:  # offline, unknown repo, no access: try the cache before giving up
        try:
            return snapshot_download(repo_id, local_files_only=True)
        except Exception:
            raise ValueError(f"could not download teacher {repo_id!r} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                             f"check the name, your network / `huggingface-cli login`, or pass a local pipeline "
                             f"folder") from None
    wanted = ["model_index.json"]
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        names = [f[len(part) + 1:] for f in files if f.startswith(part + "/") and f.count("/") == 1]
        weights = [n for n in names if WEIGHT_FILE.match(n) or INDEX_FILE.match(n)]
        wanted += [f"{part}/{n}" for n in names if n not in weights and not n.endswith((".bin", ".pth", ".ckpt"))]
        if weights:
            picked = pick_weights(weights, variant if part == "transformer" else None, f"{repo_id}/{part}")[1]
            wanted += [f"{part}/{n}" for n in picked]
    return snapshot_download(repo_id, allow_patterns=wanted)


def _default_device():
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def load_sana_teacher(folder, name, device=None, text_dtype=None, variant=None):
    """A `Teacher` from a diffusers SANA pipeline folder (model_index.json, transformer/, vae/, text_encoder/,
    tokenizer/, scheduler/): our Sana + Gemma-2 through transformers + our DC-AE (vae.py)."""
    from transformers import AutoTokenizer, Gemma2Model
    folder = str(folder)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"{folder} has no model_index.json: it is not a diffusers pipeline folder; pass one "
                                f"(e.g. a download of {SANA_REPOS['sana']}) or a teacher name {list(SANA_REPOS)}")
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(folder, part)):
            raise FileNotFoundError(f"{folder} has no {part}/ folder; a SANA teacher needs transformer/, vae/, "
                                    f"text_encoder/ and tokenizer/ (re-download the pipeline)")
    device = torch.device(device) if device is not None else _default_device()
    text_dtype = text_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    net = load_transformer(os.path.join(folder, "transformer"), variant=variant, device=device)
    net.eval().requires_grad_(False)
    vae, scaling = load_dcae(os.path.join(folder, "vae"), device=device)
    text_folder = os.path.join(folder, "text_encoder")
    text_variant = pick_weights(os.listdir(text_folder), None, text_folder)[0]
    encoder = Gemma2Model.from_pretrained(text_folder, dtype=text_dtype, attn_implementation="eager",
                                          variant=text_variant)   # eager: SDPA would drop Gemma-2's logit soft-cap
    encoder.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    cfg = net.config
    if vae.config.latent_channels != cfg.in_channels or encoder.config.hidden_size != cfg.caption_channels:
        raise ValueError(f"{folder}: the VAE ({vae.config.latent_channels} latent channels) or text encoder (width "
                         f"{encoder.config.hidden_size}) does not fit the transformer (in {cfg.in_channels}, "
                         f"caption {cfg.caption_channels}); the pipeline folder mixes models")
    shift = 3.0   # SANA's flow_shift at 512/1024 px; the scheduler config says so when present
    scheduler_config = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler_config):
        with open(scheduler_config) as f:
            sc = json.load(f)
        shift = float(sc.get("flow_shift") or sc.get("shift") or shift)

    @torch.no_grad()
    def encode(img):                        # (B, 3, H, W) in [-1, 1] -> x0 (B, 32, H/32, W/32)
        return vae.encode(img.to(device)).float() * scaling

    @torch.no_grad()
    def decode(x0):                         # x0 -> (B, 3, H, W) in [-1, 1]
        return vae.decode(x0.to(device) / scaling).float().clamp(-1, 1)

    factor = vae.config.spatial_factor
    return Teacher(
        name=name, transformer=net, encode_prompts=gemma_prompt_encoder(tokenizer, encoder), encode=encode,
        decode=decode, latent_channels=vae.config.latent_channels, vae_factor=factor,
        resolution=cfg.sample_size * factor,                  # sample_size is the native latent side
        sampling=dict(steps=20, guidance=4.5, shift=shift),   # the SANA pipeline's defaults (DPM-Solver++ 2M there)
        train_defaults={},                                    # the paper's settings are train.py's defaults
        default_prompts=read_prompts(DEFAULT_PROMPTS),
    )
