"""LoRA and QLoRA end to end on the embedded default: a LoRA dSFT (checkpoints hold the adapter and its
optimizer state alone, resume, two exports, the merged one chatting where peft cannot be imported),
then LoRA and QLoRA dDPO from its merged export through ``dsft/latest``, whose reference is that
dSFT model. One dSFT run serves the whole module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import compose_config, odd_exact_match
from zephyr_lit.adapters import AdapterSpec, quantization_config
from zephyr_lit.assets import TINY_MODEL, asset_path
from zephyr_lit.logprobs import model_completion_scores
from zephyr_lit.models import ModelSpec, build_model
from zephyr_lit.run import prepare_run, train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
QUIET = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def overrides(root: Path, hf_cache: Path, name: str, *extra: str) -> list[str]:
    return [f"paths.root={root}", f"paths.output_dir={root / name}", f"data.cache_dir={hf_cache}", *QUIET,
            "data.max_train_samples=64", "data.max_eval_samples=16", *extra]


@pytest.fixture(scope="module")
def dsft(tmp_path_factory, hf_cache) -> dict:
    """A LoRA dSFT run of 8 steps (its summary), ``latest`` pointing at it."""
    root = tmp_path_factory.mktemp("peft")
    return train(compose_config(overrides(root, hf_cache, "dsft-lora", "+experiment=dsft", "peft=lora",
                                          "trainer.max_steps=8", *odd_exact_match(root))))


def test_lora_dsft_checkpoints_hold_the_adapter_and_its_optimizer_state_alone_and_resume(dsft, hf_cache):
    run = Path(dsft["output_dir"])
    assert dsft["metrics"]["val/loss"] < dsft["initial_metrics"]["val/loss"] and "val/exact_match" in dsft["metrics"]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights, optimizer = checkpoint["state_dict"], checkpoint["optimizer_states"][0]
    assert len(weights) == 56 and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert len(optimizer["state"]) == 56  # Adam moments for the adapter's tensors, none for the base
    assert [state["exp_avg"].shape for _, state in sorted(optimizer["state"].items())] == \
        [weights[k].shape for k in weights]  # in parameter order
    before = load_file(run / "adapter" / "adapter_model.safetensors")
    again = train(compose_config(overrides(run.parent, hf_cache, "dsft-lora", "+experiment=dsft", "peft=lora",
                                           "trainer.max_steps=8", "ckpt_path=last", "data.exact_match_path=null")),
                  update_latest=False)  # resumed at its last step: nothing to train, the export is the restored adapter
    after = load_file(run / "adapter" / "adapter_model.safetensors")
    assert again["global_step"] == 8 and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the checkpoint gave the adapter back
    assert any(after[k].abs().max() > 0 for k in after if "lora_B" in k)  # (a fresh one would have B = 0)


def test_the_merged_export_loads_without_peft_and_equals_the_adapter_on_its_base(dsft):
    run = Path(dsft["output_dir"])
    assert dsft["adapter_dir"] == str(run / "adapter") and (run.parent / "dsft" / "latest").resolve() == run.resolve()
    chat = (
        "import sys; sys.modules['peft'] = None\n"  # `import peft` fails from here on
        "try:\n    import peft\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('peft imported')\n"
        "import torch\nfrom transformers import pipeline\n"
        f"pipe = pipeline('text-generation', model={str(run / 'model')!r}, dtype=torch.float32)\n"
        "prompt = pipe.tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hello'}], tokenize=False,"
        " add_generation_prompt=True)\n"
        "ids = pipe(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, return_tensors=True)[0]['generated_token_ids']\n"
        "assert len(ids) == len(pipe.tokenizer(prompt).input_ids) + 8  # BOS + prompt + 8 new\n"
        "print('REPLY', repr(pipe.tokenizer.decode(ids[-8:])))\n"
    )
    result = subprocess.run([sys.executable, "-c", chat], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "REPLY" in result.stdout, result.stderr[-2000:]

    from peft import PeftModel

    start = build_model(ModelSpec(asset_path(TINY_MODEL), random_init=True, init_seed=42)).eval()  # the dSFT's start
    adapted = PeftModel.from_pretrained(start, str(run / "adapter")).eval()
    merged = build_model(ModelSpec(str(run / "model"))).eval()
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method, precompute", [("lora", True), ("qlora", False)])
def test_ddpo_from_the_lora_dsft_export_keeps_the_dsft_model_as_its_reference(dsft, hf_cache, method, precompute):
    """With lora the reference log-probs are precomputed (by the policy with its adapter off) and cached."""
    root = Path(dsft["output_dir"]).parent
    lr = "optim.lr=1e-2"  # as on the command line: the adapter's lr as it is (4 steps from B = 0)
    cfg = compose_config(overrides(root, hf_cache, f"ddpo-{method}", "+experiment=ddpo", f"peft={method}", lr,
                                   "trainer.max_steps=4", "data.batch_size=4", "data.exact_match_path=null",
                                   f"dpo.ref.precompute={str(precompute).lower()}",
                                   f"dpo.ref.cache_dir={root}/cache-{method}"))
    assert cfg.model.name_or_path == f"{root}/dsft/latest/model"  # the merged dSFT export, through `latest`
    summary = train(cfg, overrides=[lr], update_latest=False)
    before, after = summary["initial_metrics"], summary["metrics"]
    assert before["val/rewards/margins"] == before["val/rewards/chosen"] == 0.0  # policy = reference at start
    assert after["val/rewards/chosen"] != 0.0 and after["val/rewards/rejected"] != 0.0  # the policy moved off it

    # The reference after training: mean policy log-prob minus mean reward / beta, over the val pairs ...
    reference_chosen = after["val/logps/chosen"] - after["val/rewards/chosen"] / cfg.dpo.beta
    # ... equals the dSFT export's own, loaded apart (in 4 bits for qlora), not the raw base's.
    quantization = quantization_config(AdapterSpec(method="qlora")) if method == "qlora" else None
    dsft_model = build_model(ModelSpec(str(root / "dsft" / "latest" / "model")), quantization=quantization).eval()
    raw_base = build_model(ModelSpec(asset_path(TINY_MODEL), random_init=True, init_seed=42)).eval()
    loader = prepare_run(cfg).datamodule.val_dataloader()
    with torch.no_grad():
        chosen, raw = (torch.cat([model_completion_scores(m, b).logps()[: b["index"].numel()] for b in loader]).mean()
                       for m in (dsft_model, raw_base))
    assert reference_chosen == pytest.approx(chosen.item(), rel=1e-5)
    assert abs(raw.item() - chosen.item()) > 1e-4 * abs(chosen.item())  # the raw base's is 10x the tolerance away

    assert len(list((root / f"cache-{method}").rglob("train.pt"))) == int(precompute)
    run = Path(summary["output_dir"])
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (16, 16, cfg.model.name_or_path)
    merged = load_file(run / "model" / "model.safetensors")
    assert len(merged) == 39 and all(t.dtype == torch.float32 for t in merged.values())  # unquantised, the run's dtype
