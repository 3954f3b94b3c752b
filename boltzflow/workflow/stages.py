"""The stage graph of a workflow: data -> teacher -> (trajectories ->) students -> samples
(-> ``[smc]`` refinement of one student, :mod:`~boltzflow.workflow.smc_stage`) -> report (and,
for ``boltzflow benchmark``, the benchmark table).

A teacher or student with ``run = PATH`` (:func:`boltzflow.workflow.spec.imported_run`) is
imported instead of trained: its stage copies the model file into the output folder (a training
checkpoint is saved as a model file with its EMA weights), keyed by the file's content
fingerprint, so downstream stages see the same inputs as in the run the file came from.

The output folder layout is in :mod:`boltzflow.workflow.layout`. Every file is written
atomically (temporary file + rename), so a killed run never leaves a half-written output behind
that a later run would trust.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from boltzflow.workflow.benchmark import run_benchmark_stage
from boltzflow.workflow.cache import canonical_json, file_fingerprint
from boltzflow.workflow.layout import (
    REFERENCE_FILE,
    TEACHER_FILE,
    TRAIN_FILE,
    copy_atomic,
    sample_plan,
    stage_device,
    teacher_sampling,
)
from boltzflow.workflow.report import run_report_stage
from boltzflow.workflow.smc_stage import smc_stage
from boltzflow.workflow.spec import StudentSpec, Workflow
from boltzflow.workflow.stage import Stage, StageContext

__all__ = ["build_stages"]


def _training_key(config: dict[str, Any]) -> dict[str, Any]:
    """A model config without what cannot change the trained weights (sampling, description)."""
    return {k: v for k, v in config.items() if k not in ("sample", "description")}


def _last_metrics(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def _g(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def _n_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# -- data ------------------------------------------------------------------------------------------
def _run_data(ctx: StageContext, wf: Workflow) -> dict[str, Any]:
    from boltzflow.data import generate, load_positions, write_dataset

    spec = wf.data
    train_path, ref_path = ctx.path(TRAIN_FILE), ctx.path(REFERENCE_FILE)
    split: dict[str, Any] = {}
    if spec.generate:
        total = spec.n_train + spec.n_reference
        settings = dict(spec.settings)
        if ctx.workdir is not None:  # md_seeded: finished segments survive an interrupted run
            settings.setdefault("segments_dir", str(ctx.workdir))
        with wf.open_system() as system:
            x, u, prov = generate(
                system,
                total,
                seed=wf.seed,
                method=spec.method,
                progress=ctx.progress,
                **settings,
            )
        if spec.holdout == "segments":
            parts, split = _segment_split(x, u, prov, spec.n_reference)
        else:
            # MCMC output is time-major: the held-out reference is the last records of the chains.
            parts = {"train": (x[: spec.n_train], u[: spec.n_train])}
            if spec.n_reference:
                parts["reference"] = (x[spec.n_train :], u[spec.n_train :])
        note = f"generated {total} ({prov['method']}): {len(parts['train'][0])} train"
    else:
        x = load_positions(spec.file, spec.dataset, system=wf.system)
        if spec.reference_file is not None:
            ref = load_positions(spec.reference_file, system=wf.system)[: spec.n_reference or None]
            train = x[: spec.n_train or None]
        else:
            n_ref = spec.n_reference
            if n_ref >= len(x):
                raise ValueError(
                    f"data.n_reference = {n_ref} leaves no training rows in {spec.file} "
                    f"({len(x)} rows)"
                )
            train, ref = x[: len(x) - n_ref], x[len(x) - n_ref :]
            if spec.n_train:
                train = train[: spec.n_train]
        parts = {"train": (train, None)}
        if len(ref):
            parts["reference"] = (ref, None)
        prov = {
            "generator": "file",
            "settings": {"file": str(spec.file), "dataset": spec.dataset},
            "seed": None,
            "system_parameters": {},
            "temperature": None,
        }
        note = f"from {spec.file.name}: {len(train)} train"
    for name, (xs, us) in parts.items():
        path = train_path if name == "train" else ref_path
        provenance = {**prov, "workflow_part": name, **({"split": split} if split else {})}
        write_dataset(path, xs, system=wf.system, provenance=provenance, energies=us)
    n_ref = len(parts["reference"][0]) if "reference" in parts else 0
    if n_ref:
        ctx.add_output(REFERENCE_FILE)
    else:
        ref_path.unlink(missing_ok=True)
    if ctx.workdir is not None and not spec.settings.get("keep_segments", False):
        from boltzflow.data.seeded_md import remove_segments

        remove_segments(ctx.workdir)  # the datasets hold the frames now
    out = {
        "n_train": len(parts["train"][0]),
        "n_reference": n_ref,
        "note": f"{note}, {n_ref} reference",
    }
    if split:
        out["heldout_segments"] = split["heldout_segments"]
        out["note"] += f" ({len(split['heldout_segments'])} whole segments)"
    return out


def _segment_split(
    x: Any, u: Any, prov: dict[str, Any], n_reference: int
) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
    """Training and reference parts of seeded-MD frames, the reference made of whole segments
    (:func:`boltzflow.data.seeded_md.held_out_segments`: round(n_seeds · n_reference / N) of
    them, at least one if ``n_reference`` > 0, never all); and the split's record."""
    from boltzflow.data.seeded_md import held_out_segments, segment_rows

    stats = prov.get("statistics", {})
    counts = stats.get("frames_per_seed")
    if counts is None or sum(counts) != len(x):
        raise ValueError("data.holdout = 'segments': the generator recorded no segments")
    n_seeds = len(counts)
    k = round(n_seeds * n_reference / len(x))
    k = min(max(k, 1 if n_reference else 0), n_seeds - 1)
    held = held_out_segments(stats["seed_phi"], k)
    rows = segment_rows(counts, held)
    parts = {"train": (x[~rows], u[~rows])}
    if rows.any():
        parts["reference"] = (x[rows], u[rows])
    split = {
        "rule": "whole segments, spread evenly within each starting basin",
        "heldout_segments": held,
        "frames_per_seed": list(counts),
    }
    return parts, split


