"""Photometric formulas on a batch of float images in [0, 1] (B, 3, H, W), any device, with one
parameter per image: torchvision's (corinfomax.py, explicit_mim.py, hydes.py) and BYOL's
byol/utils/augmentations.py (ssl_hsic.py, as its official code runs). The recipes that draw the
parameters are each method file's class Photometric; the tests compare every formula, image by
image, with torchvision and with a transcription of BYOL's code.
"""
import torch
import torch.nn.functional as F


def grayscale(x):
    """Luma (B, 3, H, W) -> (B, 1, H, W) with weights 0.2989, 0.587, 0.114 (torchvision's and BYOL's)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def blend(x, y, f):
    """f x + (1 - f) y clamped to [0, 1] (torchvision's _blend): brightness (y = 0), contrast
    (y = mean luma) and saturation (y = luma); f = 1 is x."""
    f = f[:, None, None, None]
    return (f * x + (1 - f) * y).clamp(0, 1)


def rgb_to_hsv(x):
    """(h, s, v), h in [0, 1): TensorFlow's formulas, as BYOL's rgb_to_hsv (l. 172-202); h from the
    channel holding v = max, R before G before B."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    s = torch.where(v > 0, c / v, 0.0)
    norm = torch.where(c != 0, 1 / (6 * c), 1e9)      # grey pixels (c = 0) get h = 0
    h = torch.where(r == v, norm * (g - b), torch.where(g == v, norm * (b - r) + 2 / 6, norm * (r - g) + 4 / 6))
    h = h * (c > 0)
    return h + (h < 0), s, v


def hsv_to_rgb(h, s, v):
    """BYOL's hsv_to_rgb (l. 205-236): the sector floor(6 h) gives each channel c = s v, the ramp
    c (1 - |6 h mod 2 - 1|) or 0, plus v - c."""
    c = s * v
    dh = (h % 1) * 6
    ramp, sector = c * (1 - (dh % 2 - 1).abs()), dh.floor()

    def channel(top, slope):   # the two sectors where the channel is at c, the two on the ramp
        return torch.where((sector == top[0]) | (sector == top[1]), c,
                           torch.where((sector == slope[0]) | (sector == slope[1]), ramp, 0.0))
    rgb = torch.stack([channel((0, 5), (1, 4)), channel((1, 2), (0, 3)), channel((3, 4), (2, 5))], 1)
    return rgb + (v - c)[:, None]


def hue(x, f):
    """torchvision's adjust_hue: turn the HSV hue of image b by f[b] turns (f = 0: unchanged), with
    h from the channel holding V = max; back to RGB by V - C clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6, n = 5, 3, 1 for R, G, B, C = max - min."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    c_safe = torch.where(c > 0, c, 1.0)   # grey pixels (C = 0): any h will do, they stay grey
    h = torch.where(v == r, (g - b) / c_safe, torch.where(v == g, 2 + (b - r) / c_safe, 4 + (r - g) / c_safe))
    k = torch.stack([(n + 6 * ((h / 6 + f[:, None, None]) % 1)) % 6 for n in (5, 3, 1)], 1)
    return v[:, None] - c[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


# torchvision's ColorJitter ops, identity at 1, 1, 1, 0.
JITTER = {"brightness": lambda x, f: blend(x, torch.zeros_like(x), f),
          "contrast": lambda x, f: blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f),
          "saturation": lambda x, f: blend(x, grayscale(x), f), "hue": hue}


def byol_colour(x, k, f):
    """BYOL's colour op k (l. 239-283), then its clip to [0, 1] (l. 313-317): 0 brightness x + f; 1
    contrast (x - m) f + m about each channel's own spatial mean m; in HSV, 2 saturation S f
    clipped to [0, 1], 3 hue H + f. Identity at f = 0, 1, 1, 0."""
    if k == 0:
        return (x + f[:, None, None, None]).clamp(0, 1)
    if k == 1:
        m = x.mean((2, 3), keepdim=True)
        return ((x - m) * f[:, None, None, None] + m).clamp(0, 1)
    h, s, v = rgb_to_hsv(x)
    h, s = (h, (s * f[:, None, None]).clamp(0, 1)) if k == 2 else ((h + f[:, None, None]) % 1, s)
    return hsv_to_rgb(h, s, v).clamp(0, 1)


def gaussian_blur(x, sigma, taps, padding="reflect"):
    """Blur image b by sigma[b]: `taps` samples of exp(-t^2 / 2 sigma^2), normalised, separable;
    reflect padding (torchvision) or "zeros" (TensorFlow's SAME, BYOL's). sigma near 0: identity."""
    B, C, H, W = x.shape
    t = torch.arange(taps, device=x.device, dtype=x.dtype) - (taps - 1) / 2
    kernel = torch.softmax(-(t / sigma[:, None]) ** 2 / 2, dim=1).repeat_interleave(C, 0)   # (B C, taps)
    y = F.pad(x.reshape(1, B * C, H, W), (taps // 2,) * 4, mode="constant" if padding == "zeros" else padding)
    y = F.conv2d(y, kernel[:, None, None, :], groups=B * C)
    return F.conv2d(y, kernel[:, None, :, None], groups=B * C).reshape(B, C, H, W)


def solarize(x, on, threshold=128 / 255):
    """Invert the pixels at or above `threshold` (PIL's 128; BYOL's 0.5) of the images with on[b]."""
    return torch.where(on[:, None, None, None] & (x >= threshold), 1 - x, x)
