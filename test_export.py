"""
export.py on tiny pipelines of each family, offline, fp32 on CPU: the exported folder loaded and run by stock
diffusers, as a new user would.

    HF_HUB_OFFLINE=1 python -m pytest test_export.py -q -s        # -s prints both sides and the max differences

Teachers: a tiny SANA pipeline (test_sana's, with NVlabs' 32-wide heads), an SD3.5-Medium-like pipeline (qk-norm,
dual attention) and a FLUX.1-dev-like one (embedded guidance) from tiny_pipelines.py. Students: each teacher's
transformer with every weight perturbed (so student != teacher), saved as a train.py run folder with a raw and an
EMA generator file. What is checked:
  - <Family>Transformer2DModel.from_pretrained(out/transformer) holds exactly our generator's weights (the EMA by
    default, the raw one with raw=True), and our loader reads the folder back to the same config;
  - DiffusionPipeline.from_pretrained(out) is the teacher's pipeline class with the stochastic FlowMatch scheduler;
    called with the model card's keyword arguments, the same initial latents and the same noise draws, it gives our
    student's 1-step and 4-step latents (<= 1e-5 relative) and images; SanaPipeline with generator=seed gives
    sample.py's student_sample(seed); a 'ddim'-noise student runs as the deterministic Euler scheduler;
  - the --single_file export loads back through our loader (exact weights) and through diffusers' from_single_file
    (SANA .pth, SAI SD3 transformer and its first_stage_model VAE) to the same weights; FLUX's BFL file through
    from_single_file only at width 3072, which diffusers' converter hard-codes (opt-in: SID_SLOW_TESTS=1, ~2 min);
  - the config writers at full size: diffusers' model built from the written config.json has our module's keys and
    shapes; a config diffusers cannot express is refused;
  - bad input: a student of another teacher, an existing --out (untouched without --force, replaced with it), a
    sampler or layout no stock pipeline reproduces; one-line errors, no half-written folder left behind.
diffusers is the reference here only; export.py does not import it.
"""

import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import export
import sample
import sid
import teacher_loaders as tl
import tiny_pipelines as tp
from model import FLUX_CONFIGS, SANA_CONFIGS, SD3_CONFIGS, FluxConfig, SanaConfig, SD3Config, build_model
from test_sana import one_line_error, pipeline, tiny_diffusers_sana  # noqa: F401  (pipeline: tiny SanaPipeline)

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ["sana", "sd3", "flux"]
PROMPTS = ["a red fox in the snow", "an astronaut riding a horse on the moon, oil painting"]
TINY_AXES = {16: (4, 6, 6)}     # RoPE axes of the tiny FLUX's 16-wide heads (a BFL file does not store them)
RUN = dict(num_steps=4, t_init=1.0, noise="fresh", resolution=None, seed=0)   # the train.py args export reads


