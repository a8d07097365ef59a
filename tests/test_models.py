import pytest
import torch
import torch.nn.functional as F

from robustdistill.core.errors import CheckpointError, ConfigError
from robustdistill.core.threat import ThreatModel
from robustdistill.models import ModelSpec, create_model, list_models
from robustdistill.models.checkpoint import ModelMeta, load_model, read_state_dict, save_model

# Small architecture options keep the sweep fast; every default is exercised in test_defaults_build.
FAST = {
    "wrn34_10": {"depth": 10, "widen_factor": 2},
    "resnet56": {"depth": 8},
    "resnet18": {"width": 8},
    "preact_resnet18": {"width": 8},
    "mobilenet_v2": {"width_mult": 0.25},
    "small_cnn": {"width": 8},
}


@pytest.mark.parametrize("name", list_models())
def test_every_model_gives_logits_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(ModelSpec(name, num_classes=7, in_channels=3, kwargs=FAST.get(name, {})))
    x = torch.rand(4, 3, 16, 16)
    out = model(x)
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", list_models())
def test_defaults_build(name):
    model = create_model(ModelSpec(name, num_classes=10, in_channels=1))
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 8, 8)).shape == (1, 10)


def test_architectures_have_their_published_size():
    count = lambda name: sum(p.numel() for p in create_model(ModelSpec(name, 10)).parameters())  # noqa: E731
    assert 11.1e6 < count("resnet18") < 11.2e6
    assert 46.1e6 < count("wrn34_10") < 46.2e6
    assert 0.85e6 < count("resnet56") < 0.86e6
    assert 2.2e6 < count("mobilenet_v2") < 2.3e6


def test_normalisation_lives_inside_the_model():
    spec = ModelSpec("small_cnn", 10, 3, {"width": 4}, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    model = create_model(spec).eval()
    x = torch.rand(2, 3, 8, 8)
    expected = model.net((x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2)
    assert torch.allclose(model(x), expected)


def test_bad_architecture_option_is_a_config_error():
    with pytest.raises(ConfigError, match="6n\\+4"):
        create_model(ModelSpec("wrn34_10", 10, kwargs={"depth": 33}))
    with pytest.raises(ConfigError, match="not an option of model 'small_cnn'"):
        create_model(ModelSpec("small_cnn", 10, kwargs={"depth": 3}))


def test_safetensors_round_trip_carries_the_architecture(tmp_path):
    spec = ModelSpec("small_cnn", 10, 1, {"width": 4}, mean=[0.1], std=[0.3])
    model = create_model(spec)
    model.train()(torch.rand(8, 1, 8, 8))  # move BN statistics away from their initial values
    save_model(tmp_path / "m.safetensors", model, ModelMeta(spec, epoch=3, threat=ThreatModel(0.25)))
    loaded, meta = load_model(tmp_path / "m.safetensors")
    assert meta == ModelMeta(spec, epoch=3, threat=ThreatModel(0.25))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_plain_state_dicts_load_with_prefixes_stripped(tmp_path):
    spec = ModelSpec("small_cnn", 10, 1, {"width": 4})
    model = create_model(spec)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.net.state_dict().items()}}, tmp_path / "foreign.pt")
    loaded, _ = load_model(tmp_path / "foreign.pt", spec)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_foreign_checkpoint_without_architecture_asks_for_it(tmp_path):
    model = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="does not say which architecture"):
        load_model(tmp_path / "plain.pt")


def test_wrong_shape_checkpoint_is_refused_with_the_key(tmp_path):
    small = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))
    torch.save(small.state_dict(), tmp_path / "w4.pt")
    with pytest.raises(CheckpointError, match=r"wrong shapes: net\.0\.weight"):
        load_model(tmp_path / "w4.pt", ModelSpec("small_cnn", 10, 1, {"width": 8}))


def test_unsafe_pickle_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pt")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(tmp_path / "junk.safetensors")


