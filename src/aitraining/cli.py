"""`aitraining` command line. Flags are made from LLMTrainingParams fields, one to one.

    aitraining llm --train --model M --data-path D --project-name P [--use-distillation --teacher-model T ...]
    aitraining llm --train --config run.yml --lr 1e-4      (flags override the file)
    aitraining prune --model T --num-layers 8 --output student/
    aitraining eval --model M --teacher-model T --data-path heldout.jsonl [--baseline B]

Bad input ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
import warnings
from typing import Any, NoReturn

from aitraining.errors import UserError
from aitraining.params import LLMTrainingParams, flag

PICKLE_HELP = "load pickled weights (.bin, .pt), which can run code while they load (off: safetensors and GGUF only)"

GROUP_ORDER = ("Model", "Data", "Training", "LoRA", "Distillation")


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (argparse prints usage plus a message)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _field_type(annotation: Any) -> tuple[Any, list[Any] | None]:
    """The argparse type and choices of a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _field_type(args[0])
    if origin is typing.Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices
    return annotation, None


def _add_llm_flags(parser: argparse.ArgumentParser) -> None:
    groups = {name: parser.add_argument_group(name) for name in GROUP_ORDER}
    for name, info in LLMTrainingParams.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        group = groups[str(extra.get("group", "Training"))]
        typ, choices = _field_type(info.annotation)
        default = info.default
        help_text = f"{info.description} (default: {default})"
        if typ is bool:
            group.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag(name), dest=name, type=typ, choices=choices, default=argparse.SUPPRESS,
                               metavar=name.upper() if choices is None else None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aitraining", description="Fine-tune and distill causal language models.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    llm = sub.add_parser("llm", help="train a causal LM (fine-tuning or distillation)",
                         description="Train a causal LM. Flags map one to one to LLMTrainingParams fields.")
    llm.add_argument("--train", action="store_true", help="run training")
    llm.add_argument("--config", metavar="FILE.yml", help="read parameters from a YAML file; flags override it")
    _add_llm_flags(llm)

    prune = sub.add_parser("prune", help="make a student by keeping N of a model's layers",
                           description="Depth pruning: keep N decoder layers of a model, saved as a normal model "
                                       "folder to distill into. By default the layers are chosen by measurement: "
                                       "those whose removal changes the model's own answers least.")
    prune.add_argument("--model", required=True, help="the model to prune (folder, .gguf or hub id)")
    prune.add_argument("--num-layers", type=int, required=True, help="decoder layers to keep")
    prune.add_argument("--output", required=True, help="folder to write the student to")
    prune.add_argument("--layers", default="measured", metavar="measured|even|I,J,...",
                       help="measured (default): the layers whose removal changes the model's answers least (KL "
                            "on its answers to 16 prompts; 179 trials of one forward pass each for 30 layers to 8: "
                            "4 minutes for a 135M model on two CPU cores); even: evenly spaced, first and last "
                            "kept (instant, much further from the original); or the 0-based layers to keep, e.g. a "
                            "measured choice again")
    prune.add_argument("--calibration-data", default=None, metavar="PATH",
                       help="with --layers measured: measure on up to 16 prompts spread over this data (the formats "
                            "of --data-path) instead of built-in English ones; use your own kind of text")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    prune.add_argument("--trust-remote-code", action="store_true", help="run model code from the repository")
    prune.add_argument("--allow-pickle-weights", action="store_true", help=PICKLE_HELP)

    transplant = sub.add_parser(
        "transplant", help="give a model another tokenizer (embeddings of the new tokens from the old pieces)",
        description="Vocabulary transplant: the model with the tokenizer of another model; each new token's "
                    "embedding is the mean of the old embeddings of the pieces that write the same bytes. "
                    "Train (fine-tune or distill) the result before use.")
    transplant.add_argument("--model", required=True, help="the model (folder, .gguf or hub id)")
    transplant.add_argument("--tokenizer", required=True, help="the model whose tokenizer it gets (folder, .gguf or hub id)")
    transplant.add_argument("--output", required=True, help="folder to write the model to")
    transplant.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    transplant.add_argument("--trust-remote-code", action="store_true", help="run model code from the repository")
    transplant.add_argument("--allow-pickle-weights", action="store_true", help=PICKLE_HELP)
    ev = sub.add_parser(
        "eval", help="judge a model against its teacher on held-out prompts (eval.json)",
        description="KL(teacher || model) per token of the teacher's responses, top-1 agreement, perplexity, "
                    "ROUGE-L of the model's greedy answers against the teacher's, parameters, size on disk and "
                    "generation speed, for the model (and --baseline) and the teacher. The teacher writes the "
                    "responses that rows lack (kept beside the output for the next model). Models with another "
                    "tokenizer than the teacher's are judged on the text, per byte.")
    ev.add_argument("--model", required=True, help="the model to judge (folder, .gguf or hub id)")
    ev.add_argument("--teacher-model", required=True, help="the teacher (folder, .gguf or hub id)")
    ev.add_argument("--data-path", required=True, help="held-out rows: prompts, with or without responses")
    ev.add_argument("--baseline", help="another model judged beside it (e.g. one trained without distillation)")
    ev.add_argument("--output", help="where eval.json goes (default: eval.json in --model's folder, else here)")
    ev.add_argument("--max-rows", type=int, default=None, help="judge on at most N rows")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="longest response the teacher writes")
    ev.add_argument("--chat-template", default=None, help="as for `aitraining llm`")
    ev.add_argument("--trust-remote-code", action="store_true", help="run model code from the repository")
    ev.add_argument("--allow-pickle-weights", action="store_true", help=PICKLE_HELP)
    ev.add_argument("--skip-bad-rows", action="store_true", help="leave out rows that cannot be used instead of stopping")
    return parser


