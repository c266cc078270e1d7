"""Request workloads: seeded synthetic traces and replay of trace files, shared by `bench serve` and `bench batching`.

A trace is a list of requests in arrival order, each with an arrival time (seconds from the start), a prompt
and an output length. Synthetic traces draw arrivals offline (all at t=0) or online (gamma inter-arrivals,
Poisson at shape 1), prompt and output lengths from fixed, uniform or heavy-tailed (lognormal, Pareto)
distributions clipped to a maximum, and can start a fraction of the prompts with one of K shared "system
prompt" prefixes (vLLM's benchmarks/datasets.py has the same random and prefix-repetition datasets). Prompt
text is random common words; with a tokenizer each prompt is exact token ids, so lengths are in tokens.
Trace files: JSON Lines (`arrival_s`, `prompt` or `prompt_len`, `output_len`) or the CSV of the Azure LLM
inference traces (`TIMESTAMP`, `ContextTokens`, `GeneratedTokens`; Patel et al. 2024, "Splitwise").
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from labkit.checks import check_choice, check_int, check_ints, is_int

# Short, common English words: most tokenizers spend about one token on each (with its leading space), so a
# prompt of n words is about n tokens. The exact count is the server's `usage.prompt_tokens`.
WORDS = tuple("""the of and to in is you that it he was for on are as with his they at be this have from or one
had by word but not what all were we when your can said there use an each which she do how their if will up
other about out many then them these so some her would make like him into time has look two more write go see
number no way could people my than first water been call who oil its now find long down day did get come made
may part over new sound take only little work know place year live me back give most very after thing our just
name good sentence man think say great where help through much before line right too mean old any same tell boy
follow came want show also around form three small set put end does another well large must big even such
because turn here why ask went men read need land different home us move try kind hand picture again change off
play spell air away animal house point page letter mother answer found study still learn should world""".split())

LENGTH_KINDS = ("fixed", "uniform", "lognormal", "pareto")
DEFAULT_SHAPES = {"fixed": 0.0, "uniform": 0.5, "lognormal": 1.0, "pareto": 1.5}
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def _is_count(value, minimum: int = 1) -> bool:
    return is_int(value) and value >= minimum


# -- length distributions ------------------------------------------------------------------------------------
@dataclass
class LengthDist:
    """Token counts of mean `mean` (before clipping), clipped to [min_len, max_len]; validated on creation.

    `shape` by kind: uniform, the half-width as a fraction of the mean (lengths in mean * (1 ± shape));
    lognormal, the sigma of log(length); pareto, the tail index alpha > 1 (smaller is heavier). None: the
    kind's default (DEFAULT_SHAPES).
    """

    kind: str = "fixed"
    mean: int = 64
    shape: float | None = None
    min_len: int = 1
    max_len: int | None = None

    def __post_init__(self):
        check_choice("length distribution", self.kind, LENGTH_KINDS)
        if self.shape is None:
            self.shape = DEFAULT_SHAPES[self.kind]
        if not _is_count(self.mean):
            raise ValueError(f"mean length must be an integer >= 1, got {self.mean!r}")
        check_int("min_len", self.min_len)
        if self.max_len is not None and not (_is_count(self.max_len) and self.max_len >= self.mean >= self.min_len):
            raise ValueError(f"max_len must be an integer >= the mean ({self.mean}), got {self.max_len!r}")
        if self.mean < self.min_len:
            raise ValueError(f"mean length {self.mean} is below min_len {self.min_len}")
        shape = self.shape
        if isinstance(shape, bool) or not isinstance(shape, (int, float)) or not math.isfinite(shape):
            raise ValueError(f"shape must be a finite number, got {shape!r}")
        if self.kind == "fixed" and shape != 0:
            raise ValueError(f"a fixed length takes no shape, got {shape!r}")
        if self.kind == "uniform" and not 0 <= shape < 1:
            raise ValueError(f"uniform shape (half-width / mean) must be in [0, 1), got {shape!r}")
        if self.kind == "lognormal" and not shape > 0:
            raise ValueError(f"lognormal shape (sigma) must be > 0, got {shape!r}")
        if self.kind == "pareto" and not shape > 1:
            raise ValueError(f"pareto shape (tail index alpha) must be > 1 for a finite mean, got {shape!r}")

    def sample(self, rng: random.Random) -> int:
        """One length drawn with `rng` (a fixed length draws nothing, so other streams stay put)."""
        m, s = self.mean, self.shape
        if self.kind == "fixed" or (self.kind == "uniform" and s == 0):
            value = m
        elif self.kind == "uniform":
            lo, hi = math.floor(m * (1 - s)), math.ceil(m * (1 + s))
            value = rng.randint(max(self.min_len, lo), max(self.min_len, hi))
        elif self.kind == "lognormal":
            value = round(rng.lognormvariate(math.log(m) - s * s / 2, s))  # mu chosen so the mean is m
        else:
            value = round(m * (s - 1) / s * rng.paretovariate(s))  # scale x_m = m (alpha - 1) / alpha
        return min(max(value, self.min_len), self.max_len or value)

    def to_dict(self) -> dict:
        return asdict(self)


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start: gamma inter-arrivals with mean 1/rate (shape 1 = Poisson)."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(f"arrivals-{seed}")
    theta = 1.0 / (request_rate * burstiness)  # the scale that keeps the mean gap at 1 / rate
    offsets, t = [], 0.0
    for _ in range(num_requests):
        offsets.append(t)
        t += rng.gammavariate(burstiness, theta)
    return offsets


# -- bench serve's workload: word prompts with uniform lengths -----------------------------------------------
@dataclass
class PromptSpec:
    """One request of the workload."""

    index: int
    prompt: str
    input_words: int
    output_len: int


def make_prompts(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                 seed: int | str = 0) -> list[PromptSpec]:
    """A seeded set of random-word prompts with uniformly distributed input and output lengths."""
    rng = random.Random(seed)
    inputs, outputs = LengthDist("uniform", input_len, range_ratio), LengthDist("uniform", output_len, range_ratio)
    specs = []
    for i in range(num_prompts):
        n_in = inputs.sample(rng)
        n_out = outputs.sample(rng)
        specs.append(PromptSpec(i, " ".join(rng.choice(WORDS) for _ in range(n_in)), n_in, n_out))
    return specs


# -- traces --------------------------------------------------------------------------------------------------
@dataclass
class TraceConfig:
    """A synthetic trace; validated on creation (one-line errors naming the value).

    A request's prompt is an optional shared prefix (prefix_len tokens) followed by its own prompt_len tokens.
    """

    num_requests: int = 64
    request_rate: float = math.inf  # requests per second; inf: offline, every request at t=0
    burstiness: float = 1.0  # gamma shape of the inter-arrival times: 1 = Poisson, < 1 burstier
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 32))
    output_len: LengthDist = field(default_factory=lambda: LengthDist("lognormal", 32, 1.0, max_len=256))
    num_prefixes: int = 0  # K shared "system prompts"
    prefix_len: int = 0  # tokens in each
    prefix_fraction: float = 0.0  # share of requests that start with one (picked uniformly among the K)
    seed: int = 0

    def __post_init__(self):
        for name in ("prompt_len", "output_len"):  # a dict is welcome (notebook parameters, JSON)
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, LengthDist(**value))
            elif not isinstance(value, LengthDist):
                raise ValueError(f"{name} must be a LengthDist or a dict of its fields, got {value!r}")
        check_int("num_requests", self.num_requests)
        if not isinstance(self.request_rate, (int, float)) or not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (or inf for offline), got {self.request_rate!r}")
        if not isinstance(self.burstiness, (int, float)) or not 0 < self.burstiness < math.inf:
            raise ValueError(f"burstiness must be a finite number > 0, got {self.burstiness!r}")
        check_ints(self, ("num_prefixes", "prefix_len"), minimum=0)
        if not isinstance(self.prefix_fraction, (int, float)) or not 0 <= self.prefix_fraction <= 1:
            raise ValueError(f"prefix_fraction must be in [0, 1], got {self.prefix_fraction!r}")
        if self.prefix_fraction > 0 and not (self.num_prefixes and self.prefix_len):
            raise ValueError("prefix_fraction > 0 needs num_prefixes >= 1 and prefix_len >= 1")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def is_offline(self) -> bool:
        return math.isinf(self.request_rate)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["request_rate"] = None if self.is_offline else self.request_rate  # JSON has no inf
        return out


@dataclass
class TraceRequest:
    """One request of a trace: when it arrives (seconds from the start), its prompt, and its output length."""

    index: int
    arrival_s: float
    prompt: str
    output_len: int
    prompt_ids: list[int] | None = None  # exact token ids, when the trace was built with a tokenizer
    prefix_index: int | None = None  # which shared prefix the prompt starts with

    @property
    def prompt_len(self) -> int:
        """Tokens with a tokenizer, words without."""
        return len(self.prompt_ids) if self.prompt_ids is not None else len(self.prompt.split())


@dataclass
class Trace:
    """Requests in arrival order and where they came from (a TraceConfig's fields, or the replayed file)."""

    requests: list[TraceRequest]
    source: dict

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    @property
    def is_offline(self) -> bool:
        return all(r.arrival_s == 0 for r in self.requests)

    @property
    def has_token_ids(self) -> bool:
        return all(r.prompt_ids is not None for r in self.requests)

    def prompt_specs(self) -> list[PromptSpec]:
        """The trace as `loadgen` prompts (text and output lengths; arrivals are the load generator's)."""
        return [PromptSpec(r.index, r.prompt, r.prompt_len, r.output_len) for r in self.requests]

    def to_frame(self):
        """One row per request: index, arrival_s, prompt_len, output_len, prefix_index (a pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame([{"index": r.index, "arrival_s": r.arrival_s, "prompt_len": r.prompt_len,
                              "output_len": r.output_len, "prefix_index": r.prefix_index} for r in self.requests])

    def describe(self) -> dict:
        """The source plus the realised totals, for result rows."""
        outputs = [r.output_len for r in self.requests]
        return {**self.source, "num_requests": len(self), "is_offline": self.is_offline,
                "total_prompt_tokens": sum(r.prompt_len for r in self.requests), "total_output_tokens": sum(outputs),
                "max_output_len": max(outputs), "span_s": self.requests[-1].arrival_s}


class _PromptMaker:
    """Random-word prompts of exact lengths: token ids when there is a tokenizer, words otherwise."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.word_ids = None
        if tokenizer is not None:  # each word with its leading space, as it appears inside a sentence
            self.word_ids = tokenizer([" " + w for w in WORDS], add_special_tokens=False)["input_ids"]

    def make(self, rng: random.Random, length: int) -> tuple[list[int] | None, list[str]]:
        """(token ids or None, words) of a prompt of `length` tokens (words without a tokenizer)."""
        if self.word_ids is None:
            return None, [rng.choice(WORDS) for _ in range(length)]
        ids, words = [], []
        while len(ids) < length:
            i = rng.randrange(len(WORDS))
            ids.extend(self.word_ids[i])
            words.append(WORDS[i])
        return ids[:length], words

    def request(self, index: int, arrival_s: float, output_len: int, own: tuple, prefix: tuple | None = None,
                prefix_index: int | None = None) -> TraceRequest:
        (ids, words), (prefix_ids, prefix_words) = own, prefix or ([], [])
        if ids is None:
            return TraceRequest(index, arrival_s, " ".join(prefix_words + words), output_len, None, prefix_index)
        ids = list(prefix_ids) + ids
        return TraceRequest(index, arrival_s, self.tokenizer.decode(ids), output_len, ids, prefix_index)


def make_trace(config: TraceConfig, tokenizer=None) -> Trace:
    """A seeded synthetic trace; with a tokenizer, prompts are exact token ids (lengths in tokens)."""
    maker = _PromptMaker(tokenizer)
    seed = config.seed
    # one random stream per knob, so changing the output lengths does not change the prompts, and so on
    rng_prompt, rng_output = random.Random(f"prompt-len-{seed}"), random.Random(f"output-len-{seed}")
    rng_words, rng_prefix = random.Random(f"words-{seed}"), random.Random(f"prefix-{seed}")
    prefixes = [maker.make(rng_prefix, config.prefix_len) for _ in range(config.num_prefixes)]
    arrivals = arrival_offsets(config.num_requests, config.request_rate, config.burstiness, seed)
    requests = []
    for i, arrival in enumerate(arrivals):
        output_len = config.output_len.sample(rng_output)
        own = maker.make(rng_words, config.prompt_len.sample(rng_prompt))
        k = rng_prefix.randrange(config.num_prefixes) if rng_prefix.random() < config.prefix_fraction else None
        requests.append(maker.request(i, arrival, output_len, own, prefixes[k] if k is not None else None, k))
    return Trace(requests, {"kind": "synthetic", **config.to_dict()})


# -- replay of trace files -----------------------------------------------------------------------------------
def _count(value, what: str, where: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{where}: {what} must be an integer >= 1, got {value!r}") from None
    if not _is_count(value):
        raise ValueError(f"{where}: {what} must be an integer >= 1, got {value!r}")
    return value


def _read_jsonl(path: Path, lines: list[str]) -> list[tuple[float, str | int, int]]:
    from labkit.lab.results import json_lines

    rows = []
    for where, obj in json_lines(lines, path):
        arrival = obj.get("arrival_s", 0.0)
        if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not 0 <= arrival < math.inf:
            raise ValueError(f"{where}: arrival_s must be a number of seconds >= 0, got {arrival!r}")
        if ("prompt" in obj) == ("prompt_len" in obj):
            raise ValueError(f"{where}: give exactly one of prompt (text) and prompt_len (tokens)")
        if "prompt" in obj:
            prompt = obj["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: prompt must be non-empty text, got {prompt!r}")
        else:
            prompt = _count(obj["prompt_len"], "prompt_len", where)
        if "output_len" not in obj:
            raise ValueError(f"{where}: output_len is missing")
        rows.append((float(arrival), prompt, _count(obj["output_len"], "output_len", where)))
    return rows


def _timestamp_s(text: str, where: str) -> float:
    """Seconds from a TIMESTAMP cell: a number of seconds, or an ISO date and time (Azure's format)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        # Azure writes 7 fractional digits ("2023-11-16 18:15:46.6805900"); fromisoformat keeps microseconds
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"{where}: TIMESTAMP must be seconds or an ISO date and time, got {text!r}") from None


def _read_azure_csv(path: Path, lines: list[str]) -> list[tuple[float, int, int]]:
    reader = csv.DictReader(lines)
    missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}:1: the CSV header lacks {', '.join(missing)} (Azure trace columns: "
                         f"{', '.join(AZURE_COLUMNS)})")
    rows = []
    for record in reader:
        where = f"{path}:{reader.line_num}"
        if None in record or None in record.values():
            raise ValueError(f"{where}: expected {len(reader.fieldnames)} columns")
        rows.append((_timestamp_s(record["TIMESTAMP"], where), _count(record["ContextTokens"], "ContextTokens", where),
                     _count(record["GeneratedTokens"], "GeneratedTokens", where)))
    if rows:
        start = min(t for t, _, _ in rows)
        rows = [(t - start, p, o) for t, p, o in rows]
    return rows


def load_trace(path: str | Path, tokenizer=None, *, time_scale: float = 1.0, max_requests: int | None = None,
               max_prompt_len: int | None = None, max_output_len: int | None = None, seed: int = 0) -> Trace:
    """Replay a trace file: JSON Lines or Azure CSV (told apart by the content, not the name).

    Arrivals are multiplied by `time_scale` (0: offline); prompts given as lengths become seeded random
    words (exact token ids with a tokenizer); lengths above the max_* limits are clipped. Bad files raise
    ValueError naming the file and line.
    """
    path = Path(path)
    if not isinstance(time_scale, (int, float)) or not 0 <= time_scale < math.inf:
        raise ValueError(f"time_scale must be a number >= 0, got {time_scale!r}")
    for name, value in (("max_requests", max_requests), ("max_prompt_len", max_prompt_len),
                        ("max_output_len", max_output_len)):
        if value is not None and not _is_count(value):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such trace file") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise ValueError(f"{path}: not a text trace file ({type(exc).__name__})") from None
    first = next((line.lstrip() for line in lines if line.strip()), None)
    if first is None:
        raise ValueError(f"{path}: the trace has no requests")
    fmt = "jsonl" if first.startswith("{") else "azure-csv"
    rows = _read_jsonl(path, lines) if fmt == "jsonl" else _read_azure_csv(path, lines)
    if not rows:
        raise ValueError(f"{path}: the trace has no requests")
    rows = sorted(rows, key=lambda r: r[0])[:max_requests]  # stable: ties keep the file's order
    maker, rng = _PromptMaker(tokenizer), random.Random(f"replay-{seed}")
    requests = []
    for i, (arrival, prompt, output_len) in enumerate(rows):
        output_len = min(output_len, max_output_len or output_len)
        if isinstance(prompt, int):
            own = maker.make(rng, min(prompt, max_prompt_len or prompt))
            requests.append(maker.request(i, arrival * time_scale, output_len, own))
            continue
        ids = None
        if tokenizer is not None:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if max_prompt_len and len(ids) > max_prompt_len:
                ids = ids[:max_prompt_len]
                prompt = tokenizer.decode(ids)
        elif max_prompt_len:
            prompt = " ".join(prompt.split()[:max_prompt_len])
        requests.append(TraceRequest(i, arrival * time_scale, prompt, output_len, ids))
    source = {"kind": "file", "path": str(path), "format": fmt, "time_scale": time_scale,
              "max_requests": max_requests, "max_prompt_len": max_prompt_len, "max_output_len": max_output_len,
              "seed": seed}
    return Trace(requests, source)


__all__ = ["WORDS", "LENGTH_KINDS", "LengthDist", "arrival_offsets", "PromptSpec", "make_prompts", "TraceConfig",
           "TraceRequest", "Trace", "make_trace", "load_trace"]
