"""Training config: presets round-trip through YAML, overrides are typed, mistakes are named."""
import dataclasses

import pytest
import torch

from train.config import SECTIONS, ConfigError, TrainConfig, all_keys, list_presets
from train.config_parse import field_docs

PRESETS = ["ms1mv3_r50", "glint360k_r100", "webface42m_r100_pfc02", "cpu_tiny"]


def test_presets_exist():
    assert set(PRESETS) <= set(list_presets())


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_yaml_round_trip(preset, tmp_path):
    cfg = TrainConfig.load(preset)
    text = cfg.to_yaml()
    assert TrainConfig.from_yaml(text) == cfg
    path = tmp_path / "run.yaml"
    path.write_text(text)
    again = TrainConfig.load(str(path))
    assert again == cfg
    assert again.to_yaml() == text


def test_published_settings_of_the_real_presets():
    ms1m, glint, wf42m = (TrainConfig.load(p) for p in PRESETS[:3])
    for cfg in (ms1m, glint, wf42m):
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.reference_batch, cfg.data.batch_size) == ("sgd", 0.1, 1024, 128)
        assert cfg.epochs == 20 and cfg.optim.momentum == 0.9
    assert (ms1m.loss.margin, ms1m.loss.margin_options["m"], ms1m.optim.weight_decay) == ("arcface", 0.5, 5e-4)
    assert (glint.loss.margin, glint.loss.margin_options["m"], glint.optim.weight_decay) == ("cosface", 0.4, 1e-4)
    assert wf42m.loss.sample_rate == 0.2 and ms1m.loss.sample_rate == 1.0
    tiny = TrainConfig.load("cpu_tiny")
    assert tiny.model.backbone == "iresnet_tiny" and tiny.loss.margin == "arcface"
    assert tiny.loss.sample_rate < 1.0 and 100 <= tiny.max_steps <= 1000


def test_overrides_are_coerced_to_the_field_types():
    cfg = TrainConfig.load("cpu_tiny", [
        "optim.lr=1e-3", "max_steps=12", "data.flip=false", "optim.betas=[0.8, 0.95]",
        "eval.bins=a.bin,b.bin", "loss.margin_options.m=0.35", "loss.head_seed=7", "optim.head_lr=none",
        "data.epoch_samples=1000.0",
    ])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.max_steps == 12 and isinstance(cfg.max_steps, int)
    assert cfg.data.flip is False
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.eval.bins == ["a.bin", "b.bin"]
    assert cfg.loss.margin_options == {"s": 32.0, "m": 0.35}  # one key changed, the other kept
    assert cfg.loss.head_seed == 7 and cfg.optim.head_lr is None
    assert cfg.data.epoch_samples == 1000


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("optim.wieght_decay=0", "unknown config key 'optim.wieght_decay' (did you mean 'optim.weight_decay'?)"),
    ("maxsteps=3", "unknown config key 'maxsteps' (did you mean 'max_steps'?)"),
    ("modle.backbone=x", "unknown config key 'modle.backbone' (did you mean 'model.backbone'?)"),
])
def test_unknown_key_in_override_names_the_closest(override, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.load("cpu_tiny", [override])
    assert str(err.value) == message


def test_unknown_key_in_yaml_names_the_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: 5\ndata: {loader: random_tensors, num_classes: 4}\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.load(str(path))
    assert str(err.value) == "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"


@pytest.mark.parametrize("override, fragment", [
    ("loss.sample_rate=1.5", "loss.sample_rate=1.5"),
    ("optim.name=lamb", "optim.name='lamb' is not one of sgd, adamw"),
    ("optim.lr=fast", "optim.lr=fast is not a valid float: give a number"),
    ("data.batch_size=2.5", "data.batch_size=2.5 is not a valid int"),
    ("parallel.zero_stage=4", "parallel.zero_stage=4 is not one of 0, 1, 2, 3"),
    ("precision.dtype=fp8", "precision.dtype='fp8'"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1 must be >= 0"),
    ("optim", "is not of the form section.key=value"),
    ("optim=3", "'optim' is a config section"),
])
def test_bad_values_name_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig.load("cpu_tiny", [override])
    assert fragment in str(err.value)


def test_missing_preset_lists_the_presets():
    with pytest.raises(ConfigError) as err:
        TrainConfig.load("ms1mv4_r50")
    assert "ms1mv4_r50" in str(err.value) and "ms1mv3_r50" in str(err.value)


def test_every_field_has_a_docstring():
    for cls in [TrainConfig, *SECTIONS.values()]:
        docs = field_docs(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        assert [n for n in names if not docs.get(n)] == [], cls.__name__
    assert len(all_keys()) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values()) + 7


def test_docs_config_reference_is_up_to_date():
    from train.config_docs import DOC, render
    text = DOC.read_text()
    assert render(text) == text, "run: python -m train.config_docs"


def test_random_margin_follows_the_run_seed_unless_given_one() -> None:
    from train.builders import build_head
    from train.distributed import DistContext
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), group=None, backend="none")
    cfg = TrainConfig.load("cpu_tiny", ["seed=7", "loss.margin=elasticface", "loss.margin_options={}"])
    assert build_head(cfg, ctx, num_classes=10).margin.seed == 7
    cfg = TrainConfig.load("cpu_tiny", ["seed=7", "loss.margin=elasticface", "loss.margin_options={seed: 3}"])
    assert build_head(cfg, ctx, num_classes=10).margin.seed == 3
    cfg = TrainConfig.load("cpu_tiny", ["seed=7", "loss.margin=elasticface", "loss.margin_options={}",
                                        "loss.head_seed=11"])
    assert build_head(cfg, ctx, num_classes=10).margin.seed == 11


