"""
Speed and memory of SiD-DiT training at full size with random weights, and the memory plan of `train.py --dry_run`.

    python bench.py --preset sd3.5-medium --resolution 512 --micro_batch 4           # GPU: one model, ours
    python bench.py --preset sd3.5-medium --resolution 512 --micro_batch 4 --modules both   # + diffusers' classes
    python bench.py --preset sd3-small --resolution 256 --micro_batch 2 --modules both --repeats 3   # CPU
    python bench.py --plan --gpus 8                                                  # dry-run arithmetic, every preset
    python bench.py --flops 512 1024                                                 # model FLOPs, every preset

What runs is train.main itself, the one training loop, on a Teacher of random weights: no downloads, no text
encoders (each prompt gets fixed random features of its family's shapes: TEXT_INPUTS) and no VAE. It times
--steps iterations after --warmup ones and prints, per iteration: the fake-score and generator phase times,
images/s, the model FLOPs (FlopCounterMode on one sample of each network pass, times the passes the loop makes:
`iteration_flops`), achieved TFLOP/s and MFU against the GPU's peak, and peak memory (CUDA max_memory_allocated;
on the CPU, with --cpu_memory, the peak of live tensor bytes, LiveBytes). `--modules diffusers` runs the same loop with diffusers'
transformer classes in place of ours (DiffusersNet, same conventions; diffusers is a benchmark-only import here,
as in the tests), and `both` alternates the two (--repeats times; the median run is shown) and prints the ratio.

`preflight` is train.py's --dry_run: the per-GPU memory of a run from arithmetic on the sharded parameters,
gradients and Adam states, plus activations measured by running this loop on reduced-depth copies (1 and 2 blocks)
of the teacher at the run's micro-batch and resolution, extrapolated linearly in depth (a subprocess, so that a
torchrun rank measures alone). test_bench.py checks it against a measured full-depth peak within 15%, and the
FLOP count against FlopCounterMode wrapped around a whole iteration.
"""

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import weakref
import zlib
from unittest import mock
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import train
from model import FLUX_CONFIGS, SANA_CONFIGS, SD3_CONFIGS, FluxConfig, SanaConfig, SD3Config, build_model, \
    config_from_dict, config_to_dict, patchify, unpatchify
from teacher_loaders import Teacher

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------
# Presets: the real models, and small configs of each family for the CPU

PRESETS = {
    "sana-600m": SANA_CONFIGS["Sana_600M_512px"], "sana-1.6b": SANA_CONFIGS["Sana_1600M_512px"],
    "sd3-medium": SD3_CONFIGS["SD3-Medium"], "sd3.5-medium": SD3_CONFIGS["SD3.5-Medium"],
    "sd3.5-large": SD3_CONFIGS["SD3.5-Large"], "flux-dev": FLUX_CONFIGS["FLUX.1-dev"],
    # CPU: the families' blocks at small width and depth
    "sana-small": SanaConfig(num_heads=8, head_dim=32, depth=4, cross_heads=4, cross_head_dim=64, caption_channels=256),
    "sd3-small": SD3Config(depth=4, num_heads=4, head_dim=64, joint_attention_dim=256, pooled_projection_dim=128,
                           pos_embed_max_size=64, qk_norm=True, dual_attention_layers=(0, 1)),
    "flux-small": FluxConfig(depth=2, depth_single=4, num_heads=4, head_dim=64, axes_dims_rope=(8, 28, 28),
                             joint_attention_dim=256, pooled_projection_dim=128),
}
PRESETS.update({name.lower(): cfg for name, cfg in {**SANA_CONFIGS, **SD3_CONFIGS, **FLUX_CONFIGS}.items()
                if name != "tiny"})

# What each family's pipeline feeds its transformer (train.py caches these per prompt), the pixels per latent
# pixel of its VAE, and its encoders' and VAE's parameter counts (for --plan; a real teacher reports its own).
TEXT_INPUTS = {
    SanaConfig: dict(tokens=300, mask=True, vae_factor=32,            # Gemma-2-2B, 300 tokens with a mask; DC-AE
                     encoder_params=2.614e9, vae_params=312.3e6),
    SD3Config: dict(tokens=77 + 77, pooled=True, vae_factor=8,        # CLIP-L+G 77, T5 77 (official SiD-DiT)
                    encoder_params=123.1e6 + 694.7e6 + 4.762e9, vae_params=83.8e6),
    FluxConfig: dict(tokens=512, pooled=True, vae_factor=8,           # T5-XXL 512 tokens, CLIP-L pooled
                     encoder_params=123.1e6 + 4.762e9, vae_params=83.8e6),
}

