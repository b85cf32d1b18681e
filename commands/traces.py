"""`fedfill traces`: write a device trace file for `fedfill run --traces`.

  synth              a synthetic fleet: diurnal on/off periods, lognormal capacities, from a seed
  convert-fedscale   FedScale's client behaviour trace and device capacity pickles, from paths
                     the user gives (fedfill ships no third-party trace), loaded as plain data only
  check              a trace file read and checked, optionally against a fleet size

The format and what each figure means: strategies/allocation/traces.py, docs/running.md.
"""

from __future__ import annotations

from pathlib import Path

from fedfill.errors import UsageError


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="traces_command", required=True, metavar="ACTION")
    synth = sub.add_parser("synth", help="a synthetic fleet's trace, the same for the same seed")
    synth.add_argument("--nodes", type=int, required=True, help="devices (partition ids 0..N-1)")
    synth.add_argument("--hours", type=float, default=24.0, help="how long the trace lasts (default: 24)")
    synth.add_argument("--seed", type=int, default=0, help="the draw's seed (default: 0)")
    synth.add_argument("-o", "--out", required=True, help="the trace file to write (JSON)")
    convert = sub.add_parser("convert-fedscale", help="FedScale's client_behave_trace and client_device_capacity")
    convert.add_argument("behave", help="FedScale's client behaviour trace (pickle)")
    convert.add_argument("capacity", help="FedScale's device capacity file (pickle)")
    convert.add_argument("--nodes", type=int, help="keep the first N clients (by id) both files name "
                                                   "(default: all of them)")
    convert.add_argument("-o", "--out", required=True, help="the trace file to write (JSON)")
    check = sub.add_parser("check", help="read and check a trace file")
    check.add_argument("file")
    check.add_argument("--nodes", type=int, help="the fleet it must describe exactly (devices 0..N-1)")


def run(args) -> int:
    from strategies.allocation.traces import TraceError, from_fedscale, load_traces, read_plain_pickle, synth_traces

    try:
        if args.traces_command == "synth":
            if args.nodes < 1 or args.seed < 0:
                raise UsageError("--nodes must be at least 1 and --seed 0 or more")
            traces = synth_traces(args.nodes, args.hours, args.seed)
        elif args.traces_command == "convert-fedscale":
            behave = read_plain_pickle(args.behave, "behaviour trace")
            capacity = read_plain_pickle(args.capacity, "capacity file")
            traces = from_fedscale(behave, capacity, args.nodes)
        else:
            traces = load_traces(args.file)
            if args.nodes is not None:
                traces.check_fleet(args.nodes)
    except TraceError as err:
        raise UsageError(str(err)) from None
    on = [trace.on for trace in traces.devices.values()]
    never = sum(len(intervals) == 0 for intervals in on)
    hours = sum(float((intervals[:, 1] - intervals[:, 0]).sum()) for intervals in on) / 3600.0
    if args.traces_command != "check":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        traces.save(args.out)
    print(f"{len(traces.devices)} devices, {sum(map(len, on))} on-intervals ({hours:.1f} device-hours on"
          + (f"; {never} never on" if never else "") + ")" + ("" if args.traces_command == "check" else f" -> {args.out}"))
    return 0