def perturbed(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def write_run(folder, teacher, cfg, state, ema=True, **args):
    """A train.py run folder: generator.safetensors (raw) and generator_ema.safetensors, two different students."""
    os.makedirs(folder, exist_ok=True)
    run = {**RUN, "teacher": teacher, **args}
    raw = perturbed(state, 1)
    sample.save_student(os.path.join(folder, "generator.safetensors"), raw, cfg, run, 100)
    if ema:
        ema = perturbed(state, 2)
        sample.save_student(os.path.join(folder, "generator_ema.safetensors"), ema, cfg, run, 100, weights="ema")
    return str(folder), raw, ema


@pytest.fixture(scope="module")
def world(pipeline, tmp_path_factory):
    """{family: dict(teacher folder, run folder, raw / EMA states, our teacher, export folder, single file)}."""
    root = tmp_path_factory.mktemp("export")
    sana = root / "teachers" / "sana"           # NVlabs heads are 32 wide: the .pth stores no head count
    shutil.copytree(pipeline[0], sana, ignore=shutil.ignore_patterns("transformer"))
    tiny_diffusers_sana(seed=5, caption_channels=32, attention_head_dim=32, cross_attention_head_dim=32,
                        cross_attention_dim=64).save_pretrained(sana / "transformer")
    folders = {"sana": str(sana),
               "sd3": tp.sd3_pipeline(root / "teachers" / "sd3", qk_norm="rms_norm", dual_attention_layers=(0,))[0],
               "flux": tp.flux_pipeline(root / "teachers" / "flux")[0]}
    world = {}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tl, "FLUX_ROPE_AXES", TINY_AXES)
        for family, folder in folders.items():
            net = tl.load_transformer(folder)
            run, raw, ema = write_run(root / "runs" / family, folder, net.config, net.state_dict())
            out = str(root / "out" / f"{family}-sid")
            if family == "sana":        # through the command line, as a user runs it
                p = subprocess.run([sys.executable, "export.py", "--ckpt", run, "--out", out, "--single_file"],
                                   cwd=HERE, capture_output=True, text=True, timeout=300,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
                assert p.returncode == 0, p.stderr[-2000:]
                print(p.stdout.strip())
                single = os.path.join(out, "sana-sid.pth")
            else:                       # in process: FLUX's file needs the tiny RoPE axes, SD3 is written in shards
                single = export.export(run, out, single_file=True,
                                       shard_bytes=100_000 if family == "sd3" else export.SHARD_BYTES)
            world[family] = dict(folder=folder, run=run, raw=raw, ema=ema, out=out, single=single,
                                 teacher=tl.load_teacher(folder, device="cpu"), net=net, root=root)
    return world


def diffusers_keys(cfg):
    return tl.DIFFUSERS_TRANSFORMERS[export.LAYOUTS[type(cfg)].config(cfg)["_class_name"]][1](cfg)


def same_weights(name, ours, diffusers_state, cfg):
    """diffusers' state dict mapped to our keys equals `ours` exactly."""
    mapped, _, unmatched = tl.map_keys(diffusers_state, diffusers_keys(cfg))
    assert not unmatched and mapped.keys() == ours.keys(), (unmatched[:3], set(mapped) ^ set(ours))
    worst = max((mapped[k] - ours[k]).abs().max().item() for k in ours)
    print(f"{name}: {len(ours)} tensors, max |diff| {worst:.1e}")
    assert worst == 0


# ----------------------------------------------------------------------------------------------
# transformer/: stock from_pretrained holds our generator


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_from_pretrained_is_the_student(world, family):
    import diffusers
    w = world[family]
    cfg = w["net"].config
    with open(os.path.join(w["out"], "transformer", "config.json")) as f:
        kind = json.load(f)["_class_name"]
    ref = getattr(diffusers, kind).from_pretrained(os.path.join(w["out"], "transformer"))
    teacher_gap = max((w["ema"][k] - v).abs().max().item() for k, v in w["net"].state_dict().items())
    assert teacher_gap > 0.1                                     # the student is not the teacher
    same_weights(f"{kind}.from_pretrained vs our EMA student", w["ema"], ref.state_dict(), cfg)
    assert tl.load_transformer(os.path.join(w["out"], "transformer")).config == cfg
    if family == "sd3":                                          # written in shards, read through the index
        assert "diffusion_pytorch_model.safetensors.index.json" in os.listdir(os.path.join(w["out"], "transformer"))


def test_raw_generator_on_request(world, tmp_path):
    w = world["sana"]
    export.export(w["run"], tmp_path / "raw", raw=True)
    from diffusers import SanaTransformer2DModel
    ref = SanaTransformer2DModel.from_pretrained(tmp_path / "raw" / "transformer")
    same_weights("raw=True: from_pretrained vs our raw generator", w["raw"], ref.state_dict(), w["net"].config)


# ----------------------------------------------------------------------------------------------
# The whole pipeline, as a user runs it, against our student's sampler


@pytest.fixture(scope="module")
def pipes(world):
    from diffusers import DiffusionPipeline
    return {family: DiffusionPipeline.from_pretrained(w["out"]) for family, w in world.items()}


def run_both(w, pipe, k, seed, output_type="latent", z_seed=0):
    """(ours, the pipeline's) from the same initial latents z and the same noise draws: both draw each step's noise
    from the global RNG seeded alike, ours in the pipeline's shape (FLUX: packed tokens) and unpacked."""
    from diffusers import FluxPipeline
    teacher = w["teacher"]
    G, run = sample.load_student(w["run"])
    C, h, wd = teacher.latent_channels, 8, 16                   # non-square: the packing order shows
    z = torch.randn(len(PROMPTS), C, h, wd, generator=torch.Generator().manual_seed(z_seed))
    H, W = teacher.vae_factor * h, teacher.vae_factor * wd
    packed = "Flux" in type(pipe).__name__
    pack = (lambda x: FluxPipeline._pack_latents(x, *x.shape)) if packed else (lambda x: x)
    unpack = (lambda x: FluxPipeline._unpack_latents(x, H, W, teacher.vae_factor)) if packed else (lambda x: x)
    with open(os.path.join(w["out"], "model_index.json")) as f:
        pipeline_name = json.load(f)["_class_name"]
    _, sigmas = export.sampler(run["num_steps"], run["t_init"], run["noise"], k)      # what the card shows
    kwargs = export.call_kwargs(G.config, pipeline_name, run, sigmas)
    extra = dict(use_resolution_binning=False) if "Sana" in pipeline_name else {}
    torch.manual_seed(seed)
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, latents=pack(z.clone()), output_type=output_type, height=H, width=W, **kwargs,
                   **extra).images
    ref = unpack(ref) if output_type == "latent" else ref
    cond = sid.generator_inputs(teacher.encode_prompts(PROMPTS), getattr(G.config, "guidance_embeds", False))
    torch.manual_seed(seed)
    ours = sid.generate(G, z, cond, k, run["num_steps"], run["t_init"], run["noise"],
                        randn=lambda like: unpack(torch.randn(pack(like).shape)))
    return (ours if output_type == "latent" else (teacher.decode(ours) + 1) / 2), ref, kwargs


