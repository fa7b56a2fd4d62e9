"""Prompts from a silo's labels: class level (one per class) or instance level (one per caption)."""

from __future__ import annotations

from fgl_core.prompt_templates import (
    CLASS_FIELDS,
    INSTANCE_TEMPLATE,
    check_template,
    class_prompt,
)


def class_prompts(
    class_names: list[str], label_histogram: list[int], template: str, style: str = ""
) -> tuple[list[str], list[int]]:
    """One prompt per class present in the silo, with its label."""
    check_template(template, CLASS_FIELDS)
    labels = [label for label, count in enumerate(label_histogram) if count > 0]
    prompts = [class_prompt(template, class_names[label], style) for label in labels]
    return prompts, labels


def instance_prompt(
    label_name: str, caption: str, template: str = INSTANCE_TEMPLATE, style: str = ""
) -> str:
    return template.format(label=label_name, caption=caption.strip(), style=style)
