"""Merge a trained adapter into its base: a standalone model directory, verified against the adapter.

    python align/merge.py --adapter outputs/sft --output outputs/sft-merged [--dtype bfloat16] [--no-verify]
                          [--tolerance X] [--overwrite]

A QLoRA adapter (trained on a 4-bit base, as its run.json says) is merged into the dequantized 4-bit base it
trained on; see `align.adapters.merge_adapter` for why and for the tolerances. Exit status 1 when verification
fails (nothing is written then).
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not the sibling files
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
import json

DTYPES = ("bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python align/merge.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json, run.json)")
    parser.add_argument("--output", required=True, help="directory for the merged model (must not exist)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the stored weights")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip comparing the merged model's logits with the adapter's")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max relative logits difference (default: 1e-3 for float32, 5e-2 for bf16/fp16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from align.adapters import MergeVerificationError, merge_adapter

    try:
        report = merge_adapter(
            args.adapter, args.output, dtype=getattr(torch, args.dtype), verify=args.verify,
            tolerance=args.tolerance, overwrite=args.overwrite,
        )
    except MergeVerificationError as err:
        if err.report is not None:
            print(json.dumps(err.report.to_json(), indent=2))
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_json(), indent=2))
    print(f"merged model written to {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
