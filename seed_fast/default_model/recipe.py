"""Reproduce the embedded default model from scratch on a CPU (52 min on 2 AVX2 cores).

Version 7 ran from nothing in 3133 s on a 2-core AVX2 machine, where `--precision auto` runs every
stage in fp32 and `--jobs 2` is the default: stage1 246 s and stage2 339 s on both cores, then two
processes of one thread each, llm 1712 s + lora 214 s + checker 154 s beside vae 687 s + decoder
1858 s. The run is deterministic on one machine (the LLM side gave bit for bit the same validation
numbers in two runs); another CPU or thread count may round differently.

    python -m seed_fast.default_model.recipe --work runs/default [--install] [--precision auto|bf16|fp32]
        [--jobs 1|2] [--decoder latent|pixel]

`--jobs 2` runs stage I and II one after the other on every core, then the LLM side (llm, lora,
checker) and the image side (vae, decoder) at once as two processes, each on half the cores. Small
models use two cores poorly: side by side on one core each, an LLM step took 0.65 s against about 0.5 s
alone on two. It is the default on a CPU-only machine with two or more cores; elsewhere (a GPU, or
`--decoder pixel`) `--jobs 1`, every stage in this process one after another, is.

`--decoder pixel` drops the vae stage and trains version 6's decoder on 32 px pixels instead
(`with_pixel_decoder()`): better images (generation 80.2% against 70.8% on the same 96 test scenes)
at about four times the decoder's cost, 7444 s (2 h 4 min; about 1 h 47 min idle) from nothing on the
same machine with `--jobs 1`.

Where the CPU has bf16 kernels (AVX-512 BF16 / AMX) or a GPU is present, `--precision auto` (the
default) runs the LLM, LoRA and decoder stages in bf16 autocast. Where oneDNN has none (an AVX2-only
CPU), bf16 autocast is about 25x slower than fp32, so they run in fp32 there.

Every stage is the project's own training code (`seed_fast.train`) on the synthetic colored-shapes
data (`seed_fast.synthetic`, 64 px, seeded):

  1. stage1    ViT + causal Q-Former + text branch, image-text contrastive, the ViT trained too (`mini`)
  2. stage2    quantizer (4096 codes of 16 dims) + de-tokenizer; generation target: stage I's image feature
  3. llm       `mini-llama` (4 layers, 256 wide) with the image vocabulary, every weight trained on
               image->caption, caption->image and question->answer sequences
  4. lora      a LoRA adapter (r 16) instruction-tuned on top of (3), as SEED-LLaMA tunes its LLM
  5. vae       a small diffusers AutoencoderKL (660 K parameters), 32 px images <-> 16 x 16 x 4 latents
  6. decoder   a diffusion UNet (diffusers) conditioned on the generation embedding, denoising the vae's
               latents (version 7; with `--decoder pixel`, 32 px pixels as version 6 did)
  7. checker   an independent scene classifier trained on rendered scenes (for evaluation only)

A finished stage is skipped when the recipe is run again (an interrupted one resumes from its last
checkpoint). `--install` then writes the small fp16 copy into seed_fast/default_model/assets
(or `--dest`), with `recipe.json` (this recipe, the seeds, the metrics, the run's wall time) and
`generation.json` (GENERATION below) beside the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from ..train.config import TrainConfig
from ..train.loop import cpu_has_fast_bf16, latest_checkpoint, train
from .checker import checker_accuracy, train_checker
from .loader import DEFAULT_DIR, DefaultModelError, GenerationConfig, assemble, check_replaceable

SEED = 0
DATA = {"kind": "synthetic", "n": 8192, "val_n": 256, "image_size": 64, "seed": SEED}

RECIPE: dict[str, dict] = {
    "stage1": {
        "stage": "stage1",
        "steps": 800,
        "global_batch": 64,
        "tokenizer": "mini",
        "optim": {"lr": 5e-4, "warmup": 40, "weight_decay": 0.05},
        # no pretrained ViT at this size (SEED's is EVA-CLIP): learn it with the Q-Former, CLIP-style
        "stage1": {"train_vit": True},
    },
    "stage2": {
        # 4096 codes at batch 128 (version 4; k-means initialises from the first batch's 128 x 32 vectors):
        # 1024 codes left the probe reading the left-hand shape from the codes 89.5% of the time, 4096 92.3%.
        # `code_dim` 32 (SEED's, through `stage2.code_dim`) was tried and not better end to end:
        # docs/experiments.md
        "stage": "stage2",
        "steps": 800,
        "global_batch": 128,
        "optim": {"lr": 1e-3, "warmup": 20},
        # stage I's contrastive loss on the codes' rebuilt retrieval feature against the frozen text branch,
        # with 4096 earlier captions as extra negatives (version 6): the probe read the left-hand shape from
        # the codes 94.2% of the time against 90.8% without it (93.8% with a second seed), and captions
        # through a retrained LLM rose from 89.1% to 90.2%; without the queue the loss gave nothing (90.7%)
        "stage2": {
            "codebook_init": "kmeans",
            "restart_dead_every": 20,
            "target": "itc",
            "itc_weight": 2.0,
            "codebook_size": 4096,
            "itc_text_weight": 2.0,
            "itc_text_queue": 4096,
        },
    },
    "llm": {
        # bf16 autocast (version 4): 2500 steps in 646 s against 889 s in fp32, the same held-out losses
        "stage": "llm",
        "steps": 2500,
        "global_batch": 32,
        "data": {"n": 32768},
        "precision": "bf16",
        "optim": {"lr": 1e-3, "warmup": 50, "weight_decay": 0.01},
        # "seed-opt": captions and answers have distinct prompts ("a photo of" / "Question: ...");
        # with "plain" both start right after the image and the model may caption with a question.
        # "eager" attention (version 5): 612 s for the stage against 642 s with SDPA, whose CPU backward is slow here
        "llm": {
            "model": "mini-llama",
            "template": "seed-opt",
            "mode": "instruct",
            "lora_r": 0,
            "eval_n": 64,
            "qa_ratio": 0.3,
            "image_first_ratio": 0.6,
            "attention": "eager",
        },
    },
    "lora": {
        "stage": "llm",
        "steps": 300,
        "global_batch": 32,
        "data": {"n": 32768},
        "precision": "bf16",
        "optim": {"lr": 1e-3, "warmup": 20},
        # peft's LoRA forward (version 5): on this CPU under bf16 autocast a step takes 0.29 s with it and
        # eager attention, 0.50 s with seed_fast's fused LoRA op (a GPU kernel; on CPU its reference path)
        "llm": {
            "mode": "instruct",
            "lora_r": 16,
            "lora_alpha": 32,
            "eval_n": 64,
            "qa_ratio": 0.5,
            "attention": "eager",
            "fused_lora": False,
        },
    },
    "decoder": {
        # 1400 steps (version 3): twice version 2's; held-out denoising MSE at t=300 0.0079 -> 0.0043 and
        # reconstruction 61.5% -> 67.7% (docs/experiments.md)
        # bf16 autocast (version 4): 1.16 s a step against 1.4 in fp32; the tokenizer stays in fp32
        # 2400 steps with "math" attention (version 5): 0.86 s a step against 1.16 (SDPA's CPU backward is
        # slow at 8 x 8 cells), so 1.7x the steps in 1.3x the time; MSE at t=300 0.0040 -> 0.0023
        "stage": "decoder",
        "steps": 2400,
        "global_batch": 64,
        "precision": "bf16",
        "optim": {"lr": 1e-3, "warmup": 30, "weight_decay": 0.0},
        "decoder": {"image_size": 32, "null_prob": 0.1, "attention": "math"},
    },
    "checker": {"steps": 600, "batch": 64, "seed": 7},
}
# Version 7's image side: a vae stage trains a small AutoencoderKL and the decoder stage's UNet (the config
# above) denoises its 16 x 16 x 4 latents of the 32 px image, about a quarter of the pixel UNet's FLOPs a
# step (0.44 s against 1.63 s in fp32 on the 2-core AVX2 machine), so the recipe runs in under an hour there.
# Channels (32, 64): the first from-nothing run's (16, 32) autoencoder kept every object in 95.3% of its
# reconstructions of the test scenes and its decoder missed both image targets; this one keeps them in 99.6%
# (docs/experiments.md, "Version 7").
LATENT_DECODER = {
    "vae": {
        "stage": "vae",
        "steps": 800,
        "global_batch": 32,
        "optim": {"lr": 1e-3, "warmup": 40, "weight_decay": 0.0},
        "vae": {"image_size": 32, "channels": [32, 64], "latent_channels": 4, "kl_weight": 1e-6},
    },
}


RECIPE.update(copy.deepcopy(LATENT_DECODER))


def with_latent_decoder(recipe: dict | None = None) -> dict:
    """The recipe with the vae stage added (RECIPE has it): its decoder stage then trains a latent decoder."""
    r = copy.deepcopy(recipe or RECIPE)
    r.update(copy.deepcopy(LATENT_DECODER))
    return r


def with_pixel_decoder(recipe: dict | None = None) -> dict:
    """The recipe without the vae stage: its decoder stage then trains version 6's UNet on 32 px pixels."""
    r = copy.deepcopy(recipe or RECIPE)
    r.pop("vae", None)
    return r


