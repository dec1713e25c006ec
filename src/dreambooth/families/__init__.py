"""Model families by name; the names are the `--family` choices. A new family is one new module here that
registers itself (the registry refuses a duplicate name or a family that leaves a hook of `ModelFamily` unfilled)."""

from __future__ import annotations

from ..errors import ModelError
from ..objectives import Denoise
from ..registry import Registry
from .base import Components, ModelFamily, ModelSource, model_identity, read_model_index

FAMILIES: Registry[type[ModelFamily]] = Registry("model family", plugins="dreambooth.families")  # + plug-ins'
register = FAMILIES.register()


def _reading(class_name: str) -> ModelFamily | None:
    """The family that reads pipelines of this class, if any."""
    return next((cls() for cls in FAMILIES.values() if class_name in cls.pipeline_classes), None)


def get_family(source: ModelSource, name: str = "auto") -> ModelFamily:
    """The family named, or the one whose pipeline class matches the model's model_index.json."""
    index = read_model_index(source)
    class_name = index.get("_class_name", "?")
    family = FAMILIES[name]() if name != "auto" else _reading(class_name)
    if family is not None:
        family.check_source(source)
        return family
    supported = ", ".join(c for cls in FAMILIES.values() for c in cls.pipeline_classes)
    raise ModelError(f"model {source.name_or_path} is a {class_name}, which is not supported; "
                     f"supported pipelines: {supported}")


def family_of(pipe) -> ModelFamily:
    """The family of a loaded pipeline."""
    name = type(pipe).__name__
    family = _reading(name)
    if family is None:
        raise ModelError(f"{name} is not a pipeline of a supported family")
    return family


from . import flux, flux2, krea2, qwen_image, sd, sd3, sdxl, z_image  # noqa: E402,F401  (each registers itself)

__all__ = ["FAMILIES", "Components", "Denoise", "ModelFamily", "ModelSource", "family_of", "get_family",
           "model_identity", "register"]
