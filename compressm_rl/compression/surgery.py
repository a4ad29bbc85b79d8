"""Surgery on a training run when its layers are reduced (step 4 of
``compression.pipeline``): the envs' carried recurrent state mapped into the reduced
coordinates (``map_carried_state``), and the optimiser following the replaced parameters
(``follow_parameters``)."""

from __future__ import annotations

import torch

from compressm_rl.compression.config import PARTS
from compressm_rl.compression.events import LayerRef
from compressm_rl.compression.lti import ReductionResult
from policies.actor_critic import ActorCritic, RecurrentState
from policies.lru import LRUStack


@torch.no_grad()
def map_carried_state(
    policy: ActorCritic, carried: RecurrentState, accepted: dict[LayerRef, ReductionResult]
) -> RecurrentState:
    """``carried`` (flat ``[B, S]`` per part) in the reduced layers' coordinates; the
    policy must still have its old sizes (call before ``load_system``)."""
    mapped = {}
    for part in PARTS:
        state = getattr(carried, part)
        maps = {ref.index: r for ref, r in accepted.items() if ref.part == part}
        if maps:
            stack = getattr(policy, part)
            layers = stack.split_state(state)
            for i, result in maps.items():
                z = result.map_state(layers[i].to(torch.complex128).numpy())
                layers[i] = torch.as_tensor(z, dtype=torch.complex64)
            state = LRUStack.join_state(layers)
        mapped[part] = state
    return RecurrentState(**mapped)


def follow_parameters(
    optimizer: torch.optim.Optimizer, replaced: dict[torch.nn.Parameter, torch.nn.Parameter]
) -> None:
    """Put each new parameter in its old one's place in ``optimizer`` (same param group)
    with no optimiser state, so Adam starts it afresh: moments *and* step count.

    The old modes do not map onto the new ones, so the moments cannot carry over; and a
    step count kept beside zeroed moments breaks Adam's bias correction (v̂ = v / (1 − β₂ᵗ)
    then under-corrects the fresh v: the first updates came out 0.7·lr after 60 steps and
    1.8·lr after 400, against lr for a fresh start).
    """
    for old, new in replaced.items():
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        optimizer.state.pop(old, None)
