"""Reference-style training steps for the speed benchmarks: the structure of the official scripts
(zhaoshiji123/ABSLD resnet18_absld_cifar10.py and absld_loss.py; zhaoshiji123/MTARD-extension
resnet18_mtard_cifar10.py; zibojia/RSLAD rslad_train.py), written here from their structure, not
copied, with the same models, data, batch and hyperparameters as the robustdistill side:

- data: a torch Dataset whose __getitem__ pads, crops and flips one image at a time, behind a
  DataLoader (shuffle, `workers` processes; 0 by default, as the MTARD script), moved to the
  device batch by batch;
- fp32, separate teacher calls, the inner maximisation as the scripts write it (a fresh forward of
  the clean input for nothing else, clamp-then-project), `loss.item()` every 100 steps;
- ABSLD: the class temperatures applied to the teacher's logits and the class-wise losses
  accumulated in per-sample Python loops, as the official script does;
- B-MTARD: the temperature and weight updates on Python floats read back with `.item()` every step.

Each `Reference*` object has `step(x, y)` (one optimisation step) and `loader()` (the batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


class PerSampleAugment(Dataset):
    """Images (N, C, H, W) in [0, 1] on the CPU; random crop with zero padding and a random flip per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int, flip: bool):
        self.images, self.labels, self.padding, self.flip = images, labels, padding, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.padding:
            p, (h, w) = self.padding, image.shape[1:]
            padded = F.pad(image, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            image = padded[:, top : top + h, left : left + w]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[i]


def kl_elementwise(log_p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The scripts' `kl_loss(a, b) = -a b + log(b + 1e-5) b`, averaged over every element."""
    return (-log_p * q + torch.log(q + 1e-5) * q).mean()


def inner_kl(student, target_logits, x, step_size, eps, steps):
    """ABSLD/RSLAD's inner maximisation: KL to the teacher's softmax, from x + 0.001 N(0, 1)."""
    student.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.kl_div(F.log_softmax(student(x_adv), dim=1), F.softmax(target_logits, dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    student.train()
    return x_adv.clamp(0.0, 1.0).detach()


def inner_ce(student, x, y, step_size, eps, steps):
    """MTARD's inner maximisation: the student's cross-entropy, from x + 0.001 N(0, 1)."""
    student.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(student(x_adv), y)
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    student.train()
    return x_adv.detach()


class _Reference:
    def __init__(self, student: nn.Module, teachers: dict[str, nn.Module], data, hp: dict, device, workers: int = 0):
        self.student, self.teachers, self.hp, self.device = student, teachers, hp, device
        self.optimizer = torch.optim.SGD(
            student.parameters(), lr=hp["lr"], momentum=0.9, weight_decay=hp["weight_decay"]
        )
        images, labels = data
        self.dataset = PerSampleAugment(images.cpu(), labels.cpu(), hp["padding"], hp["flip"])
        self.workers = workers
        self.count = 0

    def loader(self):
        return DataLoader(self.dataset, batch_size=self.hp["batch_size"], shuffle=True, num_workers=self.workers)

    def _finish(self, loss):
        loss.backward()
        self.optimizer.step()
        if self.count % 100 == 0:
            print_loss = loss.item()  # the scripts print the loss every 100 steps
            del print_loss
        self.count += 1


class ReferenceRSLAD(_Reference):
    def step(self, x, y):
        x, y = x.float().to(self.device), y.to(self.device)
        self.student.train()
        self.optimizer.zero_grad()
        with torch.no_grad():
            teacher_logits = self.teachers["robust"](x)
        x_adv = inner_kl(self.student, teacher_logits, x, self.hp["step_size"], self.hp["eps"], self.hp["steps"])
        adv_logits = self.student(x_adv)
        nat_logits = self.student(x)
        q = F.softmax(teacher_logits, dim=1)
        loss = 5 / 6 * kl_elementwise(F.log_softmax(adv_logits, dim=1), q) + 1 / 6 * kl_elementwise(
            F.log_softmax(nat_logits, dim=1), q
        )
        self._finish(loss)


class ReferenceABSLD(_Reference):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.hp["num_classes"]
        self.temp_adv = torch.ones(c, device=self.device)
        self.temp_nat = torch.ones(c, device=self.device)
        self.loss_adv = torch.zeros(c, device=self.device)
        self.loss_nat = torch.zeros(c, device=self.device)

    def step(self, x, y):
        x, y = x.float().to(self.device), y.to(self.device)
        self.student.train()
        self.optimizer.zero_grad()
        with torch.no_grad():
            teacher_logits = self.teachers["robust"](x).detach()
            logits_adv, logits_nat = teacher_logits.clone(), teacher_logits.clone()
            for i in range(y.shape[0]):  # the official per-sample temperature loop
                logits_adv[i] = logits_adv[i] / self.temp_adv[y[i]]
                logits_nat[i] = logits_nat[i] / self.temp_nat[y[i]]
        x_adv = inner_kl(self.student, logits_adv, x, self.hp["step_size"], self.hp["eps"], self.hp["steps"])
        adv = self.student(x_adv)
        self.student.train()
        nat = self.student(x)
        with torch.no_grad():
            ce_adv = F.cross_entropy(adv.detach(), y, reduction="none")
            ce_nat = F.cross_entropy(nat.detach(), y, reduction="none")
            for i in range(y.shape[0]):  # the official per-sample class-loss accumulation
                self.loss_adv[y[i]] = self.loss_adv[y[i]] + ce_adv[i]
                self.loss_nat[y[i]] = self.loss_nat[y[i]] + ce_nat[i]
        loss = 5 / 6 * kl_elementwise(torch.log(F.softmax(adv, dim=1)), F.softmax(logits_adv, dim=1)) + 1 / 6 * (
            kl_elementwise(torch.log(F.softmax(nat, dim=1)), F.softmax(logits_nat, dim=1))
        )
        self._finish(loss)


class ReferenceBMTARD(_Reference):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.temp_adv, self.temp_nat = 1.0, 1.0
        self.weight = {"adv": 0.5, "nat": 0.5}
        self.init = None

    def step(self, x, y):
        x, y = x.float().to(self.device), y.to(self.device)
        self.student.train()
        self.optimizer.zero_grad()
        x_adv = inner_ce(self.student, x, y, self.hp["step_size"], self.hp["eps"], self.hp["steps"])
        adv = self.student(x_adv)
        with torch.no_grad():
            teacher_adv = self.teachers["robust"](x_adv)
        nat = self.student(x)
        with torch.no_grad():
            teacher_nat = self.teachers["clean"](x)
        q_adv, q_nat = F.softmax(teacher_adv / self.temp_adv, dim=1), F.softmax(teacher_nat / self.temp_nat, dim=1)
        loss_adv = kl_elementwise(F.log_softmax(adv, dim=1), q_adv)
        loss_nat = kl_elementwise(F.log_softmax(nat, dim=1), q_nat)
        h_adv = (torch.log(q_adv + 1e-5) * q_adv).mean()
        h_nat = (torch.log(q_nat + 1e-5) * q_nat).mean()
        rate = 0.001
        self.temp_adv = min(max(self.temp_adv - rate * torch.sign(h_adv / h_nat - 1).item(), 1.0), 10.0)
        self.temp_nat = min(max(self.temp_nat - rate * torch.sign(h_nat / h_adv - 1).item(), 1.0), 10.0)
        if self.init is None:
            self.init = (loss_adv.item(), loss_nat.item())
        l_adv, l_nat = loss_adv.item() / self.init[0], loss_nat.item() / self.init[1]
        avg = (l_adv + l_nat) / 2
        r_adv, r_nat = l_adv / avg, l_nat / avg
        w = self.weight
        w["nat"] = max(w["nat"] - 0.025 * (w["nat"] - r_nat / (r_adv + r_nat)), 0.0)
        w["adv"] = max(w["adv"] - 0.025 * (w["adv"] - r_adv / (r_adv + r_nat)), 0.0)
        total = w["adv"] + w["nat"]
        w["adv"], w["nat"] = w["adv"] / total, w["nat"] / total
        self._finish(w["adv"] * loss_adv + w["nat"] * loss_nat)


REFERENCES = {"rslad": ReferenceRSLAD, "absld": ReferenceABSLD, "bmtard": ReferenceBMTARD}


def reference_robust_eval(student, images, labels, eps, step_size, steps=20, batch=100):
    """The scripts' per-epoch robust accuracy: `attack_pgd` (uniform start, step, clamp to [0, 1],
    then project) on every batch of 100, predictions read back with numpy."""
    student.eval()
    right = 0
    for i in range(0, len(labels), batch):
        x, y = images[i : i + batch], labels[i : i + batch]
        x_adv = (x + torch.zeros_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_()
            loss = F.cross_entropy(student(x_adv), y)
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = (x_adv.detach() + step_size * torch.sign(grad)).clamp(0, 1)
            x_adv = (x + (x_adv - x).clamp(-eps, eps)).detach()
        with torch.no_grad():
            right += int((student(x_adv).argmax(1).cpu().numpy() == y.cpu().numpy()).sum())
    student.train()
    return right / len(labels)
