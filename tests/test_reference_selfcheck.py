"""Self-checks of the independent reference (tests/reference_lra.py), against hand formulas.

Nothing here imports the project packages: these tests check that the reference itself is right,
so that it can then be used to check the real implementation.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import reference_lra as ref  # noqa: E402

DT = torch.float64


def make_batch(batch, D0, K, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, D0, generator=gen, dtype=DT)
    y = torch.randint(0, K, (batch,), generator=gen)
    return x, y


def blobs(seed, n_per_class=50, K=4, D0=8):
    """K Gaussian blobs in D0 dimensions, one per class."""
    gen = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(K, D0, generator=gen, dtype=DT)
    xs = [centers[k] + torch.randn(n_per_class, D0, generator=gen, dtype=DT) for k in range(K)]
    y = torch.arange(K).repeat_interleave(n_per_class)
    return torch.cat(xs), y


def cross_entropy_sum(logits, y):
    """Sum over the batch of -log softmax(logits)[y], written out by hand."""
    shifted = logits - logits.max(dim=1, keepdim=True).values
    log_norm = torch.log(torch.exp(shifted).sum(dim=1))
    return (log_norm - shifted[torch.arange(y.shape[0]), y]).sum()


def numeric_grad(fn, tensor, eps=1e-6):
    """Central finite differences of the scalar fn() with respect to every entry of tensor."""
    grad = torch.zeros_like(tensor)
    flat = tensor.view(-1)
    for j in range(flat.numel()):
        saved = flat[j].item()
        flat[j] = saved + eps
        up = fn().item()
        flat[j] = saved - eps
        down = fn().item()
        flat[j] = saved
        grad.view(-1)[j] = (up - down) / (2 * eps)
    return grad


SWEEP = dict(mix_skip=1.0, mix_adjacent=1.0)


# ----------------------------------------------------------------------------- (1) LRA-E ~ grad


def test_lra_e_last_displacement_is_the_true_gradient_when_E_equals_W_head():
    D0, H, depth, K, gap = 5, 6, 2, 3, 1
    params = ref.init_params(D0, H, depth, K, gap, seed=0)
    params["Ehead"] = params["Whead"].clone()
    x, y = make_batch(4, D0, K, seed=1)
    beta = 1e-5
    cfg = dict(depth=depth, gap=gap, act="tanh", residual=True)
    info = ref.compute_errors(
        params, x, y, **cfg, rule="lra_e", topology="adjacent", beta=beta, **SWEEP
    )
    h_last, z_last = info["layers"][-1]

    # d_last equals dL/dz_last (L = summed cross-entropy), by finite differences on z_last
    z = z_last.clone()
    grad_z = numeric_grad(lambda: cross_entropy_sum(z @ params["Whead"].T + params["bhead"], y), z)
    assert torch.allclose(info["disp"][-1], grad_z, atol=1e-8)

    # e_last / beta -> dL/dh_last = tanh'(h) * dL/dz as beta -> 0
    dl_dh = (1 - torch.tanh(h_last) ** 2) * grad_z
    assert torch.allclose(info["err"][-1] / beta, dl_dh, rtol=1e-3, atol=1e-6)

    # and the Hebbian update of the last hidden layer / beta -> d(mean loss)/dW_last
    grads = ref.gradients(
        params,
        x,
        y,
        **cfg,
        rule="lra_e",
        topology="adjacent",
        beta=beta,
        gamma=1.0,
        **SWEEP,
        feedback_update="kp",
        skip_update="fixed",
        reproject=None,
    )
    W_last = params[f"W{depth - 1}"].clone()

    def mean_loss():
        p = dict(params)
        p[f"W{depth - 1}"] = W_last
        _, logits = ref.forward(p, x, **cfg)
        return cross_entropy_sum(logits, y) / x.shape[0]

    grad_W = numeric_grad(mean_loss, W_last)
    assert torch.allclose(grads[f"W{depth - 1}"] / beta, grad_W, rtol=1e-3, atol=1e-6)


def test_forward_matches_hand_written_residual_mlp():
    D0, H, depth, K, gap = 4, 4, 4, 3, 2  # D0 == H: block 0 has a skip too
    params = ref.init_params(D0, H, depth, K, gap, seed=3)
    x, _ = make_batch(5, D0, K, seed=4)
    P = params
    z0 = torch.relu(x @ P["W0"].T + P["b0"])
    z1 = torch.relu(z0 @ P["W1"].T + P["b1"] + x)
    z2 = torch.relu(z1 @ P["W2"].T + P["b2"])
    z3 = torch.relu(z2 @ P["W3"].T + P["b3"] + z1)
    layers, logits = ref.forward(params, x, depth=depth, gap=gap, act="relu", residual=True)
    assert torch.allclose(layers[3][1], z3, atol=1e-12)
    assert torch.allclose(logits, z3 @ P["Whead"].T + P["bhead"], atol=1e-12)

    # D0 != H: block 0 gets no skip, later blocks still do
    params = ref.init_params(5, H, depth, K, gap, seed=3)
    x5, _ = make_batch(5, 5, K, seed=4)
    layers, _ = ref.forward(params, x5, depth=depth, gap=gap, act="relu", residual=True)
    z0 = torch.relu(x5 @ params["W0"].T + params["b0"])
    assert torch.allclose(layers[1][0], z0 @ params["W1"].T + params["b1"], atol=1e-12)


def test_mirror_adds_the_error_of_the_junction_above_at_a_block_input():
    D0, H, depth, K, gap = 6, 6, 4, 3, 2
    params = ref.init_params(D0, H, depth, K, gap, seed=5)
    x, y = make_batch(8, D0, K, seed=6)
    cfg = dict(depth=depth, gap=gap, act="tanh", residual=True, rule="rec_lra", beta=0.1)
    adj = ref.compute_errors(params, x, y, **cfg, topology="adjacent", **SWEEP)
    mir = ref.compute_errors(params, x, y, **cfg, topology="mirror", **SWEEP)
    # the top block is identical; layer 1 (junction of block 0) also gets e_3
    for i in (3, 2):
        assert torch.equal(adj["disp"][i], mir["disp"][i])
    assert torch.allclose(mir["disp"][1] - adj["disp"][1], adj["err"][3], atol=1e-12)
    assert not torch.allclose(mir["disp"][1], adj["disp"][1])


# ----------------------------------------------------------------------------- (2) learning


@pytest.mark.parametrize(
    "rule, topology, feedback_update, skip_update, gamma, mixes, lr",
    [
        (
            "rec_lra",
            "skip",
            "kp",
            "kp",
            1.0,
            (0.19, 0.24),
            0.01,
        ),  # gamma acts: 0.15 learns M 7x slower
        ("rec_lra", "skip", "local", "local", 0.15, (0.19, 0.24), 0.01),
        ("rec_lra", "mirror", "kp", "fixed", 0.15, (1.0, 1.0), 0.05),
        ("lra_e", "adjacent", "kp", "fixed", 1.0, (1.0, 1.0), 0.05),
    ],
)
def test_training_reduces_error_well_below_chance(
    rule, topology, feedback_update, skip_update, gamma, mixes, lr
):
    D0, H, depth, K, gap = 8, 16, 4, 4, 2
    x, y = blobs(seed=0, K=K, D0=D0)
    params = ref.init_params(D0, H, depth, K, gap, seed=1)
    arch = dict(depth=depth, gap=gap, act="relu", residual=True)

    def error_rate(p):
        _, logits = ref.forward(p, x, **arch)
        return (logits.argmax(1) != y).double().mean().item()

    def loss(p):
        _, logits = ref.forward(p, x, **arch)
        return cross_entropy_sum(logits, y).item() / x.shape[0]

    start_error, start_loss = error_rate(params), loss(params)
    for _ in range(300):
        params = ref.step(
            params,
            x,
            y,
            **arch,
            rule=rule,
            topology=topology,
            beta=0.1,
            gamma=gamma,
            mix_skip=mixes[0],
            mix_adjacent=mixes[1],
            feedback_update=feedback_update,
            skip_update=skip_update,
            reproject=1.0,
            lr=lr,
        )
    assert start_error > 0.5  # the problem is not solved at init (chance is 0.75)
    assert error_rate(params) < 0.2
    assert loss(params) < 0.5 * start_loss


# ----------------------------------------------------------------------------- (3) re-projection


def test_reprojection_caps_every_update_norm():
    D0, H, depth, K, gap = 6, 8, 4, 3, 2
    params = ref.init_params(D0, H, depth, K, gap, seed=7)
    x, y = make_batch(16, D0, K, seed=8)
    x = 5 * x  # large inputs, large updates
    lr, c = 0.5, 0.05
    kw = dict(
        depth=depth,
        gap=gap,
        act="relu",
        residual=True,
        rule="rec_lra",
        topology="skip",
        beta=0.5,
        gamma=1.0,
        mix_skip=0.19,
        mix_adjacent=0.24,
        feedback_update="local",
        skip_update="kp",
        lr=lr,
    )

    def update_norms(new):
        return {k: torch.linalg.norm((params[k] - new[k]) / lr).item() for k in params}

    free = update_norms(ref.step(params, x, y, **kw, reproject=None))
    capped = update_norms(ref.step(params, x, y, **kw, reproject=c))
    assert max(free.values()) > 10 * c  # without the cap, updates are larger than c
    for key, norm in capped.items():
        assert norm <= c * (1 + 1e-9), key
        if free[key] > c:
            assert norm == pytest.approx(c, rel=1e-9), key
        else:
            assert norm == pytest.approx(free[key], rel=1e-9, abs=1e-15), key
    assert any(free[k] > c for k in ("E1", "E3", "M0", "M1"))  # synapse updates were capped


# ----------------------------------------------------------------------------- (4) E updates


BASE = dict(
    act="tanh",
    residual=True,
    beta=0.1,
    mix_skip=0.19,
    mix_adjacent=0.24,
    reproject=None,
    lr=0.3,
)


@pytest.mark.parametrize("rule, topology", [("lra_e", "adjacent"), ("rec_lra", "skip")])
def test_fixed_feedback_leaves_synapses_unchanged(rule, topology):
    D0, H, depth, K, gap = 5, 6, 4, 3, 2
    params = ref.init_params(D0, H, depth, K, gap, seed=9)
    x, y = make_batch(8, D0, K, seed=10)
    new = ref.step(
        params,
        x,
        y,
        depth=depth,
        gap=gap,
        rule=rule,
        topology=topology,
        gamma=0.7,
        feedback_update="fixed",
        skip_update="fixed",
        **BASE,
    )
    for key in params:
        if key[0] in "EM":
            assert torch.equal(new[key], params[key]), key
        else:
            assert not torch.equal(new[key], params[key]), key


@pytest.mark.parametrize(
    "rule, topology, used",
    [
        ("lra_e", "adjacent", {"E1", "E2", "E3", "Ehead"}),
        ("rec_lra", "mirror", {"E1", "E2", "E3", "Ehead"}),
        ("rec_lra", "skip", {"E1", "E3"}),
    ],
)
def test_kp_moves_E_by_gamma_times_the_move_of_W(rule, topology, used):
    D0, H, depth, K, gap = 5, 6, 4, 3, 2
    gamma = 0.7
    params = ref.init_params(D0, H, depth, K, gap, seed=11)
    x, y = make_batch(8, D0, K, seed=12)
    new = ref.step(
        params,
        x,
        y,
        depth=depth,
        gap=gap,
        rule=rule,
        topology=topology,
        gamma=gamma,
        feedback_update="kp",
        skip_update="fixed",
        **BASE,
    )
    for key in ("E0", "E1", "E2", "E3", "Ehead"):
        weight = "W" + key[1:]
        move_E = new[key] - params[key]
        move_W = new[weight] - params[weight]
        if key in used:
            assert move_W.abs().max() > 1e-8, key
            assert torch.allclose(move_E, gamma * move_W, rtol=1e-12, atol=1e-15), key
        else:
            assert torch.equal(new[key], params[key]), key  # unused synapses never move
    assert torch.equal(new["M0"], params["M0"])
    assert torch.equal(new["M1"], params["M1"])


def test_step_does_not_mutate_its_input():
    D0, H, depth, K, gap = 5, 6, 2, 3, 1
    params = ref.init_params(D0, H, depth, K, gap, seed=13)
    before = {k: v.clone() for k, v in params.items()}
    x, y = make_batch(4, D0, K, seed=14)
    ref.step(
        params,
        x,
        y,
        depth=depth,
        gap=gap,
        rule="rec_lra",
        topology="skip",
        gamma=1.0,
        feedback_update="local",
        skip_update="local",
        **BASE,
    )
    for key in params:
        assert torch.equal(params[key], before[key]), key
