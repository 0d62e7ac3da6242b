"""
The teacher DiT forward passes, written directly in PyTorch: one banner section per family, shared
primitives first.

  SANA (Xie et al. 2024, arXiv 2410.10629): a linear-attention DiT with ReLU-kernel self-attention,
  masked softmax cross-attention to Gemma-2 text features, a gated depthwise-conv feed-forward
  (Mix-FFN / GLUMBConv) and AdaLN-single timestep modulation. The embedded `tiny` teacher is the
  same module at a small width.
  SD3 / SD3.5 (Esser et al. 2024, arXiv 2403.03206): MMDiT, where image and text tokens keep their own
  weights but share one attention; AdaLN-Zero from the time + pooled-text vector; SD3.5 adds per-head qk
  RMSNorm, and SD3.5-Medium's MMDiT-X a second, image-only self-attention in its first 13 blocks.

  FLUX.1 (Black Forest Labs 2024): a rectified-flow MMDiT on 2x2-packed latents with 3-axis RoPE, double-stream
  (separate image / text weights, joint attention) then single-stream (parallel attention + MLP) blocks, and
  the guidance scale as an input of the guidance-distilled FLUX.1-dev.

Every family follows one convention and one signature:

    v = module(x, t, text, text_mask=None, pooled=None, guidance=None)

    x         (B, C, H, W)  UNPACKED latents, x_t = (1 - t) * x0 + t * eps
    t         (B,)          flow time in [0, 1], t = 1 is pure noise
    text      (B, L, D_txt) text-encoder features
    text_mask (B, L)        1/True = real token, 0/False = padding (None: all real)
    pooled    (B, D_pool)   pooled text vector (SD3/FLUX; SANA ignores it)
    guidance  (B,)          embedded guidance scale (guidance-distilled checkpoints only)
    v         (B, C, H, W)  velocity, v = eps - x0, so x0 = x_t - t * v

    v, feats = module.forward_with_features(x, t, text, ...)   # same pass; feats (B, D) = the image-token mean
                                                               # of the final-norm output (data-aided SiD's
                                                               # discriminator logits)

Checkpoints expect a timestep of 1000 * t (SANA, SD3) or t (SANA-Sprint teachers): that factor is
`config.time_scale`, applied inside `forward`, never at call sites. Patchifying, packing and position ids
also happen inside. What train.py needs from a family is in the `DiT` base class: the two entry points
built on the family's `final_tokens`, the units FSDP2 shards (`fsdp_units`) and the one
activation-checkpointed block loop (`run_blocks`).

Checked against: diffusers `SanaTransformer2DModel` on tiny random configs (with and without
qk-norm, padded masks, non-square latents) and `SD3Transformer2DModel` (SD3, SD3.5-Medium and SD3.5-Large
shapes: qk-norm, dual attention, non-square latents cropped out of pos_embed), max error <= 1e-4 *
max|reference|; see test_sana.py and test_sd3.py. FLUX against diffusers `FluxTransformer2DModel` (odd head
counts, non-square latents, guidance on and off; in bf16 with the reference's timestep cast order); see
test_flux.py. The features of every family against the reference's `norm_out` output (a forward hook),
token-averaged: test_adversarial.py.
Run `python -m pytest test_sana.py test_sd3.py test_flux.py test_adversarial.py -q`.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------
# Shared primitives (used by two or more families)


def timestep_features(t, dim=256, max_period=10000.0):
    """DiT sinusoidal features of a (B,) float tensor, cosine half first, computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                   # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)             # (B, dim)


