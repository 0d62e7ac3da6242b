"""
SiD-DiT, the math: pure functions, no state, no model family, no device or precision logic.

Score identity Distillation (SiD; Zhou et al., ICML 2024, arXiv 2404.04057) applied to
flow-matching DiTs (SiD-DiT; Zhou et al. 2025, "Score Distillation of Flow Matching Models",
arXiv 2509.25127). Guidance follows SiD-LSG (Zhou et al., ICLR 2025, arXiv 2406.01561).

One convention, used everywhere in this repo:
    flow time t in [0, 1], t = 1 is pure noise
    x_t = (1 - t) x0 + t eps,        eps ~ N(0, I)
    networks return the velocity v = eps - x0,  so  x0 = x_t - t v  and  eps = x_t + (1 - t) v

Data-aided SiD (the adversarial / Diffusion-GAN mode, official `--train_diffusiongan`) adds a discriminator
loss to the fake-score phase and an adversarial term to the generator phase; the fake score is the
discriminator (last section).

Checked by: test_equivalence.py (every identity here, on a Gaussian mixture where E[x0 | x_t] is
closed-form, plus an end-to-end SiD run) and test_adversarial.py (the adversarial terms against hand
formulas, fp64). Run `python -m pytest test_equivalence.py test_adversarial.py -q -s`.
"""

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Flow <-> x0 / eps / score (all per-sample; t broadcasts from (B,) to x's shape)


def bcast(t, x):
    """(B,) or scalar t -> shape (B, 1, 1, ...) that broadcasts against x."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


def add_noise(x0, eps, t):
    """x_t = (1 - t) x0 + t eps (rectified-flow interpolant)."""
    t = bcast(t, x0)
    return (1 - t) * x0 + t * eps


def x0_from_velocity(x_t, t, v):
    """x0 = x_t - t v."""
    return x_t - bcast(t, x_t) * v


def eps_from_velocity(x_t, t, v):
    """eps = x_t + (1 - t) v."""
    return x_t + (1 - bcast(t, x_t)) * v


def velocity_from_x0(x_t, t, x0):
    """v = (x_t - x0) / t  (undefined at t = 0)."""
    return (x_t - x0) / bcast(t, x_t)


def velocity_from_eps(x_t, t, eps):
    """v = (eps - x_t) / (1 - t)  (undefined at t = 1)."""
    return (eps - x_t) / (1 - bcast(t, x_t))


def score_from_x0(x_t, t, x0):
    """Tweedie: grad_x log p_t(x_t) = -(x_t - (1 - t) E[x0 | x_t]) / t^2.

    x_t | x0 ~ N((1 - t) x0, t^2 I), so E[eps | x_t] = -t * score and the score follows from E[x0 | x_t]
    (Efron 2011; Song et al. 2021, eq. 8 in VP form).
    """
    t = bcast(t, x_t)
    return -(x_t - (1 - t) * x0) / t**2


def score_from_velocity(x_t, t, v):
    """grad log p_t = -eps_hat / t = -(x_t + (1 - t) v) / t."""
    return -eps_from_velocity(x_t, t, v) / bcast(t, x_t)


# Gaussian-diffusion views: x_s = alpha_s x0 + sigma_s eps (VP, VE, EDM are all this form)


def diffusion_to_flow(x_s, alpha, sigma):
    """The flow point with the same signal-to-noise ratio: t = sigma / (alpha + sigma), x_t = x_s / (alpha + sigma).

    Dividing x_s = alpha x0 + sigma eps by (alpha + sigma) gives (1 - t) x0 + t eps, so any diffusion
    denoiser E[x0 | x_s] equals the flow denoiser E[x0 | x_t] at that t (SiD-DiT, Sec. 3).
    """
    alpha, sigma = bcast(alpha, x_s), bcast(sigma, x_s)
    return x_s / (alpha + sigma), (sigma / (alpha + sigma)).flatten().expand(x_s.shape[0])   # t: (B,)


def x0_from_eps_pred(x_s, alpha, sigma, eps_hat):
    """x0 = (x_s - sigma eps) / alpha."""
    return (x_s - bcast(sigma, x_s) * eps_hat) / bcast(alpha, x_s)


def x0_from_diffusion_v(x_s, alpha, sigma, v_hat):
    """Salimans & Ho's v = alpha eps - sigma x0  ->  x0 = (alpha x_s - sigma v) / (alpha^2 + sigma^2)."""
    a, s = bcast(alpha, x_s), bcast(sigma, x_s)
    return (a * x_s - s * v_hat) / (a**2 + s**2)


def diffusion_v_from_x0(x_s, alpha, sigma, x0):
    """v = alpha eps - sigma x0 with eps = (x_s - alpha x0) / sigma."""
    a, s = bcast(alpha, x_s), bcast(sigma, x_s)
    return a * (x_s - a * x0) / s - s * x0


# ----------------------------------------------------------------------------------------------
# Timestep law for both losses


def sample_t(n, law="logit_normal", mean=math.log(2.0), std=1.6, generator=None):
    """t = sigmoid(m), m ~ N(ln 2, 1.6^2): median t = 2/3, skewed to high noise (official default);
    law='uniform' gives t ~ U(0, 1). Drawn on the CPU so every device and rank count sees the same t."""
    if law == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    if law == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"unknown timestep law {law!r}; use 'logit_normal' or 'uniform'")


