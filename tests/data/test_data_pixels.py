"""The pixels a run feeds the model: CLIP's eval transform (val/test) and Dassl's bicubic
random resized crop (train), on real photographs of every kind a dataset holds."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.data import open_dataset, write_imagefolder
from fastprompt.data.pipelines import CLIP_MEAN, CLIP_STD
from fastprompt.errors import FastpromptError

PHOTOS = Path(__file__).parent / "photos"
# grayscale JPEG, 1400 px JPEG, 40x30 JPEG, CMYK JPEG, palette PNG, portrait RGB JPEG, RGBA PNG
PHOTO_FILES = sorted(p.name for p in PHOTOS.iterdir() if p.suffix in (".jpg", ".png"))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Normalised (B, 3, S, S) back to uint8 (B, S, S, 3)."""
    mean = np.asarray(CLIP_MEAN)[None, :, None, None] * 255  # (1, 3, 1, 1)
    std = np.asarray(CLIP_STD)[None, :, None, None] * 255  # (1, 3, 1, 1)
    return np.clip(np.round(images * std + mean), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def photo_beton(tmp_path_factory) -> Path:
    """`fastprompt prepare imagefolder` (defaults) of the photos: all in test, the tiny one also in train and val."""
    root = tmp_path_factory.mktemp("photos") / "root"
    for split, names in (("train", PHOTO_FILES), ("val", ["china_tiny.jpg"]), ("test", PHOTO_FILES)):
        (root / split / "photo").mkdir(parents=True)
        for name in names:
            shutil.copy(PHOTOS / name, root / split / "photo" / name)
    out = root.parent / "photos.beton"
    result = CliRunner().invoke(app, ["prepare", "imagefolder", str(root), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    return out


def test_photos_cover_every_kind_of_file():
    modes = {name: Image.open(PHOTOS / name).mode for name in PHOTO_FILES}
    assert sorted(modes.values()) == sorted(["L", "RGB", "RGB", "CMYK", "P", "RGB", "RGBA"])
    sides = [Image.open(PHOTOS / name).size for name in PHOTO_FILES]
    assert min(min(s) for s in sides) == 30 and max(max(s) for s in sides) == 1400


def test_eval_pixels_equal_clip_eval_transform_of_the_originals(photo_beton):
    from open_clip.transform import image_transform

    ds = open_dataset(photo_beton)
    assert ds.eval_size == 224 and ds.meta["image"]["eval_format"] == "raw"
    clip_eval = image_transform(224, is_train=False)  # Resize(224, bicubic) + CenterCrop(224) + CLIP mean/std
    errors = {}
    for images, _, index in ds.loader("test", image_size=224, batch_size=4, return_indices=True):
        for image, i in zip(images.numpy(), index.tolist()):  # image (3, 224, 224)
            path = ds.meta["paths"][i]
            with Image.open(photo_beton.parent / "root" / path) as im:
                reference = clip_eval(im.convert("RGB")).numpy()  # Dassl reads with convert("RGB") first
            errors[path] = np.abs(image - reference)
    assert sorted(errors) == [f"test/photo/{name}" for name in PHOTO_FILES]
    worst = max(err.mean() for err in errors.values())
    assert worst <= 0.025  # the goal, in normalised units
    assert max(err.max() for err in errors.values()) < 1e-5  # raw storage: the same pixels, float rounding only


def test_eval_ready_split_at_another_size_names_the_prepare_flag(photo_beton):
    ds = open_dataset(photo_beton)
    with pytest.raises(FastpromptError, match=r"takes 336 px; re-prepare it for this model: `fastprompt prepare imagefolder .* --eval-size 336`"):
        ds.loader("test", image_size=336)
    with pytest.raises(FastpromptError, match="random resized crop of it is not Dassl's augmentation"):
        ds.loader("val", train=True, image_size=224)
    ds.loader("train", image_size=64)  # training images are stored whole: any size


def test_resample_matches_pil_bicubic_on_crops_of_a_photo():
    from fastprompt.data.resample import resample

    photo = Image.open(PHOTOS / "hopper.jpg").convert("RGB")
    pixels = np.array(photo)  # (450, 384, 3), writable: the kernels' one specialisation
    rng = np.random.default_rng(0)
    out = np.empty((224, 224, 3), dtype=np.uint8)
    for _ in range(20):  # up- and down-sampling along each axis
        h, w = (int(v) for v in rng.integers(20, 384, size=2))
        i, j = int(rng.integers(0, 450 - h)), int(rng.integers(0, 384 - w))
        resample(pixels, i, h, 224, 0, j, w, 224, 0, out)
        reference = np.asarray(photo.crop((j, i, j + w, i + h)).resize((224, 224), Image.Resampling.BICUBIC))
        err = np.abs(out.astype(np.int16) - reference)
        # Pillow runs the passes in another order: the intermediate rounding differs by at most a level
        assert err.mean() < 0.35 and np.percentile(err, 99) <= 1, (h, w, err.mean())
    # resize then centre crop (CLIP's eval geometry): the same filter positions as Pillow's resize of the whole image
    resample(pixels, 0, 450, 262, 19, 0, 384, 224, 0, out)  # Resize(224) -> (262, 224), rows 19..243
    reference = np.asarray(photo.resize((224, 262), Image.Resampling.BICUBIC))[19:243]
    assert np.abs(out.astype(np.int16) - reference).mean() < 0.35


@pytest.mark.parametrize("flip", [False, True])
def test_training_crop_is_dassl_bicubic(tmp_path, flip):
    """A random resized crop that takes the whole image (scale and ratio pinned) is PIL's
    bicubic resize of the stored image (Dassl's RandomResizedCrop(interpolation=BICUBIC)),
    not OpenCV's bilinear that FFCV's resize does."""
    import cv2

    root = tmp_path / "root"
    square = Image.open(PHOTOS / "hopper.jpg").convert("RGB").crop((0, 0, 300, 300))  # under the 320 px cap: stored whole
    for split in ("train", "val", "test"):
        (root / split / "photo").mkdir(parents=True)
        square.save(root / split / "photo" / "a.png")
    write_imagefolder(root, tmp_path / "t.beton", jpeg_quality=100, workers=1)
    ds = open_dataset(tmp_path / "t.beton")
    whole = dict(batch_size=1, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))

    def first_image(**kwargs) -> np.ndarray:
        (images, _), = list(ds.loader("train", **whole, **kwargs))
        return to_uint8(images.numpy())[0]  # (S, S, 3)

    stored = first_image(image_size=300, flip_prob=0.0)  # the decoded training image (a same-size resize is exact)
    got = first_image(image_size=224, flip_prob=1.0 if flip else 0.0).astype(np.int16)  # (224, 224, 3)
    bicubic = np.asarray(Image.fromarray(stored).resize((224, 224), Image.Resampling.BICUBIC)).astype(np.int16)
    bilinear = cv2.resize(stored, (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.int16)
    if flip:
        bicubic, bilinear = bicubic[:, ::-1], bilinear[:, ::-1]
    err = np.abs(got - bicubic).mean()
    assert err < 0.35, err  # Pillow's pass order: intermediate rounding only
    assert np.abs(got - bilinear).mean() > 3 * err


def test_version_1_file_loads_and_warns_once(photo_beton, tmp_path, caplog):
    old = tmp_path / "old.beton"
    shutil.copy(photo_beton, old)
    meta = json.loads(photo_beton.with_suffix(".json").read_text())
    meta["format_version"] = 1
    meta["image"] = {"max_resolution": 256, "jpeg_quality": 90}
    old.with_suffix(".json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="fastprompt.data.beton"):
        ds = open_dataset(old)
        open_dataset(old)
    warnings = [r.getMessage() for r in caplog.records if "evaluation pixels are approximate" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"re-prepare it with `fastprompt prepare imagefolder {(photo_beton.parent / 'root').resolve()} --out {old} --overwrite`" in warnings[0]
    assert ds.eval_size is None
    images, _ = next(iter(ds.loader("test", image_size=64, batch_size=2)))  # stored whole: any size, resized on load
    assert images.shape == (2, 3, 64, 64)


def test_prepare_rejects_an_unknown_eval_format(tmp_path):
    (tmp_path / "root" / "a").mkdir(parents=True)
    shutil.copy(PHOTOS / "china_tiny.jpg", tmp_path / "root" / "a" / "x.jpg")
    result = CliRunner().invoke(app, ["prepare", "imagefolder", str(tmp_path / "root"), "--out", str(tmp_path / "x.beton"),
                                      "--eval-format", "png"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: eval_format='png' must be one of raw, jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # nothing written


def test_whole_images_get_clip_eval_geometry_on_load(photo_beton):
    """Images stored whole (training images here; version-1 files, the demo set) are resized
    and centre-cropped by the loader with torchvision's geometry: close to CLIP's transform of
    the originals (storage at <= 320 px and JPEG stand between them)."""
    from open_clip.transform import image_transform

    from fastprompt.data.decoders import _center_offset

    assert [_center_offset(side, 4) for side in range(4, 12)] == [int(round((s - 4) / 2.0)) for s in range(4, 12)]
    ds = open_dataset(photo_beton)
    clip_eval = image_transform(224, is_train=False)
    worst = 0.0
    for images, _, index in ds.loader("train", train=False, image_size=224, batch_size=8, return_indices=True):
        for image, i in zip(images.numpy(), index.tolist()):  # image (3, 224, 224)
            with Image.open(photo_beton.parent / "root" / ds.meta["paths"][i]) as im:
                worst = max(worst, float(np.abs(image - clip_eval(im.convert("RGB")).numpy()).mean()))
    assert worst < 0.08, worst  # shifting the crop by one pixel alone costs up to 0.15 on these photos


def test_a_run_whose_model_takes_another_size_stops_before_training(photo_beton, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--method", "coop", "--data", str(photo_beton), "--clip", "fastprompt-tiny",
                                      "--pretrained", "none", "--device", "cpu", "--epochs", "1", "--warmup-epochs", "0", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "takes 64 px" in lines[0] and lines[0].endswith("--eval-size 64`"), lines
    assert not out.exists()


def _photo_crops(seed: int, count: int):
    """Every photo (RGB, as Dassl reads it) with random crops of it, up- and down-sampling."""
    rng = np.random.default_rng(seed)
    for name in PHOTO_FILES:
        with Image.open(PHOTOS / name) as im:
            pixels = np.array(im.convert("RGB"))  # (H, W, 3), writable
        height, width = pixels.shape[:2]
        for _ in range(count):
            h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
            yield name, pixels, int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


def test_fast_resample_equals_the_reference_bit_for_bit():
    """The vectorised passes (`resample`, `resample_normalised`) give the values of the
    one-value-at-a-time reference on every photo, for crops and for CLIP's eval geometry;
    the fused flip and normalisation equal flipping and normalising the uint8 image."""
    from fastprompt.data.decoders import normalisation_table
    from fastprompt.data.resample import resample, resample_normalised, resample_reference

    lut = normalisation_table(CLIP_MEAN, CLIP_STD)  # (3, 256)
    fast, reference = np.empty((224, 224, 3), dtype=np.uint8), np.empty((224, 224, 3), dtype=np.uint8)
    normalised = np.empty((3, 224, 224), dtype=np.float32)
    for k, (name, pixels, i, j, h, w) in enumerate(_photo_crops(seed=1, count=12)):
        resample(pixels, i, h, 224, 0, j, w, 224, 0, fast)
        resample_reference(pixels, i, h, 224, 0, j, w, 224, 0, reference)
        assert np.array_equal(fast, reference), (name, i, j, h, w)
        flip = k % 2 == 1
        resample_normalised(pixels, i, h, 224, 0, j, w, 224, 0, flip, lut, normalised)
        image = reference[:, ::-1] if flip else reference  # (224, 224, 3)
        expected = lut[np.arange(3)[:, None, None], image.transpose(2, 0, 1)]  # (3, 224, 224)
        assert np.array_equal(normalised, expected), (name, flip)
    pixels = np.array(Image.open(PHOTOS / "hopper.jpg").convert("RGB"))  # (450, 384, 3), writable
    resample(pixels, 0, 450, 262, 19, 0, 384, 224, 0, fast)  # Resize(224) -> (262, 224), rows 19..243
    resample_reference(pixels, 0, 450, 262, 19, 0, 384, 224, 0, reference)
    assert np.array_equal(fast, reference)


def test_eval_transform_gives_the_loaders_test_pixels_bit_for_bit(photo_beton):
    """`create_model_and_transforms`' eval transform on the original files equals the loader's
    test batch of the prepared file, value for value (issue 25 §6)."""
    from fastprompt.data.transforms import EvalTransform

    ds = open_dataset(photo_beton)
    transform = EvalTransform(224)
    seen = []
    for images, _, index in ds.loader("test", image_size=224, batch_size=4, return_indices=True):
        for image, i in zip(images, index.tolist()):  # image (3, 224, 224)
            path = ds.meta["paths"][i]
            with Image.open(photo_beton.parent / "root" / path) as original:
                assert torch.equal(transform(original), image), path
            seen.append(path)
    assert sorted(seen) == [f"test/photo/{name}" for name in PHOTO_FILES]


def test_train_transform_is_the_loaders_kernel_for_the_same_crop():
    """For the crop and flip the training loader draws from a sample's stream, the train
    transform's `crop` of the stored image equals the loader's kernel (`decoders._augment`) bit
    for bit, through its fused path and through its uint8 resize-then-flip path."""
    from fastprompt.data.decoders import _FLIP_COUNTER, _augment, _random_crop, _uniform, augment_key
    from fastprompt.data.transforms import TrainTransform

    transform = TrainTransform(224)
    log_lo, log_hi = np.log(transform.ratio)
    lo, hi = transform.scale
    fused = np.empty((1, 3, 224, 224), dtype=np.float32)
    resized = np.empty((224, 224, 3), dtype=np.uint8)
    flips = set()
    for n, name in enumerate(PHOTO_FILES):
        with Image.open(PHOTOS / name) as original:
            stored = transform.stored(original)  # (H, W, 3)
        assert min(stored.shape[:2]) <= 320 and max(stored.shape[:2]) <= 1024
        for sample in range(3):
            state = np.uint64(augment_key(n, sample))
            i, j, h, w = _random_crop(state, stored.shape[0], stored.shape[1], lo, hi, log_lo, log_hi)
            flip = bool(_uniform(state, _FLIP_COUNTER) < transform.flip_prob)
            flips.add(flip)
            got = transform.crop(stored, i, j, h, w, flip).numpy()  # (3, 224, 224)
            _augment(stored, state, lo, hi, log_lo, log_hi, transform.flip_prob, resized, True, transform.lut, fused, 0)
            assert np.array_equal(got, fused[0]), (name, sample)
            _augment(stored, state, lo, hi, log_lo, log_hi, transform.flip_prob, resized, False, transform.lut, fused, 0)
            assert np.array_equal(got, transform.lut[np.arange(3)[:, None, None], resized.transpose(2, 0, 1)]), name
    assert flips == {False, True}


def test_train_transform_is_dassls_transform_of_the_stored_image():
    """On an original photo (1400 px: shrunk to 320 px on its shorter side first, as `prepare`
    stores it) the train transform draws torchvision's crop and flip from torch's generator
    (Dassl's RandomResizedCrop(224, bicubic) + RandomHorizontalFlip + ToTensor + CLIP's Normalize
    under the same seed) and resizes with PIL's filter: Pillow's pass order only."""
    from torchvision import transforms as T

    from fastprompt.data.transforms import TrainTransform

    transform = TrainTransform(224)
    dassl = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    std = torch.tensor(CLIP_STD)[:, None, None] * 255  # (3, 1, 1): one level in normalised units
    for name in ("china_large.jpg", "hopper_rgba.png"):
        with Image.open(PHOTOS / name) as original:
            stored = transform.stored(original)
            if name == "china_large.jpg":
                assert min(original.size) > 320 and min(stored.shape[:2]) == 320  # shrunk as prepare stores it
            for seed in range(4):
                torch.manual_seed(seed)
                got = transform(original)  # (3, 224, 224)
                torch.manual_seed(seed)
                reference = dassl(Image.fromarray(stored))
                levels = ((got - reference) * std).abs()  # (3, 224, 224)
                assert levels.mean() < 0.35 and torch.quantile(levels.flatten(), 0.99) <= 1.0 + 1e-3, (name, seed)
