"""Evaluation: metrics, judges and judge validation for the three AlignX axes.

Modules:

- ``metrics``: pure metric functions with declared directions (``METRICS``), bootstrap CIs.
- ``records``: items, verdicts and the judge protocols.
- ``judges``: the fake judge, the judge cache, config and ``build_judges`` (re-exports all
  judges).
- ``openai_judge`` / ``hf_judge`` / ``offline_judges``: the three kinds of judge (OpenAI-
  compatible HTTP, local Hugging Face classifier, MiniLM-based offline proxies).
- ``judge_data``: readers for the data judges are fitted and validated on.
- ``judge_validation``: validity figures reported next to every judged score.

Nothing heavy is imported here; import the module you need.
"""
