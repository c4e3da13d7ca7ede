"""SSL-HSIC: self-supervised learning by kernel dependence maximisation.

Paper    Yazhe Li, Roman Pogodin, Danica J. Sutherland, Arthur Gretton. "Self-Supervised Learning
         with Kernel Dependence Maximization", NeurIPS 2021, arXiv:2106.08320.
Official github.com/google-deepmind/ssl_hsic (JAX/Haiku), read at commit d7ea38d; it builds on
         DeepMind's BYOL code (deepmind-research/byol @ 2c7c401) for the networks, LARS, schedules
         and augmentations. Nothing here is copied from either.
Spec     ../shared/specs/ssl_hsic.md (our reading of the paper and the official code).

THE IDEA
    Let Z be the embedding of an augmented image and Y the identity of the image it came from.
    SSL-HSIC maximises the kernel dependence HSIC(Z, Y) between them: views of one image should be
    close under a kernel k, views of different images far apart. Alone that would let the network
    shrink everything onto a few points; the "kernelised variance" sqrt(HSIC(Z, Z)) regularises:
        L = -HSIC(Z, Y) + gamma * sqrt(HSIC(Z, Z)).
    k is the inverse multiquadric kernel with a scale c that is learned by its own objective. The
    training estimator uses random Fourier features, linear in the batch size. The networks are
    BYOL's: an online network with a predictor and a slowly moving (EMA) target network.

EQUATION MAP (official code names; the paper's full text was unavailable, spec sections 2-3)
    objective         L = gamma sqrt(hsic_zz) - hsic_zy, gamma = 3                   ssl_hsic_loss
    kernel (IMQ)      k(x, y) = c / sqrt(||x - y||^2 + c^2), c a stop-gradient scalar   imq_kernel
    HSIC(Z, Y)        hsic_zy = sum_ab same_ab K_ab / (N M (M-1)) - sum_ab K_ab / n^2   hsic_exact
                      (label kernel weight w = 1; self pairs a = b included, spec 3.3)
    HSIC(Z, Z)        hsic_zz = ||H K H||_F^2 / n^2 over all n = N M points (biased V-statistic)
    random features   phi(x) = sqrt(2/F) cos(x W^T / c + b), w = xi g, xi ~ N(0,1), g ~ N(0, I)   rff
    RFF estimators    hsic_zy = ||S||^2 / (N M (M-1)) - ||s||^2 / n^2,  hsic_zz = ||Phi_B^T H Phi_A||^2 / n^2
                      (draw A for hsic_zy and one factor of hsic_zz, independent draw B for the other)   hsic_rff
    kernel scale      maximise mean(log |dk/d d2|) over resampled pairs by Adam(3e-4)   SSLHSIC._update_scale
    target network    xi <- tau_k xi + (1 - tau_k) theta, tau_k = 1 - (1 - 0.99)(cos(pi k/K) + 1)/2   tau_at
    LARS              u = g + wd p; u <- u eta ||p|| / ||u||; mu <- 0.9 mu + u; p <- p - lr mu   LARS
    LR schedule       0.4 B/256, linear warm-up from 0 over 10 epochs, cosine to 0, per step   lr_at

DIFFERENCES FROM THE OFFICIAL CODE, AND OUR CHOICES (spec section 9; each one flag away)
    1. HSIC(Z, Y) scale: label weight 1 and no 1/N, as the code (the paper's gamma lives in this
       scale). No switch.
    2. Self pairs a = b are counted in hsic_zy with the M(M-1) divisor, as the code: this adds a
       constant 1/(M-1) to the value (no gradient in the exact estimator). `--zy-self-pairs exclude`.
    3. M = 4 loss views in the code's order: online predictions of views 1 and 2, stop-gradient
       target projections of views 2 and 1. `--no-target` (the paper's variant without target
       network; the code has none): M = 2 online projections, no predictor, no EMA target; this
       construction is ours and unverified against the paper.
    4. Learned kernel scale c (initial 1.0, its own Adam); `--fixed-scale` keeps c = `--sigma`.
       [choice] The pairs that train c are resampled with the same seed on every process, so c
       stays identical everywhere without a collective; the code averages per-device gradients.
       The code's unused EMA of c is not kept.
    5. Estimator: random Fourier features, F = 512 (`--num-features`); `--estimator exact` gives
       the O(n^2) kernel-matrix version (tests, small batches).
    6. RFF sampler: the exact Gaussian scale mixture w = xi g (the code tabulates the amplitude
       density on a grid, which shrinks k by about 1e-3) with phases drawn independently of the
       directions (the code draws both from one key). No switch.
    7. RFF draws across processes: each process draws its own features (as the code), seeded by
       (--seed, step, rank); `--rff-shared` uses one draw on every process.
    8. Target initialised from an independent RNG, as the code; `--target-init copy`.
    9. Evaluation and export use an EMA (0.999) of the online backbone, initialised to the online
       weights [choice], with the online BatchNorm statistics; `--eval-weights online`.
   10. The loss runs in float32 outside autocast; AMP bf16 on CUDA by default (`--amp`).
   11. No online linear probe inside the optimiser; a kNN monitor instead.
   12. [choice] The target's BatchNorm uses batch statistics (training mode), like the online one.
   13. [choice] Linear probe: the project's shared protocol (spec 7): at batch 256 with the code's
       LR rule 0.5 B/256, no 100-step warm-up; CIFAR uses CorInfoMax's CIFAR protocol.
   14. [choice] Presets `cifar10`, `cifar100` (ResNet-18, CIFAR stem, batch 512), `fashionmnist`
       and `synthetic` are extrapolations, untuned. The two short presets (ours) also use an
       evaluation EMA of 0.99 (0.999 would leave a 240-step run's evaluated weights mostly at
       their random initialisation), a smaller projector and predictor, and a base LR of 16
       (x B/256). Why 16: LARS moves each weight by about lr * eta of its norm per step, so the
       code's 0.4 x B/256 barely moves a network in a few hundred small-batch steps. Demo probe
       top-1, one run each before b37a993: base LR 1.6 gave 27.3 (random init 30.5), 16 gave 36.5. The 16-pixel
       demo also uses `--crop-min-scale 0.3` (its blur is off: BYOL's kernel rule gives 1 tap).
   15. Shared with the other method files (see corinfomax.py's header): GlobalBatchSampler data
       order, exact mid-epoch resume, cached-feature probe for short runs, last and best probe top-1,
       photometric augmentation batched on the training device.
    Multi-process runs gather the embeddings of all views with gradient (common.gather_with_grad);
    every process then evaluates the loss on the global batch, as the code's all-gather does.

USAGE
    python ssl_hsic.py                                   # CPU demo on synthetic patterns, a few minutes
    python ssl_hsic.py --data fashionmnist --epochs 20   # Debian's dataset-fashion-mnist, or --data-dir
    python ssl_hsic.py --data cifar10 --data-dir data    # 1 GPU, our CIFAR-10 extrapolation
    python ssl_hsic.py --data imagenet --data-dir /ds/imagenet --gpus 8   # the official recipe
    python ssl_hsic.py --benchmark --data cifar10      # step overhead, loss cost, data pipeline
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        ssl_hsic.py --data imagenet --data-dir /ds/imagenet     # two nodes
    Every run resumes automatically from --output-dir. `--help` lists every flag.

RESULTS (linear top-1 %, ResNet-50 on ImageNet; "paper" = official README / spec 8)
    variant             paper          ours
    with target         74.8           not run (no GPU yet)
    without target      72.2 (recalled, unverified)   not run
    Short CPU runs, cached-feature probe top-1 %, trained vs the same ResNet-18 at random init
    (2-core CPU; commands and budgets in README.md, "Results"; Fashion-MNIST at commit 6ad9f53,
    before the photometric augmentation moved to the device):
    synthetic demo (240 steps)         36.2  vs 30.5
    Fashion-MNIST (250 steps, 28 px)   82.33 vs 74.62
    One H100, bf16, Fashion-MNIST, 2 epochs of batch 256 (README.md, "Results"): trained 83.69,
    random init 74.48, raw pixels 82.16. Step overhead and throughput: README.md, "Performance".
"""
import argparse
import copy
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

