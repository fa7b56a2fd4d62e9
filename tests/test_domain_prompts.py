"""Prompts per domain (feature skew): each domain's style and template on the silo, the server's
check against them, and each domain's negative prompt in synthesis."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fgl_client.embedding import build_payload, silo_prompts, text_encoder
from fgl_client.silo import load_silo
from fgl_core.config import ConfigError, RunConfig
from fgl_core.domain_prompts import DomainPromptsError, load_domain_prompts, request_fields
from fgl_core.payload import EmbedRequest, PayloadError
from fgl_server.embedding_round import payload_limits
from fgl_server.synthesis import ShardInputs, SynthesisEngine, SynthesisSettings
from fgl_server.validation import PayloadRejected, validate_payload
from tests.conftest import small_fgl_run
from tests.test_datasets import write_tree

CPU = torch.device("cpu")
DOMAINS_YAML = """
sketch:
  style: a pencil sketch
  negative: colorful, photo
photo:
  style: a photo
  template: "{style} of a {label}"
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    write_tree(root, ["photo", "sketch"], ["cat", "red_fox", "owl"], per_class=4)
    (root / "domains.yaml").write_text(DOMAINS_YAML)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fgl-cache"))


def config(tree, cache_dir, **overrides) -> RunConfig:
    values = {
        "dataset": str(tree),
        "image-size": 16,
        "cache-dir": cache_dir,
        "generator": "offline-tiny",
        "domain-prompts": str(tree / "domains.yaml"),
    }
    return RunConfig.from_flower({**values, **overrides})


def request_for(cfg: RunConfig) -> EmbedRequest:
    domains = load_domain_prompts(cfg.domain_prompts, cfg.prompt_mode)
    return EmbedRequest.from_config(cfg, **request_fields(domains))


def test_the_built_in_domainnet_setting_and_a_file_load_in_their_order(tree):
    domainnet = {d.name: d for d in load_domain_prompts("domainnet", "class")}
    assert sorted(domainnet) == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    quickdraw = domainnet["quickdraw"]
    assert quickdraw.negative == "colorful, painting" and quickdraw.template.startswith("{style}")
    assert all(d.style for d in domainnet.values())
    ours = load_domain_prompts(str(tree / "domains.yaml"), "class")
    assert [(d.name, d.style, d.template, d.negative) for d in ours] == [
        ("sketch", "a pencil sketch", "", "colorful, photo"),
        ("photo", "a photo", "{style} of a {label}", ""),
    ]


@pytest.mark.parametrize(
    ("text", "mode", "reason"),
    [
        ("sketch: {colour: red}", "class", r"domain 'sketch' has .*keys may be style"),
        ("sketch: {style: 3}", "class", "each a string"),
        ("- sketch\n- photo", "class", "should map domain names"),
        ("sketch: {template: 'a {thing}'}", "class", "must use {label}"),
        ("sketch: {template: '{label} drawn'}", "instance", "needs {caption}"),
        ("sketch: [unclosed", "class", "is not YAML"),
    ],
)
def test_a_bad_domain_prompts_file_is_named_with_its_entry(tmp_path, text, mode, reason):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DomainPromptsError, match=reason):
        load_domain_prompts(str(path), mode)
    with pytest.raises(DomainPromptsError, match="does not exist"):
        load_domain_prompts(str(tmp_path / "none.yaml"), mode)


def test_a_silo_prompts_each_domain_in_its_style_numbered_as_the_request_names_them(
    tree, cache_dir
):
    cfg = config(tree, cache_dir)
    silo = load_silo(cfg, {"partition-id": 0, "num-partitions": 1})
    assert silo.domain_names == ["photo", "sketch"]  # the request says sketch first
    prompts = silo_prompts(request_for(cfg), silo)
    assert sorted(zip(prompts.domains, prompts.texts, strict=True)) == [
        (0, f"{name}, a pencil sketch with only one object in the picture")
        for name in ("cat", "owl", "red fox")
    ] + [(1, f"a photo of a {name}") for name in ("cat", "owl", "red fox")]
    only_sketch = {"domain_names": ["sketch"], "domain_styles": ["x"], "domain_templates": [""]}
    missing = request_for(cfg).model_copy(update=only_sketch)
    with pytest.raises(PayloadError, match=r"holds domains \['photo'\] that the run's"):
        silo_prompts(missing, silo)


def test_the_server_checks_each_prompt_against_its_domains_style(tree, cache_dir):
    cfg = config(tree, cache_dir)
    settings = SynthesisSettings.defaults(generator="offline-tiny", steps=2, train_resolution=16)
    engine = SynthesisEngine.load(settings, cache_dir, CPU)
    domains = load_domain_prompts(cfg.domain_prompts, "class")
    limits = payload_limits(cfg, engine, ["cat", "owl", "red fox"], domains)
    silo = load_silo(cfg, {"partition-id": 0, "num-partitions": 1})
    payload = build_payload(request_for(cfg), silo, text_encoder("offline-tiny", cache_dir, "cpu"))
    validate_payload("node 1", payload, limits)
    swapped = dataclasses.replace(payload, domains=1 - payload.domains)  # a style passed off
    with pytest.raises(PayloadRejected, match=r"in domain '(sketch|photo)' is not this task's"):
        validate_payload("node 1", swapped, limits)
    beyond = dataclasses.replace(payload, domains=payload.domains + 1)
    with pytest.raises(PayloadRejected, match=r"domains in \[1, 2\]; the run's domains are 0..1"):
        validate_payload("node 1", beyond, limits)


def test_each_image_is_denoised_against_its_domains_negative_prompt(cache_dir):
    settings = SynthesisSettings.defaults(
        generator="offline-tiny",
        steps=2,
        guidance=3.0,
        train_resolution=16,
        domain_negatives=("", "colorful, painting"),
    )
    engine = SynthesisEngine.load(settings, cache_dir, CPU)
    assert engine.negatives.shape[0] == 2
    embeds = np.repeat(engine.encode(["a cat"]).numpy().astype(np.float16), 3, axis=0)
    images = engine.generate(ShardInputs.of(embeds, [5, 5, 5], domains=np.array([0, 1, 0])))
    assert np.array_equal(images[0], images[2])
    assert not np.array_equal(images[0], images[1])
    first_domain = engine.generate(ShardInputs.of(embeds[:1], [5]))  # no domains: the first
    assert np.array_equal(first_domain, images[:1])


def test_an_fgl_run_prompts_and_synthesizes_per_domain(tree, tmp_path):
    base = {**config(tree, str(tmp_path / "cache")).to_flower(), "partition": "domain"}
    results = small_fgl_run(base, tmp_path, "domains")
    assert results["embedding"]["rejected"] == {}
    assert results["embedding"]["embeddings-per-node"] == {"node 1": 3, "node 2": 3}
    assert results["synthesis"]["prompts"] == 6  # 3 classes x 2 domains, one silo each
    manifest = json.loads((Path(results["synthesis"]["store"]) / "manifest.json").read_text())
    assert manifest["domain-negative-prompts"] == ["colorful, photo", "low quality, low resolution"]
    with pytest.raises(ConfigError, match=r"the dataset's domains \['photo'\] have no entry"):
        (tree / "sketch-only.yaml").write_text("sketch: {style: a sketch}")
        small_fgl_run(
            base, tmp_path, "domains", **{"domain-prompts": str(tree / "sketch-only.yaml")}
        )
