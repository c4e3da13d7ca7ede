"""HyDeS: self-supervised learning by hyperspherical density shaping.

Paper    E. Rodriguez-Betancourt, E. Casasola-Murillo. "Self-Supervised Representation Learning via
         Hyperspherical Density Shaping", arXiv:2604.24498v1 (April 2026, preprint).
Official none published. Only the title, abstract, introduction and Figure 1 could be read:
         docs/hydes.md derives the loss from Figure 1 and gives the reasons for every choice below.

THE IDEA
    Several augmented views of each image go through one encoder onto the unit sphere S^(D-1).
    Two von Mises-Fisher kernel-density estimates are made there: a local density over the other
    views of the same image, and a global density over the whole batch. Their entropies shape the
    embedding: the local entropy is minimised (views of one image cluster), the global entropy is
    maximised (the batch spreads over the sphere). Their weighted difference estimates the mutual
    information between views. With two views and the self pair left out, it is NT-Xent.

EQUATION MAP ([derived] from Figure 1; s_ij = z_i . z_j, kappa fixed)
    vMF kernel        K(z, z') = C_D(kappa) exp(kappa z.z')                          log_vmf_normaliser
    local density     p_loc(z_i) = mean over P(i) of K(z_i, z_j), P(i) = other views of i's image
    global density    p_glob(z_i) = mean over A(i) of K(z_i, z_j), A(i) = the batch (with i)
    entropies         H_local = mean_i -log p_loc(z_i),  H_global = mean_i -log p_glob(z_i)
    MI estimate       I = alpha H_global - beta H_local  (Figure 1's Sigma node)
    loss              L = mean_i [alpha LSE_A(kappa s_ij) - beta LSE_P(kappa s_ij)]
                          + beta log|P(i)| - alpha log|A(i)|  = -I + (beta - alpha) log C_D   hydes_loss
    NT-Xent identity  V = 2, alpha = beta = 1, leave-one-out: L = NT-Xent(tau = 1/kappa) - log(M - 1)

OUR CHOICES (every one, untuned; each is one flag away)
    1. The global density includes the self pair j = i, Figure 1's literal reading, and the other
       views of the image (`--global-self`, `--global-positives`); the local one never includes i.
    2. One pooled global density over all V N embeddings; the mean over anchors of per-anchor
       logs; alpha = beta = 1 (`--alpha`, `--beta`); a fixed kappa = 10 (`--kappa`).
    3. V = 2 global views (`--views`), optional small local crops (`--local-crops`).
    4. SimCLR-style networks and optimisation (projector 2048-2048-256 with BatchNorm; SGD, LARS
       on ImageNet; 0.3 x B/256, 10 warm-up epochs, cosine to 0), BYOL's two-view augmentations;
       as in corinfomax.py (its items 4, 5 and 7): augmentation, data order, evaluation.

USAGE
    python hydes.py                                    # CPU demo on synthetic patterns
    python hydes.py --data cifar10 --data-dir data     # 1 GPU, our CIFAR-10 recipe
    python hydes.py --global-self exclude --views 4    # leave-one-out global density, 4 views
    python hydes.py --data imagenet --data-dir /ds/imagenet --gpus 8
    python tools/benchmark.py hydes --data cifar10     # step overhead, loss cost, data pipeline
"""
import copy
import functools
import math
import os
import signal
import sys
import time

if __name__ == "__main__":   # a Ctrl-C while torch loads (seconds): one line, no traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print(f"{sys.argv[0]}: interrupted while starting; nothing was "
                                                           "saved", file=sys.stderr) or 130))

import torch  # noqa: E402  (after the handler above)
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import common
import image_ops

PROG = "hydes.py"

