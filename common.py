"""A toolbox of mechanics for the four method files; nothing here decides what a run does next
(each method file's train() holds the loop): the command line, processes, datasets and the
sampler, checkpoints, stop signals, logging, feature extraction. image_ops.py: the photometric formulas.
"""
import argparse
import collections
import datetime
import gzip
import hashlib
import json
import math
import os
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
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision

import synthetic


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2, no traceback. Every
    process meets it alike (one line, from rank 0) unless `rank_local` (one rank's own images)."""
    rank_local = False


class BadImage(UsageError):
    """An undecodable image file; from a loader worker it arrives in a traceback ending in the message."""
    rank_local = True

    def __init__(self, message):
        super().__init__(re.sub(r"^\S*BadImage: ", "", message.strip().splitlines()[-1]))


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: the run stops, saving nothing more."""


class Stopped(Exception):
    """A stop signal (SIGTERM, SIGUSR1, Ctrl-C) ended the run after a step it saved."""

    def __init__(self, signal_name, step, ckpt):
        super().__init__(f"{signal_name} at step {step}, saved in {ckpt}; run the same command again to resume")
        self.code = 128 + signal.Signals[signal_name].value    # the shell's code for that signal


def note(message):
    """One line from rank 0: something the user should know, not an error."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"note: {message}", flush=True)


def run_cli(main, prog):
    """Run `main()`, turning the errors a user can cause into one clear line on stderr, printed by the
    process that met it (rank 0 for what all meet alike); a process whose collective failed because
    another one ended says nothing more. The exit status is never 0 after an error."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    speaks = rank == 0
    try:
        return main()
    except UsageError as e:
        who = f"rank {rank}: " if world > 1 and e.rank_local else ""   # a process's own error names it
        message, code, speaks = f"{who}error: {e}", 2, speaks or e.rank_local
    except (NonFiniteLoss, Stopped) as e:
        message, code = f"stopped: {e}", getattr(e, "code", 3)
    except KeyboardInterrupt:
        message, code = f"interrupted; {saved_note()}", 130
    except RuntimeError as e:   # a collective failed because another process ended: gloo's error or NCCL's
        if world == 1 or not (isinstance(e, dist.DistError) or "gloo/" in str(e)):
            raise
        message, code, speaks = "", 1, False
    if speaks:
        print(f"{prog}: {message}", file=sys.stderr)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # else torch's handler reports the workers killed below
    for child in mp.active_children():   # loader workers, deaf to SIGTERM (_quiet_worker): exit would wait on them
        child.kill()
    sys.exit(code)


# ============================================================================================
# The command line
# ============================================================================================
# The flags every file takes. No flag has an argparse default: one left unset takes its preset's
# value, else the file's DEFAULTS. Every value is checked when it is parsed.

class Parser(argparse.ArgumentParser):
    """argparse, with an error as one line (prog: error: argument --flag: ...) and exit status 2."""

    def error(self, message):
        raise UsageError(message)


def checked(convert, ok, accepts):
    """An argparse type: convert(text), accepted when ok(value); else "expected <accepts>"."""
    def parse(text):
        try:
            if ok(value := convert(text)):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected {accepts}, got {text!r}")
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


SHARED_FLAGS = [   # (group, flag, type, or choices, or "switch" / "on-off", help)
    ("data", "--data", str, "a preset ({presets}) or a folder: class folders in train/ and val/, or any images"),
    ("data", "--data-dir", str, "where a preset's dataset lives (default ./data; Fashion-MNIST: Debian's folder)"),
    ("data", "--preset", str, "the preset of a folder given as --data (default imagenet)"),
    ("data", "--download", "switch", "download CIFAR/STL with torchvision first"),
    ("data", "--workers", COUNT, "loader workers per process (default: its cores less one on CUDA, 0 on CPU)"),
    ("data", "--skip-bad-images", "switch", "replace an image that cannot be decoded by the next one, and count it"),
    ("data", "--synthetic-train", POSITIVE_INT, "synthetic: training images"),
    ("data", "--synthetic-test", POSITIVE_INT, "synthetic: test images"),
    ("network", "--arch", ("resnet18", "resnet50"), None), ("network", "--image-size", IMAGE_SIZE, None),
    ("network", "--stem", ("cifar", "imagenet"), "3x3 stride-1 stem without max-pool, or 7x7/2"),
    ("network", "--crop-min-scale", AREA, "smallest RandomResizedCrop area of the pretraining views"),
    ("network", "--blur-sigma", NONNEGATIVE, "largest Gaussian-blur sigma in pixels"),
    ("optimisation", "--epochs", POSITIVE_INT, None), ("optimisation", "--warmup-epochs", NONNEGATIVE, None),
    ("optimisation", "--max-steps", POSITIVE_INT, "stop after this many steps in all"),
    ("optimisation", "--batch-size", POSITIVE_INT, "global batch (all processes)"),
    ("optimisation", "--wd", NONNEGATIVE, "weight decay"), ("optimisation", "--momentum", RATE, None),
    ("optimisation", "--amp", ("bf16", "fp16", "off"), "default: bf16 on CUDA, off on CPU"),
    ("evaluation", "--probe", ("linear", "cached", "none"), "linear: the paper's protocol; cached: fast, short runs"),
    ("evaluation", "--probe-epochs", POSITIVE_INT, None),
    ("evaluation", "--probe-batch", POSITIVE_INT, "linear probe: global batch"),
    ("evaluation", "--probe-lr", POSITIVE, "linear probe: base learning rate"),
    ("evaluation", "--probe-lr-scaling", ("none", "batch/256"), "linear probe: base LR x batch/256, or not"),
    ("evaluation", "--probe-warmup-steps", COUNT, "linear probe: steps of linear warm-up from 0"),
    ("evaluation", "--probe-schedule", ("cosine", "cosine-steps", "step"),
     "linear probe: cosine per epoch to lr/100, per step to 0, or x0.1 every 20 epochs"),
    ("evaluation", "--probe-head-ema", RATE, "linear probe: report a zero-debiased EMA of the head (0: the head)"),
    ("evaluation", "--baseline", "on-off", "also probe the randomly initialised backbone and raw pixels"),
    ("evaluation", "--knn-every", COUNT, "kNN monitor every N epochs (0: off)"),
    ("evaluation", "--knn-bank", POSITIVE_INT, "training images in the kNN monitor's bank, at most"),
    ("run", "--gpus", POSITIVE_INT, "local processes to start (CPU: gloo processes)"),
    ("run", "--cpu", "switch", "do not use CUDA even if present"),
    ("run", "--compile", "switch", "torch.compile the model (opt-in)"),
    ("run", "--threads", POSITIVE_INT, "torch CPU threads per process (default: its cores)"),
    ("run", "--output-dir", str, "checkpoints, metrics.jsonl, backbone.pt (default: runs/<file>-<preset>)"),
    ("run", "--save-every", POSITIVE, "also checkpoint every this many minutes"),
    ("run", "--log-every", POSITIVE_INT, "steps between logs, NaN checks and stop or save checks"),
    ("run", "--seed", COUNT, None)]


def add_shared_flags(p, presets):
    """Add SHARED_FLAGS and --print-config to parser p; returns the groups for the method's flags."""
    groups = {g: p.add_argument_group(g) for g in ("data", "method", "network", "optimisation", "evaluation", "run")}
    for group, flag, kind, text in SHARED_FLAGS:
        kind = {"switch": dict(action="store_true", default=None), "on-off": dict(action=argparse.BooleanOptionalAction)
                }.get(kind, dict(choices=kind) if isinstance(kind, tuple) else dict(type=kind))
        groups[group].add_argument(flag, help=text and text.format(presets=", ".join(presets)), **kind)
    groups["run"].add_argument("--print-config", action="store_true",
                               help="print every value of this command and where it comes from; then exit")
    return groups


def resolve(p, argv, defaults, presets):
    """Parse argv; a flag left unset takes the preset's value, else DEFAULTS' (cfg.sources: which)."""
    for a in p._actions:   # --help: each flag's default and the presets that set their own (not for a --no-X)
        if a.dest in defaults and a.help != argparse.SUPPRESS and a.const is not False:
            own = [name for name in presets if a.dest in presets[name]]
            shown = [f"default {defaults[a.dest]}"] * (defaults[a.dest] is not None and len(own) < len(presets)) + [
                f"set by {'every preset' if len(own) == len(presets) else 'presets ' + ', '.join(own)}"] * bool(own)
            a.help = f"{a.help or ''} [{'; '.join(shown)}]".strip() if shown else a.help
    cfg = p.parse_args(argv)
    given = {k for k, v in vars(cfg).items() if v is not None and k != "print_config"}
    assert set(vars(cfg)) - {"print_config"} <= set(defaults), "every flag needs its DEFAULTS entry"
    data = cfg.data or defaults["data"]
    if cfg.data_dir and not cfg.data:
        raise UsageError("--data-dir says where a preset's dataset lives: pass --data too (a preset or a folder)")
    if cfg.preset and data in presets and cfg.preset != data:
        raise UsageError(f"--preset sets the recipe of a folder given as --data; --data {data} is a preset itself")
    name = cfg.preset or ("imagenet" if data not in presets else data)
    if name not in presets:
        raise UsageError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
    for k in defaults:
        if k not in given:
            setattr(cfg, k, presets[name].get(k, defaults[k]))
    cfg.preset = name
    cfg.sources = {k: "flag" if k in given else "preset" if k in presets[name] else "default" for k in defaults}
    if cfg.batch_size % cfg.gpus:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split evenly across --gpus {cfg.gpus}")
    if not cfg.cpu and torch.cuda.is_available() and cfg.gpus > torch.cuda.device_count():
        raise UsageError(f"--gpus {cfg.gpus} but only {torch.cuda.device_count()} CUDA devices")
    return cfg


def print_config(cfg, prog):
    """--print-config: every value, and whether the command, its preset or the file's default set it."""
    print(f"{prog} --data {cfg.data} (preset {cfg.preset}); None: derived when the run starts")
    for k, source in cfg.sources.items():
        print(f"  {k:<20} {getattr(cfg, k)!r:<40} {source}")


def out_dim(cfg):
    """D, the projector's output dimension."""
    return int(cfg.projector.split("-")[-1])


class Config(argparse.Namespace):
    """The configuration of a started run (see derive): read-only, so that nothing changes it."""

    def __setattr__(self, name, value):
        raise AttributeError(f"cfg.{name}: the configuration is fixed once the run starts")


def derive(cfg, data, proc, prog):
    """The one block that computes values, from cfg, the data and this process: the run's Config."""
    # The cores this process may run on (what SLURM, cgroups or taskset allow), not the machine's.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = max(1, cores // proc.local_world)
    cuda = proc.device.type == "cuda"
    steps_per_epoch = len(data.pretrain) // cfg.batch_size
    derived = dict(use_cuda=cuda, amp=cfg.amp or ("bf16" if cuda else "off"), threads=cfg.threads or per_process,
                   workers=cfg.workers if cfg.workers is not None else (per_process - 1 if cuda else 0),
                   output_dir=cfg.output_dir or os.path.join("runs", f"{prog.removesuffix('.py')}-{cfg.preset}" + (
                       "" if cfg.data == cfg.preset else "-" + os.path.basename(os.path.normpath(cfg.data)))),
                   steps_per_epoch=steps_per_epoch, labelled=data.classes > 0,
                   total_steps=min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf))
    # Raw pixels as features: 150,528 floats a 224-px image, 30 GB for ImageNet's 50,000 test images.
    raw_gb = cfg.baseline and cfg.probe != "none" and derived["labelled"] and 12 * cfg.image_size ** 2 * (
        len(data.test) + (len(data.probe) if cfg.probe == "cached" else 0)) / 2**30
    if raw_gb > 4:
        raise UsageError(f"--baseline would gather {raw_gb:.0f} GB of raw-pixel features on every process; "
                         "pass --no-baseline")
    if proc.is_main:
        print(f"{prog}: derived " + " ".join(f"{k} {v}" for k, v in derived.items()), flush=True)
    fixed = Config()
    fixed.__dict__.update(vars(cfg), **derived)
    return fixed


