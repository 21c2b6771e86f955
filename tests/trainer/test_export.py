"""`python -m vpd_lightning export`: checkpoints become Hugging Face folders with the same logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from vpd_lightning.errors import UserInputError
from vpd_lightning.export import export
from vpd_lightning.policy.tiny import build_tiny_model, build_tiny_tokenizer

from .helpers import lora, tiny_data, tiny_module, tiny_trainer

IDS = torch.tensor([list(range(5, 25))])


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """One step of VPD with a teacher adapter; (checkpoint, the student's logits on IDS)."""
    out = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    module = tiny_module(teacher_mode="adapter", lora=lora())
    trainer = tiny_trainer(out, 1)
    trainer.fit(module, datamodule=tiny_data())
    trainer.save_checkpoint(out / "step1.ckpt")
    with torch.no_grad(), module.policy.student():
        logits = module.policy.model(input_ids=IDS).logits
    return out / "step1.ckpt", logits


def test_export_merges_the_student_adapter_into_a_plain_transformers_model(
    lora_checkpoint, tmp_path
):
    checkpoint, trained = lora_checkpoint
    folder = export(checkpoint, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in name for name, _ in model.named_parameters())
    text = "Compute 2 + 3."
    assert (
        AutoTokenizer.from_pretrained(folder)(text).input_ids
        == build_tiny_tokenizer()(text).input_ids
    )
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        untrained = build_tiny_model()(input_ids=IDS).logits
    torch.testing.assert_close(logits, trained, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(untrained, trained, atol=1e-6)  # the adapter did change the policy


def test_export_adapter_only_writes_the_student_adapter_for_peft(lora_checkpoint, tmp_path):
    checkpoint, trained = lora_checkpoint
    folder = export(checkpoint, tmp_path / "adapter", adapter_only=True)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in folder.iterdir()
    }
    model = PeftModel.from_pretrained(build_tiny_model(), folder)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    torch.testing.assert_close(logits, trained, rtol=1e-5, atol=1e-6)


def test_export_refuses_a_used_folder_and_adapter_only_without_lora(lora_checkpoint, tmp_path):
    checkpoint, _ = lora_checkpoint
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(UserInputError, match="not an empty folder"):
        export(checkpoint, tmp_path / "used")
    full = tmp_path / "full"
    module = tiny_module()
    trainer = tiny_trainer(full, 1)
    trainer.fit(module, datamodule=tiny_data())
    trainer.save_checkpoint(full / "step1.ckpt")
    with pytest.raises(UserInputError, match="without LoRA"):
        export(full / "step1.ckpt", tmp_path / "out", adapter_only=True)
