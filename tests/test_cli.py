"""The jaxlm command line: generate, chat, info, demo."""

import json
import os
import subprocess
import sys

from conftest import REPO


def jaxlm(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # one device, as on a user's machine
    return subprocess.run([sys.executable, "-m", "jaxlm", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def test_generate_json_and_rate(golden):
    path = str(golden("tiny_chat_realvocab"))
    result = jaxlm("generate", "--model", path, "--prompt", "Hello", "--max-new-tokens", "5", "--json",
                   "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["completion_tokens"] == 5 and out["prompt_tokens"] == 2 and len(out["token_ids"]) == 5
    assert "tokens/s" in result.stderr


def test_chat_streams_resets_and_exits(golden):
    path = str(golden("tiny_chat_realvocab"))
    case = json.loads((golden("tiny_chat_realvocab") / "chat_case.json").read_text())
    script = "hi\n/reset\n" + case["query"] + "\n/exit\n"
    result = jaxlm("chat", "--model", path, "--greedy", "--max-new-tokens", "12", "--dtype", "float32",
                   stdin=script)
    assert result.returncode == 0, result.stderr
    assert "(conversation cleared)" in result.stderr and "tokens/s" in result.stderr
    # after /reset the query has no history, so it is not the golden (history) answer;
    # the two answers are printed on their own lines
    answers = [line for line in result.stdout.splitlines() if line]
    assert len(answers) == 2


def test_errors_are_one_line(tmp_path):
    result = jaxlm("generate", "--model", str(tmp_path), "--prompt", "x")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    result = jaxlm("info", "--model", "internlm2-7b", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["params"] == 7737708544


def test_demo_runs(tmp_path):
    """The Quickstart's main job: fine-tune the tiny default, chat with it, export and reload it."""
    result = jaxlm("demo", "--workdir", str(tmp_path / "demo"), "--steps", "150", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical logits: True" in result.stdout
    assert "assistant: The capital of Japan is Tokyo." in result.stdout
