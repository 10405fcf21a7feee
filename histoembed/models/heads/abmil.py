"""Gated attention-MIL (Ilse et al. 2018): one bag per (image, view), its crops the instances.

Each crop embedding (standardised) goes through ``Linear -> GELU -> Dropout`` to a hidden
vector h; the gated attention score ``w . (tanh(V h) * sigmoid(U h))``, softmaxed over the
bag's crops, weights the h into one bag vector, and a linear layer gives the bag's logits.
Unlike the MLP, which labels every crop with its image's label, MIL learns *which* crops
carry the label; ``attention(bags)`` exposes those weights (the report's crop maps).

Training: each mini-batch's bags padded to the largest bag with a mask (built per step, so
memory holds the rows once, not a padded copy of every bag); with ``max_instances`` set, a
bag of more patches trains on a sample of that many per step (drawn from a generator seeded
by the head's seed; prediction always reads every patch), which bounds a step's memory when
an image is a slide of thousands of patches; cross-entropy with optional class
weights and label smoothing, and the shared loop of ``training`` (early stopping on the
image-level NLL of the caller's inner split). Weights in safetensors, settings in JSON.
"""

from __future__ import annotations

import numpy as np

from histoembed.core.config import ABMILSettings
from histoembed.models.heads.base import Bags
from histoembed.models.heads.calibration import temperature_nll
from histoembed.models.heads.indexing import class_weights
from histoembed.models.heads.training import TorchHead, input_scale, train

WEIGHTS_FILE = "abmil.safetensors"
STEP_FLOATS = 1 << 25      # at most 32 Mi floats (128 MiB) of padded input and activations per training step
PREDICT_FLOATS = 1 << 24   # at most 16 Mi floats (64 MiB) of padded input and activations per prediction chunk


