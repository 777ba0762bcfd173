"""The real vision models' architectures, at their real sizes, with random weights.

The cleaning benchmark needs the compute of the real models (no weights can be
downloaded), so these torch modules rebuild the published architectures layer by
layer, from the papers and the models' configs:

- `SwinV2`: SwinV2-Base as in SmilingWolf's wd-swinv2-tagger-v3 (timm
  `swinv2_base_window8_256` with img_size 448, window 14; patch 4, embed 128, depths
  2/2/18/2, heads 4/8/16/32, cosine attention with a continuous position bias, residual
  post-norm, 10,861 sigmoid outputs), NHWC input as the WD14 ONNX files take it; also
  as a classifier (deepghs' SwinV2 aesthetic model).
- `CAFormer`: CAFormer-S36 (MetaFormer; depths 3/12/18/3, widths 64/128/320/512,
  separable-convolution mixers in the first two stages and attention in the last two,
  StarReLU), the backbone of deepghs' CCIP identity model and of several imgutils
  classifiers, at 384 px.
- `YoloV8`: YOLOv8 detectors (CSP-Darknet with C2f blocks, SPPF, PAN neck, decoupled
  anchor-free head with DFL box decoding) in the `s` and `m` scales, at 640 px, output
  [N, 4 + classes, 8400] like an ultralytics ONNX export.

Parameter counts match the published ones (checked in the tests); BatchNorms are folded
into the convolutions as in an exported detector. Nothing here is trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------- SwinV2


class _WindowAttentionV2(nn.Module):
    """Scaled-cosine window attention with a log-spaced continuous position bias."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(), nn.Linear(512, heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        span = torch.arange(-(window - 1), window, dtype=torch.float32)
        table = torch.stack(torch.meshgrid(span, span, indexing="ij"), dim=-1) / (window - 1) * 8
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
        self.register_buffer("coords_table", table.reshape(-1, 2), persistent=False)
        grid = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_index", relative[..., 0] * (2 * window - 1) + relative[..., 1],
                             persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        windows, tokens, channels = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(windows, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attention = attention * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        position = self.cpb_mlp(self.coords_table)[self.relative_index.reshape(-1)]
        position = position.reshape(tokens, tokens, self.heads).permute(2, 0, 1)
        attention = attention + 16 * torch.sigmoid(position)[None]
        if mask is not None:
            per_image = mask.shape[0]
            attention = attention.reshape(-1, per_image, self.heads, tokens, tokens) + mask[None, :, None]
            attention = attention.reshape(-1, self.heads, tokens, tokens)
        out = (attention.softmax(dim=-1) @ v).transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj(out)


def _shift_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """-100 where two tokens of a shifted window come from different image regions."""
    regions = torch.zeros(resolution, resolution)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in cuts:
        for columns in cuts:
            regions[rows, columns] = label
            label += 1
    windows = _partition(regions[None, :, :, None], window).squeeze(-1)
    different = windows[:, :, None] != windows[:, None, :]
    return different.float() * -100.0


def _partition(x: torch.Tensor, window: int) -> torch.Tensor:
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def _merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


class _SwinBlockV2(nn.Module):
    def __init__(self, dim: int, heads: int, resolution: int, window: int, shifted: bool):
        super().__init__()
        self.window = min(window, resolution)
        self.shift = self.window // 2 if shifted and resolution > window else 0
        self.attn = _WindowAttentionV2(dim, heads, self.window)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        mask = _shift_mask(resolution, self.window, self.shift) if self.shift else None
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        _, height, width, _ = x.shape
        shifted = torch.roll(x, (-self.shift, -self.shift), (1, 2)) if self.shift else x
        windows = self.attn(_partition(shifted, self.window), self.mask)
        attended = _merge(windows, self.window, height, width)
        if self.shift:
            attended = torch.roll(attended, (self.shift, self.shift), (1, 2))
        x = x + self.norm1(attended)  # SwinV2's residual post-norm
        return x + self.norm2(self.mlp(x))


class _PatchMergingV2(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
        return self.norm(self.reduction(x.reshape(batch, height // 2, width // 2, 4 * channels)))


class SwinV2(nn.Module):
    """SwinV2-Base. As a WD14 tagger (`tagger=True`): [N, S, S, 3] BGR 0..255 in, [N,
    classes] sigmoid out; as a classifier: [N, 3, S, S] normalised RGB in, softmax out."""

    def __init__(self, image_size: int = 448, classes: int = 10861, window: int = 14, tagger: bool = True,
                 embed: int = 128, depths: tuple[int, ...] = (2, 2, 18, 2), heads: tuple[int, ...] = (4, 8, 16, 32)):
        super().__init__()
        self.tagger = tagger
        self.patch_embed = nn.Conv2d(3, embed, kernel_size=4, stride=4)
        self.patch_norm = nn.LayerNorm(embed)
        stages: list[nn.Module] = []
        resolution, dim = image_size // 4, embed
        for index, (depth, head_count) in enumerate(zip(depths, heads, strict=True)):
            if index:
                stages.append(_PatchMergingV2(dim))
                resolution, dim = resolution // 2, dim * 2
            stages += [_SwinBlockV2(dim, head_count, resolution, window, shifted=bool(i % 2)) for i in range(depth)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.tagger:
            images = images.flip(-1).permute(0, 3, 1, 2) / 127.5 - 1.0  # BGR 0..255 -> RGB -1..1
        x = self.patch_norm(self.patch_embed(images).permute(0, 2, 3, 1))
        logits = self.head(self.norm(self.stages(x)).mean(dim=(1, 2)))
        return torch.sigmoid(logits) if self.tagger else logits.softmax(dim=-1)


# --------------------------------------------------------------------------- CAFormer


class _StarReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x) ** 2 + self.bias


class _SepConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.pwconv1 = nn.Linear(dim, 2 * dim, bias=False)
        self.act = _StarReLU()
        self.dwconv = nn.Conv2d(2 * dim, 2 * dim, 7, padding=3, groups=2 * dim, bias=False)
        self.pwconv2 = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        x = self.act(self.pwconv1(x))
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.pwconv2(x)


class _Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int = 32):
        super().__init__()
        self.heads = dim // head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        out = (attention.softmax(dim=-1) @ v).transpose(1, 2)
        return self.proj(out.reshape(batch, height, width, channels))


class _MetaFormerBlock(nn.Module):
    def __init__(self, dim: int, attention: bool, res_scale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, bias=False)
        self.mixer = _Attention(dim) if attention else _SepConv(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), _StarReLU(), nn.Linear(4 * dim, dim, bias=False))
        self.res_scale1 = nn.Parameter(torch.ones(dim)) if res_scale else None
        self.res_scale2 = nn.Parameter(torch.ones(dim)) if res_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x if self.res_scale1 is None else x * self.res_scale1) + self.mixer(self.norm1(x))
        return (x if self.res_scale2 is None else x * self.res_scale2) + self.mlp(self.norm2(x))


class CAFormer(nn.Module):
    """CAFormer-S36: [N, 3, S, S] normalised RGB in, [N, outputs] out (an MLP head)."""

    def __init__(self, outputs: int, depths: tuple[int, ...] = (3, 12, 18, 3),
                 dims: tuple[int, ...] = (64, 128, 320, 512)):
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for stage, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            if stage == 0:
                layers += [_Conv2dChannelsLast(previous, dim, 7, 4, 2), nn.LayerNorm(dim, eps=1e-6, bias=False)]
            else:
                layers += [nn.LayerNorm(previous, eps=1e-6, bias=False), _Conv2dChannelsLast(previous, dim, 3, 2, 1)]
            layers += [_MetaFormerBlock(dim, attention=stage >= 2, res_scale=stage >= 2) for _ in range(depth)]
            previous = dim
        self.stages = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(previous)
        self.head = nn.Sequential(nn.Linear(previous, 4 * previous), _SquaredReLU(),
                                  nn.LayerNorm(4 * previous), nn.Linear(4 * previous, outputs))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(images.permute(0, 2, 3, 1))
        return self.head(self.norm(x.mean(dim=(1, 2))))


class _Conv2dChannelsLast(nn.Conv2d):
    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int, padding: int):
        super().__init__(inputs, outputs, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class _SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) ** 2


# ---------------------------------------------------------------------------- YOLOv8

YOLO_SCALES = {"s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768)}  # depth, width, max channels


class _Conv(nn.Sequential):
    """Convolution (BatchNorm folded in) + SiLU."""

    def __init__(self, inputs: int, outputs: int, kernel: int = 1, stride: int = 1):
        super().__init__(nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2), nn.SiLU())


class _Bottleneck(nn.Module):
    def __init__(self, channels: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2 = _Conv(channels, channels, 3), _Conv(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class _C2f(nn.Module):
    def __init__(self, inputs: int, outputs: int, repeats: int, shortcut: bool):
        super().__init__()
        self.hidden = outputs // 2
        self.cv1 = _Conv(inputs, 2 * self.hidden)
        self.m = nn.ModuleList(_Bottleneck(self.hidden, shortcut) for _ in range(repeats))
        self.cv2 = _Conv((2 + repeats) * self.hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).split(self.hidden, dim=1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class _SPPF(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        hidden = inputs // 2
        self.cv1, self.cv2 = _Conv(inputs, hidden), _Conv(4 * hidden, outputs)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        pooled = [x]
        for _ in range(3):
            pooled.append(self.pool(pooled[-1]))
        return self.cv2(torch.cat(pooled, dim=1))


class _DetectHead(nn.Module):
    REG_MAX = 16

    def __init__(self, classes: int, channels: tuple[int, int, int], image_size: int):
        super().__init__()
        box_hidden = max(16, channels[0] // 4, 4 * self.REG_MAX)
        class_hidden = max(channels[0], min(classes, 100))
        self.box = nn.ModuleList(
            nn.Sequential(_Conv(c, box_hidden, 3), _Conv(box_hidden, box_hidden, 3),
                          nn.Conv2d(box_hidden, 4 * self.REG_MAX, 1)) for c in channels)
        self.cls = nn.ModuleList(
            nn.Sequential(_Conv(c, class_hidden, 3), _Conv(class_hidden, class_hidden, 3),
                          nn.Conv2d(class_hidden, classes, 1)) for c in channels)
        points, strides = [], []
        for stride in (8, 16, 32):
            side = image_size // stride
            ys, xs = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
            points.append(torch.stack([xs, ys]).reshape(2, -1))
            strides.append(torch.full((1, side * side), float(stride)))
        self.register_buffer("anchors", torch.cat(points, dim=1), persistent=False)
        self.register_buffer("strides", torch.cat(strides, dim=1), persistent=False)
        self.register_buffer("bins", torch.arange(self.REG_MAX, dtype=torch.float32), persistent=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        batch = features[0].shape[0]
        box = torch.cat([head(f).flatten(2) for head, f in zip(self.box, features, strict=True)], dim=2)
        scores = torch.cat([head(f).flatten(2) for head, f in zip(self.cls, features, strict=True)], dim=2)
        distribution = box.reshape(batch, 4, self.REG_MAX, -1).softmax(dim=2)
        distances = (distribution * self.bins[None, None, :, None]).sum(dim=2)  # [B, 4, A]
        top_left = self.anchors - distances[:, :2]
        bottom_right = self.anchors + distances[:, 2:]
        centre_size = torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], dim=1)
        return torch.cat([centre_size * self.strides, scores.sigmoid()], dim=1)


class YoloV8(nn.Module):
    """YOLOv8 detector: [N, 3, S, S] RGB 0..1 in, [N, 4 + classes, anchors] out."""

    def __init__(self, scale: str, classes: int, image_size: int = 640):
        super().__init__()
        depth, width, max_channels = YOLO_SCALES[scale]

        def ch(channels: int) -> int:
            return int(math.ceil(min(channels, max_channels) * width / 8) * 8)

        def n(repeats: int) -> int:
            return max(round(repeats * depth), 1)

        self.stem = nn.Sequential(_Conv(3, ch(64), 3, 2), _Conv(ch(64), ch(128), 3, 2),
                                  _C2f(ch(128), ch(128), n(3), True), _Conv(ch(128), ch(256), 3, 2),
                                  _C2f(ch(256), ch(256), n(6), True))
        self.down4 = nn.Sequential(_Conv(ch(256), ch(512), 3, 2), _C2f(ch(512), ch(512), n(6), True))
        self.down5 = nn.Sequential(_Conv(ch(512), ch(1024), 3, 2), _C2f(ch(1024), ch(1024), n(3), True),
                                   _SPPF(ch(1024), ch(1024)))
        self.top_down4 = _C2f(ch(1024) + ch(512), ch(512), n(3), False)
        self.top_down3 = _C2f(ch(512) + ch(256), ch(256), n(3), False)
        self.reduce3 = _Conv(ch(256), ch(256), 3, 2)
        self.bottom_up4 = _C2f(ch(256) + ch(512), ch(512), n(3), False)
        self.reduce4 = _Conv(ch(512), ch(512), 3, 2)
        self.bottom_up5 = _C2f(ch(512) + ch(1024), ch(1024), n(3), False)
        self.detect = _DetectHead(classes, (ch(256), ch(512), ch(1024)), image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p3 = self.stem(images)
        p4 = self.down4(p3)
        p5 = self.down5(p4)
        up = F.interpolate(p5, scale_factor=2.0, mode="nearest")
        t4 = self.top_down4(torch.cat([up, p4], dim=1))
        up = F.interpolate(t4, scale_factor=2.0, mode="nearest")
        out3 = self.top_down3(torch.cat([up, p3], dim=1))
        out4 = self.bottom_up4(torch.cat([self.reduce3(out3), t4], dim=1))
        out5 = self.bottom_up5(torch.cat([self.reduce4(out4), p5], dim=1))
        return self.detect([out3, out4, out5])


# ----------------------------------------------------------------------- MobileNetV3

# MobileNetV3-Large blocks: kernel, expansion, outputs, squeeze-excite, hard-swish, stride.
_MOBILENET_V3_LARGE = (
    (3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1),
)


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeezed = _divisible(channels / 4)
        self.reduce, self.expand = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.expand(F.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * F.hardsigmoid(weights)


class _InvertedResidual(nn.Module):
    def __init__(self, inputs: int, kernel: int, expanded: int, outputs: int, squeeze: bool,
                 hard_swish: bool, stride: int):
        super().__init__()
        activation = nn.Hardswish if hard_swish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != inputs:
            layers += [nn.Conv2d(inputs, expanded, 1), activation()]
        layers += [nn.Conv2d(expanded, expanded, kernel, stride, kernel // 2, groups=expanded), activation()]
        if squeeze:
            layers.append(_SqueezeExcite(expanded))
        layers.append(nn.Conv2d(expanded, outputs, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV3(nn.Module):
    """MobileNetV3-Large classifier: [N, 3, S, S] normalised RGB in, [N, classes] softmax out."""

    def __init__(self, classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 2, 1), nn.Hardswish()]
        channels = 16
        for kernel, expanded, outputs, squeeze, hard_swish, stride in _MOBILENET_V3_LARGE:
            layers.append(_InvertedResidual(channels, kernel, expanded, outputs, squeeze, hard_swish, stride))
            channels = outputs
        layers += [nn.Conv2d(channels, 960, 1), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(), nn.Linear(1280, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).mean(dim=(2, 3))).softmax(dim=-1)
