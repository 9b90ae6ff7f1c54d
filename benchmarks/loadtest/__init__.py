"""tensorgate's load-test harness (``tensorgate bench``): closed-loop concurrency sweeps and open-loop arrival
rates against any KServe V2 / Triton gRPC server, from several load processes whose samples merge exactly.

Usage::

    from tensorgate.loadtest import BenchConfig, run_sweep, sweep_dict, write_reports

    result = run_sweep(BenchConfig(model="mlp", server="127.0.0.1:8001", concurrency=(1, 8), duration_s=5))
    write_reports(sweep_dict(result), Path("bench"))

It lives in ``benchmarks/loadtest`` and is installed as ``tensorgate.loadtest``; it uses the client and the
protos, never the server.
"""

from __future__ import annotations

from tensorgate.loadtest.inputs import InputError, ModelShape, make_inputs
from tensorgate.loadtest.plots import MatplotlibMissing, write_plots
from tensorgate.loadtest.report import compare_table, load_report, markdown_table, sweep_dict, write_reports
from tensorgate.loadtest.runner import (
    BenchConfig,
    LevelResult,
    ServerStats,
    SweepResult,
    WorkerDied,
    run_sweep,
    stats_delta,
)
from tensorgate.loadtest.samples import PERCENTILES, Samples, merge, percentile

__all__ = [
    "PERCENTILES",
    "BenchConfig",
    "InputError",
    "LevelResult",
    "MatplotlibMissing",
    "ModelShape",
    "Samples",
    "ServerStats",
    "SweepResult",
    "WorkerDied",
    "compare_table",
    "load_report",
    "make_inputs",
    "markdown_table",
    "merge",
    "percentile",
    "run_sweep",
    "stats_delta",
    "sweep_dict",
    "write_plots",
    "write_reports",
]
