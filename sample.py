"""
Pictures: a distilled student at 1..K steps next to its teacher, same prompts, same seeds; and the teacher
samplers, each exactly as the teacher's own diffusers pipeline samples.

    python sample.py --ckpt runs/tiny --scale 4               # prompts: 8 of the teacher's defaults
    python sample.py --ckpt runs/tiny --prompts my.txt --steps 1 2 4 --teacher_steps 32
    python sample.py --teacher tiny --teacher_steps 4 32 --scale 4   # teacher only, no checkpoint

Writes one labelled PNG grid: a column per prompt (the prompt on top), a row per sampler (its label on the
left: student k = 1..K, then the teacher at each requested step count, with its solver, CFG and NFE).
The student runs the SiD-DiT K-step sampler of sid.generate. The teacher runs `Teacher.sample`, which is
the scheduler its pipeline folder ships (scheduler_config.json `_class_name`), driven the way its pipeline
drives it:

  - FlowMatchEulerDiscreteScheduler (SD3, FLUX, the tiny teacher, SANA's "flow-euler"): the scheduler's
    sigma grid (or the pipeline's own sigmas, FLUX: linspace(1, 1/N, N)), shifted by `shift` or by the
    resolution-dependent mu, then Euler steps x <- x + (sigma' - sigma) v;
  - DPMSolverMultistepScheduler with flow sigmas (every SANA pipeline's default): DPM-Solver++ 2M on the
    x0 predictions x - sigma v, with the scheduler's integer timesteps as the network's time;
  - guidance as the pipeline applies it: CFG v_u + g (v_c - v_u) on [uncond; cond] against the negative
    prompt "" when g > 1; g as a network input when the teacher embeds guidance (FLUX-dev); else nothing.

Checked against: diffusers 0.42.1 FlowMatchEulerDiscreteScheduler / DPMSolverMultistepScheduler
`set_timesteps` and `step` on the Hub scheduler configs, and SanaPipeline end to end on a tiny random
pipeline (test_sample.py: `python -m pytest test_sample.py -q -s`).
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import sid
from model import build_model, config_from_dict, config_to_dict
from teacher_loaders import load_teacher, read_prompts

# ----------------------------------------------------------------------------------------------
# Sigma grids: what diffusers' set_timesteps computes, as pure functions of the scheduler config

# The constructor defaults of the two schedulers (diffusers 0.42.1): a scheduler_config.json may omit any option,
# and the scheduler (so the pipeline too) then sees its default.
FLOW_MATCH_DEFAULTS = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False,
                           shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                           use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False)
DPM_DEFAULTS = dict(num_train_timesteps=1000, solver_order=2, prediction_type="epsilon", thresholding=False,
                    algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                    use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero", use_dynamic_shifting=False,
                    time_shift_type="exponential")

# Options that change the grid or the step and that we do not implement: (option, the values we implement).
# Every other option of these schedulers has no effect on flow sigmas (betas, timestep_spacing, ...).
UNSUPPORTED = {
    "FlowMatchEulerDiscreteScheduler": [
        ("invert_sigmas", (False,)), ("use_karras_sigmas", (False,)), ("use_exponential_sigmas", (False,)),
        ("use_beta_sigmas", (False,)), ("stochastic_sampling", (False,)),
        ("time_shift_type", ("exponential", "linear"))],
    "DPMSolverMultistepScheduler": [
        ("prediction_type", ("flow_prediction",)), ("use_flow_sigmas", (True,)), ("algorithm_type", ("dpmsolver++",)),
        ("solver_order", (1, 2)), ("solver_type", ("midpoint",)), ("final_sigmas_type", ("zero",)),
        ("thresholding", (False,)), ("use_karras_sigmas", (False,)), ("use_exponential_sigmas", (False,)),
        ("use_beta_sigmas", (False,)), ("use_lu_lambdas", (False,)), ("time_shift_type", ("exponential",))],
}
DEFAULTS = {"FlowMatchEulerDiscreteScheduler": FLOW_MATCH_DEFAULTS, "DPMSolverMultistepScheduler": DPM_DEFAULTS}


def scheduler_config(config):
    """The scheduler config with its class defaults filled in; a one-line error for a scheduler or an option
    whose grid or step we do not reproduce (never silently sampled differently)."""
    kind = config.get("_class_name")
    if kind not in DEFAULTS:
        raise ValueError(f"scheduler {kind!r} (scheduler_config.json _class_name) is not implemented; put a "
                         f"FlowMatchEulerDiscreteScheduler or a flow DPMSolverMultistepScheduler config in scheduler/")
    config = {**DEFAULTS[kind], **config}
    for option, ours in UNSUPPORTED[kind]:
        if config[option] not in ours:
            raise ValueError(f"{kind} option {option}={config[option]!r} is not implemented (sample.py reproduces "
                             f"{option} in {list(ours)}); edit scheduler/scheduler_config.json or add it to sample.py")
    return config


def calculate_shift(tokens, config):
    """mu = base_shift + (tokens - base_seq_len) (max_shift - base_shift) / (max_seq_len - base_seq_len): the
    resolution-dependent shift FluxPipeline and StableDiffusion3Pipeline compute from the image token count
    (diffusers pipelines/flux/pipeline_flux.py `calculate_shift`; SD3's is a copy)."""
    m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return tokens * m + config["base_shift"] - m * config["base_image_seq_len"]


def flow_match_grid(config, steps, sigmas=None, mu=None):
    """(sigmas (N+1,) fp32 ending in 0, timesteps (N,) fp32) of FlowMatchEulerDiscreteScheduler.set_timesteps
    (diffusers schedulers/scheduling_flow_match_euler_discrete.py).

    Without pipeline sigmas the grid is linspace(sigma_max, sigma_min, N) of the scheduler's 1000-step training
    grid, whose ends are shift(1) = 1 and shift(1/1000) (fp32; unshifted under dynamic shifting): so the static
    shift applies twice at the low end (SD3: last sigma 0.0089, not 0.003). Then each sigma is shifted,
        static:       s sigma / (1 + (s - 1) sigma)
        dynamic:      e^mu / (e^mu + 1/sigma - 1)   (time_shift_type exponential)
                      mu / (mu + 1/sigma - 1)       (linear)
    optionally stretched so the last one is shift_terminal: 1 - (1 - sigma) (1 - shift_terminal) / (1 - sigma_last),
    and 0 is appended. timesteps = 1000 sigma. Pipeline sigmas are cast to fp32 first (the arithmetic is numpy:
    fp64 for the scheduler's own grid, fp32 for given sigmas, as diffusers).
    """
    config = scheduler_config({**config, "_class_name": "FlowMatchEulerDiscreteScheduler"})
    n_train, shift, dynamic = config["num_train_timesteps"], config["shift"], config["use_dynamic_shifting"]
    if dynamic and mu is None:
        raise ValueError("this scheduler config has use_dynamic_shifting: pass mu (the pipeline's calculate_shift "
                         "of the image token count; set Teacher.dynamic_mu)")
    if sigmas is None:
        train_min = np.float32(1) / np.float32(n_train)     # the training grid's ends, in fp32 (torch in diffusers)
        ends = [np.float32(1), train_min] if dynamic else [
            np.float32(shift) * s / (np.float32(1) + np.float32(shift - 1) * s) for s in (np.float32(1), train_min)]
        sig = np.linspace(float(ends[0]) * n_train, float(ends[1]) * n_train, steps) / n_train
    else:
        sig = np.array(sigmas).astype(np.float32)
    if dynamic:
        a = math.exp(mu) if config["time_shift_type"] == "exponential" else mu
        sig = a / (a + (1 / sig - 1))
    else:
        sig = shift * sig / (1 + (shift - 1) * sig)
    if config["shift_terminal"]:
        if len(sig) == 1:
            raise ValueError("shift_terminal with 1 step stretches 0/0 (diffusers returns a NaN sigma); use 2+ steps")
        one_minus = 1 - sig
        sig = 1 - one_minus / (one_minus[-1] / (1 - config["shift_terminal"]))
    sig = torch.from_numpy(np.asarray(sig)).float()
    return torch.cat([sig, torch.zeros(1)]), sig * n_train


def dpm_flow_grid(config, steps, mu=None):
    """(sigmas (N+1,) fp32 ending in 0, timesteps (N,) int64) of DPMSolverMultistepScheduler.set_timesteps with
    use_flow_sigmas (diffusers schedulers/scheduling_dpmsolver_multistep.py):

        alpha_k = linspace(1, 1/1000, N+1),  sigma = shift(1 - alpha) = s u / (1 + (s - 1) u),  reversed, last dropped

    so the first sigma is shift(0.999) < 1 (0.99967 at s = 3). timesteps = int64(1000 sigma) TRUNCATES (999.67 ->
    999): the network sees t = 0.999 while the step uses sigma = 0.99967. mu (given only by pipelines that pass
    one, under use_dynamic_shifting) replaces the shift by e^mu.
    """
    config = scheduler_config({**config, "_class_name": "DPMSolverMultistepScheduler"})
    n_train = config["num_train_timesteps"]
    if mu is not None and not config["use_dynamic_shifting"]:
        raise ValueError("mu given to a DPMSolverMultistepScheduler without use_dynamic_shifting (diffusers asserts)")
    shift = math.exp(mu) if mu is not None else config["flow_shift"]
    u = 1.0 - np.linspace(1, 1 / n_train, steps + 1)
    sig = np.flip(shift * u / (1 + (shift - 1) * u))[:-1].copy()                   # (N,) fp64, descending
    timesteps = torch.from_numpy(sig * n_train).to(torch.int64)                   # truncation, as diffusers
    return torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32)), timesteps


