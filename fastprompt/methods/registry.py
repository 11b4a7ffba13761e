"""The method registry (timm style), readable without torch.

A method has two halves:
- its *declaration*, a `MethodSpec` (torch-free): name, options dataclass (the keywords of
  `create_model` and the `--prefix.option` flags), the parameter groups it trains with their
  default recipe, whether its image tower stays frozen, a one-line summary and its paper.
  The built-in methods are declared in `fastprompt.methods.specs`, so that `fastprompt train`
  parses and checks a command line (method names, generated flags, option values, the
  config) before torch is imported;
- its *model*, a `PromptModel` subclass in its own module, bound to its declaration by

    @register_method("coop")     # options, groups, frozen tower: the spec declared as "coop"
    class Coop(PromptModel): ...

  and imported on first use (`method_class`). A method defined outside fastprompt (a test's
  toy method, a user's own) declares the facts on its class instead (`options = ...`,
  `groups = (...)`, `frozen_image_tower = ...`); registering it declares its spec.

The trainer, bench and CLI ask the registry for these facts; no list of method names exists
outside `specs` (the built-ins' declarations) and a registering module. The CLI's
`--<prefix>.<option>` flags are generated from the options dataclasses by `option_flags()`
(name, type, default, choices from the field's metadata, and help from the field's comment),
and its `--lr.<group>` / `--warmup-epochs.<group>` flags from `group_names()`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional

from fastprompt.errors import FastpromptError

METHODS: dict[str, "MethodSpec"] = {}  # name -> declaration, in declaration order (list_methods' order)


@dataclass(frozen=True)
class ParamGroup:
    """A named group of trainable tensors with its own default recipe (one optimiser param group).

    A model's trainable tensor `NAME.rest` belongs to group `NAME` (`text.context` to `text`,
    `cavpt.0.key.weight` to `cavpt`); `--lr.NAME` and `--warmup-epochs.NAME` override it."""

    name: str  # the prompt-state prefix and the flag suffix
    lr: float  # default peak learning rate
    warmup_epochs: int  # default constant-lr warm-up epochs (Dassl's WARMUP_EPOCH)
    imagenet_warmup_epochs: Optional[int] = None  # on ImageNet, where the recipe's source differs (None: the same)
    source: str = ""  # where the defaults come from

    def default_warmup(self, dataset: str) -> int:
        if dataset == "imagenet" and self.imagenet_warmup_epochs is not None:
            return self.imagenet_warmup_epochs
        return self.warmup_epochs


@dataclass
class MethodSpec:
    """What a method is, known without torch (see the module docstring). The facts a model class
    carries as class attributes (`options`, `groups`, `frozen_image_tower`) come from here."""

    name: str  # the --method name
    options: type  # its options dataclass (a fastprompt.methods.options.Options subclass)
    groups: tuple  # the ParamGroups it may train, with their default recipe (empty: trains nothing)
    frozen_image_tower: bool  # images pass an unprompted frozen tower, so their features can be cached
    module: str = ""  # the module whose import registers the model class (built-ins: fastprompt.methods.NAME)
    summary: str = ""  # one line for `fastprompt methods`
    paper: str = ""  # the paper (and released code) it computes
    trains: Optional[Callable[[Any], tuple]] = None  # options -> the groups a run trains (None: every group)
    model: Optional[type] = None  # the PromptModel subclass, once its module is imported
    # its runs train packed, N as one (fastprompt.training.pack): True only for a model whose forward is
    # PromptModel's own (text context and/or visual prompts) and whose loss is its `objective`; False: packs of one
    packs: bool = False

    @property
    def method(self) -> str:
        return self.name

    def trained_groups(self, config) -> tuple:
        """The groups a model built with options `config` trains, known without building it (a
        planned run's identity resolves every group's recipe from these; the trainer checks
        they are the groups the model's `param_groups()` finds)."""
        return tuple(self.groups) if self.trains is None else tuple(self.trains(config))


def declare(spec: MethodSpec) -> MethodSpec:
    """Declare a method (its model class registers later, on import of `spec.module`)."""
    if spec.name in METHODS and METHODS[spec.name] is not spec:
        raise ValueError(f"method name {spec.name!r} is already declared")
    if not dataclasses.is_dataclass(spec.options):
        raise TypeError(f"method {spec.name!r}: `options` must be a dataclass, got {spec.options!r}")
    METHODS[spec.name] = spec
    option_flags.cache_clear()
    return spec


_FACTS = ("options", "groups", "frozen_image_tower")


def register_method(name: str):
    """Class decorator: bind a `PromptModel` subclass to the method declared as `name` (its
    `--method` name), or, for a method not declared in `specs`, declare it from the facts the
    class states (`options`, `groups`, `frozen_image_tower`)."""

    def add(cls):
        spec = METHODS.get(name)
        if spec is not None and spec.model is not None and spec.model is not cls:
            raise ValueError(f"method name {name!r} is already registered by {spec.model.__qualname__}")
        if spec is None:
            for attr in _FACTS:
                if getattr(cls, attr, None) is None:  # PromptModel leaves them None
                    raise TypeError(f"method {name!r} ({cls.__qualname__}) must declare `{attr}` (see fastprompt.methods.registry)")
            spec = declare(MethodSpec(name, options=cls.options, groups=tuple(cls.groups),
                                      frozen_image_tower=bool(cls.frozen_image_tower), module=cls.__module__,
                                      summary=(cls.__doc__ or "").strip().split("\n")[0]))
        else:
            stated = [attr for attr in _FACTS if attr in vars(cls)]
            if stated:
                raise TypeError(f"method {name!r} ({cls.__qualname__}) states {', '.join(stated)}, which its declaration in "
                                f"fastprompt.methods.specs holds; state them in one place")
            for attr in _FACTS:
                setattr(cls, attr, getattr(spec, attr))
        cls.method = name
        cls.spec = spec
        spec.model = cls
        return cls

    return add


def unregister_method(name: str) -> None:
    """Remove a registered method (tests that register a toy method clean up with this)."""
    METHODS.pop(name, None)
    option_flags.cache_clear()


def method_spec(name: str) -> MethodSpec:
    """The declaration of method `name` (torch-free); an unknown name is an error naming the choices."""
    if name not in METHODS:
        raise FastpromptError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_class(name: str):
    """The `PromptModel` subclass of method `name`, its module imported on first use."""
    spec = method_spec(name)
    if spec.model is None:
        importlib.import_module(spec.module)
        if spec.model is None:
            raise TypeError(f"importing {spec.module} registered no model for method {name!r}; "
                            f"decorate its class with @register_method({name!r})")
    return spec.model


def group_names() -> list[str]:
    """Every parameter-group name any registered method trains, in first-seen order."""
    names: dict[str, None] = {}
    for spec in METHODS.values():
        for group in spec.groups:
            names.setdefault(group.name)
    return list(names)


# ------------------------------------------------------------------ CLI flags of the options
@dataclass(frozen=True)
class OptionFlag:
    """One method option as a command-line flag: `--{prefix}.{name with dashes}`."""

    prefix: str  # the options group's flag prefix (`flag_prefix` of the class defining the field)
    field: str  # the keyword of create_model
    type: type  # int, float, str or bool
    default: Any  # the dataclass default (shown in --help; the flag itself defaults to "not given")
    help: str  # metadata["help"], else the comment after the field
    off: Optional[str] = None  # bool fields: the off switch's name (metadata["off"]), default "no-<name>"
    choices: Optional[tuple] = None  # the values the option takes (metadata["choices"]), None: any of its type

    @property
    def flag(self) -> str:
        return f"--{self.prefix}.{self.field.replace('_', '-')}"

    @property
    def off_flag(self) -> str:
        return f"--{self.prefix}.{self.off or 'no-' + self.field.replace('_', '-')}"


def field_comments(cls: type) -> dict[str, str]:
    """`{field: comment}` for the fields `cls` itself defines, from the `# comment` on the
    line where each annotated assignment ends (read with ast and tokenize from the source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined where no source is kept (e.g. an interactive session)
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0]
    return {node.target.id: comments[node.end_lineno] for node in getattr(body, "body", [])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments}


def _flag_type(cls: type, name: str, hint: Any) -> type:
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    if hint not in (int, float, str, bool):
        raise TypeError(f"{cls.__qualname__}.{name}: a method option flag needs int, float, str or bool (or Optional of one), got {hint!r}")
    return hint


@lru_cache(maxsize=None)
def option_flags() -> tuple[OptionFlag, ...]:
    """The flags of every registered method's options, one per (prefix, field); a field shared
    by several methods (CoOp's `n_ctx` in coop, vlp, cavpt, e2mim) is one flag."""
    flags: dict[str, OptionFlag] = {}
    for spec in METHODS.values():
        options = spec.options
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            owner = next(c for c in reversed(options.__mro__) if f.name in vars(c).get("__annotations__", {}))
            prefix = vars(owner).get("flag_prefix")
            if f.name in flags:
                if flags[f.name].prefix != prefix:  # one keyword, two meanings: create_model could not tell them apart
                    raise TypeError(f"option {f.name!r} is declared by --{flags[f.name].prefix}.* and --{prefix}.* options; "
                                    "give one of them another name")
                continue
            if not prefix:
                raise TypeError(f"{owner.__qualname__} defines option {f.name!r} but no `flag_prefix` (its CLI flags' prefix)")
            flags[f.name] = OptionFlag(
                prefix=prefix, field=f.name, type=_flag_type(owner, f.name, hints[f.name]),
                default=f.default if f.default is not dataclasses.MISSING else None,
                help=f.metadata.get("help") or field_comments(owner).get(f.name, ""), off=f.metadata.get("off"),
                choices=f.metadata.get("choices"),
            )
    seen: dict[str, str] = {}
    for fl in flags.values():
        for flag in (fl.flag, fl.off_flag) if fl.type is bool else (fl.flag,):
            if flag in seen:
                raise TypeError(f"flag {flag} is generated for both {seen[flag]} and {fl.field}; rename one option")
            seen[flag] = fl.field
    return tuple(flags.values())


def check_option_flags(method: str, options: dict) -> None:
    """Every option in `options` (given as flags) belongs to `method`; else a FastpromptError that
    names the flag as typed (`--cavpt.topk`), the methods that take it and the fix."""
    accepted = {f.name for f in dataclasses.fields(method_spec(method).options)}
    for fl in option_flags():
        if fl.field not in options or fl.field in accepted:
            continue
        flag = fl.off_flag if fl.type is bool and options[fl.field] is False else fl.flag
        owners = [name for name, spec in METHODS.items() if fl.field in {f.name for f in dataclasses.fields(spec.options)}]
        raise FastpromptError(f"{flag} is an option of {', '.join(owners)}, not of {method}; drop {flag} or use "
                              f"--method {owners[0]}")
