"""RobustBench teachers by name, without the robustbench package: every native entry of the zoo file
against the key names and shapes of RobustBench's own modules (written out here from its model
zoo's source), DeepMind's WideResNet forward against a functional restatement of it, the threat
model, budget and normalisation taken from the entry, and the errors of a wrong name or file."""

import pytest
import torch
import torch.nn.functional as F

from robustdistill.core.errors import CheckpointError
from robustdistill.core.threat import ThreatModel
from robustdistill.models import create_model
from robustdistill.models.robustbench import load_robustbench, zoo_data, zoo_spec, zoo_threat

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix, c):
    return {f"{prefix}.{k}": () if k == "num_batches_tracked" else (c,) for k in BN}


def _block(p, cin, cout, names, shortcut):
    """A two-convolution residual block: bn, 3x3 conv, bn, 3x3 conv (`names`), and a 1x1 projection."""
    bn0, conv0, bn1, conv1 = names
    keys = _bn(f"{p}.{bn0}", cin) | {f"{p}.{conv0}.weight": (cout, cin, 3, 3)}
    keys |= _bn(f"{p}.{bn1}", cout) | {f"{p}.{conv1}.weight": (cout, cout, 3, 3)}
    return keys | ({f"{p}.{shortcut}.weight": (cout, cin, 1, 1)} if shortcut else {})


def rb_wide_resnet(depth, widen_factor, sub_block1=False, num_classes=10):
    """robustbench/model_zoo/architectures/wide_resnet.py: conv1, block1..3 (and sub_block1), bn1, fc."""
    n, ch = (depth - 4) // 6, [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    keys = {"conv1.weight": (16, 3, 3, 3)}
    groups = [("block1", 0), ("block2", 1), ("block3", 2)] + ([("sub_block1", 0)] if sub_block1 else [])
    for name, g in groups:
        for i in range(n):
            cin, cout, p = ch[g] if i == 0 else ch[g + 1], ch[g + 1], f"{name}.layer.{i}"
            keys |= _block(p, cin, cout, ("bn1", "conv1", "bn2", "conv2"), "convShortcut" if cin != cout else None)
    return keys | _bn("bn1", ch[3]) | {"fc.weight": (num_classes, ch[3]), "fc.bias": (num_classes,)}


def rb_preact_resnet18(bn_before_fc, normalisation_buffers=True, num_classes=10):
    """robustbench/model_zoo/architectures/resnet.py PreActResNet with PreActBlock(V2); mu and sigma
    are persistent buffers of Wong2020FastNet and Rice2020OverfittingNetL2."""
    keys, cin = {"conv1.weight": (64, 3, 3, 3)}, 64
    for stage, cout in enumerate([64, 128, 256, 512]):
        for j in range(2):
            stride, p = (1 if stage == 0 else 2) if j == 0 else 1, f"layer{stage + 1}.{j}"
            projected = stride != 1 or cin != cout
            keys |= _block(p, cin, cout, ("bn1", "conv1", "bn2", "conv2"), "shortcut.0" if projected else None)
            cin = cout
    keys |= _bn("bn", 512) if bn_before_fc else {}
    keys |= {"mu": (1, 3, 1, 1), "sigma": (1, 3, 1, 1)} if normalisation_buffers else {}
    return keys | {"linear.weight": (num_classes, 512), "linear.bias": (num_classes,)}


def rb_dm_wide_resnet(depth, width, num_classes=10):
    """robustbench/model_zoo/architectures/dm_wide_resnet.py DMWideResNet (mean and std not saved)."""
    n, ch = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    keys = {"init_conv.weight": (16, 3, 3, 3)}
    for g in range(3):
        for i in range(n):
            cin, cout, p = ch[g] if i == 0 else ch[g + 1], ch[g + 1], f"layer.{g}.block.{i}"
            names = ("batchnorm_0", "conv_0", "batchnorm_1", "conv_1")
            keys |= _block(p, cin, cout, names, "shortcut" if cin != cout else None)
    return keys | _bn("batchnorm", ch[3]) | {"logits.weight": (num_classes, ch[3]), "logits.bias": (num_classes,)}


MU_SIGMA = {"mu": (1, 3, 1, 1), "sigma": (1, 3, 1, 1)}  # Rice2020OverfittingNet's normalisation buffers

