"""
Teachers: official checkpoints -> our modules, with their prompt encoders, latent codecs and samplers.

Every teacher, embedded or downloaded, is returned as one `Teacher` with the same interface, so
train.py and sample.py never ask which family they hold:

    teacher = load_teacher("tiny")            # or "sana", a diffusers pipeline folder, a HF repo id
    cond = teacher.encode_prompts(["a red circle at the top left"])   # dict of tensors
    v = teacher.transformer(x_t, t, **cond)   # velocity, t in [0, 1]
    x0 = teacher.sample(prompts, z)           # the teacher's own pipeline sampler: its scheduler, steps, CFG
    img = teacher.decode(x0)                  # (B, 3, H, W) in [-1, 1]

`cond` holds whichever of text (B, L, D), text_mask (B, L), pooled (B, P) the family uses; its
tensors are batched along dim 0, so CFG can concatenate them.

All weights go through one engine (`load_weights`): the module is built on the meta device (no
random init, no memory), every checkpoint tensor is mapped by a declarative key table, checked by
name, count and shape, and loaded with `assign=True`. `to_checkpoint` runs a table backwards (our
keys -> the checkpoint's) for export. The family is read from the folder, never from its name:
`model_index.json` `_class_name` picks the pipeline, `config.json` `_class_name` the transformer.

SANA weights come in two layouts: a diffusers `transformer/` folder (single file, sharded, or a
precision variant) and an original NVlabs `.pth`. `load_transformer(path)` returns the module alone;
`load_teacher("sana")` downloads (once) and assembles the whole pipeline: transformer, Gemma-2 prompt
encoder (as diffusers SanaPipeline.encode_prompt), DC-AE (vae.py), scheduler and the bundled prompt list.
The 16-channel KL VAE of SD3, SD3.5 and FLUX (vae.KLVAE) loads from a diffusers `vae/` folder or from an
original single file (SAI `first_stage_model.*`, BFL ae.safetensors) through `load_kl_vae`; `kl_teacher_codec`
turns it into the teacher's encode/decode with the pipelines' latent scaling and shift.

FLUX.1 transformers load the same way from a diffusers `transformer/` folder or from BFL's single file
(`flux1-dev.safetensors`, `flux1-schnell.safetensors`), whose fused qkv / linear1 tensors the key table splits.

SD3 / SD3.5 transformer weights come as a diffusers `transformer/` folder or an SAI single file
(`model.diffusion_model.*`, its VAE and text encoders beside it); `load_transformer(path)` reads both.

Checked against: the tiny teacher round-trips through its own safetensors file (test_train.py);
SANA loaders and prompt encoding against diffusers/transformers on tiny random checkpoints, and
full-size tensor/parameter counts on the meta device (test_sana.py: `python -m pytest test_sana.py -q`);
SD3 / SD3.5 loaders likewise, SAI files cross-checked with diffusers' own converter (test_sd3.py);
the KL VAE loaders against diffusers AutoencoderKL and its convert_ldm_vae_checkpoint (test_kl_vae.py);
FLUX loaders against diffusers FluxTransformer2DModel and its BFL converter (`python -m pytest test_flux.py -q`).
"""

import json
import math
import mmap
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from model import FluxConfig, SanaConfig, SD3Config, build_model, config_from_dict

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")
DEFAULT_PROMPTS = os.path.join(HERE, "prompts", "default_prompts.txt")   # data-free prompts for any teacher

# named real teachers -> Hugging Face repos (diffusers pipeline layout)
TEACHER_REPOS = {
    "sana": "Efficient-Large-Model/Sana_600M_512px_diffusers",
    "sana-600m-1024": "Efficient-Large-Model/Sana_600M_1024px_diffusers",
    "sana-1.6b-512": "Efficient-Large-Model/Sana_1600M_512px_diffusers",
    "sana-1.6b-1024": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",      # gated: licence + huggingface-cli login
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}


@dataclass
class Teacher:
    name: str
    transformer: torch.nn.Module                 # v = transformer(x, t, **cond); frozen
    encode_prompts: Callable[..., dict]          # (prompts, negative=False) -> {"text", "text_mask"?, "pooled"?}
    #                                              negative=True: encoded as the pipeline encodes its CFG negative
    encode: Callable[..., torch.Tensor]          # (images (B, 3, H, W) in [-1, 1], generator=None) -> latents x0;
    #                                              a generator draws from the latent distribution where the VAE has
    #                                              one (SD3/FLUX KL VAE, as the official data path); others ignore it
    decode: Callable[[torch.Tensor], torch.Tensor]   # latents x0 -> images in [-1, 1]
    latent_channels: int
    vae_factor: int                              # image pixels per latent pixel
    resolution: int                              # default image side in pixels
    scheduler: dict                              # the pipeline's scheduler_config.json (its `_class_name` included)
    sample_steps: int                            # the pipeline's default number of inference steps
    guidance: float                              # the pipeline's default guidance_scale
    embeds_guidance: bool = False                # guidance is a network input (FLUX-dev), not CFG
    pipeline_cfg: bool = True                    # the pipeline runs CFG against "" when guidance > 1 (SD3, SANA);
    #                                              FluxPipeline never does (FLUX-dev embeds g; schnell ignores it)
    # How the pipeline asks its scheduler for the sigma grid (sample.teacher_grid):
    sigma_grid: str = "scheduler"                # "scheduler": the scheduler's own grid for N steps (SD3, SANA);
    #                                              "linspace": it passes sigmas = linspace(1, 1/N, N) (FluxPipeline)
    dynamic_mu: bool = False                     # it passes mu = calculate_shift(image tokens) to a scheduler with
    #                                              use_dynamic_shifting (SD3, FLUX pipelines; SanaPipeline does not)
    text_encoders: list = field(default_factory=list)    # the prompt encoders' modules (train.py moves them off the
    #                                                      GPU once the run's prompts are cached)
    vae: torch.nn.Module | None = None                   # the latent codec's module (stays on the GPU: sample grids,
    #                                                      --data); None for the tiny teacher's exact pixel codec
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

    def sample(self, prompts, z, steps=None, guidance=None):
        """x0 latents from initial noise z (B, C, h, w), exactly as the teacher's own pipeline samples them:
        its scheduler and grid policy, its default steps and guidance, guidance as the pipeline applies it."""
        from sample import pipeline_sample   # sample.py holds every sampler; it imports this module
        return pipeline_sample(self, prompts, z, steps or self.sample_steps,
                               self.guidance if guidance is None else guidance)


def load_teacher(name_or_path, device=None, text_dtype=None, variant=None, max_sequence_length=None,
                 transformer=None, transformer_device=None, transformer_dtype=torch.float32):
    """A `Teacher` for 'tiny', a named teacher (TEACHER_REPOS), a local diffusers pipeline folder, or a HF repo id.

    device: where the frozen nets run (default: CPU for 'tiny'; this rank's GPU for real teachers when there is one).
    text_dtype: the text encoders' dtype (default bf16 on GPU, as the official code; fp32 on CPU).
    variant: transformer weight variant to read ("fp16", "bf16"; default fp32 when the repo has it).
    max_sequence_length: T5 tokens (SD3: 77, the official SiD-DiT setting, where the pipeline uses 256; FLUX: 512).
    transformer: an original single file to use instead of the folder's transformer/ (SAI SD3 .safetensors, also
    taking the VAE from it when it holds `first_stage_model.*`; BFL FLUX .safetensors; NVlabs SANA .pth); the
    folder still gives the text encoders, tokenizers and scheduler.
    transformer_device: where the transformer's weights go (default: `device`); "cpu" keeps them memory-mapped,
    "meta" reads only its config and shapes. transformer_dtype: its dtype (None: the checkpoint's).
    """
    name = str(name_or_path)
    if name == "tiny" or name.endswith(".safetensors"):
        if transformer or max_sequence_length:
            raise ValueError("transformer= / max_sequence_length= are for real teachers' pipeline folders; the tiny "
                             "teacher is one file: drop them")
        path = os.path.join(ASSETS, "tiny_teacher.safetensors") if name == "tiny" else name
        return load_tiny_teacher(path, device or "cpu", transformer_device, transformer_dtype)
    if name in TEACHER_REPOS or (not os.path.exists(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name)):
        folder = download_pipeline(TEACHER_REPOS.get(name, name), variant)
    elif os.path.isdir(name):
        folder = name
    else:
        raise ValueError(f"unknown teacher {name!r}; use one of {['tiny', *TEACHER_REPOS]}, a tiny-teacher "
                         f".safetensors file, a diffusers pipeline folder, or a Hugging Face repo id (owner/name)")
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{folder} has no model_index.json: it is not a diffusers pipeline folder; pass one "
                                f"(e.g. a download of {TEACHER_REPOS['sana']}) or a teacher name {list(TEACHER_REPOS)}")
    with open(index) as f:
        pipeline = json.load(f).get("_class_name")
    if pipeline not in PIPELINES:
        raise ValueError(f"{folder} holds a {pipeline!r}; supported pipelines are {sorted(PIPELINES)}")
    options = {k: v for k, v in dict(max_sequence_length=max_sequence_length, transformer=transformer).items() if v}
    return PIPELINES[pipeline](folder, name, device, text_dtype, variant, transformer_device=transformer_device,
                               transformer_dtype=transformer_dtype, **options)


