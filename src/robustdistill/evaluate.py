"""Evaluation (spec/evaluation.md): an attack suite, class-wise metrics, sanity checks.

    summary = evaluate(model, split, ["clean", "pgd20", "autoattack_fast"], EvalSettings(eps=8/255), num_classes=10)

Attacks, by name (all L-infinity, all clip to the eps-ball and [0, 1], all see the model in eval mode):
    clean, fgsm, pgd20 (PGD with `pgd_steps` steps, uniform start), cw (PGD on the CW margin),
    autoattack (AutoAttack "standard": APGD-CE, APGD-T, FAB-T, Square, from the `pyautoattack`
    package), autoattack_fast (APGD-CE + APGD-T), square (the black-box Square attack alone),
    transfer (PGD examples crafted on a surrogate model, e.g. a teacher, fed to the evaluated model).

Per attack: accuracy, class-wise accuracy, worst/best class, NSD = std / mean of the class-wise
accuracies; W-Robust Acc = (clean + pgd20) / 2; and `robust_to_all`, the per-sample worst case
over every attack run (a sample counts only if it survives all of them). The sanity checks of the
spec run with every evaluation (`checks.py`); a failed check is reported, never hidden.
Under DDP each rank attacks its blocks of samples and the per-sample verdicts are assembled on
every rank; random starts are drawn per sample from (seed, restart, index), so every number equals
the single-process one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .attacks import FGSM, PGD, sample_noise
from .checkpoint import atomic_write, fingerprint, load_model, read_model_meta
from .config import DataConfig, EvalConfig, build, load_config
from .data import Split, load_dataset
from .distributed import (DistInfo, all_reduce_max, all_reduce_sum, assemble, gather_objects, owned_indices,
                          resolve_device)
from .errors import UserError
from .models import ModelSpec
from .registry import Registry
from .report import build_report
from .robustbench import is_robustbench, load_robustbench
from .runs import model_checkpoint
from .teachers import load_surrogate

SELECTION_METRICS = ("clean", "robust", "robust_plus_worst", "w_robust")
ROBUST_ATTACK = "pgd20"  # the attack behind "robust accuracy" in selection and W-Robust Acc
WHITE_BOX = ("fgsm", "pgd20", "cw", "autoattack", "autoattack_fast")
BLACK_BOX = ("square", "transfer")


@dataclass
class EvalSettings:
    eps: float
    step_size: float
    pgd_steps: int = 20
    cw_steps: int = 30
    restarts: int = 1
    square_queries: int = 5000
    batch_size: int = 256
    seed: int = 0
    checks: bool = False
    checks_subset: int = 500
    large_eps: float = 1.0

    @property
    def block(self) -> int:
        """Samples per block (ranks own whole blocks) and per Square / AutoAttack chunk."""
        return 4 * self.batch_size

    @classmethod
    def from_config(cls, eval_cfg: EvalConfig, default_eps: float) -> "EvalSettings":
        eps = eval_cfg.eps if eval_cfg.eps is not None else default_eps
        step = eval_cfg.step_size if eval_cfg.step_size is not None else eps / 4
        return cls(eps, step, eval_cfg.pgd_steps, eval_cfg.cw_steps, eval_cfg.restarts, eval_cfg.square_queries,
                   eval_cfg.batch_size, eval_cfg.seed, eval_cfg.checks, eval_cfg.checks_subset, eval_cfg.large_eps)

    def describe(self, attack: str) -> dict[str, Any]:
        pgd = {"eps": self.eps, "step_size": self.step_size, "start": "uniform", "restarts": self.restarts}
        return {
            "clean": {},
            "fgsm": {"eps": self.eps, "loss": "ce"},
            "pgd20": {**pgd, "steps": self.pgd_steps, "loss": "ce"},
            "cw": {**pgd, "steps": self.cw_steps, "loss": "cw margin"},
            "transfer": {**pgd, "steps": self.pgd_steps, "loss": "ce on the surrogate"},
            "autoattack": {"eps": self.eps, "version": "standard", "package": "pyautoattack"},
            "autoattack_fast": {"eps": self.eps, "attacks": ["apgd-ce", "apgd-t"], "package": "pyautoattack"},
            "square": {"eps": self.eps, "queries": self.square_queries, "package": "pyautoattack"},
        }[attack]


@dataclass
class AttackEnv:
    """What an attack may need beyond the model and its samples.

    An attack is called on the samples this rank owns (`index`, their positions in the split);
    randomness is a function of (seed, sample index), so verdicts do not depend on the batch or
    on the number of ranks. AutoAttack, whose candidates change between its sub-attacks, reads
    the whole split from `x_all`/`y_all` and coordinates the ranks itself."""

    settings: EvalSettings
    surrogate: Optional[nn.Module] = None
    state_dir: Optional[Path] = None  # AutoAttack's resumable state files live here
    progress: bool = False
    index: Optional[torch.Tensor] = None  # None: the samples are the whole split, in order
    x_all: Optional[torch.Tensor] = None
    y_all: Optional[torch.Tensor] = None
    rank: int = 0
    world_size: int = 1
    notes: dict[str, list[str]] = field(default_factory=dict)  # warnings an attack raised, by attack

    def sample_index(self, n: int) -> torch.Tensor:
        return torch.arange(n) if self.index is None else self.index.cpu()


# name -> fn(model, x, y, env) -> (x_adv, correct or None); x, y: the samples this rank owns
ATTACKS: Registry[Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]] = Registry("attack")


def _batches(n: int, size: int, desc: str, progress: bool):
    return tqdm(range(0, n, size), desc=desc, leave=False, disable=None if progress else True)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)]) if len(x) else x.new_zeros(0, dtype=torch.long)


def run_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, env: AttackEnv, desc: str, *, eps: float, steps: int,
            loss: str = "ce", start: str = "uniform", step_size: Optional[float] = None, source: Optional[nn.Module] = None,
            restarts: Optional[int] = None) -> torch.Tensor:
    """PGD crafted on `source` (default: the model), batched, with restarts judged on `model`:
    each sample keeps the first restart's example that fools `model`. Restart r of sample i
    starts from noise drawn for (seed, r, i)."""
    s = env.settings
    index = env.sample_index(len(x))
    step = s.step_size if step_size is None else step_size
    attack = PGD(source or model, eps, step, steps, loss=loss, start=start)
    out = torch.empty_like(x)
    for i in _batches(len(x), s.batch_size, desc, env.progress):
        xb, yb = x[i : i + s.batch_size], y[i : i + s.batch_size]
        best, fooled = None, torch.zeros(len(yb), dtype=torch.bool, device=x.device)
        for r in range(restarts or s.restarts):
            noise = sample_noise(index[i : i + s.batch_size], tuple(x.shape[1:]), s.seed, r).to(x.device) if start == "uniform" else None
            adv = attack(xb, yb, noise=noise)
            with torch.no_grad():
                wrong = model(adv).argmax(dim=1) != yb
            best = adv if best is None else torch.where((wrong & ~fooled).view(-1, 1, 1, 1), adv, best)
            fooled |= wrong
        out[i : i + s.batch_size] = best
    return out


@ATTACKS.register("clean")
def _clean(model, x, y, env):
    return x, None


@ATTACKS.register("fgsm")
def _fgsm(model, x, y, env):
    s = env.settings
    attack = FGSM(model, s.eps)
    return torch.cat([attack(x[i : i + s.batch_size], y[i : i + s.batch_size]) for i in _batches(len(x), s.batch_size, "fgsm", env.progress)] or [x]), None


@ATTACKS.register("pgd20")
def _pgd(model, x, y, env):
    return run_pgd(model, x, y, env, "pgd20", eps=env.settings.eps, steps=env.settings.pgd_steps), None


@ATTACKS.register("cw")
def _cw(model, x, y, env):
    return run_pgd(model, x, y, env, "cw", eps=env.settings.eps, steps=env.settings.cw_steps, loss="cw"), None


@ATTACKS.register("transfer")
def _transfer(model, x, y, env):
    if env.surrogate is None:
        raise UserError("the transfer attack needs a surrogate model: eval.surrogate (or --surrogate) = a run folder or checkpoint")
    return run_pgd(model, x, y, env, "transfer", eps=env.settings.eps, steps=env.settings.pgd_steps, source=env.surrogate), None


class _Collect(logging.Handler):
    """Keeps the warnings pyautoattack logs (its own checks for gradient masking and misuse)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.add(record.getMessage())


