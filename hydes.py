"""HyDeS: self-supervised learning by hyperspherical density shaping.

Paper    E. Rodriguez-Betancourt, E. Casasola-Murillo. "Self-Supervised Representation Learning via
         Hyperspherical Density Shaping", arXiv:2604.24498v1 (April 2026, preprint).
Official no code published. The authors' withdrawn predecessor (ICLR 2026 submission "Learning
         Coarse-Grained Representations: An Exploration of Mutual Information via Hyperspherical
         Density", OpenReview uq6nIOoPGG) had code as supplementary material, not available to us.
Spec     ../shared/specs/hydes.md (our reading of what was available).

WHAT WAS AVAILABLE, AND WHAT THAT MEANS FOR THIS FILE
    The paper's body (equations, tables, hyperparameters, training recipe) was NOT available: only
    its title, abstract, first introduction paragraphs and Figure 1 with half its caption. So:
    READ     (abstract, Figure 1) several augmented views through one shared encoder and projector
             onto the sphere S^(D-1); two von Mises-Fisher kernel-density entropies: a local one
             over the other views of the same image (minimised, weight -beta) and a global one
             over the batch (maximised, weight alpha); their weighted difference is I(Z1; Z2).
             (predecessor's abstract and reviews) alpha = beta = 1 by default, kappa a fixed
             bandwidth, "algebraically similar to InfoNCE".
    DERIVED  the exact estimators in log-sum-exp form, the vMF normaliser log C_D(kappa) (a
             float64 Bessel series), the identity with NT-Xent, the MI cap, the collapse value
             and the gradient (spec sections 3-4; each has a test).
    CHOSEN   everything else, each one flag away (spec section 9):
             1. the global density includes the self pair j = i, the literal reading of Figure 1
                (`--global-self exclude`: leave-one-out; with V = 2 that is exactly NT-Xent);
             2. the local density never includes the self pair (it would be almost gradient-free);
             3. the positives stay in the global density (`--global-positives exclude`);
             4. one pooled global density over all M = V N embeddings of the batch;
             5. L = beta H_local - alpha H_global, alpha = beta = 1 (`--alpha`, `--beta`);
             6. the constant (alpha - beta) log C_D(kappa) dropped from the loss, logged only;
             7. kappa fixed at 10 (`--kappa`);
             8. V = 2 global views (`--views V`), optional smaller local crops (`--local-crops K`);
             9. ResNet-18 for small images, ResNet-50 on ImageNet, projector 2048-2048-256 with
                BatchNorm (`--arch`, `--projector`);
            10. SimCLR-style optimisation (SGD + weight decay on CIFAR-size data, LARS on ImageNet;
                0.3 x B/256, 10 warm-up epochs, cosine to 0), BYOL/DINO augmentations;
            11. the global batch via gather with gradient: rows are this process's anchors,
                columns the gathered batch (section "Loss");
            12. the mean over anchors of per-anchor logs (Figure 1's E_B[-log(.)]);
            13. the CPU presets `synthetic` and `fashionmnist`: base LR 1.2 (x B/256), smaller
                projectors, no blur; the 16-pixel demo also `--crop-min-scale 0.3`;
            14. as in the other method files (corinfomax.py's header): GlobalBatchSampler data
                order and exact mid-epoch resume, the kNN monitor at k = 200, T = 0.1 (spec 7
                also names DINO's k = 20, T = 0.07), the cached-feature probe for short runs,
                the photometric augmentation batched on the training device.
             All of it is untuned; no HyDeS number has been published that we could read.

EQUATION MAP ([derived] from Figure 1 unless marked; s_ij = z_i . z_j)
    vMF kernel        K(z, z') = C_D(kappa) exp(kappa z.z'), C_D = kappa^(D/2-1) / ((2 pi)^(D/2) I_(D/2-1)(kappa))
    local density     p_loc(z_i)  = mean_{j in P(i)} K(z_i, z_j), P(i) = other views of i's image
    global density    p_glob(z_i) = mean_{j in A(i)} K(z_i, z_j), A(i) = the batch (with i: --global-self)
    entropies         H_local = mean_i -log p_loc(z_i),  H_global = mean_i -log p_glob(z_i)
    MI estimate       I = alpha H_global - beta H_local  (Figure 1's Sigma node)
    loss              L = mean_i [alpha LSE_A(kappa s_ij) - beta LSE_P(kappa s_ij)]
                          + beta log|P(i)| - alpha log|A(i)|   (= -I without (alpha-beta) log C_D)   hydes_loss
    normaliser        log C_D(kappa) by a float64 power series of I_nu                 log_vmf_normaliser
    NT-Xent identity  V = 2, alpha = beta = 1, leave-one-out: L = NT-Xent(tau = 1/kappa) - log(M - 1)
    MI cap            I <= log(|A(i)| / (V - 1)) for alpha = beta = 1

USAGE
    python hydes.py                                    # CPU demo on synthetic patterns, a few minutes
    python hydes.py --data fashionmnist --epochs 20    # Debian's dataset-fashion-mnist, or --data-dir
    python hydes.py --data cifar10 --data-dir data     # 1 GPU, our CIFAR-10 recipe
    python hydes.py --global-self exclude              # leave-one-out global density (NT-Xent at V = 2)
    python hydes.py --views 4 --local-crops 2          # more global views, two local crops
    python hydes.py --data imagenet --data-dir /ds/imagenet --gpus 8
    python hydes.py --benchmark --data cifar10         # step overhead, loss cost, data pipeline
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        hydes.py --data imagenet --data-dir /ds/imagenet     # two nodes
    Every run resumes automatically from --output-dir. `--help` lists every flag.

RESULTS (linear top-1 %; no HyDeS number has been published that we could read; none run on a GPU)
    CIFAR-10 / CIFAR-100 / STL-10 / ImageNet-1k: not run.
    Short CPU runs, cached-feature probe top-1 %, trained vs the same ResNet-18 at random init
    (2-core CPU; commands and budgets in README.md, "Results"; Fashion-MNIST at commit 6ad9f53,
    before the photometric augmentation moved to the device):
    synthetic demo (240 steps)                     53.1  vs 30.5
    Fashion-MNIST (250 steps, 28 px), self pair    86.31 vs 74.64
    Fashion-MNIST, --global-self exclude           87.27 vs 74.64
    One H100, bf16, Fashion-MNIST, 2 epochs of batch 256 (README.md, "Results"): trained 88.32,
    random init 74.54, raw pixels 82.16. Step overhead and throughput: README.md, "Performance".
"""
import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import common
from common import UsageError

PROG = "hydes.py"

# ============================================================================================
# Config
# ============================================================================================
# One preset per dataset (spec sections 5-7, all our choices, untuned). Every value can be
# overridden by the flag of the same name; flags are named after the paper's symbols.

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
COMMON = dict(kappa=10.0, alpha=1.0, beta=1.0, views=2, local_crops=0, optimizer="sgd", momentum=0.9,
              wd=1e-4, eta=1e-3, lr=0.3, warmup_epochs=10, crop_min_scale=0.2, blur_sigma=0.0,
              projector="2048-2048-256", stem="cifar", arch="resnet18", image_size=32,
              probe="linear", probe_epochs=100, probe_lr=0.2, probe_schedule="cosine",
              knn_every=10, baseline=False)