# ----------------------------------------------------------------------------------------------
# Steps and samplers: a velocity function v(x, t) in, x0 out


def euler_step(x, v, sigma, sigma_next):
    """x + (sigma_next - sigma) v, in fp32: FlowMatchEulerDiscreteScheduler.step (it upcasts the sample)."""
    return x.float() + (sigma_next - sigma) * v


def euler_sample(velocity, z, sigmas, times):
    """Euler on dx/dsigma = v from x = z at sigmas[0] to sigmas[-1] = 0; the network sees t = times[i]."""
    x = z.float()
    for i, t in enumerate(times):
        x = euler_step(x, velocity(x, t.expand(z.shape[0])), sigmas[i], sigmas[i + 1])
    return x


def flow_lambda(sigma):
    """Half log-SNR of the flow path x = (1 - sigma) x0 + sigma eps: lambda = log(alpha / sigma), alpha = 1 - sigma."""
    return torch.log(1 - sigma) - torch.log(sigma)


def dpm_solver_step(x, x0, x0_prev, sigma_prev, sigma, sigma_next):
    """One DPM-Solver++ step from sigma to sigma_next on x0 predictions (Lu et al. 2022, arXiv 2211.01095), as
    DPMSolverMultistepScheduler computes it with flow sigmas (alpha = 1 - sigma), in fp32:

        h = lambda(sigma_next) - lambda(sigma),  phi = alpha_next (e^-h - 1)
        first order (DDIM):  x' = (sigma_next / sigma) x - phi x0
        2M (x0_prev given):  x' = first order - phi D1 / 2,  D1 = (x0 - x0_prev) / r,  r = h_prev / h
                             with h_prev = lambda(sigma) - lambda(sigma_prev)   (the "midpoint" solver type)

    At sigma_next = 0, lambda = inf, e^-h = 0 and the first-order step returns x0 exactly.
    """
    h = flow_lambda(sigma_next) - flow_lambda(sigma)
    phi = (1 - sigma_next) * (torch.exp(-h) - 1.0)
    out = (sigma_next / sigma) * x.float() - phi * x0
    if x0_prev is not None:
        r = (flow_lambda(sigma) - flow_lambda(sigma_prev)) / h
        out = out - 0.5 * phi * ((1.0 / r) * (x0 - x0_prev))
    return out


