"""
The teaching tests for sid.py: every identity the method rests on, checked numerically.

Most checks use a data law whose denoiser is known exactly: a Gaussian mixture in 2-D. For
x_t = (1 - t) x0 + t eps, each component k stays Gaussian,
    x_t | k ~ N((1 - t) mu_k, (1 - t)^2 S_k + t^2 I),
so the posterior E[x0 | x_t] (and E[eps | x_t], the score, the velocity) is closed-form. Against
it the tests show:
  1. x0-, eps-, diffusion-v- and flow-velocity prediction have one optimum, related by sid.py's
     linear maps; Tweedie's formula gives autograd's grad log p_t; every conversion round-trips.
  2. A diffusion point x_s = alpha x0 + sigma eps (VP or VE/EDM) and the flow point from
     sid.diffusion_to_flow have the same denoiser E[x0 | .].
  3. The SiD generator gradient vanishes when the generator's law equals the teacher's and not
     otherwise; with the ideal (frozen) fake score and alpha = 0.5 it is exactly half the gradient of
     the Fisher divergence, and other alphas add a known multiple of a second gradient.
  4. Small checks: CFG, the few-step sampler, the timestep law, the weightings, the reductions.
  5. An end-to-end SiD run: a 1-step generator that starts collapsed on one mode learns every mode
     of the mixture with the right mass, using the official loop (one fake step, one generator step).
Each test prints both sides (max diff and a few values): the output is meant to be read.

Run (30-60 s on one CPU core, most of it the end-to-end run):
    python -m pytest test_equivalence.py -q -s
"""

import copy
import math
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import sid

F64 = torch.float64

# ----------------------------------------------------------------------------------------------
# A Gaussian mixture with diagonal covariances, viewed through x_s = alpha x0 + sigma eps.
# The flow view is alpha = 1 - t, sigma = t; diffusion views (VP, VE/EDM) use other (alpha, sigma).


@dataclass
class GMM:
    weights: torch.Tensor  # (K,)   mixture weights, sum to 1
    means: torch.Tensor    # (K, d)
    stds: torch.Tensor     # (K, d) per-axis standard deviations (diagonal covariance)

    def to(self, dtype):
        return GMM(self.weights.to(dtype), self.means.to(dtype), self.stds.to(dtype))


def gmm_components(g, x, alpha, sigma):
    """Per-component log N(x; alpha mu_k, alpha^2 S_k + sigma^2 I) (B, K), variances and residuals (B, K, d)."""
    a, s = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
    var = (a * g.stds) ** 2 + s**2                                   # (B, K, d)
    diff = x[:, None] - a * g.means                                  # (B, K, d)
    log_n = -0.5 * (diff**2 / var + var.log() + math.log(2 * math.pi)).sum(-1)
    return log_n, var, diff


def gmm_log_prob(g, x, alpha, sigma):
    """log p(x_s), x_s = alpha x0 + sigma eps, x0 ~ GMM: a log-sum-exp over components."""
    log_n, _, _ = gmm_components(g, x, alpha, sigma)
    return torch.logsumexp(g.weights.log() + log_n, dim=1)


def gmm_posterior(g, x, alpha, sigma):
    """Exact E[x0 | x_s] and E[eps | x_s]: responsibilities times per-component Gaussian posteriors.

    Given component k, (x0, x_s) are jointly Gaussian: Cov(x0, x_s) = alpha S_k, Cov(eps, x_s) = sigma I,
    so E[x0 | x_s, k] = mu_k + alpha S_k / var_k (x_s - alpha mu_k) and E[eps | x_s, k] = sigma / var_k (...).
    """
    log_n, var, diff = gmm_components(g, x, alpha, sigma)
    r = torch.softmax(g.weights.log() + log_n, dim=1)[..., None]    # (B, K, 1) posterior p(k | x_s)
    a, s = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
    x0_k = g.means + a * g.stds**2 / var * diff
    eps_k = s / var * diff
    return (r * x0_k).sum(1), (r * eps_k).sum(1)                    # (B, d), (B, d)


def gmm_sample(g, n, generator=None):
    k = torch.multinomial(g.weights, n, replacement=True, generator=generator)
    noise = torch.randn(n, g.means.shape[1], generator=generator, dtype=g.means.dtype)
    return g.means[k] + g.stds[k] * noise