# -- teacher ---------------------------------------------------------------------------------------
def _run_teacher(ctx: StageContext, wf: Workflow) -> dict[str, Any]:
    from boltzflow.data import read_dataset
    from boltzflow.train.teacher import SystemShape, train_teacher

    data = torch.as_tensor(read_dataset(ctx.path(TRAIN_FILE)).positions)
    cfg = wf.teacher.config
    start = time.perf_counter()
    teacher = train_teacher(
        cfg,
        data,
        ctx.workdir,
        SystemShape.from_name(wf.system),
        resume=ctx.resumed,
        progress=ctx.progress,
        run_info={"system": wf.system, "data": TRAIN_FILE, "workflow": wf.name},
    )
    last = _last_metrics(ctx.workdir)
    return {
        "parameters": _n_params(teacher),
        "steps": cfg.train.steps,
        "train_seconds": last.get("elapsed_s", time.perf_counter() - start),
        "final_loss": last.get("loss"),
        "note": f"{cfg.model.backbone}, {cfg.train.steps} steps, loss {_g(last.get('loss'))}",
    }


# -- imported runs ---------------------------------------------------------------------------------
def _import_model(src: Path, dst: Path, load: Callable[[Path], Any]) -> tuple[Any, dict[str, Any]]:
    """Put the model of checkpoint ``src`` at ``dst``: a model file is copied bit for bit, a
    training checkpoint saved through ``load(path)`` (its EMA weights). Returns the model loaded
    from ``dst`` and what the summary records of its training (steps, time, final loss)."""
    from boltzflow.io.checkpoint import load_checkpoint

    payload = load_checkpoint(src)
    info: dict[str, Any] = {"imported": str(src), "imported_kind": payload["kind"]}
    if payload["kind"] == "training":
        load(src).save(dst, extra={"imported_from": str(src), "training_step": payload["step"]})
        total = payload.get("train_config", {}).get("steps")
        info.update(steps=payload["step"], train_seconds=payload.get("elapsed_s"))
        if total is not None and payload["step"] < total:
            info["unfinished"] = f"training checkpoint at step {payload['step']} of {total}"
    else:
        copy_atomic(src, dst)
    last = _last_metrics(src.parent)  # the run folder's training log, when there is one
    if last:
        info.setdefault("steps", last.get("step"))
        info.setdefault("train_seconds", last.get("elapsed_s"))
        info["final_loss"] = last.get("loss")
    return load(dst), info


