"""What a training step costs beyond the bare network, for any of the four method files.

    python tools/benchmark.py METHOD [--bench-steps K] [--bench-sizes 128,256,...] [METHOD's flags]
    python tools/benchmark.py corinfomax --data cifar10 --batch-size 64

METHOD is corinfomax, explicit_mim, hydes or ssl_hsic; every other flag is the method file's own
(its preset, batch size, --amp, --compile, ...). Random images of the preset's size stand in for
a preset's dataset (the augmentations' cost does not depend on what the pixels show), a
folder's own files for a folder; nothing is written to disk. It uses the method file's own
functions and prints a table, then the same figures as one JSON line:

1. step overhead: a full training step (views already made; model, loss, backward, optimiser)
   with the method's loss, divided by the same step with the loss replaced by the mean of the
   embeddings. Steps run back to back in blocks of 5, as the training loop runs them (no host
   sync between steps: on a GPU the host queues the next step while this one runs); the two
   losses take turns block by block and the median block counts, after 2 warm-up steps of each.
2. loss alone: forward + backward at global batch sizes --bench-sizes, on random unit embeddings
   shaped like a step's; SSL-HSIC times both its estimators. A path stops growing N once one
   call takes over a second.
3. data pipeline: one loader worker's images/s for the geometric half of the views (crops and
   flips, one thread), the ms of the photometric half for one batch on the training device, and
   the share of wall time a short run (loader, photometric half, train_step) waits for the loader.
   With --data FOLDER these are the folder's own files, JPEG decoding and full-size crops included.
4. --memory, instead of 1-3: the memory per GPU of the preset's batch on 8 GPUs, from what one
   train_step on a few images saves for the backward pass (measured here, under --amp) and the
   state that does not grow with the batch (see memory()).
"""
import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (the repository root is on the path only from here on)

METHODS = ("corinfomax", "explicit_mim", "hydes", "ssl_hsic")
PROG = "tools/benchmark.py"


class TrivialLoss(nn.Module):
    """The bare network's loss: the mean of every embedding it is given. It keeps its inputs'
    shapes for the loss-alone timings."""

    def forward(self, *z):
        self.inputs = [(t.shape, t.requires_grad) for t in z]
        loss = sum(t.mean() for t in z)
        return loss, {"loss": loss.detach()}


def batch_sizes(text):
    """--bench-sizes: "128,256" -> [128, 256]; a UsageError (one line) for anything else."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise common.UsageError(f"--bench-sizes expects comma-separated positive integers, got {text!r}")
    return values


def parse(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("method", nargs="?")
    p.add_argument("--bench-steps", dest="bench_steps", type=int,
                   help="timed steps per loss, in blocks of 5 (default: 40 on CUDA, 15 on CPU)")
    p.add_argument("--bench-sizes", dest="bench_sizes", default="128,256,512,1024,2048,4096",
                   help="global batch sizes for the loss-alone timings")
    p.add_argument("--memory", action="store_true", help="only the memory per GPU at the preset's batch on 8 GPUs")
    args, rest = p.parse_known_args(argv)
    if args.method not in METHODS:
        raise common.UsageError(f"the first argument names the method: one of {', '.join(METHODS)}")
    if args.bench_steps is not None and args.bench_steps < 1:
        raise common.UsageError(f"--bench-steps must be >= 1, got {args.bench_steps}")
    module = importlib.import_module(args.method)
    cfg = module.parse_args(rest)
    if cfg.gpus != 1:
        raise common.UsageError("the benchmark times one process; leave --gpus at 1")
    cfg.bench_steps = args.bench_steps or (40 if torch.cuda.is_available() and not cfg.cpu else 15)
    cfg.bench_sizes, cfg.memory = batch_sizes(args.bench_sizes), args.memory
    return module, cfg


def device_name(device):
    """The processor, in words."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} logical cores"


def timed(fn, device):
    """Seconds one call of fn takes, with the device's queued work finished before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def loss_variants(module, cfg):
    """The loss paths to time alone: the configured one and, for SSL-HSIC, the other estimator."""
    variants = {"loss_ms": module.make_criterion(cfg)}
    if hasattr(cfg, "estimator"):
        other = {"rff": "exact", "exact": "rff"}[cfg.estimator]
        variants[f"loss_ms_{other}"] = module.make_criterion(argparse.Namespace(**{**vars(cfg), "estimator": other}))
    return variants


def crop_rate(images, cfg):
    """One batch of crops (the geometric halves) made as one loader worker makes them (one
    thread), and its images/s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    batch = torch.utils.data.default_collate([images[(i, i)] for i in range(cfg.batch_size)])
    rate = cfg.batch_size / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return batch[0], rate


