"""
SiD-DiT training: distil a flow-matching teacher into a 1-K step generator, data-free (prompts only).

    python train.py --teacher tiny                                        # CPU, ~7.5 minutes on 2 cores
    torchrun --standalone --nproc_per_node=2 train.py --teacher tiny      # same run on 2 ranks (gloo)
    torchrun --standalone --nproc_per_node=8 train.py --teacher sana      # 8 GPUs (nccl), paper settings
    python train.py --teacher tiny --out runs/tiny --resume               # continue runs/tiny/ckpt.pt exactly

One loop for every teacher. Each iteration draws one k in 1..K (the same on every rank), then
  1. fake-score update: regress the guided fake velocity onto eps - x_g for generator samples x_g;
  2. generator update:  SiD loss between the guided teacher and fake-score x0 predictions.
Generator and fake score start as copies of the teacher; an optional fp32 EMA of the generator
(--ema_halflife_kimg) is what the sample grids and sample.py show. With several ranks, all three nets are
sharded with FSDP2 (`fully_shard`). Every random draw is made for the global batch from one
seeded CPU generator and sliced per rank, so 1 rank and N ranks see the same samples and a resumed
run continues bit-identically (test_train.py checks both).

Flag defaults are the official SiD-DiT settings (apple/ml-sid-dit run_sid_dit.sh and README);
a teacher may override a few of them to fit its size (`Teacher.train_defaults`: the tiny teacher
uses a CPU-sized batch, lr and step count, and a 1-kimg EMA).
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import sid
from model import config_to_dict
from sample import save_grid, save_student, student_label, student_sample
from teacher_loaders import load_teacher, read_prompts


def get_parser():
    p = argparse.ArgumentParser(description="SiD-DiT: score identity distillation of a flow-matching DiT")
    # teacher and prompts
    p.add_argument("--teacher", default="sana", help="tiny | sana | sana-600m-1024 | sana-1.6b-512 | sana-1.6b-1024 | "
                   "sd3-medium | sd3.5-medium | sd3.5-large | flux-dev | flux-schnell | a diffusers pipeline folder | "
                   "a Hugging Face repo id")
    p.add_argument("--transformer", default=None, help="an original single file to use as the teacher's transformer "
                   "(SAI sd3*.safetensors, with its VAE if it holds one; BFL flux1-*.safetensors; NVlabs SANA .pth); "
                   "the --teacher folder gives the text encoders, tokenizers, VAE and scheduler")
    p.add_argument("--max_sequence_length", type=int, default=None, help="T5 tokens (SD3: 77 as official SiD-DiT, "
                   "the pipeline uses 256; FLUX: 512)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: the teacher's list)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the teacher's)")
    # data-aided SiD (official --train_diffusiongan): the fake score doubles as a discriminator on real images
    p.add_argument("--data", default=None, help="real images: a folder of captioned images (metadata.jsonl, or a "
                   "same-name .txt per image) or 'tiny'; default: none (data-free SiD)")
    p.add_argument("--lsd", type=float, default=1.0, help="with --data: discriminator loss scale")
    p.add_argument("--lsg_gan", type=float, default=1.0, help="with --data: generator adversarial loss scale")
    p.add_argument("--gan_g_start", type=int, default=20_000, help="with --data: generator images seen before G "
                   "trains at all (the discriminator trains alone)")
    p.add_argument("--gan_adv_start", type=int, default=40_000, help="with --data: generator images seen before G's "
                   "loss becomes 0.5 L_G + 0.5 L_adv (L_G alone until then)")
    # SiD
    p.add_argument("--num_steps", type=int, default=4, help="K: generator steps; each iteration trains step k~U{1..K}")
    p.add_argument("--t_init", type=float, default=1.0, help="first generator time (official init_timestep 999/999)")
    p.add_argument("--noise", default="fresh", choices=["fresh", "fixed", "ddim"], help="noise between generator steps")
    p.add_argument("--alpha", type=float, default=1.0, help="SiD alpha (1.2 in the original SiD)")
    p.add_argument("--weighting", default="1_minus_sigma", choices=sid.WEIGHTINGS, help="generator loss weight w(t)")
    p.add_argument("--t_law", default="logit_normal", choices=["logit_normal", "uniform"], help="loss timestep law")
    p.add_argument("--t_mean", type=float, default=math.log(2.0), help="logit-normal mean (ln 2)")
    p.add_argument("--t_std", type=float, default=1.6, help="logit-normal std")
    p.add_argument("--cfg_train_fake", type=float, default=4.5, help="kappa1: CFG of the fake score when training it")
    p.add_argument("--cfg_eval_fake", type=float, default=4.5, help="kappa2: CFG of the fake score in the G loss")
    p.add_argument("--cfg_eval_real", type=float, default=4.5, help="kappa4: CFG of the teacher in the G loss")
    p.add_argument("--embedded_guidance", default="with_cfg", choices=sid.EMBEDDED_GUIDANCE,
                   help="for a teacher that takes the guidance scale as an input (FLUX.1-dev): with_cfg = kappa as that "
                        "input AND true CFG against '' (official, what the paper ran); only = kappa as the input of one "
                        "conditional call, no CFG (as FLUX.1-dev is sampled; half the teacher and fake-score cost). "
                        "The generator always gets guidance 1.0")
    p.add_argument("--ls", type=float, default=1.0, help="fake-score loss scale")
    p.add_argument("--lsg", type=float, default=100.0, help="generator loss scale")
    # optimisation
    p.add_argument("--batch", type=int, default=256, help="global batch (generator samples per update)")
    p.add_argument("--micro_batch", type=int, default=None, help="per-rank micro-batch (default: batch / ranks)")
    p.add_argument("--precision", default="amp", choices=["amp", "bf16", "fp32"],
                   help="amp: fp32 weights + bf16 autocast; bf16: pure bf16 weights and Adam; fp32: no autocast")
    p.add_argument("--lr", type=float, default=None, help="fake-score lr (default 1e-6 amp/fp32, 1e-5 bf16)")
    p.add_argument("--glr", type=float, default=None, help="generator lr (default as --lr)")
    p.add_argument("--adam_eps", type=float, default=None, help="Adam eps (default 1e-8 amp/fp32, 1e-4 bf16)")
    p.add_argument("--max_steps", type=int, default=4000, help="iterations (4000 x 256 ~ 1M images, official)")
    p.add_argument("--grad_checkpointing", type=int, default=1, help="activation checkpointing on G and fake")
    p.add_argument("--ema_halflife_kimg", type=float, default=0.0,
                   help="half-life of an fp32 EMA of G, in thousands of generator samples; sample grids and "
                        "sample.py use it (0: no EMA, as the official FSDP code)")
    # run
    p.add_argument("--out", default=None, help="run folder (default runs/<teacher>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt exactly")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--sample_every", type=int, default=500, help="write sample grids every N steps (0: off)")
    p.add_argument("--ckpt_every", type=int, default=500, help="write the checkpoint every N steps and at the end "
                   "(0: never, for benchmarks)")
    p.add_argument("--n_samples", type=int, default=8, help="prompts in each sample grid")
    p.add_argument("--dry_run", action="store_true", help="print the per-GPU memory plan of this run (parameters, "
                   "gradients, Adam, teacher, encoders, activations), whether it fits and what would make it fit; "
                   "then exit (0: fits, 1: does not)")
    p.add_argument("--gpu_gb", type=float, default=None, help="GPU memory for --dry_run (default: this GPU's, else 80)")
    return p


def parse_args(argv=None):
    """Flags, with the teacher's own defaults (Teacher.train_defaults) applied under the user's flags."""
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    teacher = load_teacher(pre.teacher, transformer=pre.transformer, max_sequence_length=pre.max_sequence_length)
    p.set_defaults(**teacher.train_defaults)
    args = p.parse_args(argv)
    mode_lr, mode_eps = (1e-5, 1e-4) if args.precision == "bf16" else (1e-6, 1e-8)   # official README recipes
    args.lr = args.lr if args.lr is not None else mode_lr
    args.glr = args.glr if args.glr is not None else args.lr
    args.adam_eps = args.adam_eps if args.adam_eps is not None else mode_eps
    args.out = args.out or os.path.join("runs", os.path.basename(str(args.teacher).rstrip("/")))
    return args, teacher


# ----------------------------------------------------------------------------------------------
# Distributed helpers


def shard(model):
    """FSDP2: each of the family's units (its blocks) is gathered just in time, then the root holds the rest.
    FSDP2 hooks only `forward`; the root's other entry points (forward_with_features) are registered too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for unit in model.fsdp_units():
        fully_shard(unit)
    fully_shard(model)
    for name in model.fsdp_forward_methods:
        register_fsdp_forward_method(model, name)


