"""Gated attention-MIL (Ilse et al. 2018): one bag per (image, view), its crops the instances.

Each crop embedding (standardised) goes through ``Linear -> GELU -> Dropout`` to a hidden
vector h; the gated attention score ``w . (tanh(V h) * sigmoid(U h))``, softmaxed over the
bag's crops, weights the h into one bag vector, and a linear layer gives the bag's logits.
Unlike the MLP, which labels every crop with its image's label, MIL learns *which* crops
carry the label; ``attention(bags)`` exposes those weights (the report's crop maps).

Training: bags padded to the largest bag with a mask, cross-entropy with optional class
weights and label smoothing, and the shared loop of ``training`` (early stopping on the
image-level NLL of the caller's inner split). Weights in safetensors, settings in JSON.
"""

from __future__ import annotations

import numpy as np

from histoembed.core.config import ABMILSettings
from histoembed.models.heads.base import Bags
from histoembed.models.heads.calibration import temperature_nll
from histoembed.models.heads.shared import class_weights
from histoembed.models.heads.training import TorchHead, input_scale, train

WEIGHTS_FILE = "abmil.safetensors"


def _net(input_dim: int, n_classes: int, s: ABMILSettings):
    import torch
    from torch import nn

    class GatedABMIL(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("input_mean", torch.zeros(input_dim))
            self.register_buffer("input_std", torch.ones(input_dim))
            self.embed = nn.Sequential(nn.Dropout(s.dropout), nn.Linear(input_dim, s.hidden), nn.GELU(),
                                       nn.Dropout(s.dropout))
            self.attention_v = nn.Linear(s.hidden, s.attention)
            self.attention_u = nn.Linear(s.hidden, s.attention)
            self.attention_w = nn.Linear(s.attention, 1)
            self.classifier = nn.Linear(s.hidden, n_classes)

        def forward(self, x, mask):
            """x [B, K, D], mask [B, K] -> (logits [B, C], attention [B, K])."""
            h = self.embed((x - self.input_mean) / self.input_std)
            score = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))
            a = torch.softmax(score.squeeze(-1).masked_fill(~mask, float("-inf")), dim=1)
            return self.classifier((a.unsqueeze(-1) * h).sum(1)), a

    return GatedABMIL()


class ABMILHead(TorchHead):
    name = "abmil"
    weights_file = WEIGHTS_FILE
    Settings = ABMILSettings
    build_net = staticmethod(_net)
    description = "gated attention-MIL over each view's crops (attention weights for the crop maps)"

    def fit(self, bags: Bags, y: np.ndarray, stop: Bags, y_stop: np.ndarray) -> ABMILHead:
        import torch
        import torch.nn.functional as F

        s, C = self.settings, self.n_classes
        torch.manual_seed(self.seed)
        padded, mask = bags.padded()
        X, M = torch.from_numpy(padded), torch.from_numpy(mask)
        y = np.asarray(y, dtype=np.int64)
        y_t = torch.from_numpy(y)
        net = _net(bags.X.shape[1], C, s)
        with torch.no_grad():
            rows = torch.from_numpy(bags.X)
            net.input_mean.copy_(rows.mean(0))
            net.input_std.copy_(input_scale(rows.std(0)))
        weight = torch.tensor(class_weights(y, C), dtype=torch.float32) if s.class_weights else None
        self.net_, self.input_dim_ = net, int(bags.X.shape[1])

        def batch_loss(idx):
            logits, _ = net(X[idx], M[idx])
            return F.cross_entropy(logits, y_t[idx], weight=weight, label_smoothing=s.label_smoothing)

        stop_labels = stop.image_labels(y_stop)
        stop_nll = (lambda: temperature_nll(stop.per_image(self.predict(stop)), stop_labels, 1.0)) \
            if stop.n_bags else None
        done = train(net, bags.n_bags, batch_loss, stop_nll, lr=s.lr, weight_decay=s.weight_decay, epochs=s.epochs,
                     warmup_epochs=s.warmup_epochs, batch_size=s.batch_size, patience=s.patience, seed=self.seed)
        self.best_epoch_, self.epochs_run_, self.stop_nll_ = done.best_epoch, done.epochs_run, done.stop_nll
        return self

    def _forward(self, bags: Bags, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        import torch

        padded, mask = bags.padded()
        logits, attention = [], []
        self.net_.eval()
        with torch.inference_mode():
            for start in range(0, bags.n_bags, chunk):
                z, a = self.net_(torch.from_numpy(padded[start:start + chunk]),
                                 torch.from_numpy(mask[start:start + chunk]))
                logits.append(z.numpy())
                attention.append(a.numpy())
        if not logits:
            return np.zeros((0, self.n_classes), np.float32), np.zeros(0, np.float32)
        return np.concatenate(logits), np.concatenate(attention)[mask]

    def predict(self, bags: Bags) -> np.ndarray:
        return self._forward(bags)[0]

    def attention(self, bags: Bags) -> np.ndarray:
        """Attention weight of each row of ``bags`` within its bag (each bag's weights sum to 1)."""
        return self._forward(bags)[1]

    def fitted_info(self) -> dict:
        return {**super().fitted_info(), "bag": "the crops of one image in one view"}
