"""Write a small labelled image folder from Fashion-MNIST's training images, as a user's own
folder would be (PNG files in class subfolders of train/ and val/), for the short-run check:

    python tools/small_folder.py /tmp/fmnist-small --train 200 --val 100
    python explicit_mim.py --data /tmp/fmnist-small --preset fashionmnist --epochs 5 --batch-size 128

--train and --val are images per class, drawn without overlap (seed 0) from the training set only,
so val/ is a validation split: the Fashion-MNIST test set stays unseen.
"""
import os
import shutil
import sys

import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (the repository root is on the path only from here on)


def main():
    p = common.Parser(prog="tools/small_folder.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder to write (must not exist)")
    p.add_argument("--train", type=common.POSITIVE_INT, default=200, help="training images per class (200)")
    p.add_argument("--val", type=common.POSITIVE_INT, default=100, help="validation images per class (100)")
    p.add_argument("--data-dir", default=common.FASHION_MNIST_DIR, help="Fashion-MNIST's idx .gz files")
    args = p.parse_args()
    if os.path.exists(args.out):
        raise common.UsageError(f"{args.out} exists; name a new folder")
    try:
        images, labels = common.read_fashion_mnist(args.data_dir, train=True)
    except common.UsageError as e:
        raise common.UsageError(f"{e}; {common.FASHION_MNIST_HINT}") from None
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    picks = [order[labels[order] == c][:args.train + args.val].tolist() for c in range(10)]
    for c, mine in enumerate(picks):
        if len(mine) < args.train + args.val:
            raise common.UsageError(f"class {c} has {len(mine)} images, fewer than --train + --val")
    partial = args.out.rstrip("/") + ".partial"   # renamed when complete: never a half-written folder
    shutil.rmtree(partial, ignore_errors=True)
    for c, mine in enumerate(picks):
        for split, chosen in (("train", mine[:args.train]), ("val", mine[args.train:])):
            folder = os.path.join(partial, split, f"class{c}")
            os.makedirs(folder)
            for i in chosen:   # the file name is the image's index in the training set
                PIL.Image.fromarray(images[i, 0].numpy()).save(os.path.join(folder, f"{i:05d}.png"))
    os.rename(partial, args.out)
    print(f"{args.out}: {10 * args.train} training and {10 * args.val} validation images in 10 class folders")


if __name__ == "__main__":
    common.run_cli(main, "tools/small_folder.py")