# ============================================================================================
# Processes: launching, the process group, gathers
# ============================================================================================
# One code path for every way of starting a run:
#   python x.py                     world size 1, no process group
#   python x.py --gpus N            this launcher starts N local processes on a free port
#   torchrun ... x.py               RANK/WORLD_SIZE/LOCAL_RANK come from torchrun (multi-node)
# CUDA runs use NCCL, CPU runs gloo (so `--gpus 2` on a CPU machine runs two CPU processes).

def free_port():
    """A TCP port free on this machine now (the OS picks it)."""
    with socket.socket() as s:
        return s.bind(("127.0.0.1", 0)) or s.getsockname()[1]


def _child(local_rank, world_size, port, worker, cfg, prog):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_cli(lambda: worker(cfg), prog)


def launch(worker, cfg, prog):
    """Run `worker(cfg)` in this process (--gpus 1 or under torchrun) or in --gpus children. A
    stop signal the launcher gets goes on to every child, which stop together after a step."""
    if cfg.gpus <= 1 or "RANK" in os.environ:
        worker(cfg)
        return
    if cfg.cpu or not torch.cuda.is_available():
        note(f"no CUDA: --gpus {cfg.gpus} starts {cfg.gpus} CPU processes (gloo), fine for a test, slow for a run")
    port, ctx = free_port(), mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(r, cfg.gpus, port, worker, cfg, prog)) for r in range(cfg.gpus)]
    for p in procs:
        p.start()
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: [os.kill(p.pid, signum) for p in procs if p.is_alive()])
    # After a failure the others get a minute to end (a stop signal ends all), then are killed.
    while any(p.exitcode is None for p in procs) and not any(p.exitcode for p in procs):
        time.sleep(0.2)
    deadline = time.time() + 60
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.time()))
        p.kill()   # a no-op for a process that has ended
    codes = [p.exitcode for p in procs]   # the highest status (2: bad input), 1 for a killed child
    sys.exit(max(codes) if max(codes) > 0 else 1 if min(codes) < 0 else 0)


