"""`lmforge serve --adapter`: one adapter directory (LoRA merged, or a prompt / prefix leading every input), or
several NAME=DIR LoRA adapters served beside the base model, chosen per request by `model`. uvicorn.run is
replaced by a catcher: the app it would serve is driven with FastAPI's TestClient."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.finetune.adapter_files import save_adapter
from lmforge.finetune.lora import LoraConfig, add_adapter
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams

runner = CliRunner()
PROMPT = [5, 9, 14, 3, 27, 8]


def lora_dir(model_dir, path, seed: int, **config):
    model, _ = lmforge.load(model_dir)
    add_adapter(model, LoraConfig(**{"r": 4, "alpha": 32} | config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed + p.numel()))
    save_adapter(model, path)
    return path


def greedy(model_dir, adapter=None) -> list[int]:
    model, tok = lmforge.load(model_dir, adapter=adapter)
    return [e.token_id for e in generate(model, tok, PROMPT, SamplingParams(temperature=0, max_tokens=8))]


@pytest.fixture
def served(monkeypatch):
    """`serve ARGS`'s app, caught from uvicorn.run."""
    import uvicorn

    caught = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: caught.setdefault("app", app))

    def serve(*args: str):
        result = runner.invoke(app, ["serve", *args])
        assert result.exit_code == 0, result.output
        return caught.pop("app")

    return serve


def completion(client: TestClient, model: str) -> tuple[int, dict]:
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    return r.status_code, r.json()


def test_several_adapters_side_by_side(model_dir, tmp_path, served):
    sql, poem = lora_dir(model_dir, tmp_path / "sql", 1), lora_dir(model_dir, tmp_path / "poem", 2, dora=True)
    web = served(str(model_dir), "--served-model-name", "base", "--adapter", f"sql-lora={sql}", "--adapter",
                 f"poem={poem}")  # fmt: skip
    _, tok = lmforge.load(model_dir)
    with TestClient(web) as client:
        cards = client.get("/v1/models").json()["data"]
        assert [(c["id"], c["parent"]) for c in cards] == [("base", None), ("sql-lora", "base"), ("poem", "base")]
        for name, adapter in (("base", None), ("sql-lora", sql), ("poem", poem)):
            status, body = completion(client, name)
            assert status == 200 and body["model"] == name
            assert body["choices"][0]["text"] == tok.decode(greedy(model_dir, adapter))
        status, body = completion(client, "other")
        assert status == 400 and body["error"]["code"] == "model_not_found"
        assert "'base', 'sql-lora', 'poem'" in body["error"]["message"]
        enum = client.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]
        assert enum["model"]["enum"] == ["base", "sql-lora", "poem"]
    assert greedy(model_dir, sql) != greedy(model_dir) != greedy(model_dir, poem)


def test_one_adapter_is_merged_or_leads(model_dir, tmp_path, served):
    """One DIR: LoRA merged into the served model; a prompt-tuning adapter (once refused) leads every input."""
    from lmforge.finetune.prompt_files import save_prompt
    from lmforge.finetune.prompt_tuning import add_prompt_tuning, generate_tuned

    _, tok = lmforge.load(model_dir)
    sql = lora_dir(model_dir, tmp_path / "sql", 1)
    with TestClient(served(str(model_dir), "--adapter", str(sql))) as client:
        assert [c["id"] for c in client.get("/v1/models").json()["data"]] == [model_dir.name]
        _, body = completion(client, model_dir.name)
        assert body["choices"][0]["text"] == tok.decode(greedy(model_dir, sql))
    model, _ = lmforge.load(model_dir)
    torch.manual_seed(3)
    add_prompt_tuning(model, 4)
    save_prompt(model, tmp_path / "prompt")
    events = generate_tuned(model, tok, PROMPT, SamplingParams(temperature=0, max_tokens=8))
    want = tok.decode([e.token_id for e in events])
    with TestClient(served(str(model_dir), "--adapter", str(tmp_path / "prompt"))) as client:
        _, body = completion(client, model_dir.name)
        assert body["choices"][0]["text"] == want


def test_adapter_flag_errors(model_dir, tmp_path):
    sql = lora_dir(model_dir, tmp_path / "sql", 1)
    for args, message in (([f"a={sql}", f"a={sql}"], "the name 'a' is taken"),
                          ([f"a={tmp_path / 'none'}"], "is not a directory"),
                          ([f"={sql}"], "expected NAME=DIR")):  # fmt: skip
        result = runner.invoke(app, ["serve", str(model_dir), *[x for a in args for x in ("--adapter", a)]])
        assert result.exit_code == 1 and message in " ".join(result.stderr.split()), result.output
