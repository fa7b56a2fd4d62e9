"""The silo's round-0 answer: prompts about its data, encoded with the generator's encoder."""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict

from fgl_client.captioning import Captioner
from fgl_client.prompts import class_prompts, instance_prompt
from fgl_client.silo import Silo
from fgl_client.text_encoding import (
    GeneratorClasses,
    OpenClipTextEncoder,
    TextEncoder,
    TransformersTextEncoder,
    XLTextEncoder,
)
from fgl_core.class_list import name_digests
from fgl_core.dp import privatize_together
from fgl_core.payload import (
    CHUNK_RECORD,
    PROBE_PROMPT,
    ChunkRequest,
    EmbeddingPayload,
    EmbedRequest,
    PayloadError,
    chunk_records,
)
from fgl_core.pretrained import (
    CLASS_CONDITIONAL,
    ModelRefError,
    generator_family,
    resolve_model_ref,
)
from fgl_core.prompt_rows import COLUMNS, PromptRows
from fgl_core.prompt_templates import INSTANCE_FIELDS, check_template
from fgl_core.seeds import derive_seed

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)  # one load per process; a deployed silo's process serves one run
def text_encoder(generator: str, cache_dir: str, device: str, spec: str = "") -> TextEncoder:
    """The generator's own text encoder, or (`spec` = "open_clip:<arch>:<checkpoint>") open_clip
    weights of the same function; the server's probe check tells whether they are."""
    if spec:
        return OpenClipTextEncoder.from_spec(spec, generator, cache_dir, torch.device(device))
    ref = resolve_model_ref(generator, "generator", cache_dir)
    family = generator_family(ref)
    if family == "StableDiffusionXLPipeline":
        return XLTextEncoder(generator, cache_dir, torch.device(device))
    if family == CLASS_CONDITIONAL:
        return GeneratorClasses(generator, cache_dir)
    return TransformersTextEncoder(generator, cache_dir, torch.device(device))


@functools.lru_cache(maxsize=2)
def captioner(ref: str, cache_dir: str, device: str, max_tokens: int = 30) -> Captioner:
    return Captioner(
        resolve_model_ref(ref, "captioner", cache_dir), torch.device(device), max_tokens
    )


