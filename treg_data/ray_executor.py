"""`treg-score --executor ray`: stage one on a Ray cluster, through Ray Data.

The input is cut into --num-workers parts in the ordinary worker scheme (contiguous input slices, one output
folder, worker manifests merged once all are there), so a folder scored this way equals one scored by that many
`--worker-index` runs. Ray Data hands the unfinished parts, one at a time, to --num-actors scoring actors: each
actor sets up one scorer (its engines start once) and scores every part it is given with it, writing that part's
shards itself through treg's ShardStore and ShardCutter. Ray's own write_parquet would not keep treg's contract:
shards renamed into place only when whole, the provenance in each shard's footer, and the worker manifests that a
rerun continues from. The driver then merges the worker manifests into manifest.json, as the last local worker
does; a rerun of the same command sends only the parts still unfinished.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

from treg_core.atomic import write_json
from treg_core.contract import read_worker_manifest, worker_manifest_path
from treg_core.errors import UserError, first_line
from treg_core.folders import claim_folder, lock_folder
from treg_data.scorers.cpu_engine import data_parallel_cpu_environments
from treg_data.scorers.watchdog import RESUME

RAY_RECORD = ".treg-ray.json"  # how the run was launched; hidden, so treg-push never uploads it
INSTALL = "pip install 'treg[ray]'"
SHUTDOWN_SECONDS = 10  # how long the processes of a local cluster get to end by themselves


def run_on_ray(config):
    """Score every unfinished part of the input on Ray; one Summary for all the parts."""
    from treg_data.shards import merge_manifests

    started = time.perf_counter()
    ray = _import_ray()
    num_parts = config.num_workers if config.num_workers > 1 else config.num_actors
    config = replace(config, num_workers=num_parts)
    root = Path(config.output)
    claim_folder(root, "treg-score")
    lock_folder(root, "treg-score", "-ray")  # one ray run at a time writes its record here
    write_json(root / RAY_RECORD, {"argv": continuing_command(sys.argv[1:]), "num_actors": config.num_actors,
                                   "num_workers": num_parts, "ray_address": config.ray_address})
    finished = [] if config.overwrite else [i for i in range(num_parts)
                                            if worker_manifest_path(root, i, num_parts).exists()]
    # With every part done, one actor still reads the folder: other settings are refused, as a local rerun's are.
    parts = [i for i in range(num_parts) if i not in finished] or [0]
    _connect(ray, config.ray_address)
    try:
        results = _score_parts(ray, config, parts)
    finally:
        _shut_down(ray)
    results += [_finished_part(root, i, num_parts) for i in finished if i not in parts]
    return _summary(config, results, merge_manifests(root, num_parts), started)


def continuing_command(args: list[str]) -> list[str]:
    """The command that continues this run, as `treg-score --status` prints it: the same flags, less --overwrite
    (which would score every part again)."""
    return ["treg-score", *(arg for arg in args if arg != "--overwrite")]


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the extra's other half
    except ImportError:
        raise UserError(f"--executor ray needs Ray Data: {INSTALL}") from None
    return ray


def _shut_down(ray) -> None:
    """Leave the cluster; a local one this command started ends with it, its actors and their engines too. Ray's
    workers notice their raylet is gone only after a while, and an actor left behind would hold its engine's memory
    after the command returned: what still runs a few seconds after the shutdown is killed."""
    import psutil

    started = psutil.Process().children(recursive=True)  # none where the command joined a running cluster
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=SHUTDOWN_SECONDS)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=SHUTDOWN_SECONDS)


def _connect(ray, address: str | None) -> None:
    options = {"include_dashboard": False} if address is None else {}  # joining a cluster keeps its own
    try:
        ray.init(address=address, logging_level=logging.WARNING, **options)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot reach the Ray cluster at --ray-address {address} ({first_line(err)}); start it "
                        "(ray start --head) or give another address") from None


def _score_parts(ray, config, parts: list[int]) -> list[dict]:
    """Each part through the actors; the first part that fails ends the run in one line naming it."""
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False  # the actors' own bars say more
    actors = min(config.num_actors, len(parts))
    resources, cpu_groups = _actor_resources(ray, config, actors)
    slots = ray.remote(num_cpus=0)(_Slots).remote()
    dataset = ray.data.from_items([{"part": part} for part in parts], override_num_blocks=len(parts))
    with warnings.catch_warnings():  # max_restarts has no named parameter yet, and Ray warns of the others
        warnings.simplefilter("ignore", DeprecationWarning)
        scored = dataset.map_batches(
            ScorerActor, batch_size=1, max_restarts=0,  # Ray Data would restart a dead actor without end
            fn_constructor_kwargs={"config": config, "slots": slots, "cpu_groups": cpu_groups, "cwd": os.getcwd()},
            # One part in flight per actor (Ray Data queues two by default): an idle actor takes the next part.
            compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1), **resources)
    _quiet_console()
    results = []
    try:
        for row in scored.iter_rows():
            result = json.loads(row["result"])
            if "error" in result:
                raise UserError(result["error"])
            results.append(result)
    except ray.exceptions.RayError as err:
        raise UserError(f"a scoring actor died ({_cause(err)}); {RESUME}") from None
    return results


def _quiet_console() -> None:
    """Ray Data prints a dead actor's traceback before raising its error, which treg says in one line; the
    traceback stays in Ray Data's log file (ray-data.log in the Ray session's logs)."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.CRITICAL)