PRESETS = {
    "cifar10": dict(epochs=1000, batch_size=512, norm=((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))),
    "cifar100": dict(epochs=1000, batch_size=512, norm=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "stl10": dict(stem="imagenet", image_size=96, epochs=1000, batch_size=512, blur_sigma=2.0,
                  norm=IMAGENET_NORM),
    "imagenet": dict(arch="resnet50", stem="imagenet", image_size=224, epochs=100, batch_size=1024,
                     optimizer="lars", wd=1e-6, crop_min_scale=0.25, blur_sigma=2.0, knn_every=5,
                     norm=IMAGENET_NORM),
    # ---- small presets for CPU runs ----
    "fashionmnist": dict(image_size=28, epochs=20, batch_size=256, lr=1.2, warmup_epochs=2,
                         projector="1024-1024-128", probe="cached", knn_every=5, baseline=True,
                         norm=((0.286,) * 3, (0.353,) * 3)),
    "synthetic": dict(image_size=16, epochs=4, batch_size=64, lr=1.2, warmup_epochs=1, crop_min_scale=0.3,
                      projector="512-512-64", probe="cached", knn_every=0, baseline=True,
                      synthetic_train=3840, synthetic_test=1000, norm=((0.5,) * 3, (0.25,) * 3)),
}
OUR_PRESETS = tuple(PRESETS)     # no HyDeS recipe was available: every preset is ours


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description="HyDeS self-supervised pretraining "
                                "(arXiv:2604.24498). Preset values fill every flag left unset.")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help=f"preset name ({', '.join(PRESETS)}) or a folder with train/ and val/")
    g.add_argument("--data-dir", help="where the dataset lives (default: ./data; Fashion-MNIST: "
                   f"{common.FASHION_MNIST_SYSTEM_DIR})")
    g.add_argument("--preset", help="preset for a folder given as --data (default: imagenet)")
    g.add_argument("--download", action="store_true", help="download CIFAR/STL with torchvision first")
    g.add_argument("--workers", type=int, help="data-loader workers per process (default: the CPU cores "
                   "per process less one on CUDA, 0 on CPU)")
    g.add_argument("--synthetic-train", dest="synthetic_train", type=int, help="synthetic: training images")
    g.add_argument("--synthetic-test", dest="synthetic_test", type=int, help="synthetic: test images")
    g = p.add_argument_group("method (paper symbols)")
    g.add_argument("--kappa", type=float, help="vMF concentration (bandwidth), fixed; kappa = 1/tau")
    g.add_argument("--alpha", type=float, help="weight of the global entropy H_global")
    g.add_argument("--beta", type=float, help="weight of the local entropy H_local")
    g.add_argument("--global-self", dest="global_self", choices=("include", "exclude"), default="include",
                   help="the self pair j = i in the global density (exclude: leave-one-out)")
    g.add_argument("--global-positives", dest="global_positives", choices=("include", "exclude"),
                   default="include", help="the other views of the anchor's image in the global density")
    g.add_argument("--views", type=int, help="V, global views per image (>= 2)")
    g.add_argument("--local-crops", dest="local_crops", type=int, help="extra small crops per image")
    g.add_argument("--local-size", dest="local_size", type=int,
                   help="local crop size (default: 96 for 224-pixel presets, else half the image size)")
    g = p.add_argument_group("network")
    g.add_argument("--arch", choices=("resnet18", "resnet50"))
    g.add_argument("--stem", choices=("cifar", "imagenet"), help="3x3 stride-1 stem, no max-pool; or 7x7/2")
    g.add_argument("--projector", help="hidden-...-output widths, e.g. 2048-2048-256 (output: D)")
    g.add_argument("--image-size", dest="image_size", type=int)
    g.add_argument("--crop-min-scale", dest="crop_min_scale", type=float,
                   help="smallest RandomResizedCrop area of the global views")
    g.add_argument("--blur-sigma", dest="blur_sigma", type=float,
                   help="largest Gaussian-blur sigma in pixels (0: no blur, the small-image presets)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", dest="max_steps", type=int, help="stop after this many steps in all")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="global batch of images (all processes)")
    g.add_argument("--optimizer", choices=("sgd", "lars"))
    g.add_argument("--lr", type=float, help="base learning rate, multiplied by batch/256")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, help="linear warm-up from 0")
    g.add_argument("--wd", type=float, help="weight decay (not on biases and BatchNorm)")
    g.add_argument("--eta", type=float, help="LARS trust coefficient")
    g.add_argument("--momentum", type=float)
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), help="default: bf16 on CUDA, off on CPU")
    g = p.add_argument_group("evaluation")
    g.add_argument("--probe", choices=("linear", "cached", "none"),
                   help="linear: frozen-backbone linear probe; cached: fast cached-feature probe")
    g.add_argument("--probe-epochs", dest="probe_epochs", type=int)
    g.add_argument("--probe-lr", dest="probe_lr", type=float)
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction,
                   help="also probe the randomly initialised backbone")
    g.add_argument("--knn-every", dest="knn_every", type=int, help="kNN monitor every N epochs (0: off)")
    g.add_argument("--knn-bank", dest="knn_bank", type=int, default=20000,
                   help="at most this many training images in the kNN bank")
    g = p.add_argument_group("run")
    g.add_argument("--gpus", type=int, default=1, help="local processes to start (CPU: gloo processes)")
    g.add_argument("--cpu", action="store_true", help="do not use CUDA even if present")
    g.add_argument("--graph-loss", dest="graph_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="on one CUDA device, replay the loss and its gradient from CUDA graphs (README, "
                   "\"Performance\")")
    g.add_argument("--threads", type=int, help="torch CPU threads per process")
    g.add_argument("--output-dir", dest="output_dir", help="checkpoints, metrics.jsonl, backbone.pt")
    g.add_argument("--log-every", dest="log_every", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("benchmark (README, \"Performance\")")
    g.add_argument("--benchmark", action="store_true",
                   help="time the step, the loss and the data pipeline on random images; train nothing")
    g.add_argument("--bench-steps", dest="bench_steps", type=int,
                   help="timed training steps per variant, in blocks of 5 (default: 40 on CUDA, 15 on CPU)")
    g.add_argument("--bench-sizes", dest="bench_sizes", type=common.batch_sizes,
                   default="128,256,512,1024,2048,4096",
                   help="global batch sizes for the loss-alone timings")
    cfg = p.parse_args(argv)
    return resolve(cfg)


def resolve(cfg):
    """Fill unset flags from the preset; return the resolved config."""
    is_path = cfg.data not in PRESETS
    cfg.preset = cfg.preset or ("imagenet" if is_path else cfg.data)
    if cfg.preset not in PRESETS:
        raise UsageError(f"unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    if is_path:
        cfg.data_dir = cfg.data
    for k, v in {**COMMON, **PRESETS[cfg.preset]}.items():
        if getattr(cfg, k, None) is None:
            setattr(cfg, k, v)
    cfg.use_cuda = torch.cuda.is_available() and not cfg.cpu
    cfg.amp = cfg.amp or ("bf16" if cfg.use_cuda else "off")
    cfg.output_dir = cfg.output_dir or os.path.join("runs", f"{PROG.removesuffix('.py')}-{cfg.preset}")
    if cfg.gpus < 1 or cfg.batch_size % cfg.gpus:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split evenly across --gpus {cfg.gpus}")
    if cfg.use_cuda and cfg.gpus > torch.cuda.device_count():
        raise UsageError(f"--gpus {cfg.gpus} but only {torch.cuda.device_count()} CUDA devices")
    if cfg.views < 2 or cfg.local_crops < 0 or not cfg.kappa > 0:
        raise UsageError(f"need --views >= 2 (got {cfg.views}), --local-crops >= 0 (got {cfg.local_crops}) "
                         f"and --kappa > 0 (got {cfg.kappa})")
    cfg.local_size = cfg.local_size or (96 if cfg.image_size >= 224 else cfg.image_size // 2)
    return cfg


# ============================================================================================
# Loss
# ============================================================================================
# Self-contained: needs only torch (and math). `hydes_loss` is a pure function of the embeddings.
# In a multi-GPU run, pass the gathered views (all_gather with gradient) and this process's
# images as `anchors`: rows are the local anchors, columns the whole global batch (spec 3.5).

@functools.lru_cache   # a constant of the run: computed once, not at every step
def log_vmf_normaliser(D, kappa):
    """log C_D(kappa) of the vMF density on S^(D-1), in float64 (spec 3.4).

    C_D = kappa^nu / ((2 pi)^(D/2) I_nu(kappa)), nu = D/2 - 1, with
    log I_nu(kappa) = nu log(kappa/2) - lgamma(nu + 1) + log sum_m (kappa^2/4)^m / (m! (nu + 1)_m):
    the power series summed in log space stays finite for large D, where I_nu underflows.
    The terms peak near m = kappa/2 and then shrink faster than geometrically.
    """
    nu = torch.tensor(D / 2 - 1, dtype=torch.float64)
    k = torch.tensor(float(kappa), dtype=torch.float64)
    m = torch.arange(int(2 * kappa) + 400, dtype=torch.float64)
    log_terms = m * torch.log(k**2 / 4) - torch.lgamma(m + 1) - (torch.lgamma(nu + 1 + m) - torch.lgamma(nu + 1))
    log_bessel = nu * torch.log(k / 2) - torch.lgamma(nu + 1) + torch.logsumexp(log_terms, 0)
    return (nu * torch.log(k) - D / 2 * math.log(2 * math.pi) - log_bessel).item()


def hydes_loss(z, kappa=10.0, alpha=1.0, beta=1.0, global_self=True, global_positives=True, anchors=None):
    """HyDeS loss L = beta H_local - alpha H_global (spec 3.3) in log-sum-exp form.

    z: (V, N, D), view v of image n is z[v, n], L2-normalised rows; V >= 2. anchors: a slice of
    images whose views are the anchors (default: all); the loss is the mean over those anchors.
    Returns (loss, logs). The loss keeps the log-count terms and drops the constant
    (alpha - beta) log C_D(kappa), so it equals -I exactly when alpha = beta. logs (detached):
    "loss", "h_local", "h_global", "mi" with C_D included, and "w_self", the mean softmax weight
    of the self pair in the global density (0 when it is excluded).
    """
    V, N, D = z.shape
    if V < 2:
        raise ValueError(f"z must have shape (V, N, D) with V >= 2 views, got {tuple(z.shape)}")
    images = torch.arange(N, device=z.device)[anchors if anchors is not None else slice(None)]
    columns = z.reshape(V * N, D)                          # column j = v N + n shows image n
    rows = z[:, images].reshape(-1, D)                     # row i = v N_a + a shows images[a]
    logits = kappa * rows @ columns.T                      # kappa s_ij
    row_image = images.repeat(V)
    col_image = torch.arange(N, device=z.device).repeat(V)
    self_col = (torch.arange(V, device=z.device)[:, None] * N + images[None, :]).reshape(-1)
    # Masks come from comparing index vectors: a scatter into a mask or a boolean-mask read would
    # make the host wait for the GPU (a sync every step).
    is_self = torch.arange(V * N, device=z.device)[None, :] == self_col[:, None]
    same = row_image[:, None] == col_image[None, :]
    local_mask = same & ~is_self                           # P(i): the other views of the image
    global_mask = torch.ones_like(same) if global_positives else ~same
    global_mask = global_mask | is_self if global_self else global_mask & ~is_self
    lse_local = logits.masked_fill(~local_mask, -math.inf).logsumexp(1)
    lse_global = logits.masked_fill(~global_mask, -math.inf).logsumexp(1)
    n_local, n_global = (m.sum(1).to(logits.dtype) for m in (local_mask, global_mask))  # |P(i)|, |A(i)|
    # -log p(z_i) = -log C_D + log|S(i)| - LSE_S(i)(kappa s_ij), S = P or A (spec 3.3)
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
    """The training loss: `hydes_loss` on the gathered views with this process's images as anchors.

    forward(z) takes (V, N, D) gathered in rank order and returns (loss over the local anchors,
    logs averaged over processes). The processes' losses average to the global-batch loss, and so
    do their gradients after DDP's averaging (common.gather_with_grad sums the column gradients).
    """

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


def make_criterion(cfg):
    """The training loss as configured (called once per run; the module holds no state)."""
    return HyDeSLoss(cfg.kappa, cfg.alpha, cfg.beta, cfg.global_self == "include",
                     cfg.global_positives == "include")


def loss_variants(cfg):
    """The loss paths --benchmark times alone at several batch sizes (JSON key -> criterion)."""
    return {"loss_ms": make_criterion(cfg)}


# ============================================================================================
# Networks
# ============================================================================================

def make_backbone(arch, stem):
    """torchvision ResNet with zero-init residuals and fc removed; returns (net, feature dim).

    The CIFAR stem (3x3 stride-1 conv1, no max-pool) keeps small images from being downsampled
    4x before the first block. The state dict keeps torchvision's key names (minus fc).
    """
    net = getattr(torchvision.models, arch)(zero_init_residual=True)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def make_projector(in_dim, widths):
    """Linear(+bias) -> BN -> ReLU for each hidden width, then Linear without bias (spec 5)."""
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

    def forward(self, x):
        return F.normalize(self.projector(self.backbone(x)), dim=1, eps=1e-12)


# ============================================================================================
# Augmentation
# ============================================================================================
# A pretraining view is made in two halves. The geometric half (RandomResizedCrop, flip) runs per
# image in the loader's workers, with torchvision. The photometric half (colour jitter, grayscale,
# blur, solarize, normalise) runs on the whole batch on the training device: per image it is the
# random recipe of torchvision's v2 transforms, with torchvision's formulas, but in the workers it
# made a GPU wait for data most of the time (README, "Performance"). It works on float images in
# [0, 1]: torchvision on uint8 images rounds to 8 bits after every op, this code does not. The
# solarize threshold is 128/255, i.e. 128 of 255 as in the official PIL pipelines.

def normalize(cfg):
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(*cfg.norm)]


def crop(size, scale):
    """The geometric half of a pretraining view, on one image: bicubic RandomResizedCrop + flip, uint8 out."""
    return v2.Compose([v2.ToImage(),
                       v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC,
                                            antialias=True),
                       v2.RandomHorizontalFlip(p=0.5)])


LUMA = (0.2989, 0.587, 0.114)   # torchvision's rgb_to_grayscale weights


def grayscale(x):
    """Luma of a batch of RGB images (B, 3, H, W) -> (B, 1, H, W). The weights stay Python numbers:
    a tensor made from them would be copied to the GPU at every call, and such a copy waits for it."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b)[:, None]


def blend(x, y, f):
    """f x + (1 - f) y clamped to [0, 1], one factor f per image (torchvision's _blend)."""
    f = f[:, None, None, None]
    return (f * x + (1 - f) * y).clamp(0, 1)


def brightness(x, f):
    return blend(x, torch.zeros_like(x), f)


def contrast(x, f):
    """Blend with the image's mean luma."""
    return blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f)


def saturation(x, f):
    """Blend with the image's own luma."""
    return blend(x, grayscale(x), f)


def hue(x, f):
    """Turn the HSV hue of image b by f[b] (a fraction of a full turn), keeping S and V.

    h comes from the channel that holds V = max (R before G before B, as torchvision); back to
    RGB by V - C clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6 with n = 5, 3, 1 for R, G, B and
    the chroma C = max - min: the closed form of torchvision's six-sector table.
    """
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    c_safe = torch.where(c > 0, c, 1.0)   # grey pixels (C = 0): any h will do, they stay grey
    h = torch.where(v == r, (g - b) / c_safe, torch.where(v == g, 2 + (b - r) / c_safe, 4 + (r - g) / c_safe))
    h = (h / 6 + f[:, None, None]) % 1
    k = torch.stack([(n + 6 * h) % 6 for n in (5, 3, 1)], 1)
    return v[:, None] - c[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def gaussian_blur(x, sigma, taps):
    """Blur image b with its own sigma[b]: torchvision's kernel, `taps` samples of exp(-t^2 / 2 sigma^2)
    at t = -(taps - 1)/2 ... (taps - 1)/2 normalised to sum 1, applied along W then H (separable),
    with reflect padding. One depthwise convolution for the whole batch."""
    B, C, H, W = x.shape
    t = torch.arange(taps, device=x.device, dtype=x.dtype) - (taps - 1) / 2
    kernel = torch.softmax(-(t / sigma[:, None]) ** 2 / 2, dim=1).repeat_interleave(C, 0)   # (B C, taps)
    y = F.pad(x.reshape(1, B * C, H, W), (taps // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=B * C)
    return F.conv2d(y, kernel[:, None, :, None], groups=B * C).reshape(B, C, H, W)


def solarize(x):
    return torch.where(x >= 128 / 255, 1 - x, x)


def apply_to(x, chosen, op, *per_image):
    """x with op applied to the images in `chosen` (a CPU mask), op getting those images' rows of
    each per-image tensor. The mask is known on the host, so the images are picked by index with
    no device sync, and op runs only on the images that drew it."""
    index = chosen.nonzero().squeeze(1)
    if len(index) == 0:
        return x
    args = [a[index].to(x.device, non_blocking=True) for a in per_image]
    if len(index) == len(x):
        return op(x, *args)
    index = index.to(x.device, non_blocking=True)
    return x.index_copy(0, index, op(x.index_select(0, index), *args))


class Photometric:
    """The photometric half of a pretraining view, on a batch: per image, torchvision's
    RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8) (its four ops in a random order),
    RandomGrayscale(p=0.2), RandomApply([GaussianBlur(taps, sigma range)], p=blur_p),
    RandomSolarize(128/255, p=solarize_p), then Normalize(mean, std).

    draw(n, generator) makes the random choices of n images on the CPU; calling the object with a
    uint8 batch (B, 3, H, W) on any device and B images' draws returns the normalised float views.
    """

    JITTER = (brightness, contrast, saturation, hue)
    STRENGTH = (0.4, 0.4, 0.2, 0.1)   # factors uniform in [1 - s, 1 + s]; hue in [-0.1, 0.1]

    def __init__(self, norm, blur_p, solarize_p, taps, sigma):
        self.mean, self.std = (torch.tensor(v)[:, None, None] for v in norm)
        self.blur_p, self.solarize_p, self.taps, self.sigma = blur_p, solarize_p, taps, sigma

    def draw(self, n, generator):
        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)
        b, c, s, h = self.STRENGTH
        return {"jitter": uniform(0, 1) < 0.8,
                "order": uniform(0, 1, 4).argsort(1),      # a uniformly random permutation per image
                "factors": uniform(torch.tensor([1 - b, 1 - c, 1 - s, -h]),
                                   torch.tensor([1 + b, 1 + c, 1 + s, h]), 4),
                "gray": uniform(0, 1) < 0.2,
                "blur": uniform(0, 1) < self.blur_p,
                "sigma": uniform(*self.sigma),
                "solarize": uniform(0, 1) < self.solarize_p}

    def __call__(self, x, p):
        x = x.float() / 255
        for position in range(4):
            for k, op in enumerate(self.JITTER):
                x = apply_to(x, p["jitter"] & (p["order"][:, position] == k), op, p["factors"][:, k])
        x = apply_to(x, p["gray"], lambda y: grayscale(y).expand(-1, 3, -1, -1))
        if self.taps > 1:
            x = apply_to(x, p["blur"], lambda y, sigma: gaussian_blur(y, sigma, self.taps), p["sigma"])
        x = apply_to(x, p["solarize"], solarize)
        if self.mean.device != x.device:   # copied to the device once, not at every call
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std


def pretrain_views(cfg):
    """V global views alternating BYOL's two recipes (blur 1.0 / 0.1, solarize 0.0 / 0.2), then
    --local-crops small crops (area 0.05-0.25, blur 0.5), spec 6. Each view is a pair (geometric
    half for the loader, photometric half for the device). A 13-tap blur covers +-3 sigma for
    sigma up to 2; the small-image presets have no blur (--blur-sigma 0)."""
    def view(size, scale, blur_p, solarize_p):
        blur_p = blur_p if cfg.blur_sigma > 0 else 0.0
        return crop(size, scale), Photometric(cfg.norm, blur_p, solarize_p, 13, (0.1, cfg.blur_sigma))
    recipes = [view(cfg.image_size, (cfg.crop_min_scale, 1.0), 1.0, 0.0),
               view(cfg.image_size, (cfg.crop_min_scale, 1.0), 0.1, 0.2)]
    local = view(cfg.local_size, (0.05, 0.25), 0.5, 0.0)
    return [recipes[v % 2] for v in range(cfg.views)] + [local] * cfg.local_crops


def probe_train_view(cfg):
    """Linear-probe training augmentation (spec 7): RandomResizedCrop + flip."""
    return v2.Compose([v2.ToImage(),
                       v2.RandomResizedCrop(cfg.image_size, scale=(0.08, 1.0),
                                            interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.RandomHorizontalFlip(p=0.5), *normalize(cfg)])


def test_view(cfg):
    """Evaluation: Resize(size * 8/7, bicubic) + CenterCrop(size) (256 -> 224 on ImageNet)."""
    return v2.Compose([v2.ToImage(),
                       v2.Resize(int(cfg.image_size * 8 / 7), interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True),
                       v2.CenterCrop(cfg.image_size), *normalize(cfg)])

# ============================================================================================
# Data
# ============================================================================================

class TensorImages(torch.utils.data.Dataset):
    """In-memory uint8 images (N, C, H, W) with labels; grey images are repeated to 3 channels."""

    def __init__(self, images, labels):
        self.images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        self.targets = labels

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


class Views(torch.utils.data.Dataset):
    """Applies each transform to an image; items are (index, seed) pairs from the sampler.

    The seed fixes the augmentation of this item (a forked RNG, so the global one is untouched):
    the same step gets the same views whatever the number of workers, and a resumed run
    continues with exactly the views the uninterrupted run would have drawn.
    """

    def __init__(self, base, transforms):
        self.base, self.transforms = base, transforms

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        index, seed = item
        image, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return [t(image) for t in self.transforms], label


def load_datasets(cfg):
    """(pretraining set, probe training set, test set, number of classes) for cfg.data."""
    name = cfg.data if cfg.data in PRESETS else "folder"
    if cfg.download and name in ("cifar10", "cifar100", "stl10"):
        common.download(name, cfg.data_dir or "data")
    try:
        return read_dataset(name, cfg)
    except UsageError as e:
        hint = {"fashionmnist": "pass --data-dir DIR with its idx .gz files, or apt-get install "
                                "dataset-fashion-mnist",
                "folder": "pass --data-dir DIR holding train/ and val/ class folders"}
        raise UsageError(f"{e}; {hint.get(name, 'pass --data-dir DIR or --download')}") from None


def read_dataset(name, cfg):
    if name == "synthetic":
        train, test = (TensorImages(*common.make_synthetic(n, cfg.image_size, seed=cfg.seed + i))
                       for i, n in enumerate((cfg.synthetic_train, cfg.synthetic_test)))
        return train, train, test, len(common.SYNTHETIC_CLASSES)
    if name == "fashionmnist":
        root = cfg.data_dir or common.FASHION_MNIST_SYSTEM_DIR
        train, test = (TensorImages(*common.read_fashion_mnist(root, t)) for t in (True, False))
        return train, train, test, 10
    root = cfg.data_dir or "data"
    if name in ("cifar10", "cifar100"):
        classes = int(name[5:])
        train, test = (TensorImages(*common.read_cifar(root, classes, t)) for t in (True, False))
        return train, train, test, classes
    if name == "stl10":   # pretraining on train + unlabeled, probing on train
        labelled, test, unlabelled = (TensorImages(*common.read_stl10(root, s))
                                      for s in ("train", "test", "unlabeled"))
        return torch.utils.data.ConcatDataset([labelled, unlabelled]), labelled, test, 10
    folders = [common.need(os.path.join(root, s), f"image folder '{s}/'") for s in ("train", "val")]
    train, test = (torchvision.datasets.ImageFolder(f) for f in folders)
    return train, train, test, len(train.classes)


def make_loader(dataset, batch_sampler, cfg):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=cfg.workers,
                                       pin_memory=cfg.use_cuda, persistent_workers=cfg.workers > 0)


def eval_loader(base, transform, cfg, d, batch=256):
    """This rank's contiguous shard of `base`, in order, with a fixed transform."""
    idx = list(common.shard(len(base), d.rank, d.world))
    batches = [[(i, 0) for i in idx[j:j + batch]] for j in range(0, len(idx), batch)]
    return make_loader(Views(base, [transform]), batches, cfg)


# ============================================================================================
# Optimisation
# ============================================================================================

class LARS(torch.optim.Optimizer):
    """BYOL's LARS. For a parameter p of a group with lars=True and gradient g:
    u = g + wd p; u <- u eta ||p|| / ||u|| (ratio 1 when either norm is 0); mu <- m mu + u;
    p <- p - lr mu. Groups with lars=False (biases, BatchNorm) skip weight decay and the ratio.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if group["lars"]:
                    u = u.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                    # torch.where, not `if`: no device-to-host sync per parameter.
                    u = u * torch.where((p_norm > 0) & (u_norm > 0), group["eta"] * p_norm / u_norm, 1.0)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                state["momentum_buffer"].mul_(group["momentum"]).add_(u)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def make_optimizer(model, cfg):
    """SGD with momentum, or LARS (ImageNet preset); biases and BatchNorm parameters (the 1-D
    ones) get no weight decay (and no LARS trust ratio), spec 6."""
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


def autocast(cfg):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp, torch.float32)
    return torch.autocast("cuda" if cfg.use_cuda else "cpu", dtype=dtype, enabled=cfg.amp != "off")


# ============================================================================================
# Evaluation
# ============================================================================================

@torch.no_grad()
def extract(backbone, base, transform, cfg, d):
    """Backbone features (eval mode) and labels of the whole of `base`, on every rank."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for (x,), y in eval_loader(base, transform, cfg, d):
        with autocast(cfg):
            feats.append(backbone(to_device(x, cfg, d)).float())
        labels.append(y.to(d.device))
    backbone.train(was_training)
    feats = torch.cat(feats) if feats else torch.empty(0, 0, device=d.device)
    return (common.gather_shards(feats, len(base)),
            common.gather_shards(torch.cat(labels) if labels else torch.empty(0, device=d.device), len(base)))


def topk(logits, y, ks=(1, 5)):
    """Top-k accuracies in % (k larger than the number of classes is skipped)."""
    pred = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = pred == y[:, None]
    return {f"top{k}": 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks if k < logits.shape[1]}


def knn_accuracy(train_f, train_y, test_f, test_y, classes, k=200, T=0.1):
    """Weighted kNN monitor on cosine similarity (k = 200, temperature 0.1, InstDisc-style)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    scores = []
    for chunk in test_f.split(1024):
        sim, idx = (chunk @ train_f.T).topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(chunk), classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_y[idx], (sim / T).exp()))
    return topk(torch.cat(scores), test_y)


def cached_probe(train_f, train_y, test_f, test_y, classes, cfg):
    """Fast probe for short runs: standardised cached features, linear head, SGD + cosine.

    Not the paper protocol (no augmentation); identical on every rank (same seed, same data).
    """
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    head = nn.Linear(train_f.shape[1], classes).to(train_f.device)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.probe_epochs)
    for _ in range(cfg.probe_epochs):
        for idx in torch.randperm(len(train_f), generator=g).to(train_f.device).split(256):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(train_f[idx]), train_y[idx]).backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return topk(head(test_f), test_y)


def linear_probe(backbone, probe_set, test_set, classes, cfg, d, log):
    """The paper protocol (spec 7): frozen backbone in eval mode, Linear head on pooled features,
    SGD m 0.9 wd 0, RandomResizedCrop + flip; cosine to lr/100 or x0.1 every 20 epochs (ImageNet).
    Returns the last epoch's accuracies and the best top-1."""
    backbone.eval()
    head = nn.Linear(feature_dim(backbone, cfg, d), classes).to(d.device)
    head_ddp = nn.parallel.DistributedDataParallel(head) if d.world > 1 else head
    opt = torch.optim.SGD(head.parameters(), lr=cfg.probe_lr, momentum=0.9, weight_decay=0.0)
    if cfg.probe_schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.1)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.probe_epochs, eta_min=cfg.probe_lr / 100)
    batch = min(256, len(probe_set) // d.world * d.world)
    sampler = common.GlobalBatchSampler(len(probe_set), batch, d.rank, d.world, seed=cfg.seed + 1)
    loader = make_loader(Views(probe_set, [probe_train_view(cfg)]), sampler, cfg)
    best, acc = 0.0, {}
    for epoch in range(cfg.probe_epochs):
        sampler.set_epoch(epoch)
        for (x,), y in loader:
            with torch.no_grad(), autocast(cfg):
                f = backbone(to_device(x, cfg, d)).float()
            loss = F.cross_entropy(head_ddp(f), y.to(d.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        test_f, test_y = extract(backbone, test_set, test_view(cfg), cfg, d)
        with torch.no_grad():
            acc = topk(head(test_f), test_y)
        best = max(best, acc["top1"])
        log.print(f"  probe epoch {epoch + 1}/{cfg.probe_epochs}  top1 {acc['top1']:.2f}  best {best:.2f}")
    return {**acc, "best_top1": best}


@torch.no_grad()
def feature_dim(backbone, cfg, d):
    return backbone(torch.zeros(2, 3, cfg.image_size, cfg.image_size, device=d.device)).shape[1]


def evaluate(backbone, data, cfg, d, log, kind):
    """Probe accuracy of `backbone` with the configured protocol."""
    _, probe_set, test_set, classes = data
    if kind == "linear":
        return linear_probe(backbone, probe_set, test_set, classes, cfg, d, log)
    train_f, train_y = extract(backbone, probe_set, test_view(cfg), cfg, d)
    test_f, test_y = extract(backbone, test_set, test_view(cfg), cfg, d)
    if kind == "knn":
        bank = torch.randperm(len(train_f), generator=torch.Generator().manual_seed(0))[:cfg.knn_bank]
        return knn_accuracy(train_f[bank.to(d.device)], train_y[bank.to(d.device)], test_f, test_y, classes)
    return cached_probe(train_f, train_y, test_f, test_y, classes, cfg)


# ============================================================================================
# Training
# ============================================================================================

def to_device(x, cfg, d):
    x = x.to(d.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if cfg.use_cuda else x


def augment(photometric, crops, step, cfg, d):
    """The photometric half of each view (Augmentation) for this process's uint8 crops, on the
    device. The random choices are drawn for the whole global batch from a generator seeded by
    (seed, step, view) and each process takes its own rows: a step's views do not depend on the
    number of processes, and a resumed run draws what the uninterrupted one would have."""
    views = []
    for v, (p, x) in enumerate(zip(photometric, crops)):
        draw = p.draw(cfg.batch_size, torch.Generator().manual_seed((cfg.seed * 2**40 + step * 2**8 + v) % 2**63))
        rows = slice(d.rank * len(x), (d.rank + 1) * len(x))
        views.append(to_device(p(x.to(d.device, non_blocking=True), {k: t[rows] for k, t in draw.items()}), cfg, d))
    return views


def build(cfg, d):
    """Model, loss, optimiser and AMP scaler, freshly initialised from cfg.seed."""
    torch.manual_seed(cfg.seed)
    model = Model(cfg).to(d.device)
    if cfg.use_cuda:
        model = model.to(memory_format=torch.channels_last)
        if d.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    criterion = make_criterion(cfg).to(d.device)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(enabled=cfg.amp == "fp16")
    return model, criterion, optimizer, scaler


def graph_loss(criterion, cfg, d):
    """The loss as train_step calls it: the criterion itself or, with --graph-loss on one CUDA
    device, its forward and backward replayed from CUDA graphs captured at the first call.

    Why: with small images a GPU step is bound by the host's kernel launches, not by the GPU (an
    H100 at the CIFAR preset runs a step's kernels in 19 ms while its host takes 25-33 ms to launch
    them), so the loss's hundred small kernels add their launch time, 2.5-5 ms, to every step; a
    replay launched behind a busy GPU, as in training, costs under 1 ms (README, "Performance"). It
    runs the same kernels on the same numbers. Capturing needs fixed shapes, no host sync and state
    written in place; it calls the loss a few times first, so the state is saved before and put
    back after. Multi-process runs stay eager (a collective inside a captured loss is untested: the
    project's device machine has one GPU).
    """
    if not (cfg.graph_loss and cfg.use_cuda and d.world == 1):
        return criterion
    graphed, keys = None, []

    def flat(*z):   # make_graphed_callables wants tensors out: the logs go as one stacked tensor
        loss, logs = criterion(*z)
        keys[:] = logs
        return loss, torch.stack(list(logs.values()))

    def loss_fn(*z):
        nonlocal graphed
        if graphed is None:
            state = {k: v.clone() for k, v in criterion.state_dict().items()}
            samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in z)
            # Its warm-up calls run on a side stream, which the autograd engine warns about; expected here.
            torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
            try:
                graphed = torch.cuda.make_graphed_callables(flat, samples)
            except RuntimeError as e:
                reason = str(e).partition("\n")[0]   # CUDA errors run over several lines
                raise UsageError(f"capturing the loss in a CUDA graph failed ({reason}); rerun with "
                                 "--no-graph-loss") from None
            finally:   # whether or not the capture worked: the warning and the loss's state as before
                torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(True)
                criterion.load_state_dict(state)
        loss, values = graphed(*z)
        return loss, dict(zip(keys, values.clone().unbind()))   # a copy: the next replay overwrites them
    return loss_fn


def train_step(model, criterion, optimizer, scaler, views, step, cfg):
    """Step `step` (0-based) on this rank's share of the global batch; the loss sees the gathered
    batch. `views` holds the V global views and the local crops of this rank's images."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    with autocast(cfg):
        z = [model(x) for x in views]      # one pass per view: crops of different sizes
    # The loss runs outside autocast: float32 logits kappa z z^T (spec 3.5); (V, N, D) global batch.
    z = torch.stack([common.gather_with_grad(v.float()) for v in z])
    # No finiteness check here: reading the loss would wait for the GPU every step. The training
    # loop reads the logs every few steps and before saving (read_logs).
    loss, logs = criterion(z)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logs


def checkpoint_state(model, criterion, optimizer, scaler, step, cfg):
    return {"model": model.state_dict(), "criterion": criterion.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
            "rng": torch.get_rng_state(), "batch_size": cfg.batch_size, "preset": cfg.preset}


def restore(ckpt, model, criterion, optimizer, scaler, cfg, path):
    if (ckpt.get("batch_size"), ckpt.get("preset")) != (cfg.batch_size, cfg.preset):
        raise UsageError(f"{path} was written with --batch-size {ckpt.get('batch_size')} and preset "
                         f"{ckpt.get('preset')}; resume with the same or choose another --output-dir")
    try:
        model.load_state_dict(ckpt["model"])
        criterion.load_state_dict(ckpt["criterion"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UsageError(f"{path} does not match this model ({type(e).__name__}); "
                         "choose another --output-dir") from None
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"]


def setup(cfg):
    """This process's place in the run; sets its CPU threads and, if unset, the loader workers."""
    d = common.Dist(cfg.use_cuda)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // d.local_world))
    if cfg.workers is None:   # on CPU, loader workers compete with the training threads for cores
        cfg.workers = max(1, (os.cpu_count() or 1) // d.local_world - 1) if cfg.use_cuda else 0
    return d


def train(cfg):
    """Pretrain, checkpoint, export the backbone and evaluate (runs in every process)."""
    d = setup(cfg)
    data = load_datasets(cfg)
    sampler = common.GlobalBatchSampler(len(data[0]), cfg.batch_size, d.rank, d.world, seed=cfg.seed)
    geometric, photometric = zip(*pretrain_views(cfg))
    loader = make_loader(Views(data[0], geometric), sampler, cfg)
    steps_per_epoch = cfg.steps_per_epoch = len(sampler)   # schedules in train_step need it
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    model, criterion, optimizer, scaler = build(cfg, d)
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    step = 0
    if os.path.exists(ckpt_path):   # before anything is written: a bad checkpoint loses nothing
        step = restore(common.load_checkpoint(ckpt_path), model, criterion, optimizer, scaler, cfg, ckpt_path)
    os.makedirs(cfg.output_dir, exist_ok=True)
    log = common.Logger(cfg.output_dir, d.is_main)
    log.record(event="start", argv=sys.argv, config=config_dict(cfg), versions=common.versions(),
               world_size=d.world, resumed_from_step=step)
    log.print(f"{PROG}: world size {d.world}, device {d.device}, {steps_per_epoch} steps/epoch, "
              f"{total} steps" + (f", resuming at step {step}" if step else ""))
    log.print("config: " + json.dumps(config_dict(cfg)))
    if cfg.preset in OUR_PRESETS:
        log.print(f"note: preset '{cfg.preset}' is the project's own (small, untuned), not the paper's")
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if cfg.use_cuda else None) \
        if d.world > 1 else model
    loss_fn = graph_loss(criterion, cfg, d)   # captured at the first step, after any restore
    model.train()
    t0, t_last, images, waited, pending = time.time(), time.time(), 0, 0.0, []
    while step < total:
        epoch, start = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, start)
        asked = time.time()
        for crops, _ in loader:
            waited += time.time() - asked   # time blocked on the loader: a data bottleneck shows here
            views = augment(photometric, crops, step, cfg, d)
            pending.append(train_step(ddp, loss_fn, optimizer, scaler, views, step, cfg))
            step, images = step + 1, images + cfg.batch_size
            if step % cfg.log_every == 0 or step == total:
                logs = read_logs(pending, step, ckpt_path)
                elapsed = time.time() - t_last
                rate, data_wait = images / elapsed, waited / elapsed
                parts = " ".join(f"{k} {v:.5g}" for k, v in logs.items())
                log.print(f"ep {epoch + 1}/{cfg.epochs} step {step}/{total} {parts} "
                          f"lr {optimizer.param_groups[0]['lr']:.4g} {rate:.1f} img/s data wait "
                          f"{100 * data_wait:.0f}% ETA {format_time((total - step) * cfg.batch_size / rate)}")
                log.record(event="train", epoch=epoch + 1, step=step, lr=optimizer.param_groups[0]["lr"],
                           img_per_s=rate, data_wait=data_wait, **logs)
                t_last, images, waited = time.time(), 0, 0.0
            if step == total:
                break
            asked = time.time()
        end_of_epoch = step % steps_per_epoch == 0
        read_logs(pending, step, ckpt_path)   # never a checkpoint of the weights a NaN step left
        if d.is_main:
            common.atomic_save(checkpoint_state(model, criterion, optimizer, scaler, step, cfg), ckpt_path)
        if end_of_epoch:
            monitor(model, criterion, data, cfg, d, log, epoch + 1)
    log.print(f"pretraining done: {step} steps in {format_time(time.time() - t0)} this session")
    finish(model, data, cfg, d, log)
    d.close()


def read_logs(pending, step, ckpt_path):
    """The logs of the last step, reading those of every step since the last call (`pending`,
    device tensors; emptied) in one host sync. Raises at the first non-finite loss: its step and
    the ones after it have not been saved, so the last checkpoint is good."""
    if not pending:
        return {}
    rows = torch.stack([torch.stack(list(logs.values())) for logs in pending]).tolist()
    for k, row in enumerate(rows):
        loss = dict(zip(pending[k], row))["loss"]
        if not math.isfinite(loss):
            raise common.NonFiniteLoss(f"loss is {loss} at step {step - len(rows) + k + 1}; the last "
                                       f"good checkpoint {ckpt_path} is kept (try a lower --lr)")
    logs = dict(zip(pending[-1], rows[-1]))
    pending.clear()
    return logs


def monitor(model, criterion, data, cfg, d, log, epoch):
    """Per-epoch kNN monitor (the entropies and the MI of every step are in the training records)."""
    if not (cfg.knn_every and epoch % cfg.knn_every == 0):
        return
    rec = {f"knn_{k}": v for k, v in evaluate(model.backbone, data, cfg, d, log, "knn").items()}
    log.print(f"  epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in rec.items()))
    log.record(event="epoch", epoch=epoch, **rec)


def finish(model, data, cfg, d, log):
    """Export the backbone (loads into torchvision's ResNet minus fc) and run the final probe."""
    if d.is_main:
        common.atomic_save(model.backbone.state_dict(), os.path.join(cfg.output_dir, "backbone.pt"))
    if cfg.probe == "none":
        return
    label = {"linear": "linear probe (paper protocol)",
             "cached": "cached-feature probe (fast, no aug)"}[cfg.probe]
    results = {"trained": evaluate(model.backbone, data, cfg, d, log, cfg.probe)}
    if cfg.baseline:   # what the probe reaches without pretraining: random weights, raw pixels
        random_model, *_ = build(cfg, d)
        results["random_init"] = evaluate(random_model.backbone, data, cfg, d, log, cfg.probe)
        results["raw_pixels"] = evaluate(nn.Flatten(), data, cfg, d, log, cfg.probe)
    for name, acc in results.items():
        log.print(f"{label}, {name} backbone: " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    log.record(event="probe", protocol=cfg.probe, **results)


def config_dict(cfg):
    return {k: v for k, v in sorted(vars(cfg).items()) if isinstance(v, (int, float, str, bool, list, tuple))
            or v is None}


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---- --benchmark: what a step costs beyond the bare network (README, "Performance") ----------
# The same training step timed with the method's loss and with a trivial one, the loss alone at
# several global batch sizes, and the data pipeline. Random images of the preset's size stand in
# for the dataset (the augmentations' cost does not depend on what the pixels show); nothing is
# written to disk.

class TrivialLoss(nn.Module):
    """The bare network's loss: the mean of every embedding it is given. It keeps its inputs'
    shapes for the loss-alone timings."""

    def forward(self, *z):
        self.inputs = [(t.shape, t.requires_grad) for t in z]
        loss = sum(t.mean() for t in z)
        return loss, {"loss": loss.detach().double()}


def benchmark(cfg):
    """--benchmark: print a table of the figures, then the same figures as one JSON line."""
    if cfg.gpus != 1:
        raise UsageError("--benchmark times one process; leave --gpus at 1")
    d = setup(cfg)
    # Enough batches for a short run several times longer than the loader's prefetch queue (two
    # batches per worker), so that its data-wait share is not that of a queue filled at the start.
    # A GPU step takes milliseconds and the speed of the host that launches it drifts: more blocks
    # steady the median. On a CPU a step takes seconds.
    cfg.bench_steps = cfg.bench_steps or (40 if cfg.use_cuda else 15)
    n = cfg.batch_size * (cfg.bench_steps + 3 + 6 * cfg.workers)
    pixels = torch.randint(0, 256, (n, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(cfg.seed))
    geometric, photometric = zip(*pretrain_views(cfg))
    images = Views(TensorImages(pixels, torch.zeros(n, dtype=torch.long)), geometric)
    sampler = common.GlobalBatchSampler(n, cfg.batch_size, seed=cfg.seed)
    cfg.steps_per_epoch = len(sampler)
    model, criterion, optimizer, scaler = build(cfg, d)
    model.train()
    res = {"method": PROG.removesuffix(".py"), "preset": cfg.preset,
           "device": common.device_name(d.device), "threads": torch.get_num_threads(), "amp": cfg.amp,
           "batch_size": cfg.batch_size}
    crops, res["augment_img_per_s_per_worker"] = augment_one_batch(images, cfg)
    ms = [common.timed(lambda: augment(photometric, crops, 0, cfg, d), d.device) for _ in range(4)]
    res["device_augment_ms"] = 1000 * statistics.median(ms[1:])
    views = augment(photometric, crops, 0, cfg, d)
    trivial, loss_fn = TrivialLoss(), graph_loss(criterion, cfg, d)   # the loss as training runs it
    res["graph_loss"] = loss_fn is not criterion
    res.update(step_times(model, {"": loss_fn, "trivial_": trivial}, optimizer, scaler, views, cfg, d))
    res["step_overhead"] = res["step_ms"] / res["trivial_step_ms"]
    for key, variant in loss_variants(cfg).items():
        res[key] = loss_times(variant.to(d.device), trivial.inputs, cfg, d)
    loader = make_loader(images, sampler, cfg)
    res["workers"] = cfg.workers
    res["data_wait"] = measure_data_wait(model, loss_fn, optimizer, scaler, loader, photometric, cfg, d)
    print_benchmark(res)
    print(json.dumps(res), flush=True)


def augment_one_batch(images, cfg):
    """One batch of crops (the geometric halves) made as one loader worker makes them (one
    thread); and its images/s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    batch = torch.utils.data.default_collate([images[(i, i)] for i in range(cfg.batch_size)])
    rate = cfg.batch_size / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return batch[0], rate


def step_times(model, losses, optimizer, scaler, views, cfg, d, block=5):
    """ms per train_step with each loss of `losses` ({key prefix: loss}), and on CUDA the peak
    memory. Steps run back to back in blocks of `block`, as the training loop runs them: no host
    sync between steps, so the host queues the next step's kernels while the GPU runs this one's
    (timing each step alone would add the host's launch time to every step, which training never
    waits for). The losses take turns block by block, so that a drift of the machine's speed
    touches them alike. The median block over --bench-steps steps of each counts, after two
    warm-up steps of each (allocator, cuDNN's algorithm search)."""
    def run(loss_fn, first, n):
        for step in range(first, first + n):
            train_step(model, loss_fn, optimizer, scaler, views, step, cfg)
    cuda = d.device.type == "cuda"
    for loss_fn in losses.values():
        run(loss_fn, 0, 2)
    block = min(block, cfg.bench_steps)
    times, peak = {name: [] for name in losses}, dict.fromkeys(losses, 0)
    for first in range(2, 2 + cfg.bench_steps, block):
        for name, loss_fn in losses.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(d.device)
            times[name].append(common.timed(lambda: run(loss_fn, first, block), d.device) / block)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(d.device))
    res = {}
    for name, t in times.items():
        ms = 1000 * statistics.median(t)
        res.update({name + "step_ms": ms, name + "img_per_s": cfg.batch_size / ms * 1000})
        if cuda:
            res[name + "peak_gib"] = peak[name] / 2**30
    return res


def loss_times(loss_fn, inputs, cfg, d):
    """Forward + backward of the loss alone, {global batch N: median ms of 5 calls after one
    warm-up}, on random unit embeddings shaped like a step's with N rows. Stops growing N once a
    call takes over a second (the exact kernel paths are quadratic)."""
    res = {}
    for n in cfg.bench_sizes:
        z = [F.normalize(torch.randn(*shape[:-2], n, shape[-1], device=d.device), dim=-1)
             .requires_grad_(grad) for shape, grad in inputs]
        ms = 1000 * statistics.median([common.timed(lambda: loss_fn(*z)[0].backward(), d.device)
                                       for _ in range(6)][1:])
        res[n] = round(ms, 3)
        if ms > 1000:
            break
    return res


def measure_data_wait(model, loss_fn, optimizer, scaler, loader, photometric, cfg, d):
    """Share of wall time a short run (the loader with its workers, augment, train_step) spends
    blocked on the loader, from the second batch on (the first includes starting the workers)."""
    waited, asked = 0.0, time.perf_counter()
    for step, (crops, _) in enumerate(loader):
        if step == 1:
            waited, start = 0.0, asked
        waited += time.perf_counter() - asked
        train_step(model, loss_fn, optimizer, scaler, augment(photometric, crops, step, cfg, d), step, cfg)
        asked = time.perf_counter()
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)   # the clock stops when the queued steps are done
    return waited / (time.perf_counter() - start)


def print_benchmark(res):
    print(f"{PROG} --benchmark: preset {res['preset']}, batch {res['batch_size']}, {res['device']}, "
          f"{res['threads']} threads, amp {res['amp']}")
    for name, label in (("", "this loss"), ("trivial_", "trivial loss")):
        mem = f"  peak {res[name + 'peak_gib']:.2f} GiB" if name + "peak_gib" in res else ""
        print(f"  training step, {label:12s} {res[name + 'step_ms']:10.1f} ms "
              f"{res[name + 'img_per_s']:9.1f} img/s{mem}")
    print(f"  step overhead (this / trivial) {res['step_overhead']:8.3f}")
    for key in (k for k in res if k.startswith("loss_ms")):
        print(f"  {key} (loss alone, fwd + bwd, by global batch): "
              + "  ".join(f"{n}: {ms:.1f}" for n, ms in res[key].items()))
    print(f"  augmentation: crops {res['augment_img_per_s_per_worker']:.0f} images/s per worker (all views "
          f"of an image), photometric half {res['device_augment_ms']:.1f} ms per batch on the device; "
          f"waiting for data: {100 * res['data_wait']:.1f}% of a short run ({res['workers']} workers)")


# ============================================================================================
# Main
# ============================================================================================

def main(argv=None):
    cfg = parse_args(argv)
    if cfg.benchmark:
        benchmark(cfg)
    else:
        common.launch(train, cfg, cfg.gpus, PROG)


if __name__ == "__main__":
    common.run_cli(main, PROG)