# ----------------------------------------------------------------------------------------------
# Weightings w(t) of the generator loss (official `--weighting_scheme`); sigma = t

WEIGHTINGS = ["1_minus_sigma", "1_minus_sigma_squared", "1_over_sigma", "1_over_sigma2", "snr_sqrt", "snr",
              "sid_legacy"]


def loss_weight(name, t, x_g=None, x0_teacher=None):
    """Per-sample weight (B,) of the SiD generator loss. Computed without gradient.

    1_minus_sigma (default): 1 - t.   1_minus_sigma_squared: (1 - t)^2.
    1_over_sigma: 1 / max(t, 1e-5).   1_over_sigma2: 1 / max(t^2, 1e-5).
    snr_sqrt: 1 / max(t / (1 - t), 1e-5).   snr: 1 / max((t / (1 - t))^2, 1e-5).
    sid_legacy (original SiD): 1 / max(mean_chw |x_g - f_teacher|, 1e-5), per sample, in fp32.
    """
    with torch.no_grad():
        t = t.float()
        if name == "1_minus_sigma":
            return 1 - t
        if name == "1_minus_sigma_squared":
            return (1 - t) ** 2
        if name == "1_over_sigma":
            return 1 / t.clamp_min(1e-5)
        if name == "1_over_sigma2":
            return 1 / (t**2).clamp_min(1e-5)
        if name == "snr_sqrt":
            return 1 / (t / (1 - t)).clamp_min(1e-5)
        if name == "snr":
            return 1 / ((t / (1 - t)) ** 2).clamp_min(1e-5)
        if name == "sid_legacy":
            return 1 / (x_g.float() - x0_teacher.float()).abs().flatten(1).mean(1).clamp_min(1e-5)
    raise ValueError(f"unknown weighting {name!r}; use one of {WEIGHTINGS}")


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance on velocities


def cfg_batch(x_t, t, cond, uncond):
    """The doubled batch [uncond; cond] of one guided call: (x, t, cond) each with 2B rows."""
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    return torch.cat([x_t, x_t]), torch.cat([t, t]), both


def guide(v_both, scale):
    """[v_u; v_c] (2B, ...) -> v_u + kappa (v_c - v_u) (B, ...), in fp32."""
    v_u, v_c = v_both.float().chunk(2)
    return v_u + scale * (v_c - v_u)


EMBEDDED_GUIDANCE = ("with_cfg", "only")


