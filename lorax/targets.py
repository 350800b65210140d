"""Which leaves get adapters: peft's module-matching rules, applied to parameter-tree paths.

A parameter tree is addressed like a torch module tree: the leaf
`params["model"]["layers"][3]["self_attn"]["q_proj"]["kernel"]` belongs to the module
`model.layers.3.self_attn.q_proj`. A module with a 2-D (or stacked) `kernel` is a linear
layer; a module with an `embedding` table is an embedding. Those are what LoRA adapts, and, in
a mixture-of-experts model, the 3-D parameters of each `experts` module (one adapter per expert,
reached as peft reaches them: `target_parameters`, or its translation of "all-linear" and of the
old per-expert names; see `_moe_targets`).

>>> import jax.numpy as jnp
>>> from lorax.config import LoraConfig
>>> params = {"seq": {0: {"kernel": jnp.zeros((20, 30)), "bias": jnp.zeros(30)}}}
>>> [t.path for t in select_targets(LoraConfig(target_modules=["seq.0"]), params)]
['seq.0']
"""

import dataclasses
import re
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import quax

from lorax.config import ALL_LINEAR, LoraConfig
from lorax.errors import TargetError, listing, nearest

STACK = "*"  # a dict key under which layers are stacked on a leading axis (see lorax.models)
LINEAR_LEAF = "kernel"
EMBEDDING_LEAF = "embedding"
BIAS_LEAF = "bias"
EXPERTS = "experts"  # a Target kind: one 3-D parameter of a mixture-of-experts layer's experts


def is_value(x: Any) -> bool:
    """True for quax array-likes (LoraArray, ...): they are leaves of a parameter tree."""
    return isinstance(x, quax.ArrayValue)


