"""`seed-fast demo` and `seed-fast eval` on the embedded default model (or `--checkpoint DIR`).

Held-out data: the synthetic "test" split (seeded, a stream disjoint from the training and
validation splits the recipe used). Metrics, all on that split:

  retrieval     image->text and text->image R@1/5/10 with codes (SEED's protocol: the image
                feature is rebuilt from the 32 codes; a hit is any caption equal to the query's)
  captions      the LLM captions images from their codes; a caption is right when it names the
                color and shape of every object (`objects_ok`), or is the exact caption
  answers       one-word answers to the scene questions
  generation    caption -> LLM -> 32 codes -> generation embedding -> decoder -> image; the
                independent checker (trained on rendered scenes only) must find the requested
                color and shape of every object
  reconstruction  image -> codes -> generation embedding -> decoder -> image, judged likewise
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..images import to_rgb
from ..models.seed.itc import retrieval_at_k
from ..synthetic import make_question, make_scene, parse_caption

TEST_SEED = 20261122
DEMO_PROMPTS = (
    "one red circle left of a blue square",
    "two yellow triangles left of a purple circle",
    "three green squares left of an orange triangle",
    "one blue triangle left of a red square",
)


def test_scenes(n: int, seed: int = TEST_SEED, size: int = 64):
    """n held-out scenes: (PIL images, captions, facts, (question, answer) pairs)."""
    rng = random.Random(f"seed_fast-test-{seed}")
    images, caps, facts, qas = [], [], [], []
    for i in range(n):
        img, cap, f = make_scene(rng, size)
        images.append(img)
        caps.append(cap)
        facts.append(f)
        qas.append(make_question(f, random.Random(f"qa-test-{seed}-{i}")))
    return images, caps, facts, qas


def _bar(it, desc: str, progress: bool, total: int | None = None):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


def _chunks(n: int, size: int):
    return [(i, min(n, i + size)) for i in range(0, n, size)]


@torch.no_grad()
def code_features(m, codes: torch.Tensor) -> torch.Tensor:
    """SEED's retrieval feature from codes: decode, rebuild the causal embeddings, last query,
    stage I's vision_proj, unit norm."""
    tok = m.tokenizer
    rec = tok.reconstructor(tok.embed_codes(codes.to(tok.device)))
    return F.normalize(m.itc.vision_proj(rec[:, -1]).float(), dim=-1)


def _check_cfg_scale(cfg_scale: float) -> None:
    if not 1.0 <= cfg_scale < float("inf"):
        raise ValueError(f"cfg_scale must be >= 1 (1 disables the LLM's guidance), got {cfg_scale}")


def _objects_ok(pred: dict | None, truth: dict) -> bool:
    return pred is not None and all(
        pred[k] == truth[k] for k in ("left_color", "left_shape", "right_color", "right_shape")
    )


@torch.no_grad()
def evaluate(
    m,
    n: int = 128,
    *,
    seed: int = TEST_SEED,
    n_gen: int | None = None,
    steps: int = 20,
    guidance: float | None = None,
    cfg_scale: float | None = None,
    batch: int = 32,
    progress: bool = True,
) -> dict[str, float]:
    """Every metric of the module docstring on n held-out scenes (n_gen of them for generation and
    reconstruction, default all). guidance: the decoder's; cfg_scale: the LLM's when it draws codes
    from the captions (1: greedy without guidance); None: the model's own (`m.generation`)."""
    guidance = m.generation.decoder_guidance if guidance is None else guidance
    cfg_scale = m.generation.code_cfg_scale if cfg_scale is None else cfg_scale

    _check_cfg_scale(cfg_scale)
    images, caps, facts, qas = test_scenes(n, seed)
    n_gen = n if n_gen is None else min(n_gen, n)
    out: dict[str, float] = {"n": n, "n_generation": n_gen, "decoder_guidance": guidance, "code_cfg_scale": cfg_scale}
    codes = torch.cat([m.tokenizer.encode(images[a:b]) for a, b in _bar(_chunks(n, batch), "encode", progress)])
    # retrieval with codes
    img_f = code_features(m, codes)
    txt_f = torch.cat([m.itc.encode_text(caps[a:b]) for a, b in _chunks(n, batch)])
    out.update({f"retrieval_{k}": v for k, v in retrieval_at_k(img_f, txt_f, caps).items()})
    # captions and answers from codes
    pred_caps, answers = [], []
    for a, b in _bar(_chunks(n, batch), "caption", progress):
        pred_caps += m.llm.caption(codes=codes[a:b])
        answers += m.llm.answer(codes=codes[a:b], questions=[q for q, _ in qas[a:b]])
    out["caption_objects_ok"] = sum(_objects_ok(parse_caption(p), f) for p, f in zip(pred_caps, facts)) / n
    out["caption_exact"] = sum(p.strip().rstrip(".") == c for p, c in zip(pred_caps, caps)) / n
    out["caption_parsable"] = sum(parse_caption(p) is not None for p in pred_caps) / n
    out["answer_exact"] = sum(a.strip().rstrip(".").lower() == t for a, (_, t) in zip(answers, qas)) / n
    # reconstruction and generation through the decoder, judged by the independent checker
    rec_imgs, gen_imgs = [], []
    for a, b in _bar(_chunks(n_gen, batch), "decode", progress):
        rec_imgs += m.render(m.tokenizer.decode(codes[a:b]), steps=steps, guidance=guidance, seed=seed + a)
        emb, _ = m.llm.generate_image_embeddings(caps[a:b], negative=False, cfg_scale=cfg_scale)
        gen_imgs += m.render(emb, steps=steps, guidance=guidance, seed=seed + 7 + a)
    out["reconstruction_objects_ok"] = sum(r["objects_ok"] for r in m.checker.judge(rec_imgs, facts[:n_gen])) / n_gen
    out["generation_objects_ok"] = sum(r["objects_ok"] for r in m.checker.judge(gen_imgs, facts[:n_gen])) / n_gen
    out["checker_real_objects_ok"] = (
        sum(r["objects_ok"] for r in m.checker.judge(images[:n_gen], facts[:n_gen])) / n_gen
    )
    return out


