"""Plain networks the backbones are built from: MLPs and DCGAN conv nets for encoders and decoders, and the
conditioning nets of affine couplings (last layer zero-initialised, so every coupling starts as the identity)."""

from __future__ import annotations

from torch import nn


def mlp(dims, negative_slope: float = 0.2) -> nn.Sequential:
    """Linear layers ``dims[0] → … → dims[-1]`` with leaky ReLUs between them (none after the last), as the
    discriminator-optimal-transport toy networks."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.LeakyReLU(negative_slope))
    return nn.Sequential(*layers)


def dcgan_layout(size: int) -> tuple[int, int]:
    """(base, n_up) with ``size = base · 2**n_up`` and base >= 4 as small as halving allows: 8 → (4, 1),
    28 → (7, 2), 32 → (4, 3). The decoder grows 1×1 → base×base in one transposed conv, then doubles n_up times."""
    base, n_up = size, 0
    while base % 2 == 0 and base // 2 >= 4:
        base, n_up = base // 2, n_up + 1
    if n_up == 0:
        raise ValueError(f"DCGAN conv nets need a square image side that halves at least once to >= 4 (8, 28, 32, "
                         f"64, …), got {size}")
    return base, n_up


def _image_layout(image_shape) -> tuple[int, int, int]:
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"DCGAN conv nets need square images, got {height}×{width}")
    return (channels, *dcgan_layout(height))


def conv_encoder(image_shape, out_features: int, width: int = 64) -> nn.Sequential:
    """DCGAN discriminator body: (B, C, H, H) → (B, out_features). Stride-2 4×4 convs double the channels from
    ``width`` while halving the side down to ``base``, then a base×base conv to ``out_features``."""
    channels, base, n_down = _image_layout(image_shape)
    layers = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
    for i in range(1, n_down):
        layers += [nn.Conv2d(width * 2 ** (i - 1), width * 2 ** i, 4, 2, 1, bias=False),
                   nn.BatchNorm2d(width * 2 ** i), nn.LeakyReLU(0.2)]
    layers += [nn.Conv2d(width * 2 ** (n_down - 1), out_features, base), nn.Flatten()]
    return nn.Sequential(*layers)


def conv_decoder(latent_dim: int, image_shape, width: int = 64) -> nn.Sequential:
    """DCGAN generator: (B, latent_dim) → (B, C, H, H) pre-activation outputs (logits or means). A base×base
    transposed conv from 1×1, then stride-2 transposed convs halving the channels down to ``width`` and C."""
    channels, base, n_up = _image_layout(image_shape)
    top = width * 2 ** (n_up - 1)
    layers = [nn.Unflatten(1, (latent_dim, 1, 1)), nn.ConvTranspose2d(latent_dim, top, base, bias=False),
              nn.BatchNorm2d(top), nn.ReLU()]
    for i in range(n_up - 1, 0, -1):
        layers += [nn.ConvTranspose2d(width * 2 ** i, width * 2 ** (i - 1), 4, 2, 1, bias=False),
                   nn.BatchNorm2d(width * 2 ** (i - 1)), nn.ReLU()]
    layers.append(nn.ConvTranspose2d(width, channels, 4, 2, 1))
    return nn.Sequential(*layers)


def encoder(data_shape, out_features: int, width: int | None = None, n_hidden_layers: int = 3) -> nn.Module:
    """An MLP (``width`` default 256, ``n_hidden_layers`` hidden layers) for vectors (D,), a DCGAN conv encoder
    (``width`` default 64) for images (C, H, H): (B, *data_shape) → (B, out_features)."""
    if len(data_shape) == 1:
        return mlp([data_shape[0]] + [width or 256] * n_hidden_layers + [out_features])
    return conv_encoder(data_shape, out_features, width or 64)


def decoder(latent_dim: int, data_shape, width: int | None = None, n_hidden_layers: int = 3) -> nn.Module:
    """The mirror of ``encoder``: (B, latent_dim) → (B, *data_shape) pre-activation outputs."""
    if len(data_shape) == 1:
        return mlp([latent_dim] + [width or 256] * n_hidden_layers + [data_shape[0]])
    return conv_decoder(latent_dim, data_shape, width or 64)


def _zero_init(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def coupling_mlp(in_features: int, out_features: int, hidden: int = 256, n_hidden_layers: int = 1) -> nn.Sequential:
    """(B, in_features) → (B, out_features): ReLU MLP, zero-initialised output (GLF's flow: one FC-256 layer)."""
    layers, d = [], in_features
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(_zero_init(nn.Linear(d, out_features)))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """h + conv3×3(relu(conv3×3(relu(h)))), channels kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, h):
        return h + self.body(h)


def coupling_convnet(in_channels: int, out_channels: int, hidden: int = 64, n_blocks: int = 1) -> nn.Sequential:
    """(B, in_channels, H, W) → (B, out_channels, H, W): 3×3 conv to ``hidden``, ``n_blocks`` residual blocks,
    zero-initialised 3×3 conv out. It stands in for the 3-layer Highway net of the paper's GLOW (a residual
    block is a Highway layer with its gate fixed open)."""
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1),
                         *[ResidualBlock(hidden) for _ in range(n_blocks)], nn.ReLU(),
                         _zero_init(nn.Conv2d(hidden, out_channels, 3, padding=1)))
