"""The demo's synthetic long signals (generated locally, no download), and the two tasks on them.

A machine-vibration-like signal of T steps: a slow drift (a sinusoid with a period of 800-1200
steps and random phase), white noise (std 0.3), and a fast carrier of amplitude 0.7 whose period
tells the machine's state: 4 steps in state 0, 6 steps in state 1. The state changes at random
every 150-600 steps.

* Per-step labelling (:func:`labelling_batch`): the label is the state at every step.
* Regression (:func:`regression_batch`): one number per signal, the fraction of the whole
  recording spent in state 0 (a duty cycle), standardised. Every part of the signal counts
  equally, the first steps as much as the last, so a model that reads the signal through its last
  output has to carry what it saw early across thousands of steps.

Averaging windows of T/200 steps (the usual downsampling) averages the carrier away, since its
period is far shorter than the window: what is left is drift and noise, and neither the state nor
the duty cycle can be read from it. At full resolution the state is a local pattern of a few steps.
"""

from __future__ import annotations

import math

import torch

POINTS = 200  # the downsampled length, and the labelling task's evaluation points per sequence
PERIODS = (4.0, 6.0)  # carrier period (steps) in state 0 and state 1
SEGMENT_STEPS = (150, 600)  # a state lasts between these many steps
# The duty cycle's mean (0.5 by symmetry) and standard deviation at T = 10,000 (0.098 measured on
# 2,000 generated signals, seed 0): the regression target is (duty - mean) / std, of spread ~1.
DUTY_MEAN, DUTY_STD = 0.5, 0.098


def signal_batch(B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, B, 1) float32 signals and their states (T, B) int64 (0 or 1 at every step)."""
    t = torch.arange(T, dtype=torch.float32)[:, None]
    x = 0.3 * torch.randn(T, B, generator=g)
    drift_period = 800 + 400 * torch.rand(B, generator=g)
    x += torch.sin(2 * math.pi * t / drift_period + 2 * math.pi * torch.rand(B, generator=g))
    states = torch.zeros(T, B, dtype=torch.long)
    for b in range(B):
        start = 0
        while start < T:
            length = int(torch.randint(*SEGMENT_STEPS, (1,), generator=g))
            state = int(torch.randint(0, 2, (1,), generator=g))
            end = min(T, start + length)
            phase = 2 * math.pi * float(torch.rand((), generator=g))
            x[start:end, b] += 0.7 * torch.sin(2 * math.pi * t[start:end, 0] / PERIODS[state] + phase)
            states[start:end, b] = state
            start = end
    return x.unsqueeze(-1), states


def labelling_batch(B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, B, 1), y (T, B) int64: the state at every step."""
    return signal_batch(B, T, g)


def duty_cycle(states: torch.Tensor) -> torch.Tensor:
    """(T, B) states -> (B,) fraction of the steps in state 0."""
    return (states == 0).float().mean(0)


def regression_batch(B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, B, 1), y (B, 1) float32: the standardised duty cycle of each signal."""
    x, states = signal_batch(B, T, g)
    return x, ((duty_cycle(states) - DUTY_MEAN) / DUTY_STD).unsqueeze(-1)


def eval_points(t: torch.Tensor) -> torch.Tensor:
    """The POINTS evaluation steps of a time-major tensor: the last step of each window."""
    w = t.shape[0] // POINTS
    return t[w - 1::w][:POINTS]


def downsample(x: torch.Tensor) -> torch.Tensor:
    """(T, B, 1) -> (POINTS, B, 1): the means of POINTS windows of T/POINTS steps."""
    T, B, _ = x.shape
    w = T // POINTS
    return x[:w * POINTS].reshape(POINTS, w, B, 1).mean(1)