def step_times(module, model, losses, optimizer, scaler, views, cfg, proc, block=5):
    """ms per train_step with each loss of `losses` ({key prefix: loss}) and, on CUDA, the peak
    memory, from blocks of `block` steps run back to back, the losses taking turns."""
    def run(loss_fn, first, n):
        for step in range(first, first + n):
            module.train_step(model, loss_fn, optimizer, scaler, views, step, cfg)
    cuda = proc.device.type == "cuda"
    for loss_fn in losses.values():
        run(loss_fn, 0, 2)    # warm-up: the allocator, cuDNN's algorithm search, compilation
    block = min(block, cfg.bench_steps)
    times, peak = {name: [] for name in losses}, dict.fromkeys(losses, 0)
    for first in range(2, 2 + cfg.bench_steps, block):
        for name, loss_fn in losses.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(proc.device)
            times[name].append(timed(lambda: run(loss_fn, first, block), proc.device) / block)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(proc.device))
    res = {}
    for name, t in times.items():
        ms = 1000 * statistics.median(t)
        res.update({name + "step_ms": ms, name + "img_per_s": cfg.batch_size / ms * 1000})
        if cuda:
            res[name + "peak_gib"] = peak[name] / 2**30
    return res


def loss_times(loss_fn, inputs, cfg, proc):
    """Forward + backward of the loss alone, {global batch N: median ms of 5 calls after one
    warm-up}, on random unit embeddings shaped like a step's with N rows."""
    res = {}
    for n in cfg.bench_sizes:
        z = [F.normalize(torch.randn(*shape[:-2], n, shape[-1], device=proc.device), dim=-1).requires_grad_(grad)
             for shape, grad in inputs]
        ms = 1000 * statistics.median([timed(lambda: loss_fn(*z)[0].backward(), proc.device) for _ in range(6)][1:])
        res[n] = round(ms, 3)
        if ms > 1000:
            break
    return res


def data_wait(module, model, criterion, optimizer, scaler, loader, photometric, cfg, proc):
    """Share of wall time a short run (the loader with its workers, the photometric half,
    train_step) waits for the loader, from the second batch on (the first starts the workers)."""
    waited, asked = 0.0, time.perf_counter()
    for step, (crops, _) in enumerate(loader):
        if step == 1:
            waited, start = 0.0, asked
        waited += time.perf_counter() - asked
        views = common.draw_and_apply(photometric, crops, step, cfg, proc)
        module.train_step(model, criterion, optimizer, scaler, views, step, cfg)
        asked = time.perf_counter()
    if proc.device.type == "cuda":
        torch.cuda.synchronize(proc.device)   # the clock stops when the queued steps are done
    return waited / (time.perf_counter() - start)


def memory(module, cfg, proc, images=(2, 4)):
    """Training memory per process, projected to the preset's per-GPU batch on 8 GPUs. What autograd
    saves for the backward pass (storages counted once by saved_tensors_hooks, parameters
    excluded) in one train_step under the run's autocast, at two small batches: its growth per
    image, and the rest (autocast's low-precision weight copies, the loss's D x D terms). Plus the
    state that does not grow with the batch: parameters and buffers (target network, EMAs, loss
    state), gradients, optimiser state. Not counted: cuDNN workspaces, the allocator's slack."""
    model, criterion, optimizer, scaler = module.build(cfg, proc)
    _, photometric = zip(*module.pretrain_views(cfg))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(n):
        saved, x = {}, torch.randint(0, 256, (n, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        views = common.draw_and_apply(photometric, [x] * len(photometric), 0, cfg, proc)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module.train_step(model, criterion, optimizer, scaler, views, 0, cfg)
        return sum(saved.values())

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)
    (a, saved_a), (b, saved_b) = ((n, saved_bytes(n)) for n in images)
    per_image = (saved_b - saved_a) / (b - a)
    state = {"parameters and buffers": nbytes([*model.parameters(), *model.buffers(), *criterion.buffers()]),
             "gradients": nbytes(p for p in model.parameters() if p.requires_grad),
             "optimiser state": nbytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)),
             "saved, not per image": saved_a - a * per_image}
    per_gpu = cfg.batch_size // 8
    return {"saved_per_image_mib": per_image / 2**20, "state_gib": {k: v / 2**30 for k, v in state.items()},
            "per_gpu_batch": per_gpu, "total_gib_per_gpu": (sum(state.values()) + per_image * per_gpu) / 2**30}


