"""`fedfill reproduce`: [FIMI]'s whole evaluation (Table I, Fig. 4, Fig. 5e-g) into one directory.

The campaign is a list of runs, each an ordinary `fedfill run` of the classifier job in its
own directory, so any one of them can be read, rerun or resumed alone:

  DIR/split-A/<method>/      the methods of [FIMI Table I] and [FIMI Fig. 4], per Dirichlet alpha A
  DIR/split-A/clsd/          CLSD: centralised training on the synthetic data alone
  DIR/split-S/fimi-*/...     on the sweep split S ([FIMI]'s Dir 0.6): the ablations of
                             [FIMI Fig. 5e] that are no method already, and the points of the
                             Delta_max and T_max sweeps ([FIMI Fig. 5f-g]) that are not FIMI's defaults

A method or an ablation is a run setting, nothing more (METHODS, ABLATIONS): a planner policy,
what the synthetic samples are for (`--synthetic-use`), and which generator serves them. One
generation service per generator serves every run, so a request made twice is sampled once.
Runs go `--jobs` at a time; a finished run is kept, an interrupted one resumes from its
checkpoint, so the same command picks a campaign up where it stopped. `--seeds 0,1,2` runs one
such campaign per seed (DIR/seed-N/) and tabulates them together (DIR/seeds.md, seeds.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from commands.paper_figures import split_name
from fedfill.config import RunConfig
from fedfill.errors import UsageError
from server.report import read_rounds

# [FIMI Table I]'s methods ([FIMI §V-B]) as run settings; clsd is no federated run
METHODS = {
    "tfl": {"policy": "tfl", "generator": ""},  # no synthetic data: no generation service
    "semi": {"policy": "fimi", "synthetic_use": "unlabelled"},
    "hdc": {"policy": "hdc"},
    "sst": {"policy": "tfl", "synthetic_use": "server"},
    "gan": {"policy": "fimi", "generator": "gan"},
    "clsd": None,
    "fimi": {"policy": "fimi"},
}
# [FIMI Fig. 5e]: FIMI with one part taken out -> (label, the run that shows it)
ABLATIONS = {
    "no-ba": ("w/o BA", "fimi-equal-band"),  # equal bands: no bandwidth allocation
    "no-da": ("w/o DA", "tfl"),  # no synthetic data at all: TFL
    "no-dm": ("w/o DM", "gan"),  # a GAN in the diffusion model's place
    "no-oa": ("w/o OA", "fimi-uniform"),  # the same amounts, uniform over classes, not [FIMI eq. 47]
}
EXTRA_RUNS = {"fimi-equal-band": {"policy": "fimi-equal-band"}, "fimi-uniform": {"policy": "fimi-uniform"}}
DEFAULT_DELTA_MAX = (0.15, 0.2, 0.25, 0.3)  # [FIMI Fig. 5f]
DEFAULT_T_MAX = (20.0, 30.0, 45.0, 60.0, 90.0, 120.0)  # around FIMI's 60 s ([FIMI Fig. 5g])
# what the campaign sets in each run, so not a flag of its own
CAMPAIGN_SETTINGS = ("job", "policy", "dirichlet_alpha", "synthetic_use", "delta_max", "t_max_s", "resume",
                     # and the ddpm job's, which no run of this classifier campaign reads
                     "start_checkpoint", "trainable", "lora_rank", "eval_per_class", "inception")
# [FIMI]'s 20 devices; digits flattens by ~100 rounds; [FIMI]'s FedAvg merges every update, so no
# norm screen (the median screen dropped 4 to 41 honest updates per run once the model had
# converged; the adaptive default 0 or 1, docs/running.md#robust-aggregation)
CAMPAIGN_DEFAULTS = {"num_partitions": 20, "rounds": 100, "norm_bound": 0.0}


def add_arguments(parser) -> None:
    from commands.run import add_run_flags

    parser.add_argument("--out", required=True, help="the campaign's directory (rerun the command to resume it)")
    parser.add_argument("--splits", default="0.4,0.6", help="Dirichlet alphas of FIMI's Table I columns (default 0.4,0.6)")
    parser.add_argument("--sweep-split", type=float, help="the alpha of the ablations and sweeps (default: the last "
                                                          "split, FIMI's Dir 0.6)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--ablations", default=",".join(ABLATIONS),
                        help=f"of {', '.join(ABLATIONS)}, or none (default: all)")
    parser.add_argument("--delta-max", dest="sweep_delta_max", default=",".join(map(str, DEFAULT_DELTA_MAX)),
                        help="the Delta_max sweep, values in (0, 1), or none (default 0.15,0.2,0.25,0.3)")
    parser.add_argument("--t-max", dest="sweep_t_max", default=",".join(f"{t:g}" for t in DEFAULT_T_MAX),
                        help="the T_max sweep in seconds, or none (default 20,30,45,60,90,120)")
    parser.add_argument("--target", type=float, default=0.95, help="FIMI's Table I target test accuracy (default 0.95: "
                                                                    "near what TFL reaches on digits, as FIMI's "
                                                                    "targets are near its TFL's best)")
    parser.add_argument("--gan-checkpoint", default="",
                        help="the GAN baseline's generator (default: the one shipped for the dataset)")
    parser.add_argument("--generator-checkpoint", default="",
                        help="the diffusion generator (default: the one shipped for the dataset)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 4),
                        help="runs at once (default: a quarter of the cores, at least 1; each run's simulated "
                             "devices share the cores it gets)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up on one run after this many seconds")
    parser.add_argument("--seeds", default="", help="one campaign per seed, e.g. 0,1,2, each in OUT/seed-N, then "
                                                    "seeds.md and seeds.json across them (instead of --seed)")
    add_run_flags(parser, skip=CAMPAIGN_SETTINGS)
    parser.set_defaults(**CAMPAIGN_DEFAULTS)
    for action in parser._actions:  # argparse keeps no other handle on an option's help
        if action.dest in CAMPAIGN_DEFAULTS:
            action.help = action.help.rsplit("(default", 1)[0] + f"(default: {CAMPAIGN_DEFAULTS[action.dest]})"


@dataclass
class CampaignRun:
    """One run of the campaign: where it goes and what it sets beyond the shared flags."""

    name: str  # its directory under the campaign's, e.g. split-0.4/fimi
    settings: dict = field(default_factory=dict)  # RunConfig fields
    generator: str = "diffusion"  # which service serves it ("": none)
    centralised: bool = False  # CLSD: no Flower, one process

    def out(self, root: Path) -> Path:
        return root / self.name


def campaign(splits, methods, ablations, delta_maxes, t_maxes, sweep_split: float) -> list[CampaignRun]:
    """The runs, each once: an ablation or sweep point that is a method's run reuses it."""
    runs: dict[str, CampaignRun] = {}

    def add(alpha: float, key: str, settings: dict | None) -> str:
        name = f"{split_name(alpha)}/{key}"
        if name not in runs:
            if settings is None:
                runs[name] = CampaignRun(name, {"dirichlet_alpha": alpha}, centralised=True)
            else:
                settings = dict(settings)
                generator = settings.pop("generator", "diffusion")
                runs[name] = CampaignRun(name, {"dirichlet_alpha": alpha, **settings}, generator)
        return name

    for alpha in splits:
        for method in methods:
            add(alpha, method, METHODS[method])
    if ablations or delta_maxes or t_maxes:  # what they are measured against
        add(sweep_split, "fimi", METHODS["fimi"])
    for ablation in ablations:
        key = ABLATIONS[ablation][1]
        add(sweep_split, key, METHODS.get(key) or EXTRA_RUNS[key])
    for setting, values in (("delta_max", delta_maxes), ("t_max_s", t_maxes)):
        for value in values:
            add(sweep_split, sweep_point(setting, value), {"policy": "fimi", setting: value})
    return list(runs.values())


