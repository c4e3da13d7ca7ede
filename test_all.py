"""Test suite (CPU only, no network): `python -m pytest -q test_all.py`.

Every loss is checked against an independent naive float64 transcription written here with
explicit loops; the scripts are run as a user runs them (subprocess, tiny budgets).
"""
import argparse
import ast
import copy
import gzip
import json
import math
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF

import common
import corinfomax
import explicit_mim
import hydes
import image_ops
import ssl_hsic
import synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
METHOD_FILES = [f for f in ("corinfomax.py", "ssl_hsic.py", "explicit_mim.py", "hydes.py")
                if os.path.exists(os.path.join(HERE, f))]
torch.set_num_threads(2)


# ============================================================================================
# Helpers
# ============================================================================================


def read(out):
    """(loss, logs) with the logs read to Python floats, as the training loop reads them."""
    loss, logs = out
    return loss, {k: float(v) for k, v in logs.items()}


def run_script(*args, script="corinfomax.py", timeout=600, module=None):
    """Run a method script (or `python -m module`, e.g. torchrun) as a user would."""
    cmd = [sys.executable] + (["-m", module] if module else [script]) + [str(a) for a in args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc, code=2):
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# Small, fast settings for subprocess runs: 16 px images, 4 steps per epoch.
TINY = ["--data", "synthetic", "--synthetic-train", 64, "--synthetic-test", 40, "--image-size", 16,
        "--batch-size", 16, "--projector", "64-32", "--epochs", 2, "--log-every", 1, "--threads", 1,
        "--workers", 0, "--probe", "none"]


# Per method: heads that suit TINY's batch of 16 (Explicit MIM needs N >= 2D + 1).
TINY_HEADS = {"corinfomax.py": ["--projector", "64-32"], "explicit_mim.py": ["--projector", "64-6"],
              "ssl_hsic.py": ["--projector", "64-32", "--predictor", "64-32", "--eval-weights", "ema",   # the official
                              "--target-init", "independent", "--tau", 0.99],                     # target, not the demo's
              "hydes.py": ["--projector", "64-32"]}
MODULES = {"corinfomax.py": corinfomax, "explicit_mim.py": explicit_mim, "ssl_hsic.py": ssl_hsic,
           "hydes.py": hydes}


def tiny(script):
    return TINY + TINY_HEADS[script]