PROG = "ssl_hsic.py"

# ============================================================================================
# Config
# ============================================================================================
# One preset per dataset (spec sections 4-7). Every value can be overridden by the flag of the
# same name; flags are named after the official code's symbols.

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
COMMON = dict(momentum=0.9, wd=1e-6, eta=1e-3, lr=0.4, warmup_epochs=10, crop_min_scale=0.08, blur_sigma=2.0,
              gamma=3.0, sigma=1.0, num_features=512, tau=0.99, eval_ema=0.999,
              projector="4096-256", predictor="4096-256", stem="cifar", arch="resnet18", image_size=32,
              probe="linear", probe_epochs=100, probe_lr=0.2, probe_schedule="cosine",
              knn_every=0, baseline=False)
PRESETS = {
    # ---- extrapolations from the ImageNet recipe (spec 5), untuned ----
    "cifar10": dict(epochs=1000, batch_size=512, knn_every=10,
                    norm=((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))),
    "cifar100": dict(epochs=1000, batch_size=512, knn_every=10,
                     norm=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    # ---- the official configuration (config.py, eval_config.py) ----
    "imagenet": dict(arch="resnet50", stem="imagenet", image_size=224, epochs=1000, batch_size=4096,
                     probe_epochs=90, probe_lr=0.5, knn_every=5, norm=IMAGENET_NORM),
    # ---- our own presets: small, untuned, labelled so ----
    "fashionmnist": dict(image_size=28, epochs=20, batch_size=256, lr=16.0, warmup_epochs=2, eval_ema=0.99,
                         projector="1024-128", predictor="1024-128", probe="cached", knn_every=5,
                         baseline=True, norm=((0.286,) * 3, (0.353,) * 3)),
    "synthetic": dict(image_size=16, epochs=4, batch_size=64, lr=16.0, warmup_epochs=1, eval_ema=0.99,
                      crop_min_scale=0.3, blur_sigma=0.5, projector="512-64", predictor="512-64",
                      probe="cached", baseline=True, synthetic_train=3840, synthetic_test=1000,
                      norm=((0.5,) * 3, (0.25,) * 3)),
}
OUR_PRESETS = ("cifar10", "cifar100", "fashionmnist", "synthetic")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description="SSL-HSIC self-supervised pretraining "
                                "(arXiv:2106.08320). Preset values fill every flag left unset.")
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
    g = p.add_argument_group("method (official code names)")
    g.add_argument("--gamma", type=float, help="weight of sqrt(HSIC(Z, Z))")
    g.add_argument("--sigma", type=float, help="initial (or, with --fixed-scale, fixed) IMQ kernel scale c")
    g.add_argument("--fixed-scale", dest="fixed_scale", action="store_true",
                   help="do not learn the kernel scale c")
    g.add_argument("--estimator", choices=("rff", "exact"), default="rff",
                   help="random Fourier features (official) or exact kernel matrices (O(n^2))")
    g.add_argument("--num-features", dest="num_features", type=int, help="F, random Fourier features")
    g.add_argument("--rff-shared", dest="rff_shared", action="store_true",
                   help="one RFF draw for all processes (default: each process draws its own)")
    g.add_argument("--zy-self-pairs", dest="zy_self_pairs", choices=("include", "exclude"), default="include",
                   help="count the pairs a = b in HSIC(Z, Y) as the official code does")
    g.add_argument("--no-target", dest="target", action="store_false",
                   help="no predictor and no EMA target: M = 2 online projections (our construction)")
    g.add_argument("--target-init", dest="target_init", choices=("independent", "copy"), default="independent")
    g.add_argument("--tau", type=float, help="initial target EMA rate tau_0 (rises to 1 by a cosine)")
    g.add_argument("--eval-ema", dest="eval_ema", type=float, help="EMA rate of the evaluated backbone")
    g.add_argument("--eval-weights", dest="eval_weights", choices=("ema", "online"), default="ema")
    g = p.add_argument_group("network")
    g.add_argument("--arch", choices=("resnet18", "resnet50"))
    g.add_argument("--stem", choices=("cifar", "imagenet"), help="3x3 stride-1 stem, no max-pool; or 7x7/2")
    g.add_argument("--projector", help="hidden-output widths, e.g. 4096-256 (Linear-BN-ReLU-Linear)")
    g.add_argument("--predictor", help="hidden-output widths of the predictor; output = projector's")
    g.add_argument("--image-size", dest="image_size", type=int)
    g.add_argument("--crop-min-scale", dest="crop_min_scale", type=float,
                   help="smallest RandomResizedCrop area of the pretraining views (paper: 0.08)")
    g.add_argument("--blur-sigma", dest="blur_sigma", type=float,
                   help="largest Gaussian-blur sigma in pixels (paper: 2.0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", dest="max_steps", type=int, help="stop after this many steps in all")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="global batch (all processes)")
    g.add_argument("--lr", type=float, help="base learning rate, multiplied by batch/256")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, help="linear warm-up from 0")
    g.add_argument("--wd", type=float, help="weight decay (not on biases and BatchNorm)")
    g.add_argument("--eta", type=float, help="LARS trust coefficient")
    g.add_argument("--momentum", type=float)
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), help="default: bf16 on CUDA, off on CPU")
    g = p.add_argument_group("evaluation")
    g.add_argument("--probe", choices=("linear", "cached", "none"),
                   help="linear: the paper protocol; cached: fast cached-feature probe for short runs")
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
    # No CUDA-graph replay of this loss (Training, graph_loss): each call seeds its random features
    # on the host, and a replay would repeat the draws of the captured call.
    cfg.graph_loss = False
    cfg.amp = cfg.amp or ("bf16" if cfg.use_cuda else "off")
    cfg.output_dir = cfg.output_dir or os.path.join("runs", f"{PROG.removesuffix('.py')}-{cfg.preset}")
    if cfg.gpus < 1 or cfg.batch_size % cfg.gpus:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split evenly across --gpus {cfg.gpus}")
    if cfg.use_cuda and cfg.gpus > torch.cuda.device_count():
        raise UsageError(f"--gpus {cfg.gpus} but only {torch.cuda.device_count()} CUDA devices")
    if not cfg.sigma > 0 or cfg.num_features < 1:
        raise UsageError(f"--sigma must be > 0 (got {cfg.sigma}) and --num-features >= 1 "
                         f"(got {cfg.num_features})")
    if cfg.target and cfg.predictor.split("-")[-1] != cfg.projector.split("-")[-1]:
        raise UsageError(f"--predictor {cfg.predictor} must end in the projector's output width "
                         f"{out_dim(cfg)}")
    return cfg


