"""The ``lors`` command line: a thin layer that parses arguments and calls the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LorsError, LorsWarning

DESCRIPTION = ("Merge language- and task-specific fine-tuned Whisper experts into one "
               "multilingual model (LoRS-Merging and its baselines); train the experts and "
               "baselines, evaluate, and run the paper-style experiment.")


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
                       diagnostics=not args.no_diagnostics, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"merged {len(config.experts)} expert(s) with {report['resolved_config']['method']} "
          f"in {report['seconds']:.1f} s -> {args.out} (report: {args.out}/merge_report.json)")
    return 0


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
    print(f"trained {', '.join('-'.join(p) for p in pairs)} ({config.mode}"
          f"{', sequential' if config.sequential else ''}): {summary['samples']} samples, "
          f"{summary['samples'] / max(summary['train_seconds'], 1e-9):.2f} samples/s"
          f"{', stopped early on a dev plateau' if summary.get('stopped_early') else ''}")
    print(f"model: {config.out}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment.config import load_experiment
    from .experiment.runner import run_experiment, summary
    config = load_experiment(args.config, out=args.out, base=args.base)
    experiment = run_experiment(config, show_progress=not args.quiet)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lors", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)

    m = commands.add_parser("merge", help="merge fine-tuned Whisper experts into one model")
    m.add_argument("config", nargs="?", help="YAML merge config (flags override its values)")
    m.add_argument("--base", help="base model: path, hub id, or 'base' (default: embedded base)")
    m.add_argument("--expert", action="append", metavar="NAME=PATH", help="repeat per expert")
    m.add_argument("--weight", action="append", metavar="NAME=W", help="per-expert weight")
    m.add_argument("--method", help="merge method (see `lors methods`)")
    m.add_argument("--rank", type=int, help="rank r of the low-rank part (lors, svd)")
    m.add_argument("--rank-ratio", dest="rank_ratio", type=float, help="rank as a fraction of min(m, n)")
    m.add_argument("--keep", type=float, help="fraction of entries kept (lors residual, ties, magnitude, dare)")
    m.add_argument("--lambda", dest="lambda_", type=float, help="scale of the merged task vector")
    m.add_argument("--seed", type=int, help="seed for DARE and randomized SVD")
    m.add_argument("--scope", choices=["tensor", "global"], help="top-k scope (ties, magnitude)")
    m.add_argument("--svd", choices=["randomized", "exact"], help="SVD algorithm for rank-r parts")
    m.add_argument("--dare-combine", dest="dare_combine", choices=["linear", "ties"])
    m.add_argument("--group", action="append", metavar="GROUP=OP", help="per-group op override")
    m.add_argument("--calibrate", metavar="svc",  # checked with the config: one error line
                   help="post-step on the merged 2-D attention/FFN matrices: svc = singular "
                        "value calibration (strength: svc_alpha in a CONFIG.yaml, default 1/T)")
    m.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    m.add_argument("--shard-size-mb", dest="shard_size_mb", type=float)
    m.add_argument("--out", help="output directory (must not exist unless --force)")
    m.add_argument("--force", action="store_true", help="replace an existing output directory")
    m.add_argument("--allow-other-base", dest="allow_other_base", action="store_true",
                   help="merge even experts that look fine-tuned from another base")
    m.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print the resolved config and per-group matches; write nothing")
    m.add_argument("--no-diagnostics", dest="no_diagnostics", action="store_true")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_merge)

    methods = commands.add_parser("methods", help="list merge methods, defaults and groups")
    methods.set_defaults(func=cmd_methods)

    b = commands.add_parser("base", help="fetch, verify and convert the embedded Whisper base; "
                                          "print its path")
    b.add_argument("--out", help="also copy it to this directory")
    b.add_argument("--cache", help="cache directory (default $LORS_CACHE or ~/.cache/lors)")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_base)

    s = commands.add_parser("synth", help="render the sentence bank to 16 kHz speech with espeak-ng")
    s.add_argument("--languages", default="ca,de,es,fr,it,id,nl,pt,ru,sv",
                   help="comma-separated ISO 639-1 codes (default: all ten)")
    s.add_argument("--splits", default="train,dev,test", help="comma-separated splits")
    s.add_argument("--out", required=True, help="output folder (manifest.jsonl is written there)")
    s.add_argument("--limit", type=int, help="at most this many sentences per split")
    s.add_argument("--jobs", type=int, help="parallel espeak-ng processes (default: CPU count)")
    s.add_argument("--noise-snr", dest="noise_snr", metavar="LO,HI",
                   help="add white, pink or brown noise at an SNR drawn per clip from LO..HI "
                        "dB (seeded by the utterance id; negative: --noise-snr=-5,10)")
    s.add_argument("--reverb-rt60", dest="reverb_rt60", metavar="LO,HI",
                   help="reverberate each clip with a synthetic room response, RT60 drawn "
                        "per clip from LO..HI seconds (seeded by the utterance id)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synth)

    e = commands.add_parser("eval", help="decode a manifest with forced language/task tokens "
                                          "and score WER/CER (asr) or BLEU/chrF (st)")
    e.add_argument("model", nargs="*",
                   help="local Hugging Face Whisper folder (config.json, model.safetensors or "
                        "a weights-only pytorch_model.bin, tokenizer and preprocessor files) "
                        "or 'base' (default: the embedded base); hub ids are not downloaded: "
                        "fetch the model first and pass its folder. Several models are "
                        "compared with the first: per pair WER/BLEU with 90 percent bootstrap "
                        "intervals and the paired difference to the first model")
    e.add_argument("--manifest", required=True, help="manifest.jsonl (e.g. from lors synth)")
    e.add_argument("--languages", help="comma-separated ISO 639-1 codes (default: all present)")
    e.add_argument("--tasks", default="asr", help="asr, st or asr,st")
    e.add_argument("--split", help="only utterances of this split (e.g. test)")
    e.add_argument("--out", help="results JSON, every hypothesis included (must not exist "
                                 "unless --force)")
    e.add_argument("--force", action="store_true", help="replace an existing --out file")
    e.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    e.add_argument("--beams", type=int, default=1, help="1 = greedy")
    e.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64,
                   help="cap on generated tokens per clip; clips over 30 s are decoded "
                        "long-form, with max(this, 224) tokens per 30 s segment")
    e.add_argument("--window", type=float,
                   help="encoder window in seconds for clips that fit it; longer clips get a "
                        "wider one, over 30 s long-form decoding (default: per clip)")
    e.add_argument("--replicates", type=int, default=1000,
                   help="bootstrap replicates when comparing several models (default 1000)")
    e.add_argument("--seed", type=int, default=0,
                   help="seed of the bootstrap when comparing several models (default 0)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    tr = commands.add_parser("train", help="fine-tune an expert per (language, task), the MTL "
                                           "model, or a sequential model from a Whisper base")
    tr.add_argument("--base", help="base model folder or 'base' (default: the embedded base)")
    tr.add_argument("--manifest", help="manifest.jsonl with train and dev splits (default: the "
                                       "sentence bank rendered with espeak-ng)")
    tr.add_argument("--languages", help="comma-separated ISO 639-1 codes, e.g. de,fr")
    tr.add_argument("--tasks", help="asr, st or asr,st (default asr)")
    tr.add_argument("--pairs", help="explicit ordered pairs instead, e.g. de-asr,fr-st")
    tr.add_argument("--out", required=True, help="output model folder (must not exist)")
    tr.add_argument("--sequential", action="store_true", default=None,
                    help="train one model on the pairs in order, saving each stage")
    tr.add_argument("--mode", choices=["full", "freeze-encoder", "lora"],
                    help="full fine-tuning (default), frozen encoder with cached outputs, or LoRA")
    tr.add_argument("--max-steps", dest="max_steps", type=int, help="optimizer steps (wins over --epochs)")
    tr.add_argument("--epochs", type=float, help="epochs over the largest pair (default 5)")
    tr.add_argument("--batch-size", dest="batch_size", type=int, help="global batch size (default 8)")
    tr.add_argument("--lr", dest="learning_rate", type=float,
                    help="peak learning rate (default 1e-5; 5e-4 for lora)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--eval-every", dest="eval_every", type=int, help="steps between dev evaluations")
    tr.add_argument("--eval-times", dest="eval_times", type=int,
                    help="this many dev evaluations spread evenly over the run (wins over "
                         "--eval-every), so runs of any length get the same number of checks")
    tr.add_argument("--patience", type=int,
                    help="stop once the dev score has not improved for N dev evaluations in a "
                         "row (--epochs/--max-steps stay the cap; each sequential stage counts "
                         "anew); default: off")
    tr.add_argument("--save-every", dest="save_every", type=int, help="steps between checkpoints")
    tr.add_argument("--select", choices=["token-accuracy", "wer-bleu"],
                    help="dev criterion for the best checkpoint (default token-accuracy)")
    tr.add_argument("--limit", type=int, help="at most this many train utterances per pair")
    tr.add_argument("--dev-limit", dest="dev_limit", type=int, help="at most this many dev utterances per pair")
    tr.add_argument("--lora-rank", dest="lora_rank", type=int)
    tr.add_argument("--mixed-precision", dest="mixed_precision", choices=["no", "bf16", "fp16"])
    tr.add_argument("--cpu", action="store_true", default=None, help="stay on CPU even with a GPU")
    tr.add_argument("--cache-dir", dest="cache_dir", help="encoder-output cache (default: lors cache)")
    tr.add_argument("--force", action="store_true", default=None,
                    help="replace an existing output; discard an interrupted run with other settings")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=cmd_train)

    x = commands.add_parser("experiment", help="run the paper-style experiment of a YAML config "
                                               "(every stage cached) and write its report")
    x.add_argument("config", help="experiment YAML (see examples/)")
    x.add_argument("--out", help="experiment folder (default: the config's out)")
    x.add_argument("--base", help="base model folder (default: the config's base, else the embedded one)")
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(func=cmd_experiment)

    d = commands.add_parser("demo", help="the embedded default experiment: Whisper base, espeak-ng "
                                         "speech in de/es/fr, experts, MTL, merges, report")
    d.add_argument("--out", help="experiment folder (default runs/demo)")
    d.add_argument("--base", help="base model folder (default: the embedded Whisper base)")
    d.add_argument("--quick", action="store_true",
                   help="a few-minute smoke run of the same pipeline (8 sentences, 2 steps)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    t = commands.add_parser("tiny", help="write a tiny random Whisper base and experts (for trying "
                                          "lors in seconds)")
    t.add_argument("--out", required=True)
    t.add_argument("--experts", type=int, default=3)
    t.add_argument("--force", action="store_true")
    t.set_defaults(func=cmd_tiny)
    return parser


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
        with sigterm_as_interrupt():
            return args.func(args)
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
