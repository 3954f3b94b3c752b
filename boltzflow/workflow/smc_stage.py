"""The ``smc`` stage: SMC refinement of one student's samples in its latent space (``[smc]``,
:class:`~boltzflow.workflow.spec.SMCSpec`), written as a sample store beside the plain ones.

The student of ``[smc] student`` (trained or imported by its stage) is refined by
:func:`boltzflow.sampling.latent.refine_latent` against the workflow's system (its energy
backend, in this process), N particles with the settings of the table, and the final particles
are written to ``samples/<student>-K<steps>-smc.h5``
(:func:`~boltzflow.sampling.latent.write_latent_samples`): Cartesian x, u, the final SMC
importance weights as ``log_w`` (DESIGN.md's convention: every estimator reads them as it reads
a student's weights), the effective ``log_q = -u - log_w`` and ``columns/eve`` (each particle's
initial ancestor, the clusters of the report's intervals). Its provenance records the
settings, the schedule, and the costs the report shows next to the plain rows: energy and force
evaluations per sample, network passes per sample and the wall time of the whole refinement
(energies and forces included, unlike a plain row's sampling time).

The stage's key holds the resolved table (student, steps, N, seed and every SMC option), the
system and the device; the student's file is an upstream output, so a retrained or re-imported
student re-runs it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from boltzflow.workflow.layout import smc_model, stage_device
from boltzflow.workflow.spec import Workflow, smc_label
from boltzflow.workflow.stage import Stage, StageContext

__all__ = ["run_smc_stage", "smc_stage"]


def run_smc_stage(ctx: StageContext, wf: Workflow) -> dict[str, Any]:
    """Refine the ``[smc]`` student's samples and write their store (module docstring)."""
    import numpy as np

    from boltzflow.analysis.report import jsonable
    from boltzflow.distill import load_student
    from boltzflow.sampling.latent import LatentSMCOptions, refine_latent, write_latent_samples
    from boltzflow.systems.base import energy_provenance_of

    spec = wf.smc
    if spec is None:
        raise ValueError("the smc stage needs an [smc] table")
    st = wf.students[spec.student]
    checkpoint = f"students/{spec.student}/student.pt"
    student = load_student(ctx.path(checkpoint), system=wf.system, map_location=stage_device(wf))
    options = LatentSMCOptions(**spec.options_dict())
    with wf.open_system() as system:
        r = refine_latent(
            student,
            system,
            spec.n,
            steps=spec.steps,
            seed=spec.seed,
            batch_size=spec.batch_size,
            progress=ctx.progress,
            **options.smc_kwargs(),
        )
        energy = energy_provenance_of(system)
    smc = r.smc
    evals = r.energy_evaluations_per_sample
    # every energy evaluation runs the student's K steps once (and back for the forces), and
    # the final particles are decoded once more
    passes = (spec.steps or 1) * (evals + 1.0)
    details = {
        "temperatures": len(smc.betas) - 1,
        "betas": smc.betas,
        "mean acceptance": float(np.mean(smc.acceptance)) if len(smc.acceptance) else None,
        "step sizes": smc.step_sizes,
        "resampled": int(np.sum(smc.resampled)),
        "last step resampled": bool(smc.resampled[-1]) if len(smc.resampled) else False,
        "eves": smc.n_eves,
        "initial ESS/N": r.initial_ess_fraction,
        "ESS/N": r.ess_fraction,
        "log Z": r.log_z,
    }
    provenance = {
        "model": smc_model(wf),
        "student": spec.student,
        "method": st.method,
        "checkpoint": checkpoint,
        "system": wf.system,
        "seed": spec.seed,
        "n": spec.n,
        "steps": spec.steps,
        "nfe_per_sample": passes,
        "sample_seconds": r.seconds,
        "energy_evaluations_per_sample": evals,
        "force_evaluations_per_sample": r.force_evaluations_per_sample,
        "log_q_kind": "SMC weights",
        "log_q": "effective: -u - log_w of the final SMC weights (internal-coordinate students: "
        "the Cartesian convention of their log q)",
        "energy": energy,
        "sampling": {"latent_smc": dataclasses.asdict(options), "batch_size": spec.batch_size},
        "smc": jsonable(details),
    }
    label = smc_label(spec)
    write_latent_samples(ctx.path(f"samples/{label}.h5"), r, provenance=provenance)
    return {
        "ess_fraction": r.ess_fraction,
        "initial_ess_fraction": r.initial_ess_fraction,
        "energy_evaluations_per_sample": evals,
        "force_evaluations_per_sample": r.force_evaluations_per_sample,
        "sample_seconds": r.seconds,
        "eves": smc.n_eves,
        "note": (
            f"N={spec.n}, {details['temperatures']} temperatures, ESS/N "
            f"{r.initial_ess_fraction:.3f} -> {r.ess_fraction:.3f}, {evals:.0f} energy and "
            f"{r.force_evaluations_per_sample:.0f} force evaluations per sample, "
            f"{r.seconds:.1f} s"
        ),
    }


def smc_stage(wf: Workflow, system: dict[str, Any], device: str) -> Stage:
    """The ``smc`` stage of ``wf`` (which has an ``[smc]`` table); ``system`` and ``device`` as
    in the other stages' keys."""
    spec = wf.smc
    if spec is None:
        raise ValueError("the smc stage needs an [smc] table")
    return Stage(
        "smc",
        functools.partial(run_smc_stage, wf=wf),
        config={"system": system, "smc": dataclasses.asdict(spec), "device": device},
        deps=(f"student-{spec.student}",),
        outputs=(f"samples/{smc_label(spec)}.h5",),
        description=f"latent SMC refinement of {spec.student}",
    )
