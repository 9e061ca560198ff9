"""Image-tokenizer loss terms beyond the tokenizer's own (``vlm.towers.dualtoken``): a perceptual distance
through any registered image tower, and a PatchGAN hinge discriminator with VQGAN's adaptive weight.

    perc = PerceptualLoss(registry.build("tower", "vlm:runs/pretrain_demo/final"))
    loss = perc(recon_unit, real_unit)          # [B, 3, H, W] in [0, 1] -> 0-d
    disc = PatchDiscriminator(channels=64, layers=3)
    d_loss = hinge_d_loss(disc(real), disc(fake.detach()))
    g_loss = -disc_frozen(fake).mean();  w = adaptive_weight(nll, g_loss, decoder.last_layer)

LPIPS' trained weights cannot be downloaded here, so the perceptual term is LPIPS' recipe on the features
of a tower the user names: tokens of the tower's ``forward`` (its own normalisation and size), each token
unit-normalised over channels, squared distance averaged over tokens and channels (LPIPS with uniform
layer weights on one layer). The tower is frozen (no gradient to it; gradients flow to the images).

The discriminator is taming-transformers' ``NLayerDiscriminator`` (4x4 convs, stride 2, LeakyReLU 0.2,
BatchNorm replaced by GroupNorm so it has no running statistics to keep in sync across ranks or in
checkpoints; ``[B, 3, H, W] -> [B, 1, h, w]`` patch logits). ``adaptive_weight`` is VQGAN's
``calculate_adaptive_weight``: ``||grad_last nll|| / (||grad_last g|| + 1e-4)``, clamped to [0, 1e4],
detached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerceptualLoss(nn.Module):
    """``(x, y)`` images in [0, 1] ``[B, 3, H, W]`` -> 0-d distance of their tower features (module docstring)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower
        self.tower.requires_grad_(False)
        self.tower.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()
        return self

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        pp = self.tower.preprocess
        if x.shape[-1] != pp.image_size or x.shape[-2] != pp.image_size:
            x = F.interpolate(x, size=(pp.image_size, pp.image_size), mode="bilinear", align_corners=False)
        f = self.tower(pp.normalize(x))[0]
        if f.dim() == 4:  # a conv trunk's map [B, C, h, w]
            f = f.flatten(2).transpose(1, 2)
        return F.normalize(f.float(), dim=-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fy = self._features(y)
        return ((self._features(x) - fy) ** 2).sum(-1).mean()


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) or 1, ch)


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``[B, 3, H, W] -> [B, 1, h, w]`` logits (module docstring)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, nxt, 4, stride, 1, bias=False), _norm(nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """VQGAN's hinge loss for the discriminator: ``(mean relu(1 - real) + mean relu(1 + fake)) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's adaptive GAN weight (module docstring); 0-d, detached. Needs a graph from both losses to
    ``last_layer``."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_g = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_g.norm() + 1e-4)).clamp(0.0, 1e4).detach()