def _actor_resources(ray, config, actors: int) -> tuple[dict, int | None]:
    """What each actor asks Ray for: --tensor-parallel-size GPUs where the cluster has GPUs, else an equal share
    of the CPUs, whose cores it binds its engine's threads to (the number of groups is returned)."""
    cluster = ray.cluster_resources()
    if cluster.get("GPU", 0):
        needed = actors * config.tensor_parallel_size
        if cluster["GPU"] < needed:
            raise UserError(f"{actors} actors x --tensor-parallel-size {config.tensor_parallel_size} need {needed} "
                            f"GPUs; the cluster has {cluster['GPU']:g}: give fewer --num-actors")
        return {"num_gpus": config.tensor_parallel_size, "num_cpus": 1}, None
    cpus = int(cluster.get("CPU", 0))
    if cpus < actors:
        raise UserError(f"{actors} actors need a CPU each; the cluster has {cpus}: give fewer --num-actors")
    return {"num_cpus": cpus // actors}, actors


def _cause(err: Exception) -> str:
    """A Ray error's first line: its type and the reason, without the traceback Ray adds."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first_line(text[0]) if text else ''}".rstrip(": ")


class _Slots:
    """Hands out 0, 1, 2, ...: an actor's slot, which decides its share of the CPU cores."""

    def __init__(self):
        self.taken = 0

    def take(self) -> int:
        self.taken += 1
        return self.taken - 1


class ScorerActor:
    """One Ray actor: one scorer, set up on its first part and kept for every later one."""

    def __init__(self, config, slots, cpu_groups: int | None, cwd: str):
        import ray

        if os.path.isdir(cwd):  # relative paths in the settings mean what they meant where the command was given
            os.chdir(cwd)
        self.config, self.parts = config, None
        self.slot = ray.get(slots.take.remote())
        if cpu_groups:  # before any engine starts: two engines bound to the same cores would halve both
            environments = data_parallel_cpu_environments(cpu_groups, config.tensor_parallel_size)
            os.environ.update(environments[self.slot % cpu_groups])

    def __call__(self, batch: dict) -> dict:
        part = int(batch["part"][0])
        return {"result": [json.dumps(self._score(part))]}

    def _score(self, part: int) -> dict:
        """The part's summary, or its error as one line naming the part."""
        from treg_data.pipeline import PartScorer

        try:
            if self.parts is None:
                self.parts = PartScorer(self.config)
            summary = self.parts.score(part)
        except UserError as err:
            return {"error": f"part {part} of {self.config.num_workers}: {err}"}
        except Exception as err:  # noqa: BLE001 - said in one line; the traceback goes to the actor's log
            traceback.print_exc()
            return {"error": f"part {part} of {self.config.num_workers} failed: {type(err).__name__}: "
                             f"{first_line(err)}"}
        return {**asdict(summary), "output": str(summary.output), "manifest": None, "slot": self.slot}

    def __del__(self):
        """Ray Data deletes the actor's scorer when the run ends: its engines' processes end with it."""
        if getattr(self, "parts", None) is not None:
            try:
                self.parts.close()
            except Exception as err:  # noqa: BLE001 - the run's results are in already
                print(f"closing the engines: {type(err).__name__}: {first_line(err)}", file=sys.stderr)


def _finished_part(root: Path, part: int, num_parts: int) -> dict:
    """A part a run before this one finished, as its worker manifest records it: nothing scored now."""
    done = read_worker_manifest(worker_manifest_path(root, part, num_parts))
    return {"pairs_read": done.input_end - done.input_start, "pairs_scored": done.rows, "tokens": 0,
            "skipped_by_reason": dict(Counter(entry["reason"] for entry in done.skipped)),
            "score_seconds": 0.0, "scoring_path": done.scoring_path, "pairs_scored_now": 0, "duplicate_ids": 0,
            "slot": None}


def _summary(config, results: list[dict], manifest: Path | None, started: float):
    """All parts in one summary; the actors score side by side, so scorer time is the busiest actor's."""
    from treg_data.pipeline import Summary

    busy = Counter()
    for result in results:
        busy[result["slot"]] += result["score_seconds"]
    skipped = sum((Counter(result["skipped_by_reason"]) for result in results), Counter())
    return Summary(
        output=Path(config.output), pairs_read=sum(r["pairs_read"] for r in results),
        pairs_scored=sum(r["pairs_scored"] for r in results), skipped_by_reason=dict(skipped),
        tokens=sum(r["tokens"] for r in results), seconds=time.perf_counter() - started,
        score_seconds=max(busy.values(), default=0.0), scoring_path=_scoring_path(results), manifest=manifest,
        pairs_scored_now=sum(r["pairs_scored_now"] for r in results),
        duplicate_ids=sum(r["duplicate_ids"] for r in results),  # within each part's rows
    )


def _scoring_path(results: list[dict]) -> str:
    """The path the actors scored with (not 'nothing to score' where a part had nothing left)."""
    paths = [r["scoring_path"] for r in results if r["scoring_path"] and "nothing to score" not in r["scoring_path"]]
    return paths[0] if paths else results[0]["scoring_path"]
