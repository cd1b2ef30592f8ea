"""The attributes of NeMo-Aligner's SteerLM OASST schema, written out once for the tests — independently of
steerlm's `conf/attributes/steerlm_oasst.yaml` and the synthetic oracle, which the tests check against it."""

STEERLM_OASST_ATTRIBUTES = (
    "quality",
    "toxicity",
    "humor",
    "creativity",
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
)
