"""`fedfill generator train | sample | serve | evaluate | convert`."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np

from fedfill.errors import UsageError

from generation.config import MODELS, CheckpointError, shipped_checkpoint
from generation.train import GAN_LR


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_train_arguments(sub.add_parser("train", help="train the class-conditional DDPM (or, with --model gan, "
                                        "a GAN) on a dataset's public split"))

    for name, help_text in (("sample", "write generated images to .npz or a .png grid"),
                            ("evaluate", "measure class fidelity, Fréchet distance and copying")):
        p = sub.add_parser(name, help=help_text)
        _add_checkpoint_arguments(p)
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--guidance", type=float, default=2.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--sampler", default="ddim", choices=("ddim", "dpm", "ddpm"))
        if name == "sample":
            p.add_argument("--class", dest="klass", type=int, required=True)
            p.add_argument("--n", type=int, default=16)
            p.add_argument("--out", required=True, help="FILE.npz (arrays images, labels) or FILE.png (a grid)")
            _add_delivery_arguments(p)
        else:
            p.add_argument("--per-class", type=int, default=100)
            p.add_argument("--data-dir", help="where the checkpoint's dataset lives here, if not where it was "
                           "trained (the dataset and its split seed are always the checkpoint's own)")
            p.add_argument("--json", action="store_true")
            p.add_argument("--inception", metavar="FILE", help="the FID Inception TorchScript "
                           "(inception-2015-12-05.pt) if you have it locally: adds the standard FID")

    serve = sub.add_parser("serve", help="serve Generate over gRPC (with health checking and a cache)")
    _add_checkpoint_arguments(serve)
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--cache", default="", help="cache directory (default: CHECKPOINT/cache)")

    health = sub.add_parser("health", help="exit 0 if the service at ADDRESS reports SERVING, else 1 "
                                           "(for container health checks)")
    health.add_argument("address", nargs="?", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)")
    convert = sub.add_parser("convert", help="rewrite a checkpoint of the old layout (config.json + "
                             "model.safetensors) as a diffusers pipeline directory, same weights")
    convert.add_argument("--from", dest="source", required=True, help="the old checkpoint directory")
    convert.add_argument("--to", dest="target", required=True, help="where to write (the same directory: in place, "
                         "old files removed)")
    convert.add_argument("--dataset", help="the dataset it was trained on (default: from its recorded command)")
    convert.add_argument("--data-dir", help="where that dataset lives (default: from its recorded command)")
    convert.add_argument("--split-seed", type=int, help="its split seed (default: from its recorded command)")


def _add_checkpoint_arguments(p) -> None:
    p.add_argument("--checkpoint", help="a generator's directory (default: the diffusion model shipped for --dataset)")
    p.add_argument("--dataset", help="use the diffusion model shipped for this embedded dataset: digits (the "
                   "default) or mnist5k")


def _checkpoint(args) -> str:
    """The generator sample, evaluate and serve use: --checkpoint, else the one shipped for
    --dataset (digits by default). Both at once would be two answers to one question."""
    if args.checkpoint and args.dataset:
        raise UsageError(f"--checkpoint {args.checkpoint} --dataset {args.dataset}: give one (--dataset picks the "
                         "generator shipped for it; a checkpoint records its own dataset)")
    return args.checkpoint or str(shipped_checkpoint(args.dataset or "digits"))


def _add_delivery_arguments(p) -> None:
    from fedfill.config import DELIVERIES

    p.add_argument("--delivery", choices=DELIVERIES, help="split the work between the generation service and this "
                   "device [MEG]: image (the service does it all), state (the service runs the first --server-steps "
                   "steps and sends its state at --state-bits), sketch (the service sends its images downsampled "
                   "--sketch-factor times; the device noises them to --server-steps and denoises), seed (the device "
                   "generates them). Without it the images are sampled here, with no service")
    p.add_argument("--server-steps", type=int, help="state, sketch: the step the device takes over at, "
                   "1..steps-1 (default: half the steps)")
    p.add_argument("--state-bits", type=int, default=8, help="state: the codec's bits per element, 2..32 (default 8)")
    p.add_argument("--sketch-factor", type=int, default=2, help="sketch: downsampling per side (default 2)")
    p.add_argument("--naive-resume", action="store_true", help="state: resume at the hand-off step as if the "
                   "state were exact (the ablation of the noise-aware resume)")
    p.add_argument("--channel-snr-db", type=float, metavar="DB", help="state, experiments only: white Gaussian "
                   "noise on the received state at this signal-to-noise ratio")
    p.add_argument("--service", metavar="HOST:PORT", help="a running generation service (with the same "
                   "checkpoint as --checkpoint); default: one started in this process for the call")
    p.add_argument("--json", action="store_true", help="print one JSON object: the bytes and the work on each side")


# Defaults per model: the GAN's lr is DCGAN's (generation.train.GAN_LR), the DDPM's its own.
TRAIN_DEFAULTS = {"ddpm": {"steps": 3000, "batch_size": 64, "lr": 1e-3},
                  "gan": {"steps": 3000, "batch_size": 64, "lr": GAN_LR}}


def _add_train_arguments(train) -> None:
    train.add_argument("--model", choices=MODELS, default="ddpm",
                       help="ddpm: the class-conditional diffusion model (default); gan: the GAN baseline of FIMI")
    train.add_argument("--dataset", default="digits")
    train.add_argument("--data-dir", default="", help="where a real dataset lives")
    train.add_argument("--out", required=True, help="checkpoint directory (resumes if it holds a train state)")
    train.add_argument("--steps", type=int, help="default 3000")
    train.add_argument("--batch-size", type=int, help="default 64")
    train.add_argument("--lr", type=float, help="default 0.001 for ddpm, 0.0002 for gan (Adam, betas 0.5, 0.999)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--split-seed", type=int, default=0, help="seed of the public/clients/test split")
    train.add_argument("--eager-gpu-steps", action="store_true",
                       help="ddpm on a GPU: run the steps eagerly instead of replaying them as one CUDA graph")
    train.add_argument("--block-out-channels", metavar="W1,W2,...",
                       help="the network's channel widths, one per resolution (ddpm: the UNet's, default 32,64; "
                            "gan: the generator's, default by image size); each halving of the image must divide it")
    train.add_argument("--classes", help="train only on the public split's images of these classes, e.g. 0,1,2,3,4 "
                       "or 0-4 (default: all); the generator still has every class of the dataset, to learn the "
                       "others later")


def run(args) -> int:
    try:
        if args.action in ("sample", "evaluate", "serve"):
            args.checkpoint = _checkpoint(args)
        return {"train": _train, "sample": _sample, "serve": _serve, "evaluate": _evaluate,
                "convert": _convert, "health": _health}[args.action](args)
    except CheckpointError as err:
        raise UsageError(str(err)) from None


def _train(args) -> int:
    from fedfill.data import split_dataset

    from generation.train import parse_classes, train_generator

    for name, default in TRAIN_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.steps < 1 or args.batch_size < 1:
        raise UsageError("--steps and --batch-size must be positive")
    split = split_dataset(_load(args.dataset, args.data_dir), seed=args.split_seed)
    classes = None
    if args.classes is not None:
        try:
            classes = parse_classes(args.classes, split.public.num_classes)
        except ValueError as err:
            raise UsageError(str(err)) from None
        counts = split.public.class_counts()
        empty = [c for c in classes if counts[c] == 0]
        if empty:
            raise UsageError(f"--classes {args.classes}: the public split of {args.dataset} holds no images of "
                             f"class {empty[0]}")
    widths = _parse_widths(args.block_out_channels)
    data_dir = ["--data-dir", args.data_dir] if args.data_dir else []
    # the classes as a canonical list: "0-4" and "4,0-3" record (and make) the same checkpoint
    chosen = ["--classes", ",".join(map(str, classes))] if classes is not None else []
    model = ["--model", args.model] if args.model != "ddpm" else []  # a DDPM's command reads as it always did
    command = shlex.join(["fedfill", "generator", "train", *model, "--dataset", args.dataset, *data_dir,
                          "--out", args.out, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                          "--lr", str(args.lr), "--seed", str(args.seed), "--split-seed", str(args.split_seed),
                          *chosen, *(["--block-out-channels", ",".join(map(str, widths))] if widths else [])])
    trainer, extra = train_generator, {"cuda_graphs": not args.eager_gpu_steps}
    if args.model == "gan":
        if args.eager_gpu_steps:
            raise UsageError("--eager-gpu-steps is for --model ddpm: the GAN's steps always run eagerly")
        from generation.train import train_gan as trainer  # the same arguments, the other model

        extra = {}
    if widths:
        extra["block_out_channels" if args.model == "ddpm" else "widths"] = widths
    try:
        trainer(split.public.images, split.public.labels, split.public.class_names, args.out,
                steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, command=command,
                dataset=args.dataset, data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else "",
                split_seed=args.split_seed, classes=classes, **extra)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"checkpoint: {args.out} (a diffusers pipeline directory; generator.json: classes and provenance)")
    return 0


def _parse_widths(spec: str | None) -> tuple[int, ...] | None:
    """--block-out-channels "16,32,64" -> (16, 32, 64); None when not given."""
    if spec is None:
        return None
    try:
        widths = tuple(int(w) for w in spec.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise UsageError(f"--block-out-channels {spec!r}: give positive integers, one per resolution, e.g. 16,32,64")
    return widths


def _health(args) -> int:
    from generation.client import serving

    up = serving(args.address)
    print(f"{args.address}: {'SERVING' if up else 'not serving'}")
    return 0 if up else 1


def _load(dataset: str, data_dir: str):
    from fedfill.data import load_dataset

    try:
        return load_dataset(dataset, data_dir or None)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None


def _sample(args) -> int:
    from generation.checkpoint import load_generator
    from generation.sample import sample

    out = Path(args.out)
    if out.suffix not in (".npz", ".png"):
        raise UsageError(f"--out must end in .npz or .png, got {out.name}")
    if not 1 <= args.n <= 20_000:
        raise UsageError(f"--n must be from 1 to 20000, got {args.n}")
    split = args.delivery is not None or args.service is not None or args.json
    if not split and (args.server_steps is not None or args.naive_resume or args.channel_snr_db is not None):
        raise UsageError("--server-steps, --naive-resume and --channel-snr-db go with --delivery")
    config, pipe = load_generator(args.checkpoint)
    if not 0 <= args.klass < config.num_classes:
        raise UsageError(f"unknown class {args.klass}: this generator knows classes 0..{config.num_classes - 1}")
    labels = np.full(args.n, args.klass, dtype=np.int64)
    figures = None
    if split:
        images, figures = _sample_delivered(args, config, pipe)
    else:
        images = sample(config, pipe, labels, steps=args.steps, guidance=args.guidance, seed=args.seed,
                        sampler=args.sampler)
    if out.suffix == ".npz":
        np.savez(out, images=images, labels=labels)
    else:
        save_grid(images, out)
    if args.json:
        print(json.dumps({**figures, "out": str(out)}))
    else:
        print(f"{args.n} images of class {args.klass} -> {out}")
    return 0


def _sample_delivered(args, config, pipe) -> tuple[np.ndarray, dict]:
    """The images of one request in a delivery mode, through a real service (this process's
    own, or --service), completed here; and what each side did."""
    import tempfile

    from generation.client import GenerationClient, GenerationUnavailable
    from generation.delivery import DigestMismatch, finish
    from generation.service import serve

    delivery = args.delivery or "image"
    server_steps = args.server_steps if args.server_steps is not None else args.steps // 2
    if args.channel_snr_db is not None and delivery != "state":
        raise UsageError("--channel-snr-db is for --delivery state")
    counts = [args.n if c == args.klass else 0 for c in range(config.num_classes)]
    with tempfile.TemporaryDirectory(prefix="fedfill-service-") as cache:
        server = None
        address = args.service
        if address is None:
            try:
                server, port, _ = serve(args.checkpoint, 0, cache, sampler=args.sampler)
            except OSError as err:
                raise UsageError(str(err)) from None
            address = f"127.0.0.1:{port}"
        try:
            delivered = GenerationClient(address, timeout_s=3600.0, retries=0).fetch(
                counts, args.seed, args.steps, args.guidance, delivery=delivery, server_steps=server_steps,
                state_bits=args.state_bits, sketch_factor=args.sketch_factor)
            finished = finish(delivered, config, pipe, steps=args.steps, guidance=args.guidance, seed=args.seed,
                              naive=args.naive_resume, channel_snr_db=args.channel_snr_db)
        except (GenerationUnavailable, DigestMismatch, ValueError) as err:
            raise UsageError(str(err)) from None
        finally:
            if server is not None:
                server.stop(grace=1)
    figures = {"delivery": delivery, "n": args.n, "steps": args.steps,
               "server_steps": server_steps if delivery in ("state", "sketch") else
               (args.steps if delivery == "image" else 0),
               "state_bits": args.state_bits if delivery == "state" else None,
               "sketch_factor": args.sketch_factor if delivery == "sketch" else None,
               "downlink_bytes": delivered.downlink_bytes, "server_unet_evals": delivered.server_unet_evals,
               "device_unet_evals": finished.device_unet_evals, "server_seconds": delivered.server_seconds,
               "device_seconds": finished.device_seconds,
               "noise_var": max((b.noise_var for b in delivered.batches), default=0.0) if delivery == "state" else None,
               "naive_resume": bool(args.naive_resume), "channel_snr_db": args.channel_snr_db}
    return finished.images, figures


def save_grid(images: np.ndarray, path: Path, scale: int = 6) -> None:
    """A grid a person can look at (nearest-neighbour upscaled: digits are 8x8)."""
    from PIL import Image

    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    h, w, c = images.shape[1:]
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for k, image in enumerate(images):
        r, q = divmod(k, cols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = image
    picture = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def _evaluate(args) -> int:
    from generation.checkpoint import load_generator
    from generation.quality import evaluate_generator
    from generation.sample import sample

    config, pipe = load_generator(args.checkpoint)
    split = _training_split(config, args.checkpoint, args.data_dir)
    labels = np.repeat(np.arange(config.num_classes), args.per_class)
    images = sample(config, pipe, labels, steps=args.steps, guidance=args.guidance, seed=args.seed,
                    sampler=args.sampler)
    report = evaluate_generator(images, labels, split)
    if args.inception:
        from generation.quality import inception_fid

        if not Path(args.inception).is_file():
            raise UsageError(f"no Inception weights at {args.inception}")
        try:
            report["inception_fid_vs_test"] = inception_fid(images, split.test.images, args.inception)
        except (RuntimeError, ValueError) as err:
            raise UsageError(f"{args.inception} is not the FID Inception TorchScript: {err}") from None
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for key, value in report.items():
            print(f"{key:34s} {value if not isinstance(value, dict) else {k: round(v, 3) for k, v in value.items()}}")
    return 0


def _training_split(config, checkpoint, data_dir: str | None):
    """The split the checkpoint was trained on (its provenance: dataset, data dir, split seed):
    its clients' pool trains the judge, its test part is the real reference."""
    from fedfill.data import split_dataset

    provenance = config.provenance
    if not provenance.get("dataset") or provenance.get("split_seed") is None:
        raise UsageError(f"{checkpoint} does not record the dataset and split seed it was trained on")
    dataset, root = provenance["dataset"], provenance.get("data_dir") or ""
    root = root if data_dir is None else data_dir
    try:
        split = split_dataset(_load(dataset, root), seed=int(provenance["split_seed"]))
    except UsageError as err:
        raise UsageError(f"cannot load {dataset}, the dataset {checkpoint} was trained on: {err}"
                         + ("" if data_dir is not None else " (give --data-dir where it is here)")) from None
    if split.test.num_classes != config.num_classes or split.test.images.shape[1:] != (
            config.image_size, config.image_size, config.channels):
        raise UsageError(f"{dataset} from {root or 'its default'} is not the data {checkpoint} was trained on: "
                         f"{split.test.num_classes} classes of {split.test.images.shape[1:]} images, the generator "
                         f"makes {config.num_classes} of {(config.image_size, config.image_size, config.channels)}")
    return split


