"""The embedded default model: a small SEED stack trained on the synthetic shapes, shipped in the package.

    from seed_fast.default_model import load_default
    m = load_default()                     # or load_default("path/to/folder")
    codes = m.tokenizer.encode(images)     # (B, 32)
    m.llm.caption(images); m.llm.answer(images, ["what color is the shape on the right?"])
    m.render(m.llm.generate_image_embeddings(["one red circle left of a blue square"], negative=False)[0])

The folder (seed_fast/default_model/assets, or any folder `python -m seed_fast.default_model.recipe
--install --dest` wrote) holds:

    tokenizer/   SeedTokenizer (config.json, model.safetensors)
    llm/         SeedLLM: the LM with the image vocabulary (llm/) and its LoRA adapter (lora/)
    decoder/     SeedImageDecoderPipeline (diffusers unet/ + scheduler/, and vae/ for a latent decoder)
    itc/         stage I's text branch and projections (retrieval), text_tokenizer/
    checker.safetensors   the independent scene checker (evaluation only)
    generation.json       the model's own guidance settings (GenerationConfig), chosen with its weights
    recipe.json  how it was trained (seeds, data, stage configs) and its metrics

Weights are stored in float16 to fit the package (about 20 MB); they load as float32.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..models import SeedTokenizer
from ..models.decoders.image_decoder import load_image_decoder
from ..models.decoders.unclip import embeddings_to_images
from ..models.llm.seed_llm import SeedLLM
from ..models.seed.itc import load_itc_heads
from .checker import SceneChecker

DEFAULT_DIR = Path(__file__).parent / "assets"
GENERATION = "generation.json"
PARTS = ("tokenizer", "llm", "decoder", "itc", "checker.safetensors", GENERATION, "recipe.json")


class DefaultModelError(FileNotFoundError):
    pass


def check_folder(folder: str | Path) -> Path:
    """The folder, if it holds every part of a default-model checkpoint; else a clear error."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DefaultModelError(f"--checkpoint {str(folder)!r} is not a folder")
    missing = [p for p in PARTS if not (root / p).exists()]
    if missing:
        raise DefaultModelError(
            f"{str(root)!r} is not a complete seed_fast model folder: missing {missing} "
            f"(expected {list(PARTS)}; `python -m seed_fast.default_model.recipe --install --dest DIR` writes one)"
        )
    return root