def _run_import(
    ctx: StageContext, wf: Workflow, src: Path, dst: str, what: str, method: str | None = None
) -> dict[str, Any]:
    """An import stage: ``src`` (a checked :attr:`TeacherSpec.run`/:attr:`StudentSpec.run`)
    becomes ``dst`` (relative to the output folder), a teacher (``method`` None) or a student."""
    if method is None:
        from boltzflow.flows.cnf import TeacherCNF

        def load(path: Path) -> Any:
            return TeacherCNF.load(path, system=wf.system)
    else:
        from boltzflow.distill import load_student

        def load(path: Path) -> Any:
            return load_student(path, system=wf.system)

    model, info = _import_model(src, ctx.path(dst), load)
    note = f"{what} imported from {src}"
    if "unfinished" in info:
        note += f" ({info['unfinished']})"
    out = {"parameters": _n_params(model), **info, "note": note}
    return out if method is None else {"method": method, **out}


# -- students --------------------------------------------------------------------------------------
def _trajectory_config(st: StudentSpec) -> dict[str, Any] | None:
    if getattr(getattr(st.config, "loss", None), "target", None) != "teacher":
        return None  # trained without teacher trajectories (from data, or an nf student)
    return st.config.trajectories.options()


def _trajectory_id(tc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(tc).encode()).hexdigest()[:10]


def _run_trajectories(ctx: StageContext, wf: Workflow, tc: dict[str, Any], out: str) -> dict:
    from boltzflow.distill.trajectories import teacher_trajectories
    from boltzflow.flows.cnf import TeacherCNF

    teacher = TeacherCNF.load(ctx.path(TEACHER_FILE), map_location=stage_device(wf))
    traj = teacher_trajectories(teacher, **tc, progress=ctx.progress)
    traj.save(ctx.path(out), info={"config": tc})
    return {"n": tc["n"], "seconds": traj.seconds, "note": f"{tc['n']} x {tc['grid']} grid"}


def _run_student(ctx: StageContext, wf: Workflow, st: StudentSpec, traj: str | None) -> dict:
    from boltzflow.distill.train_students import TRAJECTORY_FILE
    from boltzflow.flows.cnf import TeacherCNF
    from boltzflow.registry.methods import get_method

    method = get_method(st.method)
    teacher = None
    info = {"workflow": wf.name}
    if method.uses_teacher:
        teacher = TeacherCNF.load(ctx.path(TEACHER_FILE), map_location=stage_device(wf))
        info["teacher"] = TEACHER_FILE
    start = time.perf_counter()
    data = None
    if method.reads_data(st.config):
        from boltzflow.data import read_dataset

        data = torch.as_tensor(read_dataset(ctx.path(TRAIN_FILE)).positions)
        info["data"] = TRAIN_FILE
    from boltzflow import distributed

    # under torchrun (a DDP student) rank 0 alone puts the trajectories in place
    copy = traj is not None and distributed.is_main()
    if copy and not (ctx.workdir / TRAJECTORY_FILE).is_file():
        shutil.copyfile(ctx.path(traj), ctx.workdir / TRAJECTORY_FILE)
    distributed.barrier()
    student = method.train(
        st.config,
        teacher,
        ctx.workdir,
        system=wf.system,
        data=data,
        resume=ctx.resumed,
        progress=ctx.progress,
        run_info=info,
    )
    train = getattr(st.config, "train", None)  # None: a method without training (a baseline)
    steps = int(train.steps) if train is not None else 0
    last = _last_metrics(ctx.workdir)
    note = f"{st.method}, {steps} steps, loss {_g(last.get('loss'))}" if steps else st.method
    return {
        "method": st.method,
        "parameters": _n_params(student),
        "steps": steps,
        "train_seconds": last.get("elapsed_s", time.perf_counter() - start),
        "final_loss": last.get("loss"),
        "note": note,
    }


