"""The Surgeon's costs and updates against a brute-force quadratic on a tiny layer with explicit factors."""

from __future__ import annotations

import pytest
import torch

from flexigpt.prune.surgeon.costs import (
    element_costs,
    element_groups,
    prepare,
    remove_cols,
    remove_elements,
    remove_rows,
    structure_costs,
)


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 3 * n, generator=gen, dtype=torch.float64)
    return x @ x.T / (3 * n)


def _layer(out_n: int = 5, in_n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_n, in_n, generator=gen, dtype=torch.float64)
    return w, _spd(out_n, gen), _spd(in_n, gen)


def _brute(w: torch.Tensor, g: torch.Tensor, a: torch.Tensor, fixed: torch.Tensor, compensate: bool):
    """min ½ tr(G ΔW A ΔWᵀ) with ΔW = −W on `fixed` (a mask), by solving over the Kronecker matrix."""
    f = torch.kron(g, a)  # vec row-major: F[(i,j),(k,l)] = G_ik A_jl
    s = fixed.flatten()
    x = torch.zeros(w.numel(), dtype=torch.float64)
    x[s] = -w.flatten()[s]
    if compensate:
        u = ~s
        x[u] = -torch.linalg.solve(f[u][:, u], f[u][:, s] @ x[s])
    return 0.5 * x @ f @ x, x.view_as(w)


@pytest.mark.parametrize("obs", [True, False])
def test_row_column_element_costs_equal_brute_force(obs: bool) -> None:
    w, g, a = _layer()
    c = prepare(w, None, g, a, damp_g=0.05, damp_a=0.02, obs=True)
    rows, cols = structure_costs(c, obs=obs)
    elems = element_costs(c, obs=obs)
    for r in range(w.shape[0]):
        m = torch.zeros_like(w, dtype=torch.bool)
        m[r] = True
        assert rows[r].item() == pytest.approx(_brute(w, c.g, c.a, m, obs)[0].item(), rel=1e-9)
    for j in range(w.shape[1]):
        m = torch.zeros_like(w, dtype=torch.bool)
        m[:, j] = True
        assert cols[j].item() == pytest.approx(_brute(w, c.g, c.a, m, obs)[0].item(), rel=1e-9)
    m = torch.zeros_like(w, dtype=torch.bool)
    m[2, 1] = True
    assert elems[2, 1].item() == pytest.approx(_brute(w, c.g, c.a, m, obs)[0].item(), rel=1e-9)


def test_correlated_row_update_is_the_constrained_least_squares_solution() -> None:
    w, g, a = _layer(6, 4, seed=1)
    c = prepare(w, None, g, a, obs=True)
    removed = torch.tensor([1, 4])
    m = torch.zeros_like(w, dtype=torch.bool)
    m[removed] = True
    _, delta = _brute(w, c.g, c.a, m, True)
    remove_rows(c, removed, update="correlated")
    torch.testing.assert_close(c.w, w + delta, rtol=1e-9, atol=1e-12)
    assert c.w[removed].eq(0).all()


def test_correlated_column_update_is_the_constrained_least_squares_solution() -> None:
    w, g, a = _layer(4, 6, seed=2)
    c = prepare(w, None, g, a, obs=True)
    removed = torch.tensor([0, 3, 5])
    m = torch.zeros_like(w, dtype=torch.bool)
    m[:, removed] = True
    _, delta = _brute(w, c.g, c.a, m, True)
    remove_cols(c, removed, update="correlated")
    torch.testing.assert_close(c.w, w + delta, rtol=1e-9, atol=1e-12)
    assert c.w[:, removed].eq(0).all()


def test_independent_update_differs_from_the_joint_one_and_is_worse() -> None:
    w, g, a = _layer(6, 4, seed=3)
    removed = torch.tensor([0, 2, 3])

    def loss(update: str) -> float:
        c = prepare(w, None, g, a, obs=True)
        remove_rows(c, removed, update=update)
        d = c.w - w
        return float(0.5 * torch.trace(c.g @ d @ c.a @ d.T))

    assert loss("correlated") < loss("independent") < loss("none")


def test_bias_moves_with_its_row_and_compensates_columns() -> None:
    w, g, a_in = _layer(5, 4, seed=4)
    gen = torch.Generator().manual_seed(9)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    x = torch.cat([torch.randn(200, 4, generator=gen, dtype=torch.float64) + 1, torch.ones(200, 1)], dim=1)
    a = x.T @ x / 200  # inputs with a mean: the constant-1 feature of A is not orthogonal to them
    c = prepare(w, b, g, a, obs=True)
    rows, cols = structure_costs(c, obs=True)
    assert cols.shape == (4,) and rows.shape == (5,)
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[:, 2] = True
    expect, delta = _brute(c.w, c.g, c.a, m, True)
    assert cols[2].item() == pytest.approx(expect.item(), rel=1e-9)
    before = c.w.clone()
    remove_cols(c, torch.tensor([2]), update="correlated")
    torch.testing.assert_close(c.w, before + delta, rtol=1e-9, atol=1e-12)
    assert not torch.equal(c.w[:, 4], before[:, 4])  # the bias took part of the removed input's role
    remove_rows(c, torch.tensor([1]), update="correlated")
    assert c.w[1].eq(0).all()  # the row's bias goes with it


