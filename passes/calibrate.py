"""Measure this machine and save a `cpu` hardware profile (`meshwright calibrate`).

Runs on `devices` simulated XLA host devices (default 8), the mesh meshwright's tests and demo
use. XLA reads `--xla_force_host_platform_device_count` only when jax initialises, so if jax is
already up with fewer devices the measurement runs in a fresh subprocess
(`python -m meshwright.passes.calibrate`).

Measured, all per simulated device while all devices work at once:

- matmul FLOP/s: a jitted float32 matmul on every device (shard_map);
- memory bandwidth: a jitted elementwise pass over a large array (read + write);
- collectives: all-gather and psum over all devices with small to large payloads; a least-
  squares fit of time = latency + bytes * (K-1)/K / bandwidth gives latency and bandwidth.

Takes ~10-20 s on 2 cores.

Under `meshwright launch -n P` (P processes of K devices each, `MESHWRIGHT_NUM_PROCESSES`
set) it measures the network between the processes instead — the slow level of the two-level
model (`passes/network.py`): an all-gather over a mesh axis that runs over the processes
(every group one device of each process, all K groups at once) at a few sizes, fitted to
time = latency + bytes crossing per device / bandwidth, gives `dcn_bandwidth` (per device)
and `dcn_latency_s` (per exchange across processes, after the in-node launch latency). The
same all-gathers among one process's devices give what any collective costs inside a process
while the job spans several (`multinode_collective_s`, `multinode_bandwidth`: XLA on CPU runs
them through gloo too). Those are written into the profile it saves; the in-node figures are kept from the profile saved
before (or the defaults): run `meshwright calibrate` alone to measure them. Process 0 saves;
every process prints what it measured. A plain `meshwright calibrate` keeps a measured
network in turn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from meshwright.passes.hardware import _NETWORK_FIELDS as NETWORK_FIELDS
from meshwright.passes.hardware import (
    CPU_DEFAULT,
    HardwareProfile,
    calibrated_profile_path,
    saved_profile,
)

_FLAG = "--xla_force_host_platform_device_count"


def _env_with_devices(devices: int) -> dict:
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_FLAG))
    env["XLA_FLAGS"] = f"{flags} {_FLAG}={devices}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def calibrate(devices: int = 8, output: str | None = None, quick: bool = False,
              save: bool = True) -> dict:
    """Measure, build the profile, save it (unless `save=False`); return the report dict."""
    from meshwright.runtime.distributed import ENV_NUM_PROCESSES

    if int(os.environ.get(ENV_NUM_PROCESSES) or 1) > 1:  # under meshwright launch
        return calibrate_network(output=output, quick=quick, save=save)
    if devices < 2:
        raise ValueError(f"calibrate needs at least 2 devices for collectives, got {devices}")
    if "jax" not in sys.modules:
        os.environ.update(_env_with_devices(devices))
    import jax

    if jax.device_count() == devices and jax.default_backend() == "cpu":
        measured = measure(devices, quick=quick)
    else:  # jax already initialised differently: measure in a fresh process
        cmd = [sys.executable, "-m", "meshwright.passes.calibrate", str(devices)]
        if quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, env=_env_with_devices(devices), capture_output=True,
                              text=True, timeout=300, check=False)
        if proc.returncode:
            raise RuntimeError(f"calibration subprocess failed:\n{proc.stderr[-2000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
    profile = profile_from_measurements(measured)
    path = Path(output) if output else calibrated_profile_path("cpu")
    report = {"profile": profile.to_dict(), "measured": measured, "saved": None}
    report = keep_network(report, _saved_report(path))
    if save:
        _save(report, path)
    return report


def keep_network(report: dict, saved: dict | None) -> dict:
    """`report` (a plain calibration's) with the network between processes that `saved` (the
    profile saved before) measured under `meshwright launch`, if it did."""
    if not saved or not saved.get("network"):
        return report
    kept = saved_profile(saved["profile"])
    profile = HardwareProfile.from_dict(report["profile"]).replace(
        **{f: getattr(kept, f) for f in NETWORK_FIELDS})
    source = kept.source.partition("; network between")
    if source[1]:
        profile = profile.replace(source=profile.source + source[1] + source[2])
    return {**report, "profile": profile.to_dict(), "network": saved["network"]}


def _saved_report(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        saved_profile(data["profile"])
        return data
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _save(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report["saved"] = str(path)
    path.write_text(json.dumps(report, indent=2, sort_keys=True))


def calibrate_network(output: str | None = None, quick: bool = False,
                      save: bool = True) -> dict:
    """The launched calibration (see the module's docstring): measure the network between
    this job's processes, write it into the saved `cpu` profile (process 0); the report."""
    # What measure_network imports, imported before initialize() starts the heartbeat
    # thread: that thread's first import of meshwright.ir (for the coordination client)
    # racing this thread's deadlocked Python's import locks ("_DeadlockError ...
    # meshwright.ir.jax_compat") under `meshwright launch -n 2 -- meshwright calibrate`.
    import meshwright.passes.compiler
    from meshwright.runtime import distributed

    import meshwright as mw

    joined = distributed._state["info"] is not None  # a job's program calling this
    info = mw.distributed.initialize()
    if info.num_processes < 2:
        raise ValueError("the network between processes needs 2 or more processes: run "
                         "meshwright launch -n 2 -- meshwright calibrate")
    try:
        path = Path(output) if output else calibrated_profile_path("cpu")
        saved = _saved_report(path)
        base = saved_profile(saved["profile"]) if saved else CPU_DEFAULT
        network = measure_network(base.collective_latency_s, quick=quick)
        profile = network_profile(base, network)
        report = {"profile": profile.to_dict(), "measured": (saved or {}).get("measured"),
                  "network": network, "saved": None, "process": info.process_id,
                  "in_node_from": base.source.split("; network between")[0]}
        if save and info.is_leader:
            _save(report, path)
        return report
    finally:
        if not joined:
            mw.distributed.shutdown()


def network_profile(base: HardwareProfile, network: dict) -> HardwareProfile:
    """`base` with the network between nodes as measured (`measure_network`)."""
    when = time.strftime("%Y-%m-%d", time.gmtime(network["time"]))
    source = base.source.split("; network between")[0]
    inside = {}
    if "in_node_collective_s" in network:  # processes of one device measure none
        # gloo among one process's devices moves bytes no faster than the process's own
        # copies: a fit whose times hardly grow with the bytes (the fixed cost dominates at
        # these sizes) would claim any rate
        inside = {"multinode_collective_s": network["in_node_collective_s"],
                  "multinode_bandwidth": min(network["in_node_bandwidth_per_device"],
                                             base.ici_bandwidth * base.ici_efficiency)}
    return base.replace(
        dcn_bandwidth=network["bandwidth_per_device"], dcn_efficiency=1.0,
        dcn_latency_s=network["latency_s"], dcn_name="gloo over TCP", **inside,
        max_nodes=max(base.max_nodes, network["processes"]),
        source=f"{source}; network between processes measured by `meshwright calibrate` "
               f"under `meshwright launch -n {network['processes']}` "
               f"({network['devices_per_process']} devices each), {when}")


CHAIN = 8  # collectives per measured program: a step's collectives follow one another


def measure_network(collective_latency_s: float, quick: bool = False) -> dict:
    """Time all-gathers over a mesh axis that runs over the processes (one device of each in
    every group, all groups at once) at a few sizes: programs of `CHAIN` all-gathers one
    after the other (as a step's collectives run), the median of several calls each (a
    loaded machine's exchanges vary; the median is what a program sees), divided by
    `CHAIN`. Fit time = launch + (P-1) * latency + crossing bytes / bandwidth, the two-level
    model's price of such a collective, where a device's crossing bytes are its gathered
    output times (P-1)/P; `collective_latency_s` is the in-node launch latency the model adds
    (the profile's). The same all-gathers over the devices of one process (`in_node`) are
    measured too: in a job of several processes every collective is a gloo exchange, those
    inside a process as well; fitted to time = fixed + bytes / bandwidth they give
    `in_node_collective_s` and `in_node_bandwidth_per_device`, the profile's
    `multinode_collective_s` and `multinode_bandwidth`."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import Mesh as JaxMesh
    from jax.sharding import PartitionSpec as P
    from meshwright.passes.compiler import node_groups
    from meshwright.runtime.distributed import put

    groups = node_groups(jax.devices())
    procs, per = len(groups), len(groups[0])
    mesh = JaxMesh(np.array(groups), ("node", "device"), axis_types=(AxisType.Auto,) * 2)
    spec = P(("node", "device"))
    split = NamedSharding(mesh, spec)

    def chain(axis: str, size: int):
        def f(v):
            for _ in range(CHAIN):
                v = jax.lax.all_gather(v, axis, tiled=True)[:size] * 1.0001
            return v

        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec,
                                     check_vma=False))

    reps = 3 if quick else 9
    sizes = [2**6, 2**12, 2**16] + ([] if quick else [2**17])  # float32 per device
    out = {"processes": procs, "devices_per_process": per, "time": time.time(),
           "collectives_per_program": CHAIN, "collective_latency_s": collective_latency_s}
    for axis, k, key in (("node", procs, "collectives"), ("device", per, "in_node")):
        rows = []
        for size in sizes:
            x = put(np.ones(procs * per * size, np.float32), split)
            ts = [t / CHAIN for t in _times(chain(axis, size), x, reps=reps)]
            rows.append({"floats_per_device": size, "all_gather_s": float(np.median(ts)),
                         "all_gather_min_s": min(ts),
                         # the gathered output per device, times (K-1)/K: the model's bytes
                         "model_bytes": 4 * size * k * (k - 1) / k})
        out[key] = rows
    bandwidth, intercept, floor = _fit(out["collectives"])
    out["bandwidth_per_device"] = bandwidth
    out["latency_s"] = max((intercept - collective_latency_s) / (procs - 1),
                           floor / (procs - 1), 1e-6)
    out["fit_intercept_s"] = intercept
    if per > 1:  # a collective of one process's devices as the job runs it: fixed + bytes/bw
        bandwidth, intercept, floor = _fit(out["in_node"])
        out["in_node_collective_s"] = max(intercept, floor)
        out["in_node_bandwidth_per_device"] = bandwidth
    return out


def _fit(rows: list[dict]) -> tuple[float, float, float]:
    """Least squares of time = intercept + model bytes / bandwidth over `rows`:
    (bandwidth, intercept, a floor for the fixed part: half the fastest time). Times that
    do not grow with the bytes (a slope not positive: the fixed cost and noise dominate)
    give the median time as the fixed part and the largest bytes over the largest time as
    the bandwidth (a lower bound)."""
    import numpy as np

    xs = np.array([r["model_bytes"] for r in rows])
    ts = np.array([r["all_gather_s"] for r in rows])
    slope, intercept = np.polyfit(xs, ts, 1)
    if slope <= 0:
        return float(xs.max() / ts.max()), float(np.median(ts)), float(ts.min()) * 0.5
    return float(1.0 / slope), float(intercept), float(ts.min()) * 0.5


def profile_from_measurements(m: dict) -> HardwareProfile:
    """A `cpu` profile from measured rates (efficiencies are 1: the rates are achieved ones)."""
    return CPU_DEFAULT.replace(
        peak_flops_bf16=m["matmul_flops_per_device"],
        peak_flops_int8=m["matmul_flops_per_device"],
        peak_flops_fp32=m["matmul_flops_per_device"],
        hbm_bytes=m["memory_bytes_per_device"],
        hbm_bandwidth=m["memory_bandwidth_per_device"],
        ici_bandwidth=m["collective_bandwidth"],
        collective_latency_s=m["collective_latency_s"],
        collective_step_latency_s=0.0,
        step_overhead_s=m["dispatch_s"],
        max_chips=m["devices"],
        source=f"measured by `meshwright calibrate` on {m['devices']} simulated devices, "
               f"{m['host_cpus']} CPUs, {time.strftime('%Y-%m-%d', time.gmtime(m['time']))}",
    )


def _best_time(fn, *args, reps: int) -> float:
    return min(_times(fn, *args, reps=reps))


def _times(fn, *args, reps: int) -> list[float]:
    fn(*args).block_until_ready()  # compile and warm up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        out.append(time.perf_counter() - t0)
    return out


def measure(devices: int, quick: bool = False) -> dict:
    """Run the micro-benchmarks on the current jax (which must have `devices` CPU devices)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    reps = 3 if quick else 7
    mesh = jax.make_mesh((devices,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, P("d"))

    def on_mesh(f, in_specs, out_specs):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                     check_vma=False))

    # Dispatch: a trivial jitted step.
    tiny = jax.jit(lambda x: x + 1)
    dispatch = _best_time(tiny, jnp.ones(()), reps=reps * 3)

    # Matmul: every device multiplies its own n x n float32 matrices.
    n = 256 if quick else 512
    a = jax.device_put(jnp.ones((devices * n, n), jnp.float32), shard)
    mm = on_mesh(lambda x: x @ x, P("d"), P("d"))  # (n, n) per device
    t = _best_time(mm, a, reps=reps)
    matmul_flops = 2 * n**3 / t  # per device: all devices finish their n^3 in t

    # Memory: read and write a large array on every device.
    elems = (2 if quick else 8) * 2**20  # float32 per device: 8 or 32 MiB
    big = jax.device_put(jnp.ones((devices * elems,), jnp.float32), shard)
    stream = on_mesh(lambda x: x * 1.0001 + 1.0, P("d"), P("d"))
    t = _best_time(stream, big, reps=reps)
    mem_bw = 2 * 4 * elems / t  # bytes read + written per device per second

    # Collectives: all-gather and psum with growing payloads.
    sizes = [2**8, 2**12, 2**16] + ([2**18] if quick else [2**18, 2**20])  # float32 per device
    rows = []
    for size in sizes:
        x = jax.device_put(jnp.ones((devices * size,), jnp.float32), shard)
        ag = on_mesh(lambda v: jax.lax.all_gather(v, "d", tiled=True), P("d"), P())
        ps = on_mesh(lambda v: jax.lax.psum(v, "d"), P("d"), P("d"))
        t_ag = _best_time(ag, x, reps=reps)
        t_ps = _best_time(ps, x, reps=reps)
        rows.append({"floats_per_device": size, "all_gather_s": t_ag, "psum_s": t_ps,
                     # all-gather output per device, times (K-1)/K: the model's bytes
                     "model_bytes": 4 * size * devices * (devices - 1) / devices})
    # Least squares t = latency + bytes / bw on the all-gathers.
    xs = np.array([r["model_bytes"] for r in rows])
    ts = np.array([r["all_gather_s"] for r in rows])
    slope, intercept = np.polyfit(xs, ts, 1)
    latency = max(float(intercept), float(ts.min()) * 0.5, 1e-7)
    bandwidth = 1.0 / slope if slope > 0 else float(xs.max() / ts.max())

    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "devices": devices, "host_cpus": os.cpu_count(), "time": time.time(),
        "matmul_size": n, "matmul_flops_per_device": matmul_flops,
        "memory_bandwidth_per_device": mem_bw, "memory_bytes_per_device": total_ram / devices,
        "collective_bandwidth": float(bandwidth), "collective_latency_s": latency,
        "dispatch_s": dispatch, "collectives": rows,
    }


