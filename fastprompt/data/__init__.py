"""fastprompt's data layer: FFCV `.beton` datasets, CoOp protocols, the demo set.

    from fastprompt.data import open_dataset, write_coop, write_demo, write_imagefolder
    write_demo("demo.beton")                        # built-in coloured-shapes set
    write_imagefolder("EuroSAT/2750", "eurosat.beton", split_json="split_zhou_EuroSAT.json")
    write_coop("eurosat", "/data", "eurosat.beton")  # /data/eurosat/ laid out as CoOp's DATASETS.md says
    ds = open_dataset("eurosat.beton")              # finds and checks eurosat.json
    ds.classnames, ds.template, ds.split_sizes
    idx = ds.indices("train", shots=16, seed=1, classes="base")
    ds.files("train", shots=16, seed=1)             # the split file's paths of Dassl's draw (the papers' files)
    for images, labels in ds.loader("train", shots=16, seed=1, classes="base", image_size=224):
        ...                                         # float32 (B, 3, 224, 224) normalised, int64 (B,)

Modules: `beton` (file + sidecar, writing and opening), `splits` (CoOp split files,
stratified splits, few-shot, base/new), `imagefolder` (folders -> .beton), `coop` (CoOp's
dataset folders -> .beton), `demo` (the procedural set), `datasets` (the table of CoOp's
datasets: templates, class names, class counts, layouts), `order` (the epoch order),
`pixels` (how images are stored: val/test as CLIP's eval transform, train whole up to a
cap), `pipelines` (`LoaderConfig`, the FFCV pipelines), `decoders` (numba decode kernels behind
FFCV's decoder API), `resample` (PIL's bicubic resize in numba), `loaders` (the loader factory; imported on first use, it pulls in
FFCV, numba and torch), `ffcv_compat` (FFCV workarounds, applied when a loader is built).
"""

from fastprompt.data.beton import BetonDataset, WriteOptions, WriteSummary, open_dataset, sidecar_path
from fastprompt.data.coop import write_coop
from fastprompt.data.demo import DEMO_CLASSNAMES, DemoConfig, write_demo
from fastprompt.data.imagefolder import write_imagefolder
from fastprompt.data.splits import CLASS_SUBSETS, SPLITS

__all__ = [
    "BetonDataset",
    "CLASS_SUBSETS",
    "DEMO_CLASSNAMES",
    "DemoConfig",
    "SPLITS",
    "WriteOptions",
    "WriteSummary",
    "open_dataset",
    "sidecar_path",
    "write_coop",
    "write_demo",
    "write_imagefolder",
]
