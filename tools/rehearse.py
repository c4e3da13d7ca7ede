"""Rehearse an ImageNet run on the CPU before spending GPU-days on it:

    python tools/rehearse.py corinfomax /tmp/imagenet-shaped [--gpus 2] [--steps 9] [--sources DIR]

builds (once) a folder of ImageNet-1k's shape under the named folder: train/ with 1,000 class
folders of 732 to 1,300 images (1,281,167 in all) and val/ with 50 a class, every file a hard link
to one of 32 real-size JPEGs (500 x 375, about 110 KB; --sources DIR takes yours instead; ext4
allows 65,000 links a file), and small/, two classes of 320 of the same JPEGs. Then it runs the method's
imagenet preset, its network shrunk to fit a CPU (resnet18, 64 px, batch 16), with --gpus gloo
processes for --steps steps, on the big folder and on the small one, and prints:

- the seconds one process takes to index the big folder;
- img/s and the share of time waiting for data, big folder against small (the same JPEGs: any
  difference is what the folder's size costs);
- the peak memory (proportional set size, shared pages split) of a training process and of a
  loader worker, and the peak /dev/shm in use;
- the kNN monitor's bank at the preset: images per class and k;
- what the user sees when the last rank reads an undecodable file.
"""
import argparse
import glob
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402  (the repository root is on the path only from here on)

PROG = "tools/rehearse.py"
print = partial(print, flush=True)   # noqa: A001  (each line as soon as it is known)
SHRUNK = ["--arch", "resnet18", "--image-size", "64", "--projector", "256-256-64", "--batch-size", "16",
          "--threads", "1", "--probe", "none", "--knn-every", "0", "--log-every", "3", "--no-baseline"]
HEADS = {"ssl_hsic": ["--predictor", "256-64"]}   # the shrunk heads' widths must agree
SIZES = [732] + [1117] * 65 + [1118] * 35 + [1300] * 899   # ImageNet-1k's 1,281,167 training images


def sources(folder, given):
    """The JPEGs to link to: those in `given`, or 32 made here (smooth colours and noise, quality 90)."""
    if given:
        found = sorted(glob.glob(os.path.join(given, "*.JPEG")) + glob.glob(os.path.join(given, "*.jpg")))
        if len(found) < 32:
            raise common.UsageError(f"--sources {given}: {len(found)} JPEGs, need 32 (65,000 links a file)")
        return found[:32]
    os.makedirs(os.path.join(folder, "sources"), exist_ok=True)
    rng, made = np.random.default_rng(0), []
    for k in range(32):
        path = os.path.join(folder, "sources", f"{k}.JPEG")
        if not os.path.exists(path):
            y, x = np.mgrid[0:375, 0:500] / 500
            smooth = np.stack([np.sin(6 * x * rng.uniform(0.5, 2) + c + k) for c in range(3)], -1) * 80 + 128
            image = np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, "JPEG", quality=90)
            open(path, "wb").write(buf.getvalue())
        made.append(path)
    return made


def build(folder, files):
    """The ImageNet-shaped tree (skipped when its marker exists) and the small one, of hard links."""
    marker = os.path.join(folder, "imagenet", "complete")
    if not os.path.exists(marker):
        k = 0
        for split, sizes in (("train", SIZES), ("val", [50] * 1000)):
            for c, n in enumerate(sizes):
                d = os.path.join(folder, "imagenet", split, f"n{c:08d}")
                os.makedirs(d, exist_ok=True)
                for i in range(n):
                    dst = os.path.join(d, f"n{c:08d}_{i}.JPEG")
                    if not os.path.exists(dst):
                        os.link(files[k % len(files)], dst)
                    k += 1
        open(marker, "w").close()
    for split in ("train", "val"):
        for c in range(2):
            d = os.path.join(folder, "small", split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            for i in range(320):   # 40 steps of 16 an epoch: the timed steps cross no epoch's end
                if not os.path.exists(os.path.join(d, f"{i}.JPEG")):
                    os.link(files[(c * 320 + i) % len(files)], os.path.join(d, f"{i}.JPEG"))


def pss_kb(pid):
    """Proportional set size of a process in kB (shared pages divided among their users), 0 if gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def run(method, args, gpus, output_dir, fails=False):
    """Run the method in a fresh output_dir; returns (the last train line's img/s and data wait, peaks: training
    process, loader worker, /dev/shm in MB, stderr). The launcher's children train; theirs are loader workers."""
    shutil.rmtree(output_dir, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, f"{method}.py"), *args, *HEADS.get(method, []), "--gpus", str(gpus),
           "--output-dir", output_dir]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks, shm0 = [0, 0, 0], shm_used_mb()

    def watch():
        while proc.poll() is None:
            trainers = children(proc.pid) if gpus > 1 else [proc.pid]
            workers = [w for t in trainers for w in children(t)]
            peaks[:] = [max(peaks[0], *(pss_kb(t) / 1024 for t in trainers), 0), max(peaks[1], *(
                pss_kb(w) / 1024 for w in workers), 0), max(peaks[2], shm_used_mb() - shm0)]
            time.sleep(0.2)
    watcher = threading.Thread(target=watch)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    lines = [line for line in out.splitlines() if " img/s " in line]
    if bool(proc.returncode) != fails:
        raise common.UsageError(f"{' '.join(cmd)} exited with {proc.returncode}: {err.strip()[-300:]}")
    rate = float(lines[-1].split(" img/s")[0].split()[-1]) if lines else float("nan")
    wait = float(lines[-1].split("data wait ")[1].split("%")[0]) if lines else float("nan")
    return rate, wait, peaks, err.strip()