def mean_over_ranks(x):
    x = torch.as_tensor(x, dtype=torch.float64).clone()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x.item()


def grad_norm(model):
    n = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], float("inf"))
    return (n.full_tensor() if hasattr(n, "full_tensor") else n).item()   # DTensor under FSDP2


def check_finite(step, name, loss, gnorm, last_good):
    """Stop rather than repair: the official code zeroes NaN grads and drops NaN samples silently."""
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise FloatingPointError(f"non-finite {name} loss {loss} / grad norm {gnorm} at step {step}; nothing was "
                                 f"saved; last good checkpoint: {last_good}; lower --lr/--glr or use --precision amp")


def save_checkpoint(path, G, fake, opt_g, opt_f, ema, state):
    """Full fp32 states gathered to rank 0, written to a temp name then renamed (never half-written)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ckpt = dict(state,
                generator=get_model_state_dict(G, options=opts), fake=get_model_state_dict(fake, options=opts),
                opt_g=get_optimizer_state_dict(G, opt_g, options=opts),
                opt_f=get_optimizer_state_dict(fake, opt_f, options=opts))
    if ema is not None:
        ckpt["ema"] = get_model_state_dict(ema, options=opts)
    if not dist.is_initialized() or dist.get_rank() == 0:
        ckpt["generator"] = {k: v.float() for k, v in ckpt["generator"].items()}   # sample.py/eval use fp32
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)
        # the student files sample.py, eval.py and export.py read: weights + config, no optimizer state
        folder, config = os.path.dirname(path), G.config
        save_student(os.path.join(folder, "generator.safetensors"), ckpt["generator"], config, state["args"],
                     state["step"])
        if ema is not None:
            save_student(os.path.join(folder, "generator_ema.safetensors"), ckpt["ema"], config, state["args"],
                         state["step"], weights="ema")
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path, G, fake, opt_g, opt_f, ema):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(G, ckpt["generator"], options=opts)
        set_model_state_dict(fake, ckpt["fake"], options=opts)
        set_optimizer_state_dict(G, opt_g, ckpt["opt_g"], options=opts)
        set_optimizer_state_dict(fake, opt_f, ckpt["opt_f"], options=opts)
        if ema is not None:
            set_model_state_dict(ema, ckpt["ema"], options=opts)
    except Exception as e:
        raise ValueError(f"cannot resume from {path}: {type(e).__name__}: {str(e)[:200]}; it is corrupt or "
                         f"from another teacher/config; pick another --out or drop --resume") from None
    return ckpt


# ----------------------------------------------------------------------------------------------


def main(args, teacher):
    # Setup distributed: torchrun sets RANK/WORLD_SIZE; plain `python train.py` is one process.
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False      # official: TF32 off, so fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
    master = rank == 0
    log = tqdm.write if master else (lambda *a, **k: None)

    # Setup the run: checks that must fail before anything is written.
    micro = args.micro_batch or args.batch // world
    if args.batch % (world * micro):
        raise ValueError(f"--batch {args.batch} is not divisible by {world} ranks x --micro_batch {micro}; "
                         f"use a multiple of {world * micro}")
    rounds = args.batch // (world * micro)          # gradient-accumulation rounds per update
    gb = world * micro                              # global samples drawn per round
    shape = teacher.latent_shape(args.resolution)   # (C, h, w); errors name a valid resolution
    if args.dry_run:                                 # the memory plan, before anything is built or written
        from bench import preflight
        report, fits = preflight(args, teacher, world, micro)
        log(report)
        if distributed:
            dist.destroy_process_group()
        sys.exit(0 if fits else 1)
    prompts = read_prompts(args.prompts) if args.prompts else teacher.default_prompts
    if not prompts:
        raise ValueError("this teacher ships no prompt list; pass --prompts FILE")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume and not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--resume: {ckpt_path} does not exist; start without --resume or fix --out")
    if not args.resume and os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out "
                         f"(a run never overwrites another run's checkpoint)")
    if master:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)

    # Setup the three networks: frozen teacher, generator G and fake score, both copies of the teacher.
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    real = teacher.transformer.to(device, dtype).eval().requires_grad_(False)
    G = copy.deepcopy(real).train().requires_grad_(True)
    fake = copy.deepcopy(real).train().requires_grad_(True)
    # the teacher too: the generator loss backpropagates through its input, so its activations are kept
    for net in (real, G, fake):
        net.gradient_checkpointing = bool(args.grad_checkpointing)
    # EMA of G, for sampling only. fp32 even in pure bf16: a bf16 EMA cannot move by less than 1/256 per step.
    ema = copy.deepcopy(G).float().eval().requires_grad_(False) if args.ema_halflife_kimg > 0 else None
    ema_beta = 0.5 ** (args.batch / (1000 * args.ema_halflife_kimg)) if ema is not None else None
    if distributed:
        for net in (real, G, fake) + ((ema,) if ema is not None else ()):
            shard(net)
    adam = dict(betas=(0.0, 0.999), eps=args.adam_eps)   # official: no first-moment momentum
    opt_g = torch.optim.Adam(G.parameters(), lr=args.glr, **adam)
    opt_f = torch.optim.Adam(fake.parameters(), lr=args.lr, **adam)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "amp" else nullcontext())
    # guidance: true CFG for every teacher; one that embeds the scale (FLUX.1-dev) also gets it as an input
    # (--embedded_guidance), and then so does G, fed 1.0. The teacher states the capability; no family is named.
    embedded = args.embedded_guidance if teacher.embeds_guidance else None

    def g_inputs(cond):
        return sid.generator_inputs(cond, teacher.embeds_guidance)

    # Setup randomness: one CPU generator, same seed on every rank; each draw covers the global
    # round and every rank keeps its slice.
    g = torch.Generator().manual_seed(args.seed)
    mine = slice(rank * micro, (rank + 1) * micro)

    def randn(like):
        return torch.randn((gb, *like.shape[1:]), generator=g)[mine].to(like)

    def draw():
        idx = torch.randint(len(prompts), (gb,), generator=g)[mine].tolist()
        z = torch.randn((gb, *shape), generator=g)[mine].to(device)
        eps = torch.randn((gb, *shape), generator=g)[mine].to(device)
        t = sid.sample_t(gb, args.t_law, args.t_mean, args.t_std, generator=g)[mine].to(device)
        return encode([prompts[i] for i in idx]), z, eps, t

    # Setup prompts: each distinct prompt (or real caption) is encoded once and kept on the CPU (the official
    # code re-encodes every step); the empty prompt for CFG is encoded once.
    cache = {}

    def on_device(v):   # features in the networks' dtype; masks keep theirs
        return v.to(device, dtype if v.is_floating_point() else v.dtype)

    def encode(texts):
        new = [p for p in dict.fromkeys(texts) if p not in cache]
        if new:
            with autocast:
                out = teacher.encode_prompts(new)
            for j, p in enumerate(new):
                cache[p] = {k: v[j].cpu() for k, v in out.items()}
        return {k: on_device(torch.stack([cache[p][k] for p in texts])) for k in cache[texts[0]]}

    with autocast:
        empty = teacher.encode_prompts([""], negative=True)     # the CFG negative, as the pipeline encodes it
    uncond = {k: on_device(v.expand(micro, *v.shape[1:])) for k, v in empty.items()}
    grid_prompts = prompts[::max(1, len(prompts) // args.n_samples)][:args.n_samples]
    grid_z = torch.randn((len(grid_prompts), *shape), generator=torch.Generator().manual_seed(args.seed + 1))

    # Setup real data (data-aided SiD only): latents encoded once by the teacher's VAE into the run folder (a KL
    # VAE samples its posterior, seeded per rank, as the official data path); each rank reads a disjoint slice.
    data = None
    if args.data:
        from data import open_data
        vae_g = torch.Generator().manual_seed(args.seed * 1000 + rank)
        data = open_data(args.data, teacher.vae_factor * shape[-1], lambda img: teacher.encode(img, generator=vae_g),
                         os.path.join(args.out, "latents"), args.seed, rank, world,
                         barrier=dist.barrier if distributed else None, cache_tag=f"{teacher.name} seed {args.seed}")

    step, metrics_path = 0, os.path.join(args.out, "metrics.jsonl")
    if args.resume:
        ck = load_checkpoint(ckpt_path, G, fake, opt_g, opt_f, ema)
        step = ck["step"]
        g.set_state(ck["rng"])
        if data is not None:
            data.load_state_dict(ck["data"])
        log(f"resumed {ckpt_path} at step {step}")
    last_good = f"{ckpt_path} (step {step})" if args.resume else "none yet"

    def write_samples(tag):
        cond = {k: v.to(device) for k, v in teacher.encode_prompts(grid_prompts).items()}
        z = grid_z.to(device)
        net = ema if ema is not None else G.eval()
        steps = sorted({1, args.num_steps})
        with autocast:
            rows = [teacher.decode(student_sample(net, z, cond, k, args.num_steps, args.t_init, args.noise, args.seed))
                    for k in steps]
        G.train()
        if master:
            labels = [student_label(k, "student (EMA)" if ema is not None else "student") for k in steps]
            save_grid(rows, labels, grid_prompts, os.path.join(args.out, "samples", f"{tag}.png"),
                      scale=max(1, 128 // rows[0].shape[-1]))

    def checkpoint_now():
        state = dict(step=step, rng=g.get_state(), args=vars(args), config=config_to_dict(G.config))
        if data is not None:
            state["data"] = data.state_dict()
        save_checkpoint(ckpt_path, G, fake, opt_g, opt_f, ema, state)
        return f"{ckpt_path} (step {step})"

    n_params = sum(p.numel() for p in real.parameters()) if not distributed else "sharded"
    log(f"SiD-DiT: teacher {args.teacher} ({n_params} params), latent {tuple(shape)}, {len(prompts)} prompts, "
        f"{world} rank(s) x {rounds} round(s) x {micro} = batch {args.batch}, {args.precision}, device {device}"
        + (f", embedded guidance {embedded}" if embedded else ""))
    if master:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True, file=sys.stdout)
    def clock():   # wall time after the device's queued work: per-phase times and the benchmark (bench.py)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    while step < args.max_steps:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = clock()
        k = int(torch.randint(1, args.num_steps + 1, (1,), generator=g))   # same k on every rank and phase

        # ---- 1. Fake-score update: flow matching on generator samples (G frozen) ----
        G.requires_grad_(False)
        fake.requires_grad_(True)
        opt_f.zero_grad(set_to_none=True)
        loss_f, gan = 0.0, dict(loss_d=0.0, acc_real=0.0, acc_fake=0.0, loss_sid=0.0, loss_adv=0.0)
        for r in range(rounds):
            cond, z, eps, t = draw()
            with torch.no_grad(), autocast:
                x_g = sid.generate(G, z, g_inputs(cond), k, args.num_steps, args.t_init, args.noise, randn=randn)
            x_t = sid.add_noise(x_g, eps, t)
            with autocast:
                if data is None:
                    v_fake = sid.cfg_velocity(fake, x_t, t, cond, uncond, args.cfg_train_fake, embedded)
                else:   # data-aided: the same guided pass also gives the fake logits; one pass on real latents
                    x_real, captions = data.draw(gb)
                    v_fake, logit_fake, logit_real = sid.discriminator_pass(
                        fake, x_g, x_real.to(device), eps, t, cond, encode(captions), uncond, args.cfg_train_fake,
                        embedded)
            loss = sid.fake_score_loss(v_fake, x_g, eps, args.ls) / rounds
            if data is not None:    # L_psi + L_D, one backward
                loss_d = sid.discriminator_loss(logit_real, logit_fake, x_g[0].numel(), args.lsd) / rounds
                loss = loss + loss_d
                acc_real, acc_fake = sid.discriminator_accuracy(logit_real, logit_fake)
                gan["loss_d"] += loss_d.item()
                gan["acc_real"] += acc_real / rounds
                gan["acc_fake"] += acc_fake / rounds
            if distributed:
                fake.set_requires_gradient_sync(r == rounds - 1)   # reduce-scatter once per update
            loss.backward()
            loss_f += loss.item()
        gnorm_f, loss_f = grad_norm(fake), mean_over_ranks(loss_f)
        check_finite(step + 1, "fake score", loss_f, gnorm_f, last_good)
        opt_f.step()
        t1 = clock()

        # ---- 2. Generator update: SiD loss, gradient through x_g and both nets' inputs ----
        # data-aided: no G step before --gan_g_start images, then L_G, then 0.5 L_G + 0.5 L_adv
        train_g, w_sid, w_adv = (sid.adversarial_schedule(step * args.batch, args.gan_g_start, args.gan_adv_start)
                                 if data is not None else (True, 1.0, 0.0))
        fake.requires_grad_(False)
        G.requires_grad_(train_g)
        opt_g.zero_grad(set_to_none=True)
        loss_g = 0.0
        for r in range(rounds if train_g else 0):
            cond, z, eps, t = draw()
            with autocast:
                x_g = sid.generate(G, z, g_inputs(cond), k, args.num_steps, args.t_init, args.noise, grad=True,
                                   randn=randn)
                x_t = sid.add_noise(x_g, eps, t)
                v_real = sid.cfg_velocity(real, x_t, t, cond, uncond, args.cfg_eval_real, embedded)
                if data is None:
                    v_fake = sid.cfg_velocity(fake, x_t, t, cond, uncond, args.cfg_eval_fake, embedded)
                else:   # the pass that yields f_psi also yields the logits of G's samples
                    v_fake, logit_gen = sid.cfg_velocity_and_logits(fake, x_t, t, cond, uncond, args.cfg_eval_fake,
                                                                    embedded)
                x0_real, x0_fake = sid.x0_from_velocity(x_t, t, v_real), sid.x0_from_velocity(x_t, t, v_fake)
            w = sid.loss_weight(args.weighting, t, x_g, x0_real)
            loss = sid.generator_loss(x_g, x0_real, x0_fake, w, args.alpha, args.lsg) / rounds
            if data is not None:
                loss_adv = sid.generator_adversarial_loss(logit_gen, w, x_g[0].numel(), args.lsg_gan) / rounds
                gan["loss_sid"] += loss.item()
                gan["loss_adv"] += loss_adv.item()
                loss = w_sid * loss + w_adv * loss_adv
            if distributed:
                G.set_requires_gradient_sync(r == rounds - 1)
            loss.backward()
            loss_g += loss.item()
        if train_g:
            gnorm_g, loss_g = grad_norm(G), mean_over_ranks(loss_g)
            check_finite(step + 1, "generator", loss_g, gnorm_g, last_good)
            opt_g.step()
        else:
            loss_g = gnorm_g = float("nan")                 # logged as NaN while G waits (data-aided warm-up)
            if distributed:     # no backward re-shards G's root after the fake phase's no-grad sampling: do it here
                G.reshard()
        if ema is not None and train_g:     # ema <- beta ema + (1 - beta) G, shard by shard under FSDP2
            with torch.no_grad():
                for e, p in zip(ema.parameters(), G.parameters()):
                    e.lerp_(p.to(e.dtype), 1 - ema_beta)
        step += 1
        t2 = clock()

        # ---- bookkeeping: one log line per step, metrics, sample grids, checkpoint ----
        dt = t2 - t0
        rec = dict(step=step, k=k, loss_fake=loss_f, loss_gen=loss_g, gnorm_fake=gnorm_f, gnorm_gen=gnorm_g,
                   img_per_s=args.batch / dt, sec=dt, sec_fake=t1 - t0, sec_gen=t2 - t1,
                   peak_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        if data is not None:    # loss_fake includes L_D; loss_gen = w_sid loss_sid (L_G) + w_adv loss_adv
            rec.update({key: mean_over_ranks(v) for key, v in gan.items()}, w_sid=w_sid, w_adv=w_adv)
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        log(f"step {step:5d} k={k} loss_fake {loss_f:9.3f} loss_gen {loss_g:9.4f} gnorm_fake {gnorm_f:8.3f} "
            f"gnorm_gen {gnorm_g:8.3f} {rec['img_per_s']:6.1f} img/s" + (
                f" | L_D {rec['loss_d']:8.3f} L_adv {rec['loss_adv']:8.3f} D acc real {rec['acc_real']:.2f} "
                f"fake {rec['acc_fake']:.2f}" if data is not None else ""))
        bar.update(1)
        if args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):
            write_samples(f"step{step:06d}")
        if args.ckpt_every and (step % args.ckpt_every == 0 or step == args.max_steps):
            last_good = checkpoint_now()
    bar.close()
    log(f"done: {last_good}; samples in {os.path.join(args.out, 'samples')}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(*parse_args())
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
