"""Small randomly initialised stand-ins for the hub models, built by project code.

No machine here reaches a model hub, so offline runs and tests use models of the very same
classes as the real ones (a Stable Diffusion pipeline with UNet2DConditionModel, AutoencoderKL,
CLIPTextModel and a CLIP tokenizer with the real CLIP BPE vocabulary that open_clip ships; a
BLIP captioner), saved with `save_pretrained` into the cache directory and loaded back through
the same `from_pretrained` path as a hub id. Random weights draw noise: their images and
captions mean nothing, only the plumbing does.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import torch

OFFLINE_TINY = "offline-tiny"
OFFLINE_TINY_SDXL = "offline-tiny-sdxl"  # the SDXL family's stand-in: two encoders, pooled
OFFLINE_TINY_DIT = "offline-tiny-dit"  # the DiT family's: class-conditional, ImageNet labels
MARKER = "fgl-offline-model.json"
BUILD_VERSION = 1  # bump when a builder changes, so cached copies are rebuilt
TINY_TEXT_WIDTH = 32  # the tiny generator's text width = its UNet's cross-attention width

# CLIP's BPE: 256 byte tokens, their 256 word-final forms, 48,894 merges, 2 specials = 49,408.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408

# Stable Diffusion 2.1-base's scheduler, as published with the model.
SD21_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def write_clip_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """Write CLIP's vocab.json and merges.txt from the BPE file inside the open_clip package."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : CLIP_NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{bpe} gave {len(vocab)} tokens; CLIP has {CLIP_VOCAB_SIZE}")
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def clip_whole_words(count: int) -> list[str]:
    """The first `count` alphabetic whole words of CLIP's vocabulary, in vocabulary order."""
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, _ = write_clip_tokenizer_files(Path(scratch))
        clip_vocab = json.loads(vocab_file.read_text())
    return [t[:-4] for t in clip_vocab if t.endswith("</w>") and t[:-4].isalpha()][:count]


def clip_tokenizer(directory: Path):  # -> CLIPTokenizer
    """SD 2.x's tokenizer: CLIP BPE, 77 tokens, padded with "!" (id 0)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_tokenizer_files(directory)
    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="!", model_max_length=77)


def tiny_clip_text_config(width: int = TINY_TEXT_WIDTH, layers: int = 2):  # -> CLIPTextConfig
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=width,
        bos_token_id=0,  # SD 2.x's published config keeps these legacy ids
        eos_token_id=2,
        pad_token_id=1,
    )


def tiny_vae():  # -> AutoencoderKL
    """The stand-ins' VAE: 16 px images, 4 latent channels at 8 px."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )


def build_tiny_generator(directory: Path, seed: int = 0) -> Path:
    """A Stable Diffusion 2.x-shaped pipeline with random weights; 16 px images by default."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config())
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=TINY_TEXT_WIDTH,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = tiny_vae()
    assemble_pipeline(unet, vae, text_encoder).save_pretrained(directory)
    return directory


TINY_SDXL_POOLED = 32  # text_encoder_2's projection: the pooled embedding's width


def build_tiny_sdxl(directory: Path, seed: int = 0) -> Path:
    """A Stable Diffusion XL-shaped pipeline with random weights: two CLIP text encoders whose
    penultimate hidden states are concatenated (width 64) and the second's pooled projection
    (32) with the size conditioning in the UNet's added embedding; 16 px images."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    first = CLIPTextModel(tiny_clip_text_config())
    second = CLIPTextModelWithProjection(tiny_clip_text_config())
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=2 * TINY_TEXT_WIDTH,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TINY_SDXL_POOLED + 6 * time_dim,
        norm_num_groups=32,
    )
    vae = tiny_vae()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = clip_tokenizer(Path(scratch))
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=first,
        text_encoder_2=second,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    ).save_pretrained(directory)
    return directory