def out_dim(cfg):
    """D, the projector's output dimension."""
    return int(cfg.projector.split("-")[-1])

# ============================================================================================
# Loss
# ============================================================================================
# Self-contained: needs only torch (and math). `ssl_hsic_loss` is a pure function of the
# embeddings; `SSLHSIC` adds what changes from step to step: the learned kernel scale c and fresh
# random features. In a multi-GPU run, pass the globally gathered views (all_gather with gradient).

def squared_distances(x, y):
    """||x_a - y_b||^2 for all rows a of x and b of y, by one matrix product."""
    return (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def imq_kernel(x, y, c):
    """Inverse multiquadric kernel matrix k(x, y) = c / sqrt(||x - y||^2 + c^2) (spec 3.2).

    Written as (1 + ||x - y||^2 / c^2)^(-1/2): k(x, x) = 1 and k lies in (0, 1].
    """
    return torch.rsqrt(1 + squared_distances(x, y) / c**2)


def hsic_exact(z, c, zy_self_pairs=True):
    """The quantities of spec 3.3 from the n x n kernel matrix, n = M N (cost O(n^2 D)).

    Rows are flattened view-major, a = p N + i, so rows a and b show the same image when
    a = b (mod N). Returns (hsic_zy, hsic_zz).
    """
    M, N, D = z.shape
    n = M * N
    K = imq_kernel(z.reshape(n, D), z.reshape(n, D), c)
    # sum over images i and view pairs (p, l) of k(z_i^p, z_i^l): the diagonal i = j of K viewed (M, N, M, N)
    same = torch.diagonal(K.view(M, N, M, N), dim1=1, dim2=3).sum()
    if not zy_self_pairs:
        same = same - K.diagonal().sum()
    # HSIC(Z, Y), label weight w = 1 and no 1/N (spec 3.2); the divisor M(M - 1) counts the pairs
    # p != l although p = l is in the sum (spec 3.3): a constant 1/(M - 1) rides on the value.
    hsic_zy = same / (N * M * (M - 1)) - K.mean()
    # HSIC(Z, Z) = tr(K H K H) / n^2 = ||H K H||_F^2 / n^2, H = I - 11^T / n (biased V-statistic).
    K_c = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
    hsic_zz = K_c.pow(2).sum() / n**2
    return hsic_zy, hsic_zz


def rff(x, c, num_features, generator=None):
    """Random Fourier features phi(x) = sqrt(2/F) cos(x W^T / c + b), E[phi(x) . phi(y)] = k(x, y).

    Frequencies w = xi g with xi ~ N(0, 1) and g ~ N(0, I_D): since (1 + r^2)^(-1/2) equals
    E_{tau ~ chi2_1}[exp(-tau r^2 / 2)], the IMQ kernel is a mixture of Gaussian kernels and its
    spectral measure is that of xi g (spec 3.4, an exact sampler; the code tabulates it).
    Phases b ~ U[0, 2 pi) are drawn independently of the directions.
    """
    device = generator.device if generator is not None else x.device
    draw = dict(generator=generator, device=device, dtype=x.dtype)
    W = torch.randn(num_features, 1, **draw) * torch.randn(num_features, x.shape[1], **draw)
    b = 2 * math.pi * torch.rand(num_features, **draw)
    return math.sqrt(2 / num_features) * torch.cos(x @ W.to(x.device).T / c + b.to(x.device))


def hsic_rff(z, c, num_features, generator=None, zy_self_pairs=True):
    """The estimators of spec 3.4 with random features, cost O(n F^2): linear in the batch.

    Draw A serves HSIC(Z, Y) and one factor of HSIC(Z, Z); an independent draw B the other factor,
    which makes hsic_zz unbiased for tr(K H K H) / n^2 (one draw used twice would not be).
    """
    M, N, D = z.shape
    n = M * N
    phi_a = rff(z.reshape(n, D), c, num_features, generator)       # draw A, (n, F)
    phi_b = rff(z.reshape(n, D), c, num_features, generator)       # draw B
    S = phi_a.view(M, N, -1).sum(0)                                 # S_i = sum_p phi_A(z_i^p)
    same = S.pow(2).sum()                   # = sum_ab same_ab phi_A(x_a) . phi_A(x_b), a = b included
    if not zy_self_pairs:
        same = same - phi_a.pow(2).sum()
    hsic_zy = same / (N * M * (M - 1)) - S.sum(0).pow(2).sum() / n**2
    C = (phi_b - phi_b.mean(0)).T @ (phi_a - phi_a.mean(0))        # Phi_B^T H Phi_A, (F, F)
    return hsic_zy, C.pow(2).sum() / n**2


def ssl_hsic_loss(z, gamma=3.0, sigma=1.0, num_features=None, generator=None, zy_self_pairs=True):
    """SSL-HSIC loss L = gamma sqrt(HSIC(Z, Z)) - HSIC(Z, Y) in the official code's scaling.

    z: (M, N, D), view p of image i is z[p, i], L2-normalised rows; M >= 2. sigma: the IMQ
    scale c (a float or tensor, treated as a constant). num_features: None for the exact
    kernel-matrix estimators, F for random Fourier features drawn from `generator`.
    Returns (loss, logs) with logs "loss", "hsic_zy", "hsic_zz" as detached tensors.
    """
    if z.dim() != 3 or z.shape[0] < 2:
        raise ValueError(f"z must have shape (M, N, D) with M >= 2 views, got {tuple(z.shape)}")
    c = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).detach()   # stop-gradient (spec 3.5)
    if num_features is None:
        hsic_zy, hsic_zz = hsic_exact(z, c, zy_self_pairs)
    else:
        hsic_zy, hsic_zz = hsic_rff(z, c, num_features, generator, zy_self_pairs)
    loss = gamma * hsic_zz.sqrt() - hsic_zy     # no eps in the sqrt, as the code (spec 3.5)
    return loss, {"loss": loss.detach(), "hsic_zy": hsic_zy.detach(), "hsic_zz": hsic_zz.detach()}


