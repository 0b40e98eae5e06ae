"""The ``lightning-ft`` command: LightningCLI over our modules and ``FineTuneDataModule``.

    lightning-ft fit --config recipes/minilm_mr_sft.yaml [--trainer.max_epochs 3 ...]
    lightning-ft validate|test|predict --config ... --ckpt_path ...
    lightning-ft prepare-mr [--out data/mr]      (the MR example's data; see ``lightning_ft_examples.mr``)
    lightning-ft prepare-trec [--out data/trec]  (free-text answers; see ``lightning_ft_examples.trec``)
    lightning-ft report RUN_DIR [RUN_DIR ...] --out report.md   (runs side by side; ``lightning_ft.evaluation``)

A recipe states the model once (``model.init_args.model_name_or_path``) and the row format once (``data.format``:
instruction, classification or text); the CLI links them to the data module's tokenizer and to the module's task
(``causal_lm`` or ``classification``) and labels. ``data.task``, the former name of ``data.format``, is still
accepted. A classification recipe without
``data.labels`` gets the label set inferred from the train split, exactly as ``FineTuneDataModule`` infers it.

The modules build their own optimizer (AdamW with warm-up and decay, set by ``--model.init_args.learning_rate``,
``weight_decay``, ``warmup_ratio``, ``scheduler``, ...), so there are no ``--optimizer`` / ``--lr_scheduler`` options.
``lightning-ft fit --help`` ends with the arguments of every method module.

An invalid configuration value (a wrong type, a refused value, a data error found at set-up) prints a one-paragraph
error and exits with status 2; ``LIGHTNING_FT_DEBUG=1`` shows the traceback instead.

Distributed: ``--trainer.strategy adapter_ddp`` (or ``adapter_fsdp2``, ``adapter_fsdp1``; see
``lightning_ft.strategies``) with ``--trainer.devices`` and ``--trainer.num_nodes``; ``recipes/launch_torchrun.sh``
and ``recipes/launch_slurm.sbatch`` start the processes on several nodes.
"""

from __future__ import annotations

import argparse
import inspect
import linecache
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_ft.strategies  # noqa: F401  registers --trainer.strategy adapter_ddp / adapter_fsdp2 / adapter_fsdp1
from lightning_ft.data.datamodule import FineTuneDataModule, model_task_for, resolve_format
from lightning_ft.modules.base import FineTuneModule

DEBUG_ENV = "LIGHTNING_FT_DEBUG"
#: the method modules whose arguments ``--help`` lists (after the arguments every module shares)
HELP_MODULES = ("lightning_ft.SFTModule", "lightning_ft.LoRAModule", "lightning_ft.SparseModule")
#: module arguments the CLI fills in from the data module (``add_arguments_to_parser``)
LINKED_MODULE_ARGS = ("task", "labels")


def labels_for_model(data: FineTuneDataModule) -> list[str] | None:
    """The data module's label set. For classification without ``labels`` it is inferred from the train split now,
    by the data module itself, because the module needs it to build its classification head and metrics."""
    if data.format == "classification" and data.labels is None:
        if data.sources.get("train") is None:
            raise ValueError(
                "classification without `data.labels` infers the label set from the train split, and there is no "
                "`data.train`: give the ordered label set, e.g. --data.labels '[negative, positive]'"
            )
        data.make_format(data.read_splits())  # sets data.labels, as set-up would
    return data.labels


class FineTuneArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are one paragraph and whose help lists the modules' arguments."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG") or os.environ.get(DEBUG_ENV):
            super().error(message, ex)
        self._logger.error(message)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {condense_error(message)} Run `{prog} --help` for the accepted options.\n")
        self.exit(2)

    @override
    def format_help(self, *args: Any, **kwargs: Any) -> str:
        text = super().format_help(*args, **kwargs)
        if any(a.dest == "model" for a in self._actions) and not getattr(self, "_inner_parser", False):
            text += "\n" + module_arguments_help()
        return text


