"""Hierarchical Transformer (Tang et al., arXiv 2411.00755, MIDL 2025).

Faithful to the paper and to the authors' released code (``xiaoyatang/3stageFormer``):

1. a depth-wise convolution encoder: six ``Conv1d`` layers with ``groups = n_leads`` (so every
   channel belongs to one lead), no bias, each followed by a normalisation and ReLU;
2. three transformer stages sharing one CLS token: stage 1 reads conv 3's output, stage 2
   conv 4's, stage 3 conv 6's (the conv outputs *before* their normalisation/ReLU, as in the
   released code), each time with the CLS token coming out of the previous stage prepended and
   sinusoidal positions added;
3. the attention-gated inter-lead head (HIPT/CLAM ``Attn_Net_Gated``): the stage-3 output is
   read as ``d_model`` channel rows (``channels_per_lead`` rows per lead) of ``tokens`` features;
   a tanh branch times a sigmoid branch gives one attention score per class and row, a softmax
   over the rows pools them per class, then a shared Linear+ReLU+Dropout ("rho") and one
   ``Linear(-> 1)`` classifier per class give the logits. ``gated=False`` classifies the final
   CLS token instead (``fc1 -> ReLU -> dropout -> fc2``, the released non-gated head).

Channels scale with the lead count: channels *per lead* are fixed by ``conv_channels_per_lead``
(paper: 11, 22, 24, 24, 24, 24, i.e. 132/264/288/288/288/288 channels at 12 leads and
165/330/360/... at 15 leads), so ``d_model = n_leads x conv_channels_per_lead[2]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LearnedToken, SinusoidalPositionalEncoding, TransformerEncoderLayer

#: The paper's conv stack (Tang et al., arXiv 2411.00755): kernel, stride and padding of the six layers.
CONV_KERNELS: tuple[int, ...] = (14, 14, 10, 10, 10, 10)
CONV_STRIDES: tuple[int, ...] = (3, 3, 2, 2, 1, 1)
CONV_PADDINGS: tuple[int, ...] = (2, 0, 0, 0, 0, 0)
#: Which conv outputs (0-based) feed transformer stages 1, 2 and 3.
STAGE_TAPS: tuple[int, ...] = (2, 3, 5)

_META_KEYS = ("fs", "seconds", "n_leads", "n_classes")

#: What the DP form changes in every preset (an explicit override still wins, and is checked):
#: Opacus rejects BatchNorm, so the conv encoder normalises with one GroupNorm group per lead.
DP_DEFAULTS: dict[str, Any] = {"norm": "group"}

PRESETS: dict[str, dict[str, Any]] = {
    # The published configuration: 12 leads, 500 Hz, 15 s windows, 27 CinC 2020 classes.
    "paper": {
        "fs": 500, "seconds": 15, "n_leads": 12, "n_classes": 27,
        "conv_channels_per_lead": [11, 22, 24, 24, 24, 24],
        "layers_per_stage": [4, 4, 4], "n_heads": 8, "d_ff": 2048, "dropout": 0.1,
        "attention": "standard", "attn_dropout": 0.0, "gated": True, "norm": "batch",
        "gate_dropout": 0.25, "cls_hidden": 64, "cls_dropout": 0.2,
    },
    # The paper's architecture on the project's default cache (250 Hz, 10 s = 2,500 samples,
    # 5 superclasses): sized for one modern GPU.
    "base": {
        "fs": 250, "seconds": 10, "n_leads": 12, "n_classes": 5,
        "conv_channels_per_lead": [11, 22, 24, 24, 24, 24],
        "layers_per_stage": [4, 4, 4], "n_heads": 8, "d_ff": 2048, "dropout": 0.1,
        "attention": "standard", "attn_dropout": 0.0, "gated": True, "norm": "batch",
        "gate_dropout": 0.25, "cls_hidden": 64, "cls_dropout": 0.2,
    },
    # CPU-sized: one layer per stage, 6 channels per lead (d_model 72 at 12 leads), FFN 144.
    "tiny": {
        "fs": 250, "seconds": 10, "n_leads": 12, "n_classes": 5,
        "conv_channels_per_lead": [4, 6, 6, 6, 6, 6],
        "layers_per_stage": [1, 1, 1], "n_heads": 3, "d_ff": 144, "dropout": 0.1,
        "attention": "standard", "attn_dropout": 0.0, "gated": True, "norm": "batch",
        "gate_dropout": 0.25, "cls_hidden": 32, "cls_dropout": 0.2,
    },
}


def conv_output_lengths(input_samples: int) -> list[int]:
    """Output length of each of the six conv layers for an input of ``input_samples``."""
    lengths, n = [], input_samples
    for k, s, p in zip(CONV_KERNELS, CONV_STRIDES, CONV_PADDINGS):
        n = (n + 2 * p - k) // s + 1
        lengths.append(n)
    return lengths


def min_input_samples() -> int:
    """The shortest input for which every conv layer outputs at least one step."""
    n = 1
    while min(conv_output_lengths(n)) < 1:
        n += 1
    return n


def _norm(kind: str, channels: int, n_leads: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(channels)
    if kind == "group":
        # One group per lead: the statistics never mix leads, like the depth-wise convs.
        return nn.GroupNorm(n_leads, channels)
    raise ValueError(f"norm must be 'batch' or 'group', not {kind!r}")


class DepthwiseConvEncoder(nn.Module):
    """Six lead-grouped ``Conv1d`` layers; returns the raw outputs of convs 3, 4 and 6.

    Conv 6's normalisation/ReLU in the released code feeds nothing (only its raw output is read),
    so it is left out here: every parameter of this module receives a gradient.
    """

    def __init__(self, n_leads: int, channels_per_lead: Sequence[int], norm: str):
        super().__init__()
        chans = [n_leads] + [n_leads * c for c in channels_per_lead]
        self.convs = nn.ModuleList(
            nn.Conv1d(chans[i], chans[i + 1], CONV_KERNELS[i], CONV_STRIDES[i], CONV_PADDINGS[i],
                      groups=n_leads, bias=False)
            for i in range(6)
        )
        self.norms = nn.ModuleList(_norm(norm, chans[i + 1], n_leads) for i in range(5))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i in STAGE_TAPS:
                taps.append(x)
            if i < 5:
                x = F.relu(self.norms[i](x))
        return taps


class GatedAttentionHead(nn.Module):
    """Attention-gated inter-lead pooling with one classifier per class.

    Input ``[B, rows, features]`` (rows = d_model channel rows, features = stage-3 tokens).
    Returns logits ``[B, K]`` and the per-class attention over rows ``[B, K, rows]``.
    """

    def __init__(self, features: int, n_classes: int, dropout: float):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(features, features), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(features, features), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(features, n_classes)
        self.rho = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Dropout(dropout))
        self.classifiers = nn.ModuleList(nn.Linear(features, 1) for _ in range(n_classes))

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.attention_c(self.attention_a(rows) * self.attention_b(rows))  # [B, rows, K]
        attention = torch.softmax(scores.transpose(1, 2), dim=-1)  # [B, K, rows]
        pooled = self.rho(torch.bmm(attention, rows))  # [B, K, features]
        logits = torch.cat([clf(pooled[:, c]) for c, clf in enumerate(self.classifiers)], dim=1)
        return logits, attention


class ClsHead(nn.Module):
    """The released non-gated head on the final CLS token: fc1 -> ReLU -> dropout -> fc2."""

    def __init__(self, d_model: int, hidden: int, n_classes: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(cls))))


class HierarchicalTransformer(nn.Module):
    """Depth-wise conv encoder, three CLS-sharing transformer stages, gated inter-lead head.

    ``forward(x [B, n_leads, input_samples]) -> logits [B, n_classes]``. Build it with
    :func:`shared.models.build_model`; :func:`build` validates the configuration.
    """

    def __init__(
        self,
        *,
        n_leads: int,
        input_samples: int,
        n_classes: int,
        conv_channels_per_lead: Sequence[int],
        layers_per_stage: Sequence[int],
        n_heads: int,
        d_ff: int,
        dropout: float,
        attention: str,
        attn_dropout: float,
        gated: bool,
        norm: str,
        gate_dropout: float,
        cls_hidden: int,
        cls_dropout: float,
    ):
        super().__init__()
        self.n_leads, self.input_samples, self.n_classes = n_leads, input_samples, n_classes
        self.d_model = n_leads * conv_channels_per_lead[2]
        self.gated = gated
        lengths = conv_output_lengths(input_samples)
        self.stage_tokens = [lengths[i] + 1 for i in STAGE_TAPS]  # + the CLS token

        self.encoder = DepthwiseConvEncoder(n_leads, conv_channels_per_lead, norm)
        self.cls_token = LearnedToken(self.d_model)
        self.positions = SinusoidalPositionalEncoding(self.d_model, max(self.stage_tokens), dropout=dropout)
        depth = 0
        stages = []
        for n_layers in layers_per_stage:
            layers = []
            for _ in range(n_layers):
                layers.append(TransformerEncoderLayer(self.d_model, n_heads, d_ff, dropout, attention, depth, attn_dropout))
                depth += 1
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        if gated:
            self.head: nn.Module = GatedAttentionHead(self.stage_tokens[-1], n_classes, gate_dropout)
        else:
            self.head = ClsHead(self.d_model, cls_hidden, n_classes, cls_dropout)
        # The released training script initialises every matrix with Xavier/Glorot uniform.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-3 output ``[B, 1 + tokens, d_model]`` (CLS first)."""
        if x.dim() != 3 or x.shape[1] != self.n_leads or x.shape[2] != self.input_samples:
            raise ValueError(
                f"expected input [batch, {self.n_leads}, {self.input_samples}], got {list(x.shape)}"
            )
        taps = self.encoder(x)
        h = self.cls_token(taps[0].transpose(1, 2))
        for i, stage in enumerate(self.stages):
            if i > 0:
                h = torch.cat((h[:, :1], taps[i].transpose(1, 2)), dim=1)  # carry the CLS token
            h = stage(self.positions(h))
        return h

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, K]`` and the gated head's attention over channel rows ``[B, K, d_model]``."""
        h = self._encode(x)
        if self.gated:
            return self.head(h.transpose(1, 2))
        return self.head(h[:, 0]), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]

    def lead_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Per-class attention aggregated to leads, ``[B, K, n_leads]`` (rows sum to 1).

        The rows of the gated head are the ``d_model`` channels; the depth-wise convs give
        channel ``c`` to lead ``c // channels_per_lead``, and the transformer's residual stream
        keeps that layout, so a lead's importance is the sum of its rows' attention. (The
        attention and feed-forward layers do mix channels, so this is the paper's reading of
        the rows, not a proof that a row only carries its lead's information.)
        """
        if not self.gated:
            raise ValueError("lead_attention needs the gated head: build the model with gated=True")
        _, attention = self.forward_with_attention(x)
        b, k, rows = attention.shape
        return attention.view(b, k, self.n_leads, rows // self.n_leads).sum(-1)

    def explain(self, x: torch.Tensor) -> dict[str, Any]:
        """``{'lead_importance': [B, K, n_leads], 'method': str, 'logits': [B, K]}``, computed in
        eval mode (no dropout, BatchNorm statistics read, not updated); the mode is restored.

        Gated head: its per-class attention summed per lead (method ``gated_attention``).
        Without it: input-times-gradient of each class logit summed per lead
        (:func:`shared.models.interpret.input_x_gradient`).
        """
        if not self.gated:
            from .interpret import input_x_gradient

            return input_x_gradient(self, x)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                logits, attention = self.forward_with_attention(x)
        finally:
            self.train(was_training)
        b, k, rows = attention.shape
        importance = attention.view(b, k, self.n_leads, rows // self.n_leads).sum(-1)
        return {"lead_importance": importance, "method": "gated_attention", "logits": logits}

    def site_local_parameter_names(self) -> list[str]:
        """State keys of the conv encoder's normalisation layers (FedBN keeps these per site)."""
        return [f"encoder.norms.{k}" for k in self.encoder.norms.state_dict().keys()]


def validate(
    *, n_leads: int, input_samples: int, n_classes: int, dp: bool, conv_channels_per_lead: Sequence[int],
    layers_per_stage: Sequence[int], n_heads: int, d_ff: int, attention: str, norm: str, **_: Any,
) -> None:
    """Raise ``ValueError`` naming the values to change if the configuration cannot work."""
    if n_leads < 1:
        raise ValueError(f"n_leads must be >= 1, got {n_leads}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if min(conv_output_lengths(input_samples)) < 1:
        raise ValueError(
            f"input_samples={input_samples} is too short for the six-layer conv stack "
            f"(downsampling x36): it needs at least {min_input_samples()} samples; "
            "raise seconds or fs (or input_samples)"
        )
    if len(conv_channels_per_lead) != 6 or min(conv_channels_per_lead) < 1:
        raise ValueError(f"conv_channels_per_lead must list 6 positive channel counts, got {list(conv_channels_per_lead)}")
    if len(set(conv_channels_per_lead[2:])) != 1:
        raise ValueError(
            "conv_channels_per_lead[2:] must be equal (convs 3-6 all feed transformer stages of one "
            f"d_model), got {list(conv_channels_per_lead)}"
        )
    d_model = n_leads * conv_channels_per_lead[2]
    divisor = 2 * n_heads if attention == "differential" else n_heads
    if n_heads < 1 or d_model % divisor:
        ok = [h for h in range(1, 17) if d_model % ((2 * h) if attention == "differential" else h) == 0]
        raise ValueError(
            f"d_model = n_leads x conv_channels_per_lead[2] = {n_leads} x {conv_channels_per_lead[2]} = {d_model} "
            f"is not divisible by {'2 x ' if attention == 'differential' else ''}n_heads ({n_heads}) "
            f"for {attention} attention: change n_heads (one of {ok}) or conv_channels_per_lead"
        )
    if len(layers_per_stage) != 3 or min(layers_per_stage) < 1:
        raise ValueError(f"layers_per_stage must list 3 positive layer counts, got {list(layers_per_stage)}")
    if d_ff < 1:
        raise ValueError(f"d_ff must be >= 1, got {d_ff}")
    if attention not in ("standard", "differential"):
        raise ValueError(f"attention must be 'standard' or 'differential', got {attention!r}")
    if norm not in ("batch", "group"):
        raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
    if dp and norm == "batch":
        raise ValueError("dp=True cannot use norm='batch' (Opacus rejects BatchNorm): use norm='group'")


def build(preset: str, *, n_leads: int, input_samples: int, n_classes: int, dp: bool = False,
          **overrides: Any) -> HierarchicalTransformer:
    """Build from ``PRESETS[preset]`` changed by ``overrides``; ``dp`` applies :data:`DP_DEFAULTS`.

    An explicit override wins over the DP defaults (and is then checked: ``dp`` with
    ``norm='batch'`` is refused).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for model 'hierarchical': choose one of {sorted(PRESETS)}")
    hparams = {k: v for k, v in PRESETS[preset].items() if k not in _META_KEYS}
    unknown = sorted(set(overrides) - set(hparams))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for model 'hierarchical'; the hyper-parameters are {sorted(hparams)}")
    if dp:
        hparams.update(DP_DEFAULTS)
    hparams.update(overrides)
    validate(n_leads=n_leads, input_samples=input_samples, n_classes=n_classes, dp=dp, **hparams)
    model = HierarchicalTransformer(n_leads=n_leads, input_samples=input_samples, n_classes=n_classes, **hparams)
    model.config = {"hparams": {k: list(v) if isinstance(v, tuple) else v for k, v in hparams.items()}}
    return model