def sweep_point(setting: str, value: float) -> str:
    """The run of a sweep point: FIMI's own at the default, else e.g. delta-max-0.15, t-max-30."""
    if value == getattr(RunConfig(), setting):
        return "fimi"
    return {"delta_max": "delta-max", "t_max_s": "t-max"}[setting] + f"-{value:g}"


def _names(option: str, text: str, known) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if text.strip() == "none":
        return []
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"{option} {text}: unknown {unknown[0]!r}; choose from {', '.join(known)}")
    if len(set(names)) < len(names):
        raise UsageError(f"{option} {text}: a name given twice")
    return names


def _values(option: str, text: str, good, domain: str) -> list[float]:
    if text.strip() == "none":
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text}: comma-separated numbers expected") from None
    bad = [v for v in values if not (math.isfinite(v) and good(v))]
    if bad:
        raise UsageError(f"{option} {text}: {bad[0]:g} is outside {domain}")
    if len(set(values)) < len(values):
        raise UsageError(f"{option} {text}: a value given twice")
    return values


@dataclass
class Campaign:
    runs: list[CampaignRun]
    splits: list[float]
    sweep_split: float
    ablations: list[str]
    sweeps: dict[str, list[float]]

    def figures_input(self, root: Path) -> tuple[dict[str, Path], dict[str, dict[float, Path]]]:
        """What commands.paper_figures draws [FIMI Fig. 5] from: the ablation variants' and the sweep
        points' run directories."""
        split = root / split_name(self.sweep_split)
        variants = {"FIMI": split / "fimi", **{ABLATIONS[a][0]: split / ABLATIONS[a][1] for a in self.ablations}}
        sweeps = {setting: {v: split / sweep_point(setting, v) for v in values} for setting, values in self.sweeps.items()}
        return variants, sweeps


