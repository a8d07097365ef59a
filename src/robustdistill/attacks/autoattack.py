"""AutoAttack (Croce & Hein, 2020) from the `pyautoattack` package, resumable and rank-independent."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from pyautoattack import AutoAttack as _PackageAutoAttack
from pyautoattack import checks as aa_checks
from tqdm.auto import tqdm

from ..core.distributed import all_reduce_sum, assemble, gather_objects
from ..core.errors import UserError
from ..models import fingerprint
from ..models.fold import eval_view, release
from ..storage.files import atomic_write
from .base import Attack, predict, register


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


def _state_digest(state: dict[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _save_state(path: Optional[Path], state: dict[str, Any], rank: int) -> None:
    """The state with its digest: an edited (or truncated) state is refused on resume, never trusted."""
    if path is not None and rank == 0:
        text = json.dumps({**state, "digest": _state_digest(state)})
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@register
class AutoAttack(Attack):
    """AutoAttack "standard": APGD-CE, APGD-T, FAB-T, Square, in AutoAttack's order and settings,
    each on the points still robust, in chunks, with progress saved to
    `<state_dir>/<name>_state.json` after each round of chunks: an interrupted evaluation resumes
    to exactly the verdicts of an uninterrupted one. (pyautoattack 0.2.0's own state file cannot
    be read back: it stores the attack set as a string, and its resume path leaves `y_adv`
    undefined.)

    The candidates of each sub-attack are the points of the whole split still robust when it
    starts, stored in the state; chunk j of them goes to rank j mod world_size, and every chunk
    is attacked alone (pyautoattack reseeds per call), so the verdicts depend neither on the
    number of ranks nor on interruptions. The state is tied to the model (parameter hash), the
    data, eps, seed, chunk size and attack list; another evaluation's state is refused. The
    sub-attacks search on the model with its batch norms folded into its convolutions (the view
    PGD steps on, `eval.fold_batchnorm`: the same function up to float rounding, about a fifth
    faster on the digits students), and every verdict is the model's own prediction on the example.
    pyautoattack's own warnings (its checks, and "Square Attack has decreased the robust
    accuracy") are collected into `env.notes[name]`. Adversarial examples found before a resume
    are not kept, only their verdict."""

    name = "autoattack"
    autoattack = True
    suite = True
    version = "standard"  # pyautoattack's version: its attacks and their settings
    help = "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square; pyautoattack), resumable"

    def parameters(self, s):
        return {"eps": s.eps, "version": self.version, "package": "pyautoattack", "folded_search": s.fold_batchnorm}

    def sub_attacks(self, adversary) -> list[str]:
        return list(adversary.attacks_to_run)

    def run(self, model, x, y, env):
        s, name = env.settings, self.name
        x_all = env.x_all if env.x_all is not None else x
        y_all = env.y_all if env.y_all is not None else y
        with torch.no_grad():
            num_classes = model(x_all[:1]).shape[1]
        # the sub-attacks search on the folded view (as PGD does: `eval.fold_batchnorm`), the verdicts
        # are the model's own (`_sub_attack` predicts on `model`)
        searched = eval_view(model) if s.fold_batchnorm else model
        adversary = _PackageAutoAttack(
            searched, device=x_all.device, eps=s.eps, norm=s.norm, seed=s.seed, version=self.version
        )
        adversary.apgd_targeted.n_target_classes = min(9, num_classes - 1)
        adversary.fab.n_target_classes = min(9, num_classes - 1)
        adversary.verbose = False
        order = self.sub_attacks(adversary)
        path = env.state_dir / f"{name}_state.json" if env.state_dir else None
        key = {
            "model": fingerprint(model),
            "data": _data_digest(x_all, y_all),
            "n": len(y_all),
            "attacks": order,
            "eps": s.eps,
            "norm": s.norm,
            "seed": s.seed,
            "chunk": s.block,
            "folded": s.fold_batchnorm,
        }
        state = _load_state(path, key)
        if state["robust"] is None:
            robust = assemble(predict(model, x, s.batch_size) == y, env.sample_index(len(x)), len(y_all))
            state.update(robust=robust.tolist(), accuracy={"clean": robust.double().mean().item()})
        robust = torch.tensor(state["robust"], dtype=torch.bool, device=x_all.device)
        x_adv = x_all.clone()
        collect = _Collect()
        adversary.logger.addHandler(collect)
        try:
            for attack in order:
                if attack not in state["done"]:
                    self._sub_attack(attack, adversary, model, x_all, y_all, x_adv, robust, state, path, env, collect)
            aa_checks.check_square_sr(state["accuracy"], logger=adversary.logger)  # the package's own final check
        finally:
            adversary.logger.removeHandler(collect)
            release(model)
        env.notes[name] = sorted(set(state["flags"]).union(*gather_objects(sorted(collect.messages))))
        env.parts[name] = dict(state["accuracy"])
        mine = env.sample_index(len(x)).to(x_all.device)
        return x_adv[mine], robust[mine]

    def _sub_attack(self, attack, adversary, model, x_all, y_all, x_adv, robust, state, path, env, collect) -> None:
        """One sub-attack on the points still robust when it starts (its candidates, kept in the state),
        chunk j on rank j mod world_size, the state saved after each round of chunks; `robust` and
        `x_adv` updated in place."""
        s, n, chunk, ranks = env.settings, len(y_all), env.settings.block, env.world_size
        if state["candidates"] is None:
            state["candidates"] = torch.nonzero(robust).flatten().tolist()
        candidates = torch.tensor(state["candidates"], dtype=torch.long, device=x_all.device)
        adversary.attacks_to_run = [attack]
        n_chunks = -(-len(candidates) // chunk)
        rounds = range(state["next_chunk"], n_chunks, ranks)
        for first in tqdm(rounds, desc=f"{self.name}:{attack}", leave=False, disable=None if env.progress else True):
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


# keys a state written before they existed holds implicitly
_KEY_DEFAULTS = {"norm": "Linf"}


def _load_state(path: Optional[Path], key: dict[str, Any]) -> dict[str, Any]:
    """The saved state of this evaluation (its digest intact, its key this evaluation's), or a new one."""
    fresh = {"key": key, "done": [], "candidates": None, "next_chunk": 0, "robust": None, "accuracy": {}, "flags": []}
    if path is None or not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
        old = state["key"]
        intact = state.get("digest") == _state_digest(state)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path} is not an AutoAttack state of this tool; use another --out") from None
    if not intact:
        raise UserError(
            f"{path} was changed since this tool wrote it (its digest does not match): its verdicts cannot be "
            "trusted; delete it to start this attack over, or use another --out"
        )
    state.pop("digest")
    differ = [k for k in key if old.get(k, _KEY_DEFAULTS.get(k)) != key[k]]
    if differ:
        raise UserError(
            f"{path} was left by a different AutoAttack evaluation (its {', '.join(differ)} "
            f"{'differs' if len(differ) == 1 else 'differ'}); "
            "use another --out, or delete that file to start over"
        )
    return state


