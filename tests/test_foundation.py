import time

import torch


def test_packages_import():
    import vpd_kernels
    import vpd_lightning

    assert vpd_lightning.__version__
    assert vpd_kernels.__name__ == "vpd_kernels"


def test_tiny_tokenizer_round_trips_text_and_has_chat_template(tiny_tokenizer):
    text = "def f(x):\n    return x * 2  # ünïcode ✓"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_is_deterministic_fast_and_generates(tiny_tokenizer):
    from vpd_lightning.policy.tiny import build_tiny_model

    a = build_tiny_model(len(tiny_tokenizer))  # the first call also imports the model class
    start = time.perf_counter()
    b = build_tiny_model(len(tiny_tokenizer))
    assert time.perf_counter() - start < 1.0
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = a.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 5


def test_triton_interpreter_is_on_without_cuda():
    import os

    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
