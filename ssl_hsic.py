"""SSL-HSIC: self-supervised learning by kernel dependence maximisation.

Paper    Yazhe Li, Roman Pogodin, Danica J. Sutherland, Arthur Gretton. "Self-Supervised Learning
         with Kernel Dependence Maximization", NeurIPS 2021, arXiv:2106.08320.
Official github.com/google-deepmind/ssl_hsic @ d7ea38d on deepmind-research/byol @ 2c7c401 (read, not
         copied). docs/ssl_hsic.md derives the random-feature estimator, explains the differences.

THE IDEA
    SSL-HSIC maximises the kernel dependence HSIC(Z, Y) between the embedding Z of an augmented
    image and the identity Y of its image (views of one image close under a kernel k, of different
    images apart), regularised against collapse by the "kernelised variance": L = -HSIC(Z, Y) +
    gamma sqrt(HSIC(Z, Z)). k is the inverse multiquadric kernel, its scale c learned; random
    Fourier features make the estimate linear in the batch. BYOL's networks: online + predictor, EMA target.

EQUATION MAP (official code names)
    objective         L = gamma sqrt(hsic_zz) - hsic_zy, gamma = 3                   ssl_hsic_loss
    kernel (IMQ)      k(x, y) = c / sqrt(||x - y||^2 + c^2), c a stop-gradient scalar   imq_kernel
    HSIC(Z, Y)        hsic_zy = sum_ab same_ab K_ab / (N M (M-1)) - sum_ab K_ab / n^2   hsic_exact
    HSIC(Z, Z)        hsic_zz = ||H K H||_F^2 / n^2 over all n = N M points (biased V-statistic)
    random features   phi(x) = sqrt(2/F) cos(x W^T / c + b), w = xi g, xi ~ N(0,1), g ~ N(0, I)   rff
    RFF estimators    hsic_zy = ||S||^2 / (N M (M-1)) - ||s||^2 / n^2, hsic_zz = ||Phi_B^T H Phi_A||^2 / n^2
                      (independent draws A and B)                                    hsic_rff
    kernel scale      maximise mean(log |dk/d d2|) over resampled pairs by Adam(3e-4)   SSLHSIC._update_scale
    target network    xi <- tau_k xi + (1 - tau_k) theta, tau_k from 0.99 to 1 by a cosine   tau_at
    optimisation      LARS, 0.4 B/256, warm-up from 0 over 10 epochs, cosine to 0, per step  LARS, lr_at

DIFFERENCES FROM THE OFFICIAL CODE ([choice]: ours where it is silent; each one flag away)
    1. RFF frequencies from the exact Gaussian scale mixture w = xi g (the code tabulates it);
       each process draws its own features, as the code (`--rff-shared`).
    2. [choice] The pairs that train c are resampled with one seed on every process, so c stays
       identical without a collective (the code averages per-device gradients).
    3. [choice] `--no-target`: the paper's variant without target (not in the code), M = 2 online projections.
    4. Evaluation and export use the EMA (0.999) of the online backbone with its BatchNorm statistics, as the
       official eval_experiment.py l. 224-226 loads them (ema_state.online_params, experiment_state.online_state).
    5. [choice] CIFAR presets extrapolated from ImageNet. Short presets: base LR 16 (0.4 barely moves a network
       in 240 LARS steps), online backbone probed, target copied at start, tau_0 0 (chosen on held-out draws,
       docs/ssl_hsic.md gives each setting's accuracy).
    6. The loss, and the last layer and normalisation before it, in float32; data order, resume,
       kNN monitor as corinfomax.py (its items 2-5). Code conventions: --zy-self-pairs, --estimator.
    7. The official linear probe (eval_config.py l. 27-55; eval_experiment.py l. 141-145, 314-316,
       374-378, 476-478): batch 4096, 90 epochs, SGD 0.9, LR 0.5 B/256 with 100 warm-up steps and
       a per-step cosine to 0 (byol/utils/schedules.py), test top-1 of the head's EMA (0.999).
    8. The photometric ops as the code runs them, BYOL's (augmentations.py l. 27-66, 291-347,
       403-457), batched on the device; [choice] torchvision's bicubic crops (the code: TF's).

USAGE
    python ssl_hsic.py                                   # CPU demo on synthetic patterns
    python ssl_hsic.py --data imagenet --data-dir /ds/imagenet --gpus 8   # the official recipe
    python tools/benchmark.py ssl_hsic --data cifar10    # step overhead, loss cost, data pipeline
"""
import collections
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
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import common
import image_ops