class SSLHSIC(nn.Module):
    """The training loss: `ssl_hsic_loss` with fresh random features every call and the learned
    kernel scale c (spec 3.6).

    forward(z) takes the gathered views (M, N, D) and returns (loss, logs as detached float64
    tensors). Call it once per training step: each call advances the draw counter and, when the
    scale is learned, takes one Adam step on c after the loss has used the current c (the code's
    c also changes only in the optimiser step). Random features are seeded by (seed, call, rank),
    or (seed, call) with shared_draws; the pairs that train c by (seed, call), so c is the same
    on every process.
    """

    def __init__(self, gamma=3.0, sigma=1.0, num_features=512, learn_scale=True, zy_self_pairs=True,
                 shared_draws=False, seed=0, scale_lr=3e-4, scale_rows=1024):
        super().__init__()
        self.gamma, self.num_features, self.learn_scale = gamma, num_features, learn_scale
        self.zy_self_pairs, self.shared_draws, self.seed = zy_self_pairs, shared_draws, seed
        self.scale_lr, self.scale_rows = scale_lr, scale_rows
        # c and its Adam moments: float64 scalars, saved with the module's state.
        self.register_buffer("c", torch.tensor(float(sigma), dtype=torch.float64))
        self.register_buffer("c_adam_m", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("c_adam_v", torch.tensor(0.0, dtype=torch.float64))
        self.calls = 0     # a Python int (no device sync to seed a draw), saved as extra state

    def get_extra_state(self):
        return torch.tensor(self.calls)

    def set_extra_state(self, state):
        self.calls = int(state)

    def _generator(self, device, stream):
        """A generator for this call; stream 0 trains c, stream 1 + r gives process r's features."""
        g = torch.Generator(device=device)
        g.manual_seed(((self.seed * 2**24 + self.calls) * 2**16 + stream) % 2**63)
        return g

    def forward(self, z):
        c = self.c.clone()   # a copy: the Adam step below changes self.c in place
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() and not self.shared_draws else 0
        g = self._generator(z.device, 1 + rank) if self.num_features else None
        loss, logs = ssl_hsic_loss(z, self.gamma, c, self.num_features, g, self.zy_self_pairs)
        logs["c"] = c
        if self.learn_scale:
            logs["grad_norm"] = self._update_scale(z.detach())
        self.calls += 1
        values = torch.stack([v.double() for v in logs.values()])   # left on the device: no host sync
        return loss, dict(zip(logs, values.unbind()))

    @torch.no_grad()
    def _update_scale(self, z):
        """One Adam step on c maximising grad_norm = mean(1/2 log max(g^2, 1e-14)), g = dk/d(d2) =
        -(c/2)(d2 + c^2)^(-3/2), over scale_rows/M resampled rows per view, twice (spec 3.6). In
        z's precision: float32 in training, as the code."""
        M, N, D = z.shape
        gen = self._generator(z.device, 0)

        def rows():
            idx = torch.randint(N, (M, self.scale_rows // M), generator=gen, device=gen.device).to(z.device)
            return z[torch.arange(M, device=z.device)[:, None], idx].reshape(-1, D)
        d2 = squared_distances(rows(), rows())
        c = self.c
        # 1/2 log max(g^2, 1e-14) = max(log|g|, log 1e-7), log|g| = log(c/2) - 1.5 log(d2 + c^2).
        u = d2 + c**2
        log_g = torch.log(c / 2) - 1.5 * torch.log(u)
        floor = math.log(1e-7)
        grad_norm = log_g.clamp_min(floor).mean()
        # Its derivative written out rather than taken by autograd (about half the passes over the
        # 1024 x 1024 pairs): d log|g| / dc = 1/c - 3c/u where the clamp passes the gradient
        # (log_g >= floor, as autograd's clamp). The training loss adds -grad_norm.
        grad = -torch.where(log_g >= floor, 1 / c - 3 * c / u, 0).mean().double()
        # Adam (lr 3e-4, betas 0.9 / 0.999, eps 1e-8), written out so its state lives in buffers.
        t = self.calls + 1
        self.c_adam_m.lerp_(grad, 0.1)                                  # m = 0.9 m + 0.1 grad
        self.c_adam_v.mul_(0.999).addcmul_(grad, grad, value=0.001)     # v = 0.999 v + 0.001 grad^2
        m_hat, v_hat = self.c_adam_m / (1 - 0.9**t), self.c_adam_v / (1 - 0.999**t)
        self.c.sub_(self.scale_lr * m_hat / (v_hat.sqrt() + 1e-8))
        return grad_norm


def make_criterion(cfg):
    """The training loss as configured (called once per run; the module holds c and the draw count)."""
    return SSLHSIC(cfg.gamma, cfg.sigma, None if cfg.estimator == "exact" else cfg.num_features,
                   learn_scale=not cfg.fixed_scale, zy_self_pairs=cfg.zy_self_pairs == "include",
                   shared_draws=cfg.rff_shared, seed=cfg.seed)


def loss_variants(cfg):
    """The loss paths --benchmark times alone at several batch sizes (JSON key -> criterion): the
    configured estimator and the other one, to show RFF's linear and the exact path's quadratic cost."""
    other = {"rff": "exact", "exact": "rff"}[cfg.estimator]
    return {"loss_ms": make_criterion(cfg),
            f"loss_ms_{other}": make_criterion(argparse.Namespace(**{**vars(cfg), "estimator": other}))}


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


def make_mlp(in_dim, widths):
    """BYOL's head (spec 4): Linear(+bias) -> BN -> ReLU per hidden width, then Linear without bias."""
    dims = [in_dim] + [int(w) for w in widths.split("-")]
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Backbone + projector: the online network's trunk, and the whole target network."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone, feat_dim = make_backbone(cfg.arch, cfg.stem)
        self.projector = make_mlp(feat_dim, cfg.projector)

    def forward(self, x):
        return self.projector(self.backbone(x))


def l2_normalise(z):
    """z / sqrt(max(sum z^2, 1e-12)), the code's normalisation of every loss view (spec 3.1)."""
    return F.normalize(z, dim=1, eps=1e-6)


class Model(nn.Module):
    """Online network with predictor, EMA target network and evaluation EMA (spec 4).

    forward(x) is the online prediction (the projection under --no-target), L2-normalised: the
    only trained path, so the only one that DistributedDataParallel runs. `backbone` is the
    backbone that evaluation and export use: the evaluation EMA, or the online one.
    """

    def __init__(self, cfg):
        super().__init__()
        self.online = Encoder(cfg)
        self.predictor, self.target = nn.Identity(), None
        if cfg.target:
            self.predictor = make_mlp(out_dim(cfg), cfg.predictor)
            with torch.random.fork_rng(devices=[]):   # the code initialises the target from its own RNG
                torch.manual_seed(cfg.seed + 1)
                self.target = Encoder(cfg)
            if cfg.target_init == "copy":
                self.target.load_state_dict(self.online.state_dict())
            self.target.requires_grad_(False)
        self.ema = copy.deepcopy(self.online.backbone).requires_grad_(False) \
            if cfg.eval_weights == "ema" else None
        self.eval_ema = cfg.eval_ema

    def forward(self, x):
        return l2_normalise(self.predictor(self.online(x)))

    @torch.no_grad()
    def target_projection(self, x):
        return l2_normalise(self.target(x))

    @property
    def backbone(self):
        return self.ema if self.ema is not None else self.online.backbone

    @torch.no_grad()
    def update_averages(self, tau):
        """After each step: target <- tau target + (1 - tau) online, and the evaluation EMA of the
        online backbone (parameters averaged, BatchNorm statistics copied, spec 7)."""
        # One fused (foreach) kernel per list instead of one small kernel per tensor: about 320
        # lerps a step on ResNet-50 would otherwise each pay a launch.
        if self.target is not None:
            torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), 1 - tau)
        if self.ema is not None:
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.online.backbone.parameters()),
                                 1 - self.eval_ema)
            torch._foreach_copy_(list(self.ema.buffers()), list(self.online.backbone.buffers()))


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
    """BYOL's asymmetric two-view recipe (spec 6): blur 1.0 / 0.1, solarize 0.0 / 0.2. Each view
    is a pair (geometric half for the loader, photometric half for the device).

    The blur kernel follows BYOL's rule, 2 * ((size // 10) // 2) + 1 taps: 23 at 224 px, 3 at
    32 px, 1 (no blur) at 16 px.
    """
    taps = 2 * ((cfg.image_size // 10) // 2) + 1
    geometric = crop(cfg.image_size, (cfg.crop_min_scale, 1.0))
    return [(geometric, Photometric(cfg.norm, blur_p, solarize_p, taps, (0.1, cfg.blur_sigma)))
            for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2))]


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
    """LARS on the online network and predictor; 1-D parameters (biases, BatchNorm) excluded
    from weight decay and trust ratio, as BYOL's filter. c has its own Adam (in SSLHSIC)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return LARS([{"params": [p for p in params if p.ndim > 1]},
                 {"params": [p for p in params if p.ndim <= 1], "lars": False}],
                lr=0.0,   # set at every step by train_step (lr_at)
                momentum=cfg.momentum, weight_decay=cfg.wd, eta=cfg.eta)


def lr_at(cfg, step):
    """Per step: linear warm-up from 0 to lr * B/256 over W epochs, then cosine to 0 at the end
    of the last epoch (--max-steps stops early without changing the schedule)."""
    base = cfg.lr * cfg.batch_size / 256
    W, K = cfg.warmup_epochs * cfg.steps_per_epoch, cfg.epochs * cfg.steps_per_epoch
    if step < W:
        return base * step / W
    return base * (1 + math.cos(math.pi * min(step - W, K - W) / max(K - W, 1))) / 2


def tau_at(cfg, step):
    """Target EMA rate (spec 4): tau_k = 1 - (1 - tau_0)(cos(pi k / K) + 1) / 2, from tau_0 to 1."""
    K = cfg.epochs * cfg.steps_per_epoch
    return 1 - (1 - cfg.tau) * (math.cos(math.pi * step / K) + 1) / 2


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
    batch. `views` holds the two augmented views (x1, x2) of this rank's images."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    net = getattr(model, "module", model)   # the Model inside DDP: its target is not DDP's business
    x1, x2 = views
    with autocast(cfg):
        z = [model(x1), model(x2)]          # online predictions of views 1 and 2 (with gradient)
        if net.target is not None:          # stop-gradient target projections of views 2 and 1
            z += [net.target_projection(x2), net.target_projection(x1)]
    # The loss runs outside autocast in float32; M views of the global batch, (M, N, D).
    z = torch.stack([common.gather_with_grad(v.float()) for v in z])
    # No finiteness check here: reading the loss would wait for the GPU every step. The training
    # loop reads the logs every few steps and before saving (read_logs).
    loss, logs = criterion(z)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    net.update_averages(tau_at(cfg, step))
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
    """Per-epoch diagnostics: the kernel scale c and the kNN monitor of the evaluated backbone."""
    rec = {"epoch": epoch, "c": criterion.c.item()}
    if cfg.knn_every and epoch % cfg.knn_every == 0:
        rec.update({f"knn_{k}": v for k, v in evaluate(model.backbone, data, cfg, d, log, "knn").items()})
    log.print(f"  epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in rec.items() if k != "epoch"))
    log.record(event="epoch", **rec)


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
