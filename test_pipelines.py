"""
SD3 / SD3.5 and FLUX teachers are their pipelines: `load_teacher(folder)` on a tiny diffusers pipeline folder
samples, decodes and encodes prompts exactly as StableDiffusion3Pipeline / FluxPipeline do, offline, fp32 CPU.

    HF_HUB_OFFLINE=1 python -m pytest test_pipelines.py -q -s      # -s prints the errors

What is compared (tiny pipelines from tiny_pipelines.py, every parameter randomised):
  - Teacher.sample + decode vs the pipeline called with latents=z, output_type "latent" and "pt": SD3 (true CFG,
    shift 3), SD3.5-Medium-like (qk-norm, dual attention), FLUX.1-dev-like (embedded guidance, dynamic shift
    mu from the image size, packed latents), FLUX.1-schnell-like (no guidance, no CFG); bar 1e-4 relative;
  - an SAI single file (transformer + first_stage_model VAE) given as `transformer=` loads the same teacher;
  - the two embedded-guidance modes of sid.cfg_velocity (what each network call receives);
  - one-line errors for a pipeline folder that mixes models.
train.py distilling these folders is in test_train_families (test_train.py holds the tiny-teacher runs).
"""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

import sid
import teacher_loaders as tl
import tiny_pipelines as tp
from test_sana import compare, one_line_error

PROMPTS = ["a red fox in the snow", "", "an astronaut riding a horse on the moon, oil painting"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """{case: (folder, diffusers pipeline, our Teacher)} for the four tiny pipelines."""
    root = tmp_path_factory.mktemp("pipelines")
    made = {
        "sd3": tp.sd3_pipeline(root / "sd3"),
        "sd3.5-medium": tp.sd3_pipeline(root / "sd35m", qk_norm="rms_norm", dual_attention_layers=(0, 1)),
        "flux-dev": tp.flux_pipeline(root / "flux"),
        "flux-schnell": tp.flux_pipeline(root / "schnell", guidance_embeds=False),
    }
    return {k: (folder, pipe, tl.load_teacher(str(folder), device="cpu")) for k, (folder, pipe) in made.items()}


def reference(case, pipe, z, steps, guidance, output_type):
    """The pipeline's own result from our unpacked initial noise z (B, 16, h, w), unpacked again for FLUX."""
    B, C, h, w = z.shape
    call = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=8 * h, width=8 * w,
                output_type=output_type)
    with torch.no_grad():
        if case.startswith("flux"):
            from diffusers import FluxPipeline
            packed = FluxPipeline._pack_latents(z.clone(), B, C, h, w)
            out = pipe(latents=packed, max_sequence_length=512, **call).images
            return FluxPipeline._unpack_latents(out, 8 * h, 8 * w, 8) if output_type == "latent" else out
        return pipe(latents=z.clone(), max_sequence_length=77, **call).images


@pytest.mark.parametrize("case,steps,guidance", [("sd3", 1, 7.0), ("sd3", 4, 7.0), ("sd3", 3, 1.0),
                                                 ("sd3.5-medium", 4, 4.5), ("flux-dev", 1, 3.5),
                                                 ("flux-dev", 4, 3.5), ("flux-schnell", 4, 0.0)])
def test_teacher_sample_matches_pipeline(pipelines, case, steps, guidance):
    folder, pipe, teacher = pipelines[case]
    # non-square latents: 48 x 64 px; FLUX's mu depends on the token count, so the size matters
    z = torch.randn(len(PROMPTS), 16, 6, 8, generator=torch.Generator().manual_seed(steps))
    ours = teacher.sample(PROMPTS, z, steps, guidance)
    ref = reference(case, pipe, z, steps, guidance, "latent")
    compare(f"{case} {steps} steps g={guidance}: x0 latents", ours, ref)
    compare(f"{case} {steps} steps g={guidance}: images", (teacher.decode(ours) + 1) / 2,
            reference(case, pipe, z, steps, guidance, "pt"))


def test_teacher_states_the_pipeline(pipelines):
    """Defaults and capabilities come from the folder: steps/guidance of __call__, embedded guidance, CFG policy."""
    sd3, dev, schnell = (pipelines[k][2] for k in ("sd3", "flux-dev", "flux-schnell"))
    assert (sd3.sample_steps, sd3.guidance, sd3.embeds_guidance, sd3.pipeline_cfg) == (28, 7.0, False, True)
    assert (dev.sample_steps, dev.guidance, dev.embeds_guidance, dev.pipeline_cfg) == (28, 3.5, True, False)
    assert (schnell.embeds_guidance, schnell.pipeline_cfg) == (False, False)
    assert sd3.latent_shape(512) == (16, 64, 64) and dev.latent_shape(512) == (16, 64, 64)
    assert sd3.encode_prompts(PROMPTS)["text"].shape[1] == 77 + 77                   # SiD-DiT's T5 length
    assert dev.encode_prompts(PROMPTS)["text"].shape[1] == 512
    one_line_error(ValueError, lambda: dev.latent_shape(520), "not divisible by 16")