def _default_device():
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


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
# The loading engine: key tables from any checkpoint layout to our modules, and back

# A key table is a list of rows (checkpoint name, our name) or (checkpoint name, our name, op):
#  - a name covers a module's .weight and .bias, or names a bare parameter or buffer (scale_shift_table);
#  - {i}, {j} stand for block indices (digits), {path} for any dotted prefix; the first matching row wins;
#  - a tuple of our names splits one checkpoint tensor along dim 0 into consecutive parts sized by our
#    module's shapes (a fused qkv -> q, k, v); run backwards, the parts are concatenated again;
#  - op "swap" exchanges the two halves along dim 0: AdaLN rows (shift, scale) <-> (scale, shift);
#  - op "conv1x1" turns a (O, I, 1, 1) conv weight into the (O, I) Linear weight with the same numbers.
IDENTITY = [("{path}", "{path}")]


def _swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


OPS = {   # op -> (checkpoint to ours, ours to checkpoint)
    None: (lambda t: t, lambda t: t),
    "swap": (_swap_halves, _swap_halves),
    "conv1x1": (lambda t: t.flatten(1) if t.dim() == 4 else t, lambda t: t[:, :, None, None] if t.dim() == 2 else t),
}


def _pattern(name):
    rx = re.sub(r"\\\{path\\\}", r"(?P<path>.+?)", re.escape(name))
    rx = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", rx)
    return re.compile("^" + rx + r"(?P<param>\.weight|\.bias)?$")


def _rows(table):
    """[(checkpoint name, (our names...), op)] with compiled patterns of both sides."""
    rows = []
    for row in table:
        src, dst, op = (*row, None)[:3]
        dst = dst if isinstance(dst, tuple) else (dst,)
        rows.append((src, _pattern(src), dst, [_pattern(d) for d in dst], op))
    return rows


def _fill(name, m):
    return name.format(**{k: v for k, v in m.groupdict().items() if k != "param"}) + (m["param"] or "")


def map_keys(state, table, shapes=None, dropped=()):
    """Checkpoint {key: tensor} -> ({our key: tensor}, {our key: checkpoint key}, [checkpoint keys no row took]).

    shapes: {our key: shape} of the module being filled; it sizes the parts of a split (equal parts without it).
    dropped: checkpoint key prefixes that are ignored (tensors the module does not use).
    """
    rows = _rows(table)
    out, source, unmatched = {}, {}, []
    for key, value in state.items():
        if dropped and key.startswith(tuple(dropped)):
            continue
        hit = next(((m, dst, op) for _, rx, dst, _, op in rows if (m := rx.match(key))), None)
        if hit is None:
            unmatched.append(key)
            continue
        m, dst, op = hit
        targets = [_fill(d, m) for d in dst]
        value = OPS[op][0](value)
        if len(targets) > 1:
            sizes = [shapes[t][0] for t in targets] if shapes and all(t in shapes for t in targets) else None
            if sizes is None and value.shape[0] % len(targets) or sizes and sum(sizes) != value.shape[0]:
                raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)}, which does not split into "
                                 f"{targets}; the checkpoint does not match this model")
            parts = value.split(sizes) if sizes else value.chunk(len(targets))
            parts = [p.clone() for p in parts]                 # no parameter shares a fused storage
        else:
            parts = [value]
        for target, part in zip(targets, parts):
            out[target], source[target] = part, key
    return out, source, unmatched


def checkpoint_name(ours, table):
    """The checkpoint key a table maps onto our key `ours` (for error messages)."""
    for src, _, dst, dst_rx, _ in _rows(table):
        for rx in dst_rx:
            if m := rx.match(ours):
                return _fill(src, m)
    return ours


def to_checkpoint(ours, table):
    """Run a key table backwards: our {key: tensor} -> {checkpoint key: tensor} (split parts concatenated,
    ops inverted). Every one of our tensors must be claimed by a row."""
    out, claimed = {}, set()
    for src, _, dst, dst_rx, op in _rows(table):
        for key in ours:
            m = None if key in claimed else dst_rx[0].match(key)
            if m is None:
                continue
            names = [_fill(d, m) for d in dst]
            if any(n not in ours for n in names):
                raise ValueError(f"our {key!r} has no partner {[n for n in names if n not in ours]} to fuse into "
                                 f"{_fill(src, m)!r}; the key table does not fit this model")
            value = torch.cat([ours[n] for n in names]) if len(names) > 1 else ours[key]
            out[_fill(src, m)] = OPS[op][1](value)
            claimed.update(names)
    left = [k for k in ours if k not in claimed]
    if left:
        raise ValueError(f"no key-table row covers our {left[:3]} ({len(left)} tensors); the table is incomplete")
    return out


def load_weights(build, state, table, where, dropped=(), hint="use the weights' own config"):
    """build() on the meta device, filled from checkpoint `state` through a key table; every key and shape checked.

    Missing and unexpected tensors are named as the checkpoint names them. Tensors are assigned, not copied,
    so the module holds the checkpoint's dtype; the caller casts it.
    """
    with torch.device("meta"):
        net = build()
    expected = net.state_dict()
    ours, source, unmatched = map_keys(state, table, {k: v.shape for k, v in expected.items()}, dropped)
    unexpected = unmatched + [source[k] for k in ours if k not in expected]
    missing = [checkpoint_name(k, table) for k in expected if k not in ours]
    if missing or unexpected:
        raise ValueError(f"{where}: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:3]}; the weights do not match the model: {hint}")
    for k, v in ours.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{where}: {source[k]!r} has shape {tuple(v.shape)} but the model needs "
                             f"{tuple(expected[k].shape)} for our {k!r}: {hint}")
    net.load_state_dict(ours, assign=True)
    return net


# ----------------------------------------------------------------------------------------------
# Files: safetensors, diffusers folders (single, sharded, precision variants), downloads



SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path, device="cpu"):
    """(tensors, metadata) of a .safetensors file, or a one-line error naming the file and the fix.

    device "cpu": every tensor is a zero-copy view of the file, memory-mapped copy-on-write, so the ranks of a node
    that read one checkpoint share one copy of it in the page cache (the format is an 8-byte header length, a JSON
    header {name: {dtype, shape, data_offsets}}, then the raw bytes; huggingface/safetensors README).
    device "meta": shapes and dtypes from the header alone, nothing read (the ranks that only need the config).
    Any other device: read, then moved there.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path (the tiny teacher ships as "
                                f"assets/tiny_teacher.safetensors; re-create it with `python tiny.py`)")
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if device != "meta" and size > 8 + n else None
        meta = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in header.items():
            dtype, shape, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            numel = math.prod(shape)
            if end - start != numel * dtype.itemsize or 8 + n + end > size:
                raise ValueError(f"tensor {name} has {end - start} bytes for shape {shape}")
            if device == "meta" or numel == 0:
                tensors[name] = torch.empty(shape, dtype=dtype, device="meta" if device == "meta" else "cpu")
            else:
                tensors[name] = torch.frombuffer(mm, dtype=dtype, count=numel, offset=8 + n + start).view(shape)
    except Exception as e:  # truncated, foreign or corrupt files fail in many ways
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         f"re-download or re-create it") from None
    if str(device) not in ("cpu", "meta"):
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


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
    """{name: tensor} of a diffusers model folder: single file, sharded (index .json), or a precision variant;
    memory-mapped on "cpu", shapes only on "meta" (read_safetensors)."""
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
        state.update(read_safetensors(path, device)[0])
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


def read_scheduler(folder):
    """The pipeline folder's scheduler/scheduler_config.json as a dict ({} when the folder has none)."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def download_pipeline(repo_id, variant=None):
    """Local folder of a HF diffusers pipeline repo; downloads (once, to the HF cache) only what a teacher needs:
    model_index.json and the folders it names, one weight variant each (the transformer's `variant`, plain fp32
    elsewhere when the repo has it). Offline (HF_HUB_OFFLINE=1 or no network), an earlier download is used."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    try:
        files = HfApi().list_repo_files(repo_id)
        with open(hf_hub_download(repo_id, "model_index.json")) as f:
            parts = [k for k, v in json.load(f).items() if isinstance(v, list) and v[0] is not None]
    except Exception as e:  # offline, unknown repo, gated, no access: try the cache before giving up
        try:
            return snapshot_download(repo_id, local_files_only=True)
        except Exception:
            pass
        why = " ".join(str(e).split())[:160]
        if "gated" in f"{type(e).__name__} {why}".lower() or " 401 " in f" {why} " or " 403 " in f" {why} ":
            raise ValueError(f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id}, then run "
                             f"`huggingface-cli login` (or set HF_TOKEN) and try again") from None
        raise ValueError(f"could not download teacher {repo_id!r} ({type(e).__name__}: {why}); check the name, your "
                         f"network / `huggingface-cli login`, or pass a local pipeline folder") from None
    wanted = ["model_index.json"]
    for part in parts:
        names = [f[len(part) + 1:] for f in files if f.startswith(part + "/") and f.count("/") == 1]
        weights = [n for n in names if WEIGHT_FILE.match(n) or INDEX_FILE.match(n)]
        wanted += [f"{part}/{n}" for n in names if n not in weights and not n.endswith((".bin", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx"))]
        if weights:
            picked = pick_weights(weights, variant if part == "transformer" else None, f"{repo_id}/{part}")[1]
            wanted += [f"{part}/{n}" for n in picked]
    return snapshot_download(repo_id, allow_patterns=wanted)


# ----------------------------------------------------------------------------------------------
# The embedded teacher (tiny.py)


def load_tiny_teacher(path, device="cpu", transformer_device=None, transformer_dtype=torch.float32):
    import tiny
    tensors, meta = read_safetensors(path)
    if "config" not in meta:
        raise ValueError(f"{path} has no model config in its metadata: it is not a tiny-teacher file "
                         f"(re-create it with `python tiny.py`)")
    cfg = config_from_dict(json.loads(meta["config"]))
    hint = "re-create the file with `python tiny.py`"
    net = load_weights(lambda: build_model(cfg), tensors, [("transformer.{path}", "{path}")], path,
                       dropped=("text_encoder.",), hint=hint)
    enc = load_weights(lambda: tiny.TinyTextEncoder(cfg.caption_channels), tensors,
                       [("text_encoder.{path}", "{path}")], path, dropped=("transformer.",), hint=hint)
    net = net.to(transformer_device or device, transformer_dtype).eval().requires_grad_(False)
    enc.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode_prompts(prompts, negative=False):   # the negative "" is encoded like any prompt
        text, mask = enc(list(prompts))
        return {"text": text, "text_mask": mask}

    return Teacher(
        name="tiny", transformer=net, encode_prompts=encode_prompts, text_encoders=[enc],
        encode=lambda img, generator=None: tiny.encode_images(img), decode=tiny.decode_latents,   # exact codec
        latent_channels=cfg.in_channels, vae_factor=tiny.LATENT_FACTOR, resolution=tiny.IMAGE_SIZE,
        scheduler=dict(tiny.SCHEDULER), sample_steps=32, guidance=4.5,
        sigma_grid="linspace",                  # with shift 1: Euler on t_i = 1 - i/N, the grid it was benchmarked on
        # CPU-sized run of the paper's recipe: same losses, guidance, Adam betas; bigger lr, smaller batch.
        # At this lr the raw G wanders from one iteration to the next (1-step feature FD between 0.5 and 2 at
        # steps 200-300); an EMA with a 1-kimg half-life (~31 iterations) averages that out.
        # With --data: the official 20k / 40k-image warm-up is 2% / 4% of a 1M-image run; 320 / 640 images (10 / 20
        # of 300 iterations) keep the adversarial phase most of this short run. fp32: CPUs without AVX512-BF16
        # emulate bf16 (amp ran 7x slower than fp32 on our 2-core AMD EPYC machine).
        train_defaults=dict(batch=32, lr=1e-4, glr=1e-4, max_steps=300, sample_every=100, ckpt_every=100,
                            grad_checkpointing=0, ema_halflife_kimg=1.0, gan_g_start=320, gan_adv_start=640,
                            precision="fp32"),
        default_prompts=list(tiny.ALL_PROMPTS),
    )


# ----------------------------------------------------------------------------------------------
# SANA transformer weights -> model.Sana: declarative key tables

# diffusers SanaTransformer2DModel name -> our name. Renames only.
SANA_DIFFUSERS_KEYS = [
    ("patch_embed.proj", "patch_embed"),
    ("time_embed.emb.timestep_embedder.linear_1", "t_embedder.linear_1"),   # AdaLayerNormSingle
    ("time_embed.emb.timestep_embedder.linear_2", "t_embedder.linear_2"),
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
# Sana-Sprint (guidance_embeds=True) keeps its time embedder one level up, next to the guidance embedder
SANA_SPRINT_DIFFUSERS_KEYS = SANA_DIFFUSERS_KEYS[:1] + [
    ("time_embed.timestep_embedder.linear_1", "t_embedder.linear_1"),
    ("time_embed.timestep_embedder.linear_2", "t_embedder.linear_2"),
    ("time_embed.guidance_embedder.linear_1", "guidance_embedder.linear_1"),
    ("time_embed.guidance_embedder.linear_2", "guidance_embedder.linear_2"),
] + SANA_DIFFUSERS_KEYS[3:]


def sana_diffusers_keys(cfg):
    return SANA_SPRINT_DIFFUSERS_KEYS if cfg.guidance_embeds else SANA_DIFFUSERS_KEYS


# NVlabs Sana .pth name -> our name(s). A tuple of targets is a fused tensor whose rows are the targets
# stacked in order (as diffusers' scripts/convert_sana_to_diffusers.py splits them).
SANA_ORIGINAL_KEYS = [
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
SANA_ORIGINAL_DROPPED = ("pos_embed", "y_embedder.y_embedding", "logvar_linear.")

# NVlabs configs give cross-attention `num_heads` per width (SanaMS_600M_P1_D28: 16, SanaMS_1600M_P1_D20
# and SANA-1.5: 20); the .pth does not store it, and self-attention heads are always width / 32.
CROSS_HEADS_BY_WIDTH = {1152: 16, 2240: 20}


def _describe(cfg):
    return (f"width {cfg.width}, depth {cfg.depth}, heads {cfg.num_heads}x{cfg.head_dim}, cross heads "
            f"{cfg.cross_heads}x{cfg.cross_head_dim}, qk_norm {cfg.qk_norm}, guidance_embeds {cfg.guidance_embeds}")


def _time_scale(path, timestep_scale=1.0):
    """Checkpoint timestep per unit flow time: 1000 * timestep_scale, or 1 for Sana-Sprint teachers.

    Like the official code (sid_dit_train.py), a teacher is "Sprint" when its path/repo name contains
    "sprint" (any case); pass time_scale= to load_transformer to override.
    """
    return 1.0 if "sprint" in str(path).lower() else 1000.0 * timestep_scale


def sana_config_from_diffusers(d, path):
    """SanaConfig from a diffusers config.json dict; options model.py does not implement are one-line errors."""
    if d.get("_class_name") != "SanaTransformer2DModel":
        raise ValueError(f"{path} describes a {d.get('_class_name')!r}, not a SanaTransformer2DModel; point at the "
                         f"`transformer/` folder of a SANA diffusers checkpoint (e.g. {TEACHER_REPOS['sana']})")
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


# ----------------------------------------------------------------------------------------------
# Transformers: any supported checkpoint -> our module

# diffusers transformer `_class_name` -> (config.json dict -> our config, our config -> key table)
DIFFUSERS_TRANSFORMERS = {
    "SanaTransformer2DModel": (lambda d, path: sana_config_from_diffusers(d, path), sana_diffusers_keys),
}


# original single-file layouts: (detect(state) -> bool, read(state, path) -> (our config, key table, dropped
# prefixes, hint for errors)); each family section adds its row
SINGLE_FILES = []


def load_transformer(path, variant=None, cross_heads=None, time_scale=None, device="cpu", dtype=torch.float32):
    """Our module from a diffusers `transformer/` folder (or a pipeline folder holding one), or an original
    single file (NVlabs SANA .pth). The family comes from config.json's `_class_name` (or the file's keys).

    variant: "fp16"/"bf16" weight files of a diffusers folder (default: fp32 if present, else the variant there).
    cross_heads: cross-attention heads of a SANA .pth whose width is not in CROSS_HEADS_BY_WIDTH.
    time_scale: override the checkpoint timestep per unit flow time (SANA: default 1000, 1 for "sprint" names).
    Weights are read into the meta-built module without a random init, then cast to `dtype` (None: keep the
    checkpoint's). device "cpu" keeps them memory-mapped where no dtype cast or key-table split copies them;
    device "meta" reads the config and the shapes only (train.py's ranks other than 0, which get their shards
    from rank 0).
    Single files: an NVlabs SANA .pth, or a .safetensors whose layout a SINGLE_FILES row recognises.
    """
    path = str(path)
    if os.path.isdir(path):
        path, config = read_model_config(path, "transformer", "a diffusers `transformer/` folder (config.json + "
                                                              "diffusion_pytorch_model*.safetensors) or a single file")
        kind = config.get("_class_name")
        if kind not in DIFFUSERS_TRANSFORMERS:
            raise ValueError(f"{path}/config.json describes a {kind!r}, not a supported transformer; use one of "
                             f"{sorted(DIFFUSERS_TRANSFORMERS)} (the `transformer/` folder of a supported pipeline)")
        to_config, keys = DIFFUSERS_TRANSFORMERS[kind]
        cfg = to_config(config, os.path.join(path, "config.json"))
        net = load_weights(lambda: build_model(cfg), read_diffusers_weights(path, variant, device), keys(cfg), path,
                           hint="use the config.json saved with these weights (or re-download them)")
    elif os.path.isfile(path) and path.endswith(".safetensors"):
        state = read_safetensors(path, device)[0]
        reader = next((read for detect, read in SINGLE_FILES if detect(state)), None)
        if reader is None:
            raise ValueError(f"{path} is not a transformer single file of a supported layout (first keys "
                             f"{sorted(state)[:2]}); pass a diffusers `transformer/` folder instead")
        cfg, table, dropped, hint = reader(state, path)
        net = load_weights(lambda: build_model(cfg), state, table, path, dropped, hint=hint)
    elif os.path.isfile(path) and path.endswith((".pth", ".pt")):
        ckpt = read_pth(path, device)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
        cfg = sana_config_from_original(state, path, cross_heads)
        net = load_weights(lambda: build_model(cfg), state, SANA_ORIGINAL_KEYS, path, SANA_ORIGINAL_DROPPED,
                           hint=f"the shapes imply {_describe(cfg)}; use a SANA .pth of a supported kind")
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist or is neither a folder nor a .pth; pass a "
                                f"diffusers `transformer/` folder or an original single file")
    if time_scale is not None:
        net.config.time_scale = float(time_scale)
    return net.to(device=device, dtype=dtype) if dtype is not None else net.to(device=device)


def read_pth(path, device="cpu"):
    """A torch.save checkpoint's plain tensors (weights_only): shapes only for device "meta", else on the CPU,
    memory-mapped when the file is in the zip format (torch >= 1.6); the caller moves the module."""
    if device == "meta":
        return torch.load(path, map_location="meta", weights_only=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:          # the legacy (pre-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------
# SANA pipeline: Gemma-2 prompt encoder, DC-AE, Teacher

# The default `complex_human_instruction` of diffusers SanaPipeline.__call__ (diffusers 0.42.1),
# prepended to every prompt, "" included (never to the CFG negative); its tokens are dropped again after encoding.
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
    """(prompts, negative=False) -> {"text": (B, 300, D), "text_mask": (B, 300)}, as diffusers
    SanaPipeline.encode_prompt does (pipelines/sana/pipeline_sana.py):

    each prompt is lower().strip()-ed and prefixed with the instruction, tokenised (BOS, right padding) to
    n_instruction_tokens + 300 - 2 and run through Gemma-2 with its mask; then BOS and the last 299 positions
    are kept, which drops the instruction tokens (their influence stays through causal attention). Every
    prompt of the list gets the instruction, "" included. negative=True encodes the CFG negative as the
    pipeline does: no instruction, padded to 300 (the official SiD-DiT code encodes its "" the same way).
    """
    tokenizer.padding_side = "right"
    prefix = "\n".join(instruction)
    prefix_len = len(tokenizer.encode(prefix))            # BOS included
    keep = [0] + list(range(-(tokens - 1), 0))            # BOS + the last 299 positions

    warned = []

    @torch.no_grad()
    def encode_prompts(prompts, negative=False):
        prompts = [p.lower().strip() for p in prompts]
        if instruction and not negative:
            prompts, length = [prefix + p for p in prompts], prefix_len + tokens - 2
        else:
            length = tokens
        if not warned and max(len(ids) for ids in tokenizer(prompts).input_ids) > length:
            warned.append(True)     # once per encoder, as text_encoders.py warns for CLIP / T5
            warnings.warn(f"prompts were truncated to fit Gemma-2's {tokens} tokens, as SanaPipeline does; shorten "
                          f"them to keep every word", stacklevel=2)
        batch = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                          return_tensors="pt")
        ids, mask = batch.input_ids.to(encoder.device), batch.attention_mask.to(encoder.device)
        text = encoder(ids, attention_mask=mask).last_hidden_state                  # (B, length, D)
        return {"text": text[:, keep], "text_mask": mask[:, keep]}                  # (B, 300, D), (B, 300)

    return encode_prompts


# diffusers AutoencoderDC name -> our vae.DCAE name: three renames, the rest is the same
DCAE_DIFFUSERS_KEYS = [
    ("{path}.conv_out.conv_inverted", "{path}.ffn.conv_inverted"),   # EfficientViT feed-forward (GLUMBConv): diffusers
    ("{path}.conv_out.conv_depth", "{path}.ffn.conv_depth"),         # calls it `conv_out`
    ("{path}.conv_out.conv_point", "{path}.ffn.conv_point"),
    ("{path}.conv_out.norm", "{path}.ffn.norm"),
    ("{path}.attn.to_qkv_multiscale.{i}.proj_in", "{path}.attn.aggreg.{i}.proj_in"),   # original EfficientViT: aggreg
    ("{path}.attn.to_qkv_multiscale.{i}.proj_out", "{path}.attn.aggreg.{i}.proj_out"),
] + IDENTITY


def load_dcae(folder, device="cpu", dtype=torch.float32, variant=None):
    """(vae.DCAE, scaling_factor) from a diffusers AutoencoderDC `vae/` folder (or a pipeline folder holding one).

    Every tensor is checked by name and shape against the module that config.json describes. Frozen, eval
    mode. The teacher latent is x0 = encode(img) * scaling_factor.
    """
    from vae import DCAE, dcae_config_from_diffusers
    folder, config = read_model_config(folder, "vae", "the diffusers `vae/` folder of a SANA pipeline "
                                                      "(config.json + diffusion_pytorch_model.safetensors)")
    cfg = dcae_config_from_diffusers(config)
    model = load_weights(lambda: DCAE(cfg), read_diffusers_weights(folder, variant, device), DCAE_DIFFUSERS_KEYS,
                         folder, hint="use the config.json saved with these weights, or re-download the `vae/` folder")
    return model.to(dtype).eval().requires_grad_(False), cfg.scaling_factor


# ----------------------------------------------------------------------------------------------
# KL VAE (SD3, SD3.5, FLUX): diffusers folders and original single files -> vae.KLVAE

# diffusers AutoencoderKL name -> our vae.KLVAE name: the resampling convs and the mid attention lose diffusers'
# wrappers, the final norms are called norm_out (as in LDM); the rest is the same
KL_DIFFUSERS_KEYS = [
    ("{path}.downsamplers.0.conv", "{path}.downsample"),          # Downsample2D wraps the stride-2 conv
    ("{path}.upsamplers.0.conv", "{path}.upsample"),              # Upsample2D wraps the conv after nearest x2
    ("{path}.attentions.0.group_norm", "{path}.attn.norm"),       # the mid block's one (generic) Attention
    ("{path}.attentions.0.to_q", "{path}.attn.to_q"),
    ("{path}.attentions.0.to_k", "{path}.attn.to_k"),
    ("{path}.attentions.0.to_v", "{path}.attn.to_v"),
    ("{path}.attentions.0.to_out.0", "{path}.attn.to_out"),       # to_out = [Linear, Dropout]
    ("{path}.conv_norm_out", "{path}.norm_out"),
] + IDENTITY

KL_RESNET_PARTS = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                   ("nin_shortcut", "conv_shortcut")]              # LDM: "network-in-network" 1x1 shortcut


def kl_original_keys(cfg, prefix=""):
    """Key table of the original LDM layout -> our vae.KLVAE: SAI SD3/SD3.5 single files (prefix
    "first_stage_model.") and BFL ae.safetensors (no prefix) share it (diffusers 0.42.1
    loaders/single_file_utils.py convert_ldm_vae_checkpoint; black-forest-labs/flux src/flux/modules/autoencoder.py).

    The LDM decoder numbers its up stages by width (up.0 is the last to run, at the image's resolution), we number
    them in execution order, so decoder.up.{i} is our up_blocks.{n-1-i}: one concrete row per stage. The mid
    attention's q, k, v, proj_out are 1x1 convs there, Linear here.
    """
    n = len(cfg.block_out_channels)
    resnets = [("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}")]
    resnets += [(f"decoder.up.{i}.block.{{j}}", f"decoder.up_blocks.{n - 1 - i}.resnets.{{j}}") for i in range(n)]
    rows = [("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsample")]
    rows += [(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{n - 1 - i}.upsample") for i in range(1, n)]
    for coder in ("encoder", "decoder"):
        resnets += [(f"{coder}.mid.block_1", f"{coder}.mid_block.resnets.0"),
                    (f"{coder}.mid.block_2", f"{coder}.mid_block.resnets.1")]
        rows += [(f"{coder}.mid.attn_1.norm", f"{coder}.mid_block.attn.norm"),
                 (f"{coder}.mid.attn_1.q", f"{coder}.mid_block.attn.to_q", "conv1x1"),
                 (f"{coder}.mid.attn_1.k", f"{coder}.mid_block.attn.to_k", "conv1x1"),
                 (f"{coder}.mid.attn_1.v", f"{coder}.mid_block.attn.to_v", "conv1x1"),
                 (f"{coder}.mid.attn_1.proj_out", f"{coder}.mid_block.attn.to_out", "conv1x1")]
        rows += [(f"{coder}.{name}", f"{coder}.{name}") for name in ("conv_in", "norm_out", "conv_out")]
    rows += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    rows += [(f"{src}.{a}", f"{dst}.{b}") for src, dst in resnets for a, b in KL_RESNET_PARTS]
    return [(prefix + src, *rest) for src, *rest in rows]


def kl_config_from_original(state, where, prefix=""):
    """The architecture of an LDM-layout KL VAE read from its tensor shapes (norm groups, scaling and shift are not
    stored: KLConfig defaults)."""
    from vae import KLConfig
    if f"{prefix}encoder.conv_in.weight" not in state or f"{prefix}decoder.conv_in.weight" not in state:
        raise ValueError(f"{where} has no {prefix}encoder.conv_in / {prefix}decoder.conv_in tensors: not a KL VAE in "
                         f"the LDM layout under prefix {prefix!r}; SAI SD3 files need prefix='first_stage_model.', "
                         f"BFL ae.safetensors prefix=''")
    pre = re.escape(prefix)
    widths = {int(m[1]): v.shape[0] for k, v in state.items()                  # stage i: its first ResNet's width
              if (m := re.fullmatch(pre + r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight", k))}
    layers = {m[1] for k in state if (m := re.match(pre + r"encoder\.down\.0\.block\.(\d+)\.", k))}
    return KLConfig(
        in_channels=state[f"{prefix}encoder.conv_in.weight"].shape[1],
        latent_channels=state[f"{prefix}decoder.conv_in.weight"].shape[1],
        block_out_channels=tuple(widths[i] for i in sorted(widths)), layers_per_block=len(layers),
        use_quant_conv=f"{prefix}quant_conv.weight" in state,
        use_post_quant_conv=f"{prefix}post_quant_conv.weight" in state)


def load_kl_vae(source, device="cpu", dtype=torch.float32, variant=None, prefix="", config=None):
    """(vae.KLVAE, scaling_factor, shift_factor) from any layout the SD3, SD3.5 and FLUX VAE ships in. Frozen, eval.

    source is one of
      - a diffusers AutoencoderKL `vae/` folder, or a pipeline folder holding one: config.json gives the
        architecture, scaling and shift; `variant` picks fp16/bf16 weight files (default: fp32, else the one there);
      - an original single .safetensors file, or its {name: tensor} dict, in the LDM layout: SAI SD3/SD3.5 files
        (prefix="first_stage_model."; the transformer and text encoder tensors beside it are skipped) or BFL's
        ae.safetensors (prefix=""). These do not store the scaling and shift: `config` states them, as a preset
        name of vae.KL_CONFIGS ("sd3", "flux") or a KLConfig, and its architecture must be the one the tensor
        shapes show.
    Every tensor is checked by name and shape (errors name the checkpoint's key). The teacher latent is
    x0 = (encode(img) - shift_factor) * scaling_factor (kl_teacher_codec).
    """
    from vae import KL_CONFIGS, KLVAE, kl_config_from_diffusers
    if isinstance(source, dict) or str(source).endswith(".safetensors"):
        where = "the state dict" if isinstance(source, dict) else str(source)
        if variant is not None:
            raise ValueError(f"variant={variant!r} picks the weight files of a diffusers folder; {where} is one "
                             f"original file: drop variant=")
        if config is None:
            raise ValueError(f"{where} does not store the VAE's latent scaling and shift; pass config='sd3' (SAI "
                             f"SD3/SD3.5 files), config='flux' (BFL ae.safetensors) or a vae.KLConfig")
        if isinstance(config, str) and config not in KL_CONFIGS:
            raise ValueError(f"unknown KL VAE preset config={config!r}; use one of {list(KL_CONFIGS)} or a "
                             f"vae.KLConfig")
        name, cfg = (repr(config), KL_CONFIGS[config]) if isinstance(config, str) else ("the given KLConfig", config)
        state = source if isinstance(source, dict) else read_safetensors(source)[0]
        state = {k: v for k, v in state.items() if k.startswith(prefix)}   # SAI: skip model.diffusion_model.* etc.
        found = kl_config_from_original(state, where, prefix)
        arch = ("in_channels", "latent_channels", "block_out_channels", "layers_per_block", "use_quant_conv",
                "use_post_quant_conv")
        differ = [f"{a} {getattr(found, a)} (config: {getattr(cfg, a)})" for a in arch
                  if getattr(found, a) != getattr(cfg, a)]
        if differ:
            raise ValueError(f"{where} holds a different VAE than config {name}: {'; '.join(differ)}; pass the "
                             f"config of these weights")
        model = load_weights(lambda: KLVAE(cfg), state, kl_original_keys(cfg, prefix), where,
                             hint="pass the original file of an SD3/FLUX VAE (or the matching config)")
    else:
        if config is not None or prefix:
            raise ValueError(f"config=/prefix= are for original single files; the diffusers folder {source} brings "
                             f"its own config.json: drop them")
        folder, d = read_model_config(source, "vae", "the diffusers `vae/` folder of an SD3 or FLUX pipeline "
                                                     "(config.json + diffusion_pytorch_model.safetensors), or an "
                                                     "original .safetensors file")
        cfg = kl_config_from_diffusers(d)
        model = load_weights(lambda: KLVAE(cfg), read_diffusers_weights(folder, variant, device), KL_DIFFUSERS_KEYS,
                             folder, hint="use the config.json saved with these weights, or re-download `vae/`")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), cfg.scaling_factor, cfg.shift_factor


def kl_teacher_codec(vae, scaling_factor, shift_factor):
    """Teacher.encode / Teacher.decode for a KL VAE, normalised as StableDiffusion3Pipeline and FluxPipeline do
    (diffusers 0.42.1 pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py, pipelines/flux/pipeline_flux.py:
    decode `latents / scaling_factor + shift_factor`; their img2img `_encode_vae_image`: `(z - shift) * scaling`).

    encode(img, generator=None): (B, 3, H, W) in [-1, 1] -> x0 (B, 16, H/8, W/8) in fp32: the posterior mean, or a
    seeded sample when a generator is given, as the official SiD-DiT data path encodes real images;
    decode(x0) -> (B, 3, H, W) in [-1, 1], fp32, clamped.
    """
    device = vae.encoder.conv_in.weight.device

    @torch.no_grad()
    def encode(img, generator=None):
        z = vae.encode(img.to(device), sample=generator is not None, generator=generator).float()
        return (z - shift_factor) * scaling_factor

    @torch.no_grad()
    def decode(x0):
        return vae.decode(x0.to(device).float() / scaling_factor + shift_factor).float().clamp(-1, 1)

    return encode, decode


def load_sana_teacher(folder, name, device=None, text_dtype=None, variant=None, transformer=None,
                      max_sequence_length=None, transformer_device=None, transformer_dtype=torch.float32):
    """A `Teacher` from a diffusers SANA pipeline folder (model_index.json, transformer/, vae/, text_encoder/,
    tokenizer/, scheduler/): our Sana + Gemma-2 through transformers + our DC-AE (vae.py)."""
    from transformers import AutoTokenizer, Gemma2Model
    folder = str(folder)
    if max_sequence_length not in (None, TEXT_TOKENS):
        raise ValueError(f"max_sequence_length={max_sequence_length}: SANA's Gemma-2 features are {TEXT_TOKENS} tokens, "
                         f"as SanaPipeline encodes them; drop --max_sequence_length (it is for the T5 of SD3 / FLUX)")
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(folder, part)):
            raise FileNotFoundError(f"{folder} has no {part}/ folder; a SANA teacher needs transformer/, vae/, "
                                    f"text_encoder/ and tokenizer/ (re-download the pipeline)")
    device = torch.device(device) if device is not None else _default_device()
    text_dtype = text_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    net = load_transformer(transformer or os.path.join(folder, "transformer"), variant=variant,
                           device=transformer_device or device, dtype=transformer_dtype)
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

    @torch.no_grad()
    def encode(img, generator=None):        # (B, 3, H, W) in [-1, 1] -> x0 (B, 32, H/32, W/32); DC-AE is deterministic
        return vae.encode(img.to(device)).float() * scaling

    @torch.no_grad()
    def decode(x0):                         # x0 -> (B, 3, H, W) in [-1, 1]
        return vae.decode(x0.to(device) / scaling).float().clamp(-1, 1)

    factor = vae.config.spatial_factor
    return Teacher(
        name=name, transformer=net, encode_prompts=gemma_prompt_encoder(tokenizer, encoder), text_encoders=[encoder],
        encode=encode, vae=vae,
        decode=decode, latent_channels=vae.config.latent_channels, vae_factor=factor,
        resolution=cfg.sample_size * factor,                  # sample_size is the native latent side
        scheduler=read_scheduler(folder), sample_steps=20, guidance=4.5,   # SanaPipeline.__call__ defaults
        embeds_guidance=cfg.guidance_embeds,                  # Sana-Sprint teachers take the scale as an input
        sigma_grid="scheduler", dynamic_mu=False,             # SanaPipeline passes neither sigmas nor mu
        train_defaults={},                                    # the paper's settings are train.py's defaults
        default_prompts=read_prompts(DEFAULT_PROMPTS),
    )


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5 transformer weights -> model.MMDiT: declarative key tables, configs, registration


def sd3_diffusers_keys(cfg):
    """diffusers SD3Transformer2DModel name -> our name (diffusers 0.42.1 models/transformers/transformer_sd3.py,
    models/attention.py JointTransformerBlock). Renames, and two AdaLayerNormContinuous linears whose rows diffusers
    orders (scale, shift) where ours (and SAI's) are (shift, scale): they swap halves."""
    last = cfg.depth - 1
    T, J = "transformer_blocks.{i}", "joint_blocks.{i}"
    return [
        ("pos_embed.pos_embed", "pos_embed"),                     # PatchEmbed holds the (1, M^2, D) table
        ("pos_embed.proj", "x_embedder"),
        ("time_text_embed.timestep_embedder.linear_1", "t_embedder.linear_1"),
        ("time_text_embed.timestep_embedder.linear_2", "t_embedder.linear_2"),
        ("time_text_embed.text_embedder.linear_1", "y_embedder.linear_1"),
        ("time_text_embed.text_embedder.linear_2", "y_embedder.linear_2"),
        ("context_embedder", "context_embedder"),
        # the last block's context modulation is an AdaLayerNormContinuous: (scale, shift) in diffusers
        (f"transformer_blocks.{last}.norm1_context.linear", f"joint_blocks.{last}.context_mod", "swap"),
        (f"{T}.norm1.linear", f"{J}.x_mod"),
        (f"{T}.norm1_context.linear", f"{J}.context_mod"),
        *[(f"{T}.attn.to_{n}", f"{J}.x_attn.to_{n}") for n in "qkv"],
        (f"{T}.attn.norm_q", f"{J}.x_attn.norm_q"),
        (f"{T}.attn.norm_k", f"{J}.x_attn.norm_k"),
        (f"{T}.attn.to_out.0", f"{J}.x_attn.to_out"),
        *[(f"{T}.attn.add_{n}_proj", f"{J}.context_attn.to_{n}") for n in "qkv"],
        (f"{T}.attn.norm_added_q", f"{J}.context_attn.norm_q"),
        (f"{T}.attn.norm_added_k", f"{J}.context_attn.norm_k"),
        (f"{T}.attn.to_add_out", f"{J}.context_attn.to_out"),
        *[(f"{T}.attn2.to_{n}", f"{J}.x_attn2.to_{n}") for n in "qkv"],   # MMDiT-X layers
        (f"{T}.attn2.norm_q", f"{J}.x_attn2.norm_q"),
        (f"{T}.attn2.norm_k", f"{J}.x_attn2.norm_k"),
        (f"{T}.attn2.to_out.0", f"{J}.x_attn2.to_out"),
        (f"{T}.ff.net.0.proj", f"{J}.x_mlp.fc1"),
        (f"{T}.ff.net.2", f"{J}.x_mlp.fc2"),
        (f"{T}.ff_context.net.0.proj", f"{J}.context_mlp.fc1"),
        (f"{T}.ff_context.net.2", f"{J}.context_mlp.fc2"),
        ("norm_out.linear", "final_mod", "swap"),               # AdaLayerNormContinuous: (scale, shift) in diffusers
        ("proj_out", "proj_out"),
    ]


# Stability-AI/sd3.5 mmditx.py (MMDiTX) name -> our name, after the single file's `model.diffusion_model.` prefix.
# Fused qkv tensors split into our q, k, v; SAI orders every AdaLN row (shift, scale[, gate]) as we do: no swaps.
SAI_PREFIX = "model.diffusion_model."
SD3_ORIGINAL_KEYS = [(SAI_PREFIX + src, *rest) for src, *rest in [
    ("pos_embed", "pos_embed"),
    ("x_embedder.proj", "x_embedder"),
    ("t_embedder.mlp.0", "t_embedder.linear_1"),
    ("t_embedder.mlp.2", "t_embedder.linear_2"),
    ("y_embedder.mlp.0", "y_embedder.linear_1"),
    ("y_embedder.mlp.2", "y_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("joint_blocks.{i}.x_block.adaLN_modulation.1", "joint_blocks.{i}.x_mod"),   # Sequential(SiLU, Linear)
    ("joint_blocks.{i}.x_block.attn.qkv", tuple(f"joint_blocks.{{i}}.x_attn.to_{n}" for n in "qkv")),  # split 3
    ("joint_blocks.{i}.x_block.attn.ln_q", "joint_blocks.{i}.x_attn.norm_q"),
    ("joint_blocks.{i}.x_block.attn.ln_k", "joint_blocks.{i}.x_attn.norm_k"),
    ("joint_blocks.{i}.x_block.attn.proj", "joint_blocks.{i}.x_attn.to_out"),
    ("joint_blocks.{i}.x_block.attn2.qkv", tuple(f"joint_blocks.{{i}}.x_attn2.to_{n}" for n in "qkv")),
    ("joint_blocks.{i}.x_block.attn2.ln_q", "joint_blocks.{i}.x_attn2.norm_q"),
    ("joint_blocks.{i}.x_block.attn2.ln_k", "joint_blocks.{i}.x_attn2.norm_k"),
    ("joint_blocks.{i}.x_block.attn2.proj", "joint_blocks.{i}.x_attn2.to_out"),
    ("joint_blocks.{i}.x_block.mlp.fc1", "joint_blocks.{i}.x_mlp.fc1"),
    ("joint_blocks.{i}.x_block.mlp.fc2", "joint_blocks.{i}.x_mlp.fc2"),
    ("joint_blocks.{i}.context_block.adaLN_modulation.1", "joint_blocks.{i}.context_mod"),
    ("joint_blocks.{i}.context_block.attn.qkv", tuple(f"joint_blocks.{{i}}.context_attn.to_{n}" for n in "qkv")),
    ("joint_blocks.{i}.context_block.attn.ln_q", "joint_blocks.{i}.context_attn.norm_q"),
    ("joint_blocks.{i}.context_block.attn.ln_k", "joint_blocks.{i}.context_attn.norm_k"),
    ("joint_blocks.{i}.context_block.attn.proj", "joint_blocks.{i}.context_attn.to_out"),
    ("joint_blocks.{i}.context_block.mlp.fc1", "joint_blocks.{i}.context_mlp.fc1"),
    ("joint_blocks.{i}.context_block.mlp.fc2", "joint_blocks.{i}.context_mlp.fc2"),
    ("final_layer.adaLN_modulation.1", "final_mod"),
    ("final_layer.linear", "proj_out"),
]]


def _describe_sd3(cfg):
    return (f"depth {cfg.depth}, heads {cfg.num_heads}x{cfg.head_dim}, pos_embed_max_size {cfg.pos_embed_max_size}, "
            f"qk_norm {cfg.qk_norm}, dual attention layers {list(cfg.dual_attention_layers)}")


def sd3_config_from_diffusers(d, path):
    """SD3Config from a diffusers SD3Transformer2DModel config.json dict; options model.py lacks are one-line errors."""
    if d.get("qk_norm") not in (None, "rms_norm"):
        raise ValueError(f"{path}: qk_norm={d['qk_norm']!r} is not supported (model.py implements SD3.5's per-head "
                         f"'rms_norm', or none as SD3)")
    heads, head_dim = d.get("num_attention_heads", 18), d.get("attention_head_dim", 64)
    if d.get("caption_projection_dim", 1152) != heads * head_dim:
        raise ValueError(f"{path}: caption_projection_dim {d.get('caption_projection_dim', 1152)} != "
                         f"num_attention_heads x attention_head_dim {heads * head_dim}; SD3's context stream works at "
                         f"the model width")
    if not d.get("pos_embed_max_size", 96):
        raise ValueError(f"{path}: pos_embed_max_size is {d['pos_embed_max_size']!r}; model.py needs the stored, "
                         f"centre-cropped table of the SD3 releases (pos_embed_max_size 192 or 384)")
    in_channels = d.get("in_channels", 16)
    return SD3Config(
        depth=d.get("num_layers", 18), num_heads=heads, head_dim=head_dim, patch_size=d.get("patch_size", 2),
        in_channels=in_channels, out_channels=d.get("out_channels") or in_channels,
        joint_attention_dim=d.get("joint_attention_dim", 4096),
        pooled_projection_dim=d.get("pooled_projection_dim", 2048),
        pos_embed_max_size=d.get("pos_embed_max_size", 96), sample_size=d.get("sample_size", 128),
        qk_norm=d.get("qk_norm") == "rms_norm", dual_attention_layers=tuple(d.get("dual_attention_layers", ())))


def sd3_config_from_original(state, path):
    """SD3Config inferred from the shapes of an SAI single file's `model.diffusion_model.*` tensors (section 2.4 of
    the architecture notes; as diffusers' single-file loader infers it)."""
    P = SAI_PREFIX
    missing = [k for k in ("x_embedder.proj.weight", "pos_embed", "context_embedder.weight", "y_embedder.mlp.0.weight",
                           "final_layer.linear.weight") if P + k not in state]
    if missing:
        raise ValueError(f"{path} has no {P}{missing[0]}: it is not a complete SAI SD3/SD3.5 single file; pass "
                         f"sd3_medium.safetensors / sd3.5_*.safetensors or a diffusers `transformer/` folder")
    width, in_channels, p, _ = state[P + "x_embedder.proj.weight"].shape
    n_pos = state[P + "pos_embed"].shape[1]                                    # (1, M^2, D)
    M = math.isqrt(n_pos)
    blocks = {int(k.split(".")[3]) for k in state if k.startswith(P + "joint_blocks.")}
    ln_q = next((v for k, v in state.items() if k.startswith(P) and k.endswith(".ln_q.weight")), None)
    head_dim = ln_q.shape[0] if ln_q is not None else 64       # SAI fixes 64 (heads = depth, width = 64 depth)
    if M * M != n_pos or width % head_dim:
        raise ValueError(f"{path}: pos_embed has {n_pos} positions (not a square) or width {width} is not a multiple "
                         f"of head size {head_dim}; the file is not an SAI SD3/SD3.5 transformer")
    return SD3Config(
        depth=max(blocks) + 1, num_heads=width // head_dim, head_dim=head_dim, patch_size=p, in_channels=in_channels,
        out_channels=state[P + "final_layer.linear.weight"].shape[0] // p**2,
        joint_attention_dim=state[P + "context_embedder.weight"].shape[1],
        pooled_projection_dim=state[P + "y_embedder.mlp.0.weight"].shape[1], pos_embed_max_size=M,
        qk_norm=ln_q is not None,
        dual_attention_layers=tuple(sorted(int(k.split(".")[3]) for k in state
                                           if k.startswith(P) and ".x_block.attn2.qkv.weight" in k)))


def read_sai_single_file(state, path):
    """(config, key table, dropped keys, hint) of an SAI single file. Everything outside `model.diffusion_model.`
    (the `first_stage_model.` VAE, `text_encoders.*`, anything else) is left to the other loaders."""
    cfg = sd3_config_from_original(state, path)
    dropped = tuple(k for k in state if not k.startswith(SAI_PREFIX))
    return cfg, SD3_ORIGINAL_KEYS, dropped, f"the shapes imply {_describe_sd3(cfg)}; use an SAI SD3/SD3.5 file"


DIFFUSERS_TRANSFORMERS["SD3Transformer2DModel"] = (sd3_config_from_diffusers, sd3_diffusers_keys)
SINGLE_FILES.append((lambda state: any(k.startswith(SAI_PREFIX + "joint_blocks.") for k in state),
                     read_sai_single_file))


# ----------------------------------------------------------------------------------------------
# FLUX transformer weights -> model.Flux: declarative key tables

# diffusers FluxTransformer2DModel name -> our name. Each double block's two attention streams live in one
# diffusers `attn` (image: to_q, ...; text: add_q_proj, ...); we keep one module per stream.
FLUX_DIFFUSERS_KEYS = [
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed.timestep_embedder.{path}", "time_in.{path}"),
    ("time_text_embed.guidance_embedder.{path}", "guidance_in.{path}"),     # FLUX.1-dev only
    ("time_text_embed.text_embedder.{path}", "vector_in.{path}"),
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img.mod"),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt.mod"),
    ("transformer_blocks.{i}.attn.to_q", "double_blocks.{i}.img.attn.to_q"),
    ("transformer_blocks.{i}.attn.to_k", "double_blocks.{i}.img.attn.to_k"),
    ("transformer_blocks.{i}.attn.to_v", "double_blocks.{i}.img.attn.to_v"),
    ("transformer_blocks.{i}.attn.norm_q", "double_blocks.{i}.img.attn.norm_q"),
    ("transformer_blocks.{i}.attn.norm_k", "double_blocks.{i}.img.attn.norm_k"),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img.proj"),
    ("transformer_blocks.{i}.attn.add_q_proj", "double_blocks.{i}.txt.attn.to_q"),
    ("transformer_blocks.{i}.attn.add_k_proj", "double_blocks.{i}.txt.attn.to_k"),
    ("transformer_blocks.{i}.attn.add_v_proj", "double_blocks.{i}.txt.attn.to_v"),
    ("transformer_blocks.{i}.attn.norm_added_q", "double_blocks.{i}.txt.attn.norm_q"),
    ("transformer_blocks.{i}.attn.norm_added_k", "double_blocks.{i}.txt.attn.norm_k"),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt.proj"),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img.mlp.fc1"),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img.mlp.fc2"),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt.mlp.fc1"),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt.mlp.fc2"),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.mod"),
    ("single_transformer_blocks.{i}.attn.{path}", "single_blocks.{i}.attn.{path}"),
    ("single_transformer_blocks.{i}.proj_mlp", "single_blocks.{i}.mlp_in"),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.proj_out"),
    # diffusers' AdaLayerNormContinuous reads its rows as (scale, shift); ours (and BFL's) are (shift, scale)
    ("norm_out.linear", "final_mod", "swap"),
    ("proj_out", "proj_out"),
]

# BFL single file (flux1-dev.safetensors, flux1-schnell.safetensors; keys without prefix) -> our name(s).
FLUX_ORIGINAL_KEYS = [
    ("img_in", "img_in"),
    ("txt_in", "txt_in"),
    ("time_in.in_layer", "time_in.linear_1"),
    ("time_in.out_layer", "time_in.linear_2"),
    ("guidance_in.in_layer", "guidance_in.linear_1"),       # FLUX.1-dev only
    ("guidance_in.out_layer", "guidance_in.linear_2"),
    ("vector_in.in_layer", "vector_in.linear_1"),
    ("vector_in.out_layer", "vector_in.linear_2"),
    ("double_blocks.{i}.img_mod.lin", "double_blocks.{i}.img.mod"),
    # fused qkv: rows [W_q; W_k; W_v] (BFL rearranges "B L (K H D) -> K B H L D", K = 3), split into 3
    ("double_blocks.{i}.img_attn.qkv", ("double_blocks.{i}.img.attn.to_q", "double_blocks.{i}.img.attn.to_k",
                                        "double_blocks.{i}.img.attn.to_v")),
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", "double_blocks.{i}.img.attn.norm_q.weight"),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", "double_blocks.{i}.img.attn.norm_k.weight"),
    ("double_blocks.{i}.img_attn.proj", "double_blocks.{i}.img.proj"),
    ("double_blocks.{i}.img_mlp.0", "double_blocks.{i}.img.mlp.fc1"),      # Sequential(Linear, GELU, Linear)
    ("double_blocks.{i}.img_mlp.2", "double_blocks.{i}.img.mlp.fc2"),
    ("double_blocks.{i}.txt_mod.lin", "double_blocks.{i}.txt.mod"),
    ("double_blocks.{i}.txt_attn.qkv", ("double_blocks.{i}.txt.attn.to_q", "double_blocks.{i}.txt.attn.to_k",
                                        "double_blocks.{i}.txt.attn.to_v")),          # split into 3, as img_attn
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale", "double_blocks.{i}.txt.attn.norm_q.weight"),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale", "double_blocks.{i}.txt.attn.norm_k.weight"),
    ("double_blocks.{i}.txt_attn.proj", "double_blocks.{i}.txt.proj"),
    ("double_blocks.{i}.txt_mlp.0", "double_blocks.{i}.txt.mlp.fc1"),
    ("double_blocks.{i}.txt_mlp.2", "double_blocks.{i}.txt.mlp.fc2"),
    ("single_blocks.{i}.modulation.lin", "single_blocks.{i}.mod"),
    # linear1 rows [W_q; W_k; W_v; W_mlp_in], sizes (D, D, D, 4D): unequal parts, sized by our module's shapes
    ("single_blocks.{i}.linear1", ("single_blocks.{i}.attn.to_q", "single_blocks.{i}.attn.to_k",
                                   "single_blocks.{i}.attn.to_v", "single_blocks.{i}.mlp_in")),
    ("single_blocks.{i}.norm.query_norm.scale", "single_blocks.{i}.attn.norm_q.weight"),
    ("single_blocks.{i}.norm.key_norm.scale", "single_blocks.{i}.attn.norm_k.weight"),
    ("single_blocks.{i}.linear2", "single_blocks.{i}.proj_out"),          # input columns [attention (D), MLP (4D)]
    # LastLayer: `shift, scale = adaLN_modulation(vec).chunk(2)`: already our (shift, scale) order, no swap
    # (diffusers' converter swaps these halves into its (scale, shift); FLUX_DIFFUSERS_KEYS swaps them back)
    ("final_layer.adaLN_modulation.1", "final_mod"),        # adaLN_modulation = Sequential(SiLU, Linear)
    ("final_layer.linear", "proj_out"),
]