def format_report(report: dict) -> str:
    if "process" in report:
        return _format_network(report)
    m, p = report["measured"], report["profile"]
    gflops = m["matmul_flops_per_device"] / 1e9
    lines = [(f"calibrated {m['devices']} simulated devices on {m['host_cpus']} CPUs "
             f"(rates per device, all devices busy)"),
             f"  matmul (f32 {m['matmul_size']}^3)   {gflops:10.2f} GFLOP/s",
             f"  memory bandwidth          {m['memory_bandwidth_per_device'] / 1e9:10.2f} GB/s",
             f"  collective bandwidth      {m['collective_bandwidth'] / 1e9:10.2f} GB/s",
             f"  collective latency        {m['collective_latency_s'] * 1e6:10.1f} us",
             f"  dispatch per step         {m['dispatch_s'] * 1e6:10.1f} us",
             "",
             f"  {'floats/device':>14} {'all-gather ms':>14} {'psum ms':>10}"]
    for r in m["collectives"]:
        lines.append(f"  {r['floats_per_device']:>14} {r['all_gather_s'] * 1e3:14.3f} "
                     f"{r['psum_s'] * 1e3:10.3f}")
    lines.append("")
    lines.append(f"profile {p['name']!r}: " + (f"saved to {report['saved']}" if report["saved"]
                                                else "not saved"))
    return "\n".join(lines)


