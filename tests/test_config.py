"""The config tree: presets load, overrides apply, mistakes get clear errors."""
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byolfast.train.config import Config, ConfigError, check_world, load_config, to_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_load(preset):
    cfg = load_config(CONFIGS / preset)
    assert isinstance(cfg, Config)


def test_paper_preset_values():
    cfg = load_config(CONFIGS / "imagenet_r50_paper.yaml")
    t = cfg.train
    assert (t.batch_size, t.base_lr, t.weight_decay, t.warmup_epochs, t.base_tau, t.optimizer) == \
        (4096, 0.2, 1.5e-6, 10.0, 0.996, "lars")
    assert cfg.data.augment.view1.blur_p == 1.0 and cfg.data.augment.view2.blur_p == 0.1
    assert cfg.data.augment.view1.solarize_p == 0.0 and cfg.data.augment.view2.solarize_p == 0.2
    assert cfg.model.arch == "resnet50" and cfg.model.projector_hidden == 4096
    assert cfg.model.zero_init_residual


# The paper's hyper-parameters by schedule length (Grill et al., 2020): 1000 epochs in Sec. 3.3, 300 in Sec. 5.
PAPER_BY_EPOCHS = {1000: (0.2, 1.5e-6, 0.996), 300: (0.3, 1e-6, 0.99)}


@pytest.mark.parametrize("source", ["defaults", "imagenet_r50_paper.yaml", "small_gpu.yaml"])
def test_lr_wd_tau_agree_with_the_epochs(source):
    cfg = Config() if source == "defaults" else load_config(CONFIGS / source)
    t = cfg.train
    assert t.epochs in PAPER_BY_EPOCHS, f"{source}: no paper recipe for {t.epochs} epochs"
    assert (t.base_lr, t.weight_decay, t.base_tau) == PAPER_BY_EPOCHS[t.epochs]


def test_heads_and_blocks_start_as_the_reference():
    """No bias on the heads' last Linear; each residual block's last BN scale starts at zero (the default)."""
    from byolfast.model import build_byol
    from byolfast.model.config import ModelConfig
    m = build_byol(ModelConfig(arch="resnet18", projector_hidden=32, projector_out=8, predictor_hidden=32,
                               bn="local", channels_last=False), device_type="cpu")
    assert m.online["projector"][-1].bias is None and m.predictor[-1].bias is None
    for block in (m.encoder.layer1[0], m.encoder.layer4[1]):
        assert float(block.bn2.weight.detach().abs().sum()) == 0.0
        assert float(block.bn1.weight.detach().abs().sum()) > 0.0


def test_overrides_apply_with_types():
    cfg = load_config(None, ["train.batch_size=256", "model.arch=resnet18", "data.augment.view2.solarize_p=0.5",
                             "data.augment.view1.crop_scale=[0.2, 1.0]", "train.compile=true"])
    assert cfg.train.batch_size == 256 and cfg.model.arch == "resnet18" and cfg.train.compile is True
    assert cfg.data.augment.view2.solarize_p == 0.5 and cfg.data.augment.view1.crop_scale == (0.2, 1.0)
    assert cfg.data.augment.view2.blur_p == 0.1    # untouched siblings keep their defaults


@pytest.mark.parametrize("override, message", [
    ("train.batchsize=3", "unknown key.*train.batchsize.*valid keys: batch_size"),
    ("trian.batch_size=3", "unknown key.*trian.*valid keys: data, model, train"),
    ("train.batch_size=abc", "train.batch_size: expected an integer"),
    ("train.batch_size=3.5", "train.batch_size: expected an integer"),
    ("train.compile=1", "train.compile: expected true or false"),
    ("train.base_lr=-1", "train.base_lr=-1.*out of range"),
    ("train.base_tau=1.5", "train.base_tau=1.5.*out of range"),
    ("data.backend=tfrecord", "data.backend.*one of dali, ffcv, torch, synthetic"),
    ("data.augment.view1.blur_p=2", "view1.blur_p=2.*probability"),
    ("model.arch=vgg16", "model.arch.*resnet50"),
    ("train.batch_size", "not of the form section.key=value"),
    ("train.seed=-1", r"train.seed=-1.*out of range"),
    ("data.ffcv.batches_ahead=0", r"batches_ahead=0.*out of range"),
    ("data.dali.prefetch_queue_depth=0", r"prefetch_queue_depth=0.*out of range"),
    ("train.preempt_signals=[SIGTERM, SIGKILL]", "preempt_signals.*signals a process can catch"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_batch_must_divide_world_size():
    cfg = load_config(None, ["train.batch_size=10"])
    assert check_world(cfg, 2) == 5
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        check_world(cfg, 3)


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_round_trip(tmp_path):
    import yaml
    cfg = load_config(None, ["train.batch_size=64"])
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(p) == cfg


_values = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.none())
_keys = st.sampled_from(["train.batch_size", "train.base_lr", "train.base_tau", "train.precision", "train.epochs",
                         "train.warmup_epochs", "data.backend", "data.image_size", "model.arch", "model.bn",
                         "data.augment.view1.crop_scale", "data.augment.view2.hue", "eval.k", "dist.timeout_s",
                         "train.nope", "data.augment.view3.blur_p", "train.preempt_signals"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_keys, _values), max_size=4))
def test_fuzzed_configs_give_only_clean_errors(pairs):
    import yaml
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in pairs]
    try:
        load_config(None, overrides)
    except ConfigError as err:
        assert str(err)