def guidance_inputs(x_t, cond, uncond, scale, embedded):
    """(cond, uncond, true_cfg) of a guided call. `embedded` says how a net that takes the guidance scale as an
    input (FLUX.1-dev; the teacher states it) is guided; train.py's --embedded_guidance picks:

      None        the net has no guidance input: true CFG alone;
      "with_cfg"  kappa is fed as the guidance input of both branches AND combined by true CFG, against the
                  empty prompt: the official SiD-DiT FLUX recipe (sid_dit_flux_util.py), what the paper ran;
      "only"      kappa as the guidance input of ONE conditional call, no true CFG: how FLUX.1-dev was distilled
                  to be sampled (FluxPipeline), at half the cost.
    """
    if embedded is None:
        return cond, uncond, True
    if embedded not in EMBEDDED_GUIDANCE:
        raise ValueError(f"unknown embedded guidance {embedded!r}; use one of {EMBEDDED_GUIDANCE}")
    g = torch.full((x_t.shape[0],), float(scale), device=x_t.device)
    return {**cond, "guidance": g}, {**uncond, "guidance": g}, embedded == "with_cfg"


def cfg_velocity(net, x_t, t, cond, uncond, scale, embedded=None):
    """v = v_u + kappa (v_c - v_u), one batched call on [uncond; cond] (Ho & Salimans 2022).

    kappa = 1 is the plain conditional net, kappa = 0 the unconditional one (one call each).
    SiD-DiT guides the teacher AND the fake score, also while the fake score is trained
    (three scales kappa1, kappa2, kappa4 in SiD-LSG's naming; 4.5 each in every official script).
    `cond`/`uncond` are dicts of batched tensors (text, text_mask, pooled) passed to net as keywords.
    embedded: how a guidance-embedding net is guided (guidance_inputs); None for every other net.
    """
    cond, uncond, true_cfg = guidance_inputs(x_t, cond, uncond, scale, embedded)
    if scale == 1 or not true_cfg:
        return net(x_t, t, **cond).float()
    if scale == 0:
        return net(x_t, t, **uncond).float()
    x2, t2, both = cfg_batch(x_t, t, cond, uncond)
    return guide(net(x2, t2, **both), scale)


# ----------------------------------------------------------------------------------------------
# The few-step generator


def generator_inputs(cond, embeds_guidance):
    """G's conditioning: the prompt features, plus guidance 1.0 for a generator copied from a teacher that takes the
    guidance scale as an input (FLUX.1-dev; the teacher states it). 1.0 is the official setting
    (sid_dit_flux_util.sid_dit_generate, guidance_scale=1, never overridden by the training loops)."""
    if not embeds_guidance:
        return cond
    ref = next(iter(cond.values()))
    return {**cond, "guidance": torch.ones(ref.shape[0], device=ref.device)}


def generator_times(K, t_init=1.0):
    """Step grid t_i = t_init (1 - i / K), i = 0..K-1: [1, .75, .5, .25] for K = 4."""
    return [t_init * (1 - i / K) for i in range(K)]


def generate(G, z, cond, k, K=4, t_init=1.0, noise="fresh", grad=False, randn=torch.randn_like):
    """x_g after the k-th step (1 <= k <= K) of the K-step SiD-DiT sampler; only the last call may carry grad.

        x0_hat = 0
        for i in 0..k-1:
            n_i = z                                    i = 0, or noise = 'fixed'
                = fresh N(0, I)                         noise = 'fresh' (default)
                = (x_{i-1} - (1 - t_{i-1}) x0_hat) / t_{i-1}    noise = 'ddim' (the eps the last step implied)
            x_i = (1 - t_i) x0_hat + t_i n_i            (x_0 = z at t_0 = 1)
            x0_hat = x_i - t_i G(x_i, t_i)

    The grid always uses K, so k < K returns an intermediate x0 estimate of the K-step chain. With
    grad=True only the k-th network call builds a graph: the official code also keeps the earlier
    steps' graphs alive and discards them, which costs memory for nothing.
    """
    if not 1 <= k <= K:
        raise ValueError(f"k={k} must be in 1..K={K}")
    if noise not in ("fresh", "fixed", "ddim"):
        raise ValueError(f"unknown noise type {noise!r}; use 'fresh', 'fixed' or 'ddim'")
    B = z.shape[0]
    x0_hat, x_prev, t_prev = torch.zeros_like(z), None, None
    for i, t_i in enumerate(generator_times(K, t_init)[:k]):
        if i == 0 or noise == "fixed":
            n = z
        elif noise == "fresh":
            n = randn(z)
        else:
            n = (x_prev - (1 - t_prev) * x0_hat) / t_prev
        x = (1 - t_i) * x0_hat + t_i * n
        t = torch.full((B,), t_i, device=z.device)
        with torch.set_grad_enabled(grad and i == k - 1):
            x0_hat = x - t_i * G(x, t, **cond).float()
        x_prev, t_prev = x, t_i
    return x0_hat


