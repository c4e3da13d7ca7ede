"""Shared plumbing for the four method scripts.

Only code that cannot change a reported number lives here: the command line (the flags every
file takes, one-line errors), torchvision's photometric formulas batched, process launching and
distributed setup, data (readers, image folders, the sampler of global batches, loaders), the
bookkeeping of a run (resume, logs, checkpoints, stop signals, the collapse warning), feature
extraction and the synthetic dataset. Losses, networks, augmentation recipes, optimisers,
schedules and the evaluation protocol stay in each method file, where a reader expects them.
"""
import argparse
import gzip
import json
import math
import os
import pickle
import platform
import re
import signal
import socket
import sys
import time

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.multiprocessing as mp
import torchvision


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2, no traceback."""


class BadImage(UsageError):
    """An image file that cannot be decoded. Raised in a loader worker, it reaches the main
    process wrapped in the worker's traceback, whose last line holds the original message."""

    def __init__(self, message):
        super().__init__(re.sub(r"^\S*BadImage: ", "", message.strip().splitlines()[-1]))


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: the run stops, the last good checkpoint stays."""


class Stopped(Exception):
    """A stop signal (SIGTERM, SIGUSR1, Ctrl-C) ended the run after a step it saved."""

    def __init__(self, message, signal_name):
        super().__init__(message)
        self.code = 128 + signal.Signals[signal_name].value    # the shell's code for that signal


def run_cli(main, prog):
    """Run `main()`, turning the errors a user can cause into one clear line on stderr."""
    try:
        main()
        return
    except UsageError as e:
        message, code = f"error: {e}", 2
    except NonFiniteLoss as e:
        message, code = f"stopped: {e}", 3
    except Stopped as e:
        message, code = f"stopped: {e}", e.code
    except KeyboardInterrupt:
        message, code = "interrupted; the last checkpoint is kept", 130
    if int(os.environ.get("RANK", 0)) == 0:   # every rank fails alike: one line is enough
        print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


# ============================================================================================
# Flags shared by all method files
# ============================================================================================
# Each method file adds its own flags (the method's symbols, its projector, its schedule) and its
# presets; these are the ones every file takes. A flag left unset takes its preset's value. Every
# value is checked when it is parsed: a bad one is a one-line error before anything runs.

class Parser(argparse.ArgumentParser):
    """argparse, with an error as one line (prog: error: argument --flag: ...) and exit status 2."""

    def error(self, message):
        raise UsageError(message)


def checked(convert, ok, accepts):
    """An argparse type: convert(text), accepted when ok(value); else "expected <accepts>"."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {accepts}, got {text!r}")
        return value
    return parse


