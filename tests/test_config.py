"""Recipe parsing: YAML + overrides into TRL's dataclasses; unknown keys are errors that name them."""

import pytest

from align import config

CLASSES = (config.ModelArguments, config.DataArguments, config.SFTArguments, config.RunArguments)


def write(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\nlora_r: 4\nlearning_rate: 1.0e-4\nuse_peft: true\n"
                           "lora_target_modules: [q_proj, v_proj]\noutput_dir: o\nbf16: false\n")
    m, d, t, r = config.parse_recipe(CLASSES, ["--config", path, "--lora_r", "32", "--sft_adapter", "x"])
    assert m.model_name_or_path == "m" and m.lora_r == 32 and m.use_peft is True
    assert m.lora_target_modules == ["q_proj", "v_proj"]
    assert t.learning_rate == 1e-4 and t.assistant_only_loss is True
    assert r.sft_adapter == "x" and d.dataset_format == "auto"


def test_unknown_yaml_key_is_named(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\nlora_rank: 8\noutput_dir: o\n")
    with pytest.raises(config.ConfigError, match=r"recipe.yaml: unknown key 'lora_rank' \(did you mean .*'lora_r'"):
        config.parse_recipe(CLASSES, ["--config", path])


def test_unknown_cli_key_is_named(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\noutput_dir: o\n")
    with pytest.raises(config.ConfigError, match="command line: unknown key 'learning_rat'"):
        config.parse_recipe(CLASSES, ["--config", path, "--learning_rat", "1"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.parse_recipe(CLASSES, ["--config", str(tmp_path / "nope.yaml")])
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(config.ConfigError, match="YAML mapping"):
        config.parse_recipe(CLASSES, ["--config", path])