# RoPE channels per axis by head width: BFL FluxParams of every released FLUX.1 model. The single file does not
# store them, so a file with another head width needs its row here.
FLUX_ROPE_AXES = {128: (16, 56, 56)}


def flux_config_from_diffusers(d, path):
    """FluxConfig from a diffusers FluxTransformer2DModel config.json dict. diffusers describes the PACKED view
    (patch_size 1, in_channels 64); ours is the unpacked latent (16 channels) with the 2x2 packing as patch_size 2."""
    if d.get("_class_name") != "FluxTransformer2DModel":
        raise ValueError(f"{path} describes a {d.get('_class_name')!r}, not a FluxTransformer2DModel; point at the "
                         f"`transformer/` folder of a FLUX.1 diffusers checkpoint (e.g. black-forest-labs/FLUX.1-dev)")
    packed = d.get("in_channels", 64)
    if d.get("patch_size", 1) != 1 or packed % 4:
        raise ValueError(f"{path}: patch_size={d.get('patch_size')}, in_channels={packed} is not supported (FLUX.1 "
                         f"transformers take 2x2-packed tokens: patch_size 1, in_channels 4 x latent channels)")
    if d.get("out_channels") not in (None, packed):
        raise ValueError(f"{path}: out_channels={d['out_channels']} != in_channels={packed} is not supported (image-"
                         f"conditioned FLUX tools such as Fill/Canny/Depth add input channels); use FLUX.1-dev/schnell")
    heads, head_dim = d.get("num_attention_heads", 24), d.get("attention_head_dim", 128)
    axes = tuple(d.get("axes_dims_rope", (16, 56, 56)))
    if sum(axes) != head_dim:
        raise ValueError(f"{path}: axes_dims_rope {axes} does not sum to attention_head_dim {head_dim}; fix "
                         f"config.json")
    return FluxConfig(
        in_channels=packed // 4, patch_size=2, depth=d.get("num_layers", 19),
        depth_single=d.get("num_single_layers", 38), num_heads=heads, head_dim=head_dim, axes_dims_rope=axes,
        joint_attention_dim=d.get("joint_attention_dim", 4096),
        pooled_projection_dim=d.get("pooled_projection_dim", 768),
        guidance_embeds=bool(d.get("guidance_embeds", False)))


