"""Tiny random pipelines of every model family (SD, SDXL, SD3, Flux) and subject images, built in temp folders
with offline tokenizers (no downloads). `TINY` maps each registered family to its builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreambooth.toy.tokenizer import write_bpe_tokenizer

COMMON = ["a", "an", "the", "photo", "of", "dog", "cat", "on", "beach", "in", "red", "blue", "sks", "toy"]
RARE = ["zwx", "qek", "vyb", "jox", "fuh", "kiv", "pyz", "xaq"]


def write_tokenizer(folder: Path, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose words (COMMON, then RARE) are single tokens; rarer words get later ids."""
    return write_bpe_tokenizer(folder, COMMON, RARE, max_length)


def make_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0, text_act: str = "quick_gelu") -> Path:
    """Save a ~1M-parameter SD-architecture pipeline (64 px images, 8x8x4 latents) to `folder`; text_act="gelu"
    gives an SD 2.x-style (OpenCLIP) text encoder."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder.parent / f"{folder.name}-tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=32, hidden_act=text_act,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64,
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Save a tiny SDXL-architecture pipeline: two text encoders (the second with a projection), a UNet with
    text_time added conditioning, 64 px images."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder.parent / f"{folder.name}-tok")
    tokenizer_2 = write_tokenizer(folder.parent / f"{folder.name}-tok2")

    def config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden, intermediate_size=37,
                              num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0,
                              eos_token_id=1, pad_token_id=1, projection_dim=32)

    # different widths, as in SDXL (768 / 1280): single-file loading tells the two encoders apart by width
    text_encoder, text_encoder_2 = CLIPTextModel(config(32)), CLIPTextModelWithProjection(config(48))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        transformer_layers_per_block=(1, 1),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64, scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_t5_tokenizer(folder: Path, max_length: int = 32):
    """A T5 (Unigram) tokenizer built offline: <pad>, </s>, <unk>, a whole piece for each test word and single
    letters for anything else, so every word tokenizes."""
    import string

    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [f"\u2581{w}" for w in COMMON + RARE]
    pieces += [f"\u2581{c}" for c in string.ascii_lowercase] + list(string.ascii_lowercase)
    vocab = [(p, 0.0 if i < 3 else -1.0 if i < 4 + len(COMMON + RARE) else -5.0)
             for i, p in enumerate(dict.fromkeys(pieces))]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def t5_encoder(vocab_size: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1))


def flow_vae(shift: float, scaling: float) -> AutoencoderKL:
    """SD3/Flux-style VAE: no quant convs, shift and scaling factors; 8x downsampling like the real ones."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, sample_size=64,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift, scaling_factor=scaling)