# The model's guidance settings, shipped with its weights (generation.json).
GENERATION = GenerationConfig(
    # The decoder's classifier-free guidance when it draws generation embeddings. Chosen for version 5
    # on 256 tuning scenes (seed 4242, every one drawn; reconstruction / generation): 1 81.2% / 76.6%,
    # 1.25 83.2% / 78.1%, 1.5 83.6% / 79.7%, 2 78.1% / 69.9%, 3 60.9% / 56.6%. (Versions 2 to 4 used 2:
    # version 3's decoder, trained for fewer steps, was within noise at 1.5 and 2.)
    decoder_guidance=1.5,
    # LLM-side classifier-free guidance (LaVIT's; `SeedLLM.generate_image_codes(cfg_scale=)`) when codes
    # are drawn from text. Chosen for version 3 on 288 tuning scenes drawn with other seeds than the test
    # split's (the same scenes and image seeds for every setting): greedy without guidance 56.6%, 1.5
    # 61.4%, 2 61.5% of the images with every requested color and shape (96 of them: 3, 59.4%; 3 beams, 55.2%).
    code_cfg_scale=2.0,
)
ORDER = ("stage1", "stage2", "llm", "lora", "vae", "decoder", "checker")  # the stages a recipe may hold, in order
REQUIRED = ("stage1", "stage2", "llm", "lora", "decoder", "checker")
# after stage II the LLM side and the image side need nothing from each other: with --jobs 2 they run as two
# processes, each on half the cores (a small model's step uses two CPU cores poorly: the LLM stage's step
# took 0.66 s on one core beside the decoder against 0.5 s on both alone)
BRANCHES = (("llm", "lora", "checker"), ("vae", "decoder"))