@register
class AutoAttackFast(AutoAttack):
    name = "autoattack_fast"
    help = "AutoAttack's APGD-CE and APGD-T only, resumable"

    def parameters(self, s):
        return {
            "eps": s.eps,
            "attacks": ["apgd-ce", "apgd-t"],
            "package": "pyautoattack",
            "folded_search": s.fold_batchnorm,
        }

    def sub_attacks(self, adversary) -> list[str]:
        return ["apgd-ce", "apgd-t"]


class _Part(AutoAttack):
    """One part of AutoAttack standard, alone, with the standard version's settings (resumable and
    rank-independent as the whole): the points it breaks, on every point the clean model gets right."""

    suite = False
    part = ""

    def parameters(self, s):
        return {
            "eps": s.eps,
            "attacks": [self.part],
            "version": "standard",
            "package": "pyautoattack",
            "folded_search": s.fold_batchnorm,
        }

    def sub_attacks(self, adversary) -> list[str]:
        return [self.part]


@register
class APGDCE(_Part):
    name, part = "apgd_ce", "apgd-ce"
    help = "AutoAttack's APGD-CE alone (100 iterations, 5 restarts), resumable"


@register
class APGDT(_Part):
    name, part = "apgd_t", "apgd-t"
    help = "AutoAttack's APGD-T alone (targeted DLR, 100 iterations, up to 9 target classes), resumable"


@register
class FABT(_Part):
    name, part = "fab_t", "fab-t"
    help = "AutoAttack's FAB-T alone (targeted, up to 9 target classes), resumable"


@register
class AutoAttackRand(AutoAttack):
    """AutoAttack's version for randomised defences: APGD-CE and APGD-DLR with 20 EOT iterations."""

    name = "autoattack_rand"
    version = "rand"
    suite = False  # on a randomised model PGD-20's verdicts are themselves random: no order between them
    help = "AutoAttack rand, for randomised models (APGD-CE, APGD-DLR, 20 EOT iterations each), resumable"