PROG = "ssl_hsic.py"

# ============================================================================================
# Config
# ============================================================================================
# Every value a run uses: DEFAULTS (the official configuration, config.py and eval_config.py),
# then one preset per dataset; a flag of the same name overrides either (--print-config shows
# which gave what). Flags are named after the official code's symbols.

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DEFAULTS = dict(
    data="synthetic", data_dir=None, preset=None, download=False, workers=None, skip_bad_images=False,
    synthetic_train=3840, synthetic_test=1000, norm=((0.5,) * 3, (0.25,) * 3),
    gamma=3.0, sigma=1.0, fixed_scale=False, estimator="rff", num_features=512, rff_shared=False,
    zy_self_pairs="include", target=True, target_init="independent", tau=0.99, eval_ema=0.999, eval_weights="ema",
    arch="resnet18", stem="cifar", image_size=32, crop_min_scale=0.08, blur_sigma=2.0, projector="4096-256",
    predictor="4096-256", epochs=None, max_steps=None, batch_size=None, warmup_epochs=10, wd=1e-6, momentum=0.9,
    amp=None, lr=0.4, eta=1e-3,   # epochs, batch_size: every preset sets them
    probe="linear", probe_epochs=90, probe_batch=4096, probe_lr=0.5, probe_lr_scaling="batch/256",
    probe_warmup_steps=100, probe_schedule="cosine-steps", probe_head_ema=0.999, baseline=False, knn_every=10,
    knn_bank=20000, gpus=1, cpu=False, compile=False, threads=None, output_dir=None, save_every=30.0, log_every=10,
    seed=0)
