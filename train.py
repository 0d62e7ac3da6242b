"""
SiD-DiT training: distil a flow-matching teacher into a 1-K step generator, data-free (prompts only) or data-aided.

    python train.py --teacher tiny                                        # CPU, ~7 minutes on 2 cores
    torchrun --standalone --nproc_per_node=2 train.py --teacher tiny      # same run on 2 ranks (gloo)
    torchrun --standalone --nproc_per_node=8 train.py --teacher sana      # 8 GPUs (nccl), paper settings
    torchrun --standalone --nproc_per_node=8 train.py --teacher flux-dev --resolution 512 --dry_run   # memory plan
    python train.py --teacher tiny --out runs/tiny --resume               # continue runs/tiny/checkpoint exactly

One loop for every teacher. Each iteration draws one k in 1..K (the same on every rank), then
  1. fake-score update: regress the guided fake velocity onto eps - x_g for generator samples x_g;
  2. generator update:  SiD loss between the guided teacher and fake-score x0 predictions.
With --data, the fake score is also a discriminator between real latents and x_g (L_D in phase 1), and the
generator also gets its adversarial loss (L_adv in phase 2).

Setup, in order, so the peak memory is the larger of two phases, never their sum: real images (--data) go
through the VAE into a latent cache and every prompt and caption through the text encoders into a prompt cache,
both in the run folder; the encoders then leave the GPU. Then the three networks (frozen teacher, generator G,
fake score) are built on the meta device, sharded with FSDP2 (`fully_shard` per block) when there are several
ranks, and filled from the teacher's checkpoint, which only rank 0 reads (memory-mapped): each rank materialises
its own shards, and G and the fake score start as copies of the teacher without a whole copy anywhere.
Each sample of the global batch draws its prompt, noise and time from its own generator, seeded by (seed,
iteration, phase, index): 1 rank and N ranks, one round or several, see the same samples, and a resumed run
continues exactly (test_train.py). Checkpoints are sharded (torch.distributed.checkpoint), written to a temporary
folder and renamed; `generator.safetensors` (and `generator_ema.safetensors`) beside them is the student that
sample.py, eval.py and export.py read.

Flag defaults are the official SiD-DiT settings (apple/ml-sid-dit run_sid_dit.sh and README); a teacher may
override a few of them to fit its size (`Teacher.train_defaults`: the tiny teacher uses a CPU-sized batch, lr and
step count, a 1-kimg EMA, and a shorter data-aided warm-up).
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import sid
from data import PromptCache, mix_seed
from model import build_model, config_to_dict
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
    p.add_argument("--grad_checkpointing", type=int, default=1, help="activation checkpointing of every block of the "
                   "three networks (the teacher too: the G loss backpropagates through its input)")
    p.add_argument("--teacher_dtype", default=None, choices=["bf16", "fp32"], help="the frozen teacher's weights "
                   "(default: those of G, fp32 in amp as official); bf16 saves 2 bytes per teacher parameter and stays "
                   "within autocast's own error for SANA and SD3, not for FLUX, whose timestep is then rounded to bf16 "
                   "(README)")
    p.add_argument("--bf16_gather", type=int, default=0, help="amp under FSDP2: all-gather G's and the fake score's "
                   "fp32 weights as bf16 and reduce gradients in fp32 (MixedPrecisionPolicy) instead of autocast "
                   "casting them; halves the all-gather traffic")
    p.add_argument("--cpu_offload", type=int, default=0, help="FSDP2 CPUOffloadPolicy: sharded weights, gradients "
                   "and Adam states live in host memory, the optimizer steps on the CPU (needs torchrun)")
    p.add_argument("--ema_halflife_kimg", type=float, default=0.0,
                   help="half-life of an fp32 EMA of G, in thousands of generator samples; sample grids and "
                        "sample.py use it (0: no EMA, as the official FSDP code)")
    # run
    p.add_argument("--out", default=None, help="run folder (default runs/<teacher>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint exactly (any number of "
                   "ranks)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--sample_every", type=int, default=500, help="write sample grids every N steps (0: off)")
    p.add_argument("--ckpt_every", type=int, default=500, help="write the checkpoint every N steps and at the end "
                   "(0: never, for benchmarks)")
    p.add_argument("--n_samples", type=int, default=8, help="prompts in each sample grid")
    p.add_argument("--encode_batch", type=int, default=64, help="prompts per text-encoder call while caching them")
    p.add_argument("--dry_run", action="store_true", help="print the per-GPU memory plan of this run (parameters, "
                   "gradients, Adam, teacher, encoders, activations), whether it fits and what would make it fit; "
                   "then exit (0: fits, 1: does not)")
    p.add_argument("--gpu_gb", type=float, default=None, help="GPU memory for --dry_run (default: this GPU's, else 80)")
    return p


def parse_args(argv=None):
    """Flags, with the teacher's own defaults (Teacher.train_defaults) applied under the user's flags."""
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    # Rank 0 reads the teacher's weights (memory-mapped); the other ranks read its config and shapes only and get
    # their shards from rank 0 in main(): one host copy of the checkpoint per node, whatever the number of ranks.
    weights = "cpu" if int(os.environ.get("RANK", "0")) == 0 else "meta"
    teacher = load_teacher(pre.teacher, transformer=pre.transformer, max_sequence_length=pre.max_sequence_length,
                           transformer_device=weights, transformer_dtype=None)
    return args_for(teacher, argv), teacher


def args_for(teacher, argv=None):
    """The flags for `teacher`: its train_defaults under the user's flags, then the precision's lr and eps."""
    p = get_parser()
    p.set_defaults(**teacher.train_defaults)
    args = p.parse_args(argv)
    mode_lr, mode_eps = (1e-5, 1e-4) if args.precision == "bf16" else (1e-6, 1e-8)   # official README recipes
    args.lr = args.lr if args.lr is not None else mode_lr
    args.glr = args.glr if args.glr is not None else args.lr
    args.adam_eps = args.adam_eps if args.adam_eps is not None else mode_eps
    args.out = args.out or os.path.join("runs", os.path.basename(str(args.teacher).rstrip("/")))
    return args


# ----------------------------------------------------------------------------------------------
# Distributed helpers


def shard(model, **fsdp):
    """FSDP2: each of the family's units (its blocks) is gathered just in time, then the root holds the rest.
    FSDP2 hooks only `forward`; the root's other entry points (forward_with_features) are registered too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for unit in model.fsdp_units():
        fully_shard(unit, **fsdp)
    fully_shard(model, **fsdp)
    for name in model.fsdp_forward_methods:
        register_fsdp_forward_method(model, name)


