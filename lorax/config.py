"""`LoraConfig`: peft's field names, defaults and meanings, validated up front.

A config written for peft means the same thing here:

>>> config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
>>> config.scale_for(8, 16)
2.0
"""

import dataclasses
import functools
import math
import re
from typing import Any

from lorax.errors import LoraConfigError, listing, nearest

BIAS_MODES = ("none", "all", "lora_only")
# peft's TaskType values (peft/utils/peft_types.py).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
ALL_LINEAR = "all-linear"
# init_lora_weights values that decompose the base weight (lorax/decomposition.py); the group is
# pissa_niter_<n>'s number of iterations.
DECOMPOSITION_INITS = re.compile(r"pissa|pissa_niter_(\d+)|olora")


def is_decomposition(init: bool | str) -> bool:
    """Whether `init_lora_weights` is PiSSA or OLoRA: the adapter starts from the base weight's
    decomposition and the base becomes the residual."""
    return isinstance(init, str) and DECOMPOSITION_INITS.fullmatch(init) is not None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which weights get low-rank adapters, and how (the fields of `peft.LoraConfig`).

    Example:
        >>> LoraConfig(r=3, target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]).r
        3
    """

    # Rank of the update B·A.
    r: int = 8
    # Scale numerator: the update is (lora_alpha / r)·B·A, or lora_alpha/√r with use_rslora.
    lora_alpha: float = 8
    # Dropout on the adapter's input (not the base path), only when an rng is given.
    lora_dropout: float = 0.0
    # A list of module names matched on `.` boundaries ("q_proj" matches
    # "model.layers.0.self_attn.q_proj"), a regex string matched against the whole
    # dotted path, or "all-linear": every linear kernel except the output head.
    target_modules: list[str] | str | None = None
    # peft's target_parameters: the experts (`mlp.experts.gate_up_proj`, `...down_proj`) and routers
    # (`mlp.gate.weight`) of a mixture-of-experts model, by name or `.`-suffix; one LoRA per expert.
    target_parameters: list[str] | None = None
    # Same forms as target_modules; matching modules never get adapters.
    exclude_modules: list[str] | str | None = None
    # Only adapt layers with these indices (the first number in the path, or the one
    # after `layers_pattern`). Needs a list target_modules.
    layers_to_transform: list[int] | int | None = None
    # The name of the layer list, e.g. "layers" or "h"; used with layers_to_transform.
    layers_pattern: list[str] | str | None = None
    # "none": biases frozen; "all": every bias trainable; "lora_only": biases of adapted modules.
    bias: str = "none"
    # Modules trained in full (a trainable copy beside the frozen original), e.g. a new head.
    modules_to_save: list[str] | None = None
    # Rank-stabilized LoRA: scale lora_alpha/√r instead of lora_alpha/r.
    use_rslora: bool = False
    # DoRA (weight-decomposed LoRA): a trained magnitude per output feature (lorax.DoraArray); linear layers.
    use_dora: bool = False
    # True: A kaiming-uniform (a=√5), B zero. "gaussian": A ~ N(0, 1/r), B zero.
    # "orthogonal": A and B both non-zero, B·A = 0 (peft's; even ranks only).
    # "pissa" / "pissa_niter_<n>" / "olora": A and B from the base weight's SVD / QR, the base
    # replaced by the residual (lorax/decomposition.py; embeddings keep the default init, as in peft).
    # False: A and B both random (non-zero update; for tests).
    init_lora_weights: bool | str = True
    # True when the torch layer stores its weight as (in, out), like GPT-2's Conv1D.
    # Our kernels are always (in, out); this only changes how interop writes files.
    fan_in_fan_out: bool = False
    # Per-module rank / alpha: {name or regex suffix: value}, as in peft.
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    # peft's task type ("CAUSAL_LM", "SEQ_CLS", ...); recorded in exported adapters.
    task_type: str | None = None
    # For a model whose output head is tied to its input embeddings (tie_word_embeddings):
    # False (peft's default): an adapter or modules_to_save copy on the embeddings changes the
    # input side only; the tied head keeps multiplying by the frozen base table, as peft's
    # lm_head does. True: the head sees the adapted table too (peft ties lm_head's adapter to
    # the embedding's). Merging writes the update into the one shared table either way.
    ensure_weight_tying: bool = False

    def __post_init__(self):
        # peft's types are Optional[dict]; adapter_config.json files may say null.
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, {})
        _validate(self)

    def scale_for(self, r: int, alpha: float) -> float:
        """The factor in front of B·A for a module with rank `r` and alpha `alpha`."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @classmethod
    def from_dict(cls, fields: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> "LoraConfig":
        """Build a config from a dict (e.g. peft's adapter_config.json), rejecting unknown keys.

        Args:
            fields: field name -> value.
            ignore: keys that may be present and are skipped (peft bookkeeping fields).
        """
        return cls(**{k: v for k, v in fields.items() if k not in ignore})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (lists stay lists)."""
        return dataclasses.asdict(self)


def _reject_unknown_fields(init):
    """Turn the dataclass's "unexpected keyword argument" into an error with suggestions."""
    known = [f.name for f in dataclasses.fields(LoraConfig)]
    # Names people carry over from papers and other libraries.
    aliases = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
               "target": "target_modules", "rslora": "use_rslora"}

    def suggestion(name):
        guess = aliases.get(name) or next(iter(nearest(name, known, 1)), None)
        return f" (did you mean {guess!r}?)" if guess else ""

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            hints = "; ".join(f"{k!r}{suggestion(k)}" for k in unknown)
            raise LoraConfigError(f"unknown LoraConfig field {hints}. Fields: {listing(known)}")
        init(self, *args, **kwargs)

    return checked_init


