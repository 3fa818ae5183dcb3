"""``llada generate``, ``llada eval`` and ``llada lm-eval`` end to end on an export of a tiny
model: outputs, one-line errors for bad input, and the harness's own CLI (one process and
data-parallel over two) on local tasks."""

import json
import os

import pytest

from tests.conftest import run_cli
from tests.integration.inference_fixtures import MC_ROWS, write_tasks, write_tiny_export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def export(tmp_path_factory, small_tokenizer, world):
    return write_tiny_export(tmp_path_factory.mktemp("inference") / "tiny", small_tokenizer)


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("llada: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_generate_writes_text_and_jsonl(export, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "import"}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli(["generate", str(export), "--prompt", "def f(x):", "--prompts-file",
                    str(prompts), "--chat", "--gen-length", "16", "--steps", "8",
                    "--block-length", "8", "--cache", "dual", "--threshold", "0.9", "--jsonl",
                    str(out), "--device", "cpu", "--no-stop-at-eos"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records][:2] == ["def f(x):", "import"]
    assert records[2]["prompt"] == [{"role": "user", "content": "hi"}]
    for r in records:
        assert r["tokens"] == 16 and 1 <= r["steps"] <= 16 and r["tokens_per_s"] > 0
    assert "=== 1: def f(x):" in proc.stdout and "=== 3: [{" in proc.stdout


def test_eval_reports_the_bound_and_multiple_choice(export, tmp_path, small_heldout):
    choices = tmp_path / "mc.jsonl"
    choices.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    report = tmp_path / "report.json"
    proc = run_cli(["eval", str(export), "--data", str(small_heldout), "--choices", str(choices),
                    "--samples", "8", "--sequences", "8", "--t-samples", "2", "--output",
                    str(report), "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(report.read_text())
    held = next(iter(r["heldout"]["sets"].values()))
    assert held["sequences"] == 8 and held["loss"] > 0 and held["bpb"] > 0
    assert r["choices"]["questions"] == len(MC_ROWS) and 0 <= r["choices"]["acc"] <= 1
    assert "acc_norm" in proc.stdout and "bpb" in proc.stdout


@pytest.mark.parametrize("args, needles", [
    (["generate", "{tmp}", "--prompt", "x"], ["MODEL", "neither a checkpoint", "export"]),
    (["generate", "{export}", "--prompt", "x " * 200, "--gen-length", "16"],
     ["prompt 1", "maximum length 128"]),
])
def test_bad_input_is_one_line(export, tmp_path, args, needles):
    """(The other bad inputs, steps that do not divide and malformed lines, are refused by the
    same functions in the unit tests; the CLI turns any of them into this one line.)"""
    subs = {"{tmp}": str(tmp_path), "{export}": str(export)}
    _one_line_error(run_cli([subs.get(a, a) for a in args] + ["--device", "cpu"]), *needles)


def _harness(export, tasks, out, nproc=0):
    proc = run_cli(["lm-eval", "--model", "llada", "--model_args",
                    f"pretrained={export},mc_samples=8,steps=8,block_length=8",
                    "--tasks", "llada_local_mc,llada_local_gen", "--include_path", str(tasks),
                    "--device", "cpu", "--batch_size", "4", "--output_path", str(out)],
                   nproc=nproc)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    found = sorted(out.rglob("results_*.json"))
    assert found, proc.stdout[-2000:]
    return json.loads(found[-1].read_text())["results"]


def test_the_harness_cli_runs_local_tasks_through_llada(export, tmp_path):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        if os.environ.get("LLADA_REQUIRE_SLURM"):  # CI installs everything: never skip there
            raise
        pytest.skip("lm-eval not installed (bash install.sh --with-eval)")
    tasks = write_tasks(tmp_path / "tasks")
    one = _harness(export, tasks, tmp_path / "one")
    assert 0 <= one["llada_local_mc"]["acc,none"] <= 1
    assert "exact_match,none" in one["llada_local_gen"]
    # data parallel over two processes: each gets its share, the results are gathered, and the
    # estimates (keyed by their tokens) are those of one process
    two = _harness(export, tasks, tmp_path / "two", nproc=2)
    assert two["llada_local_mc"]["acc,none"] == one["llada_local_mc"]["acc,none"]
    assert two["llada_local_gen"]["exact_match,none"] == one["llada_local_gen"]["exact_match,none"]


def test_the_harness_model_in_process(export):
    """loglikelihood_rolling is the bound of the text (the document start once, then windows of
    the model's length); model_args the sampler refuses fail before any request runs."""
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from framework.config import ConfigError
    from framework.evaluation.harness import LLaDAHarnessModel
    from framework.inference.likelihood import loglikelihoods

    lm = LLaDAHarnessModel(pretrained=str(export), device="cpu", mc_samples=4, batch_size=16)
    short = "import os\n"
    ids = lm.im.tokenizer.encode(short)
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(short,))])[0]
    assert got == pytest.approx(loglikelihoods(lm.im, [([], ids)], 4, 16)[0].loglik, rel=1e-6)
    long = "def f(x):\n    return x + 1\n" * 30  # past the 128 tokens of the model
    assert len(lm.im.tokenizer.encode(long)) > 128
    value = lm.loglikelihood_rolling([SimpleNamespace(args=(long,))])[0]
    assert value < 0 and value == value
    with pytest.raises(ConfigError, match="--threshold"):
        LLaDAHarnessModel(pretrained=str(export), device="cpu", threshold=2.0)
    with pytest.raises(ConfigError, match="--device"):
        LLaDAHarnessModel(pretrained=str(export), device="tpu")