def rel_err(name, ours, ref):
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"{name}: max rel err {rel:.1e}, ours {ours.flatten()[:3].tolist()}, ref {ref.flatten()[:3].tolist()}")
    return rel


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_pipeline_reproduces_student(world, pipes, family):
    w, pipe = world[family], pipes[family]
    with open(os.path.join(w["folder"], "model_index.json")) as f:
        assert type(pipe).__name__ == json.load(f)["_class_name"]              # the teacher's own pipeline class
    with open(os.path.join(w["out"], "model_index.json")) as f:                 # library classes only, no custom code
        assert {v[0] for v in json.load(f).values() if isinstance(v, list) and v[0]} == {"diffusers", "transformers"}
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.stochastic_sampling and pipe.scheduler.config.shift == 1.0
    for k in (1, 4):
        ours, ref, kwargs = run_both(w, pipe, k, seed=k)
        assert rel_err(f"{family} {k} step(s) {kwargs}: latents", ours, ref) <= 1e-5
    ours, ref, _ = run_both(w, pipe, 4, seed=7, output_type="pt")
    assert rel_err(f"{family} 4 steps: decoded images", ours, ref) <= 1e-5
    other, _, _ = run_both(w, pipe, 4, seed=8)                 # same latents, other noise draws: other samples
    assert rel_err(f"{family} 4 steps, noise seed 8 vs 4 (must differ)", other, run_both(w, pipe, 4, seed=4)[0]) > 1e-2


