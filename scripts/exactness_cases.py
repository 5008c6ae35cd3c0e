"""The real-model numerics cases (issue 13), measured on one checkout of orthoreg.

    python scripts/exactness_cases.py .                     # this checkout
    git worktree add /tmp/old c141d84 && python scripts/exactness_cases.py /tmp/old

Prints one JSON object: the covariance with a massive column (N = 64, d = 576, ×2.5e4, 50 draws), the LoRA weight
penalty and the base-mean r under bf16 autocast, the paired anchor of an untrained GPT-2 adapter under dropout, a
NaN calibration batch under on_nonfinite="skip", a saved state with a wrong-length or NaN r, T5/BERT, a packed
batch's padding, and guarded layers without directions. The tests (tests/test_exactness.py, test_robustness.py)
assert the fixed values; this script shows before and after side by side.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests.models, tests.trainer_harness

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration  # noqa: E402

import orthoreg  # noqa: E402
from orthoreg import HarmfulDirections, OrthoRegConfig  # noqa: E402
from orthoreg.core.capture import find_decoder_stack, token_mask  # noqa: E402
from orthoreg.engine.regularizer import OrthoRegularizer  # noqa: E402
from orthoreg.terms.penalties import covariance_penalty, lora_weight_penalty  # noqa: E402
from tests.models import tiny_model  # noqa: E402
from tests.trainer_harness import padded_dataset  # noqa: E402


def covariance_64(x: torch.Tensor) -> float:
    x = x.double()
    xc = x - x.mean(0)
    c = xc.T @ xc / (x.shape[0] - 1)
    return float(((c ** 2).sum() - (c.diag() ** 2).sum()) / x.shape[1])


def massive_column() -> dict:
    errors, negative = [], 0
    for seed in range(50):
        x = torch.randn(64, 576, generator=torch.Generator().manual_seed(seed))
        x[:, 0] *= 2.5e4
        value, want = covariance_penalty(x).item(), covariance_64(x)
        errors.append(abs(value - want) / want)
        negative += value < 0
    return {"cov_massive_median_rel_err": float(torch.tensor(errors).median()), "cov_massive_negative_of_50": negative}


def autocast_terms(batch, directions) -> dict:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 48, generator=g).bfloat16(), torch.randn(64, 8, generator=g).bfloat16()
    u = torch.linalg.qr(torch.randn(64, 4, generator=g, dtype=torch.float64))[0].T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = lora_weight_penalty(a, b, u.float(), 0.5)
    want = 0.25 * (u @ (b.double() @ a.double())).square().sum()
    model = tiny_model()
    reg = OrthoRegularizer(OrthoRegConfig(layers=[1], proj_weight=1.0), directions).attach(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch)
    return {"lora_bf16_dtype": str(value.dtype), "lora_bf16_rel_err": abs(value.double().item() - want.item()) / want.item(),
            "r_dtype_under_autocast": str(reg.base_reference[1].dtype)}


def paired_under_dropout(batch) -> dict:
    model = get_peft_model(tiny_model("gpt2", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
                           LoraConfig(r=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.0, fan_in_fan_out=True))
    directions = HarmfulDirections({2: torch.randn(2, 32, generator=torch.Generator().manual_seed(1))})
    reg = OrthoRegularizer(OrthoRegConfig(layers=[2], proj_weight=1.0, anchor="paired"), directions).attach(model)
    model.train()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {"paired_untrained_dropout": reg.pop_metrics()["proj"]}


def nan_calibration(batch, directions) -> dict:
    model = tiny_model()
    model.train()
    reg = OrthoRegularizer(OrthoRegConfig(layers=[1], proj_weight=1.0, on_nonfinite="skip"), directions).attach(model)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    embeds[0, 1, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    r = reg.base_reference.get(1)
    return {"nan_calibration_r": "none recorded" if r is None else ("finite" if torch.isfinite(r).all() else "NaN")}


def saved_state(directions) -> dict:
    reg = OrthoRegularizer(OrthoRegConfig(layers=[1], proj_weight=1.0), directions).attach(tiny_model())
    out = {}
    for case, r in (("state_wrong_length", [0.5]), ("state_nan", [float("nan"), 1.0])):
        state = {"format_version": 1, "anchor": "base_mean", "layers": [1], "base_reference": {"1": r},
                 "calibration_tokens": {"1": 3}, "calibration_batches_seen": 1}
        try:
            reg.load_state_dict(state)
            out[case] = "accepted"
        except ValueError:
            out[case] = "refused"
    return out


def architectures_and_masks(directions) -> dict:
    out = {}
    models = {"t5": T5ForConditionalGeneration(T5Config(vocab_size=99, d_model=32, d_ff=37, num_layers=2, num_heads=4,
                                                        d_kv=8)),
              "bert": BertForMaskedLM(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=37))}
    for name, model in models.items():
        try:
            find_decoder_stack(model)
            out[f"{name}_accepted"] = True
        except Exception:  # noqa: BLE001 - any refusal counts
            out[f"{name}_accepted"] = False
    mask = token_mask({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0]]),
                       "labels": torch.tensor([[-100, 5, 6, -100, 8, -100, -100]])}, (1, 7))
    out["packed_padding_counted"] = int(mask[0, 5:].sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OrthoRegularizer(OrthoRegConfig(layers=[1, 2], proj_weight=1.0), directions).attach(tiny_model())
    out["uncovered_layer_warned"] = any("no harmful directions" in str(w.message) for w in caught)
    return out


def main() -> int:
    batch = {k: torch.tensor(v) for k, v in padded_dataset(n=4)[:].items()}
    directions = HarmfulDirections({1: torch.randn(2, 32, generator=torch.Generator().manual_seed(0))})
    out = {"checkout": str(Path(orthoreg.__file__).parent.parent)}
    for part in (massive_column(), autocast_terms(batch, directions), paired_under_dropout(batch),
                 nan_calibration(batch, directions), saved_state(directions), architectures_and_masks(directions)):
        out.update(part)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