POSITIVE_INT = checked(int, lambda v: v >= 1, "an integer >= 1")
COUNT = checked(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = checked(float, lambda v: 0 < v < math.inf, "a number > 0")
NONNEGATIVE = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
REAL = checked(float, math.isfinite, "a finite number")
RATE = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
AREA = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
IMAGE_SIZE = checked(int, lambda v: v >= 8, "an integer >= 8")
WIDTHS = checked(str, lambda v: re.fullmatch(r"[1-9][0-9]*(-[1-9][0-9]*)*", v) is not None,
                 "layer widths such as 2048-2048-64 (positive integers joined by '-')")


def add_shared_flags(p, presets):
    """Add the shared flag groups to parser p; returns the groups by name for the method's own."""
    groups = {name: p.add_argument_group(name)
              for name in ("data", "method", "network", "optimisation", "evaluation", "run")}
    g = groups["data"]
    g.add_argument("--data", default="synthetic",
                   help=f"preset name ({', '.join(presets)}) or a folder with train/ and val/")
    g.add_argument("--data-dir", help=f"where the dataset lives (default: ./data; Fashion-MNIST: "
                   f"{FASHION_MNIST_SYSTEM_DIR})")
    g.add_argument("--preset", help="preset for a folder given as --data (default: imagenet)")
    g.add_argument("--download", action="store_true", help="download CIFAR/STL with torchvision first")
    g.add_argument("--workers", type=COUNT, help="data-loader workers per process (default: the CPU cores "
                   "per process less one on CUDA, 0 on CPU)")
    g.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_true",
                   help="replace an image file that cannot be decoded by the next one, and count it")
    g.add_argument("--synthetic-train", dest="synthetic_train", type=POSITIVE_INT, help="synthetic: training images")
    g.add_argument("--synthetic-test", dest="synthetic_test", type=POSITIVE_INT, help="synthetic: test images")
    g = groups["network"]
    g.add_argument("--arch", choices=("resnet18", "resnet50"))
    g.add_argument("--stem", choices=("cifar", "imagenet"), help="3x3 stride-1 stem, no max-pool; or 7x7/2")
    g.add_argument("--image-size", dest="image_size", type=IMAGE_SIZE)
    g.add_argument("--crop-min-scale", dest="crop_min_scale", type=AREA,
                   help="smallest RandomResizedCrop area of the pretraining views")
    g.add_argument("--blur-sigma", dest="blur_sigma", type=NONNEGATIVE, help="largest Gaussian-blur sigma in pixels")
    g = groups["optimisation"]
    g.add_argument("--epochs", type=POSITIVE_INT)
    g.add_argument("--max-steps", dest="max_steps", type=POSITIVE_INT, help="stop after this many steps in all")
    g.add_argument("--batch-size", dest="batch_size", type=POSITIVE_INT, help="global batch (all processes)")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=NONNEGATIVE)
    g.add_argument("--wd", type=NONNEGATIVE, help="weight decay")
    g.add_argument("--momentum", type=RATE)
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), help="default: bf16 on CUDA, off on CPU")
    g = groups["evaluation"]
    g.add_argument("--probe", choices=("linear", "cached", "none"),
                   help="linear: the paper protocol; cached: fast cached-feature probe for short runs")
    g.add_argument("--probe-epochs", dest="probe_epochs", type=POSITIVE_INT)
    g.add_argument("--probe-lr", dest="probe_lr", type=POSITIVE)
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction,
                   help="also probe the randomly initialised backbone and raw pixels")
    g.add_argument("--knn-every", dest="knn_every", type=COUNT, help="kNN monitor every N epochs (0: off)")
    g.add_argument("--knn-bank", dest="knn_bank", type=POSITIVE_INT, default=20000,
                   help="at most this many training images in the kNN bank")
    g = groups["run"]
    g.add_argument("--gpus", type=POSITIVE_INT, default=1, help="local processes to start (CPU: gloo processes)")
    g.add_argument("--cpu", action="store_true", help="do not use CUDA even if present")
    g.add_argument("--compile", action="store_true", help="torch.compile the model's forward (opt-in)")
    g.add_argument("--threads", type=POSITIVE_INT, help="torch CPU threads per process")
    g.add_argument("--output-dir", dest="output_dir", help="checkpoints, metrics.jsonl, backbone.pt")
    g.add_argument("--save-every", dest="save_every", type=POSITIVE, default=30.0,
                   help="also checkpoint every this many minutes (default 30), besides every epoch")
    g.add_argument("--log-every", dest="log_every", type=POSITIVE_INT, default=10)
    g.add_argument("--seed", type=COUNT, default=0)
    return groups


def resolve(cfg, defaults, presets, prog):
    """Fill every unset flag from the preset (over the file's defaults); check what every method
    needs. Returns cfg."""
    is_path = cfg.data not in presets
    cfg.preset = cfg.preset or ("imagenet" if is_path else cfg.data)
    if cfg.preset not in presets:
        raise UsageError(f"unknown preset {cfg.preset!r}; choose from {', '.join(presets)}")
    if is_path:
        cfg.data_dir = cfg.data
    for k, v in {**defaults, **presets[cfg.preset]}.items():
        if getattr(cfg, k, None) is None:
            setattr(cfg, k, v)
    cfg.use_cuda = torch.cuda.is_available() and not cfg.cpu
    cfg.amp = cfg.amp or ("bf16" if cfg.use_cuda else "off")
    cfg.output_dir = cfg.output_dir or os.path.join("runs", f"{prog.removesuffix('.py')}-{cfg.preset}")
    if cfg.batch_size % cfg.gpus:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split evenly across --gpus {cfg.gpus}")
    if cfg.use_cuda and cfg.gpus > torch.cuda.device_count():
        raise UsageError(f"--gpus {cfg.gpus} but only {torch.cuda.device_count()} CUDA devices")
    return cfg


def out_dim(cfg):
    """D, the projector's output dimension."""
    return int(cfg.projector.split("-")[-1])


# ============================================================================================
# Photometric ops on a batch, one parameter per image
# ============================================================================================
# torchvision's formulas (the tests compare them with torchvision's functional ops image by
# image), on float images in [0, 1] of any device. The recipe that draws the parameters is in
# each method file (Augmentation, class Photometric).