def pick_images_to_caption(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Up to `per_class` images of each class, drawn with `seed`, in index order."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)


@dataclass(frozen=True)
class SiloPrompts:
    """The texts a silo encodes, with each one's label and domain (its index in the request's
    `domain-names`; 0 without domains), how many captions failed, and at instance level each
    text's training image (its index in the silo's training set)."""

    texts: list[str]
    labels: list[int]
    domains: list[int]
    captions_failed: int = 0
    images: list[int] | None = None


def image_domains(request: EmbedRequest, silo: Silo) -> np.ndarray:
    """Each training image's domain as the request numbers them (all 0 without domains)."""
    if not request.domain_names:
        return np.zeros(len(silo.train), np.int64)
    if silo.train.domains is None:
        raise PayloadError(
            f"the run gives prompts per domain ({request.domain_names}), but {silo.name}'s data "
            "has no domain level (<domain>/train/<class>/...)"
        )
    missing = [d for d in silo.domain_names if d not in request.domain_names]
    if missing:
        raise PayloadError(
            f"{silo.name} holds domains {missing} that the run's domain-prompts do not name "
            f"(it names {request.domain_names})"
        )
    numbering = np.asarray([request.domain_names.index(d) for d in silo.domain_names], np.int64)
    return numbering[silo.train.domains]


def silo_prompts(request: EmbedRequest, silo: Silo, captioner_fn=None) -> SiloPrompts:
    """Class level: one prompt per class present in each of the silo's domains (every class
    with secure histograms). Instance level: one per captioned image. Each in its domain's
    style and template. They never leave the silo (`fgl_privacy` recomputes them to measure what
    their embeddings give away)."""
    domains = image_domains(request, silo)

    def style_and_template(domain: int) -> tuple[str, str]:
        if not request.domain_names:
            return request.prompt_style, request.template
        return request.domain_styles[domain], request.domain_templates[domain] or request.template

    if request.prompt_mode in ("class", "learned"):  # learned: starts from the class prompts
        texts, labels, prompt_domains = [], [], []
        for domain in np.unique(domains).tolist():
            histogram = np.bincount(
                silo.train.labels[domains == domain], minlength=silo.num_classes
            )
            if request.secure_histograms:  # every class: the prompts say nothing of which it holds
                histogram = np.ones(silo.num_classes, np.int64)
            style, template = style_and_template(domain)
            more, more_labels = class_prompts(silo.class_names, histogram.tolist(), template, style)
            texts += more
            labels += more_labels
            prompt_domains += [domain] * len(more)
        return SiloPrompts(texts, labels, prompt_domains)
    check_template(request.template, INSTANCE_FIELDS)
    chosen = pick_images_to_caption(
        silo.train.labels,
        request.max_captions_per_class,
        derive_seed(request.seed, "caption-sample"),
    )
    captions = captioner_fn().caption(
        [silo.train.images[i] for i in chosen],
        request.caption_batch_size,
        f"{silo.name} captions",
    )
    images = [int(chosen[k]) for k in captions.kept]
    labels = [int(silo.train.labels[i]) for i in images]
    prompt_domains = [int(domains[i]) for i in images]
    texts = []
    for label, domain, caption in zip(labels, prompt_domains, captions.texts, strict=True):
        style, template = style_and_template(domain)
        texts.append(instance_prompt(silo.class_names[label], caption, template, style))
    return SiloPrompts(texts, labels, prompt_domains, len(captions.failed), images)


def build_payload(
    request: EmbedRequest, silo: Silo, encoder: TextEncoder, captioner_fn=None, learner=None
) -> EmbeddingPayload:
    """The silo's embedding payload: its prompts encoded (and noised if the request says so);
    for a class-conditional generator, each prompt's class id in the generator's label set;
    at `learned` level each class prompt's embedding learned on the silo's images of the class
    (`learner(embeds, labels)`, `fgl_client.learned.ClassEmbeddingLearner`)."""
    class_ids = None
    if isinstance(encoder, GeneratorClasses):
        if request.prompt_mode != "class" or request.embedding_clip:
            raise PayloadError(
                f"generator {request.generator!r} is class-conditional (DiT): it takes class "
                "ids, which no caption can refine and no noise can protect; this silo sends "
                "only class-level prompts without embedding-clip"
            )
        try:
            class_ids = np.asarray(encoder.class_ids(silo.class_names), np.int64)
        except ModelRefError as err:
            raise PayloadError(f"{silo.name}: {err}") from None
    prompts = silo_prompts(request, silo, captioner_fn)
    embeds, pooled = encoder.encode_with_pooled(prompts.texts)
    if request.prompt_mode == "learned":
        if learner is None:
            raise PayloadError("prompt-mode 'learned' needs the generator's denoiser to learn with")
        embeds = learner(embeds, prompts.labels)
    if request.embedding_clip:  # OS entropy: noise the server could recompute protects nothing
        noisy = privatize_together(
            [embeds.numpy(), pooled.numpy()],  # SDXL's pooled embedding is part of the release
            request.embedding_clip,
            request.embedding_noise,
            np.random.default_rng(),
        )
        embeds, pooled = (torch.from_numpy(part) for part in noisy)
    probe = encoder.encode([PROBE_PROMPT])[0]  # public: never noised
    log.info(
        "%s: %d %s-level embeddings of width %d (%d captions failed)",
        silo.name,
        len(prompts.texts),
        request.prompt_mode,
        encoder.width,
        prompts.captions_failed,
    )
    return EmbeddingPayload(
        embeds=embeds.to(torch.float16).numpy(),
        labels=np.asarray(prompts.labels, np.int64),
        weights=np.ones(len(prompts.labels), np.int64),
        domains=np.asarray(prompts.domains, np.int64),
        pooled=pooled.to(torch.float16).numpy(),
        class_ids=None if class_ids is None else class_ids[np.asarray(prompts.labels, np.int64)],
        probe=probe.to(torch.float16).numpy(),
        # with secure histograms the server gets only their sum, by SecAgg+
        label_histogram=(
            [] if request.secure_histograms else silo.train.label_histogram(silo.num_classes)
        ),
        captions_failed=prompts.captions_failed,
        class_name_digests=tuple(name_digests(silo.class_names)),
        num_train=len(silo.train),
    )


def embed_silo(
    request: EmbedRequest, silo: Silo, cache_dir: str | Path, device: str, learner=None
) -> EmbeddingPayload:
    encoder = text_encoder(request.generator, str(cache_dir), device, request.text_encoder)
    return build_payload(
        request,
        silo,
        encoder,
        lambda: captioner(request.captioner, str(cache_dir), device, request.caption_max_tokens),
        learner,
    )


# A payload of several chunks waits on the silo's disk for the server's chunk requests (a
# deployed silo answers each message in a fresh process): one per node, gone once every chunk
# was served (the requests come all at once, in any order)
KEPT_PAYLOADS = "embed-chunks"


def keep_for_chunks(payload: EmbeddingPayload, cache_dir: str | Path, node_id: int) -> None:
    """Keep a payload's rows until the server has fetched its chunks; replaces any kept before."""
    node_dir = Path(cache_dir) / KEPT_PAYLOADS / str(node_id)
    shutil.rmtree(node_dir, ignore_errors=True)
    (node_dir / payload.digest).mkdir(parents=True)
    for name, column in payload.columns().items():
        np.save(node_dir / payload.digest / f"{name}.npy", column)


def kept_chunk(request: ChunkRequest, cache_dir: str | Path, node_id: int) -> RecordDict:
    """Chunk `request.index` of the payload this node kept (its rows read from disk alone)."""
    kept = Path(cache_dir) / KEPT_PAYLOADS / str(node_id) / request.digest
    if not kept.is_dir():
        raise PayloadError(
            f"this silo keeps no payload {request.digest[:12]} (its chunks were all sent, or a "
            "later embed request replaced it): ask again with query.embed"
        )
    rows = PromptRows(**{
        name: np.load(kept / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in COLUMNS
    })  # fmt: skip
    content = chunk_records(rows, request.index, request.chunk_bytes, request.digest)
    (kept / f"served-{request.index}").touch()
    count = int(content[CHUNK_RECORD]["count"])  # type: ignore[arg-type]
    if all((kept / f"served-{k}").exists() for k in range(1, count)):
        shutil.rmtree(kept.parent, ignore_errors=True)
    return content
