"""Check every silo's round-0 reply once, at the boundary, before anything is synthesized.

`accept_payload` is the boundary: whatever bytes and records a silo sent, it returns a checked
`EmbeddingPayload` or raises `PayloadRejected` with a reason that names the node and says what
was expected and what arrived; the run goes on with the other silos. What it checks:
- chunks: before asking for more than chunk 0, that the payload it announces is within the
  limits and cut as the request said (`announced_chunks`); then that the chunks make the
  payload whose digest chunk 0 announced;
- structure: each record of its kind, each array of its wire dtype, shapes that account for the
  bytes (nothing is allocated beyond the bytes that arrived, which are capped);
- claims: histogram counts and weights are integers in [0, MAX_COUNT]; a silo sends prompts only
  for classes it holds, and its weights in a class add up to at most its count there (with
  `secure-histograms` a payload carries no histogram, and its sum comes by SecAgg+);
- the encoder: the silo's encoding of the public probe prompt matches the server's own;
- prompts: each class-level embedding matches the server's own encoding of that class's prompt
  (the template and class names are public; a learned one lies within `learned-max-distance`
  of it); each instance-level one matches it in the rows
  before the caption (the encoder is causal), so a silo cannot pass off other prompts or labels;
  with a class-conditional generator (DiT: no text, width 0) each prompt's class id is the one
  the generator's label set gives its class's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fgl_core.payload import (
    SECURE_HISTOGRAM_MAX_COUNT,
    SEQUENCE_LENGTH,
    ChunkInfo,
    EmbeddingPayload,
    PayloadError,
    chunk_count,
    row_bytes,
    rows_per_chunk,
)

MAX_COUNT = 10**9  # images a silo may claim per class: beyond any silo, far from int64's end


@dataclass(frozen=True)
class PayloadLimits:
    width: int  # the generator's cross-attention width
    num_classes: int
    probe: np.ndarray  # the server's own encoding of PROBE_PROMPT, (77, width) float32
    max_rows: int = 10_000
    max_bytes: int = 512 * 2**20  # a silo's whole payload, all its chunks
    chunk_bytes: int = 64 * 2**20  # the request's: rows per chunk follow from it and the width
    # ||silo - server|| / ||server||: fp16 weights or another library stay near 1e-3, another
    # encoder is off by order 1
    probe_tolerance: float = 0.02
    # how far a class-level embedding may be from the server's own encoding of its class's
    # prompt (relative L2): None = `probe_tolerance` (the same prompt, encoded by the same
    # encoder); `learned-max-distance` for learned embeddings
    learned_max_distance: float | None = None
    # the server's own encoding of each class's prompt in each domain, (domains, classes, 77,
    # width), one domain without `domain-prompts`; at instance level only the first
    # `class_prompt_rows[d][c]` rows (the template before the caption) count
    class_prompts: np.ndarray | None = None
    class_prompt_rows: tuple[tuple[int, ...], ...] | None = None
    class_names: tuple[str, ...] = ()
    domain_names: tuple[str, ...] = ()  # `domain-prompts`' domains; () = none
    # SDXL: the width of each prompt's pooled embedding (0 for SD 1.x/2.x), and at class level
    # the server's own pooled encoding of each class's prompt, (domains, classes, width)
    pooled_width: int = 0
    class_pooled: np.ndarray | None = None
    # SDXL at instance level: the server's pooled encoding of each class's prompt up to the
    # caption, (domains, classes, width): what bounds a caption prompt's pooled embedding
    prefix_pooled: np.ndarray | None = None
    # a class-conditional generator (DiT): each task class's id in its label set, (classes,);
    # None for generators conditioned on text, whose payloads carry class id -1
    class_ids: np.ndarray | None = None
    # the silos' noise defence (fgl_core.dp): embeddings arrive clipped to `embedding_clip`
    # (0: not at all) with Gaussian noise of this standard deviation per value
    embedding_clip: float = 0.0
    noise_std: float = 0.0
    # histograms by SecAgg+: a payload carries none, so no claim can be checked against one
    secure_histograms: bool = False


class PayloadRejected(ValueError):
    """A silo's reply that cannot be used; the message names the node and the reason."""


