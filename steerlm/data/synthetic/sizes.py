"""The sizes of the built-in synthetic world (`data=synthetic`): a typed config section that the world's
generator takes directly, so the generator needs nothing from `steerlm.config`."""

from __future__ import annotations

from dataclasses import dataclass

from steerlm.data.synthetic.world import KNOWLEDGE_ERRORS
from steerlm.errors import require


@dataclass
class SyntheticConfig:
    """The built-in synthetic world (docs/synthetic_world.md). The default sizes keep the whole
    SteerLM pipeline on the embedded default within 15 minutes on 2 CPU cores."""

    seed: int = 0
    num_entities: int = 60  # creatures, 5 facts each
    annotated_rows: int = 2000  # noisy "human" ratings (HelpSteer2-style rows)
    unlabelled_rows: int = 20000  # conversations for the APM to annotate
    eval_prompts: int = 200
    encyclopedia_paragraphs: int = 50  # per creature, in the pretraining corpus (corpus.jsonl)
    corpus_conversations: int = 1000  # the first N unlabelled conversations' text also go into corpus.jsonl
    multi_turn_fraction: float = 0.15
    label_noise: float = 0.3  # std of the Gaussian added to the oracle before rounding
    missing_label_rate: float = 0.02  # chance that a rating is absent (-100)
    knowledge_errors: str = "random"  # random | fixed: which wrong value, which off-topic creature (World)

    def validate(self) -> None:
        require(
            self.num_entities >= 3,
            "synthetic.num_entities",
            self.num_entities,
            "must be at least 3",
            "a comparison needs two creatures and an off-topic answer a third",
        )
        for name in (
            "annotated_rows",
            "unlabelled_rows",
            "eval_prompts",
            "encyclopedia_paragraphs",
            "corpus_conversations",
        ):
            value = getattr(self, name)
            require(value >= 0, f"synthetic.{name}", value, "must be >= 0", "use 0 to skip the split")
        for name in ("multi_turn_fraction", "missing_label_rate"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"synthetic.{name}", value, "must be in [0, 1]", "use e.g. 0.1")
        require(self.label_noise >= 0, "synthetic.label_noise", self.label_noise, "must be >= 0", "use 0.3")
        require(
            self.knowledge_errors in KNOWLEDGE_ERRORS,
            "synthetic.knowledge_errors",
            self.knowledge_errors,
            f"must be one of {', '.join(KNOWLEDGE_ERRORS)}",
            "use random (the default) or fixed",
        )
