"""
The two latent codecs of the teachers, written directly in PyTorch: one banner section group per codec.

  DC-AE f32c32, SANA's autoencoder (Chen et al. 2024, "Deep Compression Autoencoder", arXiv 2410.10733),
  maps a (B, 3, H, W) image in [-1, 1] to a (B, 32, H/32, W/32) latent and back. The encoder is
  deterministic (no distribution). The SANA checkpoint (`mit-han-lab/dc-ae-f32c32-sana-1.0`) has six stages:
  three of ResBlocks at 128/256/512 channels, then three of EfficientViT blocks (multi-scale ReLU linear
  attention + GLUMBConv) at 512/1024/1024. Stages are joined by stride-2 Down / nearest-x2 Up convs whose
  residual shortcuts are parameter-free pixel-(un)shuffles, so most of the signal bypasses the convs.

  AutoencoderKL, the 16-channel VAE of SD3, SD3.5 and FLUX.1 (the LDM autoencoder of Rombach et al. 2022,
  arXiv 2112.10752, widened to 16 latent channels), maps a (B, 3, H, W) image to a (B, 16, H/8, W/8) latent
  and back. Four stages of GroupNorm ResNets at 128/256/512/512 channels joined by stride-2 convs
  (asymmetric padding) and nearest-x2 convs, with one single-head softmax attention over all pixels in the
  middle of each half. The encoder outputs a diagonal Gaussian (mean, log-variance); `encode` returns its
  mean, or a sample of it with `sample=True` (as the official SiD-DiT data path does).

    vae, scaling = teacher_loaders.load_dcae("path/to/sana/vae")   # diffusers `vae/` folder -> (module, 0.41407)
    x0  = vae.encode(img) * scaling                  # img (B, 3, H, W) in [-1, 1] -> teacher latent
    img = vae.decode(x0 / scaling)                   # and back (no shift for DC-AE)

    vae, scaling, shift = teacher_loaders.load_kl_vae("path/to/sd3/vae")   # -> (module, 1.5305, 0.0609)
    x0  = (vae.encode(img) - shift) * scaling        # SD3: 1.5305, 0.0609; FLUX: 0.3611, 0.1159
    img = vae.decode(x0 / scaling + shift)

`encode`/`decode` work on raw latents; the scaling and shift live with the caller, as in diffusers. Our
module names differ from diffusers' in a few places (teacher_loaders.DCAE_DIFFUSERS_KEYS and
KL_DIFFUSERS_KEYS map them); original LDM/SAI/BFL KL files load through teacher_loaders.kl_original_keys.

Checked against, in fp32 on CPU with every parameter randomised (max error <= 1e-4 * max|reference|):
  - DC-AE: diffusers `AutoencoderDC` (0.42.1) on tiny configs, encoder and decoder, both attention paths
    (linear and the small-image quadratic fallback), "conv"/"interpolate" and "pixel_unshuffle"/
    "pixel_shuffle" resampling, single-file, sharded and bf16 variant folders. Full size on the meta device:
    375 tensors, 312.3 M parameters. Run `python -m pytest test_vae.py -q`.
  - AutoencoderKL: diffusers `AutoencoderKL` (0.42.1) on tiny 4-stage configs with non-square images: the
    encoder mean, a seeded sample (`latent_dist.sample(generator)`), the decoder, with and without quant
    convs; diffusers folders (single, sharded, bf16 variant) and original files (SAI `first_stage_model.*`,
    BFL unprefixed) whose layout is cross-checked by diffusers' `convert_ldm_vae_checkpoint`; the latent
    normalisation against the SD3 and FLUX pipelines. Full size on the meta device: 244 tensors, 83.8 M
    parameters. Run `python -m pytest test_kl_vae.py -q`.

Differences from diffusers: attention is computed in fp32 (diffusers keeps the KL mid attention and DC-AE's
quadratic path in the input dtype); identical in fp32. No tiled or sliced encode/decode.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# DC-AE: config and presets


@dataclass
class DCAEConfig:
    in_channels: int = 3
    latent_channels: int = 32
    block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)   # one width per stage; factor 2**(stages-1)
    encoder_block_types: tuple = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    decoder_block_types: tuple = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    encoder_layers_per_block: tuple = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))   # extra aggregation kernel sizes per stage
    decoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    attention_head_dim: int = 32    # EfficientViT widths must be multiples of it
    downsample_block_type: str = "conv"          # "conv": stride-2 conv; "pixel_unshuffle": conv then unshuffle
    upsample_block_type: str = "interpolate"     # "interpolate": nearest x2, conv; "pixel_shuffle": conv, shuffle
    decoder_act_fns: tuple = ("silu",) * 6       # decoder ResBlock activation per stage (encoder: always SiLU)
    decoder_conv_act_fn: str = "relu"            # between the decoder's final norm and conv_out
    encoder_out_shortcut: bool = True            # latent += channel-group mean of the last features
    decoder_in_shortcut: bool = True             # features += latent repeated over channels
    scaling_factor: float = 0.41407              # teacher latent x0 = encode(img) * scaling_factor (no shift)

    @property
    def spatial_factor(self):
        return 2 ** (len(self.block_out_channels) - 1)


DCAE_CONFIGS = {
    # mit-han-lab/dc-ae-f32c32-sana-1.0 (diffusers `vae/` of the SANA pipelines): 375 tensors, 312.3 M params
    "dc-ae-f32c32-sana-1.0": DCAEConfig(),
}

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "mish": nn.Mish}  # diffusers' set

# AutoencoderDC.__init__ defaults (diffusers 0.42), used for keys a config.json leaves out
DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
    "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3), "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle", "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu",
    "encoder_out_shortcut": True, "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu", "scaling_factor": 1.0,
}


def dcae_config_from_diffusers(d):
    """DCAEConfig from a diffusers AutoencoderDC config.json dict; one-line ValueError for what is not implemented."""
    if d.get("_class_name", "AutoencoderDC") != "AutoencoderDC":
        raise ValueError(f"config.json describes a {d['_class_name']}, not an AutoencoderDC; point at the DC-AE "
                         f"`vae/` folder of a SANA pipeline")
    d = {**DIFFUSERS_DEFAULTS, **d}
    widths = tuple(d["encoder_block_out_channels"])
    n = len(widths)

    def per_stage(key):  # diffusers accepts one string for all stages or one per stage
        v = d[key]
        v = (v,) * n if isinstance(v, str) else tuple(v)
        if len(v) != n:
            raise ValueError(f"config.json {key} has {len(v)} entries for {n} stages")
        return v

    if tuple(d["decoder_block_out_channels"]) != widths:
        raise ValueError(f"config.json: encoder_block_out_channels {list(widths)} != decoder_block_out_channels "
                         f"{list(d['decoder_block_out_channels'])}; differing widths are not implemented in vae.py")
    down = d["downsample_block_type"].lower()   # SANA's own config.json says "Conv"
    if down not in ("conv", "pixel_unshuffle"):
        raise ValueError(f"config.json downsample_block_type={d['downsample_block_type']!r} is not implemented; "
                         f"vae.py supports 'conv' and 'pixel_unshuffle'")
    up = d["upsample_block_type"]
    if up not in ("interpolate", "pixel_shuffle"):
        raise ValueError(f"config.json upsample_block_type={up!r} is not implemented; vae.py supports "
                         f"'interpolate' and 'pixel_shuffle'")
    norms = per_stage("decoder_norm_types")
    if any(t != "rms_norm" for t in norms):
        raise ValueError(f"config.json decoder_norm_types={list(norms)} is not implemented; vae.py supports only "
                         f"'rms_norm' (as in SANA's DC-AE)")
    acts = per_stage("decoder_act_fns")
    for a in acts + (d["decoder_conv_act_fn"],):
        if a not in ACTIVATIONS:
            raise ValueError(f"config.json activation {a!r} is not implemented; vae.py supports {list(ACTIVATIONS)}")
    enc_types, dec_types = per_stage("encoder_block_types"), per_stage("decoder_block_types")
    for t in enc_types + dec_types:
        if t not in ("ResBlock", "EfficientViTBlock"):
            raise ValueError(f"config.json block type {t!r} is not implemented; vae.py supports 'ResBlock' and "
                             f"'EfficientViTBlock'")
    enc_layers, dec_layers = per_stage("encoder_layers_per_block"), per_stage("decoder_layers_per_block")
    if 0 in enc_layers + dec_layers:
        raise ValueError(f"config.json has a stage with 0 layers (encoder {list(enc_layers)}, decoder "
                         f"{list(dec_layers)}); such DC-AE variants are not implemented in vae.py")
    return DCAEConfig(
        in_channels=d["in_channels"], latent_channels=d["latent_channels"], block_out_channels=widths,
        encoder_block_types=enc_types, decoder_block_types=dec_types,
        encoder_layers_per_block=enc_layers, decoder_layers_per_block=dec_layers,
        encoder_qkv_multiscales=tuple(tuple(s) for s in d["encoder_qkv_multiscales"]),
        decoder_qkv_multiscales=tuple(tuple(s) for s in d["decoder_qkv_multiscales"]),
        attention_head_dim=d["attention_head_dim"], downsample_block_type=down, upsample_block_type=up,
        decoder_act_fns=acts, decoder_conv_act_fn=d["decoder_conv_act_fn"],
        encoder_out_shortcut=d["encoder_out_shortcut"], decoder_in_shortcut=d["decoder_in_shortcut"],
        scaling_factor=float(d["scaling_factor"]),
    )


# ----------------------------------------------------------------------------------------------
# DC-AE: helpers


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channels of NCHW, weight and bias, eps 1e-5; the mean square taken in fp32 (as diffusers)."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):                                                       # x: (B, C, H, W)
        var = x.float().pow(2).mean(dim=1, keepdim=True)                        # (B, 1, H, W)
        x = (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def channels_linear(linear, x):
    """A per-pixel nn.Linear on NCHW (diffusers stores these as Linear, the original as 1x1 convs)."""
    return linear(x.movedim(1, -1)).movedim(-1, 1)


def linear_attention(q, k, v, eps):
    """out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps), O(N d^2). q, k, v: (B, G, d, N), ReLU'd q and k."""
    v = F.pad(v, (0, 0, 0, 1), value=1.0)                                       # (B, G, d+1, N): row of ones
    out = (v @ k.transpose(-1, -2)) @ q                                         # (B, G, d+1, N)
    return out[:, :, :-1] / (out[:, :, -1:] + eps)                              # (B, G, d, N)


