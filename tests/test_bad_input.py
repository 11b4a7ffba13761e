"""Bad input, everywhere the same rule (issue 17 §5): exit code 2, one line on stderr that names
the problem and the fix, no traceback, and nothing written.

One table holds every case: the command line (with placeholders for the files the fixtures
make) and a piece of the expected message. The run-directory cases belong to the run-identity
work (issue 17 §1/§2/§4) and are added to the table there: see the marked block.
"""

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastprompt.cli import app

FASTPROMPT = str(Path(sys.executable).parent / "fastprompt")
TINY = ["--clip", "fastprompt-tiny", "--pretrained", "none", "--workers", "1"]


def train(method="coop", *extra):
    return ["train", "--method", method, "--data", "{demo}", "--out", "{run}", *TINY, "--epochs", "1", *extra]


def train_into(out, *extra):
    """A coop train command line with `--out out`."""
    return ["train", "--method", "coop", "--data", "{demo}", "--out", out, *TINY, "--epochs", "1", *extra]


CASES = {
    # --- hyper-parameters: NaN, negative, out of range
    "lr nan": (train("coop", "--lr", "nan"), "lr=nan must be a number > 0"),
    "lr inf": (train("coop", "--lr", "inf"), "lr=inf must be a number > 0"),
    "group lr negative": (train("vpt-deep", "--lr.visual", "-1"), "lr.visual=-1.0 must be a number > 0"),
    "momentum negative": (train("coop", "--momentum", "-0.5"), "momentum=-0.5 must be a number >= 0"),
    "weight decay nan": (train("coop", "--weight-decay", "nan"), "weight_decay=nan must be a number >= 0"),
    "warmup lr negative": (train("coop", "--warmup-lr", "-1e-5"), "warmup_lr=-1e-05 must be a number >= 0"),
    "warmup epochs negative": (train("coop", "--warmup-epochs", "-1"), "warmup_epochs=-1 must be an integer >= 0"),
    "epochs zero": (train("coop", "--epochs", "0"), "epochs=0 must be an integer >= 1"),
    "method option nan": (train("cavpt", "--cavpt.alpha", "nan"), "alpha=nan must be a number >= 0"),
    "method option negative": (train("e2mim", "--e2mim.mi-weight", "-1"), "mi_weight=-1.0 must be a number >= 0"),
    "seed above 2^32-1": (train("coop", "--seed", str(2**32)), "seed=4294967296 must be an integer in 0..4294967295"),
    "seed negative": (train("coop", "--seed", "-1"), "seed=-1 must be an integer in 0..4294967295"),
    # --- flags and choices
    "option of another method": (train("coop", "--cavpt.topk", "5"),
                                 "--cavpt.topk is an option of cavpt, not of coop; drop --cavpt.topk or use --method cavpt"),
    "off switch of another method": (train("vpt-deep", "--coop.shared"), "--coop.shared is an option of coop"),
    "method not trainable": (train("zeroshot"), "Invalid value for '--method': 'zeroshot' is not one of 'coop'"),
    "method option choice": (train("cavpt", "--cavpt.variant", "dpt"),
                             "Invalid value for '--cavpt.variant': 'dpt' is not one of 'paper', 'released'"),
    "visual prompt placement": (train("vpt-deep", "--vpt.placement", "middle"),
                                "Invalid value for '--vpt.placement': 'middle' is not one of 'after-ln-pre', 'before-ln-pre'"),
    "text depth beyond the tower": (train("coop", "--coop.text-depth", "3", "--warmup-epochs", "0"),
                                    "text_depth=3 does not fit the text tower's 2 layers; pick 1..2"),
    "vision depth beyond the tower": (train("vlp", "--vpt.vision-depth", "4", "--warmup-epochs", "0"),
                                      "vision_depth=4 does not fit the image tower's 3 layers; pick 1..3"),
    "vision depth zero": (train("vpt-deep", "--vpt.vision-depth", "0"), "vision_depth=0 must be a positive integer"),
    "maple depth beyond the towers": (train("maple", "--maple.prompt-depth", "3", "--warmup-epochs", "0"),
                                      "prompt_depth=3 does not fit the towers (2 text and 3 image layers); pick 1..2"),
    "maple class-specific context": (train("maple", "--coop.csc"), "csc=True: MaPLe couples one context shared by every class"),
    "cocoop n_ctx against ctx_init": (train("cocoop", "--coop.n-ctx", "8"),
                                      "n_ctx=8 contradicts ctx_init='a photo of a' (4 words): CoCoOp's ctx_init sets the "
                                      "context length, one token per word; drop n_ctx or give a phrase of 8 words"),
    "cocoop class-specific context": (train("cocoop", "--coop.csc"), "csc=True: CoCoOp's context is shared by every class"),
    "kgcoop another ctx_init": (train("kgcoop", "--coop.ctx-init", "itap of a"),
                                "ctx_init='itap of a': KgCoOp's released code initialises its context from 'a photo of a' "
                                "whatever CTX_INIT says; drop --coop.ctx-init"),
    "kgcoop n_ctx against ctx_init": (train("kgcoop", "--coop.n-ctx", "16"),
                                      "n_ctx=16 contradicts ctx_init='a photo of a' (4 tokens): KgCoOp's phrase sets the "
                                      "context length"),
    "kgcoop class-specific context": (train("kgcoop", "--coop.csc"), "csc=True with ctx_init: KgCoOp's phrase initialises "
                                                                     "one context shared by every class"),
    "kgcoop negative weight": (train("kgcoop", "--kgcoop.weight", "-1"), "weight=-1.0 must be a number >= 0 (--kgcoop.weight"),
    "prograd two init phrases": (train("prograd", "--coop.ctx-init", "a photo of a"),
                                 "ctx_init='a photo of a' and template_init=True both set ProGrad's init phrase; drop "
                                 "--coop.ctx-init (the dataset template's words) or pass --prograd.no-template-init"),
    "prograd temperature zero": (train("prograd", "--prograd.temperature", "0"), "temperature=0.0 must be > 0"),
    "prograd short context": (train("prograd", "--coop.n-ctx", "2", "--warmup-epochs", "0"), "n_ctx=2 is fewer than the"),
    "prograd template with words after the class": (train("prograd", "--template", "a photo of a {{}}, a type of pet.", "--warmup-epochs", "0"),
                                                    "template_init needs one template ending in ' {{}}.'"),
    "prograd under CUDA graphs": (train("prograd", "--compile", "reduce-overhead", "--warmup-epochs", "0"),
                                  "compile='reduce-overhead': prograd steps by a gradient rule (one backward per loss "
                                  "term), which CUDA graphs do not replay; use --compile default or --compile off"),
    "promptsrc class-specific context": (train("promptsrc", "--coop.csc"),
                                         "csc=True: PromptSRC learns one context shared by every class"),
    "promptsrc gpa std zero": (train("promptsrc", "--promptsrc.gpa-std", "0"),
                               "gpa_std=0.0 must be > 0 (--promptsrc.gpa-std; PromptSRC uses 1 over 20 epochs)"),
    "promptsrc negative text weight": (train("promptsrc", "--promptsrc.text-weight", "-1"),
                                       "text_weight=-1.0 must be a number >= 0 (0 drops the term)"),
    "promptsrc depth beyond the tower": (train("promptsrc", "--coop.text-depth", "3", "--vpt.vision-depth", "3",
                                               "--warmup-epochs", "0"),
                                         "text_depth=3 does not fit the text tower's 2 layers; pick 1..2"),
    "train precision": (train("coop", "--precision", "fp16"), "Invalid value for '--precision': 'fp16'"),
    "train optimizer": (train("coop", "--optimizer", "adam"), "Invalid value for '--optimizer': 'adam'"),
    "train classes new": (train("coop", "--classes", "new"), "Invalid value for '--classes': 'new'"),
    "train device": (train("coop", "--device", "tpu"), "device='tpu' must be one of auto, cpu, cuda"),
    "unknown flag": (train("coop", "--lrr", "0.1"), "No such option: --lrr"),
    "unknown command": (["trian"], "No such command 'trian'. Did you mean 'train'?; see `fastprompt --help`"),
    "unknown root flag": (["--verbose", "train"], "No such option: --verbose (Possible options: --version); see `fastprompt --help`"),
    "missing required flag": (["train", "--method", "coop"], "Missing option '--data'"),
    "no method and no protocol": (["train", "--data", "{demo}", "--out", "{run}", *TINY],
                                  "--method is missing; pass --method NAME (`fastprompt methods`), or a --protocol that "
                                  "names its method (cocoop-b2n, kgcoop-b2n, prograd-b2n, promptsrc-b2n, promptsrc-fewshot, ivlp-b2n, maple-b2n"),
    "protocol without a default method": (["train", "--protocol", "cavpt", "--data", "{demo}", "--out", "{run}", *TINY],
                                          "--protocol cavpt names no default method (it sets the recipe for the "
                                          "method given); pass --method NAME"),
    "sweep without methods": (["sweep", "--data", "{demo}", "--seeds", "1", "--out", "{run}", *TINY[:4], "--protocol", "cavpt"],
                              "--protocol cavpt names no default method (it sets the recipe for the method given); pass "
                              "--methods NAME"),
    # --- weights
    "unknown clip": (["train", "--method", "coop", "--data", "{demo}", "--out", "{run}", "--clip", "ViT-B-3",
                      "--pretrained", "none"], "unknown CLIP model 'ViT-B-3' (did you mean ViT-B-32"),
    "pretrained text file": (["train", "--method", "coop", "--data", "{demo}", "--out", "{run}", "--clip", "fastprompt-tiny",
                              "--pretrained", "{text}"], "is not a checkpoint (neither safetensors nor a torch.save file)"),
    "pretrained unusable checkpoint": (["train", "--method", "coop", "--data", "{demo}", "--out", "{run}", "--clip",
                                        "fastprompt-tiny", "--pretrained", "{wrong_ckpt}"],
                                       "does not fit model fastprompt-tiny"),
    # --- data files
    "beton empty": (train("coop", "--data", "{empty}"), "is truncated (0 bytes"),
    "beton truncated": (train("coop", "--data", "{truncated}"), "is truncated ("),
    "beton missing": (train("coop", "--data", "{missing}"), "does not exist; create it with `fastprompt prepare"),
    "class position with a deep context": (train("coop", "--coop.class-position", "middle", "--coop.text-depth", "2"),
                                           "class_position='middle' needs text_depth=1"),
    "data is an image folder": (train("coop", "--data", "{coop_ten}"),  # issue 25 §12
                                "is a folder, not a .beton; if it holds one folder of images per class, turn it into one "
                                "with `fastprompt prepare imagefolder"),
    # --- eval / zeroshot
    "eval device": (["eval", "{run}", "--data", "{demo}", "--device", "tpu"], "device='tpu' is not known; use auto, cpu"),
    "eval precision": (["eval", "{run}", "--data", "{demo}", "--precision", "fp16"], "Invalid value for '--precision'"),
    "eval classes": (["eval", "{run}", "--data", "{demo}", "--classes", "old"], "Invalid value for '--classes'"),
    "zeroshot seed": (["zeroshot", "--data", "{demo}", *TINY, "--seed", str(2**32)], "seed=4294967296 must be an integer"),
    # --- bench
    "bench steps": (["bench", "--clip", "fastprompt-tiny", "--steps", "0"], "steps=0 must be an integer >= 1"),
    "bench compile mode": (["bench", "--clip", "fastprompt-tiny", "--compile-mode", "fast"],
                           "Invalid value for '--compile-mode': 'fast'"),
    "bench seed": (["bench", "--clip", "fastprompt-tiny", "--seed", str(2**32)], "seed=4294967296 must be an integer"),
    "bench method": (["bench", "--clip", "fastprompt-tiny", "--methods", "coop,cop"], "unknown method 'cop' for bench"),
    "bench variant": (["bench", "--clip", "fastprompt-tiny", "--variants", "slow"], "unknown variant 'slow'"),
    "bench device": (["bench", "--clip", "fastprompt-tiny", "--device", "tpu"], "device='tpu' is not known"),
    "bench json is a folder": (["bench", "--clip", "fastprompt-tiny", "--json", "{here}"],
                               "--json {here} is a folder; pass a file name such as {here}/bench.json"),
    "bench all and methods": (["bench", "--clip", "fastprompt-tiny", "--all", "--methods", "coop"],
                              "--all measures every method and variant; drop --methods"),
    "bench pack zero": (["bench", "--clip", "fastprompt-tiny", "--pack", "1,0"], "pack=0 must be an integer in 1..256"),
    "bench pack word": (["bench", "--clip", "fastprompt-tiny", "--pack", "1,many"],
                        "--pack '1,many': give numbers of runs separated by commas, such as 1,2,4,8"),
    "bench pack twice": (["bench", "--clip", "fastprompt-tiny", "--pack", "1,2,2"], "pack=1,2,2 names a size twice"),
    # --- names from file contents never become paths outside --out (issue 21 §3)
    "sidecar name is a relative path": (["sweep", "--methods", "coop", "--data", "{evil}", "--seeds", "1", "--out", "{run}",
                                         *TINY[:4]],
                                        'sidecar {evil_json}: "name" \'../../../../tmp/w/EVIL\' cannot name a file or folder '
                                        '(a path, not a name); set "name" to a plain name such as "eurosat"'),
    "sidecar name is an absolute path": (train("coop", "--data", "{evil_abs}"),
                                         'sidecar {evil_abs_json}: "name" \'/tmp/w/EVIL\' cannot name a file or folder'),
    "sidecar name is '..'": (train("coop", "--data", "{evil_dot}"),
                             'sidecar {evil_dot_json}: "name" \'..\' cannot name a file or folder (it starts with \'.\')'),
    # --- split-file labels: checked per entry, never a list of every label up to the largest (issue 21 §3)
    "coop split label 10**12": (["prepare", "coop", "eurosat", "{coop_huge}", "--out", "{here}/e.beton"],
                                "split_zhou_EuroSAT.json: train[1] has label 1000000000000, but EuroSAT has 10 classes "
                                "(labels 0..9); fix the entry's label, or use the dataset's own split file"),
    "coop split label = class count": (["prepare", "coop", "eurosat", "{coop_ten}", "--out", "{here}/e.beton"],
                                       "test[0] has label 10, but EuroSAT has 10 classes (labels 0..9)"),
    "coop split label negative": (["prepare", "coop", "eurosat", "{coop_negative}", "--out", "{here}/e.beton"],
                                  "train[1] has negative label -1; labels run 0..K-1 - fix the entry's label"),
    "coop split label not an integer": (["prepare", "coop", "eurosat", "{coop_float}", "--out", "{here}/e.beton"],
                                        "train[1] = ['AnnualCrop/1.png', 1.5, 'AnnualCrop'] is not [relative_path, label, "
                                        "classname]; fix the entry"),
    "split-json label 10**12": (["prepare", "imagefolder", "{coop_huge}/eurosat/2750", "--out", "{here}/e.beton",
                                 "--split-json", "{split_huge}"],
                                "train[1] has label 1000000000000, but the file names 2 classes, so labels must run 0..1; "
                                "fix the entry's label"),
    # ---- run-directory cases (issue 17 §1/§2/§4, added by the run-identity work at merge):
    # garbage config.json, garbage metrics.jsonl, garbage or hand-edited checkpoint, a run dir
    # trained on another dataset, non-finite loss (the message must not promise a checkpoint
    # that does not exist). Each is one more row here: (command line, expected message).
    # issue 21: an --out that is no run's folder is refused in every mode, before anything is written or removed
    "out empty text": (train_into(""), "--out '' names no folder; pass a run directory"),
    "out filesystem root": (train_into("/"), "--out / is the filesystem root; a run needs a folder of its own"),
    "out current folder": (train_into("{here}"), "--out {here} is the current folder; a run needs a folder of its own"),
    "out holds files but no run": (train_into("{proj}"), "--out {proj} is not empty (metrics.jsonl, results.json, "
                                   "tensorboard) and holds no fastprompt run (no config.json of one); nothing was changed"),
    "out holds files but no run, restart": (train_into("{proj}", "--restart"), "--out {proj} is not empty (metrics.jsonl"),
    "out holds another program's config.json": (train_into("{other_config}", "--restart"),
                                                "--out {other_config} holds a config.json that is not a fastprompt run's"),
    # issue 21: numeric train fields out of their range
    "batch size above 2^21": (train("coop", "--batch-size", "99999999999999"),
                              "batch_size=99999999999999 must be an integer in 1..2097152"),
    "batch size zero": (train("coop", "--batch-size", "0"), "batch_size=0 must be an integer in 1..2097152"),
    "momentum 5": (train("coop", "--momentum", "5"), "momentum=5.0 must be a number in [0, 1)"),
    "momentum 1": (train("coop", "--momentum", "1"), "momentum=1.0 must be a number in [0, 1)"),
    "lr beyond float32": (train("coop", "--lr", "1e300"), "lr=1e+300 must be a number > 0 and at most 3.403e+38"),
    "group lr beyond float32": (train("vpt-deep", "--lr.visual", "1e39"), "lr.visual=1e+39 must be a number > 0 and at most"),
    "warmup lr beyond float32": (train("coop", "--warmup-lr", "1e39"), "warmup_lr=1e+39 must be a number >= 0 and at most"),
    "checkpoint every negative": (train("coop", "--checkpoint-every", "-1"), "checkpoint_every=-1 must be an integer >= 0"),
    "workers zero": (train("coop", "--workers", "0"), "num_workers=0 must be an integer >= 1"),
    "feature cache negative": (train("coop", "--feature-cache", "-1"), "feature_cache=-1 must be an integer >= 0"),
    "decoded cache word": (train("coop", "--decoded-cache", "sometimes"),
                           "decoded_cache='sometimes' must be auto, off, or a memory size above 0 such as 8G or 512M"),
    "decoded cache zero": (train("coop", "--decoded-cache", "0G"), "decoded_cache='0G' must be auto, off, or a memory size"),
    "sweep decoded cache unit": (["sweep", "--methods", "coop", "--data", "{demo}", "--seeds", "1", "--out", "{run}",
                                  *TINY[:4], "--decoded-cache", "8X"], "decoded_cache='8X' must be auto, off, or a memory size"),
    "warmup epochs not below epochs": (train("coop", "--warmup-epochs", "1"),
                                       "group text: warm-up of 1 epochs (--warmup-epochs) leaves none of the 1 epochs"),
    # ---- end of run-directory cases
    # ---- a finished run's files damaged by hand (issue 21 §4): {damaged[NAME]} is a copy of one tiny trained run
    # with one edit (`DAMAGE`); eval, compare and load_run read config.json through one check
    "config shots text": (["eval", "{damaged[shots]}", "--data", "{demo}"],
                          "{damaged[shots]}/config.json: shots='x' must be an integer >= 1; correct it, or train the run "
                          "again with `fastprompt train ... --out {damaged[shots]} --restart`"),
    "config options list": (["eval", "{damaged[options]}", "--data", "{demo}"],
                            "{damaged[options]}/config.json: options=[] must be a dict of option name -> value"),
    "config seed null": (["eval", "{damaged[seed]}", "--data", "{demo}"],
                         "{damaged[seed]}/config.json: seed=None must be an integer in 0..4294967295"),
    "config clip number": (["compare", "{damaged[clip]}"], "{damaged[clip]}/config.json: clip=5 must be a non-empty string"),
    "config classnames text": (["eval", "{damaged[classnames]}", "--data", "{demo}"],
                               "{damaged[classnames]}/config.json: classnames='x' must be a non-empty list of strings"),
    "config not an object": (["eval", "{damaged[config_array]}", "--data", "{demo}"],
                             "{damaged[config_array]}/config.json holds a JSON array, not a fastprompt run's config"),
    "prompts nan": (["eval", "{damaged[nan_prompts]}", "--data", "{demo}"],
                    "{damaged[nan_prompts]}/prompts.safetensors holds NaN or inf in tensor text.context"),
    "prompts inf": (["compare", "{damaged[inf_prompts]}"],
                    "{damaged[inf_prompts]}/prompts.safetensors holds NaN or inf in tensor text.context"),
    "report results nan": (["report", "{damaged[results_nan]}"],
                           "{damaged[results_nan]}/results.json: test_accuracy=nan must be a number in 0..100; delete it"),
    "report results array": (["report", "{damaged[results_array]}"],
                             "{damaged[results_array]}/results.json holds a JSON array, not an object; delete it"),
    "report results without seed": (["report", "{damaged[results_seedless]}"],
                                    "{damaged[results_seedless]}/results.json lacks seed; delete it"),
    "report eval inf": (["report", "{damaged[eval_inf]}"],
                        "{damaged[eval_inf]}/eval-other-all.json: test_accuracy=inf must be a number in 0..100"),
    "report sweep.json grid array": (["report", "{damaged[grid_array]}"],
                                     "{damaged[grid_array]}/sweep.json: grid=[] must be an object; delete it"),
    "report sweep.json seeds nan": (["report", "{damaged[grid_nan]}"],
                                    "{damaged[grid_nan]}/sweep.json: grid.seeds=[1, nan] must be a list of integers >= 0"),
    # issue 25 §3: report's rows name an axis, then method options; --ci a level in percent
    "report rows not an option": (["report", "{here}", "--rows", "method,cavpt.variantt"],
                                  "rows='method,cavpt.variantt': 'cavpt.variantt' is not a method option; name one as "
                                  "its flag without the dashes, e.g. method,cavpt.variant"),
    "report ci 100": (["report", "{here}", "--ci", "100"],
                      "ci=100.0 must be a confidence level in percent between 0 and 100, e.g. 95"),
    "compare results nan": (["compare", "{damaged[results_nan]}"],
                            "{damaged[results_nan]}/results.json: test_accuracy=nan must be a number in 0..100"),
    "train on a config of the wrong type": (
        train("coop", "--out", "{damaged[stopped]}", "--warmup-epochs", "0", "--shots", "1"),
        "{damaged[stopped]}/config.json: method=['coop'] must be a non-empty string; pass --restart to train this run "
        "again from the start, or use another --out"),
    # ---- fastprompt reproduce (issue 27): the table, the data root, the seeds and settings, before anything is written
    "reproduce unknown table": (["reproduce", "cavpt-table9", "--out", "{here}/t"],
                                "unknown table 'cavpt-table9'; use one of cavpt-table1, cavpt-table2, cavpt-table3"),
    "reproduce no table": (["reproduce", "--out", "{here}/t"], "give a TABLE, e.g. `fastprompt reproduce cavpt-table1"),
    "reproduce dataset folder missing": (["reproduce", "cavpt-table1", "--data-root", "{here}", "--out", "{here}/t"],
                                         "{here}/eurosat is missing: EuroSAT is expected under the data root as "
                                         "eurosat/{{2750/, split_zhou_EuroSAT.json}}"),
    "reproduce second dataset missing": (["reproduce", "cavpt-table1", "--data-root", "{coop_ten}", "--out", "{here}/t",
                                          "--dry-run"], "{coop_ten}/caltech-101 is missing: Caltech101 is expected"),
    "reproduce without a data root": (["reproduce", "cavpt-table1", "--out", "{here}/t"],
                                      "{here}/t/data/eurosat.beton is not prepared yet; pass --data-root DATA"),
    "reproduce seeds not numbers": (["reproduce", "cavpt-table1", "--seeds", "1,x", "--out", "{here}/t"],
                                    "--seeds '1,x' must be comma-separated integers, e.g. 1,2,3"),
    "reproduce seed twice": (["reproduce", "cavpt-table1", "--seeds", "1,1", "--out", "{here}/t"],
                             "--seeds [1, 1] lists a seed twice; give each once"),
    "reproduce sweep setting": (["reproduce", "cavpt-table1", "--jobs", "0", "--data-root", "{here}", "--out", "{here}/t"],
                                "jobs=0 must be an integer >= 1"),
    "reproduce out is a file": (["reproduce", "cavpt-table1", "--out", "{text}"], "is a file; pass a folder"),
    "reproduce bench without list": (["reproduce", "cavpt-table1", "--bench", "{text}"], "--bench goes with --list"),
    "reproduce bench not json": (["reproduce", "--list", "--bench", "{text}"], "is not readable JSON"),
    "reproduce list and a table": (["reproduce", "cavpt-table1", "--list"], "--list prints every table; drop TABLE"),
    "report table of no folder": (["report", "{here}/nothing", "--table", "cavpt-table1"],
                                  "{here}/nothing is not a folder; pass the --out of `fastprompt reproduce cavpt-table1`"),
    "report table with rows": (["report", "{here}", "--table", "cavpt-table1", "--rows", "dataset", "--cols", "method"],
                               "--table prints the paper's layout: drop --rows"),
    # ---- validation, the reported model and per-class results (issue 25 §1-2)
    "final model best-val without eval-every": (train("coop", "--final-model", "best-val"),
                                                "final_model='best-val' reports the epoch with the best val accuracy, so it "
                                                "needs validation: pass --eval-every E (1: every epoch, as Dassl), or "
                                                "--final-model last"),
    "final model choice": (train("coop", "--final-model", "best"),
                           "Invalid value for '--final-model': 'best' is not one of 'last', 'best-val'"),
    "eval every negative": (train("coop", "--eval-every", "-1"), "eval_every=-1 must be an integer >= 0"),
    "sweep final model best-val without eval-every": (["sweep", "--methods", "coop", "--data", "{demo}", "--seeds", "1",
                                                       "--out", "{run}", *TINY[:4], "--final-model", "best-val"],
                                                      "final_model='best-val' reports the epoch with the best val accuracy"),
    "report metric choice": (["report", "{here}", "--metric", "mean"],
                             "Invalid value for '--metric': 'mean' is not one of 'acc', 'per-class-acc'"),
    "plot confusion of a run without per-class results": (
        ["plot", "confusion", "{damaged[results_unscored]}"],
        "{damaged[results_unscored]}/results.json holds no confusion and per_class (written before fastprompt kept "
        "per-class results); evaluate the run again with its train command and --force-eval"),
    "plot confusion of a matrix of another size": (
        ["plot", "confusion", "{damaged[results_ragged]}"],
        "{damaged[results_ragged]}/results.json: confusion is not a 10 x 10 matrix of counts (one row and column per "
        "class of per_class)"),
    # ---- train --seeds (issue 24 §2): one run directory per seed
    "seeds with seed": (train("coop", "--seeds", "1,2", "--seed", "3"),
                        "--seed and --seeds both given; pass --seed S for one run or --seeds S1,S2,... for one run per seed"),
    "seeds not integers": (train("coop", "--seeds", "1,x"), "--seeds '1,x' must be comma-separated integers, e.g. 1,2,3"),
    "seeds twice": (train("coop", "--seeds", "1,2,1"), "--seeds 1,2,1 lists a seed twice; give each once"),
    "seeds negative": (train("coop", "--seeds", "1,-1"), "seed=-1 must be an integer in 0..4294967295"),
    "seeds into a run folder": (train_into("{damaged[results_nan]}", "--seeds", "1,2"),
                                "--out {damaged[results_nan]} holds a run; with --seeds, --out is the folder of the "
                                "seeds' runs ({damaged[results_nan]}/seed1, ...): pass a new folder, or --seed S to "
                                "continue that run"),
    "pack without seeds": (train("coop", "--pack", "2"),
                           "--pack 2 packs the runs of --seeds; one run trains alone: drop --pack"),
    "pack not a size": (train("coop", "--seeds", "1,2", "--pack", "all"),
                        "--pack 'all' must be off, auto or a number of runs >= 1"),
    "sweep pack zero": (["sweep", "--methods", "coop", "--data", "{demo}", "--seeds", "1", "--out", "{run}", *TINY[:4],
                         "--pack", "0"], "--pack '0' must be off, auto or a number of runs >= 1"),
    "report per-class of an eval file without it": (
        ["report", "{damaged[eval_unscored]}", "--metric", "per-class-acc"],
        "{damaged[eval_unscored]}/eval-other-all.json lacks mean_per_class_accuracy (written before fastprompt kept "
        "per-class results); delete it and evaluate again"),
}