def dpm_solver_sample(velocity, z, sigmas, times, order=2):
    """DPM-Solver++ (order 1 or 2M) from x = z at sigmas[0] to 0, as DPMSolverMultistepScheduler.step runs it with
    final_sigmas_type 'zero': the first step is first order (no history yet), so is the last (to sigma = 0, it
    returns that step's x0 prediction), the others use the previous x0 prediction. x0 = x - sigma v."""
    x, x0_prev, n = z.float(), None, len(times)
    for i, t in enumerate(times):
        x0 = x - sigmas[i] * velocity(x, t.expand(z.shape[0]))
        second = order == 2 and x0_prev is not None and i < n - 1
        x = dpm_solver_step(x, x0, x0_prev if second else None, sigmas[i - 1], sigmas[i], sigmas[i + 1])
        x0_prev = x0
    return x


SOLVER_NAMES = {"FlowMatchEulerDiscreteScheduler": "Euler", "DPMSolverMultistepScheduler": "DPM-Solver++"}


# ----------------------------------------------------------------------------------------------
# The teacher's pipeline: grid policy, guidance, prompts


def teacher_grid(teacher, steps, tokens):
    """(sigmas (N+1,), network times t (N,) in [0, 1]) for N steps, as the teacher's pipeline asks its scheduler:
    its own grid or linspace(1, 1/N, N) sigmas (`Teacher.sigma_grid`), and mu from the image token count when
    the pipeline computes one (`Teacher.dynamic_mu`) and the scheduler shifts dynamically."""
    if steps < 1:
        raise ValueError(f"steps={steps}: a teacher needs at least 1 sampling step")
    if teacher.sigma_grid not in ("scheduler", "linspace"):
        raise ValueError(f"Teacher.sigma_grid={teacher.sigma_grid!r}; use 'scheduler' or 'linspace'")
    config = scheduler_config(teacher.scheduler)
    mu = calculate_shift(tokens, config) if teacher.dynamic_mu and config["use_dynamic_shifting"] else None
    if config["_class_name"] == "DPMSolverMultistepScheduler":   # FluxPipeline too passes no sigmas to flow-sigma DPM
        sigmas, timesteps = dpm_flow_grid(config, steps, mu)
    else:
        given = np.linspace(1.0, 1 / steps, steps) if teacher.sigma_grid == "linspace" else None
        sigmas, timesteps = flow_match_grid(config, steps, given, mu)
    return sigmas, timesteps / config["num_train_timesteps"]      # modules take flow time, x1000 inside


