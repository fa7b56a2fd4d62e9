"""Prompt templates (the paper's and the domain style) and their check, shared by the config
(which validates them before a run) and the silos (which fill them in)."""

from __future__ import annotations

import string

PAPER_TEMPLATE = "{label}, real world images, high resolution"
DOMAIN_TEMPLATE = "{label}, {style} with only one object in the picture"
DOMAIN_INSTANCE_TEMPLATE = "{label}, {style}, {caption}, with only one object in the picture"
INSTANCE_TEMPLATE = "{label}, {caption}, real world images, high resolution."

CLASS_FIELDS = frozenset({"label", "style"})
INSTANCE_FIELDS = frozenset({"label", "caption", "style"})


def class_prompt(template: str, label_name: str, style: str = "") -> str:
    """A class-level prompt, as silos send it and as the server checks it."""
    return template.format(label=label_name, style=style)


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_template(template: str, allowed: frozenset[str]) -> str:
    """Return the template, or raise naming the placeholders it may use."""
    fields = template_fields(template)
    if "label" not in fields or not fields <= allowed:
        raise ValueError(
            f"prompt template {template!r} uses {sorted(fields)}; it must use {{label}} and "
            f"may use only {sorted('{' + f + '}' for f in allowed)}"
        )
    return template
