"""FFCV loaders: subsets, relabelling, preprocessing, determinism per (seed, epoch), resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastprompt.runtime import available_cores
from fastprompt.data.decoders import augment_key
from fastprompt.data.order import EpochOrder
from fastprompt.data.pipelines import CLIP_MEAN, CLIP_STD
from fastprompt.errors import FastpromptError


def run_epoch(loader):
    """All batches of one epoch: (images list, labels list, indices list), copied."""
    images, labels, indices = [], [], []
    for x, y, i in loader:
        images.append(x.clone())
        labels.append(y.clone())
        indices.append(i.clone())
    return images, labels, indices


def test_clip_constants_match_open_clip():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert tuple(CLIP_MEAN) == tuple(OPENAI_DATASET_MEAN) and tuple(CLIP_STD) == tuple(OPENAI_DATASET_STD)


def test_train_loader_delivers_the_few_shot_subset(demo):
    loader = demo.loader("train", shots=16, seed=1, image_size=64, batch_size=32, num_workers=64, return_indices=True)
    assert loader.num_workers == available_cores() and loader.train and loader.drop_last
    assert len(loader) == 5 and loader.num_samples == 160
    images, labels, indices = run_epoch(loader)
    assert len(images) == 5
    for x, y in zip(images, labels):
        assert x.shape == (32, 3, 64, 64) and x.dtype == torch.float32 and x.is_contiguous()
        assert y.dtype == torch.int64 and y.shape == (32,)
    idx = torch.cat(indices).numpy()
    assert np.array_equal(np.sort(idx), demo.indices("train", shots=16, seed=1))  # each sample once
    assert np.array_equal(torch.cat(labels).numpy(), demo.labels[idx])
    pixels = torch.cat(images)  # (160, 3, 64, 64) normalised: raw [0, 255] maps into about [-1.8, 2.2]
    assert -1.8 < float(pixels.min()) and float(pixels.max()) < 2.2 and 0.3 < float(pixels.std()) < 1.5


def test_epochs_are_reproducible_and_resumable(demo):
    config = dict(shots=4, seed=1, image_size=48, batch_size=8, return_indices=True, order_seed=3)
    first = demo.loader("train", **config)
    e0, e1 = run_epoch(first), run_epoch(first)
    assert first.epoch == 2
    assert not np.array_equal(torch.cat(e0[2]).numpy(), torch.cat(e1[2]).numpy())  # a new order each epoch
    by_index0 = {int(i): x for xs, ids in zip(e0[0], e0[2]) for x, i in zip(xs, ids)}
    by_index1 = {int(i): x for xs, ids in zip(e1[0], e1[2]) for x, i in zip(xs, ids)}
    assert sum(torch.equal(by_index0[i], by_index1[i]) for i in by_index0) < 3  # and new augmentations

    # a fresh loader (a restarted trainer) at epoch 1, with another number of decode threads
    resumed = demo.loader("train", **config, num_workers=1)
    resumed.set_epoch(1)
    r1 = run_epoch(resumed)
    for a, b in zip(e1, r1):
        assert all(torch.equal(u, v) for u, v in zip(a, b))  # same batches, same pixels
    other = demo.loader("train", **{**config, "order_seed": 4})
    o0 = run_epoch(other)
    assert not all(torch.equal(u, v) for u, v in zip(e0[0], o0[0]))
    assert augment_key(3, 1) != augment_key(4, 0)  # seeds are not shifted epochs (FFCV seeds with seed + epoch)


def test_flip_and_full_crop_match_the_eval_pipeline(demo):
    """Crop scale 1, ratio 1, flip always: the train decoder must give the eval image mirrored."""
    train = demo.loader("val", train=True, shuffle=False, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                        flip_prob=1.0, image_size=64, batch_size=50, return_indices=True)
    evaluate = demo.loader("val", image_size=64, batch_size=50, return_indices=True)
    assert not evaluate.train and not evaluate.drop_last
    (xt, _, it), (xe, _, ie) = next(iter(train)), next(iter(evaluate))
    assert torch.equal(it, ie)
    assert torch.equal(xt, xe.flip(-1))


def test_base_new_relabelling(demo):
    assert demo.class_subset("base") == [0, 1, 2, 3, 4] and demo.class_subset("new") == [5, 6, 7, 8, 9]
    assert demo.classnames_for("new") == demo.classnames[5:]
    loader = demo.loader("test", classes="new", image_size=32, batch_size=64, return_indices=True)
    assert loader.classnames == demo.classnames[5:] and loader.num_classes == 5
    _, labels, indices = run_epoch(loader)
    idx, y = torch.cat(indices).numpy(), torch.cat(labels).numpy()
    assert np.array_equal(idx, np.flatnonzero((demo.splits == 2) & (demo.labels >= 5)))  # in order, once each
    assert np.array_equal(y, demo.labels[idx] - 5) and y.min() == 0 and y.max() == 4
    base = demo.indices("train", shots=16, seed=2, classes="base")
    everything = demo.indices("train", shots=16, seed=2)
    assert np.array_equal(base, everything[demo.labels[everything] < 5])


def test_small_subsets_and_bad_arguments(demo):
    one_shot = demo.loader("train", shots=1, image_size=32, batch_size=32)
    assert not one_shot.drop_last and len(one_shot) == 1  # 10 samples < batch: keep them (Dassl's rule)
    with pytest.raises(FastpromptError, match="drop_last=True with batch_size=32 but the subset has only 10"):
        demo.loader("train", shots=1, batch_size=32, drop_last=True)
    assert demo.loader("train", shots=26).num_samples == 250  # 25 train images a class: each takes all (Dassl)
    with pytest.raises(FastpromptError, match="unknown split 'training'"):
        demo.indices("training")
    with pytest.raises(FastpromptError, match="unknown class subset"):
        demo.loader("test", classes="old")
    with pytest.raises(FastpromptError, match="image_size=0 must be an integer >= 1"):
        demo.loader("test", image_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(FastpromptError, match="no CUDA device is visible"):
            demo.loader("test", device="cuda")


def test_epoch_order_gives_every_world_size_the_same_global_batches():
    """W ranks with batch B / W: the ranks' k-th batches together are the one-process k-th batch."""
    indices = np.arange(100, 161) * 3  # 61 samples, any values
    single = EpochOrder(indices, order_seed=4, shuffle=True, rank=0, world=1)
    assert np.array_equal(single.sample_order(2), EpochOrder(indices, 4, True, 0, 1).sample_order(2))
    assert not np.array_equal(single.sample_order(2), single.sample_order(3))
    assert not np.array_equal(single.sample_order(1), EpochOrder(indices, 5, True, 0, 1).sample_order(0))
    assert np.array_equal(np.sort(single.sample_order(0)), indices)
    batch = 12
    for world in (2, 3, 4):
        full = single.sample_order(2)
        shards = [EpochOrder(indices, 4, True, r, world).sample_order(2) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # equal steps on every rank (padded)
        for k in range(len(full) // batch):
            together = np.concatenate([s[k * batch // world : (k + 1) * batch // world] for s in shards])
            assert np.array_equal(np.sort(together), np.sort(full[k * batch : (k + 1) * batch]))
        evaluation = [EpochOrder(indices, 4, False, r, world).sample_order(0) for r in range(world)]
        assert np.array_equal(np.sort(np.concatenate(evaluation)), indices)  # each sample once, no padding


def test_distributed_loader(demo, tmp_path):
    """Under torch.distributed (world size 1 here) the loader shards with EpochOrder and keeps
    every sample's (seed, epoch) augmentation: the same batches as without it. (Two gloo
    processes were also checked by hand: disjoint shards, identical per-sample pixels.)"""
    import torch.distributed as dist

    config = dict(shots=2, seed=1, image_size=32, batch_size=4, return_indices=True, order_seed=5)
    single = demo.loader("train", **config)
    single.set_epoch(2)
    reference = run_epoch(single)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        sharded = demo.loader("train", **config)
        assert sharded.distributed and (sharded.rank, sharded.world_size) == (0, 1)
        sharded.set_epoch(2)
        got = run_epoch(sharded)
    finally:
        dist.destroy_process_group()
    for a, b in zip(reference, got):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.slow
def test_reading_a_beton_never_builds_a_numba_typed_dict(demo_path):
    """ffcv_compat workaround 0: FFCV's one typed Dict (`IMAGE_MODES`) would compile numba's
    dict implementation in every process (3-5 s, uncacheable); a fresh process that opens a
    .beton and loads a batch never compiles it, reads the same modes, and leaves numba.typed as it was.
    The same process's training (decoded every epoch, and decoded once) and evaluation batches use
    one specialisation of each decode kernel (a cold compile of the family is ~20 s: a literal 0, a
    read-only image or a strided index array each compiled them again)."""
    import json
    import subprocess
    import sys

    probe = (
        "import json, sys\n"
        "from fastprompt.data import open_dataset\n"
        "batch = next(iter(open_dataset(sys.argv[1]).loader('train', shots=1, seed=1, image_size=32, batch_size=4,"
        " num_workers=1)))\n"
        "import numba.typed, numba.typed.typeddict as typeddict, ffcv.fields.rgb_image as rgb\n"
        "compiled = len(typeddict._make_dict.overloads) + len(typeddict._setitem.overloads)\n"
        "print(json.dumps({'compiled': compiled, 'modes': dict(rgb.IMAGE_MODES),"
        " 'patched': 'Dict' in vars(numba.typed), 'images': list(batch[0].shape)}))\n"
        "data = open_dataset(sys.argv[1])\n"
        "for split, options in [('train', dict(shots=1, decoded_cache='auto')), ('test', {})]:\n"
        "    next(iter(data.loader(split, seed=1, image_size=32, batch_size=4, num_workers=1, **options)))\n"
        "import numba.core.registry, fastprompt.data.decoders as d, fastprompt.data.resample as r\n"
        "print(json.dumps({k: len(f.signatures) for m in (d, r) for k, f in vars(m).items()"
        " if isinstance(f, numba.core.registry.CPUDispatcher) and not k.endswith('_reference')}))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe, str(demo_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report, kernels = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert report == {"compiled": 0, "modes": {"jpg": 0, "raw": 1}, "patched": False, "images": [4, 3, 32, 32]}
    # the kernels called from Python: one each; a kernel they call shows its specialisations only where this
    # process compiled it (loaded from numba's cache with its caller, it lists none): at most one
    top = ("_decode_random_resized_crop", "_crop_decoded", "decode_rows", "_decode_center_crop")
    assert len(kernels) >= 20 and all(kernels[k] == 1 for k in top) and max(kernels.values()) == 1, kernels


def test_ffcv_compiles_none_of_our_decoders(demo, monkeypatch):
    """ffcv_compat workaround 4: FFCV would compile each decoder's per-batch wrapper with numba
    for every Loader (~0.7 s each); ours run as Python around the cached kernels. FFCV still
    wraps its memory reader (workaround 1 makes that lazy), which our kernels never call."""
    import ffcv.pipeline.compiler as compiler

    wrapped = {}  # qualified name -> numba dispatcher of every function FFCV hands to numba
    njit = compiler.njit

    def counting_njit(*args, **kwargs):
        def wrap(function):
            wrapped[function.__qualname__] = dispatcher = njit(*args, **kwargs)(function)
            return dispatcher
        return wrap

    monkeypatch.setattr(compiler, "njit", counting_njit)
    for split in ("train", "test"):  # the random-crop and the centre-crop decoder
        loader = demo.loader(split, shots=1 if split == "train" else None, seed=1, image_size=32, batch_size=4,
                             num_workers=1)
        images, labels = next(iter(loader))[:2]
        assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    assert not any("decode" in name for name in wrapped), list(wrapped)
    assert {name: len(d.overloads) for name, d in wrapped.items() if d.overloads} == {}  # nothing compiled


@pytest.mark.parametrize("workers", [1, 2])
def test_decoded_cache_gives_the_batches_of_decoding_every_epoch(demo, workers):
    """Decode once (`decoded_cache`): the subset is decoded into memory before the first epoch
    and every epoch crops from it; two epochs' batches equal, bit for bit, those of the loader
    that decodes every epoch (same seed), and a resumed cached loader's too."""
    config = dict(shots=4, seed=1, image_size=40, batch_size=8, return_indices=True, order_seed=3, num_workers=workers)
    every_epoch = demo.loader("train", **config)
    once = demo.loader("train", **config, decoded_cache="auto")
    assert not every_epoch.cache_plan.use and every_epoch.decoded is None
    assert once.cache_plan.use and once.decoded is None  # decoded at the first iteration, not when built
    reference = [run_epoch(every_epoch) for _ in range(2)]
    got = [run_epoch(once) for _ in range(2)]
    held = once.decoded
    assert held is not None and held.nbytes == once.cache_plan.nbytes
    from ffcv.reader import Reader

    records = Reader(str(demo.path)).metadata["f0"][demo.indices("train", shots=4, seed=1)]
    assert held.nbytes == int(np.sum(records["height"].astype(np.int64) * records["width"] * 3))  # as stored, H x W x 3
    for ref_epoch, got_epoch in zip(reference, got):
        for a, b in zip(ref_epoch, got_epoch):
            assert len(a) == len(b) == 5 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(got[0][0], got[1][0]))  # new crops every epoch
    resumed = demo.loader("train", **config, decoded_cache="64M")
    resumed.set_epoch(1)
    assert all(torch.equal(u, v) for u, v in zip(run_epoch(resumed)[0], reference[1][0]))


def _shared_files() -> set:
    from fastprompt.data.decoded import _shared_folder

    return set(_shared_folder().glob("fastprompt-decoded-*"))


def test_decoded_cache_under_torch_distributed(demo, tmp_path):
    """Under torch.distributed (world size 1 here) the decoded subset lives in shared memory
    (one copy per machine), whose file is gone once the ranks have mapped it; same batches."""
    import torch.distributed as dist

    config = dict(shots=2, seed=1, image_size=32, batch_size=4, return_indices=True, order_seed=5)
    single = demo.loader("train", **config)
    single.set_epoch(2)
    reference = run_epoch(single)
    before = _shared_files()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        sharded = demo.loader("train", **config, decoded_cache="auto")
        sharded.set_epoch(2)
        got = run_epoch(sharded)
    finally:
        dist.destroy_process_group()
    assert isinstance(sharded.decoded.pixels, np.memmap) and _shared_files() == before
    for a, b in zip(reference, got):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


_RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
import fastprompt.data.decoders as decoders
from fastprompt.data import open_dataset

decoded = []
decode_rows = decoders.decode_rows
def counting(samples, *args):
    decoded.extend(int(s) for s in samples)
    return decode_rows(samples, *args)
decoders.decode_rows = counting
dist.init_process_group("gloo")
loader = open_dataset(sys.argv[1]).loader("train", shots=4, seed=1, image_size=32, batch_size=4, return_indices=True,
                                          order_seed=5, num_workers=1, decoded_cache="auto")
loader.set_epoch(1)
images = {int(i): x for xs, _, ids in loader for x, i in zip(xs, ids)}
torch.save({"images": images, "decoded": decoded}, f"{sys.argv[2]}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_decoded_cache_ranks_decode_only_their_shard(demo, demo_path, tmp_path):
    """torchrun, 2 ranks: each decodes half of the subset into the shared copy, and every
    sample's pixels equal the one-process loader's (decoding every epoch)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = _shared_files()
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), str(demo_path),
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    subset = demo.indices("train", shots=4, seed=1)
    decoded = [sorted(r["decoded"]) for r in ranks]
    assert sorted(decoded[0] + decoded[1]) == sorted(subset.tolist()) and len(decoded[0]) == len(subset) // 2
    single = demo.loader("train", shots=4, seed=1, image_size=32, batch_size=8, return_indices=True, order_seed=5)
    single.set_epoch(1)
    reference = {int(i): x for xs, _, ids in single for x, i in zip(xs, ids)}
    got = {**ranks[0]["images"], **ranks[1]["images"]}
    assert sorted(got) == sorted(reference)
    assert all(torch.equal(got[i], reference[i]) for i in reference)
    assert _shared_files() == before


def test_decoded_cache_setting_and_plan(demo, monkeypatch):
    """The setting's forms, the budget rule (auto: a quarter of the available memory) and the
    log line; evaluation loaders refuse it."""
    import fastprompt.data.decoded as decoded

    parse = decoded.parse_cache_setting
    assert [parse("x", v) for v in ("Auto", "off", "512M", "1.5GiB", "2000000", 4096)] == \
        ["auto", "off", 512 * 2**20, int(1.5 * 2**30), 2_000_000, 4096]
    heights, widths = np.array([320, 427]), np.array([427, 320])  # 2 x 409,920 bytes
    assert decoded.plan_cache("off", heights, widths).use is False
    fits = decoded.plan_cache(819_840, heights, widths)
    assert fits.use and fits.nbytes == 819_840 and fits.line().startswith("decoded once: 2 training images, 800.6 KB held")
    over = decoded.plan_cache(819_839, heights, widths)
    assert not over.use and over.line() == "decoding every epoch: 2 training images (the decoded 800.6 KB exceed decoded_cache 800.6 KB)"
    monkeypatch.setattr(decoded, "available_memory", lambda: 4 * 819_840)
    assert decoded.plan_cache("auto", heights, widths).use
    monkeypatch.setattr(decoded, "available_memory", lambda: 4 * 819_840 - 4)
    assert not decoded.plan_cache("auto", heights, widths).use
    with pytest.raises(FastpromptError, match="decoded_cache='auto' applies to the training pipeline; leave it 'off'"):
        demo.loader("test", image_size=32, decoded_cache="auto")
    with pytest.raises(FastpromptError, match="decoded_cache='lots' must be auto, off, or a memory size above 0"):
        demo.loader("train", decoded_cache="lots")
