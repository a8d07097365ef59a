import logging
from pathlib import Path

import pytest
import yaml

from robustdistill.core.errors import ConfigError, UserError
from robustdistill.core.schema import parse_float
from robustdistill.core.threat import ThreatModel
from robustdistill.evaluation.config import EvalConfig
from robustdistill.recipes import RECIPES, recipe, recipe_names
from robustdistill.training.config import Config, from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_papers_cifar10_settings():
    cfg = load_config(None)
    assert cfg.train.epochs == 300 and cfg.train.batch_size == 128
    assert cfg.train.milestones == [215, 260, 285]
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.step == pytest.approx(2 / 255)
    assert cfg.train.weight_decay == 2e-4 and cfg.train.select_on == "val"


def test_overrides_are_typed_and_fractions_parse(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: {name: trades}\n")
    cfg = load_config(path, ["train.epochs=5", "seed=1", "attack.eps=8/255", "method.beta=3", "train.milestones=[2,4]"])
    assert cfg.train.epochs == 5 and cfg.seed == 1
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.method.beta == 3.0 and cfg.train.milestones == [2, 4]
    assert cfg.name == "c"  # run name defaults to the file stem


def test_method_can_be_switched_by_override():
    cfg = load_config(None, ["method=trades"])
    assert cfg.method.name == "trades" and cfg.method.beta == 6.0


def test_any_named_section_may_be_given_by_its_name(tmp_path):
    """`method`, `model` and `data` have a name: the name alone stands for the section, in a file or
    an override, and a key set inside it afterwards keeps the name; a key that is not a section is
    still refused as one."""
    path = tmp_path / "c.yaml"
    path.write_text("method: trades\nmodel: small_cnn\n")
    cfg = load_config(path, ["method.beta=3", "model.kwargs={width: 8}", "data=digits", "data.flip=false"])
    assert (cfg.method.name, cfg.method.beta) == ("trades", 3.0)
    assert (cfg.model.name, cfg.model.kwargs) == ("small_cnn", {"width": 8})
    assert (cfg.data.name, cfg.data.flip) == ("digits", False)
    with pytest.raises(ConfigError, match="cannot set 'out_dir.x': 'out_dir' is not a mapping"):
        load_config(None, ["out_dir=runs", "out_dir.x=1"])
    with pytest.raises(ConfigError, match=r"override 'method=\[1, 2\]' would replace the whole method section"):
        load_config(None, ["method=[1, 2]"])
    with pytest.raises(ConfigError, match="method must be a mapping"):  # a file's section is checked as it is typed
        path.write_text("method: [1, 2]\n")
        load_config(path)


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["train.epohcs=5"], "unknown key 'train.epohcs'; allowed keys: epochs"),
        (["method.bet=3"], "unknown key 'method.bet'"),
        (["train.epochs=five"], "train.epochs must be an integer"),
        (["train.epochs=0"], "train.epochs must be >= 1"),
        (["train.select_on=test2"], "train.select_on must be one of val, test"),
        (["data.name=imagenet"], "unknown dataset 'imagenet'; available: arrays, cifar10, cifar100, digits, folder"),
        (["model.name=vgg"], "unknown model 'vgg'"),
        (["method.name=foo"], "unknown method 'foo'; available:"),
        (["model.kwargs.depth=10"], "model.kwargs.depth is not an option of model 'resnet18'"),
        (["attack.eps=abc"], "attack.eps must be a number"),
        (["train.amp=maybe"], "train.amp must be true or false"),
        (["eval.attacks=[clean,pgdx]"], "unknown attack 'pgdx'"),
        (["train"], "must look like key=value"),
    ],
)
def test_bad_config_names_the_key_and_allowed_values(override, fragment):
    with pytest.raises(UserError) as info:
        load_config(None, override)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_yaml_says_where(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml \(line"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_parse_float():
    assert parse_float("8/255", "k") == pytest.approx(8 / 255)
    assert parse_float(3, "k") == 3.0
    for bad in ["1/0", "x", True, None]:
        with pytest.raises(ConfigError):
            parse_float(bad, "k")


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config(None, ["method=rslad", "teachers.robust.path=somewhere", "train.epochs=7"])
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_is_valid(path):
    load_config(path)


def test_the_digits_recipes_are_package_data_and_configs_digits_is_them():
    names = recipe_names()
    assert {"natural", "trades", "rslad", "absld", "mtard", "bmtard"} <= set(names)
    for name in names:
        cfg = from_dict(recipe(name))
        assert cfg.name == name and cfg.data.name == "digits"
        # the checkout's configs/digits is the same files, not a copy
        assert (CONFIGS / "digits" / f"{name}.yaml").read_bytes() == (RECIPES / f"{name}.yaml").read_bytes()
    assert (CONFIGS / "digits").resolve() == Path(str(RECIPES)).resolve()
    with pytest.raises(UserError, match="no digits recipe 'nope'; available: absld"):
        recipe("nope")


def test_eval_settings_are_resolved_once_with_their_fallbacks():
    s = EvalConfig().resolve(ThreatModel(0.2))
    assert (s.threat, s.step_size, s.attacks) == (ThreatModel(0.2, "Linf"), 0.05, ("clean", "pgd20"))
    s = EvalConfig(eps=0.1, step_size=0.01, attacks=["clean"]).resolve(ThreatModel(0.2))
    assert (s.eps, s.step_size, s.attacks) == (0.1, 0.01, ("clean",))
    assert s.common()["eps"] == 0.1 and s.common()["norm"] == "Linf" and "threat" not in s.common()
    assert s.at_eps(0.05).step_size == pytest.approx(0.005) and s.at_eps(0.0).step_size == 0.0
    with pytest.raises(ConfigError, match="no eps known"):
        EvalConfig().resolve(None)


def test_configs_with_the_old_eval_step_keys_still_load_with_a_note(tmp_path):
    """Before the attacks' names carried their steps, eval.pgd_steps set pgd20's and eval.cw_steps
    cw's: such a config (every run folder's config.yaml of that time) reads as the attacks that ran,
    with one line saying so."""
    old = Config().to_dict()
    old["eval"] |= {"attacks": ["clean", "pgd20", "cw"], "pgd_steps": 50, "cw_steps": 10}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    records, log = [], logging.getLogger("robustdistill")
    catch = logging.Handler()
    catch.emit = records.append
    log.addHandler(catch)
    try:
        cfg = load_config(path)
    finally:
        log.removeHandler(catch)
    assert cfg.eval.attacks == ["clean", "pgd50", "cw10"]
    assert "pgd_steps" not in cfg.to_dict()["eval"]
    notes = [r.getMessage() for r in records]
    assert len(notes) == 1 and "eval.pgd_steps=50" in notes[0] and "eval.attacks=[clean, pgd50, cw10]" in notes[0]
    default_steps = Config().to_dict()
    default_steps["eval"] |= {"pgd_steps": 20, "cw_steps": 30}  # what every run folder of that time holds
    path.write_text(yaml.safe_dump(default_steps))
    assert load_config(path).eval.attacks == ["clean", "pgd20"]
    assert load_config(None, ["eval.pgd_steps=7"]).eval.attacks == ["clean", "pgd7"]  # the default list
    assert load_config(None, ["eval.attacks=[cw]"]).eval.attacks == ["cw30"]


def test_a_default_written_two_ways_is_no_change():
    """eval.large_eps: 1.0 (written by configs before the L2 threat model) and null (the check's own
    default, 1.0 under L-inf) mean the same under L-inf: a grid does not re-evaluate runs for it."""
    from robustdistill.training.config import config_changes

    old, new = load_config(None, ["eval.large_eps=1.0"]), load_config(None)
    assert new.eval.large_eps is None and config_changes(old, new) == {}
    old, new = (load_config(None, ["attack.norm=l2", "attack.eps=0.5", *e]) for e in (["eval.large_eps=1.0"], []))
    assert config_changes(old, new) == {"eval.large_eps": (1.0, None)}  # under L2 null is the image's diagonal