def test_sana_generator_gives_sample_py_samples(world, pipes):
    """SanaPipeline passes its `generator` to the scheduler: with generator=seed it draws exactly sample.py's noise."""
    w, pipe = world["sana"], pipes["sana"]
    G, run = sample.load_student(w["run"])
    z = torch.randn(len(PROMPTS), *w["teacher"].latent_shape(), generator=torch.Generator().manual_seed(3))
    ours = sample.student_sample(G, z, w["teacher"].encode_prompts(PROMPTS), 4, 4, seed=5)
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, latents=z.clone(), generator=torch.Generator().manual_seed(5), output_type="latent",
                   use_resolution_binning=False, **export.call_kwargs(G.config, "SanaPipeline", run, [1, .75, .5, .25])
                   ).images
    assert rel_err("SanaPipeline(generator=seed 5) vs sample.student_sample(seed=5), 4 steps", ours, ref) <= 1e-5


def test_ddim_student_runs_deterministic_euler(world, tmp_path):
    from diffusers import DiffusionPipeline
    w = world["sd3"]
    run, _, _ = write_run(tmp_path / "run", w["folder"], w["net"].config, w["net"].state_dict(), noise="ddim")
    export.export(run, tmp_path / "out")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe.scheduler.config.stochastic_sampling is False
    ours, ref, _ = run_both({**w, "run": run, "out": str(tmp_path / "out")}, pipe, 4, seed=2)
    assert rel_err("sd3 'ddim' student, 4 deterministic Euler steps", ours, ref) <= 1e-5


def test_model_card(world):
    w = world["flux"]
    with open(os.path.join(w["out"], "README.md")) as f:
        card = f.read()
    print(card)
    kwargs = export.call_kwargs(w["net"].config, "FluxPipeline", {}, [1.0, 0.75, 0.5, 0.25])
    assert "sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1.0, max_sequence_length=512" in card
    assert kwargs == dict(sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1.0, max_sequence_length=512)
    assert f'DiffusionPipeline.from_pretrained("{os.path.basename(w["out"])}"' in card
    assert "stochastic_sampling=True" in card and "teacher's licence applies" in card
    assert w["folder"] in card and "the EMA of the generator" in card and "flux-sid.safetensors" in card
    assert "| 2 | [1.0, 0.75] |" in card
    sd3 = open(os.path.join(world["sd3"]["out"], "README.md")).read()
    assert "max_sequence_length=77" in sd3          # the T5 length SD3 students are distilled with, not 256
    assert "max_sequence_length" not in open(os.path.join(world["sana"]["out"], "README.md")).read()
    assert export.sampler(3, 1.0, "fresh", 3)[1] == [1.0, 1 - 1 / 3, 1 - 2 / 3]     # K = 3: t_i = 1 - i/3
    assert export.call_kwargs(w["net"].config, "FluxPipeline", {"resolution": 512}, [1.0])["height"] == 512
    names = {n for _, dirs, files in os.walk(w["out"]) for n in dirs + files}
    print(sorted(names))
    assert not [n for n in names if n.endswith((".bin", ".pth", ".pt", ".ckpt", ".pkl"))]   # no pickles


# ----------------------------------------------------------------------------------------------
# --single_file: our loader and diffusers' from_single_file


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip(world, family, monkeypatch):
    import diffusers
    w = world[family]
    cfg = w["net"].config
    monkeypatch.setattr(tl, "FLUX_ROPE_AXES", TINY_AXES)
    print(f"{family}: {os.path.basename(w['single'])}")
    ours = tl.load_transformer(w["single"], cross_heads=cfg.cross_heads if family == "sana" else None)
    assert ours.config == (cfg if family != "sd3" else SD3Config(**{**vars(cfg), "sample_size": 128}))
    worst = max((ours.state_dict()[k] - v).abs().max().item() for k, v in w["ema"].items())
    print(f"our loader on the single file: max |diff| {worst:.1e}")
    assert worst == 0
    if family == "flux":   # diffusers' BFL converter hard-codes width 3072 (test_flux checks our table against it)
        return
    kind = export.LAYOUTS[type(cfg)].config(cfg)["_class_name"]
    ref = getattr(diffusers, kind).from_single_file(w["single"], config=w["out"], subfolder="transformer",
                                                    local_files_only=True)
    same_weights(f"{kind}.from_single_file", w["ema"], ref.state_dict(), cfg)
    if family == "sd3":    # the SAI file carries the teacher's VAE as first_stage_model.*
        vae = diffusers.AutoencoderKL.from_single_file(w["single"], config=w["out"], subfolder="vae",
                                                       local_files_only=True)
        folder_vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(w["out"], "vae"))
        assert all(torch.equal(v, folder_vae.state_dict()[k]) for k, v in vae.state_dict().items())
        ours_vae = tl.load_kl_vae(w["single"], prefix="first_stage_model.", config=tl.load_kl_vae(
            os.path.join(w["out"], "vae"))[0].config)[0]
        z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            decoded = folder_vae.decode(z).sample
            assert rel_err("our loader's SAI-file VAE decode vs diffusers' vae/", ours_vae.decode(z), decoded) <= 1e-5