PRESETS = {
    # ---- the official configuration ----
    "imagenet": dict(arch="resnet50", stem="imagenet", image_size=224, epochs=1000, batch_size=4096, knn_every=5,
                     knn_bank=100000, norm=IMAGENET_NORM),
    # ---- ours: extrapolations from the ImageNet recipe ----
    "cifar10": dict(epochs=1000, batch_size=512, norm=((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))),
    "cifar100": dict(epochs=1000, batch_size=512, norm=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    # ---- ours: small presets for CPU runs ----
    "fashionmnist": dict(image_size=28, epochs=20, batch_size=256, lr=16.0, warmup_epochs=2, tau=0.0, knn_every=5,
                         target_init="copy", eval_weights="online", projector="1024-128", predictor="1024-128",
                         probe="cached", probe_epochs=100, baseline=True, norm=((0.286,) * 3, (0.353,) * 3)),
    "synthetic": dict(image_size=16, epochs=4, batch_size=64, lr=16.0, warmup_epochs=1, tau=0.0, target_init="copy",
                      eval_weights="online", crop_min_scale=0.3, blur_sigma=0.5, projector="512-64", predictor="512-64",
                      probe="cached", probe_epochs=100, knn_every=0, baseline=True),
}
OUR_PRESETS = ("cifar10", "cifar100", "fashionmnist", "synthetic")


def parse_args(argv=None):
    p = common.Parser(prog=PROG, description="SSL-HSIC pretraining (arXiv:2106.08320); a flag left unset takes its "
                      "preset's value, else the default shown. --print-config shows which.")
    groups = common.add_shared_flags(p, PRESETS)
    g = groups["method"]
    g.add_argument("--gamma", type=common.NONNEGATIVE, help="weight of sqrt(HSIC(Z, Z))")
    g.add_argument("--sigma", type=common.POSITIVE, help="initial (or, with --fixed-scale, fixed) IMQ kernel scale c")
    g.add_argument("--fixed-scale", action="store_true", default=None, help="do not learn c")
    g.add_argument("--estimator", choices=("rff", "exact"),
                   help="random Fourier features (official) or exact kernel matrices (O(n^2))")
    g.add_argument("--num-features", type=common.POSITIVE_INT, help="F, random Fourier features")
    g.add_argument("--rff-shared", action="store_true", default=None, help="one RFF draw for all processes")
    g.add_argument("--zy-self-pairs", choices=("include", "exclude"))
    g.add_argument("--no-target", dest="target", action="store_false", default=None, help="no predictor, no EMA target")
    g.add_argument("--target-init", choices=("independent", "copy"))
    g.add_argument("--tau", type=common.checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                   help="initial target EMA rate tau_0 (rises to 1 by a cosine)")
    g.add_argument("--eval-ema", type=common.RATE, help="EMA rate of the evaluated backbone")
    g.add_argument("--eval-weights", choices=("ema", "online"))
    g = groups["network"]
    g.add_argument("--projector", type=common.WIDTHS, help="hidden-output widths, e.g. 4096-256")
    g.add_argument("--predictor", type=common.WIDTHS, help="hidden-output widths; output = projector's")
    g = groups["optimisation"]
    g.add_argument("--lr", type=common.POSITIVE, help="base learning rate, multiplied by batch/256")
    g.add_argument("--eta", type=common.POSITIVE, help="LARS trust coefficient")
    cfg = common.resolve(p, argv, DEFAULTS, PRESETS)
    if cfg.target and cfg.predictor.split("-")[-1] != cfg.projector.split("-")[-1]:
        raise common.UsageError(f"--predictor {cfg.predictor} must end in the projector's width {common.out_dim(cfg)}")
    return cfg


# ============================================================================================
# Loss
# ============================================================================================
# The unit to copy: this section, whole, below the line `import functools, math, torch, torch.distributed
# as dist, torch.nn as nn, torch.nn.functional as F` (a test runs it so, alone). `ssl_hsic_loss` is a
# pure function of the embeddings; `SSLHSIC` adds what changes from step to step: the learned
# kernel scale c and fresh random features. In a multi-GPU run, pass the gathered views (with gradient).

def squared_distances(x, y):
    """||x_a - y_b||^2 for all rows a of x and b of y, by one matrix product."""
    return (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def imq_kernel(x, y, c):
    """Inverse multiquadric kernel matrix k(x, y) = c / sqrt(||x - y||^2 + c^2) = (1 + ||x - y||^2 / c^2)^(-1/2)."""
    return torch.rsqrt(1 + squared_distances(x, y) / c**2)


def hsic_exact(z, c, zy_self_pairs=True):
    """(HSIC(Z, Y), HSIC(Z, Z)) from the n x n kernel matrix, n = M N (cost O(n^2 D)). Rows are
    view-major, a = p N + i: rows a and b show the same image when a = b (mod N)."""
    M, N, D = z.shape
    n = M * N
    K = imq_kernel(z.reshape(n, D), z.reshape(n, D), c)
    same = torch.diagonal(K.view(M, N, M, N), dim1=1, dim2=3).sum()   # sum_i sum_pl k(z_i^p, z_i^l)
    if not zy_self_pairs:
        same = same - K.diagonal().sum()
    # HSIC(Z, Y), label weight w = 1 and no 1/N; the divisor M(M - 1) counts the pairs
    # p != l although p = l is in the sum: a constant 1/(M - 1) rides on the value.
    hsic_zy = same / (N * M * (M - 1)) - K.mean()
    # HSIC(Z, Z) = tr(K H K H) / n^2 = ||H K H||_F^2 / n^2, H = I - 11^T / n (biased V-statistic).
    K_c = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
    hsic_zz = K_c.pow(2).sum() / n**2
    return hsic_zy, hsic_zz


def rff(x, c, num_features, generator=None):
    """Random Fourier features phi(x) = sqrt(2/F) cos(x W^T / c + b), E[phi(x) . phi(y)] = k(x, y):
    the IMQ kernel is a mixture of Gaussian kernels, (1 + r^2)^(-1/2) = E_{tau ~ chi2_1} exp(-tau r^2 / 2),
    so its frequencies are w = xi g, xi ~ N(0, 1), g ~ N(0, I_D); phases b ~ U[0, 2 pi)."""
    device = generator.device if generator is not None else x.device
    draw = dict(generator=generator, device=device, dtype=x.dtype)
    W = torch.randn(num_features, 1, **draw) * torch.randn(num_features, x.shape[1], **draw)
    b = 2 * math.pi * torch.rand(num_features, **draw)
    return math.sqrt(2 / num_features) * torch.cos(x @ W.to(x.device).T / c + b.to(x.device))


def hsic_rff(z, c, num_features, generator=None, zy_self_pairs=True):
    """(HSIC(Z, Y), HSIC(Z, Z)) with random features, cost O(n F^2). Draw A serves HSIC(Z, Y) and one
    factor of HSIC(Z, Z), an independent draw B the other: hsic_zz is then unbiased for tr(KHKH)/n^2."""
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

    z: (M, N, D), view p of image i is z[p, i], L2-normalised rows; M >= 2. sigma: the IMQ scale c
    (a constant). num_features: None for the exact estimators, F for random Fourier features drawn
    from `generator`. Returns (loss, logs: "loss", "hsic_zy", "hsic_zz", detached)."""
    if z.dim() != 3 or z.shape[0] < 2:
        raise ValueError(f"z must have shape (M, N, D) with M >= 2 views, got {tuple(z.shape)}")
    c = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).detach()   # stop-gradient
    hsic_zy, hsic_zz = hsic_exact(z, c, zy_self_pairs) if num_features is None else \
        hsic_rff(z, c, num_features, generator, zy_self_pairs)
    loss = gamma * hsic_zz.sqrt() - hsic_zy     # no eps in the sqrt, as the code
    return loss, {"loss": loss.detach(), "hsic_zy": hsic_zy.detach(), "hsic_zz": hsic_zz.detach()}


class SSLHSIC(nn.Module):
    """`ssl_hsic_loss` on the gathered views (M, N, D) with fresh random features every call and the
    learned kernel scale c. Call it once per step: each call advances the draw counter and, after the
    loss has used c, takes one Adam step on c. Features are seeded by (seed, call, rank), or (seed,
    call) with shared_draws; the pairs that train c by (seed, call): c is the same everywhere."""

    def __init__(self, gamma=3.0, sigma=1.0, num_features=512, learn_scale=True, zy_self_pairs=True,
                 shared_draws=False, seed=0, scale_lr=3e-4, scale_rows=1024):
        super().__init__()
        self.gamma, self.num_features, self.learn_scale = gamma, num_features, learn_scale
        self.zy_self_pairs, self.shared_draws, self.seed = zy_self_pairs, shared_draws, seed
        self.scale_lr, self.scale_rows = scale_lr, scale_rows
        for name, value in (("c", sigma), ("c_adam_m", 0.0), ("c_adam_v", 0.0)):   # c and its Adam moments:
            self.register_buffer(name, torch.tensor(float(value), dtype=torch.float64))   # float64, saved
        self.calls = 0     # a Python int (no device sync to seed a draw), saved as extra state

    def get_extra_state(self):
        return torch.tensor(self.calls)

    def set_extra_state(self, state):
        self.calls = int(state)

    def _generator(self, device, stream):
        """A generator for this call; stream 0 trains c, stream 1 + r gives process r's features."""
        return torch.Generator(device=device).manual_seed(((self.seed * 2**24 + self.calls) * 2**16 + stream) % 2**63)

    def forward(self, z):
        c = self.c.clone()   # a copy: the Adam step below changes self.c in place
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() and not self.shared_draws else 0
        g = self._generator(z.device, 1 + rank) if self.num_features else None
        loss, logs = ssl_hsic_loss(z, self.gamma, c, self.num_features, g, self.zy_self_pairs)
        logs["c"] = c
        if self.learn_scale:
            logs["grad_norm"] = self._update_scale(z.detach())
        self.calls += 1
        return loss, logs   # left on the device: reading them is a host sync, left to the caller

    @torch.no_grad()
    def _update_scale(self, z):
        """One Adam step on c maximising the official kernel-scale objective: grad_norm, the mean of
        1/2 log max(g^2, 1e-14) with g = dk/d(d2) = -(c/2)(d2 + c^2)^(-3/2), over the pairs of
        scale_rows/M resampled rows per view, twice; in z's precision (float32 in training)."""
        M, N, D = z.shape
        gen = self._generator(z.device, 0)

        def rows():
            idx = torch.randint(N, (M, self.scale_rows // M), generator=gen, device=gen.device).to(z.device)
            return z[torch.arange(M, device=z.device)[:, None], idx].reshape(-1, D)
        d2 = squared_distances(rows(), rows())
        with torch.enable_grad():
            c = self.c.clone().requires_grad_()
            log_g = torch.log(c / 2) - 1.5 * torch.log(d2 + c**2)          # 1/2 log g^2
            grad_norm = log_g.clamp_min(math.log(1e-7)).mean()
            grad, = torch.autograd.grad(-grad_norm, c)                    # the loss adds -grad_norm
        # Adam (lr 3e-4, betas 0.9 / 0.999, eps 1e-8), written out so that its state lives in buffers.
        t = self.calls + 1
        self.c_adam_m.lerp_(grad, 0.1)                                  # m = 0.9 m + 0.1 grad
        self.c_adam_v.mul_(0.999).addcmul_(grad, grad, value=0.001)     # v = 0.999 v + 0.001 grad^2
        m_hat, v_hat = self.c_adam_m / (1 - 0.9**t), self.c_adam_v / (1 - 0.999**t)
        self.c.sub_(self.scale_lr * m_hat / (v_hat.sqrt() + 1e-8))
        return grad_norm.detach()



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


def make_mlp(in_dim, widths):
    """BYOL's head: Linear(+bias) -> BN -> ReLU per hidden width, then Linear without bias."""
    dims = [in_dim] + [int(w) for w in widths.split("-")]
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


def make_encoder(cfg):
    """Backbone + projector: the online network's trunk, and the whole target network."""
    backbone, feat_dim = make_backbone(cfg.arch, cfg.stem)
    return nn.Sequential(collections.OrderedDict(backbone=backbone, projector=make_mlp(feat_dim, cfg.projector)))


class Model(nn.Module):
    """Online network with predictor, EMA target network and evaluation EMA. forward(x) is the
    online prediction (the projection under --no-target), L2-normalised as the code does (z / sqrt(max(
    sum z^2, 1e-12))), in float32: the only trained path.
    `backbone` is the one that evaluation and export use: the evaluation EMA, or the online one."""

    def __init__(self, cfg):
        super().__init__()
        self.online = make_encoder(cfg)
        self.predictor, self.target = nn.Identity(), None
        if cfg.target:
            self.predictor = make_mlp(common.out_dim(cfg), cfg.predictor)
            with torch.random.fork_rng(devices=[]):   # the code initialises the target from its own RNG
                torch.manual_seed(cfg.seed + 1)
                self.target = make_encoder(cfg)
            if cfg.target_init == "copy":
                self.target.load_state_dict(self.online.state_dict())
            self.target.requires_grad_(False)
        self.ema = copy.deepcopy(self.online.backbone).requires_grad_(False) if cfg.eval_weights == "ema" else None
        self.eval_ema = cfg.eval_ema

    def forward(self, x):
        if self.target is None:
            return common.float32_head(self.online.projector, self.online.backbone(x), 1e-6)
        return common.float32_head(self.predictor, self.online(x), 1e-6)

    @torch.no_grad()
    def target_projection(self, x):
        return common.float32_head(self.target.projector, self.target.backbone(x), 1e-6)

    @property
    def backbone(self):
        return self.ema if self.ema is not None else self.online.backbone

    @torch.no_grad()
    def update_averages(self, tau):
        """After each step: target <- tau target + (1 - tau) online, and the evaluation EMA of the
        online backbone (parameters averaged, BatchNorm statistics copied), one fused op per list."""
        if self.target is not None:
            torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), 1 - tau)
        if self.ema is not None:
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.online.backbone.parameters()),
                                 1 - self.eval_ema)
            torch._foreach_copy_(list(self.ema.buffers()), list(self.online.backbone.buffers()))


