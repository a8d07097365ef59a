"""The formats a student leaves the tool in, each a writer and a reader for the parity check.

Every format holds the whole `Classifier`: the input normalisation inside, images in [0, 1]
(N, C, H, W, float32) in, logits out.

- `onnx`: model.onnx (torch's dynamo exporter; a dynamic batch axis; input `images`, output
  `logits`), read back by onnxruntime on the CPU. Needs `pip install 'robustdistill[export]'`.
- `torchscript`: model.pt from `torch.jit.trace` (PyTorch deprecates TorchScript in favour of
  torch.export; the file still loads with `torch.jit.load` and in LibTorch), read back so.
- `safetensors`: model.safetensors with this tool's architecture record in its header
  (`robustdistill eval` and `robustdistill.models.load_model` read it), read back so.
- `robustbench`: a plain state dict (`models/<dataset>/<Linf|L2>/<name>.pt`, RobustBench's own
  layout) and its `model_info` JSON (`model_info/<dataset>/<Linf|L2>/<name>.json`), read back by
  loading the state dict (`weights_only=True`) into the architecture again.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..core.errors import ConfigError, UserError
from ..models.base import Classifier, ModelSpec, create_model
from ..models.checkpoint import ModelMeta, load_into, load_model, save_model
from ..storage.files import atomic_write, load_torch

FORMATS = ("onnx", "torchscript", "safetensors", "robustbench")
Runner = Callable[[torch.Tensor], torch.Tensor]  # images in [0, 1] -> logits, on the CPU


class ExportError(UserError):
    """The model cannot be written in the format asked for (an operator ONNX lacks, ...)."""


def require_onnx() -> None:
    """onnx, onnxruntime and onnxscript import, or one line naming the install command."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(
                f"--format onnx needs the {module} package, which is not installed: pip install 'robustdistill[export]'"
            ) from None


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """torch's exporters talk: deprecation warnings and INFO/WARNING lines about optional packages
    (torchvision's operators) that say nothing of this model. The block runs without them."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def unsupported_operators(message: str) -> list[str]:
    """The operators an ONNX conversion error names as having no ONNX function."""
    found = re.findall(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", message)
    found += [(op, "") for op in re.findall(r"Unsupported FX nodes: \{([^}]*)\}", message)]
    names = [op if overload in ("", "default") else f"{op}.{overload}" for op, overload in found]
    return list(dict.fromkeys(n.strip("' ") for n in names))


def write_onnx(model: Classifier, example: torch.Tensor, folder: Path, spec: ModelSpec) -> dict[str, str]:
    import onnx

    path = folder / "model.onnx"
    big = sum(p.numel() * p.element_size() for p in model.state_dict().values()) > 1_500_000_000
    try:
        with _quiet_torch_export():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=big,  # ONNX's protobuf holds at most 2 GB: larger weights go beside it
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; the message names the cause
        text = str(exc)
        ops = unsupported_operators(text)
        if ops:
            raise ExportError(
                f"ONNX cannot express the operator{'s' if len(ops) > 1 else ''} {', '.join(ops)} of model "
                f"'{spec.name}'; export it as torchscript or safetensors instead"
            ) from None
        first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
        raise ExportError(f"the ONNX export of model '{spec.name}' failed: {first.strip()[:300]}") from None
    onnx.checker.check_model(str(path))
    opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import if not o.domain), None)
    return {"model": path.name, "opset": str(opset)}


def onnx_runner(folder: Path) -> tuple[Runner, str]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])

    return run, f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"


def write_torchscript(model: Classifier, example: torch.Tensor, folder: Path, spec: ModelSpec) -> dict[str, str]:
    path = folder / "model.pt"
    try:
        with _quiet_torch_export():
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as exc:  # noqa: BLE001 - tracing a user's model may fail in many ways
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"model '{spec.name}' cannot be traced to TorchScript: {first[:300]}") from None
    with _quiet_torch_export():
        atomic_write(path, lambda tmp: torch.jit.save(traced, tmp))
    return {"model": path.name}


def torchscript_runner(folder: Path) -> tuple[Runner, str]:
    with _quiet_torch_export():
        loaded = torch.jit.load(str(folder / "model.pt"), map_location="cpu").eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _quiet_torch_export():
            return loaded(x)

    return run, f"torch.jit.load (torch {torch.__version__})"


def write_safetensors(model: Classifier, meta: ModelMeta, folder: Path) -> dict[str, str]:
    save_model(folder / "model.safetensors", model, meta)
    return {"model": "model.safetensors"}


def safetensors_runner(folder: Path) -> tuple[Runner, str]:
    loaded, _ = load_model(folder / "model.safetensors")
    return _torch_runner(loaded.eval()), f"robustdistill.models.load_model (torch {torch.__version__})"


def robustbench_paths(dataset: str, norm: str, name: str) -> tuple[str, str]:
    """The state dict's and the model_info's paths inside the export, in RobustBench's layout."""
    return f"models/{dataset}/{norm}/{name}.pt", f"model_info/{dataset}/{norm}/{name}.json"


def write_state_dict(model: Classifier, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def state_dict_runner(path: Path, spec: ModelSpec) -> tuple[Runner, str]:
    model = create_model(spec)
    load_into(model, load_torch(path), path)
    return _torch_runner(model.eval()), f"torch.load(weights_only=True) into {spec.name} (torch {torch.__version__})"


def _torch_runner(model: torch.nn.Module) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return run
