"""Translation-equivariant convolutional conditioners with periodic padding."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU,
               "silu": nn.SiLU}


def conv_net(
    ndim: int, in_channels: int, out_channels: int, hidden: list[int], kernel_size: int,
    activation: str, zero_init: bool = True,
) -> nn.Sequential:
    """Convolutions (circular padding, odd ``kernel_size``) over a ``ndim``-dimensional lattice.

    Input ``(batch, in_channels, L0, L1, ...)`` → ``(batch, out_channels, L0, L1, ...)``; no
    weight depends on the lattice extent. With ``zero_init`` the last layer starts at zero, so a
    fresh coupling is the identity map.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
    widths = [in_channels, *hidden, out_channels]
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(conv(c_in, c_out, kernel_size, padding=kernel_size // 2,
                           padding_mode="circular"))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    if zero_init:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)