# Dense peak TFLOP/s (bf16 tensor cores, fp32 without TF32: train.py turns TF32 off) for the MFU column
PEAK_TFLOPS = {"H100": (989.4, 66.9), "H200": (989.4, 66.9), "H800": (989.4, 66.9), "A100": (312.0, 19.5)}

# the depth fields of each family's config, per unit of depth (FLUX: 1 double-stream + 2 single-stream blocks)
DEPTH = {SanaConfig: dict(depth=1), SD3Config: dict(depth=1), FluxConfig: dict(depth=1, depth_single=2)}


def text_features(cfg):
    """{name: (per-prompt shape, is_mask)} of the prompt features a `cfg` transformer takes."""
    spec = TEXT_INPUTS[type(cfg)]
    width = getattr(cfg, "caption_channels", None) or cfg.joint_attention_dim
    feats = {"text": ((spec["tokens"], width), False)}
    if spec.get("mask"):
        feats["text_mask"] = ((spec["tokens"],), True)
    if spec.get("pooled"):
        feats["pooled"] = ((cfg.pooled_projection_dim,), False)
    return feats


def reduced(cfg, m):
    """`cfg` with m units of depth (SD3.5-Medium keeps dual attention in its first blocks, as the release)."""
    out = replace(cfg, **{k: m * v for k, v in DEPTH[type(cfg)].items()})
    if getattr(cfg, "dual_attention_layers", ()):
        out = replace(out, dual_attention_layers=tuple(range(m)))
    return out


# ----------------------------------------------------------------------------------------------
# diffusers' transformer classes behind our module contract (benchmark only)


