"""
train.py end to end on the embedded tiny teacher: smoke runs on 1 and 2 ranks, exact resume,
1-vs-2-rank parity, and every bad input stopping with a one-line error that names the fix.

    python -m pytest test_train.py -q

Each run is a real `python train.py` / `torchrun train.py` subprocess with a tiny batch and a
few steps, so this file also checks the commands the README shows.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--batch", "4", "--sample_every", "0", "--grad_checkpointing", "0", "--n_samples", "2"]


def run(args, nproc=0, check=True):
    """Run train.py (torchrun with nproc ranks when nproc > 0); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc else [sys.executable]) + [os.path.join(HERE, "train.py")] + args
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def ckpt(out, folder="checkpoint"):
    """A run's sharded checkpoint as one dict: generator, fake, opt_g, opt_f (, ema) from the DCP shards, plus
    info.json (step, args, config, data)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = os.path.join(out, folder)
    dcp_to_torch_save(path, os.path.join(out, "ckpt_consolidated.tmp"))
    state = torch.load(os.path.join(out, "ckpt_consolidated.tmp"), map_location="cpu", weights_only=False)
    os.remove(os.path.join(out, "ckpt_consolidated.tmp"))
    with open(os.path.join(path, "info.json")) as f:
        return {**state, **json.load(f)}


def digest(path):
    """sha256 of a file, or of every file in a folder (names and bytes)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else [""]:
        with open(os.path.join(path, name) if name else path, "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def test_smoke_one_rank_writes_everything(tmp_path):
    """`python train.py --teacher tiny` runs, logs each step, writes metrics, a sample grid and a checkpoint."""
    out = str(tmp_path / "run")
    p = run(["--teacher", "tiny", "--out", out, "--max_steps", "2", "--batch", "4", "--sample_every", "2",
             "--grad_checkpointing", "1", "--n_samples", "2"])
    m = metrics(out)
    print(p.stderr[-600:])
    assert [r["step"] for r in m] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss_fake"], r["loss_gen"], r["gnorm_gen"]])).all() for r in m)
    assert os.path.isfile(os.path.join(out, "samples", "step000002.png"))
    c = ckpt(out)
    assert c["step"] == 2 and c["args"]["teacher"] == "tiny" and c["config"]["family"] == "SanaConfig"
    assert all(v.dtype == torch.float32 for v in c["generator"].values())    # fp32 master weights
    assert set(c) >= {"generator", "fake", "opt_g", "opt_f", "args", "config", "step"}
    # the student file that sample.py / eval.py / export.py read holds exactly the generator, with its config
    from sample import load_student
    for ema, key in ((False, "generator"), (True, "ema")):      # the tiny teacher's runs keep an EMA
        G, run_args = load_student(out, ema=ema)
        assert run_args["teacher"] == "tiny" and run_args["num_steps"] == 4
        assert all(torch.equal(v, c[key][k]) for k, v in G.state_dict().items()), key


def test_resume_is_bit_identical(tmp_path):
    """4 steps in one go == 2 steps, stop, --resume for 2 more: same losses, weights, EMA and Adam state."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ema = ["--ema_halflife_kimg", "0.05"]
    run(["--teacher", "tiny", "--out", a, "--max_steps", "4"] + ema + FAST)
    run(["--teacher", "tiny", "--out", b, "--max_steps", "2"] + ema + FAST)
    cache = digest(os.path.join(b, "prompt_cache"))
    run(["--teacher", "tiny", "--out", b, "--max_steps", "4", "--resume"] + ema + FAST)
    assert digest(os.path.join(b, "prompt_cache")) == cache, "the resumed run encoded prompts again"
    ma, mb = metrics(a), metrics(b)
    print("straight:", [(r["loss_fake"], r["loss_gen"]) for r in ma])
    print("resumed: ", [(r["loss_fake"], r["loss_gen"]) for r in mb])
    for ra, rb in zip(ma, mb):
        assert (ra["k"], ra["loss_fake"], ra["loss_gen"]) == (rb["k"], rb["loss_fake"], rb["loss_gen"])
    ca, cb = ckpt(a), ckpt(b)
    for key in ("generator", "fake", "ema"):
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), f"{key}.{name} differs after resume"
    for name, st in ca["opt_g"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], cb["opt_g"]["state"][name]["exp_avg_sq"])
        assert torch.equal(torch.as_tensor(st["step"]), torch.as_tensor(cb["opt_g"]["state"][name]["step"]))


def test_two_ranks_match_one_rank(tmp_path):
    """Same global batch on 1 rank and on 2 FSDP2 ranks (gloo): same losses and weights up to float rounding.

    Every draw is made for the global batch and sliced per rank, so only the order of additions differs.
    """
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(["--teacher", "tiny", "--out", one, "--max_steps", "2", "--precision", "fp32"] + FAST)
    run(["--teacher", "tiny", "--out", two, "--max_steps", "2", "--precision", "fp32"] + FAST, nproc=2)
    m1, m2 = metrics(one), metrics(two)
    print("1 rank :", [(r["loss_fake"], r["loss_gen"]) for r in m1])
    print("2 ranks:", [(r["loss_fake"], r["loss_gen"]) for r in m2])
    for r1, r2 in zip(m1, m2):
        assert r1["k"] == r2["k"]
        assert r1["loss_fake"] == pytest.approx(r2["loss_fake"], rel=1e-4)
        assert r1["loss_gen"] == pytest.approx(r2["loss_gen"], rel=1e-3, abs=1e-3)
    # Weights: compare the updates (trained - teacher). Adam with beta1 = 0 makes early steps ~lr * sign(g), so a
    # gradient entry at rounding level may flip sign between rank counts and move by 2 lr; those must stay rare.
    # They are rarer in the fake score (a plain regression) than in G, whose SiD gradient is a difference of the
    # nearly equal teacher and fake-score predictions (measured: 0.3% and 1.8% of the entries).
    c1, c2, w0 = ckpt(one), ckpt(two), ckpt_teacher()
    for net in ("generator", "fake"):
        d1 = torch.cat([(c1[net][k] - w0[k]).flatten() for k in w0])
        d2 = torch.cat([(c2[net][k] - w0[k]).flatten() for k in w0])
        cos = torch.nn.functional.cosine_similarity(d1, d2, dim=0).item()
        flipped = ((d1 - d2).abs() > 1e-6).float().mean().item()
        print(f"{net}: update norm {d1.norm():.3e}, cosine 1 vs 2 ranks {cos:.6f}, entries that differ {flipped:.2e}")
        assert d1.norm() > 1e-4 and cos > 0.999 and flipped < (5e-3 if net == "fake" else 3e-2)


def test_ema_is_the_running_average_of_the_generator(tmp_path):
    """On 2 FSDP2 ranks, one step with EMA half-life H kimg: ema = teacher + (1 - beta) (G - teacher), beta = 0.5^(B/1000H)."""
    out = str(tmp_path / "ema")
    run(["--teacher", "tiny", "--out", out, "--max_steps", "1", "--precision", "fp32", "--ema_halflife_kimg", "0.01"]
        + FAST, nproc=2)
    c, w0 = ckpt(out), ckpt_teacher()
    beta = 0.5 ** (4 / (1000 * 0.01))                   # batch 4, half-life 10 samples: beta = 0.758
    err = max((c["ema"][k] - torch.lerp(w0[k], c["generator"][k], 1 - beta)).abs().max().item() for k in w0)
    moved = max((c["ema"][k] - w0[k]).abs().max().item() for k in w0)
    print(f"beta {beta:.4f}: EMA moved by up to {moved:.2e}, max |ema - lerp(teacher, G, 1 - beta)| = {err:.1e}")
    assert moved > 1e-5 and err < 1e-7
    assert "ema" not in ckpt_run_without_ema(tmp_path)


def ckpt_run_without_ema(tmp_path):
    out = str(tmp_path / "no_ema")
    run(["--teacher", "tiny", "--out", out, "--max_steps", "1", "--ema_halflife_kimg", "0"] + FAST)
    return ckpt(out)


def ckpt_teacher():
    from teacher_loaders import load_teacher
    return load_teacher("tiny").transformer.state_dict()


def test_two_ranks_amp_smoke(tmp_path):
    """torchrun --nproc_per_node=2 train.py --teacher tiny in the real teachers' default mode (amp: bf16 autocast),
    with accumulation, the bf16-held teacher and bf16 all-gathers of G and the fake score."""
    out = str(tmp_path / "amp2")
    run(["--teacher", "tiny", "--out", out, "--max_steps", "2", "--batch", "8", "--micro_batch", "2",
         "--sample_every", "2", "--n_samples", "2", "--precision", "amp", "--teacher_dtype", "bf16",
         "--bf16_gather", "1"], nproc=2)
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert os.path.isfile(os.path.join(out, "samples", "step000002.png"))


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the problem and the fix, exit code != 0, nothing overwritten


def bad(args, tmp_path, expect):
    p = run(args, check=False)
    err = p.stderr.strip().splitlines()
    print(err[-1] if err else "(no stderr)")
    assert p.returncode != 0
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], p.stderr[-2000:]


def test_unknown_teacher(tmp_path):
    bad(["--teacher", "nosuch", "--out", str(tmp_path / "x")], tmp_path, "unknown teacher")


def test_missing_teacher_file(tmp_path):
    bad(["--teacher", str(tmp_path / "missing.safetensors")], tmp_path, "does not exist")


def test_corrupt_teacher_file(tmp_path):
    f = tmp_path / "broken.safetensors"
    f.write_bytes(b"\x00" * 64 + b"not a safetensors file")
    bad(["--teacher", str(f)], tmp_path, "not a readable safetensors file")


def test_empty_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n   \n")
    bad(["--teacher", "tiny", "--prompts", str(f), "--out", str(tmp_path / "x")], tmp_path, "has no prompts")


def test_prompt_the_teacher_cannot_read(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a photo of an astronaut riding a horse\n")
    bad(["--teacher", "tiny", "--prompts", str(f), "--out", str(tmp_path / "x"), "--max_steps", "1"] + FAST,
        tmp_path, "cannot read")


def test_batch_not_divisible(tmp_path):
    bad(["--teacher", "tiny", "--batch", "6", "--micro_batch", "4", "--out", str(tmp_path / "x")], tmp_path,
        "not divisible")


def test_resolution_not_divisible(tmp_path):
    bad(["--teacher", "tiny", "--resolution", "30", "--out", str(tmp_path / "x")], tmp_path, "not divisible by 4")


def test_existing_checkpoint_is_never_overwritten(tmp_path):
    out = str(tmp_path / "run")
    run(["--teacher", "tiny", "--out", out, "--max_steps", "1"] + FAST)
    before = digest(os.path.join(out, "checkpoint"))
    bad(["--teacher", "tiny", "--out", out, "--max_steps", "2"] + FAST, tmp_path, "--resume")
    assert digest(os.path.join(out, "checkpoint")) == before


def test_corrupt_checkpoint_on_resume(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "info.json").write_bytes(b"garbage")
    bad(["--teacher", "tiny", "--out", str(out), "--resume", "--max_steps", "2"] + FAST, tmp_path, "cannot resume")
    assert (out / "checkpoint" / "info.json").read_bytes() == b"garbage"


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A non-finite generator loss at step 2 stops the run, names step 2 and the step-1 checkpoint, saves nothing."""
    import sid
    import train
    calls = {"n": 0}
    real_loss = sid.generator_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real_loss(*a, **k)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(sid, "generator_loss", poisoned)
    out = str(tmp_path / "run")
    args, teacher = train.parse_args(["--teacher", "tiny", "--out", out, "--max_steps", "3", "--ckpt_every", "1"]
                                     + FAST)
    with pytest.raises(FloatingPointError) as e:
        train.main(args, teacher)
    print(e.value)
    assert "step 2" in str(e.value) and "checkpoint (step 1)" in str(e.value)
    assert ckpt(out)["step"] == 1


# ----------------------------------------------------------------------------------------------
# Big-teacher mechanics: meta build + sharded fill, sharded checkpoints across rank counts, a killed save,
# the student file


FILL_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import train
from model import build_model
from teacher_loaders import load_teacher
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
dist.init_process_group("gloo")
rank = dist.get_rank()
teacher = load_teacher("tiny", transformer_device="cpu" if rank == 0 else "meta", transformer_dtype=None)
source = teacher.transformer.state_dict()
assert all(v.is_meta for v in source.values()) == (rank != 0)       # only rank 0 read the weights
with torch.device("meta"):
    net = build_model(teacher.transformer.config)
train.shard(net)
train.fill(net, source, torch.device("cpu"), torch.device("cpu"))
local = sum(p.to_local().numel() for p in net.parameters())
full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    ref = load_teacher("tiny").transformer.state_dict()
    err = max((full[k] - ref[k]).abs().max().item() for k in ref)
    print(f"rank 0 holds {{local}} of {{sum(v.numel() for v in ref.values())}} parameters; max |sharded - plain| = {{err}}")
    assert set(full) == set(ref) and err == 0
dist.destroy_process_group()
"""


def test_meta_build_and_sharded_fill_equal_the_plain_load(tmp_path):
    """2 gloo ranks: rank 1 reads only the teacher's shapes, the network is built on meta, sharded and filled by
    scatter from rank 0: the gathered weights equal the single-process load exactly; each rank holds half."""
    script = tmp_path / "fill.py"
    script.write_text(FILL_SCRIPT.format(here=HERE))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=300, env=env)
    print(p.stdout[-500:])
    assert p.returncode == 0, p.stderr[-3000:]
    held, total = (int(w) for w in p.stdout.split("holds ")[1].split(" parameters")[0].split(" of "))
    assert abs(held - total / 2) < 0.01 * total


def test_sharded_checkpoint_resumes_on_two_and_on_one_rank(tmp_path):
    """Saved on 2 ranks at step 2: resumed on 2 ranks it is bit-identical to an uninterrupted 2-rank run; resumed on
    1 rank (DCP reshards) it is equal up to float rounding."""
    straight, two, one = (str(tmp_path / n) for n in ("straight", "two", "one"))
    args = ["--teacher", "tiny", "--precision", "fp32", "--ema_halflife_kimg", "0.05"] + FAST
    run(args + ["--out", straight, "--max_steps", "4"], nproc=2)
    run(args + ["--out", two, "--max_steps", "2"], nproc=2)
    shutil.copytree(two, one)
    run(args + ["--out", two, "--max_steps", "4", "--resume"], nproc=2)
    run(args + ["--out", one, "--max_steps", "4", "--resume"])
    ms, m2, m1 = metrics(straight), metrics(two), metrics(one)
    print("straight:", [(r["loss_fake"], r["loss_gen"]) for r in ms])
    print("2 -> 1:  ", [(r["loss_fake"], r["loss_gen"]) for r in m1])
    assert [(r["k"], r["loss_fake"], r["loss_gen"]) for r in ms] == [(r["k"], r["loss_fake"], r["loss_gen"]) for r in m2]
    for a, b in zip(ms[2:], m1[2:]):
        assert a["k"] == b["k"] and a["loss_fake"] == pytest.approx(b["loss_fake"], rel=1e-4)
    cs, c2, c1 = ckpt(straight), ckpt(two), ckpt(one)
    for key in ("generator", "fake", "ema"):
        assert all(torch.equal(cs[key][n], c2[key][n]) for n in cs[key]), key
        err = max((cs[key][n] - c1[key][n]).abs().max().item() for n in cs[key])
        print(f"{key}: max |2-rank run - resumed on 1 rank| = {err:.1e}")
        assert err < 1e-3                               # a few 2 lr sign flips (see test_two_ranks_match_one_rank)


def test_killed_save_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    """A save killed while the shards are written leaves <out>/checkpoint (the last good one) and a stale .tmp;
    one killed between the two renames leaves checkpoint.old. --resume continues from either."""
    import torch.distributed.checkpoint as dcp
    import train
    out = str(tmp_path / "run")
    real_save, calls = dcp.save, []

    def killed(state, checkpoint_id, **kw):
        calls.append(checkpoint_id)
        if len(calls) == 2:                             # the step-2 save: half the files, then the process dies
            os.makedirs(checkpoint_id, exist_ok=True)
            open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb").write(b"half")
            raise KeyboardInterrupt
        return real_save(state, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(dcp, "save", killed)
    args, teacher = train.parse_args(["--teacher", "tiny", "--out", out, "--max_steps", "3", "--ckpt_every", "1"]
                                     + FAST)
    with pytest.raises(KeyboardInterrupt):
        train.main(args, teacher)
    monkeypatch.setattr(dcp, "save", real_save)
    print(sorted(os.listdir(out)))
    assert ckpt(out)["step"] == 1 and os.path.isdir(os.path.join(out, "checkpoint.tmp"))
    os.replace(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old"))   # killed between the renames
    run(["--teacher", "tiny", "--out", out, "--max_steps", "3", "--resume"] + FAST)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]     # the killed run's step-2 record was dropped
    assert ckpt(out)["step"] == 3 and not os.path.exists(os.path.join(out, "checkpoint.old"))


def test_student_file_reproduces_the_student(tmp_path):
    """generator.safetensors holds the checkpoint's generator exactly, so its samples are the student's."""
    from sample import load_student, student_sample
    from teacher_loaders import load_teacher
    out = str(tmp_path / "run")
    run(["--teacher", "tiny", "--out", out, "--max_steps", "2", "--ema_halflife_kimg", "0"] + FAST)
    c, (G, run_args) = ckpt(out), load_student(out)
    teacher = load_teacher("tiny")
    ref = load_teacher("tiny").transformer
    ref.load_state_dict(c["generator"])
    z = torch.randn(3, *teacher.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompts(["a red circle at the top left", "a blue square in the center", ""])
    a, b = (student_sample(net, z, cond, 4, run_args["num_steps"], seed=1) for net in (G, ref))
    print(f"student file vs checkpoint generator: max |x0 diff| = {(a - b).abs().max():.1e}")
    assert torch.equal(a, b) and not torch.equal(a, student_sample(teacher.transformer, z, cond, 4, 4, seed=1))


# ----------------------------------------------------------------------------------------------
# train.py's wiring: each scale to its network, independent draws, every k, accumulation = one big round


def in_process(tmp_path, monkeypatch, extra, record):
    """Run train.main in this process with sid functions wrapped by `record` {name: wrapper(original)}."""
    import sid
    import train
    for name, wrap in record.items():
        monkeypatch.setattr(sid, name, wrap(getattr(sid, name)))
    args, teacher = train.parse_args(["--teacher", "tiny", "--out", str(tmp_path / "run"), "--ckpt_every", "0",
                                      "--ema_halflife_kimg", "0"] + FAST + extra)
    train.main(args, teacher)
    return metrics(str(tmp_path / "run"))


def test_each_guidance_scale_reaches_its_network(tmp_path, monkeypatch):
    """kappa1 -> the fake score while it trains, kappa2 -> the frozen fake score in the G loss, kappa4 -> the teacher."""
    calls = []

    def wrap(f):
        import inspect

        def cfg_velocity(*a, **k):
            bound = inspect.signature(f).bind(*a, **k).arguments
            net = bound["net"]
            calls.append((net.training, any(p.requires_grad for p in net.parameters()), bound["scale"]))
            return f(*a, **k)
        return cfg_velocity

    in_process(tmp_path, monkeypatch, ["--max_steps", "1", "--cfg_train_fake", "2", "--cfg_eval_fake", "3",
                                       "--cfg_eval_real", "5"], {"cfg_velocity": wrap})
    print(calls)        # (train mode, trainable, scale): fake while training, then teacher (eval), frozen fake
    assert calls == [(True, True, 2.0), (False, False, 5.0), (True, False, 3.0)]


def test_draws_are_independent_and_every_k_is_trained(tmp_path, monkeypatch):
    """z, eps and the fresh noise of generator steps 2..k are separate draws, and new ones in the G phase; over 12
    iterations every k in 1..4 comes up."""
    seen = {"z": [], "eps": [], "fresh": []}

    def wrap_generate(f):
        def generate(G, z, cond, k, K=4, t_init=1.0, noise="fresh", grad=False, randn=torch.randn_like):
            seen["z"].append(z.flatten())

            def recorded(like):
                n = randn(like)
                seen["fresh"].append(n.flatten())
                return n
            return f(G, z, cond, k, K, t_init, noise, grad, recorded)
        return generate

    def wrap_add_noise(f):
        def add_noise(x0, eps, t):
            seen["eps"].append(eps.flatten())
            return f(x0, eps, t)
        return add_noise

    m = in_process(tmp_path, monkeypatch, ["--max_steps", "12", "--batch", "2"],
                   {"generate": wrap_generate, "add_noise": wrap_add_noise})
    ks = [r["k"] for r in m]
    print("k per iteration:", ks)
    assert set(ks) == {1, 2, 3, 4}
    draws = [seen["z"][0], seen["eps"][0], seen["z"][1], seen["eps"][1]] + seen["fresh"][:2]
    worst = max(abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item())
                for i, a in enumerate(draws) for b in draws[i + 1:])
    print(f"{len(draws)} draws (z, eps of both phases, fresh noise): max |correlation| {worst:.3f}")
    assert worst < 0.1 and all(x.std() > 0.9 for x in draws)


def test_accumulation_equals_one_round(tmp_path, monkeypatch):
    """batch 4 as 2 rounds of 2 == 1 round of 4: same samples, same losses, same first updates (float rounding)."""
    import train
    runs = {}
    for micro in (2, 4):
        out = str(tmp_path / f"micro{micro}")
        args, teacher = train.parse_args(["--teacher", "tiny", "--out", out, "--max_steps", "1", "--micro_batch",
                                          str(micro), "--ema_halflife_kimg", "0"] + FAST)
        train.main(args, teacher)
        runs[micro] = (metrics(out)[0], ckpt(out))
    (m2, c2), (m4, c4) = runs[2], runs[4]
    print("2 rounds:", m2["loss_fake"], m2["loss_gen"], " 1 round:", m4["loss_fake"], m4["loss_gen"])
    assert m2["loss_fake"] == pytest.approx(m4["loss_fake"], rel=1e-6)
    # the G loss comes after one fake-score step, whose Adam sign flips at rounding level it inherits
    assert m2["loss_gen"] == pytest.approx(m4["loss_gen"], rel=1e-3)
    w0 = ckpt_teacher()
    d2 = torch.cat([(c2["fake"][k] - w0[k]).flatten() for k in w0])
    d4 = torch.cat([(c4["fake"][k] - w0[k]).flatten() for k in w0])
    flipped = ((d2 - d4).abs() > 1e-6).float().mean().item()
    print(f"fake-score update: cosine {torch.nn.functional.cosine_similarity(d2, d4, dim=0):.6f}, differ {flipped:.1e}")
    assert flipped < 5e-3


@pytest.mark.parametrize("family", ["SANA", "SD3", "FLUX"])
def test_bf16_weights_against_autocast(family):
    """A teacher held in bf16 (--teacher_dtype bf16; --bf16_gather computes G and the fake score the same way) vs
    fp32 weights, both under bf16 autocast, on random tiny nets: for SANA and SD3 the difference in velocity and in
    its input gradient (what the G loss backpropagates) stays within twice autocast's own error against fp32. FLUX
    is far off: with bf16 weights its timestep and guidance are rounded to bf16 before the x1000, as diffusers and
    BFL do in bf16 (model.flux_timestep), which is why fp32 stays the default."""
    import copy
    from model import FluxConfig, SANA_CONFIGS, SD3Config, build_model
    torch.manual_seed(0)
    cfg, text, pooled, C = {
        "SANA": (SANA_CONFIGS["tiny"], (8, 64), None, 48),
        "SD3": (SD3Config(depth=3, num_heads=4, head_dim=16, pos_embed_max_size=16, sample_size=8,
                          joint_attention_dim=48, pooled_projection_dim=40, qk_norm=True, dual_attention_layers=(0,)),
                (12, 48), 40, 16),
        "FLUX": (FluxConfig(depth=2, depth_single=2, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6),
                            joint_attention_dim=48, pooled_projection_dim=16), (12, 48), 16, 16)}[family]
    net = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and p.dim() == 1 else 0.15 * torch.randn_like(p))
    x, t = torch.randn(4, C, 8, 8), torch.rand(4)
    kw = dict(text=torch.randn(4, *text), **({"pooled": torch.randn(4, pooled)} if pooled else {}),
              **({"guidance": torch.full((4,), 3.5)} if getattr(cfg, "guidance_embeds", False) else {}))

    def run_net(m, amp):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            v = m(xx, t, **kw).float()
        v.square().sum().backward()
        return v.detach(), xx.grad

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    (v32, g32), (v16, g16) = run_net(net, True), run_net(copy.deepcopy(net).to(torch.bfloat16), True)
    ref_v, ref_g = run_net(net, False)
    own = (rel(v32, ref_v), rel(g32, ref_g))
    held = (rel(v16, v32), rel(g16, g32))
    print(f"{family}: autocast vs fp32: v {own[0]:.4f}, grad {own[1]:.4f}; bf16-held vs fp32-held: v {held[0]:.4f}, "
          f"grad {held[1]:.4f}")
    if family == "FLUX":
        assert held[0] > 10 * own[0]
    else:
        assert held[0] < 2 * own[0] and held[1] < 2 * own[1]


def test_prompts_are_encoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """Every prompt and the CFG negative go through the text encoder before training; no encoder call after that
    (the encoders can leave the GPU), and the cache holds each prompt once."""
    import sid
    import train
    args, teacher = train.parse_args(["--teacher", "tiny", "--out", str(tmp_path / "run"), "--max_steps", "2",
                                      "--ckpt_every", "0", "--ema_halflife_kimg", "0"] + FAST)
    encoded, at_first_step = [], []
    real_encode, real_cfg = teacher.encode_prompts, sid.cfg_velocity

    def counting(prompts, negative=False):
        encoded.extend(prompts)
        return real_encode(prompts, negative)

    def first(*a, **k):
        at_first_step.append(len(encoded))
        return real_cfg(*a, **k)

    teacher.encode_prompts = counting
    monkeypatch.setattr(sid, "cfg_velocity", first)
    train.main(args, teacher)
    print(f"{len(encoded)} texts encoded, {len(set(encoded))} distinct; {len(teacher.default_prompts)} prompts + ''")
    assert sorted(encoded) == sorted(teacher.default_prompts + [""]) and set(at_first_step) == {len(encoded)}
    assert all(p.device.type == "cpu" for m in teacher.text_encoders for p in m.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 CPU offload moves weights between GPU and host: "
                                                          "needs a CUDA GPU (none here)")
def test_cpu_offload_gives_the_same_run(tmp_path):
    """--cpu_offload (FSDP2 CPUOffloadPolicy) vs none, 1 GPU rank, fp32: the same losses and weights."""
    a, b = str(tmp_path / "gpu"), str(tmp_path / "offload")
    run(["--teacher", "tiny", "--out", a, "--max_steps", "3", "--precision", "fp32"] + FAST, nproc=1)
    run(["--teacher", "tiny", "--out", b, "--max_steps", "3", "--precision", "fp32", "--cpu_offload", "1"] + FAST,
        nproc=1)
    for ra, rb in zip(metrics(a), metrics(b)):
        assert ra["loss_fake"] == pytest.approx(rb["loss_fake"], rel=1e-5)
        assert ra["loss_gen"] == pytest.approx(rb["loss_gen"], rel=1e-4)
    ca, cb = ckpt(a), ckpt(b)
    assert max((ca["generator"][k] - cb["generator"][k]).abs().max().item() for k in ca["generator"]) < 1e-5