@pytest.mark.parametrize(
    "name, kwargs, keys",
    [
        (
            "wrn34_10",
            {},
            [
                "conv1.weight",
                "block1.layer.0.bn1.weight",
                "block1.layer.0.convShortcut.weight",
                "block3.layer.4.conv2.weight",
                "bn1.running_mean",
                "fc.weight",
            ],
        ),
        (
            "resnet18",
            {},
            [
                "conv1.weight",
                "bn1.weight",
                "layer1.0.conv1.weight",
                "layer2.0.shortcut.0.weight",
                "layer2.0.shortcut.1.running_var",
                "linear.bias",
            ],
        ),
        ("preact_resnet18", {}, ["layer1.0.bn1.weight", "layer2.0.shortcut.0.weight", "bn.weight", "linear.weight"]),
        ("resnet56", {}, ["conv1.weight", "bn1.weight", "layer3.8.conv2.weight", "linear.weight"]),
        (
            "mobilenet_v2",
            {},
            [
                "conv1.weight",
                "layers.0.conv3.weight",
                "layers.0.shortcut.0.weight",
                "conv2.weight",
                "bn2.weight",
                "linear.weight",
            ],
        ),
    ],
)
def test_state_dict_names_match_the_reference_code(name, kwargs, keys):
    """Checkpoints of TRADES / RobustBench (WRN) and of the CIFAR code the papers use load as they are."""
    state = create_model(ModelSpec(name, 10, 3, kwargs)).net.state_dict()
    missing = [k for k in keys if k not in state]
    assert not missing


def test_a_trades_checkpoint_with_its_unused_sub_block_loads(tmp_path):
    spec = ModelSpec("wrn34_10", 10, 3, {"depth": 10, "widen_factor": 1, "sub_block1": True})
    reference = create_model(spec).net.state_dict()
    assert any(k.startswith("sub_block1.") for k in reference)
    torch.save(reference, tmp_path / "model_cifar_wrn.pt")
    model, _ = load_model(tmp_path / "model_cifar_wrn.pt", spec)
    with pytest.raises(CheckpointError, match=r"unexpected keys: net\.sub_block1.*sub_block1: true"):
        load_model(tmp_path / "model_cifar_wrn.pt", ModelSpec("wrn34_10", 10, 3, {"depth": 10, "widen_factor": 1}))


def _official_trades_wrn_keys(depth=34, widen=10, classes=10) -> dict[str, tuple[int, ...]]:
    """The state dict of TRADES' models/wideresnet.py (its WideResNet(), saved as model_cifar_wrn.pt),
    key by key with shapes, written from that file's module structure: conv1, block1, sub_block1 (built,
    never called), block2, block3 (NetworkBlock.layer: BasicBlock's bn1, conv1, bn2, conv2 and, where the
    width changes, convShortcut), bn1, fc."""
    n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (16, 3, 3, 3)}

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{p}"] = (c,)
        keys[f"{name}.num_batches_tracked"] = ()

    for block, cin, cout in [("block1", 0, 1), ("sub_block1", 0, 1), ("block2", 1, 2), ("block3", 2, 3)]:
        for i in range(n):
            a, b = widths[cin] if i == 0 else widths[cout], widths[cout]
            bn(f"{block}.layer.{i}.bn1", a)
            keys[f"{block}.layer.{i}.conv1.weight"] = (b, a, 3, 3)
            bn(f"{block}.layer.{i}.bn2", b)
            keys[f"{block}.layer.{i}.conv2.weight"] = (b, b, 3, 3)
            if a != b:
                keys[f"{block}.layer.{i}.convShortcut.weight"] = (b, a, 1, 1)
    bn("bn1", widths[3])
    keys["fc.weight"], keys["fc.bias"] = (classes, widths[3]), (classes,)
    return keys


def test_the_cifar_recipes_teacher_takes_the_official_trades_checkpoint_as_it_is():
    """Every shipped CIFAR-10 recipe with the TRADES WRN-34-10 teacher builds exactly the official
    file's keys and shapes (so it loads without edits; the loading itself is the test below at a small size)."""
    from pathlib import Path

    from robustdistill.training.config import load_config

    official = _official_trades_wrn_keys()
    recipes = sorted((Path(__file__).resolve().parents[1] / "configs" / "cifar10").glob("*_resnet18.yaml"))
    checked = 0
    for path in recipes:
        teacher = load_config(path).teachers.get("robust")
        if teacher is None or teacher.path != "teachers/cifar10/trades_wrn34_10.pt":
            continue
        with torch.device("meta"):
            net = create_model(ModelSpec(teacher.model.name, 10, 3, teacher.model.kwargs)).net
        built = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert built == official, path.name
        checked += 1
    assert checked >= 7


def test_a_state_dict_in_the_official_trades_layout_loads_into_the_tools_wrn(tmp_path):
    keys = _official_trades_wrn_keys(depth=10, widen=2)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=generator) if s else torch.tensor(3) for k, s in keys.items()}
    torch.save(state, tmp_path / "model_cifar_wrn.pt")
    spec = ModelSpec("wrn34_10", 10, 3, {"depth": 10, "widen_factor": 2, "sub_block1": True})
    model, _ = load_model(tmp_path / "model_cifar_wrn.pt", spec)
    assert torch.equal(model.net.block2.layer[0].convShortcut.weight, state["block2.layer.0.convShortcut.weight"])
    assert torch.equal(model.net.fc.bias, state["fc.bias"])