def _data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    digest = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
    digest.update(y.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _autoattack(model, x, y, env, name: str, version: str):
    """AutoAttack from `pyautoattack`, its sub-attacks run in AutoAttack's order and settings on the
    points still robust, in chunks, with progress saved to `<state_dir>/<name>_state.json` after
    each round of chunks: an interrupted evaluation resumes to exactly the verdicts of an
    uninterrupted one. (pyautoattack 0.2.0's own state file cannot be read back: it stores the
    attack set as a string, and its resume path leaves `y_adv` undefined.)

    The candidates of each sub-attack are the points of the whole split still robust when it
    starts, stored in the state; chunk j of them goes to rank j mod world_size, and every chunk
    is attacked alone (pyautoattack reseeds per call), so the verdicts depend neither on the
    number of ranks nor on interruptions. The state is tied to the model (parameter hash), the
    data, eps, seed, chunk size and attack list; another evaluation's state is refused.
    pyautoattack's own warnings (its checks, and "Square Attack has decreased the robust
    accuracy") are collected into `env.notes[name]`. Adversarial examples found before a resume
    are not kept, only their verdict."""
    try:
        from pyautoattack import AutoAttack
        from pyautoattack import checks as aa_checks
    except ImportError:
        raise UserError("AutoAttack needs the pyautoattack package: pip install pyautoattack") from None
    s = env.settings
    x_all = env.x_all if env.x_all is not None else x
    y_all = env.y_all if env.y_all is not None else y
    n, chunk, ranks = len(y_all), s.block, env.world_size
    with torch.no_grad():
        num_classes = model(x_all[:1]).shape[1]
    adversary = AutoAttack(model, device=x_all.device, eps=s.eps, norm="Linf", seed=s.seed, version="standard")
    adversary.apgd_targeted.n_target_classes = min(9, num_classes - 1)
    adversary.fab.n_target_classes = min(9, num_classes - 1)
    adversary.verbose = False
    order = ["apgd-ce", "apgd-t"] if version == "fast" else list(adversary.attacks_to_run)
    path = env.state_dir / f"{name}_state.json" if env.state_dir else None
    key = {"model": fingerprint(model), "data": _data_digest(x_all, y_all), "n": n, "attacks": order, "eps": s.eps,
           "seed": s.seed, "chunk": chunk}
    state: dict[str, Any] = {"key": key, "done": [], "candidates": None, "next_chunk": 0, "robust": None, "accuracy": {}, "flags": []}
    if path is not None and path.exists():
        try:
            state = json.loads(path.read_text())
            old = state["key"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not an AutoAttack state of this tool; use another --out") from None
        differ = [k for k in key if old.get(k) != key[k]]
        if differ:
            raise UserError(f"{path} was left by a different AutoAttack evaluation (its {', '.join(differ)} differ); "
                            "use another --out, or delete that file to start over")
    if state["robust"] is None:
        robust = assemble(predict(model, x, s.batch_size) == y, env.sample_index(len(x)), n)
        state.update(robust=robust.tolist(), accuracy={"clean": robust.double().mean().item()})
    robust = torch.tensor(state["robust"], dtype=torch.bool, device=x_all.device)
    x_adv = x_all.clone()
    collect = _Collect()
    adversary.logger.addHandler(collect)
    try:
        for attack in order:
            if attack in state["done"]:
                continue
            if state["candidates"] is None:
                state["candidates"] = torch.nonzero(robust).flatten().tolist()
            candidates = torch.tensor(state["candidates"], dtype=torch.long, device=x_all.device)
            adversary.attacks_to_run = [attack]
            n_chunks = -(-len(candidates) // chunk)
            rounds = range(state["next_chunk"], n_chunks, ranks)
            for first in tqdm(rounds, desc=f"{name}:{attack}", leave=False, disable=None if env.progress else True):
                broken = torch.zeros(n, dtype=torch.bool, device=x_all.device)
                j = first + env.rank
                if j < n_chunks:
                    idx = candidates[j * chunk : (j + 1) * chunk]
                    adv, _ = adversary.run_standard_evaluation(x_all[idx], y_all[idx], batch_size=s.batch_size)
                    hit = predict(model, adv, s.batch_size) != y_all[idx]
                    x_adv[idx[hit]] = adv[hit]
                    broken[idx[hit]] = True
                robust &= ~(all_reduce_sum(broken.int()) > 0)
                flags = set(state["flags"]).union(*gather_objects(sorted(collect.messages)))
                state.update(next_chunk=first + ranks, robust=robust.tolist(), flags=sorted(flags))
                _save_state(path, state, env.rank)
            accuracy = {**state["accuracy"], attack: robust.double().mean().item()}
            state.update(done=state["done"] + [attack], candidates=None, next_chunk=0, accuracy=accuracy)
            _save_state(path, state, env.rank)
        aa_checks.check_square_sr(state["accuracy"], logger=adversary.logger)  # the package's own final check
    finally:
        adversary.logger.removeHandler(collect)
    env.notes[name] = sorted(set(state["flags"]).union(*gather_objects(sorted(collect.messages))))
    mine = env.sample_index(len(x)).to(x_all.device)
    return x_adv[mine], robust[mine]


def _save_state(path: Optional[Path], state: dict[str, Any], rank: int) -> None:
    if path is not None and rank == 0:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(state)))


@ATTACKS.register("autoattack")
def _aa_standard(model, x, y, env):
    return _autoattack(model, x, y, env, "autoattack", "standard")


@ATTACKS.register("autoattack_fast")
def _aa_fast(model, x, y, env):
    return _autoattack(model, x, y, env, "autoattack_fast", "fast")


@ATTACKS.register("square")
def _square(model, x, y, env):
    """Square on chunks of `settings.block` samples (forward passes only: the per-query overhead
    dominates small models); pyautoattack reseeds per call, and a chunk is the same samples
    whatever the number of ranks."""
    try:
        from pyautoattack.square import SquareAttack
    except ImportError:
        raise UserError("the Square attack needs the pyautoattack package: pip install pyautoattack") from None
    s = env.settings
    attack = SquareAttack(model, norm="Linf", n_queries=s.square_queries, eps=s.eps, p_init=0.8, n_restarts=1,
                          seed=s.seed, verbose=False, device=x.device, resc_schedule=False)
    out = [attack.perturb(x[i : i + s.block], y[i : i + s.block]) for i in _batches(len(x), s.block, "square", env.progress)]
    return torch.cat(out or [x]), None


Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(hits: float, n: float, z: float = Z95) -> Optional[list[float]]:
    """The Wilson score interval (95 %) of a binomial proportion hits / n; None when n = 0.
    Unlike the normal approximation it stays inside [0, 1] and is sound for small n and p near 0 or 1."""
    if n <= 0:
        return None
    p = hits / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return [max(0.0, center - half), min(1.0, center + half)]


def class_metrics(correct: torch.Tensor, total: torch.Tensor) -> dict[str, Any]:
    """Metrics from per-class correct counts and per-class totals (1-D tensors of length C), with
    95 % Wilson intervals for the accuracy and for each class's accuracy."""
    correct, total = correct.double(), total.double()
    present = total > 0
    class_acc = torch.where(present, correct / total.clamp_min(1), torch.full_like(total, float("nan")))
    acc = (correct.sum() / total.sum().clamp_min(1)).item()
    valid = class_acc[present]
    mean = valid.mean().item() if len(valid) else float("nan")
    nsd = (valid.std(unbiased=False).item() / mean) if len(valid) and mean > 0 else None
    return {
        "accuracy": acc,
        "accuracy_interval": wilson_interval(correct.sum().item(), total.sum().item()),
        "class_accuracy": [None if torch.isnan(a) else a.item() for a in class_acc],
        "class_interval": [wilson_interval(h, n) for h, n in zip(correct.tolist(), total.tolist())],
        "worst_class_accuracy": valid.min().item() if len(valid) else None,
        "best_class_accuracy": valid.max().item() if len(valid) else None,
        "nsd": nsd,
    }


def sample_metrics(correct: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Class metrics of per-sample correctness over the whole split, and the verdicts themselves
    (`verdicts`: hex of the packed bits, sample order), so that runs can be compared image by image."""
    hits = torch.bincount(y[correct], minlength=num_classes).double()
    total = torch.bincount(y, minlength=num_classes).double()
    return {**class_metrics(hits.cpu(), total.cpu()), "verdicts": pack_verdicts(correct)}


def pack_verdicts(correct: torch.Tensor) -> str:
    return np.packbits(correct.cpu().numpy().astype(np.uint8)).tobytes().hex()


def unpack_verdicts(text: str, n: int) -> np.ndarray:
    """The per-sample booleans of `pack_verdicts` (n: the number of samples)."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def _bounds(x_adv: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """Largest perturbation and the range of the adversarial images, over every rank."""
    local = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64, device=x.device)  # max |delta|, -min, max
    if len(x):
        local = torch.stack([(x_adv - x).abs().amax(), -x_adv.amin(), x_adv.amax()]).double()
    out = all_reduce_max(local).tolist()
    return {"max_linf": out[0], "min": -out[1], "max": out[2]}


def evaluate(
    model: nn.Module,
    split: Split,
    attacks: list[str],
    settings: EvalSettings,
    num_classes: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    surrogate: Optional[nn.Module] = None,
    state_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """Evaluate `model` on `split` under each attack (and the sanity checks if settings.checks).
    Under DDP each rank attacks its blocks of samples and the verdicts are assembled, so every
    number equals that of a single process."""
    from .checks import run_checks

    before = fingerprint(model) if settings.checks else None
    was_training = model.training
    model.eval()
    x_all, y_all, n = split.images(), split.y, len(split)
    mine = owned_indices(n, settings.block, rank, world_size)
    on_device = mine.to(y_all.device)
    x, y = x_all[on_device], y_all[on_device]
    env = AttackEnv(settings, surrogate.eval() if surrogate is not None else None, state_dir, progress, mine,
                    x_all, y_all, rank, world_size)
    correct: dict[str, torch.Tensor] = {}
    bounds: dict[str, dict[str, float]] = {}
    try:
        for name in attacks:
            x_adv, hit = ATTACKS.get(name)(model, x, y, env)
            hit = hit if hit is not None else predict(model, x_adv, settings.batch_size) == y
            correct[name] = assemble(hit, mine, n)
            bounds[name] = _bounds(x_adv, x)
        summary: dict[str, Any] = {
            "attacks": {name: sample_metrics(c, y_all, num_classes) for name, c in correct.items()},
            "settings": {a: settings.describe(a) for a in attacks} | {"common": asdict(settings)},
        }
        if len(attacks) > 1:
            everything = torch.stack(list(correct.values())).all(dim=0)
            summary["robust_to_all"] = {"attacks": list(attacks), **sample_metrics(everything, y_all, num_classes)}
        if "clean" in correct and ROBUST_ATTACK in correct:
            summary["w_robust"] = {
                "value": (summary["attacks"]["clean"]["accuracy"] + summary["attacks"][ROBUST_ATTACK]["accuracy"]) / 2,
                "definition": f"(clean + {ROBUST_ATTACK}) / 2",
            }
        if env.notes:
            summary["autoattack_flags"] = env.notes
        if settings.checks:
            summary["checks"] = run_checks(model, correct, bounds, env, num_classes, before)
    finally:
        model.train(was_training)
    return summary


def subset_of(split: Split, n: Optional[int], what: str, key: str) -> Split:
    """The first n samples of `split`; more than it has is an error, never silently fewer."""
    if n is None:
        return split
    if n > len(split):
        raise UserError(f"{key} = {n} is larger than {what} ({len(split)} images)")
    return split.take(slice(0, n))


def needed_attacks(metric: str) -> list[str]:
    return ["clean"] if metric == "clean" else ["clean", ROBUST_ATTACK]


def selection_score(summary: dict[str, Any], metric: str) -> float:
    """The scalar a run maximises over epochs to pick its best checkpoint."""
    attacks = summary["attacks"]
    clean = attacks["clean"]["accuracy"]
    if metric == "clean":
        return clean
    robust = attacks[ROBUST_ATTACK]
    if metric == "robust":
        return robust["accuracy"]
    if metric == "robust_plus_worst":
        return robust["accuracy"] + (robust["worst_class_accuracy"] or 0.0)
    if metric == "w_robust":
        return (clean + robust["accuracy"]) / 2
    raise ValueError(f"unknown selection metric '{metric}'; use one of {', '.join(SELECTION_METRICS)}")


def evaluate_path(
    target: str,
    overrides: Optional[dict[str, Any]] = None,
    *,
    which: str = "best",
    split: str = "test",
    data: Optional[str] = None,
    data_root: Optional[str] = None,
    model: Optional[str] = None,
    device: str = "auto",
    model_dir: Optional[str] = None,
    state_dir: Optional[Path] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a run folder, a checkpoint file or a RobustBench entry; returns the report.json document.

    A run folder supplies its config (dataset, eps, eval settings); a checkpoint written by this
    tool carries dataset and eps in its metadata; a foreign checkpoint needs `data`, `model` and
    an eps in `overrides`. `overrides` are EvalConfig fields (attacks, eps, subset, ...).
    """
    eval_cfg, data_cfg, default_eps, teachers = EvalConfig(), None, None, {}
    path = Path(target)
    if not is_robustbench(target):
        ckpt = model_checkpoint(path, which)
        if path.is_dir():
            cfg = load_config(path / "config.yaml")
            data_cfg, eval_cfg, default_eps, teachers = cfg.data, cfg.eval, cfg.attack.eps, cfg.teachers
        else:
            meta = read_model_meta(ckpt) if ckpt.suffix == ".safetensors" else None
            data_cfg = build(DataConfig, meta["data"], "data") if meta and "data" in meta else None
            default_eps = meta.get("eps") if meta else None
    if data is not None and (data_cfg is None or data_cfg.name != data):
        data_cfg = DataConfig(name=data)
    if data_cfg is None:
        raise UserError(f"{target} does not say which dataset it belongs to; pass --data NAME (and --data-root)")
    if data_root is not None:
        data_cfg.root = data_root
    data_cfg.validate()
    eval_cfg = dataclasses.replace(eval_cfg, **{k: v for k, v in (overrides or {}).items() if v is not None})
    eval_cfg.validate()
    if eval_cfg.eps is None and default_eps is None:
        raise UserError("no eps known for this model; pass --eps (e.g. --eps 8/255)")
    settings = EvalSettings.from_config(eval_cfg, default_eps)
    dev = resolve_device(device, DistInfo())
    dataset = load_dataset(data_cfg, dev)
    if is_robustbench(target):
        net, spec, ckpt = load_robustbench(target, dataset, model_dir)
    else:
        spec = ModelSpec(model, dataset.num_classes, dataset.channels) if model is not None else None
        net, meta = load_model(ckpt, spec)
        spec = spec or ModelSpec(**meta["spec"])
    net = net.to(dev)
    surrogate = load_surrogate(eval_cfg, teachers, dataset, dev)
    chosen = subset_of(dataset.split(split), eval_cfg.subset, f"the {split} split", "eval.subset (--subset)")
    summary = evaluate(net, chosen, eval_cfg.attacks, settings, dataset.num_classes, progress=progress,
                       surrogate=surrogate, state_dir=state_dir)
    return build_report(summary, spec, ckpt, dataset, split, len(chosen), settings.seed)