def build_tiny_dit(directory: Path, seed: int = 0) -> Path:
    """A DiT-shaped pipeline with random weights: a class-conditional `DiTTransformer2DModel`
    (adaLN-zero on a class embedding of ImageNet's 1000 classes plus the null class that
    guidance contrasts with, learned sigma) over an 8 px latent, 16 px images. Its `id2label`
    is ImageNet's class list as torchvision names it (the published DiT models list synonyms:
    "tench, Tinca tinca")."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    from torchvision.models import ResNet18_Weights

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(
        directory
    )
    # the published models keep their labels in model_index.json, which from_pretrained hands
    # to the pipeline; save_pretrained does not write them
    index = directory / "model_index.json"
    config = json.loads(index.read_text())
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    config["id2label"] = {str(i): name for i, name in enumerate(categories)}
    index.write_text(json.dumps(config, indent=2))
    return directory


def assemble_pipeline(unet, vae, text_encoder, scheduler=None):  # type: ignore[no-untyped-def]
    """A StableDiffusionPipeline from its parts, with SD 2.x's tokenizer and (by default) its
    scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = clip_tokenizer(Path(scratch))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or PNDMScheduler(**SD21_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def blip_captioner(
    directory: Path,
    words: list[str],
    width: int,
    layers: tuple[int, int],
    image_px: int,
    patch_px: int,
    seed: int,
    max_tokens: int = 64,
):  # -> (BlipForConditionalGeneration, BlipProcessor)
    """A BLIP captioner of transformers' own classes with random weights, its processor saved
    into `directory`: a WordPiece vocabulary of `words`, text decoder and ViT of `width` with
    `layers` (text, vision) layers, `image_px` inputs in `patch_px` patches, captions of at most
    `max_tokens` tokens."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    wordpiece = directory / "vocab.txt"
    wordpiece.write_text("\n".join(specials + words) + "\n")
    tokenizer = BertTokenizer(str(wordpiece), do_lower_case=True, bos_token="[DEC]")
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers[0],
        "num_attention_heads": 4,
        "max_position_embeddings": max_tokens,
        "encoder_hidden_size": width,
        "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    vision = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers[1],
        "num_attention_heads": 4,
        "image_size": image_px,
        "patch_size": patch_px,
    }
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    image_processor = BlipImageProcessor(size={"height": image_px, "width": image_px})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(directory)
    return model, processor


def build_tiny_captioner(directory: Path, seed: int = 0) -> Path:
    """A BLIP captioner (BlipForConditionalGeneration + BlipProcessor) with random weights.

    Its WordPiece vocabulary is the first whole words of CLIP's BPE vocabulary, so its
    (random) captions are made of real words.
    """
    words = sorted(set(clip_whole_words(2000)))
    model, _ = blip_captioner(directory, words, 32, (2, 2), 32, 8, seed)
    model.save_pretrained(directory)
    return directory


# Stable Diffusion 2.1-base's components as published (constructor arguments that differ from
# the library defaults): 865,910,724 + 83,653,863 + 340,387,840 parameters.
SD21_UNET = {
    "sample_size": 64,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
}
SD21_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}
SD21_TEXT_WIDTH, SD21_TEXT_LAYERS = 1024, 23
# arithmetic per 512 px image with guidance (two UNet passes a step), from the reference sheet
SD21_UNET_GUIDED_STEP_TFLOP = 1.6
SD21_VAE_DECODE_TFLOP = 2.5


def sd21_components() -> tuple:
    """SD 2.1-base's (UNet, VAE, text encoder) with random weights; build them under
    `torch.device("meta")` to count parameters without allocating them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = {
        **tiny_clip_text_config().to_dict(),
        "hidden_size": SD21_TEXT_WIDTH,
        "intermediate_size": 4 * SD21_TEXT_WIDTH,
        "num_hidden_layers": SD21_TEXT_LAYERS,
        "num_attention_heads": 16,
        "projection_dim": 512,
    }
    return (
        UNet2DConditionModel(**SD21_UNET),
        AutoencoderKL(**SD21_VAE),
        CLIPTextModel(CLIPTextConfig(**text)),
    )


def sd21_base_random(seed: int = 0):  # -> StableDiffusionPipeline
    """The full SD 2.1-base architecture with random weights, in memory, for speed benchmarks:
    the same parameters and arithmetic as the real model, none of its knowledge."""
    torch.manual_seed(seed)
    return assemble_pipeline(*sd21_components())


def offline_model_dir(cache_dir: Path, kind: str, seed: int = 0) -> Path:
    """Build the stand-in once into the cache; later calls (and other processes) reuse it."""
    builders = {
        "generator": build_tiny_generator,
        "generator-sdxl": build_tiny_sdxl,
        "generator-dit": build_tiny_dit,
        "captioner": build_tiny_captioner,
    }
    target = Path(cache_dir) / f"{OFFLINE_TINY}-{kind}-v{BUILD_VERSION}-seed{seed}"
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        builders[kind](scratch, seed)
        (scratch / MARKER).write_text(json.dumps({"kind": kind, "seed": seed}))
        try:
            scratch.rename(target)  # atomic: a concurrent builder either wins or finds it done
        except OSError:
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