# ----------------------------------------------------------------------------------------------
# The two SiD losses. Both are sums over latent elements, averaged over samples (the official
# reduction: sum / per-rank batch), so their size grows with the latent; Adam does not mind.


def fake_score_loss(v_fake, x_g, eps, scale=1.0):
    """L_psi = ls * mean_b sum_chw (eps - x_g - v_psi(x_t))^2, x_t = (1 - t) x_g + t eps, x_g detached.

    Plain flow matching of the fake score on generator samples (SiD Eq. for psi; SiD-DiT Alg. 1).
    v_psi is the guided velocity cfg_velocity(fake, ..., kappa1), so the guided combination, not
    the conditional branch, is fitted to the generator. In x0 terms this is an x0-MSE weighted 1/t^2.
    """
    target = eps - x_g.detach()
    return scale * (target - v_fake).square().flatten(1).sum(1).mean()


def generator_loss(x_g, x0_teacher, x0_fake, weight, alpha=1.0, scale=100.0):
    """SiD generator loss, with f_phi = teacher's x0, f_psi = fake score's x0, both at x_t = (1 - t) x_g + t eps:

        L_G = lsg * mean_b [ w(t) sum_chw (f_phi - f_psi) * ((f_phi - x_g) - alpha (f_phi - f_psi)) ]
            = lsg * mean_b [ w(t) ( <f_phi - f_psi, f_psi - x_g> + (1 - alpha) ||f_phi - f_psi||^2 ) ]

    Its gradient in the generator's parameters estimates that of the Fisher divergence between
    the teacher's and the generator's scores (SiD, Sec. 4 and Eq. 22 in the x0 form). Nothing is
    detached: the gradient reaches G through x_g and through both networks' inputs x_t (their
    parameters are frozen). alpha = 1 is SiD-DiT's default, 1.2 the original SiD's. lsg = 100.
    When the generator's law equals the teacher's, f_psi = f_phi and the loss and its gradient vanish.
    """
    diff = x0_teacher - x0_fake
    per_elem = diff * ((x0_teacher - x_g) - alpha * diff)
    return scale * (weight * per_elem.flatten(1).sum(1)).mean()


# ----------------------------------------------------------------------------------------------
# Data-aided SiD: the adversarial (Diffusion-GAN) terms. The fake score doubles as the discriminator:
# its logits are the image-token mean of its final time-modulated norm output, (B, D), one logit per
# channel, no head, no new weights (`forward_with_features` in model.py). Official semantics: SiD-DiT
# (apple-aiml-research/ml-sid-dit @ 9596ed9) training/sid_dit_training_loop.py, `train_diffusiongan`
# branches of both phases, and training/sid_dit_util.py `sid_dit_denoise` (return_flag encoder /
# encoder_decoder). Like the SiD losses, both are sums over latent elements (the mean BCE per sample is
# multiplied by C*H*W) averaged over samples.


def cfg_velocity_and_logits(net, x_t, t, cond, uncond, scale, embedded=None):
    """(v, logits): cfg_velocity's guided velocity and the discriminator logits (B, D) of the COND half, from the
    same call (the fake score's pass that yields f_psi also yields the logits: no extra forward).

    kappa = 1 (or embedded="only"): one conditional call. Any other kappa, 0 included, runs the batched
    [uncond; cond] call, since the logits are always the conditional branch's (official `sid_dit_denoise`,
    return_flag='encoder_decoder').
    """
    cond, uncond, true_cfg = guidance_inputs(x_t, cond, uncond, scale, embedded)
    if scale == 1 or not true_cfg:
        v, feats = net.forward_with_features(x_t, t, **cond)
        return v.float(), feats.float()
    x2, t2, both = cfg_batch(x_t, t, cond, uncond)
    v_both, feats = net.forward_with_features(x2, t2, **both)                 # (2B, C, H, W), (2B, D)
    return guide(v_both, scale), feats.float().chunk(2)[1]


