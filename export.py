"""
Ship a distilled student as a diffusers pipeline folder that stock diffusers runs: no code of ours, no pickles.

    python export.py --ckpt runs/sana --out students/sana-sid                      # the run's EMA if it kept one
    python export.py --ckpt runs/sd3.5-large --out students/sd35-sid --single_file  # + an SAI single file
    python export.py --ckpt runs/flux-dev/generator.safetensors --out students/flux-sid --teacher FOLDER --force

The folder is the teacher's pipeline with two parts replaced:
  - transformer/: the student generator in the teacher's diffusers layout (the key tables of teacher_loaders.py
    run backwards) and a config.json written from our config (CONFIG_WRITERS, the inverse of the config readers);
  - scheduler/: FlowMatchEulerDiscreteScheduler with shift 1, no dynamic shifting and stochastic_sampling=True.
    Its step is x0 = x - sigma v, then x' = (1 - sigma') x0 + sigma' n with fresh n ~ N(0, I): the SiD-DiT
    'fresh' K-step sampler (sid.generate) when called with sigmas t_init (1 - i/K), i < k, and no CFG;
and the teacher's text encoders, tokenizers and VAE copied unchanged, model_index.json, and a model card
(README.md) with the diffusers snippet. --single_file also writes the original single-file layout of the family
(NVlabs SANA .pth, SAI SD3 .safetensors with its first_stage_model VAE, BFL FLUX .safetensors).

Checked against: diffusers 0.42.1 SanaPipeline, StableDiffusion3Pipeline and FluxPipeline loaded from exported tiny
folders reproduce our student's 1- and 4-step samples from the same latents and noise draws, from_pretrained and
from_single_file give our weights back (test_export.py: `HF_HUB_OFFLINE=1 python -m pytest test_export.py -q -s`).
"""

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch

import sample
import teacher_loaders as tl
from model import FluxConfig, SanaConfig, SD3Config

# ----------------------------------------------------------------------------------------------
# Our config -> the diffusers transformer's config.json (the inverse of teacher_loaders' *_config_from_diffusers)


def sana_diffusers_config(cfg):
    if cfg.guidance_embeds:   # SanaPipeline never passes a guidance input; Sprint ships with SanaSprintPipeline
        raise ValueError("a Sana-Sprint student (guidance_embeds) needs SanaSprintPipeline and its SCM scheduler, "
                         "which export.py does not write; export a SANA flow-matching student")
    return dict(_class_name="SanaTransformer2DModel", in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, num_layers=cfg.depth,
                num_cross_attention_heads=cfg.cross_heads, cross_attention_head_dim=cfg.cross_head_dim,
                cross_attention_dim=cfg.width, caption_channels=cfg.caption_channels, mlp_ratio=cfg.mlp_ratio,
                attention_bias=False, sample_size=cfg.sample_size, patch_size=cfg.patch_size,
                norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=cfg.interpolation_scale,
                guidance_embeds=False, qk_norm="rms_norm_across_heads" if cfg.qk_norm else None,
                timestep_scale=cfg.time_scale / 1000)        # SanaPipeline feeds timestep_scale x 1000 sigma


def sd3_diffusers_config(cfg):
    return dict(_class_name="SD3Transformer2DModel", sample_size=cfg.sample_size, patch_size=cfg.patch_size,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
                num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, caption_projection_dim=cfg.width,
                joint_attention_dim=cfg.joint_attention_dim, pooled_projection_dim=cfg.pooled_projection_dim,
                pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=list(cfg.dual_attention_layers),
                qk_norm="rms_norm" if cfg.qk_norm else None)


def flux_diffusers_config(cfg):
    packed = cfg.in_channels * cfg.patch_size**2      # diffusers describes the 2x2-packed tokens (patch_size 1)
    return dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=packed, out_channels=packed,
                num_layers=cfg.depth, num_single_layers=cfg.depth_single, num_attention_heads=cfg.num_heads,
                attention_head_dim=cfg.head_dim, joint_attention_dim=cfg.joint_attention_dim,
                pooled_projection_dim=cfg.pooled_projection_dim, guidance_embeds=cfg.guidance_embeds,
                axes_dims_rope=list(cfg.axes_dims_rope))


# ----------------------------------------------------------------------------------------------
# Our weights -> the family's original single file


