"""The catalogue of bad command lines: every verb, each refusal one line and exit code 2, nothing on disk touched.

Each case runs `gist ...` in process (typer's CliRunner) and asserts: exit code 2, exactly one non-empty
line of output (stdout and stderr together), no traceback, the line names what is wrong, and every file
that existed before the call (the shared models, runs, caches and store, and the case's own folder) is
byte-identical after it, with no temporary file left behind. Read-only and full disks are simulated in
process (`Disk`); permission bits are real, and those cases are skipped where they do not stop the tests
(root). A Hugging Face id is tried with the hub unreachable (`Ctx.without_network`).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import safetensors.torch
from safetensors import SafetensorError
from typer.testing import CliRunner

import tiny
from gistcache.cache import save_cache
from gistcache.cli.main import app
from gistcache.inference.compression import compress
from gistcache.model import load_run
from gistcache.store import CacheStore, compress_cached

runner = CliRunner()
PROMPT = "Reverse the word you are given"


def permission_bits_bind() -> bool:
    """Whether a folder without write permission stops this process (root, with its usual capabilities,
    ignores the bits: os.geteuid() == 0 alone would also skip a root without them)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o555)
        try:
            open(os.path.join(tmp, "probe"), "w").close()
            return False
        except PermissionError:
            return True
        finally:
            os.chmod(tmp, 0o755)


needs_permission_bits = pytest.mark.skipif(not permission_bits_bind(), reason="permission bits do not stop root")


