"""The demo's dataset: class-structured images made in memory, deterministic for a seed (no
download). Ten pattern classes (stripes, checks, dots, rings, ...) with a random period, phase and
small rotation, in two random grey levels under a random tint. The pattern survives crops and
flips (no class mirrors another) while the recipe's colour jitter varies the nuisances that a
random network's features follow: self-supervised learning shows within minutes on a CPU.
"""
import numpy as np
import torch
import torch.nn.functional as F


CLASSES = ("h-stripes", "v-stripes", "checker", "dots", "rings", "grid", "cross-hatch", "diamonds", "waves",
           "blobs")


def _pattern_masks(size, n, rng):
    """Boolean masks (n, 10, size, size): one drawing of every class for each of n draws."""
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    period = rng.uniform(3.0, 5.0, (n, 1, 1))
    theta = rng.uniform(-0.3, 0.3, (n, 1, 1))            # small: orientation defines some classes
    u = (np.cos(theta) * xx + np.sin(theta) * yy) / period + rng.uniform(0, 1, (n, 1, 1))
    v = (-np.sin(theta) * xx + np.cos(theta) * yy) / period + rng.uniform(0, 1, (n, 1, 1))
    fu, fv = u % 1, v % 1
    centre = rng.uniform(0, size, (n, 2, 1, 1))
    r = np.hypot(xx - centre[:, 0], yy - centre[:, 1]) / period
    # Blobs: a random 4x4 field, bilinearly upsampled, thresholded at zero.
    coarse = torch.from_numpy(rng.normal(size=(n, 1, 4, 4)))
    field = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    masks = [fv < 0.5, fu < 0.5, (np.floor(u) + np.floor(v)) % 2 == 0,
             (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.09, r % 1 < 0.5, (fu < 0.3) | (fv < 0.3),
             ((u + v) % 1 < 0.3) | ((u - v) % 1 < 0.3), np.abs(fu - 0.5) + np.abs(fv - 0.5) < 0.3,
             (v + 0.35 * np.sin(2 * np.pi * u / 2)) % 1 < 0.5, field > 0]
    return np.stack(masks, axis=1)


def make(n, size=32, seed=0):
    """n images (uint8, n x 3 x size x size) and balanced labels, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    for lo in range(0, n, 512):                                   # chunks bound the memory
        k = min(512, n - lo)
        mask = _pattern_masks(size, k, rng)[np.arange(k), labels[lo:lo + k]][:, None]
        # Two random grey levels under a mild random tint: the nuisances the colour jitter varies.
        tint = rng.uniform(0.6, 1.0, (k, 3, 1, 1))
        fg, bg = rng.uniform(0, 1, (k, 1, 1, 1)) * tint, rng.uniform(0, 1, (k, 1, 1, 1)) * tint
        img = np.where(mask, fg, bg) + rng.normal(0, 0.03, (k, 3, size, size))
        images[lo:lo + k] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