def sana_original(state, cfg, teacher_folder):
    """NVlabs Sana .pth tensors. The file also holds two tensors inference never reads, which diffusers'
    convert_sana_transformer_to_diffusers and NVlabs' strict load expect: the sincos `pos_embed` buffer (unused by
    SANA 512/1024 px; zeros here, its length (sample_size^2) is what our loader reads the sample size from) and the
    learned null caption `y_embedder.y_embedding` of training-time caption dropout (300 tokens; zeros here)."""
    out = tl.to_checkpoint(state, tl.SANA_ORIGINAL_KEYS)
    out["pos_embed"] = torch.zeros(1, cfg.sample_size**2, cfg.width)
    out["y_embedder.y_embedding"] = torch.zeros(tl.TEXT_TOKENS, cfg.caption_channels)
    return out


def sd3_original(state, cfg, teacher_folder):
    """SAI single-file tensors: the MMDiT under model.diffusion_model. and the teacher's VAE under
    first_stage_model., as sd3_medium.safetensors / sd3.5_large.safetensors hold them (their CLIP/T5 stay apart)."""
    vae = tl.load_kl_vae(os.path.join(teacher_folder, "vae"))[0]
    out = tl.to_checkpoint(state, tl.SD3_ORIGINAL_KEYS)
    out.update(tl.to_checkpoint(vae.state_dict(), tl.kl_original_keys(vae.config, "first_stage_model.")))
    return out


def flux_original(state, cfg, teacher_folder):
    """BFL flux1-*.safetensors tensors: the transformer alone (BFL ships the VAE as ae.safetensors, the teacher's)."""
    return tl.to_checkpoint(state, tl.FLUX_ORIGINAL_KEYS)


def save_pth(tensors, path):
    torch.save({"state_dict": tensors}, path)          # the NVlabs release layout; plain tensors (weights_only loads)


def save_safetensors(tensors, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# Registry: our config type -> how that family ships


@dataclass(frozen=True)
class Layout:
    config: Callable         # our config -> the diffusers transformer's config.json dict
    original: Callable       # (our state, our config, teacher folder) -> {original key: tensor}
    suffix: str              # the original file's extension
    save: Callable           # (tensors, path): write the original file
    read_original: Callable  # (original state, path, our config) -> our config as load_transformer infers it
    not_stored: tuple = ()   # our config fields the original file does not hold (no effect on loaded weights)


LAYOUTS = {
    SanaConfig: Layout(sana_diffusers_config, sana_original, ".pth", save_pth,
                       lambda s, path, cfg: tl.sana_config_from_original(s, path, cfg.cross_heads)),
    SD3Config: Layout(sd3_diffusers_config, sd3_original, ".safetensors", save_safetensors,
                      lambda s, path, cfg: tl.sd3_config_from_original(s, path),
                      not_stored=("sample_size",)),     # only the random-init base grid of pos_embed
    FluxConfig: Layout(flux_diffusers_config, flux_original, ".safetensors", save_safetensors,
                       lambda s, path, cfg: tl.flux_config_from_original(s, path)),
}

# the student's noise between steps -> FlowMatchEulerDiscreteScheduler's stochastic_sampling. 'ddim' (the noise the
# last step implied) makes x' = x + (sigma' - sigma) v, the deterministic Euler step; 'fixed' (z at every step)
# has no stock scheduler.
STOCHASTIC = {"fresh": True, "ddim": False}
PICKLES = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl", "*.msgpack", "*.h5", "*.onnx")
SHARD_BYTES = 10**10              # diffusers' save_pretrained default max_shard_size ("10GB")


def differences(ours, theirs, skip=()):
    a, b = asdict(ours), asdict(theirs)
    return [f"{k} {a[k]!r} vs {b[k]!r}" for k in a if k not in skip and a[k] != b.get(k)]


def diffusers_config(cfg, where):
    """config.json of the student's diffusers transformer; an error when a field of ours has no place in it (it must
    read back, through teacher_loaders' reader for that class, as exactly our config)."""
    d = LAYOUTS[type(cfg)].config(cfg)
    back = tl.DIFFUSERS_TRANSFORMERS[d["_class_name"]][0](d, where)
    if back != cfg:
        raise ValueError(f"our config does not fit diffusers' {d['_class_name']} config.json ("
                         f"{'; '.join(differences(cfg, back))} as read back): this student cannot run as a stock "
                         f"{d['_class_name']}")
    return d


def sampler(K, t_init, noise, steps):
    """(scheduler_config.json dict, sigmas of a `steps`-step sample): the student's grid t_init (1 - i/K), i < steps."""
    if noise not in STOCHASTIC:
        raise ValueError(f"the student was trained with --noise {noise}; only {list(STOCHASTIC)} have a stock "
                         f"diffusers scheduler (FlowMatchEulerDiscreteScheduler stochastic_sampling True / False)")
    if t_init != 1.0:   # sid.generate starts from x = t_init z; the pipelines feed the initial noise itself
        raise ValueError(f"the student was trained with --t_init {t_init}: its first input is t_init x noise, while "
                         f"the stock pipelines start from unscaled noise; only t_init 1.0 exports")
    if not 1 <= steps <= K:
        raise ValueError(f"--steps {steps}: the student samples 1..{K} steps (its K); pick one of them")
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **sample.FLOW_MATCH_DEFAULTS,
              "stochastic_sampling": STOCHASTIC[noise]}          # shift 1, no dynamic shifting: sigmas as given
    return config, [t_init * (1 - i / K) for i in range(steps)]