class GMMVelocity(nn.Module):
    """The exact flow teacher: v(x_t, t) = (x_t - E[x0 | x_t]) / t, called like any net(x, t, **cond)."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, x, t, **cond):
        g = self.g.to(x.dtype)
        t = t.to(x.dtype)
        x0, _ = gmm_posterior(g, x, 1 - t, t)
        return sid.velocity_from_x0(x, t, x0)


# A skewed 3-mode mixture: unequal weights, unequal diagonal covariances.
ANGLES = torch.tensor([90.0, 210.0, 330.0]) * math.pi / 180
MIX = GMM(weights=torch.tensor([0.5, 0.3, 0.2]),
          means=2.0 * torch.stack([ANGLES.cos(), ANGLES.sin()], -1),
          stds=torch.tensor([[0.3, 0.3], [0.2, 0.35], [0.35, 0.2]]))


def flow_batch(n, seed, g=MIX, t_range=(0.02, 0.98)):
    """x0 ~ GMM, eps ~ N(0, I), t ~ U(t_range), x_t = (1 - t) x0 + t eps; all float64."""
    gen = torch.Generator().manual_seed(seed)
    g = g.to(F64)
    x0 = gmm_sample(g, n, gen)
    eps = torch.randn(n, x0.shape[1], generator=gen, dtype=F64)
    t = t_range[0] + (t_range[1] - t_range[0]) * torch.rand(n, generator=gen, dtype=F64)
    return x0, eps, t, sid.add_noise(x0, eps, t)


def report(name, lhs, rhs):
    """Print max |lhs - rhs| and the first values of both sides; return the max diff."""
    err = (lhs - rhs).abs().max().item()
    print(f"  {name:<52s} max|diff| {err:.2e}   lhs[:3] {lhs.flatten()[:3].tolist()}")
    print(f"  {'':<52s}                 rhs[:3] {rhs.flatten()[:3].tolist()}")
    return err


# ----------------------------------------------------------------------------------------------
# 1. One denoiser, four parametrisations; Tweedie; round trips


def test_prediction_targets_share_one_optimum():
    """The MSE optimum of each prediction target is its posterior mean given x_t. The targets are
    linear in (x0, eps) given x_t, so the optima are one function up to sid.py's linear maps:
        E[v | x_t] = E[eps | x_t] - E[x0 | x_t]                 (flow velocity, v = eps - x0)
        E[x0] = x_t - t E[v],  E[eps] = x_t + (1 - t) E[v],  E[v] = (x_t - E[x0]) / t = (E[eps] - x_t) / (1 - t)
        E[x0] = (x_t - t E[eps]) / (1 - t)                      (eps-prediction, alpha = 1 - t, sigma = t)
        E[x0] = (alpha x_t - sigma E[u]) / (alpha^2 + sigma^2)  (diffusion v: u = alpha eps - sigma x0)
    E[x0 | x_t] and E[eps | x_t] are computed independently from the mixture's closed form."""
    x0, eps, t, x_t = flow_batch(4096, seed=0)
    ex0, eeps = gmm_posterior(MIX.to(F64), x_t, 1 - t, t)
    ev = eeps - ex0                                                   # E[eps - x0 | x_t]
    eu = (1 - t)[:, None] * eeps - t[:, None] * ex0                   # E[alpha eps - sigma x0 | x_t]
    print("\n[1a] one optimum, four parametrisations (float64, GMM posterior in closed form)")
    # Sanity of the closed form itself: x_t = (1 - t) E[x0 | x_t] + t E[eps | x_t] holds exactly.
    errs = [report("(1-t) E[x0] + t E[eps]  vs  x_t", sid.add_noise(ex0, eeps, t), x_t),
            report("x0_from_velocity(E[v])  vs  E[x0]", sid.x0_from_velocity(x_t, t, ev), ex0),
            report("eps_from_velocity(E[v])  vs  E[eps]", sid.eps_from_velocity(x_t, t, ev), eeps),
            report("velocity_from_x0(E[x0])  vs  E[v]", sid.velocity_from_x0(x_t, t, ex0), ev),
            report("velocity_from_eps(E[eps])  vs  E[v]", sid.velocity_from_eps(x_t, t, eeps), ev),
            report("x0_from_eps_pred(a=1-t, s=t, E[eps])  vs  E[x0]", sid.x0_from_eps_pred(x_t, 1 - t, t, eeps), ex0),
            report("x0_from_diffusion_v(E[u])  vs  E[x0]", sid.x0_from_diffusion_v(x_t, 1 - t, t, eu), ex0),
            report("diffusion_v_from_x0(E[x0])  vs  E[u]", sid.diffusion_v_from_x0(x_t, 1 - t, t, ex0), eu)]
    # And the optimum property itself (Pythagoras): for any predictor f(x_t),
    #   E||x0 - f||^2 = E||x0 - E[x0|x_t]||^2 + E||E[x0|x_t] - f||^2   (Monte Carlo: equal up to sampling error).
    f = ex0 + 0.3 * torch.sin(3 * x_t)
    mse_opt, mse_f = (x0 - ex0).square().sum(1).mean().item(), (x0 - f).square().sum(1).mean().item()
    gap = (ex0 - f).square().sum(1).mean().item()
    print(f"  E||x0 - E[x0|x_t]||^2 = {mse_opt:.4f} < E||x0 - f||^2 = {mse_f:.4f} ~ {mse_opt:.4f} + {gap:.4f}"
          f"  (f = E[x0|x_t] + 0.3 sin 3x_t)")
    assert max(errs) < 1e-10
    assert mse_opt < mse_f and abs(mse_f - mse_opt - gap) < 0.25 * gap


def test_tweedie_score_matches_autograd():
    """Tweedie: grad_x log p_t(x_t) = -(x_t - (1 - t) E[x0 | x_t]) / t^2 = -E[eps | x_t] / t.
    Left: autograd through the exact mixture log-density. Right: sid.score_from_x0 on the exact
    E[x0 | x_t], and sid.score_from_velocity on the exact velocity (x_t - E[x0 | x_t]) / t."""
    _, _, t, x_t = flow_batch(4096, seed=1)
    x_t = x_t.clone().requires_grad_(True)
    g = MIX.to(F64)
    (score,) = torch.autograd.grad(gmm_log_prob(g, x_t, 1 - t, t).sum(), x_t)
    x_t = x_t.detach()
    ex0, eeps = gmm_posterior(g, x_t, 1 - t, t)
    v = GMMVelocity(MIX)(x_t, t)
    scale = score.abs().max().item()
    print(f"\n[1b] Tweedie (float64; max |score| = {scale:.1f}, t in [0.02, 0.98])")
    errs = [report("score_from_x0(x_t, t, E[x0])  vs  autograd", sid.score_from_x0(x_t, t, ex0), score),
            report("score_from_velocity(x_t, t, v)  vs  autograd", sid.score_from_velocity(x_t, t, v), score),
            report("-E[eps | x_t] / t  vs  autograd", -eeps / t[:, None], score)]
    assert max(errs) < 1e-9 * scale


