"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, an epsilon or v-prediction UNet, a KL VAE.

The class is written over a list of (tokenizer, text encoder) parts and a pipeline class, so that SDXL
(`sdxl.py`) only adds what differs: a second encoder, pooled embeddings and size conditioning.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from ..errors import ModelError, first_line
from . import register
from .base import Components, ModelFamily, ModelSource


@contextmanager
def loading(source: ModelSource, part: str):
    """Turn the libraries' loading errors into one line that names the part and the fix."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = first_line(e, 300)
        folder = source.path / part if (source.path / part).is_dir() else source.path
        present = source.is_local and any(folder.rglob("*.safetensors"))
        if present and "unable to load weights" in str(e).lower():
            hint = "its .safetensors file is damaged or incomplete (a cut-off download?); download or save it again"
        elif "safetensors" in str(e).lower():
            hint = "weights load from .safetensors only; convert .bin/.ckpt files with diffusers' conversion scripts"
        else:
            hint = "check that the folder is a complete diffusers pipeline"
        raise ModelError(f"cannot load {part} of {source.name_or_path}: {first}; {hint}") from None


@register
class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    default_resolution = 512
    pipeline_class: ClassVar[type] = StableDiffusionPipeline
    # (tokenizer folder, text-encoder folder, text-encoder class), primary first
    text_parts: ClassVar[tuple[tuple[str, str, type], ...]] = (("tokenizer", "text_encoder", CLIPTextModel),)
    # what the pipeline needs besides its modules, loaded or built here; building also leaves optional_parts empty
    load_options: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}
    optional_parts: ClassVar[tuple[str, ...]] = ("feature_extractor",)

    @property
    def required_parts(self) -> tuple[str, ...]:
        return ("unet", "vae", "scheduler", *(p for tok, enc, _ in self.text_parts for p in (tok, enc)))

    def check_source(self, source: ModelSource) -> None:
        """The pipeline's part folders exist (local folders only; hub repos are checked when loading)."""
        if source.is_local:
            missing = [p for p in self.required_parts if not (source.path / p).is_dir()]
            if missing:
                raise ModelError(f"model folder {source.name_or_path} lacks {', '.join(m + '/' for m in missing)}; "
                                 f"it is not a complete {self.pipeline_classes[0]}")

    def load_texts(self, source: ModelSource) -> tuple[list[Any], dict[str, torch.nn.Module]]:
        """Every tokenizer and text encoder, primary first."""
        self.check_source(source)
        tokenizers, encoders = [], {}
        for tok, enc, cls in self.text_parts:
            with loading(source, tok):  # --tokenizer_name replaces the primary tokenizer only
                own = tok != self.text_parts[0][0] or not source.tokenizer_name
                tokenizers.append(AutoTokenizer.from_pretrained(
                    source.name_or_path if own else source.tokenizer_name, subfolder=tok if own else None,
                    revision=source.revision))
            with loading(source, enc):
                encoders[enc] = cls.from_pretrained(source.name_or_path, subfolder=enc, **source.hub_kwargs())
        return tokenizers, encoders

    def load_text(self, source: ModelSource) -> tuple[Any, torch.nn.Module]:
        """Only the primary tokenizer and text encoder (for identifier search)."""
        tokenizers, encoders = self.load_texts(source)
        return tokenizers[0], next(iter(encoders.values()))

    def load_vae(self, source: ModelSource) -> AutoencoderKL:
        """The pipeline's VAE, or the one at source.vae (a VAE folder or hub id, with or without a vae/ folder)."""
        if source.vae is None:
            with loading(source, "vae"):
                return AutoencoderKL.from_pretrained(source.name_or_path, subfolder="vae", **source.hub_kwargs())
        vae_source = ModelSource(source.vae)
        sub = "vae" if vae_source.is_local and (vae_source.path / "vae").is_dir() else None
        with loading(vae_source, "the VAE (--pretrained_vae_model_name_or_path)"):
            return AutoencoderKL.from_pretrained(source.vae, subfolder=sub, use_safetensors=True)

    def load(self, source: ModelSource, prediction_type: str | None = None) -> Components:
        tokenizers, encoders = self.load_texts(source)
        kw = source.hub_kwargs()
        name = source.name_or_path
        with loading(source, "scheduler"):
            scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", revision=source.revision)
        if prediction_type is not None:
            scheduler.register_to_config(prediction_type=prediction_type)
        vae = self.load_vae(source)
        with loading(source, "unet"):
            unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kw)
        return Components(self.name, source, tokenizers, encoders, vae, unet, scheduler)

    def tokenize(self, c: Components, prompts: list[str]) -> torch.Tensor:
        ids = [tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                   return_tensors="pt").input_ids for tok in c.tokenizers]
        if len({i.shape[-1] for i in ids}) > 1:
            raise ModelError(f"the tokenizers of {c.source.name_or_path} have different max lengths "
                             f"({', '.join(str(i.shape[-1]) for i in ids)}); they must match")
        return torch.stack(ids, dim=1)

    def encode(self, c: Components, input_ids: torch.Tensor,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        encoder = next(iter((text_encoders or c.text_encoders).values()))
        return {"encoder_hidden_states": encoder(input_ids[:, 0].to(encoder.device))[0]}

    def _modules(self, c: Components, text_encoders: dict[str, torch.nn.Module]) -> dict[str, Any]:
        tokenizers = {tok: t for (tok, _, _), t in zip(self.text_parts, c.tokenizers)}
        return {**tokenizers, **c.text_encoders, **text_encoders, "vae": c.vae}

    def pipeline(self, c: Components, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module],
                 scheduler: Any) -> Any:
        pipe = self.pipeline_class(unet=unet, scheduler=scheduler, **self._modules(c, text_encoders),
                                   **self.load_options, **dict.fromkeys(self.optional_parts))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_pipeline(self, source: ModelSource, dtype: torch.dtype) -> Any:
        self.check_source(source)
        vae = {"vae": self.load_vae(source).to(dtype)} if source.vae else {}
        with loading(source, "pipeline"):
            pipe = self.pipeline_class.from_pretrained(source.name_or_path, dtype=dtype, **vae, **self.load_options,
                                                       **source.hub_kwargs())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, c: Components, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module],
             output_dir: Path) -> None:
        """The base pipeline with the trained modules swapped in; the base's own inference scheduler is kept."""
        with loading(c.source, "pipeline"):
            pipe = self.pipeline_class.from_pretrained(c.source.name_or_path, unet=unet,
                                                       **self._modules(c, text_encoders), **self.load_options,
                                                       **c.source.hub_kwargs())
        pipe.save_pretrained(output_dir, safe_serialization=True)

    def single_file_text_layout(self, pipe: Any) -> dict[str, tuple[str, str]]:
        """SD 1.x keeps OpenAI CLIP (quick_gelu) in transformers keys; SD 2.x's OpenCLIP encoder (gelu) is stored
        in OpenCLIP's own layout."""
        if pipe.text_encoder.config.hidden_act == "gelu":
            return {"text_encoder": ("open_clip", "cond_stage_model.model.")}
        return {"text_encoder": ("clip", "cond_stage_model.transformer.")}

    def save_lora(self, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None,
                  output_dir: Path) -> None:
        """peft-format keys (`unet.<module>.lora_A.weight`) with each adapter's config as metadata, so a custom
        lora_alpha survives loading."""
        from peft.utils import get_peft_model_state_dict

        parts = {"unet": unet, **(text_encoders or {})}
        layers = {f"{name}_lora_layers": get_peft_model_state_dict(m, save_embedding_layers=False)
                  for name, m in parts.items()}
        metadata = {f"{name}_lora_adapter_metadata": m.peft_config["default"].to_dict() for name, m in parts.items()}
        self.pipeline_class.save_lora_weights(output_dir, **layers, **metadata, safe_serialization=True)