def announced_chunks(node: str, first: RecordDict, limits: PayloadLimits) -> ChunkInfo:
    """What chunk 0 announces, if the server should fetch it: no more rows and bytes than the
    limits allow, cut into exactly the chunks the request's chunk size gives at this width."""
    try:
        info = ChunkInfo.from_content(first)
    except PayloadError as err:
        raise PayloadRejected(f"{node}: {err}") from None
    size = info.rows * row_bytes(limits.width, limits.pooled_width)
    per_chunk = rows_per_chunk(limits.width, limits.chunk_bytes, limits.pooled_width)
    expected = chunk_count(info.rows, per_chunk)
    if info.rows > limits.max_rows:
        raise PayloadRejected(
            f"{node}: announces {info.rows} embeddings; at most {limits.max_rows} are accepted "
            "per silo (max-embeddings-per-silo)"
        )
    if size > limits.max_bytes:
        raise PayloadRejected(
            f"{node}: announces {info.rows} embeddings of width {limits.width}, "
            f"{size} bytes; at most {limits.max_bytes} are accepted per silo "
            "(max-payload-mib)"
        )
    if info.count != expected:
        raise PayloadRejected(
            f"{node}: announces {info.rows} embeddings in {info.count} chunks; chunks of "
            f"{limits.chunk_bytes} bytes at width {limits.width} make {expected}"
        )
    return info


def accept_payload(
    node: str, content: RecordDict | list[RecordDict], limits: PayloadLimits
) -> EmbeddingPayload:
    """The boundary: a checked payload, or `PayloadRejected` naming the node, whatever arrived
    (one reply, or a chunked payload's replies in order)."""
    pieces = content if isinstance(content, list) else [content]
    try:
        payload = EmbeddingPayload.from_chunks(pieces, max_bytes=limits.max_bytes)
        validate_payload(node, payload, limits)
        announced = ChunkInfo.from_content(pieces[0]).digest
        if payload.digest != announced:
            raise PayloadRejected(
                f"{node}: its {len(pieces)} chunk(s) do not make the payload it announced "
                f"(digest {payload.digest[:12]}, announced {announced[:12]})"
            )
    except PayloadRejected:
        raise
    except PayloadError as err:
        raise PayloadRejected(f"{node}: {err}") from None
    except Exception as err:  # whatever else a crafted reply provokes: still only a rejection
        raise PayloadRejected(f"{node}: unreadable payload ({type(err).__name__}: {err})") from None
    return payload