def row_floats(dim: int, s: ABMILSettings, training: bool) -> float:
    """Floats one padded row holds at once in a step: its input and standardised copy, in training also the
    dropout's copy and mask (a byte a float); the hidden vector through Linear and GELU (and dropout); the five
    vectors of the gated attention (tanh, sigmoid, their product). Counting the input alone (issue 37, before):
    on 2,000-patch bags of 1,024-d a step took 10 bags, said to be 117 MiB, and training raised the fit's resident
    set by 574 MiB; with this count a step takes 4 bags and training raises it by 349 MiB (1,000 slides, sampled)."""
    if training:
        return 3.25 * dim + 3.25 * s.hidden + 5 * s.attention
    return 2 * dim + 2 * s.hidden + 5 * s.attention


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
    gives_attention = True       # attention(bags): the crop maps colour crops by it
    scores_crops = False         # a crop alone is no bag
    Settings = ABMILSettings
    build_net = staticmethod(_net)
    description = "gated attention-MIL over each view's crops (attention weights for the crop maps)"

    def fit(self, bags: Bags, y: np.ndarray, stop: Bags, y_stop: np.ndarray) -> ABMILHead:
        import torch
        import torch.nn.functional as F

        s, C = self.settings, self.n_classes
        outcome = self.objective.outcome
        torch.manual_seed(self.seed)
        K = int(bags.sizes.max()) if bags.n_bags else 0     # every batch padded to the largest bag, as one array was
        cap = s.max_instances if s.max_instances and K > s.max_instances else 0
        draw = np.random.default_rng(self.seed)              # the capped bags' patches: seeded, one draw per step
        y = np.asarray(y, dtype=np.float64 if outcome else np.int64)
        y_t = torch.from_numpy(y)
        net = _net(bags.dim, C, s)
        mean, std = bags.row_moments()    # from each bag's sums: the same whether bags are in memory or streamed
        with torch.no_grad():
            net.input_mean.copy_(torch.from_numpy(mean))
            net.input_std.copy_(input_scale(torch.from_numpy(std)))
        weight = torch.tensor(class_weights(y, C), dtype=torch.float32) if s.class_weights and not outcome else None
        self.net_, self.input_dim_ = net, int(bags.dim)

        def batch(idx) -> tuple:
            """The bags ``idx`` padded (built per step: no padded copy of every bag is held)."""
            idx = np.asarray(idx, dtype=np.int64)
            if not cap:
                x, m = bags.padded(idx, K)
                return torch.from_numpy(x), torch.from_numpy(m)
            x = np.zeros((len(idx), cap, bags.dim), np.float32)
            m = np.zeros((len(idx), cap), bool)
            for j, b in enumerate(idx):
                n = int(bags.sizes[b])
                rows = np.sort(draw.choice(n, cap, replace=False)) if n > cap else np.arange(n)
                x[j, :len(rows)], m[j, :len(rows)] = bags.bag_rows(b)[rows], True
            return torch.from_numpy(x), torch.from_numpy(m)

        def batch_loss(idx):
            logits, _ = net(*batch(idx))
            return F.cross_entropy(logits, y_t[idx], weight=weight, label_smoothing=s.label_smoothing)

        if outcome:   # survival (Cox partial likelihood over the batch's bags) or regression (squared / Huber)
            _, outcome_loss, stop_nll = self.outcome_training(y, stop, y_stop)
            batch_loss = lambda idx: outcome_loss(net(*batch(idx))[0], idx)  # noqa: E731
        else:
            stop_labels = stop.image_labels(y_stop)
            stop_nll = (lambda: temperature_nll(stop.per_image(self.predict(stop)), stop_labels, 1.0)) \
                if stop.n_bags else None
        done = train(net, bags.n_bags, batch_loss, stop_nll, lr=s.lr, weight_decay=s.weight_decay, epochs=s.epochs,
                     warmup_epochs=s.warmup_epochs, batch_size=min(s.batch_size, self._step_bags(cap or K, bags.dim)),
                     patience=s.patience, seed=self.seed)
        self.best_epoch_, self.epochs_run_, self.stop_nll_ = done.best_epoch, done.epochs_run, done.stop_nll
        return self

    def _step_bags(self, rows: int, dim: int) -> int:
        """Bags per training step such that their padded rows and activations stay within ``STEP_FLOATS``
        (issue 37: a step's memory must not grow with the cohort; slides of thousands of patches train a few
        bags a step, images of a few crops keep ``batch_size``)."""
        return max(1, int(STEP_FLOATS // max(1.0, rows * row_floats(dim, self.settings, training=True))))

    def _forward(self, bags: Bags, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(logits per bag, attention per row) over all of each bag's rows, in chunks of bags padded on the fly;
        a chunk is made smaller when its padded input and activations would pass ``PREDICT_FLOATS`` (bags of thousands of patches)."""
        import torch

        K = int(bags.sizes.max()) if bags.n_bags else 0
        chunk = max(1, min(chunk, int(PREDICT_FLOATS // max(1.0, K * row_floats(bags.dim, self.settings, False)))))
        logits, attention = [], []
        self.net_.eval()
        with torch.inference_mode():
            for start in range(0, bags.n_bags, chunk):
                x, m = bags.padded(np.arange(start, min(start + chunk, bags.n_bags)), K)
                z, a = self.net_(torch.from_numpy(x), torch.from_numpy(m))
                logits.append(z.numpy())
                attention.append(a.numpy()[m])
        if not logits:
            return np.zeros((0, self.n_classes), np.float32), np.zeros(0, np.float32)
        return self.to_target(np.concatenate(logits)), np.concatenate(attention)

    def predict(self, bags: Bags) -> np.ndarray:
        return self._forward(bags)[0]

    def attention(self, bags: Bags) -> np.ndarray:
        """Attention weight of each row of ``bags`` within its bag (each bag's weights sum to 1)."""
        return self._forward(bags)[1]

    def fitted_info(self) -> dict:
        return {**super().fitted_info(), "bag": "the crops of one image in one view"}
