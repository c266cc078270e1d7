"""`labkit spec train`: train (or load from the cache) the learned drafts (`labkit.speculative.training`)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from labkit.cli.arguments import comma_list
from labkit.speculative.distillation import KINDS, SIZES


def add_parser(subparsers) -> None:
    from labkit.speculative.training import spec_cache_dir

    spec = subparsers.add_parser("spec", help="speculative decoding: train the learned drafts",
                                 description="Speculative decoding tools. Benchmark with `labkit bench spec`.")
    sub = spec.add_subparsers(dest="spec_command", metavar="COMMAND", required=True)
    p = sub.add_parser("train", help="train (or load from the cache) the draft model, Medusa heads, EAGLE head",
                       description="Generate a corpus with the target, distil the learned drafts from it and save "
                                   f"them under the labkit cache ({spec_cache_dir()}); cached drafts that fit the "
                                   "config and the target are loaded instead, unless --force.")
    p.add_argument("--kind", type=comma_list(str), default=KINDS,
                   help=f"comma-separated from {', '.join(KINDS)} (default: all)")
    p.add_argument("--size", choices=SIZES, default="default",
                   help="smoke (seconds, for CI), small, default (minutes on 2 cores), large (default: default)")
    p.add_argument("--model", default=None, help="target model (default: the embedded SmolLM2)")
    p.add_argument("--dummy", action="store_true", help="random weights from a preset (e.g. tiny-smollm2)")
    p.add_argument("--force", action="store_true", help="retrain even when the cache holds the drafts")
    p.add_argument("--json", action="store_true", help="print what was trained or loaded as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from tqdm.auto import tqdm

    from labkit.model.rewrites import apply_rewrites
    from labkit.model.llama import from_hf
    from labkit.model.loader import EMBEDDED_MODEL, load_model
    from labkit.speculative.training import check_kinds, load_or_train

    check_kinds(args.kind)
    loaded = load_model(args.model or EMBEDDED_MODEL, device="cpu", dummy=args.dummy)
    if loaded.tokenizer is None:
        raise ValueError("the target needs a tokenizer to write its corpus")
    target = apply_rewrites(from_hf(loaded.model))
    log = (lambda msg: tqdm.write(msg, file=sys.stderr))
    trained = load_or_train(args.kind, target, loaded.tokenizer, size=args.size, progress=not args.no_progress,
                            force=args.force, log=log)
    summary = [{"kind": t.kind, "size": t.size, "path": str(t.path), "loaded": t.loaded, "metrics": t.metrics,
                "config": asdict(t.config)} for t in trained.values()]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for s in summary:
            print(f"{s['kind']:7s} {s['size']:8s} {'loaded' if s['loaded'] else 'trained'}  {s['path']}")
    return 0


__all__ = ["add_parser", "cmd_train"]