def test_conversion_round_trips():
    """Every conversion pair in sid.py inverts the other (float64, image-shaped tensors, per-sample t),
    and the convention itself: with v = eps - x0 at x_t = add_noise(x0, eps, t), x0_from_velocity gives
    back x0 and eps_from_velocity gives back eps."""
    gen = torch.Generator().manual_seed(2)
    shape = (8, 3, 4, 4)
    x0, eps, v, x = (torch.randn(shape, generator=gen, dtype=F64) for _ in range(4))
    t = 0.05 + 0.9 * torch.rand(8, generator=gen, dtype=F64)
    alpha, sigma = 0.1 + torch.rand(8, generator=gen, dtype=F64), 0.1 + 3 * torch.rand(8, generator=gen, dtype=F64)
    x_t = sid.add_noise(x0, eps, t)
    a4 = alpha.reshape(-1, 1, 1, 1)
    s4 = sigma.reshape(-1, 1, 1, 1)
    x_s = a4 * x0 + s4 * eps
    print("\n[1c] round trips (float64, shape (8, 3, 4, 4))")
    errs = [report("x0_from_velocity(add_noise(x0, eps, t), eps - x0)  vs  x0", sid.x0_from_velocity(x_t, t, eps - x0), x0),
            report("eps_from_velocity(x_t, t, eps - x0)  vs  eps", sid.eps_from_velocity(x_t, t, eps - x0), eps),
            report("v -> x0 -> v", sid.velocity_from_x0(x, t, sid.x0_from_velocity(x, t, v)), v),
            report("v -> eps -> v", sid.velocity_from_eps(x, t, sid.eps_from_velocity(x, t, v)), v),
            report("x0 -> v -> x0", sid.x0_from_velocity(x, t, sid.velocity_from_x0(x, t, x0)), x0),
            report("eps -> v -> eps", sid.eps_from_velocity(x, t, sid.velocity_from_eps(x, t, eps)), eps),
            report("score_from_velocity  vs  score_from_x0(x0_from_velocity)",
                   sid.score_from_velocity(x, t, v), sid.score_from_x0(x, t, sid.x0_from_velocity(x, t, v))),
            report("x0 -> diffusion v -> x0",
                   sid.x0_from_diffusion_v(x, alpha, sigma, sid.diffusion_v_from_x0(x, alpha, sigma, x0)), x0),
            report("x0_from_eps_pred(x_s, eps)  vs  x0", sid.x0_from_eps_pred(x_s, alpha, sigma, eps), x0),
            report("diffusion_v_from_x0(x_s, x0)  vs  alpha eps - sigma x0",
                   sid.diffusion_v_from_x0(x_s, alpha, sigma, x0), a4 * eps - s4 * x0),
            report("scalar t: add_noise(x0, eps, 0.3)", sid.add_noise(x0, eps, 0.3), 0.7 * x0 + 0.3 * eps)]
    flow_x, flow_t = sid.diffusion_to_flow(x_s, alpha, sigma)
    errs += [report("diffusion_to_flow(x_s) x_t  vs  add_noise(x0, eps, t)", flow_x, sid.add_noise(x0, eps, flow_t)),
             report("diffusion_to_flow t  vs  sigma / (alpha + sigma)", flow_t, sigma / (alpha + sigma))]
    assert max(errs) < 1e-12


# ----------------------------------------------------------------------------------------------
# 2. Diffusion time and flow time: one denoiser


@pytest.mark.parametrize("view", ["VP", "VE"])
def test_diffusion_and_flow_views_share_the_denoiser(view):
    """For x_s = alpha x0 + sigma eps, the flow point (x_t, t) = (x_s / (alpha + sigma), sigma / (alpha + sigma))
    has x_t = (1 - t) x0 + t eps with the SAME (x0, eps), and is an invertible function of x_s, so
        E[x0 | x_s] = E[x0 | x_t],  E[eps | x_s] = E[eps | x_t],  grad log p_s(x_s) = grad log p_t(x_t) / (alpha + sigma).
    A flow teacher therefore is a diffusion denoiser at every VP (alpha^2 + sigma^2 = 1) or
    VE/EDM (alpha = 1, sigma up to 80) point; the diffusion-side conversions give the same x0."""
    gen = torch.Generator().manual_seed(3)
    n, g = 2048, MIX.to(F64)
    if view == "VP":
        phi = 0.02 + 1.53 * torch.rand(n, generator=gen, dtype=F64)   # alpha = cos, sigma = sin
        alpha, sigma = phi.cos(), phi.sin()
    else:
        alpha = torch.ones(n, dtype=F64)                               # EDM sigma in [0.002, 80]
        sigma = torch.exp(math.log(0.002) + math.log(80 / 0.002) * torch.rand(n, generator=gen, dtype=F64))
    x0 = gmm_sample(g, n, gen)
    eps = torch.randn(n, 2, generator=gen, dtype=F64)
    x_s = (alpha[:, None] * x0 + sigma[:, None] * eps).requires_grad_(True)
    (score_s,) = torch.autograd.grad(gmm_log_prob(g, x_s, alpha, sigma).sum(), x_s)
    x_s = x_s.detach()
    ex0_s, eeps_s = gmm_posterior(g, x_s, alpha, sigma)              # the diffusion model's optimum

    x_t, t = sid.diffusion_to_flow(x_s, alpha, sigma)
    v = GMMVelocity(MIX)(x_t, t)                                       # the flow teacher's output there
    ex0_t, eeps_t = gmm_posterior(g, x_t, 1 - t, t)
    eu_s = alpha[:, None] * eeps_s - sigma[:, None] * ex0_s           # diffusion-v optimum at x_s
    print(f"\n[2] {view}: diffusion point vs flow point from sid.diffusion_to_flow (t in [{t.min():.4f}, {t.max():.4f}])")
    errs = [report("x_t  vs  add_noise(x0, eps, t)", x_t, sid.add_noise(x0, eps, t)),
            report("E[x0 | x_t]  vs  E[x0 | x_s]", ex0_t, ex0_s),
            report("E[eps | x_t]  vs  E[eps | x_s]", eeps_t, eeps_s),
            report("x0_from_velocity(x_t, t, v_teacher)  vs  E[x0 | x_s]", sid.x0_from_velocity(x_t, t, v), ex0_s),
            report("x0_from_eps_pred(x_s, E[eps | x_s])  vs  E[x0 | x_s]",
                   sid.x0_from_eps_pred(x_s, alpha, sigma, eeps_s), ex0_s),
            report("x0_from_diffusion_v(x_s, E[u | x_s])  vs  E[x0 | x_s]",
                   sid.x0_from_diffusion_v(x_s, alpha, sigma, eu_s), ex0_s),
            report("diffusion_v_from_x0(x_s, E[x0 | x_s])  vs  E[u | x_s]",
                   sid.diffusion_v_from_x0(x_s, alpha, sigma, ex0_s), eu_s)]
    score_t = sid.score_from_velocity(x_t, t, v)
    score_err = report("score_from_velocity(x_t) / (alpha + sigma)  vs  autograd",
                       score_t / (alpha + sigma)[:, None], score_s)
    assert max(errs) < 1e-9
    assert score_err < 1e-9 * score_s.abs().max().item()