# ----------------------------------------------------------------------------------------------
# The teacher folder: which one, and does the student belong to it


def teacher_folder(name):
    """The local diffusers pipeline folder of a teacher name (TEACHER_REPOS), repo id or folder: what export copies."""
    name = str(name)
    if os.path.isdir(name):
        folder = name
    elif name in tl.TEACHER_REPOS or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        folder = tl.download_pipeline(tl.TEACHER_REPOS.get(name, name))
    else:
        raise ValueError(f"teacher {name!r} has no diffusers pipeline folder (the embedded tiny teacher has none); "
                         f"pass --teacher a pipeline folder, a teacher name {list(tl.TEACHER_REPOS)} or a repo id")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"{folder} has no model_index.json: it is not a diffusers pipeline folder; pass "
                                f"--teacher the pipeline folder the student was distilled from")
    return folder


def check_teacher(cfg, folder, ckpt):
    """The student must be a copy of the folder's transformer (same family and config): one line naming both."""
    where, d = tl.read_model_config(os.path.join(folder, "transformer"), "", "--teacher a pipeline folder with a "
                                                                               "transformer/config.json")
    kind = d.get("_class_name")
    if kind not in tl.DIFFUSERS_TRANSFORMERS:
        raise ValueError(f"{where} holds a {kind!r}, not a supported transformer; pass --teacher the pipeline folder "
                         f"the student {ckpt} was distilled from")
    theirs = tl.DIFFUSERS_TRANSFORMERS[kind][0](d, os.path.join(where, "config.json"))
    if theirs != cfg:
        what = (f"{type(cfg).__name__} vs {type(theirs).__name__}" if type(theirs) is not type(cfg)
                else "; ".join(differences(cfg, theirs)))
        raise ValueError(f"student {ckpt} does not match teacher {folder}'s transformer ({what}): it was distilled "
                         f"from another teacher; pass --teacher the pipeline folder it was trained on")


# ----------------------------------------------------------------------------------------------
# Writing the folder


def copy_component(folder, part, dest):
    """Copy a teacher component folder unchanged, pickled weights left out; an error if no safetensors remain."""
    src = os.path.join(folder, part)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{folder} has no {part}/ folder (model_index.json names it); re-download the teacher")
    skipped = []

    def ignore(path, names):
        hits = shutil.ignore_patterns(*PICKLES)(path, names)
        skipped.extend(hits)
        return hits

    shutil.copytree(src, os.path.join(dest, part), ignore=ignore)     # follows the HF cache's symlinks
    if skipped and not any(n.endswith(".safetensors") for _, _, names in os.walk(os.path.join(dest, part))
                           for n in names):
        raise ValueError(f"{src} holds only pickled weights ({skipped[0]}); convert them to safetensors first "
                         f"(save_pretrained(..., safe_serialization=True))")