def grayscale(x):
    """Luma (B, 3, H, W) -> (B, 1, H, W), torchvision's rgb_to_grayscale weights."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def blend(x, y, f):
    """f x + (1 - f) y clamped to [0, 1], one factor per image (torchvision's _blend): the
    brightness (y = 0), contrast (y = mean luma) and saturation (y = luma) ops; f = 1 is x."""
    f = f[:, None, None, None]
    return (f * x + (1 - f) * y).clamp(0, 1)


def hue(x, f):
    """Turn the HSV hue of image b by f[b] turns (f = 0: unchanged), keeping S and V. h from the
    channel holding V = max (R before G before B, as torchvision); back to RGB by
    V - C clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, n = 5, 3, 1 for R, G, B, C = max - min."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    c_safe = torch.where(c > 0, c, 1.0)   # grey pixels (C = 0): any h will do, they stay grey
    h = torch.where(v == r, (g - b) / c_safe, torch.where(v == g, 2 + (b - r) / c_safe, 4 + (r - g) / c_safe))
    k = torch.stack([(n + 6 * ((h / 6 + f[:, None, None]) % 1)) % 6 for n in (5, 3, 1)], 1)
    return v[:, None] - c[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


JITTER = {"brightness": lambda x, f: blend(x, torch.zeros_like(x), f),
          "contrast": lambda x, f: blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f),
          "saturation": lambda x, f: blend(x, grayscale(x), f), "hue": hue}


def gaussian_blur(x, sigma, taps):
    """Blur image b with its own sigma[b]: torchvision's kernel (`taps` samples of exp(-t^2 / 2
    sigma^2), normalised), separable, reflect padding. A sigma near 0 gives the identity."""
    B, C, H, W = x.shape
    t = torch.arange(taps, device=x.device, dtype=x.dtype) - (taps - 1) / 2
    kernel = torch.softmax(-(t / sigma[:, None]) ** 2 / 2, dim=1).repeat_interleave(C, 0)   # (B C, taps)
    y = F.pad(x.reshape(1, B * C, H, W), (taps // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=B * C)
    return F.conv2d(y, kernel[:, None, :, None], groups=B * C).reshape(B, C, H, W)


def solarize(x, on):
    """Invert the pixels at or above 128/255 (PIL's threshold 128) of the images with on[b]."""
    return torch.where(on[:, None, None, None] & (x >= 128 / 255), 1 - x, x)


# ============================================================================================
# Launching and distributed setup
# ============================================================================================
# One code path for every way of starting a run:
#   python x.py                     world size 1, no process group
#   python x.py --gpus N            this launcher starts N local processes on a free port
#   torchrun ... x.py               RANK/WORLD_SIZE/LOCAL_RANK come from torchrun (multi-node)
# CUDA runs use NCCL, CPU runs gloo (so `--gpus 2` on a CPU machine runs two CPU processes).

def free_port():
    """A TCP port that is free on this machine now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(local_rank, world_size, port, worker, cfg, prog):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_cli(lambda: worker(cfg), prog)


def launch(worker, cfg, prog):
    """Run `worker(cfg)` in this process (--gpus 1 or under torchrun) or in --gpus children. A
    stop signal the launcher gets goes on to every child, which stop together after a step."""
    nprocs = cfg.gpus
    if nprocs <= 1 or "RANK" in os.environ:
        worker(cfg)
        return
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(r, nprocs, port, worker, cfg, prog)) for r in range(nprocs)]
    for p in procs:
        p.start()
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: [os.kill(p.pid, signum) for p in procs if p.is_alive()])
    # Wait for all. After a failure, the others get a minute to end on their own (a stop signal
    # ends them all); then they are killed, as they would block in a collective forever.
    while any(p.exitcode is None for p in procs) and not any(p.exitcode for p in procs):
        time.sleep(0.2)
    deadline = time.time() + 60
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()
    failed = next((p.exitcode for p in procs if p.exitcode), 0)
    if failed:
        sys.exit(failed if failed > 0 else 1)


class Dist:
    """This process's place in the run: rank, world size and the device it computes on."""

    def __init__(self, use_cuda):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            # Every step has the same input sizes, so cuDNN may time its convolution algorithms
            # once and keep the fastest (a choice of algorithm, not of arithmetic precision).
            torch.backends.cudnn.benchmark = True
        else:
            self.device = torch.device("cpu")
        self.cpu_group = None   # the default group, or a gloo one beside NCCL for host-side flags
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo", device_id=self.device if use_cuda else None)
            if use_cuda:
                self.cpu_group = dist.new_group(backend="gloo")

    @property
    def is_main(self):
        return self.rank == 0

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def setup(cfg):
    """This process's place in the run; sets its CPU threads and, if unset, the loader workers.
    From here on a stop signal waits for the end of a training step (see StopRequest)."""
    d = Dist(cfg.use_cuda)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // d.local_world))
    if cfg.workers is None:   # on CPU, loader workers compete with the training threads for cores
        cfg.workers = max(1, (os.cpu_count() or 1) // d.local_world - 1) if cfg.use_cuda else 0
    d.stop = StopRequest()
    return d


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and keeps this rank's slice.

    Every rank computes the same loss on the same gathered batch, so each rank's copy of
    dL/d(gathered) is identical; summing them gives world * dL/dz_local, and DDP's gradient
    averaging divides by world again: the parameter gradient equals the single-process one.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x):
    """Concatenate x (N_local, ...) over ranks in rank order, keeping the autograd graph."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_shards(x, n):
    """Every rank's shard (see `shard`) of an n-row tensor, concatenated in rank order on every
    rank (evaluation features; no gradient). Shards are padded to one size for all_gather."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, per = dist.get_world_size(), math.ceil(n / dist.get_world_size())
    padded = x.new_zeros((per, *x.shape[1:]))
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:len(shard(n, r, world))] for r, p in enumerate(parts)])


