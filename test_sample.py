"""
The teacher samplers of sample.py checked against diffusers, offline, fp32 on CPU.

    HF_HUB_OFFLINE=1 python -m pytest test_sample.py -q -s     # -s prints the numbers

What is compared:
  - sigma grids and timesteps: our flow_match_grid / dpm_flow_grid (through teacher_grid, with each pipeline's
    grid policy) against diffusers `set_timesteps` on the Hub scheduler configs of SD3-Medium, SD3.5-Large,
    FLUX.1-dev (pipeline sigmas and dynamic mu at 512 and 1024 px), FLUX.1-schnell, SANA (DPM-Solver++ and
    flow-euler), plus dynamic SD3, shift_terminal and linear time-shift configs, at 1, 2, 4, 20, 28 steps;
  - trajectories: a fixed velocity field integrated by our Euler and DPM-Solver++ 2M samplers and by the
    diffusers `scheduler.step` loop (<= 1e-6 relative);
  - `load_teacher(tiny SANA folder).sample` then `decode` against SanaPipeline(output_type "latent" and "pt"), with
    the folder's DPM-Solver++ and with FlowMatchEulerDiscreteScheduler swapped in, at 1 and 6 steps, with a prompt
    list containing "" (<= 1e-4 relative); SANA's prompt encoding of "" as a prompt and as the CFG negative;
  - the tiny teacher against a direct Euler loop on t_i = 1 - i/N; the labelled grid; one-line errors.
diffusers is the reference here only; sample.py does not import it.
"""

import inspect
import json
import os
import shutil
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import teacher_loaders as tl
from test_sana import compare, one_line_error, pipeline  # noqa: F401  (pipeline: the tiny SanaPipeline fixture)