def sincos_pos_embed(dim, h, w, base_size, interpolation_scale=1.0):
    """(h*w, dim) 2D sin-cos table in the PixArt/diffusers layout: first half encodes the column, second
    the row; each half is [sin(p w_k), cos(p w_k)], w_k = 10000^(-k/(dim/4)), p = index * base / n / scale."""
    def axis(pos, d):                                                         # (N,) -> (N, d)
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)
    ys = torch.arange(h, dtype=torch.float32) / (h / base_size) / interpolation_scale
    xs = torch.arange(w, dtype=torch.float32) / (w / base_size) / interpolation_scale
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")                            # (h, w) each
    return torch.cat([axis(xx.flatten(), dim // 2), axis(yy.flatten(), dim // 2)], dim=1).float()


def layer_norm(x):
    """LayerNorm over channels without affine parameters, eps 1e-6: every norm inside SANA, SD3 and FLUX blocks."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


@dataclass
class Modulation:
    """AdaLN parameters of one sub-layer, each (B, 1, D): x += gate * f(LN(x) * (1 + scale) + shift).

    A named container instead of six positional chunks (as black-forest-labs/flux `ModulationOut`).
    Final layers have no gate.
    """
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None

    def __call__(self, x_normed):
        return x_normed * (1 + self.scale) + self.shift


def modulations(params, n):
    """(B, 3n * D) AdaLN parameters -> n Modulations, the chunks ordered (shift, scale, gate) per sub-layer."""
    chunks = params[:, None].chunk(3 * n, dim=-1)                             # 3n x (B, 1, D)
    return [Modulation(*chunks[3 * i:3 * i + 3]) for i in range(n)]


class MLPEmbedder(nn.Module):
    """Linear -> act -> Linear (time, guidance, pooled-text and caption embedders)."""

    def __init__(self, d_in, d_out, act):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.act = act
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class FeedForward(nn.Module):
    """Linear(D -> mult D) -> GELU (tanh approximation) -> Linear(mult D -> D): the MLP of SD3 and FLUX blocks."""

    def __init__(self, dim, mult=4.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(mult * dim))
        self.fc2 = nn.Linear(int(mult * dim), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, the mean taken in fp32 (as diffusers does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype) * self.weight


def attention(q, k, v, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v on (B, heads, N, d) tensors.

    Fused SDPA, except in bf16 on the CPU: written out there, as it is ~6x faster than SDPA's CPU bf16 kernel
    (in fp32 SDPA's CPU kernel is 2-7x faster than writing it out: fwd + bwd at 320-768 tokens, 2 cores).
    """
    if q.is_cuda or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5                    # (B, h, N, L)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


def patchify(x, p):
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p) tokens, row-major; feature index c p^2 + i p + j.

    This is FLUX's 2x2 latent packing, and the input layout a Conv2d(kernel p, stride p) patch embed sees.
    """
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)         # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, h, w, p, layout):
    """(B, h w, F) tokens -> (B, C, h p, w p) latents, F = C p^2 ordered by `layout`:
    'cpq' (channel-major: FLUX packing, the inverse of `patchify`) or 'pqc' (DiT, SD3 and SANA final layers:
    F index (i p + j) C + c)."""
    B = x.shape[0]
    if layout == "cpq":
        x = x.view(B, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5)              # (B, C, h, p, w, p)
    elif layout == "pqc":
        x = x.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)              # (B, C, h, p, w, p)
    else:
        raise ValueError(f"unknown patch layout {layout!r}; use 'cpq' or 'pqc'")
    # a fresh tensor, not a view: FSDP2 hooks the output, and an in-place op on a view would skip that hook
    return x.reshape(B, -1, h * p, w * p).clone(memory_format=torch.contiguous_format)


def check_patch_grid(H, W, p):
    if H % p or W % p:
        raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {p}; pick a resolution that is a "
                         f"multiple of {p} latent pixels")
    return H // p, W // p


class DiT(nn.Module):
    """What train.py needs from every family, and nothing family-specific.

    A family writes `final_tokens(x, t, text, text_mask, pooled, guidance) -> (tokens, h, w)`: everything up to
    and including the final time-modulated norm, returning the IMAGE tokens (B, h*w, D) on the h x w token grid.
    The base turns them into the two entry points, so neither is a copy of the other:

        v = module(x, t, text, ...)                               # velocity (B, C, H, W); sampling, losses
        v, feats = module.forward_with_features(x, t, text, ...)  # plus feats (B, D): the image-token mean of
                                                                  # the final-norm tokens (data-aided SiD's
                                                                  # discriminator logits; no head, no new weights)

    fsdp_units(): the submodules FSDP2 shards one by one (each gathered just in time); the root holds the rest.
    fsdp_forward_methods: the root's entry points besides `forward`; FSDP2 hooks only `forward`, so whoever shards
    the root must call `torch.distributed.fsdp.register_fsdp_forward_method(model, name)` for each of these
    (otherwise the root's own weights, e.g. proj_out, stay sharded in that call).
    run_blocks(): the one block loop; with `gradient_checkpointing` on and grad enabled, each block keeps
    only its inputs and recomputes its activations in backward.
    patch_layout: how proj_out's features are ordered per token ('pqc' DiT/SD3/SANA, 'cpq' FLUX packing).
    """
    gradient_checkpointing = False
    fsdp_forward_methods = ("forward_with_features",)
    patch_layout = "pqc"

    def forward(self, x, t, text, text_mask=None, pooled=None, guidance=None):
        tokens, h, w = self.final_tokens(x, t, text, text_mask, pooled, guidance)   # (B, N, D)
        return self.velocity(tokens, h, w)                                          # (B, C, H, W)

    def forward_with_features(self, x, t, text, text_mask=None, pooled=None, guidance=None):
        """(v, feats): the velocity of `forward` and feats = mean over image tokens of the final-norm output,
        (B, D), from the same pass (official: `return_flag='encoder_decoder'`, spatial pooling, SiD-DiT
        training/transformer_with_encoder*.py)."""
        tokens, h, w = self.final_tokens(x, t, text, text_mask, pooled, guidance)   # (B, N, D)
        return self.velocity(tokens, h, w), tokens.mean(dim=1)                      # (B, C, H, W), (B, D)

    def velocity(self, tokens, h, w):
        """Output projection and unpatchify: (B, h*w, D) final-norm tokens -> (B, C, h p, w p)."""
        return unpatchify(self.proj_out(tokens), h, w, self.config.patch_size, self.patch_layout)

    def fsdp_units(self):
        return list(self.blocks)

    def run_blocks(self, blocks, state, *args):
        """state = block(*state, *args) for each block; state is a tensor or a tuple of streams."""
        for block in blocks:
            inputs = (*state, *args) if isinstance(state, tuple) else (state, *args)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                state = checkpoint(block, *inputs, use_reentrant=False)
            else:
                state = block(*inputs)
        return state


# ----------------------------------------------------------------------------------------------
# SANA: config and presets


@dataclass
class SanaConfig:
    in_channels: int = 32          # DC-AE f32c32 latent channels
    out_channels: int = 32
    patch_size: int = 1            # SANA works on the 32x-downsampled latent directly
    num_heads: int = 36            # self-attention heads; width D = num_heads * head_dim
    head_dim: int = 32             # linear attention is cheap per head, so heads are narrow
    depth: int = 28
    cross_heads: int = 16          # cross-attention uses its own head split of the same width D
    cross_head_dim: int = 72
    caption_channels: int = 2304   # Gemma-2-2B hidden size
    mlp_ratio: float = 2.5         # Mix-FFN hidden F = mlp_ratio * D (the GLU doubles it to 2F)
    qk_norm: bool = False          # SANA-1.5 / Sprint: RMSNorm over the whole width on q and k
    guidance_embeds: bool = False  # Sana-Sprint: embedded guidance added to the time embedding
    guidance_scale: float = 0.1    # Sprint embeds g * 0.1 (pipeline's guidance_embeds_scale)
    time_scale: float = 1000.0     # module input t in [0,1] -> checkpoint timestep time_scale * t
    sample_size: int = 16          # native latent side (512px -> 16); sets the sin-cos table's base grid
    interpolation_scale: float | None = None   # None: no positional embedding (SANA 512/1024); else 2D sin-cos

    @property
    def width(self):
        return self.num_heads * self.head_dim


SANA_CONFIGS = {
    "Sana_600M_512px": SanaConfig(num_heads=36, depth=28, cross_heads=16, cross_head_dim=72, sample_size=16),
    "Sana_600M_1024px": SanaConfig(num_heads=36, depth=28, cross_heads=16, cross_head_dim=72, sample_size=32),
    "Sana_1600M_512px": SanaConfig(num_heads=70, depth=20, cross_heads=20, cross_head_dim=112, sample_size=16),
    "Sana_1600M_1024px": SanaConfig(num_heads=70, depth=20, cross_heads=20, cross_head_dim=112, sample_size=32),
    "SANA1.5_1.6B_1024px": SanaConfig(num_heads=70, depth=20, cross_heads=20, cross_head_dim=112, sample_size=32,
                                      qk_norm=True),
    # the embedded teacher (tiny.py): 48-channel pixel-unshuffled 32x32 RGB, 8-word prompts. It uses the
    # sin-cos positional embedding of SANA's 2K/4K configs: on an 8x8 grid, learning "top left" from the
    # convs' zero padding alone (SANA-512/1024's only position cue) is slow.
    "tiny": SanaConfig(in_channels=48, out_channels=48, num_heads=4, head_dim=32, depth=6, cross_heads=4,
                       cross_head_dim=32, caption_channels=64, mlp_ratio=2.5, sample_size=8, interpolation_scale=1.0),
}


# ----------------------------------------------------------------------------------------------
# SANA: attention and blocks


class LinearAttention(nn.Module):
    """SANA self-attention: softmax replaced by a ReLU kernel, out_i = sum_j v_j (k_j . q_i) / (q_i . sum_j k_j).

    Cost is O(N D^2 / heads) instead of O(N^2 D). Both reference codebases accumulate it in fp32:
    the denominator is a sum over all N tokens and loses too much in bf16.
    """

    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(dim, eps=1e-5) if qk_norm else None

    def forward(self, x):                                                     # x: (B, N, D)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        B, N, D = x.shape
        q, k, v = (z.view(B, N, self.heads, D // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, h, N, d)
        with torch.autocast(device_type="cuda" if x.is_cuda else "cpu", enabled=False):   # (meta: FLOP counts)
            q, k, v = F.relu(q).float(), F.relu(k).float(), v.float()
            kv = torch.einsum("bhnd,bhne->bhde", k, v)                        # (B, h, d, d)
            num = torch.einsum("bhnd,bhde->bhne", q, kv)                      # (B, h, N, d)
            den = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2))              # (B, h, N)
            out = num / (den[..., None] + 1e-15)
        out = out.transpose(1, 2).reshape(B, N, D).to(x.dtype)               # (B, N, D)
        return self.to_out(out)


class CrossAttention(nn.Module):
    """Softmax attention from image tokens to text tokens; padded text tokens get a -10000 logit bias."""

    def __init__(self, dim, heads, head_dim, qk_norm):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.Linear(inner, dim)
        self.norm_q = RMSNorm(inner, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(inner, eps=1e-5) if qk_norm else None

    def forward(self, x, c, bias):                   # x: (B, N, D), c: (B, L, D), bias: (B, 1, 1, L) or None
        q, k, v = self.to_q(x), self.to_k(c), self.to_v(c)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        B, N, _ = q.shape
        q = q.view(B, N, self.heads, -1).transpose(1, 2)                      # (B, h, N, d)
        k = k.view(B, k.shape[1], self.heads, -1).transpose(1, 2)             # (B, h, L, d)
        v = v.view(B, v.shape[1], self.heads, -1).transpose(1, 2)
        out = attention(q, k, v, bias)                                        # (B, h, N, d)
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class MixFFN(nn.Module):
    """GLUMBConv: 1x1 conv to 2F -> SiLU -> depthwise 3x3 -> split (a, g) -> a * SiLU(g) -> 1x1 conv to D.

    The depthwise conv is the only place where SANA-512/1024 sees where a token is (no positional embedding).
    """

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.conv_inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x, h, w):                                                 # x: (B, N, D)
        x = x.transpose(1, 2).unflatten(2, (h, w))                               # (B, D, h, w)
        x = self.conv_depth(F.silu(self.conv_inverted(x)))                        # (B, 2F, h, w)
        a, g = x.chunk(2, dim=1)
        x = self.conv_point(a * F.silu(g))                                        # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)                                       # (B, N, D)


class SanaBlock(nn.Module):
    """x += gate1 * LinAttn(mod1(LN x)); x += CrossAttn(x, text) (no norm, no gate); x += gate2 * MixFFN(mod2(LN x))."""

    def __init__(self, cfg: SanaConfig):
        super().__init__()
        D = cfg.width
        # per-block learned offsets added to the shared time modulation t6 (AdaLN-single)
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)
        self.attn = LinearAttention(D, cfg.num_heads, cfg.qk_norm)
        self.cross_attn = CrossAttention(D, cfg.cross_heads, cfg.cross_head_dim, cfg.qk_norm)
        self.ff = MixFFN(D, cfg.mlp_ratio)

    def forward(self, x, c, bias, t6, h, w):                # x: (B, N, D), t6: (B, 6, D)
        attn, ff = modulations((self.scale_shift_table[None] + t6).flatten(1), 2)
        x = x + attn.gate * self.attn(attn(layer_norm(x)))
        x = x + self.cross_attn(x, c, bias)
        x = x + ff.gate * self.ff(ff(layer_norm(x)), h, w)
        return x


# ----------------------------------------------------------------------------------------------
# SANA: top model


class Sana(DiT):
    def __init__(self, cfg: SanaConfig):
        super().__init__()
        self.config = cfg
        D, p = cfg.width, cfg.patch_size
        assert cfg.cross_heads * cfg.cross_head_dim == D, "cross-attention inner width must equal the model width"
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = MLPEmbedder(256, D, nn.SiLU())
        self.guidance_embedder = MLPEmbedder(256, D, nn.SiLU()) if cfg.guidance_embeds else None
        self.t_block = nn.Linear(D, 6 * D)                 # shared AdaLN-single modulation, computed once
        self.caption_proj = MLPEmbedder(cfg.caption_channels, D, nn.GELU(approximate="tanh"))
        self.caption_norm = RMSNorm(D, eps=1e-5)
        self.blocks = nn.ModuleList([SanaBlock(cfg) for _ in range(cfg.depth)])
        self.final_scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)
        self.proj_out = nn.Linear(D, p * p * cfg.out_channels)

    def final_tokens(self, x, t, text, text_mask=None, pooled=None, guidance=None):
        """Everything before proj_out: -> (final-norm image tokens (B, N, D), h, w)."""
        cfg, p = self.config, self.config.patch_size
        B, _, H, W = x.shape
        h, w = check_patch_grid(H, W, p)
        dtype = self.patch_embed.weight.dtype
        x = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2)          # (B, N=h*w, D)
        if cfg.interpolation_scale is not None:
            pe = sincos_pos_embed(x.shape[-1], h, w, cfg.sample_size // p, cfg.interpolation_scale)
            x = (x + pe.to(x.device)).to(dtype)

        # time: the checkpoint's timestep is time_scale * t (1000 t for SANA, t for Sprint teachers)
        emb = self.t_embedder(timestep_features(cfg.time_scale * t.expand(B)).to(dtype))   # (B, D)
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this checkpoint embeds the guidance scale: pass guidance=(B,) floats")
            emb = emb + self.guidance_embedder(timestep_features(cfg.guidance_scale * guidance.expand(B)).to(dtype))
        t6 = self.t_block(F.silu(emb)).view(B, 6, -1)                          # (B, 6, D)

        c = self.caption_norm(self.caption_proj(text.to(dtype)))             # (B, L, D)
        bias = None
        if text_mask is not None:                                            # (B, L) -> additive (B, 1, 1, L)
            bias = ((1 - text_mask.to(x.dtype)) * -10000.0)[:, None, None, :]

        x = self.run_blocks(self.blocks, x, c, bias, t6, h, w)               # (B, N, D)

        # final norm: modulated by the raw time embedding (no SiLU, no t_block); rows (shift, scale)
        final = Modulation(*(self.final_scale_shift_table[None] + emb[:, None]).chunk(2, dim=1))
        return final(layer_norm(x)), h, w                                     # (B, N, D); DiT.velocity projects


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5 (MMDiT, MMDiT-X): config and presets


@dataclass
class SD3Config:
    depth: int = 24                   # joint blocks; the releases use heads = depth, width = 64 * depth
    num_heads: int = 24               # width D = num_heads * head_dim (kept apart so tiny test configs work)
    head_dim: int = 64
    patch_size: int = 2               # 2x2 latent pixels per token (Conv2d patch embed)
    in_channels: int = 16             # 16-channel KL VAE latents
    out_channels: int = 16
    joint_attention_dim: int = 4096   # text width: CLIP-L + CLIP-G (zero-padded to 4096) and T5-XXL tokens
    pooled_projection_dim: int = 2048  # CLIP-L (768) + CLIP-G (1280) pooled vectors
    pos_embed_max_size: int = 192     # M: the stored sin-cos table covers M x M patches, centre-cropped per input
    sample_size: int = 128            # training latent side; only sets the table's base grid at random init
    qk_norm: bool = False             # SD3.5: RMSNorm over each head's q and k (eps 1e-6)
    dual_attention_layers: tuple = ()  # SD3.5-Medium (MMDiT-X): blocks with an extra image-only self-attention
    time_scale: float = 1000.0        # module input t in [0,1] -> checkpoint timestep 1000 t

    def __post_init__(self):           # JSON round trips give a list
        self.dual_attention_layers = tuple(self.dual_attention_layers)

    @property
    def width(self):
        return self.num_heads * self.head_dim


SD3_CONFIGS = {   # diffusers SD3Transformer2DModel config.json of the stabilityai repos
    "SD3-Medium": SD3Config(depth=24, num_heads=24, pos_embed_max_size=192),
    "SD3.5-Medium": SD3Config(depth=24, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                              dual_attention_layers=tuple(range(13))),
    "SD3.5-Large": SD3Config(depth=38, num_heads=38, pos_embed_max_size=192, qk_norm=True),
}


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5: attention and joint block


class StreamAttention(nn.Module):
    """One stream's share of an attention: q, k, v projections (biased), optional per-head qk RMSNorm, and the
    output projection (absent for the context stream of the last block, whose attention output is dropped)."""

    def __init__(self, dim, heads, qk_norm, out=True):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim // heads, eps=1e-6) if qk_norm else None
        self.norm_k = RMSNorm(dim // heads, eps=1e-6) if qk_norm else None
        self.to_out = nn.Linear(dim, dim) if out else None

    def qkv(self, x):                                                          # x: (B, N, D)
        B, N, _ = x.shape
        q, k, v = (f(x).view(B, N, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        if self.norm_q is not None:                                           # (B, h, N, d) each
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v

    def forward(self, x):
        """Plain self-attention within this stream (MMDiT-X's attn2)."""
        out = attention(*self.qkv(x))                                          # (B, h, N, d)
        return self.to_out(out.transpose(1, 2).flatten(2))                     # (B, N, D)


class JointBlock(nn.Module):
    """MMDiT block: image tokens x and context tokens c, each with its own AdaLN-Zero modulation, q/k/v and MLP,
    share one attention over [x; c]. With `dual`, x also gets an image-only self-attention (MMDiT-X). The last
    block is `context_pre_only`: c gives keys and values, is modulated by (shift, scale) only, and is not updated.
    """

    def __init__(self, cfg: SD3Config, dual, context_pre_only):
        super().__init__()
        D, heads = cfg.width, cfg.num_heads
        self.x_mod = nn.Linear(D, (9 if dual else 6) * D)             # (shift, scale, gate) x (attn, mlp[, attn2])
        self.x_attn = StreamAttention(D, heads, cfg.qk_norm)
        self.x_attn2 = StreamAttention(D, heads, cfg.qk_norm) if dual else None
        self.x_mlp = FeedForward(D)
        self.context_mod = nn.Linear(D, (2 if context_pre_only else 6) * D)
        self.context_attn = StreamAttention(D, heads, cfg.qk_norm, out=not context_pre_only)
        self.context_mlp = None if context_pre_only else FeedForward(D)

    def forward(self, x, c, cond):                          # x: (B, N, D), c: (B, S, D), cond: (B, D)
        cond = F.silu(cond)
        attn, mlp, *dual = modulations(self.x_mod(cond), 3 if self.x_attn2 is not None else 2)
        if self.context_mlp is None:                        # last block: rows (shift, scale), no gate
            c_attn = Modulation(*self.context_mod(cond)[:, None].chunk(2, dim=-1))
        else:
            c_attn, c_mlp = modulations(self.context_mod(cond), 2)

        # joint attention over [image; context] tokens (the order is free: no mask, no RoPE)
        x_normed = layer_norm(x)
        qx, kx, vx = self.x_attn.qkv(attn(x_normed))                          # (B, h, N, d) each
        qc, kc, vc = self.context_attn.qkv(c_attn(layer_norm(c)))              # (B, h, S, d) each
        out = attention(torch.cat([qx, qc], 2), torch.cat([kx, kc], 2), torch.cat([vx, vc], 2))  # (B, h, N+S, d)
        out_x, out_c = out.transpose(1, 2).flatten(2).split([x.shape[1], c.shape[1]], dim=1)    # (B, N|S, D)

        x = x + attn.gate * self.x_attn.to_out(out_x)
        if dual:                                            # MMDiT-X: modulates the same LN(x), not a fresh one
            attn2, = dual
            x = x + attn2.gate * self.x_attn2(attn2(x_normed))
        x = x + mlp.gate * self.x_mlp(mlp(layer_norm(x)))
        if self.context_mlp is None:                        # the context's attention output is dropped
            return x, c
        c = c + c_attn.gate * self.context_attn.to_out(out_c)
        c = c + c_mlp.gate * self.context_mlp(c_mlp(layer_norm(c)))
        return x, c


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5: top model


class MMDiT(DiT):
    """SD3 / SD3.5 transformer (Esser et al. 2024, arXiv 2403.03206; MMDiT-X: Stability-AI/sd3.5 mmditx.py).

    text: (B, S, 4096) the joint CLIP+T5 sequence; pooled: (B, 2048). text_mask and guidance are not used:
    SD3 attends to every text position (its pipelines pass no mask) and is not guidance-distilled.
    """

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.config = cfg
        D, p, M = cfg.width, cfg.patch_size, cfg.pos_embed_max_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        # the checkpoints store this (1, M^2, D) table; at random init it is the sin-cos table diffusers builds
        self.register_buffer("pos_embed", sincos_pos_embed(D, M, M, cfg.sample_size // p)[None])
        self.t_embedder = MLPEmbedder(256, D, nn.SiLU())
        self.y_embedder = MLPEmbedder(cfg.pooled_projection_dim, D, nn.SiLU())
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D)
        self.joint_blocks = nn.ModuleList([JointBlock(cfg, i in cfg.dual_attention_layers, i == cfg.depth - 1)
                                           for i in range(cfg.depth)])
        self.final_mod = nn.Linear(D, 2 * D)               # final AdaLN, rows (shift, scale) as SAI
        self.proj_out = nn.Linear(D, p * p * cfg.out_channels)

    def fsdp_units(self):
        return list(self.joint_blocks)

    def cropped_pos_embed(self, h, w):
        """The centre h x w window of the stored M x M table, flattened row-major: (1, h w, D)."""
        M = self.config.pos_embed_max_size
        if h > M or w > M:
            p = self.config.patch_size
            raise ValueError(f"latent grid {h}x{w} patches exceeds pos_embed_max_size {M}; use latents of at most "
                             f"{M * p}x{M * p} pixels (images up to {M * p * 8} px with the 8x VAE)")
        top, left = (M - h) // 2, (M - w) // 2
        return self.pos_embed.reshape(M, M, -1)[top:top + h, left:left + w].reshape(1, h * w, -1)

    def final_tokens(self, x, t, text, text_mask=None, pooled=None, guidance=None):
        cfg, p = self.config, self.config.patch_size
        if pooled is None:
            raise ValueError("SD3 needs pooled=(B, 2048) pooled CLIP text features (teacher.encode_prompts gives them)")
        B, _, H, W = x.shape
        h, w = check_patch_grid(H, W, p)
        dtype = self.x_embedder.weight.dtype
        x = self.x_embedder(x.to(dtype)).flatten(2).transpose(1, 2)           # (B, N=h*w, D)
        x = x + self.cropped_pos_embed(h, w).to(dtype)                        # (B, N, D)
        # conditioning vector: time (the checkpoint's timestep is 1000 t) plus the pooled text
        cond = self.t_embedder(timestep_features(cfg.time_scale * t.expand(B)).to(dtype))   # (B, D)
        cond = cond + self.y_embedder(pooled.to(dtype))                        # (B, D)
        c = self.context_embedder(text.to(dtype))                              # (B, S, D)

        x, _ = self.run_blocks(self.joint_blocks, (x, c), cond)               # (B, N, D)

        final = Modulation(*self.final_mod(F.silu(cond))[:, None].chunk(2, dim=-1))
        return final(layer_norm(x)), h, w                                     # (B, N, D); DiT.velocity projects


# ----------------------------------------------------------------------------------------------
# FLUX: config and presets


@dataclass
class FluxConfig:
    in_channels: int = 16          # UNPACKED latent channels (the 16-channel KL VAE)
    patch_size: int = 2            # FLUX's 2x2 latent packing: a token holds in_channels * 4 = 64 numbers
    depth: int = 19                # double-stream blocks (separate image and text weights, joint attention)
    depth_single: int = 38         # single-stream blocks (one weight set on the concatenated [text, image] sequence)
    num_heads: int = 24            # width D = num_heads * head_dim = 3072
    head_dim: int = 128
    axes_dims_rope: tuple = (16, 56, 56)   # RoPE channels per position-id axis (unused, row, column); sums to head_dim
    theta: float = 10000.0         # RoPE base
    joint_attention_dim: int = 4096     # T5-XXL width
    pooled_projection_dim: int = 768    # CLIP-L pooled width
    guidance_embeds: bool = True   # FLUX.1-dev is guidance-distilled: the scale g is a network input (schnell: none)
    mlp_ratio: float = 4.0
    time_scale: float = 1000.0     # the checkpoint embeds 1000 * t ...
    guidance_scale: float = 1000.0     # ... and 1000 * g (g = 3.5 -> 3500)

    def __post_init__(self):
        self.axes_dims_rope = tuple(self.axes_dims_rope)      # a JSON round trip gives a list
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim {self.head_dim}; fix the "
                             f"config")

    @property
    def width(self):
        return self.num_heads * self.head_dim


FLUX_CONFIGS = {
    "FLUX.1-dev": FluxConfig(),
    "FLUX.1-schnell": FluxConfig(guidance_embeds=False),     # timestep-distilled, no guidance embedder
}


# ----------------------------------------------------------------------------------------------
# FLUX: time input, 3-axis RoPE, blocks


def flux_timestep(s, scale, dtype):
    """What FLUX's sinusoid sees for flow time t (or guidance g): s rounded to the weights' dtype, THEN times 1000
    in that dtype, the cast order of BFL (sampling.denoise: t_vec in img.dtype) and diffusers (FluxTransformer2DModel:
    timestep.to(dtype) * 1000). In bf16, t = 0.37 -> 370, g = 3.5 -> 3504; exact values change outputs by up to 40%."""
    return s.to(dtype) * scale


def rope_angles(ids, axes_dims, theta):
    """(S, 3) position ids -> (S, head_dim / 2) angles, fp32: axis a adds pos_a * theta^(-2k / d_a), k < d_a / 2."""
    angles = []
    for axis, d in enumerate(axes_dims):
        omega = theta ** -(torch.arange(0, d, 2, dtype=torch.float32, device=ids.device) / d)
        angles.append(ids[:, axis, None].float() * omega[None])              # (S, d / 2)
    return torch.cat(angles, dim=-1)


def apply_rope(x, cos, sin):
    """Rotate ADJACENT channel pairs (2k, 2k+1) of x (B, h, S, d) by angle k, in fp32 (BFL math.apply_rope)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                     # (B, h, S, d / 2) each
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


class FluxQKV(nn.Module):
    """q, k, v projections with per-head RMSNorm (eps 1e-6) on q and k: (B, N, D) -> 3 x (B, heads, N, head_dim)."""

    def __init__(self, dim, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_k = RMSNorm(head_dim, eps=1e-6)

    def forward(self, x):
        q, k, v = (f(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        return self.norm_q(q), self.norm_k(k), v


def joint_attention(q, k, v, rope):
    """Softmax attention over the whole [text, image] sequence with RoPE on q and k: -> (B, S, D)."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return attention(q, k, v).transpose(1, 2).flatten(2)                     # (B, h, S, d) -> (B, S, D)


class FluxStream(nn.Module):
    """The weights of one stream (image or text) of a double block: AdaLN (2 sub-layers), qkv, out projection, MLP."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        D = cfg.width
        self.mod = nn.Linear(D, 6 * D)                     # (shift, scale, gate) for attention, then for the MLP
        self.attn = FluxQKV(D, cfg.head_dim)
        self.proj = nn.Linear(D, D)
        self.mlp = FeedForward(D, cfg.mlp_ratio)


class FluxDoubleBlock(nn.Module):
    """Per stream s in (txt, img): q, k, v from mod1(LN s); ONE attention over [txt, img];
    s += gate1 * proj(attn_s); s += gate2 * MLP(mod2(LN s))."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.img = FluxStream(cfg)
        self.txt = FluxStream(cfg)

    def forward(self, img, txt, c, rope):              # img: (B, N, D), txt: (B, L, D), c = SiLU(vec): (B, D)
        img_attn, img_mlp = modulations(self.img.mod(c), 2)
        txt_attn, txt_mlp = modulations(self.txt.mod(c), 2)
        qi, ki, vi = self.img.attn(img_attn(layer_norm(img)))                # (B, h, N, d) each
        qt, kt, vt = self.txt.attn(txt_attn(layer_norm(txt)))                # (B, h, L, d) each
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qt, qi), (kt, ki), (vt, vi)))   # text first: (B, h, L+N, d)
        out = joint_attention(q, k, v, rope)                                  # (B, L+N, D)
        L = txt.shape[1]
        img = img + img_attn.gate * self.img.proj(out[:, L:])
        img = img + img_mlp.gate * self.img.mlp(img_mlp(layer_norm(img)))
        txt = txt + txt_attn.gate * self.txt.proj(out[:, :L])
        txt = txt + txt_mlp.gate * self.txt.mlp(txt_mlp(layer_norm(txt)))
        return img, txt


class FluxSingleBlock(nn.Module):
    """Attention and MLP in parallel from one modulated LN(z), z = [txt, img]:
    z += gate * proj_out([attn(q, k, v), GELU(mlp_in)]). BFL fuses q, k, v, mlp_in into `linear1`."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        D, hidden = cfg.width, int(cfg.mlp_ratio * cfg.width)
        self.mod = nn.Linear(D, 3 * D)                     # (shift, scale, gate)
        self.attn = FluxQKV(D, cfg.head_dim)
        self.mlp_in = nn.Linear(D, hidden)
        self.proj_out = nn.Linear(D + hidden, D)           # input: [attention output (D), MLP hidden (4D)]

    def forward(self, z, c, rope):                          # z: (B, S, D), c = SiLU(vec): (B, D)
        (mod,) = modulations(self.mod(c), 1)
        z_mod = mod(layer_norm(z))
        out = joint_attention(*self.attn(z_mod), rope)                        # (B, S, D)
        mlp = F.gelu(self.mlp_in(z_mod), approximate="tanh")                  # (B, S, 4D)
        return z + mod.gate * self.proj_out(torch.cat([out, mlp], dim=-1))


# ----------------------------------------------------------------------------------------------
# FLUX: top model


class Flux(DiT):
    """FLUX.1 (Black Forest Labs 2024): 2x2-packed latent tokens and T5 tokens through double-stream blocks, then
    single-stream blocks on the concatenated sequence; 3-axis RoPE on ids (0, row, col) for image tokens and zeros
    for text; one conditioning vector vec = MLP(t) + MLP(g) + MLP(CLIP pooled) drives every AdaLN."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.config = cfg
        D = cfg.width
        self.img_in = nn.Linear(cfg.in_channels * cfg.patch_size**2, D)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, D)
        self.time_in = MLPEmbedder(256, D, nn.SiLU())
        self.guidance_in = MLPEmbedder(256, D, nn.SiLU()) if cfg.guidance_embeds else None
        self.vector_in = MLPEmbedder(cfg.pooled_projection_dim, D, nn.SiLU())
        self.double_blocks = nn.ModuleList([FluxDoubleBlock(cfg) for _ in range(cfg.depth)])
        self.single_blocks = nn.ModuleList([FluxSingleBlock(cfg) for _ in range(cfg.depth_single)])
        self.final_mod = nn.Linear(D, 2 * D)               # final AdaLN, rows (shift, scale) as BFL; diffusers swaps
        self.proj_out = nn.Linear(D, cfg.in_channels * cfg.patch_size**2)

    def fsdp_units(self):
        return [*self.double_blocks, *self.single_blocks]

    patch_layout = "cpq"                                   # proj_out features are FluxPipeline's packing

    def final_tokens(self, x, t, text, text_mask=None, pooled=None, guidance=None):
        """text_mask is unused: FLUX attends to every T5 token, padding included, as FluxPipeline runs it."""
        cfg, p = self.config, self.config.patch_size
        B, _, H, W = x.shape
        h, w = check_patch_grid(H, W, p)
        if pooled is None:
            raise ValueError("FLUX needs pooled=(B, pooled_projection_dim) CLIP-L pooled text features")
        dtype = self.img_in.weight.dtype
        img = self.img_in(patchify(x.to(dtype), p))                           # (B, N = h*w, D); FluxPipeline packing
        txt = self.txt_in(text.to(dtype))                                     # (B, L, D)

        vec = self.time_in(timestep_features(flux_timestep(t.expand(B), cfg.time_scale, dtype)).to(dtype))  # (B, D)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this FLUX checkpoint embeds the guidance scale (FLUX.1-dev): pass guidance=(B,) "
                                 "floats, e.g. 3.5")
            g = flux_timestep(torch.as_tensor(guidance, device=x.device).expand(B), cfg.guidance_scale, dtype)
            vec = vec + self.guidance_in(timestep_features(g).to(dtype))
        vec = vec + self.vector_in(pooled.to(dtype))
        c = F.silu(vec)                                    # every AdaLN linear reads SiLU(vec)

        # position ids: text tokens all zeros (identity rotation), image token (0, row, col), text first
        L = txt.shape[1]
        rows, cols = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).flatten(0, 1)  # (N, 3)
        ids = torch.cat([img_ids.new_zeros(L, 3), img_ids])                                # (L + N, 3)
        angles = rope_angles(ids, cfg.axes_dims_rope, cfg.theta)                          # (L + N, head_dim / 2)
        rope = (angles.cos(), angles.sin())

        img, txt = self.run_blocks(self.double_blocks, (img, txt), c, rope)   # (B, N, D), (B, L, D)
        z = self.run_blocks(self.single_blocks, torch.cat([txt, img], dim=1), c, rope)   # (B, L + N, D)

        final = Modulation(*self.final_mod(c)[:, None].chunk(2, dim=-1))     # (shift, scale), each (B, 1, D)
        return final(layer_norm(z[:, L:])), h, w                              # image tokens (B, N, D)


# ----------------------------------------------------------------------------------------------
# Registry: config type -> module, and configs to/from checkpoints

FAMILIES = {   # config class -> module class; each family section adds its row
    SanaConfig: Sana,
    SD3Config: MMDiT,
    FluxConfig: Flux,
}


def build_model(cfg):
    """The module for a config; the one place a family's config picks its class."""
    if type(cfg) not in FAMILIES:
        raise TypeError(f"no model for config type {type(cfg).__name__}")
    return FAMILIES[type(cfg)](cfg)


def config_to_dict(cfg):
    return {"family": type(cfg).__name__, **asdict(cfg)}


def config_from_dict(d):
    d = dict(d)
    family = d.pop("family")
    classes = {c.__name__: c for c in FAMILIES}
    if family not in classes:
        raise ValueError(f"unknown model family {family!r} in checkpoint config; expected one of {list(classes)}")
    return classes[family](**d)