# ============================================================================================
# Data: readers, image files, views, the sampler of global batches, loaders
# ============================================================================================

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"   # Debian's dataset-fashion-mnist
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def need(path, what):
    if not os.path.exists(path):
        raise UsageError(f"{what} not found at {path}")
    return path


def read_idx(path):
    """An MNIST-style idx file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_fashion_mnist(root, train):
    """Fashion-MNIST from its four idx .gz files; images come back as 1 x 28 x 28."""
    prefix = "train" if train else "t10k"
    x = read_idx(need(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), "Fashion-MNIST"))
    y = read_idx(need(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), "Fashion-MNIST"))
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def read_cifar(root, classes, train):
    """CIFAR-10/100 from the python pickle batches (the layout torchvision downloads)."""
    folder = need(os.path.join(root, "cifar-10-batches-py" if classes == 10 else "cifar-100-python"),
                  f"CIFAR-{classes}")
    if classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = b"labels"
    else:
        names, key = ["train" if train else "test"], b"fine_labels"
    xs, ys = [], []
    for name in names:
        with open(need(os.path.join(folder, name), f"CIFAR-{classes}"), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def read_stl10(root, split):
    """STL-10 binary files; split is 'train', 'test' or 'unlabeled' (labels -1)."""
    folder = need(os.path.join(root, "stl10_binary"), "STL-10")
    x = np.fromfile(need(os.path.join(folder, f"{split}_X.bin"), "STL-10"), dtype=np.uint8)
    x = x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # stored column-major per channel
    if split == "unlabeled":
        y = np.full(len(x), -1, dtype=np.int64)
    else:
        y = np.fromfile(os.path.join(folder, f"{split}_y.bin"), dtype=np.uint8).astype(np.int64) - 1
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


def download(name, root):
    """Fetch a torchvision dataset into root (only with --download; never in tests)."""
    tvd = torchvision.datasets
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "stl10": tvd.STL10}[name]
    splits = [{"split": "train+unlabeled"}, {"split": "test"}] if name == "stl10" else \
        [{"train": True}, {"train": False}]
    try:
        for split in splits:
            cls(root, download=True, **split)
    except Exception as e:   # no network, disk full, a bad archive: all end the run the same way
        raise UsageError(f"downloading {name} into {root} failed ({type(e).__name__}: {e})") from None


class TensorImages(torch.utils.data.Dataset):
    """In-memory uint8 images (N, C, H, W) with labels; grey images are repeated to 3 channels."""

    def __init__(self, images, labels):
        self.images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        self.targets = labels

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


class ImageFiles(torch.utils.data.Dataset):
    """Image files with labels (-1: unlabelled), decoded to RGB when an item is read. A file that
    cannot be decoded stops the run with one line naming it; with skip_bad it is replaced by the
    next readable file and counted in `skipped`, which the loader's workers share."""

    def __init__(self, paths, labels, skip_bad=False):
        self.paths, self.targets, self.skip_bad = paths, labels, skip_bad
        self.skipped = mp.get_context("spawn").Value("q", 0)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        for k in range(len(self.paths)):
            j = (i + k) % len(self.paths)
            try:
                with PIL.Image.open(self.paths[j]) as image:
                    return image.convert("RGB"), self.targets[j]
            except (OSError, ValueError, SyntaxError) as e:   # what PIL raises for a broken file
                if not self.skip_bad:
                    raise BadImage(f"cannot read image {self.paths[j]} ({type(e).__name__}: {e}); remove it or "
                                   "pass --skip-bad-images") from None
                with self.skipped.get_lock():
                    self.skipped.value += 1
        raise BadImage("no image of the folder can be read")


def image_files(root):
    """The image files under root, in any layout, sorted."""
    return sorted(os.path.join(folder, f) for folder, _, files in os.walk(root, followlinks=True)
                  for f in files if f.lower().endswith(IMAGE_EXTENSIONS))


def image_folder(root, skip_bad):
    """(train, val, number of classes) from root/train and root/val with one folder per class
    (torchvision's ImageFolder layout), or (all images under root, None, 0) without labels."""
    splits = [os.path.join(root, s) for s in ("train", "val")]
    if not all(os.path.isdir(s) for s in splits):
        paths = image_files(need(root, "image folder"))
        if not paths:
            raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        return ImageFiles(paths, [-1] * len(paths), skip_bad), None, 0
    classes = sorted(e.name for e in os.scandir(splits[0]) if e.is_dir())
    sets = []
    for split in splits:
        pairs = [(p, k) for k, c in enumerate(classes) for p in image_files(os.path.join(split, c))]
        if not pairs:
            raise UsageError(f"no images in class folders under {split}")
        sets.append(ImageFiles(*map(list, zip(*pairs)), skip_bad))
    return sets[0], sets[1], len(classes)


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
    """(pretraining set, probe training set, test set, number of classes) for cfg.data. A folder
    without train/ and val/ is read as unlabelled images: no probe set, no test set, 0 classes,
    and the label-based evaluation is switched off (cfg.unlabelled holds the number of images)."""
    if cfg.download and cfg.data in ("cifar10", "cifar100", "stl10"):
        download(cfg.data, cfg.data_dir or "data")
    try:
        data = _read_dataset(cfg)
    except UsageError as e:
        hint = {"fashionmnist": "pass --data-dir DIR with its idx .gz files, or apt-get install "
                                "dataset-fashion-mnist",
                "cifar10": "pass --data-dir DIR or --download", "cifar100": "pass --data-dir DIR or --download",
                "stl10": "pass --data-dir DIR or --download"}
        raise UsageError(f"{e}; " + hint.get(cfg.data, "pass --data DIR holding train/ and val/ class folders, "
                                                       "or a folder of images")) from None
    cfg.unlabelled = 0 if data[3] else len(data[0])
    if cfg.unlabelled:
        cfg.knn_every, cfg.probe, cfg.baseline = 0, "none", False
    return data