def make_tiny_sd3(folder: Path, seed: int = 0, with_t5: bool = True) -> Path:
    """A tiny SD3 pipeline: MMDiT (1 joint block, patch 2 over 8x8x4 latents), CLIP-L/G-like encoders with
    projections, T5 (or none: the pipeline zero-fills it), the flow-matching scheduler with SD3's shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder.parent / f"{folder.name}-tok")
    t5_tokenizer = write_t5_tokenizer(folder.parent / f"{folder.name}-t5tok") if with_t5 else None

    def clip(width: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()), hidden_size=width, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=32, hidden_act="gelu"))

    # CLIP-L and CLIP-G of different widths (768 / 1280 in SD3): single-file loading tells them apart by width;
    # their penultimate states side by side (32 + 48) fit inside T5's width (96), as 2048 fits 4096
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=96, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=flow_vae(0.0609, 1.5035), text_encoder=clip(32), tokenizer=tokenizer, text_encoder_2=clip(48),
        tokenizer_2=tokenizer, text_encoder_3=t5_encoder(len(t5_tokenizer), 96) if with_t5 else None,
        tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_flux(folder: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny Flux pipeline: 1 double + 1 single block over 2x2-packed 8x8x4 latents, CLIP-L-like pooled and T5
    conditioning, the guidance embedding of the dev models, dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder.parent / f"{folder.name}-tok")
    t5_tokenizer = write_t5_tokenizer(folder.parent / f"{folder.name}-t5tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=32))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=flow_vae(0.1159, 0.3611),
                        text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=t5_encoder(len(t5_tokenizer), 32), tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_images(folder: Path, n: int = 4, size: int = 72, seed: int = 0) -> Path:
    """n distinct RGB images of a 'subject': a coloured square on a varying background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.full((size, size + 8 * i, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        x, y = rng.integers(4, size // 2, 2)
        arr[y : y + size // 3, x : x + size // 3] = (220, 30, 30)
        Image.fromarray(arr).save(folder / f"subject_{i}.png")
    return folder


def make_tiny_dino(folder: Path, seed: int = 0) -> Path:
    """A random ViT (patch 16, 224 px input) saved like facebook/dino-vits16."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=16), add_pooling_layer=False).save_pretrained(folder)
    return folder


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random CLIP (text + vision + projections) with its tokenizer and PIL image processor, in one folder."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder, max_length=32)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=1, max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                           image_size=224, patch_size=32),
        projection_dim=16,
    )).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def make_tiny_lpips(path: Path, layout: str = "torchvision", seed: int = 0) -> Path:
    """Random AlexNet-LPIPS weights as one safetensors file, in torchvision+lpips keys or a whole lpips module's."""
    from safetensors.torch import save_file

    from dreambooth.evaluation.lpips import LPIPS

    torch.manual_seed(seed)
    state = {k: v.abs() if k.startswith("lin") else v for k, v in LPIPS().state_dict().items()}  # lpips lins are >= 0
    if layout == "lpips":
        slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
        state = {(f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}" if k.startswith("features")
                  else k): v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


QWEN_WORDS = COMMON + RARE + ["user", "assistant", "system"]
# A Qwen3-style chat template: the user turn, the assistant's opening, and the empty thinking block that
# enable_thinking=False adds (as Qwen3's own template does)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def byte_level_bpe(leading: tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE in which every test word is one token, after a space and at the start of a
    line; anything else goes by bytes. `leading`: pieces (a word after a space written with its "\u0120") made
    single tokens by merges ranked before all others, so no test word's merge splits them."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    starts = [*leading, *(s for word in QWEN_WORDS for s in ("\u0120" + word, word))]  # after a space, at a start
    for start in starts:
        pieces = list(start)
        while len(pieces) > 1:
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return vocab, merges


def write_qwen_tokenizer(folder: Path, max_length: int = 64, leading: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer like Qwen2/Qwen3's (every test word one token, anything else by bytes) with its
    chat special tokens and a chat template, built offline."""
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_level_bpe(leading)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def qwen3_encoder(vocab_size: int, layers: int = 2, causal_lm: bool = False, width: int = 32):
    """A tiny Qwen3 text encoder (the model alone, or with its LM head as Flux.2 klein ships it)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=width, intermediate_size=37, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def flux2_parts(guidance_embeds: bool) -> dict:
    """The tiny Flux.2 VAE (random batch-norm statistics, so the normalisation is exercised), transformer (1 double
    + 1 single block over 2x2-patchified latents, three width-16 text layers side by side) and dynamic-shift
    scheduler that klein and dev share."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=64)
    vae.bn.running_mean.normal_(0, 0.2)
    vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return {"vae": vae, "transformer": transformer, "scheduler": scheduler}


def qwen_image_vae():
    """Qwen-Image's video VAE, tiny (8x, 4 channels), with a per-channel latent mean and std that are not 0 and 1
    (so the standardisation is exercised); Krea 2 shares it."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, False, False], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                  latents_std=[1.5, 0.8, 2.0, 1.1])


def make_tiny_flux2_klein(folder: Path, seed: int = 0, distilled: bool = False) -> Path:
    """A tiny Flux.2 klein pipeline: a Qwen3 causal LM (28 layers, so the pipeline's hidden layers 9, 18 and 27
    exist) and the parts klein and dev share (`flux2_parts`)."""
    from diffusers import Flux2KleinPipeline

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(folder.parent / f"{folder.name}-tok")
    text_encoder = qwen3_encoder(len(tokenizer), layers=28, causal_lm=True, width=16)
    pipe = Flux2KleinPipeline(text_encoder=text_encoder, tokenizer=tokenizer, is_distilled=distilled,
                              **flux2_parts(guidance_embeds=False))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_z_image(folder: Path, seed: int = 0) -> Path:
    """A tiny Z-Image pipeline: a Qwen3 model (its penultimate states, padding dropped, condition the
    single-stream transformer: 1 block and 1 refiner of each kind over 2x2 patches), a Flux-style VAE with shift and
    scale, the static shift of the Turbo checkpoint."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(folder.parent / f"{folder.name}-tok")
    text_encoder = qwen3_encoder(len(tokenizer), layers=2)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                           axes_dims=[4, 6, 6])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=flow_vae(0.1159, 0.3611), text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# the words of QwenImagePipeline's system prompt: each one token, as in Qwen2.5's vocabulary, so that the 34
# tokens the pipeline drops are that system turn exactly
QWEN_IMAGE_WORDS = ("Describe", "assistant", *("\u0120" + w for w in (
    "image", "by", "detailing", "color", "shape", "size", "texture", "quantity", "text", "spatial", "relationships",
    "objects", "and", "background")))


def make_tiny_qwen_image(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen-Image pipeline: Qwen2.5-VL (2 text layers, a 1-block vision tower it never uses for prompts)
    whose last states condition 1 dual-stream block over 2x2-packed latents; the video-shaped VAE (8x, 4 channels)
    with per-channel latent mean and std (not 0 and 1, so the standardisation is exercised); the released
    checkpoints' exponential dynamic shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(folder.parent / f"{folder.name}-tok", leading=QWEN_IMAGE_WORDS)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                  fullatt_block_indexes=[0])
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False))
    vae = qwen_image_vae()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6))
    # the released scheduler also has shift_terminal=0.02, with which the pipeline samples NaN in a single step (the
    # stretch divides by zero); the tests sample in one step
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192,
                                                time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_krea2(folder: Path, seed: int = 0) -> Path:
    """A tiny Krea 2 pipeline: Qwen3-VL (4 text layers, 3 of them tapped; a 1-block vision tower it never uses for
    prompts) with a tokenizer that splits the template as Qwen's does (34 prefix and 5 suffix tokens, which the
    pipeline counts on), 1 transformer block with one layer-wise and one refiner text-fusion block; Qwen-Image's
    video VAE with per-channel mean and std; the dynamic shift of the Raw checkpoint."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLModel

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(folder.parent / f"{folder.name}-tok", leading=QWEN_IMAGE_WORDS)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                  deepstack_visual_indexes=[0], patch_size=4, num_position_embeddings=16)
    text_encoder = Qwen3VLModel(Qwen3VLConfig(text_config=text, vision_config=vision))
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
        text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2))
    vae = qwen_image_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=6400)
    pipe = Krea2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer, text_encoder_select_layers=(1, 2, 4))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# Mistral Small 3.1's chat template as Flux2Pipeline reads it: a system prompt, then the user turn (message contents