# ============================================================================================
# Config
# ============================================================================================
# Every value a run uses: DEFAULTS, then one preset per dataset, all ours (no HyDeS recipe was
# available); a flag of the same name overrides either (--print-config shows which gave what).
# Flags are named after the paper's symbols.

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DEFAULTS = dict(
    data="synthetic", data_dir=None, preset=None, download=False, workers=None, skip_bad_images=False,
    synthetic_train=3840, synthetic_test=1000, norm=((0.5,) * 3, (0.25,) * 3),
    kappa=10.0, alpha=1.0, beta=1.0, global_self="include", global_positives="include", views=2, local_crops=0,
    local_size=None,   # None: 96 for 224-pixel images, else half the image size
    arch="resnet18", stem="cifar", image_size=32, crop_min_scale=0.2, blur_sigma=0.0, projector="2048-2048-256",
    epochs=None, max_steps=None, batch_size=None, warmup_epochs=10, wd=1e-4, momentum=0.9, amp=None,
    optimizer="sgd", lr=0.3, eta=1e-3,   # epochs, batch_size: every preset sets them
    probe="linear", probe_epochs=100, probe_batch=256, probe_lr=0.2, probe_lr_scaling="none", probe_warmup_steps=0,
    probe_schedule="cosine", probe_head_ema=0.0, baseline=False, knn_every=10, knn_bank=20000,
    gpus=1, cpu=False, compile=False, threads=None, output_dir=None, save_every=30.0, log_every=10, seed=0)
