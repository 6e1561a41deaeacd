"""A small, independent PyTorch implementation of the released RQ-VAE, used only to test the converter.

It reproduces the reference architecture (taming-transformers encoder/decoder, 1x1 quant_conv / post_quant_conv,
residual quantizer with ONE codebook shared by all depths) closely enough that

* its `state_dict()` has exactly the key names and shapes of the released checkpoints
  (`shared/reference/rqvae-imagenet256-8x8x4-state-dict.tsv` for the ImageNet config), and
* its encode -> codes -> decode computes what the reference computes, so a converted checkpoint can be compared
  numerically against it.

Tensors are NCHW as in PyTorch; latents returned by `encode` are NHWC like the reference's.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _group_norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
  # 3x3 convs keep the size ("same" padding) except the downsampler, which pads by hand and uses stride 2.
  padding = kernel // 2 if stride == 1 else 0
  return nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
  """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a (1x1 nin_shortcut) skip."""

  def __init__(self, cin: int, cout: int, dropout: float = 0.0):
    super().__init__()
    self.norm1 = _group_norm(cin)
    self.conv1 = _conv(cin, cout, 3)
    self.norm2 = _group_norm(cout)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = _conv(cout, cout, 3)
    if cin != cout:
      self.nin_shortcut = _conv(cin, cout, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(self.dropout(F.silu(self.norm2(h))))
    skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
    return skip + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions with 1x1-conv projections and a residual."""

  def __init__(self, channels: int):
    super().__init__()
    self.norm = _group_norm(channels)
    self.q = _conv(channels, channels, 1)
    self.k = _conv(channels, channels, 1)
    self.v = _conv(channels, channels, 1)
    self.proj_out = _conv(channels, channels, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = x.shape
    h = self.norm(x)
    q = self.q(h).flatten(2).transpose(1, 2)  # [B, N, C]
    k = self.k(h).flatten(2)  # [B, C, N]
    v = self.v(h).flatten(2)  # [B, C, N]
    attn = torch.softmax(torch.bmm(q, k) / c**0.5, dim=-1)  # [B, Nq, Nk]
    out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, hh, ww)
    return x + self.proj_out(out)


class Downsample(nn.Module):
  """Zero-pad right/bottom by one, then a 3x3 stride-2 conv without padding."""

  def __init__(self, channels: int):
    super().__init__()
    self.conv = _conv(channels, channels, 3, stride=2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int):
    super().__init__()
    self.conv = _conv(channels, channels, 3)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
  """Holds `block` / `attn` ModuleLists and an optional `downsample` / `upsample` (key names as in taming)."""


class _Mid(nn.Module):

  def __init__(self, channels: int, dropout: float):
    super().__init__()
    self.block_1 = ResnetBlock(channels, channels, dropout)
    self.attn_1 = AttnBlock(channels)
    self.block_2 = ResnetBlock(channels, channels, dropout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.block_2(self.attn_1(self.block_1(x)))


def _run_level(level: _Level, h: torch.Tensor) -> torch.Tensor:
  for j, block in enumerate(level.block):
    h = block(h)
    if len(level.attn):
      h = level.attn[j](h)
  return h


class Encoder(nn.Module):
  """[B, C_in, R, R] -> [B, z_channels, R / 2^(L-1), R / 2^(L-1)]."""

  def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
               in_channels: int, resolution: int, z_channels: int, dropout: float = 0.0):
    super().__init__()
    self.conv_in = _conv(in_channels, ch, 3)
    self.down = nn.ModuleList()
    cin, res = ch, resolution
    for i, mult in enumerate(ch_mult):
      level = _Level()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      cout = ch * mult
      for _ in range(num_res_blocks):
        level.block.append(ResnetBlock(cin, cout, dropout))
        cin = cout
        if res in attn_resolutions:
          level.attn.append(AttnBlock(cout))
      if i != len(ch_mult) - 1:
        level.downsample = Downsample(cout)
        res //= 2
      self.down.append(level)
    self.mid = _Mid(cin, dropout)
    self.norm_out = _group_norm(cin)
    self.conv_out = _conv(cin, z_channels, 3)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv_in(x)
    for level in self.down:
      h = _run_level(level, h)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    h = self.mid(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
  """[B, z_channels, r, r] -> [B, out_ch, r 2^(L-1), r 2^(L-1)]; each level has num_res_blocks + 1 blocks."""

  def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
               out_ch: int, resolution: int, z_channels: int, dropout: float = 0.0):
    super().__init__()
    levels = len(ch_mult)
    cin = ch * ch_mult[-1]
    res = resolution // 2 ** (levels - 1)
    self.conv_in = _conv(z_channels, cin, 3)
    self.mid = _Mid(cin, dropout)
    built = {}
    for i in reversed(range(levels)):
      level = _Level()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      cout = ch * ch_mult[i]
      for _ in range(num_res_blocks + 1):
        level.block.append(ResnetBlock(cin, cout, dropout))
        cin = cout
        if res in attn_resolutions:
          level.attn.append(AttnBlock(cout))
      if i != 0:
        level.upsample = Upsample(cout)
        res *= 2
      built[i] = level
    # Indexed by resolution level (up.0 is the full-resolution level), though run from the last one down.
    self.up = nn.ModuleList([built[i] for i in range(levels)])
    self.norm_out = _group_norm(cin)
    self.conv_out = _conv(cin, out_ch, 3)

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    h = self.mid(self.conv_in(z))
    for i in reversed(range(len(self.up))):
      h = _run_level(self.up[i], h)
      if hasattr(self.up[i], "upsample"):
        h = self.up[i].upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class SharedCodebook(nn.Embedding):
  """K real code embeddings plus one padding row (index K); EMA statistics as buffers."""

  def __init__(self, n_embed: int, embed_dim: int):
    super().__init__(n_embed + 1, embed_dim, padding_idx=n_embed)
    self.weight.requires_grad_(False)
    self.register_buffer("cluster_size_ema", torch.zeros(n_embed))
    self.register_buffer("embed_ema", self.weight[:-1].detach().clone())

  def nearest(self, r: torch.Tensor) -> torch.Tensor:
    """r [..., n_z] -> argmin_k ||r||^2 + ||e_k||^2 - 2 r.e_k over the K real rows (the padding row excluded)."""
    e = self.weight[:-1]
    flat = r.reshape(-1, r.shape[-1])
    dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None, :] - 2.0 * flat @ e.t()
    return dist.argmin(dim=-1).reshape(r.shape[:-1])