# each native entry, with the module RobustBench builds it from (cifar10.py / cifar100.py)
RB_MODULES = {
    "Standard": lambda c: rb_wide_resnet(28, 10, num_classes=c),
    "Zhang2019Theoretically": lambda c: rb_wide_resnet(34, 10, sub_block1=True, num_classes=c),
    "Carmon2019Unlabeled": lambda c: rb_wide_resnet(28, 10, sub_block1=True, num_classes=c),
    ("Linf", "Rice2020Overfitting"): lambda c: rb_wide_resnet(34, 20, num_classes=c) | MU_SIGMA,
    ("L2", "Rice2020Overfitting"): lambda c: rb_preact_resnet18(bn_before_fc=True, num_classes=c),
    "Wong2020Fast": lambda c: rb_preact_resnet18(bn_before_fc=False, num_classes=c),
    "28_10": lambda c: rb_dm_wide_resnet(28, 10, c),
    "70_16": lambda c: rb_dm_wide_resnet(70, 16, c),
}  # fmt: skip


def _module_of(threat, name, num_classes):
    for key in ((threat, name), name):
        if key in RB_MODULES:
            return RB_MODULES[key](num_classes)
    size = "70_16" if "70_16" in name or "70-16" in name or name == "Gowal2020Uncovering" else "28_10"
    return RB_MODULES[size](num_classes)


ENTRIES = [(d, t, n) for d, by in zoo_data()["entries"].items() for t, names in by.items() for n in names]


@pytest.mark.parametrize("dataset, threat, name", ENTRIES, ids=["/".join(e) for e in ENTRIES])
def test_every_native_entry_has_robustbenchs_key_names_and_shapes(dataset, threat, name):
    classes = 100 if dataset == "cifar100" else 10
    spec = zoo_spec(dataset, threat, name, classes, 3)
    with torch.device("meta"):
        own = {k.removeprefix("net."): tuple(v.shape) for k, v in create_model(spec).state_dict().items()}
    own = {k: v for k, v in own.items() if not k.startswith("normalize.")}
    expected = _module_of(threat, name, classes)
    dropped = set(zoo_data()["entries"][dataset][threat][name].get("state_keys", {}))
    assert own == {k: v for k, v in expected.items() if k not in dropped}
    assert dropped <= set(expected)  # a buffer the entry drops is one the file has
    # the normalisation is the one its RobustBench module applies (DeepMind's CIFAR means; none for Standard)
    if spec.name == "dm_wrn":
        assert spec.mean == zoo_data()["normalizations"][dataset]["mean"]
    assert zoo_threat(f"robustbench:{name}@{threat}", dataset).norm == threat


def _functional_dm_wrn(state, x, depth):
    """DeepMind's forward written out (dm_wide_resnet.py): SAME-style padding by hand, the shortcut
    from the activated input where the block changes width, swish everywhere."""

    def bn(p, t):
        return F.batch_norm(
            t, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"], state[f"{p}.bias"]
        )

    out = F.conv2d(x, state["init_conv.weight"], padding=1)
    for g in range(3):
        for i in range((depth - 4) // 6):
            p, stride = f"layer.{g}.block.{i}", 2 if g > 0 and i == 0 else 1
            has_shortcut = f"{p}.shortcut.weight" in state
            act = F.silu(bn(f"{p}.batchnorm_0", out))
            v = F.pad(act, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))
            y = F.conv2d(v, state[f"{p}.conv_0.weight"], stride=stride)
            y = F.conv2d(F.silu(bn(f"{p}.batchnorm_1", y)), state[f"{p}.conv_1.weight"], padding=1)
            out = (F.conv2d(act, state[f"{p}.shortcut.weight"], stride=stride) if has_shortcut else out) + y
    out = F.avg_pool2d(F.silu(bn("batchnorm", out)), 8).flatten(1)
    return F.linear(out, state["logits.weight"], state["logits.bias"])


def _random_state(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(0)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            state[k] = 0.1 * torch.randn(shape, generator=g)
    return state


class _Cifar:
    def __init__(self, name="cifar10", num_classes=10):
        self.name, self.num_classes, self.channels = name, num_classes, 3


def test_a_deepmind_wideresnet_entry_loads_from_robustbenchs_layout_and_computes_deepminds_function(tmp_path):
    """Wang2023Better_WRN-28-10 at a tenth of its width (the key layout is the same function of
    depth and width; the test above checks the full sizes): loaded from <dir>/cifar10/L2/<Name>.pt,
    normalised with CIFAR-10's mean and std, and equal to DeepMind's forward on the same weights."""
    from robustdistill.models import robustbench

    entry = zoo_data()["entries"]["cifar10"]["L2"]["Wang2023Better_WRN-28-10"]
    small = {**entry, "kwargs": {"depth": 10, "width": 2}}
    state = _random_state(rb_dm_wide_resnet(10, 2))
    path = tmp_path / "models" / "cifar10" / "L2" / "Wang2023Better_WRN-28-10.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    original = robustbench.zoo_entry
    robustbench.zoo_entry = lambda d, t, n: small if n == "Wang2023Better_WRN-28-10" else original(d, t, n)
    try:
        model, spec, where = load_robustbench(
            "robustbench:Wang2023Better_WRN-28-10@L2", _Cifar(), str(tmp_path / "models")
        )
    finally:
        robustbench.zoo_entry = original
    assert where == path and spec.name == "dm_wrn" and spec.std == [0.2471, 0.2435, 0.2616]
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), _functional_dm_wrn(state, (x - mean) / std, 10), atol=1e-5)
    assert zoo_threat("robustbench:Wang2023Better_WRN-28-10@L2", "cifar10") == ThreatModel(0.5, "L2")
    assert zoo_threat("robustbench:Wang2023Better_WRN-70-16", "cifar100") == ThreatModel(8 / 255, "Linf")