# ----------------------------------------------------------------------------------------------
# 3. The generator loss: zero gradient at the teacher's law; half the Fisher gradient at alpha = 0.5


def sid_x0_pair(G, teacher, fake, z, eps, t, k=1, K=1, scale=1.0):
    """The generator phase of one official iteration, up to the loss: x_g (with grad through G's last
    call), x_t = (1 - t) x_g + t eps, and the teacher's and fake's x0-predictions f_phi, f_psi there."""
    x_g = sid.generate(G, z, {}, k=k, K=K, grad=True)
    x_t = sid.add_noise(x_g, eps, t)
    f_phi = sid.x0_from_velocity(x_t, t, sid.cfg_velocity(teacher, x_t, t, {}, {}, scale))
    f_psi = sid.x0_from_velocity(x_t, t, sid.cfg_velocity(fake, x_t, t, {}, {}, scale))
    return x_g, f_phi, f_psi


def sid_generator_loss(G, teacher, fake, z, eps, t, alpha=1.0, weighting="1_minus_sigma"):
    """The official generator loss of one iteration: w(t) = 1 - t by default, lsg = 100."""
    x_g, f_phi, f_psi = sid_x0_pair(G, teacher, fake, z, eps, t)
    return sid.generator_loss(x_g, f_phi, f_psi, sid.loss_weight(weighting, t, x_g, f_phi), alpha=alpha)


def grad_norm(loss, params):
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.flatten() for g in grads]).norm().item(), grads


def gaussian_x0(x, t, mean, cov):
    """Exact E[x0 | x_t] for x0 ~ N(mean, cov) (full covariance): mean + (1-t) cov C^-1 (x_t - (1-t) mean),
    C = (1-t)^2 cov + t^2 I. Batched over t (B,)."""
    a, s = (1 - t)[:, None, None], t[:, None, None]
    eye = torch.eye(len(mean), dtype=x.dtype)
    C = a**2 * cov + s**2 * eye                                        # (B, d, d)
    r = (x - (1 - t)[:, None] * mean)[..., None]                      # (B, d, 1)
    return mean + (a * cov @ torch.linalg.solve(C, r))[..., 0]


class GaussianVelocity(nn.Module):
    """Exact flow velocity of N(mean, cov): the teacher for Gaussian data, or the ideal fake score of a
    linear generator (then mean, cov are the generator's current, detached, parameters)."""

    def __init__(self, mean, cov):
        super().__init__()
        self.mean, self.cov = mean, cov

    def forward(self, x, t, **cond):
        t = t.to(x.dtype)
        return sid.velocity_from_x0(x, t, gaussian_x0(x, t, self.mean.to(x.dtype), self.cov.to(x.dtype)))


class LinearGenerator(nn.Module):
    """G(x, t) = x - (b + A x), so the 1-step sample x_g = z - G(z, 1) = b + A z ~ N(b, A A^T)."""

    def __init__(self, A, b):
        super().__init__()
        self.A, self.b = nn.Parameter(A.clone()), nn.Parameter(b.clone())

    def forward(self, x, t, **cond):
        return x - (self.b + x @ self.A.T)

    def law(self):
        """The generator's law, detached: what an ideal fake score network would have learned."""
        A, b = self.A.detach(), self.b.detach()
        return GaussianVelocity(b, A @ A.T)


def test_generator_gradient_vanishes_iff_laws_match():
    """SiD's generator loss (f_phi - f_psi) * ((f_phi - x_g) - alpha (f_phi - f_psi)) is built so that when
    the fake score equals the teacher (f_psi = f_phi, i.e. the generator's law is the teacher's and the
    fake has learned it), both the loss and its gradient in G's parameters vanish; otherwise not.
    (a) teacher = fake = the exact GMM velocity, an MLP generator: gradient 0 up to float32 rounding (the
        terms through the two nets' inputs cancel, summed in another order); a fake that is the velocity
        of a different mixture: clearly nonzero.
    (b) Gaussian data N(m, S); a linear generator x_g = b + A z whose law N(b, A A^T) equals N(m, S)
        through a ROTATED map A = S^1/2 R (so G is not the 'teacher's map'), the fake being the exact
        velocity of the generator's own law: gradient 0 up to float32 error; perturb A or b: nonzero."""
    torch.manual_seed(0)
    B = 4096
    z, eps, t = torch.randn(B, 2), torch.randn(B, 2), sid.sample_t(B)
    print("\n[3] |grad_theta L_G| (lsg = 100, w = 1 - t, alpha = 1) through sid.generate / cfg_velocity / generator_loss")

    # (a) MLP generator, exact mixture teacher.
    G = MLP()
    params = list(G.parameters())
    teacher = GMMVelocity(MIX)
    other = GMMVelocity(GMM(torch.tensor([0.2, 0.3, 0.5]), MIX.means + 0.3, MIX.stds))
    same, _ = grad_norm(sid_generator_loss(G, teacher, copy.deepcopy(teacher), z, eps, t), params)
    diff, _ = grad_norm(sid_generator_loss(G, teacher, other, z, eps, t), params)
    print(f"  (a) MLP G, fake = teacher (exact GMM):        {same:.3e}")
    print(f"  (a) MLP G, fake = another mixture's velocity: {diff:.3e}")

    # (b) Linear generator, Gaussian data, ideal fake = the generator's own law.
    m, sd = torch.tensor([0.5, -1.0]), torch.tensor([0.7, 1.3])
    teacher = GaussianVelocity(m, torch.diag(sd**2))
    c, s = math.cos(0.6), math.sin(0.6)
    A_match = torch.diag(sd) @ torch.tensor([[c, -s], [s, c]])        # A A^T = diag(sd^2), A not diagonal
    norms = {}
    for name, A, b in [("law = teacher's (rotated map)", A_match, m),
                       ("A perturbed by 5%", 1.05 * A_match, m),
                       ("b shifted by 0.1", A_match, m + 0.1)]:
        G = LinearGenerator(A, b)
        loss = sid_generator_loss(G, teacher, G.law(), z, eps, t)
        norms[name], _ = grad_norm(loss, list(G.parameters()))
        print(f"  (b) linear G, {name:<30s} loss {loss.item(): .2e}  |grad| {norms[name]:.3e}")
    assert same < 1e-6 and diff > 1e-2
    match, *off = norms.values()
    assert match < 1e-4 and min(off) > 1e-1 and min(off) > 1e4 * match