LoraConfig.__init__ = _reject_unknown_fields(LoraConfig.__init__)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_names(value, allow_string: bool) -> bool:
    """A list (tuple, set) of strings, or (where allowed) one string."""
    if isinstance(value, str):
        return allow_string
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(name, str) for name in value)


def _regex_error(pattern: str, form: str = "{}") -> str | None:
    try:
        re.compile(form.format(pattern))
    except re.error as error:
        return str(error)
    return None


def _validate_types(c: LoraConfig, fail) -> None:
    """Each field of the type peft gives it (an adapter_config.json edited by hand, or written by
    another tool, can hold anything), and each regex compiles, so that a bad value is named here
    rather than failing deep inside target matching or, worse, being read as something else."""
    for name in ("use_rslora", "use_dora", "fan_in_fan_out", "ensure_weight_tying"):
        if not isinstance(getattr(c, name), bool):
            fail(f"{name} must be a bool (true or false), got {getattr(c, name)!r}")
    if not _is_number(c.lora_dropout):
        fail(f"lora_dropout must be a number in [0, 1), got {c.lora_dropout!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(c, name)
        if not isinstance(patterns, dict) or not all(isinstance(key, str) for key in patterns):
            fail(f"{name} must be a dict of module-name patterns, got {patterns!r}")
        for key in patterns:
            # as lorax.targets matches them: the pattern against a `.`-suffix of the module path
            if error := _regex_error(key, r"(.*\.)?({})$"):
                fail(f"{name} key {key!r} is not a valid regex: {error}")
    for name, form in (("target_modules", "a list of module names or a regex string"),
                       ("exclude_modules", "a list of module names or a regex string"),
                       ("modules_to_save", "a list of module names"), ("layers_pattern", "a name or a list of names"),
                       ("target_parameters", "a list of parameter names")):
        value = getattr(c, name)
        if value is not None and not _is_names(value, allow_string=" or " in form):
            fail(f"{name} must be {form}, got {value!r}")
    if isinstance(c.exclude_modules, str) and (error := _regex_error(c.exclude_modules)):
        fail(f"exclude_modules regex {c.exclude_modules!r} does not compile: {error}")
    layers = c.layers_pattern
    for pattern in [layers] if isinstance(layers, str) else layers or ():
        if error := _regex_error(pattern):
            fail(f"layers_pattern {pattern!r} is not a valid regex: {error}")
    index = c.layers_to_transform
    if index is not None and not (_is_index(index) or isinstance(index, (list, tuple)) and all(map(_is_index, index))):
        fail(f"layers_to_transform must be a layer index or a list of them, got {index!r}")


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _validate(c: LoraConfig) -> None:
    def fail(message):
        raise LoraConfigError(message)

    _validate_types(c, fail)
    if not isinstance(c.r, int) or isinstance(c.r, bool) or c.r <= 0:
        fail(f"r must be a positive integer, got {c.r!r}")
    # Any finite number, as in peft (a negative or zero alpha is odd but well defined).
    if not _is_number(c.lora_alpha):
        fail(f"lora_alpha must be a number, got {c.lora_alpha!r}")
    for name, alpha in c.alpha_pattern.items():
        if not _is_number(alpha):
            fail(f"alpha_pattern[{name!r}] must be a number, got {alpha!r}")
    for name, rank in c.rank_pattern.items():
        if not isinstance(rank, int) or rank <= 0:
            fail(f"rank_pattern[{name!r}] must be a positive integer, got {rank!r}")
    if not 0.0 <= c.lora_dropout < 1.0:
        fail(f"lora_dropout must be in [0, 1), got {c.lora_dropout!r}")
    if c.bias not in BIAS_MODES:
        fail(f"bias must be one of {BIAS_MODES}, got {c.bias!r}")
    plain_inits = (True, False, "gaussian", "orthogonal")
    if c.init_lora_weights not in plain_inits and not is_decomposition(c.init_lora_weights):
        fail(
            f"init_lora_weights={c.init_lora_weights!r} is not supported; use True (kaiming-uniform A, zero B), "
            "'gaussian', 'orthogonal', 'pissa', 'pissa_niter_<n>', 'olora' or False"
        )
    if c.init_lora_weights == "orthogonal":
        odd = {name: rank for name, rank in {"r": c.r, **c.rank_pattern}.items() if rank % 2}
        if odd:
            fail(f"init_lora_weights='orthogonal' needs even ranks (half of Q's rows go to A, half to B); odd: {odd}")
    if c.task_type is not None and c.task_type not in TASK_TYPES:
        fail(f"task_type must be one of {TASK_TYPES} or None, got {c.task_type!r}")
    if c.target_modules is None and not c.target_parameters:
        fail('target_modules is required: a list of module names, a regex, or "all-linear"')
    if c.target_modules is not None and not isinstance(c.target_modules, str) and (
        not isinstance(c.target_modules, (list, tuple, set, frozenset)) or not (c.target_modules or c.target_parameters)
    ):
        fail(f"target_modules must be a non-empty list of names or a regex string, got {c.target_modules!r}")
    if isinstance(c.target_modules, str) and c.layers_to_transform is not None:
        fail("layers_to_transform cannot be used when target_modules is a regex string; give a list of names")
    if isinstance(c.target_modules, str) and c.layers_pattern:
        fail("layers_pattern cannot be used when target_modules is a regex string; give a list of names")
    if c.layers_pattern and c.layers_to_transform is None:
        fail("layers_pattern only has a meaning together with layers_to_transform")
    if isinstance(c.target_modules, (list, tuple, set, frozenset)) and c.modules_to_save:
        both = sorted(set(c.target_modules) & set(c.modules_to_save))
        if both:
            fail(
                f"{both} are in both target_modules and modules_to_save: a module either gets an adapter "
                "or is trained in full, not both"
            )