class RQBottleneck(nn.Module):
  """Residual quantizer; `codebooks` lists the SAME module D times (so the state dict repeats it per depth)."""

  def __init__(self, n_embed: int, embed_dim: int, depth: int):
    super().__init__()
    shared = SharedCodebook(n_embed, embed_dim)
    self.codebooks = nn.ModuleList([shared for _ in range(depth)])

  @torch.no_grad()
  def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [B, h, w, n_z] -> (z_q [B, h, w, n_z] = sum of the D selected embeddings, codes int64 [B, h, w, D])."""
    residual = z.clone()
    z_q = torch.zeros_like(z)
    codes = []
    for book in self.codebooks:
      k = book.nearest(residual)
      e = F.embedding(k, book.weight)
      residual = residual - e
      z_q = z_q + e
      codes.append(k)
    return z_q, torch.stack(codes, dim=-1)

  @torch.no_grad()
  def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
    """codes [B, h, w, D] -> [B, h, w, n_z]."""
    return F.embedding(codes, self.codebooks[0].weight).sum(dim=-2)


class RQVAE(nn.Module):
  """Encoder -> quant_conv -> residual quantizer -> post_quant_conv -> decoder."""

  def __init__(self, *, ddconfig: Mapping[str, Any], embed_dim: int, n_embed: int, code_depth: int):
    super().__init__()
    common = dict(
        ch=ddconfig["ch"], ch_mult=tuple(ddconfig["ch_mult"]), num_res_blocks=ddconfig["num_res_blocks"],
        attn_resolutions=tuple(ddconfig["attn_resolutions"]), resolution=ddconfig["resolution"],
        z_channels=ddconfig["z_channels"], dropout=ddconfig.get("dropout", 0.0),
    )
    self.encoder = Encoder(in_channels=ddconfig["in_channels"], **common)
    self.decoder = Decoder(out_ch=ddconfig["out_ch"], **common)
    self.quantizer = RQBottleneck(n_embed, embed_dim, code_depth)
    self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

  @classmethod
  def from_reference_config(cls, config: Mapping[str, Any]) -> "RQVAE":
    """Builds from a reference config.yaml dict (`arch.hparams`, `arch.ddconfig`)."""
    hp, dd = config["arch"]["hparams"], config["arch"]["ddconfig"]
    return cls(ddconfig=dd, embed_dim=hp["embed_dim"], n_embed=hp["n_embed"], code_depth=hp["code_shape"][-1])

  def encode(self, x: torch.Tensor) -> torch.Tensor:
    """x [B, C, R, R] -> z [B, h, w, n_z] (NHWC, as the reference returns it)."""
    return self.quant_conv(self.encoder(x)).permute(0, 2, 3, 1).contiguous()

  def decode(self, z_q: torch.Tensor) -> torch.Tensor:
    """z_q [B, h, w, n_z] -> x [B, C_out, R, R]."""
    return self.decoder(self.post_quant_conv(z_q.permute(0, 3, 1, 2).contiguous()))

  @torch.no_grad()
  def get_codes(self, x: torch.Tensor) -> torch.Tensor:
    return self.quantizer.quantize(self.encode(x))[1]

  @torch.no_grad()
  def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
    return self.decode(self.quantizer.embed_codes(codes))


@torch.no_grad()
def randomize_(model: RQVAE, generator: torch.Generator, scale: float = 0.2) -> None:
  """Fills every parameter and buffer with random values (GroupNorm affine and the codebook included).

  The codebook's padding row stays zero, as in released checkpoints; the EMA buffers get independent random values
  so a converter that mixed them up would be caught.
  """
  seen = set()
  for name, t in list(model.named_parameters()) + list(model.named_buffers()):
    if id(t) in seen:  # the shared codebook appears once per depth
      continue
    seen.add(id(t))
    if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight") or (
        name.endswith("norm_out.weight")):
      t.copy_(1.0 + scale * torch.randn(t.shape, generator=generator))
    elif name.endswith("cluster_size_ema"):
      t.copy_(torch.rand(t.shape, generator=generator) * 10.0)
    elif ".codebooks." in name and name.endswith(".weight"):
      t.copy_(torch.randn(t.shape, generator=generator))
      t[-1].zero_()
    elif ".codebooks." in name:
      t.copy_(torch.randn(t.shape, generator=generator))
    else:
      fan_in = max(1, t[0].numel()) if t.ndim > 1 else 1
      std = (1.0 / fan_in) ** 0.5 if t.ndim > 1 else scale
      t.copy_(std * torch.randn(t.shape, generator=generator))
