"""The ``lors`` command line: a thin layer that parses arguments and calls the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_parser import build_parser
from .errors import LorsError, LorsWarning


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """NAME=VALUE items of a repeated flag; a repeated NAME is an error, not a silent overwrite."""
    pairs: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise LorsError(f"{flag} expects NAME=VALUE, got {item!r}")
        if key in pairs:
            raise LorsError(f"{flag} {key}= given twice ({pairs[key]!r} and {value!r}); "
                            "each name may appear once")
        pairs[key] = value
    return pairs


def _weights(values: list[str] | None) -> dict[str, float]:
    weights = {}
    for name, text in _pairs(values, "--weight").items():
        try:
            weights[name] = float(text)
        except ValueError:
            raise LorsError(f"--weight {name}={text}: the weight must be a number, e.g. "
                            f"{name}=0.5") from None
    return weights


def _merge_config(args: argparse.Namespace):
    from .merging import load_config, validate_config
    raw: dict = {}
    if args.config:
        raw = load_config(Path(args.config)).model_dump(by_alias=True, exclude_unset=True)
    if args.base:
        raw["base"] = args.base
    weights = _weights(args.weight)
    if args.expert:
        raw["experts"] = [{"name": n, "path": p, "weight": weights.get(n, 1.0)}
                          for n, p in _pairs(args.expert, "--expert").items()]
    else:
        for expert in raw.get("experts", []):
            expert["weight"] = weights.get(expert["name"], expert.get("weight", 1.0))
    unknown = sorted(set(weights) - {e["name"] for e in raw.get("experts", [])})
    if unknown:
        raise LorsError(f"--weight names unknown expert(s) {unknown}; experts: "
                        f"{[e['name'] for e in raw.get('experts', [])]}")
    if args.method:
        raw["method"] = args.method
    params = dict(raw.get("parameters", {}))
    for key in ("rank", "rank_ratio", "keep", "seed", "scope", "svd", "dare_combine"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.lambda_ is not None:
        params["lambda"] = args.lambda_
    raw["parameters"] = params
    raw["groups"] = {**raw.get("groups", {}), **_pairs(args.group, "--group")}
    for key in ("dtype", "shard_size_mb"):  # 0 is a value to validate, not "not given"
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    if args.allow_other_base:
        raw["allow_other_base"] = True
    if args.calibrate is not None:
        raw["calibrate"] = args.calibrate
    if "method" not in raw:
        raise LorsError("no merge method given: pass --method (see `lors methods`) or a CONFIG.yaml")
    return validate_config(raw, source=args.config or "command line")


def cmd_merge(args: argparse.Namespace) -> int:
    from .merging import merge, plan_merge
    from .merging.engine import resolve_device
    device = resolve_device(args.device)  # a missing GPU is an error before any work
    config = _merge_config(args)
    if args.dry_run:
        plan = plan_merge(config)
        print(json.dumps(plan.resolved_config(), indent=2))
        print(f"\n{'group':<24}{'op':<18}{'tensors':>8}{'parameters':>14}")
        for group, row in plan.group_counts.items():
            print(f"{group:<24}{row['op']:<18}{row['tensors']:>8}{row['parameters']:>14,}")
        print("\ndry run: nothing written")
        return 0
    if not args.out:
        raise LorsError("--out DIR is required (or pass --dry-run)")
    from .export import export_model, plan_merge_exports
    exports = plan_merge_exports(Path(args.out), args.export, args.quantization, args.force,
                                 base=config.base,
                                 inputs=(config.base, *(e.path for e in config.experts)))
    bar = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar  # created on the first tensor, after every check has passed
        if bar is None and not args.quiet:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="tensor", desc="merging")
        if bar is not None:
            bar.update(1)

    try:
        report = merge(config, Path(args.out), force=args.force,
                       diagnostics=not args.no_diagnostics, progress=progress, device=device)
    finally:
        if bar is not None:
            bar.close()
    print(f"merged {len(config.experts)} expert(s) with {report['resolved_config']['method']} "
          f"in {report['seconds']:.1f} s -> {args.out} (report: {args.out}/merge_report.json)")
    for fmt, path in exports:
        export_model(args.out, path, fmt, quantization=args.quantization if fmt == "ct2" else None,
                     force=args.force)
        print(f"exported ({fmt}) -> {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model
    summary = export_model(args.model, Path(args.out), args.format,
                           quantization=args.quantization, force=args.force)
    detail = f", {summary['quantization']}" if "quantization" in summary else ""
    print(f"exported {args.model} ({args.format}{detail}) -> {args.out}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .merging.compress import compress
    summary = compress(args.base, args.expert, args.out, rank=args.rank, keep=args.keep,
                       svd=args.svd, seed=args.seed, force=args.force)
    print(f"compressed {args.expert} (LoRS rank {args.rank}, keep {args.keep}, {args.svd} SVD, "
          f"seed {args.seed}; float32) in {summary['seconds']:.1f} s -> {args.out}: "
          f"{_megabytes(summary['bytes'])} vs {_megabytes(summary['full_bytes'])} full "
          f"checkpoint ({summary['bytes'] / summary['full_bytes']:.1%})")
    return 0


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.{1 if size >= 1e5 else 3}f} MB"


def cmd_methods(args: argparse.Namespace) -> int:
    from .merging.groups import GROUPS
    from .merging.methods import METHODS, OPS, method_defaults
    for name, spec in METHODS.items():
        lam = OPS[spec.matrix_op].lambda_default(method_defaults(spec))
        print(f"{name:<16}{spec.summary}\n{'':<16}defaults {method_defaults(spec)}, lambda "
              f"{lam}; 2-D attn/FFN -> {spec.matrix_op}, other -> {spec.other_op}")
    print("\nops: " + ", ".join(f"{op} ({', '.join(sorted(o.parameters)) or 'no parameters'})"
                                for op, o in OPS.items()))
    print("groups: " + ", ".join(GROUPS))
    return 0


def cmd_base(args: argparse.Namespace) -> int:
    from .base import ensure_base_model
    path = ensure_base_model(Path(args.cache) if args.cache else None,
                             show_progress=not args.quiet)
    if args.out:
        import shutil
        from .fsutil import atomic_directory
        with atomic_directory(Path(args.out), force=args.force) as folder:
            for item in path.iterdir():
                if item.is_file() and not item.name.startswith("."):
                    shutil.copy2(item, folder / item.name)
        path = Path(args.out)
    print(path)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import synthesize
    manifest = synthesize(args.languages, args.splits, Path(args.out),
                          limit_per_split=args.limit, jobs=args.jobs,
                          show_progress=not args.quiet,
                          augment={"noise_snr": args.noise_snr,
                                   "reverb_rt60": args.reverb_rt60})
    print(f"manifest: {manifest}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, format_table
    from .evaluation.evaluate import compare, format_comparison
    models = args.model or ["base"]
    options = dict(languages=args.languages, tasks=args.tasks, batch_size=args.batch_size,
                   num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                   window_seconds=args.window, split=args.split,
                   show_progress=not args.quiet)
    out = Path(args.out) if args.out else None
    if len(models) == 1:
        print(format_table(evaluate(models[0], Path(args.manifest), out=out, force=args.force,
                                    **options)))
    else:
        result = compare(models, Path(args.manifest), out=out, force=args.force,
                         replicates=args.replicates, seed=args.seed, **options)
        for report in result["models"]:
            print(f"model: {report['model']}")
            print(format_table(report))
            print()
        print(format_comparison(result["comparison"]))
    if args.out:
        print(f"results (every hypothesis included): {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from .names import name_list
    from .training import TrainConfig, parse_pairs, train
    pairs = parse_pairs(name_list(args.languages, "languages") if args.languages else None,
                        name_list(args.tasks, "tasks") if args.tasks else None,
                        name_list(args.pairs, "pairs") if args.pairs else None)
    values = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.model_fields}
    values.update(pairs=pairs, show_progress=not args.quiet)
    try:
        config = TrainConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}"
                             for e in exc.errors())
        raise LorsError(f"invalid training settings: {problems}") from None
    summary = train(config)
    from accelerate import PartialState
    if not PartialState().is_main_process:  # several processes: one report
        return 0
    print(f"trained {', '.join('-'.join(p) for p in pairs)} ({config.mode}"
          f"{', sequential' if config.sequential else ''}): {summary['samples']} samples, "
          f"{summary['samples'] / max(summary['train_seconds'], 1e-9):.2f} samples/s"
          f"{', stopped early on a dev plateau' if summary.get('stopped_early') else ''}")
    print(f"model: {config.out}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment.config import load_experiment
    from .experiment.runner import run_experiment, summary
    if args.jobs is not None and args.jobs < 1:
        raise LorsError(f"--jobs {args.jobs}: give at least 1")
    if args.retries < 0:
        raise LorsError(f"--retries {args.retries}: give 0 or more")
    if args.ray_address and args.executor != "ray":
        raise LorsError("--ray-address is for --executor ray")
    config = load_experiment(args.config, out=args.out, base=args.base)
    if args.executor == "local" and (args.jobs or 1) == 1:
        experiment = run_experiment(config, show_progress=not args.quiet)
    else:
        from .experiment.parallel import make_executor, run_parallel
        from .threads import thread_count
        folder = Path(args.log_folder) if args.log_folder else Path(config.out) / "logs" / "submitit"
        executor = make_executor(args.executor, jobs=args.jobs, threads=thread_count(),
                                 folder=folder, ray_address=args.ray_address,
                                 partition=args.partition, time_min=args.time_min,
                                 gpus=args.gpus_per_job, mem_gb=args.mem_gb)
        experiment = run_parallel(config, executor, retries=args.retries,
                                  show_progress=not args.quiet)
    print(summary(experiment))
    print(f"report: {experiment['report']['html']} (markdown: {experiment['report']['markdown']})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .experiment.demo import demo_config
    from .experiment.runner import run_experiment, summary
    config = demo_config(quick=args.quick, out=args.out, base=args.base)
    experiment = run_experiment(config, show_progress=not args.quiet)
    print(summary(experiment))
    print(f"report: {experiment['report']['html']} (markdown: {experiment['report']['markdown']})")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging
    from .fsutil import atomic_directory
    from .tiny import write_tiny_example
    hf_logging.disable_progress_bar()  # its per-file bars would drown the one line we print
    with atomic_directory(Path(args.out), force=args.force) as folder:
        names = list(write_tiny_example(folder, experts=args.experts))
    print(f"tiny random Whisper base and experts in {args.out}: {', '.join(names)}")
    return 0


COMMANDS = {"merge": cmd_merge, "compress": cmd_compress, "methods": cmd_methods,
            "base": cmd_base, "synth": cmd_synth,
            "eval": cmd_eval, "train": cmd_train, "experiment": cmd_experiment,
            "demo": cmd_demo, "tiny": cmd_tiny, "export": cmd_export}


def _print_lors_warnings() -> None:
    """Show lors' own warnings as one ``lors: warning: ...`` line each (others unchanged)."""
    import warnings
    original = warnings.showwarning
    if getattr(original, "lors", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LorsWarning):
            print(f"lors: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)
    show.lors = True
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit 2 on a LorsError, 130 on Ctrl-C and 143 on SIGTERM, after the
    temporaries of unfinished outputs were removed (SIGTERM is raised like Ctrl-C)."""
    from .fsutil import Terminated, sigterm_as_interrupt

    args = build_parser().parse_args(argv)
    _print_lors_warnings()
    try:
        from .threads import configure_threads
        configure_threads(getattr(args, "threads", None))  # before any command imports torch
        with sigterm_as_interrupt():
            return COMMANDS[args.command](args)
    except LorsError as exc:
        print(f"lors: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("lors: terminated; no output was published", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("lors: interrupted; no output was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
