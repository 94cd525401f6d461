"""Convolutional autoencoder for binarised patch attention (SPEC "Attention patterns").

Every head of every image gives one binary ``P x P`` matrix (top-q patch->patch attention).
The encoder is two convolutions (4x4 stride 4, then 4x4 stride 2: the input shrinks 8x per side,
which keeps training cheap on a CPU) and one fully connected layer to the latent code; the decoder
mirrors it (fully connected, two transposed convolutions) and outputs logits, trained with binary
cross-entropy. Matrices are streamed from their bit-packed form (``ceil(P*P/8)`` bytes per
sample, see ``analysis.patterns``): only one mini-batch is ever dense. Matrices larger than
``MAX_SIDE`` are max-pooled to ``MAX_SIDE x MAX_SIDE`` first (an attention target that is 1
stays visible), smaller sides are zero-padded to a multiple of 8.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from analysis.runs.tables import atomic_write_bytes

MAX_SIDE = 128
ENCODE_BATCH = 1024


def input_side(num_patches: int) -> int:
    """Side of the AE input for P patches: P (at most MAX_SIDE) rounded up to a multiple of 8."""
    side = min(num_patches, MAX_SIDE)
    return 8 * math.ceil(side / 8)


class PatternAutoencoder(nn.Module):
    """``prepare``: binary matrices [B, P, P] -> x [B, 1, side, side]; ``forward(x)`` ->
    (latent [B, latent_dim], logits [B, 1, side, side]), side = ``input_side(P)``."""

    def __init__(self, num_patches: int, latent_dim: int = 32, channels: tuple[int, int] = (16, 32)):
        super().__init__()
        self.num_patches, self.latent_dim = num_patches, latent_dim
        self.side = input_side(num_patches)
        c1, c2 = channels
        s = self.side // 8
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=4), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(c2 * s * s, latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, c2 * s * s), nn.ReLU(), nn.Unflatten(1, (c2, s, s)),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, 1, 4, stride=4),
        )

    def init_output_bias(self, density: float) -> None:
        """Start the decoder at the logit of the mean density (skips learning the constant)."""
        density = min(max(density, 1e-6), 1 - 1e-6)
        nn.init.constant_(self.decoder[-1].bias, math.log(density / (1 - density)))

    def prepare(self, x: Tensor) -> Tensor:
        """Binary matrices [B, P, P] -> network input [B, 1, side, side] float (pooled, zero-padded)."""
        x = x.float().unsqueeze(1)
        if x.shape[-1] > MAX_SIDE:
            x = F.adaptive_max_pool2d(x, MAX_SIDE)
        pad = self.side - x.shape[-1]
        return F.pad(x, (0, pad, 0, pad)) if pad else x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)


@dataclass
class AutoencoderResult:
    """latents [n, latent_dim] float32; loss_curve: [{"epoch": float, "loss": float}] (mean BCE
    per logging interval); baseline_loss: BCE of the best constant prediction (for scale);
    epochs actually trained; seconds of training + encoding."""
    latents: np.ndarray
    loss_curve: list[dict] = field(default_factory=list)
    baseline_loss: float = float("nan")
    epochs: int = 0
    seconds: float = 0.0


def unpack_batch(packed: np.ndarray, num_patches: int) -> Tensor:
    """uint8 [B, ceil(P*P/8)] -> float tensor [B, P, P] of 0/1."""
    bits = np.unpackbits(packed, axis=-1, count=num_patches * num_patches)
    return torch.from_numpy(bits).view(-1, num_patches, num_patches)


def train_autoencoder(packed: np.ndarray, num_patches: int, *, latent_dim: int = 32, epochs: int = 2,
                      batch_size: int = 128, lr: float = 2e-3, max_samples_per_epoch: int = 20_000,
                      min_steps: int = 300, seed: int = 0, device: str = "cpu",
                      progress: Callable[[int, int], None] | None = None,
                      checkpoint: str | Path | None = None) -> AutoencoderResult:
    """Train the autoencoder on bit-packed matrices and encode all of them.

    packed: uint8 [n, ceil(P*P/8)] (one row per image x layer x head). Each epoch visits a seeded
    random sample of at most ``max_samples_per_epoch`` rows (all rows when fewer); small sets get
    more epochs, so that training takes at least ``min_steps`` optimiser steps. Adam, BCE with logits.
    ``progress(done, total)`` is called after every training and encoding batch. With
    ``checkpoint`` (a file path) the training state is saved there after every epoch and a run
    that was interrupted continues from the last finished epoch, to the same result, when the
    inputs and settings are the same.
    """
    t0 = time.perf_counter()
    n = len(packed)
    if n == 0:
        return AutoencoderResult(np.zeros((0, latent_dim), np.float32))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = PatternAutoencoder(num_patches, latent_dim).to(device)
    sample = np.sort(rng.permutation(n)[:2048])
    density = float(model.prepare(unpack_batch(packed[sample], num_patches)).mean())
    model.init_output_bias(density)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = min(n, max_samples_per_epoch)
    steps_per_epoch = math.ceil(per_epoch / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    steps = epochs * steps_per_epoch
    total = steps + math.ceil(n / ENCODE_BATCH)
    log_every = max(1, steps // 40)
    curve, window, step, start = [], [], 0, 0
    key = hashlib.sha256(packed.tobytes() + json.dumps(
        [packed.shape, num_patches, latent_dim, epochs, batch_size, lr, per_epoch, seed]).encode()).hexdigest()
    saved = _read_checkpoint(checkpoint, key)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        rng.bit_generator.state = json.loads(saved["rng"])
        curve, window, step, start = saved["curve"], saved["window"], saved["step"], saved["epoch"]
    model.train()
    for epoch in range(start, epochs):
        order = rng.permutation(n)[:per_epoch]
        for s in range(0, per_epoch, batch_size):
            x = model.prepare(unpack_batch(packed[np.sort(order[s:s + batch_size])], num_patches).to(device))
            _, logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window.append(loss.item())
            step += 1
            if step % log_every == 0 or step == steps:
                curve.append({"epoch": round(step / steps_per_epoch, 3), "loss": float(np.mean(window))})
                window = []
            if progress:
                progress(step, total)
        if checkpoint is not None:
            _write_checkpoint(checkpoint, {"key": key, "epoch": epoch + 1, "model": model.state_dict(),
                                           "opt": opt.state_dict(), "rng": json.dumps(rng.bit_generator.state),
                                           "curve": curve, "window": window, "step": step})
    latents = encode(model, packed, num_patches, device,
                     progress=(lambda k: progress(steps + k, total)) if progress else None)
    baseline = -(density * math.log(density) + (1 - density) * math.log(1 - density)) if 0 < density < 1 else 0.0
    return AutoencoderResult(latents, curve, baseline, epochs, time.perf_counter() - t0)


def _read_checkpoint(path: str | Path | None, key: str) -> dict | None:
    """The saved training state when it exists and belongs to these inputs, else None."""
    if path is None or not Path(path).is_file():
        return None
    try:
        saved = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # unreadable (e.g. cut short): train from the start
        return None
    return saved if isinstance(saved, dict) and saved.get("key") == key else None


def _write_checkpoint(path: str | Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


@torch.no_grad()
def encode(model: PatternAutoencoder, packed: np.ndarray, num_patches: int, device: str = "cpu",
           batch_size: int = ENCODE_BATCH, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Latent codes of bit-packed matrices: uint8 [n, bytes] -> float32 [n, latent_dim]."""
    model.eval()
    out = np.empty((len(packed), model.latent_dim), np.float32)
    for k, s in enumerate(range(0, len(packed), batch_size), start=1):
        x = model.prepare(unpack_batch(packed[s:s + batch_size], num_patches).to(device))
        out[s:s + batch_size] = model.encoder(x).float().cpu().numpy()
        if progress:
            progress(k)
    return out
