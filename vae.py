"""
DC-AE f32c32, SANA's autoencoder, written directly in PyTorch.

DC-AE (Chen et al. 2024, "Deep Compression Autoencoder", arXiv 2410.10733) maps a (B, 3, H, W) image in
[-1, 1] to a (B, 32, H/32, W/32) latent and back. The encoder is deterministic (no distribution). The
SANA checkpoint (`mit-han-lab/dc-ae-f32c32-sana-1.0`) has six stages: three of ResBlocks at 128/256/512
channels, then three of EfficientViT blocks (multi-scale ReLU linear attention + GLUMBConv) at
512/1024/1024. Stages are joined by stride-2 Down / nearest-x2 Up convs whose residual shortcuts are
parameter-free pixel-(un)shuffles, so most of the signal bypasses the convs.

    vae, scaling = teacher_loaders.load_dcae("path/to/sana/vae")   # diffusers `vae/` folder -> (module, 0.41407)
    x0  = vae.encode(img) * scaling                  # img (B, 3, H, W) in [-1, 1] -> teacher latent
    img = vae.decode(x0 / scaling)                   # and back (no shift for DC-AE)

`encode`/`decode` work on raw latents; the scaling lives with the caller, as in diffusers. diffusers names
three parts differently (teacher_loaders.DCAE_DIFFUSERS_KEYS maps them).

Checked against: diffusers `AutoencoderDC` (0.42.1) on tiny random configs with every parameter
randomised, encoder and decoder, both attention paths (linear and the small-image quadratic fallback),
"conv"/"interpolate" and "pixel_unshuffle"/"pixel_shuffle" resampling, single-file, sharded and bf16
variant folders: max error <= 1e-4 * max|reference| in fp32 on CPU. Full-size tensor and parameter counts
(375 tensors, 312.3 M) are asserted on the meta device. Run `python -m pytest test_vae.py -q`.

Difference from diffusers: the attention is computed in fp32 on both paths (diffusers keeps the
quadratic path's matmuls in the input dtype); identical in fp32. No tiled encode/decode.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Config and presets


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
# Helpers


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
# Blocks


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
# Encoder, decoder, top model


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
