"""The Config: flags derived from it, presets, and validation with one-line errors."""

import dataclasses
import json

import pytest

from resnet_jax.config import (
    IDENTITY_FIELDS,
    PRESETS,
    Config,
    identity,
    identity_diff,
    parse_config,
    validate,
)
from resnet_jax.errors import UserError


def test_defaults_are_the_chapters_run():
    config = parse_config([])
    assert (config.arch, config.dataset, config.image_size, config.batch_size,
            config.optimizer, config.learning_rate, config.epochs) == (
        "resnet18", "fashion_mnist", 96, 128, "sgd", 0.01, 10)
    assert config == Config()


def test_every_field_is_a_documented_flag(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in text
    assert "drops the last partial batch" in text


def test_preset_sets_defaults_and_explicit_flags_win():
    config = parse_config(["--preset=quick", "--epochs=5"])
    for key, value in PRESETS["quick"].items():
        if key != "epochs":
            assert getattr(config, key) == value
    assert config.epochs == 5 and config.preset == "quick"


@pytest.mark.parametrize("text, value", [("", True), ("=true", True), ("=0", False),
                                         ("=no", False)])
def test_boolean_flags(text, value):
    assert parse_config([f"--augment{text}"] if text != "" else ["--augment"]).augment is value


@pytest.mark.parametrize("argv, message", [
    (["--epochs=ten"], "--epochs expects int, got 'ten'"),
    (["--augment=maybe"], "expected true or false, got 'maybe'"),
    (["--preset=fast"], "unknown --preset 'fast'; valid: quick"),
    (["--no_such_flag=1"], "unrecognized arguments: --no_such_flag=1"),
])
def test_bad_flags_are_one_line_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as excinfo:
        parse_config(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("changes, message", [
    ({"arch": "resnet19"}, "unknown --arch 'resnet19'"),
    ({"dataset": "imagenet"}, "unknown --dataset 'imagenet'"),
    ({"optimizer": "lion"}, "unknown --optimizer 'lion'; valid: sgd, momentum, nesterov, adamw"),
    ({"schedule": "step"}, "unknown --schedule 'step'; valid: constant, cosine"),
    ({"precision": "fp8"}, "unknown --precision 'fp8'; valid: fp32, bf16"),
    ({"grouped_conv": "fast"}, "unknown --grouped_conv 'fast'; valid: auto, native, split"),
    ({"seed": -1}, "--seed must be in [0, 2147483647], got -1"),
    ({"seed": 2**31}, "--seed must be in [0, 2147483647], got 2147483648"),
    ({"stem_conv": "fft"}, "unknown --stem_conv 'fft'; valid: auto, direct, space_to_depth"),
    ({"epochs": 0}, "--epochs must be positive, got 0"),
    ({"batch_size": -1}, "--batch_size must be positive, got -1"),
    ({"learning_rate": 0.0}, "--learning_rate must be positive, got 0.0"),
    ({"max_steps": 0}, "--max_steps must be positive, got 0"),
    ({"eval_examples": 0}, "--eval_examples must be positive, got 0"),
    ({"label_smoothing": 1.0}, "--label_smoothing must be in [0, 1), got 1.0"),
    ({"random_erasing": 1.5}, "--random_erasing must be in [0, 1], got 1.5"),
    ({"schedule": "cosine", "warmup_epochs": 10}, "--warmup_epochs must be smaller"),
    ({"learning_rate": float("inf")}, "--learning_rate must be a finite number, got inf"),
    ({"weight_decay": float("nan")}, "--weight_decay must be a finite number, got nan"),
    ({"warmup_epochs": float("nan")}, "--warmup_epochs must be a finite number, got nan"),
    ({"momentum": 1.0}, "--momentum must be in [0, 1), got 1.0"),
    ({"workdir": ""}, "--workdir is empty; give a path"),
    ({"data_dir": ""}, "--data_dir is empty; give a path"),
])
def test_validate_rejects_bad_values(changes, message):
    with pytest.raises(UserError, match=None) as excinfo:
        validate(Config().replace(**changes))
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_identity_fields_exist():
    names = {f.name for f in dataclasses.fields(Config)}
    assert set(IDENTITY_FIELDS) <= names
    assert "epochs" not in IDENTITY_FIELDS and "max_steps" not in IDENTITY_FIELDS


def test_cosine_runs_cannot_be_extended_but_constant_ones_can():
    # The cosine schedule's length is `epochs`: resuming with more epochs would silently change
    # the learning rate of steps already planned, so epochs is part of such a run's identity.
    assert "epochs" in identity(Config(schedule="cosine"))
    assert "epochs" not in identity(Config())
    assert identity(Config(cardinality=8))["cardinality"] == 8


def test_identity_diff_reads_a_missing_field_as_its_default():
    saved = json.loads(Config(seed=3).to_json())
    del saved["random_erasing"]  # a workdir written before the field existed
    assert identity_diff(identity(Config(seed=3)), saved) == []
    assert identity_diff(identity(Config(seed=3, random_erasing=0.5)), saved) == [
        "random_erasing: 0.0 -> 0.5"]
    assert identity_diff(identity(Config(seed=4)), saved) == ["seed: 3 -> 4"]
