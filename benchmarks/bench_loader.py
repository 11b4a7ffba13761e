"""Loader throughput: fastprompt's FFCV loader vs torchvision ImageFolder + DataLoader.

Both read the same synthetic JPEGs (written once into a folder, and into a .beton by
`write_imagefolder` with `prepare`'s storage defaults unless overridden) and deliver the same
thing, float32 (B, 3, 224, 224) batches normalised with CLIP's mean/std, with `--workers`
workers (torchvision: worker processes; FFCV: decode threads):
- train (`--split train`): Dassl's training transform, RandomResizedCrop(224, scale (0.08, 1),
  bicubic) + random horizontal flip; torchvision crops the originals, FFCV the stored
  training images (shorter side at most `--train-short-side`);
- eval (`--split test`): CLIP's eval transform, Resize(224, bicubic) + CenterCrop(224);
  torchvision computes it from the originals, FFCV reads it stored evaluation-ready.
The FFCV train loader decodes the training images once, in its first epoch, and crops every
epoch from them (`--decoded-cache auto`, the training default; `off` decodes every epoch).
The first epoch (worker start-up / numba JIT / the decode-once) and the steady state (the
mean of the following epochs) are reported separately, with the memory the decoded images
hold and the resident memory of the loader's processes, as JSON lines, with the CPU seconds spent per
1000 images (all processes of the loader: a figure that a busy machine disturbs less than
wall-clock throughput), and the .beton's bytes per stored image of each split. Each loader
runs in its own process.

    python benchmarks/bench_loader.py                       # 1500 + 500 JPEGs of 375-500 px, 2 workers, both splits
    python benchmarks/bench_loader.py --min-side 240 --max-side 320 --split train
    python benchmarks/bench_loader.py --cold-jit            # first epoch including numba compilation
    python benchmarks/bench_loader.py --split train --decoded-cache off   # decoding every epoch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1500, help="training images in the synthetic set")
    p.add_argument("--eval-images", type=int, default=500, help="test images in the synthetic set")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--min-side", type=int, default=375, help="image sides are drawn from [min-side, max-side]")
    p.add_argument("--max-side", type=int, default=500)
    p.add_argument("--train-short-side", type=int, default=320, help="the .beton's cap on a training image's shorter side")
    p.add_argument("--max-resolution", type=int, default=1024, help="the .beton's cap on a training image's longest side")
    p.add_argument("--eval-format", choices=["raw", "jpg"], default="raw", help="how the .beton stores val/test")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the folder and of the .beton's training images")
    p.add_argument("--batch-size", type=int, default=32, help="CoOp's batch size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="steady-state epochs after the first")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--split", choices=["train", "test", "both"], default="both")
    p.add_argument("--workdir", type=str, default=None, help="keep the data here (default: a temporary folder)")
    p.add_argument("--cold-jit", action="store_true", help="use an empty numba cache: the first epoch compiles the kernels")
    p.add_argument("--decoded-cache", default="auto",
                   help="the FFCV train loader's decoded cache (auto|off|SIZE): auto decodes the training images once")
    p.add_argument("--only", choices=["ffcv", "torchvision"], default=None)
    return p.parse_args()


def make_jpegs(root: Path, n: int, n_eval: int, classes: int, min_side: int, max_side: int, quality: int) -> None:
    """Photo-like JPEGs: smooth colour fields, a few shapes and sensor noise, random sizes."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", classes), ("test", n_eval)):
        for k in range(count):
            c = k % classes
            h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w)  # (H, W) each
            base = rng.uniform(40, 200, size=3) + 60 * np.sin(3 * xx[..., None] + rng.uniform(0, 6, size=3))  # (H, W, 3)
            image = Image.fromarray(np.clip(base + rng.normal(0, 6, size=(h, w, 3)), 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(4):
                x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
                draw.ellipse((x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))),
                             fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{k:06d}.jpg", quality=quality)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (torchvision's workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def resident_mb() -> float:
    """Resident memory (MB) of this process and its live children (torchvision's workers)."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1)


def time_epochs(make_iter, epochs: int) -> dict:
    """Wall seconds, CPU seconds and images of the first epoch and of each later epoch."""
    times, cpus, counts = [], [], []
    for _ in range(1 + epochs):
        n = 0
        cpu0, start = cpu_seconds(), time.perf_counter()
        for images, _labels in make_iter():
            assert images.dtype.is_floating_point and images.shape[1] == 3  # (B, 3, S, S) normalised
            n += images.shape[0]
        times.append(time.perf_counter() - start)
        cpus.append(cpu_seconds() - cpu0)
        counts.append(n)
    steady_s, steady_n = sum(times[1:]), sum(counts[1:])
    return {
        "first_epoch_s": round(times[0], 3),
        "first_epoch_images_per_s": round(counts[0] / times[0], 1),
        "steady_images_per_s": round(steady_n / steady_s, 1),
        "steady_epoch_s": round(steady_s / epochs, 3),
        "steady_cpu_s_per_1000_images": round(1000 * sum(cpus[1:]) / steady_n, 2),
        "images_per_epoch": counts[1],
        "resident_mb_after": resident_mb(),
    }


def bench_torchvision(root: Path, args) -> dict:
    import torch
    from torchvision import datasets, transforms

    from fastprompt.data.pipelines import CLIP_MEAN, CLIP_STD

    bicubic = transforms.InterpolationMode.BICUBIC
    if args.split == "train":  # Dassl's dassl/data/transforms/transforms.py with CoOp's INPUT settings
        crop = [transforms.RandomResizedCrop(args.image_size, scale=(0.08, 1.0), interpolation=bicubic),
                transforms.RandomHorizontalFlip()]
    else:  # CLIP's eval transform
        crop = [transforms.Resize(args.image_size, interpolation=bicubic), transforms.CenterCrop(args.image_size)]
    tfm = transforms.Compose([*crop, transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    data = datasets.ImageFolder(str(root / args.split), transform=tfm)  # PIL open + convert("RGB")
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=args.split == "train",
                                         num_workers=args.workers, drop_last=args.split == "train",
                                         persistent_workers=True)
    return time_epochs(lambda: iter(loader), args.epochs)


def bench_ffcv(beton: Path, args) -> dict:
    from fastprompt.data import open_dataset

    ds = open_dataset(beton)
    train = args.split == "train"
    cache = {"decoded_cache": args.decoded_cache} if train else {}
    loader = ds.loader(args.split, train=train, image_size=args.image_size, batch_size=args.batch_size,
                       num_workers=args.workers, drop_last=train, **cache)
    result = time_epochs(lambda: iter(loader), args.epochs)
    held = loader.decoded.nbytes if loader.decoded is not None else 0
    return {**result, "decoded_cache": args.decoded_cache if train else "n/a", "decoded_once": loader.cache_plan.use,
            "decoded_mb_held": round(held / 2**20, 1)}


def stored_bytes_per_image(beton: Path) -> dict:
    """Mean bytes of a stored image per split (FFCV's allocation table, by sample)."""
    import numpy as np
    from ffcv.reader import Reader

    from fastprompt.data.splits import SPLIT_CODE

    reader = Reader(str(beton))
    table = reader.alloc_table
    per_sample = np.zeros(len(reader.metadata), dtype=np.int64)
    np.add.at(per_sample, table["sample_id"], table["size"])
    splits = reader.metadata["f2"]
    return {split: int(per_sample[splits == code].mean()) for split, code in SPLIT_CODE.items() if np.any(splits == code)}


def run_one(args, work: Path) -> None:
    """Benchmark `args.only` on `args.split` of the data in `work` and print its JSON line."""
    import torch

    if args.only == "ffcv":
        result = bench_ffcv(work / "bench.beton", args)
    else:
        result = bench_torchvision(work / "jpegs", args)
    print(json.dumps({
        "loader": args.only, "split": args.split, **result, "batch_size": args.batch_size, "workers": args.workers,
        "image_size": args.image_size, "sides": [args.min_side, args.max_side],
        "train_short_side": args.train_short_side, "eval_format": args.eval_format,
        "cores": len(os.sched_getaffinity(0)), "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "python": platform.python_version(), "cold_jit": args.cold_jit,
    }), flush=True)


def strip_option(argv: list[str], option: str) -> list[str]:
    """argv without `option VALUE` (and `option=VALUE`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def main() -> None:
    args = parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fastprompt-bench-loader-"))
    if args.cold_jit:  # before numba is imported: a fresh cache, so the first epoch compiles
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-cache-")
    if args.only:  # a child run: the data exists
        run_one(args, work)
        return
    try:
        root, beton = work / "jpegs", work / "bench.beton"
        if not (root / "train").exists():
            t = time.perf_counter()
            make_jpegs(root, args.images, args.eval_images, args.classes, args.min_side, args.max_side, args.quality)
            print(f"# wrote {args.images} + {args.eval_images} JPEGs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        if not beton.exists():
            from fastprompt.data import write_imagefolder

            t = time.perf_counter()
            write_imagefolder(root, beton, max_resolution=args.max_resolution, jpeg_quality=args.quality,
                              train_short_side=args.train_short_side, eval_size=args.image_size,
                              eval_format=args.eval_format, workers=args.workers)
            print(f"# wrote {beton.name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        folder = {split: sum(f.stat().st_size for f in (root / split).rglob("*.jpg")) // max(1, len(list((root / split).rglob("*.jpg"))))
                  for split in ("train", "test")}
        print(json.dumps({"beton_bytes_per_image": stored_bytes_per_image(beton), "folder_jpeg_bytes_per_image": folder}),
              flush=True)
        for split in (["train", "test"] if args.split == "both" else [args.split]):
            results = {}
            for name in ("ffcv", "torchvision"):  # each in a fresh process: no shared threads, caches or forks
                argv = strip_option(sys.argv[1:], "--split") + ["--split", split]
                if "--workdir" not in argv:
                    argv += ["--workdir", str(work)]
                out = subprocess.run([sys.executable, __file__, *argv, "--only", name], check=True, capture_output=True,
                                     text=True)
                line = out.stdout.strip().splitlines()[-1]
                print(line, flush=True)
                results[name] = json.loads(line)
            ffcv, tv = results["ffcv"], results["torchvision"]
            print(json.dumps({
                "split": split,
                "steady_ratio_ffcv_over_torchvision": round(ffcv["steady_images_per_s"] / tv["steady_images_per_s"], 2),
                "first_epoch_ratio": round(ffcv["first_epoch_images_per_s"] / tv["first_epoch_images_per_s"], 2),
                "cpu_per_image_ratio_torchvision_over_ffcv": round(
                    tv["steady_cpu_s_per_1000_images"] / ffcv["steady_cpu_s_per_1000_images"], 2),
            }), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
