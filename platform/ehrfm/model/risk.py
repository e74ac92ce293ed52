"""The risk model: pretrained decoder + classification head, and its self-contained directory.

The head reads the hidden state at the last token of the prediction window, optionally beside
the mean hidden state over the window (`+mean`: a small decoder's last state need not carry
everything a long history said). With `history_windows` > 1 the decoder also encodes the history
before that window, window by window, and `+mean` pools over all of it: the whole (bounded) history
reaches the head, at one decoder pass per non-empty window and the mean PRS soft token (`+prs`), so the PRS reaches the
head both through the decoder's fusion and directly. PRS masking sets has_prs to false for
everyone: the same weights then use the learned missing-PRS path, which is how the PRS
contribution is measured.

Directory (what the registry logs and Serve loads; no pickle anywhere):
  model.pt          flat state dict, decoder.* and head.* tensors (torch.load weights_only=True)
  model_config.json the decoder's ModelConfig
  head.json         HeadSpec: task, horizon, window length, head inputs, Platt calibration fit on
                    validation, validation risk quantiles (for percentiles), PGS ids, metrics
  tokenizer.json    the tokenizer artifact the timelines were made with
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from ehrfm.model.config import ModelConfig
from ehrfm.model.heads import ClassificationHead
from ehrfm.model.io import CONFIG_FILE, WEIGHTS_FILE, load_model_config, save_model_files
from ehrfm.model.transformer import EHRDecoder
from ehrfm.model.value_bins import ValueBinFeatures, ValueBinReadout, ValueEncoding

# what the head reads: the last hidden state, + the mean hidden state of the window, + the mean PRS soft token
HeadInputs = Literal["last", "last+prs", "last+mean", "last+mean+prs"]


def head_uses_prs(head_inputs: str) -> bool:
    return head_inputs.endswith("+prs")


HEAD_FILE = "head.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class HeadSpec:
    """Everything besides the weights that scoring a person needs."""

    task: str
    horizon_days: int
    context: int
    head_inputs: HeadInputs = "last+prs"
    history_windows: int = 1  # windows of `context` tokens per person, newest last (the whole-history mean)
    pgs_ids: list[str] = field(default_factory=list)
    tokenizer_version: str = ""
    platt: tuple[float, float] | None = None  # calibrated = sigmoid(a * logit + b), fit on validation
    reference_quantiles: list[float] = field(default_factory=list)  # 101 quantiles of validation risks
    metrics: dict[str, float] = field(default_factory=dict)
    # the head also reads the newest window's recent lab-value bins for these codes (per recency
    # bound in days, plus "anywhere in the window"; model/value_bins.py). Empty: it does not
    value_codes: list[str] = field(default_factory=list)
    value_code_ids: list[int] = field(default_factory=list)  # their token ids
    value_token_ids: list[int] = field(default_factory=list)  # the value tokens', lowest bin first
    value_recency_days: list[int] = field(default_factory=list)
    value_encoding: ValueEncoding = "one_hot"  # or "cumulative" (model/value_bins.py); older specs: one_hot

    @classmethod
    def value_fields(cls, readout: ValueBinReadout | None) -> dict:
        """The spec's value-readout fields for `readout` (empty lists for None)."""
        if readout is None:
            return {}
        return {
            "value_codes": list(readout.codes),
            "value_code_ids": list(readout.code_ids),
            "value_token_ids": list(readout.value_ids),
            "value_recency_days": list(readout.recency_days),
            "value_encoding": readout.encoding,
        }

    def value_readout(self) -> ValueBinReadout | None:
        if not self.value_codes:
            return None
        return ValueBinReadout(
            tuple(self.value_codes),
            tuple(self.value_code_ids),
            tuple(self.value_token_ids),
            tuple(self.value_recency_days),
            self.value_encoding,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HeadSpec:
        data = json.loads(text)
        if data.get("platt") is not None:
            data["platt"] = tuple(data["platt"])
        return cls(**data)

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities from raw logits, through the Platt map when one was fit."""
        z = np.asarray(logits, dtype=np.float64)
        if self.platt is not None:
            z = self.platt[0] * z + self.platt[1]
        return expit(z)  # no overflow for large |z|

    def percentile(self, risks: np.ndarray) -> np.ndarray:
        """Percentile (0-100) of each risk among the validation population's risks."""
        q = np.asarray(self.reference_quantiles, dtype=np.float64)
        if q.size < 2:
            return np.full(np.shape(risks), np.nan)
        return np.interp(np.asarray(risks, dtype=np.float64), q, np.linspace(0.0, 100.0, q.size))


def pooled_states(
    decoder: EHRDecoder,
    tokens: torch.Tensor,
    ages: torch.Tensor,
    length: torch.Tensor,
    prs: torch.Tensor | None,
    has_prs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden state at the newest window's last real token, mean hidden state over every real
    token of every window), each [B, H]; tokens [B, T] with length [B], or [B, W, T] with length
    [B, W] (oldest window first). Each window is encoded on its own (attention stays inside it,
    every window gets the person's PRS); empty windows are not run at all, so a short record costs
    one window whatever the window count."""
    if tokens.dim() == 2:
        tokens, ages, length = tokens[:, None], ages[:, None], length[:, None]
    batch, windows, width = tokens.shape
    length = length.long().clone()
    length[:, -1] = length[:, -1].clamp(min=1)
    flat_length = length.reshape(-1)
    rows = torch.nonzero(flat_length > 0).squeeze(1)
    person = torch.div(rows, windows, rounding_mode="floor")
    if prs is not None:
        prs, has_prs = prs[person], has_prs[person]
    hidden = decoder.encode(tokens.reshape(-1, width)[rows], ages.reshape(-1, width)[rows], prs, has_prs)
    counts = flat_length[rows]
    ends = hidden[torch.arange(len(rows), device=hidden.device), counts - 1]
    newest = torch.remainder(rows, windows) == windows - 1  # one per person, in person order
    last = ends[newest]
    real = (torch.arange(width, device=hidden.device)[None, :] < counts[:, None]).to(hidden.dtype)
    sums = (hidden * real.unsqueeze(-1)).sum(dim=1)
    if windows == 1:
        return last, sums / counts.unsqueeze(-1).to(hidden.dtype)
    total = torch.zeros(batch, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    total.index_add_(0, person, sums)
    return last, total / length.sum(dim=1, keepdim=True).to(hidden.dtype)


class RiskModel(nn.Module):
    """Decoder + head: logit of the task at the end of each prediction window."""

    def __init__(
        self,
        decoder: EHRDecoder,
        head_inputs: HeadInputs = "last+prs",
        dropout: float = 0.0,
        value_readout: ValueBinReadout | None = None,
    ):
        super().__init__()
        if head_uses_prs(head_inputs) and decoder.prs_encoder is None:
            raise ValueError(f"head_inputs {head_inputs!r} needs a decoder with PRS fusion; drop '+prs'")
        self.decoder = decoder
        self.head_inputs = head_inputs
        self.pool_mean = "+mean" in head_inputs
        # the window's recent lab-value bins beside the states: read from the input tokens, no weights
        self.value_bins = None if value_readout is None else ValueBinFeatures(value_readout)
        width = decoder.cfg.hidden * (1 + self.pool_mean + head_uses_prs(head_inputs))
        width += 0 if value_readout is None else value_readout.width
        self.head = ClassificationHead(width, 1, dropout)

    def forward(
        self,
        tokens: torch.Tensor,
        ages: torch.Tensor,
        length: torch.Tensor,
        prs: torch.Tensor | None = None,
        has_prs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B]. One window per person: tokens [B, T], `length` [B] real tokens per right-padded
        window (>= 1). The whole history: tokens [B, W, T], `length` [B, W] (oldest window first,
        empty windows 0, the newest >= 1)."""
        if prs is not None and has_prs is None:
            has_prs = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        last, mean = pooled_states(self.decoder, tokens, ages, length, prs, has_prs)
        features = [last, mean] if self.pool_mean else [last]
        if head_uses_prs(self.head_inputs):
            if prs is None:
                prs = torch.zeros(tokens.shape[0], self.decoder.cfg.num_pgs, device=tokens.device)
                has_prs = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            features.append(self.decoder.prs_summary(prs, has_prs).to(last.dtype))
        if self.value_bins is not None:
            features.append(self.value_bins(tokens, ages, length).to(last.dtype))
        return self.head(torch.cat(features, dim=-1)).squeeze(-1)

    def freeze_decoder(self, unfrozen_layers: int = 0) -> None:
        """Linear probe (0) or partial fine-tune: only the head and the top `unfrozen_layers` blocks
        (plus the final norm and the PRS modules when any block is unfrozen) keep gradients."""
        for param in self.decoder.parameters():
            param.requires_grad = False
        if unfrozen_layers > 0:
            layers = self.decoder.cfg.layers
            open_blocks = {f"blocks.{i}." for i in range(max(0, layers - unfrozen_layers), layers)}
            for name, param in self.decoder.named_parameters():
                if (
                    name.startswith(tuple(open_blocks))
                    or name.startswith("norm_out.")
                    or name in set(self.decoder.prs_parameter_names())
                ):
                    param.requires_grad = True


def save_risk_model(directory: str | Path, model: RiskModel, spec: HeadSpec, tokenizer_path: str | Path) -> Path:
    state = {f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}
    state |= {f"head.{k}": v for k, v in model.head.state_dict().items()}
    return save_risk_files(directory, state, model.decoder.cfg, spec, tokenizer_path)


def save_risk_files(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    spec: HeadSpec,
    tokenizer_path: str | Path,
) -> Path:
    """The directory from a flat decoder.*/head.* state dict (what a training checkpoint gathers
    from its engine, where the module itself may hold only a shard)."""
    directory = Path(directory)
    save_model_files(directory, state, cfg)
    (directory / HEAD_FILE).write_text(spec.to_json())
    shutil.copyfile(tokenizer_path, directory / TOKENIZER_FILE)
    return directory


def load_risk_model(directory: str | Path) -> tuple[RiskModel, HeadSpec]:
    """The model (eval mode, fp32, CPU) and its spec; weights loaded with weights_only=True."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE, HEAD_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a risk-model directory: {name} missing")
    cfg: ModelConfig = load_model_config(directory)
    spec = HeadSpec.from_json((directory / HEAD_FILE).read_text())
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model = RiskModel(EHRDecoder(cfg), spec.head_inputs, value_readout=spec.value_readout())
    decoder_state = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
    head_state = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    model.decoder.load_state_dict(decoder_state)
    model.head.load_state_dict(head_state)
    return model.eval(), spec


@torch.no_grad()
def predict_logits(model: RiskModel, batch: dict[str, torch.Tensor], mask_prs: bool = False) -> torch.Tensor:
    """Logits for a batch from `examples.example_tensors`; mask_prs shows everyone as non-genotyped."""
    has_prs = batch["has_prs"]
    if mask_prs:
        has_prs = torch.zeros_like(has_prs)
    return model(batch["tokens"], batch["ages"], batch["length"], batch["prs"], has_prs)
