"""The families table (llava_cli/base/families.py) against transformers' own registries: every row
complete, every model type the loader accepts has a row, and each row says what transformers says
about that model type (its class, processor, whether the processor needs a video processor, how
its image processor tiles). No checkpoint, no model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tiny_checkpoint import FAMILY_BUILDERS

from llava_cli.base.errors import ModelError
from llava_cli.base.families import (
    FAMILIES,
    MODEL_TYPES,
    Family,
    PromptStyle,
    Tiling,
    family_for,
)
from llava_cli.models.loader import read_config


def registry(name: str) -> dict:
    """One of transformers' model-type -> class-name tables, e.g. the image-text-to-text models."""
    from transformers.models.auto import (
        configuration_auto,
        image_processing_auto,
        modeling_auto,
        processing_auto,
    )

    tables = {
        "configs": configuration_auto.CONFIG_MAPPING_NAMES,
        "models": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        "processors": processing_auto.PROCESSOR_MAPPING_NAMES,
        "image processors": image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES,
    }
    return dict(tables[name])


def incomplete_fields(family: Family) -> list[str]:
    """The fields of `family` that are missing or of the wrong kind."""
    problems = [name for name in ("model_type", "label", "model_class", "processor_class") if not getattr(family, name)]
    problems += [
        name for name in ("processor_needs_torchvision", "takes_videos") if not isinstance(getattr(family, name), bool)
    ]
    if not isinstance(family.prompt_style, PromptStyle):
        problems.append("prompt_style")
    if not isinstance(family.tiling, Tiling):
        problems.append("tiling")
    if family.text_models is not None and not (family.text_models and all(family.text_models)):
        problems.append("text_models")
    if family.example.count("/") != 1:
        problems.append("example")
    return problems


def test_incomplete_fields_looks_at_every_field():
    checked = {
        "model_type",
        "text_models",
        "label",
        "model_class",
        "processor_class",
        "processor_needs_torchvision",
        "prompt_style",
        "tiling",
        "example",
        "takes_videos",
    }
    assert {field.name for field in dataclasses.fields(Family)} == checked, (
        "a new field needs a check in incomplete_fields"
    )


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.label)
def test_each_row_is_complete(family):
    assert incomplete_fields(family) == []


def test_an_incomplete_row_is_caught():
    row = FAMILIES[0]
    assert incomplete_fields(dataclasses.replace(row, model_class="", tiling="anyres", example="")) == [
        "model_class",
        "tiling",
        "example",
    ]


def test_labels_are_unique_and_each_has_a_tiny_checkpoint_builder():
    labels = [family.label for family in FAMILIES]
    assert len(set(labels)) == len(labels)
    assert set(FAMILY_BUILDERS) == set(labels)


def test_no_two_rows_claim_the_same_checkpoint():
    for model_type in MODEL_TYPES:
        rows = [family for family in FAMILIES if family.model_type == model_type]
        if any(family.text_models is None for family in rows):
            assert len(rows) == 1, model_type
        else:
            claimed = [text_model for family in rows for text_model in family.text_models]
            assert len(set(claimed)) == len(claimed), model_type


def test_every_model_type_the_loader_accepts_has_a_row_matching_transformers(tmp_path: Path):
    """Every config.json model_type transformers knows: the loader refuses it, or it has a row whose
    class and processor are the ones transformers registers for that model type."""
    models, processors, image_processors = registry("models"), registry("processors"), registry("image processors")
    accepted = []
    for model_type in registry("configs"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
        try:
            config = read_config("m", tmp_path)
        except ModelError:
            continue
        accepted.append(model_type)
        family = family_for(config)
        assert incomplete_fields(family) == [], model_type
        assert (family.model_type, family.model_class, family.processor_class) == (
            model_type,
            models[model_type],
            processors[model_type],
        )
        assert family.processor_needs_torchvision == needs_video_processor(processors[model_type]), model_type
        assert family.takes_videos == needs_video_processor(processors[model_type]), model_type
        assert family.tiling is tiling_of(image_processors[model_type]["pil"]), model_type
    assert accepted and sorted(accepted) == sorted(MODEL_TYPES)


def needs_video_processor(processor_class: str) -> bool:
    import transformers

    return "video_processor" in getattr(transformers, processor_class).get_attributes()


def tiling_of(image_processor_class: str) -> Tiling:
    """What the image processor's outputs say: a per-prompt image count, per-image sizes, or neither."""
    import transformers

    outputs = getattr(transformers, image_processor_class).model_input_names
    if "batch_num_images" in outputs:
        return Tiling.ANYRES_LONE_IMAGE
    return Tiling.ANYRES if "image_sizes" in outputs else Tiling.FIXED


@pytest.mark.parametrize(
    "text_config, label, style",
    [
        (None, "llava-1.5", PromptStyle.LLAVA15),
        ({"model_type": "llama"}, "llava-1.5", PromptStyle.LLAVA15),
        ({"model_type": "mistral"}, "llava-1.5", PromptStyle.LLAVA15),  # bakLlava
        ({"model_type": "qwen2"}, "llava-interleave", PromptStyle.CHAT_TEMPLATE),
        ({"model_type": "gemma"}, "llava (gemma)", PromptStyle.CHAT_TEMPLATE),
        ("not a dict", "llava-1.5", PromptStyle.LLAVA15),  # a hostile config.json: LlavaConfig's default
        ({"model_type": ["qwen2"]}, "llava-1.5", PromptStyle.LLAVA15),
    ],
)
def test_a_llava_checkpoint_is_told_apart_by_its_text_model(text_config, label, style):
    config = {"model_type": "llava"} | ({"text_config": text_config} if text_config else {})
    family = family_for(config)
    assert (family.label, family.prompt_style, family.model_class, family.tiling) == (
        label,
        style,
        "LlavaForConditionalGeneration",
        Tiling.FIXED,
    )


@pytest.mark.parametrize("model_type", [["llava"], {"llava": 1}, None])
def test_a_model_type_that_is_not_a_string_is_refused_in_one_line(model_type, tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ModelError) as refused:
        read_config("m", tmp_path)
    assert str(refused.value) == (
        f"m is a {model_type!r} model, not a LLaVA checkpoint (model_type llava, llava_next, llava_onevision, "
        "llava_next_video); choose a LLaVA model such as llava-hf/llava-1.5-7b-hf"
    )