def shm_used_mb():
    s = os.statvfs("/dev/shm")
    return (s.f_blocks - s.f_bfree) * s.f_frsize / 2**20


def main():
    p = common.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=("corinfomax", "explicit_mim", "hydes", "ssl_hsic"))
    p.add_argument("folder", help="where the ImageNet-shaped tree is built (once) and kept")
    p.add_argument("--sources", help="a folder of at least 32 real JPEGs to link to (default: made here)")
    p.add_argument("--gpus", type=common.POSITIVE_INT, default=2, help="gloo processes (2)")
    p.add_argument("--steps", type=common.POSITIVE_INT, default=9, help="training steps of each run (9)")
    p.add_argument("--workers", type=common.COUNT, default=1, help="loader workers per process (1)")
    args = p.parse_args()
    started = time.time()
    build(args.folder, sources(args.folder, args.sources))
    big, small = (os.path.join(args.folder, s) for s in ("imagenet", "small"))
    print(f"{PROG}: folders ready in {time.time() - started:.0f} s")
    started = time.time()
    train, _, classes = common.image_folder(big, False)
    sampler = common.GlobalBatchSampler(len(train), 16, args.gpus - 1, args.gpus, seed=0)
    bad = train.path(next(iter(sampler))[0][0])
    if os.path.exists(bad + ".kept"):   # left by an interrupted rehearsal
        os.replace(bad + ".kept", bad)
    print(f"index: {len(train):,} training images in {classes} classes, {time.time() - started:.1f} s a process")
    module = __import__(args.method)
    cfg = module.parse_args(["--data", "imagenet", "--cpu"])
    bank, per_class = common.knn_bank(common.torch.as_tensor(train.targets), cfg.knn_bank, cfg.seed)
    print(f"kNN bank at the imagenet preset: {len(bank):,} images, {per_class} a class, "
          f"k {max(1, min(200, per_class // 5))}")
    for name, folder in (("small folder", small), ("ImageNet-shaped", big)):
        rate, wait, (trainer, worker, shm), _ = run(args.method, [
            "--data", "imagenet", "--data-dir", folder, *SHRUNK, "--max-steps", str(args.steps), "--workers",
            str(args.workers)], args.gpus, os.path.join(args.folder, "runs", name.split()[0]))
        print(f"{name}: {rate:.1f} img/s, data wait {wait:.0f}%; peak memory: training process {trainer:.0f} MB, "
              f"loader worker {worker:.0f} MB, /dev/shm {shm:.0f} MB")
    # The last rank's first image, made undecodable for one run (the hard link is put back after).
    os.replace(bad, bad + ".kept")
    try:
        open(bad, "wb").write(b"not a JPEG")
        _, _, _, err = run(args.method, ["--data", "imagenet", "--data-dir", big, *SHRUNK, "--max-steps", "2",
                                         "--workers", str(args.workers)], args.gpus,
                           os.path.join(args.folder, "runs", "bad"), fails=True)
    finally:
        os.replace(bad + ".kept", bad)
    print(f"an undecodable file read by rank {args.gpus - 1} prints {len(err.splitlines())} line(s):\n  {err}")


if __name__ == "__main__":
    common.run_cli(main, PROG)