def planned_campaign(args) -> Campaign:
    """The runs the flags ask for, every name and value checked before anything starts."""
    splits = _values("--splits", args.splits, lambda v: v > 0, "(0, inf): a Dirichlet alpha")
    if not splits:
        raise UsageError("--splits names no split")
    sweep_split = args.sweep_split if args.sweep_split is not None else splits[-1]
    methods = _names("--methods", args.methods, METHODS)
    ablations = [a for a in ABLATIONS if a in _names("--ablations", args.ablations, ABLATIONS)]  # [FIMI Fig. 5e]'s order
    delta_maxes = _values("--delta-max", args.sweep_delta_max, lambda v: 0 < v < 1, "(0, 1): a learning error")
    t_maxes = _values("--t-max", args.sweep_t_max, lambda v: v > 0, "(0, inf): seconds")
    if not 0 < args.target <= 1:
        raise UsageError(f"--target {args.target}: a test accuracy in (0, 1]")
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: at least 1")
    runs = campaign(splits, methods, ablations, delta_maxes, t_maxes, sweep_split)
    check_generators(args, {r.generator for r in runs if r.generator})
    return Campaign(runs, splits, sweep_split, ablations, {"delta_max": delta_maxes, "t_max_s": t_maxes})


def campaign_checkpoint(args, generator: str) -> str:
    """The checkpoint a campaign's `generator` service serves ("diffusion" or "gan"): the one
    named by its flag, else the one shipped for the dataset (UsageError saying how to make one)."""
    from generation.config import CheckpointError, shipped_checkpoint

    given = args.generator_checkpoint if generator == "diffusion" else args.gan_checkpoint
    if given:
        return given
    try:
        return str(shipped_checkpoint(args.dataset, generator))
    except CheckpointError as err:
        flag = "--generator-checkpoint" if generator == "diffusion" else "--gan-checkpoint"
        raise UsageError(f"--dataset {args.dataset}: {err}, and pass {flag} DIR") from None