def validate_payload(node: str, payload: EmbeddingPayload, limits: PayloadLimits) -> None:
    """Raise `PayloadRejected` with the first problem found; return quietly when all is well."""

    def reject(reason: str) -> None:
        raise PayloadRejected(f"{node}: {reason}")

    embeds, labels, weights, probe = payload.embeds, payload.labels, payload.weights, payload.probe
    expected = f"(N, {SEQUENCE_LENGTH}, {limits.width})"
    if embeds.dtype != np.float16:
        reject(f"sent embeds of dtype {embeds.dtype}; the wire format is float16 {expected}")
    if embeds.ndim != 3 or embeds.shape[1] != SEQUENCE_LENGTH:
        reject(f"sent embeds of shape {embeds.shape}; the generator needs {expected}")
    if embeds.shape[2] != limits.width:
        reject(
            f"sent embeds of shape {embeds.shape}; the generator needs {expected} "
            "(a different text encoder?)"
        )
    n = embeds.shape[0]
    if n == 0:
        reject("sent no embeddings")
    domains, named = payload.domains, max(1, len(limits.domain_names))
    if domains.shape != (n,):
        reject(f"sent domains of shape {domains.shape} for {n} embeddings")
    if domains.min() < 0 or domains.max() >= named:
        reject(
            f"sent domains in [{domains.min()}, {domains.max()}]; the run's domains are "
            f"0..{named - 1}" + ("" if limits.domain_names else " (it has no domain-prompts)")
        )
    if n > limits.max_rows:
        reject(f"sent {n} embeddings; at most {limits.max_rows} are accepted per silo")
    if payload.nbytes > limits.max_bytes:
        reject(f"sent {payload.nbytes} bytes; at most {limits.max_bytes} are accepted per silo")
    if labels.shape != (n,) or weights.shape != (n,):
        reject(f"sent labels {labels.shape} and weights {weights.shape} for {n} embeddings")
    if not np.issubdtype(labels.dtype, np.integer) or not np.issubdtype(weights.dtype, np.integer):
        reject(f"sent labels of dtype {labels.dtype} and weights of {weights.dtype}; need integers")
    if labels.min() < 0 or labels.max() >= limits.num_classes:
        reject(
            f"sent labels in [{labels.min()}, {labels.max()}]; the task has classes "
            f"0..{limits.num_classes - 1}"
        )
    if weights.min() < 1 or weights.max() > MAX_COUNT:
        reject(
            f"sent weights in [{weights.min()}, {weights.max()}]; each must be in 1..{MAX_COUNT}"
        )
    check_class_ids(reject, payload.class_ids, labels, limits)
    if not np.isfinite(embeds).all():
        bad = int((~np.isfinite(embeds)).any(axis=(1, 2)).sum())
        reject(f"sent {bad} embeddings with NaN or infinite values")
    # no encoder gives zeros, and noise never does: nothing to synthesize from (a generator
    # that reads no text, DiT, takes embeddings of width 0 beside its class ids)
    empty = np.flatnonzero(~embeds.any(axis=(1, 2))) if limits.width else []
    if len(empty):
        i = int(empty[0])
        reject(f"sent {len(empty)} embeddings of zeros only (first: #{i}, class {labels[i]}): "
               "they carry no prompt")  # fmt: skip
    pooled = payload.pooled
    if pooled.shape != (n, limits.pooled_width) or not np.isfinite(pooled).all():
        reject(
            f"sent pooled embeddings of shape {pooled.shape}; the generator needs "
            f"({n}, {limits.pooled_width}) with finite values"
            + (" (an SDXL generator: its second text encoder's)" if limits.pooled_width else "")
        )
    histogram = payload.label_histogram
    if limits.secure_histograms:
        if histogram:
            reject(
                "sent its label histogram in the clear; this run sums the histograms by "
                "SecAgg+ (secure-histograms), so a silo sends none"
            )
        if (weights != 1).any():
            reject(
                f"sent weights in [{weights.min()}, {weights.max()}]; with secure-histograms "
                "every weight is 1 (a weight would count the images the SecAgg+ sum hides, and "
                "no histogram bounds it)"
            )
        most = SECURE_HISTOGRAM_MAX_COUNT * limits.num_classes
        if not 0 < payload.num_train <= most:
            reject(
                f"says it holds {payload.num_train} training images; with secure-histograms a "
                f"silo says how many (1 to {most}: at most {SECURE_HISTOGRAM_MAX_COUNT} per "
                "class), and the SecAgg+ sum must add up to what the silos say"
            )
    else:
        check_claims(reject, labels, weights, histogram, limits.num_classes)
    if limits.width:  # a generator that reads no text has no encoder to compare
        check_encoder(node, probe, limits)
    if limits.class_prompts is not None:
        check_class_prompts(node, embeds, labels, limits, domains)
    if limits.class_pooled is not None:
        check_class_prompts(node, pooled[:, None, :], labels, limits, domains, pooled=True)
    if limits.class_prompt_rows is not None and limits.class_prompts is not None:
        check_private_rows(reject, embeds, pooled, labels, domains, limits)


ROW_NORM_FACTOR = 2.0  # a private row's norm against the largest the encoder gives the server