def _mtard_resnet56_keys(depth=56, classes=10) -> dict[str, tuple[int, ...]]:
    """The state dict of the MTARD code's clean ResNet-56 (zhaoshiji123/MTARD
    cifar10_nat_teacher_models/resnet.py CifarResNet, chenyaofo/pytorch-cifar-models' layout), written
    from its module structure: conv1, bn1, layer1..3 of BasicBlocks (conv1, bn1, conv2, bn2, and where the
    shape changes downsample = 1x1 conv, BN), fc."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (16, 3, 3, 3)}

    def bn(name, c):
        keys.update({f"{name}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")})
        keys[f"{name}.num_batches_tracked"] = ()

    bn("bn1", 16)
    cin = 16
    for stage, planes in enumerate([16, 32, 64]):
        for i in range((depth - 2) // 6):
            p = f"layer{stage + 1}.{i}"
            keys[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            bn(f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            if i == 0 and (stage > 0 or cin != planes):
                keys[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                bn(f"{p}.downsample.1", planes)
            cin = planes
    keys["fc.weight"], keys["fc.bias"] = (classes, 64), (classes,)
    return keys


def test_the_bmtard_recipes_clean_teacher_takes_the_mtard_codes_resnet56_as_it_is(tmp_path):
    """The B-MTARD recipes' clean teacher builds exactly the MTARD code's ResNet-56 keys and shapes; a
    file in that layout loads and computes conv-BN-ReLU blocks with projection shortcuts."""
    from pathlib import Path

    from robustdistill.training.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for path, classes in [
        (root / "cifar10" / "bmtard_resnet18.yaml", 10),
        (root / "cifar100" / "bmtard_resnet18.yaml", 100),
    ]:
        clean = load_config(path).teachers["clean"].model
        with torch.device("meta"):
            net = create_model(ModelSpec(clean.name, classes, 3, clean.kwargs)).net
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == _mtard_resnet56_keys(classes=classes)
    keys = _mtard_resnet56_keys(depth=8)
    generator = torch.Generator().manual_seed(0)
    state = {k: 0.3 * torch.randn(s, generator=generator) if s else torch.tensor(3) for k, s in keys.items()}
    state |= {k: 0.5 + v.abs() for k, v in state.items() if k.endswith("running_var")}
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "resnet56.pth")
    model, _ = load_model(tmp_path / "resnet56.pth", ModelSpec("resnet56", 10, 3, {"depth": 8, "layout": "mtard"}))
    block = model.eval().net.layer2[0]
    x = torch.rand(2, 16, 8, 8)
    with torch.no_grad():
        shortcut = block.downsample(x)
        by_hand = F.batch_norm(F.conv2d(x, state["layer2.0.downsample.0.weight"], stride=2),
                               state["layer2.0.downsample.1.running_mean"], state["layer2.0.downsample.1.running_var"],
                               state["layer2.0.downsample.1.weight"], state["layer2.0.downsample.1.bias"])  # fmt: skip
        assert torch.allclose(shortcut, by_hand, atol=1e-5) and torch.equal(model.net.fc.bias, state["fc.bias"])
    with pytest.raises(CheckpointError, match="does not fit the model"):  # the option-A layout refuses it
        load_model(tmp_path / "resnet56.pth", ModelSpec("resnet56", 10, 3, {"depth": 8}))


def test_a_teachers_model_section_is_for_plain_state_dicts_a_file_of_this_tool_keeps_its_own(tmp_path, caplog):
    """A recipe names the architecture of the official file (sub_block1 and all); a teacher this tool
    trained, put in its place, records its own architecture, which wins."""
    from robustdistill.data import DataConfig, load_dataset
    from robustdistill.models import ModelConfig
    from robustdistill.models.sources import TeacherConfig, load_teacher

    own = ModelSpec("small_cnn", 10, 1, {"width": 4})
    path = tmp_path / "teacher.safetensors"
    save_model(path, create_model(own), ModelMeta(own, data={"name": "digits"}, threat=ThreatModel(0.2)))
    dataset = load_dataset(DataConfig(name="digits"))
    recipe_says = ModelConfig(name="small_cnn", kwargs={"width": 64})  # what a plain state dict would be
    with caplog.at_level("WARNING", logger="robustdistill"):
        teacher = load_teacher("robust", TeacherConfig(path=str(path), model=recipe_says), dataset, torch.device("cpu"))
    assert (
        "teachers.robust.model (small_cnn {'width': 64}) is not used" in caplog.text and "{'width': 4}" in caplog.text
    )
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in create_model(own).parameters())
