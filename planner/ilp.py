"""The intra-op ILP, built the autoparallel way and solved with HiGHS.

Math (Alpa §4 with follower merging already applied by ``planner.intra_op``):

    groups g (merged nodes) with K_g strategies; binary s_g[k]
    edge families f = (value, producer group u, consumer group v); spec keys
        a(k) = the spec group u's strategy k gives the value,
        b(k) = the spec group v's strategy k wants it in;
    continuous e_f[a, b] in [0, 1] over the distinct (a, b) pairs, cost r_f[a, b]

    min   sum_g sum_k s_g[k] (compute + comm + internal resharding)_g[k]
        + sum_f sum_ab e_f[a, b] r_f[a, b]
    s.t.  (unique)    sum_k s_g[k] = 1                              for every g
          (edge_src)  sum_b e_f[a, b] = sum_{k: a(k)=a} s_u[k]       for every f, a
          (edge_dst)  sum_a e_f[a, b] = sum_{k: b(k)=b} s_v[k]       for every f, b
          (memory)    sum_g sum_k s_g[k] m_g,t[k] <= M - const_t    for every heavy step t

With s binary the edge rows are a transportation polytope with one unit of supply and one of
demand, so e is integral without being declared so; indexing e by distinct specs instead of
strategy pairs keeps it small (Alpa's e_ij is K_u x K_v). Groups with one strategy and edges
with a single-strategy end never reach here (they are constants folded into costs).

Every row and column has a readable name; the cost of each column is kept split into
compute / comm / resharding so a solution can be explained and audited.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import highspy
import numpy as np

# HiGHS's tolerances are absolute (1e-7 on reduced costs, 1e-6 on the MIP gap): costs in
# seconds would sit below them, so the solver sees microseconds and only a relative gap.
OBJECTIVE_SCALE = 1e6
MIP_REL_GAP = 1e-4


@dataclass
class Column:
    name: str
    compute: float = 0.0
    comm: float = 0.0
    reshard: float = 0.0
    integer: bool = True

    @property
    def cost(self) -> float:
        return self.compute + self.comm + self.reshard


@dataclass
class Row:
    name: str
    index: list[int]
    value: list[float]
    lower: float
    upper: float


@dataclass(frozen=True)
class IlpStats:
    """What the solve reports (``lp_bound`` is HiGHS's final dual bound)."""

    status: str
    objective: float
    lp_bound: float
    mip_gap: float
    solve_seconds: float
    num_vars: int
    num_int_vars: int
    num_constraints: int


@dataclass
class Ilp:
    """Columns and named rows; one ``add_*`` method per constraint family."""

    columns: list[Column] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    constant: float = 0.0

    def add_column(self, column: Column) -> int:
        self.columns.append(column)
        return len(self.columns) - 1

    def add_unique_choice(self, group: str, cols: list[int]) -> None:
        """(unique) exactly one strategy per group."""
        self.rows.append(Row(f"unique[{group}]", cols, [1.0] * len(cols), 1.0, 1.0))

    def add_edge_marginal(self, name: str, edge_cols: list[int], node_cols: list[int]) -> None:
        """(edge_src / edge_dst) an edge key's flow equals the choice of the strategies
        that give (or want) that spec."""
        self.rows.append(
            Row(
                name,
                edge_cols + node_cols,
                [1.0] * len(edge_cols) + [-1.0] * len(node_cols),
                0.0,
                0.0,
            )
        )

    def add_memory_budget(
        self, name: str, cols: list[int], bytes_: list[float], budget: float
    ) -> None:
        """(memory) live bytes at one heavy-op step stay within the per-device budget."""
        self.rows.append(Row(name, cols, bytes_, -highspy.kHighsInf, budget))

    def solve(self, time_limit: float | None = None) -> tuple[np.ndarray, IlpStats]:
        """Solve deterministically (one thread, fixed seed); best solution found on timeout."""
        with _silenced():
            h = highspy.Highs()
            h.setOptionValue("output_flag", False)
            h.setOptionValue("threads", 1)
            h.setOptionValue("random_seed", 0)
            h.setOptionValue("mip_rel_gap", MIP_REL_GAP)
            h.setOptionValue("mip_abs_gap", 0.0)
            if time_limit is not None:
                h.setOptionValue("time_limit", float(time_limit))
            h.passModel(self._lp())
            start = time.perf_counter()
            h.run()
            elapsed = time.perf_counter() - start
        status = h.modelStatusToString(h.getModelStatus())
        info = h.getInfo()
        if not self.columns:
            x = np.zeros(0)
        elif info.primal_solution_status == 0:
            raise RuntimeError(f"intra-op ILP has no solution ({status})")
        else:
            x = np.asarray(h.getSolution().col_value)
        objective = float(np.dot(x, [c.cost for c in self.columns])) + self.constant
        dual = info.mip_dual_bound / OBJECTIVE_SCALE
        bound = dual + self.constant if np.isfinite(dual) else objective
        stats = IlpStats(
            status,
            objective,
            bound,
            max(0.0, float(info.mip_gap)),
            elapsed,
            len(self.columns),
            sum(c.integer for c in self.columns),
            len(self.rows),
        )
        return x, stats

    def _lp(self) -> highspy.HighsLp:
        lp = highspy.HighsLp()
        n = len(self.columns)
        lp.num_col_ = n
        lp.num_row_ = len(self.rows)
        lp.col_cost_ = np.array([c.cost for c in self.columns], dtype=np.float64) * OBJECTIVE_SCALE
        lp.col_lower_ = np.zeros(n)
        lp.col_upper_ = np.ones(n)
        lp.col_names_ = [c.name for c in self.columns]
        lp.row_names_ = [r.name for r in self.rows]
        lp.row_lower_ = np.array([r.lower for r in self.rows], dtype=np.float64)
        lp.row_upper_ = np.array([r.upper for r in self.rows], dtype=np.float64)
        lp.integrality_ = [
            highspy.HighsVarType.kInteger if c.integer else highspy.HighsVarType.kContinuous
            for c in self.columns
        ]
        starts, index, value = [0], [], []
        for r in self.rows:
            index.extend(r.index)
            value.extend(r.value)
            starts.append(len(index))
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.num_col_ = n
        lp.a_matrix_.num_row_ = len(self.rows)
        lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
        lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
        lp.a_matrix_.value_ = np.array(value, dtype=np.float64)
        return lp


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """HiGHS prints a banner from C++ on construction; keep CLI output clean."""
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