# as lists of text blocks, as the pipeline's format_input writes them)
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- set text = message['content'] if message['content'] is string else message['content'][0]['text'] %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}{%- endfor %}")


def make_tiny_flux2(folder: Path, seed: int = 0) -> Path:
    """A tiny Flux.2 [dev] pipeline: Mistral3 (31 text layers, so the pipeline's hidden layers 10, 20 and 30 exist,
    and a 1-block Pixtral vision tower it never uses for prompts) with a byte-level BPE tokenizer and Mistral's chat
    template (a tokenizer in place of the PixtralProcessor, which needs torchvision); the transformer with its
    guidance input; the Flux.2 VAE with random batch-norm statistics."""
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen2Tokenizer

    torch.manual_seed(seed)
    vocab, merges = byte_level_bpe()
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", model_max_length=64)
    # the pipeline's system prompt as one token (about 30 in Mistral's vocabulary), so that the tests' short
    # --max_sequence_length still holds the prompt after it
    tokenizer.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                                                                "[/SYSTEM_PROMPT]", "[IMG]", SYSTEM_MESSAGE]})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder.parent / f"{folder.name}-tok")
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=31,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                sliding_window=None, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                  image_size=16, patch_size=4)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1, vision_feature_layer=-1))
    pipe = Flux2Pipeline(text_encoder=text_encoder, tokenizer=tokenizer, **flux2_parts(guidance_embeds=True))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# every registered family's tiny pipeline: the family-agnostic tests run over this table
TINY = {"sd": make_tiny_sd, "sdxl": make_tiny_sdxl, "sd3": make_tiny_sd3, "flux": make_tiny_flux,
        "flux2_klein": make_tiny_flux2_klein, "z_image": make_tiny_z_image, "qwen_image": make_tiny_qwen_image,
        "flux2": make_tiny_flux2, "krea2": make_tiny_krea2}
