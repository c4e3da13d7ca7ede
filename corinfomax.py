"""CorInfoMax: self-supervised learning by maximising correlative (log-determinant) information.

Paper    Serdar Ozsoy, Shadi Hamdan, Sercan O. Arik, Deniz Yuret, Alper T. Erdogan. "Self-Supervised
         Learning with an Information Maximization Criterion", NeurIPS 2022, arXiv:2209.07999.
Official github.com/serdarozsoy/corinfomax-ssl @ c0b917e (read, not copied). docs/corinfomax.md
         gives the reasons for every difference below.

THE IDEA
    Two views of an image go through one network to L2-normalised embeddings z1, z2. The loss keeps
    them close (a mean squared distance) and, against collapse, maximises the log-det of each view's
    covariance (-inf when collapsed): to first order the log-det mutual information of the views
    (Eq. 3). Running covariances (moving averages) let small batches estimate D x D ones.

EQUATION MAP (official code names; the steps are numbered in CorInfoMaxLoss)
    running mean      mu_b' = la_mu mu_b + (1 - la_mu) mean(z_b)                    step 1
    centring          zc_b = z_b - mu_b'  (the UPDATED mean)                         step 2
    batch covariance  C_b = zc_b^T zc_b / N                                          step 3
    running cov.      R_b' = la_R R_b + (1 - la_R) C_b                               step 4
    log-det term      L_cov = -[logdet(R_1' + eps I) + logdet(R_2' + eps I)] / D     step 5
    state update      R_b <- detach(R_b'), mu_b <- detach(mu_b')                     step 6
    invariance term   L_sim = sum_i ||z1_i - z2_i||^2 / (N D)                        step 7
    objective         L = alpha L_sim + L_cov   (LDMI, Eq. 3, to first order)        step 8
    LR schedule       warm-up from 3e-3 + cosine, stepped per epoch                  lr_at

DIFFERENCES FROM THE OFFICIAL CODE ([choice]: ours where it is silent)
    1. R_b, mu_b are float64 buffers saved in checkpoints (the official resume resets them).
    2. bf16 autocast on CUDA by default (official: fp16 on ImageNet-1k only); the projector's last
       layer, the normalisation and the loss in float32 outside it.
    3. A kNN monitor instead of the official IN-100 script's online probe.
    4. [choice] Colour jitter, grayscale, blur and solarize batched on the training device, in
       float, torchvision's formulas (official: torchvision's ops on PIL images in the loader).
    5. [choice] Global batches the same whatever the world size; exact mid-epoch resume.
    6. [choice] Presets stl10, fashionmnist (not tuned), synthetic; the short ones step the LR per step.
    7. The linear probe of cifars-tiny/main_linear.py l. 24, 47-57, optim_utils.py l. 62-63: batch
       256, SGD 0.9, per-epoch cosine to 2e-3 (lr/100); the last epoch's top-1 (logged every epoch).
    8. [choice] A 13-tap blur (PIL's has no size); weight decay on every parameter; a cached probe
       for short runs. Switches: --center-with previous, --lr-per-step, --amp, --no-normalize.

USAGE
    python corinfomax.py                                   # CPU demo on synthetic patterns
    python corinfomax.py --data cifar10 --data-dir data    # 1 GPU, the official CIFAR-10 recipe
    python corinfomax.py --data imagenet --data-dir /ds/imagenet --gpus 8
    python tools/benchmark.py corinfomax --data cifar10    # step overhead, loss cost, data pipeline
"""
import argparse
import copy
import math
import os
import signal
import sys
import time

if __name__ == "__main__":   # a Ctrl-C while torch loads (seconds): one line, no traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print(f"{sys.argv[0]}: interrupted while starting; nothing was "
                                                           "saved", file=sys.stderr) or 130))

import torch  # noqa: E402  (after the handler above)
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import common
import image_ops

PROG = "corinfomax.py"

