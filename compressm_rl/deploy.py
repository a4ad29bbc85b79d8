"""Deployment of a trained run: export to ONNX or to C, each with a closed-loop parity
check, and the torch latency row that ``compressm-rl bench --run`` sets beside the others."""

from __future__ import annotations

from pathlib import Path

import torch

from compressm_rl.runs import TorchController, load_policy
from compressm_rl.runs.files import atomic_write, atomic_write_dir
from envs import make_env
from export.bench import bench_callable
from export.onnx_export import DEFAULT_OPSET, PRODUCER, build_model
from export.parity import ParityError, check_parity
from policies.actor_critic import ActorCritic

DEFAULT_PARITY_STEPS = 500


def export_run(
    run_dir: Path,
    out: Path,
    opset: int = DEFAULT_OPSET,
    parity_steps: int = DEFAULT_PARITY_STEPS,
    parity_batch: int = 1,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    keep_failed: bool = False,
    overwrite: bool = False,
) -> tuple[ActorCritic, dict, dict | None]:
    """Export ``run_dir``'s actor to ``out`` and check it in closed loop, step by step
    against a float64 copy of the policy (``export.parity.check_parity``).

    An existing ``out`` is replaced only if it is a previous export of this tool, or with
    ``overwrite``; anything else there raises ValueError before any work.

    Returns the policy, the run's metadata and the parity report (None when
    ``parity_steps`` is 0). Raises ``ParityError`` when the export is out of tolerance;
    ``out`` is then left as it was, unless ``keep_failed`` puts the failed file there.
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give the .onnx file to write")
    if out.exists() and not overwrite and not is_onnx_export(out):
        raise ValueError(
            f"{out} exists and is not an ONNX export of this tool; choose another --out, or "
            "pass --overwrite to replace it"
        )
    policy, meta = load_policy(run_dir)
    model = build_model(policy, meta["env_id"], meta["global_step"], opset=opset)
    out.parent.mkdir(parents=True, exist_ok=True)
    reports: list[dict] = []
    failed: list[ParityError] = []

    parity = dict(steps=parity_steps, batch=parity_batch, seed=seed, rtol=rtol, atol=atol)

    def check(tmp: Path) -> None:  # on the complete file, before it takes out's place
        try:
            reports.append(check_parity(policy, tmp, meta["env_id"], make_env=make_env, **parity))
        except ParityError as err:
            if not keep_failed:
                raise  # out is left as it was
            failed.append(err)

    # A file at `out` is always a checked export; a failed re-export keeps the previous one.
    verify = check if parity_steps > 0 else None
    atomic_write(out, lambda f: f.write(model.SerializeToString()), verify)
    if failed:
        raise failed[0]
    report = reports[0] if reports else None
    return policy, meta, report


def is_onnx_export(path: Path) -> bool:
    """Whether ``path`` is an ONNX model written by this tool (its producer name)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # onnx raises several types for a file that is not a model
        return False
    return model.producer_name == PRODUCER


def export_c_run(
    run_dir: Path,
    out: Path,
    parity_steps: int = DEFAULT_PARITY_STEPS,
    parity_batch: int = 1,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> tuple[ActorCritic, dict, dict | None]:
    """Export ``run_dir``'s actor as C sources into the directory ``out``, checked.

    The ONNX step graph is built on its elementwise path (fewest multiply-adds: the
    fastest in C, docs/design.md §8) and written beside the C as ``policy.onnx``, the file
    the C was generated from. The C is compiled (``-Wall -Wextra -Werror``) and checked in
    closed loop against the float64 reference like an ONNX export. ``out`` is replaced only
    by a checked export, and only if it is absent or a previous C export.

    Returns the policy, the run's metadata and the parity report (None when
    ``parity_steps`` is 0). Raises ``ParityError`` on a mismatch.
    """
    from export.c_build import SOURCE_NAME
    from export.c_codegen import generate
    from export.c_runtime import CPolicy

    out = Path(out)
    policy, meta = load_policy(run_dir)
    model = build_model(policy, meta["env_id"], meta["global_step"], merged=False)
    sources = generate(model, onnx_name="policy.onnx", dir_name=str(out))
    files = {
        **{name: text.encode() for name, text in sources.files().items()},
        "policy.onnx": model.SerializeToString(),
    }
    reports: list[dict] = []
    parity = dict(steps=parity_steps, batch=parity_batch, seed=seed, rtol=rtol, atol=atol)

    def check(tmp: Path) -> None:
        controller = CPolicy(tmp, batch_size=parity_batch)  # compiling is itself a check
        if parity_steps > 0:
            reports.append(
                check_parity(policy, controller, meta["env_id"], make_env=make_env, **parity)
            )

    atomic_write_dir(out, files, check, owned=lambda path: (path / SOURCE_NAME).is_file())
    return policy, meta, reports[0] if reports else None


def bench_torch(
    policy: ActorCritic,
    name: str,
    steps: int = 5000,
    warmup: int = 500,
    threads: int = 1,
    frozen: bool = False,
) -> dict:
    """Latency row of the torch policy at batch 1 on ``threads`` torch threads, stepped
    as a controller (``TorchController(policy, frozen).act``: state carried): the eager
    module, or with ``frozen`` its weights read once (what ``evaluate`` steps)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return bench_callable(
            name,
            TorchController(policy, frozen=frozen).act,
            policy.obs_dim,
            steps,
            warmup,
            kind="torch",
            policy_type=policy.policy_type,
            state_dims=list(policy.actor.state_dims),
        )
    finally:
        torch.set_num_threads(previous)