def print_memory(res):
    print(f"{PROG} {res['method']} --memory: preset {res['preset']}, batch {res['batch_size']} = 8 x "
          f"{res['per_gpu_batch']}, {res['image_size']} px, amp {res['amp']}")
    print(f"  saved for backward: {res['saved_per_image_mib']:.1f} MiB per image (all its views)")
    for name, gib in res["state_gib"].items():
        print(f"  {name}: {gib:.2f} GiB")
    print(f"  per GPU at batch {res['per_gpu_batch']}: {res['total_gib_per_gpu']:.1f} GiB")


def benchmark(module, cfg):
    proc = common.ThisProcess(cfg)
    folder = None if cfg.data in module.PRESETS else common.load_datasets(cfg, module.PRESETS).pretrain
    cfg = common.derive(cfg, common.Datasets(folder if folder is not None else range(cfg.batch_size), None, None, 1),
                        proc, module.PROG)
    torch.set_num_threads(cfg.threads)
    # Enough batches for a short run several times longer than the loader's prefetch queue.
    n = cfg.batch_size * (cfg.bench_steps + 3 + 6 * cfg.workers)
    if folder is None:   # random images of the preset's size stand in for its dataset
        pixels = torch.randint(0, 256, (n, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(cfg.seed))
        dataset = common.tensor_images(pixels, torch.zeros(n, dtype=torch.long))
    else:   # a folder's own files, decoded and cropped from full size as training reads them
        dataset = torch.utils.data.Subset(folder, range(min(n, len(folder))))
    if cfg.memory:
        res = {"method": module.PROG.removesuffix(".py"), "preset": cfg.preset, "batch_size": cfg.batch_size,
               "image_size": cfg.image_size, "amp": cfg.amp, **memory(module, cfg, proc)}
        print_memory(res)
        print(json.dumps(res), flush=True)
        return
    sampler, loader, photometric = module.pretrain_loader(dataset, cfg, proc)
    model, criterion, optimizer, scaler = module.build(cfg, proc)
    model = module.parallel(model, cfg, proc)     # compiled with --compile, as training runs it
    res = {"method": module.PROG.removesuffix(".py"), "preset": cfg.preset, "data": cfg.data,
           "device": device_name(proc.device),
           "threads": torch.get_num_threads(), "amp": cfg.amp, "compile": cfg.compile, "batch_size": cfg.batch_size}
    crops, res["augment_img_per_s_per_worker"] = crop_rate(loader.dataset, cfg)
    ms = [timed(lambda: common.draw_and_apply(photometric, crops, 0, cfg, proc), proc.device) for _ in range(4)]
    res["device_augment_ms"] = 1000 * statistics.median(ms[1:])
    views = common.draw_and_apply(photometric, crops, 0, cfg, proc)
    trivial = TrivialLoss()
    res.update(step_times(module, model, {"": criterion, "trivial_": trivial}, optimizer, scaler, views, cfg, proc))
    res["step_overhead"] = res["step_ms"] / res["trivial_step_ms"]
    for key, variant in loss_variants(module, cfg).items():
        res[key] = loss_times(variant.to(proc.device), trivial.inputs, cfg, proc)
    res["workers"] = cfg.workers
    res["data_wait"] = data_wait(module, model, criterion, optimizer, scaler, loader, photometric, cfg, proc)
    print_table(res)
    print(json.dumps(res), flush=True)


def print_table(res):
    print(f"{PROG} {res['method']}: preset {res['preset']}, batch {res['batch_size']}, {res['device']}, "
          f"{res['threads']} threads, amp {res['amp']}" + (", compiled" if res["compile"] else ""))
    for name, label in (("", "this loss"), ("trivial_", "trivial loss")):
        mem = f"  peak {res[name + 'peak_gib']:.2f} GiB" if name + "peak_gib" in res else ""
        print(f"  training step, {label:12s} {res[name + 'step_ms']:10.1f} ms "
              f"{res[name + 'img_per_s']:9.1f} img/s{mem}")
    print(f"  step overhead (this / trivial) {res['step_overhead']:8.3f}")
    for key in (k for k in res if k.startswith("loss_ms")):
        print(f"  {key} (loss alone, fwd + bwd, by global batch): "
              + "  ".join(f"{n}: {ms:.1f}" for n, ms in res[key].items()))
    print(f"  augmentation: crops {res['augment_img_per_s_per_worker']:.0f} images/s per worker (all views of an "
          f"image), photometric half {res['device_augment_ms']:.1f} ms per batch on the device; waiting for "
          f"data: {100 * res['data_wait']:.1f}% of a short run ({res['workers']} workers)")


def main(argv=None):
    benchmark(*parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    common.run_cli(main, PROG)