# -- sampling --------------------------------------------------------------------------------------
def _sample_model(
    ctx: StageContext,
    wf: Workflow,
    system: Any,
    model: Any,
    label: str,
    steps: int | None,
    provenance: dict[str, Any],
    sampling: dict[str, Any],
    batch_size: int | None = None,
) -> tuple[float, Any]:
    """Draw ``wf.sample.n`` samples of ``model`` in ``steps`` (``batch_size`` rows at a time;
    None: the model's own), weighted against the open ``system``, and write
    ``samples/<label>.h5``; returns ESS/N and the :class:`~boltzflow.sampling.draw.SampleCost`.
    ``sampling`` is recorded as provenance. Under torchrun every rank draws its share
    (:func:`_sample_sharded`)."""
    from boltzflow import distributed
    from boltzflow.sampling.draw import Draw, iter_draws, write_draws
    from boltzflow.systems.base import energy_provenance_of

    if distributed.info().distributed:
        return _sample_sharded(
            ctx, wf, system, model, label, steps, provenance, sampling, batch_size
        )
    n, seed = wf.sample.n, wf.seed + 1
    batches = list(
        iter_draws(
            model,
            n,
            system=system,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            progress=ctx.progress,
        )
    )
    draw = Draw.from_batches(batches)
    prov = {
        **provenance,
        "system": wf.system,
        "seed": seed,
        "n": n,
        "steps": steps,
        "nfe_per_sample": draw.cost.nfe_per_sample,
        "sample_seconds": draw.cost.seconds,
        "log_q_kind": model.log_q_kind,
        "energy": energy_provenance_of(system),  # what computed the u column
        "sampling": sampling,
        "log_q": "density on the mean-free subspace" if model.mean_free else "density",
    }
    write_draws(ctx.path(f"samples/{label}.h5"), batches, dim=model.dim, provenance=prov)
    return draw.samples.ess_fraction, draw.cost


def _sample_sharded(
    ctx: StageContext,
    wf: Workflow,
    system: Any,
    model: Any,
    label: str,
    steps: int | None,
    provenance: dict[str, Any],
    sampling: dict[str, Any],
    batch_size: int | None,
) -> tuple[float, Any]:
    """:func:`_sample_model` on every rank: each draws its share with its rank seed into a shard
    (:func:`~boltzflow.sampling.sharded.write_sharded_draws`), then rank 0 merges the shards into
    ``samples/<label>.h5`` (the stage's output, as one process writes it) and removes them.
    Cost: wall time of the slowest rank, NFE per sample of the union."""
    from boltzflow import distributed
    from boltzflow.io.shards import merge_stores, shard_path
    from boltzflow.sampling.draw import SampleCost, cost_of
    from boltzflow.sampling.sharded import write_sharded_draws
    from boltzflow.systems.base import energy_provenance_of

    me = distributed.info()
    n, seed = wf.sample.n, wf.seed + 1
    shards = ctx.path(f"samples/.{label}.shards")
    prov = {
        **provenance,
        "system": wf.system,
        "seed": seed,
        "n": n,
        "steps": steps,
        "log_q_kind": model.log_q_kind,
        "energy": energy_provenance_of(system),  # what computed the u column
        "sampling": sampling,
        "log_q": "density on the mean-free subspace" if model.mean_free else "density",
    }
    result = write_sharded_draws(
        model,
        n,
        shards / f"{label}.h5",
        system=system,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        provenance=prov,
        progress=ctx.progress,
    )
    costs = distributed.all_gather_objects(cost_of(result.batches))
    cost = SampleCost(
        n=result.n,
        nfe_per_sample=sum(c.nfe_per_sample * c.n for c in costs) / max(result.n, 1),
        seconds=max(c.seconds for c in costs),
        cpu_seconds=sum(c.cpu_seconds for c in costs),
        trace_evals=sum(c.trace_evals for c in costs),
    )
    if me.is_main:
        files = [shard_path(shards / f"{label}.h5", r, me.world_size) for r in range(me.world_size)]
        merged = {
            **prov,
            "world_size": me.world_size,
            "rank_seeds": [
                distributed.rank_seed(seed, r, me.world_size) for r in range(me.world_size)
            ],
            "nfe_per_sample": cost.nfe_per_sample,
            "sample_seconds": cost.seconds,
        }
        merge_stores(files, ctx.path(f"samples/{label}.h5"), provenance=merged)
        shutil.rmtree(shards, ignore_errors=True)
    distributed.barrier()  # the merged file exists on every rank's return
    return result.ess / result.n, cost


def _run_sample_teacher(ctx: StageContext, wf: Workflow) -> dict[str, Any]:
    from boltzflow.flows.cnf import TeacherCNF

    teacher = TeacherCNF.load(ctx.path(TEACHER_FILE), map_location=stage_device(wf))
    teacher.sampling = teacher.settings_with(teacher_sampling(wf))
    provenance = {"model": "teacher", "checkpoint": TEACHER_FILE}
    with wf.open_system() as system:
        ess, cost = _sample_model(
            ctx, wf, system, teacher, "teacher", None, provenance, teacher.sampling
        )
    return {
        "ess_fraction": ess,
        "nfe_per_sample": cost.nfe_per_sample,
        "sample_seconds": cost.seconds,
        "note": f"N={cost.n}, NFE {cost.nfe_per_sample:.0f}, {cost.seconds:.1f} s, ESS/N {ess:.3f}",
    }