def discriminator_pass(net, x_g, x_real, eps, t, cond, cond_real, uncond, scale, embedded=None):
    """The fake-score phase's forward passes in data-aided mode: (v_fake, logit_fake, logit_real).

        x_t      = (1 - t) x_g    + t eps   ->  guided [uncond; cond] pass (kappa1): v_fake and logit_fake
        x_t_real = (1 - t) x_real + t eps   ->  ONE conditional pass, no CFG, the real captions: logit_real

    The real latents reuse the fake sample's eps and t (official rule), so real and fake inputs differ only
    in their clean latents and captions: the discriminator cannot tell them apart by noise level or noise draw.
    """
    v_fake, logit_fake = cfg_velocity_and_logits(net, add_noise(x_g, eps, t), t, cond, uncond, scale, embedded)
    cond_real = guidance_inputs(x_real, cond_real, cond_real, scale, embedded)[0]   # kappa as an input, if any
    _, logit_real = net.forward_with_features(add_noise(x_real, eps, t), t, **cond_real)
    return v_fake, logit_fake, logit_real.float()


def bce_clamped(logit, label):
    """Per-sample mean over logit channels of BCE(sigmoid(clamp(logit, -10, 10)), label) -> (B,).
    The clamp also stops the gradient of saturated logits (official)."""
    logit = logit.to(torch.promote_types(logit.dtype, torch.float32)).clamp(-10, 10)   # bf16 -> fp32; fp64 stays
    target = torch.full_like(logit, float(label))
    return F.binary_cross_entropy_with_logits(logit, target, reduction="none").flatten(1).mean(1)


def discriminator_loss(logit_real, logit_fake, latent_numel, scale=1.0):
    """L_D = lsd * mean_b 1/2 [mean_ch BCE(clamp(l_real, +-10), 1) + mean_ch BCE(clamp(l_fake, +-10), 0)] * C*H*W.

    Trains the fake score as the discriminator (real = 1, generator sample = 0); no w(t). It is added to the
    fake-score loss L_psi before backward, in the same phase. lsd = 1 (official `loss_scaling_D`).
    """
    per_sample = (bce_clamped(logit_real, 1) + bce_clamped(logit_fake, 0)) / 2
    return scale * (per_sample * latent_numel).mean()


def generator_adversarial_loss(logit_gen, weight, latent_numel, scale=1.0):
    """L_adv = lsg_gan * mean_b [ mean_ch BCE(clamp(l_gen, +-10), 1) * w(t) * C*H*W ].

    The non-saturating generator loss on the fake score's logits of the generator's x_t (cond half of the
    kappa2-guided pass); w(t) is the SiD loss's weight. Gradient reaches G through x_t only (the fake score is
    frozen in this phase). lsg_gan = 1, against lsg = 100 for L_G (official `loss_scaling_G_gan`).
    """
    return scale * (bce_clamped(logit_gen, 1) * weight * latent_numel).mean()


def adversarial_schedule(images_seen, g_start=20_000, adv_start=40_000):
    """(train G?, weight of L_G, weight of L_adv) at an iteration that starts with `images_seen` generator images.

        images_seen <= g_start               no generator step (the fake score / discriminator trains alone)
        g_start < images_seen <= adv_start   L_G alone
        images_seen > adv_start              0.5 L_G + 0.5 L_adv

    Strict '>' as the official loop (`cur_nimg > 20*1000`, `cur_nimg > 40*1000`), where cur_nimg counts the
    global batches of completed iterations. The official code still runs the generator phase before g_start
    and only skips the optimizer step; skipping the whole phase gives the same weights.
    """
    if images_seen <= g_start:
        return False, 1.0, 0.0
    if images_seen <= adv_start:
        return True, 1.0, 0.0
    return True, 0.5, 0.5


def discriminator_accuracy(logit_real, logit_fake):
    """(accuracy on real, on fake): the fraction of logit channels on the right side of 0, for the log."""
    return (logit_real > 0).float().mean().item(), (logit_fake < 0).float().mean().item()
