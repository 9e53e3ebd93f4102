"""A new user's first hour, through the real commands (subprocesses): build progress and one report per stage,
plan verdicts whose hints work, `run` argument checks and labelled output, strict `inspect --json`, `serve`'s
banner / throughput line / address errors, `chat --emulate`, `dsv4c doctor`, one error style everywhere
(`error (<meaning>, exit N): <cause>` on the first stderr line, no traceback), and a README whose references
resolve inside the repository.

Artifact: one fresh tiny-cpu build in a private stage cache (its `--events json` output is also what the
"each stage once" test reads), so a warm shared cache cannot hide a lazy stage reported twice.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["resolve", "plan", "load", "quantize", "export", "lower", "build", "validate", "package"]


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4c.compiler.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, input=stdin, timeout=600)


def assert_one_line_error(done: subprocess.CompletedProcess, code: int, cause: str) -> None:
    """The documented exit code, the cause on the first stderr line, no traceback."""
    assert done.returncode == code, done.stderr
    first = done.stderr.splitlines()[0]
    assert first.startswith("error (") and f"exit {code}): " in first, done.stderr
    assert re.search(cause, first), first
    assert "Traceback" not in done.stderr


def stage_events(stdout: str) -> list[tuple[str, str]]:
    return [(e["stage"], e["status"]) for e in map(json.loads, stdout.splitlines()) if e.get("event") == "stage"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ux-cache")


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory, cache) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ux") / "tiny-cpu"
    done = cli("build", "recipes/tiny-cpu.yaml", "-o", str(out), "--events", "json", "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.fixture(scope="module")
def artifact(fresh_build) -> Path:
    return fresh_build[0]


# ---- build ------------------------------------------------------------------------------------------------------
def test_a_cold_build_reports_every_stage_exactly_once(fresh_build):
    """quantize and export are lazy: they used to report "done" when skipped past and again when they ran."""
    events = stage_events(fresh_build[1].stdout)
    assert [s for s, _ in events] == STAGES, events
    assert dict(events)["quantize"] == dict(events)["export"] == "done"
    others = [e for e in map(json.loads, fresh_build[1].stdout.splitlines()) if e.get("event") != "stage"]
    assert [e["event"] for e in others] == ["artifact"]  # --events json: no progress events added


def test_a_long_stage_prints_progress_lines_when_not_a_tty(artifact, cache, tmp_path):
    """A lowering that is not cached (another target, same model): plain progress lines on stderr, each stage
    line once."""
    done = cli("build", "recipes/tiny-cpu.yaml", "--set", "target.kind=tensorrt", "--set", "target.arch=sm_100",
               "--until", "lower", "-o", str(tmp_path / "b"), "--cache-dir", str(cache),
               env={"DSV4C_PROGRESS_EVERY_S": "1"})
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("running lower: ")]
    assert progress and "\r" not in done.stderr and "\x1b" not in done.stderr
    assert re.fullmatch(r"running lower: \d+ s( \([\w ]+\))?(, [\d.]+ (B|KB|MB|GB) written)?", progress[-1]), progress
    assert any("written" in line for line in progress)
    finished = [line.split()[1] for line in done.stderr.splitlines() if re.match(r"\s*(done|cached|skipped) ", line)]
    assert finished == STAGES[:6], done.stderr


def test_a_full_tensorrt_build_without_tensorrt_stops_before_loading(tmp_path):
    pytest.importorskip("torch")
    from dsv4c.targets.tensorrt.target import toolchain

    if toolchain()["tensorrt"] != "missing" and toolchain()["cuda_device"] != "missing":
        pytest.skip("TensorRT and a GPU are here")
    done = cli("build", "recipes/tiny-tensorrt.yaml", "-o", str(tmp_path / "e"), "--events", "json",
               "--cache-dir", str(tmp_path / "c"))
    assert_one_line_error(done, 4, r"TensorRT engine build needs the `tensorrt` Python package \(10\.9\+\)")
    assert stage_events(done.stdout) == [("resolve", "done")]  # refused in plan: no load, export or lower


# ---- plan -------------------------------------------------------------------------------------------------------
def plan_json(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    done = cli("plan", *args, "--json")
    return done, json.loads(done.stdout)


def test_a_blocked_build_is_infeasible_and_its_hint_works():
    """tiny on an Ascend 950 fits, but five V4 ops have no AscendC kernel yet: exit 3 naming them, and the hint's
    `--until lower` builds the ATC bundle (test_cann.py builds it)."""
    done, plan = plan_json("recipes/tiny-cpu.yaml", "--set", "target.kind=cann", "--set",
                           "target.soc_version=Ascend950")
    assert_one_line_error(done, 3, r"recipe 'tiny-cpu' fits its declared target, but this dsv4c cannot build it: "
                                   r"\d+ of \d+ dsv4 ops have no cann implementation")
    assert plan["fits"] is True and plan["feasible"] is False and plan["build_blockers"]
    assert plan["hints"] and "--until lower" in plan["hints"][0]


def test_a_multi_device_recipe_plans_one_rank_of_its_mesh():
    """tiny-tensorrt on 2 GPUs (tensor 2 x expert 2): feasible, the ops are the rank's (collectives and the
    head-partial indexer scores), and each rank holds less than the single-device engine."""
    done, mesh = plan_json("recipes/tiny-tensorrt.yaml", "--set", "target.devices_per_node=2")
    assert done.returncode == 0, done.stderr
    assert mesh["feasible"] and mesh["build_blockers"] == [] and mesh["hints"] == []
    assert {"all_reduce", "all_gather", "indexer_scores"} <= {o["op"] for o in mesh["ops"]}
    _, single = plan_json("recipes/tiny-tensorrt.yaml")
    assert not {"all_reduce", "all_gather", "indexer_scores"} & {o["op"] for o in single["ops"]}
    assert mesh["per_device"]["stages"][0]["weights"] < single["per_device"]["stages"][0]["weights"]


def test_plan_text_keeps_whole_texts_and_readable_counts():
    done = cli("plan", "recipes/tiny-cpu.yaml", env={"COLUMNS": "2000"})
    assert done.returncode == 0, done.stderr
    assert "tiny (6.88 M params" in done.stdout and "0.000 B" not in done.stdout
    assert done.stdout.rstrip().endswith("feasible")
    done = cli("plan", "recipes/flash-ascend910b.yaml", env={"COLUMNS": "2000"})
    assert done.returncode == 3
    from dsv4c.targets.cann.mapping import MAPPING

    longest = max((m.ascend910b for m in MAPPING.values() if m.status == "public"), key=len)
    assert len(longest) > 40 and longest in done.stdout  # used to be cut at 40 characters


# ---- run --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, cause", [
    (["--tokens", "5,99999"], r"--tokens: token id 99999 is outside the vocabulary \(0\.\.1023\)"),
    (["--tokens", "a,b"], r"--tokens: 'a' is not a token id"),
    (["--tokens", ",".join(["5"] * 4096)], r"the prompt is 4096 tokens; .* context of 4096"),
    (["--tokens", "5", "--max-new-tokens", "-3"], r"'--max-new-tokens': -3 is not in the range x>=1"),
    (["--tokens", "5", "--temperature", "-1"], r"'--temperature': -1\.0 is not in the range x>=0"),
    (["--tokens", "5", "--top-p", "2"], r"'--top-p': 2\.0 is not in the range"),
    (["--tokens", "5", "--prompt", "hi"], r"give exactly one of --prompt or --tokens"),
])
def test_run_rejects_bad_arguments_with_exit_2(artifact, args, cause):
    done = cli("run", str(artifact), *args)
    assert_one_line_error(done, 2, cause)
    assert "invalid index" not in done.stderr and "\x1b[" not in done.stderr  # ONNX Runtime never ran


def test_run_labels_its_output_and_leaves_special_tokens_out(artifact):
    from dsv4c.runtime import Engine
    from dsv4c.runtime.terminal import escape_controls

    done = cli("run", str(artifact), "--tokens", "5,6,7", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    eng = Engine.load(artifact)
    want = eng.generate([[5, 6, 7]], max_new_tokens=8)[0]
    text = escape_controls(eng.tokenizer.decode(want, skip_special_tokens=True))
    assert done.stdout.splitlines() == [f"tokens: {','.join(map(str, want))}", f"text: {text}"]
    assert re.fullmatch(r"\d+ tokens in [\d.]+ s \([\d.]+ tokens/s\), prompt 3 tokens", done.stderr.strip())


def test_run_and_inspect_on_a_directory_that_is_no_artifact(tmp_path):
    for command in (["run", str(tmp_path), "--tokens", "5"], ["inspect", str(tmp_path)], ["chat", str(tmp_path)],
                    ["serve", str(tmp_path)], ["build", "--from-bundle", str(tmp_path)]):
        assert_one_line_error(cli(*command), 2, rf"{re.escape(str(tmp_path))}: no manifest\.json; not a dsv4c "
                                                r"artifact")


# ---- inspect ----------------------------------------------------------------------------------------------------
def test_inspect_json_is_strict_and_names_kind_and_size(artifact):
    done = cli("inspect", str(artifact), "--json")
    assert done.returncode == 0, done.stderr

    def refuse(token: str):
        raise AssertionError(f"non-JSON token {token}")

    info = json.loads(done.stdout, parse_constant=refuse)
    assert info["kind"] == "engine"
    assert info["size"]["params"] == 6_879_820 and 0 < info["size"]["params_in_engine"] < info["size"]["params"]
    assert info["size"]["engine_bytes"] > 1 << 20
    assert "-Infinity" in {c["fill"] for c in info["engine"]["cache"]}  # the -inf fills, as a string
    table = cli("inspect", str(artifact), env={"COLUMNS": "200"}).stdout
    assert "engine (runnable engine)" in table and "6.88 M params" in table


# ---- serve ------------------------------------------------------------------------------------------------------
def test_serve_port_in_use_exits_8(artifact):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("serve", str(artifact), "--port", str(port))
    assert_one_line_error(done, 8, rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use")


def test_serve_max_batch_over_the_artifact_exits_2(artifact):
    assert_one_line_error(cli("serve", str(artifact), "--max-batch", "5"), 2,
                          r"--max-batch 5: .* at most 2 sequences \(runtime\.max_batch_size\)")


def test_serve_prints_a_banner_and_a_throughput_line(artifact):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv4c.compiler.cli", "serve", str(artifact), "--port", str(port),
                             "--stats-every", "0.5"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not any("Uvicorn running" in line or "Application startup complete" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-cpu", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"].get("reasoning_content") is None
        while not any(line.startswith("throughput: ") for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(20)
    text = "".join(lines)
    assert re.search(rf"dsv4c serve: model 'tiny-cpu' \(cpu, \w[\w-]* kernels\), batch 2, context 4096 tokens, "
                     rf"listening on http://127\.0\.0\.1:{port}", text), text
    assert "thinking is off unless a request asks for it" in text
    assert re.search(r"throughput: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\), \d/2 slots busy, \d+ waiting, "
                     r"\d+ requests completed", text), text


# ---- chat -------------------------------------------------------------------------------------------------------
def test_chat_emulate_ends_each_reply_with_its_rate(artifact):
    done = cli("chat", str(artifact), "--emulate", "--mode", "chat", "--max-new-tokens", "4", stdin="Hello\n")
    assert done.returncode == 0, done.stderr
    assert re.search(r"\[\d+ tokens in [\d.]+ s \([\d.]+ tokens/s\), prompt \d+ tokens\]", done.stdout), done.stdout


def test_chat_escapes_control_characters_from_the_model(artifact):
    from dsv4c.runtime import Engine
    from dsv4c.runtime.chat_cli import run_chat

    eng = Engine.load(artifact)
    hostile = eng.tokenizer.encode("\x1b]0;owned\x07\x1b[2Jhi\r") + [eng.eos_id]
    eng.stream = lambda *a, **k: iter([(0, t) for t in hostile])  # the model "writes" terminal escapes
    out: list[str] = []
    lines = iter(["Hello", "/exit"])
    run_chat(eng, lambda prompt: next(lines), lambda text, **style: out.append(text), thinking_mode="chat")
    printed = "".join(out)
    assert "\\x1b]0;owned\\x07\\x1b[2Jhi\\x0d" in printed
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", printed)


# ---- doctor -----------------------------------------------------------------------------------------------------
def test_doctor_reports_what_is_missing_and_the_caches(tmp_path):
    stages = tmp_path / "stages"
    (stages / "load").mkdir(parents=True)
    (stages / "load" / "blob").write_bytes(b"x" * 1234)
    env = {"DSV4C_CACHE_DIR": str(stages), "CXX": str(tmp_path / "no-such-compiler"),
           "DSV4C_KERNEL_CACHE": str(tmp_path / "kernels" / "ortkernels"), "DSV4C_ORT_INCLUDE": ""}
    done = cli("doctor", "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["onnxruntime"]["ok"] and not checks["C++ compiler"]["ok"]
    assert "ONNX function bodies" in checks["C++ compiler"]["disables"]
    assert not checks["kernel library (libdsv4_ops.so)"]["ok"]
    assert {"NVIDIA GPU", "TensorRT", "CANN ATC (atc)"} <= set(checks)
    caches = {c["name"]: c for c in report["caches"]}
    assert caches["stage cache"] == {"name": "stage cache", "path": str(stages), "exists": True, "bytes": 1234,
                                     "set_with": "DSV4C_CACHE_DIR or --cache-dir"}
    text = cli("doctor", env=env).stdout
    assert re.search(r"missing  C\+\+ compiler: disables the C\+\+ kernel library", text), text
    assert f"stage cache: {stages} (1.2 KB;" in text and "can build here: " in text


# ---- one error style --------------------------------------------------------------------------------------------
def test_click_usage_errors_use_the_same_style(tmp_path):
    assert_one_line_error(cli("build"), 2, r"give exactly one of RECIPE or --from-bundle DIR")
    assert_one_line_error(cli("plan", "recipes/tiny-cpu.yaml", "--bogus"), 2, r"No such option:? '?--bogus")
    assert_one_line_error(cli("frobnicate"), 2, r"No such command 'frobnicate'")
    assert cli("--help").returncode == 0 and "8  address in use" in cli("--help").stdout


# ---- README and repository hygiene -------------------------------------------------------------------------------
def test_readme_references_resolve_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "design.md" not in readme and "toolchain-facts" not in readme
    paths = set(re.findall(r"`((?:dsv4c|recipes|benchmarks|tests)/[\w./-]*\w)`", readme))
    paths |= set(re.findall(r"\b((?:recipes|benchmarks)/[\w-]+\.(?:yaml|py))\b", readme))
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    assert paths and missing == [], missing
    assert "bundles/" in (ROOT / ".gitignore").read_text().split()


def test_no_download_host_is_named_in_the_code_or_readme():
    hosts = re.compile(r"deb\.debian\.org|https?://(?!127\.0\.0\.1|\{|json-schema\.org|www\.hiascend\.com/document)")
    hits = [f"{p.relative_to(ROOT)}: {m.group()}" for d in ("dsv4c", "benchmarks") for p in (ROOT / d).rglob("*.py")
            for m in hosts.finditer(p.read_text())]
    hits += [f"README.md: {m.group()}" for m in hosts.finditer((ROOT / "README.md").read_text())]
    assert hits == []


def test_the_debian_mirror_comes_from_the_apt_sources(tmp_path, monkeypatch):
    from dsv4c.targets.base import ToolchainMissing
    from dsv4c.targets.cpu.kernels.build import debian_mirror

    monkeypatch.delenv("DSV4C_DEBIAN_MIRROR", raising=False)
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "other.list.disabled").write_text("deb http://elsewhere.example/debian bookworm main\n")
    (d / "vendor.sources").write_text("Types: deb\nURIs: http://vendor.example/apt\nSuites: nodistro\n"
                                      "Components: main\n")
    (d / "debian.sources").write_text("Types: deb\n# a comment\nURIs: http://mirror.example/debian-security\n"
                                      "Suites: bookworm-security\nComponents: main\n\n"
                                      "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm "
                                      "bookworm-updates\nComponents: main\n")
    one_line = tmp_path / "sources.list"
    one_line.write_text("deb [arch=amd64 signed-by=/k.gpg] http://old.example/debian bookworm contrib\n")
    release = tmp_path / "os-release"
    release.write_text('ID=debian\nVERSION_CODENAME=bookworm\n')
    assert debian_mirror((one_line, d), release) == "http://mirror.example/debian"
    one_line.write_text("deb [arch=amd64] http://first.example/debian bookworm main\n")
    assert debian_mirror((one_line, d), release) == "http://first.example/debian"
    monkeypatch.setenv("DSV4C_DEBIAN_MIRROR", "http://chosen.example/debian/")
    assert debian_mirror((one_line, d), release) == "http://chosen.example/debian"
    monkeypatch.delenv("DSV4C_DEBIAN_MIRROR")
    release.write_text("ID=ubuntu\nVERSION_CODENAME=noble\n")
    with pytest.raises(ToolchainMissing, match="DSV4C_DEBIAN_MIRROR"):
        debian_mirror((one_line, d), release)
