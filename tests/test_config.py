"""Recipe loading, validation errors and `--set` overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.config import Recipe, list_recipes, load_recipe
from builder.errors import RecipeError


def test_bundled_recipes_load_and_validate() -> None:
    names = list_recipes()
    assert {"tiny", "llava15-7b"} <= set(names)
    assert all(names.values()), "every bundled recipe has a description"
    tiny = load_recipe("tiny")
    assert tiny.recipe.name == "tiny"
    assert tiny.model.id.startswith("builtin:")
    paper = load_recipe("llava15-7b")
    assert paper.model.id == "llava-hf/llava-1.5-7b-hf"
    assert paper.model.dtype == "bfloat16"
    # The paper's parameters (METHOD.md section 4).
    c = paper.classify
    assert (c.top_n, c.visual_threshold, c.visual_min_tokens, c.text_threshold, c.text_min_tokens, c.confidence) == (
        50, 2.0, 4, 3.0, 2, 0.8)
    assert paper.capture.hook == "act_fn"
    assert paper.text.source == "generate"
    assert paper.text.prompt == "Could you describe the image?"


def test_overrides_are_typed() -> None:
    r = load_recipe("tiny", ["classify.top_n=7", "classify.strict=false", "classify.visual_threshold=2.5",
                             "model.revision=abc123", "corpus.limit=5"])
    assert r.classify.top_n == 7 and isinstance(r.classify.top_n, int)
    assert r.classify.strict is False
    assert r.classify.visual_threshold == 2.5
    assert r.model.revision == "abc123"
    assert r.corpus.limit == 5


def test_recipe_is_immutable() -> None:
    r = load_recipe("tiny")
    with pytest.raises(Exception):
        r.classify.top_n = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, must_mention",
    [
        (["classify.nonsense=1"], ["classify.nonsense", "top_n"]),
        (["nosection.key=1"], ["nosection"]),
        (["classify.top_n=many"], ["classify.top_n", "many"]),
        (["classify.top_n=0"], ["classify.top_n"]),
        (["capture.hook=relu"], ["capture.hook", "act_fn", "down_proj_input"]),
        (["corpus.kind=s3"], ["corpus.kind"]),
        (["classify.text_min_tokens=20"], ["top_m"]),
        (["classify.tie_break=[visual,text]"], ["tie_break"]),
        (["novalue"], ["novalue"]),
    ],
)
def test_bad_values_give_one_line_errors(override: list[str], must_mention: list[str]) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe("tiny", override)
    message = str(info.value)
    assert "\n" not in message
    for word in must_mention:
        assert word in message


def test_user_recipe_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("recipe: {description: mine}\nclassify: {top_n: 3}\n")
    r = load_recipe(str(path))
    assert r.recipe.name == "mine"  # defaults to the file's stem
    assert r.classify.top_n == 3
    assert r.model == Recipe().model  # unspecified sections take their defaults


def test_missing_or_unknown_recipe(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(str(tmp_path / "absent.yaml"))
    with pytest.raises(RecipeError, match="tiny"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("classify: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(bad))


def test_every_config_field_is_documented() -> None:
    from pydantic import BaseModel

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
            else:
                assert field.description, f"recipe key {prefix}{name} has no docstring"

    walk(Recipe, "")
