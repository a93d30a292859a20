"""A transcript of the `gist` CLI, to show that a change left its behaviour alone (issue 25: "--help of every verb and
at least 25 CLI calls on a tiny run byte-identical before and after").

    python tests/cli_transcript.py OUT.txt

writes to OUT.txt, in order:

  (a) `--help` of the app, of every command group and of every command, found by walking the click command of
      the typer app (typer.main.get_command), so a new verb is in the transcript without an edit here;
  (b) CLI calls on a tiny run built in a fixed work folder (a 2-layer random Llama with the byte-level tokenizer,
      an untrained 2-gist-token run of it, a few data files): train, compress, generate, cache
      ls/verify/upgrade/rm/prune/adopt, export, eval, attention, data long/kshot, and bad input of every verb
      (exit code 2, one line).

For each call: the argv, the exit code, stdout and stderr (and an exception's type and message, where a call
raised one), and the SHA-256 of every file the call wrote, changed or removed under the work folder. The calls
run in this process through typer's CliRunner (prog name `gist`), with COLUMNS=80, NO_COLOR=1, TERM=dumb, TZ=UTC,
PYTHONHASHSEED=0 (the script re-executes itself to set them), HF_HUB_OFFLINE=1, the store in the work folder
and one torch thread; torch's seed is set to 0 before each call.

What is made the same rather than normalized: the work folder is one fixed path, ${TMPDIR:-/tmp}/gist-cli-transcript
(emptied first; a lock file beside it makes two transcripts wait for each other), so a run's config.json and the
tables that fold paths are the same bytes each time. The wall clock that gistcache writes into files (a cache file's
`created`, the store marker's) reads a fixed instant: before each call, each loaded gistcache module's `datetime` name
is bound to a datetime subclass whose now() is 2026-01-01 00:00:00 UTC. The file clock too: after each call every file
it wrote or touched gets the mtime 2026-01-01 + 60 s x the call's number (files of one call tie: the real clock's
coarse ticks order them differently from run to run), so the store's last-use order (`cache ls`, `cache prune`) and
`last_used` are the same each time.

What is normalized (only what must vary), in the transcript: the work folder's path -> <TMP>, the checkout's path ->
<SRC>; durations and rates: JSON fields named like one (train_seconds, tokens_per_second, wall_s, ttft_s,
runs_total_s, ...; in JSON also *speedup* and loadavg*), table rows named like one (gist train's), and the rate,
elapsed and left times of progress bars and the bar itself (<BAR>: its width is what they leave of the line). In the SHA-256 of a file written: a .safetensors file is hashed as its
header with sorted keys plus its tensor bytes (safetensors writes __metadata__ from a Rust HashMap: its key order
changes from process to process); a .json/.jsonl file with its duration fields as <N>; a .md file with the cells
of a column named like a duration ("wall s") as <N>; a .log file with its line timestamps and rates as <N>. The file's
line says which was done. Everything else is compared byte for byte.

Which gistcache: whatever `import gistcache` finds. To run it against another checkout without installing it:

    git worktree add /tmp/cli-before BASE
    cd /tmp/cli-before && PYTHONPATH=/tmp/cli-before python /work/main/tests/cli_transcript.py /tmp/before.txt

PYTHONPATH puts /tmp/cli-before/gistcache ahead of the editable install; the installed editable finder would still
map gistcache.cli, gistcache.train and gistcache.eval to the installed checkout's cli/, train/ and eval/ (it comes
after the path finder, and those packages live outside gistcache/), so this script reads the package-dir table of
the pyproject.toml beside the imported gistcache and puts a finder first that maps those names to that checkout's
folders. It prints where each package was imported from on stderr and refuses to run when one comes from another
checkout. `make cli-transcript BASE=<commit>` does the above for BASE and for the working tree and diffs them.

GIST_TRANSCRIPT_KEEP=1 leaves the work folder in place afterwards (to look at the files). Not collected by pytest:
its name does not match test_*.py and it defines no test functions.
"""

from __future__ import annotations

import os
import sys