# Hub scheduler/scheduler_config.json files (the keys that are there; "_diffusers_version" left out)
SD3_MEDIUM = {  # stabilityai/stable-diffusion-3-medium-diffusers
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SD35_LARGE = {  # stabilityai/stable-diffusion-3.5-large (and -medium)
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "invert_sigmas": False, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "shift_terminal": None, "use_beta_sigmas": False, "use_dynamic_shifting": False, "use_exponential_sigmas": False,
    "use_karras_sigmas": False}
FLUX_DEV = {  # black-forest-labs/FLUX.1-dev
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True}
FLUX_SCHNELL = {**FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}   # black-forest-labs/FLUX.1-schnell
SANA_DPM = {  # Efficient-Large-Model/Sana_*_diffusers (architectures.md section 4.9)
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995, "euler_at_final": False,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lambda_min_clipped": -float("inf"), "lower_order_final": True,
    "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0, "thresholding": False,
    "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False,
    "use_flow_sigmas": True, "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None}
SANA_EULER = {  # diffusers scripts/convert_sana_to_diffusers.py --scheduler_type flow-euler
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

# (name, config, pipeline policy (sigma_grid, dynamic_mu), image tokens, which diffusers pipeline module's
# calculate_shift the pipeline uses)
SD3_POLICY, FLUX_POLICY, SANA_POLICY = ("scheduler", True), ("linspace", True), ("scheduler", False)
CASES = [
    ("SD3-Medium", SD3_MEDIUM, SD3_POLICY, 4096),
    ("SD3.5-Large", SD35_LARGE, SD3_POLICY, 4096),
    ("SD3.5 dynamic", {**SD35_LARGE, "use_dynamic_shifting": True}, SD3_POLICY, 1024),
    ("FLUX.1-dev 512px", FLUX_DEV, FLUX_POLICY, 1024),
    ("FLUX.1-dev 1024px", FLUX_DEV, FLUX_POLICY, 4096),
    ("FLUX.1-schnell", FLUX_SCHNELL, FLUX_POLICY, 4096),
    ("SANA DPM-Solver++", SANA_DPM, SANA_POLICY, 256),
    ("SANA flow-euler", SANA_EULER, SANA_POLICY, 256),
    ("shift_terminal, linear", {**FLUX_DEV, "shift_terminal": 0.1, "time_shift_type": "linear"}, FLUX_POLICY, 2000),
]
STEPS = [1, 2, 4, 20, 28]


def reference_grid(config, policy, steps, tokens):
    """(scheduler after set_timesteps, mu) exactly as the diffusers pipeline with this policy calls it."""
    import diffusers
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as sd3_shift
    sched = getattr(diffusers, config["_class_name"]).from_config(config)
    c = sched.config
    kwargs = {}
    if policy == FLUX_POLICY:     # FluxPipeline: sigmas linspace(1, 1/N, N) and mu, always
        kwargs["mu"] = flux_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                  c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        if not c.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    elif policy == SD3_POLICY and c.get("use_dynamic_shifting", None):   # StableDiffusion3Pipeline
        kwargs["mu"] = sd3_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                 c.get("base_shift", 0.5), c.get("max_shift", 1.16))
    if "sigmas" in kwargs:
        sched.set_timesteps(sigmas=kwargs.pop("sigmas"), **kwargs)
    else:
        sched.set_timesteps(steps, **kwargs)
    return sched, kwargs.get("mu")


@pytest.mark.parametrize("name,config,policy,tokens", CASES, ids=[c[0] for c in CASES])
def test_grid_matches_diffusers(name, config, policy, tokens):
    worst = 0.0
    teacher = SimpleNamespace(scheduler=config, sigma_grid=policy[0], dynamic_mu=policy[1])
    for steps in STEPS:
        if steps == 1 and config.get("shift_terminal"):     # diffusers: a NaN sigma; ours: a one-line error
            one_line_error(ValueError, lambda: sample.teacher_grid(teacher, steps, tokens), "shift_terminal")
            continue
        ref, mu = reference_grid(config, policy, steps, tokens)
        sigmas, times = sample.teacher_grid(teacher, steps, tokens)
        n_train = config["num_train_timesteps"]
        assert sigmas.dtype == ref.sigmas.dtype == torch.float32 and sigmas.shape == ref.sigmas.shape == (steps + 1,)
        assert torch.equal(sigmas, ref.sigmas), f"{name}, {steps} steps: {sigmas.tolist()} vs {ref.sigmas.tolist()}"
        assert torch.equal(times, ref.timesteps / n_train)          # what the transformer receives, in flow time
        if mu is not None:
            assert sample.calculate_shift(tokens, sample.scheduler_config(config)) == pytest.approx(mu, abs=1e-12)
        worst = max(worst, (sigmas - ref.sigmas).abs().max().item())
    last = sigmas[:-1].tolist()
    print(f"{name}: sigmas equal diffusers at {STEPS} steps (max diff {worst:.1e}); {len(last)} steps: "
          f"first {last[0]:.6f}, last {last[-1]:.6f}; timesteps {ref.timesteps[:2].tolist()} ({ref.timesteps.dtype})")


def test_dpm_timesteps_are_truncated_integers():
    """SANA's network sees int64(1000 sigma): 999 at the first step, not 999.67 (diffusers rounds by truncation)."""
    sigmas, times = sample.dpm_flow_grid(SANA_DPM, 20)
    print(f"SANA DPM 20 steps: sigma_0 {sigmas[0].item():.6f}, t_0 {times[0].item()}, "
          f"sigma_1 {sigmas[1].item():.6f}, t_1 {times[1].item()}")
    assert times.dtype == torch.int64 and times[0].item() == 999
    assert sigmas[0].item() == pytest.approx(0.99967, abs=1e-5)
    assert torch.all(times <= 1000 * sigmas[:-1].double())


# ----------------------------------------------------------------------------------------------
# Trajectories: a fixed velocity field through our samplers and through diffusers' step loop


def velocity(x, t):
    """A smooth, nonlinear, time-dependent field: timestep rounding and step order both show."""
    return torch.sin(2 * x + 5 * t.view(-1, 1, 1, 1)) - 0.5 * x + t.view(-1, 1, 1, 1)


def reference_trajectory(config, steps, z, **grid):
    import diffusers
    sched = getattr(diffusers, config["_class_name"]).from_config(config)
    sched.set_timesteps(steps, **grid) if "sigmas" not in grid else sched.set_timesteps(**grid)
    x = z.clone()
    for t in sched.timesteps:
        v = velocity(x, (t / config["num_train_timesteps"]).expand(z.shape[0]))
        x = sched.step(v, t, x).prev_sample
    return x


@pytest.mark.parametrize("kind", ["Euler (SD3.5)", "Euler (FLUX-dev, sigmas + mu)", "DPM-Solver++ 2M (SANA)",
                                  "DPM-Solver++ 1 (order 1)"])
def test_trajectory_matches_diffusers_step(kind):
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    for steps in [1, 2, 6, 20]:
        if kind.startswith("Euler (SD3"):
            config, grid = SD35_LARGE, {}
            sigmas, times = sample.flow_match_grid(config, steps)
            ours = sample.euler_sample(velocity, z, sigmas, times / 1000)
        elif kind.startswith("Euler (FLUX"):
            config = FLUX_DEV
            mu = sample.calculate_shift(4096, sample.scheduler_config(config))
            grid = dict(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            sigmas, times = sample.flow_match_grid(config, steps, **grid)
            ours = sample.euler_sample(velocity, z, sigmas, times / 1000)
        else:
            config, grid = (SANA_DPM if "2M" in kind else {**SANA_DPM, "solver_order": 1}), {}
            sigmas, times = sample.dpm_flow_grid(config, steps)
            ours = sample.dpm_solver_sample(velocity, z, sigmas, times / 1000, config["solver_order"])
        ref = reference_trajectory(config, steps, z, **grid)
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        print(f"{kind}, {steps} steps: max rel err {rel:.1e}, ours {ours.flatten()[:3].tolist()}, "
              f"ref {ref.flatten()[:3].tolist()}")
        assert rel <= 1e-6, f"{kind}, {steps} steps: relative error {rel:.2e}"


# ----------------------------------------------------------------------------------------------
# Pipeline level: Teacher.sample + decode against SanaPipeline, both schedulers

PROMPTS = ["A Red Fox in the snow ", "", "a cat on a mat"]


@pytest.fixture(scope="module")
def sana_pipelines(pipeline, tmp_path_factory):
    """{scheduler: (our Teacher, diffusers SanaPipeline)}: the tiny folder as shipped (DPM-Solver++) and a copy
    with FlowMatchEulerDiscreteScheduler(shift 2.5) swapped into scheduler/."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline
    folder, pipe = pipeline
    euler_folder = str(tmp_path_factory.mktemp("tiny_sana_euler") / "pipe")
    shutil.copytree(folder, euler_folder)
    euler = FlowMatchEulerDiscreteScheduler(shift=2.5)
    shutil.rmtree(os.path.join(euler_folder, "scheduler"))
    euler.save_pretrained(os.path.join(euler_folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json")) as f:   # the index names the scheduler class too
        index = json.load(f)
    with open(os.path.join(euler_folder, "model_index.json"), "w") as f:
        json.dump({**index, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}, f)
    load = lambda path: tl.load_teacher(path, device="cpu", text_dtype=torch.float32)   # noqa: E731
    return {"DPMSolverMultistepScheduler": (load(folder), pipe),
            "FlowMatchEulerDiscreteScheduler": (load(euler_folder), SanaPipeline(**{**pipe.components,
                                                                                   "scheduler": euler}))}


def test_sana_prompt_encoding_of_empty_prompts(pipeline, sana_pipelines):
    """"" among the prompts gets the instruction (SanaPipeline prefixes every prompt); the CFG negative does not."""
    from diffusers import SanaPipeline
    teacher = sana_pipelines["DPMSolverMultistepScheduler"][0]
    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    emb, mask, neg, neg_mask = pipeline[1].encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                                         negative_prompt="", complex_human_instruction=chi)
    got, got_neg = teacher.encode_prompts(PROMPTS), teacher.encode_prompts([""], negative=True)
    compare("prompts with '' (instruction on every prompt)", got["text"], emb)
    compare("CFG negative '' (no instruction)", got_neg["text"], neg[:1])
    assert torch.equal(got["text_mask"], mask) and torch.equal(got_neg["text_mask"], neg_mask[:1])
    assert (got["text"][1] - got_neg["text"][0]).abs().max() > 1e-2    # the two "" encodings really differ


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_teacher_sample_matches_sana_pipeline(sana_pipelines, scheduler):
    teacher, pipe = sana_pipelines[scheduler]
    assert teacher.scheduler["_class_name"] == scheduler == type(pipe.scheduler).__name__
    z = torch.randn(len(PROMPTS), *teacher.latent_shape(), generator=torch.Generator().manual_seed(3))
    for steps, guidance in [(1, 4.5), (6, 4.5), (2, 1.0)]:
        call = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                    use_resolution_binning=False)
        with torch.no_grad():
            ref = pipe(latents=z.clone(), output_type="latent", **call).images
            ref_img = pipe(latents=z.clone(), output_type="pt", **call).images          # [0, 1]
        ours = teacher.sample(PROMPTS, z, steps, guidance)
        img = (teacher.decode(ours) + 1) / 2
        label = sample.teacher_label(teacher, steps, guidance)[0]
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        print(f"{label}: latents max rel err {rel:.1e}")
        compare(f"{label}: x0 latents", ours, ref)
        compare(f"{label}: decoded images", img, ref_img)


def test_old_grid_is_not_the_pipeline(sana_pipelines):
    """The grid the repo used before (Euler on shift(1 - i/N)) is far from SanaPipeline: the bar can tell."""
    teacher, pipe = sana_pipelines["DPMSolverMultistepScheduler"]
    z = torch.randn(len(PROMPTS), *teacher.latent_shape(), generator=torch.Generator().manual_seed(3))
    u = torch.linspace(1, 0, 7)
    old = 2.5 * u / (1 + 1.5 * u)
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, latents=z.clone(), output_type="latent", num_inference_steps=6, guidance_scale=4.5,
                   height=32, width=32, use_resolution_binning=False).images
        v = sample.guided_velocity(teacher, PROMPTS, 4.5, z.device)
        x = sample.euler_sample(v, z, old, old[:-1])
    rel = ((x - ref).abs().max() / ref.abs().max()).item()
    print(f"old grid vs SanaPipeline at 6 steps: max rel err {rel:.2f}")
    assert rel > 1e-2


# ----------------------------------------------------------------------------------------------
# The tiny teacher keeps its grid; grids, errors


def test_tiny_teacher_keeps_its_euler_grid():
    teacher = tl.load_teacher("tiny")
    prompts = ["a red circle at the top left", "a blue square in the center", "", "a white triangle at the top right"]
    z = torch.randn(len(prompts), *teacher.latent_shape(), generator=torch.Generator().manual_seed(1))
    net, g = teacher.transformer, teacher.guidance
    cond = teacher.encode_prompts(prompts)
    uncond = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in teacher.encode_prompts([""]).items()}
    for steps in [1, 5]:
        x = z.clone()
        with torch.no_grad():
            for i in range(steps):     # Euler on t_i = 1 - i/N with CFG, written out
                t, t_next = 1 - i / steps, 1 - (i + 1) / steps
                tt = torch.full((len(prompts),), t)
                v_c, v_u = net(x, tt, **cond), net(x, tt, **uncond)
                x = x + (t_next - t) * (v_u + g * (v_c - v_u))
        ours = teacher.sample(prompts, z, steps)
        compare(f"tiny teacher, {steps} Euler steps on 1 - i/N", ours, x)
    assert sample.teacher_label(teacher, teacher.sample_steps)[0] == "teacher Euler 32 steps, CFG 4.5, NFE 64"


def test_labelled_grid(tmp_path):
    rows = [torch.rand(3, 3, 32, 32) * 2 - 1, -torch.ones(3, 3, 32, 32)]
    labels = ["student 1 step, NFE 1", "teacher DPM-Solver++ 20 steps, CFG 4.5, NFE 40"]
    prompts = ["a red circle at the top left", "", "a very long prompt " * 10]
    path = str(tmp_path / "grid.png")
    sample.save_grid(rows, labels, prompts, path, scale=4)
    img = np.asarray(Image.open(path).convert("L")).astype(int)
    H, W = img.shape
    left, top = W - 3 * (128 + 2), H - 2 * (128 + 2)
    print(f"grid {W}x{H}: label column {left} px, prompt header {top} px")
    assert left >= 128 and top >= 14
    assert (img[top:top + 128, :left] < 128).any() and (img[:top, left:left + 128] < 128).any()   # text drawn
    assert (img[top + 130:top + 258, left:left + 128] == 0).all()                                # tiles pasted
    one_line_error(ValueError, lambda: sample.save_grid(rows, labels[:1], prompts, path), "one label per row")


def test_bad_scheduler_configs():
    one_line_error(ValueError, lambda: sample.flow_match_grid({**SD35_LARGE, "use_karras_sigmas": True}, 4),
                   "use_karras_sigmas=True", "not implemented")
    one_line_error(ValueError, lambda: sample.flow_match_grid({**SD35_LARGE, "stochastic_sampling": True}, 4),
                   "stochastic_sampling")
    one_line_error(ValueError, lambda: sample.dpm_flow_grid({**SANA_DPM, "solver_order": 3}, 4), "solver_order=3")
    one_line_error(ValueError, lambda: sample.dpm_flow_grid({**SANA_DPM, "use_flow_sigmas": False}, 4),
                   "use_flow_sigmas=False")
    one_line_error(ValueError, lambda: sample.flow_match_grid(FLUX_DEV, 4), "use_dynamic_shifting", "mu")
    unipc = SimpleNamespace(scheduler={"_class_name": "UniPCMultistepScheduler"}, sigma_grid="scheduler",
                            dynamic_mu=False)
    one_line_error(ValueError, lambda: sample.teacher_grid(unipc, 4, 256), "UniPCMultistepScheduler",
                   "not implemented")
