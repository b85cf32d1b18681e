"""The generation service under load: 8 clients at once, then its memory after many requests.

    python bench/bench_service_load.py [--clients 8] [--requests 4]     # a minute or two on 2 cores

Starts the service in a process of its own (bench/fuzz_service.py's ServiceProcess) and runs
`--clients` GenerationClients at once, each asking `--requests` times for 10 images at 4 DDIM
steps: new requests (sampled; sampling holds one lock, so they queue), then the same ones
again (cache hits), for `--rounds` rounds. Prints requests per second and latency p50/p95/max
for each, and the service's resident memory after warm-up, after each round and after 1,000
more hostile requests (fuzz_generate): it must level off, not grow with the requests served.
First (--fair), fairness: 10-image requests beside one large request, with the service
sampling a slice a turn and, as before slicing, a whole request a turn.
The service runs with fuzz_service's small image limit, so that the fuzzer's requests at the
limit stay cheap; the load's requests are below it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fuzz_service import FUZZ_MAX_IMAGES, ServiceProcess, fuzz_generate  # noqa: E402
from generation.client import GenerationClient  # noqa: E402
from generation.service import SLICE_IMAGES  # noqa: E402

IMAGES_PER_REQUEST = 10
STEPS = 4


def counts_for(num_classes: int, images: int, seed: int) -> list[int]:
    return [int(c) for c in np.random.default_rng(seed).multinomial(images, [1 / num_classes] * num_classes)]


def measure_load(service: ServiceProcess, clients: int = 8, requests_per_client: int = 4, first_seed: int = 0,
                 images: int = IMAGES_PER_REQUEST, steps: int = STEPS) -> dict:
    """`clients` threads, each with its own GenerationClient (a channel per call, as a node
    has), start together and ask `requests_per_client` times; seeds first_seed, first_seed+1,
    ... make the requests distinct (and the same ones again on a second call: cache hits).

    Returns requests, errors (the first few, as text), wrong (answers whose images or labels
    do not match the request), seconds, requests_per_s, p50_s, p95_s and max_s (latency per
    request, queueing included).
    """
    latencies, errors, wrong = [], [], []
    start_together = threading.Barrier(clients)

    def one_client(index: int):
        client = GenerationClient(service.address, timeout_s=600.0, retries=0)
        start_together.wait()
        for k in range(requests_per_client):
            seed = first_seed + index * requests_per_client + k
            counts = counts_for(service.num_classes, images, seed)
            sent = time.monotonic()
            try:
                got, labels = client.generate(counts, seed=seed, steps=steps)
            except Exception as err:  # noqa: BLE001 - collected and reported
                errors.append(f"client {index}: {type(err).__name__}: {err}")
                continue
            latencies.append(time.monotonic() - sent)
            if got.shape != (images, *service.image_shape) or \
                    np.bincount(labels, minlength=service.num_classes).tolist() != counts:
                wrong.append(f"client {index} seed {seed}: {got.shape}")

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    done = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {"requests": clients * requests_per_client, "errors": errors[:10], "wrong": wrong[:10],
            "seconds": seconds, "requests_per_s": len(latencies) / seconds, "p50_s": float(np.percentile(done, 50)),
            "p95_s": float(np.percentile(done, 95)), "max_s": float(done.max())}


def measure_fairness(slice_images: int, large: int, clients: int = 4, steps: int = STEPS) -> dict:
    """A fresh service sampling `slice_images` a turn (0: a whole request a turn, the service
    before slicing); one client asks for `large` images, and while it is sampled `clients`
    others ask for 10 images again and again. Returns the large request's seconds and the
    small ones' count, p50, p95 and max latency."""
    with tempfile.TemporaryDirectory(prefix="service-fair-") as cache, \
            ServiceProcess(cache, slice_images=slice_images) as service:
        GenerationClient(service.address).generate(counts_for(service.num_classes, 10, 1), seed=1, steps=steps)
        done, small = threading.Event(), []
        timing = {}

        def ask_large():
            started = time.monotonic()
            GenerationClient(service.address, timeout_s=3600, retries=0).generate(
                counts_for(service.num_classes, large, 2), seed=2, steps=steps)
            timing["large_s"] = time.monotonic() - started
            done.set()

        def ask_small(index: int):
            client, k = GenerationClient(service.address, timeout_s=3600, retries=0), 0
            while not done.is_set():  # every request asked while the large one is being sampled
                sent = time.monotonic()
                client.generate(counts_for(service.num_classes, 10, 100 + 1000 * index + k), seed=100 + 1000 * index + k,
                                steps=steps)
                small.append(time.monotonic() - sent)
                k += 1

        threads = [threading.Thread(target=ask_large)]
        threads[0].start()
        time.sleep(1.0)  # the large request is sampling
        threads += [threading.Thread(target=ask_small, args=(i,)) for i in range(clients)]
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join()
    latency = np.asarray(small) if small else np.asarray([np.nan])
    return {"slice_images": slice_images, "large_images": large, "large_s": timing["large_s"], "small": len(small),
            "p50_s": float(np.percentile(latency, 50)), "p95_s": float(np.percentile(latency, 95)),
            "max_s": float(latency.max())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of new requests (then the same again)")
    parser.add_argument("--fuzz", type=int, default=1000, help="hostile requests after the load")
    parser.add_argument("--fair", type=int, default=5000, metavar="IMAGES",
                        help="fairness: 10-image requests beside one of this many, sliced and not (0: skip)")
    args = parser.parse_args(argv)
    if args.fair:
        print(f"fairness: 4 clients asking for 10 images while one request of {args.fair} is sampled "
              f"(DDIM {STEPS} steps)")
        print(f"{'turn':>22} | {'large s':>7} | {'small':>5} {'p50 s':>7} {'p95 s':>7} {'max s':>7}")
        rows = [measure_fairness(slice_images, args.fair) for slice_images in (0, SLICE_IMAGES)]
        for row in rows:
            turn = "a whole request" if not row["slice_images"] else f"a slice of {row['slice_images']}"
            print(f"{turn:>22} | {row['large_s']:7.1f} | {row['small']:5d} {row['p50_s']:7.3f} {row['p95_s']:7.3f} "
                  f"{row['max_s']:7.3f}")
        print(f"p95 of the small requests: {rows[0]['p95_s'] / rows[1]['p95_s']:.0f}x lower with slices; the large "
              f"request takes {rows[1]['large_s'] / rows[0]['large_s']:.2f}x as long, serving "
              f"{rows[1]['small']} small requests meanwhile instead of {rows[0]['small']}")
    with tempfile.TemporaryDirectory(prefix="service-load-") as cache, \
            ServiceProcess(cache, max_images=FUZZ_MAX_IMAGES) as service:
        warm_up = counts_for(service.num_classes, IMAGES_PER_REQUEST, 10 ** 6)
        GenerationClient(service.address).generate(warm_up, seed=10 ** 6, steps=STEPS)
        rss = {"after warm-up": service.rss_bytes()}
        print(f"{args.clients} clients x {args.requests} requests of {IMAGES_PER_REQUEST} images, DDIM {STEPS} steps, "
              f"{args.rounds} rounds of new requests then the same again")
        print(f"{'round':>5} {'phase':>8} | {'req/s':>6} {'p50 s':>7} {'p95 s':>7} {'max s':>7} | errors wrong "
              "| RSS MiB")
        ok = True
        for round_ in range(1, args.rounds + 1):
            for phase in ("sampled", "cached"):
                load = measure_load(service, args.clients, args.requests, first_seed=round_ * 10_000)
                print(f"{round_:5d} {phase:>8} | {load['requests_per_s']:6.2f} {load['p50_s']:7.3f} "
                      f"{load['p95_s']:7.3f} {load['max_s']:7.3f} | {len(load['errors']):6d} {len(load['wrong']):5d} | "
                      f"{service.rss_bytes() / 2 ** 20:7.0f}")
                for problem in load["errors"] + load["wrong"]:
                    print("   " + problem)
                ok = ok and not load["errors"] and not load["wrong"]
            rss[f"after round {round_}"] = service.rss_bytes()
        fuzz = fuzz_generate(args.fuzz, seed=0, service=service) if args.fuzz else None
        if fuzz:
            rss[f"after {args.fuzz} hostile"] = service.rss_bytes()
            ok = ok and not (fuzz["crashes"] or fuzz["hangs"] or fuzz["server_errors"])
        ok = ok and service.serving()
        print("service RSS: " + ", ".join(f"{when} {value / 2 ** 20:.0f} MiB" for when, value in rss.items()))
        print(f"serving afterwards: {service.serving()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