PRESETS = {
    "cifar10": dict(epochs=1000, batch_size=512, norm=((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))),
    "cifar100": dict(epochs=1000, batch_size=512, norm=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "stl10": dict(stem="imagenet", image_size=96, epochs=1000, batch_size=512, blur_sigma=2.0, norm=IMAGENET_NORM),
    "imagenet": dict(arch="resnet50", stem="imagenet", image_size=224, epochs=100, batch_size=1024,
                     optimizer="lars", wd=1e-6, crop_min_scale=0.25, blur_sigma=2.0, knn_every=5, knn_bank=100000,
                     norm=IMAGENET_NORM),
    # ---- small presets for CPU runs ----
    "fashionmnist": dict(image_size=28, epochs=20, batch_size=256, lr=1.2, warmup_epochs=2,
                         projector="1024-1024-128", probe="cached", knn_every=5, baseline=True,
                         norm=((0.286,) * 3, (0.353,) * 3)),
    "synthetic": dict(image_size=16, epochs=4, batch_size=64, lr=1.2, warmup_epochs=1, crop_min_scale=0.3,
                      projector="512-512-64", probe="cached", knn_every=0, baseline=True),
}
OUR_PRESETS = tuple(PRESETS)


def parse_args(argv=None):
    p = common.Parser(prog=PROG, description="HyDeS pretraining (arXiv:2604.24498); a flag left unset takes its "
                      "preset's value, else the default shown. --print-config shows which.")
    groups = common.add_shared_flags(p, PRESETS)
    g = groups["method"]
    g.add_argument("--kappa", type=common.POSITIVE, help="vMF concentration (bandwidth), fixed; kappa = 1/tau")
    g.add_argument("--alpha", type=common.REAL, help="weight of the global entropy H_global")
    g.add_argument("--beta", type=common.REAL, help="weight of the local entropy H_local")
    g.add_argument("--global-self", choices=("include", "exclude"),
                   help="the self pair j = i in the global density (exclude: leave-one-out)")
    g.add_argument("--global-positives", choices=("include", "exclude"),
                   help="the other views of the anchor's image in the global density")
    g.add_argument("--views", type=common.checked(int, lambda v: v >= 2, "an integer >= 2"),
                   help="V, global views per image")
    g.add_argument("--local-crops", type=common.COUNT, help="extra small crops per image")
    g.add_argument("--local-size", type=common.IMAGE_SIZE,
                   help="local crop size (default: 96 for 224-pixel presets, else half the image size)")
    groups["network"].add_argument("--projector", type=common.WIDTHS, help="hidden-...-output widths")
    g = groups["optimisation"]
    g.add_argument("--optimizer", choices=("sgd", "lars"))
    g.add_argument("--lr", type=common.POSITIVE, help="base learning rate, multiplied by batch/256")
    g.add_argument("--eta", type=common.POSITIVE, help="LARS trust coefficient")
    return common.resolve(p, argv, DEFAULTS, PRESETS)


# ============================================================================================
# Loss
# ============================================================================================
# The unit to copy: this section, whole, below the line `import functools, math, torch, torch.distributed
# as dist, torch.nn as nn, torch.nn.functional as F` (a test runs it so, alone). `hydes_loss` is a pure
# function of the embeddings. In a multi-GPU run, pass the gathered views (all_gather with
# gradient) and this process's images as `anchors`: rows the local anchors, columns the global batch.

@functools.lru_cache   # a constant of the run: computed once, not at every step
def log_vmf_normaliser(D, kappa):
    """log C_D(kappa) of the vMF density on S^(D-1), C_D = kappa^nu / ((2 pi)^(D/2) I_nu(kappa)),
    nu = D/2 - 1, in float64, with log I_nu(kappa) = nu log(kappa/2) - lgamma(nu + 1)
    + log sum_m (kappa^2/4)^m / (m! (nu + 1)_m): summed in log space, finite where I_nu underflows."""
    nu = torch.tensor(D / 2 - 1, dtype=torch.float64)
    k = torch.tensor(float(kappa), dtype=torch.float64)
    m = torch.arange(int(2 * kappa) + 400, dtype=torch.float64)
    log_terms = m * torch.log(k**2 / 4) - torch.lgamma(m + 1) - (torch.lgamma(nu + 1 + m) - torch.lgamma(nu + 1))
    log_bessel = nu * torch.log(k / 2) - torch.lgamma(nu + 1) + torch.logsumexp(log_terms, 0)
    return (nu * torch.log(k) - D / 2 * math.log(2 * math.pi) - log_bessel).item()


def hydes_loss(z, kappa=10.0, alpha=1.0, beta=1.0, global_self=True, global_positives=True, anchors=None):
    """HyDeS loss L = beta H_local - alpha H_global in log-sum-exp form, without the constant
    (alpha - beta) log C_D(kappa): -I exactly when alpha = beta.

    z: (V, N, D), view v of image n is z[v, n], L2-normalised rows; V >= 2. anchors: a slice of
    images whose views are the anchors (default: all); the loss is the mean over those anchors.
    Returns (loss, logs): "h_local", "h_global", "mi" with C_D included, and "w_self", the mean
    softmax weight of the self pair in the global density (0 when it is excluded), detached.
    """
    if z.dim() != 3 or len(z) < 2:
        raise ValueError(f"z must have shape (V, N, D) with V >= 2 views, got {tuple(z.shape)}")
    V, N, D = z.shape
    images = torch.arange(N, device=z.device)[anchors if anchors is not None else slice(None)]
    columns = z.reshape(V * N, D)                          # column j = v N + n shows image n
    rows = z[:, images].reshape(-1, D)                     # row i = v N_a + a shows images[a]
    logits = kappa * rows @ columns.T                      # kappa s_ij
    row_image = images.repeat(V)
    col_image = torch.arange(N, device=z.device).repeat(V)
    self_col = (torch.arange(V, device=z.device)[:, None] * N + images[None, :]).reshape(-1)
    # Masks from comparing index vectors (a boolean-mask read would make the host wait for the GPU)
    is_self = torch.arange(V * N, device=z.device)[None, :] == self_col[:, None]
    same = row_image[:, None] == col_image[None, :]
    local_mask = same & ~is_self                           # P(i): the other views of the image
    global_mask = torch.ones_like(same) if global_positives else ~same
    global_mask = global_mask | is_self if global_self else global_mask & ~is_self
    lse_local = logits.masked_fill(~local_mask, -math.inf).logsumexp(1)
    lse_global = logits.masked_fill(~global_mask, -math.inf).logsumexp(1)
    n_local, n_global = (m.sum(1).to(logits.dtype) for m in (local_mask, global_mask))  # |P(i)|, |A(i)|
    # -log p(z_i) = -log C_D + log|S(i)| - LSE_S(i)(kappa s_ij), S = P or A
    neglog_local = n_local.log() - lse_local
    neglog_global = n_global.log() - lse_global
    loss = (beta * neglog_local - alpha * neglog_global).mean()
    log_c = log_vmf_normaliser(D, kappa)
    h_local, h_global = (neglog_local - log_c).mean().detach(), (neglog_global - log_c).mean().detach()
    w_self = ((logits.gather(1, self_col[:, None]).squeeze(1) - lse_global).exp().mean().detach()
              if global_self else torch.zeros(()))
    return loss, {"loss": loss.detach(), "h_local": h_local, "h_global": h_global,
                  "mi": alpha * h_global - beta * h_local, "w_self": w_self.to(loss.device)}


class HyDeSLoss(nn.Module):
    """`hydes_loss` on views (V, N, D) gathered in rank order, with this process's images as the
    anchors. The processes' losses (and, after DDP's averaging, gradients) average to the
    global-batch ones; the logs are averaged over processes."""

    def __init__(self, kappa=10.0, alpha=1.0, beta=1.0, global_self=True, global_positives=True):
        super().__init__()
        self.kappa, self.alpha, self.beta = kappa, alpha, beta
        self.global_self, self.global_positives = global_self, global_positives

    def forward(self, z):
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        n_local = z.shape[1] // world
        loss, logs = hydes_loss(z, self.kappa, self.alpha, self.beta, self.global_self, self.global_positives,
                                anchors=slice(rank * n_local, (rank + 1) * n_local))
        values = torch.stack([v.double() for v in logs.values()])
        if world > 1:   # every process logs (and checks for NaN) the global-batch values
            dist.all_reduce(values)
            values /= world
        return loss, dict(zip(logs, values.unbind()))     # left on the device: no host sync



# ============================================================================================
# Networks
# ============================================================================================

def make_backbone(arch, stem):
    """torchvision ResNet, zero-init residuals, no fc (its state-dict names); returns (net, width).
    The CIFAR stem (3x3 stride-1 conv1, no max-pool) keeps small images from a 4x downsampling."""
    net = getattr(torchvision.models, arch)(zero_init_residual=True)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def load_backbone(path):
    """A run's backbone.pt as the ResNet it was trained as (arch and stem read off the weights), in
    eval mode: load_backbone("runs/corinfomax-synthetic/backbone.pt")(images) gives the features."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    net, _ = make_backbone("resnet50" if "layer1.0.conv3.weight" in state else "resnet18",
                           "cifar" if state["conv1.weight"].shape[-1] == 3 else "imagenet")
    net.load_state_dict(state)
    return net.eval()


def make_projector(in_dim, widths):
    """Linear(+bias) -> BN -> ReLU for each hidden width, then Linear without bias."""
    dims = [in_dim] + [int(w) for w in widths.split("-")]
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


class Model(nn.Module):
    """Backbone + projector + projection onto the sphere; every view shares it (Figure 1: one
    encoder, no predictor, no EMA teacher, no stop-gradient)."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone, feat_dim = make_backbone(cfg.arch, cfg.stem)
        self.projector = make_projector(feat_dim, cfg.projector)

    def forward(self, x):   # the last Linear and the normalisation in float32, whatever the autocast
        return common.float32_head(self.projector, self.backbone(x), 1e-12)


# ============================================================================================
# Augmentation
# ============================================================================================
# A view in two halves: the geometric one (crop, flip) per image in the loader's workers; the
# photometric one (jitter, grayscale, blur, solarize, normalise) on the batch on the device, every
# op (torchvision's formulas, image_ops.py) on every image, the identity parameter for the images
# that did not draw it: per image torchvision's v2 recipe, in float (no rounding to 8 bits).

BICUBIC = v2.InterpolationMode.BICUBIC


def normalize(cfg):
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(*cfg.norm)]


