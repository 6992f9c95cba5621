"""The ``lors`` command line's arguments: one sub-parser per command (``lors.cli`` runs them)."""

from __future__ import annotations

import argparse

DESCRIPTION = ("Merge language- and task-specific fine-tuned Whisper experts into one "
               "multilingual model (LoRS-Merging and its baselines); train the experts and "
               "baselines, evaluate, and run the paper-style experiment.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lors", description=DESCRIPTION)
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch and OpenMP (default: $LORS_THREADS, else the "
                             "CPUs this process may use); idle threads wait passively "
                             "(OMP_WAIT_POLICY=PASSIVE), so lors jobs sharing a machine do not "
                             "slow each other down badly")
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
    m.add_argument("--device", help="where tensors are merged: cpu (default), cuda or cuda:N "
                                    "(SVDs, top-k and elections on the GPU, streamed one "
                                    "tensor at a time as on the CPU)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--export", action="append", metavar="FORMAT",
                   help="also export the merged model: ct2 (CTranslate2 for faster-whisper, "
                        "written to OUT-ct2/) or openai (openai-whisper, OUT.pt); repeatable")
    m.add_argument("--quantization", help="weight type of --export ct2 (default float32): "
                                          "float32, float16, bfloat16, int8, int8_float32, "
                                          "int8_float16, int8_bfloat16, int16")

    c = commands.add_parser("compress", help="store one expert (checkpoint or LoRA adapter) as "
                                             "its LoRS-pruned task vector in one safetensors file")
    c.add_argument("--base", help="base model: path, hub id, or 'base' (default: embedded base)")
    c.add_argument("--expert", required=True, metavar="PATH",
                   help="full checkpoint or PEFT LoRA adapter folder fine-tuned from the base")
    c.add_argument("--rank", type=int, default=7, help="rank r of the low-rank part (default 7)")
    c.add_argument("--keep", type=float, default=0.2,
                   help="fraction of the residual's entries kept (default 0.2)")
    c.add_argument("--svd", choices=["randomized", "exact"], default="randomized")
    c.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD's sketch")
    c.add_argument("--out", required=True, help="output .safetensors file (must not exist "
                                                "unless --force)")
    c.add_argument("--force", action="store_true", help="replace an existing output file")

    commands.add_parser("methods", help="list merge methods, defaults and groups")

    b = commands.add_parser("base", help="fetch, verify and convert the embedded Whisper base; "
                                          "print its path")
    b.add_argument("--out", help="also copy it to this directory")
    b.add_argument("--cache", help="cache directory (default $LORS_CACHE or ~/.cache/lors)")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.add_argument("--quiet", action="store_true", help="no progress bars")

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
    tr.add_argument("--mixed-precision", dest="mixed_precision", choices=["no", "bf16", "fp16"],
                    help="autocast precision (default: the launcher's, e.g. accelerate launch --mixed_precision, else no)")
    tr.add_argument("--cpu", action="store_true", default=None, help="stay on CPU even with a GPU")
    tr.add_argument("--cache-dir", dest="cache_dir", help="encoder-output cache (default: lors cache)")
    tr.add_argument("--force", action="store_true", default=None,
                    help="replace an existing output; discard an interrupted run with other settings")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")

    x = commands.add_parser("experiment", help="run the paper-style experiment of a YAML config "
                                               "(every stage cached) and write its report")
    x.add_argument("config", help="experiment YAML (see examples/)")
    x.add_argument("--out", help="experiment folder (default: the config's out)")
    x.add_argument("--base", help="base model folder (default: the config's base, else the embedded one)")
    x.add_argument("--quiet", action="store_true")
    x.add_argument("--threads", type=int, metavar="N", default=argparse.SUPPRESS,
                   help="as lors --threads N: the CPU threads of this run, shared by --jobs")
    p = x.add_argument_group("parallel stages (experts, baselines, searches, merges and "
                             "evaluations that do not depend on each other run at once; "
                             "the stage cache under --out is shared, each stage runs once)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="stages at a time: local worker processes, each on its own CPUs "
                        "with threads/N torch threads and its own GPU when GPUs are "
                        "visible (default 1: serial); with ray or slurm, the most stages in "
                        "flight (default: all that are ready) and each job's share of threads")
    p.add_argument("--executor", choices=["local", "ray", "slurm", "slurm-local"],
                   default="local",
                   help="local processes (default), a Ray cluster (--ray-address or "
                        "RAY_ADDRESS, else a local Ray), SLURM jobs through submitit, or "
                        "slurm-local: the same jobs as local processes (submitit's "
                        "LocalExecutor, for testing)")
    p.add_argument("--ray-address", dest="ray_address", metavar="ADDRESS",
                   help="Ray cluster to run on (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--partition", help="SLURM partition of each job")
    p.add_argument("--time", dest="time_min", type=int, default=240, metavar="MINUTES",
                   help="SLURM time limit of each job in minutes (default 240)")
    p.add_argument("--gpus-per-job", dest="gpus_per_job", type=int, default=0, metavar="N",
                   help="GPUs each ray or slurm job asks for (default 0)")
    p.add_argument("--mem-gb", dest="mem_gb", type=float, metavar="GB",
                   help="memory of each SLURM job")
    p.add_argument("--log-folder", dest="log_folder", metavar="DIR",
                   help="submitit's job logs (default OUT/logs/submitit); every stage also "
                        "logs to OUT/logs/STAGE.log")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="resubmit a failed stage up to N times, then stop with its log "
                        "(default 2)")

    d = commands.add_parser("demo", help="the embedded default experiment: Whisper base, espeak-ng "
                                         "speech in de/es/fr, experts, MTL, merges, report")
    d.add_argument("--out", help="experiment folder (default runs/demo)")
    d.add_argument("--base", help="base model folder (default: the embedded Whisper base)")
    d.add_argument("--quick", action="store_true",
                   help="a few-minute smoke run of the same pipeline (8 sentences, 2 steps)")
    d.add_argument("--quiet", action="store_true")

    t = commands.add_parser("tiny", help="write a tiny random Whisper base and experts (for trying "
                                          "lors in seconds)")
    t.add_argument("--out", required=True)
    t.add_argument("--experts", type=int, default=3)
    t.add_argument("--force", action="store_true")

    ex = commands.add_parser("export", help="write a Whisper model for CTranslate2 "
                                           "(faster-whisper) or openai-whisper")
    ex.add_argument("model", help="Hugging Face folder, openai .pt, hub id (local cache when "
                                 "offline) or 'base'")
    ex.add_argument("--format", required=True, metavar="FORMAT",
                   help="ct2 (a folder faster_whisper.WhisperModel loads) or openai (a .pt "
                        "file whisper.load_model loads)")
    ex.add_argument("--quantization", help="ct2 weight type (default float32): float32, "
                                          "float16, bfloat16, int8, int8_float32, "
                                          "int8_float16, int8_bfloat16, int16")
    ex.add_argument("--out", required=True, help="output folder (ct2) or .pt file (openai); "
                                                "must not exist unless --force")
    ex.add_argument("--force", action="store_true", help="replace an existing output")
    return parser