def check_generators(args, generators: set[str]) -> None:
    """The checkpoints the campaign's services will serve, each fit for the dataset (a shipped
    diffusion model is fit by construction; only its presence is checked)."""
    from commands.checks import check_generator

    job = shared_config(args)
    if "diffusion" in generators:
        checkpoint = campaign_checkpoint(args, "diffusion")
        if args.generator_checkpoint:
            check_generator("--generator-checkpoint", checkpoint, job)
    if "gan" in generators:
        try:
            check_generator("--gan-checkpoint", campaign_checkpoint(args, "gan"), job)
        except UsageError as err:
            raise UsageError(f"{err} (the GAN baseline and the w/o DM ablation need it; train one with "
                             "`fedfill generator train --model gan`)") from None


def shared_config(args, **fixed) -> RunConfig:
    """The settings every run of the campaign shares: the flags, the campaign's own settings
    at their defaults (each run sets its own), the classifier job."""
    campaign_defaults = {f.name: f.default for f in fields(RunConfig) if f.name in CAMPAIGN_SETTINGS}
    return RunConfig.from_args(args, **{**campaign_defaults, "job": "classifier", **fixed})


def run_config(args, run: CampaignRun, root: Path, generator_address: str) -> RunConfig:
    """The run's settings: the shared ones, then the run's."""
    base = shared_config(args, out_dir=str(run.out(root)), generator_address=generator_address)
    return replace(base, **run.settings)


def run_flags(config: RunConfig) -> list[str]:
    """`fedfill run`'s flags that make exactly this RunConfig."""
    from commands.checks import flag_of

    flags = []
    for f in fields(RunConfig):
        if not f.metadata["cli"]:
            continue
        value = getattr(config, f.name)
        if isinstance(value, bool):
            flags += [flag_of(f.name)] if value else []
        else:
            flags += [flag_of(f.name), str(value)]
    return flags


def run_state(out: Path, rounds: int) -> str:
    """done (every round and the summary written), partial (a checkpoint to resume) or new."""
    if (out / "clsd.json").exists():  # centralised: written once, at its end
        return "done" if len(json.loads((out / "clsd.json").read_text())["curve"]) >= rounds else "new"
    if (out / "summary.json").exists() and (out / "rounds.csv").exists():
        if len(read_rounds(out / "rounds.csv")) >= rounds + 1:
            return "done"
    return "partial" if (out / "checkpoint.npz").exists() else "new"


def rounds_done(out: Path) -> int:
    try:
        return max(0, len(read_rounds(out / "rounds.csv")) - 1)
    except (OSError, ValueError, KeyError):
        return 0


def run(args) -> int:
    if not args.seeds:
        return run_campaign(args)
    seeds = _seeds(args.seeds)
    planned_campaign(args)  # a bad flag is refused once, before the first seed starts
    root = Path(args.out).resolve()
    seed_dirs = {seed: root / f"seed-{seed}" for seed in seeds}
    codes = []
    for seed, out in seed_dirs.items():
        print(f"fedfill reproduce: seed {seed} of {', '.join(map(str, seeds))}")
        codes.append(run_campaign(argparse.Namespace(**{**vars(args), "seed": seed, "out": str(out)})))
    from commands.paper_figures import write_across_seeds

    written = write_across_seeds(root, seed_dirs)
    print(f"reproduce: {', '.join(written)} in {root}, across seeds {', '.join(map(str, seeds))}")
    return max(codes)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: whole numbers expected, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds {text!r}: one or more seeds of 0 or more")
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"--seeds {text!r}: a seed given twice")
    return seeds


