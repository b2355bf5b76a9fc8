"""The PyTorch twin of ``segpipe.models.unet3d.build_unet3d`` (batch norm), for the benchmarks.

The one PyTorch network of ``bench_train_step.py`` and ``bench_inference.py``: two 3×3×3
convolutions + batch norm + LeakyReLU(0.01) per level, stride-2 convolution down, transposed
convolution (k2, s2) up, concatenated skips, 1×1×1 head; channels-first. Needs
``pip install "segpipe[bench]"``.
"""
from __future__ import annotations


def build_torch_unet(in_channels: int = 1, num_classes: int = 3, *, base: int = 16, depth: int = 4,
                     max_filters: int = 320):
    """A ``torch.nn.Module`` mapping (B, Cin, X, Y, Z) to logits (B, C, X, Y, Z)."""
    from torch import cat, nn

    def block(c_in, c_out, stride):
        return nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.LeakyReLU(0.01),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.LeakyReLU(0.01),
        )

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            f = [min(base * 2**i, max_filters) for i in range(depth)]
            self.enc = nn.ModuleList([block(in_channels if i == 0 else f[i - 1], f[i], 1 if i == 0 else 2)
                                      for i in range(depth)])
            self.up = nn.ModuleList([nn.ConvTranspose3d(f[i + 1], f[i], 2, stride=2) for i in range(depth - 1)])
            self.dec = nn.ModuleList([block(2 * f[i], f[i], 1) for i in range(depth - 1)])
            self.head = nn.Conv3d(f[0], num_classes, 1)

        def forward(self, x):
            skips = []
            for enc in self.enc:
                x = enc(x)
                skips.append(x)
            for level in reversed(range(depth - 1)):
                x = self.dec[level](cat([self.up[level](x), skips[level]], 1))
            return self.head(x)

    return UNet()