def _run_sample_student(ctx: StageContext, wf: Workflow, st: StudentSpec) -> dict[str, Any]:
    from boltzflow.distill import load_student

    folder = ctx.path(f"students/{st.name}")
    student = load_student(folder / "student.pt", system=wf.system, map_location=stage_device(wf))
    notes = []
    out: dict[str, Any] = {}
    checkpoint = f"students/{st.name}/student.pt"
    provenance = {"model": st.name, "method": st.method, "checkpoint": checkpoint}
    batch = wf.sample.batch_size
    sampling = {"batch_size": batch}
    with wf.open_system() as system:  # one system (and OpenMM pool) for every step count
        for label, steps in sample_plan(wf)[st.name]:
            ess, cost = _sample_model(
                ctx, wf, system, student, label, steps, provenance, sampling, batch
            )
            out[label] = {"ess_fraction": ess, "sample_seconds": cost.seconds}
            notes.append(f"K={steps or 1}: {ess:.3f}")
    return {"runs": out, "note": "ESS/N " + ", ".join(notes)}


# -- the graph -------------------------------------------------------------------------------------
def build_stages(wf: Workflow, *, benchmark: bool = False) -> list[Stage]:
    """The stages of ``wf`` (see the module docstring); with ``benchmark`` the benchmark stage
    is added after the students (and the report is left out).

    The stage configurations hold everything that decides a stage's result (resolved model
    configs, sizes, seeds, device), so a changed setting re-runs exactly the stages it affects.
    """

    from boltzflow.registry.methods import get_method

    device = stage_device(wf)
    system = {"name": wf.system, "options": wf.system_options}
    stages = [
        Stage(
            "data",
            functools.partial(_run_data, wf=wf),
            config={"system": system, "data": wf.data.key(), "seed": wf.seed},
            inputs=tuple(p for p in (wf.data.file, wf.data.reference_file) if p is not None),
            outputs=(TRAIN_FILE,),
            # resumable MD segments (an interrupted md_seeded run keeps its finished ones)
            workdir="data/md_seeded" if wf.data.method == "md_seeded" else None,
            description="reference configurations",
        ),
        _teacher_stage(wf, system),
    ]
    trajectories: dict[str, str] = {}
    student_stages: list[str] = []
    for name, st in wf.students.items():
        if st.run is not None:
            stages.append(
                Stage(
                    f"student-{name}",
                    functools.partial(
                        _run_import,
                        wf=wf,
                        src=st.run,
                        dst=f"students/{name}/student.pt",
                        what=f"{st.method} student",
                        method=st.method,
                    ),
                    config={"system": system, "method": st.method, "import": _imported_key(st.run)},
                    outputs=(f"students/{name}/student.pt",),
                    description=f"{st.method} student imported from {st.run}",
                )
            )
            student_stages.append(f"student-{name}")
            continue
        method = get_method(st.method)
        tc = _trajectory_config(st)
        traj_file = None
        deps = ["teacher"] if method.uses_teacher else []
        if tc is not None:
            tid = _trajectory_id(tc)
            traj_file = f"students/trajectories-{tid}.pt"
            stage_name = f"trajectories-{tid}"
            if tid not in trajectories:
                trajectories[tid] = stage_name
                stages.append(
                    Stage(
                        stage_name,
                        functools.partial(_run_trajectories, wf=wf, tc=tc, out=traj_file),
                        config={"trajectories": tc, "device": device},
                        deps=("teacher",),
                        outputs=(traj_file,),
                        description="teacher trajectories for distillation",
                    )
                )
            deps.append(stage_name)
        if method.reads_data(st.config):
            deps.append("data")
        stage = Stage(
            f"student-{name}",
            functools.partial(_run_student, wf=wf, st=st, traj=traj_file),
            config={
                "system": system,
                "method": st.method,
                "student": _training_key(st.config_dict()),
            },
            deps=tuple(deps),
            outputs=(f"students/{name}/student.pt",),
            workdir=f"students/{name}",
            description=f"{st.method} student"
            + ("" if method.uses_teacher else " (from the data alone)"),
            distributed=method.distributed,
        )
        stages.append(stage)
        student_stages.append(stage.name)
    if benchmark:
        config = {
            "system": system,
            "benchmark": dataclasses.asdict(wf.benchmark),
            "students": sorted(wf.students),
            "seed": wf.seed,
            "device": device,
            "batch_size": wf.sample.batch_size,
            "teacher_sampling": teacher_sampling(wf),
        }
        if _molecular(wf):  # the (φ, ψ) columns' settings (other systems keep their keys)
            rp = wf.report
            config["molecular"] = {
                "level": rp.level,
                "n_bootstrap": rp.n_bootstrap,
                "reference_profile": rp.reference_profile is not None,  # its contents: inputs
            }
        stages.append(
            Stage(
                "benchmark",
                functools.partial(run_benchmark_stage, wf=wf),
                config=config,
                deps=("data", "teacher", *student_stages),
                inputs=tuple(p for p in (wf.report.reference_profile,) if p is not None),
                outputs=("benchmark.md", "benchmark.json"),
                description="teacher vs students vs Euler baselines",
            )
        )
        return stages
    sample_stages = []
    sample_config = {
        "system": system,
        "n": wf.sample.n,
        "seed": wf.seed,
        "device": device,
        "batch_size": wf.sample.batch_size,
    }
    if wf.sample.teacher:
        stages.append(
            Stage(
                "sample-teacher",
                functools.partial(_run_sample_teacher, wf=wf),
                config={**sample_config, "teacher_sampling": teacher_sampling(wf)},
                deps=("teacher",),
                outputs=("samples/teacher.h5",),
                description="teacher samples with exact log q",
                distributed=True,
            )
        )
        sample_stages.append("sample-teacher")
    plan = sample_plan(wf)
    for name, st in wf.students.items():
        stages.append(
            Stage(
                f"sample-{name}",
                functools.partial(_run_sample_student, wf=wf, st=st),
                config={**sample_config, "steps": [k for _, k in plan[name]]},
                deps=(f"student-{name}",),
                outputs=tuple(f"samples/{label}.h5" for label, _ in plan[name]),
                description=f"{name} samples",
                distributed=True,
            )
        )
        sample_stages.append(f"sample-{name}")
    if wf.smc is not None:
        stages.append(smc_stage(wf, system, device))
        sample_stages.append("smc")
    stages.append(
        Stage(
            "report",
            functools.partial(run_report_stage, wf=wf),
            config={
                "system": system,
                "estimates": _jsonable(dataclasses.asdict(wf.estimates)),
                "report": _report_key(wf),
                "seed": wf.seed,
                "proposal": wf.proposal_label,
            },
            deps=("data", "teacher", *student_stages, *sample_stages),
            inputs=tuple(p for p in (wf.report.reference_profile,) if p is not None),
            outputs=("report.md", "report.json", "samples.h5"),
            description="reweighting, estimates with CIs, plots",
        )
    )
    return stages