def flux_config_from_original(state, path):
    """FluxConfig inferred from the tensor shapes of a BFL state dict: depths from block indices, width from img_in,
    head_dim from the qk-norm scale, guidance iff guidance_in.* is there (dev: yes, schnell: no)."""
    needed = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "double_blocks.0.img_mlp.0.weight",
              "double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.linear1.weight"]
    if any(k not in state for k in needed):
        raise ValueError(f"{path} has no {[k for k in needed if k not in state][0]!r}: it is not a complete BFL FLUX.1 "
                         f"transformer file; re-download it (flux1-dev.safetensors) or pass a diffusers folder")
    width, packed = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if head_dim not in FLUX_ROPE_AXES or width % head_dim or packed % 4:
        raise ValueError(f"{path}: width {width}, head width {head_dim}, {packed} input channels is not a known FLUX "
                         f"layout (RoPE axes known for head widths {sorted(FLUX_ROPE_AXES)}); use a FLUX.1 file, or "
                         f"add its axes_dims_rope to teacher_loaders.FLUX_ROPE_AXES")
    depth = {prefix: 1 + max(int(k.split(".")[1]) for k in state if k.startswith(prefix + "."))
             for prefix in ("double_blocks", "single_blocks")}
    return FluxConfig(
        in_channels=packed // 4, patch_size=2, depth=depth["double_blocks"], depth_single=depth["single_blocks"],
        num_heads=width // head_dim, head_dim=head_dim, axes_dims_rope=FLUX_ROPE_AXES[head_dim],
        joint_attention_dim=state["txt_in.weight"].shape[1],
        pooled_projection_dim=state["vector_in.in_layer.weight"].shape[1],
        guidance_embeds="guidance_in.in_layer.weight" in state,
        mlp_ratio=state["double_blocks.0.img_mlp.0.weight"].shape[0] / width)