def test_generator_gradient_is_the_fisher_gradient_at_alpha_half():
    """Why the loss works. Let f_theta(x_t) = E[x0 | x_t] under the generator's law p_theta and
        D(theta) = E_{x_g ~ p_theta, eps, t} w(t) ||f_phi(x_t) - f_theta(x_t)||^2   (x0-form Fisher divergence).
    Take the ideal fake, f_psi = f_theta, but FROZEN (no gradient through psi, as in training), and
    L1 = E w ||f_phi - f_psi||^2 (gradient through the samples x_g only). Then, exactly,
        grad_theta E[L_G(alpha)] = 0.5 grad_theta D + (0.5 - alpha) grad_theta L1,
    because E[h(x_t)^T x_g] = E[h(x_t)^T f_theta(x_t)] for any fixed function h. So alpha = 0.5 gives half
    the true Fisher gradient; SiD-DiT's alpha = 1 (and SiD's 1.2) add a multiple of grad L1 on purpose.
    Everything is Gaussian and the loss is quadratic in (z, eps), so a 3-point Gauss-Hermite rule per
    axis gives the expectation exactly; sid.generate / cfg_velocity compute in float32, hence rtol 1e-4."""
    m, S = torch.tensor([0.5, -1.0]), torch.tensor([[0.5, 0.3], [0.3, 1.2]])
    teacher = GaussianVelocity(m, S)
    G = LinearGenerator(torch.tensor([[1.1, 0.2], [-0.3, 0.6]]), torch.tensor([0.2, -0.4]))
    params = list(G.parameters())
    flat = lambda grads: torch.cat([g.flatten() for g in grads])

    # Exact expectation over (z, eps) in R^4 (81 nodes) and over t on a 4-point grid (any t law works).
    nodes, wq = torch.tensor([-math.sqrt(3), 0.0, math.sqrt(3)]), torch.tensor([1 / 6, 2 / 3, 1 / 6])
    grid = torch.cartesian_prod(*[torch.arange(3)] * 4)                # (81, 4) node indices
    ts = torch.tensor([0.2, 0.45, 0.7, 0.9])
    z = nodes[grid[:, :2]].repeat(len(ts), 1)
    eps = nodes[grid[:, 2:]].repeat(len(ts), 1)
    t = ts.repeat_interleave(len(grid))
    quad_w = wq[grid].prod(1).repeat(len(ts)) / len(ts)               # sums to 1
    w = sid.loss_weight("1_minus_sigma", t) * quad_w * len(t)          # generator_loss averages over samples

    # The Fisher divergence, with f_theta depending on theta both through x_g and as a function.
    x_g = G.b + z @ G.A.T
    x_t = sid.add_noise(x_g, eps, t)
    f_theta = gaussian_x0(x_t, t, G.b, G.A @ G.A.T)
    D = (w * (gaussian_x0(x_t, t, m, S) - f_theta).square().sum(1)).mean()
    grad_D = flat(grad_norm(D, params)[1])
    # L1 with the fake frozen: only the samples move.
    x_g, f_phi, f_psi = sid_x0_pair(G, teacher, G.law(), z, eps, t)
    grad_L1 = flat(grad_norm((w * (f_phi - f_psi).square().sum(1)).mean(), params)[1])

    print("\n[3'] grad E[L_G(alpha)] (fake = generator's law, frozen) vs 0.5 grad D + (0.5 - alpha) grad L1")
    print(f"  0.5 grad D      {[round(v, 6) for v in (0.5 * grad_D).tolist()]}   (dA, db flattened)")
    rel, rel_half = {}, {}
    for alpha in [0.5, 1.0, 1.2]:
        x_g, f_phi, f_psi = sid_x0_pair(G, teacher, G.law(), z, eps, t)
        grad_L = flat(grad_norm(sid.generator_loss(x_g, f_phi, f_psi, w, alpha=alpha, scale=1.0), params)[1])
        expect = 0.5 * grad_D + (0.5 - alpha) * grad_L1
        rel[alpha] = ((grad_L - expect).norm() / expect.norm()).item()
        rel_half[alpha] = ((grad_L - 0.5 * grad_D).norm() / (0.5 * grad_D).norm()).item()
        cos = (grad_L @ grad_D / grad_L.norm() / grad_D.norm()).item()
        print(f"  alpha={alpha:<4}  grad E[L_G] {[round(v, 6) for v in grad_L.tolist()]}")
        print(f"              rel diff to the formula {rel[alpha]:.1e}, to 0.5 grad D {rel_half[alpha]:.1e}, "
              f"cos(grad L_G, grad D) {cos:.3f}")
    assert max(rel.values()) < 1e-4
    assert rel_half[0.5] < 1e-4 and rel_half[1.0] > 1e-2             # alpha matters: the test can fail


# ----------------------------------------------------------------------------------------------
# 4. Small checks: CFG, the sampler, the timestep law, the weightings, the reductions