def _convert(args) -> int:
    """Old layout -> pipeline layout; the dataset provenance the old layout lacked comes from
    the training command it recorded, unless given."""
    from generation.convert import convert_checkpoint, read_legacy

    old, _ = read_legacy(args.source)
    recorded = _recorded_training_arguments(old.provenance.get("command", ""))
    dataset = {"dataset": args.dataset if args.dataset is not None else getattr(recorded, "dataset", None),
               "data_dir": (str(Path(args.data_dir).resolve()) if args.data_dir else "") if args.data_dir is not None
               else getattr(recorded, "data_dir", ""),
               "split_seed": args.split_seed if args.split_seed is not None else getattr(recorded, "split_seed", None)}
    if dataset["dataset"] is None or dataset["split_seed"] is None:
        raise UsageError(f"{args.source} records no training command to read its dataset from; "
                         "give --dataset, --split-seed (and --data-dir)")
    given = [(flag, value) for flag, value in (("--dataset", args.dataset), ("--data-dir", args.data_dir),
                                               ("--split-seed", args.split_seed)) if value is not None]
    command = shlex.join(["fedfill", "generator", "convert", "--from", args.source, "--to", args.target,
                          *[str(word) for pair in given for word in pair]])
    convert_checkpoint(args.source, args.target, command=command, dataset=dataset)
    print(f"{args.source} -> {args.target} (same weights, checked); provenance: dataset {dataset['dataset']}, "
          f"split seed {dataset['split_seed']}")
    return 0


def _recorded_training_arguments(command: str):
    """`fedfill generator train ...` parsed as train parses it, or None."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    _add_train_arguments(parser)
    try:
        words = shlex.split(command)
        if words[:3] != ["fedfill", "generator", "train"]:
            return None
        known, _ = parser.parse_known_args(words[3:])
    except (ValueError, argparse.ArgumentError, SystemExit):
        return None
    return known


def _serve(args) -> int:
    from generation.service import serve

    cache = args.cache or str(Path(args.checkpoint) / "cache")
    try:
        server, port, _ = serve(args.checkpoint, args.port, cache, host=args.host)
    except OSError as err:
        raise UsageError(str(err)) from None
    print(f"generation service on {args.host}:{port} (cache {cache})", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=2)
    return 0