def _read_dataset(cfg):
    if cfg.data == "synthetic":
        train, test = (TensorImages(*make_synthetic(n, cfg.image_size, seed=cfg.seed + i))
                       for i, n in enumerate((cfg.synthetic_train, cfg.synthetic_test)))
        return train, train, test, len(SYNTHETIC_CLASSES)
    if cfg.data == "fashionmnist":
        root = cfg.data_dir or FASHION_MNIST_SYSTEM_DIR
        train, test = (TensorImages(*read_fashion_mnist(root, t)) for t in (True, False))
        return train, train, test, 10
    root = cfg.data_dir or "data"
    if cfg.data in ("cifar10", "cifar100"):
        classes = int(cfg.data[5:])
        train, test = (TensorImages(*read_cifar(root, classes, t)) for t in (True, False))
        return train, train, test, classes
    if cfg.data == "stl10":   # pretraining on train + unlabeled, probing on train
        labelled, test, unlabelled = (TensorImages(*read_stl10(root, s)) for s in ("train", "test", "unlabeled"))
        return torch.utils.data.ConcatDataset([labelled, unlabelled]), labelled, test, 10
    train, test, classes = image_folder(root, cfg.skip_bad_images)
    return train, (train if classes else None), test, classes


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of each global batch, as (dataset index, augmentation seed) pairs.

    Why not DistributedSampler: it deals indices round-robin (rank r gets perm[r::W]), so the set
    of images in a global batch depends on the world size, and a run can only resume at an epoch
    boundary. Here epoch e's order is one permutation drawn from (seed, e); global batch b is
    perm[b*B:(b+1)*B] and rank r takes the r-th contiguous slice of it. After the all-gather
    (rank order) every rank holds exactly the batch a single process would see, and a resume
    starts at any step by skipping whole batches without loading them. Each item also carries
    its own augmentation seed, so the views do not depend on the number of loader workers.
    `drop_last` is always on: the last incomplete global batch is dropped.
    """

    def __init__(self, n, global_batch, rank=0, world=1, seed=0):
        if global_batch % world:
            raise UsageError(f"--batch-size {global_batch} does not split across {world} processes")
        if n < global_batch:
            raise UsageError(f"the dataset has {n} images, fewer than one batch of {global_batch}")
        self.n, self.B, self.rank, self.world = n, global_batch, rank, world
        self.seed = seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.n // self.B - self.start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)   # one per (seed, epoch)
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        per_rank = self.B // self.world
        for b in range(self.start_batch, self.n // self.B):
            lo = b * self.B + self.rank * per_rank
            yield list(zip(order[lo:lo + per_rank].tolist(), seeds[lo:lo + per_rank].tolist()))


def shard(n, rank, world):
    """The contiguous slice of range(n) this rank evaluates (ranks' slices concatenate to all)."""
    per = math.ceil(n / world)
    return range(rank * per, min(n, (rank + 1) * per))


def _quiet_worker(worker_id):
    """Loader workers leave stop signals to the training process (a Ctrl-C reaches them too)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def make_loader(dataset, batch_sampler, cfg):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=cfg.workers,
                                       pin_memory=cfg.use_cuda, persistent_workers=cfg.workers > 0,
                                       worker_init_fn=_quiet_worker)


def eval_loader(base, transform, cfg, rank=0, world=1, batch=256):
    """This rank's contiguous shard of `base` (all of it by default), in order, with a fixed transform."""
    idx = list(shard(len(base), rank, world))
    batches = [[(i, 0) for i in idx[j:j + batch]] for j in range(0, len(idx), batch)]
    return make_loader(Views(base, [transform]), batches, cfg)


def to_device(x, cfg, d):
    """A batch of images on this process's device, channels_last on CUDA (faster convolutions)."""
    x = x.to(d.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if cfg.use_cuda else x


def augment(photometric, crops, step, cfg, d):
    """The photometric half of each view for this process's uint8 crops, on the device. The random
    choices are drawn for the whole global batch from a generator seeded by (seed, step, view), and
    each process takes its own rows: a step's views do not depend on the number of processes, and
    a resumed run draws what the uninterrupted one would have."""
    views = []
    for v, (p, x) in enumerate(zip(photometric, crops)):
        draw = p.draw(cfg.batch_size, torch.Generator().manual_seed((cfg.seed * 2**40 + step * 2**8 + v) % 2**63))
        rows = slice(d.rank * len(x), (d.rank + 1) * len(x))
        views.append(to_device(p(x.to(d.device, non_blocking=True), {k: t[rows] for k, t in draw.items()}), cfg, d))
    return views


# ============================================================================================
# A training run: resume, logs, the NaN check, checkpoints, stop signals
# ============================================================================================

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """SIGTERM, SIGUSR1 (a scheduler's warning) and Ctrl-C ask the run to stop after the current
    training step, with a checkpoint of that step. Outside training, or at a second signal, the
    run stops at once (the same signal delivered twice within a second counts once: a launcher
    forwards what its children may also get)."""

    def __init__(self):
        self.name, self.at, self.training = None, 0.0, False
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if not self.training or (self.name is not None and time.monotonic() - self.at > 1):
            raise KeyboardInterrupt
        if self.name is None:
            self.name, self.at = signal.Signals(signum).name, time.monotonic()


def autocast(cfg):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp, torch.float32)
    return torch.autocast("cuda" if cfg.use_cuda else "cpu", dtype=dtype, enabled=cfg.amp != "off")


def versions():
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform()}


