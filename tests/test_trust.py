"""No code from an input directory runs without consent. The model directories here carry a
`modeling_custom.py` (and, for tokenizers, a `tokenization_custom.py`) that leaves a marker file
when imported: `urm-jax parity` uses urm-jax's packaged reference class unless
--trust-remote-code is given; no command ever runs a directory's tokenizer code."""

import ast
import json
import shutil
import subprocess
import sys

import pytest

from faults import ROOT, cli_env, write_tiny_base
from hf_fixtures import make_tiny_urm
from urm_jax.cli import main as cli_main

MARKING = '''import pathlib
pathlib.Path(__file__).with_name("RAN-{name}").write_text("imported")
'''


@pytest.fixture(scope="module")
def marked_model(tmp_path_factory):
    """A tiny URM whose modeling_custom.py marks its import, then defines the real class."""
    out = make_tiny_urm(tmp_path_factory.mktemp("trust") / "hf", gate_dtype="float32")
    original = (out / "modeling_custom.py").read_text()
    (out / "modeling_custom.py").write_text(MARKING.format(name="modeling") + original)
    return out


def parity_in_process(capsys, hf, *extra):
    code = cli_main(["parity", "--hf", str(hf), "--model", str(hf), "--batch-size", "2", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_parity_never_imports_the_directorys_code_without_the_flag(marked_model, capsys):
    code, out, err = parity_in_process(capsys, marked_model)
    assert code == 0, out + err
    assert "reference: urm-jax's reference class (urm_jax/hf/modeling_custom.py)" in out
    assert not (marked_model / "RAN-modeling").exists(), "the directory's modeling_custom.py ran"


def test_parity_runs_the_directorys_code_with_the_flag(marked_model, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(marked_model, hf)
    # transformers copies trusted code into its modules cache: keep that out of the home directory.
    env = cli_env(1, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"))
    done = subprocess.run([sys.executable, "-m", "urm_jax.cli", "parity", "--hf", str(hf), "--model", str(hf),
                           "--batch-size", "2", "--trust-remote-code"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"reference: {hf}/modeling_custom.py (trust_remote_code)" in done.stdout
    assert (tmp_path / "modules").is_dir() and any((tmp_path / "modules").rglob("RAN-modeling")), \
        "the trusted modeling_custom.py did not run"


def test_trust_remote_code_without_code_is_one_error_line(marked_model, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(marked_model, hf)
    (hf / "modeling_custom.py").unlink()
    code, out, err = parity_in_process(capsys, hf, "--trust-remote-code")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{hf}: --trust-remote-code, but the directory ships no modeling_custom.py" in lines[0]


@pytest.fixture(scope="module")
def custom_tokenizer_model(tmp_path_factory):
    """A trainable tiny base whose tokenizer exists only as the directory's own class."""
    out = write_tiny_base(tmp_path_factory.mktemp("trust_tok") / "hf")
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="MarkedTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_custom.MarkedTokenizer", None]})
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "tokenization_custom.py").write_text(MARKING.format(name="tokenizer") + (
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class MarkedTokenizer(PreTrainedTokenizerFast):\n    pass\n"))
    return out


@pytest.mark.parametrize("command", ["score", "train"])
def test_a_tokenizer_with_its_own_code_is_refused_not_run(custom_tokenizer_model, command, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    if command == "score":
        argv = ["score", "--model", str(custom_tokenizer_model), "--input", str(source),
                "--output", str(tmp_path / "out.jsonl"), "--no-progress"]
    else:
        argv = ["train", str(ROOT / "configs/train/tiny_stage1.yaml"), f"model={custom_tokenizer_model}",
                f"output_dir={tmp_path / 'run'}", "global_batch_size=8"]
    code = cli_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{custom_tokenizer_model}: its tokenizer is the directory's own code" in lines[0]
    assert not (custom_tokenizer_model / "RAN-tokenizer").exists(), "the directory's tokenizer code ran"
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "run").exists()


def test_no_library_call_trusts_remote_code_unasked():
    """Every call passing `trust_remote_code=True` in the library: parity's (behind the flag)
    and the demo's (it loads the export it has just written itself)."""
    calls = set()
    for path in (ROOT / "urm_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(
                    k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords):
                calls.add(str(path.relative_to(ROOT)))
    assert calls == {"urm_jax/parity.py", "urm_jax/demo.py"}, calls