def guided_velocity(teacher, prompts, guidance, device):
    """v(x, t) for the prompts, guided as the pipeline guides: CFG on [uncond; cond] against the negative "" when
    g > 1 (StableDiffusion3Pipeline, SanaPipeline), g as a network input when the teacher embeds guidance
    (FluxPipeline with FLUX-dev: no CFG), the plain conditional velocity otherwise (FluxPipeline with schnell). Inputs are cast to the
    transformer's dtype (SanaPipeline does); the velocity is returned in fp32."""
    net = teacher.transformer
    dtype = next(net.parameters()).dtype

    def prepare(d):
        return {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in d.items()}

    cond = prepare(teacher.encode_prompts(list(prompts)))
    if teacher.embeds_guidance:
        g = torch.full((len(prompts),), float(guidance), device=device)
        return lambda x, t: net(x.to(dtype), t, **cond, guidance=g).float()
    if teacher.pipeline_cfg and guidance > 1:
        neg = prepare(teacher.encode_prompts([""], negative=True))
        uncond = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in neg.items()}
        return lambda x, t: sid.cfg_velocity(net, x.to(dtype), t, cond, uncond, guidance)
    return lambda x, t: net(x.to(dtype), t, **cond).float()


@torch.no_grad()
def pipeline_sample(teacher, prompts, z, steps, guidance):
    """x0 latents (B, C, h, w) from initial noise z (B, C, h, w), as the teacher's pipeline samples them with
    `steps` inference steps and guidance scale `guidance`: its scheduler (scheduler_config.json `_class_name`),
    its grid policy and its guidance. Equals the pipeline's output_type="latent" result (test_sample.py)."""
    if len(prompts) != z.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {z.shape[0]} noise samples; pass one prompt per sample")
    config = scheduler_config(teacher.scheduler)
    p = teacher.transformer.config.patch_size
    sigmas, times = teacher_grid(teacher, steps, tokens=(z.shape[-2] // p) * (z.shape[-1] // p))
    sigmas, times = sigmas.to(z.device), times.to(z.device)
    velocity = guided_velocity(teacher, prompts, guidance, z.device)
    if config["_class_name"] == "DPMSolverMultistepScheduler":
        return dpm_solver_sample(velocity, z, sigmas, times, config["solver_order"])
    return euler_sample(velocity, z, sigmas, times)


def teacher_label(teacher, steps, guidance=None):
    """(row label, NFE) of the teacher sampled with `steps` steps, e.g. ("teacher DPM-Solver++ 20 steps, CFG 4.5,
    NFE 40", 40): CFG doubles the network calls, embedded guidance does not."""
    g = teacher.guidance if guidance is None else guidance
    name = SOLVER_NAMES[scheduler_config(teacher.scheduler)["_class_name"]]
    cfg = not teacher.embeds_guidance and g > 1
    how = f"guidance {g:g}" if teacher.embeds_guidance else f"CFG {g:g}" if cfg else "no CFG"
    nfe = steps * (2 if cfg else 1)
    return f"teacher {name} {steps} step{'s' * (steps > 1)}, {how}, NFE {nfe}", nfe


def student_label(k, tag="student"):
    return f"{tag} {k} step{'s' * (k > 1)}, NFE {k}"


@torch.no_grad()
def student_sample(G, z, cond, k, K, t_init=1.0, noise="fresh", seed=0):
    """x0 after k steps of the K-step SiD-DiT sampler, with seeded fresh noise (guidance input 1.0 for a
    generator that embeds guidance, as in training)."""
    g = torch.Generator().manual_seed(seed)
    cond = sid.generator_inputs(cond, getattr(G.config, "guidance_embeds", False))
    return sid.generate(G, z, cond, k, K, t_init, noise,
                        randn=lambda like: torch.randn(like.shape, generator=g).to(like))


# ----------------------------------------------------------------------------------------------
# Labelled PNG grids


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def wrap(text, font, width, max_lines):
    """Lines of `text` no wider than `width` pixels in `font`; past max_lines the last line ends in '...'."""
    lines = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += "..."
    for i, line in enumerate(lines):        # words longer than the width, and the '...' line, are cut
        while font.getlength(line) > width and len(line) > 4:
            line = line[:-4] + "..."
        lines[i] = line
    return lines


def save_grid(rows, labels, prompts, path, scale=1):
    """Write a labelled grid PNG atomically. rows: (B, 3, H, W) image batches in [-1, 1], one grid row each, with
    labels[i] on its left; column j has prompts[j] above it (wrapped, at most 3 lines). Images are upscaled
    `scale` times (nearest) first so tiny images are visible and the text (PIL's default font) readable."""
    if len(labels) != len(rows) or any(len(r) != len(prompts) for r in rows):
        raise ValueError(f"save_grid: {len(rows)} rows x {[len(r) for r in rows]} images for {len(labels)} labels "
                         f"and {len(prompts)} prompts; pass one label per row and one prompt per column")
    tiles = [[Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
              for a in to_uint8(r)] for r in rows]
    w, h = tiles[0][0].size
    font = ImageFont.load_default(size=min(24, max(12, w // 10)))
    line, gap = font.size + 4, 2
    label_w = max(w, 13 * font.size)
    heads = [wrap(p, font, w - 4, 3) for p in prompts]
    top = line * max(len(lines) for lines in heads) + 6
    grid = Image.new("RGB", (label_w + len(prompts) * (w + gap), top + len(rows) * (h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(heads):
        for n, text in enumerate(lines):
            draw.text((label_w + j * (w + gap) + 2, 3 + n * line), text, fill="black", font=font)
    for i, (label, row) in enumerate(zip(labels, tiles)):
        y = top + i * (h + gap)
        lines = wrap(label, font, label_w - 8, max(1, h // line))
        for n, text in enumerate(lines):
            draw.text((4, y + (h - len(lines) * line) // 2 + n * line), text, fill="black", font=font)
        for j, tile in enumerate(row):
            grid.paste(tile, (label_w + j * (w + gap), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    grid.save(tmp)
    os.replace(tmp, path)


STUDENT_FILES = ("generator_ema.safetensors", "generator.safetensors")   # in a run folder, in order of preference


def save_student(path, state, config, args, step, weights="generator"):
    """Write a student file atomically: the generator's fp32 weights (our module's keys) in one .safetensors, its
    config, the run's args, the step and which weights these are ("generator" or "ema") in the metadata.
    This is what sample.py, eval.py and export.py read; they never touch optimizer state."""
    from safetensors.torch import save_file
    meta = {"config": json.dumps(config_to_dict(config)), "args": json.dumps(args), "step": str(step),
            "weights": weights, "format": "nano-sid-dit student v1"}
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def student_path(path, ema=True):
    """The student file of a run folder (its EMA if the run kept one and ema is True), or `path` itself."""
    if os.path.isdir(path):
        names = STUDENT_FILES if ema else STUDENT_FILES[1:]
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"{path} holds no {' or '.join(names)}; pass the run folder (--out) of a train.py "
                                    f"run that saved a checkpoint, or a student .safetensors file")
        return found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"student {path} does not exist; pass a train.py run folder or its "
                                f"generator.safetensors")
    return path


def load_student(path, device="cpu", ema=True):
    """(generator module, run args dict) from a train.py run folder or a student file (save_student).

    A run folder gives its EMA (generator_ema.safetensors) when the run kept one and ema is True, else the raw
    generator. The module is built from the file's config, every key and shape checked, fp32, eval mode."""
    from teacher_loaders import IDENTITY, load_weights, read_safetensors
    path = student_path(path, ema)
    state, meta = read_safetensors(path)
    if "config" not in meta or "args" not in meta:
        raise ValueError(f"{path} has no student config in its metadata: it is not a file train.py wrote; pass the "
                         f"generator.safetensors of a run folder")
    cfg = config_from_dict(json.loads(meta["config"]))
    G = load_weights(lambda: build_model(cfg), state, IDENTITY, path, hint="the file is corrupt; re-export it")
    return G.float().to(device).eval().requires_grad_(False), json.loads(meta["args"])


def main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    G, ck = (load_student(args.ckpt, device, ema=not args.raw) if args.ckpt else (None, {}))
    teacher = load_teacher(args.teacher or ck.get("teacher", "tiny"), device)
    prompts = read_prompts(args.prompts) if args.prompts else teacher.default_prompts[::max(1, len(
        teacher.default_prompts) // args.n)][:args.n]
    C, h, w = teacher.latent_shape(args.resolution or ck.get("resolution"))
    z = torch.randn((len(prompts), C, h, w), generator=torch.Generator().manual_seed(args.seed)).to(device)
    cond = teacher.encode_prompts(prompts)
    K = ck.get("num_steps", 4)
    ema = G is not None and os.path.basename(student_path(args.ckpt, not args.raw)) == STUDENT_FILES[0]
    tag = "student (EMA)" if ema else "student"
    rows, labels = [], []
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16):
        if G is not None:
            for k in args.steps:
                rows.append(teacher.decode(student_sample(G, z, cond, k, K, ck.get("t_init", 1.0),
                                                          ck.get("noise", "fresh"), args.seed)))
                labels.append(student_label(k, tag))
        for n in args.teacher_steps:
            rows.append(teacher.decode(teacher.sample(prompts, z, n, args.guidance)))
            labels.append(teacher_label(teacher, n, args.guidance)[0])
    save_grid(rows, labels, prompts, args.out, scale=args.scale)
    print(f"wrote {args.out}: {len(prompts)} columns ({', '.join(prompts[:3])}...), rows:")
    for i, lab in enumerate(labels):
        print(f"  row {i}: {lab}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="sample a distilled student and its teacher side by side")
    p.add_argument("--ckpt", default=None, help="train.py run folder (its generator[_ema].safetensors) or a student "
                   "file; omit to sample the teacher only")
    p.add_argument("--teacher", default=None, help="teacher name or path (default: the checkpoint's)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: teacher's list)")
    p.add_argument("--n", type=int, default=8, help="number of default prompts when --prompts is not given")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="student step counts k <= K")
    p.add_argument("--teacher_steps", type=int, nargs="*", default=[4, 32],
                   help="teacher step counts (its pipeline's scheduler)")
    p.add_argument("--guidance", type=float, default=None, help="teacher guidance scale (default: its pipeline's)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, shared by every row")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscale of each image (tiny images)")
    p.add_argument("--raw", action="store_true", help="the raw generator, not its EMA (when the run kept one)")
    p.add_argument("--out", default="samples.png", help="output PNG")
    try:
        main(p.parse_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