def quadratic_attention(q, k, v, eps):
    """The same attention through the N x N scores (cheaper when N <= d), normalised by their sum (no softmax)."""
    scores = k.transpose(-1, -2) @ q                                            # (B, G, N_keys, N_queries)
    scores = scores / (scores.sum(dim=2, keepdim=True) + eps)
    return v @ scores                                                           # (B, G, d, N)


# ----------------------------------------------------------------------------------------------
# DC-AE: blocks


class ResBlock(nn.Module):
    """x + RMSN(Conv3(act(Conv3(x)))); the second conv has no bias (the norm's bias replaces it)."""

    def __init__(self, channels, act):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = ACTIVATIONS[act]()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x):
        return x + self.norm(self.conv2(self.act(self.conv1(x))))


class MultiScaleAggregation(nn.Module):
    """Local mixing of q, k, v: depthwise KxK conv, then a 1x1 conv within each group of d channels (3 per head)."""

    def __init__(self, channels, heads, kernel_size):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)

    def forward(self, x):
        return self.proj_out(self.proj_in(x))


class MultiScaleLinearAttention(nn.Module):
    """MLLA: ReLU linear attention over q, k, v and their locally aggregated copies, then Linear -> RMSN, residual.

    to_q/to_k/to_v are diffusers' names for the three thirds of the original fused 1x1 `qkv` conv. Their
    concatenation is cut into heads of 3d consecutive channels, each read as [q | k | v] (the original layout),
    so "to_q" alone does not hold the queries: keep the concatenation order.
    """

    def __init__(self, channels, head_dim, kernel_sizes, eps=1e-15):
        super().__init__()
        assert channels % head_dim == 0, f"EfficientViT width {channels} is not a multiple of head_dim {head_dim}"
        self.head_dim, self.eps = head_dim, eps
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.aggreg = nn.ModuleList(
            [MultiScaleAggregation(3 * channels, channels // head_dim, k) for k in kernel_sizes])
        self.to_out = nn.Linear(channels * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = ChannelRMSNorm(channels)

    def forward(self, x):                                                       # x: (B, C, H, W)
        B, C, H, W = x.shape
        d = self.head_dim
        qkv = torch.cat([channels_linear(f, x) for f in (self.to_q, self.to_k, self.to_v)], dim=1)  # (B, 3C, H, W)
        z = torch.cat([qkv] + [agg(qkv) for agg in self.aggreg], dim=1)        # (B, S*3C, H, W), S = 1 + scales
        with torch.autocast(device_type=x.device.type, enabled=False):
            # the normaliser sums over all pixels: fp32 (both references upcast the linear path)
            z = z.float().reshape(B, -1, 3 * d, H * W)                          # (B, G = S*C/d, 3d, N)
            q, k, v = z.chunk(3, dim=2)                                         # (B, G, d, N) each
            q, k = F.relu(q), F.relu(k)
            # diffusers' switch: the quadratic form when the feature map has no more pixels than head_dim
            # (small images only: SANA's 32x stage at 128 x 128 px has 16 <= 32 pixels)
            attend = linear_attention if H * W > d else quadratic_attention
            out = attend(q, k, v, self.eps)                                     # (B, G, d, N)
        out = out.to(x.dtype).reshape(B, -1, H, W)                              # (B, S*C, H, W)
        return x + self.norm_out(channels_linear(self.to_out, out))             # (B, C, H, W)


class GLUMBConv(nn.Module):
    """1x1 conv to 2F -> SiLU -> depthwise 3x3 -> (a, g) -> a * SiLU(g) -> 1x1 conv to C -> RMSN, residual; F = 4C."""

    def __init__(self, channels, expand_ratio=4):
        super().__init__()
        hidden = expand_ratio * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x):                                                       # x: (B, C, H, W)
        h = self.conv_depth(F.silu(self.conv_inverted(x)))                      # (B, 2F, H, W)
        a, g = h.chunk(2, dim=1)                                                # (B, F, H, W) each
        return x + self.norm(self.conv_point(a * F.silu(g)))                    # (B, C, H, W)


class EfficientViTBlock(nn.Module):
    def __init__(self, channels, head_dim, kernel_sizes):
        super().__init__()
        self.attn = MultiScaleLinearAttention(channels, head_dim, kernel_sizes)
        self.ffn = GLUMBConv(channels)                                          # diffusers: `conv_out`

    def forward(self, x):
        return self.ffn(self.attn(x))


def make_block(block_type, channels, head_dim, kernel_sizes, act):
    if block_type == "ResBlock":
        return ResBlock(channels, act)
    return EfficientViTBlock(channels, head_dim, kernel_sizes)


class DownBlock(nn.Module):
    """Halve H and W: conv + shortcut = pixel_unshuffle(x) averaged over groups of 4*Cin/Cout consecutive channels."""

    def __init__(self, c_in, c_out, pixel_unshuffle):
        super().__init__()
        self.pixel_unshuffle = pixel_unshuffle
        self.group = 4 * c_in // c_out
        if pixel_unshuffle:                                                     # conv at full size, then unshuffle
            self.conv = nn.Conv2d(c_in, c_out // 4, 3, padding=1)
        else:                                                                   # "conv": stride 2
            self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)

    def forward(self, x):                                                       # x: (B, Cin, H, W)
        y = self.conv(x)
        if self.pixel_unshuffle:
            y = F.pixel_unshuffle(y, 2)                                         # (B, Cout, H/2, W/2)
        s = F.pixel_unshuffle(x, 2)                                             # (B, 4Cin, H/2, W/2), chan. 4c + 2i + j
        s = s.unflatten(1, (-1, self.group)).mean(dim=2)                        # (B, Cout, H/2, W/2)
        return y + s


class UpBlock(nn.Module):
    """Double H and W: conv + shortcut = pixel_shuffle(x with each channel repeated 4*Cout/Cin times)."""

    def __init__(self, c_in, c_out, interpolate):
        super().__init__()
        self.interpolate = interpolate
        self.repeats = 4 * c_out // c_in
        self.conv = nn.Conv2d(c_in, c_out if interpolate else 4 * c_out, 3, padding=1)

    def forward(self, x):                                                       # x: (B, Cin, H, W)
        if self.interpolate:
            y = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))     # (B, Cout, 2H, 2W)
        else:
            y = F.pixel_shuffle(self.conv(x), 2)                                # (B, Cout, 2H, 2W)
        s = F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)       # (B, Cout, 2H, 2W)
        return y + s


