"""What the diffusers pipelines of every family share: loading their parts (tokenizers and text encoders, VAE,
denoiser, training scheduler), building a pipeline from trained modules, saving it, saving LoRA files. A family
module subclasses `DiffusersFamily`, names its parts and fills the hooks that differ (tokenize, encode, how the
denoiser is called, the single-file layout)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL

from ..errors import ModelError, first_line
from .base import Components, ModelFamily, ModelSource, read_model_index


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


def chat_template_ids(tokenizer: Any, prompts: list[str], length: int, enable_thinking: bool) -> torch.Tensor:
    """Token ids of each prompt as the user turn of a chat model's template, the assistant's turn opened (Qwen3
    text encoders: Flux.2 klein with thinking off, Z-Image with it on), padded or cut to `length` tokens."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=enable_thinking)
             for p in prompts]
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


@dataclass(frozen=True)
class TextPart:
    """One (tokenizer, text encoder) pair of a pipeline, by its folder names; `optional` parts (SD3's T5) may be
    missing from a model, as the pipeline allows."""

    tokenizer: str
    encoder: str
    cls: type
    optional: bool = False


class DiffusersFamily(ModelFamily):
    pipeline_class: ClassVar[type]
    denoiser_class: ClassVar[type]
    vae_class: ClassVar[type] = AutoencoderKL
    scheduler_class: ClassVar[type]  # the training noise schedule, read from the model's scheduler config
    text_parts: ClassVar[tuple[TextPart, ...]]  # primary first
    t5_part: ClassVar[str | None] = None  # the text encoder whose prompts are --max_sequence_length tokens
    # the longest --max_sequence_length: T5 reads at most 512 tokens (its tokenizer's length; the SD3 and Flux
    # pipelines refuse more, and padding to more would exhaust the memory)
    max_sequence_length_limit: ClassVar[int] = 512
    # what the pipeline needs besides its modules, loaded or built here; building also leaves optional_parts empty
    load_options: ClassVar[dict[str, Any]] = {}
    optional_parts: ClassVar[tuple[str, ...]] = ()
    upcast_vae_in_fp16: ClassVar[bool] = True  # its VAE overflows in fp16 (SDXL, SD3, Flux; not SD 1.x/2.x)
    # settings its pipeline keeps in model_index.json (Flux.2 klein's is_distilled, Krea 2's layer taps): a pipeline
    # built from loaded modules gets the base model's, as loading it would
    pipeline_settings: ClassVar[tuple[str, ...]] = ()

    def present_parts(self, source: ModelSource) -> tuple[TextPart, ...]:
        """The text parts this model has (hub models: all of them)."""
        if not source.is_local:
            return self.text_parts
        return tuple(p for p in self.text_parts if not p.optional or (source.path / p.encoder).is_dir())

    def check_source(self, source: ModelSource) -> None:
        """The pipeline's part folders exist (local folders only; hub repos are checked when loading)."""
        if source.is_local:
            required = (self.denoiser_name, "vae", "scheduler",
                        *(f for p in self.text_parts if not p.optional for f in (p.tokenizer, p.encoder)))
            missing = [p for p in required if not (source.path / p).is_dir()]
            if missing:
                raise ModelError(f"model folder {source.name_or_path} lacks {', '.join(m + '/' for m in missing)}; "
                                 f"it is not a complete {self.pipeline_classes[0]}")

    def load_texts(self, source: ModelSource) -> tuple[dict[str, Any], dict[str, torch.nn.Module]]:
        """Every tokenizer and text encoder the model has, by encoder name, primary first."""
        from transformers import AutoTokenizer

        self.check_source(source)
        tokenizers, encoders = {}, {}
        for i, part in enumerate(self.present_parts(source)):
            with loading(source, part.tokenizer):  # --tokenizer_name replaces the primary tokenizer only
                own = i > 0 or not source.tokenizer_name
                where = {"subfolder": part.tokenizer} if own else {}  # (subfolder=None fails in transformers 5)
                tokenizers[part.encoder] = AutoTokenizer.from_pretrained(
                    source.name_or_path if own else source.tokenizer_name, revision=source.revision, **where)
            with loading(source, part.encoder):
                encoders[part.encoder] = part.cls.from_pretrained(source.name_or_path, subfolder=part.encoder,
                                                                  **source.hub_kwargs())
        return tokenizers, encoders

    def load_text(self, source: ModelSource) -> tuple[Any, torch.nn.Module]:
        tokenizers, encoders = self.load_texts(source)
        return next(iter(tokenizers.values())), next(iter(encoders.values()))

    def load_vae(self, source: ModelSource) -> AutoencoderKL:
        """The pipeline's VAE, or the one at source.vae (a VAE folder or hub id, with or without a vae/ folder)."""
        if source.vae is None:
            with loading(source, "vae"):
                return self.vae_class.from_pretrained(source.name_or_path, subfolder="vae", **source.hub_kwargs())
        vae_source = ModelSource(source.vae)
        sub = "vae" if vae_source.is_local and (vae_source.path / "vae").is_dir() else None
        with loading(vae_source, "the VAE (--pretrained_vae_model_name_or_path)"):
            return self.vae_class.from_pretrained(source.vae, subfolder=sub, use_safetensors=True)

    def load(self, source: ModelSource, prediction_type: str | None = None,
             quantization: dict[str, Any] | None = None) -> Components:
        tokenizers, encoders = self.load_texts(source)
        with loading(source, "scheduler"):
            scheduler = self.scheduler_class.from_pretrained(source.name_or_path, subfolder="scheduler",
                                                             revision=source.revision)
        if prediction_type is not None:
            scheduler.register_to_config(prediction_type=prediction_type)
        vae = self.load_vae(source)
        with loading(source, self.denoiser_name):
            denoiser = self.denoiser_class.from_pretrained(source.name_or_path, subfolder=self.denoiser_name,
                                                           **source.hub_kwargs(), **(quantization or {}))
        return Components(self.name, source, tokenizers, encoders, vae, denoiser, scheduler)

    def tokenize(self, c: Components, prompts: list[str], cfg: Any) -> dict[str, torch.Tensor]:
        """Ids padded to each tokenizer's own length (CLIP: 77), T5's to --max_sequence_length."""
        ids = {}
        for name, tok in c.tokenizers.items():
            length = self.option(cfg, "max_sequence_length") if name == self.t5_part else tok.model_max_length
            ids[name] = tok(prompts, padding="max_length", max_length=length, truncation=True,
                            return_tensors="pt").input_ids
        clip = {i.shape[-1] for name, i in ids.items() if name != self.t5_part}
        if len(clip) > 1:
            raise ModelError(f"the CLIP tokenizers of {c.source.name_or_path} have different max lengths "
                             f"({', '.join(map(str, sorted(clip)))}); they must match")
        return ids

    def frozen_states(self, c: Components, encoder: str, ids: torch.Tensor,
                      compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """What a never-trained encoder (T5) gives for these ids (`compute(ids)`), kept row by row: the run encodes
        every prompt once, then the encoder leaves the GPU, and any batch of those prompts (a few of them, in any
        order: a trained CLIP encodes only the prompts of its batch) is served from the rows, never by a new call.
        Only ids it has not seen are computed."""
        keys = [(encoder, row.numpy().tobytes()) for row in ids]
        unseen = list(dict.fromkeys(k for k in keys if k not in c.frozen))
        if unseen:
            rows = [keys.index(k) for k in unseen]
            with torch.no_grad():
                states = compute(ids[rows])
            c.frozen.update(zip(unseen, states))
        return torch.stack([c.frozen[k] for k in keys])

    def normalize_latents(self, c: Components, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(c.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * c.vae.config.scaling_factor

    def pipeline_kwargs(self, cfg: Any = None) -> dict[str, Any]:
        t5 = {"max_sequence_length": self.option(cfg, "max_sequence_length")} if self.t5_part else {}
        return {**super().pipeline_kwargs(cfg), **t5}

    def _modules(self, c: Components, text_encoders: dict[str, torch.nn.Module]) -> dict[str, Any]:
        """Tokenizers and text encoders by their pipeline names (None for optional parts the model lacks)."""
        modules: dict[str, Any] = {"vae": c.vae}
        encoders = {**c.text_encoders, **text_encoders}
        for part in self.text_parts:
            modules[part.tokenizer] = c.tokenizers.get(part.encoder)
            modules[part.encoder] = encoders.get(part.encoder)
        return modules

    def pipeline(self, c: Components, denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module],
                 scheduler: Any) -> Any:
        index = read_model_index(c.source) if self.pipeline_settings else {}
        settings = {k: index[k] for k in self.pipeline_settings if index.get(k) is not None}
        pipe = self.pipeline_class(**{self.denoiser_name: denoiser}, scheduler=scheduler,
                                   **self._modules(c, text_encoders), **self.load_options,
                                   **dict.fromkeys(self.optional_parts), **settings)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_pipeline(self, source: ModelSource, dtype: torch.dtype) -> Any:
        self.check_source(source)
        vae = {"vae": self.load_vae(source).to(dtype)} if source.vae else {}
        absent = {f: None for p in self.text_parts if p not in self.present_parts(source) for f in
                  (p.tokenizer, p.encoder)}
        with loading(source, "pipeline"):
            pipe = self.pipeline_class.from_pretrained(source.name_or_path, dtype=dtype, **vae, **absent,
                                                       **self.load_options, **source.hub_kwargs())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_around(self, c: Components, denoiser: torch.nn.Module,
                        text_encoders: dict[str, torch.nn.Module]) -> Any:
        with loading(c.source, "pipeline"):
            pipe = self.pipeline_class.from_pretrained(c.source.name_or_path, **{self.denoiser_name: denoiser},
                                                       **self._modules(c, text_encoders), **self.load_options,
                                                       **c.source.hub_kwargs())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, c: Components, denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module],
             output_dir: Path, dtype: torch.dtype | None = None) -> None:
        """The base pipeline with the trained modules swapped in; the base's own inference scheduler is kept."""
        pipe = self.pipeline_around(c, denoiser, text_encoders)
        if dtype is not None:  # --save_precision: files half the size (the trained modules are cast back after)
            trained = [denoiser, *text_encoders.values()]
            before = [next(m.parameters()).dtype for m in trained]
            pipe.to(dtype)
        pipe.save_pretrained(output_dir, safe_serialization=True)
        if dtype is not None:
            for module, was in zip(trained, before):
                module.to(was)

    def lora_file(self, denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None,
                  copy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[Path], None]:
        """peft-format keys (`unet.<module>.lora_A.weight`, `transformer.<module>...`) with each adapter's config
        as metadata, so a custom lora_alpha survives loading."""
        from peft.utils import get_peft_model_state_dict

        parts = {self.denoiser_name: denoiser, **(text_encoders or {})}
        layers = {f"{name}_lora_layers": {k: copy(v) if copy else v for k, v in
                                          get_peft_model_state_dict(m, save_embedding_layers=False).items()}
                  for name, m in parts.items()}
        metadata = {f"{name}_lora_adapter_metadata": m.peft_config["default"].to_dict() for name, m in parts.items()}
        return lambda output_dir: self.pipeline_class.save_lora_weights(output_dir, **layers, **metadata,
                                                                        safe_serialization=True)

    def vae_dtype(self, c: Components, weight_dtype: torch.dtype) -> torch.dtype:
        """A VAE that overflows in fp16 (its config says force_upcast) stays fp32 under fp16, unless a separate
        VAE (such as SDXL's fp16-fix one) is given."""
        upcast = self.upcast_vae_in_fp16 and getattr(c.vae.config, "force_upcast", False)
        if weight_dtype == torch.float16 and c.source.vae is None and upcast:
            return torch.float32
        return weight_dtype