METRIC_ROWS = (
    ("retrieval_i2t_r1", "retrieval image->text R@1 (codes)"),
    ("retrieval_i2t_r5", "retrieval image->text R@5"),
    ("retrieval_i2t_r10", "retrieval image->text R@10"),
    ("retrieval_t2i_r1", "retrieval text->image R@1 (codes)"),
    ("retrieval_t2i_r5", "retrieval text->image R@5"),
    ("retrieval_t2i_r10", "retrieval text->image R@10"),
    ("retrieval_chance_r1", "retrieval chance R@1"),
    ("caption_objects_ok", "captions: every object's color and shape right"),
    ("caption_exact", "captions: exact"),
    ("answer_exact", "answers: exact"),
    ("generation_objects_ok", "generation: checker finds every requested color and shape"),
    ("reconstruction_objects_ok", "reconstruction: checker finds every color and shape"),
    ("checker_real_objects_ok", "checker on the real test images (its ceiling)"),
)


def metrics_markdown(metrics: dict) -> str:
    rows = ["| metric | value |", "|---|---|"]
    for key, label in METRIC_ROWS:
        if key in metrics:
            rows.append(f"| {label} | {100 * metrics[key]:.1f}% |")
    rows.append(f"\nheld-out synthetic test scenes: {metrics.get('n')} ({metrics.get('n_generation')} drawn)")
    return "\n".join(rows)


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_grid(rows: list[list], cell: int = 96):
    from PIL import Image

    w = max(len(r) for r in rows)
    grid = Image.new("RGB", (w * cell, len(rows) * cell), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            if im is not None:
                grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x * cell, y * cell))
    return grid


REPORT_FILES = ("report.html", "grid.png", "metrics.json")


