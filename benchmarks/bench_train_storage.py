"""Training storage (`prepare --train-short-side`): Dassl's crop of the original file against
fastprompt's crop of the stored image, with the memory and crop time each storage costs.

For every image and a set of random resized crops (torchvision's parameters, drawn in the
original's coordinates): Dassl's pixels are `original.crop(box).resize((224, 224), BICUBIC)`
(PIL, as dassl/data/transforms/transforms.py through torchvision); fastprompt's are the
stored image (shorter side capped at S with PIL's bicubic, `fastprompt.data.pixels`, then
JPEG at the quality `prepare` uses, decoded with OpenCV's libjpeg-turbo) cropped at the same
box in the stored image's coordinates and resized by `fastprompt.data.resample`. Reported
per cap: mean and 99th-percentile |difference| in uint8 levels, the decoded bytes per image
(what the decoded cache holds) and the resample's time per crop (one thread).

    python benchmarks/bench_train_storage.py                          # tests/data/photos + 200 synthetic 375-500 px
    python benchmarks/bench_train_storage.py --caps 256,320,448,0     # 0: the original size
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--caps", default="320,448,0", help="shorter-side caps to compare; 0: the original size")
    p.add_argument("--synthetic", type=int, default=200, help="synthetic photo-like JPEGs of 375-500 px (bench_loader's)")
    p.add_argument("--crops", type=int, default=10, help="random resized crops per image")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored training images")
    return p.parse_args()


def images(synthetic: int):
    """(name, RGB PIL image): the test photos, then bench_loader's synthetic JPEGs."""
    import tempfile

    from PIL import Image

    from bench_loader import make_jpegs

    for path in sorted((ROOT / "tests" / "data" / "photos").glob("*.*")):
        if path.suffix in (".jpg", ".png"):
            with Image.open(path) as im:
                yield path.name, im.convert("RGB")
    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp), synthetic, 0, 10, 375, 500, 90)
        for path in sorted(Path(tmp).rglob("*.jpg")):
            with Image.open(path) as im:
                yield "synthetic", im.convert("RGB")


def random_box(rng, height: int, width: int):
    """torchvision's RandomResizedCrop.get_params (scale (0.08, 1), ratio (3/4, 4/3))."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


def stored(image, cap: int, quality: int) -> np.ndarray:
    import cv2
    from ffcv.fields.rgb_image import encode_jpeg

    from fastprompt.data.pixels import train_storage_pixels

    pixels = train_storage_pixels(image, cap or 8192, 8192) if cap else np.asarray(image, dtype=np.uint8)
    data = encode_jpeg(np.ascontiguousarray(pixels), quality)
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)  # (H, W, 3)


def main() -> None:
    from PIL import Image

    from fastprompt.data.ffcv_compat import import_ffcv

    import_ffcv()
    from fastprompt.data.resample import resample

    args = parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    rng = np.random.default_rng(0)
    out = np.empty((224, 224, 3), dtype=np.uint8)
    stats = {cap: {"diffs": [], "bytes": [], "seconds": []} for cap in caps}
    resample(np.zeros((8, 8, 3), np.uint8), 0, 8, 224, 0, 0, 8, 224, 0, out)  # load the kernel before timing
    for name, image in images(args.synthetic):
        width, height = image.size
        boxes = [random_box(rng, height, width) for _ in range(args.crops)]
        dassl = [np.asarray(image.crop((j, i, j + w, i + h)).resize((224, 224), Image.Resampling.BICUBIC,
                                                                   reducing_gap=None)).astype(np.int16)
                 for i, j, h, w in boxes]
        for cap in caps:
            pixels = stored(image, cap, args.quality)
            sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
            stats[cap]["bytes"].append(pixels.nbytes)
            for (i, j, h, w), reference in zip(boxes, dassl):
                i2, j2 = int(round(i * sy)), int(round(j * sx))
                h2 = max(1, min(pixels.shape[0] - i2, int(round(h * sy))))
                w2 = max(1, min(pixels.shape[1] - j2, int(round(w * sx))))
                start = time.perf_counter()
                resample(pixels, i2, h2, 224, 0, j2, w2, 224, 0, out)
                stats[cap]["seconds"].append(time.perf_counter() - start)
                stats[cap]["diffs"].append(np.abs(out.astype(np.int16) - reference).ravel())
    for cap in caps:
        diffs = np.concatenate(stats[cap]["diffs"])
        print(json.dumps({
            "train_short_side": cap or "original", "images": len(stats[cap]["bytes"]), "crops": len(stats[cap]["seconds"]),
            "mean_abs_diff_levels": round(float(diffs.mean()), 3), "p99_abs_diff_levels": float(np.percentile(diffs, 99)),
            "decoded_kb_per_image": round(float(np.mean(stats[cap]["bytes"])) / 1024, 1),
            "resample_ms_per_crop": round(1000 * float(np.median(stats[cap]["seconds"])), 3),
        }), flush=True)


if __name__ == "__main__":
    main()
