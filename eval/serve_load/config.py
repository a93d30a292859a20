"""The scenario of the load run (eval/serve_load/): its instructions, inputs and request kinds, `LoadConfig`, one
request's `Result`, the `LoadReport`, the run's `Deadline`, and the `Fixtures` the requests name."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# instructions of the load: each is compressed into the server's store (the good requests name them by key, by
# text, or as a chat's system message)
INSTRUCTIONS = [
    "Name the capital city of the given country. Answer with the city name only.",
    "Translate the word into French.",
    "Give the opposite of the given word.",
    "Write the plural of the given noun.",
    "Name the continent the given country is in.",
    "Give a synonym of the given word.",
]
INPUTS = ["France", "Japan", "apple", "happy", "Brazil", "child", "Kenya", "cold"]
# another instruction: its cache is copied over the replaced entry (phase 2)
OTHER = "Uppercase every letter of the given word."
TAMPERED = "Count the letters of the given word."  # its store entry gets bytes flipped
FOREIGN = "Reverse the given word."  # compressed by another run into the server's store
BAD_KINDS = ("unknown_key", "tampered", "foreign_run", "file_path", "too_long", "malformed_json", "missing_field")
GOOD_MODES = ("key", "prompt", "chat")
MODEL_NAME = "gist"


@dataclass
class LoadConfig:
    requests: int = 500  # phase 1
    concurrency: int = 32
    bad_fraction: float = 0.1  # at least one of each bad kind
    instructions: int = 4  # of INSTRUCTIONS, the good requests' pool (x len(INPUTS) pairs)
    sample: int = 16  # (instruction, input) pairs whose answers are compared with gist generate
    max_tokens: int = 16
    replace_requests: int = 48  # phase 2 (0: skip)
    kill_requests: int = 48  # phase 3 (0: skip); the server is killed after a third of them are answered
    after_requests: int = 16  # answered after the restart
    memory_slack: float = 0.20
    max_model_len: int = 1024
    request_timeout_s: float = 300.0
    start_timeout_s: float = 600.0
    deadline_s: float = 3600.0  # the whole run
    workdir: str | None = None  # default: a temporary folder, removed after
    port: int | None = None  # default: a free one
    seed: int = 0
    extra_args: tuple[str, ...] = ("--enforce-eager", "--seed", "0")  # to vLLM's server

    def check(self) -> None:
        from gistcache.errors import GistError

        if self.requests < 1 or self.concurrency < 1 or self.instructions < 1 or self.max_tokens < 1:
            raise GistError("--requests, --concurrency, --instructions and --max-tokens must be >= 1")
        if not 0 <= self.bad_fraction < 1:
            raise GistError(f"--bad-fraction must be in [0, 1), got {self.bad_fraction}")
        if self.instructions > len(INSTRUCTIONS):
            raise GistError(f"--instructions takes at most {len(INSTRUCTIONS)}")
        if min(self.replace_requests, self.kill_requests, self.after_requests, self.sample) < 0:
            raise GistError("request counts and --sample must be >= 0")


@dataclass
class Result:
    """One request's outcome."""

    phase: str
    kind: str  # a GOOD_MODES mode, or a BAD_KINDS kind
    pair: tuple[int, int] | None  # (instruction, input) indices of a good request
    status: int | None = None  # HTTP status; None: no answer (connection lost, timeout)
    text: str | None = None  # the answer of a 200
    reason: str | None = None  # the error message of a non-200, or the transport error
    seconds: float = 0.0

    @property
    def good(self) -> bool:
        return self.kind in GOOD_MODES


@dataclass
class LoadReport:
    config: dict
    phases: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    server: dict = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"ok": self.ok, "failures": self.failures, "phases": self.phases, "memory": self.memory,
                "server": self.server, "wall_s": round(self.wall_s, 1), "config": self.config}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, what: str) -> float:
        from gistcache.errors import GistError

        left = self.end - time.monotonic()
        if left <= 0:
            raise GistError(f"the load run went past its deadline before {what}: raise --deadline")
        return left


@dataclass
class Fixtures:
    """What the requests name: keys of the pool's instructions, the bad kinds' keys and files, the references."""

    keys: list[str]  # of INSTRUCTIONS[:n]
    tampered_key: str
    foreign_key: str
    other_key: str  # OTHER's cache: copied over the replaced entry
    file_path: str  # a real cache file named by path
    references: dict[tuple[int, int], str]  # (instruction, input) -> gist generate's answer
    other_references: dict[int, str]  # input -> OTHER's answer (a mix would give it)
    expected: dict[str, str]  # bad kind -> what its refusal must say
    protected: dict[str, str]  # store entries the run damages on purpose: key -> SHA-256 of the bytes left