class DiffusersNet(torch.nn.Module):
    """diffusers' SanaTransformer2DModel / SD3Transformer2DModel / FluxTransformer2DModel for our config, called
    as our modules are: v = net(x (B, C, H, W), t in [0, 1], text, text_mask, pooled, guidance). The x1000 time
    factor and FLUX's 2x2 packing happen here, as the pipelines do them (test_bench.py checks it equals ours)."""
    fsdp_forward_methods = ()

    def __init__(self, cfg):
        super().__init__()
        import diffusers
        from export import diffusers_config
        d = dict(diffusers_config(cfg, "bench"))
        self.config = cfg
        self.inner = getattr(diffusers, d.pop("_class_name")).from_config(d)

    @property
    def gradient_checkpointing(self):
        return self.inner.is_gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on):
        self.inner.enable_gradient_checkpointing() if on else self.inner.disable_gradient_checkpointing()

    def fsdp_units(self):
        return [*self.inner.transformer_blocks, *getattr(self.inner, "single_transformer_blocks", [])]

    def forward(self, x, t, text, text_mask=None, pooled=None, guidance=None):
        cfg = self.config
        if isinstance(cfg, SanaConfig):      # SanaPipeline: timestep = 1000 sigma
            return self.inner(x, text, t * cfg.time_scale, encoder_attention_mask=text_mask, return_dict=False)[0]
        if isinstance(cfg, SD3Config):       # StableDiffusion3Pipeline: timestep = 1000 sigma
            return self.inner(x, text, pooled, t * cfg.time_scale, return_dict=False)[0]
        # FluxPipeline: pack 2x2 patches (channel-major per token), ids (0, row, col); the model scales t, g by 1000
        B, C, H, W = x.shape
        packed = patchify(x, 2)                                                    # (B, N, 4C)
        ids = torch.zeros(H // 2, W // 2, 3, device=x.device, dtype=x.dtype)
        ids[..., 1] = torch.arange(H // 2, device=x.device)[:, None]
        ids[..., 2] = torch.arange(W // 2, device=x.device)[None, :]
        out = self.inner(packed, text, pooled, t, ids.reshape(-1, 3), text.new_zeros(text.shape[1], 3),
                         guidance=guidance, return_dict=False)[0]                  # (B, N, 4C)
        return unpatchify(out, H // 2, W // 2, 2, "cpq")


def build(cfg, modules="ours"):
    return build_model(cfg) if modules == "ours" else DiffusersNet(cfg)


# ----------------------------------------------------------------------------------------------
# A teacher of random weights


def random_teacher(cfg, modules="ours", features=None, vae_factor=None, seed=0, n_prompts=16, weights=True):
    """A Teacher whose transformer (ours or diffusers') has random weights N(0, 0.02^2), made on the CPU (the
    source train.py fills its sharded networks from), and whose prompts map to fixed random features.
    weights=False: the transformer stays on the meta device (shapes and counts only: --plan, --flops)."""
    features = features or text_features(cfg)
    with torch.device("meta"):
        net = build(cfg, modules)
    if weights:
        net.to_empty(device="cpu")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.state_dict(keep_vars=True).values():
                if p.is_floating_point():
                    p.normal_(0.0, 0.02, generator=g)
    net.eval().requires_grad_(False)

    def encode_prompts(prompts, negative=False):
        out = {}
        for name, (shape, is_mask) in features.items():
            gens = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
            out[name] = torch.stack([torch.ones(shape, dtype=torch.long) if is_mask else torch.randn(shape, generator=q)
                                     for q in gens])
        return out

    factor = vae_factor or TEXT_INPUTS[type(cfg)]["vae_factor"]

    def no_codec(x, generator=None):
        raise ValueError("a random-weights teacher has no VAE: bench.py runs data-free SiD with --sample_every 0")

    return Teacher(name=f"random {type(cfg).__name__}", transformer=net, encode_prompts=encode_prompts,
                   encode=no_codec, decode=no_codec, latent_channels=cfg.in_channels, vae_factor=factor,
                   resolution=512, scheduler={}, sample_steps=1, guidance=1.0,
                   embeds_guidance=bool(getattr(cfg, "guidance_embeds", False)),
                   default_prompts=[f"prompt {i}" for i in range(n_prompts)])


# ----------------------------------------------------------------------------------------------
# Measuring: live tensor bytes on the CPU, the loop itself, FLOPs


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops make while it is active, each counted until it is freed: the CPU
    analogue of CUDA's max_memory_allocated (the CPU allocator keeps no statistics). Counts a storage once, however
    many views it has; storages made before it started count only if an op returns a view of them."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                if id(s) not in self.live:
                    self.live[id(s)] = s.nbytes()
                    self.now += s.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(s, self._free, id(s))
        return out

    def _free(self, key):
        self.now -= self.live.pop(key)


def run_loop(teacher, argv, modules="ours", track=True):
    """train.main on `teacher` with flags `argv`, one process, in a temporary folder, data-free, no sample grids
    or checkpoints. -> (metrics of each iteration, peak bytes on the device over the whole run).
    modules="diffusers": train.main builds its three networks as DiffusersNet (the one line patched here).
    track=False on the CPU: no LiveBytes (its per-op Python hook slows the loop), peak None."""
    if "RANK" in os.environ:
        raise ValueError("bench.py measures one process; for multi-GPU figures run train.py under torchrun and read "
                         "<out>/metrics.jsonl (sec_fake, sec_gen, img_per_s, peak_gb)")
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        args = train.args_for(teacher, [*argv, "--out", out, "--sample_every", "0", "--ckpt_every", "0"])
        tracker = LiveBytes() if track and not cuda else contextlib.nullcontext()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        log = io.StringIO()
        builder = contextlib.nullcontext() if modules == "ours" else mock.patch.object(train, "build_model", DiffusersNet)
        try:
            with contextlib.redirect_stdout(log), builder, tracker:
                train.main(args, teacher)
        except Exception:
            print(log.getvalue(), file=sys.stderr)
            raise
        peak = torch.cuda.max_memory_allocated() if cuda else (tracker.peak if track else None)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f], peak


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None):
    """A convolution's backward: one forward-sized convolution per gradient asked for (input, weight). torch 2.13's
    own formula ignores `groups`, counting SANA's depthwise 3x3 convs as dense: 66x its real cost for
    a 64-channel one, and 3x the whole SANA iteration (test_bench.py checks this formula)."""
    from torch.utils.flop_counter import conv_flop_count
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
    """Attention forward: q k^T and p v, 2 N L d multiply-adds each, per batch and head (as the math path counts)."""
    return 2 * 2 * math.prod(q[:-1]) * k[-2] * q[-1]


def sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return 2 * sdpa_flops(q, k, v)       # dq, dk, dp, dv: twice the forward, as the math path's bmm backward


def flop_counter():
    """FlopCounterMode with two formulas it lacks or gets wrong in torch 2.13: grouped convolutions' backward, and the
    CPU's fused attention kernel (counted as nothing; meta tensors take the math path, whose bmms it counts)."""
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten.convolution_backward: conv_backward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flops})