def read_flux_original(state, path):
    cfg = flux_config_from_original(state, path)
    hint = (f"the shapes imply width {cfg.width}, {cfg.depth} double + {cfg.depth_single} single blocks, guidance "
            f"{cfg.guidance_embeds}; use an unmodified BFL FLUX.1 file (flux1-dev.safetensors)")
    return cfg, FLUX_ORIGINAL_KEYS, (), hint


DIFFUSERS_TRANSFORMERS["FluxTransformer2DModel"] = (flux_config_from_diffusers, lambda cfg: FLUX_DIFFUSERS_KEYS)
SINGLE_FILES.append((lambda state: "double_blocks.0.img_attn.qkv.weight" in state, read_flux_original))


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5 and FLUX pipelines: our transformer + the KL VAE (vae.py) + CLIP/T5 (text_encoders.py)

# what each pipeline does beyond its folder's files (diffusers 0.42.1 pipeline_stable_diffusion_3.py,
# pipeline_flux.py): __call__ defaults, the T5 length SiD-DiT used, how it asks the scheduler for its grid
KL_PIPELINES = {
    "StableDiffusion3Pipeline": dict(prompts="sd3", steps=28, guidance=7.0, max_sequence_length=77,
                                     vae_config="sd3", sigma_grid="scheduler", dynamic_mu=True, pipeline_cfg=True),
    "FluxPipeline": dict(prompts="flux", steps=28, guidance=3.5, max_sequence_length=512,
                         vae_config="flux", sigma_grid="linspace", dynamic_mu=True, pipeline_cfg=False),
}


