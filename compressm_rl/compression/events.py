"""What compression acts on and what it reports: ``LayerRef`` names one LRU layer of an
actor-critic (``lru_layers`` lists them), ``ReductionEvent`` records what one reduction
point did to one layer (a record of ``compression.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from compressm_rl.compression.config import PARTS
from compressm_rl.compression.lti import ReductionResult
from policies.actor_critic import ActorCritic
from policies.lru import LRU, LRUStack


@dataclass(frozen=True)
class LayerRef:
    """One LRU layer of an actor-critic: ``part`` ("actor" or "critic"), block ``index``."""

    part: str
    index: int

    def __str__(self) -> str:
        return f"{self.part}.{self.index}"

    def of(self, policy: ActorCritic) -> LRU:
        """The layer in ``policy``."""
        return getattr(policy, self.part).blocks[self.index].lru


def lru_layers(policy: ActorCritic, parts: list[str] | tuple[str, ...] = PARTS) -> list[LayerRef]:
    """Every LRU layer of the given parts, actor first (none for an MLP policy)."""
    return [
        LayerRef(part, index)
        for part in parts
        if isinstance(getattr(policy, part), LRUStack)
        for index in range(len(getattr(policy, part).blocks))
    ]


@dataclass(frozen=True)
class ReductionEvent:
    """What happened to one layer at one reduction point (a ``compression.json`` record).

    ``status`` starts with "applied", "skipped" or "rolled back" and says why: "skipped"
    where the plan accepted no cut (none worth making or possible, or its output error
    over ``max_output_error``), "rolled back" where the actor's KL guard withdrew a cut the
    plan had accepted. Neither changes the layer (``n_after == n_before``).
    ``bound`` is the H∞ error bound of the cut (``ReductionResult.bound``), ``cond_v`` the
    condition number of its re-diagonalisation, ``n_clamped`` the modes moved to the
    largest radius an LRU holds and ``n_paired`` the states holding two real modes (None
    where no cut was computed). ``gramian`` is the HSVs the cut used ("white", or "data":
    weighted by the recorded inputs' covariance); ``hinf_norm`` the full layer's H∞ norm
    with the same weighting, so that ``relative_bound`` reads in the units of
    ``output_error``. ``target`` is the part's state count the event aimed at (budget
    mode). ``output_error`` is None where no guard ran, ``kl`` None outside the actor's KL
    guard, ``kl_healed`` None without cut-and-heal (where it is not below ``kl`` the
    healing was not applied); ``step`` and the returns around the
    event are filled in by the runner.
    """

    layer: LayerRef
    n_before: int
    n_after: int
    status: str
    hsv: tuple[float, ...] = ()
    rank: int | None = None  # real states the cut keeps (2·n_after less real modes)
    bound: float = 0.0
    cond_v: float | None = None
    n_clamped: int | None = None
    n_paired: int | None = None
    gramian: str = "white"
    hinf_norm: float | None = None  # the full layer's ‖G‖_∞, weighted as ``bound`` is
    target: int | None = None  # with a budget: the part's states this event aims at
    output_error: float | None = None
    kl: float | None = None
    kl_healed: float | None = None  # KL after the cut-and-heal distillation
    step: int | None = None
    return_before: float | None = None
    return_after: float | None = None
    post_training: bool = False  # a finished run's (``compressm_rl.posthoc``)

    @property
    def applied(self) -> bool:
        return self.status.startswith("applied")

    @property
    def relative_bound(self) -> float | None:
        """``bound / ‖G‖_∞``: the worst-case relative error, in the output error's units."""
        if not self.hinf_norm:
            return None
        return self.bound / self.hinf_norm

    def with_cut(self, result: ReductionResult, applied: bool = True) -> ReductionEvent:
        """This event with ``result``'s cut described (``n_after`` its size if ``applied``)."""
        return replace(
            self,
            n_after=result.state_dim if applied else self.n_before,
            hsv=tuple(result.hsv.tolist()),
            rank=result.rank,
            bound=float(result.bound),
            cond_v=result.cond_V,
            n_clamped=result.n_clamped,
            n_paired=result.n_paired,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "layer": str(self.layer), "hsv": list(self.hsv)}

    @classmethod
    def from_dict(cls, data: dict) -> ReductionEvent:
        part, index = data["layer"].split(".")
        return cls(**{**data, "layer": LayerRef(part, int(index)), "hsv": tuple(data["hsv"])})
