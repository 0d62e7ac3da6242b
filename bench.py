"""
Measure the embedded teacher and a distilled student on the procedural data, where quality is
computable because the data generator is known (tiny.py):

  adherence  fraction of images whose decoded colour, shape and place all match the prompt (data: 1.0)
  FD         Frechet distance of standardised shape features (position, size, fill, colour) to
             fresh data for the same prompts (data vs data: the sampling-noise floor)

    python bench.py --ckpt runs/tiny                  # the README table
    python bench.py --ckpt runs/tiny --per_prompt 4   # quicker, noisier

Rows: the data itself, the teacher (its pipeline's sampler, `Teacher.sample`) at 1, 2, 4, 8, 32 steps, the student
at 1, 2, 4 steps (its EMA weights, then the raw generator, when the run kept an EMA); same prompts
and initial noise for every row. Prints a markdown table and writes bench.json next to the checkpoint.
"""

import argparse
import json
import os
import time

import torch

import tiny
from sample import STUDENT_FILES, load_student, student_label, student_path, student_sample, teacher_label
from teacher_loaders import load_teacher


@torch.no_grad()
def in_chunks(fn, n, chunk):
    return torch.cat([fn(slice(i, min(i + chunk, n))) for i in range(0, n, chunk)])


def main(args):
    torch.manual_seed(0)
    teacher = load_teacher("tiny")
    students = []   # (label, generator): the EMA if the run kept one, and the raw generator
    if args.ckpt:
        G, ck = load_student(args.ckpt, ema=False)
        if os.path.basename(student_path(args.ckpt)) == STUDENT_FILES[0]:
            students.append((f"student (EMA {ck['ema_halflife_kimg']:g} kimg)", load_student(args.ckpt)[0]))
        students.append(("student", G))
    prompts = [p for p in tiny.ALL_PROMPTS for _ in range(args.per_prompt)]
    n = len(prompts)
    C, h, w = teacher.latent_shape()
    z = torch.randn((n, C, h, w), generator=torch.Generator().manual_seed(args.seed))
    cond = teacher.encode_prompts(prompts)
    guidance = args.guidance or teacher.guidance

    def sub(d, sl):
        return {k: v[sl] for k, v in d.items()}

    rows = [("data", 0, lambda sl: tiny.render(prompts[sl], torch.Generator().manual_seed(args.seed + sl.start)))]
    for steps in args.teacher_steps:
        rows.append((*teacher_label(teacher, steps, guidance), lambda sl, k=steps: teacher.decode(
            teacher.sample(prompts[sl], z[sl], k, guidance))))
    for label, G in students:
        for k in args.student_steps:
            rows.append((student_label(k, label), k, lambda sl, k=k, G=G: teacher.decode(student_sample(
                G, z[sl], sub(cond, sl), k, ck["num_steps"], ck["t_init"], ck["noise"], args.seed + sl.start))))

    results = []
    print(f"{n} images ({args.per_prompt} per prompt x {len(tiny.ALL_PROMPTS)} prompts); FD reference: fresh data")
    print("| sampler | NFE | prompt adherence | feature FD | seconds |")
    print("|---|---|---|---|---|")
    for name, nfe, fn in rows:
        t0 = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            images = in_chunks(fn, n, args.chunk).float()
        sec = time.time() - t0
        adh, fd = tiny.prompt_adherence(images, prompts), tiny.feature_distance(images, prompts, seed=args.seed + 1)
        results.append(dict(sampler=name, nfe=nfe, adherence=adh, fd=fd, seconds=sec))
        print(f"| {name} | {nfe} | {adh:.3f} | {fd:.4f} | {sec:.0f} |", flush=True)
    if args.ckpt:
        folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt)
        with open(os.path.join(folder, "bench.json"), "w") as f:
            json.dump(dict(per_prompt=args.per_prompt, guidance=guidance, results=results), f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="prompt adherence and feature FD of teacher and student on tiny")
    p.add_argument("--ckpt", default=None, help="train.py run folder of a tiny-teacher run (omit: teacher only)")
    p.add_argument("--per_prompt", type=int, default=12, help="images per prompt (90 prompts)")
    p.add_argument("--teacher_steps", type=int, nargs="*", default=[1, 2, 4, 8, 32], help="teacher step counts")
    p.add_argument("--student_steps", type=int, nargs="*", default=[1, 2, 4], help="student step counts")
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG (default: the teacher's, 4.5)")
    p.add_argument("--chunk", type=int, default=270, help="images per forward batch")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--seed", type=int, default=0, help="seed of noise and reference data")
    main(p.parse_args())