@pytest.mark.skipif(not os.environ.get("SID_SLOW_TESTS"), reason="FLUX at width 3072: 531 M parameters, ~2 min, "
                    "~7 GB; set SID_SLOW_TESTS=1 to run it")
def test_flux_from_single_file_at_full_width(tmp_path):
    """diffusers' BFL converter hard-codes FLUX's width (3072), so a tiny FLUX cannot go through it: a 3072-wide
    student with 1 double and 1 single block does."""
    from diffusers import FluxTransformer2DModel
    folder = tp.flux_pipeline(tmp_path / "teacher", num_attention_heads=24, attention_head_dim=128, num_layers=1,
                              num_single_layers=1, axes_dims_rope=(16, 56, 56))[0]
    net = tl.load_transformer(folder)
    cfg = net.config
    run, raw, _ = write_run(tmp_path / "run", folder, cfg, net.state_dict(), ema=False)
    del net
    single = export.export(run, tmp_path / "out", single_file=True)
    ref = FluxTransformer2DModel.from_single_file(single, config=str(tmp_path / "out"), subfolder="transformer",
                                                  local_files_only=True)
    print(f"{sum(v.numel() for v in raw.values()) / 1e6:.1f} M parameters")
    same_weights("FluxTransformer2DModel.from_single_file (width 3072)", raw, ref.state_dict(), cfg)


# ----------------------------------------------------------------------------------------------
# Config writers at full size


PRESETS = [*SANA_CONFIGS.items(), *SD3_CONFIGS.items(), *FLUX_CONFIGS.items()]


@pytest.mark.parametrize("name,cfg", PRESETS, ids=[p[0] for p in PRESETS])
def test_config_writer_builds_our_architecture(name, cfg):
    """The written config.json builds a diffusers model (meta device) with exactly our module's keys and shapes."""
    import diffusers
    d = export.diffusers_config(cfg, f"{name}/transformer/config.json")
    with torch.device("meta"):
        ref = getattr(diffusers, d["_class_name"])(**{k: v for k, v in d.items() if not k.startswith("_")})
        own = build_model(cfg).state_dict()
    mapped, _, unmatched = tl.map_keys(ref.state_dict(), diffusers_keys(cfg), {k: v.shape for k, v in own.items()})
    print(f"{name}: {d['_class_name']} with {len(mapped)} tensors, {sum(v.numel() for v in own.values()) / 1e9:.4f} B")
    assert not unmatched and mapped.keys() == own.keys()
    assert all(mapped[k].shape == v.shape for k, v in own.items())