def check_private_rows(
    reject: Callable[[str], None],
    embeds: np.ndarray,
    pooled: np.ndarray,
    labels: np.ndarray,
    domains: np.ndarray,
    limits: PayloadLimits,
) -> None:
    """Instance level: a caption's rows and (SDXL) its prompt's pooled embedding are private,
    so they are bounded rather than compared. Each caption row's L2 norm is at most twice the
    largest row norm of the server's own class-prompt encodings, and a pooled embedding's norm
    at most twice the largest of its class prefixes' pooled encodings (plus the noise's share,
    with `embedding-clip`). Without noise a pooled embedding also points the way its class's
    prefix does (cosine > 0: the caption prompt starts with that prefix) and is at least half as
    long as the shortest prefix encoding. Another class's pooled embedding stays inside these
    bounds: at instance level that cannot be told from a caption's."""
    z, sigma = NOISE_Z, limits.noise_std
    reference = limits.class_prompts.astype(np.float64)
    rows = np.linalg.norm(embeds.astype(np.float64), axis=2)  # (n, 77)
    caption = (
        np.arange(rows.shape[1])[None, :]
        >= np.asarray(limits.class_prompt_rows)[domains, labels][:, None]
    )
    most = ROW_NORM_FACTOR * float(np.linalg.norm(reference, axis=-1).max())
    most += sigma * (np.sqrt(embeds.shape[-1]) + z)
    over = np.flatnonzero((caption & (rows > most)).any(axis=1))
    if len(over):
        i = int(over[0])
        reject(
            f"sent caption rows of L2 norm up to {rows[i][caption[i]].max():.4g} in embedding "
            f"{i}; this generator's encoder gives at most {most:.4g} (twice its largest row, "
            "with the noise's share)"
        )
    if limits.prefix_pooled is None:
        return
    known = limits.prefix_pooled.astype(np.float64)
    mine = known[domains, labels]  # (n, P)
    got = pooled.astype(np.float64)
    norms, known_norms = np.linalg.norm(got, axis=1), np.linalg.norm(known, axis=-1)
    top = ROW_NORM_FACTOR * float(known_norms.max()) + sigma * (np.sqrt(got.shape[-1]) + z)
    low = 0.0 if limits.embedding_clip else float(known_norms.min()) / 2
    cosine = (got * mine).sum(axis=1) / np.maximum(norms * np.linalg.norm(mine, axis=1), 1e-12)
    bad = (norms > top) | (norms < low)
    if not limits.embedding_clip:
        bad |= cosine <= 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        reject(
            f"sent a pooled embedding for class {int(labels[i])} of L2 norm {norms[i]:.4g} at "
            f"cosine {cosine[i]:.3g} to its class prefix's; this generator's encoder gives "
            f"{low:.4g} to {top:.4g}" + ("" if limits.embedding_clip else ", at cosine above 0")
        )


def check_claims(
    reject: Callable[[str], None],
    labels: np.ndarray,
    weights: np.ndarray,
    histogram: list[int],
    num_classes: int,
) -> None:
    """A silo's histogram has a count per class in [0, MAX_COUNT], and its prompts' weights in
    a class add up to at most that count."""
    if len(histogram) != num_classes:
        reject(f"sent a label histogram of {len(histogram)} classes; the task has {num_classes}")
    if min(histogram) < 0 or max(histogram) > MAX_COUNT:
        reject(
            f"sent a label histogram with counts in [{min(histogram)}, {max(histogram)}]; "
            f"each must be in 0..{MAX_COUNT}"
        )
    claimed = [0] * num_classes  # Python ints: a sum that cannot wrap
    for label, weight in zip(labels.tolist(), weights.tolist(), strict=True):
        claimed[label] += weight
    for label, (weight, count) in enumerate(zip(claimed, histogram, strict=True)):
        if weight > count:
            reject(
                f"sent prompts of weight {weight} for class {label}, where its histogram "
                f"counts {count} images; the weights in a class may not exceed its count"
            )


def check_class_ids(
    reject: Callable[[str], None], class_ids: np.ndarray, labels: np.ndarray, limits: PayloadLimits
) -> None:
    """Each prompt's class id is its class's in a class-conditional generator's label set, and
    -1 (none) for a generator conditioned on text."""
    n = len(labels)
    if class_ids.shape != (n,):
        reject(f"sent class ids of shape {class_ids.shape} for {n} embeddings")
    if limits.class_ids is None:
        if (class_ids != -1).any():
            reject(
                f"sent class ids in [{class_ids.min()}, {class_ids.max()}]; this run's generator "
                "is conditioned on text, so every class id is -1"
            )
        return
    expected = limits.class_ids[labels]
    wrong = np.flatnonzero(class_ids != expected)
    if len(wrong):
        row, label = int(wrong[0]), int(labels[wrong[0]])
        name = limits.class_names[label] if label < len(limits.class_names) else str(label)
        reject(
            f"sent class id {class_ids[row]} for class {label} ({name!r}) in {len(wrong)} "
            f"prompt(s); the generator's label set draws that class as {expected[row]}"
        )