def files_snapshot(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def _join_gloo(rank, world, port):
    """Join a gloo process group on this machine (inside an mp.spawn child)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


# ============================================================================================
# CorInfoMax loss against a naive float64 transcription
# ============================================================================================

def naive_corinfomax(batches, D, alpha, la_R, la_mu, R_ini, eps, center="updated"):
    """Explicit loops: per-sample outer products, slogdet, explicit state recursion.
    `batches` is a list of (z1, z2) float64 tensors; returns per-step losses and states."""
    eye = torch.eye(D, dtype=torch.float64)
    R, mu = [R_ini * eye, R_ini * eye], [torch.zeros(D, dtype=torch.float64)] * 2
    losses, states = [], []
    for z1, z2 in batches:
        N = z1.shape[0]
        logdets = []
        for b, z in enumerate((z1, z2)):
            mean = sum(z[i] for i in range(N)) / N
            mu_new = la_mu * mu[b] + (1 - la_mu) * mean
            c = mu_new if center == "updated" else mu[b]
            C = sum(torch.outer(z[i] - c, z[i] - c) for i in range(N)) / N
            R_new = la_R * R[b] + (1 - la_R) * C
            sign, logabsdet = torch.linalg.slogdet(R_new + eps * eye)
            assert sign > 0
            logdets.append(logabsdet)
            R[b], mu[b] = R_new.detach(), mu_new.detach()
        sim = sum((z1[i, j] - z2[i, j]) ** 2 for i in range(N) for j in range(D)) / (N * D)
        losses.append(alpha * sim - (logdets[0] + logdets[1]) / D)
        states.append([t.clone() for t in (R[0], R[1], mu[0], mu[1])])
    return losses, states


def unit_rows(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


@pytest.mark.parametrize("N,D,center", [(16, 4, "updated"), (32, 8, "updated"), (6, 10, "updated"),
                                        (12, 5, "previous")])
def test_loss_matches_naive_over_steps(N, D, center):
    kw = dict(alpha=7.0, la_R=0.2, la_mu=0.3, R_ini=1.5, eps=1e-6)
    batches = [(unit_rows(N, D, 10 * s), unit_rows(N, D, 10 * s + 1)) for s in range(4)]
    loss_fn = corinfomax.CorInfoMaxLoss(D, center_with=center, **kw)
    naive_in = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in batches]
    naive_losses, naive_states = naive_corinfomax(naive_in, D, center=center, **kw)
    for s, (z1, z2) in enumerate(batches):
        z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss, logs = read(loss_fn(z1, z2))
        loss.backward()
        naive_losses[s].backward()
        torch.testing.assert_close(loss, naive_losses[s], rtol=1e-12, atol=1e-12)
        assert logs["loss"] == pytest.approx(loss.item(), rel=1e-12)
        for got, want in zip((loss_fn.R1, loss_fn.R2, loss_fn.mu1, loss_fn.mu2), naive_states[s]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
            assert got.dtype == torch.float64 and not got.requires_grad
        tol = 1e-6 if N < D else 1e-10  # rank-deficient batch covariance: looser
        torch.testing.assert_close(z1.grad, naive_in[s][0].grad, rtol=tol, atol=tol)
        torch.testing.assert_close(z2.grad, naive_in[s][1].grad, rtol=tol, atol=tol)


def test_gradcheck_with_previous_state_fixed():
    D = 3
    loss_fn = corinfomax.CorInfoMaxLoss(D, alpha=2.0, la_R=0.3, la_mu=0.4, eps=1e-3)
    loss_fn(unit_rows(5, D, 1), unit_rows(5, D, 2))  # a non-trivial previous state
    z1, z2 = unit_rows(5, D, 3).requires_grad_(), unit_rows(5, D, 4).requires_grad_()
    # A copy per call, so every evaluation starts from the same previous state.
    assert torch.autograd.gradcheck(lambda a, b: copy.deepcopy(loss_fn)(a, b)[0], (z1, z2))


def test_closed_form_gradient():
    """Gradient: dL_cov/dz = G - ((1 - la_mu)/N) 1 1^T G, G = -(2(1 - la_R)/(N D)) zc A."""
    N, D, la_R, la_mu, alpha, eps = 10, 6, 0.1, 0.2, 3.0, 1e-8
    loss_fn = corinfomax.CorInfoMaxLoss(D, alpha=alpha, la_R=la_R, la_mu=la_mu, eps=eps)
    loss_fn(unit_rows(N, D, 5), unit_rows(N, D, 6))
    R_prev, mu_prev = loss_fn.R1.clone(), loss_fn.mu1.clone()
    z1, z2 = unit_rows(N, D, 7).requires_grad_(), unit_rows(N, D, 8).requires_grad_()
    loss, _ = loss_fn(z1, z2)
    loss.backward()
    z = z1.detach()
    mu_new = la_mu * mu_prev + (1 - la_mu) * z.mean(0)
    zc = z - mu_new
    R_new = la_R * R_prev + (1 - la_R) * zc.T @ zc / N
    G = -(2 * (1 - la_R) / (N * D)) * zc @ torch.linalg.inv(R_new + eps * torch.eye(D, dtype=torch.float64))
    expected = G - ((1 - la_mu) / N) * torch.ones(N, N, dtype=torch.float64) @ G
    expected += 2 * alpha * (z - z2.detach()) / (N * D)
    torch.testing.assert_close(z1.grad, expected, rtol=1e-9, atol=1e-12)


def test_zero_memory_is_batch_covariance():
    """La_R = la_mu = 0 gives the plain biased batch covariance (numpy's)."""
    N, D, eps = 40, 5, 1e-8
    z1, z2 = unit_rows(N, D, 1), unit_rows(N, D, 2)
    loss_fn = corinfomax.CorInfoMaxLoss(D, alpha=0.0, la_R=0.0, la_mu=0.0, eps=eps)
    loss, _ = loss_fn(z1, z2)
    want = -sum(np.linalg.slogdet(np.cov(z.numpy().T, bias=True) + eps * np.eye(D))[1] for z in (z1, z2)) / D
    assert loss.item() == pytest.approx(want, rel=1e-12)


def test_state_is_per_branch_detached_float64():
    D = 6
    a, b = corinfomax.CorInfoMaxLoss(D), corinfomax.CorInfoMaxLoss(D)
    z1 = unit_rows(20, D, 1, torch.float32).requires_grad_()
    a(z1, unit_rows(20, D, 2, torch.float32))
    b(z1, unit_rows(20, D, 3, torch.float32))   # only z2 differs
    torch.testing.assert_close(a.R1, b.R1, rtol=0, atol=0)
    torch.testing.assert_close(a.mu1, b.mu1, rtol=0, atol=0)
    assert not torch.equal(a.R2, b.R2)
    for t in (a.R1, a.R2, a.mu1, a.mu2):
        assert t.dtype == torch.float64 and t.grad_fn is None


def test_float32_input_close_to_float64():
    D = 8   # aligned views, as in training
    z1 = unit_rows(32, D, 1)
    z2 = F.normalize(z1 + 0.05 * unit_rows(32, D, 2), dim=1)
    l64, _ = corinfomax.CorInfoMaxLoss(D)(z1, z2)
    l32, _ = corinfomax.CorInfoMaxLoss(D)(z1.float(), z2.float())
    assert l32.dtype == torch.float64
    assert abs(l32.item() - l64.item()) < 1e-6


def test_each_call_advances_the_state():
    """The hazard: a second call (even for logging) moves the state again."""
    D = 4
    loss_fn = corinfomax.CorInfoMaxLoss(D, la_R=0.5)
    z1, z2 = unit_rows(16, D, 1), unit_rows(16, D, 2)
    with torch.no_grad():
        loss_fn(z1, z2)
        once = loss_fn.R1.clone()
        loss_fn(z1, z2)
    assert not torch.allclose(once, loss_fn.R1)


def test_no_gradient_into_previous_batches():
    D = 5
    loss_fn = corinfomax.CorInfoMaxLoss(D, la_R=0.5, la_mu=0.5)
    old = unit_rows(12, D, 1).requires_grad_()
    loss_fn(old, unit_rows(12, D, 2))
    loss, _ = loss_fn(unit_rows(12, D, 3).requires_grad_(), unit_rows(12, D, 4))
    loss.backward()
    assert old.grad is None


def test_loss_trains_free_embeddings_without_collapse():
    """On free parameters: loss falls, views align, the spectrum of R1 stays spread."""
    torch.manual_seed(0)
    N, D = 64, 8
    base = torch.randn(N, D, requires_grad=True)
    loss_fn = corinfomax.CorInfoMaxLoss(D, alpha=50.0)
    opt = torch.optim.SGD([base], lr=0.5)
    first = None
    for _ in range(200):
        z1 = F.normalize(base + 0.3 * torch.randn(N, D), dim=1)
        z2 = F.normalize(base + 0.3 * torch.randn(N, D), dim=1)
        loss, logs = read(loss_fn(z1, z2))
        first = first if first is not None else logs["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["loss"] < first - 0.5
    eig = torch.linalg.eigvalsh(loss_fn.R1)
    assert eig.min() > 0.2 * eig.max()   # spread over all D directions, not collapsed


# ============================================================================================
# Explicit MIM loss against a naive float64 transcription
# ============================================================================================

def naive_mi(z1, z2, eps, denom="N"):
    """Explicit loops: per-column means, per-sample outer products of the 2D-vector [a b],
    slogdet of the three blocks. Returns I in nats."""
    N, D = z1.shape
    rows = [torch.cat([z1[i], z2[i]]) for i in range(N)]
    mean = sum(rows) / N
    S = sum(torch.outer(r - mean, r - mean) for r in rows) / (N if denom == "N" else N - 1)
    eye = torch.eye(2 * D, dtype=torch.float64)
    logdets = []
    for block in (S[:D, :D] + eps * eye[:D, :D], S[D:, D:] + eps * eye[:D, :D], S + eps * eye):
        sign, value = torch.linalg.slogdet(block)
        assert sign > 0
        logdets.append(value)
    return 0.5 * (logdets[0] + logdets[1] - logdets[2])


def correlated_views(N, D, seed, rho=0.8, normalise=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(N, D, generator=g, dtype=torch.float64)
    return (F.normalize(x, dim=1), F.normalize(y, dim=1)) if normalise else (x, y)


@pytest.mark.parametrize("N,D,eps,denom,normalise,tol", [
    (64, 16, 1e-8, "N", True, 1e-10), (40, 8, 1e-4, "N-1", False, 1e-10),
    (64, 16, 1e-4, "N-1", True, 1e-10), (25, 12, 1e-8, "N", True, 1e-6)])   # last: N = 2D + 1, the fewest
def test_explicit_mim_matches_naive(N, D, eps, denom, normalise, tol):
    z1, z2 = correlated_views(N, D, 1, normalise=normalise)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    crit = explicit_mim.ExplicitMIMLoss(D, eps=eps, unbiased=denom == "N-1")
    loss, logs = read(crit(a, b))
    want = naive_mi(z1, z2, eps, denom)
    assert loss.item() == pytest.approx(-want.item(), rel=tol, abs=tol)
    assert logs["mi"] == pytest.approx(want.item(), rel=tol, abs=tol)
    assert logs["logdet1"] + logs["logdet2"] - logs["logdet_joint"] == pytest.approx(2 * logs["mi"], rel=1e-9)
    if denom == "N":
        plain, plain_logs = read(explicit_mim.explicit_mim_loss(z1, z2, eps=eps))
        assert plain.item() == pytest.approx(loss.item(), rel=1e-12) and plain_logs["mi"] == logs["mi"]


def test_explicit_mim_float64_whatever_the_input():
    z1, z2 = correlated_views(64, 8, 2)
    l64, _ = explicit_mim.explicit_mim_loss(z1, z2)
    l32, _ = explicit_mim.explicit_mim_loss(z1.float(), z2.float())
    assert l32.dtype == torch.float64 and l32.item() == pytest.approx(l64.item(), abs=1e-4)


def test_explicit_mim_schur_form_equals_joint_form():
    """I = 1/2 [logdet(S2 + eps I) - logdet(R_E)], R_E the Schur complement (LDMI)."""
    N, D, eps = 50, 6, 1e-3
    z1, z2 = correlated_views(N, D, 3)
    j = torch.cat([z1, z2], 1)
    j = j - j.mean(0)
    S = j.T @ j / N
    I_D = eps * torch.eye(D, dtype=torch.float64)
    R_E = S[D:, D:] + I_D - S[D:, :D] @ torch.linalg.inv(S[:D, :D] + I_D) @ S[:D, D:]
    schur = 0.5 * (torch.logdet(S[D:, D:] + I_D) - torch.logdet(R_E))
    _, logs = read(explicit_mim.explicit_mim_loss(z1, z2, eps=eps))
    assert logs["mi"] == pytest.approx(schur.item(), rel=1e-12)


def test_explicit_mim_canonical_correlation_form():
    """I = -1/2 sum log(1 - rho_i^2), rho the canonical correlations."""
    z1, z2 = correlated_views(200, 5, 4, rho=0.6, normalise=False)
    a, b = z1 - z1.mean(0), z2 - z2.mean(0)
    S1, S2, S12 = a.T @ a / 200, b.T @ b / 200, a.T @ b / 200

    def inv_sqrt(M):
        w, V = torch.linalg.eigh(M)
        return V @ torch.diag(w ** -0.5) @ V.T
    rho = torch.linalg.svdvals(inv_sqrt(S1) @ S12 @ inv_sqrt(S2))
    _, logs = read(explicit_mim.explicit_mim_loss(z1, z2, eps=0.0))
    assert logs["mi"] == pytest.approx((-0.5 * torch.log(1 - rho ** 2).sum()).item(), rel=1e-10)


def test_explicit_mim_affine_invariance_scale_and_normaliser():
    z1, z2 = correlated_views(100, 4, 5, normalise=False)
    g = torch.Generator().manual_seed(6)
    A, B = (torch.randn(4, 4, generator=g, dtype=torch.float64) + 2 * torch.eye(4, dtype=torch.float64)
            for _ in range(2))
    _, base = read(explicit_mim.explicit_mim_loss(z1, z2, eps=0.0))
    _, moved = read(explicit_mim.explicit_mim_loss(z1 @ A + 3.0, z2 @ B - 1.0, eps=0.0))
    assert moved["mi"] == pytest.approx(base["mi"], rel=1e-10)
    # Scale acts like eps: I(s z1, s z2; eps) = I(z1, z2; eps / s^2).
    _, scaled = read(explicit_mim.explicit_mim_loss(3.0 * z1, 3.0 * z2, eps=0.09))
    _, eps_div = read(explicit_mim.explicit_mim_loss(z1, z2, eps=0.01))
    assert scaled["mi"] == pytest.approx(eps_div["mi"], rel=1e-10)
    # The 1/N vs 1/(N - 1) normaliser cancels at eps = 0.
    unbiased, _ = explicit_mim.ExplicitMIMLoss(4, eps=0.0, unbiased=True)(z1, z2)
    assert unbiased.item() == pytest.approx(-base["mi"], rel=1e-10)


def test_explicit_mim_population_value():
    """Z2 = 0.8 z1 + 0.6 n gives I = -(D/2) log(0.36) = 8.17 nats for D = 16."""
    z1, z2 = correlated_views(200_000, 16, 7, rho=0.8, normalise=False)
    _, logs = read(explicit_mim.explicit_mim_loss(z1, z2, eps=0.0))
    assert logs["mi"] == pytest.approx(-8 * math.log(0.36), abs=0.02)


def test_explicit_mim_gradient_closed_form_and_finite_differences():
    """Gradient: dL/dz1 = -1/2 [(2/N) a (S1 + eps I)^-1 - first D columns of (2/N) j (S + eps I)^-1]."""
    N, D, eps = 30, 4, 1e-3
    z1, z2 = correlated_views(N, D, 8)
    a_, b_ = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss, _ = explicit_mim.explicit_mim_loss(a_, b_, eps=eps)
    loss.backward()
    j = torch.cat([z1, z2], 1)
    j = j - j.mean(0)
    S = j.T @ j / N
    eye = torch.eye(2 * D, dtype=torch.float64)
    joint = (2 / N) * j @ torch.linalg.inv(S + eps * eye)
    g1 = -0.5 * ((2 / N) * j[:, :D] @ torch.linalg.inv(S[:D, :D] + eps * eye[:D, :D]) - joint[:, :D])
    g2 = -0.5 * ((2 / N) * j[:, D:] @ torch.linalg.inv(S[D:, D:] + eps * eye[:D, :D]) - joint[:, D:])
    torch.testing.assert_close(a_.grad, g1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b_.grad, g2, rtol=1e-9, atol=1e-12)
    small1, small2 = correlated_views(9, 3, 9)
    assert torch.autograd.gradcheck(lambda x, y: explicit_mim.explicit_mim_loss(x, y, eps=1e-3)[0],
                                    (small1.requires_grad_(), small2.requires_grad_()))


def test_explicit_mim_singular_batch_rewards_eps_so_the_loss_refuses_it():
    """With N < 2D + 1 even independent views score an MI that grows as eps shrinks (the terms computed
    on the batch covariance directly); the loss refuses such a batch."""
    g = torch.Generator().manual_seed(10)
    z1, z2 = (F.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    j = torch.cat([z1, z2], dim=1)
    S = explicit_mim.cov(j, j.mean(0))
    mis = [explicit_mim.mi_terms(S, 8, e)[0].item() for e in (1e-4, 1e-6, 1e-8)]
    assert mis[0] < mis[1] < mis[2] and mis[2] - mis[1] > 5
    with pytest.raises(ValueError, match="N >= 2D"):
        explicit_mim.explicit_mim_loss(z1, z2, eps=1e-8)
    assert explicit_mim.ExplicitMIMLoss(8, allow_singular=True)(z1, z2)[1]["mi"].item() == pytest.approx(mis[2])


def test_explicit_mim_and_corinfomax_share_the_marginal_log_dets():
    """(2/D)(-I) minus CorInfoMax's log-det term (la_R = la_mu = 0) is +ld_joint / D."""
    N, D = 64, 8
    z1, z2 = correlated_views(N, D, 11)
    scaled, logs = read(explicit_mim.ExplicitMIMLoss(D, scale=2 / D)(z1, z2))
    cim, _ = corinfomax.CorInfoMaxLoss(D, alpha=0.0, la_R=0.0, la_mu=0.0)(z1, z2)
    assert (scaled - cim).item() == pytest.approx(logs["logdet_joint"] / D, rel=1e-10)


def test_explicit_mim_weighted_variant():
    z1, z2 = correlated_views(64, 8, 12)
    loss, logs = read(explicit_mim.ExplicitMIMLoss(8, joint_weight=0.5, mse_weight=3.0)(z1, z2))
    mse = (z1 - z2).pow(2).mean().item()
    want = -0.5 * (logs["logdet1"] + logs["logdet2"] - 0.5 * logs["logdet_joint"]) + 3.0 * mse
    assert loss.item() == pytest.approx(want, rel=1e-12)


def test_explicit_mim_running_estimates_match_naive_recursion():
    """Three consecutive steps of the EMA variant against a naive recursion."""
    N, D, la_R, la_mu, R_ini, eps = 24, 4, 0.3, 0.2, 1.5, 1e-6
    crit = explicit_mim.ExplicitMIMLoss(D, eps=eps, estimator="ema", la_R=la_R, la_mu=la_mu, R_ini=R_ini)
    mu, R = torch.zeros(2 * D, dtype=torch.float64), R_ini * torch.eye(2 * D, dtype=torch.float64)
    eye = torch.eye(2 * D, dtype=torch.float64)
    for step in range(3):
        z1, z2 = correlated_views(N, D, 20 + step)
        rows = [torch.cat([z1[i], z2[i]]) for i in range(N)]
        mu = la_mu * mu + (1 - la_mu) * sum(rows) / N
        R = la_R * R + (1 - la_R) * sum(torch.outer(r - mu, r - mu) for r in rows) / N
        lds = [torch.linalg.slogdet(M)[1] for M in (R[:D, :D] + eps * eye[:D, :D],
                                                     R[D:, D:] + eps * eye[:D, :D], R + eps * eye)]
        loss, logs = read(crit(z1.requires_grad_(), z2))
        assert logs["mi"] == pytest.approx(0.5 * (lds[0] + lds[1] - lds[2]).item(), rel=1e-10)
        torch.testing.assert_close(crit.R, R, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(crit.mu, mu, rtol=1e-12, atol=1e-14)
        assert crit.R.grad_fn is None and crit.R.dtype == torch.float64
        loss.backward()
        assert z1.grad is not None


def test_explicit_mim_trains_free_embeddings_without_collapse():
    """On free parameters: I rises and the spectrum of S1 stays spread."""
    torch.manual_seed(0)
    N, D = 128, 8
    base = torch.randn(N, D, requires_grad=True)
    crit = explicit_mim.ExplicitMIMLoss(D, scale=2 / D)
    opt = torch.optim.SGD([base], lr=2.0)
    mis = []
    for _ in range(150):
        z1 = F.normalize(base + 0.5 * torch.randn(N, D), dim=1)
        z2 = F.normalize(base + 0.5 * torch.randn(N, D), dim=1)
        loss, logs = read(crit(z1, z2))
        mis.append(logs["mi"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert np.mean(mis[-10:]) > np.mean(mis[:10]) + 1.5   # measured: 4.1 -> 6.7 nats
    z = F.normalize(base.detach(), dim=1)
    eig = torch.linalg.eigvalsh(torch.cov(z.T))
    assert eig.min() > 0.2 * eig.max()


# ============================================================================================
# SSL-HSIC loss against a naive float64 transcription
# ============================================================================================

def naive_hsic(z, c, self_pairs=True):
    """Explicit double loops over the n = M N flattened rows a = p N + i."""
    M, N, D = z.shape
    n = M * N
    x = [z[a // N, a % N] for a in range(n)]
    K = [[c / torch.sqrt(((x[a] - x[b]) ** 2).sum() + c**2) for b in range(n)] for a in range(n)]
    same = sum(K[a][b] for a in range(n) for b in range(n) if a % N == b % N and (self_pairs or a != b))
    total = sum(K[a][b] for a in range(n) for b in range(n))
    hsic_zy = 1.0 * (same / (N * M * (M - 1)) - total / n**2)     # label weight w = 1
    Km = torch.stack([torch.stack(row) for row in K])
    H = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    hsic_zz = torch.trace(Km @ H @ Km @ H) / n**2
    return hsic_zy, hsic_zz


def unit_views(M, N, D, seed, spread=0.5):
    """M L2-normalised views of N images: a shared image direction plus per-view noise."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(1, N, D, generator=g, dtype=torch.float64)
    return F.normalize(images + spread * torch.randn(M, N, D, generator=g, dtype=torch.float64), dim=2)


@pytest.mark.parametrize("M,N,D,c", [(2, 5, 3, 1.0), (4, 4, 5, 0.5), (3, 6, 4, 2.0), (4, 3, 8, 1.0)])
def test_ssl_hsic_exact_matches_naive(M, N, D, c):
    z = unit_views(M, N, D, seed=M * 100 + N).requires_grad_()
    z_naive = z.detach().clone().requires_grad_()
    loss, logs = ssl_hsic.ssl_hsic_loss(z, gamma=3.0, sigma=c)
    zy, zz = naive_hsic(z_naive, c)
    want = 3.0 * torch.sqrt(zz) - zy
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logs["hsic_zy"], zy.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logs["hsic_zz"], zz.detach(), rtol=1e-12, atol=1e-14)
    loss.backward()
    want.backward()
    torch.testing.assert_close(z.grad, z_naive.grad, rtol=1e-9, atol=1e-12)


def test_ssl_hsic_self_pairs_add_a_constant():
    """Including the pairs a = b adds exactly 1/(M - 1) to hsic_zy, and no gradient."""
    for M in (2, 4):
        z = unit_views(M, 5, 4, seed=M).requires_grad_()
        (l_in, logs_in), (l_ex, logs_ex) = (ssl_hsic.ssl_hsic_loss(z, zy_self_pairs=s) for s in (True, False))
        assert (logs_in["hsic_zy"] - logs_ex["hsic_zy"]).item() == pytest.approx(1 / (M - 1), abs=1e-12)
        zy_ex, _ = naive_hsic(z.detach(), 1.0, self_pairs=False)
        assert logs_ex["hsic_zy"].item() == pytest.approx(zy_ex.item(), abs=1e-12)
        g_in, = torch.autograd.grad(l_in, z)
        g_ex, = torch.autograd.grad(l_ex, z)
        torch.testing.assert_close(g_in, g_ex, rtol=1e-9, atol=1e-12)


def test_ssl_hsic_kernel_properties():
    x, y = unit_rows(7, 4, 1), unit_rows(5, 4, 2)
    for c in (0.5, 1.0, 2.0):
        K = ssl_hsic.imq_kernel(x, y, c)
        want = torch.tensor([[1 / math.sqrt(1 + ((a - b) ** 2).sum().item() / c**2) for b in y] for a in x],
                            dtype=torch.float64)
        torch.testing.assert_close(K, want, rtol=1e-12, atol=1e-14)
        assert (K > 0).all() and (K <= 1).all()
        torch.testing.assert_close(ssl_hsic.imq_kernel(x, x, c).diagonal(), torch.ones(7, dtype=torch.float64))
    # k depends on ||x - y|| / c only: scaling both points and c together leaves it unchanged.
    torch.testing.assert_close(ssl_hsic.imq_kernel(3 * x, 3 * y, 6.0), ssl_hsic.imq_kernel(x, y, 2.0))


def test_ssl_hsic_scale_mixture_sampler_reproduces_the_imq_kernel():
    """Per-feature products 2 cos(w.x/c + b) cos(w.y/c + b) average to k(x, y)."""
    F_ = 400_000
    x, y = unit_rows(3, 6, 3), unit_rows(3, 6, 4) * 1.5
    for c in (0.7, 1.0):
        phi_x = ssl_hsic.rff(x, c, F_, torch.Generator().manual_seed(11))
        phi_y = ssl_hsic.rff(y, c, F_, torch.Generator().manual_seed(11))   # the same draw
        per_feature = F_ * phi_x * phi_y                  # (3, F): unbiased single-feature estimates
        mean, se = per_feature.mean(1), per_feature.std(1) / math.sqrt(F_)
        exact = torch.tensor([1 / math.sqrt(1 + ((a - b) ** 2).sum().item() / c**2) for a, b in zip(x, y)],
                             dtype=torch.float64)
        assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)


def test_ssl_hsic_rff_is_the_kernel_formula_with_feature_kernels():
    """For fixed draws, the RFF estimators equal the exact formulas with
    K_A = Phi_A Phi_A^T in hsic_zy (diagonal included) and tr(H K_B H K_A) / n^2."""
    M, N, D, F_, c = 4, 5, 3, 64, 0.8
    z = unit_views(M, N, D, seed=5)
    zy, zz = ssl_hsic.hsic_rff(z, c, F_, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x = z.reshape(M * N, D)
    phi_a, phi_b = ssl_hsic.rff(x, c, F_, g), ssl_hsic.rff(x, c, F_, g)   # draws A then B
    n = M * N
    KA, KB = phi_a @ phi_a.T, phi_b @ phi_b.T
    same = sum(KA[a, b] for a in range(n) for b in range(n) if a % N == b % N)
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    torch.testing.assert_close(zy, same / (N * M * (M - 1)) - KA.sum() / n**2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(zz, torch.trace(H @ KB @ H @ KA) / n**2, rtol=1e-12, atol=1e-14)


def test_ssl_hsic_rff_estimates_agree_with_exact_in_expectation():
    """The mean over independent draws is within Monte-Carlo error of the exact value;
    a single draw lies within a few standard deviations of the draws."""
    M, N, D, c, R = 4, 6, 4, 1.0, 400
    z = unit_views(M, N, D, seed=9)
    exact = torch.stack(ssl_hsic.hsic_exact(z, torch.tensor(c, dtype=torch.float64)))
    draws = torch.stack([torch.stack(ssl_hsic.hsic_rff(z, c, 128, torch.Generator().manual_seed(1000 + r)))
                         for r in range(R)])                # (R, 2): hsic_zy, hsic_zz
    mean, sd = draws.mean(0), draws.std(0)
    assert ((mean - exact).abs() < 4 * sd / math.sqrt(R)).all(), (mean, exact, sd)
    one = torch.stack(ssl_hsic.hsic_rff(z, c, 128, torch.Generator().manual_seed(7)))
    assert ((one - exact).abs() < 5 * sd).all()
    assert (sd > 0).all()     # the draws really differ: the checks above are not vacuous


def test_ssl_hsic_invariant_to_image_permutation_and_view_order():
    z = unit_views(4, 6, 5, seed=2)
    loss, _ = ssl_hsic.ssl_hsic_loss(z)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssl_hsic.ssl_hsic_loss(z[:, perm])[0], loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ssl_hsic.ssl_hsic_loss(z[[2, 0, 3, 1]])[0], loss, rtol=1e-12, atol=1e-14)


def test_ssl_hsic_gradients():
    """Gradcheck of the exact loss; the scale c gets no gradient from the HSIC terms."""
    z = unit_views(3, 4, 3, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ssl_hsic.ssl_hsic_loss(t, sigma=0.9)[0], (z,))
    c = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    loss, _ = ssl_hsic.ssl_hsic_loss(z, sigma=c, num_features=32, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert c.grad is None and z.grad.abs().sum() > 0


def test_ssl_hsic_collapse_and_perfect_alignment_values():
    """All views identical within an image and images orthonormal: hsic_zy = 1 + 1/(M-1) - mean K."""
    M, N = 4, 6
    z = torch.eye(N, dtype=torch.float64).expand(M, N, N).clone()
    _, logs = ssl_hsic.ssl_hsic_loss(z)
    k_other = 1 / math.sqrt(3)                      # ||e_i - e_j||^2 = 2, c = 1
    mean_k = (1 + (N - 1) * k_other) / N
    assert logs["hsic_zy"].item() == pytest.approx(M * M / (M * (M - 1)) - mean_k, rel=1e-12)
    # Full collapse (every row the same point): nothing varies, so HSIC(Z, Z) = 0.
    _, logs = ssl_hsic.ssl_hsic_loss(torch.ones(M, N, 3, dtype=torch.float64) / math.sqrt(3))
    assert logs["hsic_zz"].item() == pytest.approx(0.0, abs=1e-14)
    assert logs["hsic_zy"].item() == pytest.approx(1 / (M - 1), abs=1e-12)


def _scale_objective(c, d2):
    """The kernel-scale objective written directly: mean of 1/2 log max(g^2, 1e-14),
    g = -(c/2)(d2 + c^2)^(-3/2)."""
    g = -(c / 2) / (d2 + c * c) ** 1.5
    return (0.5 * torch.log(torch.clamp(g * g, min=1e-14))).mean()


@pytest.mark.parametrize("sigma, dtype, rel", [(1.0, torch.float64, 1e-12), (1e-7, torch.float64, 1e-4),
                                              (1.0, torch.float32, 1e-6)])
def test_ssl_hsic_scale_step_is_adam_on_the_grad_norm_objective(sigma, dtype, rel):
    """Three steps of the module's gradient and hand-written Adam against autograd on the objective
    written directly and torch.optim.Adam, in float64. At c = 1e-7 the clamp holds g^2 at 1e-14 for some
    pairs, not all, at the first step; the gradient's size there sets the later Adam steps (without
    the clamp's mask c is off by 2.5e-3 relative). There c^2 = 1e-14, so the module's distances of
    a row to itself, |x|^2 + |x|^2 - 2 x.x ~ 1e-16 where the test's differences give 0, move c by
    3e-5 relative. float32: the module computes in the embeddings' precision, as in training."""
    M, N, D = 4, 10, 5
    z = unit_views(M, N, D, seed=3)
    crit = ssl_hsic.SSLHSIC(sigma=sigma, num_features=16, seed=2)
    c_param = torch.nn.Parameter(torch.tensor(sigma, dtype=torch.float64))
    adam = torch.optim.Adam([c_param], lr=3e-4, betas=(0.9, 0.999), eps=1e-8)
    clamped = []    # share of pairs whose g^2 the clamp holds at 1e-14, per step
    for _ in range(3):
        g = crit._generator(z.device, 0)       # the draw the module makes for this call
        rows = [z[torch.arange(M)[:, None], torch.randint(N, (M, 1024 // M), generator=g)].reshape(-1, D)
                for _ in range(2)]
        d2 = ((rows[0][:, None, :] - rows[1][None, :, :]) ** 2).sum(-1)
        clamped.append(((c_param / 2) ** 2 / (d2 + c_param**2) ** 3 < 1e-14).double().mean().item())
        adam.zero_grad()
        (-_scale_objective(c_param, d2)).backward()
        adam.step()
        _, logs = read(crit(z.to(dtype)))
        assert logs["c"] != crit.c.item()      # the loss used c from before the step
        assert crit.c.item() == pytest.approx(c_param.item(), rel=rel)
    assert (0 < clamped[0] < 1) == (sigma < 1)


def test_ssl_hsic_scale_objective_optimum():
    """With every squared distance equal to d, the objective peaks at c = sqrt(d / 2);
    with a learning rate raised for speed, the module's c converges to the all-pairs optimum."""
    d2 = torch.full((4, 4), 0.8, dtype=torch.float64)
    cs = torch.linspace(0.2, 1.5, 1301, dtype=torch.float64)
    best = cs[torch.stack([_scale_objective(c, d2) for c in cs]).argmax()]
    assert best.item() == pytest.approx(math.sqrt(0.4), abs=1e-3)
    M, N = 2, 16
    z = torch.eye(N, dtype=torch.float64).expand(M, N, N).clone()   # d2 is 0 (same image) or 2
    crit = ssl_hsic.SSLHSIC(num_features=8, scale_lr=0.01)
    for _ in range(300):
        crit(z)
    # All-pairs stationary point: mean over pairs of 3c^2 / (d2 + c^2) = 1.
    share_same = 1 / N
    f = lambda c: share_same * 3 + (1 - share_same) * 3 * c**2 / (2 + c**2) - 1
    lo, hi = 0.01, 5.0
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if f((lo + hi) / 2) < 0 else (lo, (lo + hi) / 2)
    assert crit.c.item() == pytest.approx(lo, rel=0.01)


def test_ssl_hsic_loss_trains_free_embeddings_without_collapse():
    """On free parameters: the loss falls, views of one image align, the images stay
    spread over the sphere, and c stays positive and finite."""
    torch.manual_seed(0)
    N, D = 32, 8
    base = torch.randn(N, D, requires_grad=True)
    noise = torch.randn(2, N, D, generator=torch.Generator().manual_seed(1))

    def alignment():   # mean cosine between two fixed noisy views of each image
        v = F.normalize(base.detach() + 0.4 * noise, dim=2)
        return (v[0] * v[1]).sum(1).mean().item()
    crit = ssl_hsic.SSLHSIC(num_features=256)
    opt = torch.optim.SGD([base], lr=20.0)
    losses, align_before = [], alignment()
    for _ in range(150):
        loss, logs = read(crit(F.normalize(base + 0.4 * torch.randn(4, N, D), dim=2)))
        losses.append(logs["loss"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05
    assert alignment() > align_before + 0.02
    assert 0 < crit.c.item() < 10
    e = F.normalize(base.detach(), dim=1)
    assert (e @ e.T)[~torch.eye(N, dtype=torch.bool)].mean().abs() < 0.1   # not collapsed onto a point


# ============================================================================================
# HyDeS loss against a naive float64 evaluation of the vMF densities
# ============================================================================================

def naive_log_vmf_normaliser(D, kappa):
    """log C_D(kappa) from the plain Bessel series I_nu(k) = sum_m (k/2)^(2m+nu) / (m! Gamma(m+nu+1))."""
    nu = D / 2 - 1
    bessel = sum((kappa / 2) ** (2 * m + nu) / (math.factorial(m) * math.gamma(m + nu + 1)) for m in range(80))
    return nu * math.log(kappa) - D / 2 * math.log(2 * math.pi) - math.log(bessel)


def naive_hydes(z, kappa, alpha, beta, global_self, global_positives=True):
    """Explicit loops over anchors i and neighbours j of the densities C_D exp(kappa z_i.z_j)."""
    V, N, D = z.shape
    C = math.exp(naive_log_vmf_normaliser(D, kappa))
    pts = [(z[v, n], n) for v in range(V) for n in range(N)]
    h_loc, h_glob = 0.0, 0.0
    for i, (zi, ni) in enumerate(pts):
        local = [C * torch.exp(kappa * (zi * zj).sum()) for j, (zj, nj) in enumerate(pts) if nj == ni and j != i]
        glob = [C * torch.exp(kappa * (zi * zj).sum()) for j, (zj, nj) in enumerate(pts)
                if (j != i or global_self) and (nj != ni or j == i or global_positives)]
        h_loc = h_loc - torch.log(sum(local) / len(local))
        h_glob = h_glob - torch.log(sum(glob) / len(glob))
    h_loc, h_glob = h_loc / len(pts), h_glob / len(pts)
    return h_loc, h_glob


@pytest.mark.parametrize("V,N,D,kappa,alpha,beta,self_", [
    (2, 4, 3, 10.0, 1.0, 1.0, True), (2, 5, 4, 5.0, 1.0, 1.0, False), (3, 3, 5, 10.0, 0.5, 1.0, True),
    (4, 3, 3, 2.0, 0.75, 1.25, False), (3, 4, 6, 8.0, 1.0, 0.5, True)])
def test_hydes_matches_naive_densities(V, N, D, kappa, alpha, beta, self_):
    z = unit_views(V, N, D, seed=V * 10 + N).requires_grad_()
    z_naive = z.detach().clone().requires_grad_()
    loss, logs = hydes.hydes_loss(z, kappa, alpha, beta, global_self=self_)
    h_loc, h_glob = naive_hydes(z_naive, kappa, alpha, beta, self_)
    log_c = naive_log_vmf_normaliser(D, kappa)
    want = beta * h_loc - alpha * h_glob - (alpha - beta) * log_c    # the constant the loss drops
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    assert logs["h_local"].item() == pytest.approx(h_loc.item(), rel=1e-10)
    assert logs["h_global"].item() == pytest.approx(h_glob.item(), rel=1e-10)
    assert logs["mi"].item() == pytest.approx((alpha * h_glob - beta * h_loc).item(), rel=1e-9, abs=1e-9)
    loss.backward()
    want.backward()
    torch.testing.assert_close(z.grad, z_naive.grad, rtol=1e-9, atol=1e-12)


def test_hydes_global_positives_switch_matches_naive():
    z = unit_views(3, 4, 4, seed=1)
    loss, logs = hydes.hydes_loss(z, 6.0, global_self=False, global_positives=False)
    h_loc, h_glob = naive_hydes(z, 6.0, 1.0, 1.0, global_self=False, global_positives=False)
    assert loss.item() == pytest.approx((h_loc - h_glob).item(), rel=1e-10)


def nt_xent(z1, z2, tau):
    """SimCLR's NT-Xent written as a 2N-way cross-entropy: the positive of row i is its other view."""
    z = torch.cat([z1, z2])
    n = len(z1)
    logits = z @ z.T / tau
    logits.fill_diagonal_(-math.inf)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def test_hydes_is_nt_xent_with_leave_one_out():
    """V = 2, alpha = beta = 1, no self pair: L = NT-Xent(tau = 1/kappa) - log(M - 1)."""
    z = unit_views(2, 7, 5, seed=3)
    for kappa in (2.0, 10.0):
        loss, _ = hydes.hydes_loss(z, kappa, global_self=False)
        want = nt_xent(z[0], z[1], 1 / kappa) - math.log(2 * 7 - 1)
        assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_hydes_mi_cap_and_collapse():
    """I <= log(|A| / (V - 1)) (reached by aligned views of orthogonal images at
    large kappa); all embeddings equal give loss (alpha - beta) kappa and I = 0 for alpha = beta."""
    for V, N, self_ in ((2, 6, False), (3, 5, True), (4, 4, True)):
        M = V * N
        cap = math.log((M if self_ else M - 1) / (V - 1))
        for z in (unit_views(V, N, N, seed=V), torch.eye(N, dtype=torch.float64).expand(V, N, N).clone()):
            _, logs = hydes.hydes_loss(z, 40.0, global_self=self_)
            assert logs["mi"].item() <= cap + 1e-9
        # Aligned views of orthogonal images: the cap without the self pair, log(M / V) with it
        # (the self term e^kappa then joins the V - 1 positives in the global sum).
        reached = cap if not self_ else math.log(M / V)
        assert logs["mi"].item() == pytest.approx(reached, abs=1e-6)
    same = torch.ones(3, 4, 5, dtype=torch.float64) / math.sqrt(5)
    for alpha, beta in ((1.0, 1.0), (0.5, 1.0)):
        loss, logs = hydes.hydes_loss(same, 10.0, alpha, beta)
        assert loss.item() == pytest.approx((alpha - beta) * 10.0, abs=1e-10)
    assert logs["h_local"].item() == pytest.approx(logs["h_global"].item(), rel=1e-12)


def test_hydes_gradient_closed_form_and_gradcheck():
    """Gradient: dL/dZ = (kappa / M)(W + W^T) Z, W = alpha W^A - beta W^P (row softmaxes)."""
    V, N, D, kappa, alpha, beta = 3, 4, 5, 7.0, 0.8, 1.1
    z = unit_views(V, N, D, seed=8).requires_grad_()
    for self_ in (True, False):
        loss, _ = hydes.hydes_loss(z, kappa, alpha, beta, global_self=self_)
        grad, = torch.autograd.grad(loss, z)
        Z = z.detach().reshape(-1, D)
        M = len(Z)
        logits = kappa * Z @ Z.T
        image = torch.arange(N).repeat(V)
        pos = (image[:, None] == image[None, :]) & ~torch.eye(M, dtype=torch.bool)
        glob = torch.ones(M, M, dtype=torch.bool) if self_ else ~torch.eye(M, dtype=torch.bool)
        WA = torch.softmax(logits.masked_fill(~glob, -math.inf), 1)
        WP = torch.softmax(logits.masked_fill(~pos, -math.inf), 1)
        W = alpha * WA - beta * WP
        torch.testing.assert_close(grad.reshape(-1, D), kappa / M * (W + W.T) @ Z, rtol=1e-10, atol=1e-12)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: hydes.hydes_loss(F.normalize(t, dim=2), 3.0, 0.7, 1.0)[0], (x,))


def test_hydes_invariances_and_self_weight():
    z = unit_views(3, 5, 4, seed=6)
    loss, logs = hydes.hydes_loss(z, 10.0)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(1))
    Q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    for other in (z[:, perm], z[[2, 0, 1]], z @ Q):
        torch.testing.assert_close(hydes.hydes_loss(other, 10.0)[0], loss, rtol=1e-12, atol=1e-12)
    # Self weight e^kappa / sum_{j in A(i)} e^(kappa s_ij), averaged over anchors.
    Z = z.reshape(-1, 4)
    want = (math.exp(10.0) / torch.exp(10.0 * Z @ Z.T).sum(1)).mean()
    assert logs["w_self"].item() == pytest.approx(want.item(), rel=1e-10)
    assert hydes.hydes_loss(z, 10.0, global_self=False)[1]["w_self"].item() == 0.0


def test_hydes_anchor_subsets_average_to_the_full_loss():
    z = unit_views(3, 6, 4, seed=4)
    full, _ = hydes.hydes_loss(z, 5.0, 0.9, 1.0)
    halves = [hydes.hydes_loss(z, 5.0, 0.9, 1.0, anchors=s)[0] for s in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, full, rtol=1e-12, atol=1e-12)


def test_log_vmf_normaliser():
    for kappa in (0.5, 2.0, 10.0, 50.0):
        want = math.log(kappa / (4 * math.pi * math.sinh(kappa)))       # C_3 = kappa / (4 pi sinh kappa)
        assert hydes.log_vmf_normaliser(3, kappa) == pytest.approx(want, rel=1e-12)
    assert hydes.log_vmf_normaliser(128, 10.0) == pytest.approx(126.66, abs=0.01)
    assert hydes.log_vmf_normaliser(16, 3.0) == pytest.approx(naive_log_vmf_normaliser(16, 3.0), rel=1e-12)
    assert math.isfinite(hydes.log_vmf_normaliser(4096, 10.0))


def test_hydes_trains_free_embeddings_below_the_cap():
    """On free parameters: the MI estimate rises and stays below its cap."""
    torch.manual_seed(0)
    V, N, D = 2, 32, 8
    base = torch.randn(N, D, requires_grad=True)
    crit = hydes.HyDeSLoss(kappa=10.0)
    opt = torch.optim.SGD([base], lr=1.0)
    mis = []
    for _ in range(100):
        loss, logs = read(crit(F.normalize(base + 0.4 * torch.randn(V, N, D), dim=2)))
        mis.append(logs["mi"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert np.mean(mis[-10:]) > np.mean(mis[:10]) + 0.5
    assert max(mis) <= math.log(V * N / (V - 1)) + 1e-6


def test_hydes_train_step_under_bf16_autocast():
    """Bf16 autocast in the network, float32 loss: finite loss, finite gradients."""
    cfg = hydes.parse_args(["--cpu", "--amp", "bf16"] + [str(a) for a in tiny("hydes.py")])
    cfg.steps_per_epoch, cfg.use_cuda = 4, False
    model, criterion, optimizer, scaler = hydes.build(cfg, argparse.Namespace(device=torch.device("cpu"), world=1))
    x = torch.randn(2, 8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    logs = hydes.train_step(model, criterion, optimizer, scaler, [x[0], x[1]], 2, cfg)
    assert math.isfinite(logs["loss"]) and all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * 16 / 256 * 2 / 4)   # warm-up
    assert optimizer.param_groups[1]["weight_decay"] == 0.0       # biases and BatchNorm


def _hydes_distributed_run(rank, world, port, out):
    _join_gloo(rank, world, port)
    per = 8 // world
    result = {}
    for self_ in (True, False):
        z = unit_views(3, 8, 4, seed=31)[:, rank * per:(rank + 1) * per].clone().requires_grad_()
        loss, logs = read(hydes.HyDeSLoss(6.0, 0.8, 1.0, global_self=self_)(
            torch.stack([common.gather_with_grad(v) for v in z])))
        loss.backward()
        result[self_] = (logs["loss"], z.grad / world)     # DDP divides by world
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_hydes_two_processes_equal_one(tmp_path):
    """Local anchors against gathered columns give the single-process loss and input
    gradients, with and without the self pair (3 views: checks image ids and self columns)."""
    mp.spawn(_hydes_distributed_run, args=(2, common.free_port(), str(tmp_path)), nprocs=2)
    for self_ in (True, False):
        z = unit_views(3, 8, 4, seed=31).requires_grad_()
        loss, _ = hydes.hydes_loss(z, 6.0, 0.8, 1.0, global_self=self_)
        loss.backward()
        for rank in range(2):
            got_loss, got_grad = torch.load(tmp_path / f"rank{rank}.pt")[self_]
            assert got_loss == pytest.approx(loss.item(), rel=1e-12)
            torch.testing.assert_close(got_grad, z.grad[:, rank * 4:(rank + 1) * 4], rtol=1e-10, atol=1e-13)


def test_hydes_views_and_local_crops_run(tmp_path):
    proc = run_script(*tiny("hydes.py"), "--views", 4, "--local-crops", 2, "--max-steps", 1,
                      "--output-dir", tmp_path / "o", script="hydes.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(hydes.pretrain_views(hydes.parse_args(["--views", "4", "--local-crops", "2", "--cpu"]))) == 6
    proc = run_script(*tiny("hydes.py"), "--views", 1, "--output-dir", tmp_path / "p", script="hydes.py")
    assert "argument --views: expected an integer >= 2, got '1'" in assert_one_line_error(proc)


# ============================================================================================
# Schedule, networks, sampler, data
# ============================================================================================

def test_lr_schedule_matches_the_official_schedule():
    cfg = argparse.Namespace(lr=0.5, min_lr=1e-6, warmup_epochs=10, epochs=1000, lr_per_step=False)
    assert corinfomax.lr_at(cfg, 0) == pytest.approx(3e-3)              # epoch 1
    assert corinfomax.lr_at(cfg, 9) == pytest.approx(0.5)               # epoch W
    assert corinfomax.lr_at(cfg, 10) == pytest.approx(0.5)              # epoch W + 1
    assert corinfomax.lr_at(cfg, 4) == pytest.approx(3e-3 + 4 * (0.5 - 3e-3) / 9)
    k = 500
    want = 1e-6 + (0.5 - 1e-6) * (1 + math.cos(math.pi * (k - 10) / 990)) / 2
    assert corinfomax.lr_at(cfg, k) == pytest.approx(want)
    assert corinfomax.lr_at(cfg, 999) == pytest.approx(1e-6, abs=2e-6)  # approaches min_lr
    assert corinfomax.lr_at(cfg, 20, 0.9) == corinfomax.lr_at(cfg, 20)  # constant within an epoch
    cfg.lr_per_step = True
    assert corinfomax.lr_at(cfg, 20, 0.5) == pytest.approx(corinfomax.lr_at(cfg, 20.5))
    assert corinfomax.lr_at(cfg, 5, 0.0) == pytest.approx(3e-3 + 0.5 * (0.5 - 3e-3))
    cfg.warmup_epochs = 0.25                         # fractional warm-up, per step
    assert corinfomax.lr_at(cfg, 0, 0.125) == pytest.approx(3e-3 + 0.5 * (0.5 - 3e-3))
    assert corinfomax.lr_at(cfg, 0, 0.25) == pytest.approx(0.5)
    cfg.epochs, cfg.warmup_epochs = 1, 0.5           # the README's one-epoch run anneals fully
    assert corinfomax.lr_at(cfg, 0, 0.75) == pytest.approx((0.5 + 1e-6) / 2)
    assert corinfomax.lr_at(cfg, 0, 209 / 210) == pytest.approx(1e-6, abs=2e-4)


def make_cfg(**kw):
    cfg = corinfomax.parse_args(["--cpu"] + [str(a) for a in TINY])
    cfg.use_cuda = False
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_model_architecture():
    cfg = make_cfg(projector="32-16-8")
    m = corinfomax.Model(cfg)
    assert isinstance(m.backbone.maxpool, nn.Identity) and m.backbone.conv1.kernel_size == (3, 3)
    assert m.backbone.conv1.stride == (1, 1)
    lin = [l for l in m.projector if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features, l.bias is not None) for l in lin] == \
        [(512, 32, True), (32, 16, True), (16, 8, False)]
    assert not any(isinstance(l, nn.BatchNorm1d) for l in m.projector)
    z = m(torch.randn(3, 3, 16, 16))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    # zero_init_residual: the last BN of every block starts at zero.
    blocks = [blk for layer in (m.backbone.layer1, m.backbone.layer4) for blk in layer]
    assert all(blk.bn2.weight.abs().sum() == 0 for blk in blocks)
    imnet = corinfomax.Model(make_cfg(arch="resnet50", stem="imagenet", projector="64-64-32", proj_bn=True))
    assert sum(isinstance(l, nn.BatchNorm1d) for l in imnet.projector) == 2
    # ImageNet stem: the backbone loads into torchvision's ResNet-50 with only fc missing.
    missing = torchvision.models.resnet50().load_state_dict(imnet.backbone.state_dict(), strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"] and not missing.unexpected_keys


def hsic_tiny_cfg(*extra):
    return ssl_hsic.parse_args(["--cpu"] + [str(a) for a in tiny("ssl_hsic.py") + list(extra)])


def test_ssl_hsic_schedules_match_the_official_ones():
    """At the official ImageNet sizes: LR 0 -> 0.4 B/256 -> 0, tau 0.99 -> 1."""
    spe = 312
    cfg = argparse.Namespace(lr=0.4, batch_size=4096, warmup_epochs=10, epochs=1000, steps_per_epoch=spe,
                             tau=0.99)
    W, K = 10 * spe, 1000 * spe
    assert ssl_hsic.lr_at(cfg, 0) == 0.0
    assert ssl_hsic.lr_at(cfg, W // 2) == pytest.approx(3.2)
    assert ssl_hsic.lr_at(cfg, W) == pytest.approx(6.4)
    assert ssl_hsic.lr_at(cfg, W + (K - W) // 2) == pytest.approx(3.2)
    assert ssl_hsic.lr_at(cfg, K) == pytest.approx(0.0, abs=1e-12)
    assert ssl_hsic.tau_at(cfg, 0) == pytest.approx(0.99)
    assert ssl_hsic.tau_at(cfg, K // 2) == pytest.approx(0.995)
    assert ssl_hsic.tau_at(cfg, K) == pytest.approx(1.0)


def test_lars_step_matches_hand_computation():
    """BYOL's LARS on a weight (decay + trust ratio), a bias (neither) and an
    all-zero weight (trust ratio 1)."""
    torch.manual_seed(0)
    w, b, zero = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), \
        torch.zeros(2, 2, dtype=torch.float64)
    params = [p.clone().requires_grad_() for p in (w, b, zero)]
    opt = ssl_hsic.LARS([{"params": [params[0], params[2]]}, {"params": [params[1]], "lars": False}],
                        lr=0.7, momentum=0.9, weight_decay=0.01, eta=0.002)
    want, mu = [w.clone(), b.clone(), zero.clone()], [0, 0, 0]
    for step in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for k in range(3):
            g = grads[k]
            if k != 1:
                u = g + 0.01 * want[k]
                pn, un = want[k].norm().item(), u.norm().item()
                ratio = 0.002 * pn / un if pn > 0 and un > 0 else 1.0
                u = ratio * u
            else:
                u = g
            mu[k] = 0.9 * mu[k] + u
            want[k] = want[k] - 0.7 * mu[k]
        for p, v in zip(params, want):
            torch.testing.assert_close(p.detach(), v, rtol=1e-12, atol=1e-14)


def test_ssl_hsic_model_and_optimizer_groups():
    cfg = hsic_tiny_cfg()
    m = ssl_hsic.Model(cfg)
    lin = [l for l in m.online.projector if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features, l.bias is not None) for l in lin] == [(512, 64, True), (64, 32, False)]
    assert any(isinstance(l, nn.BatchNorm1d) for l in m.predictor)
    assert [l.out_features for l in m.predictor if isinstance(l, nn.Linear)] == [64, 32]
    # The target is initialised independently and never trained by the optimiser.
    assert not torch.equal(m.target.projector[0].weight, m.online.projector[0].weight)
    assert not any(p.requires_grad for p in m.target.parameters())
    assert m.backbone is m.ema and not any(p.requires_grad for p in m.ema.parameters())
    for a, b in zip(m.ema.state_dict().values(), m.online.backbone.state_dict().values()):
        assert torch.equal(a, b)
    opt = ssl_hsic.make_optimizer(m, cfg)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in list(m.online.parameters()) + list(m.predictor.parameters())}
    assert all(p.ndim == 1 for p in opt.param_groups[1]["params"]) and not opt.param_groups[1]["lars"]
    z = m(torch.randn(3, 3, 16, 16))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    copy_init = ssl_hsic.Model(hsic_tiny_cfg("--target-init", "copy"))
    assert torch.equal(copy_init.target.projector[0].weight, copy_init.online.projector[0].weight)
    bare = ssl_hsic.Model(hsic_tiny_cfg("--no-target", "--eval-weights", "online"))
    assert bare.target is None and isinstance(bare.predictor, nn.Identity) and bare.backbone is bare.online.backbone


def test_ssl_hsic_train_step_updates_target_by_the_tau_schedule():
    cfg = hsic_tiny_cfg("--eval-ema", "0.9")
    cfg.steps_per_epoch, cfg.use_cuda = 10, False
    model, criterion, optimizer, scaler = ssl_hsic.build(cfg, argparse.Namespace(device=torch.device("cpu"),
                                                                                   world=1))
    model.train()
    x = torch.randn(2, 16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    step = 7
    target_before = [p.clone() for p in model.target.parameters()]
    ema_before = [p.clone() for p in model.ema.parameters()]
    logs = ssl_hsic.train_step(model, criterion, optimizer, scaler, [x[0], x[1]], step, cfg)
    tau = 1 - 0.01 * (math.cos(math.pi * step / 20) + 1) / 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * 16 / 256 * step / 10)   # warm-up
    assert math.isfinite(logs["loss"]) and logs["c"] == 1.0 and criterion.c.item() != 1.0
    for t, t0, o in zip(model.target.parameters(), target_before, model.online.parameters()):
        torch.testing.assert_close(t, tau * t0 + (1 - tau) * o, rtol=1e-6, atol=1e-7)
    for e, e0, o in zip(model.ema.parameters(), ema_before, model.online.backbone.parameters()):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * o, rtol=1e-6, atol=1e-7)
    for e, o in zip(model.ema.buffers(), model.online.backbone.buffers()):
        assert torch.equal(e, o)


HSIC_2P = {"exact": dict(num_features=None), "shared": dict(num_features=64, shared_draws=True),
           "per_rank": dict(num_features=64)}


def _hsic_distributed_run(rank, world, port, out):
    _join_gloo(rank, world, port)
    per = 8 // world
    result = {}
    for name, kw in HSIC_2P.items():
        crit = ssl_hsic.SSLHSIC(seed=5, **kw)
        z = unit_views(4, 8, 3, seed=21)[:, rank * per:(rank + 1) * per].clone().requires_grad_()
        loss, _ = crit(torch.stack([common.gather_with_grad(v) for v in z]))
        loss.backward()
        result[name] = (loss.detach(), z.grad / world, crit.c.clone())   # DDP divides by world
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ssl_hsic_two_processes_equal_one(tmp_path):
    """Exact and shared-draw RFF losses and input gradients equal the single-process
    values; with per-rank draws the averaged gradient is the mean of the single-process gradients
    computed with each rank's draw. c is the same everywhere."""
    mp.spawn(_hsic_distributed_run, args=(2, common.free_port(), str(tmp_path)), nprocs=2)
    z = unit_views(4, 8, 3, seed=21)
    single = {}
    for name, kw in HSIC_2P.items():
        crit = ssl_hsic.SSLHSIC(seed=5, **kw)
        per_draw = []
        for rank in range(2 if name == "per_rank" else 1):
            zz = z.clone().requires_grad_()
            g = crit._generator(z.device, 1 + rank) if kw["num_features"] else None
            loss, _ = ssl_hsic.ssl_hsic_loss(zz, 3.0, crit.c, kw["num_features"], g)
            loss.backward()
            per_draw.append((loss.detach(), zz.grad))
        crit(z)   # advances c exactly as one training call does
        single[name] = (per_draw, torch.stack([gr for _, gr in per_draw]).mean(0), crit.c)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, (per_draw, mean_grad, c) in single.items():
            loss, grad, c_got = got[name]
            want_loss = per_draw[rank if name == "per_rank" else 0][0]
            torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(grad, mean_grad[:, rank * 4:(rank + 1) * 4], rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(c_got, c, rtol=0, atol=0)
    # Per-rank draws differ, so the check above compares a genuine average.
    assert not torch.allclose(single["per_rank"][0][0][0], single["per_rank"][0][1][0])


def test_ssl_hsic_presets_match_the_official_config():
    c = ssl_hsic.parse_args(["--data", "imagenet", "--cpu"])
    assert (c.arch, c.stem, c.image_size, c.batch_size, c.epochs, c.lr, c.warmup_epochs, c.wd, c.eta,
            c.momentum) == ("resnet50", "imagenet", 224, 4096, 1000, 0.4, 10, 1e-6, 1e-3, 0.9)
    assert (c.projector, c.predictor, c.gamma, c.sigma, c.num_features, c.tau, c.eval_ema, c.estimator,
            c.target, c.fixed_scale) == ("4096-256", "4096-256", 3.0, 1.0, 512, 0.99, 0.999, "rff", True, False)
    c = ssl_hsic.parse_args(["--data", "cifar10", "--cpu"])
    assert (c.arch, c.stem, c.batch_size, c.epochs) == ("resnet18", "cifar", 512, 1000)


def test_ssl_hsic_refuses_bad_scale_and_heads(tmp_path):
    for args, words in ((["--sigma", 0], "argument --sigma: expected a number > 0"),
                        (["--predictor", "64-16"], "must end in")):
        proc = run_script(*tiny("ssl_hsic.py"), *args, "--output-dir", tmp_path / "o", script="ssl_hsic.py")
        assert words in assert_one_line_error(proc)
        assert not (tmp_path / "o").exists()


def test_presets_match_the_official_scripts():
    def cfg(name):
        return corinfomax.parse_args(["--data", name, "--cpu", "--gpus", "1"])
    c = cfg("cifar10")
    assert (c.alpha, c.la_R, c.la_mu, c.lr, c.batch_size, c.epochs, c.projector, c.eps) == \
        (250.0, 0.01, 0.01, 0.5, 512, 1000, "2048-2048-64", 1e-8)
    c = cfg("imagenet")
    assert (c.arch, c.alpha, c.la_R, c.lr, c.batch_size, c.projector, c.proj_bn, c.probe_lr) == \
        ("resnet50", 2000.0, 0.1, 0.2, 1536, "8192-8192-512", True, 25.0)
    c = cfg("tiny-imagenet")
    assert (c.arch, c.stem, c.image_size, c.alpha, c.la_R) == ("resnet50", "imagenet", 64, 500.0, 0.1)
    c = corinfomax.parse_args(["--data", "cifar100", "--alpha", "3", "--cpu"])
    assert (c.alpha, c.projector) == (3.0, "4096-4096-128")


def naive_rankme(x, eps=1e-7):
    """Effective rank from numpy's singular values: exp(-sum p_k log p_k), p_k = s_k / sum s + eps."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_matches_naive_formula_on_collapsed_random_and_low_rank_embeddings():
    g = torch.Generator().manual_seed(0)
    random = torch.randn(2000, 16, generator=g)
    low_rank = torch.randn(500, 3, generator=g) @ torch.randn(3, 32, generator=g)
    collapsed = torch.randn(1, 32, generator=g).expand(300, 32) + 1e-9 * torch.randn(300, 32, generator=g)
    for x in (random, low_rank, collapsed):
        assert common.rankme(x) == pytest.approx(naive_rankme(x), rel=1e-9)
    assert 15 < common.rankme(random) <= 16          # isotropic: close to the dimension
    assert 2 < common.rankme(low_rank) <= 3           # three directions, unequal
    assert common.rankme(collapsed) < 1.01            # one point: rank 1
    assert common.rankme(random[:, :4].repeat(1, 4)) == pytest.approx(common.rankme(random[:, :4]), rel=1e-4)


def test_compiled_model_trains_like_the_eager_one(tmp_path):
    """--compile (torch.compile of the model's forward, inductor on the CPU) on a tiny run: the same
    losses as without it, to float rounding, and a checkpoint with the usual parameter names."""
    args = [*tiny("corinfomax.py"), "--max-steps", 2]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        proc = run_script(*args, *extra, "--output-dir", tmp_path / name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[name] = [r["loss"] for r in map(json.loads, open(tmp_path / name / "metrics.jsonl"))
                      if r["event"] == "train"]
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4) and len(runs["eager"]) == 2
    eager, compiled = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["model"] for n in runs)
    assert eager.keys() == compiled.keys()


def test_sampler_global_batches_do_not_depend_on_world_size():
    single = list(common.GlobalBatchSampler(50, 12, seed=3))
    split = [list(common.GlobalBatchSampler(50, 12, r, 3, seed=3)) for r in range(3)]
    assert len(single) == 4  # drop_last
    for b, batch in enumerate(single):
        assert batch == split[0][b] + split[1][b] + split[2][b]
    s = common.GlobalBatchSampler(50, 12, seed=3)
    s.set_epoch(0, start_batch=2)
    assert list(s) == single[2:]
    s.set_epoch(1)
    assert list(s) != single
    with pytest.raises(common.UsageError):
        common.GlobalBatchSampler(50, 12, 0, 5)


def test_views_are_seeded_per_item():
    cfg = make_cfg()
    base = common.tensor_images(*synthetic.make(4, 16))
    ds = common.Views(base, [geometric for geometric, _ in corinfomax.pretrain_views(cfg)])
    (a1, a2), y = ds[(1, 123)]
    torch.manual_seed(999)    # the global RNG does not matter
    (b1, b2), _ = ds[(1, 123)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and y == int(base.tensors[1][1])
    (c1, _), _ = ds[(1, 124)]
    assert not torch.equal(a1, c1)
    assert a1.shape == (3, 16, 16) and a1.dtype == torch.uint8   # the crops; colour comes on the device


# ---- the photometric half of the views, batched (Augmentation) ------------------------------
# The reference is torchvision's own v2 functional ops, one image and one factor at a time.


def _images(n=6, h=20, w=24, seed=0):
    """Float RGB images in [0, 1] with grey pixels and ties between channels (hue's edge cases)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    x[:, :, :3] = x[:, :1, :3]                  # grey rows: R = G = B
    x[:, 1, 3:5] = x[:, 0, 3:5]                 # R = G, the max in some pixels
    x[:, 2, 5:7] = x[:, 1, 5:7].clamp_min(0.5)  # G = B
    x[:, :, 7, :2] = 128 / 255                  # solarize's threshold itself
    return x


@pytest.mark.parametrize("name, tv, lo, hi", [("brightness", TF.adjust_brightness, 0.6, 1.4),
                                              ("contrast", TF.adjust_contrast, 0.6, 1.4),
                                              ("saturation", TF.adjust_saturation, 0.8, 1.2),
                                              ("hue", TF.adjust_hue, -0.5, 0.5)])
def test_jitter_ops_match_torchvision_per_image(name, tv, lo, hi):
    x = _images()
    f = torch.linspace(lo, hi, len(x))
    ours = image_ops.JITTER[name](x, f)
    want = torch.stack([tv(x[i], float(f[i])) for i in range(len(x))])
    torch.testing.assert_close(ours, want, rtol=0, atol=2e-6)
    # The identity parameter, which the images that did not draw the op get, leaves them unchanged
    # (exactly, but for hue's round trip through HSV).
    identity = torch.full((len(x),), 0.0 if name == "hue" else 1.0)
    torch.testing.assert_close(image_ops.JITTER[name](x, identity), x, rtol=0, atol=1e-6 if name == "hue" else 0)


def test_grayscale_blur_solarize_match_torchvision():
    x = _images(seed=1)
    torch.testing.assert_close(image_ops.grayscale(x), TF.rgb_to_grayscale(x), rtol=0, atol=1e-6)
    on = torch.arange(len(x)) % 2 == 0     # solarize the even images only
    want = torch.where(on[:, None, None, None], TF.solarize(x, 128 / 255), x)
    torch.testing.assert_close(image_ops.solarize(x, on), want, rtol=0, atol=0)
    for taps in (3, 13):
        sigma = torch.linspace(0.1, 2.0, len(x))
        want = torch.stack([TF.gaussian_blur(x[i], [taps, taps], [float(sigma[i])] * 2) for i in range(len(x))])
        torch.testing.assert_close(image_ops.gaussian_blur(x, sigma, taps), want, rtol=0, atol=1e-5)
    # A sigma near 0, what the images that drew no blur get, leaves them exactly as they were.
    torch.testing.assert_close(image_ops.gaussian_blur(x, torch.full((len(x),), 1e-3), 13), x, rtol=0, atol=0)


def _torchvision_view(image, p, i, taps, norm):
    """Image i of a Photometric draw p, op by op with torchvision (the order the draw says)."""
    x = image.float() / 255
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    if p["jitter"][i]:
        for k in p["order"][i].tolist():
            x = ops[k](x, float(p["factors"][i, k]))
    if p["gray"][i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p["blur"][i]:
        x = TF.gaussian_blur(x, [taps, taps], [float(p["sigma"][i])] * 2)
    if p["solarize"][i]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, *norm)


def test_photometric_matches_torchvision_image_by_image():
    norm = ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    photometric = corinfomax.Photometric(norm, blur_p=0.5, solarize_p=0.5, taps=5, sigma=(0.1, 2.0))
    crops = torch.randint(0, 256, (40, 3, 12, 14), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    p = photometric.draw(len(crops), torch.Generator().manual_seed(3))
    for key in ("jitter", "gray", "blur", "solarize"):   # every branch is taken and skipped
        assert 0 < int(p[key].sum()) < len(crops), key
    ours = photometric(crops, p)
    want = torch.stack([_torchvision_view(crops[i], p, i, 5, norm) for i in range(len(crops))])
    torch.testing.assert_close(ours, want, rtol=0, atol=5e-5)


def test_photometric_draws_follow_the_recipe():
    n = 20000
    photometric = corinfomax.Photometric(((0.5,) * 3, (0.5,) * 3), 0.1, 0.2, 13, (0.1, 2.0))
    p = photometric.draw(n, torch.Generator().manual_seed(4))
    for key, prob in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.1), ("solarize", 0.2)):
        assert abs(p[key].double().mean().item() - prob) < 0.015, key   # 5 binomial standard deviations
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(n, 4))   # permutations
    for k in range(4):   # every op equally often at every position
        assert ((p["order"] == k).double().mean(0) - 0.25).abs().max() < 0.02
    lo, hi = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    assert (p["factors"] >= lo).all() and (p["factors"] <= hi).all()
    assert ((p["factors"].mean(0) - (lo + hi) / 2).abs() < (hi - lo) * 0.01).all()
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0


def test_augment_is_seeded_by_step_and_shared_across_processes():
    cfg = make_cfg(batch_size=8)
    _, photometric = zip(*corinfomax.pretrain_views(cfg))
    crops = [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(v))
             for v in range(2)]
    one = argparse.Namespace(rank=0, device=torch.device("cpu"))
    whole = common.draw_and_apply(photometric, crops, 5, cfg, one)
    assert all(torch.equal(a, b) for a, b in zip(whole, common.draw_and_apply(photometric, crops, 5, cfg, one)))
    assert not torch.equal(whole[0], common.draw_and_apply(photometric, crops, 6, cfg, one)[0])
    # two processes with 4 images each make the same views as one process with all 8
    halves = [common.draw_and_apply(photometric, [c[4 * r:4 * r + 4] for c in crops], 5, cfg,
                                 argparse.Namespace(rank=r, device=torch.device("cpu"))) for r in (0, 1)]
    for v in range(2):
        torch.testing.assert_close(torch.cat([halves[0][v], halves[1][v]]), whole[v], rtol=0, atol=1e-6)


def test_synthetic_is_deterministic_and_balanced():
    x, y = synthetic.make(200, 20, seed=4)
    x2, y2 = synthetic.make(200, 20, seed=4)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (200, 3, 20, 20) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [20] * 10
    # Classes differ in shape, not colour: per-class mean colours are close to each other.
    means = torch.stack([x[y == c].float().mean((0, 2, 3)) for c in range(10)])
    assert (means.max(0).values - means.min(0).values).max() < 40


def write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        x, y = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", y)
    xs, ys = common.read_fashion_mnist(str(tmp_path), train=False)
    assert xs.shape == (3, 1, 28, 28) and torch.equal(xs[:, 0], torch.from_numpy(x.astype(np.uint8)))
    assert ys.tolist() == y.tolist()
    cfg = make_cfg(data="fashionmnist", data_dir=str(tmp_path), image_size=28)
    train, probe, test, classes = common.load_datasets(cfg, corinfomax.PRESETS)
    assert len(train) == 7 and len(test) == 3 and classes == 10
    assert train[0][0].shape == (3, 28, 28)    # grey repeated to three channels
    with pytest.raises(common.UsageError, match="dataset-fashion-mnist"):
        common.load_datasets(make_cfg(data="fashionmnist", data_dir=str(tmp_path / "nope")), corinfomax.PRESETS)


def test_small_folder_tool_writes_disjoint_class_folders_of_training_images(tmp_path):
    """tools/small_folder.py: PNG class folders a method reads as a labelled folder, drawn from the
    training images only (train/ and val/ disjoint), each file its source image; bad input one line."""
    from PIL import Image
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 28, 28)), np.arange(40) % 10       # 4 images per class
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y)
    tool = dict(script="tools/small_folder.py")
    proc = run_script(tmp_path / "ds", "--train", 2, "--val", 1, "--data-dir", tmp_path, **tool)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train, val, classes = common.image_folder(str(tmp_path / "ds"), False)
    assert classes == 10 and len(train) == 20 and len(val) == 10 and not list(tmp_path.glob("*.partial"))
    paths = [s.path(i) for s in (train, val) for i in range(len(s))]
    sources = [int(os.path.basename(p)[:-4]) for p in paths]
    assert len(set(sources)) == 30 and [int(y[i]) for i in sources] == train.targets.tolist() + val.targets.tolist()
    for i, path in zip(sources[::7], paths[::7]):
        assert np.array_equal(np.asarray(Image.open(path)), x[i])
    assert "exists" in assert_one_line_error(run_script(tmp_path / "ds", "--data-dir", tmp_path, **tool))
    line = assert_one_line_error(run_script(tmp_path / "big", "--train", 4, "--val", 1, "--data-dir", tmp_path, **tool))
    assert "fewer than --train + --val" in line and not (tmp_path / "big").exists()


def test_cifar_and_stl10_are_read_by_torchvision_as_uint8_tensors(tmp_path, monkeypatch):
    """CIFAR-10/100 and STL-10 in torchvision's layout, read by torchvision.datasets (their md5
    check skipped: these files are made here) into in-memory uint8 (N, 3, H, W) sets."""
    for module in (torchvision.datasets.cifar, torchvision.datasets.stl10):
        monkeypatch.setattr(module, "check_integrity", lambda *a, **k: True)
    rng = np.random.default_rng(1)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = (rng.integers(0, 256, (4, 3072)).astype(np.uint8), rng.integers(0, 10, 4).tolist())
        pickle.dump({"data": batches[name][0], "labels": batches[name][1]}, open(c10 / name, "wb"))
    pickle.dump({"label_names": [str(k) for k in range(10)]}, open(c10 / "batches.meta", "wb"))
    train, probe, test, classes = common.load_datasets(make_cfg(data="cifar10", data_dir=str(tmp_path)),
                                                       corinfomax.PRESETS)
    assert classes == 10 and len(train) == 20 and probe is train and len(test) == 4
    assert train.tensors[1].tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    image, label = train[4]   # the first image of data_batch_2, channels first
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image.flatten(), torch.from_numpy(batches["data_batch_2"][0][0]))
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for name in ("train", "test"):
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [5, 99]}, open(c100 / name, "wb"))
    pickle.dump({"fine_label_names": [str(k) for k in range(100)]}, open(c100 / "meta", "wb"))
    train, _, test, classes = common.load_datasets(make_cfg(data="cifar100", data_dir=str(tmp_path)),
                                                   corinfomax.PRESETS)
    assert classes == 100 and len(train) == 2 and test.tensors[1].tolist() == [5, 99]
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    x = np.random.default_rng(2).integers(0, 256, (3, 3, 96, 96)).astype(np.uint8)
    for split in ("train", "test", "unlabeled"):
        x.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")   # STL stores columns first
    np.array([1, 10, 3], np.uint8).tofile(folder / "train_y.bin")
    np.array([2, 2, 2], np.uint8).tofile(folder / "test_y.bin")
    pre, probe, test, classes = common.load_datasets(make_cfg(data="stl10", data_dir=str(tmp_path)),
                                                     corinfomax.PRESETS)
    assert len(pre) == 6 and len(probe) == 3 and classes == 10 and probe.tensors[1].tolist() == [0, 9, 2]
    assert torch.equal(probe.tensors[0], torch.from_numpy(x)) and int(pre[4][1]) == -1   # unlabeled: -1
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: False)
    with pytest.raises(common.UsageError, match="cifar10 not readable in .*--download"):
        common.load_datasets(make_cfg(data="cifar10", data_dir=str(tmp_path)), corinfomax.PRESETS)


# ============================================================================================
# Two processes (gloo) equal one process on the same global batch
# ============================================================================================

def _tiny_model(out):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, out))


def _losses(script):
    """(D, loss for the gathered-loss check, model output dim, loss for the train step)."""
    if script == "corinfomax.py":
        return (5, corinfomax.CorInfoMaxLoss(5, alpha=4.0, la_R=0.3, la_mu=0.2),
                6, corinfomax.CorInfoMaxLoss(6, alpha=4.0))
    return 3, explicit_mim.ExplicitMIMLoss(3, eps=1e-6), 3, explicit_mim.ExplicitMIMLoss(3, scale=2 / 3)


class _Normalised(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.net = _tiny_model(out)

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


def _distributed_run(rank, world, port, out, script):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    N, per = 8, 8 // world
    D, loss_fn, out_dim, crit = _losses(script)
    result = {}
    for step in range(2):
        z1 = unit_rows(N, D, 100 + step)[rank * per:(rank + 1) * per].clone().requires_grad_()
        z2 = unit_rows(N, D, 200 + step)[rank * per:(rank + 1) * per].clone().requires_grad_()
        loss, _ = loss_fn(common.gather_with_grad(z1), common.gather_with_grad(z2))
        loss.backward()
        # Each rank's gradient is world x dL/dz (DDP divides parameter gradients by world).
        result[f"loss{step}"], result[f"g1_{step}"], result[f"g2_{step}"] = \
            loss.detach(), z1.grad / world, z2.grad / world
    result["state"] = [b.clone() for b in loss_fn.buffers()]
    # One full training step through the script's own train_step, DDP-wrapped when world > 1.
    model = _Normalised(out_dim)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    cfg = argparse.Namespace(amp="off", use_cuda=False, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1,
                             lr_per_step=True, steps_per_epoch=1)    # lr_at gives 0.1 at step 0
    x = torch.randn(2, N, 12, generator=torch.Generator().manual_seed(5))
    MODULES[script].train_step(ddp, crit, opt, torch.amp.GradScaler(enabled=False),
                               [x[0, rank * per:(rank + 1) * per], x[1, rank * per:(rank + 1) * per]], 0, cfg)
    result["params"] = [p.detach().clone() for p in model.parameters()]
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("script", ["corinfomax.py", "explicit_mim.py"])
def test_two_processes_equal_one(tmp_path, script):
    _distributed_run(0, 1, 0, str(tmp_path), script)
    os.rename(tmp_path / "rank0.pt", tmp_path / "single.pt")
    mp.spawn(_distributed_run, args=(2, common.free_port(), str(tmp_path), script), nprocs=2)
    single = torch.load(tmp_path / "single.pt")
    N = 8
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        rows = slice(rank * N // 2, (rank + 1) * N // 2)
        for step in range(2):
            torch.testing.assert_close(got[f"loss{step}"], single[f"loss{step}"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got[f"g1_{step}"], single[f"g1_{step}"][rows], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[f"g2_{step}"], single[f"g2_{step}"][rows], rtol=1e-10, atol=1e-12)
        assert len(got["state"]) == len(single["state"])
        for a, b in zip(got["state"], single["state"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for a, b in zip(got["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ============================================================================================
# The script, run as a user runs it
# ============================================================================================

@pytest.mark.parametrize("script", METHOD_FILES)
def test_demo_run_writes_outputs_and_exports_a_torchvision_backbone(tmp_path, script):
    out = tmp_path / "run"
    proc = run_script(*tiny(script), "--max-steps", 3, "--probe", "cached", "--probe-epochs", 2,
                      "--knn-every", 1, "--epochs", 1, "--output-dir", out, script=script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cached-feature probe" in proc.stdout and "random_init backbone" in proc.stdout
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    start = records[0]
    assert start["event"] == "start" and start["world_size"] == 1
    assert start["config"]["batch_size"] == 16 and "torch" in start["versions"] and start["argv"]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(0.0 <= r["data_wait"] <= 1.0 for r in train) and "data wait" in proc.stdout
    probe = next(r for r in records if r["event"] == "probe")
    assert {"trained", "random_init", "raw_pixels"} <= set(probe) and "top1" in probe["raw_pixels"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert all(t.dtype == torch.float64 for t in ckpt["criterion"].values() if t.is_floating_point())
    # The export loads into torchvision's ResNet-18 (with the same CIFAR stem), nothing left over.
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    net.load_state_dict(torch.load(out / "backbone.pt", weights_only=True), strict=True)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(MODULES[script].load_backbone(out / "backbone.pt")(x), net.eval()(x))   # the one-call loader


def test_load_backbone_reads_arch_and_stem_off_the_weights(tmp_path):
    for arch, stem in (("resnet50", "imagenet"), ("resnet18", "cifar")):
        net, width = corinfomax.make_backbone(arch, stem)
        torch.save(net.state_dict(), tmp_path / "b.pt")
        loaded = corinfomax.load_backbone(tmp_path / "b.pt")
        assert type(loaded.maxpool) is type(net.maxpool) and loaded.conv1.kernel_size == net.conv1.kernel_size
        assert not loaded.training and loaded(torch.rand(1, 3, 32, 32)).shape == (1, width)


def _final_state(folder):
    ckpt = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    return ckpt["step"], ckpt["model"], ckpt["criterion"], ckpt["optimizer"]["state"]


@pytest.mark.parametrize("script", METHOD_FILES)
def test_resume_is_exact(tmp_path, script):
    """Stopped after 2 steps and resumed to 6 (across an epoch boundary) == 6 steps in one go."""
    args = tiny(script) + (["--cov-estimator", "ema"] if script == "explicit_mim.py" else [])
    straight = run_script(*args, "--max-steps", 6, "--output-dir", tmp_path / "a", script=script)
    assert straight.returncode == 0, straight.stderr
    first = run_script(*args, "--max-steps", 2, "--output-dir", tmp_path / "b", script=script)
    assert first.returncode == 0, first.stderr
    second = run_script(*args, "--max-steps", 6, "--output-dir", tmp_path / "b", script=script)
    assert second.returncode == 0, second.stderr
    assert "resuming at step 2" in second.stdout
    (sa, ma, ca, oa), (sb, mb, cb, ob) = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert sa == sb == 6
    for group_a, group_b in ((ma, mb), (ca, cb)):
        assert group_a.keys() == group_b.keys()
        for k in group_a:
            assert torch.equal(group_a[k], group_b[k]), k
    for k in oa:
        assert torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"])
    if script == "ssl_hsic.py":   # the comparison above covered the target, the EMA and c
        assert any(k.startswith("target.") for k in mb) and any(k.startswith("ema.") for k in mb)
        assert cb["c"].item() != 1.0 and int(cb["_extra_state"]) == 6


@pytest.mark.parametrize("script", METHOD_FILES)
def test_gpus_2_on_cpu_and_torchrun_agree(tmp_path, script):
    """Two CPU processes (gloo) started by --gpus 2 and by torchrun train identically. (Equality
    with one process holds only without BatchNorm, which on CPU normalises per process: that is
    test_two_processes_equal_one.)"""
    two = run_script(*tiny(script), "--max-steps", 2, "--gpus", 2, "--output-dir", tmp_path / "two",
                     script=script)
    tr = run_script("--standalone", "--nproc-per-node", 2, script, *tiny(script), "--max-steps", 2,
                    "--output-dir", tmp_path / "tr", module="torch.distributed.run")
    for proc in (two, tr):
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def losses(folder):
        recs = [json.loads(l) for l in open(folder / "metrics.jsonl")]
        assert recs[0]["world_size"] == 2
        return [r["loss"] for r in recs if r["event"] == "train"]
    assert losses(tmp_path / "two") == losses(tmp_path / "tr") and len(losses(tmp_path / "tr")) == 2
    assert (tmp_path / "two" / "backbone.pt").exists() and (tmp_path / "tr" / "checkpoint.pt").exists()


# ============================================================================================
# Bad input: one line, non-zero exit, nothing overwritten
# ============================================================================================

@pytest.mark.parametrize("script", METHOD_FILES)
def test_missing_data_directory(tmp_path, script):
    proc = run_script("--data", "cifar10", "--data-dir", tmp_path / "nowhere", "--output-dir", tmp_path / "o",
                      script=script)
    line = assert_one_line_error(proc)
    assert f"cifar10 not readable in {tmp_path / 'nowhere'}" in line and "--data-dir" in line and "--download" in line
    assert not (tmp_path / "o").exists()
    proc = run_script("--data", tmp_path / "nofolder", "--output-dir", tmp_path / "o", script=script)
    assert "train/" in assert_one_line_error(proc)


def test_explicit_mim_refuses_a_batch_below_2D_plus_1(tmp_path):
    proc = run_script(*TINY, "--projector", "64-8", "--output-dir", tmp_path / "o", script="explicit_mim.py")
    assert "2D + 1 = 17" in assert_one_line_error(proc)
    assert not (tmp_path / "o").exists()
    proc = run_script(*TINY, "--projector", "64-8", "--allow-singular", "--max-steps", 1,
                      "--output-dir", tmp_path / "o", script="explicit_mim.py")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", METHOD_FILES)
def test_batch_size_must_split_across_processes(tmp_path, script):
    proc = run_script(*tiny(script), "--gpus", 3, "--output-dir", tmp_path / "o", script=script)
    assert "does not split" in assert_one_line_error(proc)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", METHOD_FILES)
def test_corrupt_checkpoint_is_refused_and_kept(tmp_path, script):
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (out / "metrics.jsonl").write_text('{"event": "start"}\n')
    before = files_snapshot(out)
    proc = run_script(*tiny(script), "--output-dir", out, script=script)
    assert "cannot read checkpoint" in assert_one_line_error(proc)
    assert files_snapshot(out) == before


@pytest.mark.parametrize("script", METHOD_FILES)
def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, script):
    out = tmp_path / "o"
    good = run_script(*tiny(script), "--max-steps", 2, "--output-dir", out, script=script)
    assert good.returncode == 0, good.stderr
    # A NaN weight in the saved model: the first resumed step's loss is NaN, deterministically.
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    next(v for k, v in ckpt["model"].items() if v.is_floating_point() and "weight" in k).view(-1)[0] = math.nan
    torch.save(ckpt, out / "checkpoint.pt")
    ckpt = (out / "checkpoint.pt").read_bytes()
    proc = run_script(*tiny(script), "--max-steps", 4, "--output-dir", out, script=script)
    line = assert_one_line_error(proc, code=3)
    assert "loss is nan at step 3" in line and "checkpoint" in line
    assert (out / "checkpoint.pt").read_bytes() == ckpt


@pytest.mark.parametrize("script", METHOD_FILES)
def test_benchmark_prints_a_table_and_one_json_line_and_writes_nothing(tmp_path, script):
    before = sorted(os.listdir(HERE))
    method = script.removesuffix(".py")
    proc = run_script(method, *tiny(script), "--bench-steps", 1, "--bench-sizes", "16,32",
                      "--output-dir", tmp_path / "unused", script="tools/benchmark.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "step overhead" in proc.stdout and "images/s per worker" in proc.stdout
    res = json.loads(lines[-1])
    assert res["method"] == method and res["batch_size"] == 16
    assert res["step_overhead"] == pytest.approx(res["step_ms"] / res["trivial_step_ms"])
    assert res["img_per_s"] == pytest.approx(16 / res["step_ms"] * 1000)
    loss_keys = {"loss_ms", "loss_ms_exact"} if script == "ssl_hsic.py" else {"loss_ms"}
    assert {k for k in res if k.startswith("loss_ms")} == loss_keys
    for key in loss_keys:
        assert list(res[key]) == ["16", "32"] and all(ms > 0 for ms in res[key].values())
    assert res["augment_img_per_s_per_worker"] > 0 and res["device_augment_ms"] > 0
    assert 0.0 <= res["data_wait"] < 1.0
    assert res["workers"] == 0 and res["threads"] == 1 and res["amp"] == "off" and res["compile"] is False
    assert not (tmp_path / "unused").exists() and sorted(os.listdir(HERE)) == before


def test_benchmark_bad_arguments_give_one_line_errors():
    bench = dict(script="tools/benchmark.py")
    assert "--gpus" in assert_one_line_error(run_script("corinfomax", "--gpus", 2, **bench))
    line = assert_one_line_error(run_script("corinfomax", "--bench-sizes", "16,x", **bench))
    assert "--bench-sizes expects comma-separated positive integers, got '16,x'" in line
    assert "one of corinfomax" in assert_one_line_error(run_script("simclr", **bench))


def test_method_files_hold_no_benchmark_or_graph_code():
    """The harness lives in tools/; the method files have neither its flags nor a CUDA-graph capture."""
    for path in METHOD_FILES:
        text = open(os.path.join(HERE, path)).read()
        for word in ("benchmark(", "--bench", "make_graphed_callables", "CUDAGraph", "shared/specs", "spec "):
            assert word not in text, (path, word)


def test_read_logs_names_the_first_non_finite_step_and_says_what_is_kept(monkeypatch):
    pending = [{"loss": torch.tensor(v, dtype=torch.float64), "mi": torch.tensor(1.0, dtype=torch.float64)}
               for v in (1.0, 2.0, 3.0)]
    assert common.read_logs(pending, 10) == {"loss": 3.0, "mi": 1.0} and pending == []
    monkeypatch.setattr(common, "KEPT", {})   # no checkpoint saved or resumed in this run
    nan = [{"loss": torch.tensor(v, dtype=torch.float64)} for v in (1.0, math.inf, math.nan)]
    with pytest.raises(common.NonFiniteLoss, match="loss is inf at step 9; nothing was saved"):
        common.read_logs(list(nan), 10)
    common.KEPT.update(path="out/checkpoint.pt", step=4)
    with pytest.raises(common.NonFiniteLoss, match="step 9; step 4 is kept in out/checkpoint.pt"):
        common.read_logs(list(nan), 10)


# ============================================================================================
# Bad flags, stop signals, unreadable images, unlabelled folders, collapse
# ============================================================================================

# Every flag every file takes: a value out of range or malformed, and what the error says it accepts.
BAD_SHARED = [("--batch-size", "-4", "an integer >= 1"), ("--batch-size", "0", "an integer >= 1"),
              ("--batch-size", "x", "an integer >= 1"), ("--epochs", "0", "an integer >= 1"),
              ("--max-steps", "-1", "an integer >= 1"), ("--lr", "0", "a number > 0"), ("--lr", "nan", "a number > 0"),
              ("--warmup-epochs", "-1", "a number >= 0"), ("--wd", "-0.1", "a number >= 0"),
              ("--momentum", "1", "a number in [0, 1)"), ("--image-size", "0", "an integer >= 8"),
              ("--image-size", "4", "an integer >= 8"), ("--crop-min-scale", "0", "a number in (0, 1]"),
              ("--crop-min-scale", "1.5", "a number in (0, 1]"), ("--blur-sigma", "-1", "a number >= 0"),
              ("--projector", "512-abc", "layer widths"), ("--projector", "512--64", "layer widths"),
              ("--projector", "0-64", "layer widths"), ("--workers", "-1", "an integer >= 0"),
              ("--threads", "0", "an integer >= 1"), ("--gpus", "0", "an integer >= 1"),
              ("--log-every", "0", "an integer >= 1"), ("--knn-every", "-1", "an integer >= 0"),
              ("--knn-bank", "0", "an integer >= 1"), ("--probe-epochs", "0", "an integer >= 1"),
              ("--probe-lr", "-0.1", "a number > 0"), ("--seed", "-1", "an integer >= 0"),
              ("--save-every", "0", "a number > 0"), ("--synthetic-train", "0", "an integer >= 1"),
              ("--synthetic-test", "1.5", "an integer >= 1")]
BAD_METHOD = {
    "corinfomax.py": [("--alpha", "-1", "a number >= 0"), ("--la-R", "1", "a number in [0, 1)"),
                      ("--la-mu", "-0.1", "a number in [0, 1)"), ("--R-ini", "0", "a number > 0"),
                      ("--eps", "-2", "a number >= 0"), ("--min-lr", "-1", "a number >= 0")],
    "explicit_mim.py": [("--eps", "nan", "a number >= 0"), ("--la-R", "1.5", "a number in [0, 1)"),
                        ("--R-ini", "-1", "a number > 0"), ("--mse-weight", "-1", "a number >= 0"),
                        ("--joint-weight", "inf", "a finite number"), ("--min-lr", "x", "a number >= 0")],
    "hydes.py": [("--kappa", "0", "a number > 0"), ("--kappa", "nan", "a number > 0"),
                 ("--views", "1", "an integer >= 2"), ("--local-crops", "-1", "an integer >= 0"),
                 ("--local-size", "2", "an integer >= 8"), ("--alpha", "nan", "a finite number"),
                 ("--beta", "inf", "a finite number"), ("--eta", "0", "a number > 0")],
    "ssl_hsic.py": [("--gamma", "-1", "a number >= 0"), ("--sigma", "0", "a number > 0"),
                    ("--num-features", "0", "an integer >= 1"), ("--tau", "1.5", "a number in [0, 1]"),
                    ("--eval-ema", "1", "a number in [0, 1)"), ("--predictor", "4096-", "layer widths"),
                    ("--eta", "-1", "a number > 0")]}


@pytest.mark.parametrize("script", METHOD_FILES)
def test_every_bad_flag_value_is_one_error_naming_the_flag(tmp_path, script):
    """The whole table, parsed as the script parses it; then, run as a user runs it, one value:
    one line, exit status 2, no output folder."""
    table = BAD_SHARED + BAD_METHOD[script]
    assert len(table) >= 36
    for flag, value, accepts in table:
        with pytest.raises(common.UsageError) as info:
            MODULES[script].parse_args([flag, value, "--cpu"])
        assert str(info.value).startswith(f"argument {flag}: expected {accepts}"), (flag, value, str(info.value))
        assert str(info.value).endswith(f"got {value!r}"), (flag, value, str(info.value))
    out = tmp_path / "never-written"
    proc = run_script("--batch-size", "-4", "--output-dir", out, script=script)
    line = assert_one_line_error(proc)
    assert line == f"{script}: error: argument --batch-size: expected an integer >= 1, got '-4'"
    assert not os.path.exists(out)


def _run_until(args, script, signals, after, timeout=600):
    """Start a script, send each signal of `signals` (to the launcher, for --gpus 2) once its
    output shows `after`, and return (exit status, stdout, stderr)."""
    cmd = [sys.executable, script] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if after in line:
            for sig in signals:
                proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(seen) + out, err


@pytest.mark.parametrize("script, gpus, sig", [("corinfomax.py", 1, signal.SIGTERM),
                                               ("ssl_hsic.py", 1, signal.SIGINT),
                                               ("hydes.py", 2, signal.SIGUSR1)])
def test_a_stop_signal_saves_the_step_and_resuming_gives_the_uninterrupted_weights(tmp_path, script, gpus, sig):
    """Stopped mid-epoch by a signal (8 steps per epoch), then resumed: the same final weights,
    loss state and optimiser state as a run never stopped, bitwise (CPU), also with two processes."""
    args = tiny(script) + ["--synthetic-train", 128, "--max-steps", 10, "--gpus", gpus]
    straight = run_script(*args, "--output-dir", tmp_path / "a", script=script)
    assert straight.returncode == 0, straight.stderr
    code, out, err = _run_until([*args, "--output-dir", tmp_path / "b"], script, [sig], after="step 3/10")
    name = signal.Signals(sig).name
    assert code == 128 + sig, out + err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    stopped_at = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 8, stopped_at                     # mid-epoch
    assert lines[0] == (f"{script}: stopped: {name} at step {stopped_at}, saved in {tmp_path / 'b' / 'checkpoint.pt'}; "
                        "run the same command again to resume")
    resumed = run_script(*args, "--output-dir", tmp_path / "b", script=script)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped_at}" in resumed.stdout
    (sa, ma, ca, oa), (sb, mb, cb, ob) = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert sa == sb == 10
    for group_a, group_b in ((ma, mb), (ca, cb)):
        assert group_a.keys() == group_b.keys() and all(torch.equal(group_a[k], group_b[k]) for k in group_a)
    for k in oa:
        assert torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"])


def test_save_every_minutes_leaves_little_to_lose_after_a_hard_kill(tmp_path):
    """--save-every: a run killed without warning (SIGKILL) mid-epoch has a checkpoint of a recent
    step, from which it resumes."""
    args = [*tiny("corinfomax.py"), "--synthetic-train", 128, "--max-steps", 10, "--save-every", 1e-5]
    code, out, err = _run_until([*args, "--output-dir", tmp_path / "o"], "corinfomax.py", [signal.SIGKILL],
                                after="step 3/10")
    assert code == -signal.SIGKILL
    step = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= step < 8, step                                  # mid-epoch: 8 steps per epoch
    resumed = run_script(*args, "--output-dir", tmp_path / "o")
    assert resumed.returncode == 0 and f"resuming at step {step}" in resumed.stdout, resumed.stderr


def test_a_second_signal_stops_at_once(monkeypatch):
    """During a step a first signal is a request; the same signal again within a second (a launcher
    forwarding what the child also got) is the same request; a later one, or any signal outside
    the training loop, stops at once."""
    monkeypatch.setattr(signal, "signal", lambda *a: None)    # no handler installed in the test process
    stop = common.StopRequest()
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGTERM, None)                     # not training: at once
    stop.defer = True
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)                         # a duplicate
    assert stop.name == "SIGTERM"
    stop.at -= 2
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def _image_folder(root, layout, n=8, bad=None):
    """Small PNG images in the given layout ("classes": train/ and val/ with two class folders;
    "nested": any folders, no labels); `bad` names a file written with bytes that are no image."""
    from PIL import Image
    rng = np.random.default_rng(0)
    folders = ([f"{s}/{c}" for s in ("train", "val") for c in ("cat", "dog")] if layout == "classes"
               else ["", "holiday/day1", "holiday/day2", "misc"])
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    if bad:
        (root / bad).write_bytes(b"this is not an image")


TINY_FOLDER = TINY[TINY.index("--image-size"):] + ["--batch-size", 8, "--knn-every", 0]


def test_image_folder_dataset_runs(tmp_path):
    _image_folder(tmp_path / "ds", "classes")
    proc = run_script("--data", tmp_path / "ds", "--preset", "imagenet100", *TINY_FOLDER, "--max-steps", 1,
                      "--probe", "cached", "--probe-epochs", 1, "--no-baseline", "--output-dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cached-feature probe" in proc.stdout
    train, test, classes = common.image_folder(str(tmp_path / "ds"), False)
    assert classes == 2 and len(train) == 16 and len(test) == 16 and sorted(set(train.targets.tolist())) == [0, 1]


def test_an_unreadable_image_is_one_line_or_skipped_and_counted(tmp_path):
    _image_folder(tmp_path / "ds", "classes", bad="train/dog/3.png")
    args = ["--data", tmp_path / "ds", "--preset", "imagenet100", *TINY_FOLDER, "--max-steps", 2]
    proc = run_script(*args, "--output-dir", tmp_path / "a")
    line = assert_one_line_error(proc)
    assert f"cannot read image {tmp_path / 'ds' / 'train' / 'dog' / '3.png'}" in line and "--skip-bad-images" in line
    proc = run_script(*args, "--skip-bad-images", "--log-every", 1, "--output-dir", tmp_path / "b")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl") if '"train"' in l]
    assert train[-1]["skipped_images"] >= 1 and "skipped_images" in proc.stdout


def test_a_folder_of_unlabelled_images_pretrains_with_the_effective_rank_as_monitor(tmp_path):
    _image_folder(tmp_path / "photos", "nested")
    out = tmp_path / "out"
    proc = run_script("--data", tmp_path / "photos", *TINY_FOLDER, "--epochs", 1, "--output-dir", out,
                      script="hydes.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "has no train/ and val/ class folders: pretraining on its 32 images without labels" in proc.stdout
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    epoch = next(r for r in records if r["event"] == "epoch")
    assert 1 <= epoch["rank_embedding"] <= 32 and 1 <= epoch["rank_features"] <= 32
    assert not any(r["event"] == "probe" for r in records) and (out / "backbone.pt").exists()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    line = assert_one_line_error(run_script("--data", tmp_path / "empty", "--output-dir", out, script="hydes.py"))
    assert "no images (.jpg, .jpeg, .png" in line and str(tmp_path / "empty") in line


@pytest.mark.parametrize("script, logs, cfg", [
    ("corinfomax.py", {"logdet1": 32 * math.log(1e-8), "logdet2": 32 * math.log(1e-8) + 5}, {"eps": 1e-8}),
    ("explicit_mim.py", {"logdet1": 16 * math.log(1e-3) + 1.0, "logdet2": 16 * math.log(1e-3)}, {"eps": 1e-3}),
    ("hydes.py", {"h_global": -hydes.log_vmf_normaliser(32, 10.0) - 10.0}, {"kappa": 10.0}),
    ("ssl_hsic.py", {"hsic_zz": 1e-9}, {})])
def test_collapse_signatures(script, logs, cfg):
    """Each method's collapse signature fires on a collapsed embedding's logs, not on healthy ones."""
    cfg = argparse.Namespace(projector="64-32" if script != "explicit_mim.py" else "64-16", **cfg)
    collapsed = MODULES[script].collapsed
    assert collapsed(logs, cfg)
    healthy = {k: (v / 4 if k.startswith("logdet") else v + 1.0 if k == "h_global" else 0.01) for k, v in logs.items()}
    assert not collapsed(healthy, cfg)


def test_a_collapsing_run_says_so_once_with_what_to_try(tmp_path):
    """Explicit MIM at an absurd learning rate collapses within a few steps (the log-dets pinned
    at D log eps): the log says so once, early, with the remedy."""
    proc = run_script(*tiny("explicit_mim.py"), "--lr", 1000, "--warmup-epochs", 0, "--max-steps", 6,
                      "--output-dir", tmp_path / "o", script="explicit_mim.py")
    assert proc.returncode in (0, 3), proc.stderr          # a collapsed run may also end in NaN
    warnings = [l for l in proc.stdout.splitlines() if l.startswith("warning: the embedding looks collapsed")]
    assert len(warnings) == 1 and "try a lower --lr or a longer --warmup-epochs" in warnings[0]


# ============================================================================================
# The README's code: every Python snippet runs in full, every command with a tiny budget
# ============================================================================================

def _readme_blocks(lang):
    return re.findall(r"```" + lang + r"\n(.*?)```", open(os.path.join(HERE, "README.md")).read(), re.S)


def _readme_commands():
    """Every command of the README's bash blocks, as argument lists: continuation lines joined,
    `&&` chains split, a `for m in ...` loop expanded, comments dropped."""
    commands = []
    for block in _readme_blocks("bash"):
        block = block.replace("\\\n", " ")
        loop = re.search(r"for (\w+) in ([^;]+); do\n(.*?)\ndone", block, re.S)
        if loop:
            var, values, body = loop.groups()
            block = "\n".join(body.replace("$" + var, v) for v in values.split())
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                if part.strip():
                    commands.append(shlex.split(part))
    return commands


def test_readme_python_snippets_run_as_written(tmp_path):
    """Each Python block runs as written, from a folder holding the demo's output of a tiny run (its backbone.pt)."""
    snippets = _readme_blocks("python")
    assert len(snippets) == 2
    assert run_script(*TINY, "--max-steps", 1, "--output-dir", tmp_path / "runs" / "corinfomax-synthetic").returncode == 0
    for code, says in zip(snippets, ("loss", "features (8, 512)")):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": HERE})
        assert proc.returncode == 0, proc.stderr
        assert says in proc.stdout, proc.stdout


def test_readme_commands_work(tmp_path):
    """Each training or benchmark command parses as written; the ones that need no dataset, or
    Fashion-MNIST (a small fake one here), run with a tiny budget appended; --help runs as is."""
    fmnist = tmp_path / "fmnist"
    fmnist.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 40)):
        write_idx(fmnist / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(fmnist / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ran, commands = [], _readme_commands()
    for argv in commands:
        if argv[0] in ("python3", "pip") or "pytest" in argv or "pip" in argv[0]:
            continue                   # the set-up and the tests: .ci/run runs exactly those
        i = next(k for k, a in enumerate(argv) if a.endswith(".py"))
        script, args = argv[i], argv[i + 1:]
        if script == "tools/benchmark.py":
            extra = tiny(args[0] + ".py") + ["--bench-steps", 1, "--bench-sizes", "16"]
        elif script == "tools/small_folder.py":   # into tmp_path, from the fake set's 6 images a class
            args, extra = [tmp_path / "small"] + args[1:], ["--train", 4, "--val", 2, "--data-dir", fmnist]
        elif "--help" in args:
            extra = []
        else:
            MODULES[script].parse_args(args + ["--cpu"])     # every flag and value as written
            data = args[args.index("--data") + 1] if "--data" in args else "synthetic"
            if data not in ("synthetic", "fashionmnist"):
                continue               # needs a real dataset: parsed only
            extra = tiny(script)[2:] + (["--data-dir", fmnist, "--image-size", 28] if data == "fashionmnist" else [])
            extra += ["--max-steps", 2, "--output-dir", tmp_path / f"run{len(ran)}"]
        proc = run_script(*args, *extra, script=script)
        assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-2000:])
        ran.append(argv)
    assert len(ran) >= 6 and len(commands) >= 12, (ran, commands)


# ============================================================================================
# The method files share their plumbing sections verbatim (one file = one method, by design)
# ============================================================================================

BANNERS = ["Config", "Loss", "Networks", "Augmentation", "Data", "Optimisation", "Evaluation",
           "Training", "Main"]
# Definitions that must be identical in every method file.
SHARED = ["IMAGENET_NORM", "make_backbone", "load_backbone", "BICUBIC", "normalize", "crop", "probe_train_view",
          "test_view",
          "pretrain_loader", "probe_lr_at", "linear_probe",
          "effective_ranks", "evaluate", "build", "parallel", "train", "finish", "main"]
BUDGETS = {"corinfomax.py": 588, "explicit_mim.py": 606, "hydes.py": 628, "ssl_hsic.py": 741}   # only shrink


def _sections(path):
    text = open(os.path.join(HERE, path)).read()
    lines = text.splitlines()
    return [lines[i + 1][2:].strip() for i, l in enumerate(lines[:-1])
            if l.startswith("# ====") and i + 2 < len(lines) and lines[i + 2].startswith("# ====")]


def _definitions(path):
    src = open(os.path.join(HERE, path)).read()
    defs = {}
    for n in ast.parse(src).body:
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            defs[n.name] = ast.get_source_segment(src, n)
        elif isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
            defs[n.targets[0].id] = ast.get_source_segment(src, n)
    return defs


@pytest.mark.parametrize("path", METHOD_FILES)
def test_method_file_sections_in_order_and_within_budget(path):
    assert _sections(path) == BANNERS
    defs = _definitions(path)
    missing = [name for name in SHARED if name not in defs]
    assert not missing, missing
    lines = open(os.path.join(HERE, path)).read().splitlines()
    assert len(lines) <= BUDGETS[path], f"{path}: {len(lines)} lines, budget {BUDGETS[path]}"


def test_shared_sections_identical_across_method_files():
    reference = _definitions(METHOD_FILES[0])
    for path in METHOD_FILES[1:]:
        defs = _definitions(path)
        for name in SHARED:
            assert defs[name] == reference[name], f"{name} differs between {METHOD_FILES[0]} and {path}"
    # Pairs of methods that share more: the two log-det methods their networks, views, training
    # step and schedule; SSL-HSIC and HyDeS their LARS and LR schedule.
    for pair, names in ((("corinfomax.py", "explicit_mim.py"),
                         ["Photometric", "logdet_pd", "cov", "collapsed", "make_projector", "Model", "pretrain_views",
                          "make_optimizer", "train_step", "lr_at"]),
                        (("ssl_hsic.py", "hydes.py"), ["LARS", "lr_at"]), (("corinfomax.py", "hydes.py"), ["Photometric"])):
        a, b = (_definitions(p) for p in pair)
        for name in names:
            assert a[name] == b[name], f"{name} differs between {pair[0]} and {pair[1]}"


def test_cholesky_logdets_match_slogdet_and_flag_indefinite_matrices():
    """CorInfoMax's logdet_pd and Explicit MIM's mi_terms factorise by Cholesky; an indefinite
    matrix must give NaN (the training loop's stop signal), never a finite number."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    S = X.T @ X / 40
    I = torch.eye(6, dtype=torch.float64)
    want = [np.linalg.slogdet(M.numpy())[1] for M in (S[:3, :3] + 1e-3 * I[:3, :3], S[3:, 3:] + 1e-3 * I[:3, :3],
                                                      S + 1e-3 * I)]
    mi, ld1, ld2, ldj = explicit_mim.mi_terms(S, 3, 1e-3)
    assert [ld1.item(), ld2.item(), ldj.item()] == pytest.approx(want, rel=1e-12)
    assert mi.item() == pytest.approx(0.5 * (want[0] + want[1] - want[2]), rel=1e-12)
    both = corinfomax.logdet_pd(torch.stack([S, -S]))
    assert both[0].item() == pytest.approx(np.linalg.slogdet(S.numpy())[1], rel=1e-12) and both[1].isnan()
    assert all(t.isnan() for t in explicit_mim.mi_terms(S, 3, -10.0))


# ============================================================================================
# At the headline scale: what each process extracts, gathers, computes in float32, runs per step
# ============================================================================================

def _proc(world=1, rank=0, device="cpu", local_world=1):
    """A stand-in for common.ThisProcess: the fields the helpers read."""
    return argparse.Namespace(rank=rank, world=world, device=torch.device(device), local_world=local_world,
                              is_main=rank == 0, local_rank=rank)


class _CountingBackbone(nn.Module):
    """Flattens images and counts how many it has seen."""

    def __init__(self):
        super().__init__()
        self.seen, self.lin = 0, nn.Linear(3 * 16 * 16, 8)

    def forward(self, x):
        self.seen += len(x)
        return self.lin(x.flatten(1))


def imagenet_labels(seed=0):
    """1,281,167 labels with ImageNet-1k's class sizes: 1,000 classes of 732 to 1,300 images."""
    counts = torch.full((1000,), 1300)
    counts[0], counts[1:101], counts[1:66] = 732, 1300 - 182, 1300 - 183   # 1,281,167 in all
    return torch.repeat_interleave(torch.arange(1000), counts)[torch.randperm(1281167, generator=torch.Generator(
        ).manual_seed(seed))]


def test_knn_bank_is_class_balanced_at_imagenet_class_sizes_and_k_is_dinos_20():
    """A random 20,000-image bank would hold about 4 images of ImageNet's smallest class (k = 1); the
    class-balanced bank of the imagenet presets (100,000) holds 100 of each class, the same images at
    every call, and the monitor votes with k = 20 (DINO's)."""
    labels = imagenet_labels()
    assert len(labels) == 1281167 and torch.bincount(labels).min() == 732
    bank, per_class = common.knn_bank(labels, 100_000)
    assert per_class == 100 and (torch.bincount(labels[bank], minlength=1000) == 100).all()
    assert common.knn_bank(labels, 100_000) == (bank, 100) and common.knn_bank(labels, 100_000, seed=1)[0] != bank
    for script, module in MODULES.items():
        assert module.parse_args(["--data", "imagenet", "--cpu"]).knn_bank == 100_000, script
    # A class smaller than its share gives all its images; k is a fifth of the smallest class, at most 200.
    small = torch.tensor([0] * 50 + [1] * 3 + [2] * 500)
    bank, per_class = common.knn_bank(small, 300)
    assert torch.bincount(small[bank]).tolist() == [50, 3, 100] and per_class == 3


def test_knn_monitor_extracts_only_its_bank_and_states_k_and_images_per_class():
    """On a labelled set larger than the bank, one kNN evaluation runs the backbone on exactly the
    bank's and the test images; the result states k and the bank's images per class."""
    cfg = make_cfg(knn_bank=30)
    train, test = (common.tensor_images(*synthetic.make(n, 16, seed=s)) for n, s in ((200, 0), (40, 1)))
    data = common.Datasets(train, train, test, 10)
    backbone = _CountingBackbone()
    acc = corinfomax.evaluate(backbone, "knn", data, cfg, _proc(), None, "knn")
    assert backbone.seen == 30 + 40 and 0 <= acc["top1"] <= 100 and (acc["per_class"], acc["k"]) == (3, 1)
    cfg = make_cfg(knn_bank=2000)   # more than the 200 images: all of them
    full = common.feature_accuracy("knn", backbone, data, corinfomax.test_view(cfg), cfg, _proc())
    smallest = int(torch.bincount(data.probe.tensors[1]).min())
    assert (full["per_class"], full["k"]) == (smallest, smallest // 5)


def test_effective_ranks_use_a_fixed_random_subset_not_the_first_images(monkeypatch):
    """An image folder is sorted by class: the effective-rank monitor reads a fixed random subset,
    the same at every call (and on every rank: it depends on the seed only)."""
    subset = common.fixed_subset(10000, 2048)
    assert subset == common.fixed_subset(10000, 2048) and subset == sorted(subset) and len(set(subset)) == 2048
    assert subset[-1] > 9000 and subset != list(range(2048))
    seen = []
    monkeypatch.setattr(common, "extract", lambda net, base, *a: seen.append(list(base.indices)) or
                        (torch.randn(len(base), 4, generator=torch.Generator().manual_seed(0)),))
    data = common.Datasets(common.tensor_images(*synthetic.make(3000, 16)), None, None, 0)
    corinfomax.effective_ranks(corinfomax.Model(make_cfg()), data, make_cfg(), _proc())
    assert seen == [common.fixed_subset(3000, 2048)] * 2


@pytest.mark.parametrize("script", METHOD_FILES)
def test_embeddings_are_float32_computed_in_float32_under_bf16_autocast(script):
    """Under CPU bf16 autocast, the embeddings that reach the loss equal the float32 computation of
    the projector's (predictor's) last layer and the normalisation from the same hidden
    activations, to float32 precision: no bf16 rounding (3 digits) reaches the log-dets."""
    module = MODULES[script]
    cfg = module.parse_args(["--cpu", "--amp", "bf16"] + [str(a) for a in tiny(script)])
    cfg.use_cuda = False
    model = module.Model(cfg).eval()
    head = model.predictor if script == "ssl_hsic.py" else model.projector
    trunk = model.online if script == "ssl_hsic.py" else model.backbone
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with common.autocast(cfg):
        z = model(x)
        hidden = head[:-1](trunk(x))
    assert hidden.dtype == torch.bfloat16 and z.dtype == torch.float32
    want = F.normalize(hidden.double() @ head[-1].weight.double().T, dim=1)
    torch.testing.assert_close(z.double(), want, rtol=1e-6, atol=1e-6)


def test_cores_come_from_this_process_affinity_not_the_machine(monkeypatch):
    """Under SLURM or a cgroup with 4 of 128 cores, 2 processes per node get 2 threads each (and 1
    loader worker each on CUDA), not 64."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    data, cfg = common.Datasets(range(64), None, None, 10), make_cfg(threads=None, workers=None)
    cpu = common.derive(cfg, data, _proc(world=2, local_world=2), "corinfomax.py")
    cuda = common.derive(cfg, data, _proc(world=2, local_world=2, device="cuda"), "corinfomax.py")
    assert (cpu.threads, cpu.workers, cuda.threads, cuda.workers) == (2, 0, 2, 1)
    with pytest.raises(AttributeError, match="fixed once the run starts"):
        cpu.lr = 1.0                                     # nothing changes cfg after the derived block
    monkeypatch.delattr(os, "sched_getaffinity")         # a platform without it: the machine's count
    assert common.derive(cfg, data, _proc(local_world=2), "corinfomax.py").threads == 64


def _compile_order_run(rank, world, port, out):
    _join_gloo(rank, world, port)
    cfg = make_cfg(compile=True)
    model = _tiny_model(3)
    net = corinfomax.parallel(model, cfg, _proc(world=world, rank=rank))
    torch.save([type(net).__name__, type(net._orig_mod).__name__, net._orig_mod.module is model], f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_compile_wraps_ddp_not_the_other_way_round(tmp_path):
    """--compile compiles the DDP wrapper (DDP can then overlap its all-reduce with the compiled
    backward); the checkpointed model itself keeps its names."""
    mp.spawn(_compile_order_run, args=(2, common.free_port(), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "0.pt") == ["OptimizedModule", "DistributedDataParallel", True]


def _empty_shard_run(rank, world, port, out):
    _join_gloo(rank, world, port)
    base = common.tensor_images(*synthetic.make(1, 16))       # one image: rank 1 holds no shard
    f, y = common.extract(_CountingBackbone(), base, lambda x: x.float(), make_cfg(), _proc(world, rank))
    torch.save((f.shape, y.tolist()), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_a_rank_without_an_evaluation_shard_sends_features_of_the_right_width(tmp_path):
    mp.spawn(_empty_shard_run, args=(2, common.free_port(), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "0.pt") == torch.load(tmp_path / "1.pt") == (torch.Size([1, 8]), [
        int(synthetic.make(1, 16)[1][0])])


def test_stop_and_save_agreement_runs_every_log_every_steps_not_every_step(tmp_path, monkeypatch):
    """The host-side collective that agrees on stopping and saving runs at the --log-every steps,
    each epoch's end and the last step: 4 times in 12 steps (8 per epoch, --log-every 5), not 12."""
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    calls = []
    real = common.agree
    monkeypatch.setattr(common, "agree", lambda proc, due: calls.append(1) or real(proc, due))
    cfg = corinfomax.parse_args([str(a) for a in tiny("corinfomax.py")] + ["--synthetic-train", "128", "--max-steps",
                                "12", "--log-every", "5", "--output-dir", str(tmp_path / "o"), "--cpu"])
    corinfomax.train(cfg)
    assert len(calls) == 4                     # steps 5, 8 (epoch end), 10, 12 (the last)
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "o" / "metrics.jsonl")) if r["event"] == "train"]
    assert steps == [5, 8, 10, 12]


# ============================================================================================
# Evaluation protocol: the official linear probes, checkpointed and resumed
# ============================================================================================

def byol_learning_schedule(step, batch_size, base_lr, total_steps, warmup_steps):
    """byol/utils/schedules.py (learning_schedule, _cosine_decay), transcribed: SSL-HSIC's probe LR."""
    scaled = base_lr * batch_size / 256.0
    if step < warmup_steps:
        return step / warmup_steps * scaled
    s = min(step - warmup_steps, total_steps - warmup_steps)
    return scaled * 0.5 * (1 + math.cos(math.pi * s / (total_steps - warmup_steps)))


def test_probe_protocols_are_the_official_ones():
    """SSL-HSIC (eval_config.py): batch 4096, 0.5 x B/256, 100 warm-up steps, per-step cosine to 0
    over 90 epochs, head EMA 0.999. CorInfoMax (cifars-tiny/main_linear.py, optim_utils.py):
    batch 256, per-epoch CosineAnnealingLR to lr/100 (0.2 -> 2e-3)."""
    cfg = ssl_hsic.parse_args(["--data", "imagenet", "--cpu"])
    assert (cfg.probe_batch, cfg.probe_lr, cfg.probe_lr_scaling, cfg.probe_warmup_steps, cfg.probe_schedule,
            cfg.probe_head_ema, cfg.probe_epochs) == (4096, 0.5, "batch/256", 100, "cosine-steps", 0.999, 90)
    per_epoch = 1281167 // 4096
    for step in (0, 1, 50, 99, 100, 101, 5000, 90 * per_epoch - 1):
        assert ssl_hsic.probe_lr_at(cfg, step, per_epoch) == pytest.approx(
            byol_learning_schedule(step, 4096, 0.5, 90 * per_epoch, 100), rel=1e-12, abs=1e-15)
    cim = corinfomax.parse_args(["--data", "cifar10", "--cpu"])
    assert (cim.probe_batch, cim.probe_lr, cim.probe_warmup_steps, cim.probe_head_ema) == (256, 0.2, 0, 0.0)
    head = nn.Linear(2, 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 100, eta_min=2e-3)
    for epoch in range(100):
        assert corinfomax.probe_lr_at(cim, epoch * 195 + 7, 195) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()


def test_linear_probe_is_checkpointed_each_epoch_and_resumes_exactly(tmp_path):
    """The final linear probe saves itself after every epoch; a run stopped during it resumes the
    probe where it was and ends with the same head and accuracy as a run never stopped."""
    args = [*tiny("ssl_hsic.py"), "--max-steps", 1, "--probe", "linear", "--probe-epochs", 3, "--probe-batch", 16,
            "--probe-warmup-steps", 2]
    straight = run_script(*args, "--output-dir", tmp_path / "a", script="ssl_hsic.py")
    assert straight.returncode == 0, straight.stderr
    code, out, err = _run_until([*args, "--output-dir", tmp_path / "b"], "ssl_hsic.py", [signal.SIGTERM],
                                after="probe trained epoch 1/3")
    done = torch.load(tmp_path / "b" / "probe-trained.pt", weights_only=True)["step"]
    assert 1 <= done < 3 and code == 130, out + err
    assert f"interrupted; epoch {done} is kept in {tmp_path / 'b' / 'probe-trained.pt'}" in err, err
    resumed = run_script(*args, "--output-dir", tmp_path / "b", script="ssl_hsic.py")
    assert resumed.returncode == 0, resumed.stderr
    assert f"probe trained: resuming at epoch {done}" in resumed.stdout
    a, b = (torch.load(tmp_path / f / "probe-trained.pt", weights_only=True) for f in "ab")
    assert all(torch.equal(a[p][k], b[p][k]) for p in ("head", "ema") for k in a[p])
    final = [l for l in straight.stdout.splitlines() if l.startswith("linear probe")]
    assert final and final == [l for l in resumed.stdout.splitlines() if l.startswith("linear probe")]


def test_a_stop_after_an_epochs_last_step_runs_its_monitor_on_resume(tmp_path):
    """Stopped at the end of epoch 1 (by the signal agreed at its last step, or during its
    monitor), the resumed run first runs the monitor of epoch 1, then goes on."""
    args = [*tiny("corinfomax.py"), "--max-steps", 6]
    code, out, err = _run_until([*args, "--output-dir", tmp_path / "o"], "corinfomax.py", [signal.SIGTERM],
                                after="step 4/6")
    assert code in (130, 128 + signal.SIGTERM) and "epoch 1:" not in out, out + err
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["step"] == 4
    resumed = run_script(*args, "--output-dir", tmp_path / "o")
    assert resumed.returncode == 0, resumed.stderr
    epochs = [r["epoch"] for r in map(json.loads, open(tmp_path / "o" / "metrics.jsonl")) if r["event"] == "epoch"]
    assert epochs == [1] and resumed.stdout.index("epoch 1:") < resumed.stdout.index("step 5/6")


def test_a_finished_run_extended_by_an_epoch_runs_each_monitor_once(tmp_path):
    """A run that ends at an epoch's end, then resumed with more --epochs, goes on to epoch 2
    without repeating epoch 1's monitor."""
    args = [*tiny("corinfomax.py"), "--output-dir", tmp_path / "o"]
    assert run_script(*args, "--epochs", 1).returncode == 0
    extended = run_script(*args, "--epochs", 2)
    assert extended.returncode == 0, extended.stderr
    assert "epoch 1:" not in extended.stdout and "epoch 2:" in extended.stdout, extended.stdout
    epochs = [r["epoch"] for r in map(json.loads, open(tmp_path / "o" / "metrics.jsonl")) if r["event"] == "epoch"]
    assert epochs == [1, 2]


@pytest.mark.parametrize("script", METHOD_FILES)
def test_print_config_shows_every_value_and_its_source_without_reading_data(tmp_path, script):
    proc = run_script("--data", "fashionmnist", "--data-dir", tmp_path / "nowhere", "--lr", 2, "--print-config",
                      script=script)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    rows = {l.split()[0]: l.split()[-1] for l in proc.stdout.splitlines()[1:]}
    module = MODULES[script]
    assert set(rows) == set(module.DEFAULTS)
    assert rows["lr"] == "flag" and rows["batch_size"] == "preset" and rows["seed"] == "default"
    assert all(rows[k] == "preset" for k in module.PRESETS["fashionmnist"] if k != "lr")
    assert not (tmp_path / "nowhere").exists()


def test_readme_sbatch_recipe_requeues_and_its_commands_parse():
    """The README's SLURM recipe: SIGUSR1 to the batch shell 120 s before the limit, passed on
    through srun and torchrun (--signals-to-handle) to every process; a requeue; and torchrun's
    and the method file's flags as written."""
    block, = _readme_blocks("sbatch")
    assert "--signal=B:USR1@120" in block and "--requeue" in block and 'scontrol requeue "$SLURM_JOB_ID"' in block
    command = next(l for l in block.replace("\\\n", " ").splitlines() if l.startswith("srun torchrun"))
    argv = shlex.split(command.replace('"$head:29500"', "node1:29500").replace('"$SLURM_JOB_ID"', "42"))[2:-1]
    i = next(k for k, a in enumerate(argv) if a.endswith(".py"))
    import torch.distributed.run as torchrun
    launcher = torchrun.get_args_parser().parse_args(argv[:i + 1])
    assert launcher.nnodes == "2" and "SIGUSR1" in launcher.signals_to_handle.split(",")
    cfg = MODULES[argv[i]].parse_args(argv[i + 1:] + ["--cpu"])
    assert cfg.preset == "imagenet" and cfg.data_dir == "/ds/imagenet"


def test_torchrun_passes_sigusr1_on_so_the_processes_save_and_stop(tmp_path):
    """The hop the SLURM recipe relies on: SIGUSR1 to torchrun (--signals-to-handle) reaches both
    processes, which save a mid-epoch step and stop together."""
    args = ["--standalone", "--nproc-per-node", 2, "--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1", "corinfomax.py",
            *tiny("corinfomax.py"), "--synthetic-train", 128, "--max-steps", 10, "--output-dir", tmp_path / "o"]
    cmd = [sys.executable, "-m", "torch.distributed.run"] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "step 3/10" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped: SIGUSR1 at step" in err, out + err
    step = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= step < 8 and f"stopped: SIGUSR1 at step {step}, saved in" in err


def _byol_view(image, p, i, norm):
    """Image i of a draw p by byol/utils/augmentations.py (postprocess, _color_transform_single_image,
    rgb_to_hsv, hsv_to_rgb, adjust_*, _gaussian_blur_single_image, _solarize_single_image),
    transcribed per image in float64 numpy on H x W x C arrays as the JAX code computes them."""
    def rgb_to_hsv(r, g, b):
        vv = np.maximum(np.maximum(r, g), b)
        range_ = vv - np.minimum(np.minimum(r, g), b)
        with np.errstate(divide="ignore", invalid="ignore"):
            sat = np.where(vv > 0, range_ / vv, 0.0)
            norm_ = np.where(range_ != 0, 1.0 / (6.0 * range_), 1e9)
        hue = np.where(r == vv, norm_ * (g - b), np.where(g == vv, norm_ * (b - r) + 2 / 6, norm_ * (r - g) + 4 / 6))
        hue = hue * (range_ > 0)
        return hue + (hue < 0), sat, vv

    def hsv_to_rgb(h, s, v):
        c = s * v
        m = v - c
        dh = (h % 1.0) * 6.0
        x = c * (1 - np.abs(dh % 2.0 - 1))
        hcat = np.floor(dh).astype(np.int32)
        rr = np.where((hcat == 0) | (hcat == 5), c, np.where((hcat == 1) | (hcat == 4), x, 0)) + m
        gg = np.where((hcat == 1) | (hcat == 2), c, np.where((hcat == 0) | (hcat == 3), x, 0)) + m
        bb = np.where((hcat == 3) | (hcat == 4), c, np.where((hcat == 2) | (hcat == 5), x, 0)) + m
        return rr, gg, bb

    image = image.permute(1, 2, 0).double().numpy() / 255
    rgb = tuple(image[..., c] for c in range(3))
    if p["jitter"][i]:
        for idx in p["order"][i].tolist():
            f = float(p["factors"][i, idx])
            if idx == 0:
                rgb = tuple(c + f for c in rgb)
            elif idx == 1:
                rgb = tuple(f * (c - c.mean()) + c.mean() for c in rgb)
            elif idx == 2:
                h, s, v = rgb_to_hsv(*rgb)
                rgb = hsv_to_rgb(h, np.clip(s * f, 0.0, 1.0), v)
            else:
                h, s, v = rgb_to_hsv(*rgb)
                rgb = hsv_to_rgb((h + f) % 1.0, s, v)
            rgb = tuple(np.clip(c, 0.0, 1.0) for c in rgb)
    out = np.stack(rgb, axis=-1)
    if p["gray"][i]:
        out = np.tile(np.tensordot(out, np.array([0.2989, 0.5870, 0.1140]), axes=(-1, -1))[..., None], (1, 1, 3))
    out = np.clip(out, 0.0, 1.0)
    if p["blur"][i]:
        radius = int(out.shape[0] / 10.0 / 2)                    # kernel_size = H / blur_divider
        t = np.arange(-radius, radius + 1)
        k = np.exp(-t**2 / (2.0 * float(p["sigma"][i])**2))
        k /= k.sum()
        H, W = out.shape[:2]
        padded = np.pad(out, ((0, 0), (radius, radius), (0, 0)))              # SAME: zeros
        out = sum(k[j] * padded[:, j:j + W] for j in range(len(k)))          # blur_h
        padded = np.pad(out, ((radius, radius), (0, 0), (0, 0)))
        out = sum(k[j] * padded[j:j + H] for j in range(len(k)))             # blur_v
    if p["solarize"][i]:
        out = np.where(out < 0.5, out, 1.0 - out)
    out = np.clip(out, 0.0, 1.0)
    mean, std = (np.array(v) for v in norm)
    return torch.from_numpy(((out - mean) / std).transpose(2, 0, 1))


def test_ssl_hsic_photometric_half_is_byols_image_by_image():
    """ssl_hsic.py's batched photometric half against BYOL's formulas transcribed above: brightness
    a delta, contrast per channel, saturation and hue in HSV, a clip after each op, a zero-padded
    blur of 2 int(H / 20) + 1 taps, solarize at 0.5. Every branch is taken and skipped."""
    norm = ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    cfg = ssl_hsic.parse_args(["--cpu", "--image-size", "40", "--blur-sigma", "2.0"])
    cfg.norm = norm
    for view in ssl_hsic.pretrain_views(cfg):
        photometric = view[1]
        photometric.blur_p, photometric.solarize_p = 0.5, 0.5
        crops = torch.randint(0, 256, (48, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
        crops[:, :, :4] = crops[:, :1, :4]                       # grey rows: hue's and saturation's edge
        p = photometric.draw(len(crops), torch.Generator().manual_seed(3))
        for key in ("jitter", "gray", "blur", "solarize"):
            assert 0 < int(p[key].sum()) < len(crops), key
        lo, hi = torch.tensor([-0.4, 0.6, 0.8, -0.1]), torch.tensor([0.4, 1.4, 1.2, 0.1])   # BYOL's ranges
        assert (p["factors"] >= lo).all() and (p["factors"] <= hi).all() and photometric.taps == 2 * int(40 / 20) + 1
        ours = photometric(crops, p)
        want = torch.stack([_byol_view(crops[i], p, i, norm) for i in range(len(crops))])
        torch.testing.assert_close(ours.double(), want, rtol=0, atol=1e-4)
    x = _images()
    for k, identity in enumerate((0.0, 1.0, 1.0, 0.0)):   # the identity parameters leave images as they were
        torch.testing.assert_close(image_ops.byol_colour(x, k, torch.full((len(x),), identity)), x,
                                   rtol=0, atol=1e-6)


def test_benchmark_memory_counts_saved_activations_and_state():
    """--memory: the state is the parameters, buffers, gradients and momentum buffers counted here
    independently; the bytes saved for backward per image do not depend on the batches that
    measured them; the per-GPU total adds them up at batch / 8."""
    benchmark = __import__("tools.benchmark", fromlist=["memory"])
    cfg = make_cfg(batch_size=64)
    cfg = common.derive(cfg, common.Datasets(range(64), None, None, 1), _proc(), "corinfomax.py")
    small, large = (benchmark.memory(corinfomax, cfg, _proc(), images=n) for n in ((2, 4), (3, 8)))
    model, criterion = corinfomax.build(cfg, _proc())[:2]

    def gib(tensors):
        return sum(t.numel() * t.element_size() for t in tensors) / 2**30
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = dict(small["state_gib"])
    assert state.pop("saved, not per image") >= 0
    assert state == pytest.approx({"parameters and buffers": gib([*model.parameters(), *model.buffers(),
                                   *criterion.buffers()]), "gradients": gib(trainable), "optimiser state": gib(trainable)})
    assert small["saved_per_image_mib"] > 0.1
    assert large["saved_per_image_mib"] == pytest.approx(small["saved_per_image_mib"], rel=0.05)
    assert small["total_gib_per_gpu"] == pytest.approx(sum(small["state_gib"].values()) + 8 * small[
        "saved_per_image_mib"] / 1024)


def test_benchmark_on_a_folder_times_its_own_files(tmp_path):
    """With --data FOLDER the data figures are those of the folder's files (decoding included)."""
    _image_folder(tmp_path / "ds", "classes")
    proc = run_script("corinfomax", "--data", tmp_path / "ds", "--preset", "imagenet100", *TINY_FOLDER,
                      "--bench-steps", 1, "--bench-sizes", "8", script="tools/benchmark.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["data"] == str(tmp_path / "ds") and res["augment_img_per_s_per_worker"] > 0
    assert 0.0 <= res["data_wait"] < 1.0


# ============================================================================================
# ImageNet's scale: counted, not timed (tools/rehearse.py runs the whole of it)
# ============================================================================================

def test_one_read_of_an_imagenet_sized_folder_touches_one_path_and_the_paths_stay_compact(monkeypatch):
    """Reading an image costs the same at 1.28 M files as at 16: one path decoded, no list as long as
    the folder built (peak allocation of a read), one file opened; with skip_bad a broken image is
    replaced by the next one. The paths travel to a loader worker as a few objects, not 1.28 M strings."""
    import tracemalloc
    from PIL import Image
    paths = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(1000) for i in range(1281)]
    files = common.ImageFiles("/ds/imagenet/train", paths, np.arange(len(paths)) // 1281, skip_bad=True)
    opened, decoded = [], []
    real_path = files.path
    monkeypatch.setattr(files, "path", lambda i: decoded.append(i) or real_path(i))

    def fake_open(path):
        opened.append(path)
        if path.endswith("_7.JPEG"):
            raise OSError("broken")
        return Image.new("RGB", (4, 4))
    monkeypatch.setattr(common.PIL.Image, "open", fake_open)
    tracemalloc.start()
    image, label = files[1281 * 999 + 5]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (label, decoded, opened) == (999, [1281 * 999 + 5], ["/ds/imagenet/train/n00000999/n00000999_5.JPEG"])
    assert peak < 64 * 1024, peak          # the old read built a 1.28 M-entry list: over 10 MB
    assert files[7][1] == 0 and opened[-2:] == [real_path(7), real_path(8)] and files.skipped.value == 1
    monkeypatch.undo()
    size = len(pickle.dumps({k: v for k, v in vars(files).items() if k != "skipped"}))   # what a worker gets
    assert size < sum(map(len, paths)) + 17 * len(paths), size   # bytes + two 8-byte numbers a file
    assert len(files.__dict__) == 6 and all(not isinstance(v, list) for v in files.__dict__.values())


def _rank_reading(folder, rank, world=2, batch=8, avoid=None):
    """The first file that `rank` reads in epoch 0 (the sampler's draw) that is not next to `avoid` (with
    --skip-bad-images a broken file is replaced by the one after it)."""
    train = common.image_folder(str(folder), False)[0]
    sampler, n = common.GlobalBatchSampler(len(train), batch, rank, world, seed=0), len(train)
    return next(train.path(i) for i, _ in next(iter(sampler))
                if avoid not in (train.path((i + d) % n) for d in (-1, 1)))


def test_an_error_on_the_last_rank_is_its_one_line_and_the_other_process_stops_quietly(tmp_path):
    """Two CPU processes: the undecodable file read by rank 1 is named in one line from rank 1; rank 0,
    whose collective fails, prints nothing; the exit status is 2. With --skip-bad-images the logged
    count is the sum over the processes (one broken file read by each rank)."""
    _image_folder(tmp_path / "ds", "classes")
    args = ["--data", tmp_path / "ds", "--preset", "imagenet100", *TINY_FOLDER, "--max-steps", 2, "--gpus", 2]
    bad = _rank_reading(tmp_path / "ds", rank=1)
    open(bad, "wb").write(b"this is not an image")
    # With a loader worker: it ignores SIGTERM, and once hung the failed process's exit for ever.
    line = assert_one_line_error(run_script(*args, "--workers", 1, "--output-dir", tmp_path / "a", timeout=180))
    assert line.startswith(f"corinfomax.py: rank 1: error: cannot read image {bad}"), line
    other = _rank_reading(tmp_path / "ds", rank=0, avoid=bad)
    open(other, "wb").write(b"this is not an image either")
    proc = run_script(*args, "--skip-bad-images", "--output-dir", tmp_path / "b")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl") if '"train"' in l]
    assert train[-1]["step"] == 2 and train[-1]["skipped_images"] == 2   # one epoch: each file read once


def test_lars_makes_its_momentum_buffers_once(monkeypatch):
    """The buffers exist from the start and stay the same tensors; a step allocates none with zeros_like."""
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    for LARS in (ssl_hsic.LARS, hydes.LARS):
        opt = LARS([{"params": params[:1]}, {"params": params[1:], "lars": False}], lr=0.1)
        buffers = [opt.state[p]["momentum_buffer"] for p in params]
        monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: pytest.fail("zeros_like in a step"))
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        monkeypatch.undo()
        assert all(opt.state[p]["momentum_buffer"] is b and b.abs().sum() > 0 for p, b in zip(params, buffers))


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    """fsync of the file, then the old file kept as .prev, the rename, and fsync of the folder."""
    import stat
    events, real_replace, real_fsync = [], os.replace, os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        "fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(f"{os.path.basename(a)[:14]} -> "
                                                                  f"{os.path.basename(b)}") or real_replace(a, b))
    path = str(tmp_path / "checkpoint.pt")
    common.atomic_save({"step": 1}, path, keep_previous=True)
    common.atomic_save({"step": 2}, path, keep_previous=True)
    assert events[3:] == ["fsync file", "checkpoint.pt -> checkpoint.pt.prev", "checkpoint.pt. -> checkpoint.pt",
                          "fsync folder"], events
    assert torch.load(path + ".prev")["step"] == 1 and sorted(os.listdir(tmp_path)) == ["checkpoint.pt",
                                                                                       "checkpoint.pt.prev"]


def test_an_unreadable_newest_checkpoint_resumes_from_the_previous_one_saying_so(tmp_path):
    out = tmp_path / "o"
    for steps in (2, 3):
        assert run_script(*TINY, "--max-steps", steps, "--output-dir", out).returncode == 0
    (out / "checkpoint.pt").write_bytes(b"half a checkpoint")   # as after a crash of a filesystem
    proc = run_script(*TINY, "--max-steps", 4, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"note: {out / 'checkpoint.pt'} \(\w+\) cannot be read; resuming from the previous checkpoint "
                     rf"{out / 'checkpoint.pt.prev'}\n", proc.stdout) and "resuming at step 2" in proc.stdout


def test_the_pretraining_loaders_workers_end_before_the_final_probe(tmp_path, monkeypatch):
    import multiprocessing
    seen = []
    monkeypatch.setattr(corinfomax, "finish", lambda *a: seen.append(len(multiprocessing.active_children())))
    cfg = corinfomax.parse_args([*map(str, TINY), "--workers", "2", "--max-steps", "2", "--output-dir", str(tmp_path)])
    corinfomax.train(cfg)
    assert seen == [0]


def test_baseline_on_imagenet_is_refused_in_one_line_before_any_gather():
    cfg = corinfomax.parse_args(["--data", "imagenet", "--cpu", "--baseline"])
    data = common.Datasets(range(1281167), range(1281167), range(50000), 1000)
    with pytest.raises(common.UsageError, match="--baseline would gather 28 GB of raw-pixel features.*--no-baseline"):
        common.derive(cfg, data, _proc(), "corinfomax.py")
    cfg = corinfomax.parse_args(["--data", "cifar10", "--cpu", "--baseline"])   # 10,000 CIFAR images: 0.1 GB
    assert common.derive(cfg, common.Datasets(range(50000), range(50000), range(10000), 10), _proc(), "x").baseline


# ============================================================================================
# One run, one experiment; messages that say what happened; the units a user copies
# ============================================================================================

def test_a_resume_with_another_experiments_values_is_one_line_naming_each(tmp_path):
    out = tmp_path / "o"
    assert run_script(*TINY, "--max-steps", 1, "--output-dir", out).returncode == 0
    before = files_snapshot(out)
    line = assert_one_line_error(run_script(*TINY, "--max-steps", 2, "--lr", 0.1, "--seed", 3, "--output-dir", out))
    assert "belongs to another experiment: --lr 0.2 there, 0.1 here; --seed 0 there, 3 here;" in line
    assert "--output-dir" in line and files_snapshot(out) == before
    longer = run_script(*TINY, "--max-steps", 2, "--log-every", 2, "--workers", 0, "--output-dir", out)
    assert longer.returncode == 0 and "resuming at step 1" in longer.stdout, longer.stderr


def test_a_folder_given_as_data_gets_its_own_default_output_folder():
    cfg = corinfomax.parse_args(["--data", "/photos/holiday/", "--preset", "stl10", "--cpu"])
    data = common.Datasets(range(600), None, None, 0)
    want = os.path.join("runs", "corinfomax-stl10-holiday")
    assert common.derive(cfg, data, _proc(), "corinfomax.py").output_dir == want
    cfg = corinfomax.parse_args(["--data", "cifar10", "--cpu"])
    assert common.derive(cfg, data, _proc(), "corinfomax.py").output_dir == os.path.join("runs", "corinfomax-cifar10")


def test_a_probe_checkpoint_of_another_backbone_is_not_resumed(tmp_path):
    """A finished run extended by more steps trains a fresh probe on the new backbone."""
    args = [*TINY, "--probe", "linear", "--probe-epochs", 1, "--probe-batch", 16, "--no-baseline",
            "--output-dir", tmp_path]
    assert run_script(*args, "--max-steps", 2).returncode == 0
    proc = run_script(*args, "--max-steps", 4)
    assert proc.returncode == 0, proc.stderr
    assert f"note: {tmp_path / 'probe-trained.pt'} was trained on another backbone; its probe starts afresh" \
        in proc.stdout and "probe trained: resuming" not in proc.stdout


@pytest.mark.parametrize("args, says", [
    (["--data", "synthetic", "--output-dir", "/proc/x"], "cannot make --output-dir /proc/x"),
    (["--data-dir", "/ds"], "--data-dir says where a preset's dataset lives: pass --data too"),
    (["--data", "cifar10", "--preset", "imagenet"], "--data cifar10 is a preset itself"),
    (["--data", "imagenet", "--data-dir", "/nonexistent"], "pass --data-dir DIR holding train/ and val/ class folders"),
    (["--data", "test_all.py"], "test_all.py is a file, not a folder"),
    (["--data", "synthetic", "--batch-size", 128], "fewer than one batch (--batch-size 128)")])
def test_bad_input_is_one_line_that_points_the_right_way(args, says):
    line = assert_one_line_error(run_script(*TINY[2:], "--max-steps", 1, *args))   # TINY without its --data
    assert says in line and "--download" not in line, line


def test_help_shows_what_the_presets_set_and_no_backwards_default():
    text = run_script("--help").stdout
    flat = " ".join(text.split())
    assert "[default 0.5; set by presets imagenet100, imagenet, synthetic]" in flat   # --lr
    assert "[set by every preset]" in flat and "default True" not in flat            # --epochs; --no-normalize


def test_gpus_without_cuda_says_it_starts_cpu_processes(tmp_path):
    proc = run_script(*TINY, "--max-steps", 1, "--gpus", 2, "--output-dir", tmp_path)
    assert proc.returncode == 0 and "note: no CUDA: --gpus 2 starts 2 CPU processes (gloo)" in proc.stdout, proc.stderr


UNIT_IMPORTS = "import functools, math, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F\n"
UNIT_CALLS = {"corinfomax.py": "CorInfoMaxLoss(8)(z[0], z[1])", "explicit_mim.py": "ExplicitMIMLoss(8)(z[0], z[1])",
              "hydes.py": "HyDeSLoss(kappa=5.0)(z)", "ssl_hsic.py": "ssl_hsic_loss(z)"}


@pytest.mark.parametrize("script", METHOD_FILES)
def test_the_loss_section_copied_alone_runs_and_gives_the_files_loss(tmp_path, script):
    """The Loss section, cut out of the file and put below the import line its comment states, in a
    folder where nothing of this project is importable, gives the same loss as the file."""
    lines = open(os.path.join(HERE, script)).read().splitlines()
    start, end = lines.index("# Loss") + 2, lines.index("# Networks") - 1
    assert UNIT_IMPORTS.strip() in " ".join(l.lstrip("# ") for l in lines[start:start + 3])   # as its comment says
    (tmp_path / "unit.py").write_text(UNIT_IMPORTS + "\n".join(lines[start:end]) + "\n")
    z = "torch.nn.functional.normalize(torch.randn(2, 32, 8, generator=torch.Generator().manual_seed(0)), dim=-1)"
    code = f"import torch, unit\nz = {z}\nprint(repr(float(eval({UNIT_CALLS[script]!r}, vars(unit), {{'z': z}})[0])))"
    proc = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, '.'); exec({code!r})"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = eval(UNIT_CALLS[script], vars(MODULES[script]), {"z": eval(z)})[0]
    assert float(proc.stdout) == pytest.approx(float(want), rel=1e-12)


def test_losses_refuse_wrong_shapes_with_a_value_error():
    z = F.normalize(torch.randn(8, 4), dim=1)
    with pytest.raises(ValueError, match=r"z must have shape \(V, N, D\)"):
        hydes.hydes_loss(z)
    with pytest.raises(ValueError, match=r"needs N >= 2D \+ 1 = 9, got N = 5"):
        explicit_mim.ExplicitMIMLoss(4)(z[:5], z[:5])
    assert torch.isfinite(explicit_mim.ExplicitMIMLoss(4, estimator="ema")(z[:5], z[:5])[0])   # running estimates
    for loss in (explicit_mim.ExplicitMIMLoss(4), corinfomax.CorInfoMaxLoss(4)):
        with pytest.raises(ValueError, match=r"z1, z2 must have shape \(N, 4\)"):
            loss(z, z[:6])
    with pytest.raises(ValueError, match=r"z must have shape \(M, N, D\)"):
        ssl_hsic.ssl_hsic_loss(z)


def test_ctrl_c_while_torch_loads_is_one_line():
    proc = subprocess.Popen([sys.executable, "corinfomax.py", *map(str, TINY)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)   # the interpreter is up; torch loads for seconds (and the handler holds until a run starts)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "corinfomax.py: interrupted while starting; nothing was saved\n", err
