"""The MLP head: a small network on crop-view embeddings, each labelled with its image's label.

An image's logits are the mean of its crop-views' logits. Averaging logits and averaging
log-probabilities give the same softmax (the two differ by a per-view constant, the log of
the normaliser, which cancels), so the choice is about what is stored: logits, because
temperature scaling and fusion are defined on logits.

Training: standardised inputs (mean/std of the training rows, kept as buffers in the
weights file), AdamW, linear warm-up then cosine decay per step, cross-entropy with
optional inverse-frequency class weights and label smoothing, optional MixUp, and early
stopping on the image-level NLL of an inner split the caller carves from the training folds.
Deterministic on the CPU for a given seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from histoembed import store
from histoembed.config import MLPSettings
from histoembed.errors import UserError
from histoembed.heads.calibration import temperature_nll
from histoembed.heads.shared import class_weights, image_mean

WEIGHTS_FILE = "mlp.safetensors"
INFO_FILE = "mlp.json"


def _net(input_dim: int, n_classes: int, s: MLPSettings):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("input_mean", torch.zeros(input_dim))
            self.register_buffer("input_std", torch.ones(input_dim))
            layers: list[nn.Module] = [nn.Dropout(s.dropout)]
            width = input_dim
            for _ in range(s.depth):
                layers += [nn.Linear(width, s.hidden), nn.GELU(), nn.Dropout(s.dropout)]
                width = s.hidden
            layers.append(nn.Linear(width, n_classes))
            self.layers = nn.Sequential(*layers)

        def forward(self, x):
            return self.layers((x - self.input_mean) / self.input_std)

    return Net()


def input_scale(std):
    """Per-dimension divisor: the std, but never below 1% of the median std. A feature that is
    (nearly) constant in the training folds, e.g. a ReLU channel that never fires, would
    otherwise blow up the first time it moves on a held-out image."""
    return std.clamp_min(max(1e-6, 0.01 * float(std.median())))


MIN_STEPS_PER_EPOCH = 8


def effective_batch_size(rows: int, batch_size: int) -> int:
    """``batch_size``, made smaller for small training sets so an epoch has at least 8 steps
    (otherwise a few hundred crop-views would get one update per epoch and barely train)."""
    return max(1, min(batch_size, math.ceil(rows / MIN_STEPS_PER_EPOCH)))


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay towards 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class MLPHead:
    """Fit on crop-view rows; ``row_logits`` gives one logit vector per row."""

    def __init__(self, settings: MLPSettings, n_classes: int, seed: int = 0):
        self.settings = settings
        self.n_classes = n_classes
        self.seed = seed
        self.net_ = None
        self.best_epoch_ = None
        self.epochs_run_ = 0
        self.stop_nll_ = None

    # ------------------------------------------------------------ training
    def fit(self, X: np.ndarray, y: np.ndarray, X_stop: np.ndarray, y_stop: np.ndarray,
            stop_image: np.ndarray) -> MLPHead:
        """Train on (X, y); stop early on the image-level NLL of the rows (X_stop, y_stop).

        ``stop_image`` gives each stopping row's image (any integers), so the criterion is
        computed on image logits, the quantity the head is judged by.
        """
        import torch
        import torch.nn.functional as F

        s, C = self.settings, self.n_classes
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        X = torch.from_numpy(np.array(X, dtype=np.float32))
        y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
        net = _net(X.shape[1], C, s)
        with torch.no_grad():
            net.input_mean.copy_(X.mean(0))
            net.input_std.copy_(input_scale(X.std(0)))
        weight = torch.tensor(class_weights(np.asarray(y), C), dtype=torch.float32) if s.class_weights else None

        _, stop_img = np.unique(np.asarray(stop_image), return_inverse=True)
        n_stop_images = int(stop_img.max()) + 1 if len(stop_img) else 0
        stop_labels = np.zeros(n_stop_images, dtype=np.int64)
        stop_labels[stop_img] = np.asarray(y_stop)

        opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        batch_size = effective_batch_size(len(X), s.batch_size)
        steps_per_epoch = math.ceil(len(X) / batch_size)
        total, warmup = s.epochs * steps_per_epoch, s.warmup_epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, total))
        gen = torch.Generator().manual_seed(self.seed)

        best, best_state, waited = math.inf, None, 0
        for epoch in range(s.epochs):
            net.train()
            order = torch.randperm(len(X), generator=gen)
            for start in range(0, len(X), batch_size):
                idx = order[start:start + batch_size]
                xb, yb = X[idx], y_t[idx]
                if s.mixup_alpha > 0:
                    lam = float(rng.beta(s.mixup_alpha, s.mixup_alpha))
                    perm = torch.randperm(len(idx), generator=gen)
                    logits = net(lam * xb + (1 - lam) * xb[perm])
                    loss = (lam * F.cross_entropy(logits, yb, weight=weight, label_smoothing=s.label_smoothing)
                            + (1 - lam) * F.cross_entropy(logits, yb[perm], weight=weight,
                                                          label_smoothing=s.label_smoothing))
                else:
                    loss = F.cross_entropy(net(xb), yb, weight=weight, label_smoothing=s.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            self.net_ = net
            self.epochs_run_ = epoch + 1
            if n_stop_images == 0:
                best_state, self.best_epoch_ = None, epoch + 1
                continue
            z = image_mean(self.row_logits(X_stop), stop_img, n_stop_images)
            stop_nll = temperature_nll(z, stop_labels, 1.0)
            if stop_nll < best - 1e-6:
                best, waited, self.best_epoch_ = stop_nll, 0, epoch + 1
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                waited += 1
                if waited >= s.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        self.net_ = net.eval()
        self.stop_nll_ = None if best is math.inf else float(best)
        return self

    # ------------------------------------------------------------ inference
    def row_logits(self, X: np.ndarray, chunk: int = 8192) -> np.ndarray:
        import torch

        self.net_.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(X), chunk):
                xb = torch.from_numpy(np.array(X[start:start + chunk], dtype=np.float32))
                out.append(self.net_(xb).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.n_classes), np.float32)

    # ------------------------------------------------------------ files
    def save(self, folder: Path, classes: list[str]) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {k: v.contiguous() for k, v in self.net_.state_dict().items()}
        with store.atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        store.write_json({"settings": self.settings.model_dump(), "input_dim": int(tensors["input_mean"].shape[0]),
                          "classes": classes, "seed": self.seed, "best_epoch": self.best_epoch_,
                          "epochs_run": self.epochs_run_, "stop_nll": self.stop_nll_,
                          "image_logits": "mean of crop-view logits",
                          "input_normalisation": "(x - input_mean) / input_std, tensors in " + WEIGHTS_FILE},
                         folder / INFO_FILE)

    @classmethod
    def load(cls, folder: Path) -> tuple[MLPHead, dict]:
        from safetensors.torch import load_file

        folder = Path(folder)
        info = store.read_json(folder / INFO_FILE, "MLP settings", hint="re-run `histoembed fit`")
        head = cls(MLPSettings.model_validate(info["settings"]), len(info["classes"]), info.get("seed", 0))
        net = _net(int(info["input_dim"]), len(info["classes"]), head.settings)
        path = folder / WEIGHTS_FILE
        if not path.exists():
            raise UserError("model file missing", path=path, hint="re-run `histoembed fit`")
        net.load_state_dict(load_file(str(path)), strict=True)
        head.net_ = net.eval()
        return head, info
