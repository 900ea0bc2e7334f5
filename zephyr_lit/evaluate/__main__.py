"""Evaluate an export as the Zephyr paper did: MT-Bench, AlpacaEval, preference accuracy.

    python -m zephyr_lit.evaluate                                   # MT-Bench-style, embedded model and questions
    python -m zephyr_lit.evaluate task=mt_bench model_path=outputs/ddpo/latest questions=question.jsonl judge=openai
    python -m zephyr_lit.evaluate task=mt_bench ... judge_prompts=judge_prompts.jsonl   # FastChat's judge prompts
    python -m zephyr_lit.evaluate task=alpaca_eval model_path=DIR instructions=alpaca_eval.json
    python -m zephyr_lit.evaluate task=prefs model_path=DIR reference_path=DIR data.path=PREFS

See README.md, "Evaluate", and conf/evaluate.yaml with conf/task/ for every key.
"""

import hydra
from omegaconf import DictConfig

import zephyr_lit.config  # noqa: F401  (registers ${asset:...} and ${run_stamp:} before Hydra composes)
from zephyr_lit.errors import one_line_errors
from zephyr_lit.launch import pin_run_stamp


@hydra.main(version_base="1.3", config_path="../../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from zephyr_lit.evaluate.app import evaluate

    with one_line_errors():
        evaluate(cfg)


if __name__ == "__main__":
    pin_run_stamp()
    main()