# ============================================================================================
# Config
# ============================================================================================
# Every value a run uses: DEFAULTS, then one preset per dataset, from the official scripts unless
# marked ours; a flag of the same name overrides either (--print-config shows which gave what).
# Flags are named after the official code's symbols.

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DEFAULTS = dict(
    data="synthetic", data_dir=None, preset=None, download=False, workers=None, skip_bad_images=False,
    synthetic_train=3840, synthetic_test=1000, norm=((0.5,) * 3, (0.25,) * 3),
    alpha=250.0, la_R=0.01, la_mu=0.01, R_ini=1.0, eps=1e-8, center_with="updated", normalize=True,
    arch="resnet18", stem="cifar", image_size=32, crop_min_scale=0.08, blur_sigma=2.0, projector="4096-4096-128",
    proj_bn=False, epochs=None, max_steps=None, batch_size=None, warmup_epochs=10, wd=1e-4, momentum=0.9,
    amp=None, lr=0.5, min_lr=1e-6, lr_per_step=False,   # epochs, batch_size: every preset sets them
    probe="linear", probe_epochs=100, probe_batch=256, probe_lr=0.2, probe_lr_scaling="none", probe_warmup_steps=0,
    probe_schedule="cosine", probe_head_ema=0.0, baseline=False, knn_every=10, knn_bank=20000,
    gpus=1, cpu=False, compile=False, threads=None, output_dir=None, save_every=30.0, log_every=10, seed=0)
