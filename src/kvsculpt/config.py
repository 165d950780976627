"""Every compression option, parsed, checked and defaulted once.

:class:`CompressConfig` is what :func:`kvsculpt.compress`, the command line, the benchmarks and the
ablation scripts all build; its ``repr`` is recorded with every result and in every saved cache. The strings
it holds (method, allocation, query sources) are turned into objects here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the tensor code is imported when a config is built, so that `kvsculpt --help` is fast
    from .core.methods import Method

QUANT_BITS = (8, 4, 2)  # packed widths (kvsculpt.core.quant.BITS; a test keeps them equal)
SCOPES = ("all", "heads", "layers")  # kvsculpt.core.SCOPES
DECODE_SCOPES = ("appended", "all")  # what a decode budget may cut: appended tokens only, or the block too
SELF_10X64 = {
    "self_samples": 10,
    "self_length": 64,
}  # the self samples the demo's Select+Fit and `analyze` use
DEFAULT_RATIO = 0.3  # the README's examples, the demo and most measured results keep 30 %

QUERY_SOURCES = {
    "repeat": "the second copy's queries while the model repeats the context after its prompt (KVzip's pass)",
    "context": "the context's own prefill queries",
    "self": "the model's own sampled continuations of the context",
}
METHODS = {
    "kvzip": "peak attention any one reference query gives an entry; 4 sink tokens kept (KVzip)",
    "kvzip-v": "kvzip's peak times the square root of the entry's value norm relative to its head's (value_power=0.5)",
    "h2o": "attention summed over the reference queries (H2O; with fitted values, the paper's Select+Fit)",
    "snapkv": "attention from the context's last 64 positions, pooled (SnapKV)",
    "tova": "attention from the context's last position (TOVA)",
    "streaming-llm": "4 sink tokens and the most recent ones (StreamingLLM)",
    "knorm": "lowest key norm",
    "random": "random entries",
    "sculpt": "kvzip-v selection with fitted values, then each head's keys moved by L-BFGS (KVSculpt; "
    "20 iterations, the block's log-mass held: mass_weight=1; score=h2o, mass_weight=0 is the paper's form)",
    "learned": "scores predicted during the prefill by a linear model per layer trained on kvzip-v's scores "
    "(`kvsculpt train-scorer`); values fitted on 32x8 self samples (about 2x the prefill at 1k), or copied with "
    "--no-fit (one prefill)",
    "identity": "keep every entry (ratio 1.0; exactness checks)",
}
ALLOCATIONS = {
    "global": "every entry of every head and layer ranked together by the method's scores (KVzip's rule)",
    "curves": "a pilot at m/2, m, 2m fits each head's error curve; marginal gains equalised",
    "uniform": "every head keeps round(ratio·n)",
    "adaptive": "m ∝ pilot error^alpha (the KVSculpt paper's rule)",
}
REPEAT_PROMPTS = {
    "plain": '"Repeat the text above." between the context and its copy; the copy\'s queries',
    "kvzip": "KVzip's request closed by the chat template's user turn and opened as the assistant's reply; the "
    "queries of the request and the copy (as KVzip and kvpress score them)",
}
REFINE_SOURCES = {
    "self": "continuations of the context sampled from the full cache",
    "repeat": "KVzip's repeat request, then a chunk of the context (the model copying it)",
    "study": "a self-study request (summarise, ask and answer, explain, list facts) and the model's sampled reply",
}
REFINE_PARAMS = {"kv": "keys and values", "v": "values only", "kvb": "keys, values and the bias β"}
REFINE_SCHEDULES = {
    "constant": "the same step throughout",
    "cosine": "the step falls to zero over refine_steps along a half cosine",
}
DEFAULT_METHOD, DEFAULT_QUERIES, DEFAULT_ALLOCATION = "kvzip-v", "self+repeat", "global"
_REFINE = "end-to-end refine (after the method)"
_QUANT = "quantised storage of the compressed block"


def _choices(known: dict) -> str:
    return "; ".join(f"{k}: {v}" for k, v in known.items())


def opt(default, help: str, *, choices=None, group: str | None = None, flag: str | None = None):
    """A :class:`CompressConfig` field with what the command line needs to offer it: its help, its choices
    (the keys of a dict, or a tuple), the help group, and the flag if not ``--field-name``."""
    meta = {
        "help": help,
        "choices": None if choices is None else tuple(choices),
        "group": group,
        "flag": flag,
    }
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def _parse_sources(text, known: dict, name: str) -> str:
    """Sources joined by ``+`` (a string or a list), each known and none twice → the canonical string."""
    parts = text.split("+") if isinstance(text, str) else list(text)
    if not parts or any(p not in known for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"unknown {name} {text!r}; choose from {', '.join(known)} (or join several with '+')"
        )
    return "+".join(parts)


def build_method(name: str, fit: bool = True, options: dict | None = None) -> Method:
    """The method object for a name (:data:`METHODS`) and its options (the fields of its dataclass and of
    its scorer's)."""
    from .core.methods import Identity, Learned, Predicted, Sculpt, Select
    from .core.scores import SCORERS

    options = dict(options or {})
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if name == "identity":
        if options:
            raise ValueError(f"identity takes no options; got {sorted(options)}")
        return Identity()
    cls = {"sculpt": Sculpt, "learned": Learned}.get(name, Select)
    if name == "learned":  # its scores come from the prefill (kvsculpt.compress), not from a scorer
        scorer_cls = Predicted
    else:
        score = (
            options.pop("score", DEFAULT_METHOD) if name == "sculpt" else name
        )  # sculpt starts from the default
        if score not in SCORERS:
            raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORERS)}")
        scorer_cls = SCORERS[score]
    scorer_fields = {f.name for f in dataclasses.fields(scorer_cls)}
    method_fields = {f.name for f in dataclasses.fields(cls)} - {"scorer", "fit"}
    unknown = sorted(set(options) - scorer_fields - method_fields)
    if unknown:
        known = ", ".join(sorted(scorer_fields | method_fields | ({"score"} if name == "sculpt" else set())))
        raise ValueError(f"unknown option {', '.join(unknown)} for method {name!r}; known: {known}")
    for f in (*dataclasses.fields(scorer_cls), *dataclasses.fields(cls)):  # a number where the default is one
        value = options.get(f.name)
        if f.name in options and isinstance(f.default, int | float) and not isinstance(value, int | float):
            raise ValueError(f"option {f.name} of method {name!r} takes a number; got {value!r}")
    scorer = scorer_cls(**{k: v for k, v in options.items() if k in scorer_fields})
    return cls(scorer=scorer, fit=fit, **{k: v for k, v in options.items() if k in method_fields})