# ----------------------------------------------------------------------------------------------
# DC-AE: encoder, decoder, top model


class Encoder(nn.Module):
    """conv_in -> per stage: blocks, then Down (all but the last) -> conv_out + channel-group-mean shortcut."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.cfg = cfg
        widths = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        # diffusers keeps each stage as one Sequential with the Down block last: encoder.down_blocks.{s}.{n_s}
        self.down_blocks = nn.ModuleList()
        for s, (c, n) in enumerate(zip(widths, cfg.encoder_layers_per_block)):
            layers = [make_block(cfg.encoder_block_types[s], c, cfg.attention_head_dim,
                                 cfg.encoder_qkv_multiscales[s], act="silu") for _ in range(n)]
            if s < len(widths) - 1:
                layers.append(DownBlock(c, widths[s + 1], cfg.downsample_block_type == "pixel_unshuffle"))
            self.down_blocks.append(nn.Sequential(*layers))
        self.conv_out = nn.Conv2d(widths[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x):                                                       # x: (B, 3, H, W)
        x = self.conv_in(x)                                                     # (B, C_0, H, W)
        for stage in self.down_blocks:
            x = stage(x)                                                        # (B, C_last, H/f, W/f) at the end
        z = self.conv_out(x)                                                    # (B, latent, H/f, W/f)
        if self.cfg.encoder_out_shortcut:
            z = z + x.unflatten(1, (self.cfg.latent_channels, -1)).mean(dim=2)  # mean of C_last/latent consecutive
        return z


class Decoder(nn.Module):
    """conv_in + repeat shortcut -> per stage from the last: Up (all but the last), then blocks -> RMSN, act, conv."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.cfg = cfg
        widths = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        # stage s is decoder.up_blocks.{s}: its Up block (from width s+1) at index 0, then the blocks
        self.up_blocks = nn.ModuleList()
        for s, (c, n) in enumerate(zip(widths, cfg.decoder_layers_per_block)):
            layers = []
            if s < len(widths) - 1:
                layers.append(UpBlock(widths[s + 1], c, cfg.upsample_block_type == "interpolate"))
            layers += [make_block(cfg.decoder_block_types[s], c, cfg.attention_head_dim,
                                  cfg.decoder_qkv_multiscales[s], act=cfg.decoder_act_fns[s]) for _ in range(n)]
            self.up_blocks.append(nn.Sequential(*layers))
        self.norm_out = ChannelRMSNorm(widths[0])
        self.conv_act = ACTIVATIONS[cfg.decoder_conv_act_fn]()
        self.conv_out = nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):                                                       # z: (B, latent, h, w)
        x = self.conv_in(z)                                                     # (B, C_last, h, w)
        if self.cfg.decoder_in_shortcut:
            x = x + z.repeat_interleave(x.shape[1] // z.shape[1], dim=1)        # each channel C_last/latent times
        for stage in reversed(self.up_blocks):
            x = stage(x)                                                        # (B, C_0, f*h, f*w) at the end
        return self.conv_out(self.conv_act(self.norm_out(x)))                   # (B, 3, f*h, f*w)


class DCAE(nn.Module):
    """encode: image (B, 3, H, W) in [-1, 1] -> raw latent (B, 32, H/32, W/32); decode: the inverse. No scaling."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, img):
        f = self.config.spatial_factor
        if img.shape[-2] % f or img.shape[-1] % f:
            raise ValueError(f"image size {tuple(img.shape[-2:])} is not divisible by the DC-AE factor {f}; "
                             f"resize or crop to a multiple of {f}")
        return self.encoder(img.to(self.encoder.conv_in.weight.dtype))

    def decode(self, z):
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype))


# ----------------------------------------------------------------------------------------------
# AutoencoderKL (SD3, FLUX): config and presets


@dataclass
class KLConfig:
    in_channels: int = 3                            # image channels, in and out
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 512, 512)   # one width per stage; factor 2**(stages-1)
    layers_per_block: int = 2                       # encoder ResNets per stage; the decoder has one more
    norm_num_groups: int = 32                       # every GroupNorm; must divide every width
    use_quant_conv: bool = False                    # 1x1 conv on the (mean, logvar) moments (SD1/SDXL; not SD3/FLUX)
    use_post_quant_conv: bool = False               # 1x1 conv on the latent before the decoder
    scaling_factor: float = 1.0                     # teacher latent x0 = (encode(img) - shift_factor) * scaling_factor
    shift_factor: float = 0.0                       # (read by the caller; the presets hold the pipelines' values)

    @property
    def spatial_factor(self):
        return 2 ** (len(self.block_out_channels) - 1)


KL_CONFIGS = {
    # stabilityai/stable-diffusion-3-medium-diffusers `vae/` (the same VAE in SD3.5-Medium and -Large); the SAI
    # single files hold its weights under `first_stage_model.` but not the two factors
    "sd3": KLConfig(scaling_factor=1.5305, shift_factor=0.0609),
    # black-forest-labs/FLUX.1-dev `vae/` (and -schnell); BFL's ae.safetensors: same weights, unprefixed
    "flux": KLConfig(scaling_factor=0.3611, shift_factor=0.1159),
}

# AutoencoderKL.__init__ defaults (diffusers 0.42), used for keys a config.json leaves out
KL_DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": None, "latents_std": None, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def kl_config_from_diffusers(d):
    """KLConfig from a diffusers AutoencoderKL config.json dict; one-line ValueError for what is not implemented."""
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"config.json describes a {d['_class_name']}, not an AutoencoderKL; point at the `vae/` "
                         f"folder of an SD3 or FLUX pipeline")
    d = {**KL_DIFFUSERS_DEFAULTS, **d}
    widths = tuple(d["block_out_channels"])
    for key, kind in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")]:
        if list(d[key]) != [kind] * len(widths):
            raise ValueError(f"config.json {key}={list(d[key])} is not implemented; vae.py supports {len(widths)} x "
                             f"{kind!r} (one per block_out_channels entry)")
    unsupported = [(d["act_fn"] != "silu", f"act_fn={d['act_fn']!r} (only 'silu')"),
                   (d["out_channels"] != d["in_channels"], f"out_channels {d['out_channels']} != in_channels "
                                                           f"{d['in_channels']}"),
                   (not d["mid_block_add_attention"], "mid_block_add_attention=false (the mid blocks always attend)"),
                   (d["latents_mean"] is not None or d["latents_std"] is not None,
                    "latents_mean/latents_std (per-channel latent statistics)")]
    for bad, what in unsupported:
        if bad:
            raise ValueError(f"config.json: {what} is not implemented in vae.py; SD3 and FLUX VAEs do not use it")
    if any(w % d["norm_num_groups"] for w in widths):
        raise ValueError(f"config.json norm_num_groups {d['norm_num_groups']} does not divide block_out_channels "
                         f"{list(widths)}; GroupNorm needs it to: fix the config")
    return KLConfig(
        in_channels=d["in_channels"], latent_channels=d["latent_channels"], block_out_channels=widths,
        layers_per_block=d["layers_per_block"], norm_num_groups=d["norm_num_groups"],
        use_quant_conv=bool(d["use_quant_conv"]), use_post_quant_conv=bool(d["use_post_quant_conv"]),
        scaling_factor=float(d["scaling_factor"]), shift_factor=float(d["shift_factor"] or 0.0),
    )


# ----------------------------------------------------------------------------------------------
# AutoencoderKL: blocks


class KLResnet(nn.Module):
    """x + Conv3(SiLU(GN(Conv3(SiLU(GN(x)))))); the residual goes through a 1x1 conv when the width changes."""

    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None   # LDM: `nin_shortcut`

    def forward(self, x):                                                       # x: (B, Cin, H, W)
        h = self.conv1(F.silu(self.norm1(x)))                                   # (B, Cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class KLAttention(nn.Module):
    """x + to_out(softmax(q k^T / sqrt(C)) v) over the H*W pixels as tokens: one head as wide as the features.

    q, k, v and out are per-pixel Linear maps (diffusers' layout; LDM and BFL store them as 1x1 convs).
    """

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x):                                                       # x: (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)                             # (B, N = H W, C)
        q, k, v = (f(h).unsqueeze(1) for f in (self.to_q, self.to_k, self.to_v))   # (B, 1, N, C) each
        with torch.autocast(device_type=x.device.type, enabled=False):
            # fp32: the softmax runs over every pixel (16384 at 1024 px); SDPA keeps the N x N scores out of memory
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())   # (B, 1, N, C)
        out = self.to_out(out.squeeze(1).to(x.dtype))                           # (B, N, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class KLMidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the deepest width (the same in encoder and decoder)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([KLResnet(channels, channels, groups) for _ in range(2)])
        self.attn = KLAttention(channels, groups)

    def forward(self, x):
        return self.resnets[1](self.attn(self.resnets[0](x)))


class KLDownStage(nn.Module):
    """`layers` ResNets (the first changes the width), then, except in the last stage, halve H and W."""

    def __init__(self, c_in, c_out, layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([KLResnet(c_in if j == 0 else c_out, c_out, groups) for j in range(layers)])
        self.downsample = nn.Conv2d(c_out, c_out, 3, stride=2) if downsample else None   # no padding of its own

    def forward(self, x):                                                       # x: (B, Cin, H, W)
        for resnet in self.resnets:
            x = resnet(x)                                                       # (B, Cout, H, W)
        if self.downsample is not None:
            # LDM's asymmetric padding: one zero column on the right and one zero row at the bottom (torch convs
            # pad symmetrically), so output pixel i sees input pixels 2i .. 2i+2
            x = self.downsample(F.pad(x, (0, 1, 0, 1)))                         # (B, Cout, H/2, W/2)
        return x


class KLUpStage(nn.Module):
    """`layers` ResNets (the first changes the width), then, except in the last stage, nearest x2 and a conv."""

    def __init__(self, c_in, c_out, layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([KLResnet(c_in if j == 0 else c_out, c_out, groups) for j in range(layers)])
        self.upsample = nn.Conv2d(c_out, c_out, 3, padding=1) if upsample else None

    def forward(self, x):                                                       # x: (B, Cin, h, w)
        for resnet in self.resnets:
            x = resnet(x)                                                       # (B, Cout, h, w)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))   # (B, Cout, 2h, 2w)
        return x


# ----------------------------------------------------------------------------------------------
# AutoencoderKL: encoder, decoder, top model


class KLEncoder(nn.Module):
    """conv_in -> stages (ResNets, stride-2 conv) -> mid (ResNet, attention, ResNet) -> GN, SiLU, conv_out."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            KLDownStage(widths[max(s - 1, 0)], c, cfg.layers_per_block, g, downsample=s < len(widths) - 1)
            for s, c in enumerate(widths)])
        self.mid_block = KLMidBlock(widths[-1], g)
        self.norm_out = nn.GroupNorm(g, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)   # (mean, logvar)

    def forward(self, x):                                                       # x: (B, 3, H, W)
        x = self.conv_in(x)                                                     # (B, C_0, H, W)
        for stage in self.down_blocks:
            x = stage(x)                                                        # (B, C_last, H/f, W/f) at the end
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))                          # (B, 2 latent, H/f, W/f)