class Logger:
    """Prints on rank 0 and appends JSON records to <output_dir>/metrics.jsonl."""

    def __init__(self, output_dir, is_main):
        self.is_main = is_main
        self.path = os.path.join(output_dir, "metrics.jsonl")

    def print(self, *a):
        if self.is_main:
            print(*a, flush=True)

    def record(self, **rec):
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **rec}) + "\n")


def config_dict(cfg):
    return {k: v for k, v in sorted(vars(cfg).items()) if isinstance(v, (int, float, str, bool, list, tuple))
            or v is None}


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Run:
    """The bookkeeping of a training run, around the loop of a method file: resume from the
    checkpoint of output_dir, logs, the NaN check, throughput, checkpoints (each epoch's end,
    every --save-every minutes, and at a stop signal, all processes stopping at the same step),
    and a warning when the embedding collapses."""

    def __init__(self, cfg, d, prog, own_presets, parts, collapsed=None):
        self.cfg, self.d, self.parts, self.collapsed = cfg, d, parts, collapsed
        self.ckpt = os.path.join(cfg.output_dir, "checkpoint.pt")
        self.step = restore_checkpoint(self.ckpt, parts, cfg)   # before anything is written
        self.total = min(cfg.epochs * cfg.steps_per_epoch, math.inf if cfg.max_steps is None else cfg.max_steps)
        self.pending = []   # the logs (device tensors) of the steps since the last read
        self.warned, self.saved_at = False, time.time()
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.log = Logger(cfg.output_dir, d.is_main)
        self.log.record(event="start", argv=sys.argv, config=config_dict(cfg), versions=versions(),
                        world_size=d.world, resumed_from_step=self.step)
        self.log.print(f"{prog}: world size {d.world}, device {d.device}, {cfg.steps_per_epoch} steps/epoch, "
                       f"{self.total} steps" + (f", resuming at step {self.step}" if self.step else ""))
        self.log.print("config: " + json.dumps(config_dict(cfg)))
        if cfg.preset in own_presets:
            self.log.print(f"note: preset '{cfg.preset}' is the project's own (small, untuned), not the paper's")
        if getattr(cfg, "unlabelled", 0):
            self.log.print(f"note: {cfg.data} has no train/ and val/ class folders: pretraining on its "
                           f"{cfg.unlabelled} images without labels; kNN and probes are skipped, the "
                           "effective ranks are the monitor")

    def steps(self, loader, sampler, on_epoch):
        """Yield (step, batch) from the step the run stands at to the last; the caller appends
        each step's logs to self.pending. After each epoch: read the logs (a NaN stops the run
        before it is saved), save a checkpoint, call on_epoch(epochs done), which returns the
        epoch's record."""
        cfg, start = self.cfg, time.time()
        images, waited = 0, 0.0
        self.d.stop.training = True
        self.skipped = getattr(getattr(loader.dataset, "base", None), "skipped", None)   # unreadable images
        while self.step < self.total:
            epoch, first = divmod(self.step, cfg.steps_per_epoch)
            sampler.set_epoch(epoch, first)
            asked = time.time()
            for batch, _ in self._batches(loader):
                waited += time.time() - asked   # blocked on the loader: a data bottleneck shows here
                yield self.step, batch
                self.step, images = self.step + 1, images + cfg.batch_size
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    self._report(epoch, images / (time.time() - start), waited / (time.time() - start))
                    start, images, waited = time.time(), 0, 0.0
                stop, save = self._agreed_flags()
                if stop or save:
                    self._save()
                if stop:
                    raise Stopped(f"{stop} at step {self.step}, saved in {self.ckpt}; run the same command "
                                  "again to resume", stop)
                if self.step == self.total:
                    break
                asked = time.time()
            self._save()
            if self.step % cfg.steps_per_epoch == 0:
                self.d.stop.training = False    # the step is saved: during the monitor a signal stops at once
                self._check_rank(on_epoch(self.step // cfg.steps_per_epoch))
                self.d.stop.training = True
        self.d.stop.training = False
        self.log.print(f"pretraining done: {self.step} steps")

    def _batches(self, loader):
        """The loader's batches. An unreadable image stops the run; in one process, the steps
        done before it are saved first (processes read different images: no common step)."""
        try:
            yield from loader
        except BadImage as e:
            if self.d.world > 1:
                raise
            self._save()
            raise BadImage(f"{e} (progress saved at step {self.step})") from None

    def _agreed_flags(self):
        """(the stop signal's name or None, whether --save-every minutes have passed), the same
        on every process: each process's flags reduced by a host-side collective."""
        name = self.d.stop.name
        flags = torch.tensor([signal.Signals[name].value if name else 0,
                              time.time() - self.saved_at > 60 * self.cfg.save_every])
        if self.d.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.d.cpu_group)
        return (signal.Signals(int(flags[0])).name if flags[0] else None), bool(flags[1])

    def _save(self):
        """A checkpoint of the step the run stands at, after the NaN check; then all processes
        wait for it to be written."""
        read_logs(self.pending, self.step, self.ckpt)
        if self.d.is_main:
            save_checkpoint(self.ckpt, self.parts, self.step, self.cfg)
        if self.d.world > 1:
            dist.barrier(group=self.d.cpu_group)
        self.saved_at = time.time()

    def _report(self, epoch, rate, wait):
        logs, lr, cfg = read_logs(self.pending, self.step, self.ckpt), self.parts["optimizer"].param_groups[0]["lr"], \
            self.cfg
        self._warn(self.collapsed and self.collapsed(logs, cfg))
        if self.skipped is not None and self.skipped.value:
            logs["skipped_images"] = self.skipped.value
        parts = " ".join(f"{k} {v:.5g}" for k, v in logs.items())
        self.log.print(f"ep {epoch + 1}/{cfg.epochs} step {self.step}/{self.total} {parts} lr {lr:.4g} "
                       f"{rate:.1f} img/s data wait {100 * wait:.0f}% "
                       f"ETA {format_time((self.total - self.step) * cfg.batch_size / rate)}")
        self.log.record(event="train", epoch=epoch + 1, step=self.step, lr=lr, img_per_s=rate, data_wait=wait,
                        **logs)

    def _check_rank(self, record):
        if record and record.get("rank_embedding", math.inf) < 1.5:
            self._warn(f"effective rank of the embedding {record['rank_embedding']:.3g}")

    def _warn(self, reason):
        """One line, once per run, when the embedding looks collapsed, with what to try."""
        if reason and not self.warned:
            self.warned = True
            self.log.print(f"warning: the embedding looks collapsed at step {self.step} ({reason}); try a "
                           "lower --lr or a longer --warmup-epochs")
            self.log.record(event="collapse", step=self.step, reason=reason)


def read_logs(pending, step, ckpt_path):
    """The logs of the last step, reading those of every step since the last call (`pending`,
    device tensors; emptied) in one host sync. Raises at the first non-finite loss: its step and
    the ones after it have not been saved, so the last checkpoint is good."""
    if not pending:
        return {}
    rows = torch.stack([torch.stack([v.double() for v in logs.values()]) for logs in pending]).tolist()
    for k, row in enumerate(rows):
        loss = dict(zip(pending[k], row))["loss"]
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss} at step {step - len(rows) + k + 1}; the last "
                                f"good checkpoint {ckpt_path} is kept (try a lower --lr)")
    logs = dict(zip(pending[-1], rows[-1]))
    pending.clear()
    return logs