# ============================================================================================
# Augmentation
# ============================================================================================
# A view in two halves: the geometric one (crop, flip) per image in the loader's workers; the
# photometric one (jitter, grayscale, blur, solarize, normalise) on the batch on the device, every
# op (BYOL's formulas, image_ops.py) on every image, the identity parameter for the images
# that did not draw it: per image BYOL's postprocess.

BICUBIC = v2.InterpolationMode.BICUBIC


def normalize(cfg):
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(*cfg.norm)]


def crop(size, scale):
    """The geometric half of a pretraining view: bicubic RandomResizedCrop + flip, uint8 out."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
                       v2.RandomHorizontalFlip(p=0.5)])


class Photometric:
    """The photometric half of a pretraining view, on a batch, as the official code runs it: BYOL's
    augmentations.py (l. 27-66, 291-347, 403-457). Per image, with probability 0.8 the colour ops
    of image_ops.byol_colour in a random order, each clipped to [0, 1] (brightness delta in
    [-0.4, 0.4], contrast [0.6, 1.4], saturation [0.8, 1.2], hue delta [-0.1, 0.1]); grayscale with
    probability 0.2, a clip; a zero-padded Gaussian blur with probability blur_p; x -> 1 - x where
    x >= 0.5 with probability solarize_p; a clip; Normalize. draw(n, generator): n images' choices."""

    def __init__(self, norm, blur_p, solarize_p, taps, sigma):
        self.norm, self.blur_p, self.solarize_p, self.taps, self.sigma = norm, blur_p, solarize_p, taps, sigma

    def draw(self, n, generator):
        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)
        return {"jitter": uniform(0, 1) < 0.8,
                "order": uniform(0, 1, 4).argsort(1),      # a uniformly random permutation per image
                "factors": uniform(torch.tensor([-0.4, 0.6, 0.8, -0.1]), torch.tensor([0.4, 1.4, 1.2, 0.1]), 4),
                "gray": uniform(0, 1) < 0.2,
                "blur": uniform(0, 1) < self.blur_p,
                "sigma": uniform(*self.sigma),
                "solarize": uniform(0, 1) < self.solarize_p}

    def __call__(self, x, p):
        p = {k: v.to(x.device, non_blocking=True) for k, v in p.items()}
        x = x.float() / 255
        for position in range(4):              # the four ops in each image's own order
            for k, identity in enumerate((0.0, 1.0, 1.0, 0.0)):
                drawn = p["jitter"] & (p["order"][:, position] == k)
                x = image_ops.byol_colour(x, k, torch.where(drawn, p["factors"][:, k], identity))
        x = torch.where(p["gray"][:, None, None, None], image_ops.grayscale(x), x).clamp(0, 1)
        x = image_ops.gaussian_blur(x, torch.where(p["blur"], p["sigma"], 1e-3), self.taps, "zeros")   # 1e-3: none
        return v2.functional.normalize(image_ops.solarize(x, p["solarize"], 0.5).clamp(0, 1), *self.norm)