class KLDecoder(nn.Module):
    """conv_in -> mid -> stages from the deepest width (layers_per_block + 1 ResNets, nearest x2 + conv) ->
    GN, SiLU, conv_out. up_blocks are numbered in execution order (as diffusers; LDM numbers them by width)."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths, g = cfg.block_out_channels[::-1], cfg.norm_num_groups           # deepest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = KLMidBlock(widths[0], g)
        self.up_blocks = nn.ModuleList([
            KLUpStage(widths[max(s - 1, 0)], c, cfg.layers_per_block + 1, g, upsample=s < len(widths) - 1)
            for s, c in enumerate(widths)])
        self.norm_out = nn.GroupNorm(g, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):                                                       # z: (B, latent, h, w)
        x = self.mid_block(self.conv_in(z))                                     # (B, C_last, h, w)
        for stage in self.up_blocks:
            x = stage(x)                                                        # (B, C_0, f h, f w) at the end
        return self.conv_out(F.silu(self.norm_out(x)))                          # (B, 3, f h, f w)


class KLVAE(nn.Module):
    """encode: image (B, 3, H, W) in [-1, 1] -> raw latent (B, 16, H/8, W/8), the posterior's mean or a sample of it;
    decode: raw latent -> image. No scaling or shift (the caller's, see the module docstring)."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        self.config = cfg
        self.encoder = KLEncoder(cfg)
        self.decoder = KLDecoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    def encode(self, img, sample=False, generator=None):
        """The posterior mean (sample=False, as diffusers pipelines' reference outputs), or mean + std * N(0, I) with
        the log-variance clamped to [-30, 20] (diffusers' DiagonalGaussianDistribution). The noise is drawn like
        diffusers' randn_tensor: on the generator's device, in the latent dtype, so a generator seeded the same
        gives the same sample as `vae.encode(img).latent_dist.sample(generator)`."""
        f = self.config.spatial_factor
        if img.shape[-2] % f or img.shape[-1] % f:
            raise ValueError(f"image size {tuple(img.shape[-2:])} is not divisible by the VAE factor {f}; "
                             f"resize or crop to a multiple of {f}")
        if generator is not None and not sample:
            raise ValueError("encode(generator=...) draws nothing without sample=True; pass sample=True or drop it")
        moments = self.encoder(img.to(self.encoder.conv_in.weight.dtype))     # (B, 2 latent, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)                                  # (B, latent, H/f, W/f) each
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                            device=mean.device if generator is None else generator.device)
        return mean + std * noise.to(mean.device)

    def decode(self, z):
        z = z.to(self.decoder.conv_in.weight.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