@dataclass
class CompressConfig:
    """How to compress one context. Defaults are the library's defaults everywhere.

    ``ratio``: fraction of KV entries **kept** (kvpress's ``compression_ratio`` is the fraction removed:
    ``ratio = 1 − compression_ratio``). ``method``: how entries are chosen (:data:`METHODS`); ``fit``: refit
    their values by ridge least squares (False copies them: plain eviction); ``options``: the method's own
    fields, e.g. ``{"lam": 1e-2}``, ``{"iters": 60}``, ``{"sinks": 0}``. ``allocation``: how budgets are
    shared between heads (:data:`ALLOCATIONS`), with ``alpha`` (adaptive), ``scope`` (``all``, ``heads``
    of each layer, or ``layers``) and ``floor`` (the smallest budget a head gets; None: n/64). ``queries``: the
    reference-query sources (:data:`QUERY_SOURCES`), joined by ``+``; ``repeat_prompt``: what stands between
    the context and its copy for ``repeat`` (:data:`REPEAT_PROMPTS`), which repeats the context ``repeat_chunk``
    tokens per request, each request's entries then scored and solved on their own (linear cost in n; 0: one
    request and one solve over the whole context, quadratic); at most ``max_queries`` per KV head are
    kept (a random subset; None, the default, keeps all: KVzip's peak is a maximum, which a subset lowers);
    ``self_samples`` × ``self_length`` tokens are sampled at ``temperature`` / ``top_p`` for ``self``.
    ``heldout``: fraction of query groups kept out of the fit, for the fidelity stats. ``on_policy``: solve
    the layers in that many stages, replaying the self samples through the layers already compressed.

    ``refine="kl"``: after the method, optimise the whole block end to end to the full cache's next-token
    distributions (:mod:`kvsculpt.refine`): ``refine_steps`` Adam steps of ``refine_batch`` sequences at the
    relative learning rate ``refine_lr`` (None: by ratio, :attr:`refine_step`) on the ``refine_schedule``
    (:data:`REFINE_SCHEDULES`), on ``refine_params`` (:data:`REFINE_PARAMS`), with
    ``refine_samples`` sequences of ``refine_length`` tokens from each source of ``refine_data``
    (:data:`REFINE_SOURCES`), ``refine_val`` of them held out for validation every ``refine_eval_every`` steps,
    the teacher kept as its ``refine_topk`` most likely tokens plus a tail; stops after ``refine_patience``
    validations without improvement or ``refine_time`` seconds (None: no limit). It is never worse than its
    start on its own validation split, but can be on other text: at ratio 0.5 with the step of r = 0.3 it was
    worse than its start on the real continuation of 3 of 8 Qwen2.5-Coder-0.5B windows; with the smaller step
    that is now the default there, better on all 8 (README).

    ``kv_bits``: store the block in 8-, 4- or 2-bit codes (16: not quantised, the model's dtype), keys per
    channel and values per token in groups of ``kv_group`` (:mod:`kvsculpt.core.quant`), the keys in
    ``key_bits`` if given (keys lose more than values at the same width); ``kv_refit``: re-solve
    fitted values against the quantised keys (:func:`~kvsculpt.core.fit.refit_for_quantized_keys`); a refine
    then starts from that block and optimises through the codes (straight through, :mod:`kvsculpt.refine`).
    """

    ratio: float = opt(
        DEFAULT_RATIO,
        "fraction of KV entries KEPT (kvpress's compression_ratio is the fraction removed: 1 - ratio)",
    )
    method: str = opt(DEFAULT_METHOD, "how entries are chosen: " + _choices(METHODS), choices=METHODS)
    fit: bool = opt(
        True, "re-solve the kept entries' values by ridge least squares (--no-fit copies them: eviction)"
    )
    options: dict = opt(
        {},
        "a field of the method, e.g. lam=0.01, iters=60 (sculpt), sinks=0 (kvzip), "
        "window=32 (snapkv); repeatable",
        flag="--option",
    )
    allocation: str = opt(
        DEFAULT_ALLOCATION,
        "how budgets are shared between heads: " + _choices(ALLOCATIONS),
        choices=ALLOCATIONS,
    )
    alpha: float = opt(1.0, "exponent of the adaptive rule")
    scope: str = opt(
        "all",
        "move budget across all heads and layers, only between the heads of a layer, or only between layers",
        choices=SCOPES,
    )
    floor: int | None = opt(None, "the smallest budget a head gets under a non-uniform rule (none: n/64)")
    queries: str = opt(
        DEFAULT_QUERIES, "reference queries, one source or several joined by '+': " + _choices(QUERY_SOURCES)
    )
    repeat_prompt: str = opt(
        "kvzip", "for 'repeat' queries: " + _choices(REPEAT_PROMPTS), choices=REPEAT_PROMPTS
    )
    repeat_chunk: int = opt(
        2048,
        "for 'repeat' queries: context tokens per repeat request, each read over the whole context's cache "
        "(KVzip's chunks; linear cost in n); 0: one request for the whole context",
    )
    repeat_fit_rows: int | None = opt(
        1024,
        "for 'repeat' queries over several requests (n > repeat_chunk): of each request's queries, hold only "
        "this many per KV head for the value fit (a fixed random subset); every query still scores its chunk's "
        "entries, counted during the pass (memory for queries: requests x this, not the GQA group x n); "
        "none: hold all",
    )
    chunk_tokens: int = opt(
        0,
        "compress while reading: read the context this many tokens at a time, each part over the compressed "
        "cache of the parts before it, and compress it to the ratio before reading on (peak memory: the "
        "budget plus one part, whatever the length); 0: read the whole context first",
    )
    read_ahead: int | None = opt(
        None,
        "compress while reading: read this many tokens past each part before compressing it, so that its "
        "entries are scored and fitted on queries drawn after more of the context (the next part takes those "
        "tokens over: each is still read once; memory: one more part); none: chunk_tokens, where the method "
        "allows it (not 'learned', not the context's own queries); 0: off",
    )
    read_slack: float = opt(
        1.0,
        "compress while reading: until the last part the block keeps this multiple of the ratio of the tokens "
        "read so far (at most all of them), so that entries a later part needs are not dropped early; the last "
        "part cuts it to the ratio (memory: the block grows by this factor while reading); 1: the ratio "
        "throughout",
    )
    max_queries: int | None = opt(
        None, "reference queries kept per KV head (a random subset; 0 or none keeps all)"
    )
    self_samples: int = opt(32, "sampled continuations for 'self' queries")
    self_length: int = opt(8, "tokens per sampled continuation")
    temperature: float = opt(1.0, "sampling temperature of the self samples and the refine data (0: greedy)")
    top_p: float = opt(0.95, "nucleus of the self samples and the refine data")
    heldout: float = opt(0.0, "fraction of query groups kept out of the fit, for the fidelity stats")
    on_policy: int = opt(
        0,
        "solve the layers in N stages, replaying the self samples through the layers "
        "already compressed (N >= layers: layer by layer; 0: off)",
    )
    seed: int = opt(0, "seed of sampling and subsampling")
    refine: str = opt(
        "none",
        "kl: optimise the whole compressed block by backpropagation through the frozen "
        "model, to the full cache's next-token distributions on text the model generates itself; "
        "gains most where the cache is tight (docs/refine.md)",
        choices=("none", "kl"),
        group=_REFINE,
    )
    refine_steps: int = opt(100, "Adam steps (at most)", group=_REFINE)
    refine_lr: float | None = opt(
        None,
        "step size relative to each tensor's RMS (none: by ratio, CompressConfig.refine_step)",
        group=_REFINE,
    )
    refine_schedule: str = opt(
        "constant", _choices(REFINE_SCHEDULES), choices=REFINE_SCHEDULES, group=_REFINE
    )
    refine_params: str = opt(
        "kv", "what is trained: " + _choices(REFINE_PARAMS), choices=REFINE_PARAMS, group=_REFINE
    )
    refine_data: str = opt(
        "self+repeat+study",
        "training text, sources joined by '+': " + _choices(REFINE_SOURCES),
        group=_REFINE,
    )
    refine_samples: int = opt(16, "sequences per data source", group=_REFINE)
    refine_length: int = opt(64, "tokens per sequence", group=_REFINE)
    refine_batch: int = opt(4, "sequences per step", group=_REFINE)
    refine_val: float = opt(
        0.25, "fraction of the sequences held out to choose the best iterate", group=_REFINE
    )
    refine_eval_every: int = opt(10, "steps between validations", group=_REFINE)
    refine_patience: int = opt(3, "validations without a gain before stopping", group=_REFINE)
    refine_topk: int = opt(
        256, "the teacher's most likely tokens kept per position (plus a tail bucket)", group=_REFINE
    )
    refine_time: float | None = opt(
        None, "stop training after this many seconds (none: no limit)", group=_REFINE
    )
    kv_bits: int = opt(
        16,
        "bits per stored key/value element: 16 keeps the model's dtype; 8, 4, 2 store packed "
        "codes (keys per channel, values per token, fp16 scales; KIVI's layout)",
        choices=(16, *QUANT_BITS),
        group=_QUANT,
    )
    key_bits: int | None = opt(
        None,
        "bits per stored key element, if not --kv-bits (keys lose more than values at the same width)",
        choices=QUANT_BITS,
        group=_QUANT,
    )
    kv_group: int = opt(64, "elements sharing one scale and minimum", group=_QUANT)
    kv_refit: bool = opt(True, "re-solve fitted values against the quantised keys", group=_QUANT)

    def __post_init__(self):
        from .core import budget

        budget.check_ratio(self.ratio)
        self.ratio = float(self.ratio)
        self.queries = _parse_sources(self.queries, QUERY_SOURCES, "queries")
        self.options = dict(self.options)
        self.solver = build_method(self.method, self.fit, self.options)  # not a field: derived, checked here
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose from {', '.join(SCOPES)}")
        if self.floor is not None and self.floor < 1:
            raise ValueError(f"floor must be >= 1 (or None for n/64); got {self.floor}")
        if self.allocation == "uniform":
            self.rule = budget.Uniform()
        elif self.allocation == "adaptive":
            self.rule = budget.Adaptive(scope=self.scope, floor=self.floor, alpha=self.alpha)
        else:
            self.rule = budget.RULES[self.allocation](scope=self.scope, floor=self.floor)
        if self.repeat_prompt not in REPEAT_PROMPTS:
            raise ValueError(
                f"unknown repeat_prompt {self.repeat_prompt!r}; choose from {', '.join(REPEAT_PROMPTS)}"
            )
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0; got {self.alpha}")
        if self.repeat_fit_rows is not None and (
            not isinstance(self.repeat_fit_rows, int) or self.repeat_fit_rows < 1
        ):
            raise ValueError(
                f"repeat_fit_rows must be a whole number >= 1 (or none: hold all); got {self.repeat_fit_rows!r}"
            )
        if not isinstance(self.repeat_chunk, int) or self.repeat_chunk < 0:
            raise ValueError(
                f"repeat_chunk must be a whole number of tokens >= 0 (0: one request); got {self.repeat_chunk!r}"
            )
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 0:
            raise ValueError(
                f"chunk_tokens must be a whole number of tokens >= 0 (0: off); got {self.chunk_tokens!r}"
            )
        if self.read_ahead is not None and (not isinstance(self.read_ahead, int) or self.read_ahead < 0):
            raise ValueError(
                f"read_ahead must be a whole number of tokens >= 0 (0: off; none: chunk_tokens); got {self.read_ahead!r}"
            )
        if not isinstance(self.read_slack, (int, float)) or self.read_slack < 1:
            raise ValueError(
                f"read_slack must be a number >= 1 (1: the ratio throughout); got {self.read_slack!r}"
            )
        if self.read_slack != 1 and not self.chunk_tokens:
            raise ValueError("read_slack applies to compress-while-reading; set chunk_tokens too")
        if self.read_ahead and not self.chunk_tokens:
            raise ValueError(
                "read_ahead reads past each part of compress-while-reading; set chunk_tokens too"
            )
        if self.read_ahead and not self._can_read_ahead():
            raise ValueError(
                "read_ahead does not combine with method 'learned' or with the context's own queries yet"
            )
        if self.chunk_tokens:
            for name, off in (("refine", "none"), ("on_policy", 0), ("kv_bits", 16)):
                if getattr(self, name) != off:
                    raise ValueError(f"chunk_tokens (compress while reading) does not combine with {name} yet; "
                                     f"leave {name} at {off!r}")  # fmt: skip
        if self.method == "learned":
            for name, off in (("refine", "none"), ("on_policy", 0)):
                if getattr(self, name) != off:
                    raise ValueError(
                        f"method 'learned' does not combine with {name} yet; leave {name} at {off!r}"
                    )
            if self.allocation not in ("global", "uniform"):
                raise ValueError("method 'learned' has no pilot: use allocation 'global' or 'uniform'")
        if self.max_queries is not None and self.max_queries <= 0:
            raise ValueError(f"max_queries must be positive (or None for all); got {self.max_queries}")
        for name in ("self_samples", "self_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0.0 <= self.heldout < 1.0:
            raise ValueError(f"heldout is a fraction of the query groups in [0, 1); got {self.heldout}")
        if not isinstance(self.on_policy, int) or self.on_policy < 0:
            raise ValueError(f"on_policy must be a non-negative number of stages; got {self.on_policy!r}")
        if self.on_policy and "self" not in self.sources:
            raise ValueError("on_policy needs self queries (queries='self' or a mix with it)")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}"
            )
        self._check_refine()
        if self.key_bits is not None and (self.key_bits not in QUANT_BITS or self.kv_bits == 16):
            raise ValueError(
                f"key_bits must be one of {', '.join(map(str, QUANT_BITS))}, with kv_bits below 16; got {self.key_bits}"
            )
        if self.kv_bits not in (16, *QUANT_BITS):
            raise ValueError(
                f"kv_bits must be 16 (not quantised) or one of {', '.join(map(str, QUANT_BITS))}; got {self.kv_bits}"
            )
        if self.kv_group < 1 or (self.kv_group * self.kv_bits) % 8:
            raise ValueError(
                f"kv_group must be a positive multiple of {max(1, 8 // self.kv_bits)}; got {self.kv_group}"
            )

    def _check_refine(self):
        if self.refine not in ("none", "kl"):
            raise ValueError(f"unknown refine {self.refine!r}; choose none or kl")
        self.refine_data = _parse_sources(self.refine_data, REFINE_SOURCES, "refine_data")
        if self.refine_schedule not in REFINE_SCHEDULES:
            raise ValueError(
                f"unknown refine_schedule {self.refine_schedule!r}; choose from {', '.join(REFINE_SCHEDULES)}"
            )
        if self.refine_params not in REFINE_PARAMS:
            raise ValueError(
                f"unknown refine_params {self.refine_params!r}; choose from {', '.join(REFINE_PARAMS)}"
            )
        for name in ("refine_steps", "refine_samples", "refine_length", "refine_batch", "refine_eval_every",
                     "refine_patience", "refine_topk"):  # fmt: skip
            least = 0 if name == "refine_steps" else 1
            if not isinstance(getattr(self, name), int) or getattr(self, name) < least:
                raise ValueError(f"{name} must be an integer >= {least}; got {getattr(self, name)!r}")
        if self.refine == "kl" and self.refine_steps < 1:
            raise ValueError("refine='kl' needs refine_steps >= 1 (0 would make its data for nothing)")
        if self.refine_lr is not None and not self.refine_lr > 0:
            raise ValueError(f"refine_lr must be > 0 (or None: by ratio); got {self.refine_lr}")
        if not 0.0 <= self.refine_val < 1.0:
            raise ValueError(f"refine_val is a fraction of the sequences in [0, 1); got {self.refine_val}")
        if self.refine_time is not None and self.refine_time <= 0:
            raise ValueError(f"refine_time must be > 0 seconds (or None); got {self.refine_time}")

    def __repr__(self) -> str:
        """The dataclass repr, without the quantisation fields when not quantised (``kv_bits=16``: they change
        nothing), without ``refine_schedule`` when constant and ``repeat_chunk``, ``repeat_fit_rows`` and ``chunk_tokens`` at their defaults, so results
        recorded before these fields existed keep matching. (Rows recorded before ``repeat_chunk`` existed at
        n > 2048 repeated the context in one request: the same repr, another computation; at n ≤ 2048 both
        are one request. Rows recorded before ``repeat_fit_rows`` existed at n > 2048 held every repeat query:
        the same repr again; at n ≤ 2048 one request holds every query either way.)"""
        skip = {"kv_bits", "key_bits", "kv_group", "kv_refit"} if self.kv_bits == 16 else set()
        skip |= {"repeat_chunk"} if self.repeat_chunk == 2048 else set()
        skip |= {"chunk_tokens"} if self.chunk_tokens == 0 else set()
        skip |= {"read_ahead"} if self.read_ahead == 0 or not self.chunk_tokens else set()
        skip |= {"read_slack"} if self.read_slack == 1 else set()
        skip |= {"repeat_fit_rows"} if self.repeat_fit_rows == 1024 else set()
        skip |= {"refine_schedule"} if self.refine_schedule == "constant" else set()
        body = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name not in skip
        )
        return f"{type(self).__name__}({body})"

    @property
    def refine_step(self) -> float:
        """The refine's relative learning rate: ``refine_lr``, or by default 3e-3 below r = 0.2, 1e-3 below
        r = 0.5 and 3e-4 from there (SmolLM2, 60 steps: at r = 0.1, 1.99× against 1.70× at 1e-3 on the tuning
        windows; at r = 0.3, 1.53× against 1.21× there, and 1.96× against ~1.0× on four other windows; at
        r = 0.5, on 8 report windows, 1.40× against 1.03× at 1e-3 on SmolLM2 and 1.26× against 1.00× on
        Qwen2.5-Coder-0.5B). Results recorded before 2026-12-02 at r >= 0.5 with ``refine_lr=None`` ran 1e-3
        (README)."""
        if self.refine_lr is not None:
            return self.refine_lr
        return 3e-3 if self.ratio < 0.2 else 1e-3 if self.ratio < 0.5 else 3e-4

    @property
    def refine_sources(self) -> tuple[str, ...]:
        """The refine data sources, in order."""
        return tuple(self.refine_data.split("+"))

    def _can_read_ahead(self) -> bool:
        return not (
            self.method == "learned" or "context" in self.sources or self.solver.needs_context_queries
        )

    @property
    def ahead_tokens(self) -> int:
        """The tokens compress-while-reading reads past each part (``read_ahead``; None: ``chunk_tokens`` where
        the method allows it); 0 when not reading in parts."""
        if not self.chunk_tokens:
            return 0
        if self.read_ahead is None:
            return self.chunk_tokens if self._can_read_ahead() else 0
        return self.read_ahead

    @property
    def sources(self) -> tuple[str, ...]:
        """The query sources, in order."""
        return tuple(self.queries.split("+"))

    def capture_key(self) -> tuple:
        """What a capture depends on: configs with equal keys can share one capture of a context."""
        return (self.queries, self.repeat_prompt, self.repeat_chunk, self.repeat_fit_rows, self.chunk_tokens, self.ahead_tokens, self.max_queries, self.self_samples, self.self_length,
                self.temperature, self.top_p, self.seed)  # fmt: skip

    def refine_data_key(self) -> tuple:
        """What the refine data depend on: configs with equal keys can share one set of sequences."""
        return (self.refine_data, self.refine_samples, self.refine_length, self.refine_topk, self.temperature,
                self.top_p, self.seed)  # fmt: skip

    def replace(self, **changes) -> CompressConfig:
        """A copy with some fields changed (checked again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown compress option {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, method: str, queries: str, **opts) -> CompressConfig:
        """A config from a method, a query source and a flat dict of options: config fields are taken as
        such, everything else goes to the method's ``options``."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(method=method, queries=queries, **{k: v for k, v in opts.items() if k in names},
                   options={k: v for k, v in opts.items() if k not in names})  # fmt: skip


def compress_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of :class:`CompressConfig`, each with its command-line help in ``metadata``."""
    return dataclasses.fields(CompressConfig)


def field_types() -> dict[str, tuple[type, bool]]:
    """Each field's ``(value type, whether None is allowed)``, ``X | None`` read as ``(X, True)``."""
    import typing

    out = {}
    for name, t in typing.get_type_hints(CompressConfig).items():
        args = typing.get_args(t)
        out[name] = (next(a for a in args if a is not type(None)), True) if args else (t, False)
    return out