# ============================================================================================
# Checkpoint I/O
# ============================================================================================

def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash mid-write never
    leaves a half-written checkpoint in place of a good one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Load a checkpoint with weights_only=True; a file that cannot be read is a UsageError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and size errors all mean the same thing to the user
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}); "
                         "move it away or choose another --output-dir") from None


def save_checkpoint(path, parts, step, cfg):
    """parts: {"model": module, ...}; each saved as its state_dict, with the step, the RNG state
    and what a resume must match."""
    atomic_save({**{k: v.state_dict() for k, v in parts.items()}, "step": step, "rng": torch.get_rng_state(),
                 "batch_size": cfg.batch_size, "preset": cfg.preset}, path)


def restore_checkpoint(path, parts, cfg):
    """Load path into parts if it exists (before anything is written: a bad checkpoint loses
    nothing); returns the step to continue from (0 without a checkpoint)."""
    if not os.path.exists(path):
        return 0
    ckpt = load_checkpoint(path)
    if (ckpt.get("batch_size"), ckpt.get("preset")) != (cfg.batch_size, cfg.preset):
        raise UsageError(f"{path} was written with --batch-size {ckpt.get('batch_size')} and preset "
                         f"{ckpt.get('preset')}; resume with the same or choose another --output-dir")
    try:
        for k, v in parts.items():
            v.load_state_dict(ckpt[k])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UsageError(f"{path} does not match this model ({type(e).__name__}); "
                         "choose another --output-dir") from None
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"]


