"""Constrained RLHF: bounds on per-episode quantities held by Lagrange multipliers (``--constraint "kl<=6"``).

Moskovitz et al. (2024, "Confronting Reward Model Overoptimization with Constrained RLHF") keep each quantity at its
bound with a multiplier λ ≥ 0 that acts as a dynamic weight: the reward of an episode becomes

    r - β·KL - Σ_i λ_i · s_i · (g_i - c_i) / u_i

for constraints ``g_i <= c_i`` (``s_i = +1``) or ``g_i >= c_i`` (``s_i = -1``). Each rollout, every λ takes a
projected dual-ascent step, ``λ_i ← max(0, λ_i + η · (s_i · (mean g_i - c_i) + z · se_i) / u_i)``, on the episodes
that ended in it, *before* those episodes are charged: λ grows while its bound is broken and shrinks to 0 once it holds
with room to spare, and a rollout that breaks a bound pays for it in the update it feeds rather than one rollout later
(measured: stepping after the charge, at η = 0.05, let positive-review's KL rise from 6.4 to 7.8 nats over the last
rollout of a default run while λ was 0.019). The step on the current violation is the proportional term of Stooke et
al.'s PID Lagrangian (2020), with the integral's gain: the sum of the steps. ``se_i`` is the standard error of the
rollout's mean (the episodes' spread over √n): the step reads the mean ``z`` standard errors toward breaking the
bound, so λ rises while the bound is *probably* broken, not only when one noisy rollout shows it. Measured
(benchmarks/results/constrained.md, ``z = 0``): a default positive-review rollout's KL mean moved by 1-1.5 nats
between rollouts and against the final policy measured on held-out prompts, against a bound of 6; its KL reached the
bound only in the last rollouts, while λ was still 0, and the final policy broke it on one seed of three.
``u_i`` puts every quantity on the reward's scale (rewards are normalised to the base model's spread): for ``kl`` it
is one nat, so that λ adds to β per nat and enters each token's reward as the KL penalty does; for the others it is
measured once, on the first episodes of training (the policy is still the model it starts from), and fixed: the larger
of the quantity's winsorised spread and the distance of its mean from the bound, so that a violation of one typical
difference between episodes (or of the whole way from the start to the bound) weighs one unit of reward spread. The
charges enter the rollout's rewards with the KL penalty (:class:`agents.kl.KLPenalty`, which owns an instance of
:class:`Lagrangian`), before the advantages are computed, so every on-policy algorithm runs the constrained objective
unchanged.

A KL budget three ways: ``--beta`` fixes the price of a nat (the KL lands where it lands); ``--target-kl`` steers β
toward a KL with a proportional controller (the KL is where it is aimed, on average, with no guarantee); ``--constraint
"kl<=X"`` pays nothing while the KL is under X and raises its price only as long as the bound is broken (the
constrained form: the reward is maximised within the budget).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.kl import RewardScale

__all__ = [
    "DUAL_STEP", "MARGIN_SE", "QUANTITIES", "Constraint", "Lagrangian", "episode_quantities", "parse_constraints",
]  # fmt: skip

DUAL_STEP = 0.2
"""The default dual step η: tuned once on positive-review's seed 0 (``benchmarks/constrained.py``; training episodes
only, the best last-rollout reward among the steps that held ``kl<=6``): of 0.05, 0.2 and 0.5 with the margin, 0.5
swung λ to 4.5 and broke the bound, 0.05 held it with less gold (benchmarks/results/constrained.md)."""
MARGIN_SE = 1.0
"""The default ``z``: standard errors of a rollout's mean by which the dual step reads it toward breaking a bound."""

QUANTITIES: dict[str, str] = {
    "kl": "nats per completion (log π − log π_ref summed over its tokens)",
    "length": "tokens per completion",
    "distinct2": "distinct bigrams over bigrams of the completion's tokens (1: no bigram repeats)",
    "ref_logprob": "mean log-prob per token under the reference model (fluency)",
}
"""The per-episode quantities a constraint may bound, and their units."""

