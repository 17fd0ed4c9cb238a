"""`lowmoe` command: dispatches to one module per subcommand, imported lazily so that
`lowmoe --help` works on machines without CUDA and starts fast."""

import argparse
import importlib
import sys

COMMANDS = {
    "decode": "generate text with a model (default: the bundled model)",
    "chat": "talk to a chat model in the terminal, through its chat template",
    "serve": "serve a model over HTTP with an OpenAI-compatible API (/v1/chat/completions, /v1/completions)",
    "bench": "decode speed of reactive, predictive and oracle expert prefetch side by side",
    "info": "print a model's architecture and the bytes of dense vs expert weights",
    "pack": "write an expert-major packed copy of a model for fast expert reads",
    "train-predictor": "fit the learned expert predictor on calibration text, saved beside the model",
    "trace": "print the per-layer expert cache summary of a trace file from `decode --trace`",
    "quantize": "write a Hugging Face model as a GGUF file in Q8_0, Q4_K_M, Q5_K_M, Q6_K, Q4_K or BF16",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lowmoe", description="Decode MoE models whose experts do not fit in fast memory.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name, help_text in COMMANDS.items():
        modules[name] = importlib.import_module(f"lowmoe.cli.{name.replace('-', '_')}")
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)

    from lowmoe.errors import LowmoeError

    try:
        return modules[args.command].main(args)
    except LowmoeError as e:
        print(f"lowmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