def run_campaign(args) -> int:
    """One seed's campaign in args.out: every run it plans, then its tables and figures."""
    from commands.checks import check_job
    from commands.run import check_report_dir, interrupts_stop_the_run

    plan = planned_campaign(args)
    runs, splits, sweep_split = plan.runs, plan.splits, plan.sweep_split
    root = Path(args.out).resolve()
    check_report_dir("--out", root)
    configs = {r.name: run_config(args, r, root, "127.0.0.1:1") for r in runs}
    for r in runs:  # every federated run checked before the first one starts
        if not r.centralised:
            try:
                check_job(configs[r.name])
            except UsageError as err:
                raise UsageError(f"the run {r.name}: {err}") from None
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    states = {r.name: run_state(r.out(root), args.rounds) for r in runs}
    todo = [r for r in runs if states[r.name] != "done"]
    print(f"fedfill reproduce: {len(runs)} runs ({len(runs) - len(todo)} already done), {args.num_partitions} "
          f"devices, {args.rounds} rounds, splits {', '.join(map(str, splits))} -> {root}")
    failed: list[str] = []
    services = {}
    children = Children()
    with interrupts_stop_the_run():
        try:
            services = start_services(root, {r.generator for r in todo if r.generator}, args)
            progress = CampaignProgress(root, runs, args.rounds, states)
            with progress:
                def one(r: CampaignRun) -> None:
                    config = replace(configs[r.name], generator_address=services[r.generator].address
                                     if r.generator in services else "")
                    progress.started(r)
                    if r.centralised:
                        ok = run_centralised_logged(config, r.out(root), args.rounds)
                    else:
                        ok = run_federated(config, r.out(root), states[r.name] == "partial", args.timeout,
                                           children)
                    progress.finished(r, ok, stopped=children.stopping)
                    if not ok:
                        failed.append(r.name)

                pool = ThreadPoolExecutor(max_workers=args.jobs)
                try:
                    for _ in pool.map(one, todo):
                        pass
                except BaseException:  # an interrupt: no new run starts, the running ones stop
                    pool.shutdown(wait=False, cancel_futures=True)
                    children.stop()
                    pool.shutdown(wait=True)
                    raise
                pool.shutdown()
        finally:
            for service in services.values():
                service.stop()
    wall = time.monotonic() - started
    from commands.paper_figures import write_evaluation

    written = write_evaluation(root, splits, args.target, *plan.figures_input(root), sweep_split)
    (root / "campaign.json").write_text(json.dumps(
        {"wall_s_this_invocation": wall, "runs": [r.name for r in runs], "failed": failed, "splits": splits,
         "sweep_split": sweep_split, "nodes": args.num_partitions, "rounds": args.rounds, "seed": args.seed,
         "dataset": args.dataset, "target_accuracy": args.target}, indent=1) + "\n")
    print(f"reproduce: {', '.join(written)} in {root} ({wall / 60:.1f} min)")
    if failed:
        print(f"fedfill reproduce: {len(failed)} run(s) failed: {', '.join(failed)} (see their run.log); rerun the "
              "command to retry them", file=sys.stderr)
        return 1
    return 0


def start_services(root: Path, generators: set[str], args) -> dict:
    """One generation service per generator the pending runs need, with a cache that outlives
    the campaign (a resumed campaign asks again and is served from it)."""
    from deploy.local import GenerationProcess

    services = {}
    try:  # an interrupt while they load stops the ones already launched
        for name in sorted(generators):
            services[name] = GenerationProcess(root / "logs" / name, root / "generator-cache" / name,
                                               checkpoint=campaign_checkpoint(args, name)).launch()
        for service in services.values():
            service.wait_serving()
    except BaseException:
        for service in services.values():
            service.stop()
        raise
    return services


class Children:
    """The `fedfill run` processes in flight, so that an interrupt of the campaign ends them too
    (a SIGTERM to the campaign alone reaches no child)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, command: list[str], log) -> int:
        with self.lock:
            if self.stopping:
                return 130
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            self.running.add(process)
        try:
            return process.wait()
        finally:
            with self.lock:
                self.running.discard(process)

    def stop(self) -> None:
        """SIGTERM each: `fedfill run` then stops every process it started and exits."""
        with self.lock:
            self.stopping = True
            for process in self.running:
                process.terminate()


def run_federated(config: RunConfig, out: Path, resume: bool, timeout: float, children: Children) -> bool:
    """`fedfill run` of one campaign run, its output in OUT/run.log."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "fedfill", "run", *run_flags(replace(config, resume=resume)), "--out", str(out),
               "--generator", config.generator_address or "none", "--timeout", str(timeout)]
    with open(out / "run.log", "a" if resume else "w") as log:
        return children.run(command, log) == 0