def test_dead_structures_cost_nothing_and_are_left_out_of_the_factors() -> None:
    w, g, a = _layer(5, 4, seed=5)
    w[3] = 0.0
    a[1, :] = 0.0
    a[:, 1] = 0.0  # input 1 is always zero
    c = prepare(w, None, g, a, obs=True)
    assert c.rows.tolist() == [0, 1, 2, 4] and c.cols.tolist() == [0, 2, 3]
    rows, cols = structure_costs(c, obs=True)
    assert rows[3] == 0 and cols[1] == 0 and (rows[[0, 1, 2, 4]] > 0).all()


def test_magnitude_is_identity_curvature_obd() -> None:
    w, _, _ = _layer(5, 4, seed=6)
    c = prepare(w, None, None, None, obs=False)
    rows, cols = structure_costs(c, obs=False)
    torch.testing.assert_close(rows, 0.5 * w.square().sum(1))
    torch.testing.assert_close(cols, 0.5 * w.square().sum(0))
    torch.testing.assert_close(element_costs(c, obs=False), 0.5 * w.square())


def test_element_update_is_each_weights_own_optimum_summed() -> None:
    w, g, a = _layer(4, 4, seed=7)
    c = prepare(w, None, g, a, obs=True)
    m = torch.zeros_like(w, dtype=torch.bool)
    m[1, 2] = True
    _, delta = _brute(w, c.g, c.a, m, True)
    remove_elements(c, m, update="independent")
    torch.testing.assert_close(c.w, w + delta, rtol=1e-9, atol=1e-12)


def _elements(shape: tuple[int, int], cells: list[tuple[int, int]]) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for i, j in cells:
        m[i, j] = True
    return m


@pytest.mark.parametrize("bias", [False, True])
def test_joint_element_update_is_the_constrained_least_squares_solution(bias: bool) -> None:
    w, g, a = _layer(5, 6, seed=8)
    b = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) if bias else None
    a = _spd(7, torch.Generator().manual_seed(4)) if bias else a
    m = _elements((5, 6), [(0, 1), (0, 4), (2, 0), (2, 2), (2, 5), (4, 3)])
    c = prepare(w, b, g, a, obs=True)
    fixed = torch.zeros_like(c.w, dtype=torch.bool)
    fixed[:, :6] = m
    _, delta = _brute(c.w, c.g, c.a, fixed, True)
    expect = c.w + delta
    remove_elements(c, m, update="correlated", max_correlate=100)  # one group: the exact joint solve
    torch.testing.assert_close(c.w, expect, rtol=1e-9, atol=1e-12)
    assert c.w[:, :6][m].eq(0).all()


def test_joint_update_of_one_rows_weights_is_its_own_least_squares_solution() -> None:
    w, g, a = _layer(5, 6, seed=9)
    m = _elements((5, 6), [(3, 0), (3, 2), (3, 5)])
    c = prepare(w, None, g, a, obs=True)
    _, delta = _brute(w, c.g, c.a, m, True)
    remove_elements(c, m, update="correlated", max_correlate=3)
    torch.testing.assert_close(c.w, w + delta, rtol=1e-9, atol=1e-12)
    # the row's own part is −W_r,S ([A⁻¹]_SS)⁻¹ [A⁻¹]_S,: (the other rows move through G⁻¹)
    s = torch.tensor([0, 2, 5])
    ai = c.a_inv
    own = -torch.linalg.solve(ai[s][:, s], w[3, s]) @ ai[s]
    torch.testing.assert_close(c.w[3] - w[3], own, rtol=1e-9, atol=1e-12)


def test_joint_update_beats_the_independent_one_and_groups_respect_the_bound() -> None:
    w, g, a = _layer(6, 8, seed=10)
    gen = torch.Generator().manual_seed(11)
    m = torch.rand(6, 8, generator=gen) < 0.4

    def loss(update: str, bound: int = 2000) -> float:
        c = prepare(w, None, g, a, obs=True)
        remove_elements(c, m, update=update, max_correlate=bound)
        assert c.w[m].eq(0).all()
        d = c.w - w
        return float(0.5 * torch.trace(c.g @ d @ c.a @ d.T))

    exact = _brute(w, prepare(w, None, g, a).g, prepare(w, None, g, a).a, m, True)[0].item()
    assert loss("correlated") == pytest.approx(exact, rel=1e-9)
    assert exact < loss("correlated", 4) < loss("independent") < loss("none")
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    groups = [x.tolist() for x in element_groups(rows, 4)]
    assert groups == [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]]