_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_RANGES: dict[str, tuple[float, float]] = {  # the values each quantity can take: a bound outside can never hold
    "kl": (0.0, np.inf),
    "length": (1.0, np.inf),
    "distinct2": (0.0, 1.0),
    "ref_logprob": (-np.inf, 0.0),
}


@dataclass(frozen=True)
class Constraint:
    """``name <= bound`` or ``name >= bound`` on the mean of a per-episode quantity (:data:`QUANTITIES`)."""

    name: str
    sense: str  # "<=" or ">="
    bound: float

    @property
    def sign(self) -> float:
        """+1 for an upper bound, -1 for a lower one: ``sign * (value - bound)`` is the violation."""
        return 1.0 if self.sense == "<=" else -1.0

    def violation(self, value: float | np.ndarray) -> float | np.ndarray:
        """How far ``value`` breaks the bound (positive: broken; negative: room to spare)."""
        return self.sign * (value - self.bound)

    def __str__(self) -> str:
        return f"{self.name}{self.sense}{self.bound:g}"

    @classmethod
    def read(cls, spec: str) -> Constraint | None:
        """``"kl<=6"`` as written, whatever its name (``None``: not ``NAME<=X`` or ``NAME>=X``): how a logged key such
        as ``constraint/kl<=6/mean`` is read back; :func:`parse_constraints` also checks the name and the bound."""
        match = _SPEC.match(spec)
        return None if match is None else cls(match[1], match[2], float(match[3]))


def parse_constraints(
    specs: Sequence[str], max_new_tokens: int | None = None, components: Sequence[str] = ()
) -> list[Constraint]:
    """``["kl<=6", "distinct2>=0.85"]`` -> constraints, or a one-line ``ValueError`` saying what is wrong and what is
    allowed: an unknown name, a missing number, another operator, contradictory or repeated bounds on one name, a
    bound no completion can meet (a negative KL, distinct2 above 1, a length above ``max_new_tokens``).

    :param components: the names of a composite reward's components (``--reward``), which may be bounded too.
    """
    parsed: list[Constraint] = []
    names = (*QUANTITIES, *components)
    allowed = ", ".join(names)
    for spec in specs:
        constraint = Constraint.read(spec)
        if constraint is None:
            name = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", spec)
            if name is not None and name.group(1) not in names:
                raise ValueError(f"constraint {spec!r}: unknown quantity {name.group(1)!r}; allowed: {allowed}")
            raise ValueError(f"constraint {spec!r} is not NAME<=NUMBER or NAME>=NUMBER (NAME one of {allowed})")
        name, sense = constraint.name, constraint.sense
        if name not in names:
            raise ValueError(f"constraint {spec!r}: unknown quantity {name!r}; allowed: {allowed}")
        low, high = _RANGES.get(name, (-np.inf, np.inf))
        if name == "length" and max_new_tokens is not None:
            high = float(max_new_tokens)
        if (sense == "<=" and constraint.bound < low) or (sense == ">=" and constraint.bound > high):
            raise ValueError(f"constraint {spec!r} cannot hold: {name} lies in [{low:g}, {high:g}]")
        for other in parsed:
            if other.name != name:
                continue
            if other.sense == sense:
                raise ValueError(f"constraints {str(other)!r} and {spec!r} bound {name} twice from the same side")
            upper, lower = (constraint, other) if sense == "<=" else (other, constraint)
            if lower.bound > upper.bound:
                raise ValueError(f"constraints {str(other)!r} and {spec!r} contradict: no {name} meets both")
        parsed.append(constraint)
    return parsed


def episode_quantities(kl: np.ndarray, ref_log_prob: np.ndarray, tokens: Sequence[int]) -> dict[str, float]:
    """Every quantity of :data:`QUANTITIES` for one finished episode from its per-token KL and reference log-probs and
    its generated token ids."""
    bigrams = list(itertools.pairwise(tokens))
    return {
        "kl": float(np.sum(kl)),
        "length": float(len(tokens)),
        "distinct2": len(set(bigrams)) / len(bigrams) if bigrams else 1.0,
        "ref_logprob": float(np.mean(ref_log_prob)) if len(tokens) else 0.0,
    }