class ThisProcess:
    """This process's place in the run: rank, world size, device, process group, stop requests."""

    def __init__(self, cfg):
        env = {k: int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        self.rank, self.world, self.local_rank = env["RANK"], env["WORLD_SIZE"] or 1, env["LOCAL_RANK"]
        self.local_world, self.is_main = env["LOCAL_WORLD_SIZE"] or self.world, env["RANK"] == 0
        cuda = torch.cuda.is_available() and not cfg.cpu
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
            # Same input sizes every step: cuDNN may time its algorithms once (not a precision change).
            torch.backends.cudnn.benchmark = True
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        # Host-side flags go through gloo: the default group, or one beside NCCL.
        self.cpu_group = dist.new_group(backend="gloo") if self.world > 1 and cuda else None
        self.stop = StopRequest()

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the ranks' gradients (the same loss everywhere: world * dL/dz) and
    keeps this rank's slice; DDP's averaging divides by world: the single-process gradient."""

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
    return _GatherWithGrad.apply(x) if dist.is_available() and dist.is_initialized() else x


def gather_shards(x, n):
    """Every rank's shard (see `shard`) of an n-row tensor, concatenated in rank order on every
    rank (evaluation features; no gradient). Shards are padded to one size for all_gather."""
    if not (dist.is_available() and dist.is_initialized()):
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

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"   # Debian's dataset-fashion-mnist
TORCHVISION_SETS = ("cifar10", "cifar100", "stl10")   # what --download fetches
FASHION_MNIST_HINT = "pass --data-dir DIR with its idx .gz files, or apt-get install dataset-fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
Datasets = collections.namedtuple("Datasets", "pretrain probe test classes")   # classes 0: unlabelled


def read_fashion_mnist(root, train):
    """Fashion-MNIST (N x 1 x 28 x 28 uint8, labels) from the idx .gz files of Debian's package
    (torchvision reads only uncompressed ones): a 16-byte header before the images, 8 before labels."""
    def idx(name, header):
        path = os.path.join(root, f"{'train' if train else 't10k'}-{name}-ubyte.gz")
        if not os.path.exists(path):
            raise UsageError(f"Fashion-MNIST not found at {path}")
        with gzip.open(path) as f:
            return torch.from_numpy(np.frombuffer(f.read(), np.uint8, offset=header).copy())
    return idx("images-idx3", 16).reshape(-1, 1, 28, 28), idx("labels-idx1", 8).long()


def torchvision_dataset(name, root, download):
    """(pretrain, probe, test) of CIFAR-10/100 or STL-10 (train + unlabeled) by torchvision, in memory."""
    tvd = torchvision.datasets
    try:
        if name == "stl10":
            sets = [tvd.STL10(root, split=s, download=download) for s in ("train", "unlabeled", "test")]
            train, unlabelled, test = (tensor_images(torch.from_numpy(s.data), torch.tensor(s.labels)) for s in sets)
            return torch.utils.data.ConcatDataset([train, unlabelled]), train, test
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        sets = [cls(root, train=t, download=download) for t in (True, False)]
    except (RuntimeError, OSError, ValueError) as e:   # missing or corrupt files, no network, disk full
        raise UsageError(f"{name} not readable in {root} ({type(e).__name__}: {e})") from None
    train, test = (tensor_images(torch.from_numpy(s.data).permute(0, 3, 1, 2), torch.tensor(s.targets)) for s in sets)
    return train, train, test


def tensor_images(images, labels):
    """In-memory uint8 images (N, C, H, W) and labels; grey images are repeated to 3 channels."""
    return torch.utils.data.TensorDataset(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images, labels)


class ImageFiles(torch.utils.data.Dataset):
    """Image files (paths relative to root) with labels (-1: unlabelled), decoded to RGB when read. An
    undecodable one stops the run with one line, or with skip_bad is replaced by the next and counted in
    `skipped` (shared). The paths are one bytes object and an array of ends, the labels one array: at
    ImageNet's 1.28 M files, two objects that forked loader workers share, not 1.28 M Python strings."""

    def __init__(self, root, paths, labels, skip_bad=False):
        encoded = [os.fsencode(p) for p in paths]
        self.root, self.blob, self.skip_bad = root, b"".join(encoded), skip_bad
        self.ends = np.cumsum([len(p) for p in encoded], dtype=np.int64)
        self.targets = np.asarray(labels, dtype=np.int64)
        self.skipped = mp.get_context("spawn").Value("q", 0)

    def __len__(self):
        return len(self.ends)

    def path(self, i):
        return os.path.join(self.root, os.fsdecode(self.blob[self.ends[i - 1] if i else 0:self.ends[i]]))

    def __getitem__(self, i):
        for k in range(len(self)):   # image i, or with skip_bad the first readable one after it
            j = (i + k) % len(self)
            try:
                with PIL.Image.open(self.path(j)) as image:
                    return image.convert("RGB"), int(self.targets[j])
            except (OSError, ValueError, SyntaxError) as e:   # what PIL raises for a broken file
                if not self.skip_bad:
                    raise BadImage(f"cannot read image {self.path(j)} ({type(e).__name__}: {e}); remove it or "
                                   "pass --skip-bad-images") from None
                with self.skipped.get_lock():
                    self.skipped.value += 1
        raise BadImage("no image of the folder can be read")


def image_files(root):
    """The image files under root, in any layout, sorted, as paths relative to root."""
    return sorted(os.path.relpath(os.path.join(folder, f), root) for folder, _, files in os.walk(root, followlinks=True)
                  for f in files if f.lower().endswith(IMAGE_EXTENSIONS))


def image_folder(root, skip_bad):
    """(train, val, classes) from root/{train,val}/<class>/ (ImageFolder's layout), else (all, None, 0)."""
    if not os.path.isdir(root):
        raise UsageError(f"{root} is a file, not a folder" if os.path.exists(root) else
                         f"image folder not found at {root}")
    splits = [os.path.join(root, s) for s in ("train", "val")]
    if not all(os.path.isdir(s) for s in splits):
        paths = image_files(root)
        if not paths:
            raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        return ImageFiles(root, paths, [-1] * len(paths), skip_bad), None, 0
    classes, sets = sorted(e.name for e in os.scandir(splits[0]) if e.is_dir()), []
    for split in splits:
        per_class = [image_files(os.path.join(split, c)) for c in classes]
        if not any(per_class):
            raise UsageError(f"no images in class folders under {split}")
        sets.append(ImageFiles(split, [os.path.join(c, p) for c, ps in zip(classes, per_class) for p in ps],
                               np.repeat(np.arange(len(classes)), [len(ps) for ps in per_class]), skip_bad))
    return sets[0], sets[1], len(classes)


def load_datasets(cfg, presets):
    """Datasets(pretrain, probe, test, classes) of cfg.data: a preset's dataset, or a folder (classes 0: unlabelled)."""
    root = cfg.data_dir or "data"
    try:
        if cfg.data == "synthetic":
            train, test = (tensor_images(*synthetic.make(n, cfg.image_size, seed=cfg.seed + i))
                           for i, n in enumerate((cfg.synthetic_train, cfg.synthetic_test)))
            return Datasets(train, train, test, len(synthetic.CLASSES))
        if cfg.data == "fashionmnist":
            train, test = (tensor_images(*read_fashion_mnist(cfg.data_dir or FASHION_MNIST_DIR, t)) for t in (1, 0))
            return Datasets(train, train, test, 10)
        if cfg.data in TORCHVISION_SETS:
            return Datasets(*torchvision_dataset(cfg.data, root, cfg.download), 100 if cfg.data == "cifar100" else 10)
        # A folder: --data DIR, or a preset of one (imagenet, ...) with --data-dir DIR.
        train, test, classes = image_folder(root if cfg.data in presets else cfg.data, cfg.skip_bad_images)
        return Datasets(train, train if classes else None, test, classes)
    except UsageError as e:
        hint = (FASHION_MNIST_HINT if cfg.data == "fashionmnist" else
                "pass --data-dir DIR or --download" if cfg.data in TORCHVISION_SETS else
                "pass --data-dir DIR holding train/ and val/ class folders" if cfg.data in presets else
                "pass --data DIR holding train/ and val/ class folders, or a folder of images")
        raise UsageError(f"{e}; {hint}") from None


class Views(torch.utils.data.Dataset):
    """Each transform applied to the image of an (index, seed) item. The seed fixes its views (a
    forked RNG), whatever the number of workers, also after a resume."""

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


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch, as (index, augmentation seed) pairs. Not DistributedSampler
    (perm[r::W]: batches depend on the world size, resume only at an epoch's start): epoch e is one
    permutation from (seed, e), batch b perm[b*B:(b+1)*B], rank r its r-th contiguous slice, so the
    all-gather rebuilds the one-process batch and a resume skips batches unread. Drops the last."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0):
        if global_batch % world:
            raise UsageError(f"--batch-size {global_batch} does not split across {world} processes")
        if n < global_batch:
            raise UsageError(f"the dataset has {n} images, fewer than one batch (--batch-size {global_batch})")
        self.n, self.B, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
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


def fixed_subset(n, k, seed=0):
    """k of range(n) drawn by a seed, sorted: the same on every rank (not the first k: folders sort by class)."""
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def _quiet_worker(worker_id):
    """Loader workers leave stop signals to the training process (a Ctrl-C reaches them too)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def make_loader(dataset, batch_sampler, cfg):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=cfg.workers,
                                       pin_memory=cfg.use_cuda, persistent_workers=cfg.workers > 0,
                                       worker_init_fn=_quiet_worker)


def to_device(x, device):
    """A batch of images on `device`, channels_last on CUDA (faster convolutions)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def draw_and_apply(photometric, crops, step, cfg, proc):
    """The photometric half of each view of this process's crops, on its device: drawn for the global
    batch, seeded by (seed, step, view), this process's rows; the same for any world size or resume."""
    views = []
    for v, (p, x) in enumerate(zip(photometric, crops)):
        draw = p.draw(cfg.batch_size, torch.Generator().manual_seed((cfg.seed * 2**40 + step * 2**8 + v) % 2**63))
        mine = {k: t[proc.rank * len(x):(proc.rank + 1) * len(x)] for k, t in draw.items()}   # this process's rows
        views.append(to_device(p(x.to(proc.device, non_blocking=True), mine), proc.device))
    return views


# ============================================================================================
# Checkpoints, stop signals, logging
# ============================================================================================

def atomic_save(obj, path, keep_previous=False):
    """torch.save to a temporary file flushed to the disk, renamed over path, the folder flushed too: a
    crash, even of the node, leaves the old file or the new one, never half of one. keep_previous: the
    old one is first renamed to <path>.prev (a resume falls back to it)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            os.replace(path, f"{path}.prev")
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        os.fsync(folder)   # the renames themselves reach the disk
        os.close(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


KEPT = {}   # the last checkpoint this process saved or resumed from: what an error message may promise


def saved_note():
    """What a stopped run keeps, in words: the last saved step (a probe's: epoch) and its file, or nothing."""
    unit = "epoch" if "probe-" in os.path.basename(KEPT.get("path", "")) else "step"
    return f"{unit} {KEPT['step']} is kept in {KEPT['path']}" if KEPT else "nothing was saved"


# What a resumed run may change: its length (a longer run stretches its schedules), resources, logging,
# evaluation and where its data lives. Every other value of DEFAULTS defines the experiment.
MAY_CHANGE = {"epochs", "max_steps", "data_dir", "download", "workers", "skip_bad_images", "synthetic_test", "gpus",
              "cpu", "compile", "threads", "output_dir", "save_every", "log_every", "knn_every", "knn_bank", "baseline",
              "probe", "probe_epochs", "probe_batch", "probe_lr", "probe_lr_scaling", "probe_warmup_steps",
              "probe_schedule", "probe_head_ema"}


def experiment(cfg):
    """The values that define a run's experiment (saved in its checkpoints, compared on resume)."""
    return {k: getattr(cfg, k) for k in cfg.sources if k not in MAY_CHANGE}


def fingerprint(module):
    """A digest of a module's weights and buffers: the backbone a probe checkpoint belongs to."""
    digest = hashlib.sha1()
    for t in module.state_dict().values():
        digest.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_checkpoint(path, checkpointed, step, done, cfg, proc, owner=None):
    """{name: object} saved as state_dicts with the step, `done` (epochs whose monitor ran), the RNG
    state, the experiment and `owner` (a probe's backbone); by the main process, all waiting for it."""
    if proc.is_main:
        atomic_save({**{k: v.state_dict() for k, v in checkpointed.items()}, "step": step, "done": done,
                     "rng": torch.get_rng_state(), "config": experiment(cfg), "owner": owner}, path, keep_previous=True)
    if proc.world > 1:
        dist.barrier(group=proc.cpu_group)
    KEPT.update(path=path, step=step)


def restore_checkpoint(path, checkpointed, cfg, owner=None):
    """Load path into the objects or, when it is missing or unreadable, the previous one (<path>.prev),
    saying so; returns (step, done), (0, 0) without either or (saying so) when it has another owner. A
    checkpoint of another experiment stops the run with one line naming each differing value."""
    unread = []
    for source in (p for p in (path, f"{path}.prev") if os.path.exists(p)):
        try:
            ckpt = torch.load(source, map_location="cpu", weights_only=True)
            break
        except Exception as e:  # pickle, zip and size errors all mean the same thing to the user
            unread.append(f"{source} ({type(e).__name__})")
    else:
        if unread:
            raise UsageError(f"cannot read checkpoint {' nor '.join(unread)}; move it away or choose another "
                             "--output-dir")
        return 0, 0
    if source != path:
        note(f"{unread[0] if unread else path} cannot be read; resuming from the previous checkpoint {source}")
    saved, now = ckpt.get("config", {k: ckpt.get(k) for k in ("batch_size", "preset")}), experiment(cfg)
    if differ := [f"--{k.replace('_', '-')} {saved[k]!r} there, {now.get(k)!r} here" for k in saved
                  if saved[k] != now.get(k)]:
        raise UsageError(f"{source} belongs to another experiment: {'; '.join(differ)}; run with the same values "
                         "or choose another --output-dir")
    if ckpt.get("owner") != owner:
        note(f"{source} was trained on another backbone; its probe starts afresh")
        return 0, 0
    try:
        for k, v in checkpointed.items():
            v.load_state_dict(ckpt[k])
        torch.set_rng_state(ckpt["rng"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UsageError(f"{source} does not match this model ({type(e).__name__}); "
                         "choose another --output-dir") from None
    KEPT.update(path=source, step=ckpt["step"])
    return ckpt["step"], ckpt.get("done", ckpt["step"] // cfg.steps_per_epoch)   # older ones: all monitors ran


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """SIGTERM, SIGUSR1, Ctrl-C: while `defer` is set, a request the loop honours with a checkpoint; else,
    or at a second signal, a stop at once (the same one twice in a second, as a launcher forwards, is one)."""

    def __init__(self):
        self.name, self.at, self.defer = None, 0.0, False
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def allow(self):
        """From here on a signal stops at once, as does one that came since the last agreement."""
        self.defer = False
        if self.name:
            raise KeyboardInterrupt

    def _handle(self, signum, frame):
        if not self.defer or (self.name is not None and time.monotonic() - self.at > 1):
            raise KeyboardInterrupt
        if self.name is None:
            self.name, self.at = signal.Signals(signum).name, time.monotonic()


def agree(proc, save_due):
    """(the stop signal's name or None, whether to save), the same on every process (one all_reduce)."""
    name = proc.stop.name
    flags = torch.tensor([signal.Signals[name].value if name else 0, save_due])
    if proc.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=proc.cpu_group)
    return (signal.Signals(int(flags[0])).name if flags[0] else None), bool(flags[1])


def read_logs(pending, step):
    """The last step's logs, reading the `pending` ones (device tensors; emptied) in one host sync.
    Raises at the first non-finite loss: no step from it on is saved."""
    if not pending:
        return {}
    rows = torch.stack([torch.stack([v.double() for v in logs.values()]) for logs in pending]).tolist()
    for k, row in enumerate(rows):
        loss = dict(zip(pending[k], row))["loss"]
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss} at step {step - len(rows) + k + 1}; {saved_note()} "
                                "(try a lower --lr)")
    logs = dict(zip(pending[-1], rows[-1]))
    pending.clear()
    return logs


class Logger:
    """Prints on rank 0, appends JSON records to <output_dir>/metrics.jsonl, times the loader, warns once."""

    def __init__(self, cfg, proc, data):
        self.cfg, self.proc, self.is_main, self.warned = cfg, proc, proc.is_main, False
        self.path, self.skipped = os.path.join(cfg.output_dir, "metrics.jsonl"), getattr(data.pretrain, "skipped", None)
        self.since, self.steps, self.waited = time.time(), 0, 0.0   # since the last train line
        try:
            os.makedirs(cfg.output_dir, exist_ok=True)
        except OSError as e:   # under /proc, a file of that name, no permission
            raise UsageError(f"cannot make --output-dir {cfg.output_dir} ({e.strerror})") from None

    def timed(self, loader):
        """The loader's batches, adding up the time spent waiting for them."""
        asked = time.time()
        for batch in loader:
            self.waited += time.time() - asked
            yield batch
            self.steps, asked = self.steps + 1, time.time()

    def print(self, *a, **kw):
        if self.is_main:
            print(*a, **kw, flush=True)

    def record(self, **rec):
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **rec}) + "\n")

    def start(self, prog, step, world, own_preset, images):
        cfg = self.cfg
        notes = [own_preset and f"preset '{cfg.preset}' is the project's own (small), not a paper's", not cfg.labelled
                 and f"{cfg.data} has no train/ and val/ class folders: pretraining on its {images} images without "
                 "labels; kNN and probes are skipped, the effective ranks are the monitor"]
        self.record(event="start", argv=sys.argv, world_size=world, resumed_from_step=step, versions=dict(
            python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            torchvision=torchvision.__version__, platform=platform.platform()), config={
            k: v for k, v in sorted(vars(cfg).items()) if isinstance(v, (int, float, str, bool, tuple, type(None)))})
        self.print(f"{prog}: world size {world}, {cfg.steps_per_epoch} steps/epoch, {cfg.total_steps} steps"
                   + (f", resuming at step {step}" if step else ""), *(f"\nnote: {n}" for n in notes if n), sep="")

    def train(self, epoch, step, logs, lr, collapse):
        """One line and one record of the step's logs, throughput and ETA; warns on a collapse."""
        cfg, elapsed = self.cfg, time.time() - self.since
        per_step, wait = elapsed / max(self.steps, 1), self.waited / elapsed
        self.since, self.steps, self.waited, rate = time.time(), 0, 0.0, cfg.batch_size / per_step
        self.warn(collapse, step)
        if self.skipped is not None and cfg.skip_bad_images:   # the sum over the processes' counts
            skipped = torch.tensor(self.skipped.value)
            if self.proc.world > 1:
                dist.all_reduce(skipped, group=self.proc.cpu_group)
            logs["skipped_images"] = int(skipped)
        eta, values = datetime.timedelta(seconds=int((cfg.total_steps - step) * per_step)), " ".join(
            f"{k} {v:.5g}" for k, v in logs.items())
        self.print(f"ep {epoch + 1}/{cfg.epochs} step {step}/{cfg.total_steps} {values} lr {lr:.4g} {rate:.1f} img/s "
                   f"data wait {100 * wait:.0f}% ETA {eta}")
        self.record(event="train", epoch=epoch + 1, step=step, lr=lr, img_per_s=rate, data_wait=wait, **logs)

    def epoch(self, epoch, step, record):
        """The epoch's diagnostics; warns when the embedding's effective rank says it collapsed."""
        self.print(f"  epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in record.items()))
        self.record(event="epoch", epoch=epoch, **record)
        if record.get("rank_embedding", math.inf) < 1.5:
            self.warn(f"effective rank of the embedding {record['rank_embedding']:.3g}", step)

    def warn(self, reason, step):
        """One line, once per run, when the embedding looks collapsed, with what to try."""
        if reason and not self.warned:
            self.warned = True
            self.print(f"warning: the embedding looks collapsed at step {step} ({reason}); try a "
                       "lower --lr or a longer --warmup-epochs")
            self.record(event="collapse", step=step, reason=reason)

    def probes(self, protocol, results):
        """The final probe's accuracies, {backbone name: {metric: value}}."""
        label = {"linear": "linear probe (paper protocol)", "cached": "cached-feature probe (fast, no aug)"}[protocol]
        for name, acc in results.items():
            self.print(f"{label}, {name} backbone: " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
        self.record(event="probe", protocol=protocol, **results)


def autocast(cfg):
    dtype = torch.float16 if cfg.amp == "fp16" else torch.bfloat16   # unused when off
    return torch.autocast("cuda" if cfg.use_cuda else "cpu", dtype=dtype, enabled=cfg.amp != "off")


def float32_head(mlp, h, eps=None):
    """mlp(h), its last layer in float32 with autocast off, then (eps given) L2-normalised: a loss
    gets float32 embeddings whatever the autocast (bf16's 3 digits are too few for log-dets)."""
    h = mlp[:-1](h)
    with torch.autocast(h.device.type, enabled=False):
        z = mlp[-1](h.float())
        return z if eps is None else F.normalize(z, dim=1, eps=eps)


# ============================================================================================
# Evaluation plumbing: features, accuracy, effective rank
# ============================================================================================

@torch.no_grad()
def extract(backbone, base, transform, cfg, proc, batch=256):
    """Features (eval mode) and labels of all of `base` on every rank, each computing its shard."""
    was_training = backbone.training
    backbone.eval()
    idx = list(shard(len(base), proc.rank, proc.world))
    loader = make_loader(Views(base, [transform]), [[(i, 0) for i in idx[j:j + batch]]
                                                    for j in range(0, len(idx), batch)], cfg)
    # A rank without a shard still sends (0, F) features to the all-gather: an empty batch's.
    feats = [backbone(torch.zeros(0, 3, cfg.image_size, cfg.image_size, device=proc.device)).float()]
    labels = [torch.zeros(0, dtype=torch.long, device=proc.device)]
    for (x,), y in loader:
        with autocast(cfg):
            feats.append(backbone(to_device(x, proc.device)).float())
        labels.append(y.to(proc.device))
    backbone.train(was_training)
    return gather_shards(torch.cat(feats), len(base)), gather_shards(torch.cat(labels), len(base))


def topk(logits, y, ks=(1, 5)):
    """Top-k accuracies in % (k not below the number of classes is skipped)."""
    hit = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices == y[:, None]
    return {f"top{k}": 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks if k < logits.shape[1]}


def rankme(x, eps=1e-7):
    """RankMe (Garrido et al., ICML 2023) of x (N, D): exp of the entropy of its singular values
    normalised to sum 1; 1 for a collapsed embedding."""
    sigma = torch.linalg.svdvals(x.double())
    p = sigma / sigma.sum() + eps
    return (-(p * p.log()).sum()).exp().item()


def knn_bank(labels, size, seed=0):
    """A class-balanced kNN bank: size // classes images of each class (all of a smaller class), drawn by
    a seed, so the same on every rank and at every evaluation. Returns (indices, images of its smallest class)."""
    counts = torch.bincount(labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    by_class = order[torch.argsort(labels[order], stable=True)]   # class by class, each in the draw's order
    place = torch.arange(len(labels)) - (counts.cumsum(0) - counts)[labels[by_class]]   # place in its class
    chosen = by_class[place < max(1, size // len(counts))]
    return sorted(chosen.tolist()), int(torch.bincount(labels[chosen])[counts > 0].min())


def knn_accuracy(train_f, train_y, test_f, test_y, classes, k, T=0.1):
    """kNN monitor: the k nearest bank features (cosine) vote exp(similarity / T), T = 0.1 (InstDisc)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    scores = []
    for chunk in test_f.split(1024):
        sim, idx = (chunk @ train_f.T).topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(chunk), classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_y[idx], (sim / T).exp()))
    return topk(torch.cat(scores), test_y)


def cached_probe(train_f, train_y, test_f, test_y, classes, cfg):
    """Fast probe for short runs, not a paper's protocol: standardised cached features, linear head,
    SGD (lr 0.1, momentum 0.9, batch 256) with a cosine schedule; the same on every rank."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    head = torch.nn.Linear(train_f.shape[1], classes).to(train_f.device)
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


def feature_accuracy(kind, backbone, data, view, cfg, proc):
    """The accuracy of frozen features by kind: "cached" probe on all training images, or "knn"
    monitor on a class-balanced bank of --knn-bank of them, k = 200 (InstDisc) but at most a fifth of
    the bank's smallest class (DINO's 20 on ImageNet, 100 images a class); it states both."""
    labels = torch.as_tensor(data.probe.targets) if isinstance(data.probe, ImageFiles) else data.probe.tensors[1]
    bank, per_class = (range(len(data.probe)), None) if kind == "cached" else knn_bank(labels, cfg.knn_bank, cfg.seed)
    train_f, train_y = extract(backbone, torch.utils.data.Subset(data.probe, bank), view, cfg, proc)
    test_f, test_y = extract(backbone, data.test, view, cfg, proc)
    if kind == "cached":
        return cached_probe(train_f, train_y, test_f, test_y, data.classes, cfg)
    k = max(1, min(200, per_class // 5))
    return {**knn_accuracy(train_f, train_y, test_f, test_y, data.classes, k), "k": k, "per_class": per_class}
