"""``streamedit bench``: ``command.py`` (the command, the comparison rows), ``run.py`` (one row: simulated
camera, timings, FLOPs), ``startup.py`` (fresh processes to their first frame), ``report.py`` (table, plot)."""

from .command import BEST, MATRIX, PAPER, bench_command, build_config, select_rows
from .report import format_startup, format_table, save_plot
from .run import (BENCH_KEYS, FLOPS_METHOD, PREWARM_BATCHES, SimulatedSource, bench_frames, count_flops, run_matrix,
                  run_row)