def test_config_writer_refuses_what_diffusers_cannot_hold():
    one_line_error(ValueError, lambda: export.diffusers_config(FluxConfig(mlp_ratio=3.0), "x"), "mlp_ratio 3.0 vs 4.0",
                   "FluxTransformer2DModel")
    one_line_error(ValueError, lambda: export.diffusers_config(SD3Config(time_scale=1.0), "x"), "time_scale")
    one_line_error(ValueError, lambda: export.diffusers_config(SanaConfig(guidance_embeds=True), "x"), "Sana-Sprint")


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs(world, pipeline, tmp_path):
    sana, sd3 = world["sana"], world["sd3"]
    one_line_error(ValueError, lambda: export.export(sana["run"], tmp_path / "outs" / "a", teacher=sd3["folder"]),
                   "does not match teacher", "SanaConfig vs SD3Config", "another teacher")
    deeper = tmp_path / "sd3_deeper"                     # same family, another size
    shutil.copytree(sd3["folder"], deeper)
    config = json.load(open(deeper / "transformer" / "config.json"))
    json.dump({**config, "num_layers": 4}, open(deeper / "transformer" / "config.json", "w"))
    one_line_error(ValueError, lambda: export.export(sd3["run"], tmp_path / "outs" / "b", teacher=str(deeper)),
                   "depth 3 vs 4", str(deeper))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    one_line_error(FileExistsError, lambda: export.export(sana["run"], existing), "exists", "--force")
    assert os.listdir(existing) == ["keep.txt"]
    export.export(sana["run"], existing, force=True)
    one_line_error(ValueError, lambda: export.export(sana["run"], sana["run"], force=True), "export reads from")
    one_line_error(ValueError, lambda: export.export(sana["run"], os.path.dirname(sana["folder"]), force=True),
                   "export reads from")
    assert os.path.isfile(os.path.join(sana["run"], "generator_ema.safetensors"))
    assert "keep.txt" not in os.listdir(existing) and os.path.isfile(existing / "model_index.json")
    head8 = tmp_path / "head8"                           # test_sana's tiny pipeline: 8-wide heads; NVlabs's are 32
    net = tl.load_transformer(pipeline[0])
    run, _, _ = write_run(head8, pipeline[0], net.config, net.state_dict())
    one_line_error(ValueError, lambda: export.export(run, tmp_path / "outs" / "c", single_file=True),
                   "no known cross-attention head count", "without --single_file")
    head16 = tmp_path / "head16"                         # 4 heads of 16: a .pth reads back as 2 heads of 32
    shutil.copytree(sana["folder"], head16, ignore=shutil.ignore_patterns("transformer"))
    tiny_diffusers_sana(seed=6, caption_channels=32, num_attention_heads=4, attention_head_dim=16,
                        cross_attention_head_dim=32, cross_attention_dim=64).save_pretrained(head16 / "transformer")
    net16 = tl.load_transformer(head16)
    run, _, _ = write_run(tmp_path / "run16", str(head16), net16.config, net16.state_dict())
    one_line_error(ValueError, lambda: export.export(run, tmp_path / "outs" / "c", single_file=True),
                   "num_heads 4 vs 2; head_dim 16 vs 32", "without --single_file")
    cases = [
        (ValueError, dict(ckpt=write_run(tmp_path / "fixed", sana["folder"], sana["net"].config,
                                         sana["net"].state_dict(), noise="fixed")[0]), ["--noise fixed"]),
        (ValueError, dict(ckpt=write_run(tmp_path / "t_init", sana["folder"], sana["net"].config,
                                         sana["net"].state_dict(), t_init=0.9)[0]), ["--t_init 0.9"]),
        (ValueError, dict(ckpt=sana["run"], steps=5), ["--steps 5", "1..4"]),
        (ValueError, dict(ckpt=sana["run"], teacher="tiny"), ["no diffusers pipeline folder"]),
        (FileNotFoundError, dict(ckpt=sana["run"], teacher=str(tmp_path)), ["no model_index.json"]),
        (FileNotFoundError, dict(ckpt=str(tmp_path / "nothing")), ["does not exist"]),
    ]
    for kind, kwargs, words in cases:
        one_line_error(kind, lambda: export.export(out=tmp_path / "outs" / "d", **kwargs), *words)
    left = os.listdir(tmp_path / "outs") if os.path.exists(tmp_path / "outs") else []
    assert not left, left                                # no output and no temporary folder after a failure
    p = subprocess.run([sys.executable, "export.py", "--ckpt", sana["run"], "--out", str(existing)], cwd=HERE,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"CLI: exit {p.returncode}, stderr {p.stderr.strip()!r}")
    assert p.returncode != 0 and p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0