def key_name(entry: Any) -> str:
    """One jax key-path entry as it appears in a dotted module path."""
    for attribute in ("key", "idx", "name"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def dotted(keypath: tuple) -> str:
    """A jax key path as a dotted string: (DictKey('seq'), DictKey(0), DictKey('kernel')) -> 'seq.0.kernel'."""
    return ".".join(key_name(entry) for entry in keypath)


def leaves_by_path(params: Any) -> Iterator[tuple[str, Any]]:
    """(dotted leaf path, leaf) for every array or quax value in the tree, in tree order."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_value)[0]:
        yield dotted(keypath), leaf


@dataclasses.dataclass(frozen=True)
class Module:
    """A module of the tree: its dotted path, its own leaves by name, and what LoRA sees in it.

    Layers stacked under a `*` key (`model.layers.*.mlp.up_proj`, leading axis = layer) appear
    once per index (`model.layers.0.mlp.up_proj`, ...), as torch's named_modules lists them;
    `stored_path` is where the stacked leaves really live and `layer` the index into them.
    """

    path: str
    leaves: dict[str, Any]
    stored_path: str = ""
    layer: int | None = None

    @property
    def kind(self) -> str | None:
        """"linear", "embedding", or None (LoRA does not adapt it)."""
        stack_dims = 0 if self.layer is None else 1
        kernel = self.leaves.get(LINEAR_LEAF)
        if kernel is not None and getattr(kernel, "ndim", 0) - stack_dims == 2:
            return "linear"
        table = self.leaves.get(EMBEDDING_LEAF)
        if table is not None and getattr(table, "ndim", 0) - stack_dims == 2:
            return "embedding"
        return None

    @property
    def weight_leaf(self) -> str:
        return LINEAR_LEAF if self.kind == "linear" else EMBEDDING_LEAF


def modules(params: Any) -> dict[str, Module]:
    """Every module path in the tree (containers included, like torch's named_modules) -> Module."""
    found: dict[str, dict[str, Any]] = {}
    stored: dict[str, tuple[str, int | None]] = {}
    for path, leaf in leaves_by_path(params):
        module_path, _, leaf_name = path.rpartition(".")
        parts = module_path.split(".") if module_path else []
        if parts.count(STACK) > 1:
            raise TargetError(f"{path!r}: stacks inside stacks (two {STACK!r} keys) are not supported")
        if STACK in parts:
            at = parts.index(STACK)
            copies = [(parts[:at] + [str(i)] + parts[at + 1:], i) for i in range(leaf.shape[0])]
        else:
            copies = [(parts, None)]
        for names, layer in copies:
            for depth in range(len(names)):  # containers first, as torch's named_modules lists them
                found.setdefault(".".join(names[:depth]), {})
            virtual = ".".join(names)
            found.setdefault(virtual, {})[leaf_name] = leaf
            stored[virtual] = (module_path, layer)
    return {path: Module(path, leaves, *stored.get(path, (path, None))) for path, leaves in found.items()}


@dataclasses.dataclass(frozen=True)
class Target:
    """A module that gets an adapter: its path, kind, rank and alpha (after rank/alpha patterns)."""

    path: str
    kind: str
    r: int
    lora_alpha: float
    stored_path: str = ""
    layer: int | None = None
    parameter: bool = False  # reached as peft reaches target_parameters (a mixture-of-experts layer's experts, router)

    @property
    def stored_leaf(self) -> str:
        """The dotted path of the leaf the adapter goes on (a kernel, a table, or an expert parameter)."""
        if self.kind == EXPERTS:
            return self.stored_path
        return f"{self.stored_path}.{LINEAR_LEAF if self.kind == 'linear' else EMBEDDING_LEAF}"


def _matches_names(names: list[str] | str, key: str) -> bool:
    """peft's rule: a regex string matches the whole key; a list entry matches the key or a `.`-suffix."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{name}") for name in names)


def layer_index(config: LoraConfig, key: str) -> int | None:
    """The layer number peft reads from a key for layers_to_transform (None if there is none)."""
    if not config.layers_pattern:
        # peft takes the first numbered segment after at least two names, e.g. "model.layers.3."
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def _is_saved(config: LoraConfig, key: str) -> bool:
    return bool(config.modules_to_save) and any(
        re.match(rf"(^|.*\.){name}($|\..*)", key) for name in config.modules_to_save
    )


def is_target(config: LoraConfig, key: str, all_linear: frozenset[str] = frozenset()) -> bool:
    """Whether peft's `check_target_module_exists` would adapt the module at `key`."""
    if config.exclude_modules and _matches_names(config.exclude_modules, key):
        return False
    if _is_saved(config, key):
        return False
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return key in all_linear
    if not _matches_names(targets, key):
        return False
    if isinstance(targets, str) or config.layers_to_transform is None:
        return True
    index = layer_index(config, key)
    wanted = config.layers_to_transform
    return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def _pattern_value(patterns: dict, key: str, default):
    """peft's get_pattern_key: the first pattern that matches a `.`-suffix of key wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def select_targets(config: LoraConfig, params: Any, *, output_head: str | None = None,
                   moe_names: str | None = None) -> list[Target]:
    """The modules of `params` that `config` adapts, in tree order.

    Args:
        config: the LoRA config.
        params: a parameter tree (nested dicts / lists / Flax state as a pure dict).
        output_head: module path of the output head ("lm_head"), which "all-linear" leaves
            out as peft does on transformers models. None: keep every linear (peft's
            behaviour on a plain torch model).
        moe_names: for a mixture-of-experts model, the family whose transformers 4 expert names
            peft maps onto its fused experts: "mixtral" (w1/w3/w2) or "qwen2_moe"
            (gate_proj/up_proj/down_proj; Qwen3-MoE). `interop.from_pretrained` models say which
            (`model.moe_names`). None: both (for a model not from a transformers checkpoint).

    Raises:
        TargetError: a target matches nothing (listing the module paths and the nearest
            names), or matches a module that LoRA cannot adapt.
    """
    all_modules = modules(params)
    linear = frozenset(path for path, m in all_modules.items() if m.kind == "linear" and path != output_head)
    experts = expert_modules(all_modules)
    targets, match_modules = [], True
    if config.target_parameters and not experts:
        raise TargetError(f"target_parameters={config.target_parameters!r}: lorax adapts parameters only in the "
                          "experts and routers of mixture-of-experts models, and this model has none; use target_modules")
    if experts:  # a mixture-of-experts model: peft's names for its experts and routers first
        remaining, fused, router = _moe_targets(config, all_modules, experts, linear, moe_names)
        targets = _parameter_targets(config, all_modules, experts, fused, router)
        if remaining:
            config = dataclasses.replace(config, target_modules=remaining)
        match_modules = bool(remaining) or not targets
    config = with_tied_head(config, all_modules, output_head)
    if match_modules:
        _check_tied_head_unnamed(config, all_modules, output_head)
        _check_every_name_matches(config, all_modules)
    saved = saved_module_paths(config, params)
    for path, module in all_modules.items():
        if not path or not match_modules or not is_target(config, path, linear):
            continue
        if any(module.stored_path == p or module.stored_path.startswith(p + ".") for p in saved):
            continue  # trained in full already; an adapter on top would conflict (peft excludes these too)
        if module.kind is None:
            raise TargetError(
                f"target {path!r} matched a module that LoRA cannot adapt (leaves: {listing(module.leaves) or 'none'}); "
                f"LoRA adapts modules with a 2-D {LINEAR_LEAF!r} (linear) or an {EMBEDDING_LEAF!r} table"
            )
        r = _pattern_value(config.rank_pattern, path, config.r)
        alpha = _pattern_value(config.alpha_pattern, path, config.lora_alpha)
        targets.append(Target(path, module.kind, r, alpha, module.stored_path, module.layer))
    if not targets:
        adaptable = [p for p, m in all_modules.items() if m.kind and p]
        root = " A kernel at the root of the tree has no module name: put the layer under a named attribute." \
            if all_modules.get("", Module("", {})).kind else ""
        raise TargetError(
            f"target_modules={config.target_modules!r} matched no adaptable module "
            f"(after exclude_modules / layers_to_transform / modules_to_save). Linear and embedding modules: "
            f"{listing(adaptable) or 'none'}.{root}"
        )
    _warn_unused(config, targets, all_modules)
    return targets


def _warn_unused(config: LoraConfig, targets: list[Target], all_modules: dict[str, Module]) -> None:
    """Pattern keys and layer indices that change nothing are most likely typos: warned, not
    refused, as peft warns about the patterns (and adapts the rest)."""
    paths = [name for t in targets for name in (t.path, f"{t.path}.weight")]
    for field in ("rank_pattern", "alpha_pattern"):
        unmatched = sorted(key for key in getattr(config, field)
                           if not any(re.match(rf"(.*\.)?({key})$", path) for path in paths))
        if unmatched:
            warnings.warn(f"The following {field} keys did not match any targeted module and were ignored: "
                          f"{unmatched}.", RuntimeWarning, stacklevel=3)
    if config.layers_to_transform is not None:
        chosen = [config.layers_to_transform] if isinstance(config.layers_to_transform, int) else config.layers_to_transform
        present = {layer_index(config, path) for path in all_modules if path} - {None}
        missing = sorted(set(chosen) - present)
        if missing:
            warnings.warn(f"layers_to_transform {missing} name no layer of this model (its layers: "
                          f"{min(present)}..{max(present)}); they are ignored" if present else
                          f"layers_to_transform {missing}: this model has no numbered layers; they are ignored",
                          RuntimeWarning, stacklevel=3)


# peft (0.21) on transformers 5 mixture-of-experts models, whose experts are fused 3-D parameters
# and whose router is a bare parameter (no longer Linear layers): it maps the names these had in
# transformers 4 onto them (peft.utils.transformers_weight_conversion) and adapts them through
# `target_parameters` (a LoRA per expert). Its table is per model family (transformers'
# _MODEL_TO_CONVERSION_PATTERN): Mixtral's old names are w1/w3/w2, Qwen-MoE's (Qwen3-MoE, OLMoE,
# DeepSeek, ...) gate_proj/up_proj/down_proj, and a name of the other family matches nothing.
MOE_OLD_NAMES = {
    "mixtral": {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)},
}
ROUTER = "gate"


def _old_expert_names(moe_names: str | None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """old name -> (the fused parameter it maps to, the old names fused with it), for one family of
    MOE_OLD_NAMES, or for both when the family is not known."""
    if moe_names is not None and moe_names not in MOE_OLD_NAMES:
        raise TargetError(f"moe_names={moe_names!r}: peft maps old expert names for {listing(MOE_OLD_NAMES)} only")
    families = [MOE_OLD_NAMES[moe_names]] if moe_names else list(MOE_OLD_NAMES.values())
    return {old: (new, group) for family in families for new, group in family.items() for old in group}


def expert_modules(all_modules: dict[str, Module]) -> dict[str, Module]:
    """A mixture-of-experts layer's experts, by (per-layer) path: modules named `experts`
    (transformers' name) holding 3-D weights (experts x in x out)."""
    return {path: module for path, module in all_modules.items() if path.rpartition(".")[2] == EXPERTS
            and any(getattr(leaf, "ndim", 0) - (module.layer is not None) == 3 for leaf in module.leaves.values())}


def _torch_keys(all_modules: dict[str, Module]) -> list[str]:
    """Every module path and every parameter as torch names it (`...q_proj.weight`, `...experts.down_proj`)."""
    torch_leaf = {LINEAR_LEAF: "weight", EMBEDDING_LEAF: "weight"}
    return [p for p in all_modules if p] + [f"{p}.{torch_leaf.get(leaf, leaf)}" for p, m in all_modules.items()
                                           for leaf in m.leaves]


def _moe_targets(config: LoraConfig, all_modules: dict[str, Module], experts: dict[str, Module],
                 linear: frozenset[str], moe_names: str | None) -> tuple[Any, dict[str, bool], bool]:
    """peft's `_convert_peft_config_moe`: (the target_modules left for modules, {expert parameter:
    whether it fuses two old modules}, whether the router is targeted). A string target (a regex,
    "all-linear") becomes the set of last names it reaches first, as peft resolves it."""
    old_names = _old_expert_names(moe_names)
    targets = config.target_modules or []
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            resolved = {p.rpartition(".")[2] for p in linear} | set(old_names) | {ROUTER}
        else:
            resolved = {key.rpartition(".")[2] for key in _torch_keys(all_modules) if re.fullmatch(targets, key)}
            resolved |= {old for old in old_names for p in experts if re.fullmatch(targets, f"{p}.{old}")}
        # Names that reach no module (a parameter's "weight") change nothing in peft's list either.
        names = {p.rpartition(".")[2] for p in all_modules if p} | set(old_names) | {ROUTER}
        resolved &= names
        if not resolved:
            return targets, {}, False  # matches nothing: the usual error follows
        targets = sorted(resolved)
    remaining, chosen, router = [], {}, False
    for target in targets:
        old = next((o for o in (*old_names, ROUTER) if target == o or target.endswith(f".{o}")), None)
        if old is None:
            remaining.append(target)
        elif old == ROUTER:
            router = True
        else:
            chosen.setdefault(old_names[old], set()).add(old)  # keyed by (new name, its old group)
    # The other family's old names reach nothing in peft on this model (it converts only its own);
    # peft adapts the rest silently, which would be a surprise, so say so once.
    other = set(_old_expert_names(None)) - set(old_names)
    ignored = [t for t in remaining if t.rpartition(".")[2] in other and not any(_matches_names([t], p) for p in all_modules)]
    if ignored:
        warnings.warn(f"target_modules {ignored} adapt nothing on this {moe_names} mixture-of-experts model, as in peft: "
                      f"its experts' old names are {sorted(old_names)} (and {ROUTER!r} for the router)", stacklevel=4)
        remaining = [t for t in remaining if t not in ignored]
    fused = {}
    for (new, group), olds in chosen.items():
        if not set(group) <= olds:
            raise TargetError(f"target_modules names {sorted(olds)} but not {sorted(set(group) - olds)}: in this "
                              f"mixture-of-experts model they are fused into one parameter per layer, {new!r}, "
                              "so they are adapted together or not at all (peft refuses this too)")
        fused[new] = len(group) > 1
    return remaining, fused, router


def _parameter_targets(config: LoraConfig, all_modules: dict[str, Module], experts: dict[str, Module],
                       fused: dict[str, bool], router: bool) -> list[Target]:
    """Targets for the experts' parameters and the routers that peft reaches as target_parameters:
    in every layer (peft applies neither layers_to_transform nor exclude_modules to those), a fused
    gate_up_proj with twice the rank and alpha (its two old modules' worth), patterns first."""
    named = config.target_parameters or []
    used = set()

    def listed(key: str) -> bool:  # peft's target_parameters rule: the key or a `.`-suffix of it
        hits = {name for name in named if key == name or key.endswith(f".{name}")}
        used.update(hits)
        return bool(hits)

    found = []
    for path, module in experts.items():
        if f"{path.rpartition('.')[0]}.{ROUTER}" in all_modules:
            gate = all_modules[f"{path.rpartition('.')[0]}.{ROUTER}"]
            key = f"{gate.path}.weight"
            if gate.kind == "linear" and (listed(key) or router):
                found.append(Target(gate.path, "linear", _pattern_value(config.rank_pattern, key, config.r),
                                    _pattern_value(config.alpha_pattern, key, config.lora_alpha), gate.stored_path,
                                    gate.layer, parameter=True))
        for leaf in module.leaves:
            key = f"{path}.{leaf}"
            if leaf in fused or listed(key):
                times = 2 if fused.get(leaf) else 1
                found.append(Target(key, EXPERTS, _pattern_value(config.rank_pattern, key, config.r * times),
                                    _pattern_value(config.alpha_pattern, key, config.lora_alpha * times),
                                    f"{module.stored_path}.{leaf}", module.layer, parameter=True))
    if set(named) - used:
        raise TargetError(f"target_parameters {sorted(set(named) - used)} match no expert parameter or router "
                          f"weight (lorax adapts those as parameters); these are: "
                          f"{listing(sorted({leaf for m in experts.values() for leaf in m.leaves} | {ROUTER + '.weight'}))}")
    return found


# peft's task models train their head in full: PeftModelForSequenceClassification (and ...ForTokenClassification)
# add these to modules_to_save, ...ForQuestionAnswering qa_outputs; names the model lacks are skipped.
TASK_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def with_task_modules(config: LoraConfig, all_modules: dict[str, Module]) -> LoraConfig:
    """`config` with the head that peft's task model for its task_type trains added to
    modules_to_save (those of TASK_MODULES the model has), as peft does: with task_type="SEQ_CLS"
    a BERT classifier's `classifier` is trained and saved with the adapter. The task's names that
    the model lacks ("score" on BERT, which peft writes into adapter_config.json) are dropped."""
    names = TASK_MODULES.get(config.task_type)
    if not names:
        return config
    paths = [p for p in all_modules if p]
    listed = [n for n in (config.modules_to_save or []) if n not in names]
    present = [n for n in names if any(p.endswith(n) for p in paths)]
    return dataclasses.replace(config, modules_to_save=(listed + present) or None)


# peft's EMBEDDING_LAYER_NAMES: the module names for which ensure_weight_tying ties an adapter (or
# modules_to_save copy) to an output head tied to the embeddings.
PEFT_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _first_naming(names: list[str], key: str) -> str | None:
    """The first entry of a list that peft's tying code takes to name `key` (its regex)."""
    return next((n for n in names if re.match(rf"(^|.*\.){n}($|\..*)", key)), None)


def _tie_embeddings(config: LoraConfig, all_modules: dict[str, Module], output_head: str | None) -> str | None:
    """The input embeddings that ensure_weight_tying ties a tied head to (peft's
    get_input_embeddings), where that applies and is unambiguous: one `embed_tokens` table."""
    if not (config.ensure_weight_tying and output_head) or output_head in all_modules:
        return None
    tables = [p for p, m in all_modules.items() if m.kind == "embedding" and p.rpartition(".")[2] == "embed_tokens"]
    return tables[0] if len(tables) == 1 else None


def with_tied_head(config: LoraConfig, all_modules: dict[str, Module], output_head: str | None) -> LoraConfig:
    """peft with ensure_weight_tying=True on a model whose head is tied to its input embeddings:
    an entry naming the head in modules_to_save (or else target_modules) is replaced by the input
    embeddings' path, whose copy (or adapter) the tied head then uses (peft's
    `_add_modules_to_save_to_tie` / `_add_targets_to_tie`). Applied only where the config names
    the head and the tree has one embedding of peft's names (`model.embed_tokens`); otherwise
    `config` is returned as it is (and a config naming a tied head is refused by name).

    >>> tied = modules({"model": {"embed_tokens": {"embedding": jnp.ones((8, 4))}}})
    >>> with_tied_head(LoraConfig(target_modules=["lm_head"], ensure_weight_tying=True), tied, "lm_head").target_modules
    ['model.embed_tokens']
    """
    embeddings = _tie_embeddings(config, all_modules, output_head)
    if embeddings is None:
        return config
    saved, targets = list(config.modules_to_save or []), config.target_modules
    if any(m.rpartition(".")[2] in PEFT_EMBEDDING_LAYER_NAMES for m in saved):  # peft looks at modules_to_save first
        head = _first_naming(saved, output_head)
        if head is None:
            return config
        saved.remove(head)
        return dataclasses.replace(config, modules_to_save=saved + [embeddings] * (embeddings not in saved))
    if isinstance(targets, str):
        also = rf"|^{re.escape(embeddings)}$)"
        if targets.lower() != ALL_LINEAR and re.fullmatch(targets, output_head) and not targets.endswith(also):
            return dataclasses.replace(config, target_modules=f"(?:{targets}{also}")
        return config
    head = _first_naming(list(targets or []), output_head)
    if head is None:
        return config
    kept = [t for t in targets if t != head]
    return dataclasses.replace(config, target_modules=kept + [embeddings] * (embeddings not in kept))


def _check_tied_head_unnamed(config: LoraConfig, all_modules: dict[str, Module], output_head: str | None) -> None:
    """An output head tied to the input embeddings (tie_word_embeddings) has no weight of its own
    in the tree: the model multiplies by the embedding table. peft can still wrap the head module
    (an adapter on the shared weight, or a trained copy of it); lorax cannot, so a config that
    names the head is refused with what to do instead, rather than adapting less than peft would."""
    if not output_head or output_head in all_modules:
        return
    targets = config.target_modules
    if isinstance(targets, str) and _tie_embeddings(config, all_modules, output_head):
        targets = None  # a regex reaching the head reaches the embeddings too (with_tied_head): tied there
    named = [("target_modules", targets)] if isinstance(targets, str) and targets.lower() != ALL_LINEAR and \
        _matches_names(targets, output_head) else []
    if isinstance(targets, (list, tuple)):
        named += [("target_modules entry", name) for name in targets if _matches_names([name], output_head)]
    named += [("modules_to_save entry", name) for name in config.modules_to_save or () if output_head.endswith(name)]
    if named:
        field, name = named[0]
        tables = [p for p, m in all_modules.items() if m.kind == "embedding"]
        raise TargetError(
            f"{field} {name!r} names the output head {output_head!r}, which this model ties to its input embeddings "
            f"(tie_word_embeddings): it has no weight of its own to adapt or copy. Adapt the embeddings instead "
            f"({listing(tables) or 'none'}): with ensure_weight_tying=True the tied head uses their adapter (and "
            f"{output_head!r} itself may be named: it is moved to an `embed_tokens` table, as peft does); with False "
            "it keeps the frozen table"
        )


def _check_every_name_matches(config: LoraConfig, all_modules: dict[str, Module]) -> None:
    """A listed name (target, modules_to_save, exclude) that matches no module is a typo: say so."""
    paths = [p for p in all_modules if p]
    # exclude_modules is left out: an exclusion that matches nothing changes nothing.
    named = {"target_modules": config.target_modules, "modules_to_save": config.modules_to_save}
    for field, names in named.items():
        if not names or isinstance(names, str):
            continue
        for name in names:
            if field == "modules_to_save":
                found = any(p.endswith(name) for p in paths)
            else:
                found = any(_matches_names([name], p) for p in paths)
            if not found:
                hint = nearest(name, paths)
                raise TargetError(
                    f"{field} entry {name!r} matches no module of the model"
                    + (f"; nearest: {hint}" if hint else "")
                    + f". Module paths: {listing(paths)}"
                )
    if isinstance(config.target_modules, str) and config.target_modules.lower() != ALL_LINEAR:
        try:
            re.compile(config.target_modules)
        except re.error as error:
            raise TargetError(f"target_modules regex {config.target_modules!r} does not compile: {error}") from None


def _stored_form(path: str, all_modules: dict[str, Module]) -> tuple[str, int | None, int]:
    """(stored path, layer, layers in its stack) of a module: a module inside stacked layers
    (`encoder.layer.3.attention.output`, leaves or container) is stored once for all layers
    (`encoder.layer.*.attention.output`); others are stored as they are (layer None, 1)."""
    module = all_modules[path]
    inner = module if module.layer is not None else next(
        (m for p, m in all_modules.items() if m.layer is not None and p.startswith(path + ".")), None)
    if inner is None:
        return path, None, 1
    stored = inner.stored_path.split(".")
    depth = len(path.split("."))
    if depth <= stored.index(STACK):  # the stack itself or a container around it
        return path, None, 1
    return ".".join(stored[:depth]), inner.layer, next(iter(inner.leaves.values())).shape[0]


def saved_module_paths(config: LoraConfig, params: Any) -> list[str]:
    """Stored module paths that modules_to_save trains in full (peft: the key ends with the name).

    Inside stacked layers a module's leaves are one array for all layers, so it is trained in
    every layer (peft's `modules_to_save=["value"]` matches each layer's `value`) or in none."""
    if not config.modules_to_save:
        return []
    all_modules = modules(params)
    layers: dict[str, tuple[set, int]] = {}
    for path in all_modules:
        if path and any(path.endswith(name) for name in config.modules_to_save):
            stored, layer, count = _stored_form(path, all_modules)
            layers.setdefault(stored, (set(), count))[0].add(layer)
    partial = [f"{stored} (layers {sorted(chosen)} of {count})" for stored, (chosen, count) in layers.items()
               if None not in chosen and len(chosen) != count]
    if partial:
        raise TargetError(
            f"modules_to_save matches some layers only of stacked modules: {listing(partial, 5)}; a stacked module "
            "is trained in full in every layer or in none. Name it so that it matches every layer, or use LoRA on it"
        )
    paths = list(layers)
    # A match nested inside another match is already covered by the outer module.
    return [p for p in paths if not any(p.startswith(outer + ".") for outer in paths if outer != p)]