class CondNet(nn.Module):
    """v = x (1 + t) + y, recording the batch size and the y of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        return x * (1 + t[:, None]) + y


def test_cfg_velocity():
    """cfg_velocity = v_u + kappa (v_c - v_u): kappa = 1 is one conditional call, kappa = 0 one
    unconditional call, any other kappa one batched call on [uncond; cond]."""
    torch.manual_seed(0)
    x, t = torch.randn(4, 2), torch.rand(4)
    cond, uncond = {"y": torch.randn(4, 2)}, {"y": torch.zeros(4, 2)}
    v_c, v_u = x * (1 + t[:, None]) + cond["y"], x * (1 + t[:, None]) + uncond["y"]
    print("\n[4] cfg_velocity")
    for scale, expect, calls in [(1.0, v_c, [4]), (0.0, v_u, [4]), (4.5, v_u + 4.5 * (v_c - v_u), [8])]:
        net = CondNet()
        out = sid.cfg_velocity(net, x, t, cond, uncond, scale)
        err = report(f"scale {scale}: cfg_velocity  vs  v_u + {scale} (v_c - v_u)", out, expect)
        print(f"  {'':<52s} calls (batch sizes) {[c[0] for c in net.calls]}")
        assert err < 1e-6 and [c[0] for c in net.calls] == calls
    assert torch.equal(net.calls[0][1], torch.cat([uncond["y"], cond["y"]]))  # uncond first, as official


class RecordingNet(nn.Module):
    """v = c x + t, recording each call's input, t, output and whether it builds a graph."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, t, **cond):
        v = self.c * x + t[:, None]
        self.calls.append(dict(x=x.detach().clone(), t=t.clone(), v=v.detach().clone(),
                               grad_enabled=torch.is_grad_enabled(), x_requires_grad=x.requires_grad,
                               v_requires_grad=v.requires_grad))
        return v


@pytest.mark.parametrize("noise", ["fresh", "fixed", "ddim"])
def test_generate_steps_noise_and_grad(noise):
    """sid.generate(k of K): the network sees t_i = 1 - i/K (the K-grid, [1, .75, .5, .25] for K = 4,
    even when k < K); at each step x_i = (1 - t_i) x0_hat + t_i n_i with n_0 = z and
        n_i = fresh N(0, I)  |  z ('fixed')  |  x_{i-1} + (1 - t_{i-1}) v_{i-1}, the eps the last step implied ('ddim');
    x0_hat = x_i - t_i G(x_i, t_i). With grad=True only the k-th call builds a graph."""
    assert sid.generator_times(4) == [1.0, 0.75, 0.5, 0.25]
    print(f"\n[4] generate, noise = {noise!r}")
    for k in [1, 2, 4]:
        torch.manual_seed(k)
        z, drawn = torch.randn(3, 2), []

        def randn(like):
            drawn.append(torch.randn_like(like))
            return drawn[-1]

        G = RecordingNet()
        out = sid.generate(G, z, {}, k=k, K=4, noise=noise, grad=True, randn=randn)
        ts = [c["t"][0].item() for c in G.calls]
        print(f"  k={k}: t seen {ts}  graph per call {[c['grad_enabled'] for c in G.calls]}  "
              f"out.requires_grad {out.requires_grad}")
        assert ts == [1.0, 0.75, 0.5, 0.25][:k]
        assert [c["grad_enabled"] and c["v_requires_grad"] for c in G.calls] == [False] * (k - 1) + [True]
        assert not any(c["x_requires_grad"] for c in G.calls)       # the inputs are constants
        assert out.requires_grad
        # Rebuild every step from the recorded calls and compare with what generate did.
        x0_hat = torch.zeros_like(z)
        for i, c in enumerate(G.calls):
            t_i = ts[i]
            n_i = (c["x"] - (1 - t_i) * x0_hat) / t_i                 # the noise generate used at step i
            if i == 0 or noise == "fixed":
                expect = z
            elif noise == "fresh":
                expect = drawn[i - 1]
            else:
                prev = G.calls[i - 1]
                expect = sid.eps_from_velocity(prev["x"], prev["t"], prev["v"])
            assert (n_i - expect).abs().max() < 1e-5, (k, i)
            x0_hat = c["x"] - t_i * c["v"]
        assert (out.detach() - x0_hat).abs().max() < 1e-6
        assert len(drawn) == (k - 1 if noise == "fresh" else 0)
    G = RecordingNet()                                                 # grad=False (default): no graph at all
    assert not sid.generate(G, z, {}, k=4, K=4).requires_grad and not any(c["grad_enabled"] for c in G.calls)


def test_sample_t():
    """t = sigmoid(m), m ~ N(ln 2, 1.6^2): median sigmoid(ln 2) = 2/3, skewed to high noise; 'uniform' is U(0, 1)."""
    gen = torch.Generator().manual_seed(0)
    t = sid.sample_t(200_000, generator=gen)
    logit = t.logit().double()
    u = sid.sample_t(200_000, law="uniform", generator=gen)
    print(f"\n[4] sample_t logit-normal: median {t.median():.4f} (2/3 = {2 / 3:.4f}), logit mean {logit.mean():.4f} "
          f"(ln 2 = {math.log(2):.4f}), logit std {logit.std():.4f} (1.6), P(t > 0.5) {(t > 0.5).float().mean():.3f}")
    print(f"  uniform: mean {u.mean():.4f}, quartiles {u.quantile(torch.tensor([0.25, 0.75])).tolist()}")
    assert abs(t.median().item() - 2 / 3) < 0.005 and t.min() > 0 and t.max() < 1
    assert abs(logit.mean().item() - math.log(2)) < 0.02 and abs(logit.std().item() - 1.6) < 0.02
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.quantile(0.25).item() - 0.25) < 0.005
    with pytest.raises(ValueError):
        sid.sample_t(4, law="normal")