# the edits of `damaged`: config.json fields, a prompts tensor, results.json, eval-*.json or sweep.json (None: deleted)
DAMAGE = {
    "shots": {"config.json": {"shots": "x"}},
    "options": {"config.json": {"options": []}},
    "seed": {"config.json": {"seed": None}},
    "clip": {"config.json": {"clip": 5}},
    "classnames": {"config.json": {"classnames": "x"}},
    "config_array": {"config.json": []},
    "nan_prompts": {"prompts.safetensors": float("nan")},
    "inf_prompts": {"prompts.safetensors": float("inf")},
    "results_nan": {"results.json": {"test_accuracy": float("nan")}},
    "results_array": {"results.json": []},
    "results_seedless": {"results.json": {"seed": "<drop>"}},
    "eval_inf": {"eval-other-all.json": {"dataset": "other", "test_accuracy": float("inf")}},
    "grid_array": {"sweep.json": {"grid": []}},
    "grid_nan": {"sweep.json": {"grid": {"seeds": [1, float("nan")]}}},
    "stopped": {"config.json": {"method": ["coop"]}, "results.json": None, "checkpoint.json": None},  # before a checkpoint
    "results_unscored": {"results.json": {"confusion": "<drop>", "per_class": "<drop>"}},  # before per-class results
    "results_ragged": {"results.json": {"confusion": [[1, 0], [0, 1]]}},
    "eval_unscored": {"eval-other-all.json": {"dataset": "other", "test_accuracy": 50.0}},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The inputs the table refers to: a tiny demo .beton, an empty and a truncated copy (each with
    the sidecar), a text file and a checkpoint of another model."""
    from fastprompt.data import write_demo

    root = tmp_path_factory.mktemp("bad-input")
    demo = root / "demo.beton"
    write_demo(str(demo), images_per_class=4, image_size=32, seed=0, workers=1)
    sidecar = demo.with_suffix(".json").read_text()
    (root / "empty.beton").write_bytes(b"")
    (root / "truncated.beton").write_bytes(demo.read_bytes()[:4096])
    for name in ("empty", "truncated"):
        (root / f"{name}.json").write_text(sidecar)
    (root / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"visual.proj": torch.zeros(3, 3)}, root / "other.pt")
    proj = root / "proj"  # a folder of the user's with files named like a run's, and no config.json (issue 21)
    (proj / "tensorboard" / "old").mkdir(parents=True)
    (proj / "tensorboard" / "old" / "events.out.tfevents").write_text("events\n")
    (proj / "results.json").write_text("{}\n")
    (proj / "metrics.jsonl").write_text("{}\n")
    other = root / "other-config"  # another program's config.json beside a results.json
    other.mkdir()
    (other / "config.json").write_text('{"name": "not a run"}\n')
    (other / "results.json").write_text("{}\n")
    hostile = {}
    for key, name in (("evil", "../../../../tmp/w/EVIL"), ("evil_abs", "/tmp/w/EVIL"), ("evil_dot", "..")):
        beton = root / f"{key}.beton"  # the demo under a sidecar whose "name" is a path
        beton.write_bytes(demo.read_bytes())
        beton.with_suffix(".json").write_text(json.dumps({**json.loads(sidecar), "name": name}))
        hostile.update({key: beton, f"{key}_json": beton.with_suffix(".json")})
    coop = {}
    for key, label in (("coop_huge", 10**12), ("coop_ten", 10), ("coop_negative", -1), ("coop_float", 1.5)):
        folder = root / key / "eurosat"  # CoOp's layout (2750/ and the split file); the check comes before any image is read
        (folder / "2750" / "AnnualCrop").mkdir(parents=True)
        for k in range(3):
            (folder / "2750" / "AnnualCrop" / f"{k}.png").write_bytes(b"")
        entries = {"train": [["AnnualCrop/0.png", 0, "AnnualCrop"], ["AnnualCrop/1.png", label, "AnnualCrop"]],
                   "val": [], "test": [["AnnualCrop/2.png", 0, "AnnualCrop"]]}
        if key == "coop_ten":  # the first label past EuroSAT's 10 classes, under a new class name
            entries = {**entries, "train": entries["train"][:1], "test": [["AnnualCrop/2.png", 10, "Elsewhere"]]}
        (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(entries))
        coop[key] = root / key
    split_huge = root / "split_huge.json"  # two class names, one of them labelled 10**12
    split_huge.write_text(json.dumps({"train": [["AnnualCrop/0.png", 0, "a"], ["AnnualCrop/1.png", 10**12, "b"]], "val": [],
                                      "test": [["AnnualCrop/2.png", 0, "a"]]}))
    return {"demo": demo, "empty": root / "empty.beton", "truncated": root / "truncated.beton",
            "missing": root / "missing.beton", "text": root / "notes.txt", "wrong_ckpt": root / "other.pt",
            "proj": proj, "other_config": other, **hostile, **coop, "split_huge": split_huge}


@pytest.fixture(scope="module")
def finished_run(files, tmp_path_factory):
    """A tiny finished CoOp run on the table's demo set (one epoch, ~3 s)."""
    from fastprompt.training import TrainConfig, train

    out = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(method="coop", data=str(files["demo"]), out=str(out), clip="fastprompt-tiny", pretrained=None,
                      shots=1, epochs=1, warmup_epochs=0, batch_size=10, num_workers=1, device="cpu", compile="off",
                      options={"n_ctx": 2}))
    return out