def run_centralised_logged(config: RunConfig, out: Path, epochs: int) -> bool:
    """CLSD with its failure in OUT/run.log, as a federated run's: the campaign goes on."""
    import traceback

    out.mkdir(parents=True, exist_ok=True)
    try:
        run_centralised(config, out, epochs)
        return True
    except Exception:  # noqa: BLE001 - one run's failure is reported, the others still run
        (out / "run.log").write_text(traceback.format_exc())
        return False


def run_centralised(config: RunConfig, out: Path, epochs: int) -> None:
    """CLSD: the classifier trained centrally on the server's synthetic set alone, one epoch a
    'round', the test accuracy after each (OUT/clsd.json)."""
    from jobs.classifier import ClassifierJob
    from jobs import run_split
    from server.app import server_synthetic_set

    job = ClassifierJob(config)
    images, labels = server_synthetic_set(config, len(run_split(config).clients), job.num_classes)
    weights, curve = job.initial_weights(), []
    for epoch in range(1, epochs + 1):
        result = job.train(weights, images, labels, seed=config.seed * 1000 + epoch, threads=1)
        weights = result.weights
        curve.append({"epoch": epoch, **job.evaluate(weights), "train_loss": result.loss})
    (out / "clsd.json").write_text(json.dumps({"synthetic_samples": int(len(labels)), "curve": curve,
                                               "best_accuracy": max(c["accuracy"] for c in curve)}, indent=1) + "\n")


class CampaignProgress:
    """A rich display of the whole campaign: rounds done over all runs, and each active run,
    read from the runs' own reports every second."""

    def __init__(self, root: Path, runs: list[CampaignRun], rounds: int, states: dict[str, str]):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.root, self.runs, self.rounds = root, runs, rounds
        self.finished_runs = {r.name for r in runs if states[r.name] == "done"}
        # rounds each run had when the campaign started: only an active run's report grows
        self.at_start = {r.name: 0 if r.centralised else min(rounds, rounds_done(r.out(root))) for r in runs}
        self.active: dict[str, tuple[CampaignRun, int]] = {}
        self.lock = threading.Lock()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), refresh_per_second=2)
        self.total = self.progress.add_task("campaign (rounds of all runs)", total=rounds * len(runs))
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._refresh()
        self.progress.start()
        self.watcher.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.watcher.join()
        self._refresh()
        self.progress.stop()

    def started(self, run: CampaignRun) -> None:
        with self.lock:
            task = self.progress.add_task(f"  {run.name}", total=self.rounds, completed=self._done(run))
            self.active[run.name] = (run, task)

    def finished(self, run: CampaignRun, ok: bool, stopped: bool = False) -> None:
        with self.lock:
            _, task = self.active.pop(run.name)
            self.progress.remove_task(task)
            if ok:
                self.finished_runs.add(run.name)
            said = "done" if ok else "stopped (it resumes when the command is run again)" if stopped else "[red]failed[/]"
            self.progress.console.print(f"{said}: {run.name}")
        self._refresh()

    def _done(self, run: CampaignRun) -> int:
        if run.name in self.finished_runs:
            return self.rounds
        if run.centralised or run.name not in self.active:
            return self.at_start[run.name]
        return min(self.rounds, rounds_done(run.out(self.root)))

    def _refresh(self) -> None:
        with self.lock:
            for run, task in self.active.values():
                self.progress.update(task, completed=self._done(run))
            self.progress.update(self.total, completed=sum(self._done(r) for r in self.runs))

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            self._refresh()