def test_loss_weights():
    """Each weighting w(t) (sigma = t) against its formula; the clamps at 1e-5; sid_legacy per sample."""
    t = torch.tensor([1e-7, 0.1, 0.5, 0.9])
    formulas = {"1_minus_sigma": 1 - t, "1_minus_sigma_squared": (1 - t) ** 2,
                "1_over_sigma": 1 / t.clamp_min(1e-5), "1_over_sigma2": 1 / (t**2).clamp_min(1e-5),
                "snr_sqrt": 1 / (t / (1 - t)).clamp_min(1e-5), "snr": 1 / ((t / (1 - t)) ** 2).clamp_min(1e-5)}
    hand = {"1_minus_sigma": [1, 0.9, 0.5, 0.1], "1_over_sigma": [1e5, 10, 2, 1 / 0.9],
            "snr_sqrt": [1e5, 9, 1, 1 / 9], "1_over_sigma2": [1e5, 100, 4, 1 / 0.81]}
    print("\n[4] loss_weight at t =", t.tolist())
    for name in sid.WEIGHTINGS[:-1]:
        w = sid.loss_weight(name, t)
        print(f"  {name:<22s} {[round(v, 4) for v in w.tolist()]}")
        assert torch.allclose(w, formulas[name], rtol=1e-6)
        if name in hand:
            assert torch.allclose(w, torch.tensor(hand[name]), rtol=1e-5)
    x_g, x0_t = torch.zeros(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    x0_t[0] = 0                                                        # |x_g - f_phi| = 0: clamped to 1e5
    w = sid.loss_weight("sid_legacy", t, x_g, x0_t)
    expect = 1 / x0_t.abs().mean((1, 2, 3)).clamp_min(1e-5)
    print(f"  {'sid_legacy':<22s} {[round(v, 4) for v in w.tolist()]}")
    assert torch.allclose(w, expect) and w[0] == 1e5
    with pytest.raises(ValueError):
        sid.loss_weight("sid_legend", t)


def test_loss_reductions_and_alpha_identity():
    """Both losses are sums over elements, means over samples, times their scale:
        L_psi = ls * mean_b sum (eps - x_g - v_psi)^2          (x_g detached: no gradient reaches G)
        L_G   = lsg * mean_b w sum (f_phi - f_psi)((f_phi - x_g) - alpha (f_phi - f_psi))
              = lsg * mean_b w ( <f_phi - f_psi, f_psi - x_g> + (1 - alpha) ||f_phi - f_psi||^2 )
    and in L_G nothing is detached: d/dx_g, d/df_phi, d/df_psi are the hand derivatives."""
    gen = torch.Generator().manual_seed(5)
    B, shape = 4, (4, 3, 2, 2)
    x_g, f_phi, f_psi, eps, v = (torch.randn(shape, generator=gen, dtype=F64) for _ in range(5))
    w = torch.rand(B, generator=gen, dtype=F64)
    print("\n[4] loss reductions")
    x_g_leaf, v_leaf = x_g.clone().requires_grad_(True), v.clone().requires_grad_(True)
    lf = sid.fake_score_loss(v_leaf, x_g_leaf, eps, scale=0.3)
    expect = 0.3 * sum(((eps[b] - x_g[b] - v[b]) ** 2).sum() for b in range(B)) / B
    errs = [report("fake_score_loss  vs  ls * sum / B", lf, expect)]
    g_xg, g_v = torch.autograd.grad(lf, [x_g_leaf, v_leaf], allow_unused=True)
    print(f"  fake_score_loss gradient reaching x_g: {g_xg} (reaching v_psi: {g_v is not None})")
    errs.append(report("d L_psi / d v_psi  vs  -2 ls (eps - x_g - v) / B", g_v, -2 * 0.3 * (eps - x_g - v) / B))
    assert g_xg is None

    delta = f_phi - f_psi
    inner = lambda a, b_: (a * b_).flatten(1).sum(1)
    for alpha in [1.0, 1.2, 0.5]:
        lg = sid.generator_loss(x_g, f_phi, f_psi, w, alpha=alpha)
        by_def = 100 * (w * inner(delta, (f_phi - x_g) - alpha * delta)).sum() / B
        by_identity = 100 * (w * (inner(delta, f_psi - x_g) + (1 - alpha) * inner(delta, delta))).mean()
        errs += [report(f"alpha={alpha}: generator_loss  vs  definition", lg, by_def),
                 report(f"alpha={alpha}: generator_loss  vs  <d, f_psi - x_g> + (1-alpha)|d|^2", lg, by_identity)]
    alpha = 1.2
    leaves = [z.clone().requires_grad_(True) for z in (x_g, f_phi, f_psi)]
    grads = torch.autograd.grad(sid.generator_loss(*leaves, w, alpha=alpha), leaves)
    c = 100 * w.reshape(-1, 1, 1, 1) / B
    hand = [-c * delta,                                                # d/dx_g
            c * ((f_phi - x_g) - alpha * delta + (1 - alpha) * delta),  # d/df_phi
            c * (-(f_phi - x_g) + alpha * delta + alpha * delta)]      # d/df_psi
    for name, g, h in zip(["x_g", "f_phi", "f_psi"], grads, hand):
        errs.append(report(f"d L_G / d {name}  vs  hand derivative", g, h))
    assert max(errs) < 1e-12


# ----------------------------------------------------------------------------------------------
# 5. End to end: SiD with an exact mixture teacher recovers the modes a collapsed generator misses


class MLP(nn.Module):
    """A small velocity net v(x, t) = skip(x) + mlp([x, t, logit t]), for both the generator and the fake
    score. The linear skip lets the generator start as an exact affine map (see collapsed_generator)."""

    def __init__(self, d=2, hidden=64):
        super().__init__()
        self.skip = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d))

    def forward(self, x, t, **cond):
        t = t.to(x.dtype)[:, None]
        return self.skip(x) + self.mlp(torch.cat([x, t, t.logit(eps=1e-4)], 1))  # (B, d)


