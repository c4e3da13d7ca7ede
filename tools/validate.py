"""Run a method file with its test set replaced by a validation set, to tune our own short presets
without looking at the test set:

    python tools/validate.py METHOD [METHOD's flags]
    python tools/validate.py explicit_mim --lr 0.5 --no-baseline --output-dir runs/val-emim-lr0.5

synthetic: 1000 more images drawn by the same generator with a seed no run uses for training or
testing (the images are i.i.d., so this is a held-out draw). Any other labelled dataset: a fixed
random 10 % of the training images is held out and the run trains on the other 90 %. The probes
then report validation accuracy. One process only (--gpus N children would read the test set).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (the repository root is on the path only from here on)
import synthetic  # noqa: E402

METHODS = ("corinfomax", "explicit_mim", "hydes", "ssl_hsic")


def with_validation(load):
    def load_validation(cfg, presets):
        data = load(cfg, presets)
        if cfg.data == "synthetic":
            val = common.tensor_images(*synthetic.make(1000, cfg.image_size, seed=cfg.seed + 1000))
            return common.Datasets(data.pretrain, data.probe, val, data.classes)
        if not data.classes or data.probe is not data.pretrain:
            raise common.UsageError("validation needs a labelled dataset that pretrains on its probe set")
        order = torch.randperm(len(data.pretrain), generator=torch.Generator().manual_seed(12345)).tolist()
        cut = len(order) // 10
        train = torch.utils.data.Subset(data.pretrain, sorted(order[cut:]))
        return common.Datasets(train, train, torch.utils.data.Subset(data.pretrain, sorted(order[:cut])), data.classes)
    return load_validation


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in METHODS:
        raise common.UsageError(f"the first argument names the method: one of {', '.join(METHODS)}")
    module = __import__(sys.argv[1])
    common.load_datasets = with_validation(common.load_datasets)
    module.main(sys.argv[2:])


if __name__ == "__main__":
    common.run_cli(main, "tools/validate.py")
