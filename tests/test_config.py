"""``OrthoRegConfig`` as a command line (``HfArgumentParser``), as Python, and its layer-selection forms."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser

from orthoreg import OrthoRegConfig
from orthoreg.config import parse_layer_selection


def _parse(argv: list[str]) -> OrthoRegConfig:
    (config,) = HfArgumentParser(OrthoRegConfig).parse_args_into_dataclasses(args=argv)
    return config


def test_a_command_line_parses_into_the_config():
    config = _parse(["--layers", "1,3", "--proj_weight", "0.5", "--cov-weight", "2e-3", "--anchor", "paired",
                     "--mask", "labels", "--gather", "--warmup_steps", "4", "--on_nonfinite", "skip"])
    assert config == OrthoRegConfig(layers=[1, 3], proj_weight=0.5, cov_weight=2e-3, anchor="paired", mask="labels",
                                    gather=True, warmup_steps=4, on_nonfinite="skip")


@pytest.mark.parametrize("text,parsed", [
    ("1", 1), ("-1", -1), ("1,3", [1, 3]), ("[1, 3]", [1, 3]), ("middle_third", "middle_third"),
    ("2/3:", "2/3:"), ("0, last_third", [0, "last_third"]), ("0.25:0.5", "0.25:0.5"),
])
def test_layers_flag_takes_indices_and_selection_strings(text, parsed):
    assert _parse(["--layers", text]).layers == parsed


def test_defaults_without_flags_equal_the_dataclass_defaults():
    assert _parse([]) == OrthoRegConfig()


@pytest.mark.parametrize("argv,match", [
    (["--layers", "middle"], "unknown layer selection 'middle'"),
    (["--layers", "1,,3"], "empty entry"),
    (["--layers", "3/2:"], "0 <= a < b <= 1"),
])
def test_a_bad_layer_selection_names_the_forms(argv, match):
    with pytest.raises(ValueError, match=match):
        _parse(argv)


def test_closed_choices_are_enforced_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _parse(["--anchor", "mean"])
    err = capsys.readouterr().err
    assert "invalid choice: 'mean'" in err and "base_mean" in err


def test_every_field_has_a_help_text_and_the_help_lists_the_choices():
    for f in dataclasses.fields(OrthoRegConfig):
        assert f.metadata.get("help"), f"OrthoRegConfig.{f.name} has no help text"
    text = HfArgumentParser(OrthoRegConfig).format_help()
    assert "{absolute,base_mean,paired}" in text and "{attention,labels,prompt_end}" in text
    assert "middle_third" in text and "'1,3'" in text


def test_python_forms_keep_working():
    assert OrthoRegConfig(layers=[1, 2]).layers == [1, 2]
    assert OrthoRegConfig(layers=(0, -1)).layers == [0, -1]  # tuples become lists, as before
    assert OrthoRegConfig(layers=2).layers == 2
    assert OrthoRegConfig(layers="all").layers == "all"
    assert OrthoRegConfig.from_dict({"layers": "1,2", "proj_weight": 1}).layers == [1, 2]
    round_trip = OrthoRegConfig(layers=[0, 2], cov_weight=0.1, anchor="absolute")
    assert OrthoRegConfig.from_dict(round_trip.to_dict()) == round_trip


@pytest.mark.parametrize("value", [None, True, [], "", 1.5])
def test_layers_refuses_values_that_select_nothing_or_are_not_selections(value):
    with pytest.raises(ValueError, match="`layers`"):
        OrthoRegConfig(layers=value)


def test_parse_layer_selection_flattens_text_inside_lists():
    assert parse_layer_selection(["1,2", 3]) == [1, 2, 3]