def test_sai_single_file_teacher(pipelines, tmp_path):
    """transformer= an SAI file (model.diffusion_model.* + first_stage_model.* VAE) gives the folder's teacher."""
    folder, pipe, teacher = pipelines["sd3.5-medium"]     # qk-norm: the SAI reader takes the head size from ln_q
    ours = {k: v for k, v in teacher.transformer.state_dict().items()}
    sai = tl.to_checkpoint(ours, tl.SD3_ORIGINAL_KEYS)                 # keys carry model.diffusion_model.
    vae = tl.load_kl_vae(os.path.join(folder, "vae"))[0]
    cfg = vae.config
    sai.update({"first_stage_model." + k: v.contiguous() for k, v in
                tl.to_checkpoint(vae.state_dict(), tl.kl_original_keys(cfg)).items()})
    save_file({k: v.contiguous() for k, v in sai.items()}, tmp_path / "sd3_tiny.safetensors")
    rest = tmp_path / "folder_without_transformer"     # text encoders, scheduler, the VAE's config.json only
    shutil.copytree(folder, rest, ignore=shutil.ignore_patterns("transformer"))
    for f in (rest / "vae").glob("*.safetensors"):
        f.unlink()
    single = tl.load_teacher(str(rest), device="cpu", transformer=str(tmp_path / "sd3_tiny.safetensors"))
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    compare("SAI single-file teacher vs folder teacher", single.sample(PROMPTS[:1], z, 2), teacher.sample(PROMPTS[:1], z, 2))
    compare("SAI VAE decode", single.decode(z), teacher.decode(z))


def test_mixed_folder_is_refused(pipelines, tmp_path):
    """An SD3 pipeline folder holding a FLUX transformer: the text widths do not fit; one line says so."""
    mixed = tmp_path / "mixed"
    shutil.copytree(pipelines["sd3"][0], mixed, ignore=shutil.ignore_patterns("transformer"))
    shutil.copytree(os.path.join(pipelines["flux-dev"][0], "transformer"), mixed / "transformer")
    one_line_error(ValueError, lambda: tl.load_teacher(str(mixed), device="cpu"), "mixes models")


class Recorder(torch.nn.Module):
    """A stand-in net that records the batch size and guidance input of every call; v = x * (1 + text mean)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, text, guidance=None):
        self.calls.append((x.shape[0], None if guidance is None else guidance.tolist()))
        return x * (1 + text.mean(dim=(1, 2)))[:, None, None, None]


def test_embedded_guidance_modes():
    """with_cfg (official FLUX recipe): one [uncond; cond] call, guidance input kappa in both halves, true CFG.
    only: one conditional call with guidance input kappa. None: true CFG, no guidance input."""
    x, t = torch.randn(2, 4, 2, 2), torch.full((2,), 0.5)
    cond, uncond = {"text": torch.ones(2, 3, 5)}, {"text": torch.zeros(2, 3, 5)}
    for mode, calls, expected in [("with_cfg", [(4, [4.5] * 4)], x * (1 + 4.5)),
                                  ("only", [(2, [4.5] * 2)], x * 2),
                                  (None, [(4, None)], x * (1 + 4.5))]:
        net = Recorder()
        v = sid.cfg_velocity(net, x, t, cond, uncond, 4.5, embedded=mode)
        print(mode, net.calls)
        assert net.calls == calls
        assert torch.allclose(v, expected)
    with pytest.raises(ValueError):
        sid.cfg_velocity(Recorder(), x, t, cond, uncond, 4.5, embedded="both")


# ----------------------------------------------------------------------------------------------
# train.py distils each family's tiny pipeline folder: one loop, no family branch


def train(folder, out, *extra):
    """Two SiD iterations of the real train.py (a subprocess, as a user runs it); returns its metrics records."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "train.py"), "--teacher", str(folder), "--out", str(out),
           "--max_steps", "2", "--batch", "2", "--num_steps", "2", "--precision", "fp32", "--resolution", "64",
           "--sample_every", "2", "--ckpt_every", "2", "--n_samples", "2", "--grad_checkpointing", "1", *extra]
    r = subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("case,mode", [("sd3", None), ("sd3.5-medium", None), ("flux-dev", "with_cfg"),
                                       ("flux-dev", "only")])
def test_train_py_distils_family(pipelines, tmp_path, case, mode):
    """train.py --teacher <tiny SD3 / SD3.5-M / FLUX.1-dev folder>: finite losses, a labelled grid, a checkpoint, and
    a student file that samples. FLUX runs in both --embedded_guidance modes."""
    folder, _, teacher = pipelines[case]
    out = tmp_path / "run"
    m = train(folder, out, *(["--embedded_guidance", mode] if mode else []))
    print(case, mode, [(r["k"], round(r["loss_fake"], 3), round(r["loss_gen"], 4)) for r in m])
    assert [r["step"] for r in m] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss_fake"], r["loss_gen"], r["gnorm_gen"]])).all() for r in m)
    assert os.path.isfile(out / "samples" / "step000002.png") and os.path.isfile(out / "checkpoint" / "info.json")
    from sample import load_student, student_sample
    G, args = load_student(str(out))
    assert args["embedded_guidance"] == (mode or "with_cfg")
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = student_sample(G, z, teacher.encode_prompts(PROMPTS[:1]), 2, 2)
    assert x0.shape == z.shape and torch.isfinite(x0).all()
    moved = max((a - b).abs().max().item() for a, b in zip(G.state_dict().values(),
                                                            teacher.transformer.state_dict().values()))
    assert moved > 0, "the generator did not train"
