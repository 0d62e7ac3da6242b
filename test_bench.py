"""
bench.py's measuring instruments, checked: the --dry_run memory plan against the measured peak of the full-depth
run, the FLOP count against FlopCounterMode around a whole iteration, diffusers' modules behind our contract
against our modules, and the live-bytes counter against hand arithmetic.

    python -m pytest test_bench.py -q
"""

import os
import subprocess
import sys

import pytest
import torch

import bench
import teacher_loaders as tl
import train
from teacher_loaders import load_teacher

HERE = os.path.dirname(os.path.abspath(__file__))


def test_live_bytes_counts_storages_until_freed():
    with bench.LiveBytes() as lb:
        a = torch.ones(1000)                    # 4000 bytes
        b = a[10:].clone()                      # 3960
        v = a.view(10, 100)                     # a view: no new storage
        del b
        c = torch.zeros(500)                    # 2000, after b was freed
    assert lb.peak == 4000 + 3960
    assert lb.now == 4000 + 2000
    del a, v, c


# ----------------------------------------------------------------------------------------------
# --dry_run against the measured peak (same counter on the CPU; the GPU's max_memory_allocated there)

CASES = {   # name -> (teacher factory, train flags)
    "tiny": (lambda: load_teacher("tiny"), ["--teacher", "tiny", "--batch", "8", "--max_steps", "1"]),
    "sd3-small": (lambda: bench.random_teacher(bench.PRESETS["sd3-small"]),
                  ["--teacher", "random", "--batch", "2", "--resolution", "128", "--max_steps", "1",
                   "--grad_checkpointing", "1", "--precision", "fp32"]),
    "flux-small": (lambda: bench.random_teacher(bench.PRESETS["flux-small"]),
                   ["--teacher", "random", "--batch", "1", "--resolution", "128", "--max_steps", "1",
                    "--grad_checkpointing", "0", "--precision", "fp32"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dry_run_within_15_percent_of_measured_peak(case):
    make, argv = CASES[case]
    teacher = make()
    args = train.args_for(teacher, argv)
    parts, _ = bench.memory_plan(args, teacher, 1, args.batch)      # measures 1- and 2-unit copies
    _, peak = bench.run_loop(make(), argv)                         # the full-depth run
    estimate = sum(parts.values())
    assert abs(estimate - peak) <= 0.15 * peak, (case, estimate / 2**20, peak / 2**20)


def test_dry_run_shards_and_suggests():
    teacher = load_teacher("tiny")
    args = train.args_for(teacher, ["--teacher", "tiny", "--batch", "8"])
    acts = {1: 3 * 2**20, 2: 5 * 2**20}                 # given: 2 MB per block on top of 1 MB
    one, _ = bench.memory_plan(args, teacher, 1, 8, acts)
    eight, _ = bench.memory_plan(args, teacher, 8, 1, acts)
    P = bench.param_count(teacher.transformer)
    assert one["G + fake score Adam moments (2 each)"] == 4 * P * 4
    assert eight["G + fake score Adam moments (2 each)"] == 4 * P * 4 / 8
    act_key = next(k for k in one if k.startswith("activations"))
    assert one[act_key] == (1 + 2 * 6) * 2**20          # tiny has 6 blocks
    assert "FSDP2 gathered blocks (2 units + 3 roots)" in eight
    static = sum(v for k, v in one.items() if k != act_key)
    # a budget that 8 GPUs meet (static / 8 + activations) and a micro-batch of 1 does not (static + act / 8)
    gpu_gb = (static / 8 + one[act_key] + 2**20) / 0.92 / 2**30
    assert static + one[act_key] / 8 > 0.92 * gpu_gb * 2**30
    report, fits = bench.preflight(args, teacher, 1, 8, acts, gpu_gb=gpu_gb)
    assert not fits and "8 GPUs" in report and "--micro_batch" not in report, report
    big = {1: 100 * 2**20, 2: 200 * 2**20}              # activation-bound: a smaller micro-batch is the fix
    report, fits = bench.preflight(args, teacher, 1, 8, big, gpu_gb=(static + 600 * 2**20 / 8 + 2**20) / 0.92 / 2**30)
    assert not fits and "--micro_batch 1 " in report and "GPUs" not in report, report
    report, fits = bench.preflight(args, teacher, 1, 8, acts, gpu_gb=1)
    assert fits, report


def test_train_dry_run_command():
    """`train.py --dry_run` prints the plan and exits 1 when the run does not fit (0 when it does: the preflight tests
    above), writing nothing."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = os.path.join(HERE, "runs", "never-written")
    bad = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--teacher", "tiny", "--batch", "4",
                          "--dry_run", "--out", out, "--gpu_gb", "0.001"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert "total while training" in bad.stdout and "does NOT fit" in bad.stdout and "would fit with" in bad.stdout
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------
# FLOPs: the per-pass count times the loop's passes equals a count around the whole iteration


@pytest.mark.parametrize("groups", [1, 64])
def test_conv_backward_flops_count_groups(groups):
    """A convolution's backward is one forward-sized convolution per gradient: 2x the forward for input + weight."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups)
    x = torch.randn(1, 64, 16, 16, requires_grad=True)
    fwd = 2 * 9 * (64 // groups) * 64 * 16 * 16
    with bench.flop_counter() as fc:
        conv(x).sum().backward()
    assert fc.get_total_flops() == 3 * fwd


@pytest.mark.parametrize("preset,flags", [("sd3-small", []),
                                          ("flux-small", ["--embedded_guidance", "only"]),
                                          ("sana-small", ["--num_steps", "2", "--cfg_eval_fake", "0",
                                                          "--cfg_train_fake", "1"])])
def test_iteration_flops_match_counted_iteration(preset, flags):
    cfg = bench.PRESETS[preset]
    teacher = bench.random_teacher(cfg)
    argv = ["--teacher", "random", "--batch", "2", "--resolution", "128", "--max_steps", "1",
            "--grad_checkpointing", "0", "--precision", "fp32", *flags]
    args = train.args_for(teacher, argv)
    f = bench.pass_flops(cfg, bench.text_features(cfg), teacher.latent_shape(128))
    # the math attention path, as on meta tensors: autograd computes only the gradients a pass needs (the fused CPU
    # kernel's backward always computes dq, dk and dv, also for the text keys of a frozen pass)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with bench.flop_counter() as fc, sdpa_kernel(SDPBackend.MATH):
        metrics, _ = bench.run_loop(teacher, argv, track=False)
    fake, gen = bench.iteration_flops(f, args, metrics[0]["k"], 2, embeds=teacher.embeds_guidance)
    assert fake + gen == fc.get_total_flops()


# ----------------------------------------------------------------------------------------------
# diffusers' classes behind our contract compute our function (so the speed ratio compares like with like)


@pytest.mark.parametrize("preset", ["sana-small", "sd3-small", "flux-small"])
def test_diffusers_net_equals_ours(preset):
    cfg = bench.PRESETS[preset]
    ours = bench.random_teacher(cfg).transformer
    theirs = bench.DiffusersNet(cfg)
    from export import diffusers_config
    keys = tl.DIFFUSERS_TRANSFORMERS[diffusers_config(cfg, preset)["_class_name"]][1](cfg)
    state = tl.to_checkpoint(ours.state_dict(), keys)
    missing, unexpected = theirs.inner.load_state_dict(state, strict=False)
    assert not unexpected and all("pos_embed" in k for k in missing), (missing, unexpected)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, cfg.in_channels, 8, 12, generator=g), torch.tensor([0.3, 0.9])
    cond = {k: (torch.ones(2, *s, dtype=torch.long) if m else torch.randn(2, *s, generator=g))
            for k, (s, m) in bench.text_features(cfg).items()}
    if cond.get("text_mask") is not None:
        cond["text_mask"][:, 200:] = 0
    if getattr(cfg, "guidance_embeds", False):
        cond["guidance"] = torch.tensor([1.0, 3.5])
    with torch.no_grad():
        a, b = ours(x, t, **cond), theirs(x, t, **cond)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (a - b).abs().max()


def test_bench_command_prints_both_rows(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "sana-small", "--resolution", "64", "--micro_batch", "1", "--steps", "1",
                "--warmup", "0", "--modules", "both", "--json", str(out)])
    import json
    rows = json.loads(out.read_text())["rows"]
    assert [r["modules"] for r in rows] == ["ours", "diffusers"]
    assert all(r["sec"] > 0 and r["tflops"] > 0 and r["sec_fake"] + r["sec_gen"] <= r["sec"] * 1.01 for r in rows)