FIXED_ENV = {"COLUMNS": "80", "LINES": "40", "NO_COLOR": "1", "TERM": "dumb", "TZ": "UTC", "PYTHONHASHSEED": "0",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
DROPPED_ENV = ("GISTCACHE_DEBUG", "GISTCACHE_DATA", "FORCE_COLOR", "CLICOLOR_FORCE", "TERMINAL_WIDTH")

if __name__ == "__main__" and (any(os.environ.get(k) != v for k, v in FIXED_ENV.items())
                               or any(k in os.environ for k in DROPPED_ENV)):
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(FIXED_ENV)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import datetime as _dt  # noqa: E402
import fcntl  # noqa: E402
import hashlib  # noqa: E402
import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

PROMPT = "Reverse the word you are given"
PROMPTS = ["Reverse the word you are given", "Spell the word backwards, one letter a line",
           "Answer with the first letter of the word"]
FROZEN_NOW = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)
# durations and rates: their digits are replaced wherever they are printed or written
# a duration or a rate (train_seconds, tokens_per_second, wall_s, wall_s_total, ttft_s, runs_total_s, ...)
TIMING_KEY = r"[a-z_]*(?:seconds|_per_second|_s)(?:_[a-z]+)*"
# in JSON also the ratios of durations and the machine's load (gist bench cache)
JSON_TIMING = re.compile(rf'("(?:{TIMING_KEY}|[a-z_]*speedup[a-z_]*|loadavg[a-z0-9_]*)"\s*:\s*)'
                         r"(?:-?[0-9][0-9.eE+-]*|\[[\s0-9.eE+,-]*\])")


# --- which gistcache ----------------------------------------------------------------------------------------------