def pass_flops(cfg, features, latent, modules="ours"):
    """FLOPs of one sample through a `cfg` network (FlopCounterMode on meta tensors: matmuls, convolutions and
    attention, from their shapes): forward; backward for the weights (the input needs no gradient); backward for
    the input only (frozen weights, as the teacher and the fake score in the generator phase)."""
    with torch.device("meta"):
        net = build(cfg, modules)
        x = torch.randn(1, *latent)
        cond = {k: (torch.ones((1, *s), dtype=torch.long) if m else torch.randn(1, *s)) for k, (s, m) in features.items()}
        if getattr(cfg, "guidance_embeds", False):
            cond["guidance"] = torch.ones(1)
        t = torch.rand(1)

    def count(weights, inputs):
        net.requires_grad_(weights)
        xi = x.clone().requires_grad_(inputs)
        with flop_counter() as fc:
            with torch.set_grad_enabled(weights or inputs):
                out = net(xi, t, **cond)
            fwd = fc.get_total_flops()
            if weights or inputs:
                out.float().sum().backward()
        return fwd, fc.get_total_flops() - fwd

    fwd, _ = count(False, False)
    return dict(fwd=fwd, bwd_weights=count(True, False)[1], bwd_input=count(False, True)[1])


def cfg_factor(scale, teacher_embeds, embedded_guidance):
    """Samples per network call under CFG: 2 (one batched [uncond; cond] call) unless kappa is 0 or 1 or the
    guidance is embedded only (sid.guidance_inputs)."""
    return 1 if scale in (0, 1) or (teacher_embeds and embedded_guidance == "only") else 2


def iteration_flops(f, args, k, micro, rounds=1, embeds=False):
    """Model FLOPs of one SiD iteration on one rank, from pass_flops `f` (activation checkpointing's recomputation
    is not counted: MFU, not HFU). With c = cfg_factor of each scale and b the micro-batch, per round:
        fake phase       b [k fwd(G) + c1 (fwd + bwd_weights)(fake)]
        generator phase  b [k fwd(G) + bwd_weights(G) + c4 (fwd + bwd_input)(teacher) + c2 (fwd + bwd_input)(fake)]
    Only G's k-th call builds a graph (sid.generate)."""
    c1, c2, c4 = (cfg_factor(s, embeds, args.embedded_guidance)
                  for s in (args.cfg_train_fake, args.cfg_eval_fake, args.cfg_eval_real))
    fake = k * f["fwd"] + c1 * (f["fwd"] + f["bwd_weights"])
    gen = k * f["fwd"] + f["bwd_weights"] + (c4 + c2) * (f["fwd"] + f["bwd_input"])
    return rounds * micro * fake, rounds * micro * gen


# ----------------------------------------------------------------------------------------------
# Preflight (train.py --dry_run)

GB = 2**30


def nbytes(dtype):
    return torch.empty((), dtype=dtype).element_size()


def param_count(module):
    return sum(p.numel() for p in module.parameters())


def static_bytes(P, precision, teacher_dtype, ema, world=1, offload=False):
    """{part: bytes per rank} of the three networks' weights, G's and the fake score's gradients and Adam
    moments (their parameters' dtype: fp32 in amp and fp32, bf16 in pure bf16), and the fp32 EMA; FSDP2 shards
    every one of them over the ranks; --cpu_offload keeps them in host memory."""
    b = nbytes(torch.bfloat16 if precision == "bf16" else torch.float32)
    parts = {"teacher weights": P * nbytes(teacher_dtype), "G + fake score weights": 2 * P * b,
             "G + fake score gradients": 2 * P * b, "G + fake score Adam moments (2 each)": 4 * P * b}
    if ema:
        parts["EMA of G (fp32)"] = 4 * P
    return {k: (0 if offload else v / world) for k, v in parts.items()}