@dataclass(frozen=True)
class GenerationConfig:
    """How a trained model draws images, stored with its weights (generation.json): the guidance
    values its evaluation chose."""

    decoder_guidance: float  # the image decoder's classifier-free guidance (1: off)
    code_cfg_scale: float  # the LLM's classifier-free guidance when it draws codes from text (1: off)

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig":
        data = json.loads(Path(path).read_text())
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise DefaultModelError(f"{path}: expected the keys {sorted(names)}, got {sorted(data)}")
        return cls(**{k: float(v) for k, v in data.items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


@dataclass
class DefaultModel:
    tokenizer: Any  # SeedTokenizer
    llm: Any  # SeedLLM (tokenizer attached, decoder as its diffusion pipeline)
    decoder: Any  # SeedImageDecoderPipeline
    itc: Any  # stage-I heads (text features for retrieval)
    checker: Any  # SceneChecker
    generation: GenerationConfig
    recipe: dict
    folder: Path

    def render(
        self,
        embeds: torch.Tensor,
        *,
        steps: int = 20,
        guidance: float | None = None,
        seed: int = 0,
        progress: bool = False,
    ):
        """Generation embeddings (B, D) -> PIL images (the decoder's resolution). guidance: the
        decoder's classifier-free guidance (default: the model's `generation.decoder_guidance`; 1: off)."""
        guidance = self.generation.decoder_guidance if guidance is None else guidance
        return embeddings_to_images(
            self.decoder, embeds, num_inference_steps=steps, guidance_scale=guidance, seed=seed, progress=progress
        )


def load_default(folder: str | Path | None = None) -> DefaultModel:
    """The embedded model (folder None), or a model folder of the same layout."""
    root = check_folder(DEFAULT_DIR if folder is None else folder)
    if folder is None and not (root / "tokenizer" / "model.safetensors").is_file():
        raise DefaultModelError(f"the embedded model is not installed in {root}")
    tok = SeedTokenizer.from_pretrained(root / "tokenizer").float().eval()
    decoder = load_image_decoder(root / "decoder", dtype=torch.float32)
    llm = SeedLLM.from_pretrained(root / "llm", tokenizer=tok, diffusion=decoder, dtype=torch.float32)
    llm.model.eval()
    itc = load_itc_heads(tok, root / "itc").float().eval()
    checker = SceneChecker.load(root / "checker.safetensors")
    generation = GenerationConfig.from_file(root / GENERATION)
    recipe = json.loads((root / "recipe.json").read_text())
    return DefaultModel(tok, llm, decoder, itc, checker, generation, recipe, root)


def _half_safetensors(folder: Path) -> None:
    """Rewrite every float32 tensor of every .safetensors file under `folder` as float16."""
    for f in folder.rglob("*.safetensors"):
        sd = load_file(str(f))
        save_file(
            {k: (v.half() if v.dtype == torch.float32 else v).contiguous() for k, v in sd.items()},
            str(f),
            metadata={"format": "pt"},
        )


def _portable_adapters(folder: Path) -> None:
    """peft adapter folders as shipped: no path of the machine that trained them (the base model is
    the folder's own LLM), target modules in a fixed order, and no generated model card."""
    for cfg in folder.rglob("adapter_config.json"):
        c = json.loads(cfg.read_text())
        c["base_model_name_or_path"] = None
        if isinstance(c.get("target_modules"), list):
            c["target_modules"] = sorted(c["target_modules"])
        cfg.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
        card = cfg.parent / "README.md"
        if card.is_file() and "base_model" in card.read_text():
            card.unlink()


def assemble(
    work: Path,
    dest: Path,
    *,
    recipe: dict,
    metrics: dict,
    generation: GenerationConfig,
    llm_stage: str = "lora",
) -> Path:
    """Copy the finished stage outputs of a recipe run into a model folder (fp16 weights), with its
    generation settings. llm_stage: the run whose SeedLLM is shipped ("lora": the adapter stage, or "llm")."""
    work, dest = Path(work), Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    for folder in (dest, tmp):
        check_replaceable(folder)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copytree(work / "stage2" / "tokenizer", tmp / "tokenizer")
    llm_src = work / llm_stage / "llm"
    shutil.copytree(llm_src, tmp / "llm", ignore=shutil.ignore_patterns("tokenizer", "diffusion"))
    shutil.copytree(work / "decoder" / "decoder", tmp / "decoder")
    (tmp / "itc").mkdir()
    shutil.copy2(work / "stage1" / "itc_heads.safetensors", tmp / "itc" / "itc_heads.safetensors")
    shutil.copytree(work / "stage1" / "text_tokenizer", tmp / "itc" / "text_tokenizer")
    shutil.copy2(work / "checker" / "checker.safetensors", tmp / "checker.safetensors")
    _half_safetensors(tmp)
    _portable_adapters(tmp / "llm")
    generation.save(tmp / GENERATION)
    (tmp / "recipe.json").write_text(json.dumps({"recipe": recipe, "metrics": metrics}, indent=1))
    old = dest.with_name(dest.name + ".old")
    if dest.exists():  # checked above: an earlier model folder (or an empty one)
        check_replaceable(old)
        if old.exists():
            shutil.rmtree(old)
        dest.replace(old)
    tmp.replace(dest)
    if old.exists():
        shutil.rmtree(old)
    return dest


# what `assemble` writes into a model folder: it replaces a folder holding nothing else
MODEL_FOLDER_ENTRIES = set(PARTS)


def check_replaceable(folder: Path) -> None:
    """Refuse to delete a folder this code did not write: it must be missing, empty, or hold only a
    model folder's entries."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DefaultModelError(f"{folder} exists and is not a folder; choose another destination")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in MODEL_FOLDER_ENTRIES)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise DefaultModelError(
            f"{folder} exists and holds files a model folder does not ({shown}); it is left as it is: "
            "choose another destination, or empty it"
        )
