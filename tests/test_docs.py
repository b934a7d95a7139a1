"""The documentation is generated where it can be: the run config's reference page is the
fields' own descriptions, and the JSON Schema that editors read accepts the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from evomerge.cli import main
from evomerge.config import RunConfig
from evomerge.config_docs import SECTIONS, reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_the_config_reference_page_is_generated_from_the_fields():
    page = (REPO / "docs" / "config.md").read_text()
    assert page == reference_markdown(), "regenerate: evomerge config --reference > docs/config.md"
    undescribed = [
        f"{title}.{name}"
        for title, model in SECTIONS
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert not undescribed, undescribed


def test_the_schema_accepts_the_shipped_run_configs_and_refuses_a_typo(capsys):
    import jsonschema

    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == set(RunConfig.model_fields)
    for path in (REPO / "search_spaces" / "examples").glob("*run*.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    config = yaml.safe_load((REPO / "search_spaces" / "examples" / "demo_run.yaml").read_text())
    config["budjet"] = 3
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as exc:
        assert "budjet" in str(exc)
    else:
        raise AssertionError("a misspelled field passed the schema")