def check_encoder(node: str, probe: np.ndarray, limits: PayloadLimits) -> None:
    """The silo's encoding of the public probe prompt must match the server's own."""
    if probe.shape != limits.probe.shape or not np.isfinite(probe).all():
        raise PayloadRejected(
            f"{node}: sent a probe embedding of shape {probe.shape}; expected "
            f"{limits.probe.shape} with finite values"
        )
    reference = limits.probe.astype(np.float64)
    gap = float(np.linalg.norm(probe.astype(np.float64) - reference) / np.linalg.norm(reference))
    if gap > limits.probe_tolerance:
        raise PayloadRejected(
            f"{node}: its text encoder differs from the generator's: the probe prompt's "
            f"embedding is off by {gap:.3g} (relative L2), tolerance {limits.probe_tolerance}"
        )


def check_class_prompts(
    node: str,
    embeds: np.ndarray,
    labels: np.ndarray,
    limits: PayloadLimits,
    domains: np.ndarray | None = None,
    pooled: bool = False,
) -> None:
    """Every embedding is the server's own encoding of its class's prompt in its domain: whole
    at class level, its rows up to the caption at instance level (`pooled`: the (n, 1, width)
    pooled embeddings, class level only)."""
    domains = np.zeros_like(labels) if domains is None else domains
    known = limits.class_pooled[:, :, None, :] if pooled else limits.class_prompts
    assert known is not None
    reference = known[domains, labels].astype(np.float64)
    sequence = reference.shape[1]
    if limits.class_prompt_rows is not None and not pooled:
        rows = np.asarray(limits.class_prompt_rows)[domains, labels]
        keep = np.arange(SEQUENCE_LENGTH)[None, :] < rows[:, None]  # (n, 77)
    else:
        keep = np.ones((len(labels), sequence), bool)
    got = (embeds.astype(np.float64) * keep[..., None]).reshape(len(labels), -1)
    want = (reference * keep[..., None]).reshape(len(labels), -1)
    if limits.embedding_clip:
        # at class level the silo clipped exactly the server's own encoding (with SDXL, joined
        # with its pooled one: one release), so the clip's scale is known; at instance level
        # the private caption's rows count too, so it is fitted
        scale = None
        if limits.class_prompt_rows is None:
            joint = np.square(limits.class_prompts[domains, labels].astype(np.float64))
            joint = joint.reshape(len(labels), -1).sum(axis=1)
            if limits.class_pooled is not None:
                pooled_ref = limits.class_pooled[domains, labels].astype(np.float64)
                joint = joint + np.square(pooled_ref).sum(axis=1)
            scale = np.minimum(1.0, limits.embedding_clip / np.maximum(np.sqrt(joint), 1e-12))
        spacing = np.spacing(np.abs(embeds).astype(np.float16)).astype(np.float64)
        spacing = (spacing * keep[..., None]).reshape(len(labels), *embeds.shape[1:])
        problem = noise_test(got, want, keep, spacing, scale, limits)
        worst = next((i for i, p in enumerate(problem) if p), None)
        if worst is None:
            return
        detail = problem[worst]
    else:
        gaps = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        worst = int(np.argmax(gaps))
        learned = limits.learned_max_distance is not None and not pooled
        tolerance = limits.learned_max_distance if learned else limits.probe_tolerance
        if gaps[worst] <= tolerance:
            return
        bound = "learned-max-distance" if learned else "tolerance"
        detail = f"off by {gaps[worst]:.3g}, relative L2; {bound} {tolerance}"
    label = int(labels[worst])
    name = limits.class_names[label] if label < len(limits.class_names) else str(label)
    part = "class prompt" if limits.class_prompt_rows is None else "prompt before the caption"
    if limits.learned_max_distance is not None and not pooled:
        part = "class prompt, learned within its bound"
    part = "class prompt's pooled embedding" if pooled else part
    if limits.embedding_clip:
        part += f" plus noise of standard deviation {limits.noise_std:.3g}"
    domain = f" in domain {limits.domain_names[domains[worst]]!r}" if limits.domain_names else ""
    raise PayloadRejected(
        f"{node}: its embedding for class {label} ({name!r}){domain} is not this task's "
        f"{part} ({detail}): another prompt, another class list, another template, another "
        "domain's style, or noise of another size"
    )