# its own model and runs, not the session's: every case checks that no file under this one root changed
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What the cases read: a tiny base model, a gist-only and a LoRA run on it (untrained), a cache file, a store."""
    root = tmp_path_factory.mktemp("bad-cli")
    model = tiny.save_model_folder(root / "model", "llama")
    runs = {tune: root / f"run-{tune}" for tune in ("gist", "lora")}
    for tune, run in runs.items():
        tiny.save_run_folder(model, run, 2, tune=tune, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    gist_model = load_run(runs["gist"])
    save_cache(compress(gist_model, PROMPT), root / "cache.safetensors")
    key = compress_cached(gist_model, PROMPT, CacheStore(root / "store"))[0].key
    return {"root": root, "model": model, "run": runs["gist"], "lora": runs["lora"],
            "cache": root / "cache.safetensors", "store": root / "store", "key": key}


class Disk:
    """Every write under `root` fails as the kernel fails it on a read-only (EROFS) or full (ENOSPC) disk.

    Creating, opening for writing, renaming, removing and touching files under `root` raise `code`,
    in this process only, through every door the code uses: Python's open, os, pathlib, shutil and
    safetensors' own writer. A full disk still lets files be removed and renamed, and its write errors
    carry no file name, as the kernel's do.
    """

    def __init__(self, monkeypatch, root: Path, code: int):
        self.root, self.code = os.path.realpath(root), code
        self.full = code == errno.ENOSPC
        real = {name: getattr(os, name) for name in ("open", "mkdir", "rename", "replace", "unlink", "remove",
                                                      "rmdir", "utime", "access")}
        real_open, real_rmtree, real_serialize = io.open, shutil.rmtree, safetensors.torch.serialize_file

        def guard(name, check=lambda *a, **k: True):
            def fake(path, *args, **kwargs):
                if self.inside(path) and check(*args, **kwargs):
                    self.deny(path, named=name != "open")
                return real[name](path, *args, **kwargs)
            return fake

        def writing(flags, *args, **kwargs) -> bool:
            return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))

        monkeypatch.setattr(os, "open", guard("open", writing))
        monkeypatch.setattr(os, "mkdir", guard("mkdir"))
        if not self.full:
            for name in ("rename", "replace", "unlink", "remove", "rmdir", "utime"):
                monkeypatch.setattr(os, name, guard(name))

            def rmtree(path, *args, **kwargs):
                if self.inside(path):
                    self.deny(path)
                return real_rmtree(path, *args, **kwargs)

            monkeypatch.setattr(shutil, "rmtree", rmtree)
            monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (
                False if self.inside(path) and mode & os.W_OK else real["access"](path, mode, *a, **k)))

        def fake_open(file, mode="r", *args, **kwargs):
            if self.inside(file) and any(c in mode for c in "wax+"):
                self.deny(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr("builtins.open", fake_open)

        def serialize_file(tensors, filename, *args, **kwargs):
            if self.inside(filename):
                raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code}) "
                                      f"at path \"{filename}\"")
            return real_serialize(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)

    def inside(self, path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.realpath(os.fsdecode(path))
        return path == self.root or path.startswith(self.root + os.sep)

    def deny(self, path, named: bool = False):
        if self.full and not named:  # the write fails, not the open: no file name
            raise OSError(self.code, os.strerror(self.code))
        raise OSError(self.code, os.strerror(self.code), os.fsdecode(path))


SPLIT = json.dumps([{"instruction": "Repeat the word.", "input": "stone", "output": "stone"}])


@dataclass
class Ctx:
    """One case's view: the shared world, its own folder, and helpers that build bad inputs there."""

    w: dict
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    disks: list = field(default_factory=list)  # (folder, errno) simulated during the call
    chmods: list = field(default_factory=list)  # folders whose permission bits are put back after it

    def __getattr__(self, name):
        if name in self.w:
            return self.w[name]
        raise AttributeError(name)

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def copy(self, source: Path, name: str) -> Path:
        dest = self.tmp / name
        shutil.copytree(source, dest) if source.is_dir() else shutil.copy2(source, dest)
        return dest

    def run_with_config(self, edit) -> Path:
        """A copy of the LoRA run whose config.json `edit` changed (edit takes and returns the parsed JSON)."""
        run = self.copy(self.lora, "bad-run")
        data = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(edit(data)))
        return run

    def run_with_file(self, name: str, change) -> Path:
        """A copy of the LoRA run whose file `name` holds `change(bytes)`."""
        run = self.copy(self.lora, "bad-run")
        (run / name).write_bytes(change((run / name).read_bytes()))
        return run

    def read_only(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        self.disks.append((path, errno.EROFS))
        return path

    def full(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        self.disks.append((path, errno.ENOSPC))
        return path

    def chmod(self, path: Path, mode: int) -> Path:
        path.chmod(mode)
        self.chmods.append(path)
        return path

    def model_with_truncated_weights(self) -> Path:
        model = self.copy(self.model, "model")
        (model / "model.safetensors").write_bytes(truncated((model / "model.safetensors").read_bytes()))
        return model

    def without_network(self, *args) -> list:
        """`args`, to be run with the hub unreachable and offline mode not set (the test session sets it)."""
        import huggingface_hub.constants

        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                     "http_proxy", "ALL_PROXY", "all_proxy"):
            self.monkeypatch.delenv(name, raising=False)
        self.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        self.monkeypatch.setattr("gistcache.cli.offline.hub_reachable", lambda timeout=0: False)
        return list(args)


def non_utf8(c: Ctx, name: str = "latin1.json") -> Path:
    return c.file(name, b'[{"instruction": "Traduis en fran\xe7ais", "input": "caf\xe9", "output": "x"}]\n')


def truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


TRAIN = ["train", "--preset", "smoke", "--max-steps", "1", "--max-examples", "8", "--eval-examples", "4",
         "--batch-size", "2"]


def case(name: str, build, expected: str, *, permission_bits: bool = False):
    """A bad command line: `build(ctx)` gives its arguments, `expected` is text its one line must hold."""
    return pytest.param(build, expected, id=name, marks=[needs_permission_bits] if permission_bits else [])


CASES = [
    # --- usage errors: typer's box becomes one line -----------------------------------------------------
    case("root-unknown-verb", lambda c: ["bogus"], "No such command 'bogus'"),
    case("root-unknown-option", lambda c: ["--bogus"], "No such option"),
    case("train-lr-not-a-number", lambda c: ["train", "--out", c.tmp / "r", "--lr", "fast"], "'--lr'"),
    case("train-missing-out", lambda c: ["train"], "Missing option '--out'"),
    case("generate-missing-input", lambda c: ["generate", "--cache", c.cache], "Missing option '--input'"),
    case("compress-batch-size-word", lambda c: ["compress", PROMPT, "--batch-size", "eight"], "'--batch-size'"),
    case("eval-limit-word", lambda c: ["eval", "--run", c.run, "--limit", "all"], "'--limit'"),
    case("cache-unknown-verb", lambda c: ["cache", "show", "abc"], "No such command 'show'"),
    case("cache-rm-missing-key", lambda c: ["cache", "rm"], "Missing argument"),
    case("bench-repeats-word", lambda c: ["bench", "cache", "--repeats", "many"], "'--repeats'"),
    case("attention-examples-word", lambda c: ["attention", "--examples", "x"], "'--examples'"),
    # --- train ------------------------------------------------------------------------------------------
    case("train-num-gist-0", lambda c: [*TRAIN, "--out", c.tmp / "r", "--model", c.model, "--num-gist", "0"],
     "--num-gist"),
    case("train-shipped-preset-gist-only", lambda c: ["train", "--out", c.tmp / "r", "--model", c.model, "--preset",
                                                  "shipped", "--tune", "gist"], "--preset shipped sets --decoder base"),
    case("train-data-not-utf8", lambda c: [*TRAIN, "--out", c.tmp / "r", "--model", c.model, "--data", non_utf8(c)],
     "not UTF-8"),
    case("train-data-bad-json", lambda c: [*TRAIN, "--out", c.tmp / "r", "--model", c.model,
                                       "--data", c.file("d.json", '[{"instruction": "x",')], "d.json"),
    case("train-out-is-a-file", lambda c: [*TRAIN, "--out", c.file("r", "x"), "--model", c.model], "is a file"),
    case("train-out-parent-is-a-file", lambda c: [*TRAIN, "--out", c.file("f", "x") / "r", "--model", c.model],
     "is a file, not a folder"),
    case("train-out-read-only", lambda c: [*TRAIN, "--out", c.read_only(c.tmp / "ro") / "r", "--model", c.model],
     "not writable"),
    case("train-out-no-permission", lambda c: [*TRAIN, "--out", c.chmod(c.folder("locked"), 0o555) / "r",
                                                       "--model", c.model], "not writable", permission_bits=True),
    case("train-out-full-disk", lambda c: [*TRAIN, "--out", c.full(c.tmp / "full") / "r", "--model", c.model],
     "no space left"),
    case("train-model-truncated", lambda c: [*TRAIN, "--out", c.tmp / "r", "--model",
                                             c.model_with_truncated_weights()], "cannot load model"),
    case("train-hub-id-offline", lambda c: c.without_network(*TRAIN, "--out", c.tmp / "r", "--model",
                                                             "someorg/no-such-model"), "offline"),
    # --- compress ---------------------------------------------------------------------------------------
    case("compress-run-gist-null", lambda c: ["compress", PROMPT, "--run", c.run_with_config(lambda d: {**d, "gist": None}),
                                          "--store", c.tmp / "s"], "'gist' is null"),
    case("compress-run-lora-r-text", lambda c: ["compress", PROMPT, "--run", c.run_with_config(
        lambda d: {**d, "gist": {**d["gist"], "lora_r": "8"}}), "--store", c.tmp / "s"], "'lora_r' is text"),
    case("compress-run-num-gist-float", lambda c: ["compress", PROMPT, "--run", c.run_with_config(
        lambda d: {**d, "gist": {**d["gist"], "num_gist_tokens": 2.5}}), "--store", c.tmp / "s"], "whole number"),
    case("compress-run-targets-not-list", lambda c: ["compress", PROMPT, "--run", c.run_with_config(
        lambda d: {**d, "gist": {**d["gist"], "lora_target_modules": "q_proj"}}), "--store", c.tmp / "s"],
     "'lora_target_modules' is text"),
    case("compress-run-config-a-list", lambda c: ["compress", PROMPT, "--run", c.run_with_config(lambda d: [d]),
                                              "--store", c.tmp / "s"], "not a JSON object"),
    case("compress-run-config-not-utf8", lambda c: ["compress", PROMPT, "--run", c.run_with_file(
        "config.json", lambda b: b.replace(b'"gist"', b'"gist\xff"', 1)), "--store", c.tmp / "s"], "not UTF-8"),
    case("compress-run-fingerprint-number", lambda c: ["compress", PROMPT, "--run", c.run_with_config(
        lambda d: {**d, "base_fingerprint": 7}), "--store", c.tmp / "s"], "'base_fingerprint' is a whole number"),
    case("compress-run-gist-embedding-truncated", lambda c: ["compress", PROMPT, "--run", c.run_with_file(
        "gist_embedding.safetensors", truncated), "--store", c.tmp / "s"], "gist_embedding.safetensors"),
    case("compress-run-adapter-truncated", lambda c: ["compress", PROMPT, "--run", c.run_with_file(
        "adapter_model.safetensors", truncated), "--store", c.tmp / "s"], "adapter_model.safetensors"),
    case("compress-run-adapter-config-broken", lambda c: ["compress", PROMPT, "--run", c.run_with_file(
        "adapter_config.json", lambda b: b[:20]), "--store", c.tmp / "s"], "adapter"),
    case("compress-file-not-utf8", lambda c: ["compress", "--file", c.file("p.jsonl", b'{"instruction": "caf\xe9"}\n'),
                                          "--run", c.run, "--store", c.tmp / "s"], "not UTF-8"),
    case("compress-device-tpu", lambda c: ["compress", PROMPT, "--run", c.run, "--device", "tpu", "--store", c.tmp / "s"],
     "--device 'tpu'"),
    case("compress-out-is-a-folder", lambda c: ["compress", PROMPT, "--run", c.run, "--out", c.folder("o"),
                                            "--store", c.tmp / "s"], "is a folder"),
    case("compress-out-run-config", lambda c: ["compress", PROMPT, "--run", c.run, "--out", c.run / "config.json",
                                           "--store", c.tmp / "s"], "not a gist cache"),
    case("compress-out-other-file", lambda c: ["compress", PROMPT, "--run", c.run, "--out", c.file("notes.txt", "mine"),
                                           "--store", c.tmp / "s"], "--overwrite"),
    case("compress-out-parent-is-a-file", lambda c: ["compress", PROMPT, "--run", c.run, "--out",
                                                 c.file("f", "x") / "c.safetensors", "--store", c.tmp / "s"],
     "is a file, not a folder"),
    case("compress-out-read-only", lambda c: ["compress", PROMPT, "--run", c.run, "--out",
                                          c.read_only(c.tmp / "ro") / "c.safetensors", "--store", c.tmp / "s"],
     "not writable"),
    case("compress-out-no-permission", lambda c: [
        "compress", PROMPT, "--run", c.run, "--out", c.chmod(c.folder("locked"), 0o555) / "c.safetensors",
        "--store", c.tmp / "s"], "not writable", permission_bits=True),
    case("compress-out-full-disk", lambda c: ["compress", PROMPT, "--run", c.run, "--out",
                                          c.full(c.tmp / "full") / "c.safetensors", "--store", c.tmp / "s"],
     "no space left"),
    case("compress-store-parent-is-a-file", lambda c: ["compress", PROMPT, "--run", c.run, "--store",
                                                   c.file("f", "x") / "store"], "is a file, not a folder"),
    case("compress-store-read-only", lambda c: ["compress", PROMPT, "--run", c.run, "--store",
                                            c.read_only(c.tmp / "ro") / "store"], "read-only"),
    case("compress-store-full-disk", lambda c: ["compress", PROMPT, "--run", c.run, "--store",
                                            c.full(c.tmp / "full") / "store"], "no space left"),
    case("compress-file-out-full-disk", lambda c: ["compress", "--file", c.file("p.jsonl", '"Add one"\n"Sort it"\n'),
                                               "--run", c.run, "--store", c.tmp / "s",
                                               "--out", c.full(c.tmp / "full") / "out"], "no space left"),
    # --- generate ---------------------------------------------------------------------------------------
    case("generate-cache-truncated", lambda c: ["generate", "--run", c.run, "--input", "x", "--cache", c.file(
        "c.safetensors", truncated(c.cache.read_bytes()))], "c.safetensors"),
    case("generate-cache-not-safetensors", lambda c: ["generate", "--run", c.run, "--input", "x", "--cache",
                                                  c.file("c.safetensors", "hello")], "c.safetensors"),
    case("generate-cache-is-a-folder", lambda c: ["generate", "--run", c.run, "--input", "x", "--cache",
                                              c.folder("c.safetensors")], "c.safetensors"),
    case("generate-run-gist-null", lambda c: ["generate", "--input", "x", "--cache", c.cache, "--run",
                                          c.run_with_config(lambda d: {**d, "gist": None})], "'gist' is null"),
    case("generate-store-parent-is-a-file", lambda c: ["generate", "--run", c.run, "--input", "x", "--prompt", "Sort it",
                                                   "--store", c.file("f", "x") / "store"], "is a file, not a folder"),
    case("generate-device-tpu", lambda c: ["generate", "--run", c.run, "--input", "x", "--cache", c.cache,
                                       "--device", "tpu"], "--device 'tpu'"),
    # --- eval -------------------------------------------------------------------------------------------
    case("eval-split-not-utf8", lambda c: ["eval", "--run", c.run, "--split", non_utf8(c), "--out", c.tmp / "e"],
     "not UTF-8"),
    # a split file of its own: the shared data folder may not sit beside a clean clone (CI)
    case("eval-out-parent-is-a-file", lambda c: ["eval", "--run", c.run, "--split", c.file("split.json", SPLIT),
                                             "--out", c.file("f", "x") / "e"], "is a file, not a folder"),
    case("eval-out-read-only", lambda c: ["eval", "--run", c.run, "--split", c.file("split.json", SPLIT), "--out",
                                      c.read_only(c.tmp / "ro") / "e"], "not writable"),
    case("eval-run-lora-r-text", lambda c: ["eval", "--run", c.run_with_config(
        lambda d: {**d, "gist": {**d["gist"], "lora_r": "8"}}), "--split", "seen", "--out", c.tmp / "e"],
     "'lora_r' is text"),
    case("eval-device-tpu", lambda c: ["eval", "--run", c.run, "--device", "tpu", "--out", c.tmp / "e"], "--device"),
    # --- cache ------------------------------------------------------------------------------------------
    case("cache-ls-store-is-a-file", lambda c: ["cache", "ls", "--store", c.file("store", "x")], "is a file"),
    case("cache-rm-read-only-store", lambda c: ["cache", "rm", c.key[:12], "--store", c.read_only(
        c.copy(c.store, "store"))], "read-only"),
    case("cache-rm-no-permission", lambda c: ["cache", "rm", c.key[:12], "--store", c.chmod(
        c.copy(c.store, "store"), 0o555)], "permission denied", permission_bits=True),
    case("cache-prune-no-permission", lambda c: ["cache", "prune", "--max-bytes", "0", "--store", c.chmod(
        c.copy(c.store, "store"), 0o555)], "permission denied", permission_bits=True),
    case("cache-prune-read-only-store", lambda c: ["cache", "prune", "--max-bytes", "0", "--store", c.read_only(
        c.copy(c.store, "store"))], "read-only"),
    case("cache-rm-store-is-a-file", lambda c: ["cache", "rm", c.key[:12], "--store", c.file("store", "x")],
         "is a file"),
    case("cache-upgrade-not-a-cache", lambda c: ["cache", "upgrade", c.file("x.safetensors", "hello"), "--run", c.run],
     "x.safetensors"),
    case("cache-upgrade-run-gist-null", lambda c: ["cache", "upgrade", c.copy(c.cache, "c.safetensors"), "--run",
                                               c.run_with_config(lambda d: {**d, "gist": None})], "'gist' is null"),
    # --- bench, attention -------------------------------------------------------------------------------
    case("bench-device-tpu", lambda c: ["bench", "cache", "--model", c.model, "--device", "tpu", "--lengths", "8"],
     "--device 'tpu'"),
    case("bench-out-parent-is-a-file", lambda c: ["bench", "cache", "--model", c.model, "--lengths", "8",
                                              "--out", c.file("f", "x") / "b.json"], "is a file, not a folder"),
    case("bench-model-hub-id-offline", lambda c: c.without_network("bench", "cache", "--model",
                                                                   "someorg/no-such-model", "--lengths", "8"),
         "offline"),
    case("attention-data-not-utf8", lambda c: ["attention", "--model", c.model, "--data", non_utf8(c)], "not UTF-8"),
    case("attention-run-gist-null", lambda c: ["attention", "--run", c.run_with_config(lambda d: {**d, "gist": None})],
     "'gist' is null"),
    case("attention-model-truncated", lambda c: ["attention", "--model", c.model_with_truncated_weights()],
         "cannot load model"),
    # --- compare ----------------------------------------------------------------------------------------
    case("compare-not-an-eval-folder", lambda c: ["compare", c.tmp, c.tmp], "no predictions.jsonl"),
    case("compare-predictions-not-utf8", lambda c: ["compare", c.file("e/predictions.jsonl", b'{"a": "\xe9"}\n').parent,
                                                    c.tmp], "not UTF-8"),
]


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: SHA-256} of every file under `roots` (symbolic links left out)."""
    return {str(root / rel): digest for root in roots
            for rel, digest in tiny.folder_digest(root, follow_symlinks=False).items()}


@pytest.mark.parametrize("build,expected", CASES)
def test_bad_command_line(build, expected, world, tmp_path, monkeypatch):
    """One line, exit code 2, no traceback, the line names the problem, every file before it unchanged."""
    ctx = Ctx(world, tmp_path, monkeypatch)
    args = [str(a) for a in build(ctx)]
    before = snapshot(world["root"], tmp_path)
    try:
        with monkeypatch.context() as patch:
            for path, code in ctx.disks:
                Disk(patch, path, code)
            started = time.perf_counter()
            result = runner.invoke(app, args)
            seconds = time.perf_counter() - started
    finally:
        for path in ctx.chmods:
            path.chmod(0o755)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert expected in lines[0], lines[0]
    after = snapshot(world["root"], tmp_path)
    assert {p: after.get(p) for p in before} == before, "a file present before the call was changed or removed"
    assert not [p for p in after if ".tmp" in Path(p).name], "a temporary file was left behind"
    assert seconds < 20, f"{seconds:.1f} s to refuse"


def test_offline_mode_is_scoped(monkeypatch):
    """The offline switch for an unreachable hub is put back after the call."""
    import huggingface_hub.constants

    from gistcache.cli.offline import hub_offline_unless_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("gistcache.cli.offline.hub_reachable", lambda timeout=0: False)
    with hub_offline_unless_reachable(["someorg/model"]) as offline:
        assert offline and huggingface_hub.constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ
    with hub_offline_unless_reachable(["smollm2-135m", "/a/folder", "m.gguf"]) as offline:
        assert not offline


def test_bug_is_one_line_exit_1(monkeypatch):
    """An exception no refusal expects is a bug: one line that says so, exit code 1, no traceback."""
    monkeypatch.setattr("gistcache.store.CacheStore.entries", lambda self: 1 / 0)
    result = runner.invoke(app, ["cache", "ls", "--store", "/nonexistent-store"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "ZeroDivisionError" in lines[0] and "GISTCACHE_DEBUG" in lines[0]


def test_out_replaces_a_cache_and_overwrite_any_file(world, tmp_path):
    """`compress --out` replaces a gist cache already there; another file only with --overwrite."""
    from gistcache.cache import load_cache

    store = tmp_path / "store"
    cache = Path(shutil.copy(world["cache"], tmp_path / "c.safetensors"))
    result = runner.invoke(app, ["compress", "Sort it", "--run", str(world["run"]), "--out", str(cache),
                                 "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    assert load_cache(cache).prompt_sha256 != load_cache(world["cache"]).prompt_sha256
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = runner.invoke(app, ["compress", "Sort it", "--run", str(world["run"]), "--out", str(notes),
                                 "--store", str(store), "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert load_cache(notes).prompt_sha256 == load_cache(cache).prompt_sha256