class Lagrangian:
    """One multiplier λ ≥ 0 per constraint, charged in a rollout's rewards and updated by projected dual ascent.

    :param constraints: from :func:`parse_constraints`.
    :param lr: the dual step η per rollout, per unit of violation (one nat of KL; one base spread of the others); 0
        holds every λ at ``initial``: fixed weights, the penalty form that the multipliers are measured against.
    :param initial: every λ's starting value.
    :param margin_se: ``z``, the standard errors of the rollout's mean by which the step reads it toward breaking each
        bound (0: the plain mean).
    """

    def __init__(
        self,
        constraints: Sequence[Constraint],
        lr: float = DUAL_STEP,
        initial: float = 0.0,
        margin_se: float = MARGIN_SE,
    ) -> None:
        if not lr >= 0 or not initial >= 0 or not margin_se >= 0:
            raise ValueError(
                f"the dual step, the initial multiplier and the margin must be >= 0; got {lr}, {initial}, {margin_se}"
            )
        self.constraints = list(constraints)
        self.lr, self.margin_se = lr, margin_se
        self.lambdas = np.full(len(self.constraints), float(initial))
        self.units: np.ndarray | None = None  # u_i, measured on the first episodes that end
        self._logged: dict[str, float] | None = None  # the last dual step's, until taken
        self.history: list[dict[str, float]] = []  # per rollout: each quantity's mean and λ, for reports and plots
        self._kl = np.array([c.name == "kl" for c in self.constraints], dtype=bool)
        self.start(0)

    def start(self, n_envs: int) -> None:
        """Forget episodes in flight (a new or resumed run starts them again)."""
        self._episode: list[dict[str, list[Any]]] = [{"kl": [], "ref": [], "tokens": []} for _ in range(n_envs)]

    @property
    def kl_price(self) -> float:
        """What the KL constraints add to β, per nat and token (an upper bound's λ adds, a lower bound's takes away)."""
        signs = np.array([c.sign for c in self.constraints])
        return float((self.lambdas * signs)[self._kl].sum())

    def charge(
        self,
        rewards: np.ndarray,
        kl: np.ndarray,
        ref_log_prob: np.ndarray,
        actions: np.ndarray,
        dones: np.ndarray,
        components: Sequence[dict[int, dict[str, float]]] = (),
    ) -> None:
        """Subtract each constraint's charge from a rollout's ``rewards`` ``(n_steps, n_envs)`` in place: ``λ·KL`` per
        token for ``kl`` (beside β), and at the step where an episode ends ``λ·s·(g - c)/u`` for the others (and
        ``-λ·s·c`` for ``kl``, so that an episode pays ``λ·s·(KL - c)`` in all).

        :param components: per step, the composite reward's component scores of each env whose episode ended there.
        """
        finished: list[tuple[int, int, dict[str, float]]] = []
        for t in range(rewards.shape[0]):
            for i, episode in enumerate(self._episode):
                episode["kl"].append(float(kl[t, i]))
                episode["ref"].append(float(ref_log_prob[t, i]))
                episode["tokens"].append(int(actions[t, i]))
                if dones[t, i]:
                    values = episode_quantities(np.array(episode["kl"]), np.array(episode["ref"]), episode["tokens"])
                    if t < len(components):
                        values.update(components[t].get(i, {}))
                    finished.append((t, i, values))
                    self._episode[i] = {"kl": [], "ref": [], "tokens": []}
        charges = self.end_episodes([values for _, _, values in finished])  # steps λ first
        rewards -= (self.kl_price * kl).astype(rewards.dtype)
        for (t, i, _), charge in zip(finished, charges, strict=True):
            rewards[t, i] -= charge

    def end_episodes(self, episodes: Sequence[dict[str, float]]) -> list[float]:
        """The dual step on the mean of episodes that ended in a rollout, then each one's charge at its last step under
        the stepped λ: ``λ·s·(g - c)/u`` summed over the constraints (``-λ·s·c`` for ``kl``, whose per-token part is
        :attr:`kl_price`, to read after this call). The units are measured on the first episodes that end. The RLlib
        Learner's connector calls it with the episodes the EnvRunners measured."""
        if not episodes:
            return []
        if self.units is None:
            self.units = self._measure_units(list(episodes))
        self._step(episodes)
        charges = []
        for values in episodes:
            charge = 0.0
            for c, lam, unit, is_kl in zip(self.constraints, self.lambdas, self.units, self._kl, strict=True):
                charge += lam * (c.sign * -c.bound if is_kl else c.violation(values[c.name]) / unit)
            charges.append(float(charge))
        return charges

    def _measure_units(self, episodes: list[dict[str, float]]) -> np.ndarray:
        """u_i: 1 for ``kl``; for each other quantity the larger of its winsorised spread (5 % each side) over
        ``episodes`` and the distance of their mean from the bound, so that neither a quantity every base episode
        shares (a length at its limit: no spread) nor a bound far from the start blows the charges up."""
        units = np.ones(len(self.constraints))
        for i, c in enumerate(self.constraints):
            if c.name == "kl":
                continue
            values = [e[c.name] for e in episodes]
            distance = abs(float(np.mean(values)) - c.bound)
            spread = RewardScale(min_std=1e-6).spread(values) if len(values) >= 2 else 0.0
            units[i] = max(spread, distance, 1e-6)
        return units

    def _step(self, episodes: Sequence[dict[str, float]]) -> None:
        assert self.units is not None
        logged: dict[str, float] = {}
        for i, c in enumerate(self.constraints):
            values = np.array([e[c.name] for e in episodes], dtype=np.float64)
            mean = float(values.mean())
            se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
            step = self.lr * (c.violation(mean) + self.margin_se * se) / self.units[i]
            self.lambdas[i] = max(0.0, self.lambdas[i] + step)
            logged[f"{c}/mean"], logged[f"{c}/lambda"] = mean, float(self.lambdas[i])
            logged[f"{c}/violated"] = float(c.violation(mean) > 0)
        self.history.append(logged)
        self._logged = logged

    def take_logged(self) -> dict[str, float] | None:
        """What the last dual step logged (each mean and λ), once (``None``: no episode ended since the last call)."""
        logged, self._logged = self._logged, None
        return logged

    def summary(self, held_out: Sequence[dict[str, float]] = ()) -> dict[str, dict[str, float]]:
        """Per constraint: its bound, the last rollout's mean and λ, the share of rollouts in the second half of
        training whose mean broke the bound, and the final policy's mean over ``held_out`` episodes (their
        :func:`episode_quantities`; NaN without): the policy the run ends with, measured afresh, where the last
        rollout measured the policy before the last update."""
        out: dict[str, dict[str, float]] = {}
        for i, c in enumerate(self.constraints):
            rows = [h for h in self.history if f"{c}/mean" in h]
            second = rows[len(rows) // 2 :]
            measured = [e[c.name] for e in held_out if c.name in e]
            out[str(c)] = {
                "bound": c.bound,
                "held_out_mean": float(np.mean(measured)) if measured else float("nan"),
                "final_mean": rows[-1][f"{c}/mean"] if rows else float("nan"),
                "final_lambda": float(self.lambdas[i]),
                "violated_share_second_half": float(np.mean([r[f"{c}/violated"] for r in second])) if second else 0.0,
            }
        return out

    def state(self) -> dict[str, Any]:
        """λ, the units and the history, to save with a run (a resumed run goes on with the same multipliers)."""
        return {
            "constraints": [str(c) for c in self.constraints],
            "lambdas": self.lambdas.tolist(),
            "units": None if self.units is None else self.units.tolist(),
            "history": self.history,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state["constraints"] != [str(c) for c in self.constraints]:
            raise ValueError(f"the checkpoint's constraints {state['constraints']} are not this run's")
        self.lambdas = np.array(state["lambdas"], dtype=np.float64)
        self.units = None if state["units"] is None else np.array(state["units"], dtype=np.float64)
        self.history = list(state["history"])