def buffer_bytes(net, args):
    """Bytes of the networks' buffers (SD3's sin-cos table): FSDP2 shards parameters only, so every rank holds the
    teacher's, G's, the fake score's and the EMA's whole."""
    dtype, teacher_dtype = run_dtypes(args)
    n = sum(b.numel() for b in net.buffers())
    return n * (nbytes(teacher_dtype) + 2 * nbytes(dtype) + (4 if args.ema_halflife_kimg > 0 else 0))


def run_dtypes(args):
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    return dtype, {"bf16": torch.bfloat16, "fp32": torch.float32, None: dtype}[args.teacher_dtype]


def measure_argv(args, micro, resolution):
    """The flags of the reduced-depth measurement: this run's memory-relevant settings, one rank, one round."""
    argv = ["--teacher", "random", "--batch", str(micro), "--micro_batch", str(micro), "--max_steps", "1",
            "--precision", args.precision, "--grad_checkpointing", str(args.grad_checkpointing),
            "--num_steps", str(args.num_steps), "--cfg_train_fake", str(args.cfg_train_fake),
            "--cfg_eval_fake", str(args.cfg_eval_fake), "--cfg_eval_real", str(args.cfg_eval_real),
            "--embedded_guidance", args.embedded_guidance, "--ema_halflife_kimg", str(args.ema_halflife_kimg),
            "--resolution", str(resolution)]
    if args.teacher_dtype:
        argv += ["--teacher_dtype", args.teacher_dtype]
    return argv


def measure_activations(spec):
    """Run the loop at 1 and 2 units of depth; -> {m: peak bytes minus that copy's weights, gradients, Adam}.
    spec: config (dict), features, vae_factor, argv (measure_argv), in a JSON-able dict."""
    cfg = config_from_dict(spec["config"])
    features = {k: (tuple(s), m) for k, (s, m) in spec["features"].items()}
    args = train.get_parser().parse_args(spec["argv"])
    _, teacher_dtype = run_dtypes(args)
    out = {}
    for m in (1, 2):
        teacher = random_teacher(reduced(cfg, m), features=features, vae_factor=spec["vae_factor"])
        P = param_count(teacher.transformer)
        fixed = sum(static_bytes(P, args.precision, teacher_dtype, args.ema_halflife_kimg > 0).values()) + \
            buffer_bytes(teacher.transformer, args)
        _, peak = run_loop(teacher, spec["argv"])
        out[m] = peak - fixed
    return out


