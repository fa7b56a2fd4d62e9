"""Prompts per domain (feature skew, e.g. DomainNet): each domain's style, template and negative
prompt, from a small YAML file or the built-in `domainnet` (the paper's setting).

The file maps each domain (the name of a `<domain>/` folder of an ImageFolder dataset) to what
its prompts differ by; each key is optional:

    clipart:
      style: a clipart                      # fills {style}
    quickdraw:
      style: a quickdraw sketch
      template: "{style} of {label}, with only one object in the picture"  # style first
      negative: colorful, painting          # the negative prompt of its synthetic images

A domain without a template takes the run's (`prompt-template`, or the paper's), one without a
negative takes `negative-prompt`. Only the server reads the file: it sends the silos the names,
styles and templates in its embed request, and keeps the negative prompts (it alone synthesizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from fgl_core.prompt_templates import CLASS_FIELDS, INSTANCE_FIELDS, check_template

# The paper's DomainNet setting (its Table 2): one style per domain in "{label}, {style} with
# only one object in the picture", and quickdraw with its style first and "colorful, painting"
# as the negative prompt. The wording of each style is this project's reading of the paper.
DOMAINNET = {
    "clipart": {"style": "a clipart"},
    "infograph": {"style": "an infograph"},
    "painting": {"style": "a painting"},
    "quickdraw": {
        "style": "a black and white quickdraw sketch",
        "template": "{style} of {label}, with only one object in the picture",
        "negative": "colorful, painting",
    },
    "real": {"style": "a real photo"},
    "sketch": {"style": "a pencil sketch"},
}
BUILT_IN = {"domainnet": DOMAINNET}
KEYS = ("style", "template", "negative")


class DomainPromptsError(ValueError):
    """A domain-prompts file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class DomainPrompt:
    name: str
    style: str
    template: str  # "" = the run's template
    negative: str  # "" = the run's negative prompt


def request_fields(domains: list[DomainPrompt]) -> dict[str, list[str]]:
    """What the silos need of the domains, as the embed request carries it (names, styles,
    templates; the negative prompts stay with the server)."""
    return {
        "domain_names": [d.name for d in domains],
        "domain_styles": [d.style for d in domains],
        "domain_templates": [d.template for d in domains],
    }


def load_domain_prompts(ref: str, prompt_mode: str) -> list[DomainPrompt]:
    """The domains of `ref` (a YAML file, or a built-in name), in the file's order, each checked:
    strings only, known keys only, templates that fit `prompt_mode`."""
    if ref in BUILT_IN:
        entries, where = BUILT_IN[ref], f"built-in {ref!r}"
    else:
        path, where = Path(ref), f"domain-prompts file {ref!r}"
        if not path.is_file():
            raise DomainPromptsError(
                f"{where} does not exist (give a YAML file or one of {sorted(BUILT_IN)})"
            )
        try:
            entries = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise DomainPromptsError(f"{where} is not YAML: {err}") from None
    if not isinstance(entries, dict) or not entries:
        raise DomainPromptsError(f"{where} should map domain names to their prompts")
    allowed = INSTANCE_FIELDS if prompt_mode == "instance" else CLASS_FIELDS
    domains = []
    for name, entry in entries.items():
        entry = {} if entry is None else entry
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise DomainPromptsError(f"{where}: entry {name!r} should map {KEYS} to strings")
        unknown = sorted(set(entry) - set(KEYS))
        if unknown or not all(isinstance(v, str) for v in entry.values()):
            raise DomainPromptsError(
                f"{where}: domain {name!r} has {entry!r}; its keys may be {', '.join(KEYS)}, "
                f"each a string"
            )
        template = entry.get("template", "")
        if template:
            if prompt_mode == "instance" and "caption" not in template:
                raise DomainPromptsError(
                    f"{where}: domain {name!r}: an instance-level template needs {{caption}}"
                )
            try:
                check_template(template, allowed)
            except ValueError as err:
                raise DomainPromptsError(f"{where}: domain {name!r}: {err}") from None
        domains.append(
            DomainPrompt(name, entry.get("style", ""), template, entry.get("negative", ""))
        )
    return domains
