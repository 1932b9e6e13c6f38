"""`flexorch` command line: prepare, probe, plan, submit, show, eval, demo-model.

Bad input (a `UserError`) is printed as one line on stderr with exit status 2; an interrupt exits
130, SIGTERM 143; an OSError while running (a disk that fills, a folder that turns read-only) is one
line naming the file, exit 1. Modules are imported inside each command so `flexorch probe` and
`flexorch plan` never pay for torch.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from flexorch.contract.errors import ExitCode, Terminated, UserError


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def cmd_prepare(args) -> int:
    from flexorch.orchestrator.prepare import prepare_checkpoint

    prepare_checkpoint(Path(args.src), Path(args.dst), force=args.force, console=_console(stderr=True),
                       compress=args.compress, dtype=args.dtype)
    return ExitCode.OK


def cmd_demo_model(args) -> int:
    from flexorch.orchestrator.demo import build_demo_model

    dst = Path(args.dir)
    if dst.exists() and any(dst.iterdir()) and not args.force:
        raise UserError(f"{dst}: exists and is not empty (use --force to overwrite)")
    build_demo_model(dst)
    print(f"demo model (random weights: its scores are meaningless) written to {dst}", file=sys.stderr)
    return ExitCode.OK


def cmd_probe(args) -> int:
    from flexorch.orchestrator.calibrate import cache_path, cached, calibrated
    from flexorch.orchestrator.hardware import probe
    from flexorch.orchestrator.modelstore import default_cache_dir
    from flexorch.orchestrator.render import render_hardware

    hardware, cache = probe(disk_path=Path(args.disk_path)), default_cache_dir()
    if args.calibrate:
        hardware = calibrated(hardware, cache, force=True, console=_console(stderr=True))
        note = f"measured now, cached in {cache_path(hardware, cache)}"
    else:
        hardware, note = cached(hardware, cache)
    if args.json:
        print(json.dumps(hardware.to_dict(), indent=2))
    else:
        render_hardware(hardware, _console(), note)
    return ExitCode.OK


def cmd_plan(args) -> int:
    from flexorch.orchestrator.controller import plan_job
    from flexorch.orchestrator.render import render_plan

    _spec, plan = plan_job(Path(args.job))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        render_plan(plan, _console())
    return ExitCode.OK


def cmd_submit(args) -> int:
    from flexorch.orchestrator.controller import submit

    return submit(Path(args.job), console=_console(stderr=True), restart=args.restart)


def cmd_show(args) -> int:
    from flexorch.orchestrator.show import groups_json, load, render

    shown = load(Path(args.path))
    if args.json:
        if shown.note:
            print(f"note: {shown.note}", file=sys.stderr)
        data = shown.summary.to_dict()
        if args.by:
            data["by"] = {args.by: groups_json(shown.summary, args.by)}
        print(json.dumps(data, indent=2))
    else:
        render(shown, _console(), rows=None if args.all else 20, by=args.by)
    return ExitCode.OK


def cmd_eval(args) -> int:
    try:
        from flexorch.lm_eval import run_cli
    except ModuleNotFoundError as exc:
        if exc.name != "lm_eval" and not (exc.name or "").startswith("lm_eval."):
            raise
        from flexorch.orchestrator.extras import install_hint

        raise UserError(f"flexorch eval runs lm-evaluation-harness, which is not installed: "
                        f"{install_hint('lm-eval')}") from None
    run_cli(args.lm_eval_args)
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexorch", description="Score prompts with LLMs far larger than your GPU, layer by layer."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert a Hugging Face checkpoint dir into a layerwise dir")
    p.add_argument("src", help="Hugging Face checkpoint dir (safetensors or pytorch .bin, FP8 or MXFP4 as shipped), "
                   "a hub id (org/name: the local Hugging Face cache, else downloaded) or a .gguf file")
    p.add_argument("dst", help="layerwise dir to write")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--compress", choices=("int8", "int4"),
                   help="store decoder weights quantised group-wise (fewer bytes per pass; scores become approximate)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="SRC a .gguf file: the dtype its weights are dequantised into (default bfloat16)")
    p.set_defaults(run=cmd_prepare)

    p = sub.add_parser("probe", help="print the hardware the planner sees")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--disk-path", default=".", help="where activations would go (for free disk)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine now (disk read rate, throughput, a worker's memory and start-up) and "
                        "cache it for the planner")
    p.set_defaults(run=cmd_probe)

    p = sub.add_parser("plan", help="validate a job and print the plan, changing nothing")
    p.add_argument("job", help="job file (YAML)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("submit", help="run a job")
    p.add_argument("job", help="job file (YAML)")
    p.add_argument("--restart", action="store_true", help="discard a previous run's parts in job_dir")
    p.set_defaults(run=cmd_submit)

    p = sub.add_parser("show", help="summarise a run: per-prompt argmax, accuracy where prompts have answers")
    p.add_argument("path", help="an output file, or a job dir")
    p.add_argument("--all", action="store_true", help="list every prompt (default: the first 20)")
    p.add_argument("--by", metavar="FIELD",
                   help="accuracy per value of a prompt field kept in the output (e.g. --by subject)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_show)

    # No -h of its own: `flexorch eval --help` is lm-eval's help, every flag is lm-eval's.
    p = sub.add_parser("eval", add_help=False,
                       help="run lm-evaluation-harness with flexorch as the model (lm-eval's flags; "
                            "--model flexorch is the default)")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's flags")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("demo-model", help="write the built-in demo model (random weights) to DIR")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true")
    p.set_defaults(run=cmd_demo_model)
    return parser


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # everything after it is lm-eval's: argparse would take its flags for ours
        args = argparse.Namespace(run=cmd_eval, lm_eval_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    # SIGTERM (kill, a batch scheduler, docker stop) unwinds as Ctrl-C does: workers stopped,
    # temp files removed, report written; exit 143 instead of 130.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    except KeyboardInterrupt as exc:
        print("terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr)
        return ExitCode.stopped_by(exc)
    except OSError as exc:  # the disk filled or a folder turned read-only while running: not a bug
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return ExitCode.FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