def stages_of(recipe: dict) -> list[str]:
    return [n for n in ORDER if n in recipe]


def branches_of(recipe: dict) -> list[tuple[str, ...]]:
    return [b for b in (tuple(n for n in names if n in recipe) for names in BRANCHES) if b]


def for_this_machine(precision: str = "auto", recipe: dict | None = None) -> dict:
    """The recipe with the bf16 stages' precision set: "auto" keeps bf16 on a GPU or on a CPU with
    oneDNN's bf16 kernels (AVX-512 BF16 / AMX) and uses fp32 elsewhere, where bf16 autocast is far
    slower (an LLM step: about 12 s against 0.46 s in fp32 on a 2-core AVX2 machine). Results differ
    slightly between the two; the installed recipe.json records which ran."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    r = copy.deepcopy(recipe or RECIPE)
    if precision == "auto":
        import torch

        precision = "bf16" if torch.cuda.is_available() or cpu_has_fast_bf16() else "fp32"
    for stage in r.values():
        if isinstance(stage, dict) and stage.get("precision") == "bf16":
            stage["precision"] = precision
    return r


def stage_config(name: str, work: Path, recipe: dict | None = None) -> dict:
    """The training config of one stage, with the folders of the stages before it filled in."""
    recipe = recipe or RECIPE
    r = copy.deepcopy(recipe[name])
    data = dict(recipe.get("data", DATA))
    data.update(r.pop("data", {}))  # a stage may see more of the synthetic stream (same seed)
    r.update(out=str(work / name), seed=SEED, data=data, ckpt_every=max(1, r["steps"] // 3), eval_every=r["steps"])
    if name == "stage2":
        r["tokenizer"] = str(work / "stage1" / "tokenizer")
        r["stage2"]["itc_heads"] = str(work / "stage1")
    elif name in ("llm", "decoder"):
        r["tokenizer"] = str(work / "stage2" / "tokenizer")
        if name == "decoder" and "vae" in recipe:
            r["decoder"]["vae"] = str(work / "vae" / "vae")  # a latent decoder on the vae stage's autoencoder
    elif name == "lora":
        r["tokenizer"] = str(work / "stage2" / "tokenizer")
        r["llm"]["model"] = str(work / "llm" / "llm")
    if name in ("llm", "lora"):
        # one code cache for both LLM stages: same tokenizer, same images, so the LoRA stage reads the
        # codes the LLM stage encoded (the cache's key checks both) instead of encoding them again
        r["llm"]["code_cache"] = str(work / "codes")
    return r


def _done(work: Path, name: str) -> bool:
    return (work / name / "DONE").is_file()


def run_stage(name: str, work: Path, recipe: dict | None = None, *, progress: bool = True) -> dict:
    if _done(work, name):
        print(f"[recipe] {name}: done already ({work / name})")
        return json.loads((work / name / "DONE").read_text())
    t0 = time.perf_counter()
    if name == "checker":
        c = (recipe or RECIPE)["checker"]
        model = train_checker(steps=c["steps"], batch=c["batch"], seed=c["seed"], progress=progress)
        (work / name).mkdir(parents=True, exist_ok=True)
        model.save(work / name / "checker.safetensors")
        metrics = {f"real_{k}": v for k, v in checker_accuracy(model).items()}
    else:
        cfg = TrainConfig.from_dict(stage_config(name, work, recipe))
        resume = latest_checkpoint(Path(cfg.out)) is not None
        metrics = train(cfg, resume=resume, progress=progress)
    metrics = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    (work / name / "DONE").write_text(json.dumps(metrics, indent=1))
    print(f"[recipe] {name}: {metrics}")
    return metrics


def install(work: Path, dest: Path, metrics: dict, recipe: dict | None = None) -> Path:
    """The shipped copy: fp16 safetensors + configs, about 20 MB."""
    recipe = recipe or RECIPE
    return assemble(
        work,
        dest,
        recipe={"seed": SEED, "data": recipe.get("data", DATA), "stages": recipe},
        metrics=metrics,
        generation=GENERATION,
    )


def _stage_steps(name: str, recipe: dict) -> int:
    return int(recipe[name]["steps"])


def _steps_done(work: Path, name: str, recipe: dict) -> int:
    """Training steps a stage has logged (all of them once it is done; the checker logs none until then)."""
    if _done(work, name):
        return _stage_steps(name, recipe)
    log = work / name / "metrics.jsonl"
    if not log.is_file():
        return 0
    step = 0
    for line in log.read_text().splitlines()[-4:]:
        try:
            step = max(step, int(json.loads(line).get("step", 0)))
        except ValueError:  # a line being written
            continue
    return step


def run_branches(work: Path, branches, recipe: dict, threads: int, *, progress: bool = True) -> None:
    """Run each branch (a sequence of stages) in its own process with `threads` CPU threads, all at
    once, on `recipe` (its precision already chosen; written to work/recipe.json for the processes);
    each writes its log to work/logs/. Progress bars follow the stages' metrics logs. If one fails, the
    others are stopped and the error names the log (every stage resumes on the next run)."""
    import os
    import subprocess
    import sys

    recipe_file = work / "recipe.json"
    tmp = recipe_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(recipe, indent=1))
    tmp.replace(recipe_file)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = []
    for names in branches:
        log = logs / f"{'_'.join(names)}.log"
        cmd = [
            sys.executable,
            "-m",
            "seed_fast.default_model.recipe",
            "--work",
            str(work),
            "--only",
            *names,
            "--recipe",
            str(recipe_file),
            "--threads",
            str(threads),
            "--no-progress",
        ]
        fh = open(log, "a")
        procs.append((names, log, fh, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)))
    print(
        f"[recipe] running {' | '.join(' -> '.join(n) for n in branches)} at once, {threads} thread(s) each "
        f"(logs in {logs})",
        flush=True,
    )
    bars = []
    if progress:
        from tqdm.auto import tqdm

        bars = [
            tqdm(total=sum(_stage_steps(n, recipe) for n in names), desc=" -> ".join(names), unit="step", position=i)
            for i, (names, *_rest) in enumerate(procs)
        ]
    failed = None
    try:
        while True:
            codes = [proc.poll() for *_rest, proc in procs]
            for bar, (names, *_rest) in zip(bars, procs):
                bar.n = sum(_steps_done(work, n, recipe) for n in names)
                bar.refresh()
            failed = next(((names, log, c) for (names, log, _, _), c in zip(procs, codes) if c not in (None, 0)), None)
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(2.0)
    finally:
        for names, log, fh, proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            fh.close()
        for bar in bars:
            bar.close()
    if failed:
        names, log, code = failed
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(
            f"the stages {' -> '.join(names)} failed (exit {code}); the others were stopped. "
            f"The last lines of {log}:\n{tail}"
        )


def _default_jobs(recipe: dict) -> int:
    """2 for the latent decoder on a CPU-only machine with 2+ cores (how it was timed); else 1, how
    version 6 was trained (one thread count, so a rerun rounds as it did)."""
    import os

    import torch

    return 2 if "vae" in recipe and not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seed_fast.default_model.recipe", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/default_model", help="folder for the stage runs (resumable)")
    p.add_argument("--only", nargs="+", choices=ORDER, help="run only these stages (their inputs must exist)")
    p.add_argument("--install", action="store_true", help="then write the shipped copy (see --dest)")
    p.add_argument("--dest", default=None, help="default: seed_fast/default_model/assets")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default=None,
        help="the LLM, LoRA and decoder stages' precision "
        "(default auto: bf16 where this machine has fast bf16 kernels, else fp32)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        choices=(1, 2),
        default=None,
        help="2: after stage II, run the LLM side (llm, lora, checker) and the image side (vae, decoder) "
        "as two processes on half the cores each (the default for --decoder latent on a CPU-only "
        "machine with 2+ cores); 1: one stage after another (the default otherwise)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of this process (default: torch's)")
    p.add_argument(
        "--recipe",
        default=None,
        help="a recipe JSON file to run instead of RECIPE (same stage names; "
        "its precisions are kept unless --precision is given)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument(
        "--decoder",
        choices=("latent", "pixel"),
        default=None,
        help="latent: a vae stage and a UNet on its latents (version 7, the shipped model; RECIPE's, the "
        "default); pixel: no vae stage, the UNet on 32 px pixels (version 6). With --recipe, the "
        "default is what the file holds",
    )
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.recipe is not None:
        try:
            given = json.loads(Path(args.recipe).read_text())
        except (OSError, ValueError) as e:
            p.error(f"--recipe {args.recipe}: {e}")
        if not isinstance(given, dict):
            p.error(f"--recipe {args.recipe}: the top level must be an object of stages")
        unknown = sorted(set(given) - set(ORDER) - {"data"})
        missing = [n for n in REQUIRED if n not in given]
        if unknown or missing:
            p.error(
                f"--recipe {args.recipe}: stages must be {list(REQUIRED)}, optionally vae and data; "
                f"missing {missing}, unknown {unknown}"
            )
        if args.decoder == "latent":
            given = with_latent_decoder(given)
        elif args.decoder == "pixel":
            given = with_pixel_decoder(given)
        recipe = given if args.precision is None else for_this_machine(args.precision, given)
    else:
        base = with_pixel_decoder() if args.decoder == "pixel" else RECIPE
        recipe = for_this_machine(args.precision or "auto", base)
    if args.install:  # refuse a destination holding other files now, not after the training
        dest = Path(args.dest) if args.dest else DEFAULT_DIR
        try:
            check_replaceable(dest)
        except DefaultModelError as e:
            p.error(f"--dest: {e}")
    used = sorted({st["precision"] for st in recipe.values() if isinstance(st, dict) and "precision" in st})
    print(f"[recipe] precision of the LLM, LoRA and decoder stages: {', '.join(used)}", flush=True)
    jobs = 1 if args.only else (args.jobs or _default_jobs(recipe))
    t0 = time.perf_counter()
    metrics = {}
    progress = not args.no_progress
    if jobs == 1:
        for name in args.only or stages_of(recipe):
            metrics[name] = run_stage(name, work, recipe, progress=progress)
    else:
        import os

        branches = branches_of(recipe)
        first = [n for n in stages_of(recipe) if not any(n in b for b in branches)]
        for name in first:
            metrics[name] = run_stage(name, work, recipe, progress=progress)
        run_branches(work, branches, recipe, max(1, (os.cpu_count() or 2) // len(branches)), progress=progress)
        for names in branches:
            for name in names:
                metrics[name] = json.loads((work / name / "DONE").read_text())
    wall = time.perf_counter() - t0
    print(f"[recipe] stages finished in {wall:.0f} s", flush=True)
    if not args.only:
        metrics["run"] = {"wall_seconds": round(wall, 1), "jobs": jobs}
    if args.install:
        out = install(work, dest, metrics, recipe)  # replaces only an earlier model folder
        print(f"[recipe] installed into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