def test_a_preactresnet_entry_loads_with_its_normalisation_buffers_checked_and_dropped(tmp_path):
    """Wong2020Fast: RobustBench's plain PreActResNet-18 (shortcut from the block's input, no final
    batch norm) whose file saves mu and sigma; a file whose mu is not CIFAR-10's is refused."""
    state = _random_state(rb_preact_resnet18(bn_before_fc=False))
    state["mu"] = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    state["sigma"] = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)
    path = tmp_path / "models" / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model, spec, _ = load_robustbench("robustbench:Wong2020Fast", _Cifar(), str(tmp_path / "models"))
    assert spec.kwargs == {"shortcut": "input", "final_bn": False} and spec.mean == [0.4914, 0.4822, 0.4465]
    # the first projection shortcut (layer2.0) sees the block's input: a change of bn1 leaves it alone
    block = model.net.layer2[0]
    x = torch.rand(2, 64, 8, 8)
    with torch.no_grad():
        before = block.shortcut(x)
        block.bn1.weight.mul_(3)
        assert torch.equal(block.shortcut(x), before) and block.shortcut_from_input
    state["mu"] = torch.zeros(1, 3, 1, 1)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="its mu .* is not Wong2020Fast's"):
        load_robustbench("robustbench:Wong2020Fast", _Cifar(), str(tmp_path / "models"))


def test_a_wrong_name_a_missing_file_and_a_file_of_another_architecture_are_one_line_each(tmp_path):
    models = str(tmp_path / "models")
    with pytest.raises(CheckpointError, match=r"RobustBench entry Zhang2019Theoretical \(cifar10, Linf\) is not one"):
        load_robustbench("robustbench:Zhang2019Theoretical", _Cifar(), models)  # a typo
    with pytest.raises(
        CheckpointError, match=r"is not at .*models/cifar10/Linf/Gowal2021Improving_28_10_ddpm_100m\.pt"
    ):
        load_robustbench("robustbench:Gowal2021Improving_28_10_ddpm_100m", _Cifar(), models)
    path = tmp_path / "models" / "cifar10" / "Linf" / "Wang2023Better_WRN-70-16.pt"
    path.parent.mkdir(parents=True)
    torch.save(_random_state(rb_wide_resnet(10, 1)), path)  # a small TRADES WideResNet under a DM name
    with pytest.raises(CheckpointError, match="does not fit the model .*(missing|unexpected) keys"):
        load_robustbench("robustbench:Wang2023Better_WRN-70-16", _Cifar(), models)


def test_the_how_to_lists_exactly_the_native_entries():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "how-to" / "robustbench-teacher.md").read_text()
    datasets = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100"}
    rows = re.findall(r"^\| (CIFAR-10+) \| (\w+) \| (.*) \|$", page, re.MULTILINE)
    listed = {(datasets[d], t): set(re.findall(r"`([\w-]+)`", names)) - {"dm_wrn"} for d, t, names in rows}
    native = {(d, t): set(names) for d, by in zoo_data()["entries"].items() for t, names in by.items()}
    assert listed == native


def test_eval_of_a_wrong_zoo_name_or_file_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from robustdistill.cli import main
    from test_data import _fake_cifar10

    monkeypatch.chdir(tmp_path)
    _fake_cifar10(tmp_path / "data", n=4)
    base = ["--data", "cifar10", "eval.subset=4", "data.root=data", "--out", "e"]
    path = tmp_path / "models" / "cifar10" / "Linf" / "Gowal2021Improving_28_10_ddpm_100m.pt"
    path.parent.mkdir(parents=True)
    torch.save(_random_state(rb_wide_resnet(10, 1)), path)
    for name, fragment in [
        ("robustbench:Gowal2021Improving_28_10", "is not one this tool builds itself"),
        ("robustbench:Gowal2021Improving_28_10_ddpm_100m", "does not fit the model"),
    ]:
        assert main(["eval", name, *base]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and fragment in err, err
        assert not (tmp_path / "e").exists()