PRESETS = {
    "cifar10": dict(epochs=1000, batch_size=512, projector="2048-2048-64",
                    norm=((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
                    alpha=250.0, la_R=0.01, la_mu=0.01),
    "cifar100": dict(epochs=1000, batch_size=512, norm=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                     alpha=1000.0, la_R=0.01, la_mu=0.01),
    "tiny-imagenet": dict(arch="resnet50", stem="imagenet", image_size=64, epochs=800, batch_size=1024,
                          norm=IMAGENET_NORM, alpha=500.0, la_R=0.1, la_mu=0.1),
    "imagenet100": dict(stem="imagenet", image_size=224, epochs=400, batch_size=1024, lr=1.0, min_lr=5e-3,
                        norm=IMAGENET_NORM, alpha=500.0, la_R=0.01, la_mu=0.01),
    "imagenet": dict(arch="resnet50", stem="imagenet", image_size=224, epochs=100, batch_size=1536, lr=0.2,
                     projector="8192-8192-512", proj_bn=True, probe_lr=25.0, knn_bank=100000,
                     probe_schedule="step", knn_every=5, norm=IMAGENET_NORM, alpha=2000.0, la_R=0.1, la_mu=0.1),
    # ---- our own presets ----
    "stl10": dict(stem="imagenet", image_size=96, epochs=400, batch_size=512, norm=IMAGENET_NORM,
                  alpha=500.0, la_R=0.01, la_mu=0.01),
    "fashionmnist": dict(image_size=28, epochs=20, batch_size=256, warmup_epochs=2, min_lr=1e-3, lr_per_step=True,
                         alpha=250.0, la_R=0.01, la_mu=0.01, projector="1024-1024-64", probe="cached", knn_every=5,
                         baseline=True, norm=((0.286,) * 3, (0.353,) * 3)),
    "synthetic": dict(image_size=16, epochs=4, batch_size=64, lr=0.2, warmup_epochs=1, min_lr=1e-3, lr_per_step=True,
                      alpha=250.0, la_R=0.01, la_mu=0.01, crop_min_scale=0.3, blur_sigma=0.5, projector="512-512-32",
                      probe="cached", knn_every=0, baseline=True),
}
OUR_PRESETS = ("stl10", "fashionmnist", "synthetic")


def parse_args(argv=None):
    p = common.Parser(prog=PROG, description="CorInfoMax pretraining (arXiv:2209.07999); a flag left unset takes its "
                      "preset's value, else the default shown. --print-config shows which.")
    groups = common.add_shared_flags(p, PRESETS)
    g = groups["method"]
    g.add_argument("--alpha", type=common.NONNEGATIVE, help="weight of the invariance term (code scale)")
    g.add_argument("--la-R", dest="la_R", type=common.RATE, help="la_R: weight of the previous covariance")
    g.add_argument("--la-mu", dest="la_mu", type=common.RATE, help="la_mu: weight of the previous mean")
    g.add_argument("--R-ini", dest="R_ini", type=common.POSITIVE, help="initial covariance R_ini * I")
    g.add_argument("--eps", type=common.NONNEGATIVE, help="eps inside the log-dets")
    g.add_argument("--center-with", choices=("updated", "previous"),
                   help="centre with the updated running mean (official) or the previous one")
    g.add_argument("--no-normalize", dest="normalize", action="store_false", default=None,
                   help="do not L2-normalise the projector output")
    groups["network"].add_argument("--projector", type=common.WIDTHS, help="hidden-...-output widths")
    groups["network"].add_argument("--proj-bn", action=argparse.BooleanOptionalAction)
    g = groups["optimisation"]
    g.add_argument("--lr", type=common.POSITIVE, help="base learning rate (no batch/256 scaling)")
    g.add_argument("--min-lr", type=common.NONNEGATIVE)
    g.add_argument("--lr-per-step", action=argparse.BooleanOptionalAction,
                   help="smooth per-step schedule instead of CorInfoMax's per-epoch one")
    return common.resolve(p, argv, DEFAULTS, PRESETS)


# ============================================================================================
# Loss
# ============================================================================================
# The unit to copy: this section, whole, below the line `import functools, math, torch, torch.distributed
# as dist, torch.nn as nn, torch.nn.functional as F` (a test runs it so, alone). In a multi-GPU run, pass the globally
# gathered z1, z2 (all_gather with gradient); every rank then holds identical state.

def logdet_pd(A):
    """log det A of symmetric positive-definite matrices (..., D, D), by Cholesky A = L L^T:
    2 sum_i log L_ii (cheaper than torch.logdet's LU). cholesky_ex leaves the error check to us,
    so the host never waits for the GPU: a matrix that is not positive definite gives NaN, which
    the training loop reports."""
    L, info = torch.linalg.cholesky_ex(A)
    return torch.where(info == 0, 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1), torch.nan)


def cov(x, mean, unbiased=False):
    """Covariance of the rows of x about `mean`, divided by N (or N - 1), in float64."""
    c = x.double() - mean
    return c.T @ c / (len(x) - 1 if unbiased else len(x))


class CorInfoMaxLoss(nn.Module):
    """CorInfoMax loss with running float64 covariance/mean estimates (official code form).

    forward(z1, z2) takes the two views' L2-normalised embeddings (N, D), advances the running
    state once and returns (loss, logs). Call it exactly once per training step: every call,
    also under no_grad, advances R1, R2, mu1, mu2.
    """

    def __init__(self, dim, alpha=250.0, la_R=0.01, la_mu=0.01, R_ini=1.0, eps=1e-8, center_with="updated"):
        super().__init__()
        if center_with not in ("updated", "previous"):
            raise ValueError("center_with must be 'updated' or 'previous'")
        self.dim, self.alpha, self.la_R, self.la_mu, self.center_with = dim, alpha, la_R, la_mu, center_with
        self.eps = eps
        eye = torch.eye(dim, dtype=torch.float64)
        # Two independent estimators, one per view; float64 because with N < D the running
        # covariance is kept positive definite only by la_R * R_prev + eps and becomes badly
        # conditioned.
        self.register_buffer("R1", R_ini * eye)
        self.register_buffer("R2", R_ini * eye)
        self.register_buffer("mu1", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("mu2", torch.zeros(dim, dtype=torch.float64))

    def _branch(self, z, R, mu):
        """One view: steps 1-4. Returns R' (with gradient) and the new mean."""
        mu_new = self.la_mu * mu + (1 - self.la_mu) * z.mean(0)          # 1. float64 by promotion
        C = cov(z, mu_new if self.center_with == "updated" else mu)       # 2-3. not exactly zero-mean
        R_new = self.la_R * R + (1 - self.la_R) * C                       # 4. gradient only via C
        return R_new, mu_new.detach()

    def forward(self, z1, z2):
        if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[1] != self.dim:
            raise ValueError(f"z1, z2 must have shape (N, {self.dim}), got {tuple(z1.shape)}, {tuple(z2.shape)}")
        R1, self.mu1 = self._branch(z1, self.R1, self.mu1)
        R2, self.mu2 = self._branch(z2, self.R2, self.mu2)
        self.R1, self.R2 = R1.detach(), R2.detach()                       # 6. state, no gradient
        eps_I = self.eps * torch.eye(self.dim, dtype=R1.dtype, device=R1.device)
        logdet1, logdet2 = logdet_pd(torch.stack([R1, R2]) + eps_I)       # 5. one batched factorisation
        cov_loss = -(logdet1 + logdet2) / self.dim                        # 5. divided once by D
        sim_loss = (z1 - z2).pow(2).mean()                                # 7. mean over N*D entries
        loss = self.alpha * sim_loss + cov_loss                           # 8. beta = 1
        # Logs stay on the device: reading them is a host sync, left to the caller.
        return loss, {"loss": loss.detach(), "cov_loss": cov_loss.detach(), "sim_loss": sim_loss.detach(),
                      "logdet1": logdet1.detach(), "logdet2": logdet2.detach()}



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


def make_projector(in_dim, widths, bn):
    """Linear(+bias) -> [BN] -> ReLU for each hidden width, then Linear without bias."""
    dims = [in_dim] + [int(w) for w in widths.split("-")]
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if bn else []) + [nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


class Model(nn.Module):
    """Backbone + projector + L2 normalisation; both views share it (no predictor, no EMA)."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone, feat_dim = make_backbone(cfg.arch, cfg.stem)
        self.projector = make_projector(feat_dim, cfg.projector, cfg.proj_bn)
        self.normalize = cfg.normalize

    def forward(self, x):   # the last Linear and the normalisation in float32, whatever the autocast
        return common.float32_head(self.projector, self.backbone(x), 1e-12 if self.normalize else None)


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
    """The asymmetric two-view recipe (BYOL's): blur 1.0 / 0.1, solarize 0.0 / 0.2. Each view is
    a pair (geometric half for the loader, photometric half for the device)."""
    geometric = crop(cfg.image_size, (cfg.crop_min_scale, 1.0))
    return [(geometric, Photometric(cfg.norm, blur_p, solarize_p, 13, (0.1, cfg.blur_sigma)))
            for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2))]


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

def make_optimizer(model, cfg):
    """SGD, momentum 0.9, weight decay on every parameter (one group) [choice]."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)


def lr_at(cfg, epoch, frac=0.0):
    """Official schedule: linear warm-up from 3e-3 over W epochs, then cosine to min_lr.

    `epoch` is 0-based. The official schedule is constant within an epoch and reaches the base
    LR at epoch W - 1 (0-based). With --lr-per-step, the fraction `frac` of the epoch done counts
    too and the warm-up reaches the base LR at W.
    """
    k = epoch + (frac if cfg.lr_per_step else 0.0)
    W, E, base = cfg.warmup_epochs, cfg.epochs, cfg.lr
    if k < W:
        return 3e-3 + k * (base - 3e-3) / (W if cfg.lr_per_step else max(W - 1, 1))
    # k < E in training, so E - W > 0 here (0.5 in a one-epoch run with half an epoch of warm-up)
    return cfg.min_lr + (base - cfg.min_lr) * (1 + math.cos(math.pi * (k - W) / (E - W))) / 2


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
    """The training loss as configured (called once per run; the module holds the state)."""
    return CorInfoMaxLoss(common.out_dim(cfg), cfg.alpha, cfg.la_R, cfg.la_mu, cfg.R_ini, cfg.eps,
                          cfg.center_with)


def collapsed(logs, cfg):
    """Collapse shows in the log-dets: every direction of both views' covariances at the floor eps."""
    if max(logs["logdet1"], logs["logdet2"]) < common.out_dim(cfg) * math.log(2 * cfg.eps):
        return "log-dets at D log(eps)"


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
    batch. `views` holds the two augmented views (x1, x2) of this rank's images."""
    epoch, i = divmod(step, cfg.steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, epoch, i / cfg.steps_per_epoch)
    x1, x2 = views
    with common.autocast(cfg):
        z1, z2 = model(x1), model(x2)
    # The loss runs outside autocast: float32 embeddings meet the float64 state.
    z1, z2 = common.gather_with_grad(z1.float()), common.gather_with_grad(z2.float())
    loss, logs = criterion(z1, z2)   # not checked here: the loop reads the logs every few steps
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
    eig = torch.linalg.eigvalsh(criterion.R1)
    rec.update(R1_eig_min=eig[0].item(), R1_eig_max=eig[-1].item())
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
