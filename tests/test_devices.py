"""What only a GPU would show, caught on the CPU. The suite runs with DREAMBOOTH_GUARD_PARKED=1 (conftest): a module
the run promises not to use while it trains (a frozen text encoder whose output is cached) refuses to run, so a call
that on a GPU would mix host and GPU tensors fails here too. Every family, with and without prior preservation, with
captions, a trained text encoder, the base model's target (offloaded), EMA and LoRA; and the dtypes a GPU would use."""

from __future__ import annotations

import pytest
import torch

import dreambooth
from conftest import T5_TOKENS
from dreambooth.devices import GUARD_ENV, ParkedModuleCalled, cast_as_loaded, park, unparked
from dreambooth.families import FAMILIES, ModelSource, get_family
from test_families import NO_PRIOR

COMBINATIONS = {
    # a trained CLIP encodes only the prompts of each batch: T5's rows must come from the cache (the T5 bug)
    "no-prior-text-encoder": dict(**NO_PRIOR, train_text_encoder=True),
    "captions-lora-ema-text-encoder": dict(caption_extension=".txt", use_lora=True, rank=4, learning_rate=1e-3,
                                           train_text_encoder=True, use_ema=True,
                                           validation_prompt="a photo of zwx dog", validation_steps=1,
                                           num_validation_images=1, validation_inference_steps=1),
    "base-model-offloaded-text-encoder": dict(prior_target="base_model", offload_base_model=True,
                                              train_text_encoder=True, class_data_dir=None),
}


def test_the_suite_runs_guarded():
    import os

    assert os.environ.get(GUARD_ENV) == "1"


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_no_parked_module_runs_while_training(family_args, tiny, instance_dir, tmp_path, combination):
    (instance_dir / "img0.txt").write_text("a photo of zwx dog on a red rug")  # one caption differs from the rest
    # (a family whose text encoder is never trained, Flux.2 klein's or Z-Image's language model, refuses the flag)
    trains = bool(FAMILIES[tiny[0]].trained_text_encoders)
    args = family_args(max_train_steps=2, train_batch_size=2,
                       **{**COMBINATIONS[combination], "train_text_encoder": trains})
    summary = dreambooth.train(args)
    assert summary["steps"] == 2


def test_a_parked_module_refuses_to_run_until_unparked():
    layer = torch.nn.Linear(2, 2)
    park(layer)
    with pytest.raises(ParkedModuleCalled):
        layer(torch.zeros(1, 2))
    with unparked([layer], "cpu"):
        layer(torch.zeros(1, 2))
    with pytest.raises(ParkedModuleCalled):  # guarded again
        layer(torch.zeros(1, 2))


def test_t5_rows_are_served_from_the_cache_for_any_subset_of_the_prompts(tiny):
    name, model = tiny
    family = get_family(ModelSource(str(model)))
    if getattr(family, "t5_part", None) is None:
        pytest.skip("no T5 in this family")
    c = family.load(ModelSource(str(model)))
    cfg = type("Cfg", (), {"max_sequence_length": T5_TOKENS})()
    prompts = ["a photo of zwx dog", "a photo of dog", "zwx dog on a rug"]
    ids = family.tokenize(c, prompts, cfg)
    with torch.no_grad():
        everything = family.encode(c, ids, cfg)
    park(c.text_encoders[family.t5_part])
    with torch.no_grad():  # the last two prompts, reversed: T5 must not run (it is parked)
        some = family.encode(c, {k: v[[2, 1]] for k, v in ids.items()}, cfg)
    for key in everything:  # T5's rows are the cached ones; CLIP reruns on a batch of 2 instead of 3, which may
        assert torch.allclose(some[key], everything[key][[2, 1]], atol=1e-6), key  # round differently (~1e-7)


def test_frozen_long_prompt_encoder_is_cast_under_fp16_as_loading_does(tiny):
    name, model = tiny
    if getattr(FAMILIES[name], "t5_part", None) is None:
        pytest.skip("no T5 in this family")
    c = get_family(ModelSource(str(model))).load(ModelSource(str(model)))
    part = FAMILIES[name].t5_part
    t5 = c.text_encoders[part]
    loaded = type(t5).from_pretrained(model, subfolder=part, dtype=torch.float16)
    cast_as_loaded(t5, "cpu", torch.float16)
    # every parameter and buffer in the dtype loading gives it: T5's `wo` layers fp32, a Qwen3 rotary embedding's
    # computed `inv_freq` fp32, the rest fp16
    expected = {n: t.dtype for n, t in [*loaded.named_parameters(), *loaded.named_buffers()]}
    assert {n: t.dtype for n, t in [*t5.named_parameters(), *t5.named_buffers()]} == expected
    if t5._keep_in_fp32_modules:  # transformers' T5 keeps its `wo` layers fp32 under fp16
        assert any(".wo." in n and d == torch.float32 for n, d in expected.items())