def crop(size, scale):
    """The geometric half of a pretraining view: bicubic RandomResizedCrop + flip, uint8 out."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
                       v2.RandomHorizontalFlip(p=0.5)])


class Photometric:
    """The photometric half of a pretraining view, on a batch: per image, torchvision's
    RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8) (its four ops in a random order),
    RandomGrayscale(p=0.2), RandomApply([GaussianBlur(taps, sigma range)], p=blur_p),
    RandomSolarize(128/255, p=solarize_p), then Normalize(mean, std).

    draw(n, generator) makes the random choices of n images on the CPU; calling the object with a
    uint8 batch (B, 3, H, W) on any device and B images' draws returns the normalised float views.
    """

    def __init__(self, norm, blur_p, solarize_p, taps, sigma):
        self.norm, self.blur_p, self.solarize_p, self.taps, self.sigma = norm, blur_p, solarize_p, taps, sigma

    def draw(self, n, generator):
        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)
        return {"jitter": uniform(0, 1) < 0.8,
                "order": uniform(0, 1, 4).argsort(1),      # a uniformly random permutation per image
                # brightness, contrast, saturation in [1 - s, 1 + s] for s = 0.4, 0.4, 0.2; hue in [-0.1, 0.1]
                "factors": uniform(torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1]), 4),
                "gray": uniform(0, 1) < 0.2,
                "blur": uniform(0, 1) < self.blur_p,
                "sigma": uniform(*self.sigma),
                "solarize": uniform(0, 1) < self.solarize_p}

    def __call__(self, x, p):
        p = {k: v.to(x.device, non_blocking=True) for k, v in p.items()}
        x = x.float() / 255
        for position in range(4):              # ColorJitter's ops in each image's own order
            for k, (op, identity) in enumerate(zip(image_ops.JITTER.values(), (1.0, 1.0, 1.0, 0.0))):
                drawn = p["jitter"] & (p["order"][:, position] == k)
                x = op(x, torch.where(drawn, p["factors"][:, k], identity))
        x = image_ops.JITTER["saturation"](x, (~p["gray"]).float())                       # grayscale: saturation 0
        x = image_ops.gaussian_blur(x, torch.where(p["blur"], p["sigma"], 1e-3), self.taps)   # 1e-3: no blur
        return v2.functional.normalize(image_ops.solarize(x, p["solarize"]), *self.norm)


def pretrain_views(cfg):
    """V global views alternating BYOL's two recipes (blur 1.0 / 0.1, solarize 0.0 / 0.2), then
    --local-crops small crops (area 0.05-0.25, blur 0.5). Each view is a pair (geometric
    half for the loader, photometric half for the device). A 13-tap blur covers +-3 sigma for
    sigma up to 2; the small-image presets have no blur (--blur-sigma 0)."""
    def view(size, scale, blur_p, solarize_p):
        blur_p = blur_p if cfg.blur_sigma > 0 else 0.0
        return crop(size, scale), Photometric(cfg.norm, blur_p, solarize_p, 13, (0.1, cfg.blur_sigma))
    recipes = [view(cfg.image_size, (cfg.crop_min_scale, 1.0), 1.0, 0.0),
               view(cfg.image_size, (cfg.crop_min_scale, 1.0), 0.1, 0.2)]
    local = view(cfg.local_size or (96 if cfg.image_size >= 224 else cfg.image_size // 2), (0.05, 0.25), 0.5, 0.0)
    return [recipes[v % 2] for v in range(cfg.views)] + [local] * cfg.local_crops


def probe_train_view(cfg):
    """Linear-probe training augmentation: RandomResizedCrop (area 0.08-1) + flip."""
    return v2.Compose([crop(cfg.image_size, (0.08, 1.0)), *normalize(cfg)])


def test_view(cfg):
    """Evaluation: Resize(size * 8/7, bicubic) + CenterCrop(size) (256 -> 224 on ImageNet)."""
    return v2.Compose([v2.ToImage(), v2.Resize(int(cfg.image_size * 8 / 7), interpolation=BICUBIC, antialias=True),
                       v2.CenterCrop(cfg.image_size), *normalize(cfg)])


# ============================================================================================
# Data
# ============================================================================================
# In common.py: the datasets, the views seeded per item, the sampler that splits global batches.

def pretrain_loader(dataset, cfg, proc):
    """(sampler of global batches, loader of this process's crops, the views' photometric halves)."""
    sampler = common.GlobalBatchSampler(len(dataset), cfg.batch_size, proc.rank, proc.world, seed=cfg.seed)
    geometric, photometric = zip(*pretrain_views(cfg))
    return sampler, common.make_loader(common.Views(dataset, geometric), sampler, cfg), photometric


# ============================================================================================
# Optimisation
# ============================================================================================

class LARS(torch.optim.Optimizer):
    """BYOL's LARS. For p of a group with lars=True, gradient g: u = g + wd p; u <- u eta ||p|| / ||u||
    (1 if a norm is 0); mu <- m mu + u; p <- p - lr mu. lars=False (biases, BN): no decay, no ratio."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))
        for p in (p for group in self.param_groups for p in group["params"]):   # mu, made once
            self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:   # one kernel per op over the group's parameters (foreach)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            u = [p.grad for p in params]
            if group["lars"]:
                u = torch._foreach_add(u, params, alpha=group["weight_decay"])
                p_norm, u_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(u))
                # torch.where, not `if`: no device-to-host sync per parameter.
                ratio = torch.where((p_norm > 0) & (u_norm > 0), group["eta"] * p_norm / u_norm, 1.0)
                torch._foreach_mul_(u, ratio.unbind())
            mu = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(mu, group["momentum"])
            torch._foreach_add_(mu, u)
            torch._foreach_add_(params, mu, alpha=-group["lr"])