# ============================================================================================
# Evaluation plumbing: features, accuracy, effective rank
# ============================================================================================

@torch.no_grad()
def extract(backbone, base, transform, cfg, d):
    """Backbone features (eval mode) and labels of the whole of `base`, on every rank."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for (x,), y in eval_loader(base, transform, cfg, d.rank, d.world):
        with autocast(cfg):
            feats.append(backbone(to_device(x, cfg, d)).float())
        labels.append(y.to(d.device))
    backbone.train(was_training)
    feats = torch.cat(feats) if feats else torch.empty(0, 0, device=d.device)   # a rank with no shard
    labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=d.device)
    return gather_shards(feats, len(base)), gather_shards(labels, len(base))


def topk(logits, y, ks=(1, 5)):
    """Top-k accuracies in % (k not below the number of classes is skipped)."""
    hit = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices == y[:, None]
    return {f"top{k}": 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks if k < logits.shape[1]}


def rankme(x, eps=1e-7):
    """Effective rank of a batch of embeddings x (N, D) (RankMe, Garrido et al., ICML 2023): exp of
    the entropy of its singular values normalised to sum 1; 1 for a collapsed embedding."""
    sigma = torch.linalg.svdvals(x.double())
    p = sigma / sigma.sum() + eps
    return (-(p * p.log()).sum()).exp().item()


def log_epoch(log, epoch, record):
    """Print and record an epoch's diagnostics; returns them."""
    log.print(f"  epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in record.items()))
    log.record(event="epoch", epoch=epoch, **record)
    return record


def report_probes(log, protocol, results):
    """Print and record the final probe's accuracies, {backbone name: {metric: value}}."""
    label = {"linear": "linear probe (paper protocol)", "cached": "cached-feature probe (fast, no aug)"}[protocol]
    for name, acc in results.items():
        log.print(f"{label}, {name} backbone: " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    log.record(event="probe", protocol=protocol, **results)


# ============================================================================================
# Synthetic dataset: class-structured images made in memory (no download)
# ============================================================================================
# Ten pattern classes that fill the image (stripes, checks, dots, rings, ...), each drawn with a
# random period, phase and small rotation, in two random grey levels under a random tint, with a
# little pixel noise. Brightness, contrast and tint are nuisances shared by all classes; the
# pattern survives random crops and horizontal flips (no class is the mirror image of another),
# so the augmentations of the recipe keep the class while changing the nuisances. That is the
# situation self-supervised learning is built for, and it makes learning visible within minutes
# of CPU training. Features of a random network mostly follow the nuisances, so the
# random-initialisation baseline stays low.

SYNTHETIC_CLASSES = ("h-stripes", "v-stripes", "checker", "dots", "rings", "grid", "cross-hatch",
                     "diamonds", "waves", "blobs")


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
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                            align_corners=False)[:, 0].numpy()
    masks = [fv < 0.5, fu < 0.5, (np.floor(u) + np.floor(v)) % 2 == 0,
             (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.09, r % 1 < 0.5, (fu < 0.3) | (fv < 0.3),
             ((u + v) % 1 < 0.3) | ((u - v) % 1 < 0.3), np.abs(fu - 0.5) + np.abs(fv - 0.5) < 0.3,
             (v + 0.35 * np.sin(2 * np.pi * u / 2)) % 1 < 0.5, field > 0]
    return np.stack(masks, axis=1)


def make_synthetic(n, size=32, seed=0):
    """n images (uint8, n x 3 x size x size) and balanced labels, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SYNTHETIC_CLASSES)
    rng.shuffle(labels)
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    for lo in range(0, n, 512):                                   # chunks bound the memory
        k = min(512, n - lo)
        mask = _pattern_masks(size, k, rng)[np.arange(k), labels[lo:lo + k]][:, None]
        # Two random grey levels under a mild random tint: brightness, contrast and a little
        # colour, the nuisances that the recipe's colour jitter varies between views.
        tint = rng.uniform(0.6, 1.0, (k, 3, 1, 1))
        fg, bg = rng.uniform(0, 1, (k, 1, 1, 1)) * tint, rng.uniform(0, 1, (k, 1, 1, 1)) * tint
        img = np.where(mask, fg, bg) + rng.normal(0, 0.03, (k, 3, size, size))
        images[lo:lo + k] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