def write_weights(folder, tensors, shard_bytes):
    """diffusion_pytorch_model.safetensors, or shards of at most shard_bytes plus the index diffusers reads."""
    os.makedirs(folder, exist_ok=True)
    shards, size = [{}], 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k], size = v, size + n
    if len(shards) == 1:
        return save_safetensors(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_safetensors(shard, os.path.join(folder, name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    write_json(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), index)


def write_json(path, d):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")


def call_kwargs(cfg, pipeline, run, sigmas):
    """The keyword arguments of the exported pipeline's __call__ that sample as the student was trained: its sigmas,
    no CFG (guidance_scale 1: SD3/SANA run CFG only above 1; a generator taking guidance as input, FLUX.1-dev, gets
    1.0 as in training), the T5 length it was distilled with, and its resolution when the run set one."""
    kwargs = dict(sigmas=list(sigmas), guidance_scale=1.0)
    tokens = run.get("max_sequence_length") or tl.KL_PIPELINES.get(pipeline, {}).get("max_sequence_length")
    if tokens:
        kwargs["max_sequence_length"] = tokens
    if run.get("resolution"):
        kwargs.update(height=run["resolution"], width=run["resolution"])
    return kwargs


def model_card(name, teacher, pipeline, cfg, meta, kwargs, K, stochastic, single):
    """README.md of the exported folder: what it is, the diffusers snippet, the settings, the licence note.
    Each paragraph is one line (Markdown joins wrapped lines anyway)."""
    repo = tl.TEACHER_REPOS.get(teacher, teacher if re.fullmatch(r"[\w.-]+/[\w.-]+", teacher) else None)
    weights = {"ema": "the EMA of the generator", "generator": "the raw generator"}.get(meta.get("weights"),
                                                                                       "the generator")
    step = ("predicts x0 = x - sigma v, then re-noises it to the next sigma with fresh Gaussian noise"
            if stochastic else "is a deterministic Euler step x + (sigma' - sigma) v (the student's 'ddim' noise)")
    how = ("takes guidance as a network input (FLUX.1-dev style) and gets 1.0, the value it was trained with"
           if getattr(cfg, "guidance_embeds", False) else "runs no classifier-free guidance (CFG applies above 1)")
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    lines = [
        "---", "library_name: diffusers", "pipeline_tag: text-to-image", "tags: [sid-dit, distillation]",
        *([f"base_model: {repo}"] if repo else []), "---", "",
        f"# {name}: a {K}-step SiD-DiT student of {repo or teacher}", "",
        f"A {K}-step text-to-image generator distilled from **{teacher}** by Score identity Distillation for "
        f"flow-matching DiTs (SiD-DiT; Zhou et al. 2025, arXiv 2509.25127) with nano SiD-DiT: {weights}, training "
        f"step {meta.get('step', '?')}. It is the teacher's `{pipeline}` with the student as its transformer and "
        f"`FlowMatchEulerDiscreteScheduler(stochastic_sampling={stochastic})` as its scheduler: each step {step}, "
        f"which is the student's own sampler. Stock diffusers runs it, with no custom code: diffusers >= 0.34.0 "
        f"(checked with 0.42.1; 0.33 and older lack `stochastic_sampling`, ignore it and sample deterministically).",
        "", "```python", "import torch", "from diffusers import DiffusionPipeline",
        f'pipe = DiffusionPipeline.from_pretrained("{name}", torch_dtype=torch.bfloat16).to("cuda")',
        f'image = pipe("a red fox in the snow", {args}).images[0]', "```", "", "## Settings", "",
        f"- Steps: 1 to {K}. Pass the sigmas of the step count rather than `num_inference_steps` (the pipeline's "
        f"own grid is not the student's):", "", "| steps | sigmas |", "|---|---|",
        *[f"| {k} | {[round(1 - i / K, 4) for i in range(k)]} |" for k in range(1, K + 1)], "",
        f"- Guidance: `guidance_scale=1.0`; the student {how}.",
        "- Noise: the initial latents are standard Gaussian, as for the teacher. In diffusers 0.42.1 `SanaPipeline` "
        "draws each step's noise from `generator`, while `StableDiffusion3Pipeline` and `FluxPipeline` (and every "
        "pipeline in diffusers 0.34) draw it from torch's global RNG: call `torch.manual_seed` for repeatable images.",
        "", "## Files", "",
        f"- `transformer/`: the student, fp32 safetensors (our config: {type(cfg).__name__} "
        f"{json.dumps(asdict(cfg))}).",
        "- `scheduler/`: the sampler above. The text encoders, tokenizers and VAE are the teacher's, unchanged.",
        *([f"- `{single}`: the transformer in the family's original single-file layout."] if single else []), "",
        "## Licence", "",
        f"The weights are derived from {repo or teacher}: the teacher's licence applies to this model and to every "
        f"file copied from it.", ""]
    return "\n".join(lines)


def export(ckpt, out, teacher=None, steps=None, raw=False, single_file=False, force=False, shard_bytes=SHARD_BYTES):
    """Write the student at `ckpt` (a train.py run folder or a student file) as a diffusers pipeline folder `out`;
    returns the single file's path (or None). Written into a temporary folder, then moved into place."""
    out = os.path.abspath(out).rstrip(os.sep)
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it, or another --out")
    path = sample.student_path(ckpt, ema=not raw)
    G, run = sample.load_student(path, ema=not raw)
    cfg = G.config
    if type(cfg) not in LAYOUTS:
        raise ValueError(f"{path} holds a {type(cfg).__name__} student; export.py writes "
                         f"{[c.__name__ for c in LAYOUTS]}")
    name = teacher or run.get("teacher")
    if not name:
        raise ValueError(f"{path} does not name its teacher; pass --teacher the pipeline folder it was distilled from")
    folder = teacher_folder(name)
    for source in (path, folder):          # --force would delete what export reads from
        if os.path.commonpath([os.path.realpath(source), os.path.realpath(out)]) == os.path.realpath(out):
            raise ValueError(f"--out {out} holds {source}, which export reads from; pick another --out")
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    if index.get("_class_name") not in tl.PIPELINES:
        raise ValueError(f"{folder} holds a {index.get('_class_name')!r}; export.py writes {sorted(tl.PIPELINES)} "
                         f"folders")
    check_teacher(cfg, folder, path)
    K = run.get("num_steps", 4)
    scheduler, sigmas = sampler(K, run.get("t_init", 1.0), run.get("noise", "fresh"), steps or K)
    transformer = diffusers_config(cfg, os.path.join(out, "transformer", "config.json"))
    state = G.state_dict()
    layout, single = LAYOUTS[type(cfg)], None
    if single_file:      # built and checked before anything is written
        single = os.path.basename(out) + layout.suffix
        original = layout.original(state, cfg, folder)
        try:             # the file must read back as this student: the layout stores shapes, not the config
            wrong = differences(cfg, layout.read_original(original, single, cfg), layout.not_stored)
        except ValueError as e:
            wrong = [str(e)]
        if wrong:
            raise ValueError(f"the {layout.suffix} single-file layout cannot hold this student ({'; '.join(wrong)} "
                             f"as our loader reads it back); export without --single_file")
    stamp = {k: v for k, v in index.items() if k == "_diffusers_version"}     # the teacher's, when it states one
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)        # beside out: the final os.replace is a rename on one file system
        for part, value in index.items():
            if isinstance(value, list) and value[0] is not None and part not in ("transformer", "scheduler"):
                copy_component(folder, part, tmp)
        keys = tl.DIFFUSERS_TRANSFORMERS[transformer["_class_name"]][1](cfg)
        write_weights(os.path.join(tmp, "transformer"), tl.to_checkpoint(state, keys), shard_bytes)
        write_json(os.path.join(tmp, "transformer", "config.json"), {**transformer, **stamp})
        write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), {**scheduler, **stamp})
        write_json(os.path.join(tmp, "model_index.json"), {
            **index, "transformer": ["diffusers", transformer["_class_name"]],
            "scheduler": ["diffusers", scheduler["_class_name"]]})
        if single:
            layout.save(original, os.path.join(tmp, single))
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        card = model_card(os.path.basename(out), str(name), index["_class_name"], cfg, meta,
                          call_kwargs(cfg, index["_class_name"], run, sigmas), K, scheduler["stochastic_sampling"],
                          single)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
        if os.path.exists(out):                     # --force: the old folder goes only once the new one is whole
            old = f"{out}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(out, single) if single else None


def main(argv=None):
    p = argparse.ArgumentParser(description="export a SiD-DiT student as a diffusers pipeline folder")
    p.add_argument("--ckpt", required=True, help="train.py run folder (its generator[_ema].safetensors) or a student "
                   "file")
    p.add_argument("--out", required=True, help="the pipeline folder to write (refused if it exists, unless --force)")
    p.add_argument("--teacher", default=None, help="the teacher's diffusers pipeline folder, name or repo id "
                   "(default: the run's --teacher); its text encoders, tokenizers and VAE are copied")
    p.add_argument("--steps", type=int, default=None, help="step count of the model card's snippet (default: K)")
    p.add_argument("--raw", action="store_true", help="the raw generator, not its EMA (when the run kept one)")
    p.add_argument("--single_file", action="store_true", help="also write the original single file (NVlabs .pth "
                   "for SANA, SAI .safetensors with VAE for SD3, BFL .safetensors for FLUX)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        single = export(args.ckpt, args.out, args.teacher, args.steps, args.raw, args.single_file, args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {os.path.abspath(args.out)}" + (f" and {single}" if single else ""))


if __name__ == "__main__":
    main()