def measure_in_subprocess(spec):
    """measure_activations in a fresh single-process python (a torchrun rank keeps its process group; CUDA peak
    statistics start clean), on this rank's GPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                              "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = str(torch.cuda.current_device())
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        done = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--measure", f.name], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the activation measurement failed:\n{done.stderr[-3000:]}")
        with open(f.name) as g:
            return {int(k): v for k, v in json.load(g)["activations"].items()}
    finally:
        os.remove(f.name)


def memory_plan(args, teacher, world, micro, activations=None, encoder_bytes=None, vae_bytes=None):
    """-> ({part: bytes per GPU while training}, bytes of the text encoders + VAE while prompts are cached).

    Arithmetic: the sharded weights, gradients, Adam moments and EMA (static_bytes); the replicated buffers; FSDP2's gathered blocks (the
    largest unit of each network, twice for prefetch, plus the roots) on several ranks; the VAE. Measured: the
    activations of both phases at the run's micro-batch, resolution and precision, on 1- and 2-unit-deep copies of
    the teacher, extrapolated linearly in depth (activations: {1: bytes, 2: bytes} to skip the measurement)."""
    cfg = teacher.transformer.config
    P = param_count(teacher.transformer)
    dtype, teacher_dtype = run_dtypes(args)       # dtype: the gathers' width below
    if activations is None:
        probe = teacher.encode_prompts([""])
        features = {k: (list(v.shape[1:]), not v.is_floating_point()) for k, v in probe.items()}
        argv = measure_argv(args, micro, args.resolution or teacher.resolution)
        activations = measure_in_subprocess(dict(config=config_to_dict(cfg), features=features,
                                                 vae_factor=teacher.vae_factor, argv=argv))
    M = cfg.depth                                 # units of depth (DEPTH: FLUX's unit is 1 double + 2 single)
    parts = static_bytes(P, args.precision, teacher_dtype, args.ema_halflife_kimg > 0, world, args.cpu_offload)
    parts["buffers, replicated (e.g. SD3's sin-cos table)"] = buffer_bytes(teacher.transformer, args)
    if world > 1:     # just-in-time gathers: two units of the network at work (prefetch) plus every root
        units = teacher.transformer.fsdp_units()
        unit = max(param_count(u) for u in units)
        root = P - sum(param_count(u) for u in units)
        gather = nbytes(torch.bfloat16 if args.bf16_gather else dtype)
        parts["FSDP2 gathered blocks (2 units + 3 roots)"] = 2 * unit * gather + 3 * root * gather
    vae = vae_bytes if vae_bytes is not None else (
        sum(p.numel() * p.element_size() for p in teacher.vae.parameters()) if teacher.vae is not None else 0)
    parts["VAE (sample grids, --data)"] = vae
    parts[f"activations, both phases (measured at 1-2 of {M} units, micro-batch {micro})"] = \
        activations[1] + (M - 1) * (activations[2] - activations[1])
    enc = encoder_bytes if encoder_bytes is not None else sum(
        p.numel() * p.element_size() for m in teacher.text_encoders for p in m.parameters())
    return parts, enc + vae


def preflight(args, teacher, world, micro, activations=None, gpu_gb=None):
    """train.py --dry_run: the per-GPU memory plan of this run on `world` ranks (memory_plan), whether it fits the
    GPU, and which single flag would make it fit. -> (report text, fits)."""
    parts, caching = memory_plan(args, teacher, world, micro, activations)
    P = param_count(teacher.transformer)
    _, teacher_dtype = run_dtypes(args)
    total = sum(parts.values())
    gpu_gb = gpu_gb or args.gpu_gb or (torch.cuda.get_device_properties(0).total_memory / GB
                                        if torch.cuda.is_available() else 80.0)
    budget = 0.92 * gpu_gb * GB         # CUDA context, NCCL buffers and allocator fragmentation take the rest
    fits = total <= budget and caching <= budget
    lines = [f"dry run: {args.teacher} ({P / 1e9:.2f} B params, {str(teacher_dtype)[6:]} teacher), latent "
             f"{tuple(teacher.latent_shape(args.resolution))}, {world} rank(s), micro-batch {micro}, "
             f"{args.precision}, grad checkpointing {args.grad_checkpointing}" +
             (", CPU offload" if args.cpu_offload else ""), f"{'per-GPU memory':<70} {'GB':>8}"]
    lines += [f"  {k:<68} {v / GB:8.3f}" for k, v in parts.items()]
    lines += [f"  {'total while training':<68} {total / GB:8.3f}",
              f"  {'while caching prompts: text encoders + VAE (the encoders then leave)':<68} {caching / GB:8.3f}",
              f"budget {budget / GB:.1f} GB (92% of {gpu_gb:.0f} GB): " + ("fits" if fits else "does NOT fit")]
    if not fits:
        act = next(v for k, v in parts.items() if k.startswith("activations"))
        lines += ["would fit with:"] + (suggestions(args, P, teacher_dtype, world, micro, act, parts, budget) or
                                        ["  no single flag: combine them, or lower --resolution"])
    return "\n".join(lines), fits


def suggestions(args, P, teacher_dtype, world, micro, act, parts, budget):
    """Single-flag changes that bring the estimate under budget (activations taken as proportional to the
    micro-batch; pure bf16 halves the static parts and keeps the measured activations)."""
    fixed = sum(v for k, v in parts.items() if not k.startswith("activations"))
    static = sum(static_bytes(P, args.precision, teacher_dtype, args.ema_halflife_kimg > 0, world,
                              args.cpu_offload).values())
    out = []
    for m in [m for m in range(micro - 1, 0, -1) if micro % m == 0]:
        if fixed + act * m / micro <= budget:
            out.append(f"  --micro_batch {m} (gradient accumulation keeps --batch {args.batch}): "
                       f"{(fixed + act * m / micro) / GB:.1f} GB")
            break
    if not args.grad_checkpointing:
        out.append("  --grad_checkpointing 1 (each block keeps only its inputs): rerun --dry_run to measure it")
    if args.precision != "bf16":
        bf16 = sum(static_bytes(P, "bf16", torch.bfloat16, False, world, args.cpu_offload).values())
        if fixed - static + bf16 + act <= budget:
            out.append(f"  --precision bf16 (bf16 weights and Adam, lr 1e-5, eps 1e-4): "
                       f"{(fixed - static + bf16 + act) / GB:.1f} GB")
    for w in (8, 16, 32, 64, 128, 256):
        if w > world and fixed - static + static * world / w + act <= budget:
            out.append(f"  {w} GPUs (--nnodes {math.ceil(w / 8)} --nproc_per_node 8): "
                       f"{(fixed - static + static * world / w + act) / GB:.1f} GB")
            break
    if not args.cpu_offload and fixed - static + act <= budget:
        out.append(f"  --cpu_offload 1 (shards, gradients and Adam in host memory; slower): "
                   f"{(fixed - static + act) / GB:.1f} GB")
    return out


# ----------------------------------------------------------------------------------------------
# The benchmark


def gpu_peak_tflops(precision):
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, fp32) in PEAK_TFLOPS.items():
        if key in name:
            return fp32 if precision == "fp32" else bf16
    return None


def bench(cfg, modules, args):
    """Time the loop on a random teacher of `cfg`; -> a dict of per-iteration means over the timed steps."""
    teacher = random_teacher(cfg, modules)
    argv = ["--teacher", "random", "--batch", str(args.micro_batch), "--micro_batch", str(args.micro_batch),
            "--max_steps", str(args.warmup + args.steps), "--precision", args.precision,
            "--grad_checkpointing", str(args.grad_checkpointing), "--resolution", str(args.resolution)]
    targs = train.args_for(teacher, argv)
    shape = teacher.latent_shape(args.resolution)
    f = pass_flops(cfg, text_features(cfg), shape, "ours")      # the same model FLOPs for both module sets
    metrics, peak = run_loop(teacher, argv, modules, track=False)
    if peak is None and args.cpu_memory:    # the CPU's peak from one more, tracked, iteration
        peak = run_loop(random_teacher(cfg, modules), [*argv, "--max_steps", "1"], modules)[1]
    timed = metrics[args.warmup:]
    flops = [sum(iteration_flops(f, targs, r["k"], args.micro_batch, embeds=teacher.embeds_guidance)) for r in timed]
    sec = sum(r["sec"] for r in timed)
    peak_tf = gpu_peak_tflops(args.precision)
    return dict(modules=modules, sec=sec / len(timed), sec_fake=sum(r["sec_fake"] for r in timed) / len(timed),
                sec_gen=sum(r["sec_gen"] for r in timed) / len(timed), img_per_s=args.micro_batch * len(timed) / sec,
                tflops=sum(flops) / sec / 1e12, mfu=(sum(flops) / sec / 1e12 / peak_tf) if peak_tf else None,
                peak_gb=peak / GB if peak is not None else None, k=[r["k"] for r in timed], params=param_count(teacher.transformer))


def plan(args):
    """The dry-run arithmetic for every real preset on --gpus ranks: what the sharded networks, FSDP2's gathers and
    the VAE take per GPU before activations, and the encoders while prompts are cached. Activations depend on the
    resolution and micro-batch and are measured by `train.py --dry_run` on the run's own GPU (a 2-unit copy of
    FLUX or SD3.5-Large does not fit this script's CPU host)."""
    print(f"| teacher | params | per GPU on {args.gpus} GPUs before activations, {args.precision} (GB) | + text "
          f"encoders while caching (GB) |\n|---|---|---|---|")
    for name in ("sana-600m", "sana-1.6b", "sd3-medium", "sd3.5-medium", "sd3.5-large", "flux-dev"):
        cfg = PRESETS[name]
        spec = TEXT_INPUTS[type(cfg)]
        teacher = random_teacher(cfg, weights=False)
        targs = train.args_for(teacher, ["--teacher", name, "--precision", args.precision, *args.train_flags])
        parts, _ = memory_plan(targs, teacher, args.gpus, 1, activations={1: 0, 2: 0},
                               encoder_bytes=spec["encoder_params"] * 2, vae_bytes=spec["vae_params"] * 4)
        total = sum(parts.values()) / GB
        print(f"| {name} | {param_count(teacher.transformer) / 1e9:.2f} B | {total:.1f} | "
              f"{spec['encoder_params'] * 2 / GB:.1f} |")


