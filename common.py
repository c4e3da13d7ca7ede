"""Shared plumbing for the four method scripts.

Only code that cannot change a reported number lives here: process launching and distributed
setup, the sampler that splits a global batch across processes, logging, checkpoint I/O, raw
dataset readers and the synthetic dataset. Losses, networks, augmentations, optimisers, schedules
and the evaluation protocol stay in each method file, where a reader of that method expects them.
"""
import gzip
import json
import math
import os
import pickle
import platform
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2, no traceback."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: the run stops, the last good checkpoint stays."""


def run_cli(main, prog):
    """Run `main()`, turning the errors a user can cause into one clear line on stderr."""
    try:
        main()
        return
    except UsageError as e:
        message, code = f"error: {e}", 2
    except NonFiniteLoss as e:
        message, code = f"stopped: {e}", 3
    except KeyboardInterrupt:
        message, code = "interrupted; the last checkpoint is kept", 130
    if int(os.environ.get("RANK", 0)) == 0:   # every rank fails alike: one line is enough
        print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


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


def launch(worker, cfg, nprocs, prog):
    """Run `worker(cfg)` in this process (nprocs == 1 or under torchrun) or in nprocs children."""
    if nprocs <= 1 or "RANK" in os.environ:
        worker(cfg)
        return
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(r, nprocs, port, worker, cfg, prog)) for r in range(nprocs)]
    for p in procs:
        p.start()
    # Wait for all; if one fails, stop the others (they would block in a collective forever).
    failed = 0
    while any(p.is_alive() for p in procs) and not failed:
        for p in procs:
            p.join(timeout=0.2)
            if p.exitcode not in (None, 0):
                failed = p.exitcode
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join()
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
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo",
                                    device_id=self.device if use_cuda else None)

    @property
    def is_main(self):
        return self.rank == 0

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


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


# ============================================================================================
# Logging
# ============================================================================================

def versions():
    import torchvision
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


def batch_sizes(text):
    """argparse type of --bench-sizes: "128,256" -> [128, 256]. A UsageError (not argparse's
    ArgumentTypeError, which prints the whole usage) makes a bad value a one-line error."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"--bench-sizes expects comma-separated positive integers, got {text!r}")
    return values


def device_name(device):
    """The processor a benchmark ran on, in words (for the figures it prints)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} logical cores"


def timed(fn, device):
    """Seconds one call of fn takes, with the device's queued work finished before and after
    (CUDA kernels run asynchronously: without the syncs the clock would stop at the launch)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


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


# ============================================================================================
# Raw dataset readers: each returns (images uint8 N x C x H x W, labels int64 N)
# ============================================================================================

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"   # Debian's dataset-fashion-mnist


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
    import torchvision.datasets as tvd
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "stl10": tvd.STL10}[name]
    splits = [{"split": "train+unlabeled"}, {"split": "test"}] if name == "stl10" else \
        [{"train": True}, {"train": False}]
    try:
        for split in splits:
            cls(root, download=True, **split)
    except Exception as e:   # no network, disk full, a bad archive: all end the run the same way
        raise UsageError(f"downloading {name} into {root} failed ({type(e).__name__}: {e})") from None


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
