"""``CompressionConfig``: when and how much to compress, every setting declared once
(default, help, flag; ``compressm_rl.settings.setting``) and checked when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from compressm_rl.compression.budget import ALLOCATIONS
from compressm_rl.settings import check_types, setting

PARTS = ("actor", "critic")
GRAMIANS = ("white", "data")
MODE_SCALES = ("balanced", "trained")


@dataclass
class CompressionConfig:
    """When and how much to reduce: by energy (``tol``, per layer) or to a state budget
    (``budget``, per part); neither disables compression.

    Every value is checked when the config is built (``ValueError`` naming the field,
    the value and the valid range).
    """

    tol: float | None = setting(
        None,
        "compress in training: drop this fraction of each layer's Hankel singular value sum, "
        "in (0, 1); not with --compress-to",
        flag="--compress-tol",
    )
    # The last event of a budget is held to it: its guards are measured, not obeyed.
    budget: int | None = setting(
        None,
        "compress in training to a state budget instead: this many complex states per part "
        "(actor, critic) over all its layers after the last reduction",
        flag="--compress-to",
    )
    # "global" is LAST's idea on balanced coordinates.
    allocation: str = setting(
        "global",
        "with a budget: rank states across a part's layers by 2σ/‖G‖∞ (global) or give each "
        "layer an equal share (uniform)",
        flag="--compress-allocation",
        choices=ALLOCATIONS,
    )
    # Early: the action KL of a cut grows as the policy's σ shrinks (Hopper-v5, τ = 0.15:
    # KL 0.04 at 6% of training, 0.2-0.3 at 15-20%), and the small model trains for longer.
    at: list[float] = setting(
        [0.02, 0.04, 0.06, 0.08],
        "reduction points, as fractions of the total steps",
        flag="--compress-at",
    )
    min_state: int = setting(4, "floor on complex states per layer", flag="--min-state")
    max_output_error: float = setting(
        0.5,
        "guard: a layer's cut is skipped above this relative output error on the rollout's "
        "recorded inputs",
        flag="--compress-max-output-error",
    )
    max_kl: float = setting(
        0.1,
        "guard: the actor's cuts are halved (up to 3 times), then rolled back, above this "
        "KL(full ‖ reduced) of the actions, mean over the rollout",
        flag="--compress-max-kl",
    )
    max_cond: float = setting(
        1e3,
        "guard: a layer is skipped above this condition number of its re-diagonalisation",
        flag="--compress-max-cond",
    )
    # Real modes would sit at a zero-gradient saddle, half their state unused.
    pair_real: float = setting(
        0.25,
        "hold two real modes in one state where that costs at most this fraction of the "
        "cut's error bound (0: never)",
        flag="--compress-pair-real",
    )
    # The actor is what gets deployed; the critic only speeds up training.
    parts: list[str] = setting(
        list(PARTS), "what to compress: actor,critic, or actor alone", flag="--compress-parts"
    )
    gramian: str = setting(
        "white",
        "Hankel singular values to cut on: white-noise Gramians (white) or weighted by each "
        "layer's recorded inputs (data, Enns)",
        flag="--compress-gramian",
        choices=GRAMIANS,
    )
    # The actor's KL guard then judges the healed cut.
    heal_steps: int = setting(
        0,
        "cut-and-heal: Adam steps distilling the cut actor toward the full one on the last "
        "rollout (0: none)",
        flag="--heal-steps",
    )
    heal_lr: float = setting(1e-3, "cut-and-heal: the distillation's Adam lr", flag="--heal-lr")
    # An exact similarity: the function is the same (``parameter_split``).
    mode_scale: str = setting(
        "balanced",
        "how each reduced mode's gain is split between its B and C parameters: as balanced "
        "coordinates leave it (balanced) or at the full layer's median trained split (trained)",
        flag="--compress-mode-scale",
        choices=MODE_SCALES,
    )
    # At 1.4 no measurable gain, in balanced or trained coordinates (Hopper-v5-P, 6 seeds,
    # docs/design.md §7).
    lr_scale: float = setting(
        1.0,
        "the lr times this once the actor is cut (1: unchanged; not with ppo desired_kl)",
        flag="--compress-lr-scale",
    )

    def __post_init__(self) -> None:
        check_types(self, "compression ")

        def bad(name: str, value, valid: str) -> ValueError:
            return ValueError(f"compression {name} = {value!r} is out of range: {valid}")

        if self.tol is not None and not 0.0 < self.tol < 1.0:
            raise bad("tol", self.tol, "a fraction of the HSV sum in (0, 1), e.g. 0.1")
        if self.tol is not None and self.budget is not None:
            raise ValueError(
                f"compression tol = {self.tol} and budget = {self.budget} are both set: "
                "give one (tol: cut each layer by energy; budget: states to end with)"
            )
        if self.budget is not None and self.budget < 1:
            raise bad("budget", self.budget, "complex states per part, at least 1")
        if self.allocation not in ALLOCATIONS:
            raise bad("allocation", self.allocation, "'global' or 'uniform'")
        if self.allocation != "global" and self.budget is None:
            raise ValueError(
                f"compression allocation = {self.allocation!r} needs a budget (--compress-to): "
                "it says how a state budget is shared among layers"
            )
        if self.heal_steps < 0:
            raise bad("heal_steps", self.heal_steps, "0 (no healing) or more Adam steps")
        if not self.heal_lr > 0.0:
            raise bad("heal_lr", self.heal_lr, "a positive learning rate")
        if not 0.0 < self.lr_scale < 100.0:
            raise bad("lr_scale", self.lr_scale, "a multiplier of the lr in (0, 100), e.g. 1.4")
        if not self.at or any(not 0.0 <= f < 1.0 for f in self.at):
            raise bad("at", self.at, "fractions of total steps in [0, 1), e.g. 0.02,0.04")
        if self.min_state < 1:
            raise bad("min_state", self.min_state, "at least 1 complex state per layer")
        for name in ("max_output_error", "max_kl", "max_cond"):
            if not getattr(self, name) > 0.0:
                raise bad(name, getattr(self, name), "a positive number")
        if not self.pair_real >= 0.0:
            raise bad("pair_real", self.pair_real, "0 (never pair real modes) or more")
        if not self.parts or not set(self.parts) <= set(PARTS):
            raise bad("parts", self.parts, "'actor', 'critic' or both (actor,critic)")
        if self.gramian not in GRAMIANS:
            raise bad("gramian", self.gramian, "'white' (white-noise HSVs) or 'data'")
        if self.mode_scale not in MODE_SCALES:
            raise bad("mode_scale", self.mode_scale, "'balanced' or 'trained'")
        if self.heal_steps and "actor" not in self.parts:
            raise ValueError(
                f"compression heal_steps = {self.heal_steps} heals the actor, but parts = "
                f"{self.parts}; add actor to parts or drop heal_steps"
            )

    @classmethod
    def from_dict(cls, data: dict) -> CompressionConfig:
        unknown = set(data) - set(asdict(cls()))
        if unknown:
            raise ValueError(
                f"unknown compression setting(s) {sorted(unknown)}; known: {sorted(asdict(cls()))}"
            )
        return cls(**data)

    @property
    def enabled(self) -> bool:
        return self.tol is not None or self.budget is not None