def flops_table(args):
    """Model TFLOP per generator image of one SiD iteration (both phases, mean over k = 1..K) for every real preset,
    from pass_flops on meta tensors: what an MFU figure divides by, and a lower bound on the time per image."""
    print(f"| teacher | resolution | forward TFLOP / image | iteration TFLOP / image (mean over k) | s / image at "
          f"40% of {PEAK_TFLOPS['H100'][0]:.0f} TFLOP/s |\n|---|---|---|---|---|")
    for name in ("sana-600m", "sana-1.6b", "sd3-medium", "sd3.5-medium", "sd3.5-large", "flux-dev"):
        cfg = PRESETS[name]
        for res in args.resolutions:
            teacher = random_teacher(cfg, weights=False)
            targs = train.args_for(teacher, ["--teacher", name, *args.train_flags])
            f = pass_flops(cfg, text_features(cfg), teacher.latent_shape(res))
            per = [sum(iteration_flops(f, targs, k, 1, embeds=teacher.embeds_guidance)) / 1e12
                   for k in range(1, targs.num_steps + 1)]
            mean = sum(per) / len(per)
            print(f"| {name} | {res} | {f['fwd'] / 1e12:.2f} | {mean:.1f} | "
                  f"{mean / (0.4 * PEAK_TFLOPS['H100'][0]):.3f} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="SiD-DiT speed and memory with random weights")
    p.add_argument("--preset", default="sd3-small", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--precision", default=None, choices=["amp", "bf16", "fp32"],
                   help="default: amp on a GPU, fp32 on the CPU (CPUs without bf16 units emulate it, ~7x slower)")
    p.add_argument("--grad_checkpointing", type=int, default=1)
    p.add_argument("--modules", default="ours", choices=["ours", "diffusers", "both"])
    p.add_argument("--steps", type=int, default=3, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--repeats", type=int, default=1, help="runs of each module set, alternating; the median is shown")
    p.add_argument("--cpu_memory", action="store_true", help="CPU: also measure the peak (one more iteration "
                   "under LiveBytes)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--plan", action="store_true", help="the dry-run arithmetic of every real preset on --gpus "
                   "ranks (further train.py flags pass through)")
    p.add_argument("--gpus", type=int, default=8, help="--plan: ranks")
    p.add_argument("--flops", type=int, nargs="*", default=None, metavar="RES", help="the model FLOPs of every real "
                   "preset at these resolutions (default 512 1024; further train.py flags pass through)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)   # preflight's subprocess: a spec file
    args, rest = p.parse_known_args(argv)
    if args.measure:
        with open(args.measure) as f:
            spec = json.load(f)
        with open(args.measure, "w") as f:
            json.dump(dict(activations=measure_activations(spec)), f)
        return
    if args.flops is not None:
        args.resolutions, args.train_flags = args.flops or [512, 1024], rest
        return flops_table(args)
    if args.plan:
        args.precision = args.precision or "amp"          # train.py's default
        args.train_flags = rest
        return plan(args)
    args.precision = args.precision or ("amp" if torch.cuda.is_available() else "fp32")
    if rest:
        raise ValueError(f"unknown flags {rest}; see python bench.py --help")
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; use one of {sorted(PRESETS)}")
    cfg = PRESETS[args.preset]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"{args.preset} ({param_count(random_teacher(cfg, weights=False).transformer) / 1e9:.3f} B params), {args.resolution} px, micro-batch "
          f"{args.micro_batch}, {args.precision}, grad checkpointing {args.grad_checkpointing}, {device}; mean of "
          f"{args.steps} iterations after {args.warmup}, median of {args.repeats} run(s)", flush=True)
    # --repeats: the module sets alternate, and each row is the run with the median s/iter (CPU timings wander)
    runs = [[bench(cfg, m, args) for m in (["ours", "diffusers"] if args.modules == "both" else [args.modules])]
            for _ in range(args.repeats)]
    rows = [sorted(col, key=lambda r: r["sec"])[len(col) // 2] for col in zip(*runs)]
    print("| modules | s/iter | fake phase s | generator phase s | img/s | TFLOP/s | MFU | peak GB |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "–"
        peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "–"
        print(f"| {r['modules']} | {r['sec']:.3f} | {r['sec_fake']:.3f} | {r['sec_gen']:.3f} | {r['img_per_s']:.2f} | "
              f"{r['tflops']:.3f} | {mfu} | {peak} |")
    if len(rows) == 2:
        print(f"ours / diffusers speed: {rows[1]['sec'] / rows[0]['sec']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(preset=args.preset, resolution=args.resolution, micro_batch=args.micro_batch,
                           precision=args.precision, device=device, rows=rows, runs=runs), f, indent=1)



if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