def make_optimizer(model, cfg):
    """SGD with momentum, or LARS (ImageNet preset); biases and BatchNorm parameters (the 1-D
    ones) get no weight decay (and no LARS trust ratio)."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    if cfg.optimizer == "lars":
        return LARS([{"params": weights}, {"params": others, "lars": False}], lr=0.0,
                    momentum=cfg.momentum, weight_decay=cfg.wd, eta=cfg.eta)
    return torch.optim.SGD([{"params": weights, "weight_decay": cfg.wd}, {"params": others, "weight_decay": 0.0}],
                           lr=0.0, momentum=cfg.momentum)    # lr: set at every step by train_step


def lr_at(cfg, step):
    """Per step: linear warm-up from 0 to lr * B/256 over W epochs, then cosine to 0 at the end
    of the last epoch (--max-steps stops early without changing the schedule)."""
    base = cfg.lr * cfg.batch_size / 256
    W, K = cfg.warmup_epochs * cfg.steps_per_epoch, cfg.epochs * cfg.steps_per_epoch
    if step < W:
        return base * step / W
    return base * (1 + math.cos(math.pi * min(step - W, K - W) / max(K - W, 1))) / 2


# ============================================================================================
# Evaluation
# ============================================================================================

def probe_lr_at(cfg, step, per_epoch):
    """The linear probe's LR: probe_lr (x batch/256 if so scaled), warm-up from 0 over probe_warmup_steps,
    then a per-step cosine to 0 ("cosine-steps"), per-epoch cosine to lr/100 ("cosine") or x0.1 / 20 epochs."""
    base = cfg.probe_lr * (cfg.probe_batch / 256 if cfg.probe_lr_scaling == "batch/256" else 1.0)
    W, K, epoch = cfg.probe_warmup_steps, cfg.probe_epochs * per_epoch, step // per_epoch
    if step < W:
        return base * step / W
    if cfg.probe_schedule == "cosine-steps":
        return base * (1 + math.cos(math.pi * (step - W) / max(K - W, 1))) / 2
    if cfg.probe_schedule == "step":
        return base * 0.1 ** (epoch // 20)
    return base / 100 + 0.99 * base * (1 + math.cos(math.pi * epoch / cfg.probe_epochs)) / 2


def linear_probe(backbone, name, data, cfg, proc, log):
    """The paper protocol: a Linear head on the frozen backbone's pooled features (eval mode), SGD
    momentum 0.9 without weight decay, RandomResizedCrop + flip; batch, LR and the head's EMA from
    the preset. The result is the last epoch's test accuracy of the EMA (haiku's, zero-debiased:
    hidden / (1 - decay^t), hidden from 0; decay 0: the head). Saved each epoch, resumed exactly."""
    backbone.eval()
    test_f, test_y = common.extract(backbone, data.test, test_view(cfg), cfg, proc)   # frozen: once
    head = nn.Linear(test_f.shape[1], data.classes).to(proc.device)
    ema, decay = copy.deepcopy(head).requires_grad_(False), cfg.probe_head_ema
    torch._foreach_mul_(list(ema.parameters()), 1 - decay)   # its first update, from hidden = 0
    head_ddp = nn.parallel.DistributedDataParallel(head) if proc.world > 1 else head
    opt = torch.optim.SGD(head.parameters(), lr=0.0, momentum=0.9, weight_decay=0.0)   # lr: probe_lr_at
    batch = min(cfg.probe_batch, len(data.probe) // proc.world * proc.world)
    sampler = common.GlobalBatchSampler(len(data.probe), batch, proc.rank, proc.world, seed=cfg.seed + 1)
    loader = common.make_loader(common.Views(data.probe, [probe_train_view(cfg)]), sampler, cfg)
    path, checkpointed = os.path.join(cfg.output_dir, f"probe-{name}.pt"), dict(head=head, ema=ema, optimizer=opt)
    owner = common.fingerprint(backbone)                               # a probe belongs to one backbone
    start, _ = common.restore_checkpoint(path, checkpointed, cfg, owner)   # the epochs done
    if start:
        log.print(f"  probe {name}: resuming at epoch {start}")

    def accuracy():   # debiasing divides every logit by one number, 1 - decay^t: the ranking is the same
        return common.topk(F.linear(test_f, ema.weight, ema.bias).detach(), test_y)
    for epoch in range(start, cfg.probe_epochs):
        sampler.set_epoch(epoch)
        for i, ((x,), y) in enumerate(loader):
            for group in opt.param_groups:
                group["lr"] = probe_lr_at(cfg, epoch * len(sampler) + i, len(sampler))
            with torch.no_grad(), common.autocast(cfg):
                f = backbone(common.to_device(x, proc.device)).float()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head_ddp(f), y.to(proc.device)).backward()
            opt.step()
            torch._foreach_lerp_(list(ema.parameters()), list(head.parameters()), 1 - decay)
        common.save_checkpoint(path, checkpointed, epoch + 1, 0, cfg, proc, owner)
        log.print(f"  probe {name} epoch {epoch + 1}/{cfg.probe_epochs}  top1 {accuracy()['top1']:.2f}")
    return accuracy()


def effective_ranks(model, data, cfg, proc, n=2048):
    """RankMe of the features and embeddings (the loss's inputs) of n pretraining images drawn once,
    without augmentation: a collapse shows with or without labels."""
    images = torch.utils.data.Subset(data.pretrain, common.fixed_subset(len(data.pretrain), n))
    return {f"rank_{name}": common.rankme(common.extract(net, images, test_view(cfg), cfg, proc)[0])
            for name, net in (("features", model.backbone), ("embedding", model))}


def evaluate(backbone, name, data, cfg, proc, log, kind):
    """Accuracy of `backbone` by kind: "linear" (the paper's protocol, above), or common.py's "cached"
    probe or "knn" monitor."""
    if kind == "linear":
        return linear_probe(backbone, name, data, cfg, proc, log)
    return common.feature_accuracy(kind, backbone, data, test_view(cfg), cfg, proc)


# ============================================================================================
# Training
# ============================================================================================

def make_criterion(cfg):
    """The training loss as configured (called once per run; the module holds no state)."""
    return HyDeSLoss(cfg.kappa, cfg.alpha, cfg.beta, cfg.global_self == "include",
                     cfg.global_positives == "include")


def collapsed(logs, cfg):
    """Collapse shows in H_global at its minimum, -log C_D - kappa: every embedding at one point."""
    if logs["h_global"] < -log_vmf_normaliser(common.out_dim(cfg), cfg.kappa) - cfg.kappa + 1e-3:
        return "H_global at its minimum"


def build(cfg, proc):
    """Model, loss, optimiser and AMP scaler, freshly initialised from cfg.seed."""
    torch.manual_seed(cfg.seed)
    model = Model(cfg).to(proc.device, memory_format=torch.channels_last if cfg.use_cuda else torch.preserve_format)
    if cfg.use_cuda and proc.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, make_criterion(cfg).to(proc.device), make_optimizer(model, cfg), \
        torch.amp.GradScaler(enabled=cfg.amp == "fp16")


def parallel(model, cfg, proc):
    """What train_step runs: `model` in DDP, then compiled with --compile (DDP first, PyTorch's order:
    its all-reduce overlaps the compiled backward); checkpoints keep `model`'s own names."""
    net = nn.parallel.DistributedDataParallel(model, device_ids=[proc.local_rank] if cfg.use_cuda else None) \
        if proc.world > 1 else model
    return torch.compile(net) if cfg.compile else net


def train_step(model, criterion, optimizer, scaler, views, step, cfg):
    """Step `step` (0-based) on this rank's share of the global batch; the loss sees the gathered
    batch. `views` holds the V global views and the local crops of this rank's images."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    with common.autocast(cfg):
        z = [model(x) for x in views]      # one pass per view: crops of different sizes
    # The loss runs outside autocast: float32 logits kappa z z^T; (V, N, D) global batch.
    z = torch.stack([common.gather_with_grad(v.float()) for v in z])
    loss, logs = criterion(z)   # not checked here: the loop reads the logs every few steps
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logs


def train(cfg):
    """The whole run, in every process: build, resume, pretrain, then export and probe."""
    proc = common.ThisProcess(cfg)                        # rank, world size, device, stop signals
    data = common.load_datasets(cfg, PRESETS)
    cfg = common.derive(cfg, data, proc, PROG)            # the derived values; cfg is fixed from here on
    torch.set_num_threads(cfg.threads)
    sampler, loader, photometric = pretrain_loader(data.pretrain, cfg, proc)
    model, criterion, optimizer, scaler = build(cfg, proc)
    checkpointed, ckpt = dict(model=model, criterion=criterion, optimizer=optimizer, scaler=scaler), \
        os.path.join(cfg.output_dir, "checkpoint.pt")
    step, done = common.restore_checkpoint(ckpt, checkpointed, cfg)   # done: epochs whose monitor ran
    log = common.Logger(cfg, proc, data)
    log.start(PROG, step, proc.world, cfg.preset in OUR_PRESETS, len(data.pretrain))
    net = parallel(model, cfg, proc)
    if done < step // cfg.steps_per_epoch:                # stopped after an epoch's last step, before its monitor
        done = monitor(model, criterion, data, cfg, proc, log, step)
    pending, saved_at = [], time.time()                   # pending: logs not yet read (device tensors)
    try:
        while step < cfg.total_steps:
            epoch = step // cfg.steps_per_epoch
            sampler.set_epoch(epoch, step % cfg.steps_per_epoch)   # a resumed epoch skips the batches done
            proc.stop.defer = True                        # a stop signal now waits for the end of a step
            for crops, _ in log.timed(loader):   # timed: the share of time waiting for data
                views = common.draw_and_apply(photometric, crops, step, cfg, proc)
                pending.append(train_step(net, criterion, optimizer, scaler, views, step, cfg))
                step += 1
                end = step % cfg.steps_per_epoch == 0 or step == cfg.total_steps
                if step % cfg.log_every and not end:
                    continue
                # Every --log-every steps and at an epoch's end: one host sync reads the logs (a NaN
                # stops the run before it is saved); the processes agree on stopping and saving.
                logs = common.read_logs(pending, step)
                log.train(epoch, step, logs, optimizer.param_groups[0]["lr"], collapsed(logs, cfg))
                stop, save_due = common.agree(proc, time.time() - saved_at > 60 * cfg.save_every)
                if stop or save_due or end:
                    common.save_checkpoint(ckpt, checkpointed, step, done, cfg, proc)
                    saved_at = time.time()
                if stop:
                    raise common.Stopped(stop, step, ckpt)
                if step == cfg.total_steps:
                    break
            proc.stop.allow()                             # saved: a signal now stops at once
            if step % cfg.steps_per_epoch == 0:
                done = monitor(model, criterion, data, cfg, proc, log, step)
                if step == cfg.total_steps:   # saved again with its monitor: a longer run resumed here skips it
                    common.save_checkpoint(ckpt, checkpointed, step, done, cfg, proc)
    except common.BadImage:   # one process keeps its steps since the last save (processes read different images)
        if proc.world == 1 and step > common.KEPT.get("step", 0):
            common.read_logs(pending, step)
            common.save_checkpoint(ckpt, checkpointed, step, done, cfg, proc)
        raise
    del loader                                            # its workers end before the probe starts its own
    log.print(f"pretraining done: {step} steps")
    finish(model, data, cfg, proc, log)
    proc.close()


def monitor(model, criterion, data, cfg, proc, log, step):
    """After an epoch: effective ranks, the method's own state, the kNN monitor; returns the epochs done."""
    epoch = step // cfg.steps_per_epoch
    rec = effective_ranks(model, data, cfg, proc)
    if cfg.labelled and cfg.knn_every and epoch % cfg.knn_every == 0:
        rec.update({f"knn_{k}": v for k, v in evaluate(model.backbone, "knn", data, cfg, proc, log, "knn").items()})
    log.epoch(epoch, step, rec)
    return epoch


def finish(model, data, cfg, proc, log):
    """Export the backbone (loads into torchvision's ResNet minus fc) and run the final probe."""
    if proc.is_main:
        common.atomic_save(model.backbone.state_dict(), os.path.join(cfg.output_dir, "backbone.pt"))
    if cfg.probe == "none" or not cfg.labelled:
        return
    results = {"trained": evaluate(model.backbone, "trained", data, cfg, proc, log, cfg.probe)}
    if cfg.baseline:   # what the probe reaches without pretraining: random weights, raw pixels
        results["random_init"] = evaluate(build(cfg, proc)[0].backbone, "random_init", data, cfg, proc, log, cfg.probe)
        results["raw_pixels"] = evaluate(nn.Flatten(), "raw_pixels", data, cfg, proc, log, cfg.probe)
    log.probes(cfg.probe, results)


# ============================================================================================
# Main
# ============================================================================================

def main(argv=None):
    cfg = parse_args(argv)
    if cfg.print_config:   # what this command would run with; no data is read
        common.print_config(cfg, PROG)
    else:
        common.launch(train, cfg, PROG)


if __name__ == "__main__":
    common.run_cli(main, PROG)