def _format_network(report: dict) -> str:
    n, p = report["network"], report["profile"]
    lines = [(f"calibrated the network between {n['processes']} processes of "
              f"{n['devices_per_process']} devices (process {report['process']}; rates per "
              "device, all devices sending at once)"),
             f"  bandwidth per device      {n['bandwidth_per_device'] / 1e6:10.2f} MB/s",
             f"  latency per exchange      {n['latency_s'] * 1e6:10.1f} us",
             "",
             (f"  all-gathers, ms each ({n['collectives_per_program']} in a row per program; "
              "median, fastest):"),
             f"  {'floats/device':>14} {'across processes':>22} {'inside a process':>22}"]
    for r, q in zip(n["collectives"], n["in_node"]):
        lines.append(f"  {r['floats_per_device']:>14} {r['all_gather_s'] * 1e3:12.3f} "
                     f"{r['all_gather_min_s'] * 1e3:9.3f} {q['all_gather_s'] * 1e3:12.3f} "
                     f"{q['all_gather_min_s'] * 1e3:9.3f}")
    if "in_node_collective_s" in n:
        lines.append("  (inside a process: every collective of a job over several processes is a "
                     "gloo exchange)")
        lines.append(f"  collective inside a process {p['multinode_collective_s'] * 1e3:7.3f} ms"
                     f" + bytes at {p['multinode_bandwidth'] / 1e6:.4g} MB/s per device (fit, "
                     "at most the in-node rate)")
    lines.append("")
    lines.append(f"in-node figures kept from: {report['in_node_from']}")
    if report["saved"]:
        lines.append(f"profile {p['name']!r}: saved to {report['saved']}")
    else:
        lines.append(f"profile {p['name']!r}: not saved"
                     + (" (process 0 saves it)" if report["process"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":  # the subprocess of `calibrate`: print the measurements as JSON
    args = sys.argv[1:]
    result = measure(int(args[0]) if args else 8, quick="--quick" in args)
    sys.stdout.write(json.dumps(result) + "\n")