def _eval(ns: argparse.Namespace) -> int:
    from aitraining.batches import StudentSettings
    from aitraining.compare import table
    from aitraining.data.examples import DataSettings
    from aitraining.evaluate import run_eval
    from aitraining.models.load import resolve_model_source
    from aitraining.teacher import TeacherSettings

    for name, value in (("--max-rows", ns.max_rows), ("--max-new-tokens", ns.max_new_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    output = ns.output or os.path.join(ns.model if os.path.isdir(ns.model) else ".", "eval.json")
    params = LLMTrainingParams(model=ns.model, teacher_model=ns.teacher_model, data_path=ns.data_path,
                               use_distillation=True, holdout_share=0.0,
                               max_samples=ns.max_rows, distill_max_teacher_length=ns.max_new_tokens,
                               chat_template=ns.chat_template, trust_remote_code=ns.trust_remote_code,
                               allow_pickle_weights=ns.allow_pickle_weights, skip_bad_rows=ns.skip_bad_rows,
                               project_name=os.path.dirname(os.path.abspath(output)))
    resolve_model_source(ns.model, flag="--model")
    resolve_model_source(ns.teacher_model, flag="--teacher-model")
    if ns.baseline:
        resolve_model_source(ns.baseline, flag="--baseline")
    record = run_eval(params.settings(StudentSettings), params.settings(TeacherSettings), params.settings(DataSettings),
                      output, baseline=ns.baseline)
    if "kl_to_teacher" in next(iter(record["models"].values())):
        print("\n".join(table(record, roles=list(record["models"]))))
    else:
        for role, row in record["models"].items():
            print(f"{role}: KL per byte {row['kl_per_byte']:.4f}, ROUGE-L {row['rouge_l']:.3f}, "
                  f"repeated trigrams {row['repetition']:.1%}, "
                  f"{row['parameters']:,} parameters, {row['tokens_per_s']:.1f} tokens/s")
    print(f"wrote {output}")
    return 0


def _read_config(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"--config: '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config: '{path}' is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config: '{path}' must be a mapping of parameter: value")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def params_from_args(ns: argparse.Namespace) -> LLMTrainingParams:
    values: dict[str, Any] = {}
    if getattr(ns, "config", None):
        values.update(_read_config(ns.config))
    values.update({k: v for k, v in vars(ns).items() if k in LLMTrainingParams.model_fields})
    return LLMTrainingParams(**values)


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger("aitraining")
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler)]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    warnings.showwarning = lambda message, category, *a, **k: print(f"WARNING {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        if ns.command == "llm":
            if not ns.train:
                raise UserError("aitraining llm: nothing to do; add --train (see `aitraining llm --help`)")
            params = params_from_args(ns)
            from aitraining.train import run

            project = run(params)
            print(f"done: {project}")
            return 0
        if ns.command == "eval":
            return _eval(ns)
        if ns.command == "prune":
            from aitraining.models.prune import prune_to_folder

            out = prune_to_folder(ns.model, ns.num_layers, ns.output, overwrite=ns.overwrite, layers=ns.layers,
                                  trust_remote_code=ns.trust_remote_code, allow_pickle=ns.allow_pickle_weights,
                                  calibration_data=ns.calibration_data)
            print(f"done: {out}")
            return 0
        if ns.command == "transplant":
            from aitraining.models.transplant import transplant_to_folder

            out = transplant_to_folder(ns.model, ns.tokenizer, ns.output, overwrite=ns.overwrite,
                                       trust_remote_code=ns.trust_remote_code, allow_pickle=ns.allow_pickle_weights)
            print(f"done: {out}")
            return 0
        parser.print_help()
        return 2
    except UserError as e:
        print(f"aitraining: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # Outside the training loop (which saves a checkpoint itself): the teacher's outputs and cache are
        # appended as they are made, so the same command continues where this one stopped.
        print("aitraining: interrupted; rerun the same command to continue from what was saved", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
