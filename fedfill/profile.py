"""The device profile a node reports in its QUERY reply, built from what the node has: its
node config, the board it runs on, and the draw of its job's paper ([FIMI] or [ODQ]). One
rule for the ClientApp (which reports it) and the launcher's pre-run check (which predicts it
to plan round 1 before any process starts)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fedfill import contract


def node_profile(node_config: Mapping, d_loc: float, draw: Callable[[], dict],
                 measured: Mapping | None = None) -> dict:
    """The profile, field by field: what the operator put in the node config, else what the
    board measured (f_max only: eps, transmit power and channel gain cannot be read from a
    board), else `draw()` (the job's paper's draw: [FIMI §V-A]; [ODQ §IV-A] with the error
    demand). `measured`: a board's `BoardProfile.profile_fields()`; its other figures go along
    as `board_*` fields, for the report only, and `measured` names the planner's fields the
    board gave. The optional fields (bits, quant_error, codec_constant) and the partition id
    come from the node config only."""
    given = {name: float(node_config[contract.node_config_key(name)]) for name in contract.PROFILE_FIELDS
             if contract.node_config_key(name) in node_config}
    measured = dict(measured or {})
    if "f_max_hz" in measured and "f_max_hz" not in given:
        given["f_max_hz"] = float(measured["f_max_hz"])
    if set(given) != set(contract.PROFILE_FIELDS):
        given = {**draw(), **given}
    profile = {"d_loc": float(d_loc), **given}
    if "f_max_hz" in measured and profile["f_max_hz"] == measured["f_max_hz"]:
        profile["measured"] = "f_max_hz"
    profile.update({f"board_{name}": value for name, value in measured.items() if name != "f_max_hz"})
    for name, cast in contract.OPTIONAL_PROFILE_FIELDS.items():
        if contract.node_config_key(name) in node_config:
            profile[name] = cast(node_config[contract.node_config_key(name)])
    if "partition-id" in node_config:  # names the node in the server's report
        profile[contract.PARTITION_FIELD] = int(node_config["partition-id"])
    return profile