def collapsed_generator(g=MIX, mode=0):
    """A generator that has collapsed onto one mode: skip(x) = (I - diag(sd_k)) x - mu_k and mlp = 0, so the
    1-step sample x_g = z - G(z, 1) = mu_k + sd_k * z is exactly component k; the other modes are missing."""
    G = MLP()
    with torch.no_grad():
        G.mlp[-1].weight.zero_()
        G.mlp[-1].bias.zero_()
        G.skip.weight.copy_(torch.eye(2) - torch.diag(g.stds[mode]))
        G.skip.bias.copy_(-g.means[mode])
    return G


def mode_report(x, g=MIX):
    """Assign samples to the nearest mean. Returns per-mode mass; per-mode core width = median Mahalanobis
    radius / sqrt(2 ln 2) (1 for the true law, robust to the few samples between modes); and the share of
    samples within 3 standard deviations of their mode (0.989 for the true law)."""
    k = torch.cdist(x, g.means).argmin(1)
    mass = torch.bincount(k, minlength=len(g.weights)).float() / len(x)
    r = ((x - g.means[k]) / g.stds[k]).norm(dim=1)
    width = torch.tensor([r[k == j].median().item() / math.sqrt(2 * math.log(2)) if (k == j).sum() > 0 else 0.0
                          for j in range(len(g.weights))])
    return mass, width, (r < 3).float().mean().item()


def covers_modes(x, g=MIX, tol=0.06):
    """Every mode has its weight within tol, a core width within [0.5, 2] of the truth, and at least
    80% of all samples lie within 3 sd of a mode."""
    mass, width, within3 = mode_report(x, g)
    err = (mass - g.weights).abs().max().item()
    ok = err < tol and within3 > 0.8 and bool(((width > 0.5) & (width < 2.0)).all())
    return ok, (f"mass {[round(v, 3) for v in mass.tolist()]} (target {[round(v, 3) for v in g.weights.tolist()]}, "
                f"max err {err:.3f})  width {[round(v, 2) for v in width.tolist()]} (1 exact)  "
                f"within 3 sd {within3:.3f} (0.989 exact)")


def run_sid(seed, iters=6000, batch=256, warmup=200, lr_fake=1e-3, lr_g=1e-3, lr_decay=0.1, alpha=1.0, log_every=1500):
    """The official SiD-DiT iteration (sid_official.md §1, §17) with k = K = 1 and CFG scale 1:
        fake step:      x_g = G(z) under no_grad, t ~ logit-normal, x_t, fake_score_loss, Adam step on psi
        generator step: fresh z, eps, t; x_g with grad; x_t; teacher and fake x0; w = 1 - t;
                        generator_loss(alpha), Adam step on G (fake frozen)
    Teacher: the exact GMM velocity. Generator: collapsed on mode 0. Fake score: an MLP trained from
    scratch; the official code starts it as a copy of the teacher, which it cannot be here (the teacher
    is a formula), so it first gets `warmup` fake-only steps on the collapsed generator.
    Adam betas (0, 0.999) as official. Not official: the generator's lr decays geometrically 10x over the
    run, so that a short run settles instead of jittering around the answer."""
    torch.manual_seed(seed)
    teacher, G, fake = GMMVelocity(MIX), collapsed_generator(), MLP()
    opt_f = torch.optim.Adam(fake.parameters(), lr=lr_fake, betas=(0.0, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_g, betas=(0.0, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda i: lr_decay ** (i / iters))
    z_log = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))  # logging must not move the RNG

    def fake_step():
        z, eps = torch.randn(batch, 2), torch.randn(batch, 2)
        with torch.no_grad():
            x_g = sid.generate(G, z, {}, k=1, K=1)
        t = sid.sample_t(batch)
        x_t = sid.add_noise(x_g, eps, t)
        loss = sid.fake_score_loss(sid.cfg_velocity(fake, x_t, t, {}, {}, 1.0), x_g, eps)
        opt_f.zero_grad(set_to_none=True)
        loss.backward()
        opt_f.step()
        return loss.item()

    for _ in range(warmup):
        fake_step()
    for it in range(1, iters + 1):
        loss_f = fake_step()                                           # fake score: one step
        fake.requires_grad_(False)                                     # generator: one step, fresh draws
        z, eps, t = torch.randn(batch, 2), torch.randn(batch, 2), sid.sample_t(batch)
        loss_g = sid_generator_loss(G, teacher, fake, z, eps, t, alpha=alpha)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        sched.step()
        fake.requires_grad_(True)
        if it % log_every == 0:
            with torch.no_grad():
                x = sid.generate(G, z_log, {}, k=1, K=1)
            print(f"  it {it:5d}  L_fake {loss_f:6.3f}  L_G {loss_g.item():7.3f}  {covers_modes(x)[1]}", flush=True)
    return G


E2E_SEEDS = [0]  # seeds 0-6 all pass locally (mass error <= 0.04); one seed keeps the suite short


@pytest.mark.parametrize("seed", E2E_SEEDS)
def test_sid_end_to_end_recovers_missing_modes(seed):
    """SiD with the exact teacher turns a generator collapsed on one mode into the full mixture: before
    training every sample is in mode 0 (mass 1 vs 0.5: the check fails); after 6000 official iterations
    each mode has its weight within 0.06 and a core width within [0.5, 2] of the truth.
    What it does not show: the fine shape. A continuous map of one Gaussian onto three separated modes
    must stretch z across the gaps, so ~10% of samples stay on thin bridges between modes, and after
    this short run the modes are crescent-shaped rather than elliptical; the 80%-within-3-sd and
    median-radius checks only bound that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                           # tiny nets: one thread is fastest
    try:
        start = time.time()
        z = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(123))
        with torch.no_grad():
            ok_before, msg = covers_modes(sid.generate(collapsed_generator(), z, {}, k=1, K=1))
        print(f"\n[5] end-to-end SiD, seed {seed}\n  before: {msg}")
        G = run_sid(seed)
        with torch.no_grad():
            ok_after, msg = covers_modes(sid.generate(G, z, {}, k=1, K=1))
        print(f"  after:  {msg}\n  ({time.time() - start:.0f} s)")
    finally:
        torch.set_num_threads(threads)
    assert not ok_before
    assert ok_after