def fill(net, source, device, init_device):
    """Materialise a meta-built network, sharded or not, from the teacher's state dict `source`: full tensors on
    rank 0, meta placeholders of the same shapes on the other ranks. Tensor by tensor, rank 0's copy goes to
    `device`, is scattered, and every rank keeps its shard (buffers are broadcast whole): no rank ever holds a
    whole network. init_device is where the shards live (the CPU under --cpu_offload)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    net.to_empty(device=init_device)
    with torch.no_grad():
        for name, p in net.state_dict(keep_vars=True).items():
            src = source[name]
            full = (torch.empty(src.shape, dtype=p.dtype, device=device) if src.is_meta
                    else src.to(device=device, dtype=p.dtype))
            if isinstance(p, DTensor):      # scatter from rank 0 (torch.distributed.tensor.distribute_tensor)
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
            else:
                if dist.is_initialized():
                    dist.broadcast(full, src=0)
                p.copy_(full)


def barrier():
    if dist.is_initialized():
        dist.barrier()


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


# ----------------------------------------------------------------------------------------------
# Checkpoints: sharded (torch.distributed.checkpoint), renamed into place; student files beside them


def init_adam(opt):
    """Adam's state as torch.optim.Adam creates it at its first step (step 0, zero moments), created now. Otherwise
    the checkpoint API (torch.distributed.checkpoint.state_dict) creates it with a zero-gradient step(), which leaves
    step = 1 and changes the next real update's bias correction: a save before G's first step (data-aided warm-up)
    would change the run."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def train_state(G, fake, opt_g, opt_f, ema):
    """Every rank's shards of what a resume needs: both networks, both Adam states, the EMA."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {"generator": get_model_state_dict(G), "fake": get_model_state_dict(fake),
             "opt_g": get_optimizer_state_dict(G, opt_g), "opt_f": get_optimizer_state_dict(fake, opt_f)}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    return state


def save_checkpoint(folder, G, fake, opt_g, opt_f, ema, info):
    """Each rank writes its shards into <folder>.tmp; rank 0 adds info.json (step, args, config, data position) and
    renames it to <folder>, the previous one moved to <folder>.old until then: a kill at any moment leaves a
    loadable checkpoint (find_checkpoint). Then the consolidated fp32 student files, gathered on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    master = not dist.is_initialized() or dist.get_rank() == 0
    tmp, old = folder + ".tmp", folder + ".old"
    if master and os.path.exists(tmp):
        shutil.rmtree(tmp)                             # what a killed save left
    barrier()
    dcp.save(train_state(G, fake, opt_g, opt_f, ema), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    barrier()
    if master:
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump(info, f)
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    # the student files sample.py, eval.py and export.py read: weights + config, no optimizer state
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    students = [("generator.safetensors", get_model_state_dict(G, options=opts), "generator")]
    if ema is not None:
        students.append(("generator_ema.safetensors", get_model_state_dict(ema, options=opts), "ema"))
    if master:
        run = os.path.dirname(folder)
        for name, weights, kind in students:
            save_student(os.path.join(run, name), weights, G.config, info["args"], info["step"], weights=kind)
    barrier()


def find_checkpoint(folder):
    """The last good checkpoint: <folder>, or <folder>.old when a save was killed between its two renames."""
    for path in (folder, folder + ".old"):
        if os.path.isfile(os.path.join(path, "info.json")):
            return path
    return None


def resume_error(folder, e):
    return ValueError(f"cannot resume from {folder}: {type(e).__name__}: {' '.join(str(e).split())[:200]}; it is "
                      f"corrupt or from another teacher/config; pick another --out or drop --resume")


def read_info(folder):
    """A checkpoint's info.json (step, args, config, data position), read before anything is built."""
    try:
        with open(os.path.join(folder, "info.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise resume_error(folder, e) from None


def load_checkpoint(folder, G, fake, opt_g, opt_f, ema):
    """Restore the shards of a checkpoint written on any number of ranks (DCP reshards them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    try:
        state = train_state(G, fake, opt_g, opt_f, ema)
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
        set_model_state_dict(G, state["generator"])
        set_model_state_dict(fake, state["fake"])
        set_optimizer_state_dict(G, opt_g, state["opt_g"])
        set_optimizer_state_dict(fake, opt_f, state["opt_f"])
        if ema is not None:
            set_model_state_dict(ema, state["ema"])
    except Exception as e:
        raise resume_error(folder, e) from None


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
    gb = world * micro                              # global samples per round
    shape = teacher.latent_shape(args.resolution)   # (C, h, w); errors name a valid resolution
    if (args.cpu_offload or args.bf16_gather) and not distributed:
        raise ValueError("--cpu_offload / --bf16_gather are FSDP2 options: launch with torchrun (--nproc_per_node=1 "
                         "works too)")
    if args.bf16_gather and args.precision != "amp":
        raise ValueError("--bf16_gather replaces amp's autocast of fp32 weights; use it with --precision amp")
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
    ckpt_dir = os.path.join(args.out, "checkpoint")
    found = find_checkpoint(ckpt_dir)
    if args.resume and found is None:
        raise FileNotFoundError(f"--resume: {ckpt_dir} holds no checkpoint; start without --resume or fix --out")
    if not args.resume and found is not None:
        raise ValueError(f"{found} exists; pass --resume to continue it or choose another --out "
                         f"(a run never overwrites another run's checkpoint)")
    info = read_info(found) if args.resume else None
    if master:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    barrier()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "amp" else nullcontext())

    # Setup real data (data-aided SiD only): latents encoded once by the teacher's VAE into the run folder (a KL
    # VAE samples its posterior, seeded per rank, as the official data path); each rank reads a disjoint slice.
    data = None
    if args.data:
        from data import open_data
        vae_g = torch.Generator().manual_seed(mix_seed(args.seed, rank))
        data = open_data(args.data, teacher.vae_factor * shape[-1], lambda img: teacher.encode(img, generator=vae_g),
                         os.path.join(args.out, "latents"), args.seed, rank, world, barrier=barrier,
                         cache_tag=f"{teacher.name} seed {args.seed}")

    # Setup prompts: every text the run encodes (its prompts, the real captions, the CFG negative "") goes once
    # through the teacher's text encoders into <out>/prompt_cache, each rank its share; batches read it back.
    # The official code re-encodes every step with the encoders resident; here they leave the GPU after this.
    cache = PromptCache(os.path.join(args.out, "prompt_cache"), tag=json.dumps([str(args.teacher),
                                                                                args.max_sequence_length]))

    def encode_texts(texts, negative):
        with autocast:
            return teacher.encode_prompts(texts, negative=negative)

    texts = prompts + (data.captions if data is not None else [])
    nbytes = cache.fill(texts, encode_texts, rank, world, barrier, args.encode_batch)
    cache.fill([""], encode_texts, rank, world, barrier, negative=True)      # the CFG negative, as its pipeline
    for module in teacher.text_encoders:
        module.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def on_device(v):   # features in the networks' dtype; masks keep theirs
        return v.to(device, dtype if v.is_floating_point() else v.dtype)

    def encode(texts):
        return {k: on_device(v) for k, v in cache.get(texts).items()}

    uncond = {k: on_device(v.expand(micro, *v.shape[1:])) for k, v in cache.get([""], negative=True).items()}

    # Setup the three networks: built on the meta device (no memory, no random init), sharded, then filled from
    # the teacher's checkpoint, which rank 0 alone holds; G and the fake score start as copies of the teacher.
    cfg = teacher.transformer.config
    teacher_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: dtype}[args.teacher_dtype]

    def build(net_dtype):
        with torch.device("meta"):
            return build_model(cfg).to(net_dtype)

    real, G, fake = build(teacher_dtype), build(dtype), build(dtype)
    # EMA of G, for sampling only. fp32 even in pure bf16: a bf16 EMA cannot move by less than 1/256 per step.
    ema = build(torch.float32) if args.ema_halflife_kimg > 0 else None
    ema_beta = 0.5 ** (args.batch / (1000 * args.ema_halflife_kimg)) if ema is not None else None
    nets = [real, G, fake] + ([ema] if ema is not None else [])
    for net in (real, G, fake):   # the teacher too: the G loss backpropagates through its input
        net.gradient_checkpointing = bool(args.grad_checkpointing)
    init_device = torch.device("cpu") if args.cpu_offload else device
    if distributed:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
        fsdp = dict(offload_policy=CPUOffloadPolicy()) if args.cpu_offload else {}
        for net in nets:
            bf16_gather = args.bf16_gather and net in (G, fake)
            shard(net, **fsdp, **(dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                      reduce_dtype=torch.float32))
                                   if bf16_gather else {}))
    source = teacher.transformer.state_dict()       # rank 0: the checkpoint (memory-mapped); others: shapes only
    for net in nets:
        fill(net, source, device, init_device)
    del source
    teacher.transformer.to("meta")                  # the host copy is no longer needed
    real.eval().requires_grad_(False)
    G.train().requires_grad_(True)
    fake.train().requires_grad_(True)
    if ema is not None:
        ema.eval().requires_grad_(False)
    adam = dict(betas=(0.0, 0.999), eps=args.adam_eps)   # official: no first-moment momentum
    opt_g = torch.optim.Adam(G.parameters(), lr=args.glr, **adam)
    opt_f = torch.optim.Adam(fake.parameters(), lr=args.lr, **adam)
    init_adam(opt_g)
    init_adam(opt_f)
    # guidance: true CFG for every teacher; one that embeds the scale (FLUX.1-dev) also gets it as an input
    # (--embedded_guidance), and then so does G, fed 1.0. The teacher states the capability; no family is named.
    embedded = args.embedded_guidance if teacher.embeds_guidance else None

    def g_inputs(cond):
        return sid.generator_inputs(cond, teacher.embeds_guidance)

    # Setup randomness: sample n of an iteration's global batch (n = round * world * micro + rank * micro + j)
    # draws its prompt, z, eps, t and fresh step noise from its own generator, seeded by (seed, step, phase, n).
    def draw(step, phase, r):
        gens = [torch.Generator().manual_seed(mix_seed(args.seed, step, phase, r * gb + rank * micro + j))
                for j in range(micro)]
        idx = [int(torch.randint(len(prompts), (1,), generator=gen)) for gen in gens]
        z = torch.stack([torch.randn(shape, generator=gen) for gen in gens]).to(device)
        eps = torch.stack([torch.randn(shape, generator=gen) for gen in gens]).to(device)
        t = torch.cat([sid.sample_t(1, args.t_law, args.t_mean, args.t_std, generator=gen) for gen in gens])

        def randn(like):   # the 'fresh' noise of generator steps 2..k, from the same generators
            return torch.stack([torch.randn(like.shape[1:], generator=gen) for gen in gens]).to(like)

        return encode([prompts[i] for i in idx]), z, eps, t.to(device), randn

    grid_prompts = prompts[::max(1, len(prompts) // args.n_samples)][:args.n_samples]
    grid_z = torch.randn((len(grid_prompts), *shape), generator=torch.Generator().manual_seed(args.seed + 1))

    step, metrics_path = 0, os.path.join(args.out, "metrics.jsonl")
    if args.resume:
        load_checkpoint(found, G, fake, opt_g, opt_f, ema)
        step = info["step"]
        if master and os.path.isfile(metrics_path):     # drop what a killed run logged after its last checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= step]
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(metrics_path + ".tmp", metrics_path)
        if data is not None:
            data.load_state_dict(info["data"])
        log(f"resumed {found} at step {step}")
    last_good = f"{ckpt_dir} (step {step})" if args.resume else "none yet"

    def write_samples(tag):
        net = ema if ema is not None else G.eval()
        steps = sorted({1, args.num_steps})
        with autocast:
            rows = [teacher.decode(student_sample(net, grid_z.to(device), encode(grid_prompts), k, args.num_steps,
                                                  args.t_init, args.noise, args.seed)) for k in steps]
        G.train()
        if master:
            labels = [student_label(k, "student (EMA)" if ema is not None else "student") for k in steps]
            save_grid(rows, labels, grid_prompts, os.path.join(args.out, "samples", f"{tag}.png"),
                      scale=max(1, 128 // rows[0].shape[-1]))

    def checkpoint_now():
        meta = dict(step=step, args=vars(args), config=config_to_dict(G.config))
        if data is not None:
            meta["data"] = data.state_dict()
        save_checkpoint(ckpt_dir, G, fake, opt_g, opt_f, ema, meta)
        return f"{ckpt_dir} (step {step})"

    log(f"SiD-DiT: teacher {args.teacher} ({sum(p.numel() for p in real.parameters()) / 1e6:.1f} M params, "
        f"{str(teacher_dtype)[6:]}), latent {tuple(shape)}, {len(prompts)} prompts ({nbytes / 2**20:.2f} MB each in "
        f"the prompt cache), {world} rank(s) x {rounds} round(s) x {micro} = batch {args.batch}, {args.precision}, "
        f"device {device}" + (f", embedded guidance {embedded}" if embedded else ""))
    if master:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    def clock():   # wall time after the device's queued work: per-phase times and the benchmark (bench.py)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True, file=sys.stdout)
    while step < args.max_steps:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = clock()
        k = 1 + int(torch.randint(args.num_steps, (1,), generator=torch.Generator().manual_seed(
            mix_seed(args.seed, step, 2))))                                # same k on every rank and phase

        # ---- 1. Fake-score update: flow matching on generator samples (G frozen) ----
        G.requires_grad_(False)
        fake.requires_grad_(True)
        opt_f.zero_grad(set_to_none=True)
        loss_f, gan = 0.0, dict(loss_d=0.0, acc_real=0.0, acc_fake=0.0, loss_sid=0.0, loss_adv=0.0)
        for r in range(rounds):
            cond, z, eps, t, randn = draw(step, 0, r)
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
            cond, z, eps, t, randn = draw(step, 1, r)
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
            if ema is not None:     # ema <- beta ema + (1 - beta) G, shard by shard under FSDP2
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), G.parameters()):
                        e.lerp_(p.to(e.dtype), 1 - ema_beta)
        else:
            loss_g = gnorm_g = float("nan")                 # logged as NaN while G waits (data-aided warm-up)
            if distributed:     # no backward re-shards G's root after the fake phase's no-grad sampling: do it here
                G.reshard()
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