@pytest.fixture(scope="module")
def damaged(finished_run, tmp_path_factory):
    """{name: a copy of `finished_run` with the edit DAMAGE[name]}."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for name, edits in DAMAGE.items():
        run = root / name
        shutil.copytree(finished_run, run)
        for file, edit in edits.items():
            path = run / file
            if edit is None:
                path.unlink()
                continue
            if file == "prompts.safetensors":
                tensors = load_file(str(path))
                tensors["text.context"][0, 0] = edit
                save_file(tensors, str(path))
                continue
            value = json.loads(path.read_text()) if path.is_file() else {}
            if isinstance(edit, dict) and isinstance(value, dict):
                value.update(edit)
                value = {k: v for k, v in value.items() if v != "<drop>"}
            else:
                value = edit
            path.write_text(json.dumps(value))  # NaN and Infinity as Python's json writes them
        out[name] = run
    return out


def _tree(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _check(code: int, stderr: str, message: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, files, tmp_path, monkeypatch, request):
    args, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    names = {**{k: str(v) for k, v in files.items()}, "run": str(work / "run"), "here": str(work)}
    folders = [work, files["demo"].parent]
    if any("{damaged[" in a for a in args):
        names["damaged"] = {k: str(v) for k, v in request.getfixturevalue("damaged").items()}
        folders.append(Path(next(iter(names["damaged"].values()))).parent)
    args = [a.format(**names) for a in args]
    before = [_tree(f) for f in folders]
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _check(result.exit_code, result.stderr, message.format(**names))
    assert result.stdout == ""
    assert [_tree(f) for f in folders] == before  # nothing written, not even a run folder


@pytest.mark.slow
def test_offline_pretrained_download_is_one_line(files, tmp_path):
    """No internet, nothing cached: one line naming the tag, why and the fix at once, not a minute
    of retries. The hub is 127.0.0.1:9 (nothing listens) on any machine, online or not; a
    subprocess, because huggingface_hub reads HF_ENDPOINT when it is imported."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for name in ("HF_HUB_OFFLINE", "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env.pop(name, None)
    out = tmp_path / "run"
    result = subprocess.run([FASTPROMPT, "zeroshot", "--data", str(files["demo"]), "--clip", "ViT-B-32",
                             "--pretrained", "openai", "--workers", "1"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    _check(result.returncode, result.stderr,
           "error: could not download the pretrained weights 'openai' of ViT-B-32: 127.0.0.1 is unreachable (Connection "
           f"refused), and they are not in the local cache {tmp_path}/hf/hub; download them where there is internet "
           "(http://127.0.0.1:9/timm/vit_base_patch32_clip_224.openai) and pass --pretrained FILE, or copy that machine's "
           f"cache folder to {tmp_path}/hf/hub")
    assert result.stderr.endswith(f"cache folder to {tmp_path}/hf/hub\n")  # the whole line, not cut
    assert not out.exists() and result.stdout == ""


def test_topk_above_the_class_count_warns_with_the_cap(caplog):
    """--cavpt.topk larger than the class count runs with K_N = the class count and says so at
    WARNING, the level the CLI shows without -v."""
    import fastprompt

    with caplog.at_level("WARNING", logger="fastprompt"):
        model = fastprompt.create_model("cavpt", ["a", "b", "c"], clip="fastprompt-tiny", pretrained=None, topk=5)
    assert model.k_n == 3
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage() for r in warnings] == ["cavpt topk=5 is more than the 3 classes of this task: capped at 3"]



@pytest.mark.parametrize("name, message", [
    ("shots", "config.json: shots='x' must be an integer >= 1; correct it, or train the run again"),
    ("options", "config.json: options=[] must be a dict of option name -> value"),
    ("seed", "config.json: seed=None must be an integer in 0..4294967295"),
    ("clip", "config.json: clip=5 must be a non-empty string"),
    ("nan_prompts", "prompts.safetensors holds NaN or inf in tensor text.context"),
])
def test_load_run_names_the_damaged_file_and_field(damaged, name, message):
    import fastprompt

    with pytest.raises(fastprompt.FastpromptError) as err:
        fastprompt.load_run(str(damaged[name]))
    assert str(err.value).startswith(f"{damaged[name]}/{message}") and "\n" not in str(err.value)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_eval_of_a_read_only_run_prints_its_result_and_names_the_file_not_written(finished_run, files, monkeypatch, code):
    """The result is on stdout all the same; one line on stderr names the file and why, exit 2 (the
    record `report` reads is not there: a script must not take the run as evaluated). Tests run
    as root, so the read-only folder is an OSError injected where a write starts (atomic_write's mkstemp)."""
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == finished_run:
            raise OSError(code, os.strerror(code), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    before = _tree(finished_run)
    result = CliRunner().invoke(app, ["eval", str(finished_run), "--data", str(files["demo"]), "--workers", "1"])
    _check(result.exit_code, result.stderr, f"error: could not write {finished_run}/eval-demo-all.json "
                                            f"({os.strerror(code)}), so `fastprompt report` will not see this result; "
                                            f"make {finished_run} writable")
    printed = json.loads(result.stdout)
    trained = json.loads((finished_run / "results.json").read_text())
    assert printed["dataset"] == "demo" and printed["test_accuracy"] == trained["test_accuracy"]  # the same model, split
    assert _tree(finished_run) == before
