"""The MLP head: a small network on crop-view embeddings, each labelled with its image's label.

An image's logits are the mean of its crop-views' logits. Averaging logits and averaging
log-probabilities give the same softmax (the two differ by a per-view constant, the log of
the normaliser, which cancels), so the choice is about what is stored: logits, because
temperature scaling and fusion are defined on logits.

Training: standardised inputs (mean/std of the training rows, kept as buffers in the
weights file), cross-entropy with optional inverse-frequency class weights and label
smoothing, optional MixUp, and the shared loop of ``training`` (AdamW, warm-up + cosine,
early stopping on the image-level NLL of the caller's inner split).
"""

from __future__ import annotations

import numpy as np

from histoembed.core.config import MLPSettings
from histoembed.models.heads.base import Bags
from histoembed.models.heads.calibration import temperature_nll
from histoembed.models.heads.indexing import class_weights
from histoembed.models.heads.training import TorchHead, input_scale, train

WEIGHTS_FILE = "mlp.safetensors"


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


class MLPHead(TorchHead):
    """Trained on crop-view rows, each with its image's label; a bag's logits are its rows' mean."""

    name = "mlp"
    weights_file = WEIGHTS_FILE
    gives_attention = False      # each crop-view row is scored alone
    scores_crops = True          # row_logits: the crop maps colour crops by it
    Settings = MLPSettings
    build_net = staticmethod(_net)
    description = "MLP on crop-view embeddings (the reference recipe)"

    def fit(self, bags: Bags, y: np.ndarray, stop: Bags, y_stop: np.ndarray) -> MLPHead:
        """Train on the rows of ``bags`` (in memory, or minibatches from runs of bags of a streamed cohort); stop
        early on the image-level NLL of ``stop``."""
        import torch

        s, C = self.settings, self.n_classes
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        net = _net(bags.dim, C, s)
        if bags.fits_in_memory():
            X = torch.from_numpy(bags.X)
            take, shuffle = (lambda idx: X[idx]), None
            mean, std = X.mean(0), X.std(0)
        else:   # a fold of a streamed cohort: minibatches drawn from runs of bags, each bag read once an epoch
            take, shuffle = (lambda idx: torch.from_numpy(bags.rows_at(idx.numpy()))), bags.local_order
            mean, std = (torch.from_numpy(m) for m in bags.row_moments())
        with torch.no_grad():
            net.input_mean.copy_(mean)
            net.input_std.copy_(input_scale(std))
        self.net_, self.input_dim_ = net, int(bags.dim)
        if self.objective.outcome:   # survival (Cox) or regression: every row carries its image's outcome
            _, outcome_loss, stop_nll = self.outcome_training(np.asarray(y)[bags.row_bag], stop, y_stop)
            batch_loss = lambda idx: outcome_loss(net(take(idx)), idx)  # noqa: E731
        else:
            batch_loss, stop_nll = self._class_training(take, np.asarray(y, dtype=np.int64)[bags.row_bag], rng,
                                                        stop, y_stop)
        done = train(net, len(bags.row_bag), batch_loss, stop_nll, lr=s.lr, weight_decay=s.weight_decay,
                     epochs=s.epochs, warmup_epochs=s.warmup_epochs, batch_size=s.batch_size, patience=s.patience,
                     seed=self.seed, shuffle=shuffle)
        self.best_epoch_, self.epochs_run_, self.stop_nll_ = done.best_epoch, done.epochs_run, done.stop_nll
        return self

    def _class_training(self, take, y_rows: np.ndarray, rng, stop: Bags, y_stop: np.ndarray):
        """(cross-entropy batch loss with class weights, smoothing and MixUp; the inner split's NLL or None).
        ``take(idx)``: the rows ``idx`` as a tensor."""
        import torch
        import torch.nn.functional as F

        s, C, net = self.settings, self.n_classes, self.net_
        y_t = torch.from_numpy(y_rows)
        weight = torch.tensor(class_weights(y_rows, C), dtype=torch.float32) if s.class_weights else None
        gen = torch.Generator().manual_seed(self.seed + 1)

        def batch_loss(idx):
            xb, yb = take(idx), y_t[idx]
            if s.mixup_alpha > 0:
                lam = float(rng.beta(s.mixup_alpha, s.mixup_alpha))
                perm = torch.randperm(len(idx), generator=gen)
                logits = net(lam * xb + (1 - lam) * xb[perm])
                return (lam * F.cross_entropy(logits, yb, weight=weight, label_smoothing=s.label_smoothing)
                        + (1 - lam) * F.cross_entropy(logits, yb[perm], weight=weight,
                                                      label_smoothing=s.label_smoothing))
            return F.cross_entropy(net(xb), yb, weight=weight, label_smoothing=s.label_smoothing)

        stop_labels = stop.image_labels(y_stop)
        stop_nll = (lambda: temperature_nll(stop.per_image(self.predict(stop)), stop_labels, 1.0)) \
            if stop.n_bags else None
        return batch_loss, stop_nll

    def row_logits(self, X: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Logits of each crop-view row."""
        import torch

        self.net_.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(X), chunk):
                xb = torch.from_numpy(np.array(X[start:start + chunk], dtype=np.float32))
                out.append(self.net_(xb).numpy())
        return self.to_target(np.concatenate(out)) if out else np.zeros((0, self.n_classes), np.float32)

    def predict(self, bags: Bags) -> np.ndarray:
        if bags.n_bags == 0:
            return np.zeros((0, self.n_classes), np.float32)
        rows = np.concatenate([self.row_logits(x) for x in bags.row_chunks(8192)]).astype(np.float64)
        return (np.add.reduceat(rows, bags.starts[:-1], axis=0) / bags.sizes[:, None]).astype(np.float32)

    def fitted_info(self) -> dict:
        return {**super().fitted_info(), "image_logits": "mean of crop-view logits"}
