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
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--batch", "4", "--sample_every", "0", "--grad_checkpointing", "0", "--n_samples", "2"]


def run(args, nproc=1, check=True):
    """Run train.py (torchrun when nproc > 1); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable]) + [os.path.join(HERE, "train.py")] + args
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
    assert set(c) >= {"generator", "fake", "opt_g", "opt_f", "rng", "args", "config", "step"}
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
    run(["--teacher", "tiny", "--out", a, "--max_steps", "4", "--precision", "amp"] + ema + FAST)
    run(["--teacher", "tiny", "--out", b, "--max_steps", "2", "--precision", "amp"] + ema + FAST)
    run(["--teacher", "tiny", "--out", b, "--max_steps", "4", "--precision", "amp", "--resume"] + ema + FAST)
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
    assert torch.equal(ca["rng"], cb["rng"])


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
    c1, c2, w0 = ckpt(one), ckpt(two), ckpt_teacher()
    for net in ("generator", "fake"):
        d1 = torch.cat([(c1[net][k] - w0[k]).flatten() for k in w0])
        d2 = torch.cat([(c2[net][k] - w0[k]).flatten() for k in w0])
        cos = torch.nn.functional.cosine_similarity(d1, d2, dim=0).item()
        flipped = ((d1 - d2).abs() > 1e-6).float().mean().item()
        print(f"{net}: update norm {d1.norm():.3e}, cosine 1 vs 2 ranks {cos:.6f}, entries that differ {flipped:.2e}")
        assert d1.norm() > 1e-4 and cos > 0.999 and flipped < 5e-3


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
    """torchrun --nproc_per_node=2 train.py --teacher tiny in the default bf16-autocast mode, with accumulation."""
    out = str(tmp_path / "amp2")
    run(["--teacher", "tiny", "--out", out, "--max_steps", "2", "--batch", "8", "--micro_batch", "2",
         "--sample_every", "2", "--n_samples", "2"], nproc=2)
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
    before = digest(os.path.join(out, "ckpt.pt"))
    bad(["--teacher", "tiny", "--out", out, "--max_steps", "2"] + FAST, tmp_path, "--resume")
    assert digest(os.path.join(out, "ckpt.pt")) == before


def test_corrupt_checkpoint_on_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"garbage")
    bad(["--teacher", "tiny", "--out", str(out), "--resume", "--max_steps", "2"] + FAST, tmp_path, "cannot resume")
    assert (out / "ckpt.pt").read_bytes() == b"garbage"


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
    assert "step 2" in str(e.value) and "ckpt.pt (step 1)" in str(e.value)
    assert ckpt(out)["step"] == 1
