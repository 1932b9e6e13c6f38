"""How plans and the hardware read in a terminal: rich tables, then the reasons, one per line.

Printing only: what is shown is computed by the planner (orchestrator/planner/) and the probe
(orchestrator/hardware.py); rich is imported when something is printed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexorch.contract.choices import Parallel, on_cpu
from flexorch.orchestrator.durations import describe_time, format_seconds
from flexorch.orchestrator.hardware import Calibration, Hardware, format_bytes, format_flops

if TYPE_CHECKING:
    from flexorch.orchestrator.planner.plan import Plan


def render_plan(plan: Plan, console) -> None:
    """Print a table of the workers, then why each choice was made."""
    from rich import box
    from rich.table import Table

    # Short headers, no padding beyond the box's one-space dividers: the table fits 80 columns.
    stages = f" ({len(plan.workers)} stages)" if plan.parallel is Parallel.PIPELINE else ""
    table = Table(title=f"Plan: parallel {plan.parallel}{stages}, dtype {plan.dtype}", box=box.SIMPLE_HEAD,
                  padding=0, show_edge=False,
                  caption="layers: decoder layers per shard; batch: tokens per forward; GPU, RAM: predicted "
                          "peaks; time: predicted, start-up included (its parts below)")
    for column in ("worker", "device", "layers", "storage", "batch", "prompts", "rounds", "GPU", "RAM", "time"):
        table.add_column(column, no_wrap=True,
                         justify="left" if column in ("worker", "device", "storage") else "right")
    for w in plan.workers:
        s = w.settings
        table.add_row(
            w.name, w.device + (f"×{s.threads}" if s.threads else ""),
            f"{s.layers_per_shard} res" if s.resident else str(s.layers_per_shard), s.storage,
            str(s.batch_tokens), str(len(w.prompt_indices)), str(len(w.rounds)),
            f"{w.predicted_peak_device_memory / 1e9:.1f} GB" if not on_cpu(w.device) else "-",
            f"{w.predicted_peak_ram / 1e9:.1f} GB", format_seconds(w.predicted_seconds),
        )
    console.print(table)
    for prediction in plan.predictions:
        chosen = " (chosen)" if prediction.parallel == plan.parallel and len(plan.predictions) > 1 else ""
        console.print(f"- predicted {prediction.describe()}{chosen}")
    for reason in plan.reasons:
        console.print(f"- {reason}")
    for figure in plan.figures:
        console.print(f"- figure: {figure}")
    for w in plan.workers:
        console.print(f"- {w.name}: predicted " + describe_time(w.predicted_start_seconds, w.predicted_fill_seconds,
                                                                w.predicted_read_seconds, w.predicted_compute_seconds))
        for reason in w.reasons:
            console.print(f"- {w.name}: {reason}")


def render_hardware(hw: Hardware, console, calibration_note: str = "") -> None:
    """Print `hw` as rich tables (one row per GPU, then RAM, CPU and disk, then its calibration), and
    `calibration_note`: where the calibration comes from, or why there is none."""
    from rich.table import Table

    if hw.gpus:
        gpus = Table(title="GPUs (numbered as torch sees them)")
        for column in ("device", "name", "total", "free", "PCIe"):
            gpus.add_column(column, justify="right" if column in ("total", "free") else "left")
        for gpu in hw.gpus:
            link = f"gen{gpu.pcie_gen} x{gpu.pcie_width}" if gpu.pcie_gen and gpu.pcie_width else "-"
            gpus.add_row(f"cuda:{gpu.index}", gpu.name, format_bytes(gpu.total_memory),
                         format_bytes(gpu.free_memory), link)
        console.print(gpus)
    else:
        console.print("No GPU visible (no NVIDIA driver, no device, or CUDA_VISIBLE_DEVICES hides them): CPU only.")
    host = Table(title="Host", show_header=False)
    host.add_column("what")
    host.add_column("value")
    host.add_row("RAM", f"{format_bytes(hw.ram_available)} available of {format_bytes(hw.ram_total)}")
    host.add_row("CPU cores", str(hw.cpu_count))
    host.add_row("disk", f"{format_bytes(hw.disk_free)} free at {hw.disk_path}")
    if hw.disk_read_bytes_per_s:
        host.add_row("disk read", f"{format_bytes(hw.disk_read_bytes_per_s)}/s")
    console.print(host)
    if hw.calibration is not None:
        render_calibration(hw.calibration, console, calibration_note)
    elif calibration_note:
        console.print(calibration_note)


def render_calibration(c: Calibration, console, note: str = "") -> None:
    from rich.table import Table

    table = Table(title=f"Calibration (measured {c.measured_at} in {c.seconds:.0f} s)", show_header=False,
                  caption=note or None)
    table.add_column("what")
    table.add_column("value")
    if c.unreliable:
        table.add_row("[red]unreliable[/]", f"disturbed: {c.unreliable}")
    if c.disk_read_bytes_per_s:
        table.add_row("disk read, cold", f"{format_bytes(c.disk_read_bytes_per_s)}/s at {c.disk_path}")
    if c.worker_start_seconds is not None:
        table.add_row("worker start-up", f"{c.worker_start_seconds:.1f} s")
    if c.worker_base_ram is not None:
        table.add_row("worker fixed RAM", format_bytes(c.worker_base_ram))
    for t in c.throughput:
        # a width is measured at one batch twice, on short rows and on one long row (attention's cost)
        rows = f"one row of {t.row_tokens}" if t.row_tokens >= t.batch_tokens else f"rows of {t.row_tokens}"
        table.add_row(f"{t.device} {t.dtype} {t.hidden} wide @ {t.batch_tokens} tokens in {rows}",
                      format_flops(t.flops_per_s))
    for device, rate in c.host_to_device_bytes_per_s:
        table.add_row(f"{device} host-to-device", f"{format_bytes(rate)}/s")
    console.print(table)