def report_folder(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """out_dir, or the first `<out_dir>-N` holding none of the report's files (an earlier report is kept)."""
    out = Path(out_dir)
    if overwrite:
        return out
    n, folder = 1, out
    while any((folder / f).exists() for f in REPORT_FILES):
        n += 1
        folder = out.with_name(f"{out.name}-{n}")
    if folder != out:
        print(f"{out} holds an earlier report; writing this one to {folder} (--overwrite replaces it)")
    return folder


def run_demo(
    m,
    out_dir: str | Path,
    *,
    image_paths=(),
    n_images: int = 6,
    prompts=DEMO_PROMPTS,
    eval_n: int = 48,
    steps: int = 20,
    guidance: float | None = None,
    cfg_scale: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """The demo's console walk-through and its report (report.html, grid.png, metrics.json) in
    out_dir. A folder holding an earlier report keeps it: the new one goes to the first free
    `<out_dir>-2`, `-3`, ... unless overwrite is set. guidance, cfg_scale: as in `evaluate`."""
    guidance = m.generation.decoder_guidance if guidance is None else guidance
    cfg_scale = m.generation.code_cfg_scale if cfg_scale is None else cfg_scale
    from PIL import Image

    _check_cfg_scale(cfg_scale)
    if n_images < 0 or (n_images == 0 and not image_paths):
        raise ValueError(f"nothing to show: n_images={n_images} and no image paths given")
    t0 = time.perf_counter()
    out = report_folder(out_dir, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    images, caps, facts, qas = test_scenes(n_images)
    names = [f"test scene {i}" for i in range(n_images)]
    for p in image_paths:
        with Image.open(p) as im:
            images.append(to_rgb(im, str(p)))
        caps.append(None)
        names.append(str(p))
    codes = m.tokenizer.encode(images)
    print(f"1. images -> 32 codes each ({m.tokenizer.codebook_size}-code book)")
    for name, c in zip(names, codes):
        print(f"   {name:<22} {' '.join(str(int(x)) for x in c[:12])} ... ")
    pred = m.llm.caption(codes=codes)
    print("2. codes -> captions (LLM)")
    for name, p, c in zip(names, pred, caps):
        print(f"   {name:<22} {p!r}" + (f"   (truth: {c!r})" if c else ""))
    question = qas[0][0]
    ans = m.llm.answer(codes=codes[:1], questions=[question])[0]
    print(f"3. question about {names[0]}: {question!r} -> {ans!r} (truth: {qas[0][1]!r})")
    recon = m.render(m.tokenizer.decode(codes), steps=steps, guidance=guidance, progress=progress)
    emb, _ = m.llm.generate_image_embeddings(list(prompts), negative=False, cfg_scale=cfg_scale)
    gen = m.render(emb, steps=steps, guidance=guidance, seed=1, progress=progress)
    gen_judge = m.checker.judge(gen, [parse_caption(p) for p in prompts])
    print("4. text -> codes (LLM) -> image (decoder)")
    for p, j in zip(prompts, gen_judge):
        print(f"   {p!r}: checker {'agrees' if j['objects_ok'] else 'disagrees'} ({j['predicted']})")
    print(f"5. metrics on {eval_n} held-out scenes")
    metrics = evaluate(m, eval_n, steps=steps, guidance=guidance, cfg_scale=cfg_scale, progress=progress)
    md = metrics_markdown(metrics)
    print(md)
    grid = make_grid([images, recon, gen])
    grid.save(out / "grid.png")
    report = _html_report(
        names, images, codes, pred, caps, recon, list(prompts), gen, gen_judge, question, ans, metrics, m
    )
    (out / "report.html").write_text(report, encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"report: {out / 'report.html'}, grid: {out / 'grid.png'} ({time.perf_counter() - t0:.0f} s)")
    return metrics


def _html_report(names, images, codes, pred, caps, recon, prompts, gen, gen_judge, question, ans, metrics, m) -> str:
    e = html.escape
    rows = []
    for name, im, c, p, t, r in zip(names, images, codes, pred, caps, recon):
        rows.append(
            f"<tr><td>{e(name)}</td><td><img src='data:image/png;base64,{_png_b64(im.resize((96, 96)))}'></td>"
            f"<td class=codes>{' '.join(str(int(x)) for x in c)}</td><td>{e(p)}<br><small>{e(t or '')}</small></td>"
            f"<td><img src='data:image/png;base64,{_png_b64(r.resize((96, 96)))}'></td></tr>"
        )
    grows = []
    for p, g, j in zip(prompts, gen, gen_judge):
        grows.append(
            f"<tr><td>{e(p)}</td><td><img src='data:image/png;base64,{_png_b64(g.resize((96, 96)))}'></td>"
            f"<td>{'yes' if j['objects_ok'] else 'no'}</td></tr>"
        )
    mrows = "".join(
        f"<tr><td>{e(label)}</td><td>{100 * metrics[k]:.1f}%</td></tr>" for k, label in METRIC_ROWS if k in metrics
    )
    return f"""<!doctype html><html><head><meta charset=utf-8><title>seed_fast demo</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{padding:4px 8px;vertical-align:middle}} \
.codes{{font-family:monospace;font-size:11px;max-width:320px}} table{{border-collapse:collapse}} \
tr:nth-child(even){{background:#f4f4f4}}</style></head><body>
<h1>seed_fast demo: the embedded default model</h1>
<p>Model folder: {e(str(m.folder))}. Images become 32 discrete codes; an LLM reads the codes (captions, answers)
and writes them (text to image); a diffusion decoder draws the generation embedding rebuilt from codes.</p>
<h2>Images, codes, captions, reconstructions</h2>
<table><tr><th>image</th><th>input</th><th>32 codes</th><th>caption (truth below)</th>\
<th>codes &rarr; decoder</th></tr>{"".join(rows)}</table>
<p>Question about the first image: <b>{e(question)}</b> &rarr; <b>{e(ans)}</b></p>
<h2>Text &rarr; codes &rarr; image</h2>
<table><tr><th>prompt</th><th>generated</th><th>checker agrees</th></tr>{"".join(grows)}</table>
<h2>Metrics (held-out synthetic test scenes: {metrics.get("n")}, drawn: {metrics.get("n_generation")})</h2>
<table>{mrows}</table></body></html>"""
