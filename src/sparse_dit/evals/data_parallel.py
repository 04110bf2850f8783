"""Data-parallel evaluation: the items of `sparse-dit eval` split over processes, one per GPU (or CPU share).

`sparse-dit eval --num-processes N` starts N workers of this module on this machine, each with the environment
`torchrun` and `accelerate launch` give (RANK, WORLD_SIZE, MASTER_ADDR, ...); a command started by either of them
directly runs as one worker the same way. Each worker takes accelerate's `PartialState` (gloo on the CPU, NCCL
with one GPU per process), loads the pipeline onto its device and evaluates its share (`Evaluation.run(state)`);
the main worker merges the records into `results.json` exactly as one process writes it. Videos go to the shared
output folder, so the processes must share a file system (one machine).

On the CPU the workers split the cores between them, so their timings are not one process's; on GPUs each has its
own device and its times are comparable.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SparseDiTError
from .runner import EvalSettings, Evaluation, validate_settings

JOB = "job.json"  # in the output folder's .parallel/ while the run lasts


def launched_size() -> int:
    """How many processes a launcher (`torchrun`, `accelerate launch`, or `--num-processes`) started this one among; 1 if
    none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _state(num_processes: int) -> Any:
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != num_processes:
        raise SparseDiTError(f"this process was started as one of {num_processes}, but accelerate sees "
                             f"{state.num_processes}; start the workers with torchrun or accelerate launch")
    return state


def run_worker(settings: EvalSettings, pipeline: str, reference: str | None = None) -> tuple[list[dict], str, str]:
    """This process's part of a data-parallel evaluation; every worker returns the merged records.

    Returns:
        (records, description of the pipeline, description of the reference or "").
    """
    import torch

    from ..pipelines import load_pipeline

    state = _state(launched_size())
    if state.device.type == "cpu":  # the processes share the cores instead of each taking all of them
        torch.set_num_threads(max(1, torch.get_num_threads() // state.num_processes))
    pipe, description = load_pipeline(pipeline)
    pipe.set_progress_bar_config(disable=True)
    ref, against = (None, "") if reference is None else load_pipeline(reference)
    for p in (pipe, ref):
        if p is not None and state.device.type != "cpu":
            p.to(state.device)
        if p is not None:
            p.set_progress_bar_config(disable=True)
    records = Evaluation(pipe, settings, reference=ref).run(state)
    return records, description, against


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(settings: EvalSettings, pipeline: str, reference: str | None, num_processes: int,
           imports: list[str] | None = None) -> tuple[list[dict], str, str]:
    """Run the evaluation in `num_processes` worker processes on this machine and wait for them.

    Returns:
        (the records of `results.json`, description of the pipeline, of the reference or "").
    Raises:
        ConfigError: more processes than GPUs, or a bad setting (checked before any process starts).
        SparseDiTError: a worker failed (its output, above, says why); the others are stopped.
    """
    import torch

    validate_settings(settings)
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
    if torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        raise ConfigError(f"--num-processes {num_processes} is more than the {torch.cuda.device_count()} GPUs here; "
                          "give one process per GPU")
    out = Path(settings.out)
    parts = out / ".parallel"
    parts.mkdir(parents=True, exist_ok=True)
    job = {"settings": {**asdict(settings), "out": str(out)}, "pipeline": pipeline, "reference": reference,
           "imports": list(imports or [])}
    (parts / JOB).write_text(json.dumps(job, default=list))
    port = _free_port()
    procs = []
    for rank in range(num_processes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(num_processes),
               "LOCAL_WORLD_SIZE": str(num_processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", __name__, str(parts / JOB)], env=env))
    try:
        while any(p.poll() is None for p in procs):
            failed = [rank for rank, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:  # the others would wait for it at the next barrier forever
                raise SparseDiTError(f"evaluation process {failed[0]} of {num_processes} failed (exit code "
                                     f"{procs[failed[0]].returncode}; its output is above); the others were stopped")
            time.sleep(0.2)
        failed = [rank for rank, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise SparseDiTError(f"evaluation process {failed[0]} of {num_processes} failed (exit code "
                                 f"{procs[failed[0]].returncode}; its output is above)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    result = json.loads((out / ".parallel-done.json").read_text())
    (out / ".parallel-done.json").unlink()
    return json.loads((out / "results.json").read_text()), result["description"], result["against"]


def _settings(data: dict) -> EvalSettings:
    data = dict(data)
    data["out"] = Path(data["out"])
    data["configs"] = {m: {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
                       for m, opts in data["configs"].items()}
    return EvalSettings(**data)


def main(job_path: str) -> int:
    """A worker started by `launch`: the job file says what to evaluate."""
    from ..cli import import_user_module

    job = json.loads(Path(job_path).read_text())
    for name in job["imports"]:
        import_user_module(name)
    settings = _settings(job["settings"])
    records, description, against = run_worker(settings, job["pipeline"], job["reference"])
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(settings.out) / ".parallel-done.json").write_text(json.dumps({"description": description, "against": against}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