# ---------------------------------------------------------------------- sections check themselves
def test_a_section_built_alone_names_the_key_as_set_spells_it():
    from train.config import DataConfig, LossConfig, OptimConfig
    with pytest.raises(ConfigError, match=r"^data\.batch_size=0 must be >= 1$"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"^loss\.sample_rate=0\.0 must be in \(0, 1\]"):
        LossConfig(sample_rate=0.0)
    with pytest.raises(ConfigError, match=r"optim\.schedule='cosin' is not one of poly, cosine, constant "
                                          r"\(did you mean 'cosine'\?\)"):
        OptimConfig(schedule="cosin")  # type: ignore[arg-type]
    # The same message through --set: one rule, one place.
    with pytest.raises(ConfigError, match=r"^data\.batch_size=0 must be >= 1$"):
        TrainConfig.load("cpu_tiny", ["data.batch_size=0"])


def test_validate_rechecks_a_section_edited_in_place():
    cfg = TrainConfig.load("cpu_tiny")
    cfg.validate()
    cfg.optim.grad_accum = 0
    with pytest.raises(ConfigError, match="optim.grad_accum=0"):
        cfg.validate()


def test_a_rule_spanning_sections_is_checked_on_the_whole_config():
    with pytest.raises(ConfigError, match="parallel.strategy=deepspeed .* checkpoint.async_save"):
        TrainConfig.load("cpu_tiny", ["parallel.strategy=deepspeed", "checkpoint.async_save=true"])
    from train.config import CheckpointConfig, ParallelConfig
    ParallelConfig(strategy="deepspeed")  # each section alone is fine
    CheckpointConfig(async_save=True)


def test_choices_are_literal_types_that_set_and_the_docs_read():
    import typing

    from data_pipeline.loaders import KINDS
    from train.config import DataConfig
    from train.config_check import choices_of
    from train.config_docs import config_reference
    assert KINDS == choices_of(DataConfig, "loader") == typing.get_args(typing.get_type_hints(DataConfig)["loader"])
    cfg = TrainConfig.load("cpu_tiny", ["parallel.zero_stage=2"])
    assert cfg.parallel.zero_stage == 2 and isinstance(cfg.parallel.zero_stage, int)
    with pytest.raises(ConfigError, match=r"data.loader='webdatset' is not one of .* \(did you mean 'webdataset'\?\)"):
        TrainConfig.load("cpu_tiny", ["data.loader=webdatset"])
    assert "| `data.loader` | {" + ", ".join(KINDS) + "} |" in config_reference()


def test_loader_synthetic_is_a_deprecated_name_of_random_tensors(monkeypatch):
    from train import config_check
    monkeypatch.setattr(config_check, "_warned", set())
    sets = ["data.loader=synthetic", "data.manifest=", "data.num_classes=4", "data.num_samples=8"]
    deprecated = "data.loader=synthetic is deprecated: use data.loader=random_tensors"
    with pytest.warns(FutureWarning, match=deprecated) as seen:
        first = TrainConfig.load("cpu_tiny", sets)
        second = TrainConfig.load("cpu_tiny", sets)
    assert len([w for w in seen if issubclass(w.category, FutureWarning)]) == 1  # once per process
    assert first.data.loader == second.data.loader == "random_tensors"
    assert "loader: random_tensors" in first.to_yaml()


def test_config_check_does_not_import_the_config_module():
    import subprocess
    import sys
    code = "import sys, train.config_check; print('train.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert out.stdout.strip() == "False"