class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """gistcache.cli, gistcache.train, gistcache.eval -> the folders the checkout's pyproject.toml names."""

    def __init__(self, mapping: dict[str, Path]):
        self.mapping = mapping

    def find_spec(self, fullname, path=None, target=None):
        folder = self.mapping.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def package_dirs(text: str) -> dict[str, str]:
    """[tool.setuptools.package-dir] of a pyproject.toml (tomllib where there is one: Python >= 3.11)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the table is `"name" = "folder"` lines
        table = re.search(r"^\[tool\.setuptools\.package-dir\]\n((?:[^\[\n].*\n|\n)*)", text, flags=re.M)
        return dict(re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', table.group(1), flags=re.M)) if table else {}
    return tomllib.loads(text).get("tool", {}).get("setuptools", {}).get("package-dir", {})


def import_app():
    """The typer app of the gistcache that `import gistcache` finds, with its out-of-tree packages from the same
    checkout. Returns (app, checkout root)."""
    import gistcache

    root = Path(gistcache.__file__).resolve().parent.parent
    mapping = {}
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        dirs = package_dirs(pyproject.read_text())
        mapping = {name: (root / folder).resolve() for name, folder in dirs.items()
                   if name != "gistcache" and (root / folder / "__init__.py").is_file()}
    sys.meta_path.insert(0, _CheckoutFinder(mapping))
    from gistcache.cli.main import app

    for name in ["gistcache", *mapping]:
        module = sys.modules[name]
        where = Path(module.__file__).resolve()
        print(f"cli_transcript: {name} from {where}", file=sys.stderr)
        if root not in where.parents:
            raise SystemExit(f"cli_transcript: {name} comes from {where}, not from the checkout {root}")
    return app, root


# --- the fixed clock ----------------------------------------------------------------------------------------------

class FrozenDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return FROZEN_NOW if tz is None else FROZEN_NOW.astimezone(tz)

    @classmethod
    def utcnow(cls):
        return FROZEN_NOW.replace(tzinfo=None)


def freeze_clock() -> None:
    """Bind `datetime` to FrozenDatetime in every loaded gistcache module that imported the datetime class."""
    for name, module in list(sys.modules.items()):
        if name.startswith("gistcache") and getattr(module, "datetime", None) is _dt.datetime:
            module.datetime = FrozenDatetime


# --- normalization ------------------------------------------------------------------------------------------------

class Normalizer:
    def __init__(self, work: Path, root: Path):
        self.paths = [(str(work.resolve()), "<TMP>"), (str(work), "<TMP>"), (str(root), "<SRC>")]

    def __call__(self, text: str) -> str:
        for path, name in self.paths:
            text = text.replace(path, name)
        # JSON fields named like a duration or a rate
        text = JSON_TIMING.sub(r"\1<N>", text)
        # a table row or `key: value` line named like one: the value and the blanks that align it
        text = re.sub(rf"^(\W*{TIMING_KEY}\b[^\S\n]*[│|:=])[^\S\n]*[0-9][0-9.eE+-]*",
                      r"\1 <N>", text, flags=re.M)
        # progress bars (train, eval): rate, elapsed and time left
        text = re.sub(r"^[^\W\d].*━.* \d+/\d+ .*$", progress_line, text, flags=re.M)
        return text


def progress_line(m: re.Match) -> str:
    line = re.sub(r"[━╸╺╾╼]+", "<BAR>", m.group(0))  # its width is what the rate and times leave of the line
    line = re.sub(r"[0-9][0-9.]* (tok/s|it/s|s/it)", r"<N> \1", line)
    return re.sub(r"\b\d+:\d\d:\d\d\b", "<T>", line)


def file_digest(path: Path) -> str:
    """SHA-256 of the file, with what must vary taken out first (the line says what)."""
    data = path.read_bytes()
    note = ""
    if path.suffix == ".safetensors" and len(data) >= 8:
        # the header's __metadata__ is a Rust HashMap in safetensors: its key order changes from process to process
        n = int.from_bytes(data[:8], "little")
        try:
            header = json.loads(data[8:8 + n])
        except ValueError:
            header = None
        if isinstance(header, dict):
            data = json.dumps(header, sort_keys=True).encode() + b"\n" + data[8 + n:]
            note = " (header keys sorted)"
    elif path.suffix in (".json", ".jsonl"):
        data, n = re.subn(JSON_TIMING.pattern.encode(), rb"\1<N>", data)
        note = " (durations normalized)" if n else ""
    elif path.suffix == ".md":
        text, n = markdown_durations(data.decode("utf-8", "replace"))
        data, note = text.encode(), " (durations normalized)" if n else ""
    elif path.suffix == ".log":
        text = data.decode("utf-8", "replace")
        text, n1 = re.subn(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+", "<TIME>", text, flags=re.M)
        text, n2 = re.subn(r"(tokens/s|tok/s|seconds|wall_s)( *[:=]? *)[0-9][0-9.eE+-]*", r"\1\2<N>", text)
        data, note = text.encode(), " (times normalized)" if n1 + n2 else ""
    return hashlib.sha256(data).hexdigest() + note


def markdown_durations(text: str) -> tuple[str, int]:
    """The cells under a markdown table column named like a duration ('wall s', '... seconds') -> <N>."""
    out, cols, count = [], [], 0
    for line in text.split("\n"):
        if line.startswith("|"):
            cells = line.split("|")
            if not cols and not set(line) <= set("|- :"):
                cols = [i for i, c in enumerate(cells) if re.fullmatch(r"\s*(\w+ s|\w* ?seconds)\s*", c)]
            elif cols and not set(line) <= set("|- :"):
                for i in cols:
                    if i < len(cells) and re.search(r"\d", cells[i]):
                        cells[i], count = " <N> ", count + 1
                line = "|".join(cells)
        else:
            cols = []
        out.append(line)
    return "\n".join(out), count


def snapshot(work: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(work)): (file_digest(p), p.stat().st_mtime_ns)
            for p in sorted(work.rglob("*")) if p.is_file()}


def settle_mtimes(work: Path, before: dict, after: dict, step: int) -> None:
    """Every file a call wrote or touched gets the made-up mtime FROZEN_NOW + 60 s x the call's number: the store's
    last-use order (ls, prune) follows the calls, not the real clock (whose coarse ticks order the files of one call
    differently from run to run; files of one call tie, as the store's own listing order breaks the tie)."""
    when = FROZEN_NOW.timestamp() + 60 * step
    for name, (_, mtime) in after.items():
        if before.get(name, (None, None))[1] != mtime:
            os.utime(work / name, (when, when))


# --- the tiny run -------------------------------------------------------------------------------------------------

def build_tiny(work: Path) -> dict[str, Path]:
    """A tiny Llama folder, an untrained run of it (2 gist tokens), a version 1 cache file and data files."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from gistcache.config import GistConfig
    from gistcache.model import GistModel, fingerprint_model, load_base_model, load_tokenizer
    from tiny import VOCAB_SIZE, byte_tokenizer  # whichever path the checkout has it at

    model_dir, run_dir = work / "model", work / "run"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=3, pad_token_id=1)
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval().save_pretrained(model_dir)
    byte_tokenizer(True).save_pretrained(model_dir)

    base, tok = load_base_model(str(model_dir)), load_tokenizer(str(model_dir))
    fp = fingerprint_model(base)
    # save_pretrained: the run as save_run writes it, under a name every checkout has (issue 25 moved save_run)
    gm = GistModel(base, tok, 2, base_fingerprint=fp,
                   gist_config=GistConfig(model=str(model_dir), num_gist_tokens=2, tune="gist"))
    with torch.no_grad():
        gm.gist_embedding.copy_(torch.linspace(-1, 1, gm.gist_embedding.numel()).view_as(gm.gist_embedding))
    gm.save_pretrained(run_dir)

    files = {"model": model_dir, "run": run_dir}
    files["prompts"] = work / "prompts.jsonl"
    files["prompts"].write_text("".join(json.dumps({"instruction": p}) + "\n" for p in PROMPTS))
    files["split"] = work / "split.json"
    files["split"].write_text(json.dumps([
        {"instruction": "Reverse the word", "input": "stone", "output": "enots"},
        {"instruction": "Give the first letter", "input": "apple", "output": "a"},
        {"instruction": "Repeat the word twice", "input": "ab", "output": "ab ab"}], indent=1))
    files["tasks"] = work / "tasks.json"
    files["tasks"].write_text(json.dumps(
        [{"instruction": "Reverse the word", "input": w, "output": w[::-1], "source": "task_reverse"}
         for w in ("stone", "apple", "tree", "river")]
        + [{"instruction": "Give the first letter", "input": w, "output": w[0], "source": "task_first"}
           for w in ("cloud", "bread", "lamp")], indent=1))
    files["text"] = work / "notes.txt"
    files["text"].write_text("not a cache\n")
    files["v1"] = work / "v1.safetensors"
    try:
        write_version_1(run_dir, files["v1"])
    except Exception as exc:  # noqa: BLE001 -- an older or newer library: the transcript says so
        files["v1_error"] = f"{type(exc).__name__}: {exc}"
    return files


def write_version_1(run_dir: Path, path: Path) -> None:
    """The file format version 1 wrote for PROMPT with the run (`tiny.write_version_1`, as test_upgrade.py)."""
    from gistcache import compress, load_run
    from tiny import write_version_1 as write_v1

    freeze_clock()
    gm = load_run(str(run_dir))
    write_v1(compress(gm, PROMPT), gm, path)


# --- the calls ----------------------------------------------------------------------------------------------------

def help_paths(app) -> list[list[str]]:
    """[] for the app, then every group and command, depth first in the order click lists them."""
    import typer

    out = []

    def walk(cmd, path, parent=None):
        out.append(path)
        if hasattr(cmd, "list_commands"):  # a group (typer may vendor click: no isinstance(click.Group))
            ctx = cmd.context_class(cmd, info_name=path[-1] if path else "gist", parent=parent)
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), [*path, name], ctx)

    walk(typer.main.get_command(app), [])
    return out


def calls(w: Path, state: dict) -> list:
    """The CLI calls, in order, run in the work folder `w`: each a list of arguments, or a function of `state`
    (what earlier calls printed) giving one. Paths are relative to `w` except the store's and a few --out."""
    run, store, model, cache = "run", str(w / "store"), "model", "a.safetensors"
    gen = ["generate", "--run", run, "--cache", cache]

    def adopt(s):  # a store as an older gistcache left it: its entries, no marker file
        shutil.copytree(w / "store", w / "oldstore", ignore=shutil.ignore_patterns(".gistcache-store"))
        return ["cache", "adopt", "--store", "oldstore"]

    return [
        # train: a few steps of the smoke preset on the tiny model
        ["train", "--out", "trained", "--model", model, "--preset", "smoke", "--max-steps", "2", "--max-examples", "8",
         "--eval-examples", "4", "--tune", "gist", "--num-gist", "2", "--json"],
        ["train", "--out", str(w / "trained"), "--model", model, "--preset", "smoke", "--max-steps", "1",
         "--max-examples", "4", "--eval-examples", "2", "--tune", "gist", "--overwrite"],
        # compress: one instruction, a store hit, a file of instructions
        ["compress", PROMPT, "--run", run, "--store", store, "--out", str(w / cache)],
        ["compress", PROMPT, "--run", run, "--store", store, "--json"],
        ["compress", "--file", "prompts.jsonl", "--run", run, "--store", store, "--out", "batch", "--json"],
        ["compress", "--file", "prompts.jsonl", "--run", str(w / run), "--store", store, "--batch-size", "2"],
        # generate: from the file, from a prompt through the store, streamed, sampled, beside the full prompt
        [*gen, "--input", "stone", "--input", "ab", "--max-new-tokens", "6"],
        [*gen, "--input", "stone", "--input", "ab", "--max-new-tokens", "6", "--json"],
        ["generate", "--run", run, "--prompt", PROMPTS[1], "--store", store, "--input", "tree", "--max-new-tokens",
         "4", "--json"],
        [*gen, "--input", "stone", "--max-new-tokens", "5", "--stream"],
        [*gen, "--input", "stone", "--max-new-tokens", "5", "--do-sample", "--seed", "3", "--temperature", "0.8",
         "--top-k", "5", "--top-p", "0.9", "--json"],
        [*gen, "--input", "stone", "--max-new-tokens", "4", "--compare-full", PROMPT],
        [*gen, "--input", "stone", "--max-new-tokens", "4", "--compare-full", PROMPT, "--json"],
        # the store and cache files
        ["cache", "ls", "--store", store, "--json"],
        ["cache", "ls", "--store", store],
        ["cache", "verify", cache],
        ["cache", "verify", cache, "--run", run, "--store", store, "--json"],
        ["cache", "verify", cache, "notes.txt", "--run", run, "--store", store],
        ["cache", "verify", "v1.safetensors", "--run", run, "--store", store, "--json"],
        ["cache", "upgrade", "v1.safetensors", "--run", run],
        ["cache", "upgrade", "v1.safetensors", "--run", run, "--json"],
        ["cache", "verify", "v1.safetensors", "--run", run, "--store", store],
        adopt,
        ["cache", "adopt", "--store", "oldstore"],
        ["cache", "ls", "--store", "oldstore", "--json"],
        lambda s: ["cache", "rm", s.get("first_key", "no-key-seen")[:12], "--store", store],
        ["cache", "prune", "--max-bytes", "1K", "--store", store, "--json"],
        ["cache", "prune", "--max-bytes", "0", "--store", "oldstore"],
        ["cache", "ls", "--store", store, "--json"],
        # export, eval, attention, data builders
        ["export", "--run", run, "--out", "export", "--json"],
        ["export", "--run", run, "--out", str(w / "export")],
        ["eval", "--run", run, "--split", "split.json", "--limit", "2", "--max-new-tokens", "4", "--batch-size", "2",
         "--flops-examples", "1", "--device", "cpu", "--out", "eval", "--json"],
        ["eval", "--run", run, "--split", "split.json", "--limit", "3", "--max-new-tokens", "3", "--baseline", "full",
         "--baseline", "truncate", "--flops-examples", "0", "--device", "cpu", "--out", str(w / "eval2")],
        ["attention", "--model", model, "--num-gist", "2", "--examples", "2", "--json"],
        ["attention", "--model", model, "--examples", "1", "--seed", "2", "--template", "plain"],
        ["bench", "cache", "--model", model, "--lengths", "16,32", "--repeats", "1", "--new-tokens", "2",
         "--threads", "1", "--json"],
        ["data", "long", "--out", "long.json", "--num", "3"],
        ["data", "long", "--out", "long-held.json", "--num", "2", "--held-out", "--seed", "1"],
        ["data", "kshot", "tasks.json", "--out", "kshot.json", "--model", model, "--max-prompt-tokens", "200",
         "--json"],
        ["data", "kshot", "tasks.json", "--out", "kshot2.json", "--model", model, "--max-prompt-tokens", "200",
         "--per-task", "1", "--shuffle", "1", "--max-shots", "2"],
        # bad input: one line, exit code 2
        [],
        ["frobnicate"],
        ["compress", "--bogus-flag"],
        ["compress", "  ", "--run", run, "--store", store],
        ["compress", PROMPT, "--run", "norun", "--store", store],
        ["compress", PROMPT, "--run", str(w / "norun"), "--store", store],
        ["compress", "--run", run, "--store", store],
        ["compress", PROMPT, "--run", run, "--store", store, "--out", "prompts.jsonl"],
        ["generate", "--run", run, "--input", "x"],
        ["generate", "--run", run, "--cache", "missing.safetensors", "--input", "x"],
        [*gen, "--input", "x", "--temperature", "0"],
        [*gen, "--input", "x", "--dtype", "int8"],
        [*gen, "--input", "x", "--stream", "--json"],
        [*gen, "--input", "x", "--compare-full", "another instruction"],
        ["generate", "--run", run, "--cache", "notes.txt", "--input", "x"],
        ["cache", "verify", "notes.txt"],
        ["cache", "rm", "abcdef", "--store", store],
        ["cache", "prune", "--max-bytes", "lots", "--store", store],
        ["cache", "verify", cache, "--atol", "-1"],
        ["cache", "upgrade", "missing.safetensors", "--run", run],
        ["train", "--out", "x", "--num-gist", "0"],
        ["train", "--out", "x", "--preset", "huge"],
        ["train", "--out", "x", "--data", "none.json"],
        ["eval", "--run", "norun", "--split", "split.json"],
        ["eval", "--run", run, "--split", "none.json", "--out", "eval3"],
        ["export", "--run", "norun", "--out", "e2"],
        ["data", "long", "--out", "l.json", "--num", "0"],
        ["data", "kshot", "none.json", "--out", "k.json", "--model", model],
        ["bench", "cache", "--repeats", "0"],
        ["bench", "cache", "--lengths", "128", "big"],
        ["serve", "--run", run, "--dtype", "int8"],
        ["attention", "--run", "norun"],
        ["attention", "--run", run, "--examples", "2"],
    ]


def invoke(runner, app, args: list[str]):
    import torch

    freeze_clock()
    torch.manual_seed(0)
    result = runner.invoke(app, args, prog_name="gist")
    try:
        stdout, stderr = result.stdout, result.stderr
    except ValueError:  # click < 8.2 mixes stderr into stdout unless asked not to
        stdout, stderr = result.output, ""
    exc = result.exception
    error = None if exc is None or isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
    return result.exit_code, stdout, stderr, error


def block(norm, title: str, args: list[str], code: int, stdout: str, stderr: str, error: str | None,
          files: list[str] = ()) -> str:
    lines = [f"=== {title}", "argv: gist " + " ".join(_quote(a) for a in args), f"exit: {code}"]
    if error:
        lines.append(f"exception: {error}")
    lines.append("--- stdout")
    lines.append(stdout.rstrip("\n"))
    lines.append("--- stderr")
    lines.append(stderr.rstrip("\n"))
    if files:
        lines.append("--- files")
        lines.extend(files)
    text = "\n".join(lines) + "\n"
    return norm(text)


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./:=@,+-]+", arg) else json.dumps(arg)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out_path = Path(argv[0]).resolve()
    work = Path(tempfile.gettempdir()) / "gist-cli-transcript"
    with open(f"{work}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return transcript(out_path, work)
        finally:
            if os.environ.get("GIST_TRANSCRIPT_KEEP") != "1":
                shutil.rmtree(work, ignore_errors=True)


def transcript(out_path: Path, work: Path) -> int:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["GISTCACHE_HOME"] = str(work / "home")
    os.environ["XDG_CACHE_HOME"] = str(work / "xdg")
    app, root = import_app()
    import torch
    from typer.testing import CliRunner

    torch.set_num_threads(1)
    norm = Normalizer(work, root)
    runner = CliRunner()
    parts = []

    pages = help_paths(app)
    for path in pages:
        args = [*path, "--help"]
        code, stdout, stderr, error = invoke(runner, app, args)
        parts.append(block(norm, "help " + (" ".join(path) or "gist"), args, code, stdout, stderr, error))

    freeze_clock()
    files = build_tiny(work)
    settle_mtimes(work, {}, snapshot(work), 0)
    if "v1_error" in files:
        parts.append(f"=== setup\nversion 1 cache file not written: {norm(files['v1_error'])}\n")
    state: dict = {}
    planned = calls(work, state)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for i, call in enumerate(planned, 1):
            args = call(state) if callable(call) else call
            before = snapshot(work)  # taken after a step's own setup (adopt's copy): only the call's writes
            code, stdout, stderr, error = invoke(runner, app, args)
            after = snapshot(work)
            settle_mtimes(work, before, after, i)
            changed = [f"{name}  {after[name][0]}" for name in sorted(after)
                       if before.get(name, (None,))[0] != after[name][0]]
            changed += [f"{name}  removed" for name in sorted(before) if name not in after]
            parts.append(block(norm, f"call {i}", args, code, stdout, stderr, error, changed))
            if "first_key" not in state and args[:1] == ["compress"] and "--json" in args and code == 0:
                try:
                    state["first_key"] = json.loads(stdout)["key"]
                except (ValueError, KeyError, TypeError):
                    pass
    finally:
        os.chdir(cwd)
    out_path.write_text("".join(parts), encoding="utf-8", errors="backslashreplace")
    print(f"cli_transcript: {len(pages)} help pages and {len(planned)} calls -> {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
