"""A run's settings: the one schema behind Flower's run config, pyproject's
[tool.flwr.app.config] and the flags of `fedfill run`.

The ServerApp and every ClientApp read the same run config, so both sides agree on the data
split, the model and the device fleet. Keys are Flower run-config keys: the field names in
kebab-case. `fedfill run` makes its flags from the fields here (`add_flags`), and a test
holds pyproject's defaults to `RunConfig()`, so a setting is added in one place.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields


def setting(default, help: str, *, flag: str | None = None, cli: bool = True):
    """A run-config field; `flag` names its `fedfill run` option when it is not --the-key."""
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli})


@dataclass(frozen=True)
class RunConfig:
    job: str = setting("classifier", "what the devices train (jobs.JOBS)")
    dataset: str = setting("digits", "digits (embedded), mnist5k (embedded: 5,000 28x28 MNIST digits, "
                                      "pip install 'fedfill[mnist]'), synthetic-digits (for fleets beyond ~98 "
                                      "devices: the shipped GAN draws 50 training images a device, tested on the "
                                      "real digits) or cifar10, gtsrb, fmnist, cinic10 from --data-dir")
    data_dir: str = setting("", "where a real dataset lives, in its published format")
    num_partitions: int = setting(10, "devices in the fleet (SuperNodes)", flag="--nodes")
    # sampled rounds: Flower's FedAvg fraction_train and min_train_nodes; the planner plans the sampled devices
    fraction_train: float = setting(1.0, "the fraction of the connected nodes each round samples to train, in (0, 1] "
                                         "(Flower's FedAvg fraction_train)", flag="--fraction")
    min_train_nodes: int = setting(1, "a round samples at least this many nodes, at most --nodes (Flower's "
                                      "min_train_nodes)", flag="--min-nodes")
    traces: str = setting("", "a device trace file (JSON, `fedfill traces`): when each device is on and its compute "
                              "and uplink factors; a virtual clock advances by each round's modeled latency and "
                              "a round samples the devices on at it; empty: every device always on")
    dirichlet_alpha: float = setting(0.3, "Dirichlet concentration of the label split", flag="--alpha")
    seed: int = setting(0, "seed of the split, the plans and the training; the same seed, the same run")
    rounds: int = setting(30, "federated rounds")
    policy: str = setting("fimi", "the allocation policy the strategy plans with (strategies.allocation: "
                                  "fimi, tfl, hdc, fixed, ondemand, fimi+ondemand, or fp32 / fixed-N: every device at N bits)")
    bits_rule: str = setting("codec", "how ondemand turns an error demand into bits: codec (a model of fedfill's "
                                      "codec) or theorem1 (ODQ's Theorem 1 as printed)")
    local_epochs: int = setting(1, "tau: local epochs per round")
    # FIMI uses lr 0.02, batch 64 on 1250 samples a device; a digits device holds ~100, and
    # 0.05 / 16 reaches 94% in 30 rounds where 0.02 / 64 reaches 76% (measured, README).
    lr: float = setting(0.05, "local learning rate (SGD for the classifier, AdamW for ddpm)")
    batch_size: int = setting(16, "local batch size")
    t_max_s: float = setting(60.0, "latency budget of a round, seconds", flag="--t-max")
    # [FIMI] gives no zeta: the error target asks for this much more data per device on average.
    synthetic_fraction: float = setting(0.5, "the error target asks for this much more data per device "
                                             "on average (sets FIMI's zeta)")
    learning_fit: str = setting("", "learning-model fit JSON from `fedfill fit-learning`; "
                                    "empty: the one shipped for the dataset")
    delta_max: float = setting(0.2, "Delta_max, FIMI's target on the global learning error (constraint 13a): "
                                    "smaller asks for more synthetic data; zeta is set at FIMI's 0.2")
    # what the devices' synthetic samples are for (the baselines of [FIMI §V-B])
    synthetic_use: str = setting("labelled", "labelled (FIMI: train on them with their labels), unlabelled "
                                             "(SEMI: labels withheld, pseudo-labels above a confidence threshold) "
                                             "or server (SST: the server keeps them and adds its own update)")
    pseudo_label_threshold: float = setting(0.95, "SEMI: an unlabelled sample counts when the model's top "
                                                  "class probability reaches this (FixMatch's 0.95)")
    # the server's screening and merging of updates (strategies.fimi_strategy, check_aggregation)
    aggregation: str = setting("fedavg", "how the server merges the screened updates: fedavg (weighted by D_loc + "
                                         "D_gen), median (coordinate-wise) or trimmed-mean (both unweighted, "
                                         "Flower's FedMedian and FedTrimmedAvg)")
    trim_beta: float = setting(0.2, "the fraction trimmed-mean cuts from each tail of every coordinate, in [0, 0.5)")
    norm_bound: float = setting(10.0, "the norm screen's bound: this many times the round's median update norm "
                                      "(rounds of 3 or more updates); 0: no norm screening")
    norm_screen: str = setting("adaptive", "what the norm screen does with an update above the bound "
                                           "(strategies.screening): adaptive (scale it down to the bound, and "
                                           "drop it where it is also above 4 x the largest round median so far: "
                                           "honest stragglers after convergence are kept), median (drop it) or "
                                           "clip (scale it down to the bound)")
    # experiments: poisoned updates (client.app applies them, bench/bench_robust.py measures them)
    attack: str = setting("", "turn the first --attackers nodes malicious: scale:F multiplies each update they send "
                              "by F (scale:-100, a boosted sign flip), sign-flip by -1; empty: none")
    attackers: int = setting(0, "how many nodes (partitions 0..K-1) --attack turns malicious")
    generator_address: str = setting("", "host:port of the generation service; empty: no synthetic data",
                                     cli=False)  # `fedfill run --generator` sets it
    generator_steps: int = setting(20, "sampling steps the generation service uses")
    generator_guidance: float = setting(2.0, "classifier-free guidance scale of the generated samples")
    generator_checkpoint: str = setting("", "the generator a device completes a split delivery with; empty: the "
                                            "shipped one (node config generator-checkpoint overrides it)",
                                        cli=False)  # `fedfill run --generator-checkpoint` sets it
    # split generation [MEG]: how the synthetic samples reach a device
    delivery: str = setting("image", "how generated samples reach a device [MEG]: image (the service samples "
                                     "them), state (the service runs the first --delivery-server-steps and sends "
                                     "its state), sketch (low-resolution images the device completes), seed "
                                     "(the device generates them), or auto (the planner picks each device's "
                                     "mode, hand-off and bits every round)")
    delivery_server_steps: int = setting(0, "state, sketch: the sampler step a device takes over at; 0: half the "
                                            "generator steps")
    delivery_state_bits: int = setting(8, "state: the codec's bits per element of the hand-off, 2..32")
    delivery_sketch_factor: int = setting(2, "sketch: downsampling per side, dividing the image size")
    delivery_downlink_bps: float = setting(20e6, "auto: the devices' downlink rate the planner assumes (bit/s)")
    delivery_rx_power_w: float = setting(0.1, "auto: a device's power while receiving (W): what a second of "
                                              "downlink costs it in the planner's objective")
    delivery_server_passes: int = setting(0, "auto: UNet passes the generation service can run in a round, all "
                                             "devices together; 0: no limit")
    # priced offloading [GenMEN]: the server prices sampler steps, each device takes what pays it
    pricing: str = setting("off", "priced offloading of the sampler steps [GenMEN]: off, exact (the oracle, "
                                  "which knows every device's theta), gdm, ppo (learned pricers), random, or "
                                  "fixed:P (P per step-image); needs --delivery state")
    pricing_server_cost: float = setting(1.0, "kappa: what one step-image (one sampler step of one image) costs "
                                              "the server, in the price's money")
    pricing_revenue: float = setting(0.0, "R: the server's revenue a round, added to its utility (reporting only)")
    pricing_budget_s: float = setting(0.5, "seconds of its f_max a device may spend on sampler steps a round: its "
                                           "public capacity C_n in step-images (the cost model's cycles)")
    pricer: str = setting("", "gdm, ppo: the pricer checkpoint (fedfill price ... --save); empty: the server "
                              "trains one for the run's nodes at start and saves it in the report's pricer/")
    synthetic_refresh: float = setting(0.0, "the fraction of its synthetic samples a device regenerates every round "
                                            "(so the pricing game recurs after the first fill); 0: keep them")
    # the ddpm job (jobs.ddpm)
    start_checkpoint: str = setting("", "the generator the ddpm job fine-tunes; empty: the shipped one that saw "
                                        "only digits 0-4")
    trainable: str = setting("full", "what the ddpm job fine-tunes and uploads: full (every UNet weight) or lora "
                                     "(LoRA adapters on its attention and convolution layers)")
    lora_rank: int = setting(4, "rank of the LoRA adapters (--trainable lora)")
    eval_per_class: int = setting(30, "samples per class the ddpm job's evaluation draws each round")
    eager_gpu_steps: bool = setting(False, "ddpm job: run the local steps eagerly on a GPU instead of replaying "
                                           "them as one CUDA graph (generation.step); no effect on the CPU")
    inception: str = setting("", "the FID Inception TorchScript (inception-2015-12-05.pt), if you have it: the "
                                 "ddpm job's evaluation adds the standard FID")
    out_dir: str = setting("runs/latest", "report directory", cli=False)  # `fedfill run --out` sets it
    resume: bool = setting(False, "continue the run in the report directory from its last checkpoint")
    node_wait_s: float = setting(60.0, "how long the server waits for nodes before going on with fewer")
    reply_timeout_s: float = setting(600.0, "how long the server waits for a round's replies at most; a node that "
                                            "dies, in training or mid-upload, is given up on sooner, once the "
                                            "SuperLink counts it offline (20 s after its last heartbeat)")

    @classmethod
    def from_run_config(cls, run_config) -> "RunConfig":
        """From Flower's run config (kebab-case keys; missing keys keep their defaults)."""
        values = {}
        for f in fields(cls):
            key = key_of(f.name)
            if key in run_config:
                value = run_config[key]
                values[f.name] = (str(value).lower() in ("1", "true")) if isinstance(f.default, bool) else type(f.default)(value)
        return cls(**values)

    def to_run_config(self) -> dict:
        return {key_of(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_args(cls, args: argparse.Namespace, **fixed) -> "RunConfig":
        """From the flags `add_flags` made, plus the fields the launcher sets itself; a flag
        the user did not give takes its job's default (JOB_DEFAULTS), then its dataset's for
        that job (DATASET_DEFAULTS), where they have one."""
        given = getattr(args, GIVEN, set())
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata["cli"] and f.name not in fixed}
        job = fixed.get("job", values.get("job", cls.job))
        dataset = fixed.get("dataset", values.get("dataset", cls.dataset))
        for defaults in (JOB_DEFAULTS.get(job, {}), DATASET_DEFAULTS.get((job, dataset), {})):
            values.update({name: value for name, value in defaults.items() if name not in given and name not in fixed})
        return cls(**values, **fixed)


def sampled_count(online: int, fraction: float, minimum: int) -> int:
    """How many of `online` nodes a round samples: Flower's FedAvg rule (the fraction, rounded
    down, at least the minimum), at most the nodes there are."""
    return min(online, max(minimum, int(online * fraction)))


SYNTHETIC_USES = ("labelled", "unlabelled", "server")  # RunConfig.synthetic_use: FIMI, SEMI, SST
DELIVERIES = ("image", "sketch", "state", "seed")  # who does the sampling [MEG]; RunConfig.delivery adds auto
AGGREGATIONS = ("fedavg", "median", "trimmed-mean")  # the rules of RunConfig.aggregation
NORM_SCREENS = ("adaptive", "median", "clip")  # RunConfig.norm_screen (strategies.screening)
PRICINGS = ("off", "exact", "gdm", "ppo", "random")  # RunConfig.pricing, besides fixed:P
LEARNED_PRICINGS = ("gdm", "ppo", "random")  # strategies.learned's pricers


def parse_pricing(pricing: str) -> tuple[str, float]:
    """(kind, price): the kind of RunConfig.pricing and, for fixed:P, its price P (0 otherwise);
    ValueError saying what would work."""
    if pricing in PRICINGS:
        return pricing, 0.0
    kind, sep, value = pricing.partition(":")
    if kind == "fixed" and sep:
        try:
            price = float(value)
        except ValueError:
            price = float("nan")
        if price >= 0 and price < float("inf"):
            return "fixed", price
        raise ValueError(f"--pricing {pricing}: fixed:P needs a finite price P >= 0 per step-image")
    raise ValueError(f"--pricing {pricing}: choose one of {', '.join(PRICINGS)} or fixed:P (P >= 0)")


def check_aggregation(aggregation: str, trim_beta: float, norm_bound: float, norm_screen: str = "adaptive") -> None:
    """ValueError naming the bad setting, so a run refuses it before it starts (the strategy
    checks again when it is built)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    if not 0.0 <= trim_beta < 0.5:
        raise ValueError(f"trim-beta {trim_beta} is outside [0, 0.5): trimmed-mean cuts that fraction from "
                         "each tail, and at 0.5 nothing is left")
    check_norm_screen(norm_screen, norm_bound)


def check_norm_screen(norm_screen: str, norm_bound: float) -> None:
    """ValueError naming a norm screen (strategies.screening) that is not one, or a bad bound."""
    if norm_screen not in NORM_SCREENS:
        raise ValueError(f"unknown norm screen {norm_screen!r}: choose one of {', '.join(NORM_SCREENS)}")
    if not (norm_bound >= 0.0 and norm_bound < float("inf")):  # NaN too
        raise ValueError(f"norm-bound {norm_bound} must be 0 (no norm screening) or positive and finite")


def parse_attack(attack: str) -> float:
    """The factor an attacker multiplies its update by: `scale:F` (F finite, not 1) or
    `sign-flip` (-1), as bench/bench_robust.py's attackers do; ValueError naming the spec."""
    if attack == "sign-flip":
        return -1.0
    if attack.startswith("scale:"):
        try:
            factor = float(attack.split(":", 1)[1])
        except ValueError:
            factor = float("nan")
        if abs(factor) < float("inf") and factor != 1.0:
            return factor
    raise ValueError(f"--attack {attack}: choose scale:F (a finite factor other than 1, e.g. scale:-100) "
                     "or sign-flip")


def check_attack(attack: str, attackers: int, nodes: int) -> None:
    """ValueError unless the attack names a factor and 1 <= attackers < nodes (an experiment
    with every node malicious measures nothing), or there is no attack and no attackers."""
    if not attack:
        if attackers:
            raise ValueError(f"--attackers {attackers}: name the attack too (--attack scale:F or sign-flip)")
        return
    parse_attack(attack)
    if not 1 <= attackers < nodes:
        raise ValueError(f"--attackers {attackers}: --attack {attack} turns the first K of the {nodes} nodes "
                         f"malicious; K must be in 1..{nodes - 1}")


# run-config values a job changes from the defaults above when the user gives none
JOB_DEFAULTS = {
    # [ODQ]: per-device bits from the error demand, T_max 15 s (strategies.allocation.presets);
    # AdamW at 5e-4 on batches of 32, 5 local epochs (measured on digits, README)
    "ddpm": {"policy": "ondemand", "lr": 5e-4, "batch_size": 32, "local_epochs": 5, "t_max_s": 15.0},
}
# and those a dataset changes for a job (applied after the job's): at 28x28 the digits-tuned
# lr 0.05 diverges (20 devices at Dir 0.4: median first update norm 5.0 against 1.2 at 0.02,
# and FedAvg's merge went to NaN in round 1); FIMI's own 0.02 trains ([FIMI §V-A])
DATASET_DEFAULTS = {
    ("classifier", "mnist5k"): {"lr": 0.02},
}
GIVEN = "given_flags"  # the argparse namespace attribute naming the run-config flags the user gave


class _Given(argparse.Action):
    """Store the value and remember that the user gave it (RunConfig.from_args)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if self.nargs == 0 else values)
        setattr(namespace, GIVEN, {*getattr(namespace, GIVEN, set()), self.dest})


def key_of(name: str) -> str:
    return name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, choices: dict[str, tuple] | None = None,
              skip: tuple[str, ...] = (), types: dict | None = None) -> None:
    """One option per run-config field (`--the-key`, or the field's own flag); `choices`
    narrows a field to the values a role knows, `types` checks one with a function (the
    policies live with the planner); `skip` leaves out fields the launcher sets itself (a
    testbed knows its number of nodes)."""
    choices, types = choices or {}, types or {}
    for f in fields(RunConfig):
        if not f.metadata["cli"] or f.name in skip:
            continue
        flag = f.metadata["flag"] or "--" + key_of(f.name)
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=_Given, nargs=0, default=False, help=f.metadata["help"])
            continue
        job_defaults = {job: values[f.name] for job, values in JOB_DEFAULTS.items() if f.name in values}
        dataset_defaults = {key: values[f.name] for key, values in DATASET_DEFAULTS.items() if f.name in values}
        shown = (f"default: {default!r}" + "".join(f"; {v!r} for --job {job}" for job, v in job_defaults.items())
                 + "".join(f"; {v!r} for the {job} on {dataset}" for (job, dataset), v in dataset_defaults.items()))
        parser.add_argument(flag, dest=f.name, action=_Given, type=types.get(f.name, type(default)), default=default,
                            choices=choices.get(f.name), metavar=None if f.name in choices else key_of(f.name).upper(),
                            help=f"{f.metadata['help']} ({shown})")


def toml_value(value) -> str:
    """A run-config value in TOML (Flower's run config and pyproject use TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def run_config_toml(config: RunConfig) -> str:
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in config.to_run_config().items())