def _molecular(wf: Workflow) -> bool:
    """Whether the system may be a molecule with backbone dihedrals (an OpenMM system; the
    stages decide by the built system itself)."""
    from boltzflow.systems.registry import definition

    return definition(wf.system)["kind"] == "openmm"


def _imported_key(path: Path) -> str:
    """What identifies an imported model in a stage key: its file's content fingerprint (not
    its path: a moved run folder with the same file keeps the key)."""
    return file_fingerprint(path)


def _teacher_stage(wf: Workflow, system: dict[str, Any]) -> Stage:
    """The ``teacher`` stage: training on the data, or importing ``teacher.run``."""
    if wf.teacher.run is not None:
        return Stage(
            "teacher",
            functools.partial(
                _run_import, wf=wf, src=wf.teacher.run, dst=TEACHER_FILE, what="teacher"
            ),
            config={"system": system, "import": _imported_key(wf.teacher.run)},
            outputs=(TEACHER_FILE,),
            description=f"teacher CNF imported from {wf.teacher.run}",
        )
    return Stage(
        "teacher",
        functools.partial(_run_teacher, wf=wf),
        config={"system": system, "teacher": _training_key(wf.teacher.config.to_dict())},
        deps=("data",),
        outputs=(TEACHER_FILE,),
        workdir="teacher",
        description="flow-matching teacher CNF",
        distributed=True,
    )


def _report_key(wf: Workflow) -> dict[str, Any]:
    """The report settings that decide its output (the reference profile's contents are an
    input of the stage; without one the key is what it was before the option existed)."""
    key = dataclasses.asdict(wf.report)
    if key.pop("reference_profile") is not None:
        key["reference_profile"] = True
    return key


def _jsonable(obj: Any) -> Any:
    return json.loads(canonical_json(obj))