class FineTuneCLI(LightningCLI):
    """LightningCLI with the links between the data module and the method module."""

    @override
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")
        # the row format decides the module's task; `data.task` is the format's former name, still accepted
        parser.link_arguments(("data.format", "data.task"), "model.init_args.task", compute_fn=model_task_for)
        # on instantiation: an inferred label set exists only once the data module has read its train split
        parser.link_arguments("data", "model.init_args.labels", compute_fn=labels_for_model, apply_on="instantiate")

    @override
    def before_instantiate_classes(self) -> None:
        """A config that uses the old key ``data.task`` is saved (``config.yaml``) with ``data.format`` instead."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        data = config.get("data")
        if data is not None and data.get("task") is not None:
            data["format"], data["task"] = resolve_format(data.get("format"), data.get("task")), None


def make_cli(args: list[str] | None = None, run: bool = True) -> FineTuneCLI:
    """Build the CLI; ``args`` replaces ``sys.argv[1:]`` (with ``run=False`` it holds no subcommand).

    Errors in values propagate as exceptions here (``main`` turns them into a one-paragraph message).
    """
    return FineTuneCLI(
        FineTuneModule,
        FineTuneDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_class=FineTuneArgumentParser,
        parser_kwargs={"prog": "lightning-ft"},
        auto_configure_optimizers=False,  # the modules' configure_optimizers builds AdamW + the schedule
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "prepare-mr":  # the MR example's data preparation, kept out of the library
        from lightning_ft_examples.mr import main as prepare_mr

        if prepare_mr(args[1:], prog="lightning-ft prepare-mr"):
            raise SystemExit(1)
        return
    if args and args[0] == "prepare-trec":  # the TREC free-text example's data (lightning_ft_examples.trec)
        from lightning_ft_examples.trec import main as prepare_trec

        if prepare_trec(args[1:], prog="lightning-ft prepare-trec"):
            raise SystemExit(1)
        return
    if args and args[0] == "report":
        from lightning_ft.evaluation.run_report import main as report

        report(args[1:], prog="lightning-ft report")
        return
    try:
        make_cli(argv)
    except Exception as err:  # noqa: BLE001  only deliberate errors about values are shortened; others re-raise
        message = user_error_message(err)
        if message is None or os.environ.get(DEBUG_ENV):
            raise
        prog = "lightning-ft" + (f" {args[0]}" if args and args[0] in LightningCLI.subcommands() else "")
        sys.stderr.write(f"{prog}: error: {message} (Set {DEBUG_ENV}=1 to see the traceback.)\n")
        raise SystemExit(2) from None


# ---- errors ----------------------------------------------------------------------------------------------------
_USER_ERRORS = (ValueError, KeyError, TypeError, OSError, MisconfigurationException)
_ORIGINS = ("lightning_ft", "lightning", "jsonargparse")
_NOISE = re.compile(
    r"(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value type:|Given value:|"
    r"Expected a <class 'NoneType'>)"
)


def user_error_message(err: BaseException) -> str | None:
    """The message of ``err`` when it is an error about a value that a user can fix, else None.

    That is: the innermost cause was raised on purpose (a ``raise`` statement) by lightning-ft, Lightning or
    jsonargparse, with a type that describes a bad value (``ValueError``, ``KeyError``, ``TypeError``, ``OSError``)
    or a ``MisconfigurationException``. Bugs keep their traceback.
    """
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    if not isinstance(root, _USER_ERRORS) or root.__traceback__ is None:
        return None
    tb = root.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    deliberate = linecache.getline(filename, tb.tb_lineno).strip().startswith("raise")
    package = Path(filename).parts
    if not isinstance(root, MisconfigurationException) and not (deliberate and any(p in package for p in _ORIGINS)):
        return None
    text = root.args[0] if isinstance(root, KeyError) and root.args and isinstance(root.args[0], str) else str(root)
    return " ".join(text.split()) or type(root).__name__


def condense_error(message: str) -> str:
    """One paragraph from a jsonargparse error: the dotted key and the innermost reason, without the lists of
    Union alternatives and the dumped values."""
    keys: list[str] = []
    details: list[str] = []
    given = cls = None
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        match = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if match:
            keys.append(match.group(1))
            line = match.group(2)
        match = re.match(r"Problem with given class_path '([^']+)':\s*(.*)", line)
        if match:
            keys.append("init_args")
            cls, line = match.group(1), match.group(2)
        match = re.match(r"Given value: (.*)", line)
        if match:
            given = match.group(1)
        if line and not _NOISE.match(line):
            details.append(line)
    reason = " ".join(details) or " ".join(message.split())
    reason = re.sub(r"Expected a <class '([\w.]+)'>\.?\s*Got value:\s*", r"expected \1, got ", reason)
    reason = re.sub(r"Expected a typing\.Literal\[(.*?)\]\.?\s*Got value:\s*", r"expected one of \1, got ", reason)
    reason = re.sub(r"Expected a <class '([\w.]+)'>", r"expected \1", reason)
    if given and ", got " not in reason and given not in reason and len(given) < 80 and not re.match(r"\w+\(", given):
        reason += f", got {given}"
    reason = reason if reason.endswith((".", ")")) else reason + "."
    if re.search(r"--(optimizer|lr_scheduler)\b", reason):
        reason += (
            " The modules build their own AdamW optimizer and warm-up/decay schedule: set them with"
            " --model.init_args.learning_rate, weight_decay, betas, eps, warmup_steps or warmup_ratio, scheduler"
            " and min_lr_ratio."
        )
    if keys[:1] == ["model"] and "import path" in reason:
        reason += f" Choose one of {', '.join(HELP_MODULES)} (or give a config file)."
    key = ".".join(dict.fromkeys(keys))  # a key may be reported at two levels
    key = re.sub(r"init_args\.init_args", "init_args", key)
    if cls:
        key += f" of {cls}"
    return f"{key}: {reason}" if key else reason


# ---- help ------------------------------------------------------------------------------------------------------
def module_arguments_help() -> str:
    """The ``--model.init_args.*`` arguments: those every module shares, then each method module's own."""
    import importlib

    base = inspect.signature(FineTuneModule.__init__).parameters
    sections = [
        textwrap.fill(
            "Arguments of the method module: choose it with --model CLASS (or model.class_path in a config), then "
            "give its arguments as --model.init_args.NAME VALUE (or --model.NAME VALUE). Its task and labels come "
            "from --data.format and --data.labels (labels inferred from the train split when not given).",
            width=79,
        )
    ]
    skip = {"self", "model", *LINKED_MODULE_ARGS}
    sections.append(_class_arguments(FineTuneModule, "Shared by every module", skip))
    for path in HELP_MODULES:
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters
        # a base argument the class re-declares with another default (LoRA's learning rate) is listed again
        other_default = {n for n, p in params.items() if n in base and p.default != base[n].default}
        own = _class_arguments(cls, f"{name} (--model {path}) adds", skip | (set(base) - other_default))
        sections.append(own or f"{name} (--model {path}): no arguments of its own.")
    return "\n\n".join(s.rstrip() for s in sections) + "\n"


def _class_arguments(cls: type, title: str, skip: set[str]) -> str:
    parser = LightningArgumentParser(usage=argparse.SUPPRESS, description="", add_help=False)
    added = parser.add_class_arguments(cls, "model.init_args", skip=skip)
    if not added:
        return ""
    text = parser.format_help()
    text = re.sub(r"  --model\.init_args CONFIG\s+Path to a configuration file\.\n", "", text)
    start = text.find("\n  --")
    return f"{title}:" + text[start:] if start >= 0 else ""


if __name__ == "__main__":
    main()