NOISE_Z = 8.0  # each side of every noise test, in standard deviations (an honest silo's
# embedding fails one with a probability far below 1e-12)


def noise_test(
    got: np.ndarray,
    want: np.ndarray,
    keep: np.ndarray,
    spacing: np.ndarray,
    scale: np.ndarray | None,
    limits: PayloadLimits,
) -> list[str]:
    """Per embedding, why it is not `scale` x its reference plus Gaussian noise of the declared
    standard deviation ("" if it is): a two-sided test on the residual r = got - scale x want.

    - too little noise: in every token row the noise can be seen in (its standard deviation
      above float16's resolution there), r's energy must reach the chi-square's lower bound;
      an embedding of zeros, a prompt sent without noise or with less than declared fail it;
    - too much residual: r's energy may exceed the noise's expected energy only by the test's
      spread, the encoder tolerance (`probe_tolerance` x the reference) and float16 rounding;
      another prompt fails it where its difference is larger than the noise can hide;
    - at class level (the scale known), r's component along the reference must be the noise's:
      a prompt scaled down or another class's prompt fail it where the noise is small enough
      to tell (where it is not, the noise does what it is for: nothing can tell).

    `scale` None: fitted as the best multiple of the reference in [0, 1] (one degree of
    freedom less). `spacing`: float16's spacing at each received value, (n, rows, width).
    """
    sigma, z, tol = limits.noise_std, NOISE_Z, limits.probe_tolerance
    norm = np.linalg.norm(want, axis=1)
    dof = keep.sum(axis=1) * spacing.shape[-1]
    if scale is None:
        scale = np.clip((got * want).sum(axis=1) / np.maximum(norm**2, 1e-24), 0.0, 1.0)
        dof = dof - 1
    residual = got - scale[:, None] * want
    energy = np.square(residual).sum(axis=1)
    slack = tol * scale * norm  # the encoder's allowed difference, as a norm
    rounding = np.sqrt(np.square(spacing).reshape(len(got), -1).sum(axis=1)) / 2  # at most
    spread = np.sqrt(2.0 * sigma**4 * dof + 4.0 * sigma**2 * slack**2)
    high = sigma**2 * dof + z * spread + np.square(slack + rounding)
    along = (residual * want).sum(axis=1) / np.maximum(norm, 1e-12)
    rows = np.square(residual).reshape(spacing.shape).sum(axis=2)  # (n, rows)
    width = spacing.shape[-1]
    # Wilson-Hilferty: chi2(width) / width ~ normal after a cube root
    cube = 1.0 - 2.0 / (9.0 * width) - z * np.sqrt(2.0 / (9.0 * width))
    row_low = sigma**2 * width * max(cube, 0.0) ** 3
    visible = keep & (sigma**2 > np.square(spacing).mean(axis=2))  # rows float16 can show noise in
    seen = visible.sum(axis=1) * width  # the values float16 can show the noise in
    seen_energy = (rows * visible).sum(axis=1)
    low = sigma**2 * (seen - z * np.sqrt(2.0 * seen))
    problems = []
    for i in range(len(got)):
        thin = np.flatnonzero(visible[i] & (rows[i] < row_low))
        if sigma and len(thin):
            problems.append(
                f"token row {int(thin[0])} carries {np.sqrt(rows[i, thin[0]] / width):.3g} per "
                f"value where the noise alone gives {sigma:.3g}: too little noise"
            )
        elif sigma and seen[i] and seen_energy[i] < low[i]:
            problems.append(
                f"it carries {np.sqrt(seen_energy[i] / seen[i]):.3g} per value where the noise "
                f"alone gives {sigma:.3g}: too little noise"
            )
        elif energy[i] > high[i]:
            problems.append(
                f"its residual is {np.sqrt(energy[i] / max(dof[i], 1)):.3g} per value, more "
                f"than the noise's {sigma:.3g} and the tolerance explain"
            )
        elif (
            limits.class_prompt_rows is None and abs(along[i]) > slack[i] + rounding[i] + z * sigma
        ):
            problems.append(
                f"it is {along[i]:+.3g} along the class prompt from where the clip puts it; "
                f"the noise explains {z * sigma:.3g}"
            )
        else:
            problems.append("")
    return problems