def pretrain_views(cfg):
    """BYOL's two views, (geometric, photometric) halves: blur 1.0 / 0.1, solarize 0.0 / 0.2, a blur
    of 2 (size // 20) + 1 taps (23 at 224 px, 3 at 32 px, none at 16 px)."""
    taps = 2 * ((cfg.image_size // 10) // 2) + 1
    geometric = crop(cfg.image_size, (cfg.crop_min_scale, 1.0))
    return [(geometric, Photometric(cfg.norm, blur_p, solarize_p, taps, (0.1, cfg.blur_sigma)))
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
    """LARS on the online network and predictor; 1-D parameters (biases, BatchNorm) excluded
    from weight decay and trust ratio, as BYOL's filter. c has its own Adam (in SSLHSIC)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return LARS([{"params": [p for p in params if p.ndim > 1]}, {"params": [p for p in params if p.ndim <= 1],
                 "lars": False}], lr=0.0, momentum=cfg.momentum, weight_decay=cfg.wd, eta=cfg.eta)   # lr: lr_at


def lr_at(cfg, step):
    """Per step: linear warm-up from 0 to lr * B/256 over W epochs, then cosine to 0 at the end
    of the last epoch (--max-steps stops early without changing the schedule)."""
    base = cfg.lr * cfg.batch_size / 256
    W, K = cfg.warmup_epochs * cfg.steps_per_epoch, cfg.epochs * cfg.steps_per_epoch
    if step < W:
        return base * step / W
    return base * (1 + math.cos(math.pi * min(step - W, K - W) / max(K - W, 1))) / 2


def tau_at(cfg, step):
    """Target EMA rate: tau_k = 1 - (1 - tau_0)(cos(pi k / K) + 1) / 2, from tau_0 to 1."""
    K = cfg.epochs * cfg.steps_per_epoch
    return 1 - (1 - cfg.tau) * (math.cos(math.pi * step / K) + 1) / 2


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
    """The training loss as configured (called once per run; the module holds c and the draw count)."""
    return SSLHSIC(cfg.gamma, cfg.sigma, None if cfg.estimator == "exact" else cfg.num_features,
                   learn_scale=not cfg.fixed_scale, zy_self_pairs=cfg.zy_self_pairs == "include",
                   shared_draws=cfg.rff_shared, seed=cfg.seed)


def collapsed(logs, cfg):
    """Collapse shows in HSIC(Z, Z) near 0: all embeddings alike."""
    if logs["hsic_zz"] < 1e-6:
        return "HSIC(Z, Z) near 0"


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
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    net = getattr(model, "module", model)   # the Model in DDP (compile's wrapper forwards attributes)
    x1, x2 = views
    with common.autocast(cfg):
        z = [model(x1), model(x2)]          # online predictions of views 1 and 2 (with gradient)
        if net.target is not None:          # stop-gradient target projections of views 2 and 1
            z += [net.target_projection(x2), net.target_projection(x1)]
    # The loss runs outside autocast in float32; M views of the global batch, (M, N, D).
    z = torch.stack([common.gather_with_grad(v.float()) for v in z])
    loss, logs = criterion(z)   # not checked here: the loop reads the logs every few steps
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    net.update_averages(tau_at(cfg, step))
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
    rec["c"] = criterion.c.item()
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
