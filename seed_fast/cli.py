"""`seed-fast` command line: tokenize, tokenize-dataset, detokenize, caption, generate, train, info, demo, eval,
export, ort-run, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of; default: the embedded model's tokenizer)")
    g.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a model folder (the embedded model's layout, with tokenizer/) or a tokenizer folder "
        "(config.json + model.safetensors), or a Hugging Face Hub id",
    )
    g.add_argument(
        "--official",
        nargs=2,
        metavar=("QUANTIZER", "VIT"),
        help="the released seed_quantizer.pt and BLIP-2's eva_vit_g.pth",
    )
    g.add_argument(
        "--config",
        default=None,
        help="a preset (e.g. tiny, seed-tokenizer-2): random weights of it, or with --official the released "
        "weights' architecture (default seed-tokenizer-2)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for random weights (default: 0)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def _load_tokenizer(args):
    import torch

    from .models import SeedTokenizer

    given = [f"--{name}" for name in ("checkpoint", "official", "config") if getattr(args, name)]
    if args.checkpoint and len(given) > 1:
        raise SystemExit(f"seed-fast: --checkpoint cannot be combined with {' or '.join(given[1:])}")
    args.embedded = False
    if args.checkpoint:
        folder = Path(args.checkpoint)
        tok = SeedTokenizer.from_pretrained(folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder)
    elif args.official:  # --config: the released weights' architecture (default seed-tokenizer-2)
        tok = SeedTokenizer.from_official(*args.official, config=args.config or "seed-tokenizer-2")
    elif args.config:
        print(
            f"seed-fast: --config {args.config}: RANDOM weights (seed {args.seed}); "
            "codes are reproducible but meaningless",
            file=sys.stderr,
        )
        tok = SeedTokenizer.from_config(args.config, seed=args.seed)
    else:
        from .default_model import DefaultModelError, load_default

        try:
            tok = load_default().tokenizer
        except DefaultModelError as e:
            raise SystemExit(f"seed-fast: cannot load the embedded model (give --checkpoint): {e}") from None
        args.embedded = True
    return tok.to(device=args.device, dtype=getattr(torch, args.dtype))


def _warn_unlike_training(images) -> None:
    """The embedded model knows only its synthetic scenes: say so when the images look otherwise."""
    from .default_model.checker import unlike_training_scenes

    odd = unlike_training_scenes(images)
    if any(odd):
        print(
            f"seed-fast: warning: {sum(odd)} of {len(odd)} image(s) look unlike the embedded model's training "
            "scenes (colored shapes on a plain background); its codes and captions for them mean little. "
            "For photographs load SEED's released weights (--official QUANTIZER VIT, or --checkpoint / --llm).",
            file=sys.stderr,
        )


def _open_images(paths):
    from PIL import Image, UnidentifiedImageError

    from .images import ImageModeError, to_rgb

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(to_rgb(im, str(p)))
        except FileNotFoundError:
            raise SystemExit(f"seed-fast: no such image: {p}") from None
        except ImageModeError as e:
            raise SystemExit(f"seed-fast: {e}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise SystemExit(f"seed-fast: cannot read {p} as an image: {e}") from None
    return images


def cmd_tokenize(args) -> int:
    tok = _load_tokenizer(args)
    images = _open_images(args.images)
    if args.embedded:
        _warn_unlike_training(images)
    codes = tok.encode(images, batch_size=args.batch_size).cpu()
    if args.json:
        print(json.dumps([{"image": str(p), "codes": c.tolist()} for p, c in zip(args.images, codes)]))
    else:
        for p, c in zip(args.images, codes):
            print(f"{p}: {' '.join(str(int(x)) for x in c)}")
    return 0


def _read_codes(args):
    if args.codes_file:
        text = Path(args.codes_file).read_text() if args.codes_file != "-" else sys.stdin.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"seed-fast: {args.codes_file} is not JSON: {e}") from None
        # the output of `tokenize --json`, or a list of code lists
        rows = [d["codes"] if isinstance(d, dict) else d for d in data]
        names = [d.get("image", str(i)) if isinstance(d, dict) else str(i) for i, d in enumerate(data)]
        return rows, names
    if not args.codes:
        raise SystemExit("seed-fast detokenize: give codes as arguments (comma-separated per image) or --codes-file")
    rows = []
    for s in args.codes:
        try:
            rows.append([int(x) for x in s.replace(",", " ").split()])
        except ValueError:
            raise SystemExit(f"seed-fast: codes must be integers, got {s!r}") from None
    return rows, [str(i) for i in range(len(rows))]


def cmd_detokenize(args) -> int:
    import numpy as np

    from .models import InputError

    rows, names = _read_codes(args)
    tok = _load_tokenizer(args)
    try:
        emb = tok.decode(rows).float().cpu().numpy()
    except InputError as e:
        raise SystemExit(f"seed-fast detokenize: {e}") from None
    if args.out:
        out = Path(args.out)
        if out.suffix == ".npy":
            np.save(out, emb)
        else:
            out.write_text(json.dumps({"names": names, "embeddings": emb.tolist()}))
        print(f"wrote {emb.shape} embeddings to {out}", file=sys.stderr)
    else:
        print(json.dumps({"names": names, "shape": list(emb.shape), "embeddings": emb.tolist()}))
    return 0


def _add_llm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("language model (default: the embedded model, with its image decoder)")
    g.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a model folder of the embedded model's layout (tokenizer/, llm/, decoder/, ...), as demo, eval "
        "and export take",
    )
    g.add_argument(
        "--llm",
        metavar="DIR",
        help="a SeedLLM folder (save_pretrained) or Hub id, a transformers LM folder with the image vocabulary, "
        "or 'default': the embedded model",
    )
    g.add_argument(
        "--tokenizer", metavar="DIR", help="SeedTokenizer folder (default: the --llm folder's own tokenizer/)"
    )
    g.add_argument("--lora", metavar="DIR", help="a peft LoRA adapter folder to load on top")
    g.add_argument(
        "--template", help="prompt template (seed-llama-8b, seed-llama-14b, seed-opt, plain; default: from the model)"
    )
    g.add_argument("--preset", default=None, help="a random LM of this preset (tiny-llama, tiny-opt) and tokenizer")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling (default: 0)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)


def _load_llm(args, *, need_diffusion: bool = False):
    import torch

    from .models import CheckpointError
    from .models.llm.seed_llm import SeedLLM, get_template

    dtype = getattr(torch, args.dtype)
    given = [f"--{name}" for name in ("checkpoint", "llm", "preset") if getattr(args, name)]
    if len(given) > 1:
        raise SystemExit(f"seed-fast: give one of --checkpoint, --llm, --preset (got {', '.join(given)})")
    args.embedded, args.generation = False, None
    if args.checkpoint or (args.llm in (None, "default") and not args.preset):
        from .default_model import DefaultModelError, load_default

        what = f"--checkpoint {args.checkpoint}" if args.checkpoint else "the embedded model"
        extra = [f"--{name}" for name in ("tokenizer", "lora") if getattr(args, name)]
        if extra:
            raise SystemExit(f"seed-fast: {' and '.join(extra)} cannot be combined with {what}")
        try:
            m = load_default(args.checkpoint)
        except DefaultModelError as e:
            raise SystemExit(f"seed-fast: cannot load {what}: {e}") from None
        llm = m.llm
        args.embedded, args.generation = args.checkpoint is None, m.generation
        if args.template:
            llm.template = get_template(args.template)
        return llm.to(device=args.device, dtype=dtype)
    if args.llm:
        try:
            llm = SeedLLM.from_pretrained(
                args.llm,
                tokenizer=args.tokenizer,
                lora=args.lora,
                template=args.template,
                dtype=dtype,
                device=args.device,
            )
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            raise SystemExit(f"seed-fast: cannot load --llm {args.llm}: {e}") from None
        return llm
    print(
        f"seed-fast: --preset {args.preset}: a RANDOM LM and random tiny tokenizer (seed {args.seed}); "
        "the output shows the pipeline working, not a trained model",
        file=sys.stderr,
    )
    llm = SeedLLM.from_config(args.preset, seed=args.seed, template=args.template)
    if need_diffusion:
        from .models.decoders.unclip import tiny_unclip_pipeline

        llm.diffusion = tiny_unclip_pipeline(embed_dim=llm.tokenizer.config.detokenizer.out_dim, seed=args.seed)
    return llm.to(device=args.device, dtype=dtype)


def cmd_caption(args) -> int:
    from .models import InputError

    llm = _load_llm(args)
    images = _open_images(args.images)
    if args.embedded:
        _warn_unlike_training(images)
    try:
        if args.question:
            texts = llm.answer(images, args.question, max_new_tokens=args.max_new_tokens)
        else:
            texts = llm.caption(images, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    except InputError as e:
        raise SystemExit(f"seed-fast caption: {e}") from None
    if args.json:
        print(json.dumps([{"image": p, "text": t} for p, t in zip(args.images, texts)]))
    else:
        for p, t in zip(args.images, texts):
            print(f"{p}: {t}")
    return 0


def cmd_generate(args) -> int:
    from .models import InputError

    llm = _load_llm(args, need_diffusion=not args.tokens_only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(num_beams=args.num_beams, cfg_scale=args.cfg_scale, seed=args.seed)
    if args.sample:
        kw.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    try:
        codes = llm.generate_image_codes(args.texts, **kw)
        records = [{"text": t, "codes": c.tolist()} for t, c in zip(args.texts, codes)]
        if not args.tokens_only:
            if llm.diffusion is None:
                raise InputError(
                    f"{args.llm} has no diffusion/ pipeline: add --tokens-only, "
                    f"or put the unCLIP pipeline in {args.llm}/diffusion"
                )
            emb = llm.tokenizer.decode(codes)
            guidance = args.guidance
            if guidance is None:  # the model's own choice (the embedded decoder's 1.5), else Stable unCLIP's 10
                guidance = args.generation.decoder_guidance if args.generation is not None else 10.0
            neg = llm.tokenizer.decode(llm.negative_codes()) if guidance > 1 else None
            from .models.decoders.unclip import embeddings_to_images

            images = embeddings_to_images(
                llm.diffusion,
                emb,
                negative_image_embeds=neg,
                num_inference_steps=args.steps,
                guidance_scale=guidance,
                height=args.height,
                width=args.width,
                seed=args.seed,
            )
            for i, (rec, im) in enumerate(zip(records, images)):
                rec["image"] = f"{i:03d}.png"
                im.save(out / rec["image"])
    except InputError as e:
        raise SystemExit(f"seed-fast generate: {e}") from None
    (out / "codes.json").write_text(json.dumps(records, indent=1))
    for rec in records:
        where = f" -> {out / rec['image']}" if "image" in rec else ""
        print(f"{rec['text']!r}: {' '.join(map(str, rec['codes'][:8]))} ... ({len(rec['codes'])} codes){where}")
    print(f"wrote {out / 'codes.json'}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .info import main as info_main

    info_main()
    return 0


def _load_model(args):
    from .default_model import DefaultModelError, load_default

    try:
        return load_default(args.checkpoint)
    except DefaultModelError as e:
        raise SystemExit(f"seed-fast {args.command}: {e}") from None


def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int(text, 1, ">= 1")


def _non_negative_int(text: str) -> int:
    return _int(text, 0, ">= 0")


def _device(text: str) -> str:
    """A torch device this machine has: checked here, not as an error deep inside the first kernel."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
            raise argparse.ArgumentTypeError(f"{text}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu" and dev.type != "mps":
        raise argparse.ArgumentTypeError(f"{text}: seed-fast runs on cpu or cuda devices")
    return text


def _cfg_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1 (1 disables guidance), got {text}")
    return value


def cmd_demo(args) -> int:
    """The whole system on the embedded default model: images -> codes -> captions / answers,
    text -> codes -> images, an HTML report with a PNG grid and a metrics table."""
    from .default_model.demo import run_demo

    t0 = time.perf_counter()
    m = _load_model(args)
    print(f"model: {m.folder} (loaded in {time.perf_counter() - t0:.1f} s)")
    run_demo(
        m,
        args.out,
        image_paths=args.images,
        n_images=args.num_images,
        eval_n=args.eval_n,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        guidance=args.guidance,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"demo done in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_eval(args) -> int:
    """Retrieval, caption, answer, generation and reconstruction metrics on held-out scenes."""
    from .default_model.demo import evaluate, metrics_markdown

    t0 = time.perf_counter()
    if args.lavit or args.flamingo or args.vwlmm:
        from .default_model.related_eval import evaluate_flamingo, evaluate_lavit, evaluate_vwlmm, related_markdown

        try:
            if args.lavit:
                metrics = evaluate_lavit(args.lavit, args.n, progress=not args.no_progress)
            else:
                compare = None if args.no_compare else _load_model(args)
                run, evaluate_run = (
                    (args.flamingo, evaluate_flamingo) if args.flamingo else (args.vwlmm, evaluate_vwlmm)
                )
                metrics = evaluate_run(run, args.n, compare=compare, progress=not args.no_progress)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"seed-fast eval: {e}") from None
        print(related_markdown(metrics))
    else:
        m = _load_model(args)
        metrics = evaluate(
            m,
            args.n,
            n_gen=args.n_generation,
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            guidance=args.guidance,
            progress=not args.no_progress,
        )
        print(metrics_markdown(metrics))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(metrics, indent=1))
    print(f"eval done in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_export(args) -> int:
    if args.target == "onnx":
        from .default_model import DEFAULT_DIR
        from .export import MANIFEST, ExportError, export_onnx

        try:
            man = export_onnx(
                args.part,
                args.out,
                checkpoint=DEFAULT_DIR if args.checkpoint is None else args.checkpoint,
                fp16=args.fp16,
                opset=args.opset,
                image_dtype=args.image_dtype,
                progress=not args.no_progress,
            )
        except (ExportError, FileNotFoundError) as e:
            print(f"seed-fast export: error: {e}", file=sys.stderr)
            return 2
        print(f"{'part':<12} {'files':<40} {'MB':>9} {'s':>7}  parity (onnxruntime vs torch)")
        for part, rep in man["reports"].items():
            if part in man["parts"]:
                parity = ", ".join(
                    f"{k} {v:.3g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in rep["parity"].items()
                )
                print(
                    f"{part:<12} {' '.join(rep['files']):<40} {rep['megabytes']:>9.2f} {rep['seconds']:>7.1f}  {parity}"
                )
        print(f"manifest: {Path(args.out) / MANIFEST}  (run it: seed-fast ort-run --model {args.out} ...)")
        return 0
    from .export import TensorRTError, build_engines

    try:
        engines = build_engines(
            args.onnx,
            args.out,
            parts=args.part,
            fp16=not args.fp32,
            max_batch=args.max_batch,
            opt_batch=args.opt_batch,
            max_seq=args.max_seq,
            workspace_gb=args.workspace_gb,
        )
    except TensorRTError as e:
        print(f"seed-fast export tensorrt: error: {e}", file=sys.stderr)
        return 2
    for part, path in engines.items():
        print(f"{part}: {path}")
    return 0


def _checkout_root() -> Path:
    """The folder above the package: a source checkout's root for an editable install."""
    return Path(__file__).resolve().parent.parent


def bench_script() -> Path:
    """benchmarks/run_all.py of the source checkout this package was installed from. The benchmark
    scripts are not part of the wheel: they import the checkout's benchmarks/common.py and write
    their tables into its benchmarks/results/."""
    root = _checkout_root()
    path = root / "benchmarks" / "run_all.py"
    if not path.is_file():
        raise FileNotFoundError(
            "the benchmarks are not installed with the package; they run from a source checkout. "
            f"seed_fast is installed in {root}, which has no benchmarks/run_all.py. "
            "Clone the repository, install it there with `pip install --no-build-isolation -e .` "
            "(or `make install`), then run `seed-fast bench` (or `python benchmarks/run_all.py`) in it"
        )
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seed-fast", description="SEED image tokenizer tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenize", help="print the 32 codes of each image")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print JSON [{image, codes}]")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    _add_model_args(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("detokenize", help="codes -> generation embeddings (.npy or JSON)")
    p.add_argument("codes", nargs="*", help="one argument per image: its codes, comma- or space-separated")
    p.add_argument("--codes-file", help="JSON from `tokenize --json` or a list of code lists ('-' for stdin)")
    p.add_argument("--out", help="write to FILE (.npy for numpy, anything else JSON); default: JSON on stdout")
    _add_model_args(p)
    p.set_defaults(func=cmd_detokenize)

    p = sub.add_parser("caption", help="caption images (or answer --question) with a SeedLLM")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--prompt", help="captioning prompt (default: the template's)")
    p.add_argument("--question", help="ask this question about every image instead")
    p.add_argument("--json", action="store_true", help="print JSON [{image, text}]")
    _add_llm_args(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("generate", help="text -> 32 image codes -> image (unCLIP)")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--out", required=True, metavar="DIR", help="writes codes.json and one PNG per text")
    p.add_argument("--tokens-only", action="store_true", help="only the codes: no diffusion pipeline needed")
    p.add_argument("--num-beams", type=_positive_int, default=1)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="LLM-side classifier-free guidance (1 = off)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--steps", type=_positive_int, default=20, help="diffusion steps (default: 20)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="the image decoder's guidance scale (default: the model's own, 1.5 for the embedded decoder; "
        "10 for Stable unCLIP)",
    )
    p.add_argument("--height", type=_positive_int, default=None)
    p.add_argument("--width", type=_positive_int, default=None)
    _add_llm_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train a stage (works under torchrun too)")
    from .train import add_train_args, run_from_args

    add_train_args(p)
    p.set_defaults(func=run_from_args)

    p = sub.add_parser("info", help="versions and built backends")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the whole system on the embedded default model: codes, captions, images, report")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="extra images to tokenize and caption")
    p.add_argument("--checkpoint", default=None, help="a model folder (default: the embedded model)")
    p.add_argument("--out", default="seed_fast_demo", help="report folder (default: ./seed_fast_demo)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier report in --out (default: keep it and write to <out>-2, -3, ...)",
    )
    p.add_argument("--num-images", type=_non_negative_int, default=6, help="held-out synthetic scenes to show")
    p.add_argument("--eval-n", type=_positive_int, default=48, help="held-out scenes for the metrics table")
    p.add_argument("--steps", type=_positive_int, default=20, help="decoder diffusion steps")
    p.add_argument(
        "--cfg-scale",
        type=_cfg_scale,
        default=None,
        help="LLM-side classifier-free guidance when drawing codes from text (default: the model's generation.json, "
        "2 for the embedded one; 1 = off)",
    )
    p.add_argument(
        "--guidance",
        type=_cfg_scale,
        default=None,
        help="the decoder's classifier-free guidance (default: the model's generation.json, 1.5 for the embedded one; "
        "1 = off)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="ONNX files for every part (and TensorRT engines from them)")
    tsub = p.add_subparsers(dest="target", required=True)
    q = tsub.add_parser("onnx", help="export parts to ONNX, checked against torch in onnxruntime")
    q.add_argument("--part", nargs="+", default=["all"], choices=["tokenizer", "detokenizer", "llm", "decoder", "all"])
    q.add_argument("--checkpoint", default=None, help="a model folder (default: the embedded model)")
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--fp16", action="store_true", help="fp16 weights (the code search keeps fp32 distances)")
    q.add_argument("--opset", type=int, default=17)
    q.add_argument(
        "--image-dtype", default="uint8", choices=["uint8", "float32"], help="tokenizer input (default uint8)"
    )
    q.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_export)
    q = tsub.add_parser("tensorrt", help="TensorRT engines from an ONNX export (needs the tensorrt package)")
    q.add_argument("--onnx", required=True, metavar="DIR", help="a folder written by `seed-fast export onnx`")
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--part", nargs="+", default=None, help="default: every exported part")
    q.add_argument("--fp32", action="store_true", help="no fp16 layers")
    q.add_argument("--max-batch", type=_positive_int, default=8)
    q.add_argument("--opt-batch", type=_positive_int, default=1)
    q.add_argument("--max-seq", type=_positive_int, default=512, help="LLM: new tokens and past length up to this")
    q.add_argument("--workspace-gb", type=float, default=4.0)

    sub.add_parser(
        "ort-run", help="run an exported stack with onnxruntime, no torch (see seed-fast ort-run -h)", add_help=False
    )
    sub.add_parser(
        "tokenize-dataset",
        help="a folder of images or tar shards -> code shards, resumable, one process per GPU under torchrun "
        "(see seed-fast tokenize-dataset -h)",
        add_help=False,
    )
    sub.add_parser(
        "bench",
        help="every benchmark, tables + JSON + PNG in benchmarks/results/<device> (see seed-fast bench -h)",
        add_help=False,
    )

    p = sub.add_parser("eval", help="retrieval / caption / generation metrics of a model on held-out scenes")
    p.add_argument("--checkpoint", default=None, help="a model folder (default: the embedded model)")
    p.add_argument("--n", type=_positive_int, default=256, help="held-out scenes (default 256)")
    p.add_argument(
        "--n-generation",
        type=_positive_int,
        default=None,
        help="of them, drawn for generation / reconstruction (default all)",
    )
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument(
        "--cfg-scale",
        type=_cfg_scale,
        default=None,
        help="LLM-side classifier-free guidance when generating codes from captions (default: the model's "
        "generation.json, 2 for the embedded one; 1 = off)",
    )
    p.add_argument(
        "--guidance",
        type=_cfg_scale,
        default=None,
        help="the decoder's classifier-free guidance (default: the model's generation.json, 1.5 for the embedded one; "
        "1 = off)",
    )
    p.add_argument("--json", default=None, help="also write the metrics to this file")
    p.add_argument("--no-progress", action="store_true")
    rel = p.add_mutually_exclusive_group()
    rel.add_argument(
        "--lavit", metavar="RUN", help="evaluate a `seed-fast train lavit` run instead (tokens per image, ...)"
    )
    rel.add_argument(
        "--flamingo",
        metavar="RUN",
        help="evaluate a `seed-fast train flamingo` run instead (captions from continuous features)",
    )
    rel.add_argument(
        "--vwlmm", metavar="RUN", help="evaluate a `seed-fast train vwlmm` run instead (captions through visual words)"
    )
    p.add_argument(
        "--no-compare", action="store_true", help="with --flamingo / --vwlmm: skip SEED's captions on the same scenes"
    )
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ort-run"]:  # torch-free: handled before the parser imports the training code
        from .export.runtime import main as ort_main

        return ort_main(argv[1:])
    if argv[:1] == ["tokenize-dataset"]:  # its own parser; torch is imported only when it runs
        from .jobs.tokenize_dataset import main as tokenize_dataset_main

        return tokenize_dataset_main(argv[1:], prog="seed-fast tokenize-dataset")
    if argv[:1] == ["bench"]:  # benchmarks/run_all.py parses its own arguments
        try:
            script = bench_script()
        except FileNotFoundError as e:
            print(f"seed-fast bench: error: {e}", file=sys.stderr)
            return 2
        import runpy

        mod = runpy.run_path(str(script), run_name="seed_fast_bench")
        return mod["main"](argv[1:])
    debug = "--debug" in argv  # anywhere on the line: show the traceback of an error
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, _unreadable_image()) as e:
        # a user's mistake (every seed_fast input and checkpoint error is a ValueError or FileNotFoundError):
        # one line, not a traceback; --debug (or SEED_FAST_TRACEBACK=1) shows where it came from
        if debug or os.environ.get("SEED_FAST_TRACEBACK") == "1":
            raise
        command = " ".join(argv[:2]) if argv[:1] in (["train"], ["export"]) else argv[0]
        message = str(e) or type(e).__name__
        raise SystemExit(f"seed-fast {command}: error: {message}") from None


def _unreadable_image() -> type[Exception]:
    from PIL import UnidentifiedImageError

    return UnidentifiedImageError


if __name__ == "__main__":
    sys.exit(main())