def load_kl_teacher(folder, name, device=None, text_dtype=None, variant=None, max_sequence_length=None,
                    transformer=None, transformer_device=None, transformer_dtype=torch.float32):
    """A `Teacher` from a diffusers StableDiffusion3Pipeline or FluxPipeline folder: our MMDiT / Flux (or an
    original single file given as `transformer`), the 16-channel KL VAE, and CLIP + T5 through transformers."""
    import text_encoders
    folder = str(folder)
    with open(os.path.join(folder, "model_index.json")) as f:
        pipe = KL_PIPELINES[json.load(f)["_class_name"]]
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        if part == "transformer" and transformer or part == "vae" and _holds_sai_vae(transformer):
            continue
        if not os.path.isdir(os.path.join(folder, part)):
            raise FileNotFoundError(f"{folder} has no {part}/ folder; re-download the pipeline (or pass its pieces)")
    device = torch.device(device) if device is not None else _default_device()
    net = load_transformer(transformer or os.path.join(folder, "transformer"), variant=variant,
                           device=transformer_device or device, dtype=transformer_dtype)
    net.eval().requires_grad_(False)
    if _holds_sai_vae(transformer):                   # an SAI single file with its VAE beside the transformer
        from vae import kl_config_from_diffusers      # the file has no VAE config: the folder's, else the preset's
        vae_json = os.path.join(folder, "vae", "config.json")
        config = kl_config_from_diffusers(read_model_config(vae_json[:-12], "vae", "")[1]) \
            if os.path.isfile(vae_json) else pipe["vae_config"]
        vae, scaling, shift = load_kl_vae(transformer, device, prefix="first_stage_model.", config=config)
    else:
        vae, scaling, shift = load_kl_vae(os.path.join(folder, "vae"), device)
    load_prompts = {"sd3": text_encoders.load_sd3_prompt_encoder, "flux": text_encoders.load_flux_prompt_encoder}
    prompts = load_prompts[pipe["prompts"]](folder, device, text_dtype,
                                            max_sequence_length or pipe["max_sequence_length"])
    cfg = net.config
    if (prompts.text_dim, prompts.pooled_dim) != (cfg.joint_attention_dim, cfg.pooled_projection_dim) or \
            vae.config.latent_channels != cfg.in_channels:
        raise ValueError(f"{folder}: the text encoders (width {prompts.text_dim}, pooled {prompts.pooled_dim}) or the "
                         f"VAE ({vae.config.latent_channels} channels) do not fit the transformer (text "
                         f"{cfg.joint_attention_dim}, pooled {cfg.pooled_projection_dim}, {cfg.in_channels} channels); "
                         f"the pipeline folder mixes models")
    encode, decode = kl_teacher_codec(vae, scaling, shift)
    factor = vae.config.spatial_factor
    return Teacher(
        name=name, transformer=net, encode_prompts=prompts.encode_prompts, text_encoders=prompts.encoders,
        encode=encode, decode=decode, vae=vae,
        latent_channels=vae.config.latent_channels, vae_factor=factor,
        resolution=128 * factor,                      # both pipelines' default_sample_size 128: 1024 px
        scheduler=read_scheduler(folder), sample_steps=pipe["steps"], guidance=pipe["guidance"],
        embeds_guidance=bool(getattr(cfg, "guidance_embeds", False)), pipeline_cfg=pipe["pipeline_cfg"],
        sigma_grid=pipe["sigma_grid"], dynamic_mu=pipe["dynamic_mu"],
        train_defaults={}, default_prompts=read_prompts(DEFAULT_PROMPTS),
    )


def _holds_sai_vae(path):
    """True when `path` is a .safetensors single file that carries an SAI `first_stage_model.*` VAE."""
    if not path or not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return False
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return any(k.startswith("first_stage_model.") for k in f.keys())


# ----------------------------------------------------------------------------------------------
# Registry: model_index.json `_class_name` -> the function that assembles its Teacher

PIPELINES = {
    "SanaPipeline": load_sana_teacher,
    "StableDiffusion3Pipeline": load_kl_teacher,
    "FluxPipeline": load_kl_teacher,
}
